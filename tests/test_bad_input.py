"""Bad input: every mistake gets exit code 2, one clear line on stderr, no traceback, and
leaves what is already on disk untouched. Ends with fuzzing of the flag parser and of the
checkpoint reader: they may only succeed or raise UserError."""

import io
import json
import math
import os
import pickle
import random
import shutil
import tarfile
import urllib.error
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARGS, RunsCode, copy_run, measured_values, run_gan, snapshot, write_cifar10_archive
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_classes import class_folder
from test_data_cache import write_folder

import checkpoint
import modes
import options
import startup
import utils
from errors import UserError


def assert_user_error(code, err, phrase):
    """Exit 2, the phrase in a single 'gan.py: error: ...' line, and no traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("gan.py: error: ")
    assert phrase in lines[0], err


@pytest.fixture
def no_download(monkeypatch):
    """Make any CIFAR-10 download fail at once, as on an offline machine; records the calls."""
    import torchvision.datasets.utils

    calls = []

    def offline(url, root, filename=None, md5=None, **kwargs):
        calls.append(url)
        Path(root).mkdir(parents=True, exist_ok=True)  # as torchvision does before it connects
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", offline)
    return calls


# ---------------------------------------------------------------- flags


BAD_FLAGS = [
    (["--epochs", "-1"], "--epochs: must be a positive integer, got -1"),
    (["--epochs", "0"], "--epochs: must be a positive integer, got 0"),
    (["--epochs", "two"], "--epochs: invalid"),
    (["--batch-size", "0"], "--batch-size: must be a positive integer"),
    (
        ["--image-size", "48"],
        "--image-size: must be a power of two from 16 to 256, or WIDTHxHEIGHT with each side one (64x32), got 48",
    ),
    (["--lr", "-1"], "--lr: must be a positive number, got -1"),
    (["--lr", "nan"], "--lr: must be a positive number, got nan"),
    (["--lr", "inf"], "--lr: must be a positive number, got inf"),
    (["--beta1", "1.5"], "--beta1: must be in [0, 1), got 1.5"),
    (["--label-smoothing", "1"], "--label-smoothing: must be in [0, 1), got 1"),
    (["--spectral-loss", "-0.5"], "--spectral-loss: must be from 0 to 1000, got -0.5"),
    (["--spectral-loss", "nan"], "--spectral-loss: must be from 0 to 1000, got nan"),
    (["--spectral-loss", "1001"], "--spectral-loss: must be from 0 to 1000, got 1001"),
    (["--r1", "1e300"], "--r1: must be from 0 to 1000, got 1e300"),
    (["--r1", "inf"], "--r1: must be from 0 to 1000, got inf"),
    (["--r1", "1", "--r1-every", "0"], "--r1-every: must be a positive integer, got 0"),
    (["--r1-every", "4"], "--r1-every applies with --r1 (the penalty's weight), which is 0 in this run"),
    (["--class-loss", "1e300", "--conditional"], "--class-loss: must be from 0 to 1000, got 1e300"),
    (["--label-smoothing", "0.1", "--loss", "hinge"], "--label-smoothing applies to --loss bce only"),
    (["--ada", "--ada-target", "1"], "--ada-target: must be between 0 and 1 (not 0 or 1), got 1"),
    (["--ada", "--ada-target", "0"], "--ada-target: must be between 0 and 1 (not 0 or 1), got 0"),
    (["--ada", "--ada-target", "nan"], "--ada-target: must be between 0 and 1 (not 0 or 1), got nan"),
    (["--ada", "--ada-target", "-0.6"], "--ada-target: must be between 0 and 1 (not 0 or 1), got -0.6"),
    (["--ada-target", "0.5"], "--ada-target applies to --ada training"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--dataset", "other"], "--dataset: invalid choice: 'other'"),
    (["--device", "tpu"], "--device: must be auto, cpu, mps, cuda or cuda:N, got tpu"),
    (["--device", "cuda:²"], "--device: must be auto, cpu, mps, cuda or cuda:N, got cuda:²"),
    (["--seed", "-1"], "--seed: must be from 0 to 2**63-1, got -1"),
    (["--seed", "18446744073709551616"], "--seed: must be from 0 to 2**63-1"),
    (["--seed", "9223372036854775808"], "--seed: must be from 0 to 2**63-1, got 9223372036854775808"),
    (["--image-dir", ""], "--image-dir: must name a folder, got an empty name"),
    (["--dataroot", " "], "--dataroot: must name a folder, got an empty name"),
    (["--generate", "2", "--checkpoint", ""], "--checkpoint: must name a file, got an empty name"),
    (["--config", " "], "--config: must name a file, got an empty name"),
    (["--steps", "5000000"], "--steps: must be from 2 to 1000, got 5000000"),
    (["--interpolate", "--steps", "1"], "--steps: must be from 2 to 1000, got 1"),
    (
        ["--dataset", "folder", "--dataroot", ".", "--image-dir", "pictures"],
        "--image-dir pictures is inside --dataroot .",
    ),
    (["--image-size=--"], "argument --image-size: expected one argument"),
    (["--epochs"], "--epochs: expected one argument"),
    (["--generate", "4", "--evaluate"], "choose one of --generate, --interpolate, --evaluate and --export"),
    (["--resume", "--generate", "4"], "--resume trains"),
    (["--batch-size", "64"], "the dataset has 32 images, fewer than --batch-size 64"),
]


@pytest.mark.parametrize("flags, phrase", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags(run_copy, gan_main, flags, phrase):
    before = snapshot(run_copy)
    # new output folders: the earlier run's own would be refused before the flag is checked
    new_folders = ["--checkpoint-dir", "new_run", "--image-dir", "new_run_images"]
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1", *new_folders, *flags])
    assert_user_error(code, err, phrase)
    assert snapshot(run_copy) == before
    assert not (run_copy / "new_run").exists() and not (run_copy / "new_run_images").exists()


def test_loss_weights_are_taken_up_to_their_bound():
    opts, _ = options.parse_flags(["--r1", "1000", "--spectral-loss", "1e3", "--class-loss", "0", "--conditional"])
    assert (opts.r1, opts.spectral_loss, opts.class_loss) == (1000.0, 1000.0, 0.0) == (options.MAX_LOSS_WEIGHT, 1e3, 0)


@pytest.mark.parametrize(
    "pictures, named",
    [(["fid.png"], "fid.png"), (["losses.png", "epoch_002.png", "epoch_001.png"], "epoch_001.png, epoch_002.png, losses.png")],
    ids=["fid.png alone", "three"],
)  # fmt: skip
def test_a_fresh_run_names_the_earlier_pictures_it_would_replace(tmp_path, gan_main, pictures, named):
    (tmp_path / "images").mkdir()
    for name in pictures:
        Image.new("RGB", (4, 4)).save(tmp_path / "images" / name)
    before = snapshot(tmp_path)
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1"])
    assert code == 2 and err.strip() == (
        f"gan.py: error: images holds an earlier run's pictures ({named}): train into another --image-dir, "
        "or move them away first"
    )
    assert snapshot(tmp_path) == before


def test_the_pictures_of_a_run_that_saved_no_checkpoint_are_replaced_and_its_log_set_aside(tmp_path, gan_main):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "epoch_001.png")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "metrics.jsonl").write_text('{"step": 2, "loss_d": 1.0}\n')
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1"])
    assert code == 0, err
    assert (tmp_path / "checkpoints" / "metrics.1.jsonl").read_text() == '{"step": 2, "loss_d": 1.0}\n'
    assert checkpoint.load_checkpoint(tmp_path / "checkpoints" / "checkpoint.pt")["step"] == 4


def test_the_memory_a_run_needs_counts_half_precision_activations_at_two_bytes():
    """Weights, gradients and Adam's two moments in fp32 (16 bytes a parameter; --ema 0 keeps no
    average), and each layer's output once per image of a batch: 4 bytes each, 2 in bf16 or fp16."""
    flags = ["--image-size", "32", "--nz", "8", "--ngf", "8", "--ndf", "8", "--batch-size", "4", "--ema", "0"]
    opts, _ = options.parse_flags(flags)
    parameters, outputs = measured_values("dcgan", 32)
    assert startup.training_bytes(opts.as_dict(), half_precision=False) == 16 * parameters + 4 * 4 * outputs
    assert startup.training_bytes(opts.as_dict(), half_precision=True) == 16 * parameters + 4 * 2 * outputs


