"""The training images (CIFAR-10 or a folder) as batches on the device, the user-facing error
type, and atomic file writes: a crash or a full disk never leaves a half-written file where a
good one stood.
"""

import os
import pickle
import shutil
import tarfile
import tempfile
import warnings
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
            if not download:
                raise UserError(f"CIFAR-10 not found: put {CIFAR_ARCHIVE} in {root}/")
            _download_cifar10(root)
        _extract_cifar10(archive, root)
    return torch.cat([_read_cifar_batch(folder / name) for name in CIFAR_TRAIN_BATCHES])


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
    """Images of a folder (searched recursively) as uint8 tensors; broken files give None."""

    def __init__(self, root, image_size):
        self.files = list_images(root)
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


def load_folder(root, image_size, workers):
    """Decode a whole folder once into a uint8 tensor; warn once about skipped files."""
    dataset = FolderImages(root, image_size)
    # its own generator: a DataLoader otherwise draws its workers' seed from the global RNG,
    # which a resumed run has just restored
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=256, num_workers=workers, collate_fn=collate_readable, generator=torch.Generator()
    )
    chunks, skipped = [], 0
    for images, bad in loader:
        chunks.append(images)
        skipped += bad
    if skipped:
        warnings.warn(f"skipped {skipped} of {len(dataset)} files in {root} that are not readable images", stacklevel=2)
    if skipped == len(dataset):
        raise UserError(f"data folder {root} holds no readable images")
    return torch.cat([c for c in chunks if len(c)])


# ---------------------------------------------------------------- batches on the device


def load_dataset(opts, device):
    """The training images as one uint8 tensor on the training device."""
    if opts.dataset == "cifar10":
        images = load_cifar10(opts.dataroot)
    elif opts.dataset == "folder":
        images = load_folder(opts.dataroot, opts.image_size, opts.workers)
    else:
        generator = torch.Generator().manual_seed(opts.seed)
        images = torch.randint(
            0, 256, (512, 3, opts.image_size, opts.image_size), generator=generator, dtype=torch.uint8
        )
    if opts.subset is not None:
        if opts.subset > len(images):
            raise UserError(f"--subset {opts.subset} is larger than the dataset ({len(images)} images)")
        chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(opts.seed))
        images = images[chosen[: opts.subset]]
    if len(images) < opts.batch_size:
        raise UserError(f"the dataset has {len(images)} images, fewer than --batch-size {opts.batch_size}")
    return images.to(device)


class DeviceBatches:
    """Shuffled batches sliced from a device-resident uint8 tensor, as in airbench.

    The permutation of each epoch depends only on (seed, epoch), so a resumed run sees
    the same batches; under DDP each rank takes every world_size-th batch of it.
    The last incomplete batch is dropped so every step has the same shape.
    Batches come in D's memory format and dtype, so real and fake batches share one D graph.
    """

    def __init__(
        self,
        images,
        batch_size,
        image_size,
        seed,
        rank=0,
        world_size=1,
        dtype=torch.float32,
        memory_format=torch.contiguous_format,
    ):
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
        order = epoch_order(len(self.images), self.seed, epoch).to(self.images.device)
        for index in range(start, len(self)):
            first = (index * self.world_size + self.rank) * self.batch_size
            images = to_float_images(self.images[order[first : first + self.batch_size]], self.image_size)
            yield images.to(self.dtype, memory_format=self.memory_format)


def epoch_order(count, seed, epoch):
    """The permutation of an epoch; the seed arithmetic stays inside int64 for any seed."""
    mixed = (seed * 1_000_003 + epoch) % (2**63 - 1)
    return torch.randperm(count, generator=torch.Generator().manual_seed(mixed))


def to_float_images(uint8_images, image_size):
    """uint8 (N, 3, s, s) to float in [-1, 1] at image_size, on the images' device."""
    images = uint8_images.float().div_(127.5).sub_(1.0)
    if images.shape[-1] != image_size:
        # antialiasing only changes anything when shrinking; growing 32 -> 64 gives the same
        # pixels through a slower kernel
        shrinking = images.shape[-1] > image_size
        images = F.interpolate(images, size=image_size, mode="bilinear", align_corners=False, antialias=shrinking)
    return images
