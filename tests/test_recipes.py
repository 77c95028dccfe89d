"""The recipe options each do what their help says: --loss, --spectral-norm, --diffaugment,
--spectral-loss, --r1, --ttur, --d-steps and --ema. Tiny nets on the CPU."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import augment
import options
import startup
import steps
from models import Discriminator, Generator
from runtime import Runtime, setup_runtime

NET_ARGS = ["--device", "cpu", "--image-size", "16", "--nz", "8", "--ngf", "8", "--ndf", "8"]


def build(*flags):
    opts, _ = options.parse_flags([*NET_ARGS, *flags])
    return steps.build_nets(opts, setup_runtime(opts))


# ---------------------------------------------------------------- losses


def test_hinge_losses_on_hand_computed_logits():
    real_logits = torch.tensor([2.0, 0.5, -1.0])
    fake_logits = torch.tensor([-2.0, 0.0, 1.0])
    d_loss, g_loss = steps.LOSSES["hinge"]
    # relu(1 - real) = [0, 0.5, 2], mean 5/6; relu(1 + fake) = [0, 1, 2], mean 1
    assert float(d_loss(real_logits, fake_logits, steps.Recipe())) == pytest.approx(5 / 6 + 1)
    assert float(g_loss(fake_logits)) == pytest.approx(1 / 3)  # -mean(fake)


def test_bce_losses_on_hand_computed_logits():
    real_logits, fake_logits = torch.tensor([2.0, -1.0]), torch.tensor([0.0, 1.0])
    d_loss, g_loss = steps.LOSSES["bce"]

    def softplus(x):  # -log(sigmoid(-x)) = log(1 + e^x)
        return math.log1p(math.exp(x))

    expected_d = (softplus(-2.0) + softplus(1.0)) / 2 + (softplus(0.0) + softplus(1.0)) / 2
    assert float(d_loss(real_logits, fake_logits, steps.Recipe())) == pytest.approx(expected_d)
    assert float(g_loss(fake_logits)) == pytest.approx((softplus(0.0) + softplus(-1.0)) / 2)


def test_the_loss_flag_gives_the_losses_of_that_loss_at_every_step(monkeypatch, gan_main, tiny_args):
    """--loss hinge through the CLI: each step's losses are the hinge losses of the logits D gave."""
    seen = {"d": [], "g": []}

    def recording(forward, kind):
        def record(D, real, fake, recipe, *labels):
            logits = []
            hook = D.register_forward_hook(lambda module, inputs, output: logits.append(output.detach().float()))
            try:
                result = forward(D, real, fake, recipe, *labels)
            finally:
                hook.remove()
            loss = result[0] if kind == "d" else result
            seen[kind].append((logits, loss.detach()))
            return result

        return record

    monkeypatch.setattr(steps, "d_forward", recording(steps.d_forward, "d"))
    monkeypatch.setattr(steps, "g_forward", recording(steps.g_forward, "g"))
    code, _, err = gan_main([*tiny_args, "--epochs", "1", "--loss", "hinge"])
    assert code == 0, err
    assert len(seen["d"]) == len(seen["g"]) == 4  # 32 images in batches of 8
    for (real, fake), loss in seen["d"]:
        expected = torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()
        torch.testing.assert_close(loss, expected)
    for (fake,), loss in seen["g"]:
        torch.testing.assert_close(loss, -fake.mean())


# ---------------------------------------------------------------- spectral norm


def test_spectral_norm_wraps_every_conv_of_d_and_drops_batchnorm():
    plain, normalised = Discriminator(8, 32), Discriminator(8, 32, spectral_norm=True)
    plain_convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
    convs = [m for m in normalised.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == len(plain_convs) == 4
    assert all(parametrize.is_parametrized(conv, "weight") for conv in convs)
    assert not any(parametrize.is_parametrized(conv) for conv in plain_convs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in normalised.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())


def test_spectral_norm_bounds_each_conv_weight_near_one():
    D = Discriminator(8, 32, spectral_norm=True).train()
    for _ in range(20):  # power iterations converge while D runs
        D(torch.randn(4, 3, 32, 32))
    for conv in (m for m in D.modules() if isinstance(m, nn.Conv2d)):
        largest = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
        assert float(largest) == pytest.approx(1.0, abs=0.05)


def test_the_spectral_norm_flag_builds_such_a_d():
    nets = build("--spectral-norm")
    assert all(parametrize.is_parametrized(m) for m in nets.D.modules() if isinstance(m, nn.Conv2d))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in nets.D.modules())


