"""What D sees: the augmentations of its input images and their strength. DiffAugment's colour,
translation and cutout (Zhao et al., 2020); x-flips, of the real images alone as more data (--mirror)
or of everything D sees as one more augmentation; and ADA's adaptive strength p (Karras et al., 2020).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ADA's controller. p moves every 4 steps, as in ADA, by sign(r - target) times the images of
# those steps over the images that take p from 0 to 1. ADA's 500k images suit runs of tens of
# millions; these runs see tens or hundreds of thousands (a few thousand steps of 64), in which
# p would hardly leave 0. At 20k, p can rise by 0.3 in the first few epochs of a small folder,
# when D starts to memorise it, and one move at batch 64 (0.013) is small next to such values.
ADA_INTERVAL_STEPS = 4
ADA_RAMP_IMAGES = 20_000
ADA_TARGET = 0.6  # ADA's r_t target; --ada-target's default
# the log row's name of p, and the progress bar's label for it
STRENGTH_LABELS = {"augment_p": "p"}


# ---------------------------------------------------------------- the operations


def x_flipped(images, generator=None):
    """Each image mirrored left-right with probability 1/2, one draw per image."""
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def diff_augment(images, generator=None):
    """Color, translation and cutout on a batch (Zhao et al., 2020), differentiable.

    Applied to real and fake images alike before D, so D never sees un-augmented data.
    Computed in fp32 with whole-pixel shifts, as the paper's code does: under bf16 autocast
    G's images are bf16, and a sampling grid rounded to bf16 would move some pixels of the
    fakes only, a tell D could learn.
    """
    images = recoloured(images.float(), generator)
    images = translate(images, random_shifts(images, generator))
    return cutout(images, random_cutout_corners(images, generator))


def adaptive_augment(images, p, generator=None):
    """x-flip, colour, translation and cutout, each applied to each image with probability p (a
    0-dim tensor: a compiled graph takes it as an input, and never recompiles as p moves).

    In fp32, as diff_augment. The draws: one per image and operation first, then diff_augment's
    own, after the flips': at p = 1 this is diff_augment of x_flipped images, at p = 0 the images.
    """
    images = images.float()
    applied = (torch.rand(images.shape[0], 4, device=images.device, generator=generator) < p).view(-1, 4, 1, 1, 1)
    images = torch.where(applied[:, 0], x_flipped(images, generator), images)
    images = torch.where(applied[:, 1], recoloured(images, generator), images)
    images = torch.where(applied[:, 2], translate(images, random_shifts(images, generator)), images)
    return torch.where(applied[:, 3], cutout(images, random_cutout_corners(images, generator)), images)


def recoloured(images, generator=None):
    """DiffAugment's colour: random brightness, saturation and contrast per image."""

    def uniform():
        return torch.rand(images.shape[0], 1, 1, 1, device=images.device, generator=generator)

    images = images + (uniform() - 0.5)
    mean = images.mean(dim=1, keepdim=True)
    images = (images - mean) * (uniform() * 2) + mean
    mean = images.mean(dim=[1, 2, 3], keepdim=True)
    return (images - mean) * (uniform() + 0.5) + mean


def random_shifts(images, generator=None, ratio=0.125):
    """Whole-pixel shifts (rows, cols) per image, up to ratio of the height and of the width each way."""
    limits = [int(side * ratio + 0.5) for side in images.shape[-2:]]
    return random_rows_and_cols(images, [-limit for limit in limits], [limit + 1 for limit in limits], generator)


def random_rows_and_cols(images, lows, highs, generator):
    """(N, 2) whole numbers, each image's row in [lows[0], highs[0]) and column in [lows[1], highs[1]):
    one draw for both where the ranges agree (square images, drawn as they always were)."""
    n, device = images.shape[0], images.device
    if (lows[0], highs[0]) == (lows[1], highs[1]):
        return torch.randint(lows[0], highs[0], (n, 2), device=device, generator=generator)
    columns = [torch.randint(low, high, (n,), device=device, generator=generator) for low, high in zip(lows, highs)]
    return torch.stack(columns, dim=1)


def translate(images, shifts):
    """Shift each image by whole pixels, filling with zeros: pixel (i, j) comes from (i+dy, j+dx)."""
    n, _, height, width = images.shape
    batch = torch.arange(n, device=images.device).view(n, 1, 1)
    # indices into the image padded by one zero pixel; anything outside lands on the padding
    rows = (torch.arange(height, device=images.device).view(1, -1, 1) + shifts[:, 0].view(n, 1, 1) + 1).clamp(
        0, height + 1
    )
    cols = (torch.arange(width, device=images.device).view(1, 1, -1) + shifts[:, 1].view(n, 1, 1) + 1).clamp(
        0, width + 1
    )
    padded = F.pad(images, (1, 1, 1, 1)).permute(0, 2, 3, 1)
    return padded[batch, rows, cols].permute(0, 3, 1, 2)


