"""How the step is compiled (compiling.py): --compile auto compiles only a run long enough to win
the compile's time back, the first compiled step's time is told, and --compile max's whole step
(refused off CUDA; its maths checked eagerly on the CPU)."""

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_ARGS

import compiling
import options
import runtime
import steps
from errors import UserError

CIFAR10_STEPS = 50_000 // 128  # an epoch of CIFAR-10 at the default batch


class FakeCuda:
    """torch.cuda's answers on a machine with one GPU with native bf16 (nothing is put on it)."""

    def __init__(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


def runtime_on_cuda(monkeypatch, *flags):
    FakeCuda(monkeypatch)
    opts, _ = options.parse_flags(["--device", "cuda", *flags])
    return runtime.setup_runtime(opts), opts


@pytest.mark.parametrize(
    "flags, steps_per_epoch, resumed_epoch, compiled",
    [(["--epochs", "25"], CIFAR10_STEPS, None, False),  # 9,750 steps save 19.5 s of a 60 s compile
     (["--epochs", "100"], CIFAR10_STEPS, None, True),  # 39,000 steps save 78 s
     (["--epochs", "100"], CIFAR10_STEPS, 90, False),  # resumed with 10 epochs left
     (["--epochs", "100"], 300, None, False),  # 30,000 steps save exactly the compile's 60 s
     (["--epochs", "100"], 301, None, True),
     (["--epochs", "25", "--compile", "on"], CIFAR10_STEPS, None, True)],  # typed: compiled
)  # fmt: skip
def test_auto_compiles_only_runs_long_enough_to_repay_it(
    monkeypatch, capsys, flags, steps_per_epoch, resumed_epoch, compiled
):
    cuda, opts = runtime_on_cuda(monkeypatch, *flags)
    assert cuda.compile and cuda.device.type == "cuda"  # it may compile; the run's length decides
    resumed = None if resumed_epoch is None else ({"epoch": resumed_epoch, "batch": 0}, "checkpoint.pt")
    decided = compiling.compile_if_it_pays(cuda, opts, steps_per_epoch, resumed)
    assert decided.compile is compiled and not decided.compile_auto
    said = capsys.readouterr().out
    if compiled:
        assert said == ""
    else:
        steps = compiling.steps_left(opts, resumed, steps_per_epoch)
        assert f"--compile auto: {steps:,} steps would not win back a compile (about 60 s)" in said


def test_auto_counts_a_kimg_run_s_steps_in_global_batches_of_every_process(monkeypatch, capsys):
    """--kimg 1000 on two processes of 128 images a step: 3,907 steps, not the 7,813 of one process."""
    import dataclasses

    cuda, opts = runtime_on_cuda(monkeypatch, "--kimg", "1000")
    two = dataclasses.replace(cuda, world_size=2)
    decided = compiling.compile_if_it_pays(two, opts, CIFAR10_STEPS, None)
    assert not decided.compile
    assert "--compile auto: 3,907 steps would not win back a compile" in capsys.readouterr().out
    assert compiling.steps_left(opts, None, CIFAR10_STEPS, 1) == 7_813


def test_steps_left_count_from_the_checkpoint():
    opts, _ = options.parse_flags(["--epochs", "10"])
    assert compiling.steps_left(opts, None, 7) == 70
    assert compiling.steps_left(opts, ({"epoch": 3, "batch": 2}, "checkpoint.pt"), 7) == 47


def test_steps_left_of_a_kimg_run_are_its_images_in_steps():
    opts, _ = options.parse_flags(["--kimg", "100", "--batch-size", "128"])
    assert compiling.steps_left(opts, None, 390) == 782  # 100,000 images in steps of 128, rounded up
    assert compiling.steps_left(opts, None, 390, world_size=2) == 391  # 256 images a step
    resumed = ({"epoch": 1, "batch": 110, "step": 500}, "checkpoint.pt")
    assert compiling.steps_left(opts, resumed, 390) == 282


def test_the_first_compiled_step_says_how_long_it_took(monkeypatch, capsys):
    clock = iter([10.0, 17.25])
    monkeypatch.setattr(compiling, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    calls = []
    step = compiling.training_step(
        lambda *args: calls.append(args) or {"loss_d": 1}, runtime.Runtime(torch.device("cpu"), compile=True)
    )
    assert step(1, 2) == {"loss_d": 1} and step(3, 4) == {"loss_d": 1}
    assert calls == [(1, 2), (3, 4)]
    assert capsys.readouterr().out == "compiled the steps in 7.2 s (the first step, compile included)\n"
    uncompiled = compiling.training_step(steps.train_step, runtime.Runtime(torch.device("cpu")))
    assert uncompiled is steps.train_step


# ---------------------------------------------------------------- --compile max


def test_compile_max_off_cuda_is_refused_in_one_line(gan_main, tmp_path):
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1", "--compile", "max"])
    assert code == 2
    assert err == (
        "gan.py: error: --compile max captures the step as CUDA graphs, which need CUDA (not cpu); use --compile on\n"
    )
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "flags, message",
    [(["--precision", "fp16"], "--compile max needs --precision bf16 or fp32"),
     (["--r1", "1"], "--compile max does not take --r1"),
     (["--ada"], "--compile max does not take --ada"),
     (["--sync-bn"], "--sync-bn does not work with --compile max")],
)  # fmt: skip
def test_compile_max_refuses_what_its_graphs_cannot_hold(monkeypatch, flags, message):
    with pytest.raises(UserError, match=message):
        runtime_on_cuda(monkeypatch, "--compile", "max", *flags)
    with pytest.raises(UserError, match="--compile max runs in one process"):
        runtime.check_whole_step(torch.bfloat16, 2, r1=0.0)


def test_compile_max_compiles_the_whole_step_with_capturable_adam(monkeypatch):
    cuda, _ = runtime_on_cuda(monkeypatch, "--compile", "max")
    assert (cuda.compile, cuda.whole_step, cuda.compile_auto, cuda.compile_mode) == (
        True,
        True,
        False,
        "reduce-overhead",
    )
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: compiled.append((function, kwargs)) or function)
    opts, _ = options.parse_flags([*TINY_ARGS])
    on_cpu = runtime.Runtime(torch.device("cpu"), compile=True, whole_step=True, compile_mode="reduce-overhead")
    nets = steps.build_nets(opts, on_cpu)
    assert compiled == []  # no update compiled alone: the whole step is
    assert nets.opt_G.defaults["capturable"] and nets.opt_D.defaults["capturable"]
    compiling.training_step(steps.train_step, on_cpu)
    assert compiled == [(steps.train_step, {"mode": "reduce-overhead", "dynamic": False})]


