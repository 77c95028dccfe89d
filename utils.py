"""Data, image grids, plots and checkpoint I/O for gan.py.

Every file is written atomically (temp file, then os.replace) so a crash or a full
disk never leaves a half-written file where a good one stood.
"""

import io
import json
import math
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
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_LOG_NAME = "metrics.jsonl"
# Flags that change the networks' shapes: a checkpoint only fits a net built with the same ones.
ARCHITECTURE_FLAGS = ("image_size", "nz", "ngf", "ndf", "spectral_norm")


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


def seed_or_random(seed):
    """The given seed, or a fresh random one (small enough to print and retype)."""
    return seed if seed is not None else int.from_bytes(os.urandom(3), "little")


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
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=workers, collate_fn=collate_readable)
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
    """

    def __init__(self, images, batch_size, image_size, seed, rank=0, world_size=1):
        self.images = images
        self.batch_size = batch_size
        self.image_size = image_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size

    def __len__(self):
        return len(self.images) // (self.batch_size * self.world_size)

    def epoch(self, epoch, start=0):
        """Yield the float batches of one epoch in [-1, 1], skipping the first `start`."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.images), generator=generator).to(self.images.device)
        for index in range(start, len(self)):
            first = (index * self.world_size + self.rank) * self.batch_size
            yield to_float_images(self.images[order[first : first + self.batch_size]], self.image_size)


def to_float_images(uint8_images, image_size):
    """uint8 (N, 3, s, s) to float in [-1, 1] at image_size, on the images' device."""
    images = uint8_images.float().div_(127.5).sub_(1.0)
    if images.shape[-1] != image_size:
        images = F.interpolate(images, size=image_size, mode="bilinear", align_corners=False, antialias=True)
    return images


# ---------------------------------------------------------------- DiffAugment


def diff_augment(images, generator=None):
    """Color, translation and cutout on a batch (Zhao et al., 2020), differentiable.

    Applied to real and fake images alike before D, so D never sees un-augmented data.
    """
    n = images.shape[0]

    def uniform(*shape):
        return torch.rand(*shape, device=images.device, generator=generator, dtype=images.dtype)

    images = images + (uniform(n, 1, 1, 1) - 0.5)
    mean = images.mean(dim=1, keepdim=True)
    images = (images - mean) * (uniform(n, 1, 1, 1) * 2) + mean
    mean = images.mean(dim=[1, 2, 3], keepdim=True)
    images = (images - mean) * (uniform(n, 1, 1, 1) + 0.5) + mean
    images = _translate(images, uniform(n, 2) * 0.25 - 0.125)
    return _cutout(images, uniform(n, 2))


