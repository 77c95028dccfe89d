"""The GPU's code path, run on the CPU: torch.compile (inductor) over whole updates, in bf16 autocast.

Compiling costs tens of seconds on a small CPU, so these few tests share one image size and width
(inductor's cache then serves the later ones) and check several things each.
"""

import shutil

import pytest
import torch
from conftest import TINY_ARGS

import options
import steps
from runtime import setup_runtime

pytestmark = pytest.mark.skipif(
    not shutil.which("g++") and not shutil.which("c++"), reason="inductor needs a C++ compiler"
)

NET_FLAGS = ["--device", "cpu", "--image-size", "16", "--nz", "8", "--ngf", "8", "--ndf", "8"]
# the same in every test, so that inductor's cache serves the later ones; --ada's pipeline holds
# DiffAugment's operations, each behind its gate, and takes p as an input of the graphs
STEP_FLAGS = ["--precision", "bf16", "--diffaugment", "--ada", "--spectral-loss", "1"]
# DiffAugment's random draws as in eager; and inductor's C++ without its SIMD variants, which the GPU
# (whose kernels are Triton's) never runs and which would double the C++ the CPU generates and compiles
INDUCTOR = {"fallback_random": True, "cpp.vec_isa_ok": False}


def build(*flags):
    opts, _ = options.parse_flags([*NET_FLAGS, *flags])
    runtime = setup_runtime(opts)
    torch.manual_seed(0)
    return steps.build_nets(opts, runtime), opts, runtime


def run_steps(nets, opts, runtime, count=3):
    recipe = steps.Recipe.from_options(opts)
    nets.augment_strength.p.fill_(0.5)  # every operation on about half the images (p moves at step 4)
    generator = torch.Generator().manual_seed(5)
    history = []
    for step in range(count):
        real = (torch.rand(8, 3, 16, 16, generator=generator) * 2 - 1).contiguous(memory_format=runtime.memory_format)
        torch.manual_seed(100 + step)
        stats = steps.train_step(nets, real, recipe, runtime, update_g=True, ema_decay=0.5)
        history.append({name: value.item() for name, value in stats.items()})
    return history


def weights(nets):
    return {name: torch.cat([p.detach().flatten() for p in getattr(nets, name).parameters()]) for name in ("G", "D")}


# inductor compiles both updates and their backward, from nothing when its cache is cold: over a
# minute on a busy 2-core machine
@pytest.mark.timeout(180)
def test_compiled_bf16_steps_agree_with_eager_ones():
    """Whole compiled updates (the augment pipeline at p = 0.5, both D forwards, the losses with the
    spectral loss's FFT, their backward) give the statistics of the eager updates, and change G's
    and D's weights as they do, within bf16 rounding; the compiled D update counts the signs of its
    logits on the real images into --ada's sums.

    The tolerance is calibrated: measured, the compiled steps' change of the weights differs from
    the eager steps' by 0.06 of it for G and 0.03 for D (0.11 and 0.03 with inductor's SIMD kernels):
    bf16 rounds differently in fused kernels and flips the sign of the smallest gradients, and Adam's
    first steps are about lr * sign; steps that leave a network alone differ by exactly 1.
    """
    import torch._inductor.config

    eager, opts, runtime = build(*STEP_FLAGS, "--compile", "off")
    compiled, opts_c, runtime_c = build(*STEP_FLAGS, "--compile", "on")
    assert runtime_c.compile and not runtime.compile and runtime_c.amp_dtype == torch.bfloat16
    start = weights(eager)
    assert all(torch.equal(start[name], weights(compiled)[name]) for name in start)
    eager_history = run_steps(eager, opts, runtime)
    with torch._inductor.config.patch(INDUCTOR):
        compiled_history = run_steps(compiled, opts_c, runtime_c)
    for strength in (eager.augment_strength, compiled.augment_strength):
        assert strength.steps == 3 and strength.signs[1].item() == 3 * 8
    for eager_stats, compiled_stats in zip(eager_history, compiled_history):
        assert set(compiled_stats) == {"loss_d", "loss_g", "d_real", "d_fake"}
        for name, value in eager_stats.items():
            assert compiled_stats[name] == pytest.approx(value, abs=0.02), name
    eager_end, compiled_end = weights(eager), weights(compiled)
    for name in ("G", "D"):
        eager_change, compiled_change = eager_end[name] - start[name], compiled_end[name] - start[name]
        relative = ((compiled_change - eager_change).norm() / eager_change.norm()).item()
        assert relative < 0.3, name
    # p is an input of the graphs, not a constant in them: another p compiles nothing new
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    compiled.augment_strength.p.fill_(0.9)
    with torch._inductor.config.patch(INDUCTOR):
        real = torch.zeros(8, 3, 16, 16).contiguous(memory_format=runtime_c.memory_format)
        steps.train_step(compiled, real, steps.Recipe.from_options(opts_c), runtime_c, ema_decay=0.5)
    assert counters["stats"]["unique_graphs"] == graphs and compiled.augment_strength.steps == 0


def test_the_cli_compiles_a_bounded_number_of_graphs(gan_main, tmp_path):
    """Two epochs with --d-steps 2 and --ada, the epoch pictures (sampling), a resume: a fixed set
    of graphs, none of them split by a graph break, and no recompilation as the run goes on."""
    import torch._inductor.config
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # compiled code of earlier tests would be reused and not counted
    counters.clear()
    flags = [*STEP_FLAGS, "--compile", "on", "--d-steps", "2"]
    with torch._inductor.config.patch(INDUCTOR):  # the graphs of the test above: cached
        code, out, err = gan_main([*TINY_ARGS, *flags, "--epochs", "2"])
    assert code == 0, err
    assert "bf16 autocast, compiled" in out
    assert out.count("compiled the steps in ") == 1  # the first step's time, compile included
    # G with gradients, G without (the D-only steps), the D update, the G update
    first_run = counters["stats"]["unique_graphs"]
    assert 3 <= first_run <= 4, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    with torch._inductor.config.patch(INDUCTOR):
        code, out, err = gan_main(["--resume", "--epochs", "3", "--device", "cpu"])
    assert code == 0, err
    # a resumed run in the same process builds new nets: at most the same graphs once more
    assert counters["stats"]["unique_graphs"] <= 2 * first_run
    assert not counters["graph_break"]


def test_fp16_with_loss_scaling_resumes_an_fp32_checkpoint(gan_main, tmp_path):
    """A V100 or T4 (fp16 + GradScaler) resuming a run saved in fp32 or bf16, which has no scaler state."""
    code, _, err = gan_main([*TINY_ARGS, "--epochs", "1", "--precision", "fp32"])
    assert code == 0, err
    code, out, err = gan_main(["--resume", "--epochs", "2", "--precision", "fp16", "--device", "cpu"])
    assert code == 0, err
    assert "fp16 autocast" in out
    state = torch.load(tmp_path / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and state["scalerG"]["scale"] > 0  # the fp16 run's scaler is saved
    assert all(torch.isfinite(v).all() for v in state["netG"].values() if v.is_floating_point())
    # and back: an fp32 run ignores the fp16 run's scaler state
    code, _, err = gan_main(["--resume", "--epochs", "3", "--precision", "fp32", "--device", "cpu"])
    assert code == 0, err
