"""Files and folders: atomic writes, so a crash or a full disk never leaves a half-written file
where a good one stood; and a run's claim on its output folders (a lock, and the folders it
made removed again if it leaves them empty).
"""

import contextlib
import errno
import os
import re
import sys
import tempfile
from pathlib import Path

import filelock

from errors import UserError

LOCK_NAME = ".gan.lock"
TEMP_SUFFIX = ".tmp"
# Windows opens no folder as a file (so it fsyncs none), removes no open file, and its file lock
# also bars other processes from reading the locked byte
WINDOWS = sys.platform == "win32"


# ---------------------------------------------------------------- atomic files


def atomic_write(path, write_fn, mode="wb"):
    """Call write_fn(file) on a temp file beside path, fsync, then rename over path.

    mode None: write_fn(temp path) instead, for writers that open the file by its name (numpy's open_memmap).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the folder held open: its temp file is removed even if the folder is moved or replaced
        # meanwhile, and the rename is fsynced in the folder that holds the file
        folder_fd = None if WINDOWS else os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        raise WriteError(path, error) from None
    try:
        write_through_temp_file(path, write_fn, mode, folder_fd)
        sync_folder(path, folder_fd)
    finally:
        if folder_fd is not None:
            os.close(folder_fd)


def write_through_temp_file(path, write_fn, mode, folder_fd):
    try:
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as error:
        raise WriteError(path, error) from None
    try:
        with os.fdopen(handle, mode or "wb") as file:
            write_fn(file if mode else tmp_name)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp_name, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp_name, path)
    except OSError as error:
        remove_temp_file(tmp_name, folder_fd)
        raise WriteError(path, error, "; the previous file, if any, is intact") from None
    except BaseException:
        remove_temp_file(tmp_name, folder_fd)
        raise


def remove_temp_file(tmp_name, folder_fd):
    with contextlib.suppress(OSError):
        if folder_fd is None:
            os.unlink(tmp_name)
        else:
            os.unlink(os.path.basename(tmp_name), dir_fd=folder_fd)


def sync_folder(path, folder_fd):
    """A rename is on disk only once its folder is (POSIX): until then a power loss can bring back
    the old file, or leave none. Windows has no folder to fsync (folder_fd None)."""
    if folder_fd is None:
        return
    try:
        os.fsync(folder_fd)
    except OSError as error:
        if error.errno != errno.EINVAL:  # EINVAL: a file system that syncs no folder (some network mounts)
            raise WriteError(path, error, "; the new file is in place, but may not survive a power loss") from None


class WriteError(UserError):
    """A file that could not be written; errno says why (a full disk is ENOSPC or EDQUOT)."""

    def __init__(self, path, error, note=""):
        self.errno = error.errno
        reason = error.strerror or str(error)
        if error.errno in (errno.ENOENT, errno.ENOTDIR) and not Path(path).parent.is_dir():
            reason = f"its folder {Path(path).parent} was removed or replaced"
            note = ""
        super().__init__(f"cannot write {path}: {reason}{note}")

    @property
    def disk_full(self):
        return self.errno in (errno.ENOSPC, errno.EDQUOT)


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data):
    atomic_write(path, lambda file: file.write(data))


def check_writable(folder):
    """Fail early, before any training, if folder cannot be created or written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output folder {folder} is a file: give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UserError(f"output folder {folder} is not writable: {error.strerror or error}") from None


# ---------------------------------------------------------------- a run's folders


class FolderLock:
    """A folder claimed by one process: LOCK_NAME in it holds the PID and is locked with filelock's
    primitive (flock on POSIX, LockFileEx on Windows).

    The system drops the lock when its process dies, even by kill -9, so a lock file left by a dead
    run is simply taken over; release() removes the file.
    """

    def __init__(self, folder, flag):
        self.path = Path(folder) / LOCK_NAME
        self.flag = flag
        self.fd = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while self.fd is None:
                self.fd = self.try_lock()
        except OSError as error:
            raise UserError(f"output folder {folder} is not writable: {error.strerror or error}") from None

    def try_lock(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | O_BINARY, 0o644)
        try:
            locked = filelock.lock_descriptor(fd, blocking=False)
        except OSError:  # a file system without locks (some network mounts): the run goes on unlocked
            locked = True
        if not locked:
            holder = lock_holder(fd)
            os.close(fd)
            raise in_use_error(self.path.parent, holder, self.flag)
        if not same_file(fd, self.path):  # its holder released it (and removed the file) meanwhile
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"\n" * pid_offset() + f"{os.getpid()}\n".encode())
        return fd

    def check_held(self):
        """Raise UserError when the folder (or its lock file) was removed or replaced since it was
        locked: another run may have locked the new one, and writing there would mix the two."""
        if self.fd is not None and not same_file(self.fd, self.path):
            raise UserError(
                f"output folder {self.path.parent} ({self.flag}) was removed or replaced while this run used it, "
                "and its lock with it: stopped so as not to write into a folder another run may now hold"
            )

    def release(self):
        if self.fd is None:
            return
        if not WINDOWS:  # removed before unlocking: a waiting run retries on a new file
            remove_file(self.path)
        os.close(self.fd)  # closing drops the lock
        self.fd = None
        if WINDOWS:  # after unlocking: Windows removes no open file (nor one another run has opened since)
            remove_file(self.path)


