"""One torchrun worker for tests/test_distributed.py: runs gan.py's CLI, then saves this rank's view.

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py OUT_DIR [gan.py flags]

Writes OUT_DIR/rank{R}.pt with the rank's parameters, a fingerprint of every real batch
it trained on (and the batch's labels under --conditional), the global RNG state its first step
began with and its --ada state. Run with plain python, it is rank 0 of a one-process run. With DDP_WORKER_FAIL_RANK=R
set, loading the data fails on rank R only; with DDP_WORKER_SIGINT=R:S, rank R alone gets a SIGINT
after its step S; with DDP_WORKER_STAND_IN_FEATURES=1, --fid-every scores with a tiny feature net
instead of Inception. With DDP_WORKER_OWN_DISK=1 each rank runs in a folder of its own, OUT_DIR/diskR,
as on machines without a shared filesystem; with DDP_WORKER_NAN=R:N, rank R's N-th D step reports a
NaN loss.
"""

import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stand_ins import one_pixel_loss_plot  # noqa: E402

import artifacts  # noqa: E402
import checkpoint  # noqa: E402
import errors  # noqa: E402
import gan  # noqa: E402
import steps  # noqa: E402
import utils  # noqa: E402


class ChannelMeans(nn.Module):
    """uint8 images -> their three channel means: a stand-in for Inception's features."""

    num_features = 3

    def forward(self, images_uint8):
        return images_uint8.float().mean(dim=(2, 3))


def fingerprints(real):
    """Each image of a batch as a position-weighted sum of its pixels, in float64: enough to tell
    any two images apart (a plain sum in the batch's bf16 made two random images collide)."""
    pixels = real.double().flatten(1)
    return (pixels * torch.arange(1, pixels.size(1) + 1, dtype=torch.float64)).sum(1).tolist()


def main():
    out_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ.get("RANK", "0"))
    seen = {"batches": [], "labels": [], "state": None, "first_step_rng": None}

    real_train_step = gan.train_step

    def recording_train_step(nets, real, *args, **kwargs):
        if seen["first_step_rng"] is None:
            seen["first_step_rng"] = torch.get_rng_state()
        seen["batches"].append(fingerprints(real))
        labels = args[4] if len(args) > 4 else kwargs.get("labels")  # train_step's labels: None unless --conditional
        seen["labels"].append(None if labels is None else labels.tolist())
        return real_train_step(nets, real, *args, **kwargs)

    gan.train_step = recording_train_step

    real_train = gan.train

    def recording_train(*args, **kwargs):
        seen["state"] = real_train(*args, **kwargs)
        return seen["state"]

    gan.train = recording_train
    artifacts.plot_losses = one_pixel_loss_plot

    signal_rank, _, signal_step = os.environ.get("DDP_WORKER_SIGINT", "").partition(":")
    if signal_rank == str(rank):  # a Ctrl-C that reaches this rank alone, after the given step

        def interrupted_train_step(*args, **kwargs):
            stats = recording_train_step(*args, **kwargs)
            if len(seen["batches"]) == int(signal_step):
                os.kill(os.getpid(), signal.SIGINT)
            return stats

        gan.train_step = interrupted_train_step

    if os.environ.get("DDP_WORKER_FAIL_RANK") == str(rank):
        real_load = utils.load_training_data

        def failing_load(opts, device, **kwargs):
            real_load(opts, device, **kwargs)
            raise errors.UserError(f"injected data failure on rank {rank}")

        utils.load_training_data = failing_load

    nan_rank, _, nan_step = os.environ.get("DDP_WORKER_NAN", "").partition(":")
    if nan_rank == str(rank):
        real_d_step, d_steps = steps.d_step, []

        def nan_d_step(*args, **kwargs):
            stats = real_d_step(*args, **kwargs)
            d_steps.append(1)
            if len(d_steps) == int(nan_step):
                stats["loss_d"] = torch.full_like(stats["loss_d"], float("nan"))
            return stats

        steps.d_step = nan_d_step

    if os.environ.get("DDP_WORKER_OWN_DISK") == "1":
        (out_dir / f"disk{rank}").mkdir()
        os.chdir(out_dir / f"disk{rank}")

    feature = ChannelMeans() if os.environ.get("DDP_WORKER_STAND_IN_FEATURES") == "1" else None
    exit_code = gan.main(argv, feature)
    state = seen["state"]
    if exit_code == 0 and state is not None:
        nets = state.nets
        state = {
            "batches": seen["batches"],
            "labels": seen["labels"],
            "first_step_rng": seen["first_step_rng"],
            "G": checkpoint.cpu_state(nets.G),
            "D": checkpoint.cpu_state(nets.D),
            "G_ema": checkpoint.cpu_state(nets.G_ema) if nets.G_ema is not None else None,
            "G_params": [name for name, _ in nets.G.named_parameters()],
            "D_params": [name for name, _ in nets.D.named_parameters()],
            "augment": nets.augment_strength.state_dict() if nets.augment_strength is not None else None,
        }
        torch.save(state, out_dir / f"rank{rank}.pt")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
