"""A self-check of gan.py's GPU path: one command, a PASS/FAIL table with one line per check.

    python benchmarks/gpu_check.py                    # a CUDA machine: 64 px, under 8 minutes on one GPU
    python benchmarks/gpu_check.py --device cpu       # the same checks at tiny sizes (the test suite runs it)

Needs no internet: the data is --dataset fake and FID scores with a stand-in feature net instead
of Inception. Every check runs the program's own code (gan.main in this process, or gan.py as a
subprocess) in a temporary folder; the last rows are a short throughput and profile run. On the CPU
the compiled rows are skipped (tests/test_compiled.py compiles there), and so is the 2-process
FID row (tests/test_distributed.py runs it with gloo). Exits 1 when a check fails.
"""

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import profile_step  # noqa: E402
import throughput  # noqa: E402

import checkpoint  # noqa: E402
import gan  # noqa: E402
import runtime  # noqa: E402
import utils  # noqa: E402
from folders import HostImages  # noqa: E402

PRECISIONS = ("fp32", "bf16", "fp16")
LONG_EPOCH = 8  # the Ctrl-C check's epochs are this many times the others'
# the sizes of the checks: the default model at 64 px on CUDA; a tiny one on the CPU
SIZES = {
    "cuda": {"image_size": 64, "batch_size": 128, "images": 2560, "eval_samples": 512, "nets": []},
    "cpu": {"image_size": 16, "batch_size": 8, "images": 32, "eval_samples": 16,
            "nets": ["--nz", "8", "--ngf", "8", "--ndf", "8"]},
}  # fmt: skip


class ChannelStatistics(nn.Module):
    """uint8 images -> channel means and spread: FID's features without Inception's download."""

    num_features = 4

    def forward(self, images_uint8):
        images = images_uint8.float() / 255
        return torch.cat([images.mean(dim=(2, 3)), images.flatten(1).std(dim=1, keepdim=True)], dim=1)


@dataclass
class Row:
    name: str
    passed: bool | None  # None: skipped
    detail: str


class Failed(Exception):
    """A check's expectation that did not hold; its message is the row's detail."""


def expect(condition, message):
    if not condition:
        raise Failed(message)


