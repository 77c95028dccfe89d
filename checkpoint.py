"""What a run keeps in --checkpoint-dir: the checkpoint (save, load, check, restore), the plain
state_dicts, flags.json and the metrics log.

A checkpoint is a plain dict of tensors and numbers, loaded with weights_only=True, so reading
one never runs code from it.
"""

import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from utils import UserError, atomic_write, atomic_write_bytes

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_LOG_NAME = "metrics.jsonl"
FORMAT = "dcgan-checkpoint-1"


@dataclass
class Progress:
    """Where a run stands: completed epochs, batches done in the current one, total steps."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_fid: float = math.inf
    rollbacks: int = 0

    @classmethod
    def from_checkpoint(cls, state):
        return cls(
            epoch=state["epoch"],
            batch=state.get("batch", 0),
            step=state["step"],
            best_fid=state.get("best_fid", math.inf),
            rollbacks=state.get("rollbacks", 0),
        )


def latest_checkpoint(checkpoint_dir):
    return Path(checkpoint_dir) / CHECKPOINT_NAME


# ---------------------------------------------------------------- saving


def checkpoint_state(nets, progress, fixed_noise, opts, runtime):
    rng = {"cpu": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(runtime.device)
    return {
        "format": FORMAT,
        "netG": cpu_state(nets.G),
        "netD": cpu_state(nets.D),
        "netG_ema": cpu_state(nets.G_ema) if nets.G_ema is not None else None,
        "optG": nets.opt_G.state_dict(),
        "optD": nets.opt_D.state_dict(),
        "scalerG": nets.scaler_G.state_dict(),
        "scalerD": nets.scaler_D.state_dict(),
        "epoch": progress.epoch,
        "batch": progress.batch,
        "step": progress.step,
        "seed": opts.seed,
        "best_fid": progress.best_fid,
        "rollbacks": progress.rollbacks,
        "fixed_noise": fixed_noise.cpu(),
        "rng": rng,
        "flags": opts.as_dict(),
    }


def cpu_state(module):
    return {name: value.detach().cpu().clone() for name, value in module.state_dict().items()}


def save_checkpoint(state, path):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def save_run_files(nets, progress, fixed_noise, opts, runtime):
    """The checkpoint, the plain state_dicts and flags.json, each written atomically."""
    folder = Path(opts.checkpoint_dir)
    save_checkpoint(checkpoint_state(nets, progress, fixed_noise, opts, runtime), folder / CHECKPOINT_NAME)
    save_checkpoint(cpu_state(nets.G), folder / "netG.pth")
    save_checkpoint(cpu_state(nets.D), folder / "netD.pth")
    if nets.G_ema is not None:
        save_checkpoint(cpu_state(nets.G_ema), folder / "netG_ema.pth")
    atomic_write(folder / "flags.json", lambda f: json.dump(opts.as_dict(), f, indent=2), mode="w")


# ---------------------------------------------------------------- loading and checking


def load_checkpoint(path):
    """Load a checkpoint of this program; never executes code from the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types; all mean "not ours"
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else error.__class__.__name__
        raise UserError(f"cannot read checkpoint {path}: {reason}") from None
    required = {"netG", "flags", "epoch", "step"}
    if not isinstance(state, dict) or not required <= set(state):
        raise UserError(f"{path} is not a checkpoint written by gan.py (it lacks {sorted(required)})")
    if not isinstance(state["flags"], dict) or not isinstance(state["netG"], dict):
        raise UserError(f"{path} is not a checkpoint written by gan.py")
    damaged = damaged_fields(state)
    if damaged:
        raise UserError(f"checkpoint {path} is damaged: unusable {', '.join(damaged)}")
    return state


def damaged_fields(state):
    """Fields whose type gan.py cannot use: caught here rather than deep inside training."""

    def is_count(value):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def is_weights(value):
        return isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values())

    damaged = [k for k in ("epoch", "step", "batch", "seed", "rollbacks") if k in state and not is_count(state[k])]
    damaged += [k for k in ("netG", "netD", "netG_ema") if state.get(k) is not None and not is_weights(state[k])]
    damaged += [k for k in ("optG", "optD", "rng") if k in state and not isinstance(state[k], dict)]
    damaged += [k for k in ("scalerG", "scalerD") if state.get(k) is not None and not isinstance(state[k], dict)]
    if "best_fid" in state and not isinstance(state["best_fid"], (int, float)):
        damaged.append("best_fid")
    return damaged


