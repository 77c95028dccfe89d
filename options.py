"""The command line: every flag with its check, and the options a run uses, resolved once
(a random seed drawn, a checkpoint's flags merged on --resume) and read-only from then on.
"""

import argparse
import copy
import difflib
import errno
import math
import os
import sys
from types import MappingProxyType

import modes
from errors import UserError, error_prefix
from imagesize import EXPECTED, SIDES, parse_image_size
from savedflags import DATA_TRAITS, LENGTH_FLAGS, config_values

# This module imports no torch (seconds): --help and flag errors answer at once. So the choices
# are named here; their implementations are models.ARCHITECTURES, models.OUTPUTS, steps.LOSSES
# and runtime.PRECISIONS, and tests/test_startup.py checks that the names agree.
ARCHITECTURES = ("dcgan", "upsample", "upsample-fullres")
OUTPUTS = ("tanh", "clip")
LOSSES = ("bce", "hinge")
PRECISIONS = ("fp32", "bf16", "fp16")
IMAGE_SIZES = SIDES  # 16 .. 256, as models.IMAGE_SIZES

MAX_SEED = 2**63 - 1
# --r1, --spectral-loss and --class-loss: published weights reach 100 (R1's gamma for StyleGAN2's
# LSUN Church and Horse). At 1000 a term drowns the adversarial loss: Adam's steps do not grow with
# the loss, so a tiny run's D(x) and D(G(z)) are the same from 1000 to 1e20; 1e300 makes it infinite.
MAX_LOSS_WEIGHT = 1000
# --conditional's learning rate unless --lr is typed (measured: docs/classes.md, BENCHMARKS.md)
CONDITIONAL_LR = 3e-4
MAX_WALK_STEPS = 1000  # --interpolate's grid is steps images wide
# --recipe NAME sets these flags unless they are typed; why each of improved's: docs/recipes.md
RECIPES = {
    "dcgan": {},
    "improved": {"arch": "upsample-fullres", "g_output": "clip", "spectral_loss": 3.0, "lr": 3e-4},
}
KIMG_HELP = (
    "train on N thousand images instead of --epochs, rounded up to whole steps of --batch-size x processes "
    "(a step count, whatever the data's size); the run may end inside an epoch, and a resumed run continues "
    "to this many [default: --epochs decides]"
)
SNAPSHOT_HELP = (
    "also keep the generator every STEPS steps (its EMA where there is one) in <checkpoint-dir>/snapshots/"
    "snapshot-<step>.pt, for --generate, --interpolate, --evaluate and --export (--checkpoint PATH); a snapshot "
    "is not a point to resume from; 0: none"
)
EXAMPLES = """examples:
  python gan.py --epochs 25                                  CIFAR-10, downloaded into data/
  python gan.py --dataset folder --dataroot icons/ --recipe improved --mirror --image-size 32 --ngf 32 --ndf 32 --batch-size 64 --epochs 30
                                                             a small folder of your own, on a CPU
  python gan.py --dataset folder --dataroot celeba/ --recipe improved --image-size 64
                                                             a large folder (e.g. CelebA) on a GPU
  python gan.py --resume                                     continue the CIFAR-10 run in checkpoints/
  python gan.py --resume --dataroot icons/ --epochs 60       continue a folder's run (a checkpoint never chooses folders)
  python gan.py --kimg 500 --snapshot-every 1000             500,000 images, the generator kept every 1,000 steps
  python gan.py --generate 1000 --seed 7                     images from the latest checkpoint
  python gan.py --interpolate                                latent walks, grid and GIF
  python gan.py --evaluate --dataroot icons/                 FID, IS, KID, precision/recall of the latest checkpoint
  torchrun --nproc_per_node=8 gan.py --epochs 25             8 GPUs, batch 128 each
"""


class Options:
    """The resolved flags, read-only: a function that wrote opts.x would change what the next resume reads."""

    __slots__ = ("_values",)

    def __init__(self, values):
        object.__setattr__(self, "_values", MappingProxyType(dict(values)))

    def __getattr__(self, name):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        raise AttributeError(f"options are read-only (tried to set {name})")

    def replace(self, **changes):
        return Options({**self._values, **changes})

    def as_dict(self):
        """The values a checkpoint and flags.json keep: numbers, strings, booleans and None."""
        return {k: v for k, v in self._values.items() if isinstance(v, (int, float, str, bool, type(None)))}


