"""Exact resume for every kind of dataset: 1 epoch and a resume to 2 give bitwise the weights,
optimizer state and metrics log of 2 epochs in one go (CPU, one thread, fixed seed).

Every run decodes its data afresh (the decoded-image cache is removed first), so that a data
loader drawing from the global RNG after the checkpoint's RNG state was restored would show.
"""

import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_ARGS, write_cifar10_archive
from PIL import Image

import foldercache


def write_image_folder(folder, count=32):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"image_{index:02d}.png")


def dataset_flags(kind, tmp_path):
    if kind == "fake":
        return ["--dataset", "fake"]
    data = tmp_path / "data"
    if kind.startswith("cifar10"):
        data.mkdir()
        write_cifar10_archive(data, images_per_batch=8)
        return [
            "--dataset",
            "cifar10",
            "--dataroot",
            data,
            *(["--conditional"] if kind.endswith("conditional") else []),
        ]
    write_image_folder(data)
    return ["--dataset", "folder", "--dataroot", data, "--workers", kind.split("-")[1]]


def drop_decoded_caches(cache_dir):
    shutil.rmtree(cache_dir / foldercache.FOLDER_CACHE_NAME, ignore_errors=True)


def folders_of(name):
    return ["--checkpoint-dir", name, "--image-dir", f"{name}_images"]


@pytest.mark.parametrize("kind", ["fake", "folder-0", "folder-2", "cifar10", "cifar10-conditional"])
def test_one_epoch_and_a_resume_equal_two_epochs_in_one_go(kind, gan_main, tmp_path, cache_dir):
    data = dataset_flags(kind, tmp_path)
    runs = [
        [*TINY_ARGS, *data, "--epochs", "2", *folders_of("straight")],
        [*TINY_ARGS, *data, "--epochs", "1", *folders_of("resumed")],
        # only what a user types to resume: the folders a checkpoint never chooses, and the new end
        ["--resume", *data[2:], *folders_of("resumed"), "--epochs", "2", "--device", "cpu", "--no-compile"],
    ]
    for argv in runs:
        drop_decoded_caches(cache_dir)
        code, out, err = gan_main(argv)
        assert code == 0, err
    assert "resuming" in out
    straight, resumed = (torch.load(tmp_path / name / "checkpoint.pt") for name in ("straight", "resumed"))
    assert resumed["step"] == straight["step"] == 8
    assert resumed.get("class_names") == straight.get("class_names")
    assert ("class_names" in straight) == kind.endswith("conditional")
    for key in ("netG", "netD", "netG_ema", "optG", "optD", "fixed_noise", "rng"):
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")
    log = "metrics.jsonl"
    assert (tmp_path / "resumed" / log).read_text() == (tmp_path / "straight" / log).read_text()


def test_ada_and_mirror_resume_exactly_from_inside_an_interval(gan_main, tmp_path):
    """--ada --mirror: 2 epochs and a resume to 3 give bitwise the weights, p, the interval's sums
    and the log of 3 epochs in one go. 3 steps per epoch against ADA's interval of 4: the first
    checkpoint stops 2 steps into an interval, and p has moved once (at step 4) before it."""
    ada = [*TINY_ARGS, "--seed", "2", "--subset", "24", "--ada", "--ada-target", "0.2", "--mirror"]
    code, _, err = gan_main([*ada, "--epochs", "3", *folders_of("straight")])
    assert code == 0, err
    code, _, err = gan_main([*ada, "--epochs", "2", *folders_of("resumed")])
    assert code == 0, err
    halfway = torch.load(tmp_path / "resumed" / "checkpoint.pt")["augment"]
    assert halfway["steps"] == 2 and halfway["signs"][1].item() == 16 and halfway["p"].item() > 0
    code, out, err = gan_main(["--resume", *folders_of("resumed"), "--epochs", "3", "--device", "cpu", "--no-compile"])
    assert code == 0, err
    straight, resumed = (torch.load(tmp_path / name / "checkpoint.pt") for name in ("straight", "resumed"))
    assert resumed["step"] == straight["step"] == 9 and straight["augment"]["steps"] == 1
    for key in ("netG", "netD", "netG_ema", "optG", "optD", "rng", "augment"):
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")
    log = "metrics.jsonl"
    assert (tmp_path / "resumed" / log).read_text() == (tmp_path / "straight" / log).read_text()
