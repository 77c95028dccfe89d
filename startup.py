"""Whether a training run may start, and from where: the options resolved against an earlier run's
files or the checkpoint it resumes (older checkpoints upgraded first), the memory it needs, the
state it starts from (networks, position, RNG), and the command that resumes it.
"""

import contextlib
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import artifacts
import checkpoint
import metricslog
import snapshots
from checkpoint import Progress, is_count, latest_checkpoint
from classnames import checkpoint_class_names, refuse_other_classes
from errors import UserError, count_text, size_text
from files import refuse_if_in_use
from foldercache import cache_root
from metrics import SCORING_BYTES_PER_IMAGE
from models import build_discriminator, build_generator
from modes import ARCHITECTURE_FLAGS, refuse_flags_of_other_datasets
from options import MAX_SEED, build_parser, check_recipe
from runlength import length_change
from runtime import broadcast_object, mixed_seed, random_seed
from savedflags import LENGTH_FLAGS, NOT_RESUMED_FLAGS, PATH_FLAGS, refuse_damaged_flag
from steps import Nets, build_nets

# What the runs saved before a flag existed trained with: an older checkpoint resumes, and draws,
# as it trained, not with the new flag's default.
TRAINED_BEFORE_THE_FLAG = {
    "arch": "dcgan",
    "conditional": False,
    "spectral_norm": False,
    "nc": 3,
    "class_loss": 0.0,
    "g_output": "tanh",
    "r1_every": 1,  # R1 on every D step, before lazy regularisation
    "mirror": False,
    "ada": False,
}
SIZE_FLAGS = ("nz", "ngf", "ndf", "batch_size", "image_size")
# a conditional G has a row of weights per class: a file claiming more is refused before it is built
MAX_CLASSES = 10_000


def upgraded(state, path):
    """A checkpoint's dict (or load_generator_file's, from path) as today's program reads it: the
    one place that knows what older versions left out."""
    flags = upgraded_flags(state["flags"])
    refuse_unusable_flags(flags, path)
    names = state.get("class_names")
    if not names and flags.get("conditional") and isinstance(flags.get("num_classes"), int):
        # a conditional run's flags.json from before it kept the class names: the classes by index
        names = [str(index) for index in range(flags["num_classes"])]
    # augment: --ada's strength; None (a run from before --ada, or without it) starts p at 0
    return {
        **state,
        "flags": flags,
        "class_names": names or (),
        "world_size": state.get("world_size", 1),
        "augment": state.get("augment"),
    }


def refuse_unusable_flags(flags, path):
    """A loaded file's flags that nothing could draw or export with, refused in one line: the
    channels, classes and seed it would build and draw with, and any value an export could not
    write into its config.json (anything but plain numbers, text and on/off)."""
    unusable = [str(name) for name, value in flags.items() if not isinstance(name, str) or not is_plain(value)]
    unusable += [] if flags.get("nc") in (1, 3) else ["nc"]
    classes = flags.get("num_classes", 0)
    unusable += [] if is_count(classes) and classes <= MAX_CLASSES else ["num_classes"]
    seed = flags.get("seed")
    unusable += [] if seed is None or is_count(seed) and seed <= MAX_SEED else ["seed"]
    if unusable:
        shown = ", ".join(dict.fromkeys(unusable[:3]))
        raise UserError(f"checkpoint {path} is damaged: unusable flags ({shown})")


def is_plain(value):
    return value is None or type(value) in (bool, int, float, str)


def upgraded_flags(saved_flags):
    return {**TRAINED_BEFORE_THE_FLAG, **saved_flags}


def load_upgraded(path):
    return upgraded(checkpoint.load_checkpoint(path), path)


# ---------------------------------------------------------------- may the run start?