def _translate(images, shift_fraction):
    """Shift each image by up to 1/8 of its side, filling with zeros."""
    n, _, height, width = images.shape
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shift_fraction * 2
    grid = F.affine_grid(theta, images.shape, align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _cutout(images, centre_fraction):
    """Zero a square of half the side at a random place in each image."""
    n, _, height, width = images.shape
    rows = torch.arange(height, device=images.device).view(1, -1, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, -1)
    centre_row = (centre_fraction[:, 0] * height).view(-1, 1, 1)
    centre_col = (centre_fraction[:, 1] * width).view(-1, 1, 1)
    inside = ((rows - centre_row).abs() < height / 4) & ((cols - centre_col).abs() < width / 4)
    return images * (~inside).unsqueeze(1).to(images.dtype)


# ---------------------------------------------------------------- images and plots


def grid_image(images, nrow=8):
    """Images in [-1, 1] as one PIL grid with 2-pixel padding."""
    from torchvision.utils import make_grid

    return to_pil(make_grid(images.detach().float().cpu(), nrow=nrow, padding=2, normalize=True, value_range=(-1, 1)))


def save_grid(images, path, nrow=8):
    """Save images in [-1, 1] as one PNG grid."""
    save_pil(grid_image(images, nrow), path)


def to_pil(image):
    """One float (3, H, W) image in [0, 1] as a PIL image."""
    from PIL import Image

    return Image.fromarray(image.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


def save_png(image, path):
    """Save one float (3, H, W) image in [0, 1] as PNG, atomically."""
    save_pil(to_pil(image), path)


def save_pil(image, path):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def save_gif(frames, path, frame_seconds=0.4):
    """An animated GIF of the given frames (PNG paths or PIL images), the last one held longer."""
    from PIL import Image

    frames = [frame if isinstance(frame, Image.Image) else Image.open(frame).convert("RGB") for frame in frames]
    if not frames:
        return
    durations = [int(frame_seconds * 1000)] * (len(frames) - 1) + [2000]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    atomic_write_bytes(path, buffer.getvalue())


def plot_losses(rows, path):
    """Loss_D and Loss_G, and D(x) and D(G(z)), against training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "loss_d" in r]
    steps = [r["step"] for r in rows]
    figure, (loss_axes, score_axes) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    loss_axes.plot(steps, [r["loss_d"] for r in rows], label="Loss_D")
    loss_axes.plot(steps, [r["loss_g"] for r in rows], label="Loss_G")
    loss_axes.set_ylabel("loss")
    loss_axes.legend()
    score_axes.plot(steps, [r["d_real"] for r in rows], label="D(x)")
    score_axes.plot(steps, [r["d_fake"] for r in rows], label="D(G(z))")
    score_axes.set_ylabel("D output")
    score_axes.set_xlabel("step")
    score_axes.set_ylim(0, 1)
    score_axes.legend()
    save_figure(figure, path)


def plot_fid(rows, path):
    """FID against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "fid" in r]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([r["epoch"] for r in rows], [r["fid"] for r in rows], marker="o")
    axes.set_xlabel("epoch")
    axes.set_ylabel("FID (lower is better)")
    save_figure(figure, path)


def save_figure(figure, path):
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------- metrics log


def read_metrics_log(path):
    path = Path(path)
    return parse_metrics(path.read_text()) if path.is_file() else []


def parse_metrics(text):
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return rows


def append_metrics(path, rows):
    """Append rows to the JSONL log. Appending is safe: a torn last line is skipped on read."""
    if not rows:
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as file:
            file.write("".join(json.dumps(row) + "\n" for row in rows))
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None


def truncate_metrics(path, last_step):
    """Drop rows logged after the checkpoint being resumed, so no step appears twice."""
    text = Path(path).read_text() if Path(path).is_file() else ""
    rows = parse_metrics(text)
    kept = [row for row in rows if row.get("step", 0) <= last_step]
    # a line torn by a crash mid-append would swallow the next row appended after it
    torn = bool(text) and not text.endswith("\n")
    if len(kept) != len(rows) or torn:
        atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept)), mode="w")
    return kept


# ---------------------------------------------------------------- checkpoints


def latest_checkpoint(checkpoint_dir):
    return Path(checkpoint_dir) / CHECKPOINT_NAME


def save_checkpoint(state, path):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def save_state_dict(module, path):
    save_checkpoint({k: v.detach().cpu() for k, v in module.state_dict().items()}, path)


def load_checkpoint(path):
    """Load a checkpoint of this program; never executes code from the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types; all mean "not ours"
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else error.__class__.__name__
        raise UserError(f"cannot read checkpoint {path}: {reason}") from None
    required = {"netG", "flags", "epoch", "step"}
    if not isinstance(state, dict) or not required <= set(state):
        raise UserError(f"{path} is not a checkpoint written by gan.py (it lacks {sorted(required)})")
    if not isinstance(state["flags"], dict) or not isinstance(state["netG"], dict):
        raise UserError(f"{path} is not a checkpoint written by gan.py")
    damaged = _damaged_fields(state)
    if damaged:
        raise UserError(f"checkpoint {path} is damaged: unusable {', '.join(damaged)}")
    return state


def _damaged_fields(state):
    """Fields whose type gan.py cannot use: caught here rather than deep inside training."""

    def is_count(value):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def is_weights(value):
        return isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values())

    damaged = [k for k in ("epoch", "step", "batch", "seed", "rollbacks") if k in state and not is_count(state[k])]
    damaged += [k for k in ("netG", "netD", "netG_ema") if state.get(k) is not None and not is_weights(state[k])]
    damaged += [k for k in ("optG", "optD", "rng") if k in state and not isinstance(state[k], dict)]
    damaged += [k for k in ("scalerG", "scalerD") if state.get(k) is not None and not isinstance(state[k], dict)]
    if "best_fid" in state and not isinstance(state["best_fid"], (int, float)):
        damaged.append("best_fid")
    return damaged


def load_module_state(module, state_dict, what, path):
    """load_state_dict with a user-facing message when the shapes or keys differ."""
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, KeyError, TypeError, AttributeError) as error:
        first = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:300]
        raise UserError(f"checkpoint {path} does not fit this {what}: {detail}") from None


def grid_side(count):
    return max(1, int(math.sqrt(count)))
