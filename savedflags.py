"""Flags read back from a file: a run's flags.json given as --config, or a checkpoint's flags on
--resume. What such a file never chooses (folders, the mode, this machine's settings), and each
value it holds checked as its flag checks a typed one.
"""

import argparse
import json
import os
import stat

from errors import UserError

# Resolved from the data, not typed: the number of classes (0 without --conditional) and of colour
# channels. Saved with the flags so a checkpoint says the shapes of its networks; never resumed
# from there, as the data is read again.
DATA_TRAITS = {"num_classes": 0, "nc": 3}
# Folders a checkpoint never chooses: a copied or downloaded checkpoint must not decide where
# files are read or written. A resumed run writes beside the checkpoint it resumes.
PATH_FLAGS = ("dataroot", "image_dir", "checkpoint_dir")
# Flags that describe this invocation or this machine, never taken from a checkpoint.
NOT_RESUMED_FLAGS = (
    *"resume checkpoint generate interpolate evaluate export raw config".split(),
    *"images device compile precision workers tensorboard class_name to_class truncation cache_dir".split(),
    *PATH_FLAGS,
    *DATA_TRAITS,
)
# Flags that set how long a run trains (runlength.py): one of them, typed or taken from a checkpoint
LENGTH_FLAGS = ("epochs", "kimg")
MAX_CONFIG_BYTES = 1 << 20  # a flags.json is a few KiB; --config reads no more than this


def config_values(parser, path, explicit):
    """The flags of a run's flags.json (--config FILE) that were not typed now, each checked as its
    flag checks a typed value. Never the folders, the mode or this machine's settings: a config,
    like a checkpoint, does not choose where files are read or written."""
    try:
        saved = read_small_json(path, MAX_CONFIG_BYTES)
    except (OSError, ValueError) as error:
        raise UserError(f"--config {path} cannot be read: {getattr(error, 'strerror', None) or error}") from None
    if not isinstance(saved, dict):
        raise UserError(f"--config {path} is not a run's flags.json (a JSON object of flags)")
    known = {action.dest for action in parser._actions}
    values = {}
    for name, value in saved.items():
        if name in explicit or name in NOT_RESUMED_FLAGS or name not in known:
            continue  # typed flags win; unknown names are a newer or older program's
        if name in LENGTH_FLAGS and explicit & set(LENGTH_FLAGS):
            continue  # a typed --epochs or --kimg sets the length, whichever flag the config used
        if not saved_flag_is_valid(parser, name, value):
            raise UserError(f"--config {path} says --{name.replace('_', '-')} {value!r}, which that flag refuses")
        values[name] = value
    return values


def saved_flag_is_valid(parser, name, value):
    """Whether a value read from a file (a checkpoint, a config) is one the flag's parser could have produced."""
    action = next((a for a in parser._actions if a.dest == name), None)
    if action is None or value is None:
        return action is None or action.default is None
    if action.choices is not None:
        return isinstance(value, str) and value in action.choices
    if isinstance(action.default, bool):  # on/off flags: a string ("false") would count as on
        return type(value) is bool
    if action.type is None:  # plain strings
        return isinstance(value, str)
    try:
        return type(value) is not bool and action.type(str(value)) == value
    except (argparse.ArgumentTypeError, ValueError, TypeError):
        return False


def refuse_damaged_flag(parser, name, value, path):
    """A value read from the file at path that its flag could not have produced: the file is damaged."""
    if not saved_flag_is_valid(parser, name, value):
        raise UserError(f"checkpoint {path} is damaged: it says --{name.replace('_', '-')} {value!r}")


def read_small_json(path, limit, what="a flags.json"):
    """The JSON in path, a regular file of at most limit bytes (what: the file it should be, for
    the message). OSError, or ValueError saying why: a device such as /dev/zero, or a named pipe,
    would be read forever or wait for a writer, and JSON nested past Python's recursion limit
    would end in a traceback."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a pipe opens without a writer
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("it is not a regular file")
        text = file.read(limit + 1)
    if len(text) > limit:
        raise ValueError(f"it is larger than {what} ({limit // 1024} KiB)")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("it nests too deep") from None