def resolve_training_options(opts, explicit, runtime):
    """The run's options, read-only from here on, and the checkpoint it resumes as (state, path),
    or None for a fresh run; a UserError when the run may not start."""
    if opts.resume is None:
        refuse_earlier_run(opts, runtime)
        # under torchrun every rank must train on rank 0's seed, or their shards would overlap
        seed = opts.seed if opts.seed is not None else broadcast_object(random_seed(), runtime)
        opts, resumed = opts.replace(seed=seed), None
    else:
        opts, resumed = resumed_options(opts, explicit, runtime)
    refuse_flags_of_other_datasets(opts.dataset, explicit)
    if "keep_snapshots" in explicit and not opts.snapshot_every:
        raise UserError("--keep-snapshots K applies with --snapshot-every STEPS (the run keeps no snapshots)")
    refuse_what_torchrun_cannot_train(opts, runtime)
    if "class_loss" in explicit and not opts.conditional:  # it would weigh a loss on classes the run has not
        raise UserError("--class-loss applies to --conditional training (the run has no classes)")
    if "r1_every" in explicit and not opts.r1:  # it would space out a penalty the run does not take
        raise UserError("--r1-every applies with --r1 (the penalty's weight), which is 0 in this run")
    if "ada_target" in explicit and not opts.ada:  # it would tune a strength the run has not
        raise UserError("--ada-target applies to --ada training (the run's augmentation is not adaptive)")
    problem = training_memory_problem(opts, runtime.device, runtime.amp_dtype is not None)
    if problem:
        raise UserError(problem)
    if opts.fid_every and runtime.is_main:  # rank 0 alone scores
        refuse_scoring_beyond_memory(opts.eval_samples, runtime.device, f"--eval-samples {opts.eval_samples}")
    if opts.dataset == "folder":
        refuse_outputs_inside_the_data(opts)
    return opts, resumed


def refuse_outputs_inside_the_data(opts):
    """The data folder is searched recursively: the next start would train on this run's grids, and
    a --conditional run would take the checkpoint or cache folder for a class. Nothing is written there."""
    root = Path(opts.dataroot).resolve()
    cache = ("--cache-dir", opts.cache_dir) if opts.cache_dir else ("the decoded-image cache", cache_root())
    for what, folder in (("--image-dir", opts.image_dir), ("--checkpoint-dir", opts.checkpoint_dir), cache):
        if Path(folder).resolve().is_relative_to(root):
            raise UserError(f"{what} {folder} is inside --dataroot {opts.dataroot}: give one outside it")


def refuse_what_torchrun_cannot_train(opts, runtime):
    """--sync-bn's combinations that fail only across processes, refused before the data is read.

    SyncBatchNorm runs on CUDA alone, and its backward has no derivative of its own: R1's penalty,
    a gradient differentiated again, cannot pass through D's BatchNorm layers once they synchronise.
    """
    if not (runtime.distributed and opts.sync_bn):
        return  # in one process --sync-bn has nothing to synchronise
    if runtime.device.type != "cuda":
        raise UserError(f"--sync-bn needs CUDA GPUs; it does not run on {runtime.device.type}")
    if opts.r1 and not opts.spectral_norm:
        raise UserError(
            "--r1 with --sync-bn: R1 differentiates D's gradient again, which SyncBatchNorm cannot; add "
            "--spectral-norm (a D without BatchNorm), drop --sync-bn, or use --r1 0"
        )


def refuse_earlier_run(opts, runtime):
    """A fresh run never writes over the files of an earlier one; the files of a run still going
    are said to be in use by its process, not an earlier run's."""
    if runtime.is_main:  # the ranks that lock nothing do not probe: a probe could meet rank 0's lock
        for folder, flag in ((opts.checkpoint_dir, "--checkpoint-dir"), (opts.image_dir, "--image-dir")):
            refuse_if_in_use(folder, flag)
    earlier = latest_checkpoint(opts.checkpoint_dir)
    if earlier.is_file():
        # a fresh run would overwrite that run's checkpoint and mix its metrics log
        raise UserError(
            f"{earlier} holds an earlier run: continue it with --resume, "
            "or train into another --checkpoint-dir (or delete that folder)"
        )
    files = earlier_run_files(opts.checkpoint_dir)
    if files:  # its checkpoint.pt is gone, but a fresh run would replace these
        raise UserError(
            f"{opts.checkpoint_dir} holds an earlier run's files ({', '.join(files)}): "
            "train into another --checkpoint-dir, or move them away first"
        )
    # pictures beside the log of a run that never saved a checkpoint are that run's: replaced
    orphan = metricslog.orphan_log(opts.checkpoint_dir)
    pictures = earlier_run_pictures(opts.image_dir)
    if pictures and not orphan:
        # a fresh run would overwrite some of that run's grids and leave the others beside its own
        raise UserError(
            f"{opts.image_dir} holds an earlier run's pictures ({', '.join(pictures)}): "
            "train into another --image-dir, or move them away first"
        )


