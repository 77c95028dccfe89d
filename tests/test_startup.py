"""Start-up: --help and flag errors answer before torch is imported, and importing the program
pulls in none of torchvision, torch._dynamo or matplotlib (seconds on a small machine)."""

import subprocess
import sys

import torch
from conftest import GAN_PY, ROOT, subprocess_env

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


def test_flag_choices_name_the_implementations():
    """options.py names the choices without importing torch; the registries must agree."""
    assert options.ARCHITECTURES == tuple(models.ARCHITECTURES)
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
