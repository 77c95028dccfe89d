"""Whether a training run's G and D learned, read from its checkpoint: each made one Adam update
per step (less the steps fp16's loss scaling skipped) and moved its weights away from those the
run began with, which are rebuilt here as the run built them from its seed. Zeroed gradients
leave the weights where they were; a skipped step leaves Adam's count short.
"""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import options  # noqa: E402
import runtime  # noqa: E402
import startup  # noqa: E402
import steps  # noqa: E402

# A network that learned moved its weights by more than this share of their norm: one Adam step
# moves each weight by about the learning rate, a share a hundred times this of the tiny nets' weights
LEARNED_SHARE = 1e-4
INITIAL_LOSS_SCALE = 2.0**16  # GradScaler's: each step it skips halves the scale


def report(state, steps_per_network):
    """(a line on how G and D learned, the first problem found or None) of a checkpoint's state."""
    began = initial_weights(state["flags"])
    parts = []
    for net in ("G", "D"):
        updates = adam_updates(state[f"opt{net}"])
        skipped = loss_scaling_skips(state.get(f"scaler{net}"))
        expected = steps_per_network - skipped
        moved = weights_moved(state[f"net{net}"], began[net])
        if updates != expected:
            return None, f"{net} made {updates} Adam updates in {steps_per_network} steps, not {expected}"
        if not moved > LEARNED_SHARE:
            return None, f"{net} did not learn: its weights moved {moved:.1e} of their norm"
        skips = f" ({skipped} skipped by fp16 loss scaling)" if skipped else ""
        parts.append(f"{net} {updates} updates{skips}, weights moved {moved:.2%}")
    return "; ".join(parts), None


def initial_weights(flags):
    """{"G": ..., "D": ...}: the parameters a run with these flags began with (start_state seeds
    the global RNG with the run's seed and builds the nets on the CPU before moving them)."""
    opts = options.Options(startup.upgraded_flags(flags))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts.seed)
        nets = steps.build_nets(opts, runtime.Runtime(torch.device("cpu")))
    return {name: dict(getattr(nets, name).named_parameters()) for name in ("G", "D")}


def weights_moved(saved, began):
    """How far the saved parameters are from those the run began with, as a share of their norm."""
    change = sum((saved[name].float() - value.detach().float()).square().sum() for name, value in began.items())
    norm = sum(value.detach().float().square().sum() for value in began.values())
    return float((change / norm).sqrt())


def adam_updates(optimizer_state):
    """The updates an Adam made, from its saved step count (0 if it never stepped)."""
    entries = optimizer_state["state"]
    return int(next(iter(entries.values()))["step"]) if entries else 0


def loss_scaling_skips(scaler_state):
    """The optimizer steps fp16's GradScaler skipped (inf gradients), from how often it halved its
    scale; 0 without loss scaling. Holds while the scale never grew (2,000 steps without a skip)."""
    if not scaler_state or "scale" not in scaler_state:
        return 0
    return max(0, round(math.log2(INITIAL_LOSS_SCALE / scaler_state["scale"])))