def test_the_whole_step_trains_as_train_step_with_the_decay_in_a_tensor(monkeypatch):
    """Run eagerly on the CPU (torch.compile left out): G and D exactly as train_step leaves them,
    and the EMA the hand computation decay * ema + (1 - decay) * G of each step's decay."""
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: function)
    opts, _ = options.parse_flags([*TINY_ARGS])
    cpu = runtime.Runtime(torch.device("cpu"))
    torch.manual_seed(0)
    plain = steps.build_nets(opts, cpu)
    whole = copy.deepcopy(plain)
    step = compiling.WholeStep(steps.train_step, cpu)
    recipe = steps.Recipe.from_options(opts)
    real = torch.rand(8, 3, 16, 16) * 2 - 1
    for index, decay in enumerate((0.1, 0.5, 0.9)):
        ema_before = [p.clone() for p in whole.G_ema.parameters()]
        torch.manual_seed(index)
        expected = steps.train_step(plain, real, recipe, cpu, True, decay)
        torch.manual_seed(index)
        stats = step(whole, real, recipe, cpu, True, decay)
        assert {name: value.item() for name, value in stats.items()} == {k: v.item() for k, v in expected.items()}
        for ema, before, trained in zip(whole.G_ema.parameters(), ema_before, whole.G.parameters()):
            torch.testing.assert_close(ema, decay * before + (1 - decay) * trained, rtol=0, atol=1e-6)
    for name in ("G", "D"):
        for mine, theirs in zip(getattr(whole, name).parameters(), getattr(plain, name).parameters()):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