# ---------------------------------------------------------------- DiffAugment


def test_diffaugment_changes_the_images_and_keeps_the_shape():
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    augmented = augment.diff_augment(images, torch.Generator().manual_seed(0))
    assert augmented.shape == images.shape
    assert not torch.allclose(augmented, images)
    again = augment.diff_augment(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(augmented, again)  # the randomness is the generator's only


def test_diffaugment_is_differentiable():
    images = (torch.rand(6, 3, 16, 16) * 2 - 1).requires_grad_(True)
    augment.diff_augment(images, torch.Generator().manual_seed(1)).square().sum().backward()
    assert images.grad is not None
    assert torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0


def test_translate_moves_whole_pixels_and_fills_with_zeros():
    images = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4).expand(2, 3, 4, 4).contiguous() + 1
    shifted = augment.translate(images, torch.tensor([[1, 0], [-1, 2]]))
    # image 0: pixel (i, j) comes from (i + 1, j); its last row falls off the edge
    torch.testing.assert_close(shifted[0, :, :3], images[0, :, 1:])
    assert (shifted[0, :, 3] == 0).all()
    # image 1: from (i - 1, j + 2)
    torch.testing.assert_close(shifted[1, :, 1:, :2], images[1, :, :3, 2:])
    assert (shifted[1, :, 0] == 0).all() and (shifted[1, :, :, 2:] == 0).all()


def test_random_shifts_are_whole_pixels_up_to_an_eighth_of_the_side():
    shifts = augment.random_shifts(torch.zeros(4000, 3, 32, 32), torch.Generator().manual_seed(0))
    assert shifts.dtype == torch.int64
    assert set(shifts.unique().tolist()) == set(range(-4, 5))  # int(32 * 0.125 + 0.5) = 4, as in the paper


def test_cutout_zeroes_a_half_side_square_clipped_at_the_borders():
    images = torch.ones(3, 3, 32, 32)
    corners = torch.tensor([[0, 0], [20, 24], [-8, 10]])
    cut = augment.cutout(images, corners)
    assert (cut[0, :, :16, :16] == 0).all() and cut[0].sum() == 3 * (32 * 32 - 16 * 16)
    assert (cut[1, :, 20:, 24:] == 0).all() and cut[1].sum() == 3 * (32 * 32 - 12 * 8)
    assert (cut[2, :, :8, 10:26] == 0).all() and cut[2].sum() == 3 * (32 * 32 - 8 * 16)


def test_diffaugment_of_bf16_and_fp32_images_shifts_the_same_whole_pixels():
    """Under autocast the fakes are bf16: they must move exactly as fp32 reals would."""
    images = torch.rand(64, 3, 64, 64) * 2 - 1
    fp32 = augment.diff_augment(images, torch.Generator().manual_seed(3))
    bf16 = augment.diff_augment(images.bfloat16(), torch.Generator().manual_seed(3))
    assert bf16.dtype == torch.float32  # augmented in fp32
    # the same pixels were moved and cut out: zeros in the same places, values within bf16 rounding
    torch.testing.assert_close(bf16 == 0, fp32 == 0)
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0.02)


def test_the_diffaugment_flag_gives_d_the_augmented_images(monkeypatch):
    """What D sees under --diffaugment, built from the flags as the training loop builds it: the real
    batch through diff_augment with the global RNG where the step left it; without the flag, the batch."""
    nz, real = 8, torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for flags in (["--diffaugment"], []):
        opts, _ = options.parse_flags([*NET_ARGS, "--batch-size", "4", *flags])
        runtime = setup_runtime(opts)
        nets = steps.build_nets(opts, runtime)
        seen = []
        hook = nets.D.register_forward_pre_hook(lambda module, inputs, seen=seen: seen.append(inputs[0].clone()))
        torch.manual_seed(7)
        steps.train_step(nets, real, steps.Recipe.from_options(opts), runtime)
        hook.remove()
        torch.manual_seed(7)
        torch.randn(4, nz, 1, 1)  # the step's noise comes first
        expected = augment.diff_augment(real) if flags else real
        assert len(seen) == 3  # real and fake in the D step, fake in the G step
        torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)


