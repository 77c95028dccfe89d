"""Image folders: listing the images, decoding them in worker processes (foldercache.py keeps what
is decoded, so that every start after the first is fast), and the images in host memory
(HostImages) for a folder too large for the device. A --conditional folder's classes are
classnames.py's.
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

from errors import UserError, size_text
from imagesize import image_sides

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}
DECODE_CHUNK_FILES = 256
MAX_COVER_AREA = 64  # an image resized to more than this many crops' area: the crop's part alone is resized


# ---------------------------------------------------------------- image folders


def refuse_missing_folder(root):
    if not Path(root).is_dir():
        what = "is a file: --dataroot names the folder of the images" if Path(root).exists() else "does not exist"
        raise UserError(f"data folder {root} {what}")
    return Path(root)


def list_images(root):
    root = refuse_missing_folder(root)
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
    left, top = (width - crop_width) // 2, (height - crop_height) // 2
    crop = (left, top, left + crop_width, top + crop_height)
    if width * height <= MAX_COVER_AREA * crop_width * crop_height:
        image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=None).crop(crop)
    else:  # a strip (1 x 2,000,000 px) would cover the crop in gigabytes: only the crop's part is resized
        box = [side * (image.width / width, image.height / height)[index % 2] for index, side in enumerate(crop)]
        image = image.resize((crop_width, crop_height), Image.Resampling.BILINEAR, box=box, reducing_gap=None)
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
    done, chunks = 0, iter(loader)
    try:
        for images, readable in chunks:
            skipped.extend(files[done + i] for i in (~readable).nonzero().flatten().tolist())
            done += len(readable)
            if len(images):
                yield images
    except BaseException:
        stop_decoding_now(chunks)
        raise


def stop_decoding_now(chunks):
    """Kill a stopped decode's workers at once (they ignore stop signals and hold nothing to save),
    where the DataLoader would wait for each to finish its chunk; its watch over their pids ends
    first, or it would take their deaths for a failure and print a second error."""
    remove_pids = getattr(torch.utils.data._utils.signal_handling, "_remove_worker_pids", None)
    if remove_pids is None or not getattr(chunks, "_worker_pids_set", False):
        return  # no workers, or a DataLoader this does not know: its own shutdown, slower
    remove_pids(id(chunks))
    chunks._worker_pids_set = False
    for worker in getattr(chunks, "_workers", ()):
        if worker.is_alive():
            worker.kill()


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


class HostImages:
    """uint8 images (N, 3, S, S) in host memory or in a memory-mapped cache file, read by rows on
    demand: what load_dataset returns for a folder too large for the device. StreamedBatches gathers
    each batch's rows, nothing reads the whole array at once, and a slice is a CPU tensor."""

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


def refuse_beyond_memory(needed_bytes, need, advice=""):
    """Work that needs more memory than the system can give is refused before it starts, not ended
    by the system midway. need: who needs it, up to the verb ("8 walks of 16x16 px images need
    about"); advice: what to do instead (": take fewer --steps")."""
    available = available_ram_bytes()
    if available is not None and needed_bytes > available:
        raise UserError(f"{need} {size_text(needed_bytes)} of memory, and {size_text(available)} is available{advice}")
