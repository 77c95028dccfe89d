"""A self-check of gan.py's GPU path: one command, a PASS/FAIL table with one line per check.

    python benchmarks/gpu_check.py                    # a CUDA machine: 64 px, one GPU or more
    python benchmarks/gpu_check.py --device cpu       # the same checks at tiny sizes (the test suite runs it)

Needs no internet: the data is --dataset fake (or greyscale PNGs it writes) and FID scores with a
stand-in feature net instead of Inception. Every check runs the program's own code (gan.main in
this process, or gan.py under torchrun) in a temporary folder. Each training row checks that G and
D learned: each made one Adam update per step (less the steps fp16's loss scaling skipped) and
moved its weights from the ones the run began with. The last rows are short throughput, ceiling
and profile runs. On the CPU the compiled rows are skipped (tests/test_compiled.py compiles
there), and so are the torchrun rows (tests/test_distributed.py runs them with gloo). On one GPU
the torchrun rows run 2 processes on it, their collectives through gloo (NCCL takes one process
per GPU). Exits 1 when a check fails; tests/test_self_check.py breaks each check on the CPU and
sees its row fail.
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
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import ceiling  # noqa: E402
import learning  # noqa: E402
import profile_step  # noqa: E402
import throughput  # noqa: E402

import checkpoint  # noqa: E402
import gan  # noqa: E402
import metricslog  # noqa: E402
import runtime  # noqa: E402
import sampling  # noqa: E402
import startup  # noqa: E402
import utils  # noqa: E402
from folders import HostImages  # noqa: E402

PRECISIONS = ("fp32", "bf16", "fp16")
SHARE_GPU = "GPU_CHECK_SHARE_GPU"  # set to 1 for the torchrun workers of a one-GPU machine
LONG_EPOCH = 8  # the Ctrl-C check's epochs are this many times the others'
# Training variants beside the precision rows: (row name, flags, what their checkpoint must show)
VARIANTS = {
    "--conditional": (["--conditional"], lambda flags: flags["conditional"] and flags["num_classes"] == 10),
    "--r1": (["--r1", "1"], lambda flags: flags["r1"] == 1.0),
    "--g-output clip": (["--g-output", "clip"], lambda flags: flags["g_output"] == "clip"),
    "--recipe improved": (
        ["--recipe", "improved"],
        lambda flags: (flags["arch"], flags["g_output"], flags["spectral_loss"]) == ("upsample-fullres", "clip", 3.0),
    ),
}
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
        self.images_per_s = None  # gan.py's, from the throughput row, for the ceiling row

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
        """A short run in one precision: it finishes, G and D learned, its checkpoint is readable."""
        if compile_mode != "off" and self.device.type != "cuda":
            return None
        if compile_mode == "max" and not torch.cuda.is_bf16_supported(including_emulation=False):
            return None  # --compile max takes no fp16 loss scaling, and bf16 is emulated here
        name = f"train-{precision}-compile-{compile_mode}"
        torch._dynamo.reset()  # each precision compiles its own graphs; none of the last run's linger
        started = time.perf_counter()
        out = self.run_ok([*self.flags(name), "--precision", precision, "--compile", compile_mode, "--epochs", "1"])
        seconds = time.perf_counter() - started
        state = self.saved(name)  # refuses non-finite weights
        expect((state["epoch"], state["step"]) == (1, self.steps_per_epoch()), f"saved at step {state['step']}")
        label = runtime.Runtime(self.device, runtime.PRECISIONS[precision]).precision_name
        expect(f"({label}{', compiled' if compile_mode != 'off' else ''}" in out, f"did not train in {label}")
        self.trained = self.trained or name
        return f"1 epoch of {self.steps_per_epoch()} steps in {seconds:.1f} s; {learned(state, self.steps_per_epoch())}"

    def variant(self, row_name, data=()):
        """A short uncompiled run with a variant's flags: it trains, G and D learn, the checkpoint shows the flags."""
        flags, shows = VARIANTS[row_name]
        name = "variant-" + "".join(c for c in row_name if c.isalnum())
        self.run_ok([*self.flags(name), *data, "--compile", "off", "--epochs", "1", *flags])
        state = self.saved(name)
        expect(shows(startup.upgraded_flags(state["flags"])), f"the checkpoint's flags do not show {row_name}")
        return learned(state, self.steps_per_epoch())

    def greyscale(self):
        """A folder of greyscale PNGs: G and D of one channel (--channels auto), and they learn."""
        folder = self.work / "greyscale-images"
        folder.mkdir(parents=True, exist_ok=True)
        side, generator = self.sizes["image_size"], torch.Generator().manual_seed(0)
        for index in range(self.sizes["images"]):
            pixels = torch.randint(0, 256, (side, side), generator=generator, dtype=torch.uint8)
            Image.fromarray(pixels.numpy(), "L").save(folder / f"{index:05d}.png")
        name = "greyscale"
        data = ["--dataset", "folder", "--dataroot", folder, "--workers", "0"]
        self.run_ok([*self.flags(name), *data, "--compile", "off", "--epochs", "1"])
        state = self.saved(name)
        channels = sampling.generator_of(state["flags"])(torch.zeros(1, state["flags"]["nz"], 1, 1)).shape[1]
        expect(state["flags"]["nc"] == 1 and channels == 1, f"{channels} channels drawn")
        return f"1 channel; {learned(state, self.steps_per_epoch())}"

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
        resumed = self.saved(name)
        expect(resumed["epoch"] == 2, "the resumed epoch was not saved")
        updates = learning.adam_updates(resumed["optG"]), learning.adam_updates(resumed["optD"])
        expect(
            updates == (resumed["step"], resumed["step"]),
            f"Adam's updates {updates} did not go on from the checkpoint's",
        )
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
        """The same under a 2-process torchrun: rank 0 scores alone, nobody hangs."""
        if self.device.type != "cuda":
            return None
        name = "fid-torchrun"
        flags = [*self.flags(name), "--epochs", "1", "--fid-every", "1", "--eval-samples", self.sizes["eval_samples"]]
        self.torchrun(flags)
        return fid_logged(self.work / name)

    def ddp(self, sync_bn=False):
        """2 processes under torchrun: both train their shards, G and D learn, the checkpoint holds both ranks."""
        if self.device.type != "cuda":
            return None
        name = "ddp-sync-bn" if sync_bn else "ddp"
        self.torchrun([*self.flags(name), "--epochs", "1", "--compile", "off", *(["--sync-bn"] if sync_bn else [])])
        state = self.saved(name)
        expect(state["world_size"] == 2 and len(state["rng"]["ranks"]) == 2, f"world size {state['world_size']}")
        steps_per_epoch = self.sizes["images"] // (2 * self.sizes["batch_size"])
        expect(state["step"] == steps_per_epoch, f"saved at step {state['step']}, not {steps_per_epoch}")
        return f"2 processes{' (one GPU, gloo)' if self.shares_a_gpu() else ''}; {learned(state, steps_per_epoch)}"

    def shares_a_gpu(self):
        return torch.cuda.device_count() < 2

    def torchrun(self, flags):
        """gan.py's flags under a 2-process torchrun (this script's --worker: the stand-in features)."""
        flags = list(map(str, flags))
        flags[flags.index("--device") + 1] = "cuda:0" if self.shares_a_gpu() else "cuda"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                   __file__, "--worker", *flags]  # fmt: skip
        environment = {**os.environ, SHARE_GPU: "1" if self.shares_a_gpu() else "0"}
        result = subprocess.run(command, capture_output=True, text=True, timeout=400, env=environment)
        expect(result.returncode == 0, f"exit {result.returncode}: {result.stderr[-300:]}")

    def generate_and_interpolate(self):
        expect(self.trained is not None, "no training run finished to sample from")
        folder = self.work / self.trained
        where = ["--checkpoint-dir", folder / "checkpoints", "--image-dir", folder / "images", "--device", self.device]
        self.run_ok(["--generate", "20", *where])
        written = sorted(p for p in (folder / "images" / "generated").glob("*.png") if p.name != "grid.png")
        expect(len(written) == 20, f"{len(written)} images written")
        side = self.sizes["image_size"]
        sizes = {Image.open(path).size for path in written}
        expect(sizes == {(side, side)}, f"images of {sorted(sizes)} pixels, not {side}")
        self.run_ok(["--interpolate", *where])
        expect((folder / "images" / "interpolation.gif").is_file(), "no interpolation.gif")
        return f"{len(written)} PNGs; interpolation.png and .gif"

    def throughput(self):
        """Images/s of gan.py (compiled on CUDA) against the classic pipeline, and the compile time."""
        rows = throughput.benchmark_setting(
            self.benchmark_args(), self.sizes["image_size"], self.sizes["batch_size"], *self.benchmark_images()
        )
        expect(all(row["images_per_s"] > 0 for row in rows), "a pipeline did not run")
        self.images_per_s = rows[0]["images_per_s"]  # gan.py's (compiled on CUDA)
        return "; ".join(
            f"{row['pipeline']}: {row['images_per_s']:,.0f} img/s, {row['vs_classic']:.1f}x, "
            f"compile {row['compile_s']:.1f} s"
            for row in rows
        )

    def ceiling(self):
        """gan.py's images/s (the throughput row's) beside the step's arithmetic ceiling: its FLOPs
        counted over one step, over the matmul rate measured here (bf16 on CUDA, fp32 on the CPU)."""
        expect(self.images_per_s is not None, "no images/s from the throughput row")
        args, batch = self.benchmark_args(), self.sizes["batch_size"]
        images, _ = self.benchmark_images()
        pipeline = throughput.ProgramPipeline(args, images, self.sizes["image_size"], batch)  # eager: countable
        pipeline.run(1)
        flops = ceiling.step_flops(pipeline)
        expect(flops > 0, "no FLOPs counted in a step")
        dtype = ceiling.rate_dtype(self.device)
        rate = ceiling.matmul_rate(self.device, dtype)
        limit = ceiling.ceiling_images_per_s(flops, batch, rate)
        reached = self.images_per_s / limit
        detail = (
            f"{self.images_per_s:,.0f} img/s of a ceiling of {limit:,.0f} ({reached:.1%}): {flops / 1e9:.3g} GFLOP "
            f"per step of {batch}, {str(dtype).split('.')[-1]} matmul {rate / 1e12:.3g} TFLOP/s"
        )
        expect(0 < reached <= 1, f"above the ceiling, so the count or the rate is wrong: {detail}")
        return detail

    def profile(self):
        """Kernels per step and the GPU's busy share of it (operators per step on the CPU)."""
        args = self.benchmark_args()
        mode = "default" if self.device.type == "cuda" else None
        images, _ = self.benchmark_images()
        pipeline = throughput.ProgramPipeline(args, images, self.sizes["image_size"], self.sizes["batch_size"], mode)
        pipeline.run(args.warmup)
        figures = profile_step.profile_steps(pipeline, args.steps)
        expect(figures["operators_per_step"] > 0, "no operators recorded")
        if figures["kernels_per_step"] is None:
            return f"{figures['operators_per_step']:.0f} operators per step (no GPU)"
        expect(figures["kernels_per_step"] > 0, "no kernels recorded")
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


