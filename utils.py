"""The training data as the loop takes it: CIFAR-10 (downloaded from its archive), an image folder
(decoded once into foldercache.py's cache) or random images, loaded in turns under torchrun, then cut
into batches shuffled per (seed, epoch), held on the device when they fit and streamed from the
host when they do not.
"""

import os
import pickle
import shutil
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from classnames import check_class_names, folder_classes, folder_labels, refuse_other_classes
from errors import UserError, count_text, size_text
from foldercache import FolderListing, open_folder
from folders import IMAGE_SUFFIXES, HostImages, available_ram_bytes, refuse_beyond_memory
from imagesize import image_sides
from runtime import barrier

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# The images may take this share of the device's free memory; the nets, their activations, the
# batches and FID's Inception need the rest. A larger dataset is streamed from the cache.
DEVICE_MEMORY_SHARE = 0.5
FAKE_IMAGES = 512
FAKE_CLASSES = 10  # --dataset fake --conditional: random images labelled 0, 1, ..., 9, 0, 1, ...
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601: --channels 1 trains on this mix of colour images' channels
GREY_CHECK_ROWS = 4096  # images all_greyscale reads at a time
# GAN_STREAM_BATCHES=1 streams any dataset's batches from host memory, as for a folder too large for
# the device: the self-check compares the two paths, and a user can keep the device's memory free
STREAM_VARIABLE = "GAN_STREAM_BATCHES"


# ---------------------------------------------------------------- the data, ready for the loop


def load_batches(opts, runtime):
    """The training data and its batches, on the device if they fit."""
    data = prepared_in_turns(lambda: load_training_data(opts, runtime.device, say=runtime.say), runtime)
    batches = make_batches(
        data.images,
        opts.batch_size,
        opts.image_size,
        opts.seed,
        runtime.rank,
        runtime.world_size,
        runtime.device,
        labels=data.labels,
        channels=data.channels,
        **runtime.batch_layout,
    )
    if len(batches) == 0:  # every process takes its own batch of each step
        raise UserError(
            f"the dataset has {len(data.images)} images, fewer than one step takes: --batch-size {opts.batch_size} "
            f"x {runtime.world_size} processes = {opts.batch_size * runtime.world_size}"
        )
    return data, batches


def prepared_in_turns(load, runtime):
    """load() in three turns: rank 0; then the first process of every other machine; then the rest.

    Two processes downloading or extracting CIFAR-10 (or building a folder's cache) into one folder
    at once would tear it. With a shared filesystem rank 0's copy serves everyone; without one,
    each machine's first process makes the machine's own copy before its other processes read it.
    """
    turn = 0 if runtime.is_main else 1 if runtime.local_rank == 0 else 2
    loaded = None
    for current in range(3):
        if current == turn:
            loaded = load()
        # after the last turn too: the ranks leave together, and DDP's first collectives (whose
        # timeout is short) do not wait for the last loads
        barrier(runtime)
    return loaded


# ---------------------------------------------------------------- CIFAR-10


