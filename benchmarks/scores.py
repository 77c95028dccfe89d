"""Scores shared by the offline quality benchmarks: the spectral artifact score, the lattice measures
(fixed-detail share, strongest peak), the flat share and a random conv net for a Frechet distance.

Pure functions of uint8 image tensors (N, 3, H, W); no files, no training. A module, not a script:
quality.py (digits), photos.py (crops of photographs) and flat_art.py (glyphs) import it, and
tests/test_benchmark_scores.py checks it.
"""

import math

import numpy as np
import torch
from torch import nn

# ITU-R BT.601 luma: the greyscale both spectra are taken of
LUMA = (0.299, 0.587, 0.114)
LOG_FLOOR = 1e-10  # keeps log10 finite for flat images (no power at all)
FLAT_STEP = 0.02  # a colour step below this (of full scale, 5 of 255 at the most) is no edge


# ---------------------------------------------------------------- spectral artifact score


def radius_bins(height, width):
    """Integer radius of every 2-D FFT frequency (unshifted layout), in cycles per image."""
    rows = np.fft.fftfreq(height) * height
    cols = np.fft.fftfreq(width) * width
    return np.rint(np.hypot(rows[:, None], cols[None, :])).astype(np.int64)


def radial_average(power):
    """Azimuthal average of (..., H, W) power spectra over integer-radius rings: (..., R+1).

    Rings run from 0 (DC) out to the corners of the spectrum (radius about H/sqrt(2)), so a
    period-2 checkerboard, whose power sits at the corner frequency (H/2, W/2), is seen.
    """
    power = np.asarray(power, dtype=np.float64)
    bins = radius_bins(*power.shape[-2:]).ravel()
    counts = np.bincount(bins)
    flat = power.reshape(-1, bins.size)
    sums = np.stack([np.bincount(bins, weights=row, minlength=counts.size) for row in flat])
    return (sums / counts).reshape(*power.shape[:-2], counts.size)


def log_spectra(images_uint8):
    """Per image: log10 of the azimuthally averaged power spectrum of its greyscale, normalised.

    The mean grey level is removed and each spectrum is divided by its total power, so the score
    compares the shape of the spectrum (how power falls off with frequency), not brightness or
    contrast. The DC ring (radius 0) is dropped. Returns (N, R) float64.
    """
    images = np.asarray(images_uint8, dtype=np.float64) / 255.0
    grey = np.tensordot(np.asarray(LUMA), images, axes=([0], [1])) if images.shape[1] == 3 else images[:, 0]
    grey = grey - grey.mean(axis=(-2, -1), keepdims=True)
    power = np.abs(np.fft.fft2(grey)) ** 2
    power = power / (power.sum(axis=(-2, -1), keepdims=True) + LOG_FLOOR)
    return np.log10(radial_average(power)[:, 1:] + LOG_FLOOR)


def mean_log_spectrum(images_uint8, batch_size=1024):
    """The set's mean of log_spectra, computed in batches to bound memory."""
    chunks = [
        log_spectra(images_uint8[start : start + batch_size]) for start in range(0, len(images_uint8), batch_size)
    ]
    return np.concatenate(chunks).mean(axis=0)


def spectral_distance(mean_spectrum_a, mean_spectrum_b):
    """Mean absolute difference of two mean log10 spectra over the frequency rings.

    In decades of power: 0.1 means the generated set's power is off by a factor 10**0.1 = 1.26
    on average over the rings. Every ring weighs the same, so the outer half of the rings (the
    high frequencies where up-convolution artifacts sit, Durall et al. 2020) is half the score.
    """
    return float(np.mean(np.abs(np.asarray(mean_spectrum_a) - np.asarray(mean_spectrum_b))))


def spectral_score(generated_uint8, real_uint8):
    """Spectral artifact score of a generated set against a real set (0: the same mean spectrum)."""
    return spectral_distance(mean_log_spectrum(generated_uint8), mean_log_spectrum(real_uint8))


def spectral_spread(real_uint8, splits=20, seed=0, batch_size=1024):
    """Spectral scores between the two halves of `splits` random half-splits of a real set.

    What "within the real-vs-real spread" is measured against: a generator whose samples score
    below the largest of these cannot be told from a second half of the real images by this score.
    Each image's log spectrum is computed once; a split only regroups them.
    """
    spectra = np.concatenate(
        [log_spectra(real_uint8[start : start + batch_size]) for start in range(0, len(real_uint8), batch_size)]
    )
    rng = np.random.default_rng(seed)
    half = len(spectra) // 2
    scores = []
    for _ in range(splits):
        order = rng.permutation(len(spectra))
        scores.append(
            spectral_distance(spectra[order[:half]].mean(axis=0), spectra[order[half : 2 * half]].mean(axis=0))
        )
    return scores


# ---------------------------------------------------------------- lattice measures


def pixel_detail(images_uint8):
    """Greyscale minus its 3x3 box blur: the pixel-scale detail where a lattice lives, (N, H, W)."""
    grey = images_uint8.float().mean(dim=1, keepdim=True)
    return (grey - nn.functional.avg_pool2d(grey, 3, 1, 1, count_include_pad=False))[:, 0]