def load_module_state(module, state_dict, what, path):
    """load_state_dict with a user-facing message when the shapes or keys differ."""
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, KeyError, TypeError, AttributeError) as error:
        first = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:300]
        raise UserError(f"checkpoint {path} does not fit this {what}: {detail}") from None


def restore_state(nets, state, runtime, path):
    """Load nets, optimizers, loss scalers and RNG from a checkpoint dict."""
    load_module_state(nets.G, state["netG"], "generator", path)
    load_module_state(nets.D, state.get("netD", {}), "discriminator", path)
    if nets.G_ema is not None:
        load_module_state(nets.G_ema, state.get("netG_ema") or state["netG"], "generator", path)
    # load_state_dict also restores the saved lr and betas; the ones of this run's flags win
    hyper = [[{k: g[k] for k in ("lr", "betas")} for g in opt.param_groups] for opt in (nets.opt_G, nets.opt_D)]
    try:
        nets.opt_G.load_state_dict(state["optG"])
        nets.opt_D.load_state_dict(state["optD"])
        for opt, groups in zip((nets.opt_G, nets.opt_D), hyper):
            for group, values in zip(opt.param_groups, groups):
                group.update(values)
        restore_scaler(nets.scaler_G, state.get("scalerG"))
        restore_scaler(nets.scaler_D, state.get("scalerD"))
        torch.set_rng_state(state["rng"]["cpu"])
        if runtime.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], runtime.device)
    except (KeyError, ValueError, RuntimeError, TypeError) as error:
        raise UserError(f"checkpoint {path} is incomplete or damaged ({error.__class__.__name__}: {error})") from None


def restore_scaler(scaler, saved):
    """A loss scaler's state, where both sides use one: a run saved in bf16 or fp32 has none,
    and an fp16 run (a V100 or T4) resuming it starts its scale afresh."""
    if scaler.is_enabled() and saved:
        scaler.load_state_dict(saved)


# ---------------------------------------------------------------- the metrics log


def read_metrics_log(path):
    """The log's rows as dicts; lines torn by a crash or damaged by hand are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows, damaged = parse_metrics(path.read_bytes().decode("utf-8", errors="replace"))
    if damaged:
        warnings.warn(f"skipped {damaged} damaged lines of {path}", stacklevel=2)
    return rows


def parse_metrics(text):
    """(rows, number of damaged lines); the last line, if torn by a crash, is not counted."""
    rows, damaged = [], 0
    lines = text.splitlines()
    for index, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and is_step(row.get("step", 0)):
            rows.append(row)
        elif line.strip() and not (index == len(lines) - 1 and not text.endswith("\n")):
            damaged += 1
    return rows, damaged


def is_step(value):
    return isinstance(value, int) and not isinstance(value, bool)


def append_metrics(path, rows):
    """Append rows to the JSONL log. Appending is safe: a torn last line is skipped on read."""
    if not rows:
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as file:
            file.write("".join(json.dumps(row) + "\n" for row in rows))
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None


def truncate_metrics(path, last_step):
    """The log's rows up to last_step; later ones (logged after the checkpoint a run starts
    from, or by a run killed before its first checkpoint) are dropped, so no step appears twice."""
    text = Path(path).read_bytes().decode("utf-8", errors="replace") if Path(path).is_file() else ""
    rows, damaged = parse_metrics(text)
    if damaged:
        warnings.warn(f"skipped {damaged} damaged lines of {path}", stacklevel=2)
    kept = [row for row in rows if row.get("step", 0) <= last_step]
    # a line torn by a crash mid-append would swallow the next row appended after it
    torn = bool(text) and not text.endswith("\n")
    if len(kept) != len(rows) or torn or damaged:
        atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept)), mode="w")
    return kept
