"""What D sees (augment.py): --mirror's x-flips of the real images, the augment pipeline at a
strength p, and --ada's controller of p, by hand and through the command line."""

import json
import math

import pytest
import torch
from conftest import TINY_ARGS

import augment
import options
import startup
import steps
from augment import ADA_INTERVAL_STEPS, ADA_RAMP_IMAGES, AugmentStrength
from runtime import Runtime, setup_runtime

CPU = Runtime(torch.device("cpu"))
NET_ARGS = ["--device", "cpu", "--image-size", "16", "--nz", "8", "--ngf", "8", "--ndf", "8", "--batch-size", "4"]


def numbered_images(count, height=2, width=4):
    """Images whose every pixel is a different number, so that any move of one shows."""
    return torch.arange(count * 3 * height * width, dtype=torch.float32).view(count, 3, height, width)


# ---------------------------------------------------------------- x-flips


def test_x_flipped_mirrors_exactly_the_images_its_draws_choose():
    images = numbered_images(8)
    flipped = augment.x_flipped(images, torch.Generator().manual_seed(0))
    # the draws of torch.Generator().manual_seed(0), 8 of them: below 1/2 at images 0, 2, 3, 4 and 6
    for index in range(8):
        expected = images[index].flip(-1) if index in (0, 2, 3, 4, 6) else images[index]
        torch.testing.assert_close(flipped[index], expected, rtol=0, atol=0, msg=f"image {index}")
    # left-right: the first pixel of a row is the last one of the row it came from
    assert flipped[0, 0, 0].tolist() == [3.0, 2.0, 1.0, 0.0]
    assert flipped[0, 0, 1].tolist() == [7.0, 6.0, 5.0, 4.0]


def test_the_mirror_flag_flips_the_real_images_d_sees_with_the_runs_rng():
    """--mirror through parse_flags and the step the loop calls: D's first input of the step is the
    real batch with the images flipped that the global RNG's first draws choose (saved in every
    checkpoint, so a resume draws on); the fakes are G's, unflipped. Without it, the batch itself."""
    real = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for flags, flipped in (["--mirror"], [1]), ([], []):
        opts, _ = options.parse_flags([*NET_ARGS, *flags])
        runtime = setup_runtime(opts)
        nets = steps.build_nets(opts, runtime)
        seen, fakes = [], []
        hooks = [
            nets.D.register_forward_pre_hook(lambda module, inputs, seen=seen: seen.append(inputs[0].clone())),
            nets.G.register_forward_hook(lambda module, inputs, output, fakes=fakes: fakes.append(output.detach())),
        ]
        torch.manual_seed(7)  # its first 4 draws: below 1/2 at image 1 alone
        steps.train_step(nets, real, steps.Recipe.from_options(opts), runtime)
        for hook in hooks:
            hook.remove()
        expected = torch.stack([image.flip(-1) if index in flipped else image for index, image in enumerate(real)])
        torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)
        torch.testing.assert_close(seen[1], fakes[0], rtol=0, atol=0)


# ---------------------------------------------------------------- the pipeline at strength p


def test_at_p_0_the_pipeline_leaves_the_images_untouched():
    images = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    same = augment.adaptive_augment(images, torch.tensor(0.0), torch.Generator().manual_seed(2))
    torch.testing.assert_close(same, images, rtol=0, atol=0)
    as_bf16 = augment.adaptive_augment(images.bfloat16(), torch.tensor(0.0), torch.Generator().manual_seed(2))
    assert as_bf16.dtype == torch.float32  # in fp32, as diff_augment
    torch.testing.assert_close(as_bf16, images.bfloat16().float(), rtol=0, atol=0)