class Checks:
    """The checks, each a method returning its row's detail (or raising Failed), run in order."""

    def __init__(self, device, work):
        self.device, self.work = torch.device(device), Path(work)
        self.sizes = SIZES["cuda" if self.device.type == "cuda" else "cpu"]
        self.trained = None  # the folder of the first training run, for --generate and --interpolate

    # ------------------------------------------------------------ running gan.py

    def flags(self, name, device=None):
        """A run's flags: its own folders under the work folder, the check's sizes, fake data."""
        sizes = self.sizes
        return [
            "--dataset", "fake", "--device", str(device or self.device), "--seed", "0",
            "--image-size", str(sizes["image_size"]), "--batch-size", str(sizes["batch_size"]),
            "--subset", str(sizes["images"]), "--log-every", "5", *sizes["nets"], *map(str, self.folders(name)),
        ]  # fmt: skip

    def folders(self, name):
        return ["--checkpoint-dir", self.work / name / "checkpoints", "--image-dir", self.work / name / "images"]

    def gan(self, argv, feature=None, **environment):
        """gan.main(argv) in this process: (exit code, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), environment_set(environment):
            with signal_handlers_kept():  # a training run installs its own, to stop at a step's end
                code = gan.main([str(a) for a in argv], feature)
        return code, out.getvalue(), err.getvalue()

    def run_ok(self, argv, feature=None, **environment):
        code, out, err = self.gan(argv, feature, **environment)
        lines = (err or out).strip().splitlines()
        expect(code == 0, f"exit {code}: {lines[-1] if lines else ''}")
        return out

    def saved(self, name):
        """The run's checkpoint, checked as a resume would (finite weights, known fields)."""
        return checkpoint.load_checkpoint(self.work / name / "checkpoints" / checkpoint.CHECKPOINT_NAME)

    def steps_per_epoch(self):
        return self.sizes["images"] // self.sizes["batch_size"]

    # ------------------------------------------------------------ the checks

    def environment(self):
        versions = [f"torch {torch.__version__}"]
        if self.device.type == "cuda":
            versions += [
                f"CUDA {torch.version.cuda}",
                f"cuDNN {torch.backends.cudnn.version()}",
                f"NCCL {dotted(torch.cuda.nccl.version())}",
                f"Triton {module_version('triton')}",
                f"bf16 {'native' if torch.cuda.is_bf16_supported(including_emulation=False) else 'emulated only'}",
                f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(self.device)}",
            ]
        missing = runtime.missing_compiler(self.device)
        versions.append(f"compiler: {'missing ' + missing if missing else 'found'}")
        expect(missing is None, "; ".join(versions))
        return "; ".join(versions)

    def training(self, precision, compile_mode):
        """A short run in one precision: it finishes, and its checkpoint holds finite weights."""
        if compile_mode == "on" and self.device.type != "cuda":
            return None
        name = f"train-{precision}-compile-{compile_mode}"
        torch._dynamo.reset()  # each precision compiles its own graphs; none of the last run's linger
        started = time.perf_counter()
        out = self.run_ok([*self.flags(name), "--precision", precision, "--compile", compile_mode, "--epochs", "1"])
        seconds = time.perf_counter() - started
        state = self.saved(name)  # refuses non-finite weights
        expect((state["epoch"], state["step"]) == (1, self.steps_per_epoch()), f"saved at step {state['step']}")
        label = runtime.Runtime(self.device, runtime.PRECISIONS[precision]).precision_name
        expect(f"({label}{', compiled' if compile_mode == 'on' else ''}" in out, f"did not train in {label}")
        self.trained = self.trained or name
        return f"1 epoch of {self.steps_per_epoch()} steps in {seconds:.1f} s, weights finite, checkpoint readable"

    def interrupt_and_resume(self):
        """A real SIGINT (Ctrl-C) once --save-every has saved mid-epoch, then --resume to that epoch's end."""
        name = "interrupted"
        saved = self.work / name / "checkpoints" / checkpoint.CHECKPOINT_NAME
        finished = threading.Event()

        def interrupt_once_saved():
            while not saved.exists() and not finished.wait(0.05):
                pass
            if not finished.is_set():  # the run's own handler is installed: it stops at the step's end
                os.kill(os.getpid(), signal.SIGINT)

        watcher = threading.Thread(target=interrupt_once_saved, daemon=True)
        watcher.start()
        try:
            # long epochs, so that the stop (at the step after the signal) comes mid-epoch
            flags = [*self.flags(name), "--compile", "off", "--epochs", "1000", "--save-every", "2"]
            code, _, err = self.gan([*flags, "--subset", LONG_EPOCH * self.sizes["images"]])
        finally:
            finished.set()
            watcher.join()
        expect(code == 130 and "Resume with" in err, f"exit {code}: {err.strip()[-300:]}")
        stopped = self.saved(name)
        epochs, steps_per_epoch = stopped["epoch"] + 1, LONG_EPOCH * self.steps_per_epoch()
        self.run_ok(["--resume", "--epochs", epochs, "--device", self.device, "--compile", "off", *self.folders(name)])
        resumed = self.saved(name)
        expect((resumed["epoch"], resumed["step"]) == (epochs, epochs * steps_per_epoch), "the resume fell short")
        return (
            f"stopped at step {stopped['step']} (batch {stopped['batch']} of {steps_per_epoch}, exit 130), "
            f"resumed to step {resumed['step']}"
        )

    def cpu_checkpoint_resumed(self):
        """A checkpoint written on the CPU, resumed on this device: Adam's state where its kernels read it."""
        name = "from-cpu"
        flags = [*self.flags(name, device="cpu"), "--compile", "off", "--epochs", "1", "--subset", "64"]
        flags[flags.index("--batch-size") + 1] = "16"  # a few quick steps on the CPU
        self.run_ok(flags)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            resume = ["--resume", "--epochs", "2", "--device", str(self.device), "--compile", "off"]
            state = gan.run([*resume, *map(str, self.folders(name))])
        misplaced = [
            f"{key} on {value.device}"
            for optimizer in (state.nets.opt_G, state.nets.opt_D)
            for entry in optimizer.state.values()
            for key, value in entry.items()
            if value.device.type != self.device.type and not (key == "step" and not fused(optimizer))
        ]
        expect(not misplaced, f"optimizer state misplaced: {misplaced[:3]}")
        expect(self.saved(name)["epoch"] == 2, "the resumed epoch was not saved")
        fused_flags = {fused(state.nets.opt_G), fused(state.nets.opt_D)}
        return f"resumed on {self.device} (fused Adam: {fused_flags == {True}}), optimizer state on {self.device.type}"

    def streamed_batches(self):
        """The streamed batches equal the held ones, batch for batch, while the device is kept busy."""
        sizes = self.sizes
        images = torch.randint(0, 256, (sizes["images"], 3, 32, 32), generator=torch.Generator().manual_seed(0))
        images = images.to(torch.uint8)
        layout = runtime.Runtime(self.device, torch.bfloat16).batch_layout
        batch, side = sizes["batch_size"], sizes["image_size"]
        held = utils.DeviceBatches(images.to(self.device), batch, side, 0, **layout)
        streamed = utils.StreamedBatches(HostImages(images), batch, side, 0, device=self.device, **layout)
        busy = torch.randn(2048, 2048, device=self.device) if self.device.type == "cuda" else None
        compared = 0
        for epoch in (0, 1):
            for held_batch, streamed_batch in zip(held.epoch(epoch), streamed.epoch(epoch), strict=True):
                if busy is not None:  # queue work ahead of the next copy, so copies and gathers overlap it
                    for _ in range(8):
                        busy = torch.tanh(busy @ busy)
                expect(torch.equal(held_batch, streamed_batch), f"epoch {epoch}: batch {compared} differs")
                compared += 1
        name = "streamed"
        out = self.run_ok([*self.flags(name), "--compile", "off", "--epochs", "1"], GAN_STREAM_BATCHES="1")
        expect("streamed from host memory" in out, "GAN_STREAM_BATCHES=1 did not stream")
        return f"{compared} batches equal; gan.py with {utils.STREAM_VARIABLE}=1 streamed and trained 1 epoch"

    def fid(self):
        """--fid-every with a stand-in feature net: a score logged and best.pt kept."""
        name = "fid"
        flags = [*self.flags(name), "--epochs", "1", "--fid-every", "1", "--eval-samples", self.sizes["eval_samples"]]
        self.run_ok(flags, ChannelStatistics())
        return fid_logged(self.work / name)

    def fid_torchrun(self):
        """The same under a 2-process torchrun (NCCL): rank 0 scores alone, nobody hangs."""
        if self.device.type != "cuda" or torch.cuda.device_count() < 2:
            return None
        name = "fid-torchrun"
        flags = [*self.flags(name), "--epochs", "1", "--fid-every", "1", "--eval-samples", self.sizes["eval_samples"]]
        flags[flags.index("--device") + 1] = "cuda"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                   __file__, "--fid-worker", *map(str, flags)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=400)
        expect(result.returncode == 0, f"exit {result.returncode}: {result.stderr[-300:]}")
        return fid_logged(self.work / name)

    def generate_and_interpolate(self):
        expect(self.trained is not None, "no training run finished to sample from")
        folder = self.work / self.trained
        where = ["--checkpoint-dir", folder / "checkpoints", "--image-dir", folder / "images", "--device", self.device]
        self.run_ok(["--generate", "20", *where])
        written = sorted((folder / "images" / "generated").glob("*.png"))
        expect(len(written) >= 20, f"{len(written)} images written")
        self.run_ok(["--interpolate", *where])
        expect((folder / "images" / "interpolation.gif").is_file(), "no interpolation.gif")
        return f"{len(written)} PNGs; interpolation.png and .gif"

    def throughput(self):
        """Images/s of gan.py (compiled on CUDA) against the classic pipeline, and the compile time."""
        rows = throughput.benchmark_setting(
            self.benchmark_args(), self.sizes["image_size"], self.sizes["batch_size"], *self.benchmark_images()
        )
        expect(all(row["images_per_s"] > 0 for row in rows), "a pipeline did not run")
        return "; ".join(
            f"{row['pipeline']}: {row['images_per_s']:,.0f} img/s, {row['vs_classic']:.1f}x, "
            f"compile {row['compile_s']:.1f} s"
            for row in rows
        )

    def profile(self):
        """Kernels per step and the GPU's busy share of it (operators per step on the CPU)."""
        args = self.benchmark_args()
        mode = "default" if self.device.type == "cuda" else None
        images, _ = self.benchmark_images()
        pipeline = throughput.ProgramPipeline(args, images, self.sizes["image_size"], self.sizes["batch_size"], mode)
        pipeline.run(args.warmup)
        figures = profile_step.profile_steps(pipeline, args.steps)
        if figures["kernels_per_step"] is None:
            return f"{figures['operators_per_step']:.0f} operators per step (no GPU)"
        return f"{figures['kernels_per_step']:.0f} kernels per step; GPU busy {100 * figures['busy_share']:.0f}%"

    def benchmark_args(self):
        on_cuda = self.device.type == "cuda"
        nets = ["--ngf", "64", "--ndf", "64"] if on_cuda else ["--ngf", "8", "--ndf", "8"]
        return throughput.parse_args(
            ["--device", str(self.device), *nets, "--steps", "50" if on_cuda else "2", "--rounds", "3" if on_cuda else "1",
             "--warmup", "20" if on_cuda else "1", "--compile-modes", *(["default"] if on_cuda else [])]
        )  # fmt: skip

    def benchmark_images(self):
        return throughput.synthetic_cifar(max(self.sizes["images"], 4 * self.sizes["batch_size"]))


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fused(optimizer):
    return bool(optimizer.param_groups[0].get("fused"))