def test_fresh_run_over_an_earlier_one_is_refused(run_copy, gan_main):
    before = snapshot(run_copy)
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1"])
    assert_user_error(code, err, "checkpoints/checkpoint.pt holds an earlier run: continue it with --resume")
    assert snapshot(run_copy) == before


def test_fresh_run_into_the_pictures_of_an_earlier_run_is_refused(run_copy, gan_main):
    before = snapshot(run_copy)
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1", "--checkpoint-dir", "other_run"])
    assert_user_error(
        code, err, "images holds an earlier run's pictures (epoch_001.png, epoch_002.png, losses.png, 2 more)"
    )
    assert snapshot(run_copy) == before
    assert not (run_copy / "other_run").exists()


@pytest.mark.parametrize("seed", [2**63 - 1, 20_000_000_000_000])
def test_large_seeds_train_to_the_end(gan_main, tmp_path, seed):
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1", "--seed", seed])
    assert code == 0, err
    assert checkpoint.load_checkpoint(tmp_path / "checkpoints" / "checkpoint.pt")["seed"] == seed


@pytest.mark.parametrize(
    "flag, value, need",
    [("--nz", 2_000_000_000, "at least"), ("--ngf", 1_000_000_000, "more than 8 EiB"),
     ("--ndf", 100_000_000_000, "more than 8 EiB"), ("--batch-size", 100_000_000, "at least")],
)  # fmt: skip
def test_sizes_that_cannot_fit_are_refused_naming_the_flag(gan_main, tmp_path, flag, value, need):
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1", flag, value])
    assert_user_error(code, err, f"{flag} {value} is too large: training would need {need}")
    assert "of memory, and cpu has" in err
    assert not any(tmp_path.iterdir())


def test_the_memory_estimate_is_a_lower_bound():
    """What it counts is what the networks have: their parameters, and the outputs of their layers
    that take memory of their own (not in-place activations, not reshapes)."""
    from models import count_values

    for arch in ("dcgan", "upsample"):
        assert count_values(arch, 8, 8, 8, 32) == measured_values(arch, 32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu(tmp_path, gan_main, device):
    code, out, err = gan_main([*TINY_ARGS, "--device", device])
    assert_user_error(code, err, f"--device {device}: no CUDA GPU is available here")
    assert not any(tmp_path.iterdir())


def test_bad_flag_through_the_real_cli(run_copy):
    before = snapshot(run_copy)
    result = run_gan([*TINY_ARGS, "--epochs", "0"], run_copy)
    assert_user_error(result.returncode, result.stderr, "--epochs: must be a positive integer, got 0")
    assert result.stdout == ""
    assert snapshot(run_copy) == before


# ---------------------------------------------------------------- image folders


def folder_args(dataroot):
    return [*TINY_ARGS, "--dataset", "folder", "--dataroot", dataroot, "--epochs", "1"]


def test_missing_data_folder(tmp_path, gan_main):
    code, out, err = gan_main(folder_args(tmp_path / "nowhere"))
    assert_user_error(code, err, f"data folder {tmp_path / 'nowhere'} does not exist")
    assert not (tmp_path / "nowhere").exists()


def test_empty_data_folder(tmp_path, gan_main):
    (tmp_path / "empty").mkdir()
    code, out, err = gan_main(folder_args(tmp_path / "empty"))
    assert_user_error(code, err, "holds no images")


def test_data_folder_without_images(tmp_path, gan_main):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "notes.txt").write_text("not an image")
    (data / "sub" / "labels.csv").write_text("a,b\n")
    before = snapshot(data)
    code, out, err = gan_main(folder_args(data))
    assert_user_error(code, err, f"data folder {data} holds no images (.bmp, .gif")
    assert snapshot(data) == before


def test_subset_larger_than_the_folder(tmp_path, gan_main):
    data = tmp_path / "data"
    data.mkdir()
    for index in range(3):
        Image.new("RGB", (16, 16), (index, 0, 0)).save(data / f"{index}.png")
    code, out, err = gan_main([*folder_args(data), "--subset", "10", "--batch-size", "2"])
    assert_user_error(code, err, f"--subset 10 is larger than the dataset: data folder {data} holds 3 images")


def test_data_folder_of_broken_images(tmp_path, gan_main):
    data = tmp_path / "data"
    data.mkdir()
    for index in range(3):
        (data / f"image_{index}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(40))
    (data / "photo.jpg").write_bytes(b"")
    before = snapshot(data)
    with pytest.warns(UserWarning, match="skipped 4 of 4 files"):  # 4 files pass the count check; none decodes
        code, out, err = gan_main([*folder_args(data), "--subset", "4", "--batch-size", "2"])
    assert_user_error(code, err, "holds no readable images")
    assert snapshot(data) == before


# ---------------------------------------------------------------- CIFAR-10


def cifar_args(dataroot):
    return [*TINY_ARGS, "--dataset", "cifar10", "--dataroot", dataroot, "--epochs", "1", "--image-size", "32"]


def test_cifar10_offline(tmp_path, gan_main, no_download):
    dataroot = tmp_path / "data"
    code, out, err = gan_main(cifar_args(dataroot))
    assert_user_error(code, err, "could not download CIFAR-10 (URLError")
    assert "cifar-10-python.tar.gz" in err and str(dataroot.resolve()) in err
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in err
    assert no_download == [utils.CIFAR_URL]
    assert not any(tmp_path.iterdir())  # not even an empty data/, images/ or checkpoints/


@pytest.mark.parametrize("cut", [ConnectionResetError("connection reset by peer"), KeyboardInterrupt()], ids=repr)
def test_cifar10_offline_keeps_a_partial_download_out_of_the_way(tmp_path, gan_main, monkeypatch, cut):
    import torchvision.datasets.utils

    def half_download(url, root, filename=None, md5=None, **kwargs):
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / filename).write_bytes(b"\x1f\x8b" + os.urandom(100))
        raise cut

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", half_download)
    code, out, err = gan_main(cifar_args(tmp_path / "data"))
    if isinstance(cut, KeyboardInterrupt):
        assert (code, err) == (130, "interrupted; nothing was written\n")
    else:
        assert_user_error(code, err, "could not download CIFAR-10 (ConnectionResetError")
    # a half-written archive would fail the next run with a misleading message
    assert not any(tmp_path.iterdir())


def damage_random_bytes(archive):
    archive.write_bytes(os.urandom(5000))


def damage_truncate(archive):
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])


def damage_empty(archive):
    archive.write_bytes(b"")


@pytest.mark.parametrize("damage", [damage_random_bytes, damage_truncate, damage_empty])
def test_damaged_cifar10_archive(tmp_path, gan_main, no_download, damage):
    dataroot = tmp_path / "data"
    dataroot.mkdir()
    write_cifar10_archive(dataroot, images_per_batch=200)  # big enough to cut inside a batch
    damage(dataroot / "cifar-10-python.tar.gz")
    archive_bytes = (dataroot / "cifar-10-python.tar.gz").read_bytes()
    code, out, err = gan_main(cifar_args(dataroot))
    assert code == 2
    assert "cifar-10-python.tar.gz is not a readable CIFAR-10 archive" in err or "is not a CIFAR-10 batch" in err
    assert no_download == []  # a present archive is never replaced by a download
    assert (dataroot / "cifar-10-python.tar.gz").read_bytes() == archive_bytes


def extracted_cifar10(dataroot):
    """A synthetic CIFAR-10 archive in dataroot, already extracted beside it."""
    dataroot.mkdir()
    write_cifar10_archive(dataroot, images_per_batch=4)
    with tarfile.open(dataroot / "cifar-10-python.tar.gz") as tar:
        tar.extractall(dataroot, filter="data")
    return dataroot


def test_cifar10_archive_with_a_damaged_batch(tmp_path, gan_main, no_download):
    dataroot = extracted_cifar10(tmp_path / "data")
    batch = dataroot / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({"labels": [1, 2]}))  # no 'data'
    code, out, err = gan_main(cifar_args(dataroot))
    assert_user_error(code, err, f"{batch} is not a CIFAR-10 batch (KeyError); delete {batch.parent} and run again")


@pytest.mark.parametrize("label", [10, -1])
def test_cifar10_batch_with_a_label_past_its_ten_classes_is_refused(tmp_path, gan_main, no_download, label):
    dataroot = extracted_cifar10(tmp_path / "data")
    batch = dataroot / "cifar-10-batches-py" / "data_batch_2"
    saved = pickle.loads(batch.read_bytes())
    saved["labels"][0] = label
    batch.write_bytes(pickle.dumps(saved))
    code, out, err = gan_main(cifar_args(dataroot))
    assert_user_error(code, err, f"{batch} is not a CIFAR-10 batch (ValueError); delete {batch.parent} and run again")