O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation in the PID text


def pid_offset():
    """Where the PID text starts in a lock file: past the byte Windows locks, which no other process can read."""
    return 1 if WINDOWS else 0


def lock_holder(fd):
    """The PID text of the run holding the lock file fd, or "unknown"."""
    try:
        os.lseek(fd, pid_offset(), os.SEEK_SET)
        return os.read(fd, 32).decode(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"


def in_use_error(folder, holder, flag):
    return UserError(
        f"{folder} is in use by another run (process {holder}): wait for it to end, or give another {flag}"
    )


def refuse_if_in_use(folder, flag):
    """The UserError a FolderLock of folder would raise, without locking or making anything: checks
    made before the lock (an earlier run's files) would otherwise blame a live run's files on one."""
    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY | O_BINARY)  # read-only: another account's lock too
    except OSError:  # no lock file: no run there
        return
    try:
        if not filelock.lock_descriptor(fd, blocking=False):
            raise in_use_error(folder, lock_holder(fd), flag)
        filelock.unlock_descriptor(fd)  # a dead run's file: left for the run's own lock to take over
    except OSError:  # a file system without locks: FolderLock goes on unlocked too
        pass
    finally:
        os.close(fd)


def remove_file(path):
    with contextlib.suppress(OSError):
        path.unlink()


def same_file(fd, path):
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


@contextlib.contextmanager
def locked_folders(folders_and_flags):
    """Lock each (folder, flag) in turn (a folder given twice once), and remove the temp files a
    run of this program stopped mid-write left there; yields the FolderLocks, released however
    the block ends."""
    with contextlib.ExitStack() as stack:
        seen, locks = set(), []
        for folder, flag in folders_and_flags:
            key = os.path.realpath(folder)
            if key not in seen:
                seen.add(key)
                locks.append(FolderLock(folder, flag))
                stack.callback(locks[-1].release)
                remove_stale_temp_files(folder)
        yield locks


# atomic_write's temp files: "." + the file's name + mkstemp's 8 random characters + ".tmp"
TEMP_FILE_NAME = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]{8}" + re.escape(TEMP_SUFFIX))
OWN_SUFFIXES = (".pt", ".pth", ".json", ".jsonl", ".png", ".gif", ".npz")


def remove_stale_temp_files(folder):
    """Temp files of atomic_write left in folder (or a generated*/ or snapshots/ folder in it) by a run
    killed or stopped by a second Ctrl-C mid-write; called with the folder locked, so none is in use."""
    folder = Path(folder)
    inner = (f"{name}/.*{TEMP_SUFFIX}" for name in ("generated*", "snapshots"))
    for path in [*folder.glob(f".*{TEMP_SUFFIX}"), *(path for pattern in inner for path in folder.glob(pattern))]:
        match = TEMP_FILE_NAME.fullmatch(path.name)
        if match and match["name"].endswith(OWN_SUFFIXES) and path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):
                path.unlink()


def missing_ancestor(folder):
    """The outermost of folder and its parents that does not exist yet, or None if folder exists."""
    missing = None
    for path in (Path(folder), *Path(folder).parents):
        if path.exists() or path.is_symlink():
            break
        missing = path
    return missing


@contextlib.contextmanager
def no_new_empty_folders(folders):
    """Folders among these (and their parents) that the block creates and leaves empty are removed:
    a run that stops on bad input leaves nothing behind, not even empty data/ or images/."""
    created = {path for path in map(missing_ancestor, folders) if path is not None}
    try:
        yield
    finally:
        for top in created:
            remove_empty_folders(top)


def remove_empty_folders(top):
    """top and the folders under it that hold no file (bottom up); files are never touched."""
    if not top.is_dir() or top.is_symlink():
        return
    for folder, _, _ in os.walk(top, topdown=False):
        with contextlib.suppress(OSError):
            os.rmdir(folder)
