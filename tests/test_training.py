"""Training: the step functions, DiffAugment, the device batches, and whole runs of gan.py
(files written, resume, exact resume, flags on resume, CIFAR-10 from its archive)."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import TINY_ARGS, check_ok, cifar_colour, copy_run, run_gan, write_cifar10_archive
from PIL import Image

import options
import sampling
import steps
import utils
from runtime import Runtime, setup_runtime
from steps import ema_decay_at

# ---------------------------------------------------------------- the training step, in-process


def tiny_nets(*flags):
    opts, _ = options.parse_flags(
        ["--device", "cpu", "--no-compile", "--image-size", "16", "--nz", "8", "--ngf", "8", "--ndf", "8", *flags]
    )
    runtime = setup_runtime(opts)
    return steps.build_nets(opts, runtime), opts, runtime


def parameters(module):
    return [p.detach().clone() for p in module.parameters()]


def changed(before, module):
    return [not torch.equal(old, new.detach()) for old, new in zip(before, module.parameters())]


def real_batch(size=8, seed=0):
    return torch.rand(size, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("flags", [[], ["--loss", "hinge"], ["--diffaugment"], ["--spectral-norm", "--loss", "hinge"]])
def test_train_step_moves_both_networks(flags):
    torch.manual_seed(0)
    nets, opts, runtime = tiny_nets(*flags)
    recipe = steps.Recipe.from_options(opts)
    G_before, D_before, ema_before = parameters(nets.G), parameters(nets.D), parameters(nets.G_ema)
    stats = steps.train_step(nets, real_batch(), recipe, runtime, update_g=True, ema_decay=opts.ema)
    assert set(stats) == {"loss_d", "loss_g", "d_real", "d_fake"}
    for name, value in stats.items():
        assert value.shape == () and torch.isfinite(value), name
    assert 0 <= stats["d_real"].item() <= 1 and 0 <= stats["d_fake"].item() <= 1
    assert all(changed(G_before, nets.G)), "every G parameter gets a gradient step"
    assert all(changed(D_before, nets.D)), "every D parameter gets a gradient step"
    # EMA with decay 0.999 moved a little, towards G
    assert any(changed(ema_before, nets.G_ema))
    for old, averaged, new in zip(ema_before, nets.G_ema.parameters(), nets.G.parameters()):
        torch.testing.assert_close(averaged.detach(), 0.999 * old + 0.001 * new.detach())


def test_bce_loss_at_the_start_is_near_log_4():
    # D outputs ~0.5 at init, so Loss_D ~ 2 log 2 and Loss_G ~ log 2, the numbers every DCGAN user knows
    torch.manual_seed(0)
    nets, opts, runtime = tiny_nets()
    stats = steps.train_step(nets, real_batch(), steps.Recipe(), runtime)
    assert stats["loss_d"].item() == pytest.approx(2 * np.log(2), abs=0.3)
    assert stats["loss_g"].item() == pytest.approx(np.log(2), abs=0.3)


def bce(logit, target):
    """Binary cross-entropy of one logit against a target, by hand."""
    p = 1 / (1 + np.exp(-logit))
    return -(target * np.log(p) + (1 - target) * np.log(1 - p))


def test_label_smoothing_moves_the_real_target_only():
    real, fake = torch.full((4,), 3.0), torch.full((4,), -2.0)
    smoothed = steps.bce_d_loss(real, fake, steps.Recipe(label_smoothing=0.1)).item()
    # real target 0.9, fake target still 0: smoothing the fakes too would change the second term
    assert smoothed == pytest.approx(bce(3.0, 0.9) + bce(-2.0, 0.0), rel=1e-5)


def test_label_noise_moves_each_target_a_random_amount_towards_the_other_class(monkeypatch):
    targets = {}
    real_bce = steps.F.binary_cross_entropy_with_logits

    def recording_bce(logits, target):
        targets.setdefault("real" if "real" not in targets else "fake", target.clone())
        return real_bce(logits, target)

    monkeypatch.setattr(steps.F, "binary_cross_entropy_with_logits", recording_bce)
    torch.manual_seed(0)
    logits = torch.zeros(20_000)
    steps.bce_d_loss(logits, logits, steps.Recipe(label_smoothing=0.1, label_noise=0.2))
    real, fake = targets["real"], targets["fake"]
    # real targets in [1 - 0.1 - 0.2, 1 - 0.1], fake targets in [0, 0.2], uniform: means 0.8 and 0.1
    assert real.min() >= 0.7 and real.max() <= 0.9 and fake.min() >= 0 and fake.max() <= 0.2
    assert real.mean().item() == pytest.approx(0.8, abs=0.005)
    assert fake.mean().item() == pytest.approx(0.1, abs=0.005)
    assert real.std().item() == pytest.approx(0.2 / 12**0.5, rel=0.05)  # uniform, not a constant shift


def test_ema_decay_warms_up_then_holds():
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert ema_decay_at(0.999, 90) == pytest.approx(91 / 100)
    assert ema_decay_at(0.999, 10**6) == 0.999
    assert ema_decay_at(0.5, 5) == pytest.approx(6 / 15)  # still ramping
    assert ema_decay_at(0.5, 20) == 0.5  # the ramp never goes past the decay asked for
    ramp = [ema_decay_at(0.999, step) for step in range(0, 20_000, 100)]
    assert ramp == sorted(ramp)


def test_g_step_leaves_d_gradients_and_weights_untouched():
    torch.manual_seed(0)
    nets, opts, runtime = tiny_nets()
    fake = nets.G(torch.randn(8, 8, 1, 1))
    real = torch.rand_like(fake) * 2 - 1
    D_before = parameters(nets.D)
    for p in nets.D.parameters():
        p.grad = torch.full_like(p, 7.0)  # what a D step could have left behind
    steps.g_step(nets, real, fake, steps.Recipe(), runtime)
    assert not any(changed(D_before, nets.D))
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in nets.D.parameters())
    assert all(p.requires_grad for p in nets.D.parameters()), "D is unfrozen after the G step"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in nets.G.parameters())


# a loss scale that fp16 gradients of the tiny nets do not overflow: at the default 65536 the first
# steps are skipped (as they are on a GPU) while GradScaler backs off
SETTLED_SCALE = {
    "scale": 1024.0,
    "growth_factor": 2.0,
    "backoff_factor": 0.5,
    "growth_interval": 2000,
    "_growth_tracker": 0,
}


def weight_changes(precision, step_count=3):
    """What step_count training steps in a precision change in G's and D's weights (flattened), and
    the dtypes of D's convolution outputs on the way."""
    torch.manual_seed(0)
    nets, opts, runtime = tiny_nets("--precision", precision)
    assert runtime.amp_dtype == {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if precision == "fp16":
        nets.scaler_G.load_state_dict(SETTLED_SCALE)
        nets.scaler_D.load_state_dict(SETTLED_SCALE)
    before = {name: parameters(getattr(nets, name)) for name in ("G", "D")}
    seen = set()
    hooks = [
        layer.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
        for layer in nets.D.modules()
        if isinstance(layer, torch.nn.Conv2d)
    ]
    for step in range(step_count):
        torch.manual_seed(1 + step)
        stats = steps.train_step(nets, real_batch(seed=step), steps.Recipe(), runtime)
        assert all(value.isfinite() for value in stats.values())
    for hook in hooks:
        hook.remove()
    changes = {
        name: torch.cat(
            [(p.detach() - old).flatten() for p, old in zip(getattr(nets, name).parameters(), before[name])]
        )
        for name in ("G", "D")
    }
    return changes, seen


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_mixed_precision_step_on_the_cpu_moves_the_weights_as_fp32_does(precision):
    """The autocast steps the GPU runs: D computes in bf16/fp16 (seen through a hook on its
    convolutions), and three steps change the weights as fp32's do, within the precision's rounding.

    The tolerance is calibrated: measured, three bf16 steps differ from fp32's by 0.18 (G) and 0.12
    (D) of fp32's change, fp16 by 0.13 and 0.02 (Adam's first steps are about lr * sign(gradient), and
    rounding flips the sign of the smallest gradients); steps that do nothing differ by exactly 1.
    """
    reference, fp32_dtypes = weight_changes("fp32")
    changes, dtypes = weight_changes(precision)
    assert fp32_dtypes == {torch.float32}
    assert dtypes == {{"bf16": torch.bfloat16, "fp16": torch.float16}[precision]}
    for name in ("G", "D"):
        relative = ((changes[name] - reference[name]).norm() / reference[name].norm()).item()
        assert 0 < relative < 0.4, name


def test_d_only_step_leaves_the_generator_alone():
    torch.manual_seed(0)
    nets, opts, runtime = tiny_nets("--d-steps", "2")
    G_before, D_before, ema_before = parameters(nets.G), parameters(nets.D), parameters(nets.G_ema)
    stats = steps.train_step(nets, real_batch(), steps.Recipe(), runtime, update_g=False, ema_decay=opts.ema)
    assert "loss_g" not in stats
    assert torch.isfinite(stats["loss_d"])
    assert not any(changed(G_before, nets.G))
    assert not any(changed(ema_before, nets.G_ema))
    assert all(changed(D_before, nets.D))
    assert all(p.grad is None for p in nets.G.parameters())


# ---------------------------------------------------------------- device batches


def numbered_images(count, side=4):
    """uint8 images whose every pixel is the image's index, so batches can be traced back."""
    return torch.arange(count, dtype=torch.uint8).view(-1, 1, 1, 1).expand(count, 3, side, side).contiguous()


def indices(batch):
    """The index of each float image made by numbered_images."""
    values = ((batch + 1) * 127.5).round().to(torch.int64)
    assert (values == values[:, :1, :1, :1]).all()
    return values[:, 0, 0, 0].tolist()


def epoch_indices(batches, epoch, start=0):
    return [indices(batch) for batch in batches.epoch(epoch, start)]


def test_device_batches_are_deterministic_per_seed_and_epoch():
    images = numbered_images(50)
    batches = utils.DeviceBatches(images, batch_size=8, image_size=4, seed=3)
    assert len(batches) == 6  # the incomplete last batch is dropped
    first = epoch_indices(batches, 0)
    assert len(first) == 6 and all(len(b) == 8 for b in first)
    flat = [i for b in first for i in b]
    assert len(set(flat)) == 48 and set(flat) <= set(range(50))
    assert epoch_indices(utils.DeviceBatches(images, 8, 4, seed=3), 0) == first
    assert epoch_indices(batches, 1) != first
    assert epoch_indices(utils.DeviceBatches(images, 8, 4, seed=4), 0) != first
    # resuming mid-epoch skips the batches already seen, and only those
    assert epoch_indices(batches, 0, start=4) == first[4:]


def test_device_batches_are_floats_in_minus_one_to_one():
    images = torch.tensor([0, 255], dtype=torch.uint8).repeat(8).view(16, 1, 1, 1).expand(16, 3, 8, 8).contiguous()
    batch = next(utils.DeviceBatches(images, 16, 8, seed=0).epoch(0))
    assert batch.dtype == torch.float32 and batch.shape == (16, 3, 8, 8)
    assert batch.min().item() == -1.0 and batch.max().item() == 1.0
    random = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    # resized on the fly to image_size, still within [-1, 1]
    resized = next(utils.DeviceBatches(random, 16, 16, seed=0).epoch(0))
    assert resized.shape == (16, 3, 16, 16)
    assert resized.min() >= -1 and resized.max() <= 1


def test_device_batches_split_ranks_disjointly():
    images = numbered_images(64)
    ranks = [utils.DeviceBatches(images, 4, 4, seed=0, rank=rank, world_size=2) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 8
    seen = [{i for b in epoch_indices(r, 2) for i in b} for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 32
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(64))


# ---------------------------------------------------------------- whole runs of gan.py


def summary_lines(stdout):
    return re.findall(r"^\[(\d+)/(\d+)\] Loss_D [\d.]+  Loss_G [\d.]+  D\(x\) [\d.]+  D\(G\(z\)\) [\d.]+", stdout, re.M)


def png_size(path):
    with Image.open(path) as image:
        return image.size


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_every_file_a_run_writes_has_a_file_s_usual_mode(trained_run):
    """Written through a temp file (mkstemp makes it 0600), each is given the mode a plain open gives:
    other users, and a web server showing the pictures, can read them."""
    from files import current_umask

    usual = 0o666 & ~current_umask()
    written = [path for path in trained_run.rglob("*") if path.is_file() and path.suffix != ".txt"]
    assert len(written) >= 12
    assert {path.name: path.stat().st_mode & 0o777 for path in written} == {path.name: usual for path in written}


def test_real_vs_fake_shows_the_last_epoch_grid_s_samples(gan_main, tmp_path, monkeypatch):
    """The closing picture's fakes are the generator the grids draw (the EMA, after its statistics
    were estimated) on the fixed noise: the last epoch's grid, tile for tile."""
    import artifacts

    shown = []
    monkeypatch.setattr(artifacts, "plot_real_vs_fake", lambda real, fake, path, row_names=None: shown.append(fake))
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1"])
    assert code == 0, err
    last_grid = np.asarray(Image.open(tmp_path / "images" / "epoch_001.png").convert("RGB"))
    assert len(shown) == 1 and np.array_equal(np.asarray(artifacts.grid_image(shown[0])), last_grid)


def test_one_folder_can_take_the_checkpoints_and_the_pictures(gan_main, tmp_path):
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1", "--checkpoint-dir", "out", "--image-dir", "out"])
    assert code == 0, err
    names = {path.name for path in (tmp_path / "out").iterdir()}
    assert {"checkpoint.pt", "flags.json", "metrics.jsonl", "epoch_001.png", "losses.png"} <= names


def test_a_run_writes_every_file(trained_run):
    images, checkpoints = trained_run / "images", trained_run / "checkpoints"
    expected_images = {"real_samples.png", "epoch_001.png", "epoch_002.png", "losses.png", "progress.gif"}
    expected_images.add("real_vs_fake.png")  # at the end of training
    assert {p.name for p in images.iterdir()} == expected_images
    expected_checkpoints = {"checkpoint.pt", "netG.pth", "netD.pth", "netG_ema.pth", "flags.json", "metrics.jsonl"}
    assert {p.name for p in checkpoints.iterdir()} == expected_checkpoints
    # one summary line per epoch, and nothing about an epoch 3
    assert summary_lines((trained_run / "stdout.txt").read_text()) == [("1", "2"), ("2", "2")]
    # the sample grids: 8 x 8 images of 16 px with 2 px of padding around each
    assert png_size(images / "epoch_001.png") == (8 * 16 + 9 * 2,) * 2
    assert png_size(images / "epoch_002.png") == (8 * 16 + 9 * 2,) * 2
    assert png_size(images / "real_samples.png") == (8 * 16 + 9 * 2, 4 * 16 + 5 * 2)  # 32 images
    with Image.open(images / "progress.gif") as gif:
        assert gif.n_frames == 2
    # metrics: one row every 2 of the 4 steps per epoch
    rows = [json.loads(line) for line in (checkpoints / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 2), (1, 4), (2, 6), (2, 8)]
    for row in rows:
        assert all(np.isfinite(row[k]) for k in ("loss_d", "loss_g", "d_real", "d_fake"))
        assert 0 <= row["d_real"] <= 1 and 0 <= row["d_fake"] <= 1
    flags = json.loads((checkpoints / "flags.json").read_text())
    assert flags["image_size"] == 16 and flags["ngf"] == 8 and flags["epochs"] == 2 and flags["seed"] == 1
    state = load(checkpoints / "checkpoint.pt")
    assert state["epoch"] == 2 and state["step"] == 8 and state["batch"] == 0
    assert state["flags"] == flags
    assert state["fixed_noise"].shape == (64, 8, 1, 1)
    # the plain state_dicts are the checkpoint's networks
    for name, key in [("netG.pth", "netG"), ("netD.pth", "netD"), ("netG_ema.pth", "netG_ema")]:
        torch.testing.assert_close(load(checkpoints / name), state[key])
    G = sampling.generator_of(flags)
    G.load_state_dict(load(checkpoints / "netG_ema.pth"))
    assert G(state["fixed_noise"][:2]).shape == (2, 3, 16, 16)


def test_resume_continues_where_it_stopped_and_is_exact(trained_run, tmp_path):
    """2 epochs, then `--resume --epochs 3`, equals 3 epochs in one go (CPU, one thread,
    fixed seed), and leaves the first two epochs' files alone. The resume types no other
    flag: image size 16, the widths and the seed come from the checkpoint."""
    resumed, straight = copy_run(trained_run, tmp_path / "resumed"), tmp_path / "straight"
    straight.mkdir()
    images = resumed / "images"
    old = {name: (images / name).stat().st_mtime_ns for name in ("epoch_001.png", "epoch_002.png", "real_samples.png")}
    old_bytes = {name: (images / name).read_bytes() for name in old}
    old_state = load(resumed / "checkpoints" / "checkpoint.pt")
    with ThreadPoolExecutor(2) as pool:
        jobs = [
            pool.submit(run_gan, ["--resume", "--epochs", "3"], resumed),
            pool.submit(run_gan, [*TINY_ARGS, "--epochs", "3"], straight),
        ]
        result, _ = (check_ok(job.result()) for job in jobs)
    assert "resuming" in result.stdout and "2 epochs done, step 8" in result.stdout
    assert "changed --epochs 2 -> 3" in result.stdout
    assert summary_lines(result.stdout) == [("3", "3")]
    assert sorted(p.name for p in images.glob("epoch_*.png")) == ["epoch_001.png", "epoch_002.png", "epoch_003.png"]
    assert png_size(images / "epoch_003.png") == (146, 146)
    for name, mtime in old.items():
        assert (images / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"
        assert (images / name).read_bytes() == old_bytes[name]
    with Image.open(images / "progress.gif") as gif:
        assert gif.n_frames == 3
    state = load(resumed / "checkpoints" / "checkpoint.pt")
    assert state["epoch"] == 3 and state["step"] == 12
    assert state["flags"]["image_size"] == 16 and state["flags"]["epochs"] == 3
    torch.testing.assert_close(state["fixed_noise"], old_state["fixed_noise"], rtol=0, atol=0)
    # exact: the same weights, optimizer state and logged numbers as the straight run
    reference = load(straight / "checkpoints" / "checkpoint.pt")
    assert reference["epoch"] == 3 and reference["step"] == 12
    for key in ("netG", "netD", "netG_ema", "fixed_noise", "optG", "optD"):
        torch.testing.assert_close(state[key], reference[key], rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")
    log = "checkpoints/metrics.jsonl"
    assert (resumed / log).read_text() == (straight / log).read_text()
    assert [json.loads(line)["step"] for line in (resumed / log).read_text().splitlines()] == [2, 4, 6, 8, 10, 12]


def test_resume_allows_and_reports_new_training_flags(run_copy, gan_main):
    # in-process: the subprocess runs above already prove the CLI end to end
    code, out, err = gan_main(["--resume", "--epochs", "3", "--lr", "1e-4", "--log-every", "1"])
    assert code == 0, err
    for change in ("changed --epochs 2 -> 3", "changed --lr 0.0002 -> 0.0001", "changed --log-every 2 -> 1"):
        assert change in out
    assert summary_lines(out) == [("3", "3")]
    state = load(run_copy / "checkpoints" / "checkpoint.pt")
    assert state["epoch"] == 3 and state["step"] == 12
    assert state["flags"]["lr"] == 1e-4 and state["flags"]["log_every"] == 1
    assert state["optG"]["param_groups"][0]["lr"] == 1e-4 and state["optD"]["param_groups"][0]["lr"] == 1e-4
    rows = [json.loads(line) for line in (run_copy / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 9, 10, 11, 12]


@pytest.mark.parametrize(
    "flag, value, saved",
    [("--image-size", 32, 16), ("--nz", 16, 8), ("--ngf", 16, 8), ("--ndf", 4, 8), ("--arch", "upsample", "dcgan")],
)
def test_resume_refuses_another_architecture(run_copy, gan_main, flag, value, saved):
    before = {p: p.read_bytes() for p in (run_copy / "checkpoints").iterdir()}
    code, out, err = gan_main(["--resume", flag, value])
    assert code == 2
    assert "different architecture" in err and f"{flag} {value} (checkpoint: {saved})" in err
    assert err.count("\n") == 1
    assert {p: p.read_bytes() for p in (run_copy / "checkpoints").iterdir()} == before


def test_resume_with_the_same_architecture_flags_is_fine(run_copy, gan_main):
    # typing the saved values is no change; --epochs 2 is already done, so nothing trains
    code, out, err = gan_main(["--resume", "--image-size", "16", "--ngf", "8", "--epochs", "2"])
    assert code == 0, err
    assert "already trained 2 epochs" in out
    assert "changed" not in out


# ---------------------------------------------------------------- CIFAR-10 from its archive


def check_cifar_run(tmp_path, stdout, pixels, image_size):
    assert "50 images (held on cpu), 6 steps per epoch" in stdout
    assert summary_lines(stdout) == [("1", "1")]
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    assert {p.name for p in folder.iterdir()} >= {f"data_batch_{i}" for i in range(1, 6)} | {"batches.meta"}
    state = load(tmp_path / "checkpoints" / "checkpoint.pt")
    assert state["epoch"] == 1 and state["step"] == 6
    assert png_size(tmp_path / "images" / "epoch_001.png") == (8 * image_size + 18,) * 2
    # real_samples.png: the archive's 50 solid colours at the training size, in the order of a
    # permutation drawn from --seed 1 by a generator of its own (not the archive's order)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(1)).tolist()
    assert order != sorted(order)
    grid = np.asarray(Image.open(tmp_path / "images" / "real_samples.png").convert("RGB"))
    assert grid.shape == (7 * image_size + 8 * 2, 8 * image_size + 9 * 2, 3)
    for place, index in enumerate(order):
        row, col = divmod(place, 8)
        top, left = 2 + row * (image_size + 2), 2 + col * (image_size + 2)
        cell = grid[top : top + image_size, left : left + image_size].astype(int)
        expected = np.array(cifar_colour(index))
        assert np.abs(cell - expected).max() <= 1, f"image {index} in place {place}"
        assert (pixels[index, :, 0, 0] == expected).all()


def cifar_args(dataroot, image_size):
    args = [*TINY_ARGS, "--dataset", "cifar10", "--dataroot", dataroot, "--image-size", image_size, "--epochs", "1"]
    args[args.index("--subset") : args.index("--subset") + 2] = []  # all 50 images, in archive order
    return args


def test_cifar10_from_its_archive(tmp_path):
    (tmp_path / "cifar").mkdir()
    pixels = write_cifar10_archive(tmp_path / "cifar", images_per_batch=10)
    result = check_ok(run_gan(cifar_args(tmp_path / "cifar", 32), tmp_path))
    check_cifar_run(tmp_path, result.stdout, pixels, 32)


def test_cifar10_upsampled_to_64(tmp_path, gan_main):
    (tmp_path / "cifar").mkdir()
    pixels = write_cifar10_archive(tmp_path / "cifar", images_per_batch=10)
    code, out, err = gan_main(cifar_args(tmp_path / "cifar", 64))
    assert code == 0, err
    check_cifar_run(tmp_path, out, pixels, 64)


# ---------------------------------------------------------------- logging


def test_loss_g_is_averaged_over_g_updates_only():
    """Under --d-steps 2 half the steps make no G update: their missing Loss_G is not a zero."""
    meter = steps.Meter(torch.device("cpu"))
    for loss_d, loss_g in [(1.0, 4.0), (3.0, None), (5.0, 2.0), (7.0, None)]:
        stats = {"loss_d": torch.tensor(loss_d), "d_real": torch.tensor(0.5), "d_fake": torch.tensor(0.25)}
        if loss_g is not None:
            stats["loss_g"] = torch.tensor(loss_g)
        meter.add(stats)
    means = meter.read_interval(Runtime(torch.device("cpu")))
    assert means == {"loss_d": 4.0, "loss_g": 3.0, "d_real": 0.5, "d_fake": 0.25}
    assert meter.steps == 0  # read: a new interval starts
    meter.add({"loss_d": torch.tensor(2.0), "d_real": torch.tensor(1.0), "d_fake": torch.tensor(0.0)})
    assert meter.read_interval(Runtime(torch.device("cpu")))["loss_g"] is None  # no G update at all
    assert meter.epoch_means()["loss_d"] == pytest.approx((1 + 3 + 5 + 7 + 2) / 5)


def test_the_upsample_architecture_trains_resumes_and_generates(gan_main, tiny_args, tmp_path):
    code, _, err = gan_main([*tiny_args, "--epochs", "1", "--arch", "upsample"])
    assert code == 0, err
    state = load(tmp_path / "checkpoints" / "checkpoint.pt")
    assert state["flags"]["arch"] == "upsample"
    assert any(weight.dim() == 2 for weight in state["netG"].values())  # its first layer is a linear one
    G = sampling.generator_of(state["flags"])
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in G.modules())
    G.load_state_dict(state["netG_ema"])
    code, out, err = gan_main(["--resume", "--epochs", "2"])  # --arch comes from the checkpoint
    assert code == 0, err
    assert load(tmp_path / "checkpoints" / "checkpoint.pt")["epoch"] == 2
    code, out, err = gan_main(["--generate", "3", "--seed", "0"])
    assert code == 0, err
    assert len(list((tmp_path / "images" / "generated").glob("000*.png"))) == 3
    code, out, err = gan_main(["--generate", "3", "--arch", "dcgan"])
    assert code == 2 and "--arch dcgan (checkpoint: upsample)" in err