def test_cifar10_batch_that_would_run_code_is_refused(tmp_path, gan_main, no_download):
    dataroot = extracted_cifar10(tmp_path / "data")
    marker = tmp_path / "code_ran"
    batch = dataroot / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({"data": RunsCode(marker), "labels": [1]}, protocol=2))
    code, out, err = gan_main(cifar_args(dataroot))
    assert_user_error(code, err, f"{batch} is not a CIFAR-10 batch (UnpicklingError)")
    assert not marker.exists()


# ---------------------------------------------------------------- checkpoints for --resume


def checkpoint_path(run):
    return run / "checkpoints" / "checkpoint.pt"


def resume_with(run, gan_main, write_checkpoint, *flags):
    """Replace the run's checkpoint by write_checkpoint(path), resume, and check nothing changed."""
    write_checkpoint(checkpoint_path(run))
    before = snapshot(run)
    code, out, err = gan_main(["--resume", *flags])
    assert snapshot(run) == before
    return code, out, err


def test_resume_with_another_image_size_through_the_real_cli(run_copy):
    before = snapshot(run_copy)
    result = run_gan(["--resume", "--image-size", "32"], run_copy)
    assert_user_error(
        result.returncode, result.stderr, "cannot resume checkpoints/checkpoint.pt with a different architecture"
    )
    assert "--image-size 32 (checkpoint: 16)" in result.stderr
    assert snapshot(run_copy) == before


def test_resume_without_a_checkpoint(tmp_path, gan_main):
    code, out, err = gan_main([*TINY_ARGS, "--resume"])
    assert_user_error(code, err, "--resume: no checkpoint in checkpoints/")
    code, out, err = gan_main([*TINY_ARGS, "--resume", tmp_path / "missing.pt"])
    assert_user_error(code, err, f"checkpoint {tmp_path / 'missing.pt'} does not exist")
    assert not (tmp_path / "images").exists() or not any((tmp_path / "images").iterdir())


def write_random_bytes(path):
    path.write_bytes(random.Random(0).randbytes(4000))


def write_truncated(path):
    path.write_bytes(path.read_bytes()[:3000])


def write_text(path):
    path.write_text("this is not a checkpoint\n")


def write_foreign_dict(path):
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "iteration": 10}, path)


def write_foreign_list(path):
    torch.save([torch.zeros(3)], path)


@pytest.mark.parametrize(
    "write, phrase",
    [
        (write_random_bytes, "cannot read checkpoint checkpoints/checkpoint.pt"),
        (write_truncated, "cannot read checkpoint checkpoints/checkpoint.pt"),
        (write_text, "cannot read checkpoint checkpoints/checkpoint.pt"),
        (write_foreign_dict, "checkpoints/checkpoint.pt is not a checkpoint written by gan.py"),
        (write_foreign_list, "checkpoints/checkpoint.pt is not a checkpoint written by gan.py"),
    ],
)
def test_resume_from_a_file_that_is_not_a_checkpoint(run_copy, gan_main, write, phrase):
    code, out, err = resume_with(run_copy, gan_main, write)
    assert_user_error(code, err, phrase)
    assert "weights_only" not in err


@pytest.mark.parametrize("dataset", ["folder", "cifar10"])
def test_a_dataroot_that_is_a_file(tmp_path, gan_main, dataset):
    image = tmp_path / "photo.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1", "--dataset", dataset, "--dataroot", image])
    assert_user_error(code, err, f"{image} is a file")
    assert "does not exist" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]


def edited_checkpoint(edit):
    """A writer that loads the real checkpoint, applies edit(state) and saves it back."""

    def write(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        edit(state)
        torch.save(state, path)

    return write


def drop_key(state, net, prefix):
    state[net] = {k: v for k, v in state[net].items() if not k.startswith(prefix)}


@pytest.mark.parametrize(
    "edit, phrase",
    [
        (lambda s: drop_key(s, "netG", "main.1."), "does not fit this generator: Error(s) in loading state_dict"),
        (lambda s: drop_key(s, "netD", "main.0."), "does not fit this discriminator"),
        (lambda s: s["netG"].update({"main.0.weight": torch.zeros(3, 3)}), "does not fit this generator"),
        (lambda s: s["netG_ema"].update({"extra.weight": torch.zeros(1)}), "does not fit this generator"),
        (lambda s: s.pop("optD"), "is incomplete or damaged (KeyError"),
        (lambda s: s.pop("rng"), "is incomplete or damaged (KeyError"),
        (lambda s: s.pop("netG"), "is not a checkpoint written by gan.py"),
        (lambda s: s.update(flags=[1, 2]), "is not a checkpoint written by gan.py"),
        (
            lambda s: s["netG"].update({"main.0.weight": s["netG"]["main.0.weight"].bool()}),
            "main.0.weight holds torch.bool",
        ),
        (
            lambda s: s.update(
                scalerD={"scale": math.nan, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 9}
            ),
            "(ValueError: loss scale nan)",
        ),
    ],
    ids=[
        "G missing keys",
        "D missing keys",
        "G wrong shape",
        "EMA extra key",
        "no optD",
        "no rng",
        "no netG",
        "flags not a dict",
        "G weights not floating point",
        "fp16 loss scale nan",
    ],
)
def test_resume_from_a_mismatched_checkpoint(run_copy, gan_main, edit, phrase):
    # --precision fp16 (loss scaling, on the CPU too) reads the loss scalers' state
    code, out, err = resume_with(run_copy, gan_main, edited_checkpoint(edit), "--epochs", "3", "--precision", "fp16")
    assert_user_error(code, err, phrase)


@pytest.mark.parametrize(
    "flags",
    [{"image_size": 48}, {"image_size": "16"}, {"nz": -1}, {"ngf": None}, {"loss": "wasserstein"}, {"epochs": "x"}],
    ids=repr,
)
def test_resume_from_a_checkpoint_with_unusable_flags(run_copy, gan_main, flags):
    # a checkpoint edited by hand, or from another version: its flags are used as they are
    code, out, err = resume_with(run_copy, gan_main, edited_checkpoint(lambda s: s["flags"].update(flags)))
    name, value = next(iter(flags.items()))
    assert_user_error(
        code, err, f"checkpoint checkpoints/checkpoint.pt is damaged: it says --{name.replace('_', '-')} {value!r}"
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"epoch": "two"}, {"step": None}, {"epoch": -5}, {"batch": -1}, {"seed": "x"}, {"epoch": True},
        {"step": 2**70}, {"rollbacks": 2**63}, {"fixed_noise": torch.zeros(2, 2)},
        {"netG_ema": torch.zeros(2)}, {"netD": [1, 2]}, {"rng": torch.zeros(2)}, {"optG": None}, {"best_fid": "low"},
        {"augment": torch.zeros(2)}, {"augment": {"p": torch.tensor(1.5), "signs": torch.zeros(2), "steps": 0}},
        {"augment": {"p": torch.tensor(0.1), "signs": torch.tensor([9.0, 8.0]), "steps": 2}},
        {"augment": {"p": torch.tensor(0.1), "signs": torch.zeros(2), "steps": 4}},
        {"augment": {"p": torch.tensor(float("nan")), "signs": torch.zeros(2), "steps": 0}},
        {"world_size": 0},
    ],
    ids=repr,
)  # fmt: skip
def test_resume_from_a_checkpoint_with_damaged_fields(run_copy, gan_main, fields):
    code, out, err = resume_with(run_copy, gan_main, edited_checkpoint(lambda s: s.update(fields)), "--epochs", "3")
    assert_user_error(code, err, f"checkpoint checkpoints/checkpoint.pt is damaged: unusable {next(iter(fields))}")


def huge_view():
    """A (50000, 50000) view of one stored float: 4 bytes in the file, 2.5 GB once its values are checked."""
    return torch.zeros(1).as_strided((50_000, 50_000), (0, 0))


def looped():
    """A list holding itself, which a pickle can build."""
    loop = [torch.zeros(1)]
    loop.append(loop)
    return loop


