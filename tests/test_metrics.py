"""FID, IS, KID, precision, recall, density and coverage: the maths against a hand computation,
the wiring of --fid-every and --evaluate, the real-statistics cache, and the offline behaviour
without Inception weights.

A small stand-in feature net replaces Inception (no download, no GPU).
"""

import json
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial
import torch
from conftest import (
    TINY_ARGS,
    copy_run,
    drawn_pixels,
    saved_generator,
    snapshot,
    truncated_noise,
    write_cifar10_archive,
)
from test_data_cache import folder_run, write_folder
from torch import nn

import artifacts
import foldercache
import folders
import metrics
import models
import options
import sampling
import startup
import utils
from runtime import Runtime, choose_precision

EVAL_ARGS = ("--eval-samples", "16")
NEIGHBOUR_SCORES = ("precision", "recall", "density", "coverage")


class StandInFeatures(nn.Module):
    """uint8 (N, 3, H, W) -> (N, 4) float: channel means and the overall spread.

    Records the size of every batch it sees, so a test can tell real from generated calls, and
    the side of its images.
    """

    num_features = 4

    def __init__(self):
        super().__init__()
        self.batch_sizes, self.sides = [], []

    def forward(self, images_uint8):
        assert images_uint8.dtype == torch.uint8
        self.batch_sizes.append(len(images_uint8))
        self.sides.append(images_uint8.shape[-1])
        images = images_uint8.float() / 255
        return torch.cat([images.mean(dim=(2, 3)), images.flatten(1).std(dim=1, keepdim=True)], dim=1)


class ImageRecordingFeatures(StandInFeatures):
    """StandInFeatures that also keeps every batch of images it is given."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, images_uint8):
        self.batches.append(images_uint8.clone())
        return super().forward(images_uint8)


class PixelFeatures(nn.Module):
    """The identity on 1x1 images: each image's features are its three channel values."""

    num_features = 3

    def forward(self, images_uint8):
        return images_uint8.float().flatten(1)


