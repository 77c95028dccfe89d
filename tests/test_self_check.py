"""benchmarks/gpu_check.py, the GPU self-check, run on the CPU at its tiny sizes so that it
cannot rot; and the streamed-batches switch it uses (GAN_STREAM_BATCHES)."""

import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_ARGS

import startup

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_self_check_passes_on_the_cpu(tmp_path, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    gpu_check = load_benchmark("gpu_check")
    code = gpu_check.main(["--device", "cpu", "--work-dir", str(tmp_path)])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")]
    assert code == 0, out
    names = [name for name, _ in gpu_check.plan(gpu_check.Checks("cpu", tmp_path))]
    assert len(rows) == len(names) == 24
    skipped = {row[6:46].strip() for row in rows if row.startswith("SKIP")}
    # compiled runs (seconds per graph on the CPU) and torchrun need a GPU here
    assert skipped == {f"train {p}, --compile on" for p in ("fp32", "bf16", "fp16")} | {
        "train bf16, --compile max", "2-process torchrun", "2-process torchrun, --sync-bn",
        "--fid-every under 2-process torchrun",
    }  # fmt: skip
    # 4 steps of 8 images; fp16's loss scaling skips its first step (its scale halves once)
    assert "train fp32, --compile off                 1 epoch of 4 steps" in out
    assert "G 4 updates, weights moved" in row_of(rows, "train bf16, --compile off")
    assert "G 3 updates (1 skipped by fp16 loss scaling)" in row_of(rows, "train fp16, --compile off")
    assert row_of(rows, "train greyscale data").startswith("1 channel; G 4 updates")
    assert "8 batches equal" in out and "streamed and trained 1 epoch" in out
    stop = re.search(r"stopped at step (\d+) \(batch (\d+) of 32, exit 130\), resumed to step (\d+)", out)
    stopped, batch, resumed = map(int, stop.groups())
    assert 0 < batch < 32 and resumed == stopped - batch + 32  # to the end of the epoch it stopped in
    assert "compile" in row_of(rows, "throughput (short)")
    ceiling = re.search(r"([\d,]+) img/s of a ceiling of ([\d,]+) \(([\d.]+)%\)", row_of(rows, "arithmetic ceiling"))
    images_per_s, limit, percent = (float(value.replace(",", "")) for value in ceiling.groups())
    assert percent == pytest.approx(100 * images_per_s / limit, abs=0.06)  # the row's rounding
    assert "float32 matmul" in row_of(rows, "arithmetic ceiling")


def row_of(rows, name):
    """The detail of a row of the table, by its name."""
    return next(row[48:] for row in rows if row[6:46].strip() == name)


# ---------------------------------------------------------------- negative controls: each row can fail


def optimizer_broken(monkeypatch, network, how):
    """Every later run's Adam of network ("G" or "D"): how="zeroed" steps on zeroed gradients (it
    learns nothing); how="skipping" leaves out every other step."""
    real_build = startup.build_nets

    def build(opts, runtime):
        nets = real_build(opts, runtime)
        optimizer = getattr(nets, f"opt_{network}")
        real_step, calls = optimizer.step, []

        def step(*args, **kwargs):
            calls.append(1)
            if how == "skipping" and len(calls) % 2 == 0:
                return None
            if how == "zeroed":
                for group in optimizer.param_groups:
                    for parameter in group["params"]:
                        parameter.grad.zero_()
            return real_step(*args, **kwargs)

        optimizer.step = step
        return nets

    monkeypatch.setattr(startup, "build_nets", build)


def table(gpu_check, tmp_path, capsys, rows=None):
    """{row name: (PASS/FAIL/SKIP, detail)} of a self-check on the CPU (of the named rows alone)."""
    if rows is not None:
        real_plan = gpu_check.plan
        gpu_check.plan = lambda checks: [(name, call) for name, call in real_plan(checks) if name in rows]
    gpu_check.main(["--device", "cpu", "--work-dir", str(tmp_path)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")]
    return {line[6:46].strip(): (line[:4], line[48:]) for line in lines}


def test_every_row_fails_when_what_it_checks_is_broken(tmp_path, capsys, monkeypatch):
    """Each row's own thing broken at once: every row that runs on the CPU says FAIL, and why."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    gpu_check = load_benchmark("gpu_check")
    import after_training
    import checkpoint
    import sampling
    import utils

    monkeypatch.setattr(gpu_check.runtime, "missing_compiler", lambda device: "a C++ compiler (g++)")
    optimizer_broken(monkeypatch, "G", "zeroed")  # every training row
    monkeypatch.setattr(startup, "carry_position", lambda progress, *args: setattr(progress, "batch", 0))
    monkeypatch.setattr(checkpoint, "with_this_runs_settings", lambda saved, optimizer: {**saved, "state": {}})
    real_epoch = utils.StreamedBatches.epoch
    monkeypatch.setattr(utils.StreamedBatches, "epoch", lambda self, epoch: (b + 1 for b in real_epoch(self, epoch)))
    monkeypatch.setattr(sampling.TrainingEvaluator, "due", lambda self, epoch: False)
    real_generated = after_training.generated_batches
    monkeypatch.setattr(
        after_training, "generated_batches", lambda *a, **k: (i[..., ::2, ::2] for i in real_generated(*a, **k))
    )
    stalled = {"pipeline": "gan.py --compile off", "images_per_s": 0.0, "vs_classic": 0.0, "compile_s": 0.0}
    monkeypatch.setattr(gpu_check.throughput, "benchmark_setting", lambda *a: [stalled])
    monkeypatch.setattr(gpu_check.profile_step, "profile_steps", lambda *a: {"operators_per_step": 0})
    rows = table(gpu_check, tmp_path, capsys)
    why = {
        "environment": "compiler: missing a C++ compiler (g++)",
        **{f"train {p}, --compile off": "G did not learn" for p in gpu_check.PRECISIONS},
        **{f"train {name}": "G did not learn" for name in [*gpu_check.VARIANTS, "greyscale data"]},
        "Ctrl-C with --save-every, then --resume": "the resume fell short",
        "CPU checkpoint resumed here": "did not go on from the checkpoint's",
        "streamed batches = held batches": "epoch 0: batch 0 differs",
        "--fid-every (stand-in features)": "FID rows: []",
        "--generate and --interpolate": "images of [(8, 8)] pixels, not 16",
        "throughput (short)": "a pipeline did not run",
        "arithmetic ceiling": "no images/s from the throughput row",  # its own breakage: the next test
        "profile (short)": "no operators recorded",
    }
    assert {name for name, (result, _) in rows.items() if result != "SKIP"} == set(why)
    for name, reason in why.items():
        assert rows[name][0] == "FAIL" and reason in rows[name][1], (name, rows[name])


def test_the_ceiling_row_fails_when_a_step_is_counted_wrong(tmp_path, capsys, monkeypatch):
    gpu_check = load_benchmark("gpu_check")
    real_flops = gpu_check.ceiling.step_flops
    monkeypatch.setattr(gpu_check.ceiling, "step_flops", lambda pipeline: 1e6 * real_flops(pipeline))
    rows = table(gpu_check, tmp_path, capsys, ["throughput (short)", "arithmetic ceiling"])
    result, detail = rows["arithmetic ceiling"]
    assert result == "FAIL" and detail.startswith("above the ceiling, so the count or the rate is wrong"), detail


def test_every_precision_row_fails_when_d_does_not_learn_or_skips_a_step(tmp_path, capsys, monkeypatch):
    gpu_check = load_benchmark("gpu_check")
    precision_rows = [f"train {p}, --compile off" for p in gpu_check.PRECISIONS]
    build_nets = startup.build_nets
    optimizer_broken(monkeypatch, "D", "zeroed")
    rows = table(gpu_check, tmp_path / "zeroed", capsys, precision_rows)
    assert {name: result for name, (result, _) in rows.items()} == dict.fromkeys(precision_rows, "FAIL")
    assert all(detail.startswith("D did not learn: its weights moved 0.0e+00") for _, detail in rows.values())
    monkeypatch.setattr(startup, "build_nets", build_nets)
    optimizer_broken(monkeypatch, "G", "skipping")
    rows = table(gpu_check, tmp_path / "skipping", capsys, precision_rows[:1])
    result, detail = rows[precision_rows[0]]
    assert result == "FAIL" and detail.startswith("G made 2 Adam updates in 4 steps, not 4"), detail


def test_a_failing_check_is_a_fail_row_and_exit_1(tmp_path, capsys, monkeypatch):
    gpu_check = load_benchmark("gpu_check")
    checks = gpu_check.Checks("cpu", tmp_path)
    monkeypatch.setattr(gpu_check, "plan", lambda _: [("environment", checks.environment), ("broken", lambda: 1 / 0)])
    assert gpu_check.main(["--device", "cpu", "--work-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  broken" in out and "ZeroDivisionError" in out and "1 of 2 rows passed or skipped, 1 failed" in out


# ---------------------------------------------------------------- GAN_STREAM_BATCHES


def test_streamed_batches_train_exactly_as_held_ones(gan_main, tmp_path, monkeypatch):
    """The same run, once with its images on the device and once streamed: the same weights."""
    runs = {}
    for name, stream in (("held", "0"), ("streamed", "1")):
        monkeypatch.setenv("GAN_STREAM_BATCHES", stream)
        folders = ["--checkpoint-dir", f"{name}/checkpoints", "--image-dir", f"{name}/images"]
        code, out, err = gan_main([*TINY_ARGS, "--epochs", "2", *folders])
        assert code == 0, err
        runs[name] = torch.load(tmp_path / name / "checkpoints" / "checkpoint.pt", weights_only=True)
        runs[name]["out"] = out
    assert "GAN_STREAM_BATCHES=1: streaming batches from host memory" in runs["streamed"]["out"]
    assert "4 steps per epoch" in runs["streamed"]["out"] and "(streamed from host memory)" in runs["streamed"]["out"]
    assert "(held on cpu)" in runs["held"]["out"]
    for net in ("netG", "netD"):
        for key, value in runs["held"][net].items():
            torch.testing.assert_close(runs["streamed"][net][key], value, rtol=0, atol=0, msg=f"{net}.{key}")


def test_a_bad_stream_switch_is_refused(gan_main, tmp_path, monkeypatch):
    monkeypatch.setenv("GAN_STREAM_BATCHES", "yes")
    code, _, err = gan_main([*TINY_ARGS, "--epochs", "1"])
    assert code == 2
    assert "GAN_STREAM_BATCHES=yes: give 1 (stream the batches from host memory) or 0" in err


# ---------------------------------------------------------------- the throughput table


class Clock:
    seconds = 0.0


class FakePipeline:
    """A pipeline whose steps take 10 ms of a fake clock each, and whose first run compiles for 7 s."""

    def __init__(self, *args, compile_seconds=7.0, **kwargs):
        self.device, self.compile_seconds = torch.device("cpu"), compile_seconds

    def run(self, steps):
        Clock.seconds += steps * 0.01 + self.compile_seconds
        self.compile_seconds = 0.0


def test_the_throughput_table_reports_compile_time(monkeypatch):
    throughput = load_benchmark("throughput")
    monkeypatch.setattr(throughput, "time", SimpleNamespace(perf_counter=lambda: Clock.seconds))
    monkeypatch.setattr(throughput, "ProgramPipeline", FakePipeline)
    monkeypatch.setattr(throughput, "ClassicPipeline", lambda *args: FakePipeline(compile_seconds=0.5))
    monkeypatch.setattr(throughput.torch._dynamo, "reset", lambda: None)
    args = throughput.parse_args(["--device", "cpu", "--compile-modes", "default", "--steps", "5", "--warmup", "3"])
    rows = throughput.benchmark_setting(args, 32, 64, None, None)
    compile_seconds = {row["pipeline"]: row["compile_s"] for row in rows}
    assert compile_seconds == {
        "gan.py --compile on (default)": pytest.approx(7.0),
        "gan.py --compile off": pytest.approx(7.0),
        "classic (pytorch/examples)": pytest.approx(0.5),
    }
    assert all(row["images_per_s"] == pytest.approx(64 / 0.01) for row in rows)
    table = throughput.format_table(rows).splitlines()
    assert table[0].split("  ")[:1] == ["image size"] and "compile s" in table[0]
    assert "7.0" in table[1] and "0.5" in table[3]
