"""Start-up: --help and flag errors answer before torch is imported, importing the program pulls
in none of torchvision, torch._dynamo or matplotlib, and an uncompiled run never imports
torch._dynamo (seconds each on a small machine)."""

import subprocess
import sys

import torch
from conftest import GAN_PY, ROOT, TINY_ARGS, subprocess_env

import artifacts
import models
import options
import runtime
import steps

# Run in a fresh interpreter: this test process has long imported torchvision and friends.
PROBE = """
import runpy, sys
sys.path.insert(0, {root!r})
for argv in (["--help"], ["--lr", "-1"]):
    sys.argv = ["gan.py", *argv]
    try:
        runpy.run_path({gan!r}, run_name="__main__")
    except SystemExit as exit:
        print("exit", exit.code, "torch imported:", "torch" in sys.modules, file=sys.stderr)
import gan
heavy = ("torchvision", "torchvision.models", "torch._dynamo", "matplotlib")
print("after import gan:", [name for name in heavy if name in sys.modules], file=sys.stderr)
"""


def test_help_and_flag_errors_answer_before_torch_and_import_gan_stays_light():
    probe = PROBE.format(root=str(ROOT), gan=str(GAN_PY))
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=subprocess_env(), timeout=120
    )
    lines = result.stderr.splitlines()
    assert "usage: gan.py" in result.stdout and "--precision" in result.stdout
    assert "gan.py: error: argument --lr: must be a positive number, got -1" in lines
    assert [line for line in lines if line.startswith(("exit", "after"))] == [
        "exit 0 torch imported: False",
        "exit 2 torch imported: False",
        "after import gan: []",
    ], result.stderr


# A run and its resume, through gan.main in a fresh interpreter.
TRAINING_PROBE = """
import sys
sys.path.insert(0, {root!r})
import gan
assert gan.main([*{tiny!r}, "--epochs", "1"]) == 0
assert gan.main([*{tiny!r}, "--epochs", "2", "--resume"]) == 0
print("imported:", [name for name in ("torch._dynamo", "torchvision") if name in sys.modules], file=sys.stderr)
"""


def test_an_uncompiled_run_and_its_resume_never_import_the_compiler(tmp_path):
    probe = TRAINING_PROBE.format(root=str(ROOT), tiny=list(TINY_ARGS))
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, env=subprocess_env(), timeout=240
    )
    assert result.returncode == 0, result.stderr
    assert "imported: []" in result.stderr.splitlines(), result.stderr
    assert "resuming checkpoints/checkpoint.pt: 1 epoch done, step 4" in result.stdout + result.stderr


def test_the_eager_adam_updates_and_saves_exactly_as_torch_adam():
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 3, generator=generator) for _ in range(2)]
    gradients = [[torch.randn(5, 3, generator=generator) for _ in start] for _ in range(4)]
    runs = {}
    for Adam in (torch.optim.Adam, steps.EagerAdam):
        params = [torch.nn.Parameter(value.clone()) for value in start]
        optimizer = Adam(params, lr=0.01, betas=(0.5, 0.999), foreach=True)
        for step_gradients in gradients:
            for param, gradient in zip(params, step_gradients):
                param.grad = gradient.clone()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        runs[Adam.__name__] = (params, optimizer.state_dict())
    (torch_params, torch_state), (eager_params, eager_state) = runs["Adam"], runs["EagerAdam"]
    torch.testing.assert_close(eager_params, torch_params, rtol=0, atol=0)
    torch.testing.assert_close(eager_state, torch_state, rtol=0, atol=0)
    assert all(param.grad is None for param in eager_params)
    restored = steps.EagerAdam([torch.nn.Parameter(value.clone()) for value in start], lr=0.01)
    restored.load_state_dict(eager_state)
    torch.testing.assert_close(restored.state_dict(), eager_state, rtol=0, atol=0)


def test_flag_choices_name_the_implementations():
    """options.py names the choices without importing torch; the registries must agree."""
    assert options.ARCHITECTURES == tuple(models.ARCHITECTURES)
    assert options.OUTPUTS == tuple(models.OUTPUTS)
    assert options.LOSSES == tuple(steps.LOSSES)
    assert options.PRECISIONS == tuple(runtime.PRECISIONS)
    assert options.IMAGE_SIZES == models.IMAGE_SIZES


def test_grids_are_laid_out_as_torchvision_lays_them():
    from torchvision.utils import make_grid

    generator = torch.Generator().manual_seed(0)
    for count, channels in ((64, 3), (10, 3), (3, 1), (1, 3)):
        images = torch.rand(count, channels, 6, 5, generator=generator) * 2.4 - 1.2  # some outside [-1, 1]
        expected = make_grid(images, nrow=8, padding=2, normalize=True, value_range=(-1, 1))
        ours = artifacts.tile(images.clamp(-1, 1).add(1).div(2), nrow=8)
        torch.testing.assert_close(ours, expected)
