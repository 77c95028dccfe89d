"""Whole processes, as a user runs them: gan.py against pytorch/examples' dcgan/main.py.

Two measures, each in alternating rounds (ours, the example, ours, ...), every round a fresh
process:
  - first step: launch to the end of the first training step on random data (`--dataset fake`,
    the default 64 px model, batch 64). The example prints a line after each step; gan.py's
    progress bar shows "1/N" after its first.
  - one epoch: launch to exit, one epoch on the same image folder (64 px, --ngf 16 --ndf 16,
    batch 64, as the classic example trains a folder), everything a run does included (imports,
    reading the folder, the epoch, pictures and checkpoint).
Before the timed rounds each command runs once untimed, so both start with the folder in the
OS's file cache and gan.py with its folder cache built; those cold runs are printed too.

The example is not part of this repository. Get it from https://github.com/pytorch/examples
(dcgan/main.py; e.g. `git clone https://github.com/pytorch/examples` or save the raw file)
and give its path:

    python benchmarks/versus_example.py --example ~/examples/dcgan/main.py
    python benchmarks/versus_example.py --example main.py --folder my_images/ --rounds 3

Without --folder it writes scikit-learn's 1,797 handwritten digits as 32x32 PNGs into
WORK_DIR/digits/0/ (the example's ImageFolder needs a class sub-folder; gan.py reads any tree).
Both use the same CPU threads (torch's default) and --workers 2 (the example's default).
"""

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIRST_STEP_MARKERS = {"ours": "| 1/", "example": "[0/1][0/"}  # gan.py's bar after step 1; main.py's step line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--example", required=True, help="path of pytorch/examples' dcgan/main.py")
    p.add_argument(
        "--folder", default=None, help="an ImageFolder root whose images are in FOLDER/0/ [the digits, in WORK_DIR]"
    )
    p.add_argument("--rounds", type=int, default=2, help="timed runs of each command, alternating")
    p.add_argument("--measures", nargs="+", choices=["first-step", "epoch"], default=["first-step", "epoch"])
    p.add_argument("--work-dir", default=None, help="outputs and the digits [a temp folder]")
    return p.parse_args(argv)


def digits_folder(work_dir):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quality import digits_image_folder

    return digits_image_folder(work_dir)


def commands(measure, args, folder, out_dir):
    """{name: argv} of the two programs for one measure, writing into out_dir/NAME (emptied before each run)."""
    ours = [sys.executable, str(ROOT / "gan.py"), "--device", "cpu", "--epochs", "1", "--batch-size", "64",
            "--seed", "0", "--workers", "2", "--checkpoint-dir", str(out_dir / "ours" / "checkpoints"),
            "--image-dir", str(out_dir / "ours" / "images")]  # fmt: skip
    example = [sys.executable, "-u", str(Path(args.example).resolve()), "--niter", "1", "--batchSize", "64",
               "--manualSeed", "1", "--workers", "2", "--outf", str(out_dir / "example" / "outputs")]  # fmt: skip
    if measure == "first-step":
        return {
            "ours": [*ours, "--dataset", "fake", "--subset", "64"],  # one step
            "example": [*example, "--dataset", "fake", "--dry-run"],  # one step
        }
    size = ["--ngf", "16", "--ndf", "16"]
    return {
        # the example's ImageFolder needs the class sub-folder's parent; gan.py reads the images of any tree
        "ours": [*ours, "--dataset", "folder", "--dataroot", str(folder / "0"), "--image-size", "64", *size],
        "example": [*example, "--dataset", "folder", "--dataroot", str(folder), "--imageSize", "64", *size],
    }


def timed_run(name, argv, out_dir, env):
    """(seconds to exit, seconds to the end of the first step or None) of one fresh process."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    first_step = []
    started = time.perf_counter()
    process = subprocess.Popen(argv, cwd=out_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    readers = [threading.Thread(target=watch, args=(stream, FIRST_STEP_MARKERS[name], started, first_step))
               for stream in (process.stdout, process.stderr)]  # fmt: skip
    for reader in readers:
        reader.start()
    process.wait()
    seconds = time.perf_counter() - started
    for reader in readers:
        reader.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {process.returncode}")
    return seconds, (min(first_step) if first_step else None)


def watch(stream, marker, started, found):
    """Read a stream as it comes (progress bars end in \\r, not \\n); note when marker first shows."""
    seen = b""
    while chunk := stream.read1(4096):
        if not found and marker.encode() in (seen[-64:] + chunk):
            found.append(time.perf_counter() - started)
        seen = (seen + chunk)[-4096:]


def measure_rounds(measure, args, folder, work_dir, env):
    argvs = commands(measure, args, folder, work_dir / "out")
    cold = {name: timed_run(name, argv, work_dir / "out" / name, env) for name, argv in argvs.items()}
    rounds = {name: [] for name in argvs}
    for _ in range(args.rounds):
        for name, argv in argvs.items():
            rounds[name].append(timed_run(name, argv, work_dir / "out" / name, env))
    return cold, rounds


def print_table(measure, cold, rounds):
    column = 1 if measure == "first-step" else 0  # first-step: launch to step 1; epoch: launch to exit
    what = "launch to the end of the first step" if column else "launch to exit, one epoch"
    print(f"\n{measure}: {what} (seconds)")
    print("| program | cold run | timed runs | median | vs the example |")
    print("|---|---:|---:|---:|---:|")
    medians = {name: statistics.median(run[column] for run in runs) for name, runs in rounds.items()}
    for name, runs in rounds.items():
        values = " / ".join(f"{run[column]:.1f}" for run in runs)
        ratio = medians[name] / medians["example"]
        print(f"| {name} | {cold[name][column]:.1f} | {values} | {medians[name]:.1f} | {ratio:.2f}x |")


def main(argv=None):
    args = parse_args(argv)
    if not Path(args.example).is_file():
        sys.exit(f"--example {args.example}: no such file (see this script's help for where to get it)")
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="dcgan-versus-example-"))
    folder = Path(args.folder) if args.folder else digits_folder(work_dir)
    # gan.py's folder cache goes to the work folder, not the user's cache
    env = {**os.environ, "XDG_CACHE_HOME": str(work_dir / "cache"), "PYTHONUNBUFFERED": "1"}
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {sys.executable}")
    print(f"load average before: {load}; folder {folder}; {args.rounds} timed rounds")
    for measure in args.measures:
        cold, rounds = measure_rounds(measure, args, folder, work_dir, env)
        print_table(measure, cold, rounds)
    print(f"\nload average after: {os.getloadavg() if hasattr(os, 'getloadavg') else None}")


if __name__ == "__main__":
    main()
