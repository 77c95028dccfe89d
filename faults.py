"""When a run must stop early: Ctrl-C, SIGTERM and SIGHUP (a closed terminal) turned into a
request the loop reads between steps, and what to do when the losses or weights stop being finite
(--on-nan: stop, or roll back to the last checkpoint).
"""

import contextlib
import os
import signal
import sys
import threading

import torch

from checkpoint import latest_checkpoint, load_checkpoint, restore
from errors import UserError
from options import MAX_SEED
from runtime import broadcast_object, mixed_seed

EXIT_DIVERGED = 3
MAX_ROLLBACKS = 3
ROLL_BACK = "roll back"
# SIGHUP: the terminal was closed (or an ssh connection dropped); the run saves and stops as for SIGTERM
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class StopRequest:
    """Turns SIGINT/SIGTERM/SIGHUP into a flag the loop reads between steps; a second one exits at once."""

    def __init__(self, announce=True):
        self.signal_number = None
        self.announce = announce  # under torchrun rank 0 alone says it is stopping

    def install(self):
        for number in STOP_SIGNALS:
            signal.signal(number, self.handle)

    def handle(self, signal_number, frame):
        if self.signal_number is not None:
            # the checkpoint on disk is only ever replaced atomically (the temp file a write
            # leaves is removed by the next start), so leaving now is safe
            os._exit(128 + signal_number)
        self.signal_number = signal_number
        if signal_number == getattr(signal, "SIGHUP", None):
            forgive_closed_terminal()
        if not self.announce:
            return
        with contextlib.suppress(OSError):
            print(
                f"\n{signal.Signals(signal_number).name}: stopping after this step (again to quit at once)",
                file=sys.stderr,
                flush=True,
            )

    @property
    def requested(self):
        return self.signal_number is not None

    @property
    def name(self):
        return signal.Signals(self.signal_number or signal.SIGINT).name

    @property
    def exit_code(self):
        return 128 + (self.signal_number or signal.SIGINT)


class Diverged(UserError):
    exit_code = EXIT_DIVERGED


class ForgivingStream:
    """A stdout or stderr whose writes may fail (the terminal behind it was closed: EIO) without
    stopping the program: what it would have printed is lost, the checkpoint is not."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        with contextlib.suppress(OSError, ValueError):
            return self.stream.write(text)
        return len(text)

    def flush(self):
        with contextlib.suppress(OSError, ValueError):
            self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def forgive_closed_terminal():
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, ForgivingStream):
            setattr(sys, name, ForgivingStream(stream))


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP outside training (which has its StopRequest): the program stops as for a Ctrl-C."""

    def __init__(self, signal_number=signal.SIGTERM):
        super().__init__()
        self.exit_code = 128 + signal_number


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """Until training installs its StopRequest, a SIGTERM or SIGHUP stops the program as a Ctrl-C
    does (one line, nothing left behind); the handlers before are put back at the end."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    numbers = [number for number in STOP_SIGNALS if number != signal.SIGINT]
    previous = {number: signal.signal(number, raise_terminated) for number in numbers}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)


def raise_terminated(signal_number, frame):
    if signal_number == getattr(signal, "SIGHUP", None):
        forgive_closed_terminal()
    raise Terminated(signal_number)


def exit_code_of(interrupt):
    """130 for a Ctrl-C, 143 for a SIGTERM, 129 for a SIGHUP."""
    return getattr(interrupt, "exit_code", 128 + signal.SIGINT)


def interrupt_within(error):
    """The Ctrl-C (or SIGTERM) that error was raised while handling, if any: a library whose except
    clause fails on the interrupt (torch's ONNX exporter, mid-import) raises an error of its own."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class Interrupted(Exception):
    """A run stopped by a signal after saving its state; main() prints the message."""

    def __init__(self, exit_code, message):
        super().__init__(message)
        self.exit_code = exit_code
        self.printed = False


def interruption(stop, what, checkpoint_path, resume_command):
    return Interrupted(stop.exit_code, f"{what}; saved {checkpoint_path}. Resume with: {resume_command}")


def on_divergence(where, on_nan, checkpoint_path, rollbacks):
    """ROLL_BACK when --on-nan rollback has a checkpoint and tries left; else the Diverged error to raise."""
    has_checkpoint = checkpoint_path.is_file()
    if on_nan == "rollback" and has_checkpoint and rollbacks < MAX_ROLLBACKS:
        return ROLL_BACK
    if not has_checkpoint:
        hint = "no checkpoint was written yet; try a lower --lr"
    elif on_nan == "rollback":
        hint = f"gave up after {MAX_ROLLBACKS} rollbacks; the last good checkpoint is {checkpoint_path}"
    else:
        hint = (
            f"the last good checkpoint is {checkpoint_path}: resume it with --resume "
            "(and --on-nan rollback to retry automatically)"
        )
    return Diverged(f"{where}; {hint}")


def weights_finite(state, opts, runtime, outputs):
    """True when G's and D's weights are finite; else handle_divergence's answer (or its error)."""
    parameters = (*state.nets.G.parameters(), *state.nets.D.parameters())
    if bool(torch.stack([p.isfinite().all() for p in parameters]).all()):
        return True
    return handle_divergence(state, "weights", opts, runtime, outputs)


def handle_divergence(state, what, opts, runtime, outputs):
    """Roll back to the last checkpoint (returns False) or raise Diverged, as --on-nan says."""
    progress = state.progress
    where = f"{what} became non-finite at step {progress.step} (epoch {progress.epoch + 1})"
    outputs.wait()  # the last checkpoint on disk, not in the writer's queue
    verdict, saved, path = rank_zeros_verdict(where, opts, progress.rollbacks, runtime)
    if verdict != ROLL_BACK:
        raise verdict
    rollbacks = progress.rollbacks + 1
    restore(state, saved, path, runtime)
    state.progress.rollbacks = rollbacks
    outputs.rolled_back(state.progress.step)
    noise_seed = (opts.seed + 1_000 * rollbacks) % MAX_SEED
    torch.manual_seed(mixed_seed(noise_seed, runtime.rank) if runtime.distributed else noise_seed)
    runtime.say(f"{where}; rolled back to {path} (epoch {saved['epoch']}) with noise seed {noise_seed}")
    return False


def rank_zeros_verdict(where, opts, rollbacks, runtime):
    """(ROLL_BACK, the checkpoint's state, its path), or (the error to raise, None, path), as rank 0
    finds them, on every rank (every rank diverges at the same step: its logged means are all ranks').

    Rank 0 alone writes checkpoints: without a shared filesystem the other ranks have none on their
    disks, or an older one, so rank 0 reads its own and sends it, and all roll back to the same
    weights or all stop.
    """
    answer = None
    if runtime.is_main:
        path = latest_checkpoint(opts.checkpoint_dir)
        verdict = on_divergence(where, opts.on_nan, path, rollbacks)
        try:
            answer = (verdict, load_checkpoint(path) if verdict == ROLL_BACK else None, path)
        except UserError as error:  # damaged since it was written: every rank stops with its message
            answer = (error, None, path)
    return broadcast_object(answer, runtime)
