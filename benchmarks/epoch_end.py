"""What the end of an epoch costs a whole run: the share of wall time not spent training.

Runs the same gan.py command for a few epochs and for more epochs (fresh folders each), and
reads each epoch's training seconds from its summary line ("[3/6] ... 2.1s ..."). The extra
epochs add extra wall seconds; whatever of those is not training is the end of the epochs
(EMA statistics, pictures, checkpoint: what the training thread waits for, and what a writer
thread takes from it):

    share = 1 - (extra training seconds) / (extra wall seconds)

Start-up cancels out in the difference; an untimed 1-epoch run first builds the folder cache. Default: the small-folder run (the digits written as
32x32 PNGs, --recipe improved at 32 px, ngf=ndf=32, batch 64: 28 steps per epoch).

    python benchmarks/epoch_end.py                          # 2 and 6 epochs, 2 rounds
    python benchmarks/epoch_end.py --folder my_images/ --flags --image-size 64
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL_FOLDER_FLAGS = ["--recipe", "improved", "--image-size", "32", "--ngf", "32", "--ndf", "32", "--batch-size", "64"]
SUMMARY = re.compile(r"^\[(\d+)/\d+\] .* (\d+(?:\.\d+)?)s ", re.M)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", default=None, help="image folder [the digits as 32x32 PNGs, written to WORK_DIR]")
    p.add_argument("--epochs", type=int, nargs=2, default=[2, 6], help="the shorter and the longer run")
    p.add_argument("--rounds", type=int, default=2, help="pairs of runs, alternating short and long")
    p.add_argument("--work-dir", default=None, help="runs and the digits [a temp folder]")
    p.add_argument("--flags", nargs=argparse.REMAINDER, default=SMALL_FOLDER_FLAGS, help="gan.py flags (last)")
    return p.parse_args(argv)


def digits_folder(work_dir):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quality import digits_image_folder

    return digits_image_folder(work_dir)


def run(epochs, folder, flags, run_dir, env):
    """(wall seconds, training seconds summed over the epochs) of one fresh run."""
    command = [sys.executable, str(ROOT / "gan.py"), "--dataset", "folder", "--dataroot", str(folder),
               "--epochs", str(epochs), "--seed", "0", "--device", "cpu", *flags,
               "--checkpoint-dir", str(run_dir / "checkpoints"), "--image-dir", str(run_dir / "images")]  # fmt: skip
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    training = [float(seconds) for _, seconds in SUMMARY.findall(done.stdout + done.stderr)]
    if len(training) != epochs:
        raise RuntimeError(f"found {len(training)} epoch summaries in the output of {epochs} epochs")
    return wall, sum(training)


def main(argv=None):
    args = parse_args(argv)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="dcgan-epoch-end-"))
    folder = Path(args.folder) if args.folder else digits_folder(work_dir)
    env = {**os.environ, "XDG_CACHE_HOME": str(work_dir / "cache")}  # the folder cache, not the user's
    print(f"load average before: {os.getloadavg()}; gan.py {' '.join(args.flags)}; epochs {args.epochs}")
    short, long = args.epochs
    run(1, folder, args.flags, work_dir / "warm-up", env)  # builds the folder cache, untimed
    shares = []
    print("| round | wall s (short / long) | training s (short / long) | epoch-end share of the extra wall time |")
    print("|---:|---:|---:|---:|")
    for index in range(args.rounds):
        wall_short, train_short = run(short, folder, args.flags, work_dir / "short", env)
        wall_long, train_long = run(long, folder, args.flags, work_dir / "long", env)
        share = 1 - (train_long - train_short) / (wall_long - wall_short)
        shares.append(share)
        print(
            f"| {index + 1} | {wall_short:.1f} / {wall_long:.1f} | {train_short:.1f} / {train_long:.1f} | {share:.1%} |"
        )
    print(f"median share: {statistics.median(shares):.1%}; load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