# ---------------------------------------------------------------- value checks


class Parser(argparse.ArgumentParser):
    """Flags spelt out in full (argparse would take --epoch for --epochs, and a later flag could make
    it ambiguous), errors as a UserError, and a guess at the flag a misspelt one meant."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):
        raise UserError(message + self.did_you_mean(message))

    def did_you_mean(self, message):
        if not message.startswith("unrecognized arguments:"):
            return ""
        known = [option for action in self._actions for option in action.option_strings if option.startswith("--")]
        typed = [word.split("=", 1)[0] for word in message.split(":", 1)[1].split() if word.startswith("--")]
        close = [match for flag in typed for match in difflib.get_close_matches(flag, known, n=1, cutoff=0.75)]
        return f" (did you mean {close[0]}?)" if close else ""


def checked(name, convert, accept, expected):
    """A flag's type: text converted, then refused (argparse's one line) unless accept(value)."""

    def check(text):
        value = convert(text)
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        return value

    check.__name__ = name  # argparse names it in "invalid positive_int value: 'x'"
    return check


positive_int = checked("positive_int", int, lambda value: value > 0, "a positive integer")
non_negative_int = checked("non_negative_int", int, lambda value: value >= 0, "zero or more")
seed = checked("seed", int, lambda value: 0 <= value <= MAX_SEED, "from 0 to 2**63-1")
positive_float = checked("positive_float", float, lambda value: math.isfinite(value) and value > 0, "a positive number")
non_negative_float = checked(
    "non_negative_float", float, lambda value: math.isfinite(value) and value >= 0, "a number >= 0"
)
fraction = checked("fraction", float, lambda value: 0.0 <= value < 1.0, "in [0, 1)")
ada_target = checked("ada_target", float, lambda value: 0 < value < 1, "between 0 and 1 (not 0 or 1)")
loss_weight = checked(
    "loss_weight", float, lambda value: 0 <= value <= MAX_LOSS_WEIGHT, f"from 0 to {MAX_LOSS_WEIGHT:g}"
)


def image_size(text):
    """--image-size: 64 (an int, a square's side) or 64x32 (the text "64x32"; 64x64 is 64)."""
    try:
        return parse_image_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {EXPECTED}, got {text}") from None


def walk_steps(text):
    """A walk's images: its two ends at the least."""
    value = positive_int(text)
    if not 2 <= value <= MAX_WALK_STEPS:
        raise argparse.ArgumentTypeError(f"must be from 2 to {MAX_WALK_STEPS}, got {text}")
    return value


def folder(text):
    """A folder's name; an empty one ("$UNSET_VARIABLE") would mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder, got an empty name")
    return path_name(text)


def path_name(text):
    """A path, refused where symbolic links lead in a circle or a name in it is longer than file
    systems allow (every later check would fail obscurely, or with a traceback)."""
    try:
        os.stat(text)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise argparse.ArgumentTypeError(f"{text} is a loop of symbolic links (each points to the next)") from None
        if error.errno == errno.ENAMETOOLONG:
            shown = text if len(text) <= 60 else f"{text[:60]}..."
            raise argparse.ArgumentTypeError(f"{shown} holds a name longer than file systems allow") from None
    return text


def file_name(text):
    """path_name, refused when empty ("$UNSET_VARIABLE"): --checkpoint would quietly mean the latest."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a file, got an empty name")
    return path_name(text)


