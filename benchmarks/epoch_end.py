"""What the end of an epoch costs a whole run: the share of wall time not spent training.

Runs the same gan.py command for a few epochs and for more epochs (fresh folders each), and
reads each epoch's training seconds from its summary line, as its images over its images per
second ("[3/6] ... 2.1s  853 img/s": they keep their precision where "0.0s" does not). The extra
epochs add extra wall seconds; whatever of those is not training is the end of the epochs
(EMA statistics, pictures, checkpoint: what the training thread waits for, and what a writer
thread takes from it):

    share = 1 - (extra training seconds) / (extra wall seconds)

and, measured directly, the seconds the longer run spent in gan.finish_epoch (its runs go through
this script's --timed-run, which wraps it) as a share of that run's whole wall time, start-up
included. Start-up cancels out in the difference; an untimed 1-epoch run first builds the folder cache.
Default: the small-folder run (the digits written as 32x32 PNGs, --recipe improved at 32 px,
ngf=ndf=32, batch 64: 28 steps per epoch). --stand-in: a CPU's stand-in for a GPU's short
epochs, 1 and 43 epochs of one step each of a tiny model (--dataset fake, 16 px, ngf=ndf=8, batch
8). It stands in for the number of epoch ends and their files, not for their weights: the EMA's
statistics (512 samples through G) weigh far more against one step of 8 images than against a GPU
epoch of 390 steps. The stand-in writes its files as an accelerator does, on the writer's own
thread (outputs.epoch_file_writer); --writer inline writes them on the training thread, as the
CPU does.

    python benchmarks/epoch_end.py                          # 2 and 6 epochs, 2 rounds
    python benchmarks/epoch_end.py --folder my_images/ --flags --image-size 64
    python benchmarks/epoch_end.py --stand-in               # 1 and 43 one-step epochs, 2 rounds
    python benchmarks/epoch_end.py --stand-in --writer inline
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
EPOCH_ENDS = re.compile(r"^epoch ends: (\d+\.\d+) s$", re.M)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", default=None, help="image folder [the digits as 32x32 PNGs, written to WORK_DIR]")
    p.add_argument("--stand-in", action="store_true", help="one-step epochs of a tiny model on fake data")
    p.add_argument("--epochs", type=int, nargs=2, default=None, help="the shorter and the longer run [2 6]")
    p.add_argument("--rounds", type=int, default=2, help="pairs of runs, alternating short and long")
    p.add_argument("--work-dir", default=None, help="runs and the digits [a temp folder]")
    p.add_argument(
        "--writer",
        choices=["background", "inline"],
        default=None,
        help="where the files are written: on the writer's thread (an accelerator's way) or on the "
        "training thread (the CPU's) [background with --stand-in, else the CPU's]",
    )
    p.add_argument("--flags", nargs=argparse.REMAINDER, default=None, help="gan.py flags (last)")
    args = p.parse_args(argv)
    if args.stand_in and args.folder:
        p.error("--stand-in trains on fake data: give --folder or --stand-in, not both")
    args.epochs = args.epochs or (STAND_IN_EPOCHS if args.stand_in else [2, 6])
    args.writer = args.writer or ("background" if args.stand_in else "inline")
    args.flags = args.flags if args.flags is not None else STAND_IN_FLAGS if args.stand_in else SMALL_FOLDER_FLAGS
    return args


def digits_folder(work_dir):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quality import digits_image_folder

    return digits_image_folder(work_dir)


def run(epochs, data, flags, run_dir, env, writer):
    """(wall seconds, training seconds summed over the epochs, seconds in gan.finish_epoch) of one
    fresh run; data: its data flags; writer: background or inline."""
    command = [sys.executable, __file__, "--timed-run", writer, *data,
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
    return wall, sum(images / rate for rate in rates), float(EPOCH_ENDS.search(output).group(1))


def timed_run(writer, argv):
    """gan.main(argv), with the seconds spent in gan.finish_epoch printed last (rank 0's epoch
    ends: FID, the EMA's statistics, the grid, and the checkpoint and plots where they are due);
    writer: background (the files written on the writer's thread) or inline."""
    sys.path.insert(0, str(ROOT))
    import gan
    import outputs

    if writer == "background":
        outputs.epoch_file_writer = lambda runtime: outputs.BackgroundWriter()

    real_finish_epoch, spent = gan.finish_epoch, [0.0]

    def finish_epoch(*args, **kwargs):
        started = time.perf_counter()
        try:
            return real_finish_epoch(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started

    gan.finish_epoch = finish_epoch
    code = gan.main(argv)
    print(f"epoch ends: {spent[0]:.3f} s", file=sys.stderr)
    return code


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
    print(
        f"load average before: {os.getloadavg()}; gan.py {' '.join(args.flags)}; writer {args.writer}; epochs {args.epochs}"
    )
    short, long = args.epochs
    run(1, data, args.flags, work_dir / "warm-up", env, args.writer)  # builds the folder cache, untimed
    shares, whole_run_shares = [], []
    print(
        "| round | wall s (short / long) | training s (short / long) | epoch-end share of the extra wall time "
        f"| epoch-end s per extra epoch | epoch ends of the {long}-epoch run, s (share of its wall time) |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for index in range(args.rounds):
        wall_short, train_short, _ = run(short, data, args.flags, work_dir / "short", env, args.writer)
        wall_long, train_long, ends_long = run(long, data, args.flags, work_dir / "long", env, args.writer)
        share = 1 - (train_long - train_short) / (wall_long - wall_short)
        shares.append(share)
        whole_run_shares.append(ends_long / wall_long)
        per_epoch = (wall_long - wall_short - train_long + train_short) / (long - short)
        print(
            f"| {index + 1} | {wall_short:.1f} / {wall_long:.1f} | {train_short:.1f} / {train_long:.1f} | {share:.1%} "
            f"| {per_epoch:.3f} | {ends_long:.2f} ({ends_long / wall_long:.1%}) |"
        )
    print(
        f"median share of the extra wall time: {statistics.median(shares):.1%}; of the {long}-epoch run's wall "
        f"time: {statistics.median(whole_run_shares):.1%}; load average after: {os.getloadavg()}"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--timed-run"]:
        sys.exit(timed_run(sys.argv[2], sys.argv[3:]))
    main()