@pytest.mark.parametrize(
    "edit, unusable",
    [
        (lambda s: s["netD"].update(evil=huge_view()), "netD.evil"),
        (lambda s: s.update(fixed_noise=huge_view()), "fixed_noise"),
        (lambda s: s["netG"].update({"main.1.weight": s["netG"]["main.1.weight"].to(torch.float8_e4m3fn)}), "netG.main.1.weight"),
        (lambda s: s["netG_ema"].update({"main.1.bias": s["netG_ema"]["main.1.bias"].to_sparse()}), "netG_ema.main.1.bias"),
        (lambda s: s["optG"]["state"][0].update(exp_avg=s["optG"]["state"][0]["exp_avg"].to_sparse()), "optG.state.0.exp_avg"),
        (lambda s: s["rng"].update(loop=looped(), cpu=huge_view()), "rng.cpu"),
        (lambda s: s["netD"].update({"main.0.weight": torch.zeros(2, device="meta")}), "netD.main.0.weight"),
    ],
    ids=["zero-stride view", "noise view", "float8", "sparse", "sparse moment", "self-holding list", "meta"],
)  # fmt: skip
def test_a_checkpoint_with_tensors_gan_py_never_writes_is_refused_before_any_is_computed_on(
    run_copy, gan_main, edit, unusable
):
    edited_checkpoint(edit)(checkpoint_path(run_copy))
    before = snapshot(run_copy)
    for mode in (["--resume", "--epochs", "3"], ["--generate", "2"]):  # --export loads as --generate does
        code, out, err = gan_main([*mode, "--device", "cpu"])
        assert_user_error(code, err, f"checkpoint checkpoints/checkpoint.pt is damaged: unusable tensors ({unusable})")
    assert snapshot(run_copy) == before


MISFIT = "does not fit this generator: Error(s) in loading state_dict for Generator: size mismatch for main.0.weight"


@pytest.mark.parametrize(
    "nz, on_resume, on_generate",
    [
        (200_000, MISFIT, MISFIT),
        (10**30, f"--nz {10**30} is too large: training would need more than 8 EiB", "has unusable flags (empty(): argument"),
    ],
)  # fmt: skip
def test_sizes_the_weights_do_not_have_are_refused_before_the_networks_are_built(
    run_copy, gan_main, monkeypatch, nz, on_resume, on_generate
):
    """nz 2,000,000 would build an 8 GB generator of ngf 8, and the weights in the file are nz 8's:
    refused from the sizes alone, on the meta device, by every path that builds from a file's flags."""
    import generator
    import startup

    devices = []
    monkeypatch.setattr(
        startup, "build_nets", lambda *args: pytest.fail("networks built before the sizes were checked")
    )
    monkeypatch.setattr(
        generator,
        "generator_of",
        lambda *a, _real=generator.generator_of: devices.append(torch.empty(0).device) or _real(*a),
    )
    edited_checkpoint(lambda s: s["flags"].update(nz=nz))(checkpoint_path(run_copy))
    flags = run_copy / "checkpoints" / "flags.json"
    flags.write_text(json.dumps({**json.loads(flags.read_text()), "nz": nz}))
    before = snapshot(run_copy)
    for mode, refusal in (
        (["--resume", "--epochs", "3"], on_resume),
        (["--generate", "2"], on_generate),
        (["--generate", "2", "--checkpoint", "checkpoints/netG_ema.pth"], on_generate),
    ):
        code, out, err = gan_main([*mode, "--device", "cpu"])
        assert_user_error(code, err, refusal)
    assert snapshot(run_copy) == before
    assert devices == [torch.device("meta")] * 2  # once for each --generate, on no real device


def test_a_checkpoint_whose_entries_are_compressed_is_refused_before_they_are_unpacked(run_copy, gan_main):
    """torch.save stores its entries; a deflated one (a few KB unpacking to gigabytes) is not its file."""
    import zipfile

    path = checkpoint_path(run_copy)
    with (
        zipfile.ZipFile(path) as stored,
        zipfile.ZipFile(run_copy / "deflated.pt", "w", zipfile.ZIP_DEFLATED) as deflated,
    ):
        for entry in stored.infolist():
            deflated.writestr(entry.filename, stored.read(entry))
    assert (
        torch.load(run_copy / "deflated.pt", weights_only=True)["step"] == torch.load(path, weights_only=True)["step"]
    )
    code, out, err = gan_main(["--generate", "2", "--checkpoint", "deflated.pt"])
    assert_user_error(
        code, err, "cannot read checkpoint deflated.pt: it is not a checkpoint of this program (compressed entries)"
    )


@pytest.mark.parametrize("flags", [{"nz": -1}, {"image_size": 48}, {"ngf": None}], ids=repr)
def test_generate_from_a_checkpoint_with_unusable_flags(run_copy, gan_main, flags):
    edited_checkpoint(lambda s: s["flags"].update(flags))(checkpoint_path(run_copy))
    before = snapshot(run_copy)
    code, out, err = gan_main(["--generate", "2", "--device", "cpu"])
    assert_user_error(code, err, "checkpoint checkpoints/checkpoint.pt has unusable flags")
    assert snapshot(run_copy) == before


def test_resuming_a_copy_writes_beside_the_copy(run_copy, gan_main):
    shutil.copytree(run_copy / "checkpoints", run_copy / "copy")
    original = snapshot(run_copy / "checkpoints")
    code, out, err = gan_main(["--resume", "copy/checkpoint.pt", "--epochs", "3"])
    assert code == 0, err
    assert snapshot(run_copy / "checkpoints") == original
    assert checkpoint.load_checkpoint(run_copy / "copy" / "checkpoint.pt")["epoch"] == 3


@pytest.mark.parametrize("flag", ["--image-dir", "--dataroot"])
def test_a_checkpoint_never_chooses_a_folder(run_copy, gan_main, flag):
    name = flag[2:].replace("-", "_")
    edited_checkpoint(lambda s: s["flags"].update({name: "elsewhere", "dataset": "folder"}))(checkpoint_path(run_copy))
    before = snapshot(run_copy)
    code, out, err = gan_main(["--resume", "--epochs", "3"])
    assert_user_error(
        code, err, f"checkpoints/checkpoint.pt was trained with {flag} elsewhere: a checkpoint never chooses folders"
    )
    if flag == "--dataroot":  # the same holds for --evaluate, which reads the training data
        code, out, err = gan_main(["--evaluate", "--device", "cpu"])
        assert_user_error(code, err, "was trained with --dataroot elsewhere")
    assert snapshot(run_copy) == before
    assert not (run_copy / "elsewhere").exists()


def test_evaluate_checks_its_output_folder_before_scoring(run_copy, gan_main):
    (run_copy / "blocker").write_text("a file")
    code, out, err = gan_main(
        ["--evaluate", "--checkpoint", "checkpoints/checkpoint.pt", "--checkpoint-dir", "blocker"]
    )
    assert_user_error(code, err, "output folder blocker is a file: give a folder")
    assert "FID" not in out


def test_resume_with_another_seed_is_refused_not_reported_as_changed(run_copy, gan_main):
    before = snapshot(run_copy)
    code, out, err = gan_main(["--resume", "--epochs", "3", "--seed", "5"])
    assert_user_error(code, err, "cannot resume checkpoints/checkpoint.pt with --seed 5 (checkpoint: 1)")
    assert snapshot(run_copy) == before
    code, out, err = gan_main(["--resume", "--epochs", "3", "--seed", "1"])  # the same seed is no change
    assert code == 0 and "--seed" not in out, err


def test_resume_into_the_checkpoint_dir_of_another_run_is_refused(run_copy, gan_main):
    shutil.copytree(run_copy / "checkpoints", run_copy / "copy")
    before = snapshot(run_copy)
    code, out, err = gan_main(["--resume", "copy/checkpoint.pt", "--checkpoint-dir", "checkpoints", "--epochs", "3"])
    assert_user_error(code, err, "checkpoints/checkpoint.pt holds another run: resuming copy/checkpoint.pt there")
    assert snapshot(run_copy) == before


