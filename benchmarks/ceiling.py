"""The arithmetic ceiling of gan.py's training step on a device: the FLOPs of one step, counted
by torch's FlopCounterMode, over the device's matmul rate, measured here (bf16 on CUDA, fp32 on
the CPU). No step can train images faster than the ceiling; how close one comes is the share of
the device's arithmetic that the step uses.

    python benchmarks/ceiling.py --device cuda         # the default model, 64 px, batch 128
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # noqa: E402


def step_flops(pipeline):
    """FLOPs of one eager training step of a throughput.ProgramPipeline (forwards, backwards;
    convolutions and matmuls, as FlopCounterMode counts them: the optimizer's element-wise work
    is left out)."""
    counter = FlopCounterMode(display=False)
    with counter:
        pipeline.run(1)
    return counter.get_total_flops()


def matmul_rate(device, dtype, side=None, repeats=None):
    """FLOP/s of square matmuls on device in dtype, the best of a few timed runs."""
    on_cuda = device.type == "cuda"
    side = side or (8192 if on_cuda else 1024)
    repeats = repeats or (20 if on_cuda else 4)
    first, second = (torch.randn(side, side, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(3):
        first @ second  # the first round also warms up the library's kernels
        throughput.synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            first @ second
        throughput.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * side**3 * repeats / best


def rate_dtype(device):
    """The matmul precision the ceiling is measured in: bf16 on CUDA (gan.py's autocast there), fp32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def ceiling_images_per_s(flops_per_step, batch_size, rate):
    return rate * batch_size / flops_per_step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--ngf", type=int, default=64)
    p.add_argument("--ndf", type=int, default=64)
    args = p.parse_args(argv)
    bench = throughput.parse_args(["--device", args.device, "--ngf", str(args.ngf), "--ndf", str(args.ndf)])
    images, _ = throughput.synthetic_cifar(4 * args.batch_size)
    pipeline = throughput.ProgramPipeline(bench, images, args.image_size, args.batch_size)
    pipeline.run(2)
    flops = step_flops(pipeline)
    rate = matmul_rate(pipeline.device, rate_dtype(pipeline.device))
    ceiling = ceiling_images_per_s(flops, args.batch_size, rate)
    print(f"{flops / 1e9:.2f} GFLOP per step of {args.batch_size} images; matmul {rate / 1e12:.2f} TFLOP/s "
          f"({rate_dtype(pipeline.device)}); ceiling {ceiling:,.0f} images/s")  # fmt: skip


if __name__ == "__main__":
    main()
