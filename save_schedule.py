"""Which epoch ends write the checkpoint, the loss plot and the GIF frames. At GPU speed a CIFAR-10
epoch takes about a second, and writing all of them after each would take a large share of the run:
every epoch end draws its grid, and the rest waits until SAVE_SECONDS of wall time have passed.
"""

import time
from dataclasses import dataclass

from runtime import any_ranks

# Wall seconds between the epoch ends that write the checkpoint, the loss plot and the GIF frames
# when epochs are shorter: what a crash (or an --on-nan rollback) can cost at most, beyond the
# epoch in progress. --save-every adds checkpoints by steps.
SAVE_SECONDS = 60.0


@dataclass(frozen=True)
class EpochEndWrites:
    """What an epoch end writes besides its grid: the checkpoint, and the progress pictures (the
    GIF frames waiting since the last, and the loss plot)."""

    checkpoint: bool = True
    progress: bool = True


class SaveSchedule:
    """Decides, at each epoch's end, what it writes besides its grid.

    Everything is written at the first epoch end SAVE_SECONDS or more after training started, then
    at the first SAVE_SECONDS or more after the last that did (on rank 0's clock), at the last epoch
    end, on a stop and at a --save-every step. The first epoch end of a run writes its checkpoint in
    any case, so that a rollback has a checkpoint to go back to; its plots wait for the clock, as
    drawing them takes longer than a short epoch (matplotlib's first import, then the figure).
    """

    def __init__(self, opts, runtime, length):
        self.opts, self.runtime, self.last_epoch = opts, runtime, length.last_epoch
        self.drawn_at = time.monotonic()  # rank 0's clock when training started, then at each full save
        self.saved = False  # whether this run has written a checkpoint at an epoch end

    def agree(self, progress, stop_requested):
        """(stopping, EpochEndWrites) for the epoch ending now (progress has not counted it yet), the
        same on every rank: whether any rank was asked to stop, and what this end writes. One
        collective under torchrun, at the point where the ranks agreed to stop before."""
        now = time.monotonic()
        due = self.runtime.is_main and self.due(progress, now)
        stopping, save_all = any_ranks((stop_requested, due), self.runtime)
        save_all = save_all or stopping
        if save_all:
            self.drawn_at = now
        writes = EpochEndWrites(checkpoint=save_all or not self.saved, progress=save_all)
        self.saved = True
        return stopping, writes

    def due(self, progress, now):
        epochs_done = progress.epoch + 1
        save_every = self.opts.save_every
        return (
            epochs_done >= self.last_epoch  # runlength.py: the epoch a --kimg run ends in, too
            or (save_every > 0 and progress.step % save_every == 0)  # --save-every's steps stay exact
            or now - self.drawn_at >= SAVE_SECONDS
        )
