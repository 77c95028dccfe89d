"""gan.py's CLI with a fault at an exact moment, for tests/test_faults.py (a real process, real signals).

    python tests/fault_worker.py [gan.py flags]

FAULT_WRITE=NAME:N:SIGNAL   halfway through the N-th file opened for writing whose path holds NAME,
                            send SIGNAL (KILL, INT, TERM, HUP) to this process, then write the rest
FAULT_AT_STEP=S:SIGNAL      after training step S, send SIGNAL to this process

A fixed sleep before a kill lands anywhere; these land mid-write, where a write that is not
atomic would leave a torn file.
"""

import builtins
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stand_ins import one_pixel_loss_plot  # noqa: E402

import artifacts  # noqa: E402
import gan  # noqa: E402


def send(signal_name):
    os.kill(os.getpid(), getattr(signal, f"SIG{signal_name}"))


class FaultyFile:
    """A file whose first write stops halfway to send a signal."""

    def __init__(self, file, signal_name):
        self.file, self.signal_name = file, signal_name

    def write(self, data):
        if self.signal_name is None or len(data) < 2:
            return self.file.write(data)
        half = len(data) // 2
        self.file.write(data[:half])
        self.file.flush()
        signal_name, self.signal_name = self.signal_name, None
        send(signal_name)
        return half + self.file.write(data[half:])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.file, name)


def fault_on_write(spec):
    name, count, signal_name = spec.split(":")
    opened = []

    def wrap(file, path, mode):
        if "w" in mode or "a" in mode or "+" in mode:
            if name in str(path):
                opened.append(path)
                if len(opened) == int(count):
                    return FaultyFile(file, signal_name)
        return file

    real_open, real_fdopen = builtins.open, os.fdopen

    def open_(file, mode="r", *args, **kwargs):
        return wrap(real_open(file, mode, *args, **kwargs), file, mode)

    def fdopen(fd, mode="r", *args, **kwargs):
        return wrap(real_fdopen(fd, mode, *args, **kwargs), os.readlink(f"/proc/self/fd/{fd}"), mode)

    builtins.open, os.fdopen = open_, fdopen


def fault_at_step(spec):
    step, signal_name = spec.split(":")
    real_train_step, done = gan.train_step, []

    def train_step(*args, **kwargs):
        stats = real_train_step(*args, **kwargs)
        done.append(1)
        if len(done) == int(step):
            send(signal_name)
        return stats

    gan.train_step = train_step


if __name__ == "__main__":
    artifacts.plot_losses = one_pixel_loss_plot
    if os.environ.get("FAULT_WRITE"):
        fault_on_write(os.environ["FAULT_WRITE"])
    if os.environ.get("FAULT_AT_STEP"):
        fault_at_step(os.environ["FAULT_AT_STEP"])
    sys.exit(gan.main(sys.argv[1:]))
