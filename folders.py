"""Image folders: listing the images (and a --conditional folder's classes), decoding them in
worker processes, and the images in host memory (HostImages) for a folder too large for the device.
The decoded images are kept in image_cache.py's cache, so every start after the first is fast.
"""

import contextlib
import math
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image, ImageOps

from classnames import check_class_names
from errors import UserError, count_text
from imagesize import image_sides

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}
DECODE_CHUNK_FILES = 256


# ---------------------------------------------------------------- image folders


def list_images(root):
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"data folder {root} is a file: --dataroot names the folder that holds the images")
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist")
    files = sorted(p for p in files_under(root) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"data folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def files_under(root):
    """Every file under root, through symbolic links to folders too (a folder of links to others is
    common), each real folder once: a link back up the tree is not followed round."""
    seen = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        subfolders.sort()  # the same path for a folder reached twice, at every start
        yield from (Path(folder) / name for name in names)


def read_image(path, image_size):
    """One image as uint8 (3, H, W) of image_size (a side, or "WIDTHxHEIGHT"): converted to RGB,
    resized to cover W x H (the side that fits the aspect least is cut) and centre-cropped.

    Returns None for a file that cannot be decoded (truncated, not an image).
    """
    try:
        with Image.open(path) as image:
            image.load()
            # the EXIF orientation, as every viewer applies it: phone photos are stored sideways
            image = _to_rgb(ImageOps.exif_transpose(image))
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return None
    crop_width, crop_height = image_sides(image_size)
    scale = max(crop_width / image.width, crop_height / image.height)
    width, height = max(crop_width, round(image.width * scale)), max(crop_height, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=None)
    left, top = (width - crop_width) // 2, (height - crop_height) // 2
    image = image.crop((left, top, left + crop_width, top + crop_height))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def _to_rgb(image):
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit and float greyscale: scale to 8 bits instead of clipping at 255
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            peak = 65535.0  # the bit depth is known: no guessing from the values
        elif image.mode == "I":
            peak = 65535.0 if values.max() > 255 else 255.0
        else:
            peak = max(values.max(), 1.0)
        image = Image.fromarray(np.clip(values / peak * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


class FolderImages(torch.utils.data.Dataset):
    """Images of a folder (searched recursively) or of a list of files as uint8 tensors; broken files give None."""

    def __init__(self, root, image_size, files=None):
        self.files = list_images(root) if files is None else files
        self.image_size = image_size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        return read_image(self.files[index], self.image_size)


def collate_readable(items):
    """Stack the decodable images; also return how many were skipped."""
    images = [item for item in items if item is not None]
    stacked = torch.stack(images) if images else torch.empty(0, dtype=torch.uint8)
    return stacked, len(items) - len(images)


def collate_with_mask(items):
    """Stack the decodable images; also return which of the items they were."""
    readable = torch.tensor([item is not None for item in items], dtype=torch.bool)
    images, _ = collate_readable(items)
    return images, readable


def decode_files(files, image_size, workers, skipped):
    """Yield the readable files' images in file order, a chunk at a time; append the unreadable files to skipped."""
    dataset = FolderImages(None, image_size, files)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=DECODE_CHUNK_FILES,
        num_workers=workers,
        collate_fn=collate_with_mask,
        # its own generator: a DataLoader otherwise draws its workers' seed from the global RNG,
        # which a resumed run has just restored
        generator=torch.Generator(),
        worker_init_fn=ignore_stop_signals,
    )
    done = 0
    for images, readable in loader:
        skipped.extend(files[done + i] for i in (~readable).nonzero().flatten().tolist())
        done += len(readable)
        if len(images):
            yield images


def folder_classes(root, files):
    """The class names of root for --conditional, from its listing (files: its image files), so a
    wrong layout is refused before minutes of decoding and no cache is left behind.

    Classes are root's immediate sub-folders, sorted by name as torchvision's ImageFolder sorts
    them, so class i here is class i there. A file directly in root, a sub-folder without image
    files, fewer than two sub-folders, or a sub-folder name --generate could not make a folder of
    (two names that differ only in case, a name with a backslash) is an error.
    """
    root = Path(root)
    names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    loose = [path.name for path in files if path.parent == root]
    if loose:
        raise UserError(
            f"--conditional: {root} holds images directly in it ({loose[0]}{', ...' if len(loose) > 1 else ''}); "
            "it needs one sub-folder per class, each holding that class's images"
        )
    check_class_names(names, f"--conditional: data folder {root}", "rename the sub-folder: each class becomes a folder")
    refuse_empty_classes(root, names, {path.relative_to(root).parts[0] for path in files})
    if len(names) < 2:
        raise UserError(f"--conditional: {root} has {len(names)} class sub-folder(s); it needs at least 2")
    return tuple(names)


def folder_labels(root, files, class_names):
    """The class of each file (files: the readable ones), numbered as in class_names (folder_classes's
    answer) by the sub-folder of root it is in; a class left with no readable image is an error."""
    root = Path(root)
    index = {name: number for number, name in enumerate(class_names)}
    labels = torch.tensor([index[path.relative_to(root).parts[0]] for path in files], dtype=torch.long)
    refuse_empty_classes(root, class_names, {class_names[label] for label in labels.unique().tolist()})
    return labels


def refuse_empty_classes(root, class_names, classes_with_images):
    """A UserError naming the first class folder of class_names not among classes_with_images."""
    empty = [name for name in class_names if name not in classes_with_images]
    if empty:
        raise UserError(f"--conditional: class folder {root / empty[0]} holds no readable images")


def ignore_stop_signals(worker_id):
    """In a decoding worker: Ctrl-C, SIGTERM and SIGHUP sent to the whole process group are the main
    process's to act on (it stops the workers); a worker killed by one would make the DataLoader
    raise a second error after the program's one line."""
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def report_skipped(root, skipped, file_count):
    """The one warning about unreadable files (at every start, cached or not), naming the first few
    and why; an error if none was readable."""
    if skipped:
        named = ", ".join(f"{path.relative_to(root)} ({why_unreadable(path)})" for path in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        warnings.warn(
            f"skipped {len(skipped)} of {file_count} files in {root} that are not readable images: {named}{more}",
            stacklevel=2,
        )
    if len(skipped) == file_count:
        raise UserError(f"data folder {root} holds no readable images")


def why_unreadable(path):
    """Why read_image gave None for path, in a few words."""
    try:
        with Image.open(path) as image:
            image.load()
    except Image.DecompressionBombError as error:  # "Image size (N pixels) exceeds limit of M pixels, could be ..."
        return f"too large to decode: {str(error).split(',')[0]}"
    except PIL.UnidentifiedImageError:
        return "not an image format Pillow reads"
    except (OSError, ValueError, SyntaxError) as error:
        return str(error).strip() or error.__class__.__name__
    return "readable now: it changed while it was decoded"


def size_text(size_bytes):
    """A size for people: bytes below a KiB, else KiB, MiB, GiB, ... up to EiB, with one decimal."""
    if size_bytes < 2**10:
        return count_text(size_bytes, "byte")
    power = min(int(math.log(size_bytes, 2**10)), 6)
    return f"{size_bytes / 2 ** (10 * power):.1f} {'KMGTPE'[power - 1]}iB"


class HostImages:
    """uint8 images (N, 3, S, S) in host memory or in a memory-mapped cache file, read by rows on demand.

    What load_dataset returns for a folder too large for the device: StreamedBatches gathers
    each batch's rows from it, and nothing reads the whole array at once. Slicing gives a
    CPU tensor, so the real-sample grid and FID's real statistics read it like a tensor.
    """

    def __init__(self, array, source=None, rows=None):
        self.files = None  # the readable files, one per row of array, where a folder's listing is known
        self.array = array  # a CPU uint8 tensor, backed by the mapped cache file when source is set
        self.source = source  # the cache file, or None for images decoded into memory
        self.rows = rows  # the rows of array in use (a --subset), or None for all

    def __len__(self):
        return len(self.array) if self.rows is None else len(self.rows)

    @property
    def shape(self):
        return torch.Size((len(self), *self.array.shape[1:]))

    @property
    def nbytes(self):
        return math.prod(self.shape)

    def select(self, rows):
        """The images at rows (a LongTensor), still unread."""
        return HostImages(self.array, self.source, rows if self.rows is None else self.rows[rows])

    def gather(self, rows, out=None):
        """The images at rows (a LongTensor) as a CPU tensor, written into out when given."""
        return torch.index_select(self.array, 0, rows if self.rows is None else self.rows[rows], out=out)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.gather(torch.arange(*index.indices(len(self))))
        rows = torch.as_tensor(index)
        return self.gather(rows.view(1))[0] if rows.dim() == 0 else self.gather(rows)

    def to_device(self, device, chunk_rows=4096):
        """All the images as one tensor on device, copied a chunk at a time (never a second full copy in RAM)."""
        if self.source is None and self.rows is None and self.array.device == torch.device(device):
            return self.array
        images = torch.empty(self.shape, dtype=torch.uint8, device=device)
        for start in range(0, len(self), chunk_rows):
            images[start : start + chunk_rows] = self[start : start + chunk_rows]
        return images


def available_ram_bytes(with_swap=False):
    """RAM the OS can give without swapping (Linux's MemAvailable), plus free swap if asked; None when unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError, KeyError):
        with open("/proc/meminfo") as meminfo:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo if line.strip()}
        return fields["MemAvailable"] + (fields.get("SwapFree", 0) if with_swap else 0)
    with contextlib.suppress(AttributeError, OSError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None
