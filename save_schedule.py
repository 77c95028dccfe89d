"""Which epoch ends write the checkpoint, the loss plot and the GIF frames. At GPU speed a CIFAR-10
epoch takes about a second, and writing all of them after each would take a large share of the run:
every epoch end draws its grid, and the rest waits until SAVE_SECONDS of wall time have passed.
"""

import time

import torch

# Wall seconds between the epoch ends that write the checkpoint, the loss plot and the GIF frames
# when epochs are shorter: what a crash (or an --on-nan rollback) can cost at most, beyond the
# epoch in progress. --save-every adds checkpoints by steps.
SAVE_SECONDS = 60.0


class SaveSchedule:
    """Decides, at each epoch's end, whether it writes everything or its grid alone.

    Everything is written at the first epoch end of a run (a rollback then has a checkpoint to
    go back to, and the plots appear at once), at the last, on a stop, at a --save-every step, and
    otherwise once SAVE_SECONDS have passed on rank 0's clock since the last such epoch end.
    """

    def __init__(self, opts, runtime, length):
        self.opts, self.runtime, self.last_epoch = opts, runtime, length.last_epoch
        self.saved_at = None  # rank 0's clock at the last epoch end that wrote everything

    def agree(self, progress, stop_requested):
        """(stopping, save_all) for the epoch ending now (progress has not counted it yet), the same
        on every rank: whether any rank was asked to stop, and whether this end writes everything.
        One collective under torchrun, at the point where the ranks agreed to stop before."""
        now = time.monotonic()
        due = self.runtime.is_main and self.due(progress, now)
        stopping, save_all = any_ranks((stop_requested, due), self.runtime)
        save_all = save_all or stopping
        if save_all:
            self.saved_at = now
        return stopping, save_all

    def due(self, progress, now):
        epochs_done = progress.epoch + 1
        save_every = self.opts.save_every
        return (
            self.saved_at is None
            or epochs_done >= self.last_epoch  # runlength.py: the epoch a --kimg run ends in, too
            or (save_every > 0 and progress.step % save_every == 0)  # --save-every's steps stay exact
            or now - self.saved_at >= SAVE_SECONDS
        )


def any_ranks(flags, runtime):
    """Each flag: whether it is true on any rank (a tuple of bools); every rank calls this at the same point."""
    if not runtime.distributed:
        return tuple(bool(flag) for flag in flags)
    counts = torch.tensor([float(flag) for flag in flags], device=runtime.device)
    torch.distributed.all_reduce(counts)
    return tuple(bool(count) for count in counts.tolist())