def test_at_p_1_the_pipeline_is_diffaugment_of_the_x_flipped_images():
    """Every operation on every image: the gates' draws, then x_flipped's and diff_augment's own."""
    images = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    full = augment.adaptive_augment(images, torch.tensor(1.0), torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    torch.rand(16, 4, generator=generator)  # one gate per image and operation
    expected = augment.diff_augment(augment.x_flipped(images, generator), generator)
    torch.testing.assert_close(full, expected, rtol=0, atol=0)
    assert not torch.equal(expected, augment.diff_augment(images, torch.Generator().manual_seed(3)))


def test_at_p_between_each_operation_is_applied_to_each_image_by_its_own_draw():
    """At p = 0.5, with the draws of p = 1: an image whose four gates are all below p comes out as
    at p = 1, one whose gates are all above comes out untouched, and one with only its cutout
    gate below p is the image with a square of exact zeros (and nothing else changed)."""
    count = 256
    images = torch.rand(count, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 + 0.5  # no zeros
    half = augment.adaptive_augment(images, torch.tensor(0.5), torch.Generator().manual_seed(4))
    full = augment.adaptive_augment(images, torch.tensor(1.0), torch.Generator().manual_seed(4))
    gates = torch.rand(count, 4, generator=torch.Generator().manual_seed(4)) < 0.5
    every, none = gates.all(dim=1), ~gates.any(dim=1)
    cutout_only = gates.tolist().index([False, False, False, True])
    assert every.sum() > 0 and none.sum() > 0
    torch.testing.assert_close(half[every], full[every], rtol=0, atol=0)
    torch.testing.assert_close(half[none], images[none], rtol=0, atol=0)
    cut = half[cutout_only] == 0
    assert cut.any() and (cut == cut[0]).all()  # a square of zeros, the same in every channel
    torch.testing.assert_close(half[cutout_only][~cut], images[cutout_only][~cut], rtol=0, atol=0)
    assert gates.float().mean().item() == pytest.approx(0.5, abs=0.05)


# ---------------------------------------------------------------- ADA's controller


def logits_with_signs(positive, negative, zero=0):
    return torch.tensor([1.5] * positive + [-0.25] * negative + [0.0] * zero).view(-1, 1)


def run_interval(strength, logits, runtime=CPU):
    """One interval of steps, each with D's logits on its real batch; p before its last step, after."""
    for _ in range(ADA_INTERVAL_STEPS - 1):
        strength.observe(logits)
        strength.after_step(runtime)
    before = strength.p.item()
    strength.observe(logits)
    strength.after_step(runtime)
    return before, strength.p.item()


def test_p_moves_by_the_sign_of_the_mean_sign_minus_the_target_times_the_images_over_the_ramp():
    strength = AugmentStrength.start(torch.device("cpu"), target=0.6)
    step = 4 * 10 / ADA_RAMP_IMAGES  # 4 steps of 10 images
    assert strength.p.item() == 0.0
    # r = (9 - 1) / 10 = 0.8 > 0.6: up one step, and only at the interval's end
    assert run_interval(strength, logits_with_signs(9, 1)) == (0.0, pytest.approx(step))
    assert strength.steps == 0 and strength.signs.tolist() == [0.0, 0.0]  # a new interval
    # r = (6 - 0) / 10 with four zeros: a logit of 0 has sign 0, and its image counts: 0.6, p stays
    assert run_interval(strength, logits_with_signs(6, 0, zero=4))[1] == pytest.approx(step)
    # r = 1 > 0.6: up again
    assert run_interval(strength, logits_with_signs(10, 0))[1] == pytest.approx(2 * step)
    # r = 0.4 < 0.6: down; then clamped at 0, not below
    assert run_interval(strength, logits_with_signs(7, 3))[1] == pytest.approx(step)
    assert run_interval(strength, logits_with_signs(0, 10))[1] == 0.0
    assert run_interval(strength, logits_with_signs(5, 5))[1] == 0.0
    # clamped at 1 from just below it
    strength.p.fill_(1 - step / 2)
    assert run_interval(strength, logits_with_signs(10, 0))[1] == 1.0


def test_the_interval_counts_its_images_and_signs_across_steps():
    """The interval's sum of signs and images, as the checkpoint keeps them between its moves."""
    strength = AugmentStrength.start(torch.device("cpu"), target=0.6)
    strength.observe(logits_with_signs(3, 1))
    strength.after_step(CPU)
    strength.observe(logits_with_signs(1, 5, zero=2))
    strength.after_step(CPU)
    assert strength.signs.tolist() == [3 - 1 + 1 - 5, 12.0] and strength.steps == 2
    assert strength.state_dict()["steps"] == 2 and strength.state_dict()["signs"].tolist() == [-2.0, 12.0]


def test_the_flips_the_pipeline_and_the_controller_read_nothing_back_to_the_host(monkeypatch):
    """No .item(), bool() or float() of a tensor: on a GPU each would wait for the step to finish."""

    def host_read(*args):
        raise AssertionError("a host read in the hot loop")

    strength = AugmentStrength.start(torch.device("cpu"))
    images = torch.rand(8, 3, 16, 16)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    for _ in range(ADA_INTERVAL_STEPS):
        augment.adaptive_augment(augment.x_flipped(images), strength.p)
        strength.observe(torch.randn(8, 1))
        strength.after_step(CPU)
    monkeypatch.undo()
    assert strength.steps == 0 and strength.p.item() in (0.0, pytest.approx(32 / ADA_RAMP_IMAGES))


def expected_p_at_log_rows(real_signs, target, log_every):
    """p after every log_every-th step, by ADA's formula, from each step's signs of D's logits."""
    p, total, images, rows = 0.0, 0.0, 0, []
    for step, signs in enumerate(real_signs, start=1):
        total, images = total + sum(signs), images + len(signs)
        if step % ADA_INTERVAL_STEPS == 0:
            p = min(1.0, max(0.0, p + math.copysign(1, total / images - target) * images / ADA_RAMP_IMAGES))
            total, images = 0.0, 0
        if step % log_every == 0:
            rows.append(p)
    return rows


def test_ada_through_the_cli_logs_p_as_the_formula_moves_it(monkeypatch, gan_main, tmp_path):
    """--ada --ada-target --mirror through gan.main: augment_p in metrics.jsonl, and on the progress
    bar, is p as ADA's formula gives it from the signs of D's logits on each step's real batch."""
    real_signs = []

    def recording(D, real, fake, recipe, labels=None, strength=None):
        logits = []
        hook = D.register_forward_hook(lambda module, inputs, output: logits.append(output.detach()))
        try:
            return steps_d_forward(D, real, fake, recipe, labels, strength)
        finally:
            hook.remove()
            real_signs.append(torch.sign(logits[0]).flatten().tolist())

    steps_d_forward = steps.d_forward
    monkeypatch.setattr(steps, "d_forward", recording)
    target = 0.4
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "6", "--ada", "--ada-target", target, "--mirror"])
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    assert len(real_signs) == 24 and len(rows) == 12  # 6 epochs of 4 steps, logged every 2
    expected = expected_p_at_log_rows(real_signs, target, log_every=2)
    assert [row["augment_p"] for row in rows] == pytest.approx(expected, abs=1e-7)
    # the run's p rises, falls back to 0 and rises again (its first interval's move is clamped at 0)
    assert any(later < earlier for earlier, later in zip(expected, expected[1:])) and expected[-1] >= 3 * 32 / 20_000
    assert f"p={expected[-1]:.3f}" in err  # the progress bar's last postfix
    saved = torch.load(tmp_path / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert saved["augment"]["p"].item() == pytest.approx(expected[-1], abs=1e-7)
    assert saved["flags"]["ada"] and saved["flags"]["mirror"] and saved["flags"]["ada_target"] == target


def test_without_ada_there_is_no_p_to_log_or_save(gan_main, tmp_path):
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1", "--diffaugment"])
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("augment_p" not in row for row in rows) and "p=" not in err
    assert torch.load(tmp_path / "checkpoints" / "checkpoint.pt", weights_only=True)["augment"] is None


def test_a_checkpoint_from_before_ada_resumes_with_ada_from_p_0(gan_main, tmp_path):
    """An older checkpoint has no "augment": upgraded says None, and --ada typed at the resume
    starts p at 0 (its first interval's move is at most one step of the ramp)."""
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1"])
    assert code == 0, err
    path = tmp_path / "checkpoints" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    del state["augment"], state["flags"]["ada"], state["flags"]["mirror"]
    torch.save(state, path)
    assert startup.load_upgraded(path)["augment"] is None
    assert startup.load_upgraded(path)["flags"]["ada"] is False
    code, out, err = gan_main(["--resume", "--epochs", "2", "--ada"])
    assert code == 0, err
    assert "resume: changed --ada False -> True" in out
    p = torch.load(path, weights_only=True)["augment"]["p"].item()
    assert p in (0.0, pytest.approx(32 / ADA_RAMP_IMAGES))  # 4 steps of 8 images: one move up, or none
    # the run has --ada now: --ada-target may be typed at its resume (refused without --ada: test_bad_input)
    code, out, err = gan_main(["--resume", "--epochs", "3", "--ada-target", "0.5"])
    assert code == 0, err
    assert "resume: changed --ada-target 0.6 -> 0.5" in out