def fid_logged(folder):
    rows = [
        json.loads(line) for line in (folder / "checkpoints" / checkpoint.METRICS_LOG_NAME).read_text().splitlines()
    ]
    scores = [row for row in rows if "fid" in row]
    expect(len(scores) == 1 and scores[0]["fid"] >= 0, f"FID rows: {scores}")
    expect((folder / "checkpoints" / "best.pt").is_file(), "no best.pt")
    return f"FID {scores[0]['fid']:.2f} logged at step {scores[0]['step']}; best.pt kept"


def dotted(version):
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def module_version(name):
    try:
        return __import__(name).__version__
    except ImportError:
        return "missing"


@contextlib.contextmanager
def signal_handlers_kept():
    kept = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in kept.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def environment_set(variables):
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def plan(checks):
    """(row name, the call that checks it) in the order they run."""
    rows = [("environment", checks.environment)]
    for compile_mode in ("off", "on"):
        for precision in PRECISIONS:
            rows.append((f"train {precision}, --compile {compile_mode}", lambda p=precision, c=compile_mode: checks.training(p, c)))  # fmt: skip
    return rows + [
        ("Ctrl-C with --save-every, then --resume", checks.interrupt_and_resume),
        ("CPU checkpoint resumed here", checks.cpu_checkpoint_resumed),
        ("streamed batches = held batches", checks.streamed_batches),
        ("--fid-every (stand-in features)", checks.fid),
        ("--fid-every under 2-process torchrun", checks.fid_torchrun),
        ("--generate and --interpolate", checks.generate_and_interpolate),
        ("throughput (short)", checks.throughput),
        ("profile (short)", checks.profile),
    ]