def test_the_diffaugment_flag_augments_the_fakes_in_both_updates():
    """Under --diffaugment D's update judges its fakes through diff_augment as it does the reals, and
    G's update fresh draws of them: D's three inputs of a step are, in turn, diff_augment of the
    real batch, of G's batch and of G's batch again, with the global RNG where the step left it."""
    nz, real = 8, torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    opts, _ = options.parse_flags([*NET_ARGS, "--batch-size", "4", "--diffaugment"])
    runtime = setup_runtime(opts)
    nets = steps.build_nets(opts, runtime)
    seen, fakes = [], []
    hooks = [
        nets.D.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone())),
        nets.G.register_forward_hook(lambda module, inputs, output: fakes.append(output.detach().clone())),
    ]
    torch.manual_seed(7)
    steps.train_step(nets, real, steps.Recipe.from_options(opts), runtime)
    for hook in hooks:
        hook.remove()
    torch.manual_seed(7)
    torch.randn(4, nz, 1, 1)  # the step's noise comes first
    expected = [augment.diff_augment(real), augment.diff_augment(fakes[0]), augment.diff_augment(fakes[0])]
    assert len(seen) == 3 and len(fakes) == 1
    for index, (images, wanted) in enumerate(zip(seen, expected, strict=True)):
        torch.testing.assert_close(images, wanted, rtol=0, atol=0, msg=lambda m, i=index: f"D's input {i}: {m}")


# ---------------------------------------------------------------- --spectral-loss


def smooth_batch(count=8, seed=0):
    """Low-frequency images in [-1, 1]: 4x4 noise upsampled bilinearly to 16x16."""
    coarse = torch.rand(count, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return nn.functional.interpolate(coarse, size=16, mode="bilinear", align_corners=False) * 2 - 1


def with_checkerboard(images, amplitude=0.2):
    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    return images + amplitude * ((rows + cols) % 2 * 2 - 1)


def test_spectral_loss_is_zero_for_the_same_spectra_and_blind_to_brightness_and_contrast():
    images = smooth_batch()
    assert float(steps.spectral_loss(images, images)) == 0.0
    # the spectrum's shape only: brightness and contrast change its total power, not its shape
    assert float(steps.spectral_loss(images * 0.5 + 0.2, images)) == pytest.approx(0.0, abs=1e-5)


def test_spectral_loss_by_hand_with_numpy():
    real, fake = smooth_batch(4, seed=1).double().numpy(), with_checkerboard(smooth_batch(4, seed=0)).double().numpy()

    def mean_log_power(images):
        grey = np.tensordot([0.299, 0.587, 0.114], images, axes=([0], [1]))
        grey = grey - grey.mean(axis=(1, 2), keepdims=True)
        power = np.abs(np.fft.fft2(grey)) ** 2
        power = (power / power.sum(axis=(1, 2), keepdims=True)).reshape(len(images), -1)[:, 1:]  # DC left out
        return np.log10(power + 1e-10).mean(axis=0)

    expected = np.abs(mean_log_power(fake) - mean_log_power(real)).mean()
    loss = steps.spectral_loss(torch.from_numpy(fake).float(), torch.from_numpy(real).float())
    assert float(loss) == pytest.approx(expected, rel=1e-3)


def with_grain(images, seed, sigma=0.1):
    """Images with white noise added, as a camera's grain: power at every frequency."""
    return images + sigma * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))


def test_spectral_loss_tells_grainy_images_from_too_smooth_ones():
    real = with_grain(smooth_batch(32, seed=1), seed=2)
    like_real = float(steps.spectral_loss(with_grain(smooth_batch(32, seed=0), seed=3), real))
    too_smooth = float(steps.spectral_loss(smooth_batch(32, seed=0), real))
    assert too_smooth > 3 * like_real  # 0.57 against 0.12 when written