def learned(state, steps_per_network):
    """learning.report's line on how G and D learned in a checkpoint, or Failed with its problem."""
    line, problem = learning.report(state, steps_per_network)
    expect(problem is None, problem)
    return line


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fused(optimizer):
    return bool(optimizer.param_groups[0].get("fused"))


def fid_logged(folder):
    rows = [
        json.loads(line) for line in (folder / "checkpoints" / metricslog.METRICS_LOG_NAME).read_text().splitlines()
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


def share_one_gpu():
    """This torchrun process on GPU 0 beside the other, their collectives through gloo on CUDA
    tensors: gan.py gives each process a GPU of its own, and NCCL takes one process per GPU."""
    real_init = runtime.dist.init_process_group
    runtime.gpu_of_process = lambda requested_device, local_rank: 0
    runtime.dist.init_process_group = lambda backend, **kwargs: real_init("gloo", **{**kwargs, "device_id": None})


def plan(checks):
    """(row name, the call that checks it) in the order they run."""
    rows = [("environment", checks.environment)]
    for compile_mode in ("off", "on"):
        for precision in PRECISIONS:
            rows.append((f"train {precision}, --compile {compile_mode}", lambda p=precision, c=compile_mode: checks.training(p, c)))  # fmt: skip
    rows.append(("train bf16, --compile max", lambda: checks.training("bf16", "max")))
    rows += [(f"train {name}", lambda name=name: checks.variant(name)) for name in VARIANTS]
    return rows + [
        ("train greyscale data", checks.greyscale),
        ("Ctrl-C with --save-every, then --resume", checks.interrupt_and_resume),
        ("CPU checkpoint resumed here", checks.cpu_checkpoint_resumed),
        ("streamed batches = held batches", checks.streamed_batches),
        ("2-process torchrun", checks.ddp),
        ("2-process torchrun, --sync-bn", lambda: checks.ddp(sync_bn=True)),
        ("--fid-every (stand-in features)", checks.fid),
        ("--fid-every under 2-process torchrun", checks.fid_torchrun),
        ("--generate and --interpolate", checks.generate_and_interpolate),
        ("throughput (short)", checks.throughput),
        ("arithmetic ceiling", checks.ceiling),
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
    if argv[:1] == ["--worker"]:  # one process of a torchrun check: gan.py with the stand-in features
        if os.environ.get(SHARE_GPU) == "1":
            share_one_gpu()
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