@pytest.mark.parametrize(
    "edit, phrase",
    [
        (lambda s: s["optG"]["state"][0].update(exp_avg=torch.zeros(3)), "exp_avg of parameter 0 is not a tensor"),
        (lambda s: s["optD"]["state"][1].update(exp_avg_sq=s["optD"]["state"][1]["exp_avg_sq"].long()), "not finite"),
        (lambda s: s["optG"]["state"][2]["exp_avg"].fill_(math.nan), "exp_avg of parameter 2 is not finite floating"),
        (lambda s: s["optG"]["state"][0].update(step=str(i for i in [])), "step of parameter 0 is not a count"),
        (lambda s: s["optD"]["state"][0].update(step=torch.tensor(-1.0)), "step of parameter 0 is not a count"),
        (lambda s: s["optG"]["param_groups"][0]["params"].pop(), "unusable optG (param_groups)"),
        (lambda s: s["optD"]["state"][0].update(step=torch.tensor(True)), "step of parameter 0 is not a count"),
        (
            lambda s: s["optG"].update(state={str(k): v for k, v in s["optG"]["state"].items()}),
            "parameters it does not",
        ),
        (lambda s: s["optG"]["param_groups"][0].update(eps="x", amsgrad=True), None),  # this run's settings win
    ],
    ids=[
        "moment shape",
        "moment dtype",
        "moment nan",
        "step string",
        "step negative",
        "params",
        "step bool",
        "state keys",
        "settings",
    ],
)
def test_resume_checks_the_optimizer_state(run_copy, gan_main, edit, phrase):
    edited_checkpoint(edit)(checkpoint_path(run_copy))
    code, out, err = gan_main(["--resume", "--epochs", "3"])
    if phrase is None:
        assert code == 0, err
        return
    assert_user_error(code, err, "checkpoints/checkpoint.pt is damaged: unusable opt")
    assert phrase in err


def make_non_finite(state):
    state["netG_ema"]["main.0.weight"][0, 0, 0, 0] = math.inf
    state["netD"]["main.0.weight"][0, 0, 0, 0] = math.nan


@pytest.mark.parametrize(
    "argv", [["--resume", "--epochs", "3"], ["--generate", "2"], ["--interpolate"], ["--evaluate", "--device", "cpu"]]
)
def test_a_checkpoint_with_non_finite_weights_is_refused(run_copy, gan_main, argv):
    edited_checkpoint(make_non_finite)(checkpoint_path(run_copy))
    before = snapshot(run_copy)
    code, out, err = gan_main(argv)
    assert_user_error(
        code, err, "checkpoints/checkpoint.pt holds non-finite weights (netD.main.0.weight, netG_ema.main.0.weight)"
    )
    assert snapshot(run_copy) == before


def unusable_flag(name, value, **more):
    """An edit that gives the checkpoint's flags name: value (and the more flags)."""
    return lambda state: state["flags"].update({name: value, **more})


def without_class_names(edit):
    return lambda state: (edit(state), state.pop("class_names", None))


@pytest.mark.parametrize("argv", [["--generate", "2"], ["--export", "out"], ["--resume", "--epochs", "3"]])
@pytest.mark.parametrize(
    ("edit", "unusable"),
    [
        (unusable_flag("nc", 5), "nc"),  # images of 5 channels: no PNG, no network of the data
        (unusable_flag("nc", 0), "nc"),
        (without_class_names(unusable_flag("num_classes", 10**10, conditional=True)), "num_classes"),
        (unusable_flag("seed", 2**70), "seed"),  # past torch's seeds
        (unusable_flag("nz", torch.tensor(8)), "nz"),  # a tensor builds G, but no export's config.json can hold it
        (unusable_flag("zzz", b"x"), "zzz"),
        (unusable_flag(7, 1), "7"),
    ],
    ids=["nc-5", "nc-0", "classes", "seed", "tensor", "bytes", "number-key"],
)
def test_a_checkpoint_with_unusable_flags_is_refused_in_one_line(run_copy, gan_main, argv, edit, unusable):
    edited_checkpoint(edit)(checkpoint_path(run_copy))
    before = snapshot(run_copy)
    code, out, err = gan_main(argv)
    assert_user_error(code, err, f"checkpoints/checkpoint.pt is damaged: unusable flags ({unusable})")
    assert snapshot(run_copy) == before and not (run_copy / "out").exists()


def test_a_checkpoint_seed_past_torch_s_seeds_is_refused_by_resume(run_copy, gan_main):
    edited_checkpoint(lambda state: state.update(seed=2**70))(checkpoint_path(run_copy))
    before = snapshot(run_copy)
    code, out, err = gan_main(["--resume", "--epochs", "3"])
    assert_user_error(code, err, "checkpoints/checkpoint.pt is damaged: unusable seed")
    assert snapshot(run_copy) == before


@pytest.mark.parametrize(("name", "value"), [("mirror", "no"), ("spectral_norm", "false"), ("ada", 1)])
def test_an_on_off_flag_a_checkpoint_holds_as_text_or_a_number_is_refused_by_resume(run_copy, gan_main, name, value):
    """A string would count as on: "false" would train with spectral norm."""
    edited_checkpoint(unusable_flag(name, value))(checkpoint_path(run_copy))
    before = snapshot(run_copy)
    code, out, err = gan_main(["--resume", "--epochs", "3"])
    assert_user_error(code, err, f"checkpoints/checkpoint.pt is damaged: it says --{name.replace('_', '-')} {value!r}")
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("kind", ["device", "pipe", "nested"])
def test_a_flags_json_beside_netg_that_is_no_file_of_flags_is_refused_at_once(run_copy, gan_main, kind):
    """Read to its end, /dev/zero would fill the memory and a named pipe would wait for a writer
    for ever; JSON nested past Python's recursion limit would end in a traceback."""
    flags = run_copy / "checkpoints" / "flags.json"
    flags.unlink()
    if kind == "device":
        flags.symlink_to("/dev/zero")
    elif kind == "pipe":
        os.mkfifo(flags)
    else:
        flags.write_text("[" * 100_000 + "]" * 100_000)
    why = {"device": "it is not a regular file", "pipe": "it is not a regular file", "nested": "it nests too deep"}
    code, out, err = gan_main(["--generate", "2", "--checkpoint", "checkpoints/netG.pth"])
    assert_user_error(code, err, f"which cannot be read ({why[kind]}): give checkpoint.pt instead")
    assert not (run_copy / "images" / "generated").exists()