def test_spectral_loss_gradient_moves_the_spectrum_towards_the_real_one():
    real = with_grain(smooth_batch(seed=1), seed=2)
    fake = smooth_batch(seed=0).requires_grad_(True)
    optimizer = torch.optim.Adam([fake], lr=0.01)
    losses = []
    for _ in range(30):
        loss = steps.spectral_loss(fake, real)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


class ConstantD(nn.Module):
    """A D that says 0 to everything: G's adversarial loss is then log 2, whatever the images."""

    def forward(self, images):
        return images.sum(dim=(1, 2, 3)) * 0


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_the_spectral_loss_weight_is_added_to_gs_loss(weight):
    real, fake = smooth_batch(seed=1), with_checkerboard(smooth_batch(seed=0))
    plain = steps.g_forward(ConstantD(), real, fake, steps.Recipe())
    weighted = steps.g_forward(ConstantD(), real, fake, steps.Recipe(spectral_loss=weight))
    assert float(plain) == pytest.approx(math.log(2))
    assert float(weighted - plain) == pytest.approx(weight * float(steps.spectral_loss(fake, real)))


def test_the_spectral_loss_flag_reaches_the_steps(monkeypatch, gan_main, tiny_args):
    seen = []
    loss = steps.spectral_loss
    monkeypatch.setattr(steps, "spectral_loss", lambda fake, real: seen.append(fake.shape) or loss(fake, real))
    code, _, err = gan_main([*tiny_args, "--epochs", "1", "--spectral-loss", "0.5"])
    assert code == 0, err
    assert seen == [torch.Size([8, 3, 16, 16])] * 4  # one G update per step, 32 images in batches of 8
    assert options.parse_flags(["--spectral-loss", "0.5"])[0].spectral_loss == 0.5
    seen.clear()
    code, _, err = gan_main([*tiny_args, "--epochs", "1", "--checkpoint-dir", "off", "--image-dir", "off-images"])
    assert code == 0, err
    assert seen == []  # off by default


# ---------------------------------------------------------------- R1


def r1_by_hand(D, real):
    """The mean over the batch of |d D(x) / dx|^2, each image's gradient taken on its own."""
    norms = []
    for image in real:
        image = image.unsqueeze(0).clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(D(image).sum(), image)
        norms.append(gradient.square().sum())
    return torch.stack(norms).mean()


