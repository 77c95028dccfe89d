"""Images per second of gan.py with 1 and 2 torchrun processes (gloo, CPU): a markdown table.

    python benchmarks/scaling.py                      # ngf=ndf=16, 32x32, batch 32 per process
    python benchmarks/scaling.py --ngf 64 --epochs 4  # the default width

Every configuration trains on the same 512 fake images for the same number of epochs;
img/s is the median of the epoch summary lines after the first (which pays for warm-up).
About 2.5 minutes on 2 CPU cores with the defaults.
"""

import argparse
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GAN_PY = Path(__file__).resolve().parents[1] / "gan.py"
SUMMARY = re.compile(r"^\[(\d+)/\d+\].*\s([\d.]+)s\s+(\d+) img/s", re.MULTILINE)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def gan_flags(args):
    return [
        "--dataset", "fake", "--device", "cpu", "--no-compile", "--seed", "0",
        "--image-size", str(args.image_size), "--ngf", str(args.ngf), "--ndf", str(args.ngf),
        "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--log-every", "1000",
    ]  # fmt: skip


def run_config(processes, threads, args):
    """Train once; return (median img/s after epoch 1, wall seconds)."""
    if processes == 1:
        launcher = [sys.executable, str(GAN_PY)]
    else:
        launcher = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(GAN_PY),
        ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        result = subprocess.run([*launcher, *gan_flags(args)], cwd=folder, env=env, capture_output=True, text=True)
        wall_seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{processes} process(es) failed:\n{result.stderr[-3000:]}")
    rates = [float(rate) for epoch, _, rate in SUMMARY.findall(result.stdout) if int(epoch) > 1]
    return statistics.median(rates), wall_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is not timed")
    parser.add_argument("--ngf", type=int, default=16, help="width of both networks (ngf = ndf)")
    parser.add_argument("--image-size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step, per process")
    args = parser.parse_args()
    configs = [(1, 1), (1, 2), (2, 1)]  # (processes, threads per process)
    print(
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs; "
        f"ngf=ndf={args.ngf}, {args.image_size}x{args.image_size}, batch {args.batch_size} per process, "
        f"{args.epochs} epochs of 512 fake images"
    )
    print()
    print("| processes | threads each | img/s (median, epochs 2+) | speed-up vs 1x1 | wall s (incl. start-up) |")
    print("|---:|---:|---:|---:|---:|")
    baseline = None
    for processes, threads in configs:
        images_per_s, wall_seconds = run_config(processes, threads, args)
        baseline = baseline or images_per_s
        print(
            f"| {processes} | {threads} | {images_per_s:.0f} | {images_per_s / baseline:.2f}x | {wall_seconds:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
