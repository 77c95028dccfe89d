"""First start vs second start on a large folder of JPEGs: what the decoded-image cache saves.

Writes a folder of CelebA-sized JPEGs (178x218, random crops of scikit-learn's two sample
photos), then times `python gan.py --dataset folder ...` from launch to its start line
("training on ...", printed just before the first step), and stops it there:
  - first start: the folder's cache is deleted before the run, so every JPEG is decoded;
  - second start: the cache the previous start left is reused;
  - no folder: `--dataset fake`, the floor (importing torch, building the networks).
Then the same two cases for utils.load_dataset alone, in this process, for all the images (no
--subset: the whole cache is copied into the tensor a run trains from).

    python benchmarks/folder_cache.py                        # 20,000 JPEGs, 3 rounds
    python benchmarks/folder_cache.py --images 202599        # as many as CelebA

About 5 minutes on 2 CPU cores (3 rounds of about 90 s, plus writing the JPEGs once; a complete
folder is reused).

--checksum times what the pixels' CRC-32 adds to reusing a cache: foldercache.open_folder with and
without the check (the check switched off in this process only), then the copy into the tensor a
run trains from, with the file in the page cache ("warm") and evicted from it first ("cold", by
posix_fadvise: a start days after the last); and the CRC-32 against other checksums of the same
bytes. On the JPEG folder, or on a cache of N images synthesised straight into the cache (no
JPEGs: the decoder's output is what is checked, and decoding 202,599 JPEGs would take longer than
everything timed here):

    python benchmarks/folder_cache.py --checksum --rounds 5                    # 20,000 JPEGs
    python benchmarks/folder_cache.py --checksum --synthetic 202599 --rounds 5  # CelebA's count
"""

import argparse
import contextlib
import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CELEBA_SIZE = (178, 218)  # width, height of CelebA's aligned faces
START_LINE = "training on "


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20_000, help="JPEGs in the folder")
    p.add_argument("--rounds", type=int, default=3, help="first and second starts timed, each")
    p.add_argument("--image-size", type=int, default=64, help="gan.py's --image-size")
    p.add_argument("--workers", type=int, default=None, help="gan.py's --workers [its default]")
    p.add_argument("--folder", default=None, help="where the JPEGs go [a temp folder; reused when complete]")
    p.add_argument(
        "--key-only",
        action="store_true",
        help="time only the cache key (listing and stat-ing every file), with and without the inode change time",
    )
    p.add_argument(
        "--checksum",
        action="store_true",
        help="time reusing the cache with and without the check of its pixels' CRC-32, warm and cold",
    )
    p.add_argument(
        "--synthetic",
        type=int,
        default=None,
        metavar="N",
        help="with --checksum: a cache of N images synthesised in place of decoded JPEGs (no folder of JPEGs)",
    )
    return p.parse_args(argv)


