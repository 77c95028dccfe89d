"""The decoded-image cache: a folder's images decoded once (folders.py decodes them) into the user's
cache folder, so that every start after the first is fast, and mapped from it as HostImages. A cache
is never trusted when its files, sidecar or pixels do not match.
"""

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL
import platformdirs
import torch

from errors import UserError, count_text, size_text
from files import atomic_write, no_new_empty_folders
from folders import HostImages, available_ram_bytes, decode_files, list_images, report_skipped
from imagesize import image_sides, image_size_of

CACHE_APP_NAME = "dcgan"
CACHE_ENV = "DCGAN_CACHE_DIR"
FOLDER_CACHE_NAME = "folders"
# Bump when read_image's pixels or the cache's files change: caches made by older code are rebuilt
FOLDER_CACHE_VERSION = 3
# The checksum reads the mapped cache this much at a time: large enough that the calls cost nothing
# beside the CRC, small enough that no chunk is a second copy of the images in memory.
CHECKSUM_CHUNK_BYTES = 1 << 24
# The cache must leave this much disk free, for the checkpoints and samples written after it.
DISK_SPARE_BYTES = 1 << 30
ABANDONED_BUILD_SECONDS = 3600


# ---------------------------------------------------------------- the decoded-image cache
# The decoded images are kept in the user's cache folder (cache_root()/folders/images-<S>px-<key>.npy),
# never beside the data: a folder stays what its owner made it, for ImageFolder and git. The key digests
# every file's name, size, modification time and inode change time (the ctime moves on every
# write, even one that restores the mtime, and costs nothing: it comes with the same stat), the
# image size and the decoder: any change gives another name. The JSON sidecar, written last once
# the .npy is complete, names the data folder and holds the CRC-32 of the pixels in use; a cache
# whose sidecar is missing or does not match, or whose pixels no longer give that CRC when it is
# opened (overwritten in place, a bad sector: the size stays the same), is never trusted. A build
# removes the folder's older caches at that size, and the caches of other folders least recently
# used first when the disk is short.