def frechet_by_hand(features_1, features_2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), with unbiased covariances."""
    mu_1, mu_2 = features_1.mean(axis=0), features_2.mean(axis=0)
    cov_1, cov_2 = np.cov(features_1, rowvar=False), np.cov(features_2, rowvar=False)
    root = scipy.linalg.sqrtm(cov_1 @ cov_2).real
    return float(((mu_1 - mu_2) ** 2).sum() + np.trace(cov_1 + cov_2 - 2 * root))


def pixel_sets(count=200):
    """Two sets of 1x1 RGB images with different means and correlated channels."""
    rng = np.random.default_rng(0)
    real = rng.normal(120, 25, size=(count, 3)) + rng.normal(0, 15, size=(count, 1))
    fake = rng.normal(100, 35, size=(count, 3)) * np.array([1.0, 0.7, 1.2])
    to_uint8 = lambda values: np.clip(np.round(values), 0, 255).astype(np.uint8)  # noqa: E731
    return to_uint8(real), to_uint8(fake)


def neighbour_scores_by_hand(real, fake, k_precision=3, k_density=5):
    """The four metrics as the papers define them, from whole distance matrices in float64."""
    real_real = scipy.spatial.distance.cdist(real, real)
    fake_real = scipy.spatial.distance.cdist(fake, real)
    real_radius = np.sort(real_real, axis=1)[:, k_precision]  # column 0 is the point itself
    fake_radius = np.sort(scipy.spatial.distance.cdist(fake, fake), axis=1)[:, k_precision]
    density_radius = np.sort(real_real, axis=1)[:, k_density]
    return {
        "precision": (fake_real <= real_radius[None, :]).any(axis=1).mean(),
        "recall": (fake_real.T <= fake_radius[None, :]).any(axis=1).mean(),
        "density": (fake_real < density_radius[None, :]).sum() / (k_density * len(fake)),
        "coverage": (fake_real.min(axis=0) < density_radius).mean(),
    }


def neighbour_scores(real, fake, **chunks):
    return metrics.nearest_neighbour_scores(torch.as_tensor(real).float(), torch.as_tensor(fake).float(), **chunks)


@pytest.fixture
def stand_in():
    return StandInFeatures()


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- the maths


def test_torchmetrics_fid_equals_the_frechet_distance_by_hand():
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = pixel_sets()
    fid = FrechetInceptionDistance(feature=PixelFeatures())
    fid.update(torch.from_numpy(real).view(-1, 3, 1, 1), real=True)
    fid.update(torch.from_numpy(fake).view(-1, 3, 1, 1), real=False)
    expected = frechet_by_hand(real.astype(np.float64), fake.astype(np.float64))
    assert expected > 100  # the two sets are far apart: a real check, not 0 == 0
    assert float(fid.compute()) == pytest.approx(expected, rel=1e-4)


def scores_of_pixel_sets(tmp_path):
    """(real, fake, score_generator's scores) of pixel_sets, scored on the pixels themselves."""
    real, fake = pixel_sets()
    scorers = metrics.build_metrics(torch.device("cpu"), len(fake), PixelFeatures())
    metrics.add_real_images(scorers, torch.from_numpy(real).view(-1, 3, 1, 1), tmp_path / "real.pt")
    # generated images arrive as floats in [-1, 1]; these map back to the same uint8 values
    fake_float = torch.from_numpy(fake).double().view(-1, 3, 1, 1).div(127.5).sub(1).float()
    return real, fake, metrics.score_generator(scorers, [fake_float[:120], fake_float[120:]])


def test_score_generator_gives_the_hand_computed_fid(tmp_path):
    real, fake, scores = scores_of_pixel_sets(tmp_path)
    expected = frechet_by_hand(real.astype(np.float64), fake.astype(np.float64))
    assert scores["fid"] == pytest.approx(expected, rel=1e-4)
    assert np.isfinite([scores["is"], scores["kid"], scores["is_std"], scores["kid_std"]]).all()


def test_a_second_evaluation_forgets_the_first_generated_images(tmp_path):
    real, fake = pixel_sets()
    fake_float = torch.from_numpy(fake).float().view(-1, 3, 1, 1).div(127.5).sub(1)
    other_float = fake_float.flip(1)  # channels swapped: other images, other scores
    scorers = metrics.build_metrics(torch.device("cpu"), len(fake), PixelFeatures())
    metrics.add_real_images(scorers, torch.from_numpy(real).view(-1, 3, 1, 1), tmp_path / "real.pt")
    metrics.score_generator(scorers, [fake_float])
    torch.manual_seed(0)  # IS shuffles the images into its splits
    second = metrics.score_generator(scorers, [other_float])
    fresh = metrics.build_metrics(torch.device("cpu"), len(fake), PixelFeatures())
    metrics.add_real_images(fresh, torch.from_numpy(real).view(-1, 3, 1, 1), tmp_path / "real.pt")
    torch.manual_seed(0)
    only_other = metrics.score_generator(fresh, [other_float])
    assert second["fid"] == pytest.approx(only_other["fid"], rel=1e-5)
    assert second["is"] == pytest.approx(only_other["is"], rel=1e-5)  # IS keeps no stale images


def test_kid_works_with_fewer_real_images_than_its_subset_size(tmp_path):
    real, fake = pixel_sets()
    scorers = metrics.build_metrics(torch.device("cpu"), 200, PixelFeatures())
    metrics.add_real_images(scorers, torch.from_numpy(real[:40]).view(-1, 3, 1, 1), tmp_path / "real.pt")
    fake_float = torch.from_numpy(fake).float().view(-1, 3, 1, 1).div(127.5).sub(1)
    scores = metrics.score_generator(scorers, [fake_float])
    assert np.isfinite(scores["kid"]) and scores["kid"] > 0


def test_the_real_statistics_cache_gives_the_same_scores(tmp_path):
    real, fake = pixel_sets()
    real_uint8 = torch.from_numpy(real).view(-1, 3, 1, 1)
    fake_float = torch.from_numpy(fake).float().view(-1, 3, 1, 1).div(127.5).sub(1)
    cache = tmp_path / "real.pt"
    first = metrics.build_metrics(torch.device("cpu"), 200, PixelFeatures())
    metrics.add_real_images(first, real_uint8, cache)
    assert cache.is_file()
    cached = metrics.build_metrics(torch.device("cpu"), 200, PixelFeatures())
    metrics.add_real_images(cached, real_uint8[:0], cache)  # no images: everything must come from the file
    before, after = metrics.score_generator(first, [fake_float]), metrics.score_generator(cached, [fake_float])
    assert after["fid"] == pytest.approx(before["fid"], rel=1e-6)
    assert after["kid"] == pytest.approx(before["kid"], rel=1e-6, abs=1e-9)


# ---------------------------------------------------------------- precision, recall, density, coverage


@pytest.mark.parametrize("chunk_values", [metrics.DISTANCE_CHUNK_VALUES, 150])  # 150: one row per block
def test_neighbour_scores_equal_a_direct_numpy_computation(chunk_values):
    rng = np.random.default_rng(1)
    real = rng.normal(0, 1, size=(180, 6))
    fake = rng.normal(0.4, 1.3, size=(180, 6))  # overlapping sets: every score strictly between 0 and 1
    expected = neighbour_scores_by_hand(real, fake)
    assert all(0.05 < expected[name] < 0.95 for name in NEIGHBOUR_SCORES)
    assert neighbour_scores(real, fake, chunk_values=chunk_values) == pytest.approx(expected, abs=1e-9)


def test_identical_sets_score_one_and_far_apart_sets_zero():
    points = np.random.default_rng(2).normal(size=(40, 5))
    same = neighbour_scores(points, points)
    assert (same["precision"], same["recall"], same["coverage"]) == (1.0, 1.0, 1.0)
    far = neighbour_scores(points, points + 1000)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_the_neighbour_scores_need_one_point_more_than_their_largest_k():
    """Each point's k-th neighbour is searched among the others: k = 5 needs 6 points (--eval-samples
    5 gives no neighbour scores, and no error)."""
    points = np.random.default_rng(3).normal(size=(6, 5))
    assert neighbour_scores(points[:5], points[:5] + 0.1) == {}
    assert set(neighbour_scores(points, points + 0.1)) == {"precision", "recall", "density", "coverage"}


def test_the_four_scores_of_a_case_worked_by_hand():
    """Real points at 0..6 on a line: their 3rd-neighbour radii are 3, 2, 2, 2, 2, 2, 3 and their
    5th-neighbour radii 5, 4, 3, 3, 3, 4, 5. Generated: two points at 0, one at -3, four at 50.
    Precision: the points at 0 and the one at -3, on the edge of real 0's ball (3 <= 3): 3/7.
    Recall: a point at 0 has the radius 50 (its 3rd neighbour is at 50), a ball that holds every
    real point: 1. Density: a point at 0 is inside the k=5 balls of 0, 1 and 2 (0 < 5, 1 < 4, 2 < 3,
    not 3 < 3), the one at -3 inside real 0's only (3 < 5, not 4 < 4): (3 + 3 + 1) / (5 * 7) = 1/5.
    Coverage: the balls of 0, 1 and 2 hold a generated point, not that of 3 (3 < 3): 3/7."""
    real = np.arange(7.0)[:, None]
    fake = np.array([0, 0, -3, 50, 50, 50, 50], dtype=float)[:, None]
    expected = {"precision": 3 / 7, "recall": 1.0, "density": 1 / 5, "coverage": 3 / 7}
    assert neighbour_scores(real, fake) == pytest.approx(expected)
    assert neighbour_scores_by_hand(real, fake) == pytest.approx(expected)


def test_score_generator_gives_the_four_scores_of_the_same_features(tmp_path):
    real, fake, scores = scores_of_pixel_sets(tmp_path)
    expected = neighbour_scores_by_hand(real.astype(np.float64), fake.astype(np.float64))
    assert {name: scores[name] for name in NEIGHBOUR_SCORES} == pytest.approx(expected, abs=1e-9)


def test_the_real_features_kept_are_a_shuffled_sample_and_a_short_cache_is_rebuilt(tmp_path):
    real = torch.arange(200, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 1, 1)  # image i: grey level i
    cache = tmp_path / "real.pt"
    first = metrics.build_metrics(torch.device("cpu"), 200, PixelFeatures())
    metrics.add_real_images(first, real, cache, batch_size=16, keep_real=40)
    kept = torch.cat(first["kid"].real_features)[:, 0]
    assert len(kept) == 48  # whole batches of 16
    assert kept.tolist() != sorted(kept.tolist())  # a random sample, not the folder's first images
    again = metrics.build_metrics(torch.device("cpu"), 200, PixelFeatures())
    metrics.add_real_images(again, real, cache, batch_size=16, keep_real=40)
    assert torch.cat(again["kid"].real_features)[:, 0].tolist() == kept.tolist()  # read from the cache
    more = metrics.build_metrics(torch.device("cpu"), 200, PixelFeatures())
    metrics.add_real_images(more, real, cache, batch_size=16, keep_real=100)
    assert len(torch.cat(more["kid"].real_features)) == 112  # the cache held too few: computed again


def test_the_fid_plot_draws_the_four_scores_beside_fid(tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(artifacts, "save_figure", lambda figure, path: drawn.update(figure=figure))
    rows = [
        {"epoch": 1, "step": 4, "fid": 90.0, "precision": 0.2, "recall": 0.1, "density": 0.3, "coverage": 0.25},
        {"epoch": 1, "step": 4, "loss_d": 1.0},  # a training row: no point
        {"epoch": 2, "step": 8, "fid": 70.0, "precision": 0.4, "recall": 0.3, "density": 0.8, "coverage": 0.5},
    ]
    artifacts.plot_fid(rows, tmp_path / "fid.png")
    fid_axes, neighbour_axes = drawn["figure"].axes
    assert fid_axes.lines[0].get_ydata().tolist() == [90.0, 70.0]
    lines = {line.get_label(): line for line in neighbour_axes.lines}
    assert set(lines) == set(NEIGHBOUR_SCORES)
    for name in NEIGHBOUR_SCORES:
        assert lines[name].get_xdata().tolist() == [1, 2]
        assert lines[name].get_ydata().tolist() == [rows[0][name], rows[2][name]]


# ---------------------------------------------------------------- the CLI wiring


def test_fid_every_logs_fid_plots_it_and_keeps_the_best(gan_main, stand_in, tiny_args, tmp_path):
    code, _, err = gan_main([*tiny_args, *EVAL_ARGS, "--epochs", "2", "--fid-every", "1"], stand_in)
    assert code == 0, err
    rows = [row for row in read_rows(tmp_path / "checkpoints" / "metrics.jsonl") if "fid" in row]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert all(np.isfinite([row["fid"], row["is"], row["kid"]]).all() for row in rows)
    for row in rows:  # 16 generated against 16 of the 32 real images
        assert all(0 <= row[name] <= 1 for name in ("precision", "recall", "coverage")) and row["density"] >= 0
    assert (tmp_path / "images" / "fid.png").stat().st_size > 0
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert best["best_fid"] == pytest.approx(min(row["fid"] for row in rows))
    assert best["epoch"] == min(rows, key=lambda row: row["fid"])["epoch"]
    # the checkpoint keeps the best so far too: a resume compares with it
    last = torch.load(tmp_path / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert last["best_fid"] == best["best_fid"]


def test_the_real_statistics_are_computed_once_and_then_read(gan_main, stand_in, tiny_args, tmp_path):
    real_count = 32  # --subset 32 in TINY_ARGS; generated batches hold 16 (--eval-samples)
    code, _, err = gan_main([*tiny_args, *EVAL_ARGS, "--epochs", "1", "--fid-every", "1"], stand_in)
    assert code == 0, err
    # saved after the epoch's FID, the checkpoint holds it as the best so far, for a resume to compare with
    (row,) = [row for row in read_rows(tmp_path / "checkpoints" / "metrics.jsonl") if "fid" in row]
    assert torch.load(tmp_path / "checkpoints" / "checkpoint.pt", weights_only=True)["best_fid"] == row["fid"]
    caches = list((tmp_path / "checkpoints").glob("fid_real_*.pt"))
    assert len(caches) == 1
    assert stand_in.batch_sizes.count(real_count) == 2  # FID and KID, once each
    written = caches[0].stat().st_mtime_ns
    stand_in.batch_sizes.clear()
    code, _, err = gan_main([*tiny_args, *EVAL_ARGS, "--epochs", "2", "--fid-every", "1", "--resume"], stand_in)
    assert code == 0, err
    assert real_count not in stand_in.batch_sizes
    assert stand_in.batch_sizes  # the generated images were still scored
    assert caches[0].stat().st_mtime_ns == written


def test_evaluate_prints_and_logs_fid_is_and_kid(gan_main, stand_in, tiny_args, tmp_path):
    code, _, err = gan_main([*tiny_args, "--epochs", "1"], stand_in)
    assert code == 0, err
    code, out, err = gan_main(["--evaluate", *EVAL_ARGS, "--device", "cpu", "--seed", "3"], stand_in)
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("FID"))
    assert " IS " in line and " KID " in line and "16 generated images" in line
    logged = [row for row in read_rows(tmp_path / "checkpoints" / "metrics.jsonl") if "evaluate" in row]
    assert len(logged) == 1
    assert f"FID {logged[0]['fid']:.2f}" in line
    assert {"fid", "is", "is_std", "kid", "kid_std", *NEIGHBOUR_SCORES} <= set(logged[0])
    for name in NEIGHBOUR_SCORES:
        assert f"{name} {logged[0][name]:.3f}" in line


def test_evaluate_scores_the_images_of_noise_truncated_as_truncation_says(gan_main, tiny_args, tmp_path):
    """--evaluate --truncation 0.5 --seed 3 scores G's images of --seed 3's noise drawn from a normal
    truncated to [-0.5, 0.5], by hand from the checkpoint's EMA generator."""
    code, _, err = gan_main([*tiny_args, "--epochs", "1"])
    assert code == 0, err
    recorder = ImageRecordingFeatures()
    argv = ["--evaluate", *EVAL_ARGS, "--device", "cpu", "--precision", "fp32", "--seed", "3", "--truncation", "0.5"]
    code, _, err = gan_main(argv, recorder)
    assert code == 0, err
    G, nz = saved_generator(tmp_path / "checkpoints" / "checkpoint.pt")
    expected = drawn_pixels(G, truncated_noise(16, nz, 0.5, torch.Generator().manual_seed(3)))
    generated = [images for images in recorder.batches if len(images) == 16]  # the real batches hold 32
    assert len(generated) == 3  # FID, KID and IS each see them
    for images in generated:
        torch.testing.assert_close(images.int(), expected, rtol=0, atol=1)


def image_rows(images):
    """The images of a uint8 batch as sorted bytes: the same set in any order compares equal."""
    return sorted(bytes(image.contiguous().numpy()) for image in images)


def test_evaluate_scores_against_the_subset_the_run_trained_on(trained_run, gan_main, tiny_args, tmp_path):
    """A --subset 32 --seed 1 run is scored against its own 32 images, drawn with the run's seed:
    without --seed, and with --seed 5, which draws other samples but the same real images."""
    copy_run(trained_run, tmp_path)
    opts, _ = options.parse_flags([*tiny_args, "--epochs", "2"])
    trained_on = image_rows(utils.load_training_data(opts, torch.device("cpu"), with_labels=False).images)
    generated = []
    for seed in ([], ["--seed", "5"]):
        for cache in (tmp_path / "checkpoints").glob("fid_real_*.pt"):
            cache.unlink()  # each evaluation reads the real images again
        recorder = ImageRecordingFeatures()
        code, _, err = gan_main(["--evaluate", *EVAL_ARGS, "--device", "cpu", *seed], recorder)
        assert code == 0, err
        real = [images for images in recorder.batches if len(images) != 16]  # the generated batches hold 16
        assert len(real) == 2 and all(image_rows(images) == trained_on for images in real)  # FID's and KID's
        generated.append(next(images for images in recorder.batches if len(images) == 16))
    assert not torch.equal(*generated)


def test_evaluate_of_a_checkpoint_elsewhere_logs_beside_it(trained_run, gan_main, stand_in, tmp_path):
    copy_run(trained_run, tmp_path / "run")
    argv = ["--evaluate", *EVAL_ARGS, "--device", "cpu", "--checkpoint", "run/checkpoints/checkpoint.pt"]
    code, _, err = gan_main(argv, stand_in)
    assert code == 0, err
    rows = read_rows(tmp_path / "run" / "checkpoints" / "metrics.jsonl")
    assert rows[-1]["evaluate"] == "run/checkpoints/checkpoint.pt" and "fid" in rows[-1]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]  # no ./checkpoints made


def test_cifar10_s_shared_real_statistics_are_named_for_the_seed_that_drew_a_subset():
    """CIFAR-10's cache in --dataroot serves every run: two seeds' subsets of one size hold other
    images, and a cache each; the whole training set's does not depend on the seed."""
    real = torch.zeros(40, 3, 32, 32, dtype=torch.uint8)

    def cache(*flags):
        opts, _ = options.parse_flags(["--dataroot", "data", *flags])
        return sampling.real_cache(opts, real).name

    assert cache("--subset", "40", "--seed", "1") == "fid_real_cifar10_40_seed1_32px.pt"
    assert cache("--subset", "40", "--seed", "2") == "fid_real_cifar10_40_seed2_32px.pt"
    assert cache("--seed", "1") == cache("--seed", "2") == "fid_real_cifar10_40_32px.pt"
    folder = ["--dataset", "folder", "--checkpoint-dir", "run", "--subset", "40", "--seed", "1"]
    assert cache(*folder) == "fid_real_folder_40_32px.pt"  # beside its run's checkpoint, one run's


# ---------------------------------------------------------------- offline: no Inception weights


@pytest.fixture
def no_inception_weights(monkeypatch, tmp_path):
    """The Inception download fails, whatever the network does, as offline: after torch hub made
    its folders for the file; torch hub points into tmp_path."""

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_evaluate_without_weights_exits_2_naming_where_they_go(gan_main, no_inception_weights, tiny_args):
    code, _, err = gan_main([*tiny_args, "--epochs", "1"])
    assert code == 0, err
    code, out, err = gan_main(["--evaluate", *EVAL_ARGS, "--device", "cpu"])
    assert code == 2
    assert str(no_inception_weights) in err
    assert "weights-inception-2015-12-05-6726825d.pth" in err


@pytest.mark.parametrize("mode", ["evaluate", "training"])
def test_a_failed_weights_download_leaves_no_folder_behind(mode, request, gan_main, no_inception_weights, tmp_path):
    """torch hub makes ~/.cache/torch/hub/checkpoints/ before it downloads; offline, none stays,
    and the user reads one message: an error for --evaluate, a warning for training (after torch
    hub's line announcing the download)."""
    if mode == "evaluate":
        copy_run(request.getfixturevalue("trained_run"), tmp_path)
        code, _, err = gan_main(["--evaluate", *EVAL_ARGS, "--device", "cpu"])
        hub_line, error_line = err.splitlines()
        assert code == 2 and hub_line.startswith(f'Downloading: "{metrics.INCEPTION_URL}" to ')
        assert error_line.startswith("gan.py: error: the Inception weights could not be loaded (")
    else:
        code, _, err = gan_main([*TINY_ARGS, *EVAL_ARGS, "--epochs", "1", "--fid-every", "1"])
        assert code == 0 and err.count("Inception weights could not be loaded") == 1
    assert "no network in this test" in err and str(no_inception_weights) in err and "Traceback" not in err
    assert not (tmp_path / "torch_home").exists()


class RunsCode:
    """Unpickled in full, it makes the file it names: what a weights file copied in by hand could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_weights_file_that_would_run_code_is_refused_before_torch_fidelity_unpickles_it(
    trained_run, gan_main, no_inception_weights, tmp_path
):
    copy_run(trained_run, tmp_path)
    no_inception_weights.mkdir(parents=True)
    weights = no_inception_weights / metrics.INCEPTION_URL.rsplit("/", 1)[1]
    torch.save({"fc.weight": RunsCode(tmp_path / "ran")}, weights)
    code, _, err = gan_main(["--evaluate", *EVAL_ARGS, "--device", "cpu"])
    assert code == 2 and err.splitlines() == [
        f"gan.py: error: {weights} is not the Inception weights file: it holds Python objects besides tensors and "
        f"numbers, and loading those could run code; remove it, and it is downloaded from {metrics.INCEPTION_URL} "
        "on first use"
    ]
    assert not (tmp_path / "ran").exists()
    torch.save({"fc.weight": torch.zeros(1)}, weights)  # tensors alone pass on to torch-fidelity, which says why not
    code, _, err = gan_main(["--evaluate", *EVAL_ARGS, "--device", "cpu"])
    assert code == 2 and "error: the Inception weights could not be loaded (Error(s) in loading state_dict" in err


def test_evaluate_without_weights_decodes_no_folder_first(
    gan_main, no_inception_weights, tmp_path, cache_dir, monkeypatch
):
    data = write_folder(tmp_path / "data", 8)
    code, _, err = gan_main(folder_run(data))
    assert code == 0, err
    shutil.rmtree(cache_dir / foldercache.FOLDER_CACHE_NAME)
    monkeypatch.setattr(folders, "read_image", lambda *args: pytest.fail("decoded before loading Inception"))
    code, out, err = gan_main(["--evaluate", *EVAL_ARGS, "--device", "cpu", "--dataroot", data])
    assert code == 2 and "weights-inception-2015-12-05-6726825d.pth" in err
    assert list(cache_dir.iterdir()) == []
    # a folder that is not there is the first thing to tell, before the weights' download fails
    code, out, err = gan_main(["--evaluate", *EVAL_ARGS, "--device", "cpu", "--dataroot", tmp_path / "moved"])
    assert code == 2 and err == f"gan.py: error: data folder {tmp_path / 'moved'} does not exist\n"


def test_training_without_weights_warns_once_and_trains_on(gan_main, no_inception_weights, tiny_args, tmp_path):
    code, _, err = gan_main([*tiny_args, *EVAL_ARGS, "--epochs", "2", "--fid-every", "1"])
    assert code == 0, err
    assert err.count("warning:") == 1
    assert "Inception weights" in err and str(no_inception_weights) in err
    state = torch.load(tmp_path / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2
    assert not any("fid" in row for row in read_rows(tmp_path / "checkpoints" / "metrics.jsonl"))
    assert not (tmp_path / "checkpoints" / "best.pt").exists()


def test_scoring_fid_while_training_changes_nothing_the_run_trains(gan_main, stand_in, tiny_args, tmp_path):
    """--seed N --fid-every 1 twice gives the same weights, and the same as without FID: scoring
    draws its noise from its own generator and leaves the training RNG as it found it."""
    runs = {"fid_a": ["--fid-every", "1"], "fid_b": ["--fid-every", "1"], "no_fid": []}
    for name, flags in runs.items():
        argv = [
            *tiny_args,
            *EVAL_ARGS,
            "--epochs",
            "2",
            *flags,
            "--checkpoint-dir",
            name,
            "--image-dir",
            f"{name}_images",
        ]
        code, _, err = gan_main(argv, stand_in)
        assert code == 0, err
    states = {name: torch.load(tmp_path / name / "checkpoint.pt", weights_only=True) for name in runs}
    fids = [
        [row["fid"] for row in read_rows(tmp_path / name / "metrics.jsonl") if "fid" in row]
        for name in ("fid_a", "fid_b")
    ]
    assert fids[0] == fids[1] and len(fids[0]) == 2
    for name in ("fid_b", "no_fid"):
        for key in ("netG", "netD", "netG_ema", "optG"):
            torch.testing.assert_close(states[name][key], states["fid_a"][key], rtol=0, atol=0, msg=f"{name} {key}")


def test_the_ema_has_its_own_batchnorm_statistics_before_the_grid_and_fid(
    monkeypatch, gan_main, stand_in, tiny_args, tmp_path
):
    """Every sample drawn at the epoch's end (its grid, FID's images, the final comparison) comes from the
    average with the statistics estimate_batch_norm gives its weights, not the trained G's."""
    drawn = []
    real_sample = sampling.sample

    def recording(G, noise, runtime, *labels):
        drawn.append({name: value.clone() for name, value in G.state_dict().items()})
        return real_sample(G, noise, runtime, *labels)

    monkeypatch.setattr(sampling, "sample", recording)
    code, _, err = gan_main([*tiny_args, *EVAL_ARGS, "--epochs", "1", "--fid-every", "1", "--ema", "0.5"], stand_in)
    assert code == 0, err
    state = torch.load(tmp_path / "checkpoints" / "checkpoint.pt", weights_only=True)
    G = sampling.generator_of(state["flags"])
    G.load_state_dict(state["netG_ema"])
    cpu = torch.device("cpu")
    with Runtime(cpu, choose_precision("auto", cpu)).autocast():  # as the run estimated them
        models.estimate_batch_norm(G.to(memory_format=torch.channels_last), state["flags"]["nz"], cpu)
    statistics = [name for name in state["netG"] if "running" in name]
    assert len(drawn) >= 3  # the grid, FID's 16 images, the final real-vs-fake picture
    for index, weights in enumerate(drawn):
        for name, value in G.state_dict().items():
            torch.testing.assert_close(weights[name], value, msg=f"{index} of {len(drawn)}: {name}")
    assert all(not torch.allclose(state["netG"][name], G.state_dict()[name]) for name in statistics)


