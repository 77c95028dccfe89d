"""The pure scoring functions of benchmarks/scores.py: radial average, spectral score, random features.

frechet_distance is left out: it only feeds torchmetrics, whose import alone takes ~10 s here.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

SCORES_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "scores.py"


@pytest.fixture(scope="module")
def scores():
    spec = importlib.util.spec_from_file_location("scores", SCORES_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smooth_images(count, size=16, seed=0):
    """Random low-frequency RGB images (upsampled 4x4 noise), uint8 (N, 3, size, size)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    return images.mul(200).add(28).round().to(torch.uint8)


def checkerboard(size, period, amplitude):
    rows, cols = np.mgrid[:size, :size]
    return torch.from_numpy(np.where((rows // (period // 2) + cols // (period // 2)) % 2 == 0, amplitude, -amplitude))


def test_radius_bins_by_hand(scores):
    # 4x4 FFT frequencies in numpy's order are 0, 1, -2, -1 along each axis
    expected = np.array(
        [
            [0, 1, 2, 1],  # (0,0) (0,1) (0,-2) (0,-1)
            [1, 1, 2, 1],  # (1,1): sqrt 2 -> 1; (1,-2): sqrt 5 -> 2
            [2, 2, 3, 2],  # (-2,-2): sqrt 8 = 2.83 -> 3
            [1, 1, 2, 1],
        ]
    )
    np.testing.assert_array_equal(scores.radius_bins(4, 4), expected)


def test_radial_average_of_a_known_pattern(scores):
    power = np.arange(16, dtype=np.float64).reshape(4, 4)
    # rings from test_radius_bins_by_hand: r0 = {0}; r1 = {1, 3, 4, 5, 7, 12, 13, 15};
    # r2 = {2, 6, 8, 9, 11, 14}; r3 = {10}
    expected = [0.0, (1 + 3 + 4 + 5 + 7 + 12 + 13 + 15) / 8, (2 + 6 + 8 + 9 + 11 + 14) / 6, 10.0]
    np.testing.assert_allclose(scores.radial_average(power), expected)
    batched = scores.radial_average(np.stack([power, 2 * power]))
    np.testing.assert_allclose(batched, [expected, [2 * value for value in expected]])


def test_a_cosine_puts_its_power_in_one_ring(scores):
    cols = np.arange(8)
    image = np.tile(np.cos(2 * np.pi * 2 * cols / 8), (8, 1))  # 2 cycles along x
    ring = scores.radial_average(np.abs(np.fft.fft2(image)) ** 2)
    # |F| = 64 / 2 = 32 at (0, 2) and (0, -2); ring 2 has 12 frequencies (4 axial, 8 at sqrt 5)
    assert ring[2] == pytest.approx(2 * 32**2 / 12)
    np.testing.assert_allclose(np.delete(ring, 2), 0.0, atol=1e-20)


def test_identical_sets_score_zero(scores):
    images = smooth_images(8)
    assert scores.spectral_score(images, images.clone()) == 0.0


def test_spectral_score_is_blind_to_brightness_and_contrast(scores):
    images = smooth_images(8) // 2 * 2  # even values: halving them below is exact
    brighter = images + 20
    flatter = images // 2 + 60
    assert scores.spectral_score(brighter, images) == pytest.approx(0.0, abs=1e-9)
    assert scores.spectral_score(flatter, images) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("period", [2, 4])
def test_checkerboard_scores_clearly_worse_than_clean(scores, period):
    real, clean = smooth_images(32, seed=0), smooth_images(32, seed=1)
    lattice = (clean.float() + checkerboard(16, period, 12)).clamp(0, 255).round().to(torch.uint8)
    clean_score = scores.spectral_score(clean, real)
    lattice_score = scores.spectral_score(lattice, real)
    assert clean_score < 0.1
    # a period-4 lattice puts its power in a few rings only, so it moves the mean less than period 2
    assert lattice_score > 3 * clean_score
    assert lattice_score > clean_score + 0.15


def test_random_features_are_fixed_by_the_seed(scores):
    images = smooth_images(4)
    state = torch.get_rng_state()
    first, again, other = scores.RandomFeatures(seed=3), scores.RandomFeatures(seed=3), scores.RandomFeatures(seed=4)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    features = first(images)
    assert features.shape == (4, first.num_features)
    torch.testing.assert_close(again(images), features)
    assert not torch.allclose(other(images), features)


def test_spectral_spread_is_the_score_of_each_half_split(scores):
    images = smooth_images(40, seed=3)
    spread = scores.spectral_spread(images, splits=5, seed=7)
    rng = np.random.default_rng(7)
    for value in spread:
        order = torch.from_numpy(rng.permutation(40))
        assert value == pytest.approx(scores.spectral_score(images[order[:20]], images[order[20:]]))
    assert len(set(spread)) == 5  # five different splits
    assert spread == scores.spectral_spread(images, splits=5, seed=7)


def test_fixed_detail_share_tells_a_locked_pattern_from_a_moving_one(scores):
    flat = torch.arange(60, 188, 4.0).view(32, 1, 1, 1).expand(32, 3, 16, 16)  # no detail of their own
    board = checkerboard(16, 2, 12)
    signs = torch.tensor([1.0, -1.0]).repeat(16).view(32, 1, 1, 1)
    locked = (flat + board).to(torch.uint8)  # the same phase in every image
    alternating = (flat + signs * board).to(torch.uint8)  # half in each phase: the mean detail is 0
    half = (flat + (signs > 0) * board).to(torch.uint8)  # the mean detail is half the board's
    assert scores.fixed_detail_share(locked) == pytest.approx(1.0, abs=1e-6)
    assert scores.fixed_detail_share(alternating) == pytest.approx(0.0, abs=1e-6)
    assert scores.fixed_detail_share(half) == pytest.approx(0.5, abs=1e-6)
    # inside the image a 3x3 mean of a period-2 board is 1/9 of it, so the detail is 8/9 of the board
    detail = scores.pixel_detail(locked[:1])[0, 1:-1, 1:-1]
    torch.testing.assert_close(detail, board[1:-1, 1:-1].float() * 8 / 9)


@pytest.mark.parametrize("period, frequency", [(2, "(8,8)"), (4, "(4,4)")])
def test_strongest_peak_finds_a_checkerboard(scores, period, frequency):
    real, clean = smooth_images(32, seed=0), smooth_images(32, seed=1)
    latticed = (clean.float() + checkerboard(16, period, 12)).clamp(0, 255).round().to(torch.uint8)
    assert scores.strongest_peak(latticed, real).startswith(frequency + " ")


def test_an_untrained_dcgan_generator_draws_a_locked_lattice_and_the_upsample_one_does_not(scores):
    """Why --arch upsample: the transposed convolutions' lattice is there before any training, at the
    corner frequency (period 2) and in the same phase in every sample."""
    import models

    def untrained_samples(arch):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            generator = models.build_generator(arch, 16, 8, 32)
            generator.apply(models.init_weights)
            with torch.no_grad():
                images = generator.train()(torch.randn(128, 16, 1, 1))
        return images.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)

    real = torch.nn.functional.interpolate(smooth_images(128, seed=5).float(), size=32, mode="bilinear")
    real = real.round().to(torch.uint8)
    dcgan, upsample = untrained_samples("dcgan"), untrained_samples("upsample")
    assert scores.fixed_detail_share(dcgan) > 0.4
    assert scores.fixed_detail_share(upsample) < 0.15
    # at a multiple of 4 cycles per 32 px: the grid of one of its stride-2 layers
    row, col = map(int, scores.strongest_peak(dcgan, real).split(")")[0][1:].split(","))
    assert row % 4 == 0 and col % 4 == 0 and max(row, col) == 16


# ---------------------------------------------------------------- flat share


def test_flat_share_by_hand(scores):
    """4 x 4, white left half and red right half: the pixels either side of the edge (columns 1 and 2)
    have a large step to a neighbour, columns 0 and 3 none: half the pixels are flat. A step of 5
    (of 255) is flat, one of 6 is not (threshold 0.02)."""
    image = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    image[:, 1:, :, 2:] = 0
    assert scores.flat_share(image).tolist() == [0.5]
    ramp = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    ramp[0] += torch.arange(4, dtype=torch.uint8) * 5  # steps of 5 along x
    ramp[1] += torch.arange(4, dtype=torch.uint8).view(4, 1) * 6  # steps of 6 along y
    assert scores.flat_share(ramp).tolist() == [1.0, 0.0]


def test_clipped_share_by_hand(scores):
    """2 images of 2 x 2 x 3 = 12 values: 3 at 0 or 255 in the first (1 and 254 are not), none in the second."""
    images = torch.full((2, 3, 2, 2), 128, dtype=torch.uint8)
    images[0, 0, 0, 0], images[0, 1, 0, 1], images[0, 2, 1, 1] = 0, 255, 255
    images[0, 0, 1, 0], images[0, 1, 1, 0] = 1, 254
    assert scores.clipped_share(images) == pytest.approx(3 / 24)


def flat_shapes(count, size=32, seed=0):
    """Random flat-colour rectangles and discs on white, like icons: uint8 (N, 3, size, size)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    images = np.full((count, 3, size, size), 255, dtype=np.uint8)
    for image in images:
        for _ in range(2):
            top, left = rng.integers(0, size // 2, size=2)
            height, width = rng.integers(size // 4, size // 2, size=2)
            inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
            if rng.uniform() < 0.5:  # a disc instead
                inside = (rows - top - height / 2) ** 2 + (cols - left - width / 2) ** 2 < (height / 2) ** 2
            image[:, inside] = rng.integers(0, 200, size=3)[:, None]
    return torch.from_numpy(images)


def test_flat_share_separates_flat_images_from_speckled_ones(scores):
    """Speckle of +-8 of 255 (3%, hard to see at a glance) on flat shapes takes the share from near 1
    to under a quarter: every clean image's share lies above every speckled one's."""
    clean = flat_shapes(16)
    noise = torch.randint(-8, 9, clean.shape, generator=torch.Generator().manual_seed(0))
    speckled = (clean.int() + noise).clamp(0, 255).to(torch.uint8)
    clean_shares, speckled_shares = scores.flat_share(clean), scores.flat_share(speckled)
    assert float(clean_shares.min()) > 0.75
    assert float(speckled_shares.max()) < 0.25


def test_the_flat_art_benchmark_draws_one_glyph_per_image_on_white(scores, monkeypatch):
    monkeypatch.syspath_prepend(str(SCORES_PY.parent))
    import flat_art

    art = flat_art.render_flat_art(12, seed=3)
    assert art.shape == (12, 3, 32, 32) and art.dtype == torch.uint8
    assert (art[:, :, 0, 0] == 255).all()  # white corners
    assert ((art < 200).any(dim=1).flatten(1).sum(dim=1) >= 8).all()  # every image has a glyph
    shares = scores.flat_share(art)
    assert float(shares.min()) > 0.4  # flat art: mostly flat