def run_checks(device, work):
    checks = Checks(device, work)
    rows = []
    for name, call in plan(checks):
        started = time.perf_counter()
        try:
            detail = call()
            row = Row(name, None if detail is None else True, "skipped here" if detail is None else detail)
        except Failed as failure:
            row = Row(name, False, str(failure))
        except Exception as error:  # a crash is that row's failure; the other checks still run
            row = Row(name, False, f"{error.__class__.__name__}: {str(error).strip().splitlines()[0][:300]}")
        row.detail += f" [{time.perf_counter() - started:.0f} s]"
        print(format_row(row), flush=True)
        rows.append(row)
    return rows


def format_row(row):
    result = {True: "PASS", False: "FAIL", None: "SKIP"}[row.passed]
    return f"{result}  {row.name:<40}  {row.detail}"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--fid-worker"]:  # one process of the torchrun check: gan.py with the stand-in features
        return gan.main(argv[1:], ChannelStatistics())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (tiny sizes) [cuda]")
    parser.add_argument("--work-dir", default=None, help="where the runs write [a temporary folder, removed after]")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check.py: no CUDA GPU here; --device cpu runs the checks at tiny sizes", file=sys.stderr)
        return 2
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gan-gpu-check-"))
    started = time.perf_counter()
    print(f"gan.py self-check on {args.device}, in {work}")
    try:
        rows = run_checks(args.device, work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    failed = sum(row.passed is False for row in rows)
    print(
        f"{len(rows) - failed} of {len(rows)} rows passed or skipped, {failed} failed, {time.perf_counter() - started:.0f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
