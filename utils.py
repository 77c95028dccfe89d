"""The training images (CIFAR-10 or a folder) as batches on the device, the user-facing error
type, and atomic file writes: a crash or a full disk never leaves a half-written file where a
good one stood.
"""

import contextlib
import hashlib
import json
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}
FOLDER_CACHE_NAME = ".dcgan-cache"
# Bump when read_image's pixels change, so caches made by older code are rebuilt, not trusted.
FOLDER_CACHE_VERSION = 1
DECODE_CHUNK_FILES = 256
# The cache must leave this much disk free, for the checkpoints and samples written after it.
DISK_SPARE_BYTES = 1 << 30
ABANDONED_BUILD_SECONDS = 3600
# The images may take this share of the device's free memory; the nets, their activations, the
# batches and FID's Inception need the rest. A larger dataset is streamed from the cache.
DEVICE_MEMORY_SHARE = 0.5


class UserError(Exception):
    """A problem with the user's input or environment: printed without a traceback, exit 2."""


# ---------------------------------------------------------------- atomic files


def atomic_write(path, write_fn, mode="wb"):
    """Call write_fn(file) on a temp file beside path, fsync, then rename over path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        with os.fdopen(handle, mode) as file:
            write_fn(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp_name, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp_name, path)
    except OSError as error:
        Path(tmp_name).unlink(missing_ok=True)
        raise UserError(
            f"cannot write {path}: {error.strerror or error}; the previous file, if any, is intact"
        ) from None
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data):
    atomic_write(path, lambda file: file.write(data))


def check_writable(folder):
    """Fail early, before any training, if folder cannot be created or written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UserError(f"output folder {folder} is not writable: {error.strerror or error}") from None


# ---------------------------------------------------------------- CIFAR-10


def load_cifar10(root, download=True):
    """CIFAR-10's 50k training images as a uint8 tensor (N, 3, 32, 32) on the CPU."""
    root = Path(root)
    folder = root / CIFAR_FOLDER
    archive = root / CIFAR_ARCHIVE
    if not all((folder / name).is_file() for name in CIFAR_TRAIN_BATCHES):
        if not archive.is_file():
            refuse_image_folder(root)
            if not download:
                raise UserError(f"CIFAR-10 not found: put {CIFAR_ARCHIVE} in {root}/")
            _download_cifar10(root)
        _extract_cifar10(archive, root)
    return torch.cat([_read_cifar_batch(folder / name) for name in CIFAR_TRAIN_BATCHES])


def refuse_image_folder(root):
    """--dataroot my_images/ without --dataset folder would download CIFAR-10 into the user's images."""
    if (root / CIFAR_FOLDER).exists() or (root / CIFAR_ARCHIVE).exists() or not root.is_dir():
        return
    if any(path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() for path in root.rglob("*")):
        raise UserError(f"{root} holds image files but no CIFAR-10: did you mean --dataset folder?")


def _download_cifar10(root):
    from torchvision.datasets.utils import download_url

    try:
        download_url(CIFAR_URL, str(root), CIFAR_ARCHIVE, CIFAR_MD5)
    except Exception as error:  # urllib, socket and checksum errors all mean the same to a user
        (Path(root) / CIFAR_ARCHIVE).unlink(missing_ok=True)
        raise UserError(
            f"could not download CIFAR-10 ({error.__class__.__name__}: {error}). "
            f"Download {CIFAR_URL} by hand and put {CIFAR_ARCHIVE} in {Path(root).resolve()}/"
        ) from None