def test_a_deeply_nested_line_in_the_metrics_log_is_a_damaged_line(run_copy, gan_main):
    log = run_copy / "checkpoints" / "metrics.jsonl"
    log.write_text(log.read_text() + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.warns(UserWarning, match="skipped 1 damaged lines of checkpoints/metrics.jsonl"):
        code, out, err = gan_main(["--resume", "--epochs", "3"])
    assert code == 0, err


def test_fake_data_larger_than_the_memory_is_refused_before_it_is_drawn(tmp_path, gan_main):
    for subset in ("1000000000", "99999999999999999999"):
        code, out, err = gan_main([*TINY_ARGS, "--epochs", "1", "--subset", subset])
        assert_user_error(code, err, f"--subset {subset}: that many random images of 16x16 px need ")
        assert "of memory, and " in err
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_a_noise_length_too_large_to_count_is_too_large_not_a_traceback(tmp_path, gan_main):
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1", "--nz", "99999999999999999999"])
    assert_user_error(code, err, "--nz 99999999999999999999 is too large: training would need more than 8 EiB")


def make_fixed_noise_non_finite(state):
    state["fixed_noise"].view(-1)[1] = math.nan


@pytest.mark.parametrize(
    "noise", [torch.zeros(64, 8, 1, 1, dtype=torch.complex64), torch.zeros(64, 8, 1, 1, dtype=torch.long), "noise"]
)
def test_a_checkpoint_whose_fixed_noise_is_no_real_noise_is_refused(run_copy, gan_main, noise):
    edited_checkpoint(lambda state: state.update(fixed_noise=noise))(checkpoint_path(run_copy))
    before = snapshot(run_copy)
    code, out, err = gan_main(["--resume", "--epochs", "3"])
    assert_user_error(code, err, "checkpoints/checkpoint.pt is damaged: unusable fixed_noise")
    assert snapshot(run_copy) == before


def test_a_checkpoint_with_non_finite_fixed_noise_is_refused(run_copy, gan_main):
    """The resumed run would draw every grid from the saved fixed noise: NaN there is refused too."""
    edited_checkpoint(make_fixed_noise_non_finite)(checkpoint_path(run_copy))
    before = snapshot(run_copy)
    code, out, err = gan_main(["--resume", "--epochs", "3"])
    assert_user_error(code, err, "checkpoints/checkpoint.pt holds non-finite weights (fixed_noise)")
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("container", ["torch.save", "plain pickle"])
def test_a_checkpoint_that_would_run_code_is_refused_unrun(run_copy, gan_main, tmp_path, container):
    marker = tmp_path / "code_ran"

    def write(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        state["netG"]["main.0.weight"] = RunsCode(marker)
        if container == "torch.save":
            torch.save(state, path)
        else:
            path.write_bytes(pickle.dumps(state))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a run shows a warning on stderr, before the message
        code, out, err = resume_with(run_copy, gan_main, write)
    assert_user_error(
        code, err, "cannot read checkpoint checkpoints/checkpoint.pt: it is not a checkpoint of this program"
    )
    assert [str(warning.message) for warning in caught] == []
    assert "weights_only" not in err  # never the advice to load it unsafely
    assert not marker.exists()
    # the file really is malicious: a plain pickle.load would have run it
    if container == "plain pickle":
        pickle.loads(checkpoint_path(run_copy).read_bytes())
        assert marker.exists()


# ---------------------------------------------------------------- output folders


@pytest.mark.parametrize("flag", ["--image-dir", "--checkpoint-dir"])
def test_output_folder_that_is_a_file(tmp_path, gan_main, flag):
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"precious")
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1", flag, blocker])
    assert_user_error(code, err, f"output folder {blocker} is a file: give a folder")
    assert blocker.read_bytes() == b"precious"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_output_folder(tmp_path, gan_main):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        code, out, err = gan_main([*TINY_ARGS, "--epochs", "1", "--image-dir", folder])
    finally:
        folder.chmod(0o700)
    assert_user_error(code, err, f"output folder {folder} is not writable")


# ---------------------------------------------------------------- fuzzing


FLAG_NAMES = [
    action.option_strings[-1]
    for action in options.build_parser()._actions
    if action.option_strings and action.dest != "help"
]
VALUES = ["0", "1", "-1", "16", "48", "64", "1e-4", "nan", "inf", "-inf", "0.5", "1.0", "", " ", "abc", "cpu", "cuda:0",
          "cuda:x", "fake", "bce", "hinge", "stop", "10000000000000000000000", "--", "-", "-1e309", "０", "٣"]  # fmt: skip


def not_help(token):
    """argparse exits (not raises) for --help and its abbreviations; those are no input errors."""
    head = token.split("=", 1)[0]
    return not (token.startswith("-h") or (len(head) >= 3 and "--help".startswith(head)))


BAD_TOKENS = st.one_of(
    st.sampled_from(FLAG_NAMES),
    st.sampled_from(VALUES),
    st.builds(lambda flag, value: f"{flag}={value}", st.sampled_from(FLAG_NAMES), st.sampled_from(VALUES)),
    st.text(max_size=12),
).filter(not_help)

# a value each flag accepts, drawn by the function that checks it (or its choices)
VALID_VALUES = {
    options.positive_int: st.integers(1, 10**6).map(str),
    options.non_negative_int: st.integers(0, 10**6).map(str),
    options.seed: st.integers(0, options.MAX_SEED).map(str),
    options.folder: st.sampled_from(["data", "runs/a", "imgs", "/tmp/x y"]),
    options.walk_steps: st.integers(2, options.MAX_WALK_STEPS).map(str),
    options.positive_float: st.floats(1e-8, 1e3).map(repr),
    options.loss_weight: st.floats(0, options.MAX_LOSS_WEIGHT).map(repr),
    options.fraction: st.floats(0, 0.999).map(repr),
    options.image_size: st.sampled_from([str(size) for size in (16, 32, 64, 128, 256)]),
    options.device_name: st.sampled_from(["auto", "cpu", "mps", "cuda", "cuda:1"]),
    options.path_name: st.sampled_from(["ck.pt", "runs/checkpoint.pt"]),
    options.file_name: st.sampled_from(["ck.pt", "runs/checkpoint.pt"]),
}
# a value each flag refuses, at the edges of its range
INVALID_VALUES = {
    options.positive_int: ["0", "-1", "1.5", "x"],
    options.non_negative_int: ["-1", "x"],
    options.seed: ["-1", str(2**63)],
    options.folder: ["", " "],
    options.file_name: ["", " "],
    options.walk_steps: ["0", "1", str(options.MAX_WALK_STEPS + 1)],
    options.positive_float: ["0", "-1", "nan", "inf"],
    options.loss_weight: ["-0.5", "nan", "-inf", "1000.5", "1e300"],
    options.fraction: ["1", "-0.1", "nan"],
    options.image_size: ["8", "48", "512"],
    options.device_name: ["tpu", "cuda:x"],
}
MODE_FLAGS = {"generate", "interpolate", "evaluate", "resume"}
# --images has its own tests (test_metrics.py): it turns --evaluate into another kind of run; --class and
# --to-class take a conditional checkpoint's class names (test_classes.py); --config reads a run's flags.json,
# which no drawn name holds (test_export.py)
OWN_TESTS = {"help", "images", "class_name", "to_class", "config"}
ACTIONS = [a for a in options.build_parser()._actions if a.option_strings and a.dest not in MODE_FLAGS | OWN_TESTS]


def valid_value(action):
    """A strategy for a value the flag accepts: None for a switch."""
    if action.nargs == 0:
        return st.none()
    if action.choices is not None:
        return st.sampled_from(list(action.choices))
    return VALID_VALUES[action.type]


def invalid_value(action):
    """A strategy for a value the flag refuses, or None where every value is accepted."""
    if action.nargs == 0 or action.type is options.path_name:
        return None
    if action.choices is not None:
        return st.sampled_from(["nope", action.choices[0].upper() + "x"])
    return st.sampled_from(INVALID_VALUES[action.type])


@st.composite
def command_lines(draw):
    """(argv, what should come of it): mostly flags a user could type, each with a value it accepts;
    in a fifth of the examples one flag gets a value it must refuse, in another fifth a stray token."""
    mode = draw(st.sampled_from(["train", "generate", "interpolate", "evaluate"]))
    argv = {"train": [], "generate": ["--generate", "7"], "interpolate": ["--interpolate"], "evaluate": ["--evaluate"]}
    argv, expected = list(argv[mode]), {}
    spoil = draw(st.sampled_from(["none", "none", "none", "value", "token"]))
    for action in draw(st.lists(st.sampled_from(ACTIONS), max_size=6)):
        readers = modes.MODE_ONLY_FLAGS.get(action.dest)
        if readers is not None and mode not in readers:
            continue
        if spoil == "value" and invalid_value(action) is not None:
            argv.append(f"{action.option_strings[-1]}={draw(invalid_value(action))}")
            expected, spoil = "refused", "done"
            continue
        value = draw(valid_value(action))
        argv += [action.option_strings[-1]] if value is None else [f"{action.option_strings[-1]}={value}"]
        if isinstance(expected, dict):
            expected[action.dest] = action.const if value is None else (action.type or str)(value)
    if spoil == "token":
        argv.insert(draw(st.integers(0, len(argv))), draw(BAD_TOKENS))
        expected = None
    return argv, expected


def test_fuzz_the_flag_parser():
    outcomes = {"parsed": 0, "refused": 0}

    @settings(max_examples=300, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(command_lines())
    def parse(example):
        argv, expected = example
        try:
            opts, explicit = options.parse_flags(argv)
        except UserError as error:
            assert str(error)
            outcomes["refused"] += 1
            return
        assert expected != "refused", argv  # a value outside the flag's range got through
        outcomes["parsed"] += 1
        assert_within_documented_ranges(opts)
        for name, value in (expected or {}).items():  # each typed value reaches the options as typed
            assert name in explicit and getattr(opts, name) == value, (name, argv)

    parse()
    assert outcomes["parsed"] >= 0.5 * sum(outcomes.values()), outcomes  # most examples get past argparse


def assert_within_documented_ranges(opts):
    """What a parse that succeeded may hand to training: every value within its flag's range."""
    for name in ("epochs", "batch_size", "nz", "ngf", "ndf", "d_steps", "log_every", "steps", "eval_samples"):
        assert isinstance(getattr(opts, name), int) and getattr(opts, name) > 0, name
    assert opts.image_size in (16, 32, 64, 128, 256)
    assert math.isfinite(opts.lr) and opts.lr > 0
    for name in ("beta1", "beta2", "ema", "label_smoothing", "label_noise"):
        assert 0 <= getattr(opts, name) < 1, name
    assert opts.label_smoothing + opts.label_noise < 1
    assert opts.seed is None or 0 <= opts.seed < 2**63
    assert opts.generate is None or opts.generate > 0
    assert sum([opts.generate is not None, opts.interpolate, opts.evaluate]) <= 1
    assert opts.device in ("auto", "cpu", "mps", "cuda") or opts.device[5:].isdecimal()


def real_checkpoint_bytes(trained_run):
    return checkpoint_path(trained_run).read_bytes()


def test_fuzz_the_checkpoint_reader(trained_run, tmp_path):
    good = real_checkpoint_bytes(trained_run)
    rng = random.Random(1234)
    candidates = [rng.randbytes(rng.randrange(0, 3000)) for _ in range(20)]
    candidates += [good[: rng.randrange(0, len(good))] for _ in range(60)]
    for _ in range(60):
        damaged = bytearray(good)
        for _ in range(rng.randrange(1, 8)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        candidates.append(bytes(damaged))
    path = tmp_path / "checkpoint.pt"
    outcomes = {"loaded": 0, "refused": 0}
    for candidate in candidates:
        path.write_bytes(candidate)
        try:
            state = checkpoint.load_checkpoint(path)
        except UserError as error:
            assert str(path) in str(error)
            outcomes["refused"] += 1
        else:
            assert isinstance(state, dict) and isinstance(state["flags"], dict)
            outcomes["loaded"] += 1
    assert outcomes["refused"] >= 80  # every random and truncated file at least


def test_fuzz_resuming_from_damaged_checkpoints(run_copy, gan_main):
    """Damaged checkpoints that still unpickle must be refused (or resumed) cleanly too."""
    good = checkpoint_path(run_copy).read_bytes()
    state = torch.load(io.BytesIO(good), weights_only=True)
    rng = random.Random(99)
    keys = sorted(state)
    for trial in range(12):
        damaged = dict(state)
        for key in rng.sample(keys, 2):
            damaged[key] = rng.choice([None, 0, "x", [], {}, torch.zeros(2), float("nan"), {"a": 1}])
        torch.save(damaged, checkpoint_path(run_copy))
        code, out, err = gan_main(["--resume", "--epochs", "2"])
        assert code in (0, 2), (trial, err)


# ---------------------------------------------------------------- paths that lead nowhere


@pytest.mark.parametrize("flag", ["--dataroot", "--checkpoint-dir", "--image-dir", "--cache-dir", "--checkpoint"])
def test_a_symlink_loop_is_named_as_one(flag, tmp_path, gan_main):
    (tmp_path / "loop_a").symlink_to("loop_b")
    (tmp_path / "loop_b").symlink_to("loop_a")
    dataset = ["--dataset", "folder"] if flag == "--dataroot" else []
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1", *dataset, flag, "loop_a"])
    assert_user_error(code, err, f"argument {flag}: loop_a is a loop of symbolic links (each points to the next)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop_a", "loop_b"]


def test_dataroot_naming_the_extracted_cifar10_folder_reads_it(tmp_path, gan_main, no_download):
    expected = write_cifar10_archive(tmp_path, images_per_batch=8)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz") as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    (tmp_path / "cifar-10-python.tar.gz").unlink()
    folder = tmp_path / "extracted" / "cifar-10-batches-py"
    opts, _ = options.parse_flags(["--dataset", "cifar10", "--dataroot", str(folder), "--batch-size", "8"])
    assert torch.equal(utils.load_dataset(opts, "cpu"), torch.from_numpy(expected))
    before = snapshot(folder)
    code, out, err = gan_main([*cifar_args(folder), "--subset", "16"])
    assert code == 0, err
    assert no_download == [] and snapshot(folder) == before
    (folder / "data_batch_3").unlink()
    code, out, err = gan_main([*cifar_args(folder), "--checkpoint-dir", "c2", "--image-dir", "i2"])
    assert_user_error(code, err, f"{folder} lacks data_batch_3: extract CIFAR-10 again, or give its parent folder")
    assert no_download == []


TRAINING = [*TINY_ARGS, "--epochs", "3"]
FLAGS_A_MODE_NEVER_READS = [
    ([*TRAINING, "--checkpoint", "checkpoints/checkpoint.pt"], "--checkpoint is read by --generate, --interpolate, "
     "--evaluate, --export only, not by training; training continues a checkpoint with --resume PATH"),
    ([*TRAINING, "--steps", "5"], "--steps is read by --interpolate only, not by training"),
    (["--generate", "4", "--steps", "5"], "--steps is read by --interpolate only, not by --generate"),
    (["--generate", "4", "--channels", "3"], "--channels is read by training only, not by --generate"),
    (["--generate", "4", "--r1", "1"], "--r1 is read by training only, not by --generate"),
    (["--generate", "4", "--lr", "1e-3"], "--lr is read by training only, not by --generate"),
    (["--generate", "4", "--epochs", "5"], "--epochs is read by training only, not by --generate"),
    (["--generate", "4", "--ema", "0"], "--ema is read by training only, not by --generate"),
    (["--generate", "4", "--no-compile"], "--compile/--no-compile is read by training only, not by --generate"),
    (["--generate", "4", "--dataroot", "data"], "--dataroot is read by training, --evaluate, --evaluate --images "
     "only, not by --generate"),
    (["--generate", "4", "--batch-size", "8"], "--batch-size is read by training, --evaluate only, not by --generate"),
    (["--interpolate", "--workers", "0"], "--workers is read by training, --evaluate, --evaluate --images only, "
     "not by --interpolate"),
    (["--interpolate", "--subset", "8"], "--subset is read by training, --evaluate, --evaluate --images only, "
     "not by --interpolate"),
    (["--evaluate", "--channels", "1"], "--channels is read by training only, not by --evaluate"),
    (["--evaluate", "--image-dir", "pictures"], "--image-dir is read by training, --generate, --interpolate only, "
     "not by --evaluate"),
    (["--evaluate", "--fid-every", "1"], "--fid-every is read by training only, not by --evaluate"),
    (["--evaluate", "--images", "theirs", "--batch-size", "8"], "--batch-size is read by training, --evaluate of a "
     "checkpoint only, not by --evaluate --images"),
    (["--evaluate", "--images", "theirs", "--arch", "upsample"], "--arch is read by training, --generate, "
     "--interpolate, --evaluate of a checkpoint, --export only, not by --evaluate --images"),
    (["--export", "out", "--truncation", "0.5"], "--truncation applies to --generate, --interpolate and --evaluate"),
    (["--export", "out", "--epochs", "3"], "--epochs is read by training only, not by --export"),
    (["--evaluate", "--images", "theirs", "--truncation", "0.5"], "--truncation is read by --generate, "
     "--interpolate, --evaluate of a checkpoint only, not by --evaluate --images"),
]  # fmt: skip
# what each mode reads: the architecture flags (checked against the checkpoint) and the data of --evaluate
FLAGS_EACH_MODE_READS = [
    ["--generate", "4", "--checkpoint", "c.pt", "--checkpoint-dir", "c", "--image-dir", "i", "--seed", "1",
     "--device", "cpu", "--precision", "fp32", "--truncation", "0.7", "--class", "cat", "--recipe", "dcgan",
     "--arch", "dcgan", "--g-output", "tanh", "--image-size", "16", "--nz", "8", "--ngf", "8", "--ndf", "8",
     "--spectral-norm", "--conditional"],
    ["--interpolate", "--steps", "4", "--class", "a", "--to-class", "b", "--image-dir", "i", "--seed", "1"],
    ["--evaluate", "--dataset", "folder", "--dataroot", "d", "--subset", "8", "--batch-size", "4", "--workers", "0",
     "--cache-dir", "c", "--eval-samples", "16", "--truncation", "0.7", "--checkpoint", "c.pt", "--arch", "dcgan",
     "--image-size", "16", "--seed", "1"],
    ["--evaluate", "--images", "theirs", "--dataset", "folder", "--dataroot", "d", "--subset", "8", "--workers", "0",
     "--cache-dir", "c", "--image-size", "16", "--seed", "1", "--checkpoint-dir", "c", "--device", "cpu"],
]  # fmt: skip


@pytest.mark.parametrize(
    "argv, phrase", FLAGS_A_MODE_NEVER_READS, ids=[" ".join(a[-3:]) for a, _ in FLAGS_A_MODE_NEVER_READS]
)
def test_a_flag_the_mode_never_reads_is_refused_naming_the_modes_that_read_it(argv, phrase):
    with pytest.raises(UserError) as refused:
        options.parse_flags(argv)
    assert str(refused.value) == phrase


FAKE_DATA_READS_NO_FOLDER = "is read by --dataset cifar10 and --dataset folder only, not by --dataset fake"


@pytest.mark.parametrize(
    "argv, phrase",
    [
        ([*TINY_ARGS, "--epochs", "1", "--dataroot", "data"], f"--dataroot {FAKE_DATA_READS_NO_FOLDER}"),
        ([*TINY_ARGS, "--epochs", "1", "--cache-dir", "cache"], "--cache-dir is read by --dataset folder only, not by --dataset fake"),
        (["--epochs", "1", "--device", "cpu", "--cache-dir", "cache"], "--cache-dir is read by --dataset folder only, not by --dataset cifar10"),
        (["--evaluate", "--images", "theirs", "--cache-dir", "cache"], "--cache-dir is read by --dataset folder only, not by --dataset cifar10"),
    ],
    ids=["fake --dataroot", "fake --cache-dir", "cifar10 --cache-dir", "--images --cache-dir"],
)  # fmt: skip
def test_a_data_flag_the_dataset_never_reads_is_refused_before_anything_is_read(tmp_path, gan_main, argv, phrase):
    (tmp_path / "theirs").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / "theirs" / name)
    before = snapshot(tmp_path)
    code, out, err = gan_main(argv)
    assert_user_error(code, err, phrase)
    assert err.strip() == f"gan.py: error: {phrase}"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "argv, phrase",
    [
        (["--resume", "--epochs", "3", "--dataroot", "data"], f"--dataroot {FAKE_DATA_READS_NO_FOLDER}"),
        (["--evaluate", "--eval-samples", "16", "--device", "cpu", "--dataroot", "data"], f"--dataroot {FAKE_DATA_READS_NO_FOLDER}"),
        (["--evaluate", "--eval-samples", "16", "--device", "cpu", "--cache-dir", "cache"], "--cache-dir is read by --dataset folder only, not by --dataset fake"),
    ],
    ids=["--resume", "--evaluate --dataroot", "--evaluate --cache-dir"],
)  # fmt: skip
def test_the_dataset_a_checkpoint_trained_on_decides_which_data_flags_are_read(
    trained_run, tmp_path, gan_main, argv, phrase
):
    """The checkpoint's --dataset fake, not the default cifar10, is the one the typed flags are held against."""
    copy_run(trained_run, tmp_path)
    before = snapshot(tmp_path)
    code, out, err = gan_main(argv)
    assert_user_error(code, err, phrase)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("argv", FLAGS_EACH_MODE_READS, ids=lambda argv: argv[0])
def test_the_flags_each_mode_reads_are_taken(argv):
    opts, explicit = options.parse_flags(argv)
    assert {
        action.dest for action in options.build_parser()._actions if set(action.option_strings) & set(argv)
    } <= explicit


def test_every_flag_is_read_by_every_mode_or_listed_with_the_modes_that_read_it():
    flags = {action.dest for action in options.build_parser()._actions} - {"help"}
    assert flags == set(modes.MODE_ONLY_FLAGS) | set(modes.EVERY_MODE_FLAGS)
    assert not set(modes.MODE_ONLY_FLAGS) & set(modes.EVERY_MODE_FLAGS)
    assert all(set(readers) <= set(modes.MODES) for readers in modes.MODE_ONLY_FLAGS.values())


@pytest.mark.parametrize(
    "argv, phrase",
    [
        (FLAGS_A_MODE_NEVER_READS[0][0], FLAGS_A_MODE_NEVER_READS[0][1]),
        (["--generate", "4", "--r1", "1"], "--r1 is read by training only, not by --generate"),
        (["--generate", "4", "--mirror"], "--mirror is read by training only, not by --generate"),
        (["--evaluate", "--ada"], "--ada is read by training only, not by --evaluate"),
    ],
)
def test_flags_of_another_mode_are_refused_and_nothing_is_written(argv, phrase, run_copy, gan_main):
    before = snapshot(run_copy)
    code, out, err = gan_main(argv)
    assert_user_error(code, err, phrase)
    assert snapshot(run_copy) == before and not (run_copy / "images" / "generated").exists()


@pytest.mark.parametrize(("smoothing", "noise"), [("0.5", "0.5"), ("0.7", "0.4")])
def test_label_smoothing_and_noise_that_reach_one_are_refused(tmp_path, gan_main, smoothing, noise):
    """At a sum of 1 a real image's target and a fake one's overlap, and D has nothing to learn."""
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1", "--label-smoothing", smoothing, "--label-noise", noise])
    assert_user_error(code, err, "--label-smoothing plus --label-noise must stay below 1")
    assert list(tmp_path.iterdir()) == []
    opts, _ = options.parse_flags([*TINY_ARGS, "--label-smoothing", "0.5", "--label-noise", "0.49"])
    assert (opts.label_smoothing, opts.label_noise) == (0.5, 0.49)


def test_a_folder_subset_smaller_than_a_batch_is_refused_before_anything_is_decoded(tmp_path, gan_main):
    write_folder(tmp_path / "data", 12)
    before = snapshot(tmp_path)
    code, out, err = gan_main([*folder_args("data"), "--cache-dir", "cache", "--subset", "4", "--batch-size", "8"])
    assert_user_error(code, err, "--subset 4 is fewer images than one batch (--batch-size 8)")
    assert snapshot(tmp_path) == before and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("flags", "phrase"),
    [
        (["--checkpoint-dir", "data/ck"], "--checkpoint-dir data/ck is inside --dataroot data: give one outside it"),
        (["--cache-dir", "data/cache"], "--cache-dir data/cache is inside --dataroot data: give one outside it"),
        ([], "the decoded-image cache data/cached is inside --dataroot data: give one outside it"),
    ],
    ids=["checkpoints", "cache", "cache-variable"],
)
def test_no_output_goes_into_the_data_folder(tmp_path, gan_main, monkeypatch, flags, phrase):
    """The folder is searched recursively, and a --conditional run would take a folder the run
    made there for a class: the checkpoints and the decoded-image cache stay outside it, as the
    pictures do."""
    from foldercache import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, "data/cached")
    class_folder(tmp_path / "data", ["a", "b"], per_class=4)
    before = snapshot(tmp_path)
    outputs = ["--image-dir", "out", "--checkpoint-dir", "run", *flags]
    code, out, err = gan_main([*folder_args("data"), "--conditional", "--subset", "8", *outputs])
    assert_user_error(code, err, phrase)
    assert snapshot(tmp_path) == before and sorted(path.name for path in tmp_path.iterdir()) == ["data"]


