"""What one training step of gan.py costs on the device: kernels per step and the GPU's busy share.

    python benchmarks/profile_step.py --device cuda                      # 64 px, batch 128, compiled
    python benchmarks/profile_step.py --device cuda --compile-mode reduce-overhead
    python benchmarks/profile_step.py --device cpu --image-sizes 32 --batch-sizes 64 --ngf 16 --ndf 16

Builds the same pipeline as benchmarks/throughput.py, warms it up (compilation), then records
--steps steps with torch.profiler. Busy share: the time the GPU spent in kernels divided by the
wall time of the recorded steps; below 1 the GPU waited, mostly for Python launching work.
Under a minute on 2 CPU cores with the small CPU command above; on a GPU mostly compilation.
"""

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # noqa: E402


def build_parser():
    p = throughput.build_parser()
    p.description = __doc__.splitlines()[0]
    p.add_argument("--compile-mode", default="default", help="torch.compile mode, or 'off' for eager")
    p.add_argument("--top", type=int, default=15, help="rows of the operator table")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    args = throughput.finish_args(args)
    device = torch.device(args.device_resolved)
    images, _ = throughput.synthetic_cifar(args.dataset_size)
    mode = None if args.compile_mode == "off" else args.compile_mode
    size, batch = args.image_sizes[0], args.batch_sizes[0]
    pipeline = throughput.ProgramPipeline(args, images, size, batch, mode)
    pipeline.run(args.warmup)
    figures = profile_steps(pipeline, args.steps)
    print(f"{throughput.device_label(device)}; torch {torch.__version__}; {size}x{size}, batch {batch}, "
          f"compile {args.compile_mode}; {args.steps} steps recorded after {args.warmup} warm-up steps")  # fmt: skip
    if device.type == "cuda":
        print(
            f"kernels per step: {figures['kernels_per_step']:.0f}; "
            f"GPU busy {100 * figures['busy_share']:.0f}% of the wall time"
        )
    else:
        print(f"operators per step: {figures['operators_per_step']:.0f}")
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(figures["events"].table(sort_by=sort, row_limit=args.top))


def profile_steps(pipeline, steps):
    """Record `steps` steps of a warmed-up pipeline: operators and (on CUDA) kernels per step, and
    the share of the wall time the GPU spent in kernels (None on the CPU)."""
    device = pipeline.device
    throughput.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as recorded:
        pipeline.run(steps)
        throughput.synchronize(device)
    events = recorded.key_averages()
    figures = {"events": events, "operators_per_step": sum(e.count for e in events) / steps}
    figures["kernels_per_step"] = figures["busy_share"] = None
    if device.type == "cuda":
        kernels = [e for e in recorded.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(e.device_time for e in kernels)
        wall_us = max(e.time_range.end for e in recorded.events()) - min(e.time_range.start for e in recorded.events())
        figures["kernels_per_step"], figures["busy_share"] = len(kernels) / steps, busy_us / wall_us
    return figures


if __name__ == "__main__":
    main()