def _extract_cifar10(archive, root):
    """Extract into a temp folder, then rename: a cut-short extraction leaves no half folder."""
    try:
        with tempfile.TemporaryDirectory(dir=root, prefix=".cifar-extract-") as scratch:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(scratch, filter="data")
            if not (Path(scratch) / CIFAR_FOLDER).is_dir():
                raise tarfile.TarError(f"it holds no {CIFAR_FOLDER}/ folder")
            shutil.rmtree(Path(root) / CIFAR_FOLDER, ignore_errors=True)
            os.replace(Path(scratch) / CIFAR_FOLDER, Path(root) / CIFAR_FOLDER)
    except (OSError, tarfile.TarError, EOFError) as error:
        raise UserError(f"{archive} is not a readable CIFAR-10 archive ({error}); delete it and run again") from None


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10's dicts of numpy arrays and refuses anything that could run code."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),  # protocol-2 pickles store bytes this way
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path):
    try:
        with open(path, "rb") as file:
            batch = _ArrayUnpickler(file, encoding="latin1").load()
        pixels = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    except Exception as error:  # a damaged batch can fail in pickle, numpy or a missing key
        raise UserError(
            f"{path} is not a CIFAR-10 batch ({error.__class__.__name__}); delete {path.parent} and run again"
        ) from None
    return torch.from_numpy(pixels.copy())


# ---------------------------------------------------------------- image folders


def list_images(root):
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"data folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def read_image(path, image_size):
    """One image as uint8 (3, S, S): converted to RGB, resized and center-cropped.

    Returns None for a file that cannot be decoded (truncated, not an image).
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            image = _to_rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return None
    scale = image_size / min(image.size)
    width, height = max(image_size, round(image.width * scale)), max(image_size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=None)
    left, top = (width - image_size) // 2, (height - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def _to_rgb(image):
    from PIL import Image

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
    )
    done = 0
    for images, readable in loader:
        skipped.extend(files[done + i] for i in (~readable).nonzero().flatten().tolist())
        done += len(readable)
        if len(images):
            yield images


def report_skipped(root, skipped_count, file_count):
    """The one warning about unreadable files (at every start, cached or not); an error if none was readable."""
    if skipped_count:
        warnings.warn(
            f"skipped {skipped_count} of {file_count} files in {root} that are not readable images", stacklevel=2
        )
    if skipped_count == file_count:
        raise UserError(f"data folder {root} holds no readable images")


def load_folder(root, image_size, workers, cache_dir=None, say=None):
    """Decode a whole folder into a uint8 CPU tensor (N, 3, S, S), through the decoded-image cache."""
    return open_folder(root, image_size, workers, cache_dir, say).to_device("cpu")


# ---------------------------------------------------------------- the decoded-image cache
# Decoding CelebA's 202,599 JPEGs with PIL takes minutes, so the decoded images are kept in
# <dataroot>/.dcgan-cache/images-<S>px-<key>.npy, or in <cache_dir>/.dcgan-cache/ when the data
# folder is read-only. The key digests every file's name, size and mtime, the image size and the
# decoder: any change gives another name. The JSON sidecar is written last, once the .npy is
# complete, and a cache whose sidecar is missing or does not match it is never trusted.


@dataclass(frozen=True)
class FolderListing:
    """What a folder's decoded images depend on: its image files, the image size, and their digest."""

    root: Path
    files: list
    image_size: int
    key: str

    @classmethod
    def of(cls, root, image_size):
        root = Path(root)
        files = list_images(root)
        return cls(root, files, image_size, folder_cache_key(root, files, image_size))

    @property
    def stem(self):
        return f"images-{self.image_size}px-{self.key}"

    @property
    def decoded_bytes(self):
        return len(self.files) * 3 * self.image_size**2


def folder_cache_key(root, files, image_size):
    from PIL import __version__ as pil_version

    digest = hashlib.sha256(f"{FOLDER_CACHE_VERSION} {pil_version} {image_size}\n".encode())
    for path in files:
        try:
            stat = path.stat()
            size, mtime_ns = stat.st_size, stat.st_mtime_ns
        except OSError:  # removed since it was listed: it will be skipped as unreadable
            size = mtime_ns = -1
        digest.update(f"{path.relative_to(root)}\0{size}\0{mtime_ns}\n".encode(errors="surrogateescape"))
    return digest.hexdigest()[:20]