class PixelD(nn.Module):
    """A discriminator without BatchNorm, so that one image's gradient does not depend on the batch:
    the logit is a fixed quadratic form of the pixels."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-1, 1, 3 * 16 * 16))

    def forward(self, images):
        flat = images.flatten(1)
        return (flat * self.weight).sum(dim=1) + 0.5 * flat.square().sum(dim=1)


@pytest.mark.parametrize("gamma", [2.0, 0.5])
def test_r1_adds_gamma_over_2_times_the_squared_input_gradient_on_real_images(gamma):
    generator = torch.Generator().manual_seed(0)
    real, fake = torch.rand(4, 3, 16, 16, generator=generator), torch.rand(4, 3, 16, 16, generator=generator)
    D = PixelD()
    with_r1, _, _ = steps.d_forward(D, real, fake, steps.Recipe(), r1_weight=gamma)
    without, _, _ = steps.d_forward(D, real, fake, steps.Recipe())
    penalty = r1_by_hand(D, real)  # here: |weight + x|^2 per image
    torch.testing.assert_close(penalty, (D.weight.detach() + real.flatten(1)).square().sum(dim=1).mean())
    assert float((with_r1 - without).detach()) == pytest.approx(gamma / 2 * float(penalty), rel=1e-5)
    # and D's update descends it: the penalty's gradient with respect to D's weights is in the loss
    (with_r1 - without).backward()
    expected = gamma / 2 * 2 * (D.weight.detach() + real.flatten(1)).mean(dim=0)
    torch.testing.assert_close(D.weight.grad, expected)


def nets_of_one_d(D, opts):
    """Nets around D alone, whose updates leave it as it is (lr 0), as a CPU fp32 run wraps it."""
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    frozen = torch.optim.SGD(D.parameters(), lr=0.0)
    return steps.Nets(None, D, None, frozen, scaler, scaler, D_train=D, D_r1=D, d_forward=steps.d_forward)


@pytest.mark.parametrize("gamma", [2.0, 0.5])
def test_lazy_r1_weighs_the_penalty_16_times_on_every_16th_d_step(gamma):
    """StyleGAN2's lazy regularisation: the penalty on D steps 0, 16, 32, ... alone, weighted by
    the interval, so that its weight per step is gamma/2 on average, as when it was on every step."""
    opts, _ = options.parse_flags([*NET_ARGS, "--r1", str(gamma)])
    recipe = steps.Recipe.from_options(opts)
    assert (recipe.r1, recipe.r1_every) == (gamma, 16)
    generator = torch.Generator().manual_seed(0)
    real, fake = torch.rand(4, 3, 16, 16, generator=generator), torch.rand(4, 3, 16, 16, generator=generator)
    D = PixelD()
    nets = nets_of_one_d(D, opts)
    with torch.no_grad():
        real_logits, fake_logits = D(real), D(fake)
    adversarial = steps.bce_d_loss(real_logits, fake_logits, recipe)
    penalty = (D.weight.detach() + real.flatten(1)).square().sum(dim=1).mean()  # PixelD's, by hand
    penalty_gradient = (D.weight.detach() + real.flatten(1)).mean(dim=0) * 2
    losses, gradients = [], []
    for step in range(33):
        losses.append(steps.d_step(nets, real, fake, recipe, Runtime(torch.device("cpu")), step=step)["loss_d"])
        gradients.append(D.weight.grad.clone())
    with_penalty = adversarial + gamma * 16 / 2 * penalty
    for step, loss in enumerate(losses):
        expected = with_penalty if step in (0, 16, 32) else adversarial
        torch.testing.assert_close(loss, expected, msg=f"step {step}")
    torch.testing.assert_close(gradients[16] - gradients[1], gamma * 16 / 2 * penalty_gradient)
    torch.testing.assert_close(gradients[1], gradients[15], rtol=0, atol=0)


def test_r1_is_off_by_default():
    recipe = steps.Recipe.from_options(options.parse_flags(NET_ARGS)[0])
    assert recipe.r1 == 0 and not any(recipe.r1_due(step) for step in range(64))


def test_r1_every_decides_by_the_step_count_and_a_resume_goes_on_exactly(monkeypatch, gan_main, tiny_args, tmp_path):
    """--r1-every 3 with 4 steps an epoch: steps 0 and 3, then after a resume at step 4, step 6,
    not step 4 (a count kept in memory would start again); the resumed run equals one in one go."""
    d_steps, with_penalty = [], []
    real_d_step, real_penalty = steps.d_step, steps.r1_penalty
    monkeypatch.setattr(steps, "d_step", lambda *args, **kwargs: d_steps.append(1) or real_d_step(*args, **kwargs))
    monkeypatch.setattr(steps, "r1_penalty", lambda *args: with_penalty.append(len(d_steps) - 1) or real_penalty(*args))
    flags = [*tiny_args, "--r1", "1", "--r1-every", "3"]
    runs = {
        "resumed": [[*flags, "--epochs", "1"], ["--resume", "--epochs", "2"]],
        "straight": [[*flags, "--epochs", "2"]],
    }
    penalised = {}
    for name, argvs in runs.items():
        for argv in argvs:
            d_steps.clear(), with_penalty.clear()
            code, _, err = gan_main([*argv, "--checkpoint-dir", name, "--image-dir", f"{name}-images"])
            assert code == 0, err
            penalised.setdefault(name, []).append(list(with_penalty))
    assert penalised == {"resumed": [[0, 3], [2]], "straight": [[0, 3, 6]]}  # the resume starts at step 4
    resumed, straight = (torch.load(tmp_path / name / "checkpoint.pt") for name in ("resumed", "straight"))
    for key in ("netG", "netD", "optG", "optD", "rng"):
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")
    assert (tmp_path / "resumed" / "metrics.jsonl").read_text() == (tmp_path / "straight" / "metrics.jsonl").read_text()


def test_a_run_saved_before_lazy_r1_resumes_with_r1_on_every_step():
    before = {k: v for k, v in saved_flags(["--r1", "1"]).items() if k != "r1_every"}
    opts, explicit = options.parse_flags(["--resume"])
    assert startup.merge_resume_flags(opts, explicit, startup.upgraded_flags(before), "ckpt")[0].r1_every == 1


def test_with_r1_a_compiled_run_compiles_the_d_steps_without_it():
    """torch.compile takes no double backward: the R1 steps call the plain d_forward with a D
    that is not compiled; the others, the compiled update."""
    from runtime import Runtime

    opts, _ = options.parse_flags([*NET_ARGS, "--r1", "1"])
    nets = steps.build_nets(opts, Runtime(torch.device("cpu"), compile=True))
    assert nets.d_forward is not steps.d_forward and nets.g_forward is not steps.g_forward
    assert nets.D_r1 is nets.D and nets.D_train is nets.D
    called = []
    nets.d_forward = lambda D, *args, **kwargs: called.append(("compiled", D)) or steps.d_forward(D, *args, **kwargs)
    recipe = steps.Recipe.from_options(opts)
    real, fake = torch.rand(4, 3, 16, 16) * 2 - 1, torch.rand(4, 3, 16, 16) * 2 - 1
    for step in (0, 1, 16):
        steps.d_step(nets, real, fake, recipe, Runtime(torch.device("cpu")), step=step)
    assert called == [("compiled", nets.D)]  # step 1 alone


# ---------------------------------------------------------------- R1 under fp16 loss scaling


class ScaledPixels(nn.Module):
    """logit = sum of the pixels times scale, in the input's precision."""

    def __init__(self, scale):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float16))

    def forward(self, images):
        return (images * self.scale * 1e-4).sum(dim=(1, 2, 3))


