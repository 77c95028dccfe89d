"""How many samples the EMA generator's BatchNorm statistics need: FD at 512, 1,024 and 4,096.

Trains `--recipe improved` (EMA on) through the CLI on the digits benchmark
(quality.py's settings) and the photos benchmark (photos.py's), one run per seed; then, in this
process, gives the run's EMA generator statistics estimated from each sample count
(`models.estimate_batch_norm`, several estimate seeds each), draws the same noise with each and
scores FD as those benchmarks do. The spread over estimate seeds says how much of an FD
difference the estimate's own noise explains. Grids of the first 64 samples (estimate seed 0)
go to WORK_DIR/grids for looking.

    python benchmarks/ema_statistics.py                                   # both benchmarks, seeds 0 1 2
    python benchmarks/ema_statistics.py --benchmarks digits --seeds 0

Long on 2 CPU cores: the digits part with one seed took about 35 minutes at load 9-17.
"""

import argparse
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import photos  # noqa: E402
import quality  # noqa: E402

import models  # noqa: E402
import sampling  # noqa: E402
from artifacts import save_grid  # noqa: E402
from runtime import Runtime  # noqa: E402

RECIPE = "improved"  # EMA 0.999; the plain DCGAN collapses on the digits at these budgets, FD ~5,000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--benchmarks", nargs="+", choices=["digits", "photos"], default=["digits", "photos"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds")
    p.add_argument("--sample-counts", nargs="+", type=int, default=[512, 1024, 4096], help="estimate sizes")
    p.add_argument("--estimate-seeds", nargs="+", type=int, default=[0, 1, 2], help="noise seeds of each estimate")
    p.add_argument("--work-dir", default=None, help="runs, data and grids [a temp folder]; finished runs are reused")
    return p.parse_args(argv)


def digits_setup(work_dir):
    """quality.py's default settings, its digit PNGs and its FD scorer."""
    args = quality.parse_args([])
    images, labels = quality.load_digits_uint8()
    folder = work_dir / "digits"
    quality.write_pngs(images, folder)
    classifier, _ = quality.train_classifier(images, labels, work_dir / "classifier-seed0.pt")
    scorer = quality.Scorer(classifier, images, args.samples)
    return args, folder, lambda generated: scorer(generated)["fd"]


def photos_setup(work_dir):
    """photos.py's default settings, its crops and its FD scorer."""
    args = photos.parse_args([])
    crops = photos.random_crops(photos.load_photographs(), args.crops, args.image_size, args.crop_scale, 0)
    folder = work_dir / f"crops{args.image_size}"
    quality.write_pngs(crops, folder)
    order = torch.randperm(len(crops), generator=torch.Generator().manual_seed(args.crop_seed))
    scorer = photos.PhotoScorer(crops[order[: args.samples]], args.feature_seed)
    return args, folder, lambda generated: scorer(generated)["fd"]


def trained_ema_generator(args, data_folder, runs_dir, seed, image_size):
    """The EMA generator of one finished run (trained now unless runs_dir holds it)."""
    path = runs_dir / f"{RECIPE}-seed{seed}" / "checkpoints" / "checkpoint.pt"
    if not path.is_file() or torch.load(path, weights_only=True)["epoch"] < args.epochs:
        quality.train_and_sample(RECIPE, seed, args, data_folder, runs_dir, image_size)
    state = torch.load(path, weights_only=True)
    G = sampling.generator_of(state["flags"])
    G.load_state_dict(state["netG_ema"])
    return G, state["flags"]["nz"]


def to_uint8(images):
    return images.clamp(-1, 1).add(1).mul(127.5).add(0.5).clamp(0, 255).to(torch.uint8)


def score_counts(G, nz, count_scored, fd_of, args, grid_prefix):
    """{(samples, estimate seed): (FD, seconds of the estimate)} for one trained generator."""
    runtime = Runtime(torch.device("cpu"))
    noise = torch.randn(count_scored, nz, 1, 1, generator=torch.Generator().manual_seed(12345))
    results = {}
    for samples, estimate_seed in itertools.product(args.sample_counts, args.estimate_seeds):
        started = time.perf_counter()
        models.estimate_batch_norm(G, nz, runtime.device, samples=samples, seed=estimate_seed)
        seconds = time.perf_counter() - started
        generated = torch.cat([sampling.sample(G, part, runtime) for part in noise.split(500)])
        results[samples, estimate_seed] = (fd_of(to_uint8(generated)), seconds)
        if estimate_seed == args.estimate_seeds[0]:
            save_grid(generated[:64], f"{grid_prefix}-{samples}.png")
    return results


def print_table(name, per_seed, args):
    print(f"\n{name}: FD of the EMA generator by estimate size (per training seed: mean over estimate seeds "
          f"{args.estimate_seeds}, ± their std)")  # fmt: skip
    print("| samples | " + " | ".join(f"seed {s}" for s in args.seeds) + " | seconds per estimate |")
    print("|---:|" + "---:|" * (len(args.seeds) + 1))
    for samples in args.sample_counts:
        cells, seconds = [], []
        for seed in args.seeds:
            values = [per_seed[seed][samples, e][0] for e in args.estimate_seeds]
            seconds += [per_seed[seed][samples, e][1] for e in args.estimate_seeds]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} ± {spread:.4f}")
        print(f"| {samples} | " + " | ".join(cells) + f" | {statistics.median(seconds):.2f} |")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    work_dir = Path(args.work_dir or Path(tempfile.gettempdir()) / "dcgan-ema-statistics")
    (work_dir / "grids").mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs; work folder {work_dir}")
    for name in args.benchmarks:
        bench_args, folder, fd_of = (digits_setup if name == "digits" else photos_setup)(work_dir)
        image_size = quality.IMAGE_SIZE if name == "digits" else bench_args.image_size
        per_seed = {}
        for seed in args.seeds:
            G, nz = trained_ema_generator(bench_args, folder, work_dir / f"runs-{name}", seed, image_size)
            prefix = work_dir / "grids" / f"{name}-seed{seed}"
            per_seed[seed] = score_counts(G, nz, bench_args.samples, fd_of, args, prefix)
            print(
                f"{name} seed {seed}: " + ", ".join(f"{k}: {v[0]:.4f}" for k, v in per_seed[seed].items()), flush=True
            )
        print_table(name, per_seed, args)


if __name__ == "__main__":
    main()
