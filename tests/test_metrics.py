"""FID, IS and KID: the maths against a hand computation, the wiring of --fid-every and
--evaluate, the real-statistics cache, and the offline behaviour without Inception weights.

A small stand-in feature net replaces Inception (no download, no GPU).
"""

import json
import shutil
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch
from test_data_cache import folder_run, write_folder
from torch import nn

import folders
import metrics
import models
import sampling

EVAL_ARGS = ("--eval-samples", "16")


class StandInFeatures(nn.Module):
    """uint8 (N, 3, H, W) -> (N, 4) float: channel means and the overall spread.

    Records the size of every batch it sees, so a test can tell real from generated calls.
    """

    num_features = 4

    def __init__(self):
        super().__init__()
        self.batch_sizes = []

    def forward(self, images_uint8):
        assert images_uint8.dtype == torch.uint8
        self.batch_sizes.append(len(images_uint8))
        images = images_uint8.float() / 255
        return torch.cat([images.mean(dim=(2, 3)), images.flatten(1).std(dim=1, keepdim=True)], dim=1)


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


def test_score_generator_gives_the_hand_computed_fid(tmp_path):
    real, fake = pixel_sets()
    scorers = metrics.build_metrics(torch.device("cpu"), len(fake), PixelFeatures())
    metrics.add_real_images(scorers, torch.from_numpy(real).view(-1, 3, 1, 1), tmp_path / "real.pt")
    # generated images arrive as floats in [-1, 1]; these map back to the same uint8 values
    fake_float = torch.from_numpy(fake).double().view(-1, 3, 1, 1).div(127.5).sub(1).float()
    scores = metrics.score_generator(scorers, [fake_float[:120], fake_float[120:]])
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


# ---------------------------------------------------------------- the CLI wiring


def test_fid_every_logs_fid_plots_it_and_keeps_the_best(gan_main, stand_in, tiny_args, tmp_path):
    code, _, err = gan_main([*tiny_args, *EVAL_ARGS, "--epochs", "2", "--fid-every", "1"], stand_in)
    assert code == 0, err
    rows = [row for row in read_rows(tmp_path / "checkpoints" / "metrics.jsonl") if "fid" in row]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert all(np.isfinite([row["fid"], row["is"], row["kid"]]).all() for row in rows)
    assert (tmp_path / "images" / "fid.png").stat().st_size > 0
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert best["best_fid"] == pytest.approx(min(row["fid"] for row in rows))
    assert best["epoch"] == min(rows, key=lambda row: row["fid"])["epoch"]


def test_the_real_statistics_are_computed_once_and_then_read(gan_main, stand_in, tiny_args, tmp_path):
    real_count = 32  # --subset 32 in TINY_ARGS; generated batches hold 16 (--eval-samples)
    code, _, err = gan_main([*tiny_args, *EVAL_ARGS, "--epochs", "1", "--fid-every", "1"], stand_in)
    assert code == 0, err
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
    assert {"fid", "is", "is_std", "kid", "kid_std"} <= set(logged[0])


# ---------------------------------------------------------------- offline: no Inception weights


@pytest.fixture
def no_inception_weights(monkeypatch, tmp_path):
    """The Inception download fails, whatever the network does; torch.hub points into tmp_path."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(inception, "load_state_dict_from_url", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_evaluate_without_weights_exits_2_naming_where_they_go(gan_main, no_inception_weights, tiny_args):
    code, _, err = gan_main([*tiny_args, "--epochs", "1"])
    assert code == 0, err
    code, out, err = gan_main(["--evaluate", *EVAL_ARGS, "--device", "cpu"])
    assert code == 2
    assert str(no_inception_weights) in err
    assert "weights-inception-2015-12-05-6726825d.pth" in err


def test_evaluate_without_weights_decodes_no_folder_first(
    gan_main, no_inception_weights, tmp_path, cache_dir, monkeypatch
):
    data = write_folder(tmp_path / "data", 8)
    code, _, err = gan_main(folder_run(data))
    assert code == 0, err
    shutil.rmtree(cache_dir / folders.FOLDER_CACHE_NAME)
    monkeypatch.setattr(folders, "read_image", lambda *args: pytest.fail("decoded before loading Inception"))
    code, out, err = gan_main(["--evaluate", *EVAL_ARGS, "--device", "cpu", "--dataroot", data])
    assert code == 2 and "weights-inception-2015-12-05-6726825d.pth" in err
    assert list(cache_dir.iterdir()) == []


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
    models.estimate_batch_norm(G, state["flags"]["nz"], torch.device("cpu"))
    statistics = [name for name in state["netG"] if "running" in name]
    assert len(drawn) >= 3  # the grid, FID's 16 images, the final real-vs-fake picture
    for index, weights in enumerate(drawn):
        for name, value in G.state_dict().items():
            torch.testing.assert_close(weights[name], value, msg=f"{index} of {len(drawn)}: {name}")
    assert all(not torch.allclose(state["netG"][name], G.state_dict()[name]) for name in statistics)