def cache_root(cache_dir=None):
    """The program's cache folder: --cache-dir, else $DCGAN_CACHE_DIR, else the system's cache folder
    as platformdirs names it: $XDG_CACHE_HOME/dcgan or ~/.cache/dcgan on Linux, ~/Library/Caches/dcgan
    on macOS, %LOCALAPPDATA%\\dcgan\\Cache on Windows (where pip keeps its cache too)."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(platformdirs.user_cache_dir(CACHE_APP_NAME, appauthor=False))


def folder_cache_dir(cache_dir=None):
    """Where decoded image folders are cached, under cache_root."""
    return cache_root(cache_dir) / FOLDER_CACHE_NAME


@dataclass(frozen=True)
class FolderListing:
    """What a folder's decoded images depend on: its image files (sorted, so a row's file, and any
    label drawn from its path, is known), the image size, and their digest."""

    root: Path
    files: list
    image_size: int | str  # a side, or "WIDTHxHEIGHT": the cache's name and key hold both sides
    key: str

    @classmethod
    def of(cls, root, image_size):
        root = Path(root)
        files = list_images(root)
        image_size = image_size_of(*image_sides(image_size))  # 64 or "64x32", however the caller spells it
        return cls(root, files, image_size, folder_cache_key(root, files, image_size))

    @property
    def stem(self):
        return f"images-{self.image_size}px-{self.key}"

    @property
    def pixels_shape(self):
        """(height, width) of each decoded image."""
        width, height = image_sides(self.image_size)
        return height, width

    @property
    def decoded_bytes(self):
        return len(self.files) * 3 * math.prod(self.pixels_shape)


def folder_cache_key(root, files, image_size):
    digest = hashlib.sha256(f"{FOLDER_CACHE_VERSION} {PIL.__version__} {image_size}\n".encode())
    for path in files:
        try:
            stat = path.stat()
            size, mtime_ns, ctime_ns = stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns
        except OSError:  # removed since it was listed: it will be skipped as unreadable
            size = mtime_ns = ctime_ns = -1
        line = f"{path.relative_to(root)}\0{size}\0{mtime_ns}\0{ctime_ns}\n"
        digest.update(line.encode(errors="surrogateescape"))
    return digest.hexdigest()[:20]


def cache_paths(folder, listing):
    return folder / f"{listing.stem}.npy", folder / f"{listing.stem}.json"


def open_folder(listing, workers, cache_dir=None, say=None):
    """A folder's readable images (listing: FolderListing.of(folder, image size)) as HostImages mapped
    from the decoded-image cache in cache_dir (None: cache_root's choice), built first if needed; say
    gets the one line telling whether the cache was reused or built."""
    say = say or (lambda message: None)
    folder = folder_cache_dir(cache_dir)
    with no_new_empty_folders([folder]):  # a build that fails leaves no empty cache folders behind
        cached, reason = reusable_cache(folder, listing)
        if cached is not None:
            report_skipped(listing.root, cached.skipped, len(listing.files))
            mark_used(folder, listing)
            say(f"image cache: reusing {cached.images.source} ({count_text(len(cached.images), 'image')})")
            return with_files(cached.images, cached.skipped, listing)
        problem = cache_folder_problem(folder, listing)
        if problem is not None:
            return with_files(*decode_without_cache(listing, workers, problem, say), listing=listing)
        say(
            f"image cache: {reason}; decoding {count_text(len(listing.files), 'file')} "
            f"({size_text(listing.decoded_bytes)}) into {cache_paths(folder, listing)[0]}"
        )
        built = build_folder_cache(folder, listing, workers)
        return with_files(built.images, built.skipped, listing)


def with_files(images, skipped, listing):
    """images with .files: the readable files, one per row (skipped: the others, as paths or names)."""
    unreadable = {str(Path(name)) for name in skipped} | {str(listing.root / name) for name in skipped}
    images.files = [path for path in listing.files if str(path) not in unreadable]
    return images


@dataclass
class FolderCache:
    """A cache's images (the rows in use, mapped from its .npy), the files it skipped as unreadable,
    and the CRC-32 of its pixels that its sidecar records."""

    images: "HostImages"
    skipped: list
    crc32: int

    def intact(self):
        return pixels_crc32(self.images.array.numpy()) == self.crc32


def reusable_cache(folder, listing):
    """(the FolderCache to reuse, None), or (None, why it is rebuilt).

    The pixels are checked against their checksum here, before anything reads them: once in each
    process of a run, as each maps the cache once. A cache overwritten in place keeps its size and
    header, and only its pixels tell.
    """
    cached = read_folder_cache(folder, listing)
    if cached is None:
        return None, rebuild_reason(folder, listing)
    if not cached.intact():
        # dropped here, so that the damaged file is unmapped before the build renames over it
        return None, "the cache's pixels changed since it was built (their checksum differs), rebuilding it"
    return cached, None


def read_folder_cache(folder, listing):
    """The FolderCache of a complete cache, or None: no cache, or one not to trust. Its pixels are
    not read here (reusable_cache checks them)."""
    npy, sidecar = cache_paths(folder, listing)
    expected_shape = (len(listing.files), 3, *listing.pixels_shape)
    try:
        meta = json.loads(sidecar.read_text())
        array = np.load(npy, mmap_mode="c")  # copy-on-write: writable for torch, never written back
        rows, skipped, crc32 = meta["rows"], [listing.root / name for name in meta["skipped"]], meta["crc32"]
        trusted = (
            meta["key"] == listing.key
            and array.dtype == np.uint8
            and array.shape == expected_shape
            and npy.stat().st_size == array.offset + array.nbytes  # not cut short, nothing appended
            and isinstance(rows, int)
            and 0 < rows == len(listing.files) - len(skipped)
            and isinstance(crc32, int)
        )
    except (OSError, ValueError, SyntaxError, KeyError, TypeError, AttributeError):
        return None  # unreadable JSON or .npy header, a truncated file: all mean "rebuild"
    return FolderCache(HostImages(torch.from_numpy(array)[:rows], source=npy), skipped, crc32) if trusted else None


def pixels_crc32(array):
    """zlib's CRC-32 of a C-contiguous uint8 array's bytes, a chunk at a time: a mapped cache is read
    through, never copied whole into memory."""
    flat = array.reshape(-1)
    crc32 = 0
    for start in range(0, len(flat), CHECKSUM_CHUNK_BYTES):
        crc32 = zlib.crc32(flat[start : start + CHECKSUM_CHUNK_BYTES], crc32)
    return crc32


def mark_used(folder, listing):
    """The sidecar's mtime says when a cache was last used: the disk is freed of the oldest first."""
    with contextlib.suppress(OSError):
        os.utime(cache_paths(folder, listing)[1])


def caches_of(folder, listing, pattern="images-*px-*.json"):
    """The sidecars in folder that belong to listing's data folder."""
    root = str(listing.root.resolve())
    return [sidecar for sidecar in folder.glob(pattern) if sidecar_root(sidecar) == root]


def rebuild_reason(folder, listing):
    """Why no cache could be reused, for the line announcing the build."""
    if any(folder.glob(f"{listing.stem}.*")):
        return "the cache is incomplete or damaged, rebuilding it"
    same_size = caches_of(folder, listing, f"images-{listing.image_size}px-*.json")
    if same_size and all(sidecar_meta(sidecar).get("version") != FOLDER_CACHE_VERSION for sidecar in same_size):
        return "the cache was made by an older version of gan.py, rebuilding it"
    if same_size:
        return "the files changed since the cache was made, rebuilding it"
    if caches_of(folder, listing):
        return f"no cache for --image-size {listing.image_size} yet, building one"
    return "no cache yet, building one"


def cache_folder_problem(folder, listing):
    """Why folder cannot take listing's cache, or None when it can (after freeing the disk if need be)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        remove_stale_caches(folder, listing)
        free_bytes = free_disk_for(folder, listing.decoded_bytes + DISK_SPARE_BYTES)
    except OSError as error:
        return f"{folder} is not writable ({error.strerror or error})"
    if free_bytes < listing.decoded_bytes + DISK_SPARE_BYTES:
        return f"{folder} has {size_text(free_bytes)} free, the cache needs {size_text(listing.decoded_bytes)}"
    return None


def free_disk_for(folder, needed_bytes):
    """Free bytes in folder, after removing other folders' caches, least recently used first, while short."""
    free_bytes = shutil.disk_usage(folder).free
    by_last_use = sorted(folder.glob("images-*px-*.json"), key=lambda path: path.stat().st_mtime)
    for sidecar in by_last_use:
        if free_bytes >= needed_bytes:
            break
        sidecar.unlink(missing_ok=True)  # first: a cache without its sidecar is never trusted
        sidecar.with_suffix(".npy").unlink(missing_ok=True)  # a run mapping it keeps reading it
        free_bytes = shutil.disk_usage(folder).free
    return free_bytes


def build_folder_cache(folder, listing, workers):
    """Decode the folder into the cache a chunk at a time (never all in memory), then write its
    sidecar: last, so that a cache is complete whenever its sidecar exists."""
    npy, sidecar = cache_paths(folder, listing)
    decoded = DecodedRows()
    # mode None: open_memmap opens the temp file by its name
    atomic_write(npy, lambda temp_path: write_decoded(temp_path, listing, workers, decoded), mode=None)
    meta = {
        "key": listing.key,
        "version": FOLDER_CACHE_VERSION,
        "root": str(listing.root.resolve()),
        "rows": len(listing.files) - len(decoded.skipped),
        "skipped": [str(path.relative_to(listing.root)) for path in decoded.skipped],
        "crc32": decoded.crc32,
    }
    atomic_write(sidecar, lambda file: json.dump(meta, file), mode="w")
    # not checked against its CRC: it was taken from these very rows a moment ago
    cached = read_folder_cache(folder, listing)
    if cached is None:
        raise UserError(f"the decoded-image cache {npy} could not be read back; delete {folder} and run again")
    return cached


@dataclass
class DecodedRows:
    """What write_decoded learns besides the pixels: the unreadable files, and the readable rows' CRC-32."""

    skipped: list = field(default_factory=list)
    crc32: int = 0


def write_decoded(path, listing, workers, decoded):
    """Decode the folder into the .npy at path through numpy's memory map, so rows go to disk as they
    are decoded, and take the CRC-32 of the rows as they go."""
    shape = (len(listing.files), 3, *listing.pixels_shape)
    rows = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    try:
        done = 0
        for images in decode_files(listing.files, listing.image_size, workers, decoded.skipped):
            rows[done : done + len(images)] = images.numpy()
            decoded.crc32 = zlib.crc32(images.numpy(), decoded.crc32)
            done += len(images)
        report_skipped(listing.root, decoded.skipped, len(listing.files))  # raises before a cache of nothing is kept
        rows.flush()  # the rows of the unreadable files stay at the end: zeros, never read
    finally:
        del rows  # unmapped before the rename: Windows renames no mapped file


def remove_stale_caches(folder, listing):
    """Free the disk before a build: older caches of this data at this size, and leftovers of crashed builds."""
    for sidecar in caches_of(folder, listing, f"images-{listing.image_size}px-*.json"):
        if sidecar.stem != listing.stem:
            sidecar.unlink(missing_ok=True)
            sidecar.with_suffix(".npy").unlink(missing_ok=True)
    # a build in progress rewrites its temp file every few seconds; one left alone this long is dead
    cutoff = time.time() - ABANDONED_BUILD_SECONDS
    orphans = [p for p in folder.glob("images-*px-*.npy") if not p.with_suffix(".json").exists()]
    for path in [*folder.glob(".images-*px-*.tmp"), *orphans]:
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                path.unlink()


def sidecar_root(sidecar):
    return sidecar_meta(sidecar).get("root")


def sidecar_meta(sidecar):
    """A sidecar's fields, or {} for one that is unreadable."""
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def decode_without_cache(listing, workers, problem, say):
    """The fallback when the cache folder cannot take the cache: decode into memory, again at every start."""
    available = available_ram_bytes()
    # torch.cat holds the chunks and their concatenation: twice the decoded size at the peak
    if available is not None and 2 * listing.decoded_bytes > available:
        raise UserError(
            f"the images of {listing.root} need {size_text(2 * listing.decoded_bytes)} of memory to decode, "
            f"{size_text(available)} are available, and the decoded-image cache cannot be kept ({problem}): "
            f"give --cache-dir a folder with room"
        )
    say(f"image cache: none ({problem}); decoding {count_text(len(listing.files), 'file')} into memory")
    skipped = []
    chunks = list(decode_files(listing.files, listing.image_size, workers, skipped))
    report_skipped(listing.root, skipped, len(listing.files))
    return HostImages(torch.cat(chunks)), skipped
