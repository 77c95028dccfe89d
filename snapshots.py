"""Snapshots: the generator alone every --snapshot-every steps, in <checkpoint-dir>/snapshots/, to go
back to an earlier step's samples (--generate, --interpolate, --evaluate, --export --checkpoint PATH)
after the run has moved on. Not a point to resume from: no discriminator, optimizers or RNG.

A snapshot is a checkpoint-shaped dict that the checkpoint loaders read as they read checkpoint.pt
(weights_only, finite weights, class names checked), with the drawn generator in both netG and
netG_ema (one copy on disk: torch.save keeps a tensor shared by two keys once).
"""

import re
from pathlib import Path

from checkpoint import cpu_state, save_checkpoint
from files import WriteError

SNAPSHOT_FORMAT = "dcgan-snapshot-1"
FOLDER_NAME = "snapshots"
NAME = re.compile(r"snapshot-(\d+)\.pt")


def snapshot_path(checkpoint_dir, step):
    """The snapshot of step: zero-padded, so that a folder listing sorts them by step."""
    return Path(checkpoint_dir) / FOLDER_NAME / f"snapshot-{step:07d}.pt"


def snapshot_due(step, opts):
    return bool(opts.snapshot_every) and step % opts.snapshot_every == 0


def snapshot_state(nets, progress, opts):
    """The snapshot's dict, of copies on the CPU (a writer thread saves it while training goes on).

    Its BatchNorm statistics are as a checkpoint saved between epoch ends has them, the trained G's
    copied into the EMA (netG_ema_own_statistics False): whatever loads it estimates the EMA's own,
    as from that checkpoint, so that the step's samples are the same from either file.
    """
    weights = cpu_state(nets.for_samples)
    ema = nets.G_ema is not None
    return {
        "format": SNAPSHOT_FORMAT,
        "netG": weights,
        "netG_ema": weights if ema else None,
        "netG_ema_own_statistics": False,
        "epoch": progress.epoch,
        "batch": progress.batch,
        "step": progress.step,
        "seed": opts.seed,
        "flags": opts.as_dict(),
        **({"class_names": list(opts.class_names)} if opts.num_classes else {}),
    }


def is_snapshot(state):
    return isinstance(state, dict) and state.get("format") == SNAPSHOT_FORMAT


def write_snapshot(state, checkpoint_dir, keep=None):
    """The snapshot, written atomically; then the oldest beyond the keep newest are deleted."""
    save_checkpoint(state, snapshot_path(checkpoint_dir, state["step"]))
    if keep is None:
        return
    for path in snapshot_files(checkpoint_dir)[:-keep]:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as error:
            raise WriteError(path, error) from None


def snapshot_files(checkpoint_dir):
    """The snapshots in checkpoint_dir/snapshots/, oldest first (by step, whatever the padding)."""
    folder = Path(checkpoint_dir) / FOLDER_NAME
    if not folder.is_dir():
        return []
    found = [(int(match[1]), path) for path in folder.iterdir() if (match := NAME.fullmatch(path.name))]
    return [path for _, path in sorted(found)]