def test_r1_under_fp16_takes_the_gradient_at_the_loss_scale_and_unscales_it():
    """A gradient of 1e-8 per pixel is below fp16's smallest number: unscaled it flushes to zero,
    taken at GradScaler's first loss scale (2**16, over the batch's 2 images) it survives, and is
    divided back in fp32."""
    images = torch.ones(2, 3, 4, 4, dtype=torch.float16, requires_grad=True)
    D = ScaledPixels(1e-4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    unscaled = steps.r1_penalty(D(images), images)
    scaled = steps.r1_penalty(D(images), images, scaler)
    assert float(unscaled.detach()) == 0.0
    assert float(scaled.detach()) == pytest.approx(3 * 4 * 4 * 1e-16, rel=2e-3, abs=0)  # 48 pixels of (1e-8)**2
    assert scaled.dtype == torch.float32


def test_r1_where_the_scaled_gradient_overflows_skips_the_step_as_any_overflow():
    """The penalty reads 0 (a finite loss is logged), and D's gradients are not finite, so the
    scaler skips the update and lowers its scale."""
    images = torch.ones(2, 3, 4, 4, dtype=torch.float16, requires_grad=True)
    D = ScaledPixels(1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)  # 2**23 a logit: beyond fp16's 65504
    penalty = steps.r1_penalty(D(images), images, scaler)
    assert float(penalty.detach()) == 0.0
    penalty.backward()
    assert not torch.isfinite(D.scale.grad).all()


def test_r1_with_a_loss_scaler_in_fp32_is_bitwise_the_unscaled_penalty():
    D = PixelD()
    real = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    penalties = []
    for scaler in (None, torch.amp.GradScaler("cpu", enabled=False), torch.amp.GradScaler("cpu", init_scale=2.0**16)):
        images = real.clone().requires_grad_(True)
        penalties.append(steps.r1_penalty(D(images), images, scaler))
    assert penalties[0] == penalties[1] == penalties[2]  # bitwise: scaled and divided by a power of two


# ---------------------------------------------------------------- TTUR


def test_ttur_sets_g_lr_1e4_and_d_lr_4e4():
    nets = build("--ttur")
    assert [group["lr"] for group in nets.opt_G.param_groups] == [pytest.approx(1e-4)]
    assert [group["lr"] for group in nets.opt_D.param_groups] == [pytest.approx(4e-4)]


def test_without_ttur_both_use_lr():
    nets = build("--lr", "3e-4")
    assert nets.opt_G.param_groups[0]["lr"] == pytest.approx(3e-4)
    assert nets.opt_D.param_groups[0]["lr"] == pytest.approx(3e-4)


# ---------------------------------------------------------------- D steps per G step


@pytest.mark.parametrize(("d_steps", "g_updates"), [(1, 8), (2, 4), (4, 2)])
def test_d_steps_updates_g_every_kth_step(monkeypatch, gan_main, tiny_args, d_steps, g_updates):
    counts = {"d": 0, "g": 0}
    d_step, g_step = steps.d_step, steps.g_step

    def counting_d_step(*args, **kwargs):
        counts["d"] += 1
        return d_step(*args, **kwargs)

    def counting_g_step(*args, **kwargs):
        counts["g"] += 1
        return g_step(*args, **kwargs)

    monkeypatch.setattr(steps, "d_step", counting_d_step)
    monkeypatch.setattr(steps, "g_step", counting_g_step)
    code, _, err = gan_main([*tiny_args, "--epochs", "2", "--d-steps", d_steps])
    assert code == 0, err
    assert counts == {"d": 8, "g": g_updates}  # 2 epochs of 4 steps


# ---------------------------------------------------------------- EMA


def test_ema_0_writes_no_ema_generator(gan_main, tiny_args, tmp_path):
    code, _, err = gan_main([*tiny_args, "--epochs", "1", "--ema", "0"])
    assert code == 0, err
    assert not (tmp_path / "checkpoints" / "netG_ema.pth").exists()
    state = torch.load(tmp_path / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert state["netG_ema"] is None


def test_the_ema_flag_averages_g_after_every_update_by_hand(monkeypatch, gan_main, tiny_args, tmp_path):
    """--ema 0.15 through the CLI: the saved average is G's weights after each update, averaged by hand
    with the warm-up decay min(0.15, (1 + step) / (10 + step)): 0.1 at step 0, then the flag's 0.15."""
    import gan

    weights = []
    real_train_step = gan.train_step

    def recording(nets, *args, **kwargs):
        if not weights:
            weights.append([p.detach().clone() for p in nets.G.parameters()])  # the average starts at G
        stats = real_train_step(nets, *args, **kwargs)
        weights.append([p.detach().clone() for p in nets.G.parameters()])
        return stats

    monkeypatch.setattr(gan, "train_step", recording)
    code, _, err = gan_main([*tiny_args, "--epochs", "1", "--ema", "0.15"])
    assert code == 0, err
    assert len(weights) == 5  # the start, then 4 steps
    average = weights[0]
    for step, after in enumerate(weights[1:]):
        decay = min(0.15, (1 + step) / (10 + step))
        average = [decay * old + (1 - decay) * new for old, new in zip(average, after)]
    saved = torch.load(tmp_path / "checkpoints" / "netG_ema.pth", weights_only=True)
    names = [name for name, _ in Generator(8, 8, 16).named_parameters()]
    for name, want in zip(names, average, strict=True):
        torch.testing.assert_close(saved[name], want, msg=name)


# ---------------------------------------------------------------- --recipe

# what the README and --help promise `--recipe improved` turns on
IMPROVED = {"recipe": "improved", "arch": "upsample-fullres", "g_output": "clip", "spectral_loss": 3.0, "lr": 3e-4}


def changed_from_defaults(argv):
    defaults, _ = options.parse_flags([])
    opts, _ = options.parse_flags(argv)
    return {k: v for k, v in opts.as_dict().items() if v != getattr(defaults, k)}


def test_recipe_improved_sets_exactly_what_it_says():
    assert changed_from_defaults(["--recipe", "improved"]) == IMPROVED


def test_recipe_dcgan_changes_nothing():
    assert changed_from_defaults(["--recipe", "dcgan"]) == {}
    assert options.parse_flags([])[0].recipe == "dcgan"


@pytest.mark.parametrize("order", ["before", "after"])
def test_a_typed_flag_wins_over_the_recipe(order):
    typed = ["--arch", "dcgan", "--spectral-loss", "0", "--diffaugment", "--ema", "0.99"]
    argv = [*typed, "--recipe", "improved"] if order == "before" else ["--recipe", "improved", *typed]
    assert changed_from_defaults(argv) == {
        "recipe": "improved",
        "g_output": "clip",
        "diffaugment": True,
        "ema": 0.99,
        "lr": 3e-4,
    }


def test_help_documents_the_recipes():
    text = " ".join(options.build_parser().format_help().split())
    assert "--recipe {dcgan,improved}" in text
    assert "improved: --arch upsample-fullres --g-output clip --spectral-loss 3.0 --lr 0.0003 (default: dcgan)" in text
    assert "dcgan: the DCGAN paper's settings" in text


def saved_flags(argv):
    return options.parse_flags(argv)[0].as_dict()


def test_a_resume_keeps_the_recipes_flags():
    opts, explicit = options.parse_flags(["--resume", "--epochs", "9"])
    merged, changes = startup.merge_resume_flags(opts, explicit, saved_flags(["--recipe", "improved"]), "ckpt")
    assert {name: getattr(merged, name) for name in IMPROVED} == IMPROVED
    assert merged.epochs == 9 and changes == ["--epochs 25 -> 9"]


def test_a_resume_with_a_typed_recipe_of_another_architecture_is_refused():
    opts, explicit = options.parse_flags(["--resume", "--recipe", "dcgan"])
    with pytest.raises(options.UserError, match="different architecture: --arch dcgan"):
        startup.merge_resume_flags(opts, explicit, saved_flags(["--recipe", "improved"]), "ckpt")


def test_a_run_saved_before_the_recipe_clipped_resumes_as_it_trained():
    """A checkpoint without --g-output trained G through tanh: a resume keeps it, and refuses the
    clip that a typed --recipe improved now asks for, as any other change of architecture."""
    before = {k: v for k, v in saved_flags(["--recipe", "improved"]).items() if k != "g_output"}
    opts, explicit = options.parse_flags(["--resume"])
    assert startup.merge_resume_flags(opts, explicit, before, "ckpt")[0].g_output == "tanh"
    opts, explicit = options.parse_flags(["--resume", "--recipe", "improved"])
    with pytest.raises(options.UserError) as refused:
        startup.merge_resume_flags(opts, explicit, before, "ckpt")
    assert str(refused.value) == (
        "cannot resume ckpt with a different architecture: --g-output clip (checkpoint: tanh); --recipe improved "
        "sets some of these: type the checkpoint's values after it to keep them"
    )
    opts, explicit = options.parse_flags(["--resume", "--recipe", "improved", "--g-output", "tanh"])
    assert startup.merge_resume_flags(opts, explicit, before, "ckpt")[0].arch == "upsample-fullres"


@pytest.mark.parametrize(("argv", "last"), [(["--recipe", "improved"], nn.Hardtanh), ([], nn.Tanh)])
def test_the_recipe_trains_and_averages_a_clipped_generator(argv, last):
    nets = build(*argv)
    assert type(nets.G.main[-1]) is last and type(nets.G_ema.main[-1]) is last


def test_the_checkpoint_saves_the_recipe_and_its_flags(gan_main, tiny_args, tmp_path):
    code, _, err = gan_main([*tiny_args, "--epochs", "1", "--recipe", "improved"])
    assert code == 0, err
    saved = json.loads((tmp_path / "checkpoints" / "flags.json").read_text())
    assert {name: saved[name] for name in IMPROVED} == IMPROVED
    code, _, err = gan_main([*tiny_args, "--epochs", "2", "--resume"])
    assert code == 0, err
    saved = json.loads((tmp_path / "checkpoints" / "flags.json").read_text())
    assert {name: saved[name] for name in IMPROVED} == IMPROVED and saved["epochs"] == 2