# ---------------------------------------------------------------- --evaluate --images DIR


def write_colour_pngs(folder, colours, size):
    """One solid-colour PNG per colour (width x height = size), under folder and a subfolder."""
    from PIL import Image

    for index, colour in enumerate(colours):
        path = folder / ("more" if index % 2 else "") / f"{index:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, tuple(int(c) for c in colour)).save(path)


def test_evaluate_images_scores_a_folder_against_cifar10_train_at_32_px(gan_main, stand_in, tmp_path):
    """The default protocol: CIFAR-10's training images. A folder holding those same images at
    64 x 48 px is resized to 32 px (solid colours come through exactly): the same set, so FID 0 and
    precision, recall and coverage 1."""
    training = write_cifar10_archive(tmp_path / "data", images_per_batch=6)  # 30 training images
    write_colour_pngs(tmp_path / "theirs", training[:, :, 0, 0], (64, 48))
    code, out, err = gan_main(["--evaluate", "--images", "theirs", "--device", "cpu"], stand_in)
    assert code == 0, err
    assert stand_in.batch_sizes[:2] == [30, 30]  # real: FID and KID; the test batch is not read
    row = read_rows(tmp_path / "checkpoints" / "metrics.jsonl")[-1]
    assert row["images"] == "theirs" and row["count"] == 30
    assert row["fid"] == pytest.approx(0, abs=1e-3)
    assert (row["precision"], row["recall"], row["coverage"]) == (1.0, 1.0, 1.0)
    assert "30 images of theirs at 32 px, against 30 real" in out
    assert f"precision {row['precision']:.3f}" in out