def fixed_detail_share(images_uint8):
    """Share of the pixel-scale detail that is the same in every image: a pattern locked to the pixel grid.

    The energy of the mean detail over the mean energy of the detail: 1 when every image carries the
    same pattern, near 0 when the detail differs from image to image (real photo crops: 0.0005). A
    transposed-convolution lattice has the same phase in every sample, which tells it from texture.
    """
    detail = pixel_detail(images_uint8)
    return float(detail.mean(0).pow(2).mean() / detail.pow(2).mean().clamp_min(1e-12))


def mean_power_2d(images_uint8):
    """Mean over a set of each greyscale image's 2-D power spectrum, normalised to unit total power."""
    grey = images_uint8.float().mean(dim=1)
    power = torch.fft.fft2(grey - grey.mean(dim=(1, 2), keepdim=True)).abs().pow(2)
    return (power / power.sum(dim=(1, 2), keepdim=True).clamp_min(LOG_FLOOR)).mean(0)


def strongest_peak(generated_uint8, real_uint8):
    """Where the generated set's power most exceeds the real set's: '(16,16) 38x'.

    The 2-D frequency in cycles per image (signs dropped) and the ratio of mean powers there. A DCGAN
    generator's lattice peaks at multiples of 4 cycles per 32 px (its stride-2 layers' grids).
    """
    ratio = mean_power_2d(generated_uint8) / mean_power_2d(real_uint8).clamp_min(LOG_FLOOR)
    height, width = ratio.shape
    row, col = divmod(int(ratio.argmax()), width)
    frequency = (abs(int(np.fft.fftfreq(height)[row] * height)), abs(int(np.fft.fftfreq(width)[col] * width)))
    return f"({frequency[0]},{frequency[1]}) {float(ratio.max()):.0f}x"


# ---------------------------------------------------------------- flatness and clipping


def clipped_share(images_uint8):
    """The share of the colour values (every pixel, every channel) at 0 or 255.

    A G whose last activation clips (--g-output clip) reaches pure black and white exactly, as
    flat art's ground needs; on photographs, which rarely touch either, an excess of them is
    blown-out highlights and crushed shadows. tanh reaches them only where its input is large (at
    most 0.1% of the values on the photos benchmark).
    """
    return float(((images_uint8 == 0) | (images_uint8 == 255)).float().mean())


def flat_share(images_uint8, threshold=FLAT_STEP):
    """Per image, the share of pixels whose largest colour step to one of their 4 neighbours (any
    channel) is below threshold, of full scale: (N,) float.

    Flat art is mostly flat (the white background, the inside of a filled glyph), and speckle on a
    flat region makes every pixel of it a small step from its neighbours: the share falls. A
    spectral score or a Frechet distance in conv features can be met with speckle; this cannot.
    """
    images = images_uint8.float() / 255
    step_x = (images[..., :, 1:] - images[..., :, :-1]).abs().amax(dim=1)  # (N, H, W-1)
    step_y = (images[..., 1:, :] - images[..., :-1, :]).abs().amax(dim=1)  # (N, H-1, W)
    largest = torch.zeros(images.shape[0], *images.shape[2:])
    for rows, cols, step in (
        (slice(None), slice(1, None), step_x),  # the step to the left neighbour
        (slice(None), slice(None, -1), step_x),  # to the right one
        (slice(1, None), slice(None), step_y),  # up
        (slice(None, -1), slice(None), step_y),  # down
    ):
        largest[:, rows, cols] = torch.maximum(largest[:, rows, cols], step)
    return (largest < threshold).float().mean(dim=(1, 2))


# ---------------------------------------------------------------- random features for a Frechet distance


class RandomFeatures(nn.Module):
    """A fixed, randomly initialised conv net: uint8 (N, 3, H, W) -> (N, num_features) float.

    Three stages of 3x3 convolution + ReLU on the RGB image in [-1, 1], each followed by 2x2
    average pooling; the features are the global average of every stage's channels (multi-scale:
    the first stage sees pixel-level texture and colour, the last one 8x8 neighbourhoods).
    Kaiming-normal weights from a seeded torch.Generator, so the same seed gives the same net on
    every machine without touching the global RNG.
    """

    def __init__(self, seed=0, widths=(32, 64, 128)):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        stages, channels = [], 3
        for width in widths:
            conv = nn.utils.skip_init(nn.Conv2d, channels, width, 3, padding=1)  # no draw from the global RNG
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu", generator=generator)
            bound = 1.0 / math.sqrt(channels * 9)
            nn.init.uniform_(conv.bias, -bound, bound, generator=generator)
            stages.append(nn.Sequential(conv, nn.ReLU()))
            channels = width
        self.stages = nn.ModuleList(stages)
        self.num_features = sum(widths)
        self.requires_grad_(False).eval()

    def forward(self, images_uint8):
        x = images_uint8.float().div(127.5).sub(1.0)
        features = []
        for index, stage in enumerate(self.stages):
            if index:
                x = nn.functional.avg_pool2d(x, 2)
            x = stage(x)
            features.append(x.mean(dim=(2, 3)))
        return torch.cat(features, dim=1)


def frechet_distance(feature, real_uint8, generated_uint8, batch_size=512):
    """torchmetrics' FrechetInceptionDistance with `feature` in place of Inception."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=feature)
    with torch.no_grad():
        for images, real in ((real_uint8, True), (generated_uint8, False)):
            for batch in images.split(batch_size):
                fid.update(batch, real=real)
    return float(fid.compute())