def earlier_run_files(checkpoint_dir):
    """Names of the files an earlier run left in checkpoint_dir beside (or instead of) its checkpoint.pt."""
    return [name for name in checkpoint.RUN_FILES if (Path(checkpoint_dir) / name).exists()]


def earlier_run_pictures(image_dir):
    """Names of an earlier run's pictures in image_dir (the first few, then how many more)."""
    folder = Path(image_dir)
    if not folder.is_dir():
        return []
    pictures = (path for pattern in artifacts.RUN_PICTURES for path in folder.glob(pattern))
    found = sorted({path.name for path in pictures if not artifacts.is_empty_folder(path)})
    return found[:3] + ([f"{len(found) - 3} more"] if len(found) > 3 else [])


def resumed_options(opts, explicit, runtime):
    path = resume_path(opts)
    if not opts.resume and not path.is_file():
        raise UserError(f"--resume: no checkpoint in {opts.checkpoint_dir}/ (give its path: --resume PATH)")
    if checkpoint.exported_file(path).suffix == ".safetensors":
        raise UserError(
            f"{path} is an export, the generator alone: resume the run's checkpoint.pt (--generate --checkpoint "
            f"{path} draws from it)"
        )
    state = load_upgraded(path)
    refuse_resuming_a_snapshot(state, path)
    opts, changes = merge_resume_flags(opts, explicit, state["flags"], path)
    for change in changes:
        runtime.say(f"resume: changed {change}")
    if "checkpoint_dir" not in explicit:  # the run goes on beside the checkpoint it resumes
        opts = opts.replace(checkpoint_dir=str(path.parent))
    elif latest_checkpoint(opts.checkpoint_dir).is_file() and not latest_checkpoint(opts.checkpoint_dir).samefile(path):
        raise UserError(
            f"{latest_checkpoint(opts.checkpoint_dir)} holds another run: resuming {path} there would replace it; "
            "give another --checkpoint-dir"
        )
    # the classes it trained on: a folder with others is refused before it is decoded (utils.py)
    classes = checkpoint_class_names(state, path) if opts.conditional else ()
    return opts.replace(seed=state.get("seed", opts.seed), class_names=classes), (state, path)


def refuse_resuming_a_snapshot(state, path):
    """A snapshot holds the generator alone: training cannot go on from it."""
    if snapshots.is_snapshot(state):
        raise UserError(
            f"{path} is a snapshot (the generator alone, at step {state['step']}), not a point to resume from: "
            f"resume the run's checkpoint.pt, or draw from this step with --generate --checkpoint {path}"
        )


def resume_path(opts):
    """The checkpoint --resume names, or the latest one in --checkpoint-dir."""
    return Path(opts.resume) if opts.resume else Path(opts.checkpoint_dir) / "checkpoint.pt"