def test_evaluate_images_decodes_the_folder_at_the_real_images_side_not_image_size(gan_main, stand_in, tmp_path):
    """--image-size 16 against CIFAR-10's 32 px images: the folder's 64 x 48 px images are scored at
    32 px, the side of the real ones, as the line says; the same colours, so FID 0."""
    training = write_cifar10_archive(tmp_path / "data", images_per_batch=2)  # 10 training images
    write_colour_pngs(tmp_path / "theirs", training[:, :, 0, 0], (64, 48))
    argv = ["--evaluate", "--images", "theirs", "--device", "cpu", "--image-size", "16", "--workers", "0"]
    code, out, err = gan_main(argv, stand_in)
    assert code == 0, err
    assert stand_in.batch_sizes == [10] * 5  # real: FID and KID; the folder's: FID, KID and IS
    assert stand_in.sides == [32] * 5
    assert read_rows(tmp_path / "checkpoints" / "metrics.jsonl")[-1]["fid"] == pytest.approx(0, abs=1e-3)
    assert "10 images of theirs at 32 px, against 10 real" in out


@pytest.mark.parametrize(
    "make, argv_end, message",
    [
        (lambda root: None, [], "--images theirs does not exist"),
        (lambda root: (root / "theirs").write_text("x"), [], "--images theirs is a file"),
        (lambda root: (root / "theirs").mkdir(), [], "holds 0 image files"),
        (
            lambda root: write_colour_pngs(root / "theirs", [(1, 2, 3)], (8, 8)),
            [],
            "--images theirs holds 1 image file; scoring needs 2 at the least (.bmp,",
        ),
        (
            lambda root: write_colour_pngs(root / "theirs", [(1, 2, 3)] * 3, (8, 8)),
            ["--eval-samples", "9"],
            "--eval-samples does not apply",
        ),
    ],
)
def test_evaluate_images_refuses_a_bad_folder_in_one_line(gan_main, stand_in, tmp_path, make, argv_end, message):
    make(tmp_path)
    before = snapshot(tmp_path)
    code, _, err = gan_main(["--evaluate", "--images", "theirs", "--device", "cpu", *argv_end], stand_in)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before and not (tmp_path / "checkpoints").exists()


