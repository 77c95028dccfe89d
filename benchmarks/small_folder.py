"""A small real folder through the CLI: when do shapes appear, and do transposed convolutions
leave a checkerboard? DCGAN (`--arch dcgan`) against `--arch upsample`, same flags otherwise.

Writes scikit-learn's 1797 handwritten digits as 32x32 PNGs (as quality.py does), trains each
architecture with `gan.py --dataset folder` (28 steps per epoch at batch 64), then prints, per
epoch grid of the fixed noise, the share of the samples' AC power at the period-2 frequencies
(a checkerboard; real digits: about 0.004%) and writes a side-by-side of chosen epochs' grids.
When shapes appear is judged by looking at that picture (or images/epoch_*.png of each run).

    python benchmarks/small_folder.py                                   # 30 epochs, seed 0: about 10 minutes on 2 idle CPU cores (30 at load 10)
    python benchmarks/small_folder.py --seeds 0 1 --show-epochs 8 30 --picture dcgan_vs_upsample.png
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import load_digits_uint8, write_pngs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STEPS_PER_EPOCH = 1797 // 64
ARCHS = {"dcgan": [], "upsample": ["--arch", "upsample"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30, help="epochs per run (28 steps each)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    p.add_argument("--width", type=int, default=32, help="ngf = ndf")
    p.add_argument("--work-dir", default="/tmp/dcgan-small-folder", help="digits and runs; finished runs are kept")
    p.add_argument("--show-epochs", type=int, nargs="+", default=[8, 30], help="epochs in the picture, one row each")
    p.add_argument("--picture", default=None, help="the side-by-side PNG [WORK_DIR/dcgan_vs_upsample.png]")
    p.add_argument("--rows", type=int, default=4, help="rows of 8 samples of each grid in the picture")
    return p.parse_args(argv)


def train(arch, seed, args, digits, run_dir):
    """One run through the CLI; skipped when run_dir holds a finished one."""
    if (run_dir / "images" / f"epoch_{args.epochs:03d}.png").is_file():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, str(ROOT / "gan.py"), "--dataset", "folder", "--dataroot", str(digits),
        "--image-size", "32", "--ngf", str(args.width), "--ndf", str(args.width), "--batch-size", "64",
        "--epochs", str(args.epochs), "--seed", str(seed), "--workers", "0", "--device", "cpu", *ARCHS[arch],
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=run_dir, env=env, check=True, stdout=subprocess.DEVNULL)


def grid_cells(path, size=32, pad=2):
    """The grey samples of an 8x8 grid PNG, as float arrays."""
    grid = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    tops = range(pad, grid.shape[0] - size + 1, size + pad)
    lefts = range(pad, grid.shape[1] - size + 1, size + pad)
    return [grid[top : top + size, left : left + size] for top in tops for left in lefts]


def checkerboard_share(path):
    """Mean share of each sample's AC power at the period-2 frequencies (x, y and diagonal)."""
    shares = []
    for image in grid_cells(path):
        power = np.abs(np.fft.fft2(image - image.mean())) ** 2
        half = image.shape[0] // 2
        shares.append((power[half, 0] + power[0, half] + power[half, half]) / max(power.sum(), 1e-12))
    return float(np.mean(shares))


def side_by_side(runs, epochs, rows, path):
    """One row per epoch, one column per run: the top `rows` rows of each grid."""
    crops = [[Image.open(run / "images" / f"epoch_{epoch:03d}.png").convert("RGB") for run in runs] for epoch in epochs]
    width, height, gap = crops[0][0].width, 2 + rows * 34, 8
    size = (len(runs) * (width + gap) - gap, len(epochs) * (height + gap) - gap)
    picture = Image.new("RGB", size, "white")
    for row, grids in enumerate(crops):
        for column, grid in enumerate(grids):
            picture.paste(grid.crop((0, 0, width, height)), (column * (width + gap), row * (height + gap)))
    picture.convert("L").save(path, optimize=True)  # the digits are grey: a third of an RGB PNG's size


def main(argv=None):
    args = parse_args(argv)
    work = Path(args.work_dir)
    images, _ = load_digits_uint8()
    digits = work / "digits"
    write_pngs(images, digits)
    for seed in args.seeds:
        for arch in ARCHS:
            train(arch, seed, args, digits, work / f"{arch}-seed{seed}")
    real = checkerboard_share(work / f"dcgan-seed{args.seeds[0]}" / "images" / "real_samples.png")
    print(f"\nperiod-2 share of AC power, % (real digits: {100 * real:.3f}); {STEPS_PER_EPOCH} steps per epoch")
    print("| epoch | steps | " + " | ".join(f"{arch} seed {seed}" for seed in args.seeds for arch in ARCHS) + " |")
    print("|---:|---:|" + "---:|" * (len(ARCHS) * len(args.seeds)))
    for epoch in range(1, args.epochs + 1):
        shares = [
            checkerboard_share(work / f"{arch}-seed{seed}" / "images" / f"epoch_{epoch:03d}.png")
            for seed in args.seeds
            for arch in ARCHS
        ]
        print(f"| {epoch} | {epoch * STEPS_PER_EPOCH} | " + " | ".join(f"{100 * s:.3f}" for s in shares) + " |")
    picture = Path(args.picture or work / "dcgan_vs_upsample.png")
    side_by_side([work / f"{arch}-seed{args.seeds[0]}" for arch in ARCHS], args.show_epochs, args.rows, picture)
    print(f"\n{picture}: columns {', '.join(ARCHS)}; rows after epochs {args.show_epochs}")


if __name__ == "__main__":
    main()