LONG_NAME = "n" * 300  # over the 255 bytes a name may take on Linux and macOS


@pytest.mark.parametrize(
    "flags",
    [
        ["--image-dir", LONG_NAME],
        ["--checkpoint-dir", f"{LONG_NAME}/deeper"],
        ["--dataroot", LONG_NAME],
        ["--cache-dir", LONG_NAME],
        ["--resume", f"{LONG_NAME}/checkpoint.pt"],
        ["--generate", "1", "--checkpoint", f"{LONG_NAME}/checkpoint.pt"],
        ["--export", LONG_NAME],
        ["--evaluate", "--images", LONG_NAME],
        ["--config", LONG_NAME],
    ],
    ids=lambda flags: flags[-2] if flags[-2].startswith("--") else flags[0],
)
def test_a_name_longer_than_file_systems_allow_is_one_line(tmp_path, gan_main, flags):
    code, out, err = gan_main([*TINY_ARGS, *flags])
    assert_user_error(code, err, f"{'n' * 60}... holds a name longer than file systems allow")
    assert list(tmp_path.iterdir()) == []


def test_a_bad_streaming_switch_is_refused_before_a_folder_is_decoded(tmp_path, gan_main, monkeypatch):
    monkeypatch.setenv(utils.STREAM_VARIABLE, "garbage")
    write_folder(tmp_path / "data", 8)
    code, out, err = gan_main([*folder_args("data"), "--cache-dir", "cache", "--subset", "8"])
    assert_user_error(code, err, "GAN_STREAM_BATCHES=garbage: give 1 (stream the batches from host memory) or 0")
    assert "decoding" not in out and not (tmp_path / "cache").exists()


def make_a_variance_negative(state):
    state["netG_ema"]["main.1.running_var"][0] = -1.0


def test_a_generator_with_a_negative_batchnorm_variance_is_refused(run_copy, gan_main):
    """It would draw NaN: every image black, with exit code 0."""
    edited_checkpoint(make_a_variance_negative)(checkpoint_path(run_copy))
    before = snapshot(run_copy)
    for argv in (["--generate", "2"], ["--export", "out"], ["--resume", "--epochs", "3"]):
        code, out, err = gan_main(argv)
        assert_user_error(code, err, "holds negative BatchNorm variances (netG_ema.main.1.running_var): it cannot")
        assert snapshot(run_copy) == before