def merge_resume_flags(opts, explicit, saved_flags, path):
    """Options for a resumed run: flags not typed now come from the checkpoint.

    Returns (options, the changes to report). Typed architecture changes are refused.
    """
    saved_flags = upgraded_flags(saved_flags)
    refuse_architecture_change(opts, explicit, saved_flags, f"cannot resume {path} with a different architecture")
    if "seed" in explicit and saved_flags.get("seed") not in (None, opts.seed):
        # the run goes on from its saved RNG state and data order: another seed would change nothing but the report
        raise UserError(
            f"cannot resume {path} with --seed {opts.seed} (checkpoint: {saved_flags['seed']}); "
            "a run keeps its seed: start a fresh run for another one"
        )
    refuse_saved_folders(saved_flags, opts, explicit, path, ("dataroot", "image_dir"))
    changed, merged, parser = [], {}, build_parser()
    for name, saved in saved_flags.items():
        if name in PATH_FLAGS and name in explicit and name != "checkpoint_dir" and getattr(opts, name) != saved:
            changed.append(f"--{name.replace('_', '-')} {saved} -> {getattr(opts, name)}")
        if not hasattr(opts, name) or name in NOT_RESUMED_FLAGS:
            continue
        if name in explicit:
            if getattr(opts, name) != saved and name not in LENGTH_FLAGS:
                changed.append(f"--{name.replace('_', '-')} {saved} -> {getattr(opts, name)}")
        elif name != "seed":
            refuse_damaged_flag(parser, name, saved, path)
            merged[name] = saved
    if explicit & set(LENGTH_FLAGS):  # the length typed now, in epochs or images, replaces the saved one
        merged.pop("kimg", None)
    resolved = opts.replace(**merged)
    check_recipe(resolved._values)
    change = length_change(saved_flags, resolved._values)
    return resolved, changed + ([change] if change else [])


def refuse_architecture_change(opts, explicit, saved_flags, what):
    """Typed flags that shape the networks must match the checkpoint's: it only fits, or only draws
    as it trained, with its own."""
    refused = [
        f"--{name.replace('_', '-')} {getattr(opts, name)} (checkpoint: {saved_flags.get(name)})"
        for name in ARCHITECTURE_FLAGS
        if name in explicit and name in saved_flags and getattr(opts, name) != saved_flags[name]
    ]
    if refused:
        raise UserError(f"{what}: {', '.join(refused)}{recipe_hint(opts, explicit)}")


def recipe_hint(opts, explicit):
    """For a refusal of architecture flags: a typed --recipe may have set them, not the user."""
    if "recipe" not in explicit:
        return ""
    return f"; --recipe {opts.recipe} sets some of these: type the checkpoint's values after it to keep them"


def refuse_saved_folders(saved_flags, opts, explicit, path, names):
    """A checkpoint trained with another folder than this run's default: the user must type it
    again (or another one), as the checkpoint never chooses where files are read or written."""
    dataset = opts.dataset if "dataset" in explicit else saved_flags.get("dataset", opts.dataset)
    for name in names:
        saved = saved_flags.get(name)
        if name in explicit or not isinstance(saved, str) or saved == getattr(opts, name):
            continue
        if name == "dataroot" and dataset == "fake":
            continue  # fake data reads no folder
        flag = f"--{name.replace('_', '-')}"
        raise UserError(
            f"{path} was trained with {flag} {saved}: a checkpoint never chooses folders, "
            f"so type {flag} again (that one, or another)"
        )


# ---------------------------------------------------------------- sizes that cannot fit


def training_memory_problem(opts, device, half_precision=False):
    """Why the networks of these flags cannot train on device (naming the flag to lower), or None.

    A lower bound, so that no run that fits is refused: fp32 weights, gradients, Adam's two
    moments and G's average, plus each layer's output once for a batch; free memory as the
    OS (RAM and swap) or CUDA reports it (unknown on MPS: not checked).
    """
    available = free_memory_bytes(device)
    if available is None:
        return None
    flags = opts.as_dict()
    needed = training_bytes(flags, half_precision)
    if needed is not None and needed <= available:
        return None
    defaults = build_parser()
    # the flag to name: the one whose default would shrink the need the most
    lowered = {name: training_bytes({**flags, name: defaults.get_default(name)}, half_precision) for name in SIZE_FLAGS}
    flag = min(SIZE_FLAGS, key=lambda name: math.inf if lowered[name] is None else lowered[name])
    need_text = f"at least {size_text(needed)}" if needed is not None else "more than 8 EiB"
    return (
        f"--{flag.replace('_', '-')} {getattr(opts, flag)} is too large: training would need {need_text} of memory, "
        f"and {device} has {size_text(available)} free"
    )


def refuse_scoring_beyond_memory(images, device, flag):
    """Scoring keeps the features of every image it scores: more than the device can hold is refused
    before the minutes of drawing them, not ended by the system at the end (flag: what chose the count)."""
    needed, available = images * SCORING_BYTES_PER_IMAGE, free_memory_bytes(device)
    if available is not None and needed > available:
        raise UserError(
            f"{flag}: the Inception features of {count_text(images, 'image')} need about {size_text(needed)} of "
            f"memory, and {device} has {size_text(available)} free: score fewer images"
        )


