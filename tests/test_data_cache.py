"""The decoded-image cache of folder datasets, streaming folders too large for the device, and
the "did you mean --dataset folder?" check. All in-process on the CPU with tiny images.
"""

import argparse
import io
import json
import math
import os
import shutil
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.utils
from conftest import load_cifar10, load_folder, snapshot, write_cifar10_archive
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import errors
import foldercache
import folders
import options
import utils

REAL_READ_IMAGE = folders.read_image


# ---------------------------------------------------------------- functions the tests share


def write_png(path, seed, size=(20, 24)):
    """Noise pixels at an odd size, so resizing and cropping both matter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_folder(folder, count, broken=0):
    for index in range(count):
        write_png(folder / ("sub" if index % 3 == 0 else "") / f"image_{index}.png", seed=index)
    for index in range(broken):
        (folder / f"broken_{index}.jpg").write_bytes(b"not an image")
    return folder


def fresh_decode(folder, image_size):
    """What the folder decodes to without any cache: read_image over the files, broken ones left out."""
    images = [REAL_READ_IMAGE(path, image_size) for path in folders.list_images(folder)]
    return torch.stack([image for image in images if image is not None])


@pytest.fixture
def reads(monkeypatch):
    """The paths read_image decodes, in order."""
    seen = []

    def counting_read_image(path, image_size):
        seen.append(path)
        return REAL_READ_IMAGE(path, image_size)

    monkeypatch.setattr(folders, "read_image", counting_read_image)
    return seen


def load(folder, image_size, **options):
    """load_folder in-process; returns (images, the lines it said)."""
    said = []
    images = load_folder(folder, image_size, 0, say=said.append, **options)
    return images, said


def cache_files(folder):
    return sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture
def cached(cache_dir):
    """The folder where the decoded-image caches go (cache_dir: the test's $DCGAN_CACHE_DIR)."""
    return cache_dir / foldercache.FOLDER_CACHE_NAME


def folder_opts(dataroot, **changes):
    options = dict(
        dataset="folder",
        dataroot=dataroot,
        image_size=8,
        workers=0,
        subset=None,
        batch_size=2,
        seed=3,
        cache_dir=None,
        channels="auto",
        conditional=False,
    )
    return argparse.Namespace(**{**options, **changes})


# ---------------------------------------------------------------- the decoded-image cache


def test_first_start_builds_the_cache_and_the_second_reuses_it(tmp_path, reads, cached):
    data = write_folder(tmp_path / "data", 5)
    before = everything_under(data), snapshot(data)
    first, said = load(data, 8)
    assert len(reads) == 5
    assert len(said) == 1 and said[0].startswith("image cache: no cache yet, building one; decoding 5 files")
    npy = next(cached.glob("*.npy"))
    assert cache_files(cached) == [npy.with_suffix(".json").name, npy.name]  # no temp file left
    assert (everything_under(data), snapshot(data)) == before  # nothing written beside the images

    second, said = load(data, 8)
    assert len(reads) == 5  # nothing decoded again
    assert said == [f"image cache: reusing {npy} (5 images)"]
    assert torch.equal(second, first)


def test_cached_images_are_byte_identical_to_a_fresh_decode(tmp_path, reads):
    data = write_folder(tmp_path / "data", 6, broken=2)
    expected = fresh_decode(data, 12)
    for start in ("built", "reused"):
        # the unreadable files stay skipped, with the same one warning, cached or not
        why = r"\(not an image format Pillow reads\)"
        message = (
            f"^skipped 2 of 8 files in {data} that are not readable images: broken_0.jpg {why}, broken_1.jpg {why}$"
        )
        with pytest.warns(UserWarning, match=message):
            images, said = load(data, 12)
        assert images.dtype == torch.uint8 and images.shape == (6, 3, 12, 12)
        assert torch.equal(images, expected), start
    assert len(reads) == 8


def touch(data):
    stat = (data / "image_1.png").stat()
    os.utime(data / "image_1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


CHANGES = {
    "touched": touch,
    "added": lambda data: write_png(data / "sub" / "new.png", seed=99),
    "removed": lambda data: (data / "image_2.png").unlink(),
    "rewritten, same size": lambda data: write_png(data / "image_4.png", seed=77),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_folder_rebuilds_the_cache(change, tmp_path, reads, cached):
    data = write_folder(tmp_path / "data", 5)
    load(data, 8)
    old = (data / "image_4.png").stat()
    CHANGES[change](data)
    if change == "rewritten, same size":  # even with its mtime put back, as rsync -t or a careful tool would
        os.utime(data / "image_4.png", ns=(old.st_atime_ns, old.st_mtime_ns))
        assert (data / "image_4.png").stat().st_size == old.st_size
    reads.clear()
    images, said = load(data, 8)
    assert len(said) == 1 and said[0].startswith("image cache: the files changed since the cache was made, rebuilding")
    assert len(reads) == len(folders.list_images(data))
    assert torch.equal(images, fresh_decode(data, 8))
    assert len(cache_files(cached)) == 2  # the stale cache is gone


def test_another_image_size_builds_its_own_cache(tmp_path, reads):
    data = write_folder(tmp_path / "data", 4)
    load(data, 8)
    images, said = load(data, 10)
    assert said[0].startswith("image cache: no cache for --image-size 10 yet, building one")
    assert len(reads) == 8 and images.shape == (4, 3, 10, 10)
    assert torch.equal(images, fresh_decode(data, 10))
    _, said = load(data, 8)  # the 8px cache is kept
    assert said[0].startswith("image cache: reusing") and len(reads) == 8


def cut_in_half(npy, sidecar):
    npy.write_bytes(npy.read_bytes()[: npy.stat().st_size // 2])


def extended(npy, sidecar):
    npy.write_bytes(npy.read_bytes() + bytes(192))


def garbage_header(npy, sidecar):
    npy.write_bytes(b"\x93NUMPY\x01\x00" + b"garbage" * 20 + npy.read_bytes()[148:])


def no_sidecar(npy, sidecar):  # a crash after the .npy was renamed into place, before its sidecar
    sidecar.unlink()


def garbage_sidecar(npy, sidecar):
    sidecar.write_text('{"key": ')


def wrong_row_count(npy, sidecar):
    sidecar.write_text(sidecar.read_text().replace('"rows": 5', '"rows": 4'))


def no_checksum(npy, sidecar):
    meta = json.loads(sidecar.read_text())
    del meta["crc32"]
    sidecar.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage", [cut_in_half, extended, garbage_header, no_sidecar, garbage_sidecar, wrong_row_count, no_checksum]
)
def test_a_damaged_cache_is_rebuilt_not_trusted(damage, tmp_path, reads, cached):
    data = write_folder(tmp_path / "data", 5)
    load(data, 8)
    npy = next(cached.glob("*.npy"))
    damage(npy, npy.with_suffix(".json"))
    reads.clear()
    images, said = load(data, 8)
    assert said[0].startswith("image cache: the cache is incomplete or damaged, rebuilding it")
    assert len(reads) == 5
    assert torch.equal(images, fresh_decode(data, 8))
    _, said = load(data, 8)
    assert said[0].startswith("image cache: reusing")


def pixel_bytes(npy, rows):
    """Where the pixels of the first `rows` rows lie in the .npy file: (offset, length)."""
    array = np.load(npy, mmap_mode="r")
    return array.offset, rows * math.prod(array.shape[1:])


def white_pixels(npy, rows):
    """Every pixel in use overwritten with 255, the file's size unchanged."""
    offset, length = pixel_bytes(npy, rows)
    with open(npy, "r+b") as file:
        file.seek(offset)
        file.write(b"\xff" * length)


def one_bit_flipped(npy, rows):
    """One bit of the last row in use flipped, as a bad disk sector might."""
    offset, length = pixel_bytes(npy, rows)
    with open(npy, "r+b") as file:
        file.seek(offset + length - 1)
        last = file.read(1)[0]
        file.seek(offset + length - 1)
        file.write(bytes([last ^ 1]))


CHANGED_PIXELS = "image cache: the cache's pixels changed since it was built (their checksum differs), rebuilding it"


@pytest.mark.parametrize("damage", [white_pixels, one_bit_flipped])
def test_a_cache_whose_pixels_changed_on_disk_is_rebuilt_not_read(damage, tmp_path, reads, cached):
    data = write_folder(tmp_path / "data", 5, broken=1)
    with pytest.warns(UserWarning, match="skipped 1 of 6"):
        load(data, 8)
    npy = next(cached.glob("*.npy"))
    size = npy.stat().st_size
    damage(npy, 5)
    assert npy.stat().st_size == size
    reads.clear()
    with pytest.warns(UserWarning, match="skipped 1 of 6"):
        images, said = load(data, 8)
    assert said == [f"{CHANGED_PIXELS}; decoding 6 files (1.1 KiB) into {npy}"]
    assert len(reads) == 6
    assert torch.equal(images, fresh_decode(data, 8))
    with pytest.warns(UserWarning, match="skipped 1 of 6"):
        _, said = load(data, 8)
    assert said[0].startswith("image cache: reusing")


def test_the_sidecar_holds_the_crc32_of_the_pixels_in_use(tmp_path, cached):
    data = write_folder(tmp_path / "data", 5, broken=2)
    with pytest.warns(UserWarning, match="skipped 2 of 7"):
        load(data, 8)
    npy = next(cached.glob("*.npy"))
    meta = json.loads(npy.with_suffix(".json").read_text())
    assert meta["rows"] == 5 and meta["version"] == foldercache.FOLDER_CACHE_VERSION
    assert meta["crc32"] == zlib.crc32(fresh_decode(data, 8).numpy().tobytes())


def test_the_cache_file_is_the_npy_that_numpy_writes(tmp_path, cached):
    data = write_folder(tmp_path / "data", 5, broken=2)
    with pytest.warns(UserWarning, match="skipped 2 of 7"):
        load(data, 8)
    npy = next(cached.glob("*.npy"))
    # the rows of the unreadable files come last, as zeros
    expected = np.concatenate([fresh_decode(data, 8).numpy(), np.zeros((2, 3, 8, 8), dtype=np.uint8)])
    assert np.array_equal(np.load(npy), expected)
    np.save(tmp_path / "by_numpy.npy", expected)
    assert npy.read_bytes() == (tmp_path / "by_numpy.npy").read_bytes()


def test_a_cache_made_before_checksums_is_rebuilt(tmp_path, reads, cached, monkeypatch):
    data = write_folder(tmp_path / "data", 5)
    with monkeypatch.context() as older:
        older.setattr(foldercache, "FOLDER_CACHE_VERSION", foldercache.FOLDER_CACHE_VERSION - 1)
        load(data, 8)
    sidecar = next(cached.glob("*.json"))
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({name: meta[name] for name in ("key", "root", "rows", "skipped")}))
    reads.clear()
    images, said = load(data, 8)
    assert said[0].startswith("image cache: the cache was made by an older version of gan.py, rebuilding it")
    assert len(reads) == 5
    assert torch.equal(images, fresh_decode(data, 8))
    assert len(cache_files(cached)) == 2  # the older cache is gone


def test_a_build_cut_short_leaves_nothing_that_is_trusted(tmp_path, monkeypatch, cached):
    data = write_folder(tmp_path / "data", 5)
    calls = []

    def interrupted_read_image(path, image_size):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return REAL_READ_IMAGE(path, image_size)

    monkeypatch.setattr(folders, "read_image", interrupted_read_image)
    with pytest.raises(KeyboardInterrupt):
        load(data, 8)
    assert not cached.exists()  # nor an empty cache folder
    monkeypatch.setattr(folders, "read_image", REAL_READ_IMAGE)
    images, said = load(data, 8)
    assert said[0].startswith("image cache: no cache yet")
    assert torch.equal(images, fresh_decode(data, 8))


def test_a_build_removes_the_leftovers_of_abandoned_builds(tmp_path, cached):
    data = write_folder(tmp_path / "data", 3)
    cache = cached
    cache.mkdir()
    abandoned, recent = cache / ".images-8px-0123.npy.abc.tmp", cache / ".images-8px-4567.npy.def.tmp"
    # renamed in place by a build that died before it wrote the sidecar: no cache of anyone's
    orphan, recent_orphan = cache / "images-8px-89ab.npy", cache / "images-8px-cdef.npy"
    for path in (abandoned, recent, orphan, recent_orphan):
        path.write_bytes(bytes(100))
    hours_ago = time.time() - 2 * foldercache.ABANDONED_BUILD_SECONDS
    for path in (abandoned, orphan):
        os.utime(path, (hours_ago, hours_ago))
    load(data, 8)
    assert not abandoned.exists() and not orphan.exists()
    assert recent.exists() and recent_orphan.exists()  # they may belong to a build still running beside this one


def test_an_unwritable_cache_folder_means_decoding_into_memory(tmp_path, reads, cache_dir):
    data = write_folder(tmp_path / "data", 4)
    (cache_dir / foldercache.FOLDER_CACHE_NAME).write_text("a file where the cache folder would go: mkdir fails")
    before = snapshot(data), everything_under(data)
    for _ in range(2):
        images, said = load(data, 8)
        assert said[0].startswith(f"image cache: none ({cache_dir / foldercache.FOLDER_CACHE_NAME} is not writable")
        assert said[0].endswith("decoding 4 files into memory")
        assert torch.equal(images, fresh_decode(data, 8))
    assert len(reads) == 8
    assert (snapshot(data), everything_under(data)) == before


def test_without_a_cache_a_folder_too_large_for_memory_is_a_clear_error(tmp_path, monkeypatch, cache_dir):
    data = write_folder(tmp_path / "data", 4)
    (cache_dir / foldercache.FOLDER_CACHE_NAME).write_text("blocks the cache folder")
    monkeypatch.setattr(foldercache, "available_ram_bytes", lambda: 1000)
    with pytest.raises(errors.UserError, match="the decoded-image cache cannot be kept .*: give --cache-dir a folder"):
        load(data, 8)


def test_a_folder_of_only_broken_files_leaves_no_cache(tmp_path, cache_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nshort")
    with pytest.warns(UserWarning, match="skipped 1 of 1 files"):
        with pytest.raises(errors.UserError, match="holds no readable images"):
            load(data, 8)
    assert sorted(path.name for path in data.iterdir()) == ["broken.png"]
    assert everything_under(cache_dir) == []


def test_load_dataset_gives_what_it_gave_before_the_cache(tmp_path):
    data = write_folder(tmp_path / "data", 9, broken=1)
    expected = fresh_decode(data, 8)
    expected = expected[torch.randperm(len(expected), generator=torch.Generator().manual_seed(3))[:5]]
    for _ in ("built", "reused"):
        with pytest.warns(UserWarning, match="skipped 1 of 10"):
            images = utils.load_dataset(folder_opts(data, subset=5), torch.device("cpu"))
        assert isinstance(images, torch.Tensor) and torch.equal(images, expected)


# ---------------------------------------------------------------- folders larger than the device


@pytest.mark.parametrize(
    "subset, rank, world_size, start, image_size",
    [(None, 0, 1, 0, 8), (None, 1, 2, 1, 8), (9, 0, 1, 2, 8), (9, 1, 2, 0, 6)],
)
def test_streamed_batches_equal_device_batches(subset, rank, world_size, start, image_size, tmp_path):
    data = write_folder(tmp_path / "data", 14)
    opts = folder_opts(data, subset=subset)
    resident = utils.load_dataset(opts, "cpu")
    streamed = utils.load_dataset(opts, "cpu", memory_limit_bytes=100)
    assert isinstance(resident, torch.Tensor) and isinstance(streamed, folders.HostImages)
    on_device = utils.make_batches(resident, 2, image_size, opts.seed, rank, world_size)
    from_cache = utils.make_batches(streamed, 2, image_size, opts.seed, rank, world_size, device="cpu")
    assert isinstance(on_device, utils.DeviceBatches) and isinstance(from_cache, utils.StreamedBatches)
    assert len(from_cache) == len(on_device) == len(resident) // (2 * world_size)
    for epoch in (0, 1):
        expected = list(on_device.epoch(epoch, start))
        got = list(from_cache.epoch(epoch, start))
        assert len(got) == len(expected) == len(on_device) - start
        for batch, reference in zip(got, expected):
            assert batch.dtype == torch.float32 and batch.shape == (2, 3, image_size, image_size)
            assert torch.equal(batch, reference)  # bitwise


def test_streamed_batches_split_ranks_disjointly(tmp_path):
    data = write_folder(tmp_path / "data", 8)
    streamed = utils.load_dataset(folder_opts(data), "cpu", memory_limit_bytes=100)
    ranks = [utils.make_batches(streamed, 2, 8, 0, rank, world_size=2) for rank in (0, 1)]
    seen = [torch.cat(list(batches.epoch(0))) for batches in ranks]
    assert seen[0].shape == seen[1].shape == (4, 3, 8, 8)
    everything = {image.numpy().tobytes() for image in torch.cat(seen)}
    assert len(everything) == 8  # each image once, on one rank


def test_streamed_batches_describe_where_they_come_from(tmp_path, cached):
    data = write_folder(tmp_path / "data", 4)
    said = []
    streamed = utils.load_dataset(folder_opts(data), "cpu", say=said.append, memory_limit_bytes=100)
    npy = next(cached.glob("*.npy"))
    assert streamed.source == npy
    assert said[-1] == f"the images (768 bytes) exceed the 100 bytes budget on cpu: streaming batches from {npy}"
    assert utils.make_batches(streamed, 2, 8, 0).describe() == f"streamed from {npy}"
    resident = utils.load_dataset(folder_opts(data), "cpu")
    assert utils.make_batches(resident, 2, 8, 0).describe() == "held on cpu"
    # what the trainer reads from the real images besides batches: length, shape, slices
    assert len(streamed) == 4 and streamed.shape == (4, 3, 8, 8)
    assert torch.equal(streamed[1:3], resident[1:3]) and torch.equal(streamed[2], resident[2])


def test_a_stopped_epoch_stops_its_gathering_thread(tmp_path):
    data = write_folder(tmp_path / "data", 8)
    streamed = utils.load_dataset(folder_opts(data), "cpu", memory_limit_bytes=100)
    epoch = utils.make_batches(streamed, 2, 8, 0).epoch(0)
    next(epoch)
    assert any(thread.name.startswith("gather-batches") for thread in threading.enumerate())
    epoch.close()
    assert not any(thread.name.startswith("gather-batches") for thread in threading.enumerate())


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch operation allocates while it is active.

    Views (slicing, wrapping the file's mapping with from_numpy) copy nothing: they do not count.
    """

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if all(output.alias_info is None for output in func._schema.returns):
            sizes = [t.numel() for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
            self.numel = max([self.numel, *sizes])
        return result


def test_a_folder_too_large_for_the_device_is_never_held_whole(tmp_path, monkeypatch):
    data = write_folder(tmp_path / "data", 12)
    monkeypatch.setattr(folders, "DECODE_CHUNK_FILES", 3)
    monkeypatch.setattr(utils, "GREY_CHECK_ROWS", 3)  # --channels auto reads the images a chunk at a time too
    monkeypatch.setattr(folders.HostImages, "to_device", lambda *args: pytest.fail("materialised the images"))
    one_image = 3 * 8 * 8
    with LargestTensor() as largest:
        streamed = utils.load_dataset(folder_opts(data), "cpu", memory_limit_bytes=12 * one_image - 1)
        batches = list(utils.make_batches(streamed, 2, 8, 0).epoch(0))
    assert len(batches) == 6
    assert largest.numel == 3 * one_image  # a decoded chunk; the whole folder is 12 images
    assert isinstance(streamed, folders.HostImages)
    # the rows are read from the cache file's mapping, not from a copy in memory
    assert any(start <= streamed.array.data_ptr() < end for start, end in mappings_of(streamed.source))


def mappings_of(path):
    """The address ranges where this process maps the file at path (Linux)."""
    ranges = []
    for line in open("/proc/self/maps").read().splitlines():
        if line.endswith(str(path)):
            start, end = line.split()[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def test_the_device_memory_budget_is_a_share_of_free_memory(monkeypatch):
    monkeypatch.setattr(utils, "available_ram_bytes", lambda: 8_000)
    assert utils.device_memory_budget("cpu") == int(8_000 * utils.DEVICE_MEMORY_SHARE)
    monkeypatch.setattr(utils, "available_ram_bytes", lambda: None)
    assert utils.device_memory_budget("cpu") is None


# ---------------------------------------------------------------- --dataset cifar10 on an image folder


def refuse_download(*args, **kwargs):
    pytest.fail("tried to download CIFAR-10 into an image folder")


def everything_under(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_cifar10_on_an_image_folder_asks_for_dataset_folder(tmp_path, monkeypatch):
    data = write_folder(tmp_path / "my_images", 2)
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", refuse_download)
    before, files = everything_under(data), snapshot(data)
    message = rf"^{data} holds image files but no CIFAR-10: did you mean --dataset folder\?$"
    for load_cifar in (
        lambda: load_cifar10(data),
        lambda: load_cifar10(data, download=False),
        lambda: utils.load_dataset(folder_opts(data, dataset="cifar10", image_size=32), "cpu"),
    ):
        with pytest.raises(errors.UserError, match=message):
            load_cifar()
    assert everything_under(data) == before and snapshot(data) == files


def test_cifar10_beside_images_still_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", refuse_download)
    expected = write_cifar10_archive(tmp_path / "data", images_per_batch=2)
    write_png(tmp_path / "data" / "preview.png", seed=0)
    images = load_cifar10(tmp_path / "data")
    assert torch.equal(images, torch.from_numpy(expected))


def test_the_cli_asks_for_dataset_folder(tmp_path, gan_main, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", refuse_download)
    before = everything_under(write_folder(tmp_path / "my_images", 2))
    code, out, err = gan_main(["--dataroot", "my_images", "--device", "cpu", "--epochs", "1", "--no-compile"])
    assert code == 2
    assert "error: my_images holds image files but no CIFAR-10: did you mean --dataset folder?" in err
    assert everything_under(tmp_path / "my_images") == before


# ---------------------------------------------------------------- where the cache lives


def folder_run(data, *flags):
    """Flags of a 1-epoch run on an image folder at 16 px, 4 images a step."""
    return [
        "--dataset", "folder", "--dataroot", data, "--device", "cpu", "--no-compile", "--workers", "0",
        "--image-size", "16", "--nz", "8", "--ngf", "8", "--ndf", "8", "--batch-size", "4", "--epochs", "1",
        "--seed", "1", *flags,
    ]  # fmt: skip


def test_the_cache_folder_comes_from_the_flag_the_variable_xdg_or_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(foldercache.CACHE_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert foldercache.folder_cache_dir() == tmp_path / "home" / ".cache" / "dcgan" / "folders"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # not absolute: ignored, as the XDG spec says
    assert foldercache.folder_cache_dir() == tmp_path / "home" / ".cache" / "dcgan" / "folders"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert foldercache.folder_cache_dir() == tmp_path / "xdg" / "dcgan" / "folders"
    monkeypatch.setenv(foldercache.CACHE_ENV, str(tmp_path / "variable"))
    assert foldercache.folder_cache_dir() == tmp_path / "variable" / "folders"
    opts, _ = options.parse_flags(["--cache-dir", str(tmp_path / "flag")])
    assert foldercache.folder_cache_dir(opts.cache_dir) == tmp_path / "flag" / "folders"


SYSTEM_CACHES = {
    # sys.platform: (the class platformdirs picks there at import, the cache root under tmp_path)
    "win32": ("windows.Windows", ("AppData", "Local", "dcgan", "Cache")),
    "darwin": ("macos.MacOS", ("home", "Library", "Caches", "dcgan")),
}


@pytest.mark.parametrize("system", list(SYSTEM_CACHES))
def test_the_cache_folder_is_the_systems_own_and_the_flag_or_variable_wins(system, tmp_path, monkeypatch):
    import importlib

    import platformdirs
    import platformdirs.windows

    module, name = SYSTEM_CACHES[system][0].split(".")
    by_flag, _ = options.parse_flags(["--cache-dir", str(tmp_path / "flag")])
    monkeypatch.setattr(sys, "platform", system)
    monkeypatch.setattr(platformdirs, "PlatformDirs", getattr(importlib.import_module(f"platformdirs.{module}"), name))
    # the shell's answer for the local application data folder, which has no API off Windows
    monkeypatch.setattr(platformdirs.windows, "get_win_folder", platformdirs.windows.get_win_folder_from_env_vars)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "AppData" / "Local"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv(foldercache.CACHE_ENV)
    assert foldercache.folder_cache_dir() == tmp_path.joinpath(*SYSTEM_CACHES[system][1], "folders")
    assert foldercache.folder_cache_dir(by_flag.cache_dir) == tmp_path / "flag" / "folders"
    monkeypatch.setenv(foldercache.CACHE_ENV, str(tmp_path / "variable"))
    assert foldercache.folder_cache_dir() == tmp_path / "variable" / "folders"
    assert foldercache.folder_cache_dir(by_flag.cache_dir) == tmp_path / "flag" / "folders"


def test_training_on_a_folder_caches_in_the_cache_folder_and_never_in_the_data(tmp_path, gan_main, monkeypatch):
    data = write_folder(tmp_path / "data", 8)
    before = everything_under(data), snapshot(data)
    monkeypatch.delenv(foldercache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    code, out, err = gan_main(folder_run(data))
    assert code == 0, err
    npy = next((tmp_path / "xdg" / "dcgan" / "folders").glob("images-16px-*.npy"))
    assert f"into {npy}" in out
    code, out, err = gan_main(folder_run(data, "--cache-dir", "by_flag", "--checkpoint-dir", "c2", "--image-dir", "i2"))
    assert code == 0, err
    assert f"image cache: no cache yet, building one; decoding 8 files (6.0 KiB) into by_flag/folders/{npy.name}" in out
    assert (everything_under(data), snapshot(data)) == before


def test_a_cache_whose_pixels_changed_is_never_trained_on_through_the_cli(tmp_path, gan_main, cached):
    data = write_folder(tmp_path / "data", 8)
    code, out, err = gan_main(folder_run(data))
    assert code == 0, err
    npy = next(cached.glob("*.npy"))
    intact = npy.read_bytes()
    white_pixels(npy, 8)  # white images, the file's size unchanged
    code, out, err = gan_main(folder_run(data, "--checkpoint-dir", "again", "--image-dir", "again_images"))
    assert code == 0, err
    assert f"{CHANGED_PIXELS}; decoding 8 files (6.0 KiB) into {npy}" in out
    assert out.count("image cache:") == 1 and "image cache" not in err  # one line says it
    assert npy.read_bytes() == intact
    # the same weights as the run on the intact cache: it trained on the images, not on white
    first, again = (
        torch.load(tmp_path / name / "checkpoint.pt", weights_only=True) for name in ("checkpoints", "again")
    )
    for key in ("netG", "netD"):
        torch.testing.assert_close(again[key], first[key], rtol=0, atol=0)


def test_an_unwritable_cache_folder_still_trains_through_the_cli(tmp_path, gan_main, cache_dir, reads):
    data = write_folder(tmp_path / "data", 8)
    before = everything_under(data), snapshot(data)
    (cache_dir / foldercache.FOLDER_CACHE_NAME).write_text("a file where the cache folder would go")
    code, out, err = gan_main(folder_run(data))
    assert code == 0, err
    assert f"image cache: none ({cache_dir / foldercache.FOLDER_CACHE_NAME} is not writable" in out
    assert "decoding 8 files into memory" in out and len(reads) == 8
    assert torch.load(tmp_path / "checkpoints" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert (everything_under(data), snapshot(data)) == before


@pytest.mark.parametrize(
    "count, flags, message",
    [
        (1, ["--batch-size", "16"], "data folder {data} holds 1 image, fewer than --batch-size 16"),
        (3, ["--subset", "5"], "--subset 5 is larger than the dataset: data folder {data} holds 3 images"),
    ],
)
def test_bad_input_is_refused_before_anything_is_decoded(count, flags, message, tmp_path, gan_main, monkeypatch):
    data = write_folder(tmp_path / "data", count)
    monkeypatch.setattr(folders, "read_image", lambda *args: pytest.fail("decoded before checking the input"))
    code, out, err = gan_main(folder_run(data, *flags))
    assert code == 2 and err.strip() == f"gan.py: error: {message.format(data=data)}"
    assert everything_under(Path(os.environ[foldercache.CACHE_ENV])) == []
    assert everything_under(tmp_path) == everything_under(data.parent)  # no output folder made, nothing in data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


class FakeDisk:
    """shutil.disk_usage for a disk of capacity bytes that holds only the cache folder's files."""

    def __init__(self, folder, capacity):
        self.folder, self.capacity = folder, capacity

    def __call__(self, path):
        used = sum(p.stat().st_size for p in self.folder.glob("*") if p.is_file())
        return shutil._ntuple_diskusage(self.capacity, used, self.capacity - used)


def test_a_build_short_of_disk_removes_the_least_recently_used_caches_of_other_folders(tmp_path, monkeypatch, cached):
    monkeypatch.setattr(foldercache, "DISK_SPARE_BYTES", 0)
    disk = FakeDisk(cached, capacity=10**6)
    monkeypatch.setattr(foldercache.shutil, "disk_usage", disk)
    first, second, third = (write_folder(tmp_path / name, 4) for name in ("first", "second", "third"))
    load(first, 8)
    disk.capacity = sum(p.stat().st_size for p in cached.iterdir()) * 5 // 2  # room for two caches, not three
    load(second, 8)
    assert len(cache_files(cached)) == 4  # both kept: one folder's build never removes another's cache
    time.sleep(0.05)  # beyond the file system's coarse clock, so the reuse below is later than that build
    _, said = load(first, 8)  # used again: now the second is the least recently used
    assert said[0].startswith("image cache: reusing")
    load(third, 8)
    roots = sorted(foldercache.sidecar_root(sidecar) for sidecar in cached.glob("*.json"))
    assert roots == sorted(str(folder.resolve()) for folder in (first, third))
    _, said = load(first, 8)
    assert said[0].startswith("image cache: reusing")


@pytest.mark.parametrize("field", ["name", "st_size", "st_mtime_ns", "st_ctime_ns"])
def test_each_part_of_a_files_identity_alone_changes_the_cache_key(field, tmp_path):
    class FakeFile:
        def __init__(self, name, **stat):
            self.name, self.stat_values = name, {"st_size": 100, "st_mtime_ns": 5, "st_ctime_ns": 7, **stat}

        def stat(self):
            return argparse.Namespace(st_atime_ns=1, **self.stat_values)

        def relative_to(self, root):
            return self.name

    def key(*files):
        return foldercache.folder_cache_key(tmp_path, list(files), 16)

    base = key(FakeFile("a.png"), FakeFile("b.png"))
    assert key(FakeFile("a.png"), FakeFile("b.png")) == base
    changed = {"name": FakeFile("c.png")} if field == "name" else {}
    other = changed.get("name") or FakeFile("b.png", **{field: 1 + FakeFile("b.png").stat_values[field]})
    assert key(FakeFile("a.png"), other) != base


def test_a_folder_streamed_through_the_cli_trains_exactly_as_one_held_in_memory(tmp_path, gan_main, monkeypatch):
    data = write_folder(tmp_path / "data", 12)
    code, out, err = gan_main(folder_run(data, "--checkpoint-dir", "held", "--image-dir", "held_images"))
    assert code == 0, err
    assert "12 images (held on cpu), 3 steps per epoch" in out
    monkeypatch.setattr(utils, "DEVICE_MEMORY_SHARE", 1e-15)  # no room: the batches come from the cache file
    code, out, err = gan_main(folder_run(data, "--checkpoint-dir", "streamed", "--image-dir", "streamed_images"))
    assert code == 0, err
    npy = next(Path(os.environ[foldercache.CACHE_ENV], foldercache.FOLDER_CACHE_NAME).glob("*.npy"))
    assert f"12 images (streamed from {npy}), 3 steps per epoch" in out
    held, streamed = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=True) for name in ("held", "streamed"))
    for key in ("netG", "netD", "netG_ema"):
        torch.testing.assert_close(streamed[key], held[key], rtol=0, atol=0)


@pytest.mark.parametrize("orientation, top, bottom", [(1, None, None), (6, "red", "blue"), (8, "blue", "red")])
def test_a_photo_is_decoded_the_way_its_exif_orientation_says(orientation, top, bottom, tmp_path):
    """Stored 40x20, red left and blue right; orientation 6 (a phone held upright) displays it turned a
    quarter clockwise, red on top; 8 a quarter anticlockwise, blue on top; 1 as stored."""
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation  # the Orientation tag
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    image = folders.read_image(tmp_path / "photo.jpg", 16).int()
    colours = {"red": (255, 0, 0), "blue": (0, 0, 255)}

    def near(pixels, colour):
        return (pixels - torch.tensor(colours[colour]).view(3, 1, 1)).abs().max() < 40

    if orientation == 1:  # left and right halves, as stored
        assert near(image[:, :, :6], "red") and near(image[:, :, 10:], "blue")
    else:
        assert near(image[:, :6, :], top) and near(image[:, 10:, :], bottom)


@pytest.mark.parametrize("size, image_size", [((1, 3000), "16"), ((5000, 2), "16x32"), ((40, 30), "16")])
def test_a_strip_is_cropped_before_it_is_resized_and_keeps_its_pixels(size, image_size, tmp_path, monkeypatch):
    """A 1 x 3000 strip resized to cover 16 px would be 16 x 48000 (1 x 2,000,000: gigabytes): the
    crop's part alone is resized, giving the crop of the whole resized within a level of rounding.
    An ordinary image is resized whole, as before (its cached pixels stay the same)."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / "strip.png")
    with Image.open(tmp_path / "strip.png") as image:
        width, height = folders.image_sides(image_size)
        scale = max(width / image.width, height / image.height)
        whole = image.convert("RGB").resize(
            (max(width, round(image.width * scale)), max(height, round(image.height * scale))),
            Image.Resampling.BILINEAR,
            reducing_gap=None,
        )
    left, top = (whole.width - width) // 2, (whole.height - height) // 2
    expected = torch.from_numpy(np.asarray(whole.crop((left, top, left + width, top + height)))).permute(2, 0, 1)
    sizes, resize = [], Image.Image.resize
    monkeypatch.setattr(
        Image.Image,
        "resize",
        lambda self, size, *args, **kwargs: sizes.append(size) or resize(self, size, *args, **kwargs),
    )
    decoded = folders.read_image(tmp_path / "strip.png", image_size)
    assert decoded.shape == (3, height, width) and (decoded.int() - expected.int()).abs().max() <= 1
    if size == (40, 30):
        assert sizes == [(21, 16)] and torch.equal(decoded, expected)
    else:
        assert sizes == [(width, height)]


def test_a_symlinked_sub_folder_is_read_and_a_link_back_up_is_not_followed_round(tmp_path):
    elsewhere = write_folder(tmp_path / "elsewhere", 3)
    data = write_folder(tmp_path / "data", 2)
    (data / "linked").symlink_to(elsewhere)
    (data / "sub" / "up").symlink_to("..")  # back to data: would list data/sub/up/sub/up/... for ever
    files = [str(path.relative_to(data)) for path in folders.list_images(data)]
    expected_linked = sorted(f"linked/{path.relative_to(elsewhere)}" for path in folders.list_images(elsewhere))
    assert sorted(files) == sorted(["image_1.png", "sub/image_0.png", *expected_linked])
    images, _ = load(data, 8)
    assert len(images) == 5


def camera_folder(folder, count):
    """Images named as cameras name them, with upper-case suffixes: IMG_0000.PNG, IMG_0001.JPG, ..."""
    for index in range(count):
        write_png(folder / f"IMG_{index:04d}.{'JPG' if index % 2 else 'PNG'}", seed=index)
    return folder


def test_a_folder_of_upper_case_suffixes_trains_on_every_image(tmp_path):
    data = camera_folder(tmp_path / "data", 6)
    images = utils.load_dataset(folder_opts(data), "cpu")
    assert torch.equal(images, torch.stack([REAL_READ_IMAGE(path, 8) for path in sorted(data.iterdir())]))


def test_the_cli_asks_for_dataset_folder_on_upper_case_suffixes(tmp_path, gan_main, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", refuse_download)
    before = everything_under(camera_folder(tmp_path / "my_images", 2))
    code, out, err = gan_main(["--dataroot", "my_images", "--device", "cpu", "--epochs", "1", "--no-compile"])
    assert code == 2 and err.strip().endswith(
        "my_images holds image files but no CIFAR-10: did you mean --dataset folder?"
    )
    assert everything_under(tmp_path / "my_images") == before


@pytest.mark.parametrize("broken, more", [(3, ""), (4, " and 1 more")])
def test_the_warning_names_three_unreadable_files_and_counts_the_rest(tmp_path, broken, more):
    data = write_folder(tmp_path / "data", 4, broken=broken)
    why = r" \(not an image format Pillow reads\)"
    named = ", ".join(f"broken_{index}.jpg{why}" for index in range(3))
    message = f"^skipped {broken} of {4 + broken} files in {data} that are not readable images: {named}{more}$"
    with pytest.warns(UserWarning, match=message):
        load(data, 8)


def test_a_cache_is_built_only_with_a_gib_of_disk_to_spare_beyond_it(tmp_path, monkeypatch, cached):
    """4 images of 8 x 8 decode to 768 bytes; the disk must hold those and 1 GiB for what follows."""
    data = write_folder(tmp_path / "data", 4)
    disk = FakeDisk(cached, capacity=768 + 2**30 - 1)
    monkeypatch.setattr(foldercache.shutil, "disk_usage", disk)
    images, said = load(data, 8)
    assert said == [
        f"image cache: none ({cached} has 1.0 GiB free, the cache needs 768 bytes); decoding 4 files into memory"
    ]
    assert cache_files(cached) == [] and torch.equal(images, fresh_decode(data, 8))
    disk.capacity += 1
    _, said = load(data, 8)
    assert said[0].startswith("image cache: no cache yet, building one")


def test_a_relative_data_root_finds_its_older_cache_when_a_file_changes(tmp_path, monkeypatch, cached):
    monkeypatch.chdir(tmp_path)
    write_folder(tmp_path / "data", 4)
    load(Path("data"), 8)
    time.sleep(0.05)  # beyond the file system's coarse clock
    write_png(tmp_path / "data" / "image_1.png", seed=99)
    _, said = load(Path("data"), 8)
    assert said[0].startswith("image cache: the files changed since the cache was made, rebuilding it")
    assert len(cache_files(cached)) == 2  # the new cache's .npy and sidecar: the older one is gone


def test_the_memory_the_system_can_give_adds_free_swap_when_asked(monkeypatch):
    meminfo = "MemTotal:  1000 kB\nMemAvailable:  600 kB\nSwapTotal:  500 kB\nSwapFree:  300 kB\n"
    monkeypatch.setattr(folders, "open", lambda path: io.StringIO(meminfo), raising=False)
    assert folders.available_ram_bytes() == 600 * 1024
    assert folders.available_ram_bytes(with_swap=True) == 900 * 1024
