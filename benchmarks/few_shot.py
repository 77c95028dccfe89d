"""Few-shot benchmark: 100 training images, the improved recipe with and without --mirror and --ada.

No network, no GPU, no Inception weights. Two folders of 100 images at 32 px each: flat art (glyphs
in one flat colour on white, flat_art.py) and random crops of photographs (photos.py). Each
variant is trained on each folder through the real CLI for the same number of images (--kimg),
with several seeds, sampled with `gan.py --generate`, and scored against 1,000 held-out images of
the same kind (not the 100 trained on: a generator that only repeats its 100 images should not
score as the best) by
  - FD in the features of a fixed random conv net (scores.RandomFeatures), as photos.py;
  - precision and recall (k=3) in the same features (metrics.nearest_neighbour_scores);
  - flat share (scores.flat_share): the share of pixels with no colour step to a neighbour.
A variant "wins" a folder when its FD is below the plain recipe's on every seed.

    python benchmarks/few_shot.py                                  # 4 variants x 2 folders x 3 seeds
    python benchmarks/few_shot.py --kimg 6.4 --seeds 0 --jobs 2 --grid-dir benchmarks/grids/few_shot
"""

import argparse
import os
import platform
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from flat_art import render_flat_art
from photos import load_photographs, random_crops, save_grid
from quality import read_pngs, run_gan_commands, write_pngs
from scores import RandomFeatures, flat_share, frechet_distance

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from metrics import nearest_neighbour_scores  # noqa: E402

VARIANTS = {
    "improved": ["--recipe", "improved"],
    "improved+mirror": ["--recipe", "improved", "--mirror"],
    "improved+ada": ["--recipe", "improved", "--ada"],
    "improved+mirror+ada": ["--recipe", "improved", "--mirror", "--ada"],
}
TRAIN_IMAGES = 100
REFERENCE_IMAGES = 1000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="what to compare")
    p.add_argument("--folders", nargs="+", choices=["flat-art", "photos"], default=["flat-art", "photos"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds per variant")
    p.add_argument("--kimg", type=float, default=12.8, help="thousands of images per run (400 steps at batch 32)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step")
    p.add_argument("--width", type=int, default=32, help="ngf = ndf")
    p.add_argument("--samples", type=int, default=1000, help="generated images scored per run")
    p.add_argument("--jobs", type=int, default=2, help="training runs in parallel, one CPU thread each")
    p.add_argument("--work-dir", default=None, help="where folders and runs go [a temp folder]")
    p.add_argument("--grid-dir", default=None, help="where the sample grids go [WORK_DIR/grids]")
    return p.parse_args(argv)


def folder_images(name):
    """(the 100 training images, the 1,000 held-out reference images) of one kind, uint8."""
    count = TRAIN_IMAGES + REFERENCE_IMAGES
    if name == "flat-art":
        images = render_flat_art(count, seed=0)
    else:
        images = random_crops(load_photographs(), count, 32, 3.0, seed=0)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(0))
    return images[order[:TRAIN_IMAGES]], images[order[TRAIN_IMAGES:]]


def train_and_sample(variant, seed, folder, args, run_dir):
    """One run through the CLI, then args.samples images from its EMA generator; (images, seconds)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    common = ["--device", "cpu", "--checkpoint-dir", "checkpoints", "--image-dir", "images"]
    train = [
        "--dataset", "folder", "--dataroot", str(folder), "--image-size", "32", "--ngf", str(args.width),
        "--ndf", str(args.width), "--batch-size", str(args.batch_size), "--kimg", str(args.kimg),
        "--seed", str(seed), "--workers", "0", *VARIANTS[variant],
    ]  # fmt: skip
    generate = ["--generate", str(args.samples), "--seed", "12345"]
    seconds = run_gan_commands([train, generate], common, run_dir)
    return read_pngs(run_dir / "images" / "generated"), seconds


def scores_of(images, reference, feature, reference_features):
    with torch.no_grad():
        neighbours = nearest_neighbour_scores(reference_features, feature(images))
        return {
            "fd": frechet_distance(feature, reference, images),
            "precision": neighbours["precision"],
            "recall": neighbours["recall"],
            "flat": float(flat_share(images).mean()),
        }


def print_table(name, results, floor, args):
    print(f"\n{name}: {TRAIN_IMAGES} training images, {args.kimg} kimg per run, seeds {args.seeds}")
    print(f"real-vs-real (the 100 trained on vs the reference): FD {floor['fd']:.3f}, flat {floor['flat']:.3f}")
    print("| variant | FD ↓ (per seed) | precision ↑ | recall ↑ | flat share | FD below the recipe's on every seed |")
    print("|---|---|---|---|---|---|")
    baseline = [row["fd"] for row in results.get("improved", [])]
    for variant, rows in results.items():
        cells = [" / ".join(f"{row[key]:{spec}}" for row in rows) for key, spec in SCORE_CELLS]
        wins = "-" if variant == "improved" or not baseline else str(all(r["fd"] < b for r, b in zip(rows, baseline)))
        print(f"| `{' '.join(VARIANTS[variant])}` | " + " | ".join(cells) + f" | {wins} |")


SCORE_CELLS = [("fd", ".3f"), ("precision", ".2f"), ("recall", ".2f"), ("flat", ".3f")]


def main(argv=None):
    args = parse_args(argv)
    work_dir = Path(args.work_dir or Path(tempfile.gettempdir()) / "dcgan-few-shot-benchmark")
    grid_dir = Path(args.grid_dir or work_dir / "grids")
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs; work folder {work_dir}")
    feature = RandomFeatures(seed=0)
    for name in args.folders:
        train_images, reference = folder_images(name)
        folder = work_dir / f"{name}-{TRAIN_IMAGES}"
        write_pngs(train_images, folder)
        save_grid(train_images, grid_dir / f"{name}-real.png")
        with torch.no_grad():
            reference_features = feature(reference)
        floor = scores_of(train_images, reference, feature, reference_features)
        runs = [(variant, seed) for variant in args.variants for seed in args.seeds]

        run_dirs = [work_dir / "runs" / f"{name}-{variant}-seed{seed}" for variant, seed in runs]
        with ThreadPoolExecutor(args.jobs) as pool:
            jobs = [pool.submit(train_and_sample, *run, folder, args, run_dir) for run, run_dir in zip(runs, run_dirs)]
            outcomes = [job.result() for job in jobs]
        results = {variant: [] for variant in args.variants}
        for (variant, seed), (images, seconds) in zip(runs, outcomes):
            scores = {**scores_of(images, reference, feature, reference_features), "seconds": seconds}
            results[variant].append(scores)
            save_grid(images, grid_dir / f"{name}-{variant}-seed{seed}.png")
            print(f"{name} {variant} seed {seed}: FD {scores['fd']:.3f} flat {scores['flat']:.3f} ({seconds:.0f}s)")
        print_table(name, results, floor, args)
    print(f"\ngrids (first 64 samples, 2x nearest): {grid_dir}")


if __name__ == "__main__":
    main()
