"""What a run keeps in --checkpoint-dir: the checkpoint (save, load, check, restore), the plain
state_dicts and flags.json (the metrics log beside them is metricslog.py's).

A checkpoint is a plain dict of tensors and numbers, loaded with weights_only=True, so reading
one never runs code from it.
"""

import io
import json
import math
import numbers
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

import augment
import imagesize
from errors import UserError
from files import atomic_write, atomic_write_bytes, remove_file
from options import MAX_SEED
from runtime import mixed_seed
from savedflags import MAX_CONFIG_BYTES, read_small_json

CHECKPOINT_NAME = "checkpoint.pt"
# written beside checkpoint.pt at each save (snapshots/: with --snapshot-every): a fresh run never
# replaces them, even without checkpoint.pt
RUN_FILES = ("best.pt", "netG.pth", "netD.pth", "netG_ema.pth", "flags.json", "snapshots/")
FORMAT = "dcgan-checkpoint-1"
# the numbers torch computes everything on (not float8 or quantized); the loaders say which a field may hold
USABLE_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool}
USABLE_DTYPES |= {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.complex64, torch.complex128}
EXPORT_FORMAT = "dcgan-generator-1"
EXPORT_CONFIG_NAME = "config.json"


@dataclass
class Progress:
    """Where a run stands: completed epochs, batches done in the current one, total steps."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_fid: float = math.inf
    rollbacks: int = 0

    @property
    def epochs_begun(self):
        """The epochs done, and the one in progress if it has begun: the epoch whose pictures a
        --kimg run that ends inside an epoch draws."""
        return self.epoch + (self.batch > 0)

    @classmethod
    def from_checkpoint(cls, state):
        saved = {"batch": 0, "best_fid": math.inf, "rollbacks": 0, **state}
        return cls(*(saved[name] for name in ("epoch", "batch", "step", "best_fid", "rollbacks")))


def latest_checkpoint(checkpoint_dir):
    return Path(checkpoint_dir) / CHECKPOINT_NAME


# ---------------------------------------------------------------- saving


def checkpoint_state(nets, progress, fixed_noise, opts, runtime, ema_statistics_estimated=False, rank_rng=None):
    """The checkpoint's dict, of copies on the CPU: the training may go on changing the originals
    while a writer thread saves it (outputs.py). ema_statistics_estimated: netG_ema holds BatchNorm
    statistics estimated for its own weights (models.estimate_batch_norm), not the trained G's
    copied ones; when not, --generate, --interpolate and --evaluate estimate them on loading.
    rank_rng: every rank's RNG state under torchrun (runtime.rank_rng_states), for an exact resume."""
    rng = {"cpu": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(runtime.device)
    if rank_rng is not None:
        rng["ranks"] = rank_rng
    return {
        "format": FORMAT,
        "netG": cpu_state(nets.G),
        "netD": cpu_state(nets.D),
        "netG_ema": cpu_state(nets.G_ema) if nets.G_ema is not None else None,
        "netG_ema_own_statistics": ema_statistics_estimated and nets.G_ema is not None,
        "optG": cpu_copy(nets.opt_G.state_dict()),  # its tensors are the optimizer's own
        "optD": cpu_copy(nets.opt_D.state_dict()),
        "scalerG": nets.scaler_G.state_dict(),
        "scalerD": nets.scaler_D.state_dict(),
        "epoch": progress.epoch,
        "batch": progress.batch,
        "step": progress.step,
        "seed": opts.seed,
        # where a mid-epoch checkpoint stands is counted in batches of batch_size x world_size
        "world_size": runtime.world_size,
        "best_fid": progress.best_fid,
        "rollbacks": progress.rollbacks,
        "fixed_noise": fixed_noise.cpu().clone(),
        "rng": rng,
        "augment": nets.augment_strength.state_dict() if nets.augment_strength is not None else None,
        "flags": opts.as_dict(),
        **({"class_names": list(opts.class_names)} if opts.num_classes else {}),
    }


def cpu_state(module):
    return cpu_copy(module.state_dict())


def cpu_copy(value):
    """value with every tensor in its dicts, lists and tuples copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: cpu_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_copy(item) for item in value)
    return value


def save_checkpoint(state, path):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def write_run_files(state, folder):
    """checkpoint_state's dict as the checkpoint, the plain state_dicts beside it and flags.json,
    each written atomically. It holds copies, so this may run on any thread."""
    folder = Path(folder)
    save_checkpoint(state, folder / CHECKPOINT_NAME)
    save_checkpoint(state["netG"], folder / "netG.pth")
    save_checkpoint(state["netD"], folder / "netD.pth")
    if state["netG_ema"] is not None:
        save_checkpoint(state["netG_ema"], folder / "netG_ema.pth")
    else:  # resumed with --ema 0: an older average beside this checkpoint would be drawn as its EMA
        remove_file(folder / "netG_ema.pth")
    # the class names too: netG.pth and netG_ema.pth of a conditional run are rebuilt from this file
    flags = {**state["flags"], **({"class_names": state["class_names"]} if "class_names" in state else {})}
    atomic_write(folder / "flags.json", lambda f: json.dump(flags, f, indent=2), mode="w")


# ---------------------------------------------------------------- loading and checking


def load_checkpoint(path):
    """Load a checkpoint of this program; never executes code from the file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(
            f"checkpoint {path} is a folder: give the checkpoint file in it (e.g. {path / CHECKPOINT_NAME})"
        )
    state = read_torch_file(path)
    required = {"netG", "flags", "epoch", "step"}
    if is_state_dict(state):
        raise UserError(
            f"{path} holds only a network's weights (no optimizer, step or flags): give the checkpoint.pt "
            "written beside it (--generate, --interpolate and --evaluate also take netG.pth and netG_ema.pth)"
        )
    if not isinstance(state, dict) or not required <= set(state):
        raise UserError(f"{path} is not a checkpoint written by gan.py (it lacks {sorted(required)})")
    if not isinstance(state["flags"], dict) or not isinstance(state["netG"], dict):
        raise UserError(f"{path} is not a checkpoint written by gan.py")
    damaged = damaged_fields(state)
    if damaged:
        raise UserError(f"checkpoint {path} is damaged: unusable {', '.join(damaged)}")
    non_finite = non_finite_weights(state)
    if non_finite:
        raise UserError(
            f"checkpoint {path} holds non-finite weights ({', '.join(non_finite)}): it cannot be used; "
            "resume an earlier checkpoint"
        )
    refuse_negative_variances(state, path)
    return state


def read_torch_file(path):
    """What torch.save wrote to path, loaded without running code from it, and holding only tensors
    that take the memory their bytes in the file say."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if is_compressed_zip(path):
        raise UserError(f"cannot read checkpoint {path}: it is not a checkpoint of this program (compressed entries)")
    try:
        with warnings.catch_warnings():
            # a plain pickle file draws torch's warning about its protocol before the error below:
            # the user gets the one line that says what is wrong
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            warnings.filterwarnings("ignore", message="Validating sparse tensor")  # refused below
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types; all mean "not ours"
        # torch's message ends in advice to load with weights_only=False: for a file of unknown
        # origin that would run its code, so it is never passed on
        raise UserError(
            f"cannot read checkpoint {path}: it is not a checkpoint of this program ({why_unreadable(error)})"
        ) from None
    return refuse_unusable_tensors(state, path)


def is_compressed_zip(path):
    """torch.save stores its zip entries: a compressed one can unpack a thousandfold."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(entry.compress_type != zipfile.ZIP_STORED for entry in archive.infolist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False  # not a zip, or a damaged one: torch.load says what is wrong with it


def refuse_unusable_tensors(state, path):
    """state, unless it holds a tensor gan.py never writes: sparse, on no real device, of a number
    torch cannot check (float8), or a view larger than its storage (bytes in the file, gigabytes checked)."""
    unusable, pending, seen = [], [("", state)], set()
    while pending:
        name, value = pending.pop()
        if isinstance(value, (dict, list, tuple)) and id(value) not in seen:  # a pickle can hold itself
            seen.add(id(value))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            pending += [(f"{name}.{key}".lstrip("."), item) for key, item in items]
        elif isinstance(value, torch.Tensor) and not usable_tensor(value):
            unusable.append(name)
    if unusable:
        raise UserError(f"checkpoint {path} is damaged: unusable tensors ({', '.join(first_few(sorted(unusable)))})")
    return state


def usable_tensor(tensor):
    if tensor.layout != torch.strided or tensor.device.type != "cpu" or tensor.dtype not in USABLE_DTYPES:
        return False
    return tensor.numel() <= tensor.untyped_storage().nbytes() // tensor.element_size()


def load_generator_file(path):
    """A checkpoint, a generator's plain state_dict that gan.py wrote beside one (netG.pth,
    netG_ema.pth) or an exported model.safetensors, as a checkpoint-like dict: the flags of a
    plain state_dict come from the flags.json beside it, a model.safetensors' from its config.json."""
    path = exported_file(path)
    if path.suffix == ".safetensors":
        return refuse_non_finite(load_exported(path), path)
    if path.is_dir() or not is_state_dict(state := read_torch_file(path)) or "flags" in state:
        return load_checkpoint(path)
    flags_path = path.parent / "flags.json"
    try:
        flags = read_small_json(flags_path, MAX_CONFIG_BYTES)
    except (OSError, ValueError) as error:
        raise UserError(
            f"{path} holds only a network's weights, and the sizes to build it come from {flags_path}, which "
            f"cannot be read ({getattr(error, 'strerror', None) or error}): give checkpoint.pt instead"
        ) from None
    if not isinstance(flags, dict):
        raise UserError(f"{flags_path} is not the flags.json gan.py writes")
    ema = path.name == "netG_ema.pth"  # its BatchNorm statistics may be the trained G's (a mid-epoch save)
    names = flags.pop("class_names", ())
    return refuse_non_finite(
        {
            "netG": state,
            "netG_ema": state if ema else None,
            "flags": flags,
            "class_names": names,
            "epoch": None,
            "plain": True,
        },
        path,
    )


def exported_file(path):
    """path, or the model.safetensors in it when it is the folder --export wrote."""
    return Path(path) / "model.safetensors" if (Path(path) / "model.safetensors").is_file() else Path(path)


def load_exported(path):
    """model.safetensors with its config.json (export.py writes both) as a checkpoint-like dict.
    safetensors holds tensors alone: reading one never runs code from it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder: give the model.safetensors file in it")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    config_path = path.parent / EXPORT_CONFIG_NAME
    try:
        weights = refuse_unusable_tensors(load_file(path, device="cpu"), path)
        config = read_small_json(config_path, MAX_CONFIG_BYTES, "an export's config.json")
    except (OSError, ValueError, SafetensorError) as error:
        raise UserError(
            f"cannot read {path} with {config_path} ({getattr(error, 'strerror', None) or error}): "
            "give the folder --export wrote, or checkpoint.pt"
        ) from None
    if (
        not isinstance(config, dict)
        or config.get("format") != EXPORT_FORMAT
        or not isinstance(config.get("flags"), dict)
    ):
        raise UserError(f"{config_path} is not the config.json that gan.py --export writes")
    unusable = [name for name in ("nz", "ngf", "channels") if not is_count(config.get(name)) or not config[name]]
    if unusable:
        raise UserError(f"{config_path} is damaged: {', '.join(unusable)} must be positive whole numbers")
    if not imagesize.is_image_size(config.get("image_size")):
        raise UserError(f"{config_path} is damaged: image_size must be {imagesize.EXPECTED}")
    if any(config.get(name) is not None and not is_count(config[name]) for name in ("epoch", "step")):
        raise UserError(f"{config_path} is damaged: epoch and step must be whole numbers from 0")
    names = config.get("class_names") or ()
    sizes = {name: config.get(name) for name in ("arch", "nz", "ngf", "image_size", "g_output")}
    flags = {**config["flags"], **sizes, "nc": config.get("channels"), "conditional": bool(names)}
    return {
        "netG": weights,
        # as exported: its BatchNorm statistics are its own; --export --raw exports the trained G
        "netG_ema": weights if config.get("generator") != "trained" else None,
        "netG_ema_own_statistics": True,
        "flags": {**flags, "num_classes": len(names) if isinstance(names, (list, tuple)) else 0},
        "class_names": names,
        "epoch": config.get("epoch"),
        "step": config.get("step"),
        "plain": True,
    }


def refuse_non_finite(state, path):
    """A generator file whose weights are not all finite (a diverged run's) draws nothing: refused."""
    non_finite = non_finite_weights(state)
    if non_finite:
        raise UserError(f"{path} holds non-finite weights ({', '.join(non_finite)}): it cannot be used")
    refuse_negative_variances(state, path)
    return state


def refuse_negative_variances(state, path):
    """BatchNorm divides by the square root of its running variance: a negative one draws NaN, every
    image black. A damaged or edited file, refused like non-finite weights."""
    negative = [
        name
        for name, value in floating_weights(state, ("netG", "netG_ema"))
        if name.endswith("running_var") and bool((value < 0).any())
    ]
    if negative:
        raise UserError(
            f"{path} holds negative BatchNorm variances ({', '.join(first_few(negative))}): it cannot be used"
        )


def is_state_dict(value):
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def why_unreadable(error):
    if isinstance(error, pickle.UnpicklingError) and "global" in str(error).lower():  # "... not an allowed global"
        return "it holds Python objects besides tensors and numbers, and loading those could run code"
    return "not a PyTorch file, or one cut short"


def non_finite_weights(state):
    """The networks (and fixed noise) holding NaN or infinite values: a diverged run's weights."""
    found = [name for name, value in floating_weights(state) if not bool(torch.isfinite(value).all())]
    noise = state.get("fixed_noise")
    if isinstance(noise, torch.Tensor) and noise.is_floating_point() and not bool(torch.isfinite(noise).all()):
        found.append("fixed_noise")
    return first_few(found)


def floating_weights(state, nets=("netG", "netD", "netG_ema")):
    """("net.name", tensor) for each floating-point tensor of the networks in state."""
    for net in nets:
        for name, value in (state.get(net) or {}).items():
            if value.is_floating_point():
                yield f"{net}.{name}", value


def first_few(names):
    """The first three names, then how many more: one line however many there are."""
    return names[:3] + ([f"{len(names) - 3} more"] if len(names) > 3 else [])


def is_count(value):
    """A whole number from 0 up, not a bool: an epoch, a step, a seed, a number of classes."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def damaged_fields(state):
    """Fields whose type gan.py cannot use: caught here rather than deep inside training."""

    def is_weights(value):
        return isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values())

    counts = ("epoch", "step", "batch", "seed", "rollbacks", "world_size")
    # torch keeps a seed, and a step that seeds the noise, in 64 bits
    damaged = [k for k in counts if k in state and not (is_count(state[k]) and state[k] <= MAX_SEED)]
    if state.get("world_size") == 0:
        damaged.append("world_size")
    damaged += [k for k in ("netG", "netD", "netG_ema") if state.get(k) is not None and not is_weights(state[k])]
    damaged += [k for k in ("optG", "optD", "rng") if k in state and not isinstance(state[k], dict)]
    damaged += [k for k in ("scalerG", "scalerD") if state.get(k) is not None and not isinstance(state[k], dict)]
    noise = state.get("fixed_noise")
    if noise is not None and not (isinstance(noise, torch.Tensor) and noise.is_floating_point()):
        damaged.append("fixed_noise")  # complex noise would lose its imaginary part, with torch's warning
    if "best_fid" in state and not isinstance(state["best_fid"], (int, float)):
        damaged.append("best_fid")
    if not augment.valid_state(state.get("augment")):
        damaged.append("augment")
    return damaged


def load_module_state(module, state_dict, what, path):
    """load_state_dict with a user-facing message when the shapes, keys or kinds of number differ."""
    own = module.state_dict()
    for name, value in state_dict.items():
        if name in own and value.is_floating_point() != own[name].is_floating_point() or value.is_complex():
            raise UserError(f"checkpoint {path} does not fit this {what}: {name} holds {value.dtype} values")
    try:
        with warnings.catch_warnings():  # a module on the meta device checks the sizes alone
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
            module.load_state_dict(state_dict)
    except (RuntimeError, KeyError, TypeError, AttributeError) as error:
        detail = " ".join(line.strip() for line in str(error).strip().splitlines()[:3])[:300]
        raise UserError(f"checkpoint {path} does not fit this {what}: {detail}") from None


def restore(state, saved, path, runtime):
    """A checkpoint's networks, optimizers, position and fixed noise, into a run's TrainState."""
    state.progress = Progress.from_checkpoint(saved)
    fixed = saved.get("fixed_noise")  # a real floating tensor or None: damaged_fields
    if fixed is not None and fixed.shape != state.fixed_noise.shape:  # every grid would change at the resume
        raise UserError(f"checkpoint {path} is damaged: unusable fixed_noise (of shape {tuple(fixed.shape)})")
    state.fixed_noise = fixed.to(state.fixed_noise.dtype) if fixed is not None else state.fixed_noise
    restore_state(state.nets, saved, runtime, path)


def restore_state(nets, state, runtime, path):
    """Load nets, optimizers, loss scalers and RNG from a checkpoint dict."""
    load_module_state(nets.G, state["netG"], "generator", path)
    load_module_state(nets.D, state.get("netD", {}), "discriminator", path)
    if nets.G_ema is not None:
        load_module_state(nets.G_ema, state.get("netG_ema") or state["netG"], "generator", path)
    for name, optimizer in (("optG", nets.opt_G), ("optD", nets.opt_D)):
        problem = optimizer_state_problem(state[name], optimizer) if name in state else None
        if problem:
            raise UserError(f"checkpoint {path} is damaged: unusable {name} ({problem})")
    try:
        nets.opt_G.load_state_dict(with_this_runs_settings(state["optG"], nets.opt_G))
        nets.opt_D.load_state_dict(with_this_runs_settings(state["optD"], nets.opt_D))
        restore_scaler(nets.scaler_G, state.get("scalerG"))
        restore_scaler(nets.scaler_D, state.get("scalerD"))
        if nets.augment_strength is not None:
            nets.augment_strength.load_state_dict(state.get("augment"))
        torch.set_rng_state(state["rng"]["cpu"])
        if runtime.device.type == "cuda":
            restore_cuda_rng(state, runtime.device)
    except (KeyError, ValueError, RuntimeError, TypeError) as error:
        raise UserError(f"checkpoint {path} is incomplete or damaged ({error.__class__.__name__}: {error})") from None


def restore_cuda_rng(state, device):
    """The CUDA generator as saved; a checkpoint written on the CPU or MPS has no CUDA state, and
    the generator seeded from --seed alone at start-up would replay the noise of step 0."""
    if "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    else:
        torch.cuda.manual_seed(mixed_seed(state.get("seed") or 0, state["step"]))


def with_this_runs_settings(saved, optimizer):
    """saved (an optimizer's state_dict) with the settings this run built (lr, betas, fused, foreach,
    capturable, ...) in its param_groups, to be loaded as it is.

    load_state_dict places Adam's step counts by the *saved* groups' fused and capturable flags: a CPU
    run's (fused None) leaves them on the CPU, where this run's fused CUDA kernels cannot read them.
    """
    groups = [
        {**{key: value for key, value in group.items() if key != "params"}, "params": saved_group["params"]}
        for group, saved_group in zip(optimizer.param_groups, saved["param_groups"])
    ]
    return {**saved, "param_groups": groups}


def optimizer_state_problem(saved, optimizer):
    """What in a saved Adam state_dict does not fit optimizer's parameters, or None.

    load_state_dict checks only the number of parameters: a moment of another shape crashes
    Adam's kernels later (a segfault on torch 2.14), and a step that is no number fails.
    """
    groups, states = saved.get("param_groups"), saved.get("state")
    if not isinstance(groups, list) or not isinstance(states, dict) or len(groups) != len(optimizer.param_groups):
        return "param_groups"
    pairs = []
    for saved_group, group in zip(groups, optimizer.param_groups):
        indices = saved_group.get("params") if isinstance(saved_group, dict) else None
        if not isinstance(indices, list) or len(indices) != len(group["params"]):
            return "param_groups"
        pairs += zip(indices, group["params"])
    if not set(states) <= {index for index, _ in pairs if isinstance(index, int)}:
        return "state of parameters it does not have"
    for index, parameter in pairs:
        entry = states.get(index) if isinstance(index, int) else None
        if entry is None:
            continue  # never updated: its moments start at zero
        if not isinstance(entry, dict):
            return f"state of parameter {index}"
        for key in ("exp_avg", "exp_avg_sq"):
            moment = entry.get(key)
            if not isinstance(moment, torch.Tensor) or moment.shape != parameter.shape:
                return f"{key} of parameter {index} is not a tensor of its shape {list(parameter.shape)}"
            if not moment.is_floating_point() or not bool(torch.isfinite(moment).all()):
                return f"{key} of parameter {index} is not finite floating point"
        if not is_step_count(entry.get("step")):
            return f"step of parameter {index} is not a count"
    return None


def is_step_count(step):
    if isinstance(step, torch.Tensor):  # Adam's kernels take float32 or float64 steps only
        float_step = step.dtype in (torch.float32, torch.float64) and step.numel() == 1
        return float_step and math.isfinite(step.item()) and step.item() >= 0
    return isinstance(step, numbers.Real) and not isinstance(step, bool) and math.isfinite(step) and step >= 0


def restore_scaler(scaler, saved):
    """A loss scaler's state, where both sides use one: a run saved in bf16 or fp32 has none,
    and an fp16 run (a V100 or T4) resuming it starts its scale afresh."""
    if scaler.is_enabled() and saved:
        numbers_ok = all(
            isinstance(saved.get(key), numbers.Real) and math.isfinite(saved[key]) and saved[key] > 0
            for key in ("scale", "growth_factor", "backoff_factor", "growth_interval")
        )
        if not numbers_ok:  # a NaN scale would skip every step: training that trains nothing
            raise ValueError(f"loss scale {saved.get('scale')!r}")
        scaler.load_state_dict(saved)
