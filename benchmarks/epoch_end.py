"""What the end of an epoch costs a whole run: the share of wall time not spent training.

Runs the same gan.py command for a few epochs and for more epochs (fresh folders each), and
reads each epoch's training seconds from its summary line ("[3/6] ... 2.1s ..."). The extra
epochs add extra wall seconds; whatever of those is not training is the end of the epochs
(EMA statistics, pictures, checkpoint: what the training thread waits for, and what a writer
thread takes from it):

    share = 1 - (extra training seconds) / (extra wall seconds)

Start-up cancels out in the difference; an untimed 1-epoch run first builds the folder cache.
Default: the small-folder run (the digits written as 32x32 PNGs, --recipe improved at 32 px,
ngf=ndf=32, batch 64: 28 steps per epoch). --stand-in: the short epochs of a GPU on a CPU, 1 and
43 epochs of one step each of a tiny model (--dataset fake, 16 px, ngf=ndf=8, batch 8), where the
end of each epoch weighs as much against its steps as it does at GPU speed.

    python benchmarks/epoch_end.py                          # 2 and 6 epochs, 2 rounds
    python benchmarks/epoch_end.py --folder my_images/ --flags --image-size 64
    python benchmarks/epoch_end.py --stand-in               # 1 and 43 one-step epochs, 2 rounds
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
STAND_IN_FLAGS = ["--dataset", "fake", "--subset", "8", "--batch-size", "8", "--image-size", "16",
                  "--nz", "8", "--ngf", "8", "--ndf", "8", "--workers", "0"]  # fmt: skip
STAND_IN_EPOCHS = [1, 43]
# "[3/6] Loss_D ... 2.1s  853 img/s": the seconds from the images per second, which keep their
# precision where a one-step epoch's "0.0s" does not
SUMMARY = re.compile(r"^\[\d+/\d+\] .* \d+(?:\.\d+)?s  (\d+) img/s", re.M)
STEPS = re.compile(r"([\d,]+) steps? per epoch")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", default=None, help="image folder [the digits as 32x32 PNGs, written to WORK_DIR]")
    p.add_argument("--stand-in", action="store_true", help="one-step epochs of a tiny model on fake data")
    p.add_argument("--epochs", type=int, nargs=2, default=None, help="the shorter and the longer run [2 6]")
    p.add_argument("--rounds", type=int, default=2, help="pairs of runs, alternating short and long")
    p.add_argument("--work-dir", default=None, help="runs and the digits [a temp folder]")
    p.add_argument("--flags", nargs=argparse.REMAINDER, default=None, help="gan.py flags (last)")
    args = p.parse_args(argv)
    if args.stand_in and args.folder:
        p.error("--stand-in trains on fake data: give --folder or --stand-in, not both")
    args.epochs = args.epochs or (STAND_IN_EPOCHS if args.stand_in else [2, 6])
    args.flags = args.flags if args.flags is not None else STAND_IN_FLAGS if args.stand_in else SMALL_FOLDER_FLAGS
    return args


def digits_folder(work_dir):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quality import digits_image_folder

    return digits_image_folder(work_dir)


def run(epochs, data, flags, run_dir, env):
    """(wall seconds, training seconds summed over the epochs) of one fresh run; data: its data flags."""
    command = [sys.executable, str(ROOT / "gan.py"), *data,
               "--epochs", str(epochs), "--seed", "0", "--device", "cpu", *flags,
               "--checkpoint-dir", str(run_dir / "checkpoints"), "--image-dir", str(run_dir / "images")]  # fmt: skip
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    output = done.stdout + done.stderr
    rates = [int(rate) for rate in SUMMARY.findall(output)]
    if len(rates) != epochs:
        raise RuntimeError(f"found {len(rates)} epoch summaries in the output of {epochs} epochs")
    images = int(STEPS.search(output).group(1).replace(",", "")) * batch_size(flags)
    return wall, sum(images / rate for rate in rates)


def batch_size(flags):
    """--batch-size in the flags, or gan.py's default."""
    return int(flags[flags.index("--batch-size") + 1]) if "--batch-size" in flags else 128


def main(argv=None):
    args = parse_args(argv)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="dcgan-epoch-end-"))
    if args.stand_in:
        data = []  # in the flags
    else:
        data = ["--dataset", "folder", "--dataroot", str(Path(args.folder) if args.folder else digits_folder(work_dir))]
    env = {**os.environ, "XDG_CACHE_HOME": str(work_dir / "cache")}  # the folder cache, not the user's
    print(f"load average before: {os.getloadavg()}; gan.py {' '.join(args.flags)}; epochs {args.epochs}")
    short, long = args.epochs
    run(1, data, args.flags, work_dir / "warm-up", env)  # builds the folder cache, untimed
    shares = []
    print(
        "| round | wall s (short / long) | training s (short / long) | epoch-end share of the extra wall time "
        "| epoch-end s per extra epoch |"
    )
    print("|---:|---:|---:|---:|---:|")
    for index in range(args.rounds):
        wall_short, train_short = run(short, data, args.flags, work_dir / "short", env)
        wall_long, train_long = run(long, data, args.flags, work_dir / "long", env)
        share = 1 - (train_long - train_short) / (wall_long - wall_short)
        shares.append(share)
        per_epoch = (wall_long - wall_short - train_long + train_short) / (long - short)
        print(
            f"| {index + 1} | {wall_short:.1f} / {wall_long:.1f} | {train_short:.1f} / {train_long:.1f} | {share:.1%} "
            f"| {per_epoch:.3f} |"
        )
    print(f"median share: {statistics.median(shares):.1%}; load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