def cache_folders(root, cache_dir):
    """Where the cache may live, in order: beside the data, then the caller's folder."""
    folders = [Path(root) / FOLDER_CACHE_NAME]
    if cache_dir is not None and Path(cache_dir) / FOLDER_CACHE_NAME != folders[0]:
        folders.append(Path(cache_dir) / FOLDER_CACHE_NAME)
    return folders


def cache_paths(folder, listing):
    return folder / f"{listing.stem}.npy", folder / f"{listing.stem}.json"


def open_folder(root, image_size, workers, cache_dir=None, say=None):
    """A folder's readable images as HostImages mapped from the decoded-image cache, built first if needed.

    cache_dir: the folder to cache in when the data folder is not writable (the cache goes in
    cache_dir/.dcgan-cache/); say: gets the one line saying whether the cache was reused or built.
    """
    say = say or ignore_message
    listing = FolderListing.of(root, image_size)
    folders = cache_folders(listing.root, cache_dir)
    for folder in folders:
        cached = read_folder_cache(folder, listing)
        if cached is not None:
            images, skipped = cached
            report_skipped(listing.root, len(skipped), len(listing.files))
            say(f"image cache: reusing {images.source} ({len(images)} images)")
            return images
    reason = rebuild_reason(folders, listing)
    problems = []
    for folder in folders:
        problem = cache_folder_problem(folder, listing.decoded_bytes)
        if problem is None:
            say(
                f"image cache: {reason}; decoding {len(listing.files)} files "
                f"({size_text(listing.decoded_bytes)}) into {cache_paths(folder, listing)[0]}"
            )
            return build_folder_cache(folder, listing, workers)
        problems.append(problem)
    return decode_without_cache(listing, workers, "; ".join(problems), say)


def ignore_message(message):
    pass


def read_folder_cache(folder, listing):
    """(HostImages, skipped file names) of a complete cache, or None: no cache, or one not to trust."""
    npy, sidecar = cache_paths(folder, listing)
    expected_shape = (len(listing.files), 3, listing.image_size, listing.image_size)
    try:
        meta = json.loads(sidecar.read_text())
        array = np.load(npy, mmap_mode="c")  # copy-on-write: writable for torch, never written back
        rows, skipped = meta["rows"], list(meta["skipped"])
        trusted = (
            meta["key"] == listing.key
            and array.dtype == np.uint8
            and array.shape == expected_shape
            and npy.stat().st_size == array.offset + array.nbytes  # not cut short, nothing appended
            and isinstance(rows, int)
            and 0 < rows == len(listing.files) - len(skipped)
        )
    except (OSError, ValueError, SyntaxError, KeyError, TypeError, AttributeError):
        return None  # unreadable JSON or .npy header, a truncated file: all mean "rebuild"
    return (HostImages(torch.from_numpy(array)[:rows], source=npy), skipped) if trusted else None


def rebuild_reason(folders, listing):
    """Why no cache could be reused, for the line announcing the build."""

    def present(pattern):
        return any(any(folder.glob(pattern)) for folder in folders)

    if present(f"{listing.stem}.*"):
        return "the cache is incomplete or damaged, rebuilding it"
    if present(f"images-{listing.image_size}px-*.json"):
        return "the files changed since the cache was made, rebuilding it"
    if present("images-*px-*.json"):
        return f"no cache for --image-size {listing.image_size} yet, building one"
    return "no cache yet, building one"