def make_folder(folder, count, seed=0):
    """count JPEGs of CelebA's size: random crops (scale, position, flip) of the two sample photos."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) == count:
        return
    photos = [Image.fromarray(image) for image in load_sample_images().images]
    rng = np.random.default_rng(seed)
    width, height = CELEBA_SIZE
    for index in range(count):
        photo = photos[index % len(photos)]
        scale = rng.uniform(0.5, min(photo.width / width, photo.height / height))
        crop_w, crop_h = int(width * scale), int(height * scale)
        left, top = rng.integers(0, photo.width - crop_w + 1), rng.integers(0, photo.height - crop_h + 1)
        crop = photo.resize((width, height), Image.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop.save(folder / f"{index + 1:06d}.jpg", quality=90)


def seconds_to_start(flags, work):
    """Seconds from launching gan.py to its start line, and the line about the image cache (if any)."""
    run_dir = Path(tempfile.mkdtemp(dir=work))
    command = [sys.executable, str(ROOT / "gan.py"), *flags, "--device", "cpu", "--no-compile", "--seed", "0"]
    command += ["--checkpoint-dir", str(run_dir / "checkpoints"), "--image-dir", str(run_dir / "images")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    cache_line, seconds = "", None
    for line in process.stdout:
        if line.startswith("image cache:"):
            cache_line = line.strip()
        if line.startswith(START_LINE):
            seconds = time.perf_counter() - started
            break
    process.kill()  # the start-up is what is timed; the training step is not
    output = process.stdout.read()
    process.wait()
    shutil.rmtree(run_dir, ignore_errors=True)
    if seconds is None:
        raise RuntimeError(f"{' '.join(command)} printed no start line:\n{output[-2000:]}")
    return seconds, cache_line


def key_seconds(folder, image_size, rounds):
    """Seconds to list the folder and digest its files into the cache key: the key gan.py uses
    (name, size, mtime, ctime) against one without the ctime, in alternating rounds."""
    sys.path.insert(0, str(ROOT))
    import hashlib

    import foldercache
    import folders

    def without_ctime(root, files, size):
        digest = hashlib.sha256(f"{foldercache.FOLDER_CACHE_VERSION} {size}\n".encode())
        for path in files:
            stat = path.stat()
            digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:20]

    times = {"list + key with ctime (gan.py)": [], "list + key without ctime": []}
    for _ in range(rounds):
        for name, key in zip(times, (foldercache.folder_cache_key, without_ctime)):
            started = time.perf_counter()
            key(folder, folders.list_images(folder), image_size)
            times[name].append(time.perf_counter() - started)
    return times


def seconds_to_load(folder, image_size, workers):
    """Seconds utils.load_dataset takes for the whole folder, on the CPU."""
    sys.path.insert(0, str(ROOT))
    from options import parse_flags
    from utils import load_dataset

    flags = ["--dataset", "folder", "--dataroot", str(folder), "--image-size", str(image_size), "--seed", "0"]
    opts, _ = parse_flags(flags + (["--workers", str(workers)] if workers is not None else []))
    started = time.perf_counter()
    images = load_dataset(opts, "cpu")
    seconds = time.perf_counter() - started
    assert len(images) == len(list(folder.glob("*.jpg")))
    return seconds


def synthetic_listing(work, count, image_size):
    """A FolderListing of count names that are never read: the cache is built from synthesised rows."""
    import foldercache

    root = Path(work) / "synthetic"
    root.mkdir()
    files = [root / f"{index + 1:06d}.jpg" for index in range(count)]
    return foldercache.FolderListing(root, files, image_size, f"synthetic{count}")


def synthetic_decode(files, image_size, workers, skipped):
    """folders.decode_files' chunks, made up: a block of noise, each chunk XORed with its number."""
    import numpy as np
    import torch

    import folders

    shape = (folders.DECODE_CHUNK_FILES, 3, image_size, image_size)
    block = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    for number, start in enumerate(range(0, len(files), folders.DECODE_CHUNK_FILES)):
        yield torch.from_numpy(block[: len(files) - start] ^ np.uint8(number % 256))


def read_through(path):
    """Read path once, so its pages are in the page cache."""
    with open(path, "rb") as file:
        while file.read(1 << 24):
            pass


def evict(path):
    """Drop path's pages from the page cache, as if it had not been read since boot (no root needed)."""
    with open(path, "rb") as file:
        os.fsync(file.fileno())
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


@contextlib.contextmanager
def check(on):
    """folders' check of the pixels' CRC-32, switched off in this process when on is False."""
    import foldercache

    intact = foldercache.FolderCache.intact
    if not on:
        foldercache.FolderCache.intact = lambda self: True
    try:
        yield
    finally:
        foldercache.FolderCache.intact = intact


def checksum_seconds(listing, workers, rounds):
    """Seconds to reuse listing's cache (open_folder) and then copy it into a training tensor, with
    and without the CRC check, warm and cold, in alternating rounds."""
    import foldercache

    npy = foldercache.open_folder(listing, workers, say=print).source  # builds the cache if it is not there
    times = {}
    for round_index in range(rounds):
        for state in ("warm", "cold"):
            for checked in (False, True):
                (evict if state == "cold" else read_through)(npy)
                started = time.perf_counter()
                with check(checked):
                    images = foldercache.open_folder(listing, workers)
                opened = time.perf_counter()
                images.to_device("cpu")
                copied = time.perf_counter()
                del images  # unmapped, so that the next cold round can evict the file
                what = f"{state}, {'with' if checked else 'without'} the check"
                times.setdefault(f"open_folder, {what}", []).append(opened - started)
                times.setdefault(f"open_folder + copy into the training tensor, {what}", []).append(copied - started)
        print(f"round {round_index + 1} done", flush=True)
    return times, npy


CHECKSUMS = ("sha1", "sha256", "blake2b", "md5")


