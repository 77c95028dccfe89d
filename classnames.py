"""Class names as folder names: checked wherever they enter (a data folder's sub-folders, CIFAR-10's
batches.meta, a checkpoint), and turned into a path in one place, class_folder; a --conditional
data folder's classes and labels, from its sub-folders.

A checkpoint someone shares decides nothing on this disk: --generate makes a folder of each class
name, so a name that is not one plain folder name (`../x`, `/tmp/x`, `..`) or that names the same
folder as another (`a` twice; `Cat` and `cat` on macOS and Windows) is refused before anything is written.
"""

import os
import unicodedata
from pathlib import Path, PureWindowsPath

import torch

from errors import UserError

# NAME_MAX of Linux and macOS file systems, in bytes of UTF-8; a longer name fails mkdir
MAX_NAME_BYTES = 255
GENERATED_GRID = "grid.png"  # --generate writes it beside a folder of each class
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
    if same_folder_key(name) == same_folder_key(GENERATED_GRID):
        return f"is {GENERATED_GRID}, the name of the grid --generate writes beside the class folders"
    if PureWindowsPath(name).drive:  # "C:x": relative to drive C's current folder, anywhere on it
        return "names a Windows drive"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"is longer than a folder name may be ({MAX_NAME_BYTES} bytes)"
    return None


def index_of(names, name):
    """The index of name among names, or None; an accent typed decomposed (as macOS keyboards and
    file names may give it) names the class written composed, which looks the same."""
    composed = [unicodedata.normalize("NFC", known) for known in names]
    typed = unicodedata.normalize("NFC", name) if isinstance(name, str) else None
    return composed.index(typed) if typed in composed else None


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


def folder_classes(root, files):
    """The class names of root for --conditional, from its listing (files: its image files), so a
    wrong layout is refused before minutes of decoding and no cache is left behind.

    Classes are root's immediate sub-folders, sorted by name as torchvision's ImageFolder sorts
    them, so class i here is class i there. A file directly in root, a sub-folder without image
    files, fewer than two sub-folders, or a sub-folder name --generate could not make a folder of
    (two names that differ only in case, a name with a backslash) is an error.
    """
    root = Path(root)
    names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    loose = [path.name for path in files if path.parent == root]
    if loose:
        raise UserError(
            f"--conditional: {root} holds images directly in it ({loose[0]}{', ...' if len(loose) > 1 else ''}); "
            "it needs one sub-folder per class, each holding that class's images"
        )
    check_class_names(names, f"--conditional: data folder {root}", "rename the sub-folder: each class becomes a folder")
    refuse_empty_classes(root, names, {path.relative_to(root).parts[0] for path in files})
    if len(names) < 2:
        raise UserError(f"--conditional: {root} has {len(names)} class sub-folder(s); it needs at least 2")
    return tuple(names)


def folder_labels(root, files, class_names):
    """The class of each file (files: the readable ones), numbered as in class_names (folder_classes's
    answer) by the sub-folder of root it is in; a class left with no readable image is an error."""
    root = Path(root)
    index = {name: number for number, name in enumerate(class_names)}
    labels = torch.tensor([index[path.relative_to(root).parts[0]] for path in files], dtype=torch.long)
    refuse_empty_classes(root, class_names, {class_names[label] for label in labels.unique().tolist()})
    return labels


def refuse_other_classes(trained, found, checkpoint, data):
    """A UserError when the data's classes (found) are not the ones the checkpoint trained on: class i
    would draw another class."""
    if tuple(found) != tuple(trained):
        shown = [", ".join(names) if names else "none (unconditional)" for names in (trained, found)]
        raise UserError(f"{checkpoint} was trained on the classes {shown[0]}; {data} has {shown[1]}")


def refuse_empty_classes(root, class_names, classes_with_images):
    """A UserError naming the first class folder of class_names not among classes_with_images."""
    empty = [name for name in class_names if name not in classes_with_images]
    if empty:
        raise UserError(f"--conditional: class folder {root / empty[0]} holds no readable images")