def cache_folder_problem(folder, needed_bytes):
    """Why folder cannot take a cache of needed_bytes, or None when it can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        free_bytes = shutil.disk_usage(folder).free
    except OSError as error:
        return f"{folder} is not writable ({error.strerror or error})"
    if free_bytes < needed_bytes + DISK_SPARE_BYTES:
        remove_if_empty(folder)
        return f"{folder} has {size_text(free_bytes)} free, the cache needs {size_text(needed_bytes)}"
    return None


def build_folder_cache(folder, listing, workers):
    """Decode the folder into the cache a chunk at a time (never all in memory), then write its sidecar."""
    npy, sidecar = cache_paths(folder, listing)
    remove_stale_caches(folder, listing)
    skipped = []
    try:
        atomic_write(npy, lambda file: write_decoded(file, listing, workers, skipped))
    except BaseException:
        remove_if_empty(folder)
        raise
    meta = {
        "key": listing.key,
        "root": str(listing.root.resolve()),
        "rows": len(listing.files) - len(skipped),
        "skipped": [str(path.relative_to(listing.root)) for path in skipped],
    }
    atomic_write(sidecar, lambda file: json.dump(meta, file), mode="w")
    cached = read_folder_cache(folder, listing)
    if cached is None:
        raise UserError(f"the decoded-image cache {npy} could not be read back; delete {folder} and run again")
    return cached[0]


def write_decoded(file, listing, workers, skipped):
    """The .npy format written by hand, so rows go to disk as they are decoded."""
    shape = (len(listing.files), 3, listing.image_size, listing.image_size)
    np.lib.format.write_array_header_1_0(file, {"descr": "|u1", "fortran_order": False, "shape": shape})
    end = file.tell() + math.prod(shape)
    for images in decode_files(listing.files, listing.image_size, workers, skipped):
        file.write(images.numpy().data)
    report_skipped(listing.root, len(skipped), len(listing.files))  # raises before a cache of nothing is kept
    file.truncate(end)  # rows for the unreadable files, at the end: zeros, never read


def remove_stale_caches(folder, listing):
    """Free the disk before a build: older caches of this data at this size, and leftovers of crashed builds."""
    beside_data = folder == listing.root / FOLDER_CACHE_NAME
    root = str(listing.root.resolve())
    for sidecar in folder.glob(f"images-{listing.image_size}px-*.json"):
        if sidecar.stem != listing.stem and (beside_data or sidecar_root(sidecar) == root):
            sidecar.unlink(missing_ok=True)
            sidecar.with_suffix(".npy").unlink(missing_ok=True)
    # a build in progress rewrites its temp file every few seconds; one left alone this long is dead
    cutoff = time.time() - ABANDONED_BUILD_SECONDS
    orphans = [p for p in folder.glob(f"images-{listing.image_size}px-*.npy") if not p.with_suffix(".json").exists()]
    for path in [*folder.glob(f".images-{listing.image_size}px-*.tmp"), *orphans]:
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                path.unlink()


def sidecar_root(sidecar):
    try:
        return json.loads(sidecar.read_text()).get("root")
    except (OSError, ValueError, AttributeError):
        return None


def remove_if_empty(folder):
    with contextlib.suppress(OSError):
        folder.rmdir()


def decode_without_cache(listing, workers, problems, say):
    """The fallback when no folder can take the cache: decode into memory, again at every start."""
    available = available_ram_bytes()
    # torch.cat holds the chunks and their concatenation: twice the decoded size at the peak
    if available is not None and 2 * listing.decoded_bytes > available:
        raise UserError(
            f"the images of {listing.root} need {size_text(2 * listing.decoded_bytes)} of memory to decode, "
            f"{size_text(available)} are available, and no folder can take the decoded-image cache ({problems})"
        )
    say(f"image cache: none ({problems}); decoding {len(listing.files)} files into memory")
    skipped = []
    chunks = list(decode_files(listing.files, listing.image_size, workers, skipped))
    report_skipped(listing.root, len(skipped), len(listing.files))
    return HostImages(torch.cat(chunks))


# ---------------------------------------------------------------- batches on the device


def load_dataset(opts, device, cache_dir=None, say=None, memory_limit_bytes=None):
    """The training images: a uint8 tensor on the device, or HostImages when a folder is too large for it.

    cache_dir: where a folder's decoded-image cache goes when the data folder is not writable (the
    run's checkpoint folder); say: gets the lines about the cache and about streaming;
    memory_limit_bytes: the bytes of images the device may hold (None: a share of its free memory).
    Train from the result with make_batches.
    """
    if opts.dataset == "cifar10":
        images = load_cifar10(opts.dataroot)
    elif opts.dataset == "folder":
        images = open_folder(opts.dataroot, opts.image_size, opts.workers, cache_dir, say)
    else:
        generator = torch.Generator().manual_seed(opts.seed)
        images = torch.randint(
            0, 256, (512, 3, opts.image_size, opts.image_size), generator=generator, dtype=torch.uint8
        )
    images = choose_subset(images, opts.subset, opts.seed)
    if len(images) < opts.batch_size:
        raise UserError(f"the dataset has {len(images)} images, fewer than --batch-size {opts.batch_size}")
    if isinstance(images, HostImages):
        return place_on_device(images, device, memory_limit_bytes, say or ignore_message)
    return images.to(device)


def choose_subset(images, subset, seed):
    """The first `subset` images of a shuffle seeded by seed (so a resumed run gets the same ones)."""
    if subset is None:
        return images
    if subset > len(images):
        raise UserError(f"--subset {subset} is larger than the dataset ({len(images)} images)")
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:subset]
    return images.select(chosen) if isinstance(images, HostImages) else images[chosen]


def place_on_device(images, device, memory_limit_bytes, say):
    """The images as one device tensor when they fit in its memory budget; else left where they are, to stream."""
    budget = memory_limit_bytes if memory_limit_bytes is not None else device_memory_budget(device)
    if budget is None or images.nbytes <= budget:
        return images.to_device(device)
    where = images.source or "host memory"
    say(
        f"the images ({size_text(images.nbytes)}) exceed the {size_text(budget)} budget on {device}: streaming batches from {where}"
    )
    return images


def device_memory_budget(device):
    """Bytes of images worth holding on the device: a share of its free memory; None when unknown."""
    device = torch.device(device)
    free_bytes = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_ram_bytes()
    return None if free_bytes is None else int(free_bytes * DEVICE_MEMORY_SHARE)


def available_ram_bytes():
    """RAM the OS can give without swapping (Linux's MemAvailable), or None when unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    with contextlib.suppress(AttributeError, OSError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def size_text(size_bytes):
    """A size for people: GiB, or MiB below one GiB."""
    return f"{size_bytes / 2**30:.1f} GiB" if size_bytes >= 2**30 else f"{size_bytes / 2**20:.1f} MiB"


class HostImages:
    """uint8 images (N, 3, S, S) in host memory or in a memory-mapped cache file, read by rows on demand.

    What load_dataset returns for a folder too large for the device: StreamedBatches gathers
    each batch's rows from it, and nothing reads the whole array at once. Slicing gives a
    CPU tensor, so the real-sample grid and FID's real statistics read it like a tensor.
    """

    def __init__(self, array, source=None, rows=None):
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


def epoch_order(seed, epoch, count):
    """The shuffled order of one epoch: a function of (seed, epoch) only, so a resumed run sees the same batches."""
    mixed = (seed * 1_000_003 + epoch) % (2**63 - 1)  # inside torch's seed range for any --seed
    return torch.randperm(count, generator=torch.Generator().manual_seed(mixed))


def batch_rows(order, index, batch_size, rank, world_size):
    """The rows of batch `index` for this rank: under DDP each rank takes every world_size-th batch."""
    first = (index * world_size + rank) * batch_size
    return order[first : first + batch_size]


class DeviceBatches:
    """Shuffled batches sliced from a device-resident uint8 tensor, as in airbench.

    The permutation of each epoch depends only on (seed, epoch), so a resumed run sees
    the same batches; under DDP each rank takes every world_size-th batch of it.
    The last incomplete batch is dropped so every step has the same shape.
    Batches come in D's memory format and dtype, so real and fake batches share one D graph.
    """

    def __init__(
        self, images, batch_size, image_size, seed, rank=0, world_size=1, dtype=torch.float32,
        memory_format=torch.contiguous_format,
    ):  # fmt: skip
        self.images = images
        self.batch_size = batch_size
        self.image_size = image_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.dtype, self.memory_format = dtype, memory_format

    def __len__(self):
        return len(self.images) // (self.batch_size * self.world_size)

    def epoch(self, epoch, start=0):
        """Yield the float batches of one epoch in [-1, 1], skipping the first `start`."""
        order = epoch_order(self.seed, epoch, len(self.images)).to(self.images.device)
        for index in range(start, len(self)):
            rows = batch_rows(order, index, self.batch_size, self.rank, self.world_size)
            images = to_float_images(self.images[rows], self.image_size)
            yield images.to(self.dtype, memory_format=self.memory_format)

    def describe(self):
        return f"held on {self.images.device}"


class StreamedBatches:
    """DeviceBatches' batches for images too large for the device, gathered from HostImages.

    Same interface, same batches (order, sharding, dropped last batch). A background thread
    gathers the next batch's rows (the page faults and disk reads of a mapped cache) into a
    pinned buffer while the device trains on the current one; the copy to the device is
    non-blocking. The copy is queued on the current stream, behind the step before it: at
    batch sizes of DCGAN it takes microseconds, and the gather is what needs hiding.
    """

    def __init__(
        self, images, batch_size, image_size, seed, rank=0, world_size=1, device="cpu", dtype=torch.float32,
        memory_format=torch.contiguous_format,
    ):  # fmt: skip
        self.images = images
        self.batch_size = batch_size
        self.image_size = image_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.dtype, self.memory_format = dtype, memory_format

    def __len__(self):
        return len(self.images) // (self.batch_size * self.world_size)

    def describe(self):
        return f"streamed from {self.images.source or 'host memory'}"

    def epoch(self, epoch, start=0):
        """Yield the float batches of one epoch in [-1, 1] on the device, skipping the first `start`."""
        order = epoch_order(self.seed, epoch, len(self.images))
        buffers = [self.host_buffer(), self.host_buffer()]  # one being gathered into while the other is copied
        copied = [None, None]  # per buffer: the event after which its last copy to the device is done
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gather-batches") as gatherer:

            def gather_later(index):
                slot = index % 2
                return gatherer.submit(self.gather, order, index, buffers[slot], copied[slot])

            pending = gather_later(start) if start < len(self) else None
            for index in range(start, len(self)):
                host_batch = pending.result()
                device_batch = host_batch.to(self.device, non_blocking=True)
                copied[index % 2] = self.copy_done_event()
                if index + 1 < len(self):
                    pending = gather_later(index + 1)
                # converted before yielding: on the CPU, device_batch is the buffer itself
                images = to_float_images(device_batch, self.image_size)
                yield images.to(self.dtype, memory_format=self.memory_format)

    def host_buffer(self):
        shape = (self.batch_size, *self.images.shape[1:])
        return torch.empty(shape, dtype=torch.uint8, pin_memory=self.device.type == "cuda")

    def gather(self, order, index, buffer, copied):
        if copied is not None:
            copied.synchronize()  # the buffer's previous batch must reach the device before it is overwritten
        rows = batch_rows(order, index, self.batch_size, self.rank, self.world_size)
        return self.images.gather(rows, out=buffer)

    def copy_done_event(self):
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event


def make_batches(images, batch_size, image_size, seed, rank=0, world_size=1, device="cpu", **layout):
    """The batch source for what load_dataset returned: DeviceBatches, or StreamedBatches for HostImages.

    layout: dtype and memory_format of the batches (D's, so real and fake batches share one graph).
    """
    if isinstance(images, HostImages):
        return StreamedBatches(images, batch_size, image_size, seed, rank, world_size, device, **layout)
    return DeviceBatches(images, batch_size, image_size, seed, rank, world_size, **layout)


def to_float_images(uint8_images, image_size):
    """uint8 (N, 3, s, s) to float in [-1, 1] at image_size, on the images' device."""
    images = uint8_images.float().div_(127.5).sub_(1.0)
    if images.shape[-1] != image_size:
        # antialiasing only changes anything when shrinking; growing 32 -> 64 gives the same
        # pixels through a slower kernel
        shrinking = images.shape[-1] > image_size
        images = F.interpolate(images, size=image_size, mode="bilinear", align_corners=False, antialias=shrinking)
    return images
