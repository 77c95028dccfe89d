"""The modes of one invocation (training, or an after-training mode chosen by its flag), the flags
each mode reads, and the checks across flags of one mode: a typed flag the chosen mode would ignore
is refused, not ignored without a word. Imports no torch, as options.py.
"""

from errors import UserError

# Flags that shape the networks: a checkpoint only fits, or only draws as it trained, with the same ones.
ARCHITECTURE_FLAGS = ("arch", "g_output", "image_size", "nz", "ngf", "ndf", "spectral_norm", "conditional")
# The modes a run can be, and the flags only some of them read: a flag typed for a mode that never
# reads it would be ignored without a word, so it is refused. "images" is --evaluate --images DIR.
MODES = ("train", "generate", "interpolate", "evaluate", "images", "export")
# The modes that use a trained generator instead of training one, each chosen by its flag.
AFTER_TRAINING_MODES = ("generate", "interpolate", "evaluate", "export")
# the architecture flags reach every mode with a checkpoint, which checks them against its own
CHECKPOINT_MODES = ("train", "generate", "interpolate", "evaluate", "export")
DATA_MODES = ("train", "evaluate", "images")
TRAINING_ONLY_FLAGS = (
    "epochs", "kimg", "class_loss", "lr", "beta1", "beta2", "loss", "label_smoothing", "label_noise", "spectral_loss",
    "r1", "r1_every", "diffaugment", "ada", "ada_target", "mirror", "ttur", "d_steps", "ema", "on_nan", "sync_bn",
    "channels", "compile", "resume", "log_every", "save_every", "snapshot_every", "keep_snapshots", "tensorboard",
    "fid_every",
)  # fmt: skip
MODE_ONLY_FLAGS = {
    **dict.fromkeys(TRAINING_ONLY_FLAGS, ("train",)),
    **dict.fromkeys([*(name for name in ARCHITECTURE_FLAGS if name != "image_size"), "recipe"], CHECKPOINT_MODES),
    **dict.fromkeys(("dataset", "dataroot", "subset", "workers", "cache_dir"), DATA_MODES),
    "batch_size": ("train", "evaluate"),  # the data must hold one batch; --evaluate --images scores them all
    "eval_samples": ("train", "evaluate"),  # training reads it for --fid-every
    "image_dir": ("train", "generate", "interpolate"),
    "checkpoint": AFTER_TRAINING_MODES,
    "raw": AFTER_TRAINING_MODES,
    "config": ("train",),
    "steps": ("interpolate",),
    "class_name": ("generate", "interpolate"),
    "to_class": ("interpolate",),
    "truncation": ("generate", "interpolate", "evaluate"),
    "images": ("images",),
}
# The data flags some datasets never read: random images have no folder, and only a folder is decoded
# into the cache.
DATASET_ONLY_FLAGS = {"dataroot": ("cifar10", "folder"), "cache_dir": ("folder",)}
# Read by every mode (image_size: --evaluate --images brings the real images to it), or choosing the mode.
EVERY_MODE_FLAGS = (
    "seed", "device", "precision", "checkpoint_dir", "image_size", "generate", "interpolate", "evaluate", "export",
)  # fmt: skip


def chosen_mode(parsed):
    """The mode the flags choose: "train", "images" (--evaluate --images DIR) or an after-training mode."""
    if parsed["images"] is not None:
        return "images"
    modes = [mode for mode in AFTER_TRAINING_MODES if parsed[mode] not in (None, False)]
    return modes[0] if modes else "train"


def check_sampling_flags(flags):
    """--class, --to-class and --truncation apply to the modes that draw from a checkpoint."""
    drawing = flags["generate"] is not None or flags["interpolate"]
    if flags["class_name"] is not None and not drawing:
        raise UserError("--class applies to --generate and --interpolate")
    if flags["to_class"] is not None and (not flags["interpolate"] or flags["class_name"] is None):
        raise UserError("--to-class applies to --interpolate, with --class naming where the walk starts")
    if flags["truncation"] is not None and not (drawing or flags["evaluate"]):
        raise UserError("--truncation applies to --generate, --interpolate and --evaluate")


def refuse_flags_of_other_modes(parser, parsed, explicit):
    """A typed flag that the chosen mode never reads would be silently ignored: refused instead."""
    mode = chosen_mode(parsed)
    for name, readers in MODE_ONLY_FLAGS.items():
        if name in explicit and mode not in readers:
            hint = "; training continues a checkpoint with --resume PATH" if name == "checkpoint" else ""
            used_by = ", ".join(mode_text(reader, beside=mode) for reader in readers)
            raise UserError(f"{option_names(parser, name)} is read by {used_by} only, not by {mode_text(mode)}{hint}")


def refuse_flags_of_other_datasets(dataset, explicit):
    """Told once the dataset is known (a checkpoint's, or the one typed): a typed --dataroot or
    --cache-dir that the dataset never reads would be silently ignored, and is refused instead."""
    for name, readers in DATASET_ONLY_FLAGS.items():
        if name in explicit and dataset not in readers:
            read_by = " and ".join(f"--dataset {reader}" for reader in readers)
            raise UserError(f"--{name.replace('_', '-')} is read by {read_by} only, not by --dataset {dataset}")


def option_names(parser, dest):
    """A flag as a message names it: --class for class_name, --compile/--no-compile for compile."""
    return "/".join(option for action in parser._actions if action.dest == dest for option in action.option_strings)


def mode_text(mode, beside=None):
    """How a message names a mode; beside --evaluate --images, --evaluate is "--evaluate of a checkpoint"."""
    if mode == "evaluate" and beside == "images":
        return "--evaluate of a checkpoint"
    return {"train": "training", "images": "--evaluate --images"}.get(mode, f"--{mode}")


def check_images_flag(flags, explicit):
    """--images DIR replaces a checkpoint's samples in --evaluate, and all of its images count."""
    if flags["images"] is None:
        return
    if not flags["evaluate"]:
        raise UserError("--images DIR goes with --evaluate: python gan.py --evaluate --images DIR")
    for name in ("checkpoint", "eval_samples"):
        if name in explicit:
            raise UserError(f"--images scores every image in its folder: --{name.replace('_', '-')} does not apply")