def test_evaluate_images_refuses_a_folder_of_unreadable_files(gan_main, stand_in, tiny_args, tmp_path):
    write_colour_pngs(tmp_path / "real", [(i, 2 * i, 3 * i) for i in range(8)], (16, 16))
    (tmp_path / "theirs").mkdir()
    for name in ("a.png", "b.jpg"):
        (tmp_path / "theirs" / name).write_bytes(b"not an image")
    argv = ["--evaluate", "--images", "theirs", "--device", "cpu", "--dataset", "folder", "--dataroot", "real"]
    code, _, err = gan_main([*argv, "--image-size", "16", "--workers", "0"], stand_in)
    assert code == 2
    assert "--images theirs holds 0 readable images" in err


# 2,048 pool features for KID and 1,008 logits for IS, in float32, each copied once when scored
FEATURE_BYTES_PER_IMAGE = 2 * 4 * (2048 + 1008)


def test_training_refuses_to_score_more_images_than_the_memory_holds(gan_main, tiny_args, tmp_path):
    """--fid-every 1 --eval-samples 10**10: 24,448 bytes of features each, 222.4 TiB, refused before
    the data is read; without --fid-every training scores nothing, and the count is not checked."""
    huge = ["--epochs", "1", "--eval-samples", "10000000000"]
    code, _, err = gan_main([*tiny_args, *huge, "--fid-every", "1"])
    line = err.strip()
    assert code == 2 and "\n" not in line, err
    assert line.startswith(
        "gan.py: error: --eval-samples 10000000000: the Inception features of 10,000,000,000 images need about "
        "222.4 TiB of memory, and cpu has "
    )
    assert line.endswith(" free: score fewer images")
    assert not any(tmp_path.iterdir())
    code, _, err = gan_main([*tiny_args, *huge, "--dataset", "folder", "--dataroot", "missing"])
    assert code == 2 and err.strip() == "gan.py: error: data folder missing does not exist"


