"""How long a run trains and how far it has come: --epochs, or --kimg (thousands of images) in
whole steps, and the one progress bar of the whole run (steps done of all, images/s, time left).
"""

import math
from dataclasses import dataclass
from fractions import Fraction

from tqdm import tqdm

from errors import count_text

# the bar: steps rather than tqdm's "it", and images/s beside the time left
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}, {images_per_s} img/s{postfix}]"


def kimg_steps(kimg, batch_size, world_size):
    """The steps that train on kimg thousand images, batch_size x world_size of them a step, rounded
    up so that the run sees that many at the least. The number as written: --kimg 0.3 is 300
    images, where the float 0.3 times 1000 is a hair above 300 and would round up one step too far."""
    images = Fraction(repr(float(kimg))) * 1000
    return max(1, math.ceil(images / (batch_size * world_size)))


def kimg_text(kimg):
    """--kimg's value as a user types it: 0.05, 25000 (not 25000.0 or 2.5e+04)."""
    return f"{kimg:.15g}"


def length_text(flags):
    """The flag that sets a run's length, with its value: '--kimg 0.05' or '--epochs 25'."""
    return f"--kimg {kimg_text(flags['kimg'])}" if flags.get("kimg") is not None else f"--epochs {flags['epochs']}"


def length_change(saved_flags, resolved_flags):
    """How a resume changed the run's length ('--epochs 2 -> 3', '--epochs 2 -> --kimg 0.05'), or None."""
    before, after = length_text(saved_flags), length_text(resolved_flags)
    if before == after:
        return None
    same_flag = before.split()[0] == after.split()[0]
    return f"{before} -> {after.split()[1] if same_flag else after}"


@dataclass(frozen=True)
class RunLength:
    """Where a run ends, in steps. epochs (--epochs) or kimg (--kimg) says which flag set it: a run
    of epochs ends at an epoch's end, whatever the steps of earlier epochs were; a --kimg run ends
    at its total step, inside an epoch if that is where it falls."""

    steps_per_epoch: int
    total_steps: int
    last_epoch: int  # the epoch (from 1) the run ends in
    images_per_step: int  # batch size x processes
    epochs: int | None = None
    kimg: float | None = None

    @classmethod
    def of(cls, opts, steps_per_epoch, world_size, progress):
        """The length of a run of opts at steps_per_epoch, from progress (where it starts)."""
        images_per_step = opts.batch_size * world_size
        if opts.kimg is None:
            # the steps taken, then the epochs' steps still to go: a resume with another --batch-size
            # took its earlier steps at another size
            to_go = (opts.epochs - progress.epoch) * steps_per_epoch - progress.batch
            total = progress.step + max(0, to_go)
            return cls(steps_per_epoch, total, opts.epochs, images_per_step, epochs=opts.epochs)
        total = kimg_steps(opts.kimg, opts.batch_size, world_size)
        # the batches left in this epoch, then whole epochs; counted from where the run stands, as
        # a resumed run's earlier epochs may have had other sizes
        batches_to_go = progress.batch + max(0, total - progress.step)
        last_epoch = progress.epoch + max(1, math.ceil(batches_to_go / steps_per_epoch))
        return cls(steps_per_epoch, total, last_epoch, images_per_step, kimg=opts.kimg)

    def done(self, progress):
        if self.kimg is None:
            return progress.epoch >= self.epochs
        return progress.step >= self.total_steps

    def ends_inside_epoch(self, progress):
        """True at a --kimg run's last step when it is not the last of its epoch (which ends it anyway)."""
        return self.kimg is not None and progress.step >= self.total_steps and progress.batch < self.steps_per_epoch

    def epoch_text(self, progress):
        return f"epoch {progress.epoch + 1}/{self.last_epoch}"

    def describe(self):
        """The start line's words for the length: '8 steps in all' or '--kimg 0.05: 7 steps of 8 images'."""
        if self.kimg is None:
            return f"{count_text(self.total_steps, 'step')} in all"
        return f"--kimg {kimg_text(self.kimg)}: {count_text(self.total_steps, 'step')} of {self.images_per_step} images"

    def already_trained(self, progress):
        if self.kimg is None:
            return f"already trained {count_text(progress.epoch, 'epoch')}; raise --epochs to train more"
        return f"already trained {count_text(progress.step, 'step')}, and {self.describe()}; raise --kimg to train more"


class RunProgressBar(tqdm):
    """tqdm's bar over the steps of the whole run, with the images a second (tqdm's rate of steps
    times the images of a step) and the epoch in its description."""

    def __init__(self, length, progress, disable, file=None):
        self.images_per_step = length.images_per_step  # before tqdm's __init__, which draws the bar
        super().__init__(
            total=length.total_steps,
            initial=progress.step,
            desc=length.epoch_text(progress),
            disable=disable,
            leave=False,
            dynamic_ncols=True,
            bar_format=BAR_FORMAT,
            file=file,
        )

    @property
    def format_dict(self):
        values = super().format_dict
        rate = values.get("rate")
        if rate is None and values.get("elapsed"):  # tqdm's own fallback: the mean since the bar opened
            rate = (values["n"] - values["initial"]) / values["elapsed"]
        values["images_per_s"] = f"{rate * self.images_per_step:,.0f}" if rate else "?"
        return values

    def follow(self, length, progress):
        """At an epoch's start: its number, and where the run stands (a rollback moves it back)."""
        self.set_description_str(length.epoch_text(progress), refresh=False)
        if progress.step != self.n:
            self.n = self.last_print_n = progress.step
            self.refresh()