def load_cifar10_labelled(root, download=True):
    """CIFAR-10's training images (uint8 (N, 3, 32, 32)), their labels (N,) and the ten class names."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"--dataroot {root} is a file: it names the folder CIFAR-10 is (or goes) in")
    folder = root / CIFAR_FOLDER
    archive = root / CIFAR_ARCHIVE
    if all((root / name).is_file() for name in CIFAR_TRAIN_BATCHES):
        folder = root  # --dataroot names the extracted cifar-10-batches-py itself
    elif not all((folder / name).is_file() for name in CIFAR_TRAIN_BATCHES):
        if not archive.is_file():
            refuse_image_folder(root)
            if root.name == CIFAR_FOLDER:  # an extracted folder with batches missing: no download into it
                missing = [name for name in CIFAR_TRAIN_BATCHES if not (root / name).is_file()]
                raise UserError(f"{root} lacks {', '.join(missing)}: extract CIFAR-10 again, or give its parent folder")
            if not download:
                raise UserError(f"CIFAR-10 not found: put {CIFAR_ARCHIVE} in {root}/")
            _download_cifar10(root)
        _extract_cifar10(archive, root)
    images, labels = zip(*(_read_cifar_batch(folder / name) for name in CIFAR_TRAIN_BATCHES))
    return torch.cat(images), torch.cat(labels), cifar_class_names(folder)


def refuse_non_square_cifar10(opts):
    """CIFAR-10's images are 32x32: stretched to another aspect, every image would be distorted.
    Refused where the data is read, which every mode that reads it passes before it writes anything,
    and by --evaluate before it builds Inception (a download on first use)."""
    width, height = image_sides(opts.image_size)
    if opts.dataset == "cifar10" and width != height:
        raise UserError(
            f"--image-size {opts.image_size} is not square, and CIFAR-10's images are: "
            "train on a --dataset folder of images of that shape (or give a square size)"
        )


def cifar_class_names(folder):
    """The names batches.meta gives the labels 0..9 (CIFAR-10's own when it is missing or unusable)."""
    try:
        with open(folder / "batches.meta", "rb") as file:
            names = tuple(_ArrayUnpickler(file, encoding="latin1").load()["label_names"])
    except Exception:  # the training batches are what gan.py needs; the names have a known default
        return CIFAR_CLASSES
    if len(names) != len(CIFAR_CLASSES):
        return CIFAR_CLASSES
    try:  # names --generate could not make folders of are unusable too
        return check_class_names(names, "batches.meta", "")
    except UserError:
        return CIFAR_CLASSES


def refuse_image_folder(root):
    """--dataroot my_images/ without --dataset folder would download CIFAR-10 into the user's images."""
    if (root / CIFAR_FOLDER).exists() or (root / CIFAR_ARCHIVE).exists() or not root.is_dir():
        return
    if any(path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() for path in root.rglob("*")):
        raise UserError(f"{root} holds image files but no CIFAR-10: did you mean --dataset folder?")


def _download_cifar10(root):
    import torchvision.datasets.utils  # here, not at start-up: importing torchvision takes seconds

    try:
        torchvision.datasets.utils.download_url(CIFAR_URL, str(root), CIFAR_ARCHIVE, CIFAR_MD5)
    except KeyboardInterrupt:
        (Path(root) / CIFAR_ARCHIVE).unlink(missing_ok=True)  # half an archive would fail the next run
        raise
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
        labels = np.asarray(batch["labels"], dtype=np.int64).reshape(-1)
        if len(labels) != len(pixels) or not ((labels >= 0) & (labels < len(CIFAR_CLASSES))).all():
            raise ValueError("labels do not fit the images")
    except Exception as error:  # a damaged batch can fail in pickle, numpy or a missing key
        raise UserError(
            f"{path} is not a CIFAR-10 batch ({error.__class__.__name__}); delete {path.parent} and run again"
        ) from None
    return torch.from_numpy(pixels.copy()), torch.from_numpy(labels.copy())


# ---------------------------------------------------------------- batches on the device


@dataclass
class TrainingData:
    """The training images (a device tensor, or HostImages to stream), with labels and class names
    under --conditional (labels: a CPU LongTensor of class indices; None otherwise)."""

    images: object
    labels: torch.Tensor | None = None
    class_names: tuple | None = None
    channels: int = 3  # what the networks see: 1 for greyscale data (the images stay stored as RGB)


def load_dataset(opts, device, say=None, memory_limit_bytes=None):
    """The training images: a uint8 tensor on the device, or HostImages when a folder is too large for it.

    A folder's images come through the decoded-image cache in --cache-dir; say: gets the lines
    about the cache and about streaming; memory_limit_bytes: the bytes of images the device may
    hold (None: a share of its free memory). Train from the result with make_batches.
    """
    return load_training_data(opts, device, say, memory_limit_bytes, with_labels=False).images


def load_training_data(opts, device, say=None, memory_limit_bytes=None, with_labels=None):
    """load_dataset's images as TrainingData, with their labels when with_labels (default:
    opts.conditional) asks for them."""
    with_labels = opts.conditional if with_labels is None else with_labels
    forced = streaming_forced()  # a bad value is refused before minutes of decoding, not after
    images, labels, class_names = read_images_and_labels(opts, with_labels, say)
    if not with_labels:
        labels = class_names = None
    channels = int(opts.channels) if opts.channels != "auto" else (1 if all_greyscale(images) else 3)
    images, labels = choose_subset(images, opts.subset, opts.seed, labels)
    if len(images) < opts.batch_size:
        raise UserError(
            f"the dataset has {count_text(len(images), 'image')}, fewer than --batch-size {opts.batch_size}"
        )
    if forced:
        images, memory_limit_bytes = images if isinstance(images, HostImages) else HostImages(images), 0
    if isinstance(images, HostImages):
        images = place_on_device(images, device, memory_limit_bytes, say or (lambda message: None))
    else:
        images = images.to(device)
    return TrainingData(images, labels, class_names, channels)


def all_greyscale(images):
    """Whether every image has three equal channels (a greyscale file decodes so), read a chunk at
    a time and stopping at the first colour image: a photo folder costs one chunk."""
    for start in range(0, len(images), GREY_CHECK_ROWS):
        chunk = images[start : start + GREY_CHECK_ROWS]
        if not (torch.equal(chunk[:, 0], chunk[:, 1]) and torch.equal(chunk[:, 1], chunk[:, 2])):
            return False
    return True


def streaming_forced():
    """Whether GAN_STREAM_BATCHES=1 asks for streamed batches."""
    value = os.environ.get(STREAM_VARIABLE, "")
    if value not in ("", "0", "1"):
        raise UserError(f"{STREAM_VARIABLE}={value}: give 1 (stream the batches from host memory) or 0")
    return value == "1"


def read_images_and_labels(opts, with_labels, say):
    """All the data set's images, and (with_labels) their labels and class names."""
    if opts.dataset == "cifar10":
        refuse_non_square_cifar10(opts)
        if with_labels:
            check_subset_covers_classes(opts.subset, len(CIFAR_CLASSES))  # before a download
        return load_cifar10_labelled(opts.dataroot)
    if opts.dataset == "folder":
        listing = FolderListing.of(opts.dataroot, opts.image_size)
        # what the listing tells is checked before minutes of decoding, which leave a cache behind
        check_image_count(len(listing.files), opts, f"data folder {opts.dataroot} holds")
        if not with_labels:
            return open_folder(listing, opts.workers, opts.cache_dir, say), None, None
        class_names = folder_classes(opts.dataroot, listing.files)
        if opts.class_names:  # a checkpoint's classes: others are refused before decoding replaces the cache
            refuse_other_classes(opts.class_names, class_names, "the checkpoint", f"data folder {opts.dataroot}")
        check_subset_covers_classes(opts.subset, len(class_names))
        images = open_folder(listing, opts.workers, opts.cache_dir, say)
        return images, folder_labels(opts.dataroot, images.files, class_names), class_names
    if with_labels:
        check_subset_covers_classes(opts.subset, FAKE_CLASSES)
    # as many random images as --subset asks for (512 by default): --subset 50000 is CIFAR-10-sized
    count = max(FAKE_IMAGES, opts.subset or 0)
    generator = torch.Generator().manual_seed(opts.seed)
    width, height = image_sides(opts.image_size)
    refuse_beyond_memory(
        count * 3 * width * height, f"--subset {opts.subset}: that many random images of {width}x{height} px need"
    )
    images = torch.randint(0, 256, (count, 3, height, width), generator=generator, dtype=torch.uint8)
    labels = torch.arange(count) % FAKE_CLASSES
    return images, labels, tuple(str(index) for index in range(FAKE_CLASSES))


def check_image_count(count, opts, what):
    """--subset and one batch must fit in count images: checked on a folder's file count before it is decoded."""
    if opts.subset is not None and opts.subset > count:
        raise UserError(f"--subset {opts.subset} is larger than the dataset: {what} {count_text(count, 'image')}")
    if opts.subset is not None and opts.subset < opts.batch_size:
        raise UserError(f"--subset {opts.subset} is fewer images than one batch (--batch-size {opts.batch_size})")
    if count < opts.batch_size:
        raise UserError(f"{what} {count_text(count, 'image')}, fewer than --batch-size {opts.batch_size}")


def choose_subset(images, subset, seed, labels=None):
    """The first `subset` images of a shuffle seeded by seed (so a resumed run gets the same ones).

    Returns (images, labels); with labels, every class keeps one image at the least, and each
    its share of the images (to within one) where that is more.
    """
    if subset is None:
        return images, labels
    if subset > len(images):
        raise UserError(f"--subset {subset} is larger than the dataset ({count_text(len(images), 'image')})")
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    if labels is not None:
        chosen = balanced_first(chosen, labels, subset)
    chosen = chosen[:subset]
    images = images.select(chosen) if isinstance(images, HostImages) else images[chosen]
    return images, (None if labels is None else labels[chosen])


def balanced_first(order, labels, subset):
    """order rearranged so that its first `subset` rows hold every class once, and each class in
    its share of the data where that is more.

    Each row's key is how far down its own class it comes in order, as a fraction of the class's
    size; rows are taken by that key, so every class is cut at (about) the same fraction. A small
    class's first row can come after the cut (2 images beside 200: key 1/4, past the cut of
    --subset 10): each class's first row is taken before any other, then the rest by key, and
    the rows taken keep their order by key, so where no class was left out nothing changes.
    """
    ordered_labels = labels[order]
    check_subset_covers_classes(subset, int((torch.bincount(labels) > 0).sum()))
    rank_in_class = torch.empty(len(order), dtype=torch.float64)
    first_of_class = torch.zeros(len(order), dtype=torch.bool)
    for label in ordered_labels.unique():
        rows = (ordered_labels == label).nonzero().flatten()
        rank_in_class[rows] = (torch.arange(len(rows), dtype=torch.float64) + 0.5) / len(rows)
        first_of_class[rows[0]] = True
    by_key = torch.sort(rank_in_class, stable=True).indices
    firsts_ahead = torch.sort(torch.where(first_of_class, -1.0, rank_in_class), stable=True).indices
    taken = firsts_ahead[:subset].sort().values  # in order's order, so that ties below fall as in by_key
    taken = taken[torch.sort(rank_in_class[taken], stable=True).indices]
    rest = by_key[~torch.isin(by_key, taken)]
    return order[torch.cat([taken, rest])]


def check_subset_covers_classes(subset, class_count):
    """Under --conditional every class needs an image: a --subset of fewer images than classes is refused."""
    if subset is not None and subset < class_count:
        raise UserError(
            f"--subset {subset} is smaller than the number of classes ({class_count}): --conditional needs an "
            "image of every class"
        )


def place_on_device(images, device, memory_limit_bytes, say):
    """The images as one device tensor when they fit in its memory budget; else left where they are, to stream."""
    budget = memory_limit_bytes if memory_limit_bytes is not None else device_memory_budget(device)
    if budget is None or images.nbytes <= budget:
        return images.to_device(device)
    where = images.source or "host memory"
    if streaming_forced():
        say(f"{STREAM_VARIABLE}=1: streaming batches from {where}")
    else:
        say(
            f"the images ({size_text(images.nbytes)}) exceed the {size_text(budget)} budget on {device}: streaming batches from {where}"
        )
    return images


def device_memory_budget(device):
    """Bytes of images worth holding on the device: a share of its free memory; None when unknown."""
    device = torch.device(device)
    free_bytes = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_ram_bytes()
    return None if free_bytes is None else int(free_bytes * DEVICE_MEMORY_SHARE)


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
    labels (optional): each image's class, kept on the device beside the images.
    """

    def __init__(
        self, images, batch_size, image_size, seed, rank=0, world_size=1, dtype=torch.float32,
        memory_format=torch.contiguous_format, labels=None, channels=3,
    ):  # fmt: skip
        self.images = images
        self.channels = channels
        self.labels = None if labels is None else labels.to(self.label_device)
        self.batch_size = batch_size
        self.image_size = image_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.dtype, self.memory_format = dtype, memory_format

    @property
    def label_device(self):
        return self.images.device

    def __len__(self):
        return len(self.images) // (self.batch_size * self.world_size)

    def epoch(self, epoch, start=0):
        """Yield the float batches of one epoch in [-1, 1], skipping the first `start`."""
        for images, _ in self.labelled_epoch(epoch, start):
            yield images

    def labelled_epoch(self, epoch, start=0):
        """Yield (images, labels) as epoch() yields images; labels is None without labels."""
        order = epoch_order(self.seed, epoch, len(self.images)).to(self.images.device)
        for index in range(start, len(self)):
            rows = batch_rows(order, index, self.batch_size, self.rank, self.world_size)
            images = to_float_images(self.images[rows], self.image_size, self.channels)
            yield images.to(self.dtype, memory_format=self.memory_format), self.labels_of(rows)

    def labels_of(self, rows):
        return None if self.labels is None else self.labels[rows]

    def describe(self):
        return f"held on {self.images.device}"


class StreamedBatches(DeviceBatches):
    """DeviceBatches' batches for images too large for the device, gathered from HostImages.

    Same interface, same batches (order, sharding, dropped last batch). A background thread
    gathers the next batch's rows (the page faults and disk reads of a mapped cache) into a
    pinned buffer while the device trains on the current one; the copy to the device is
    non-blocking. The copy is queued on the current stream, behind the step before it: at
    batch sizes of DCGAN it takes microseconds, and the gather is what needs hiding.
    """

    def __init__(self, images, batch_size, image_size, seed, rank=0, world_size=1, device="cpu", **layout):
        self.device = torch.device(device)  # first: the labels go there
        super().__init__(images, batch_size, image_size, seed, rank, world_size, **layout)

    @property
    def label_device(self):
        # on the device, where the epoch's order picks each batch's: a copy of a batch's labels from
        # the host's pageable memory would wait for the device to finish its queue at every step
        return self.device

    def describe(self):
        return f"streamed from {self.images.source or 'host memory'}"

    def labelled_epoch(self, epoch, start=0):
        """Yield the (images, labels) of one epoch, images float in [-1, 1] on the device, skipping the first `start`."""
        order = epoch_order(self.seed, epoch, len(self.images))
        device_order = order.to(self.device) if self.labels is not None else None  # once an epoch
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
                images = to_float_images(device_batch, self.image_size, self.channels)
                yield images.to(self.dtype, memory_format=self.memory_format), self.device_labels(device_order, index)

    def device_labels(self, device_order, index):
        if device_order is None:
            return None
        return self.labels_of(batch_rows(device_order, index, self.batch_size, self.rank, self.world_size))

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

    layout: dtype and memory_format of the batches (D's, so real and fake batches share one graph),
    labels (the images' classes) where there are any, and channels (1: the images' luma).
    """
    if isinstance(images, HostImages):
        return StreamedBatches(images, batch_size, image_size, seed, rank, world_size, device, **layout)
    return DeviceBatches(images, batch_size, image_size, seed, rank, world_size, **layout)


def luma(images):
    """(N, 3, H, W) colours to their (N, H, W) luma. Weighed with Python numbers, which a kernel
    takes as arguments: a tensor of the weights would be copied to the device at every batch, and
    a copy from the host's pageable memory waits for the device to finish its queue."""
    red, green, blue = LUMA
    return images[:, 0] * red + images[:, 1] * green + images[:, 2] * blue


def to_float_images(uint8_images, image_size, channels=3):
    """uint8 (N, 3, h, w) to float in [-1, 1] at image_size (N, C, H, W), on the images' device; with
    channels=1, their luma (N, 1, H, W), which is the grey value itself for greyscale images."""
    images = uint8_images.float()
    if channels == 1 and images.shape[1] == 3:
        images = luma(images).unsqueeze(1)
    images = images.div_(127.5).sub_(1.0)
    width, height = image_sides(image_size)
    if images.shape[-2:] != (height, width):
        # antialiasing only changes anything when shrinking; growing 32 -> 64 gives the same
        # pixels through a slower kernel
        shrinking = images.shape[-1] > width or images.shape[-2] > height
        images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False, antialias=shrinking)
    return images
