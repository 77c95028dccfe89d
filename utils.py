"""Shared by the modules: the user-facing error type, and atomic file writes, so a crash or a
full disk never leaves a half-written file where a good one stood.
"""

import os
import tempfile
from pathlib import Path


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