def training_bytes(flags, half_precision):
    from models import count_values

    counts = count_values(flags["arch"], flags["nz"], flags["ngf"], flags["ndf"], flags["image_size"])
    if counts is None:
        return None
    parameters, outputs_per_image = counts
    weights = 4 * parameters * (4 + (1 if flags["ema"] > 0 else 0))  # weights, gradients, 2 Adam moments, EMA
    return weights + (2 if half_precision else 4) * outputs_per_image * flags["batch_size"]


def free_memory_bytes(device):
    from folders import available_ram_bytes

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_ram_bytes(with_swap=True) if device.type == "cpu" else None


# ---------------------------------------------------------------- the data a resumed run reads


def with_data_traits(opts, data, resumed):
    """The options completed by what the data says: its classes (under --conditional) and channels,
    which must be the checkpoint's."""
    names = data.class_names or ()
    if resumed is not None:
        saved, path = resumed
        if saved["flags"]["nc"] != data.channels:
            raise UserError(
                f"{path} was trained on {saved['flags']['nc']}-channel images; the data now gives "
                f"{data.channels} (--channels {saved['flags']['nc']} trains on them as it did)"
            )
        refuse_other_classes(checkpoint_class_names(saved, path), names, path, "the data now")
    return opts.replace(num_classes=len(names), class_names=names, nc=data.channels)


# ---------------------------------------------------------------- the state it starts from


@dataclass
class TrainState:
    """What a run carries from step to step, and what a checkpoint saves."""

    nets: Nets
    progress: Progress
    fixed_noise: torch.Tensor


def start_state(opts, runtime, resumed):
    """Networks seeded from --seed (every rank alike), then the resumed checkpoint if any."""
    if resumed is not None:
        refuse_networks_that_do_not_fit(opts, *resumed)
    torch.manual_seed(opts.seed)
    nets = build_nets(opts, runtime)
    fixed_noise = torch.randn(64, opts.nz, 1, 1, generator=torch.Generator().manual_seed(opts.seed))
    state = TrainState(nets, Progress(), fixed_noise)
    if resumed is None:
        # each rank draws its own noise for the steps
        torch.manual_seed(mixed_seed(opts.seed, state.progress.step, runtime.rank))
        if runtime.is_main:
            keep_orphan_log(opts, runtime)
    else:
        checkpoint.restore(state, *resumed, runtime)
        carry_position(state.progress, *resumed, opts, runtime)
        done = count_text(state.progress.epoch, "epoch")
        runtime.say(f"resuming {resumed[1]}: {done} done, step {state.progress.step}")
        if runtime.distributed:
            restore_rank_rng(resumed[0], opts, runtime, state.progress.step)
    state.fixed_noise = state.fixed_noise.to(runtime.device)
    return state


def refuse_networks_that_do_not_fit(opts, saved, path):
    """The checkpoint's networks held against those its flags build, on the meta device: sizes its
    weights do not have (nz 2,000,000) are refused before the networks take gigabytes."""
    sizes = (opts.arch, opts.nz, opts.ngf, opts.image_size, opts.nc, opts.num_classes, opts.g_output)
    G = built_from_flags(path, build_generator, *sizes, meta=True)
    sizes = (opts.arch, opts.ndf, opts.image_size, opts.spectral_norm, opts.nc, opts.num_classes)
    D = built_from_flags(path, build_discriminator, *sizes, meta=True)
    checkpoint.load_module_state(G, saved["netG"], "generator", path)
    checkpoint.load_module_state(D, saved.get("netD", {}), "discriminator", path)


def built_from_flags(path, build, *sizes, meta=False):
    """build(*sizes), a network of a loaded file's flags; on the meta device it allocates nothing.
    Sizes no network can have are one line."""
    try:
        with torch.device("meta") if meta else contextlib.nullcontext():
            return build(*sizes)
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as error:  # a negative size, 2**64
        raise UserError(f"checkpoint {path} has unusable flags ({str(error).splitlines()[0][:200]})") from None


