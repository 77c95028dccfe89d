"""Training throughput of gan.py against the classic DCGAN pipeline of pytorch/examples.

Both pipelines train the same networks on the same synthetic CIFAR-shaped data, in one
process, in alternating timed rounds after a warm-up; the table gives median images/s.

    python benchmarks/throughput.py --device cpu --markdown                  # BENCHMARKS.md, CPU
    python benchmarks/throughput.py --device cuda --batch-sizes 128 512 --markdown    # on a GPU
    python benchmarks/throughput.py --device cpu --ngf 16 --ndf 16 --image-sizes 32 --batch-sizes 64 \
        --steps 5 --rounds 3 --warmup 2                                        # < 1 min on 2 cores
    python benchmarks/throughput.py --device cpu --precisions fp32 bf16 --compile-modes default
                                                  # the CPU's bf16 against fp32, eager and compiled

The program's path is the one `python gan.py` trains with: options from options.parse_flags,
runtime.setup_runtime (AMP, torch.compile, channels_last and fused Adam on CUDA), steps.build_nets
(with the default EMA), utils.DeviceBatches over a device-resident uint8 tensor and
steps.train_step, with statistics summed on the device and read every --log-every steps.
The classic path follows pytorch/examples dcgan/main.py: a CIFAR10-like dataset of uint8
arrays turned into PIL images, Resize/ToTensor/Normalize per image, DataLoader(num_workers=2,
shuffle=True), fp32, D ending in Sigmoid with BCELoss, D on real then fake, then G through D
(with D's weight gradients), `.item()` on the losses and D outputs and a print every step.
The example's image saving every 100 steps is left out of both.

"compile s" is the warm-up's time beyond what its steps take once warm: torch.compile's compilation
above all (and cuDNN's autotuning, the DataLoader's start). A 25-epoch run pays it once.
About 4 minutes on 2 CPU cores with the CPU defaults (32 and 64 px, batch 128, 5 rounds of 5 steps).
"""

import argparse
import dataclasses
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import options  # noqa: E402
import runtime  # noqa: E402
import steps as update_steps  # noqa: E402
import utils  # noqa: E402
from models import Discriminator, Generator, init_weights  # noqa: E402

CIFAR_TRAIN_SIZE = 50_000
CLASSIC = "classic (pytorch/examples)"
PROGRAM_CONTIGUOUS = "gan.py --compile off, NCHW contiguous"


def program_name(compile_mode, precision="auto"):
    """The pipeline's row name: how gan.py would be started for it."""
    compiled = "--compile off" if compile_mode is None else f"--compile on ({compile_mode})"
    return f"gan.py {compiled}" + ("" if precision == "auto" else f" --precision {precision}")


# ---------------------------------------------------------------- this program's path


class ProgramPipeline:
    """gan.py's training loop without the epoch bookkeeping: batches, train_step, device sums."""

    def __init__(
        self, args, images_uint8, image_size, batch_size, compile_mode=None, channels_last=True, precision="auto"
    ):
        flags = [
            "--device", args.device, "--dataset", "fake", "--image-size", str(image_size),
            "--batch-size", str(batch_size), "--ngf", str(args.ngf), "--ndf", str(args.ndf),
            "--log-every", str(args.log_every), "--seed", "0", "--precision", precision,
        ]  # fmt: skip
        opts, _ = options.parse_flags(flags + ["--compile", "off" if compile_mode is None else "on"])
        mode = None if compile_mode in (None, "default") else compile_mode
        setup = runtime.setup_runtime(opts)
        self.opts, self.runtime = opts, dataclasses.replace(setup, compile_mode=mode, channels_last=channels_last)
        torch.manual_seed(0)
        self.nets = update_steps.build_nets(opts, self.runtime)
        self.recipe = update_steps.Recipe.from_options(opts)
        device_images = images_uint8.to(self.runtime.device)
        self.batches = utils.DeviceBatches(
            device_images, batch_size, image_size, opts.seed, **self.runtime.batch_layout
        )
        self.device = self.runtime.device
        self.real_batches = self.endless_batches()
        self.totals = torch.zeros(4, device=self.device)
        self.step = 0
        self.last_stats = None

    def endless_batches(self):
        epoch = 0
        while True:
            yield from self.batches.epoch(epoch)
            epoch += 1

    def run(self, steps):
        opts = self.opts
        for _ in range(steps):
            stats = update_steps.train_step(
                self.nets, next(self.real_batches), self.recipe, self.runtime, True, opts.ema
            )
            self.totals += torch.stack([stats["loss_d"], stats["loss_g"], stats["d_real"], stats["d_fake"]])
            self.step += 1
            if self.step % opts.log_every == 0:
                self.read_stats()
        self.read_stats()  # the clock stops on a host sync, so queued GPU work is counted

    def read_stats(self):
        self.last_stats = self.totals.tolist()
        self.totals.zero_()


