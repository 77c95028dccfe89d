"""Class names as folder names: checked wherever they enter (a data folder's sub-folders, CIFAR-10's
batches.meta, a checkpoint), and turned into a path in one place, class_folder.

A checkpoint someone shares decides nothing on this disk: --generate makes a folder of each class
name, so a name that is not one plain folder name (`../x`, `/tmp/x`, `..`) or that names the same
folder as another (`a` twice; `Cat` and `cat` on macOS and Windows) is refused before anything is written.
"""

import os
import unicodedata
from pathlib import Path, PureWindowsPath

from errors import UserError

# NAME_MAX of Linux and macOS file systems, in bytes of UTF-8; a longer name fails mkdir
MAX_NAME_BYTES = 255
SEPARATORS = {"/", "\\", os.sep, os.altsep} - {None}


def unsafe_because(name):
    """Why name cannot be a folder name inside another folder, in a few words; None when it can."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not text"
    if not name:
        return "is empty"
    if name in (".", ".."):
        return f"is {name}, which names {'the folder itself' if name == '.' else 'the folder above'}"
    if SEPARATORS & set(name):
        return "holds a path separator (/ or \\)"
    if any(unicodedata.category(character) == "Cc" for character in name):
        return "holds a control character (such as NUL or a line break)"
    if any(unicodedata.category(character) == "Cs" for character in name):
        return "is not valid text (bytes the file system's encoding does not decode)"
    if PureWindowsPath(name).drive:  # "C:x": relative to drive C's current folder, anywhere on it
        return "names a Windows drive"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"is longer than a folder name may be ({MAX_NAME_BYTES} bytes)"
    return None


def same_folder_key(name):
    """What two names share when they name one folder on a case-insensitive file system (macOS,
    Windows): case folded, and composed accents made one with their decomposed forms."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", name).casefold())


def check_class_names(names, source, advice):
    """A UserError naming the first unusable or repeated name of names (from source: "checkpoint
    X", "data folder Y"); advice ends the message (what to do about it)."""
    seen = {}
    for name in names:
        why = unsafe_because(name)
        if why is not None:
            raise UserError(f"{source}: the class name {shown(name)} {why}; {advice}")
        key = same_folder_key(name)
        if key in seen and seen[key] == name:
            raise UserError(f"{source}: the class name {shown(name)} comes twice; {advice}")
        if key in seen:
            raise UserError(
                f"{source}: the class names {shown(seen[key])} and {shown(name)} differ only in case (or in how "
                f"an accent is encoded), so they name one folder on macOS and Windows; {advice}"
            )
        seen[key] = name
    return tuple(names)


def shown(name):
    """name as a message shows it: quoted, control characters escaped, at most 60 characters."""
    text = repr(name)
    return text if len(text) <= 60 else text[:56] + "...'"


def class_folder(root, name):
    """root/name, the folder of class name: the one place a class name becomes a path."""
    why = unsafe_because(name)
    if why is not None:  # every way in checks the names first: a bug if this is reached
        raise ValueError(f"class name {shown(name)} {why}")
    return Path(root) / name


def checkpoint_class_names(state, path):
    """The class names a checkpoint keeps (an empty tuple for an unconditional run), checked as
    folder names."""
    names = state.get("class_names") or ()
    if not isinstance(names, (list, tuple)):
        raise UserError(f"checkpoint {path} is damaged: unusable class_names")
    return check_class_names(names, f"checkpoint {path}", "it is refused, as --generate makes a folder of each class")