def random_cutout_corners(images, generator=None, ratio=0.5):
    """Top-left corners (row, col) of a ratio x height by ratio x width rectangle per image (a square
    for square images), its centre anywhere in the image; it may overhang."""
    sides = images.shape[-2:]
    sizes = [int(side * ratio + 0.5) for side in sides]
    lows = [-(size // 2) for size in sizes]
    return random_rows_and_cols(
        images, lows, [side + 1 - size % 2 + low for side, size, low in zip(sides, sizes, lows)], generator
    )


def cutout(images, corners, ratio=0.5):
    """Zero a ratio x height by ratio x width rectangle at each image's corner (clipped at the borders)."""
    n, _, height, width = images.shape
    size_rows, size_cols = int(height * ratio + 0.5), int(width * ratio + 0.5)
    rows = torch.arange(height, device=images.device).view(1, -1, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, -1)
    top, left = corners[:, 0].view(n, 1, 1), corners[:, 1].view(n, 1, 1)
    inside = (rows >= top) & (rows < top + size_rows) & (cols >= left) & (cols < left + size_cols)
    return images * (~inside).unsqueeze(1).to(images.dtype)


# ---------------------------------------------------------------- ADA's strength


@dataclass
class AugmentStrength:
    """ADA's p, with the signs of D's logits on the real images since p last moved, all on the device.

    signs holds (the sum of sign(D(x)), the images judged) over the interval; under torchrun every
    step's pair is all-reduced, so that every rank holds the same sums and p, and the checkpoint
    (rank 0's) holds all of it, whichever step it is saved at.
    """

    p: torch.Tensor
    signs: torch.Tensor
    step_signs: torch.Tensor  # the current step's pair, written by D's update
    target: float = ADA_TARGET
    steps: int = 0  # steps since p last moved

    @classmethod
    def start(cls, device, target=ADA_TARGET):
        return cls(torch.zeros((), device=device), torch.zeros(2, device=device), torch.zeros(2, device=device), target)

    def observe(self, real_logits):
        """D's logits on the real batch (inside D's update, maybe compiled: no host sync)."""
        signs = real_logits.detach().float().sign()
        self.step_signs.copy_(torch.stack([signs.sum(), signs.new_full((), signs.numel())]))

    def after_step(self, runtime):
        """The step's signs into the interval's; p moves at the interval's end."""
        if runtime.distributed:
            torch.distributed.all_reduce(self.step_signs)
        self.signs += self.step_signs
        self.steps += 1
        if self.steps == ADA_INTERVAL_STEPS:
            self.adjust()

    def adjust(self):
        """p += sign(r - target) * images / ADA_RAMP_IMAGES, clamped to [0, 1], where r is the
        interval's mean sign of D's logits on real images; then a new interval starts."""
        total, images = self.signs.unbind()
        moved = self.p + torch.sign(total / images - self.target) * images / ADA_RAMP_IMAGES
        self.p.copy_(moved.clamp(0.0, 1.0))
        self.signs.zero_()
        self.steps = 0

    def state_dict(self):
        return {"p": self.p.detach().cpu().clone(), "signs": self.signs.detach().cpu().clone(), "steps": self.steps}

    def load_state_dict(self, saved):
        """A checkpoint's state (checked by valid_state); None, a run saved without --ada: p starts at 0."""
        if saved is None:
            return
        self.p.copy_(saved["p"])
        self.signs.copy_(saved["signs"])
        self.steps = saved["steps"]


def valid_state(saved):
    """Whether a checkpoint's "augment" value is None or a state AugmentStrength can go on from."""
    if saved is None:
        return True
    if not isinstance(saved, dict) or set(saved) != {"p", "signs", "steps"}:
        return False
    p, signs, steps = saved["p"], saved["signs"], saved["steps"]
    if not (isinstance(p, torch.Tensor) and p.shape == () and p.is_floating_point()):
        return False
    if not (isinstance(signs, torch.Tensor) and signs.shape == (2,) and signs.is_floating_point()):
        return False
    if not (isinstance(steps, int) and not isinstance(steps, bool) and 0 <= steps < ADA_INTERVAL_STEPS):
        return False
    total, images = signs.tolist()
    return 0.0 <= float(p) <= 1.0 and math.isfinite(images) and abs(total) <= images


def strength_row(strength):
    """p for the log row (a host read: at log rows only); nothing without --ada."""
    return {} if strength is None else {"augment_p": strength.p.item()}