# ---------------------------------------------------------------- the classic pipeline


class PILImages(torch.utils.data.Dataset):
    """Like torchvision.datasets.CIFAR10: HWC uint8 arrays, a PIL image per __getitem__."""

    def __init__(self, images_hwc, transform):
        self.images, self.transform = images_hwc, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), 0


class ClassicPipeline:
    """The training loop of pytorch/examples dcgan/main.py, step for step."""

    def __init__(self, args, images_hwc, image_size, batch_size):
        from torchvision import transforms

        self.device, self.nz, self.null = torch.device(args.device_resolved), 100, open(os.devnull, "w")
        transform = transforms.Compose(
            [
                transforms.Resize(image_size),
                transforms.ToTensor(),
                transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
            ]
        )
        self.loader = torch.utils.data.DataLoader(
            PILImages(images_hwc, transform), batch_size=batch_size, shuffle=True, num_workers=2
        )
        torch.manual_seed(0)
        # the example's networks at 64x64; models.py builds the same layers, deeper or shallower by size
        self.netG = Generator(self.nz, args.ngf, image_size).to(self.device)
        self.netD = nn.Sequential(Discriminator(args.ndf, image_size), nn.Sigmoid()).to(self.device)
        self.netG.apply(init_weights)
        self.netD.apply(init_weights)
        self.criterion = nn.BCELoss()
        self.optimizerD = torch.optim.Adam(self.netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.optimizerG = torch.optim.Adam(self.netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.data_iter = iter(self.loader)

    def next_batch(self):
        try:
            return next(self.data_iter)
        except StopIteration:  # a new epoch: the example starts a new loader iterator
            self.data_iter = iter(self.loader)
            return next(self.data_iter)

    def run(self, steps):
        for step in range(steps):
            self.train_step(step, steps, self.next_batch())

    def train_step(self, i, steps, data):
        netD, netG, criterion, device = self.netD, self.netG, self.criterion, self.device
        real_label, fake_label = 1, 0
        # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
        netD.zero_grad()
        real_cpu = data[0].to(device)
        batch_size = real_cpu.size(0)
        label = torch.full((batch_size,), real_label, dtype=real_cpu.dtype, device=device)
        output = netD(real_cpu)
        errD_real = criterion(output, label)
        errD_real.backward()
        D_x = output.mean().item()
        noise = torch.randn(batch_size, self.nz, 1, 1, device=device)
        fake = netG(noise)
        label.fill_(fake_label)
        output = netD(fake.detach())
        errD_fake = criterion(output, label)
        errD_fake.backward()
        D_G_z1 = output.mean().item()
        errD = errD_real + errD_fake
        self.optimizerD.step()
        # (2) Update G network: maximize log(D(G(z)))
        netG.zero_grad()
        label.fill_(real_label)
        output = netD(fake)
        errG = criterion(output, label)
        errG.backward()
        D_G_z2 = output.mean().item()
        self.optimizerG.step()
        print(
            "[%d/%d][%d/%d] Loss_D: %.4f Loss_G: %.4f D(x): %.4f D(G(z)): %.4f / %.4f"  # noqa: UP031
            % (0, 1, i, steps, errD.item(), errG.item(), D_x, D_G_z1, D_G_z2),
            file=self.null,
        )


# ---------------------------------------------------------------- timing


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, Linux only
        except OSError:
            pass


def peak_memory_mib(device):
    """CUDA: max_memory_allocated. CPU: this process's VmHWM (reset before each round) on
    Linux, else getrusage's ru_maxrss (the whole run); DataLoader workers are not counted."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = process_status_mib("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def memory_source(device):
    what = "per pipeline: what building and warming it up added, plus its round's peak above the round's start"
    if device.type == "cuda":
        return f"{what} (torch.cuda memory_allocated / max_memory_allocated)"
    if Path("/proc/self/status").exists():
        return f"{what} (Linux VmRSS / VmHWM; DataLoader workers not counted)"
    return "not measured on this platform"


def seconds_of(pipeline, steps):
    """Wall time of `steps` steps, the device's queue drained before and after."""
    synchronize(pipeline.device)
    started = time.perf_counter()
    pipeline.run(steps)
    synchronize(pipeline.device)
    return time.perf_counter() - started


def time_round(pipeline, steps, batch_size):
    """Images per second of `steps` steps, and the memory the round needed above what it started with."""
    synchronize(pipeline.device)
    reset_peak_memory(pipeline.device)
    base = current_memory_mib(pipeline.device)
    started = time.perf_counter()
    pipeline.run(steps)
    synchronize(pipeline.device)
    seconds = time.perf_counter() - started
    return steps * batch_size / seconds, max(0.0, peak_memory_mib(pipeline.device) - base)


def current_memory_mib(device):
    """CUDA: memory allocated now. CPU: this process's resident set now (Linux), else 0."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    resident = process_status_mib("VmRSS")
    return 0.0 if resident is None else resident


def process_status_mib(field):
    """A kB field of Linux's /proc/self/status in MiB; None where there is no such file."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return None


def synthetic_cifar(count, seed=0):
    """Random CIFAR-shaped images: (N, 3, 32, 32) uint8 for gan.py, (N, 32, 32, 3) for PIL."""
    images = torch.randint(0, 256, (count, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return images, np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())


def benchmark_setting(args, image_size, batch_size, images_uint8, images_hwc):
    """Median images/s and peak memory of each pipeline at one image and batch size."""
    # a fresh start per setting: compiled code of the last setting would recompile here, and past
    # dynamo's recompile limit a pipeline silently runs eagerly
    torch._dynamo.reset()
    pipelines, resident = {}, {}
    builders = {}
    for precision in args.precisions:
        for mode in [*args.compile_modes, None]:
            builders[program_name(mode, precision)] = lambda mode=mode, precision=precision: ProgramPipeline(
                args, images_uint8, image_size, batch_size, mode, precision=precision
            )
    if args.contiguous:
        builders[PROGRAM_CONTIGUOUS] = lambda: ProgramPipeline(
            args, images_uint8, image_size, batch_size, channels_last=False
        )
    builders[CLASSIC] = lambda: ClassicPipeline(args, images_hwc, image_size, batch_size)
    device = torch.device(args.device_resolved)
    warmup_seconds = {}
    for name, build in builders.items():
        before = current_memory_mib(device)
        pipelines[name] = build()
        warmup_seconds[name] = seconds_of(pipelines[name], args.warmup)
        resident[name] = current_memory_mib(device) - before  # its weights, optimizer state and data
    speeds = {name: [] for name in pipelines}
    peaks = {name: 0.0 for name in pipelines}
    for _ in range(args.rounds):
        for name, pipeline in pipelines.items():
            images_per_s, working_mib = time_round(pipeline, args.steps, batch_size)
            speeds[name].append(images_per_s)
            peaks[name] = max(peaks[name], resident[name] + working_mib)
    classic = statistics.median(speeds[CLASSIC])
    rows = []
    for name in pipelines:
        median = statistics.median(speeds[name])
        warm_step_seconds = batch_size / median
        rows.append(
            {
                "image_size": image_size, "batch_size": batch_size, "pipeline": name,
                "images_per_s": median, "vs_classic": median / classic, "peak_mib": peaks[name],
                "compile_s": max(0.0, warmup_seconds[name] - args.warmup * warm_step_seconds),
                "rounds_images_per_s": speeds[name],
            }
        )  # fmt: skip
    del pipelines
    return rows


# ---------------------------------------------------------------- the table


def device_label(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def format_table(rows, markdown=False):
    header = ["image size", "batch", "pipeline", "images/s (median)", "vs classic", "compile s", "peak MiB"]
    body = [
        [f"{r['image_size']}x{r['image_size']}", str(r["batch_size"]), r["pipeline"], f"{r['images_per_s']:,.0f}"
         if r["images_per_s"] >= 100 else f"{r['images_per_s']:.1f}", f"{r['vs_classic']:.2f}x",
         f"{r['compile_s']:.1f}", f"{r['peak_mib']:,.0f}"]
        for r in rows
    ]  # fmt: skip
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])
    widths = [max(len(cells[i]) for cells in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(cells, widths)) for cells in [header, *body])


def build_parser():
    p = argparse.ArgumentParser(description="Images/s of gan.py's training step against the classic DCGAN pipeline.")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--image-sizes", type=int, nargs="+", default=[32, 64], help="image sides to measure")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128], help="batch sizes to measure")
    p.add_argument("--steps", type=int, default=None, help="training steps per timed round [CUDA 200, CPU 5]")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per pipeline, alternating between pipelines")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps per pipeline first (compilation) [CUDA 50, CPU 2]"
    )
    p.add_argument("--ngf", type=int, default=64, help="generator width, as gan.py --ngf")
    p.add_argument("--ndf", type=int, default=64, help="discriminator width, as gan.py --ndf")
    p.add_argument(
        "--log-every", type=int, default=100, help="gan.py's --log-every: steps between reads of the statistics"
    )
    p.add_argument(
        "--dataset-size", type=int, default=CIFAR_TRAIN_SIZE, help="synthetic 32x32 images [CIFAR-10's 50,000]"
    )
    p.add_argument(
        "--compile-modes",
        nargs="*",
        default=None,
        help="torch.compile modes to measure gan.py with (default, reduce-overhead, max-autotune) [CUDA: all "
        "three; CPU: none]; gan.py --compile off and the classic pipeline are always measured",
    )
    p.add_argument(
        "--precisions",
        nargs="+",
        default=["auto"],
        choices=["auto", "fp32", "bf16", "fp16"],
        help="gan.py's --precision values to measure, each eager and in every --compile-modes",
    )
    p.add_argument(
        "--contiguous", action="store_true", help="also gan.py eager with NCHW contiguous tensors (channels_last off)"
    )
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    return p


def parse_args(argv=None):
    return finish_args(build_parser().parse_args(argv))


def finish_args(args):
    """Defaults that depend on the device."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device_resolved = str(runtime.choose_device(args.device))
    on_cuda = args.device_resolved.startswith("cuda")
    args.steps = args.steps or (200 if on_cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (50 if on_cuda else 2)
    if args.compile_modes is None:
        args.compile_modes = ["default", "reduce-overhead", "max-autotune"] if on_cuda else []
    return args


def run_benchmark(args):
    """All rows of the table, one setting after the other."""
    images_uint8, images_hwc = synthetic_cifar(args.dataset_size)
    rows = []
    for image_size in args.image_sizes:
        for batch_size in args.batch_sizes:
            rows.extend(benchmark_setting(args, image_size, batch_size, images_uint8, images_hwc))
    return rows


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device_resolved)
    rows = run_benchmark(args)
    print(
        f"{device_label(device)}; torch {torch.__version__}; ngf={args.ngf} ndf={args.ndf}; "
        f"{args.steps} steps x {args.rounds} rounds after {args.warmup} warm-up steps; memory: {memory_source(device)}"
    )
    print(format_table(rows, args.markdown))


if __name__ == "__main__":
    main()