def device_name(text):
    if text in ("auto", "cpu", "mps", "cuda") or (text.startswith("cuda:") and text[5:].isdecimal()):
        return text
    raise argparse.ArgumentTypeError(f"must be auto, cpu, mps, cuda or cuda:N, got {text}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default in --help, and the examples kept as written."""

    def _get_help_string(self, action):
        # "(default: False)" on a switch and "(default: None)" say nothing; those helps say it in words
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


# ---------------------------------------------------------------- the flags


def build_parser():
    p = Parser(
        description="Train a DCGAN and use the trained generator.", epilog=EXAMPLES, formatter_class=HelpFormatter
    )
    add_common_flags(p.add_argument_group("the flags most runs need"))
    add_training_flags(p.add_argument_group("training"))
    add_data_flags(p.add_argument_group("data"))
    add_run_flags(p.add_argument_group("run"))
    add_after_training_flags(p.add_argument_group("after training"))
    return p


def add_common_flags(group):
    add = group.add_argument
    add(
        "--dataset",
        choices=["cifar10", "folder", "fake"],
        default="cifar10",
        help="cifar10 (downloaded), folder (any image folder) or fake (random images, 512 or --subset of them)",
    )
    add("--dataroot", type=folder, default="data", help="where CIFAR-10 is downloaded, or the image folder")
    add("--epochs", type=positive_int, default=25, help="total epochs to train (a resumed run continues to this many)")
    add("--kimg", type=positive_float, default=None, metavar="N", help=KIMG_HELP)
    add("--batch-size", type=positive_int, default=128, help="images per step, per process under torchrun")
    add(
        "--image-size",
        type=image_size,
        default=64,
        help="side of the images in pixels: 16, 32, 64, 128 or 256; WIDTHxHEIGHT (64x32) for images that are not "
        "square, each side one of those: a folder's images are resized and centre-cropped to that shape (CIFAR-10 "
        "takes square sizes only)",
    )
    add(
        "--recipe",
        choices=list(RECIPES),
        default="dcgan",
        help="a set of training flags in one; flags you type win. "
        + "; ".join(f"{name}: {recipe_summary(name)}" for name in RECIPES),
    )


def add_training_flags(group):
    add = group.add_argument
    add(
        "--arch",
        choices=list(ARCHITECTURES),
        default="dcgan",
        help="dcgan: transposed convolutions (Radford et al.); upsample: a linear layer, then upsample + "
        "convolution blocks, free of checkerboard artifacts (Odena et al., 2016); upsample-fullres: "
        "the same with one more BatchNorm-ReLU convolution at full size, for the finest detail",
    )
    add(
        "--g-output",
        choices=list(OUTPUTS),
        default="tanh",
        help="G's last activation: tanh (DCGAN's), or clip to [-1, 1] (hardtanh), which reaches pure white and "
        "black, so that flat regions come out flat instead of faintly speckled",
    )
    add(
        "--conditional",
        action="store_true",
        help="learn the data's classes (CIFAR-10's labels, or a folder's sub-folders, one per class) so that "
        "any class can be drawn: conditional BatchNorm in G, a projection discriminator",
    )
    add(
        "--class-loss",
        type=loss_weight,
        default=1.0,
        help="with --conditional: weight of a class loss on D's projection scores (its class embeddings dotted "
        "with its last features, one score per class; P2GAN): D learns to tell real images' classes, G to draw "
        "its images' classes; 0 leaves the projection discriminator alone",
    )
    add("--nz", type=positive_int, default=100, help="length of the noise vector")
    add("--ngf", type=positive_int, default=64, help="generator width (channels of its last stage)")
    add("--ndf", type=positive_int, default=64, help="discriminator width (channels of its first stage)")
    add(
        "--lr",
        type=positive_float,
        default=2e-4,
        help="Adam learning rate of both networks (3e-4 with --conditional or --recipe improved, unless typed)",
    )
    add("--beta1", type=fraction, default=0.5, help="Adam beta1")
    add("--beta2", type=fraction, default=0.999, help="Adam beta2")
    add("--loss", choices=list(LOSSES), default="bce", help="bce: the DCGAN loss; hinge: as in SN-GAN")
    add("--label-smoothing", type=fraction, default=0.0, help="real labels become 1-s (bce loss only)")
    add(
        "--label-noise",
        type=fraction,
        default=0.0,
        help="each D label moves a random amount in [0, N] towards the other class (bce loss only)",
    )
    add(
        "--spectral-loss",
        type=loss_weight,
        default=0.0,
        help="weight of a G loss that matches its images' power spectrum to the real batch's; 0 turns it off",
    )
    add(
        "--r1",
        type=loss_weight,
        default=0.0,
        help="weight gamma of the R1 penalty (Mescheder et al., 2018): gamma/2 times the squared gradient of D's "
        "logits on real images with respect to those images, added to D's loss; 0 turns it off",
    )
    add(
        "--r1-every",
        type=positive_int,
        default=16,
        metavar="N",
        help="with --r1: the penalty on every N-th D step only, weighted N times (StyleGAN2's lazy "
        "regularisation: the same average weight; the other steps compile); 1: on every step",
    )
    add("--spectral-norm", action="store_true", help="spectral normalisation on D's layers (drops D's BatchNorm)")
    add("--diffaugment", action="store_true", help="differentiable color/translation/cutout on D's inputs")
    add(
        "--ada",
        action="store_true",
        help="adaptive augmentation (ADA, Karras et al., 2020): x-flip, colour, translation and cutout on all D sees, "
        "each applied to each image with probability p. p starts at 0 and every 4 steps moves up or down by those "
        "steps' images / 20k, so that the mean sign of D's logits on real images stays near --ada-target (20k, not "
        "ADA's 500k: in these runs of a few thousand steps p would hardly move at ADA's speed). With --diffaugment "
        "too, the same; p is logged as augment_p",
    )
    add(
        "--ada-target",
        type=ada_target,
        default=0.6,
        help="with --ada: the mean sign of D's logits on real images that p is tuned to hold (ADA's); "
        "higher lets D be surer of the real images before p rises",
    )
    add(
        "--mirror",
        action="store_true",
        help="flip each real image left-right with probability 1/2 at every step: the data's mirror images "
        "as more data, for images whose mirror image is as real (not text or digits)",
    )
    add("--ttur", action="store_true", help="two time-scale update rule: D lr 4e-4, G lr 1e-4 (overrides --lr)")
    add("--d-steps", type=positive_int, default=1, help="D updates per G update, each on its own batch")
    add("--ema", type=fraction, default=0.999, help="decay of the generator's moving average; 0 turns it off")
    add("--seed", type=seed, default=None, help="random seed [default: random, printed and saved]")
    add(
        "--on-nan",
        choices=["stop", "rollback"],
        default="stop",
        help="on non-finite losses: stop, or reload the last checkpoint with a new seed",
    )
    add("--sync-bn", action="store_true", help="synchronise BatchNorm statistics across processes under torchrun")


def add_data_flags(group):
    add = group.add_argument
    add("--subset", type=positive_int, default=None, help="train on N randomly drawn images [default: all]")
    add(
        "--channels",
        choices=["auto", "1", "3"],
        default="auto",
        help="colour channels of the networks: auto: 1 when every image of the data is greyscale (a folder of "
        "MNIST PNGs), else 3; 1 trains on the images' luma",
    )
    add("--workers", type=non_negative_int, default=min(4, os.cpu_count() or 1), help="processes decoding a folder")
    add(
        "--cache-dir",
        type=folder,
        default=None,
        help="where a folder's decoded images are cached; delete it at any time to free the disk [default: "
        "the system's cache folder: ~/.cache/dcgan on Linux ($XDG_CACHE_HOME/dcgan where that is set), "
        "~/Library/Caches/dcgan on macOS, %%LOCALAPPDATA%%\\dcgan\\Cache on Windows; $DCGAN_CACHE_DIR, "
        "where set, wins over it]",
    )


def add_run_flags(group):
    add = group.add_argument
    add(
        "--config",
        type=file_name,
        default=None,
        metavar="FILE",
        help="start a run with the flags of a run's flags.json (checkpoints/flags.json); flags typed beside it win",
    )
    add("--device", type=device_name, default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    add(
        "--precision",
        choices=["auto", *PRECISIONS],
        default="auto",
        help="auto: bf16 autocast on CUDA (fp16 with loss scaling where bf16 is missing) and on CPUs with bf16 "
        "instructions (AVX512-BF16 or AMX, as torch reports them), fp32 elsewhere",
    )
    add(
        "--compile",
        choices=["auto", "on", "off", "max"],
        default="auto",
        help="torch.compile the steps; auto: on CUDA, when the run is long enough to win back the compile's "
        "time (docs/speed.md); max: the whole step as CUDA graphs (CUDA, one process, bf16 or fp32)",
    )
    add("--no-compile", dest="compile", action="store_const", const="off", help="the same as --compile off")
    add("--image-dir", type=folder, default="images", help="folder for grids, plots and generated images")
    add("--checkpoint-dir", type=folder, default="checkpoints", help="folder for checkpoints and the metrics log")
    add(
        "--resume",
        type=path_name,
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="continue a run [PATH: the latest checkpoint in --checkpoint-dir]",
    )
    add(
        "--log-every",
        type=positive_int,
        default=100,
        help="steps between progress-bar updates and metrics-log rows; shorter epochs log every third of an "
        "epoch instead (every 2 steps at the least), so their numbers move within the first epoch",
    )
    add(
        "--save-every",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="also write the checkpoint every N steps, as a Ctrl-C does (a kill -9 then loses at most N steps); "
        "0: at the end of each epoch only",
    )
    add("--snapshot-every", type=non_negative_int, default=0, metavar="STEPS", help=SNAPSHOT_HELP)
    keep_help = "with --snapshot-every: keep the K newest snapshots, deleting older ones [default: all]"
    add("--keep-snapshots", type=positive_int, default=None, metavar="K", help=keep_help)
    add("--tensorboard", action="store_true", help="also log to TensorBoard (needs the tensorboard package)")


def add_after_training_flags(group):
    add = group.add_argument
    add("--generate", type=positive_int, default=None, metavar="N", help="write N images from a checkpoint, then exit")
    add("--interpolate", action="store_true", help="write latent walks (grid and GIF) from a checkpoint, then exit")
    add(
        "--steps",
        type=walk_steps,
        default=10,
        help=f"images per latent walk for --interpolate, its two ends included (2 to {MAX_WALK_STEPS})",
    )
    add(
        "--class",
        dest="class_name",
        default=None,
        metavar="NAME",
        help="with --generate or --interpolate on a --conditional checkpoint: the class to draw, by name or "
        "index; without it --generate writes N of every class (one sub-folder each) and --interpolate walks "
        "one class per row [default: every class]",
    )
    add(
        "--to-class",
        default=None,
        metavar="NAME",
        help="with --interpolate --class A: walk from class A to this class at fixed noise",
    )
    add(
        "--truncation",
        type=positive_float,
        default=None,
        metavar="T",
        help="draw the noise from a normal truncated to [-T, T] (the truncation trick: lower T, more typical "
        "images, less variety) for --generate, --interpolate and --evaluate [default: not truncated]",
    )
    add(
        "--checkpoint",
        type=file_name,
        default=None,
        help="checkpoint (or snapshot) for --generate/--interpolate/--evaluate/--export [default: latest]",
    )
    add(
        "--evaluate",
        action="store_true",
        help="FID, IS, KID, precision, recall, density and coverage of a checkpoint, then exit",
    )
    add(
        "--images",
        type=folder,
        default=None,
        metavar="DIR",
        help="with --evaluate: score every image in DIR (from any program) against the training data, "
        "instead of a checkpoint's samples",
    )
    add(
        "--export",
        type=folder,
        default=None,
        metavar="DIR",
        help="write the generator into DIR for other programs: model.safetensors and config.json, a model card, "
        "generator.onnx and generator.pt2 (torch.export), then exit; DIR must be new or empty",
    )
    add(
        "--raw",
        action="store_true",
        help="with --generate, --interpolate, --evaluate or --export: the trained generator instead of its "
        "moving average (EMA)",
    )
    add("--eval-samples", type=positive_int, default=10_000, help="generated images per evaluation")
    add("--fid-every", type=non_negative_int, default=0, help="evaluate every E epochs while training; keeps best.pt")


# ---------------------------------------------------------------- parsing and resolving


def parse_flags(argv=None):
    """The checked flags as Options, and the set of flags the user typed (with those a typed --recipe set)."""
    parser = build_parser()
    parsed = vars(parser.parse_args(argv))
    for action in parser._actions:
        if isinstance(parsed.get(action.dest), list):  # argparse turns "--flag=--" into [] unchecked
            raise UserError(f"argument {'/'.join(action.option_strings)}: expected one argument")
    explicit = explicit_flags(parser, argv)
    chosen = [parsed[mode] not in (None, False) for mode in modes.AFTER_TRAINING_MODES]
    if sum(chosen) > 1:
        raise UserError("choose one of --generate, --interpolate, --evaluate and --export")
    if parsed["resume"] is not None and any(chosen):
        raise UserError("--resume trains; use --checkpoint with --generate, --interpolate, --evaluate or --export")
    if parsed["config"] is not None and parsed["resume"] is not None:
        raise UserError("--config starts a run; --resume goes on with the checkpoint's own flags")
    if set(LENGTH_FLAGS) <= explicit:
        raise UserError("--kimg and --epochs both say how long to train: give one of them")
    modes.check_sampling_flags(parsed)
    modes.check_images_flag(parsed, explicit)
    modes.refuse_flags_of_other_modes(parser, parsed, explicit)
    settled = explicit  # the flags whose values are decided: typed, or read from --config
    if parsed["config"] is not None:
        from_config = config_values(parser, parsed["config"], explicit)
        parsed.update(from_config)
        # a config's values stand as typed ones (its recipe's flags, its learning rate), but a typed --recipe wins
        settled = explicit | frozenset(from_config)
    from_recipe = recipe_values(parser, parsed["recipe"], explicit if "recipe" in explicit else settled)
    parsed.update(from_recipe)
    if parsed["conditional"] and "lr" not in settled:
        parsed["lr"] = CONDITIONAL_LR  # whatever the recipe's
    if "recipe" in explicit:
        # typing --recipe is typing its flags: a resume keeps them, or refuses an --arch change
        explicit = explicit | frozenset(from_recipe)
    check_recipe(parsed)
    # the data says these, once it is read; class_names is a tuple, so flags.json never holds it
    parsed.update(DATA_TRAITS, class_names=())
    return Options(parsed), explicit


def answer_help_and_flag_errors(argv):
    """Print --help (exit 0) or a flag error (exit 2) and exit; return when the flags parse.

    gan.py calls this before it imports torch, which takes seconds: a newcomer's --help or typo
    is answered at once. The flags are parsed again, as usual, once torch is there.
    """
    try:
        parse_flags(argv)
    except UserError as error:
        print(f"{error_prefix()}: error: {error}", file=sys.stderr)
        sys.exit(2)


def recipe_values(parser, name, explicit):
    """The flags --recipe NAME sets, less those the user typed.

    Every recipe sets every flag some recipe sets (dcgan: to the defaults), so --recipe dcgan
    on --resume of an improved run asks for --arch dcgan instead of silently keeping upsample.
    """
    flags = dict.fromkeys(name for recipe in RECIPES.values() for name in recipe)
    values = {flag: RECIPES[name].get(flag, parser.get_default(flag)) for flag in flags}
    return {flag: value for flag, value in values.items() if flag not in explicit}


def recipe_summary(name):
    flags = [
        f"--{flag.replace('_', '-')}" + ("" if value is True else f" {value}") for flag, value in RECIPES[name].items()
    ]
    return " ".join(flags) or "the DCGAN paper's settings (the defaults)"


def check_recipe(flags):
    if flags["loss"] != "bce":
        for name in ("label_smoothing", "label_noise"):
            if flags[name]:
                raise UserError(f"--{name.replace('_', '-')} applies to --loss bce only")
    if flags["label_smoothing"] + flags["label_noise"] >= 1:
        raise UserError("--label-smoothing plus --label-noise must stay below 1")


def explicit_flags(parser, argv):
    """Names of the flags the user typed, found by parsing again with no defaults."""
    bare = copy.deepcopy(parser)
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return frozenset(vars(bare.parse_args(argv)))