def carry_position(progress, saved, path, opts, runtime):
    """A mid-epoch checkpoint's batch index counted in this run's global batch (batch size x processes).

    Another number of processes (or --batch-size) gives batches of another size: the images the
    epoch has done are carried over when they make whole batches of the new size, else refused.
    """
    saved_processes = saved.get("world_size", 1)
    saved_global = saved["flags"].get("batch_size", opts.batch_size) * saved_processes
    global_batch = opts.batch_size * runtime.world_size
    if saved_processes != runtime.world_size:
        runtime.say(
            f"resume: changed processes {saved_processes} -> {runtime.world_size} "
            f"(global batch {saved_global} -> {global_batch}; the noise each process draws starts afresh)",
        )
    if progress.batch == 0 or saved_global == global_batch:
        return
    images_done = progress.batch * saved_global
    if images_done % global_batch:
        raise UserError(
            f"{path} stopped {images_done} images into epoch {progress.epoch + 1}, which is no whole number of "
            f"this run's batches of {global_batch} ({opts.batch_size} x {runtime.world_size} processes): resume it "
            f"with {saved_processes} process(es) and --batch-size {saved_global // saved_processes}"
        )
    progress.batch = images_done // global_batch


def restore_rank_rng(saved, opts, runtime, step):
    """This rank's own RNG state from the checkpoint; fresh noise when it has none for this rank
    (an older checkpoint, or one saved by another number of processes)."""
    ranks = saved["rng"].get("ranks")
    if not isinstance(ranks, list) or len(ranks) != runtime.world_size:
        torch.manual_seed(mixed_seed(opts.seed, step, runtime.rank))
        return
    try:
        torch.set_rng_state(ranks[runtime.rank]["cpu"])
        if runtime.device.type == "cuda" and "cuda" in ranks[runtime.rank]:
            torch.cuda.set_rng_state(ranks[runtime.rank]["cuda"], runtime.device)
    except (KeyError, TypeError, RuntimeError) as error:
        raise UserError(f"checkpoint is damaged: unusable RNG state of rank {runtime.rank} ({error})") from None


def keep_orphan_log(opts, runtime):
    """A fresh run's log starts empty; the rows of a run that saved no checkpoint here (killed in
    its first epoch, or stopped by a full disk) are kept beside it, under another name."""
    kept = metricslog.set_aside_orphan_log(opts.checkpoint_dir)
    if kept is not None:
        runtime.say(f"kept the log of a run that saved no checkpoint as {kept}")


# ---------------------------------------------------------------- the way back


def resume_command(opts, launcher=("python",)):
    """The command that resumes this run, with the folders a checkpoint never chooses.

    launcher: the words before gan.py (torchrun's, with its process counts, for a run under torchrun).
    """
    parser = build_parser()
    words = [*launcher, script_as_run(), "--resume", "--checkpoint-dir", opts.checkpoint_dir]
    for name in ("image_dir", "dataroot"):
        if getattr(opts, name) != parser.get_default(name) and not (name == "dataroot" and opts.dataset == "fake"):
            words += [f"--{name.replace('_', '-')}", getattr(opts, name)]
    if opts.cache_dir is not None:  # not needed to resume, but without it the folder is decoded again
        words += ["--cache-dir", opts.cache_dir]
    return shlex.join(words)


def generate_command(opts, count=64):
    """The command that draws count images from the run's latest checkpoint, with its folders
    where they are not the defaults (one process: --generate runs without torchrun)."""
    parser = build_parser()
    words = ["python", script_as_run(), "--generate", str(count)]
    for name in ("checkpoint_dir", "image_dir"):
        if getattr(opts, name) != parser.get_default(name):
            words += [f"--{name.replace('_', '-')}", getattr(opts, name)]
    return shlex.join(words)


def script_as_run():
    """gan.py's path as the user typed it (python ~/dcgan/gan.py), so that the printed command works
    in the folder they typed it in; plain gan.py when run some other way (tests, an import)."""
    script = sys.argv[0] if sys.argv else ""
    return script if Path(script).name == "gan.py" else "gan.py"