def test_evaluate_refuses_more_images_than_the_memory_holds_to_the_byte(
    trained_run, gan_main, stand_in, tmp_path, monkeypatch
):
    """16 images need 391,168 bytes of features: one byte fewer is refused before any is drawn."""
    copy_run(trained_run, tmp_path)
    needed = 16 * FEATURE_BYTES_PER_IMAGE
    monkeypatch.setattr(startup, "free_memory_bytes", lambda device: needed - 1)
    code, _, err = gan_main(["--evaluate", *EVAL_ARGS, "--device", "cpu"], stand_in)
    assert code == 2 and err.strip() == (
        "gan.py: error: --eval-samples 16: the Inception features of 16 images need about 382.0 KiB of memory, "
        "and cpu has 382.0 KiB free: score fewer images"
    )
    assert stand_in.batch_sizes == []
    monkeypatch.setattr(startup, "free_memory_bytes", lambda device: needed)
    code, out, err = gan_main(["--evaluate", *EVAL_ARGS, "--device", "cpu"], stand_in)
    assert code == 0 and "(16 generated images)" in out, err


def test_evaluate_images_refuses_a_folder_whose_features_the_memory_cannot_hold(
    gan_main, stand_in, tmp_path, monkeypatch
):
    """3 images need 73,344 bytes of features: with one byte fewer free, refused before decoding."""
    write_colour_pngs(tmp_path / "theirs", [(i, 2 * i, 3 * i) for i in range(3)], (16, 16))
    monkeypatch.setattr(startup, "free_memory_bytes", lambda device: 3 * FEATURE_BYTES_PER_IMAGE - 1)
    monkeypatch.setattr(folders, "read_image", lambda *args: pytest.fail("decoded before the memory check"))
    code, _, err = gan_main(["--evaluate", "--images", "theirs", "--device", "cpu"], stand_in)
    assert code == 2 and err.strip() == (
        "gan.py: error: --images theirs: the Inception features of 3 images need about 71.6 KiB of memory, "
        "and cpu has 71.6 KiB free: score fewer images"
    )


def test_images_needs_evaluate(gan_main, tmp_path):
    code, _, err = gan_main(["--images", "theirs", "--epochs", "1"])
    assert code == 2 and "--images DIR goes with --evaluate" in err


def test_evaluate_images_without_weights_names_the_file_and_folder(gan_main, no_inception_weights, tmp_path):
    write_colour_pngs(tmp_path / "real", [(i, 2 * i, 3 * i) for i in range(8)], (16, 16))
    argv = ["--evaluate", "--images", "real", "--device", "cpu", "--dataset", "folder", "--dataroot", "real"]
    code, _, err = gan_main([*argv, "--image-size", "16", "--workers", "0"])
    assert code == 2
    assert str(no_inception_weights) in err and metrics.INCEPTION_URL in err