def checksums_compared(npy, listing, rounds):
    """Seconds of zlib's CRC-32 (what gan.py uses) and of hashlib's digests over the cache's pixels
    in use, mapped and warm, in the chunks gan.py reads."""
    import numpy as np

    import foldercache

    pixels = np.load(npy, mmap_mode="r")[: len(listing.files)].reshape(-1)

    def digest(name):
        state = hashlib.new(name)
        for start in range(0, len(pixels), foldercache.CHECKSUM_CHUNK_BYTES):
            state.update(pixels[start : start + foldercache.CHECKSUM_CHUNK_BYTES])
        return state.digest()

    checksums = {"zlib.crc32 (gan.py)": lambda: foldercache.pixels_crc32(pixels)}
    checksums.update({f"hashlib.{name}": lambda name=name: digest(name) for name in CHECKSUMS})
    read_through(npy)
    times = {name: [] for name in checksums}
    for _ in range(rounds):
        for name, checksum in checksums.items():
            started = time.perf_counter()
            checksum()
            times[name].append(time.perf_counter() - started)
    return times


def main_checksum(args):
    """--checksum: what the CRC check adds to reusing a cache, on the JPEG folder or a synthesised cache."""
    sys.path.insert(0, str(ROOT))
    import foldercache
    from errors import size_text

    print(f"load before: {os.getloadavg()}; {os.cpu_count()} CPUs; torch run by {sys.executable}")
    with tempfile.TemporaryDirectory() as work:
        os.environ["DCGAN_CACHE_DIR"] = str(Path(work) / "cache")
        if args.synthetic:
            listing = synthetic_listing(work, args.synthetic, args.image_size)
            foldercache.decode_files = synthetic_decode
            print(f"{args.synthetic} synthesised images at {args.image_size}px ({size_text(listing.decoded_bytes)})")
        else:
            folder = Path(args.folder or Path(tempfile.gettempdir()) / f"dcgan-folder-cache-{args.images}")
            make_folder(folder, args.images)
            listing = foldercache.FolderListing.of(folder, args.image_size)
            print(f"{args.images} JPEGs in {folder}, cached at {args.image_size}px")
        workers = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)
        times, npy = checksum_seconds(listing, workers, args.rounds)
        compared = checksums_compared(npy, listing, args.rounds)
    print(f"load after: {os.getloadavg()}")
    print_table(times)
    print_table(compared)


def main(argv=None):
    args = parse_args(argv)
    if args.checksum:
        return main_checksum(args)
    folder = Path(args.folder or Path(tempfile.gettempdir()) / f"dcgan-folder-cache-{args.images}")
    started = time.perf_counter()
    make_folder(folder, args.images)
    print(
        f"{args.images} JPEGs of {CELEBA_SIZE[0]}x{CELEBA_SIZE[1]} in {folder} ({time.perf_counter() - started:.0f}s)"
    )
    print(f"torch run by {sys.executable}; {platform.machine()}, {os.cpu_count()} CPUs; load {os.getloadavg()}")
    if args.key_only:
        print_table(key_seconds(folder, args.image_size, args.rounds))
        print(f"load after: {os.getloadavg()}")
        return
    common = ["--epochs", "1", "--subset", "64", "--batch-size", "64", "--image-size", str(args.image_size)]
    common += ["--ngf", "16", "--ndf", "16"] + (["--workers", str(args.workers)] if args.workers is not None else [])
    folder_flags = ["--dataset", "folder", "--dataroot", str(folder), *common]
    print(f"command: python gan.py {' '.join(folder_flags)} --device cpu --no-compile --seed 0 (+ run folders)")
    starts = {
        "first start (cache deleted)": folder_flags,
        "second start (cache reused)": folder_flags,
        "no folder (--dataset fake)": ["--dataset", "fake", *common],
    }
    loads = ("load_dataset, first (decodes)", "load_dataset, second (reads the cache)")
    times = {name: [] for name in [*starts, *loads]}
    with tempfile.TemporaryDirectory() as work:
        os.environ["DCGAN_CACHE_DIR"] = cache = str(Path(work) / "cache")  # gan.py's runs inherit it
        for round_index in range(args.rounds):
            shutil.rmtree(cache, ignore_errors=True)
            for name, flags in starts.items():
                seconds, cache_line = seconds_to_start(flags, work)
                times[name].append(seconds)
                print(f"round {round_index + 1} {name}: {seconds:.1f}s  {cache_line}", flush=True)
        for round_index in range(args.rounds):
            shutil.rmtree(cache, ignore_errors=True)
            for name in loads:
                times[name].append(seconds_to_load(folder, args.image_size, args.workers))
                print(f"round {round_index + 1} {name}: {times[name][-1]:.2f}s", flush=True)
    print(f"load after: {os.getloadavg()}")
    print_table(times)


def print_table(times):
    print()
    print("| what | seconds (median) | min | max | runs |")
    print("|---|---:|---:|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} | {len(values)} |")


if __name__ == "__main__":
    main()
