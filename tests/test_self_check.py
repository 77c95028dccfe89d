"""benchmarks/gpu_check.py, the GPU self-check, run on the CPU at its tiny sizes so that it
cannot rot; and the streamed-batches switch it uses (GAN_STREAM_BATCHES)."""

import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_ARGS

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
    assert len(rows) == len(names) == 15
    skipped = {row[6:46].strip() for row in rows if row.startswith("SKIP")}
    # compiled runs (seconds per graph on the CPU) and torchrun with NCCL need a GPU
    assert skipped == {f"train {p}, --compile on" for p in ("fp32", "bf16", "fp16")} | {
        "--fid-every under 2-process torchrun"
    }
    assert "8 batches equal" in out and "streamed and trained 1 epoch" in out
    stop = re.search(r"stopped at step (\d+) \(batch (\d+) of 32, exit 130\), resumed to step (\d+)", out)
    stopped, batch, resumed = map(int, stop.groups())
    assert 0 < batch < 32 and resumed == stopped - batch + 32  # to the end of the epoch it stopped in
    assert "compile" in next(row for row in rows if "throughput" in row)


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
