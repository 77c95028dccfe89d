"""Faults during a run: Ctrl-C, SIGTERM, kill -9, diverging losses, a full disk, a removed
folder, broken image files, interrupted writes and a checkpoint that tries to run code.

Signals are sent to a real gan.py subprocess; the faults that need a precise moment
(NaN losses, ENOSPC) are injected in-process by wrapping gan.py's own functions.
"""

import contextlib
import errno
import io
import math
import os
import pickle
import pty
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import filelock
import numpy as np
import pytest
import torch
from conftest import GAN_PY, TINY_ARGS, RunsCode, check_ok, read_metrics_log, run_gan, snapshot, subprocess_env
from PIL import Image

import artifacts
import checkpoint
import errors
import faults
import files
import folders
import gan
import metricslog
import options
import startup
import steps
from outputs import RunOutputs

STEPS_PER_EPOCH = 4  # TINY_ARGS: 32 images in batches of 8
FAULT_WORKER = Path(__file__).resolve().parent / "fault_worker.py"
CHECKPOINT = Path("checkpoints") / checkpoint.CHECKPOINT_NAME
# a run far longer than any test waits for: only a signal ends it
ENDLESS_ARGS = (*TINY_ARGS, "--epochs", "1000", "--log-every", "1")


# ---------------------------------------------------------------- functions the tests share


@pytest.fixture
def start_gan(tmp_path):
    """Start `python gan.py ARGS` in tmp_path in its own session; kill it if a test fails."""
    processes = []

    def start(args):
        with open(tmp_path / "stdout.txt", "w") as out, open(tmp_path / "stderr.txt", "w") as err:
            process = subprocess.Popen(
                [sys.executable, str(GAN_PY), *map(str, args)],
                cwd=tmp_path,
                env=subprocess_env(),
                stdout=out,
                stderr=err,
                # its own session: it gets SIGINT only from us, with the default disposition
                start_new_session=True,
            )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def stderr_of(folder):
    path = Path(folder) / "stderr.txt"
    return path.read_text() if path.is_file() else ""


def logged_steps(folder):
    rows = read_metrics_log(Path(folder) / "checkpoints" / metricslog.METRICS_LOG_NAME)
    return [row["step"] for row in rows if "loss_d" in row]


def wait_until(condition, process, folder, what, timeout_seconds=120):
    """Poll condition() while the process trains; fail with its stderr if it ends first."""
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"gan.py exited {process.returncode} before {what}\n{stderr_of(folder)}")
        if time.monotonic() > deadline:
            pytest.fail(f"gan.py did not reach {what} in {timeout_seconds}s\n{stderr_of(folder)}")
        time.sleep(0.01)


def reached_step(folder, step):
    return lambda: any(s >= step for s in logged_steps(folder))


def assert_consistent(state):
    """A checkpoint's counters agree: steps = whole epochs plus the batches of the current one."""
    assert state["step"] == state["epoch"] * STEPS_PER_EPOCH + state["batch"]
    assert all(torch.isfinite(v).all() for v in state["netG"].values() if v.is_floating_point())


def leftover_temp_files(folder):
    return sorted(str(p) for p in Path(folder).rglob("*") if p.name.endswith(".tmp"))


def nan_d_step(monkeypatch, first_bad_call, last_bad_call=math.inf):
    """Make steps.d_step report a NaN loss on calls first..last (1-based); the update is real."""
    real_d_step = steps.d_step
    calls = []

    def d_step(*args, **kwargs):
        stats = real_d_step(*args, **kwargs)
        calls.append(1)
        if first_bad_call <= len(calls) <= last_bad_call:
            stats["loss_d"] = torch.full_like(stats["loss_d"], math.nan)
        return stats

    monkeypatch.setattr(steps, "d_step", d_step)


# ---------------------------------------------------------------- Ctrl-C and SIGTERM


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_resumable_checkpoint(signal_number, start_gan, gan_main, tmp_path):
    process = start_gan(ENDLESS_ARGS)
    # mid-epoch 2: the epoch-1 checkpoint exists and the stop must write a newer one
    wait_until(reached_step(tmp_path, STEPS_PER_EPOCH + 2), process, tmp_path, "step 6")
    os.kill(process.pid, signal_number)
    assert process.wait(timeout=60) == 128 + signal_number
    stderr = stderr_of(tmp_path)
    assert "Traceback" not in stderr
    assert "--resume" in stderr and signal.Signals(signal_number).name in stderr

    state = checkpoint.load_checkpoint(tmp_path / CHECKPOINT)
    assert_consistent(state)
    # the last consistent state: the checkpoint holds every step that was logged, no more
    assert state["step"] == max(logged_steps(tmp_path)) >= STEPS_PER_EPOCH + 2
    if signal_number == signal.SIGTERM:
        return  # resuming is the same for both; test it once

    target_epochs = state["epoch"] + 2
    code, out, err = gan_main(["--resume", "--epochs", target_epochs, "--device", "cpu", "--workers", "0"])
    assert code == 0, err
    assert f"step {state['step']}" in out  # "resuming ...: N epochs done, step S"
    resumed = checkpoint.load_checkpoint(tmp_path / CHECKPOINT)
    assert (resumed["epoch"], resumed["batch"]) == (target_epochs, 0)
    assert resumed["step"] == target_epochs * STEPS_PER_EPOCH > state["step"]
    # every step logged exactly once across the interruption
    assert logged_steps(tmp_path) == list(range(1, resumed["step"] + 1))


def run_with_fault(args, cwd, **env):
    """gan.py's CLI through tests/fault_worker.py, which sends a signal at an exact moment (see there)."""
    return run_gan(args, cwd, script=FAULT_WORKER, **env)


def checkpoint_temp_files(folder):
    return sorted(p.name for p in (Path(folder) / "checkpoints").glob(".checkpoint.pt.*.tmp"))


def test_second_ctrl_c_during_the_save_exits_at_once_and_keeps_the_last_whole_checkpoint(gan_main, tmp_path):
    # Ctrl-C after step 6; the second arrives halfway through writing the checkpoint it asked for
    result = run_with_fault(
        [*TINY_ARGS, "--epochs", "3", "--log-every", "1"],
        tmp_path,
        FAULT_AT_STEP="6:INT",
        FAULT_WRITE="checkpoint.pt:2:INT",
    )
    assert result.returncode == 130, result.stderr
    assert result.stderr.count("SIGINT: stopping after this step") == 1
    assert "Traceback" not in result.stderr and "Resume with" not in result.stderr  # it did not finish the save
    state = checkpoint.load_checkpoint(tmp_path / CHECKPOINT)  # epoch 1's, whole: the new one was half written
    assert (state["epoch"], state["batch"], state["step"]) == (1, 0, STEPS_PER_EPOCH)
    assert len(checkpoint_temp_files(tmp_path)) == 1  # the half-written one, which the next start removes
    foreign = tmp_path / "checkpoints" / ".notes.txt.abcdefgh.tmp"  # not this program's: left alone
    foreign.write_text("someone else's")

    code, out, err = gan_main(["--resume", "--device", "cpu", "--workers", "0"])
    assert code == 0, err
    assert f"resuming {CHECKPOINT}: 1 epoch done, step {STEPS_PER_EPOCH}" in out
    assert checkpoint_temp_files(tmp_path) == [] and foreign.is_file()
    assert checkpoint.load_checkpoint(tmp_path / CHECKPOINT)["step"] == 3 * STEPS_PER_EPOCH
    assert logged_steps(tmp_path) == list(range(1, 3 * STEPS_PER_EPOCH + 1))


def test_closing_the_terminal_saves_and_stops_as_sigterm_does(tmp_path):
    """SIGHUP with stdout and stderr on a terminal that is gone (writes fail with EIO)."""
    leader, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, str(GAN_PY), *ENDLESS_ARGS],
        cwd=tmp_path,
        env=subprocess_env(),
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
        start_new_session=True,
    )
    os.close(terminal)
    try:
        reader = threading.Thread(target=drain, args=(leader,), daemon=True)  # a terminal shows what comes
        reader.start()
        wait_until(reached_step(tmp_path, STEPS_PER_EPOCH + 2), process, tmp_path, "step 6")
        os.kill(process.pid, signal.SIGHUP)
        os.close(leader)  # the terminal window is gone: later writes to it fail
        assert process.wait(timeout=60) == 128 + signal.SIGHUP
    finally:
        if process.poll() is None:
            process.kill()
    state = checkpoint.load_checkpoint(tmp_path / CHECKPOINT)
    assert_consistent(state)
    assert state["step"] == max(logged_steps(tmp_path)) >= STEPS_PER_EPOCH + 2  # saved where it stopped
    assert sorted(tmp_path.rglob(files.LOCK_NAME)) == [] and leftover_temp_files(tmp_path) == []


def drain(fd):
    with contextlib.suppress(OSError):
        while os.read(fd, 4096):
            pass


def test_second_signal_calls_os_exit_with_the_signal_code(monkeypatch, capsys):
    exit_codes = []
    monkeypatch.setattr(faults.os, "_exit", exit_codes.append)
    stop = faults.StopRequest()
    stop.handle(signal.SIGTERM, None)
    assert stop.requested and exit_codes == []
    assert "SIGTERM: stopping after this step" in capsys.readouterr().err
    stop.handle(signal.SIGINT, None)
    assert exit_codes == [130]


# ---------------------------------------------------------------- kill -9


def test_kill_9_while_writing_a_checkpoint_loses_at_most_the_epochs_since_the_last(gan_main, tmp_path):
    # killed halfway through writing the second checkpoint, epoch 3's (epoch 2, seconds after the
    # first, drew its grid alone: save_schedule.py): a write that is not atomic would tear it
    result = run_with_fault(
        [*TINY_ARGS, "--epochs", "3", "--log-every", "1"], tmp_path, FAULT_WRITE="checkpoint.pt:2:KILL"
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    state = checkpoint.load_checkpoint(tmp_path / CHECKPOINT)
    assert (state["epoch"], state["batch"], state["step"]) == (1, 0, STEPS_PER_EPOCH)
    assert logged_steps(tmp_path) == list(range(1, 3 * STEPS_PER_EPOCH + 1))  # epochs 2 and 3 trained, then lost
    assert len(checkpoint_temp_files(tmp_path)) == 1
    assert (tmp_path / "images" / "epoch_002.png").exists()  # a grid alone: the resume draws it anew
    assert not (tmp_path / "images" / "epoch_003.png").exists()  # its checkpoint comes first

    code, out, err = gan_main(["--resume", "--device", "cpu", "--workers", "0"])
    assert code == 0, err
    resumed = checkpoint.load_checkpoint(tmp_path / CHECKPOINT)
    assert resumed["step"] == 3 * STEPS_PER_EPOCH
    assert checkpoint_temp_files(tmp_path) == []
    # the rows of the lost epoch were dropped and written again, once
    assert logged_steps(tmp_path) == list(range(1, resumed["step"] + 1))


def test_resume_drops_a_torn_last_line_of_the_metrics_log(tmp_path):
    log = tmp_path / metricslog.METRICS_LOG_NAME
    rows = [{"step": step, "loss_d": 1.0} for step in (1, 2, 3)]
    log.write_text("".join(f'{{"step": {r["step"]}, "loss_d": 1.0}}\n' for r in rows) + '{"step": 4, "lo')
    assert metricslog.truncate_metrics(log, last_step=3) == rows
    metricslog.append_metrics(log, [{"step": 4, "loss_d": 2.0}])
    assert read_metrics_log(log) == [*rows, {"step": 4, "loss_d": 2.0}]


# ---------------------------------------------------------------- divergence


def test_nan_losses_stop_with_the_last_good_checkpoint(monkeypatch, gan_main, tmp_path):
    nan_d_step(monkeypatch, first_bad_call=STEPS_PER_EPOCH + 2)
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "2"])
    assert code == faults.EXIT_DIVERGED == 3
    assert "losses became non-finite at step 6 (epoch 2)" in err  # the second step of epoch 2
    assert f"last good checkpoint is {CHECKPOINT}" in err and "--resume" in err
    state = checkpoint.load_checkpoint(tmp_path / CHECKPOINT)
    assert (state["epoch"], state["step"]) == (1, STEPS_PER_EPOCH)
    assert logged_steps(tmp_path) == [2, 4]  # the NaN row is not logged


def test_nan_losses_before_any_checkpoint_say_so(monkeypatch, gan_main, tmp_path):
    nan_d_step(monkeypatch, first_bad_call=1)
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "2", "--on-nan", "rollback"])
    assert code == faults.EXIT_DIVERGED
    assert "non-finite at step 2" in err and "no checkpoint was written yet" in err
    assert not (tmp_path / CHECKPOINT).exists()


def test_rollback_reloads_the_checkpoint_with_a_new_seed_and_finishes(monkeypatch, gan_main, tmp_path):
    nan_d_step(monkeypatch, first_bad_call=STEPS_PER_EPOCH + 2, last_bad_call=STEPS_PER_EPOCH + 2)
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "2", "--on-nan", "rollback"])
    assert code == 0, err
    assert f"rolled back to {CHECKPOINT} (epoch 1) with noise seed 1001" in out
    state = checkpoint.load_checkpoint(tmp_path / CHECKPOINT)
    assert (state["epoch"], state["step"], state["rollbacks"]) == (2, 2 * STEPS_PER_EPOCH, 1)
    assert_consistent(state)
    assert logged_steps(tmp_path) == [2, 4, 6, 8]  # each once, though epoch 2 ran twice


def test_a_resumed_run_counts_its_rollbacks_on_from_the_checkpoint(monkeypatch, gan_main, tmp_path):
    """The count of rollbacks is saved and restored: the resumed run's first rollback is the run's
    second, with noise seed 1 + 2 x 1000, and the checkpoint then counts 2."""
    nan_d_step(monkeypatch, first_bad_call=STEPS_PER_EPOCH + 2, last_bad_call=STEPS_PER_EPOCH + 2)
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "2", "--on-nan", "rollback"])
    assert code == 0, err
    nan_d_step(monkeypatch, first_bad_call=2, last_bad_call=2)
    code, out, err = gan_main(["--resume", "--epochs", "3"])
    assert code == 0, err
    assert f"rolled back to {CHECKPOINT} (epoch 2) with noise seed 2001" in out
    state = checkpoint.load_checkpoint(tmp_path / CHECKPOINT)
    assert (state["epoch"], state["step"], state["rollbacks"]) == (3, 3 * STEPS_PER_EPOCH, 2)


def test_rollback_gives_up_after_max_rollbacks(monkeypatch, gan_main, tmp_path):
    nan_d_step(monkeypatch, first_bad_call=STEPS_PER_EPOCH + 2)
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "2", "--on-nan", "rollback"])
    assert code == faults.EXIT_DIVERGED
    assert out.count("rolled back to") == faults.MAX_ROLLBACKS
    assert f"gave up after {faults.MAX_ROLLBACKS} rollbacks; the last good checkpoint is {CHECKPOINT}" in err
    assert checkpoint.load_checkpoint(tmp_path / CHECKPOINT)["epoch"] == 1


# ---------------------------------------------------------------- a full disk, a removed folder


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def fill_the_disk(failing, monkeypatch):
    """Once full["now"] is set, fsync fails (so every write does) or the replace of checkpoint.pt does."""
    real_fsync, real_replace, full = os.fsync, os.replace, {"now": False}

    def fsync(fd):
        return no_space() if full["now"] else real_fsync(fd)

    def replace(source, destination):
        if full["now"] and Path(destination).name == checkpoint.CHECKPOINT_NAME:
            no_space()
        return real_replace(source, destination)

    monkeypatch.setattr(os, failing, {"fsync": fsync, "replace": replace}[failing])
    return full


def fill_the_disk_after(function, module, count, failing, monkeypatch, tmp_path):
    """The disk fills up once module.function returned count times; returns the snapshot of
    checkpoints/ taken then."""
    real_function, calls, saved = getattr(module, function), [], {}
    full = fill_the_disk(failing, monkeypatch)

    def wrapped(*args, **kwargs):
        result = real_function(*args, **kwargs)
        for outputs in (arg for arg in args if isinstance(arg, RunOutputs)):
            outputs.writer.wait()  # the files it handed to the writer's thread are on disk
        calls.append(1)
        if len(calls) == count:
            saved.update(snapshot(tmp_path / "checkpoints"))
            full["now"] = True
        return result

    monkeypatch.setattr(module, function, wrapped)
    return saved


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_full_disk_after_the_first_checkpoint(failing, monkeypatch, gan_main, tmp_path):
    """fsync: every write fails; replace: only the checkpoint's. Epoch 2's checkpoint is written
    before its pictures, so it is what fails, and no picture of epoch 2 is left."""
    saved = fill_the_disk_after("finish_epoch", gan, 1, failing, monkeypatch, tmp_path)
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "2"])
    assert code == 2
    assert f"gan.py: error: cannot write {CHECKPOINT}: No space left on device" in err
    after = snapshot(tmp_path / "checkpoints")
    # the metrics log is appended to, never replaced
    after.pop(metricslog.METRICS_LOG_NAME)
    saved.pop(metricslog.METRICS_LOG_NAME)
    assert after == saved
    assert checkpoint.load_checkpoint(tmp_path / CHECKPOINT)["epoch"] == 1
    assert not (tmp_path / "images" / "epoch_002.png").exists()
    assert leftover_temp_files(tmp_path) == []


def test_a_full_disk_after_the_checkpoint_costs_only_the_pictures(monkeypatch, gan_main, tmp_path):
    fill_the_disk_after("write_run_files", checkpoint, 2, "fsync", monkeypatch, tmp_path)
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "2"])
    assert code == 2
    assert f"gan.py: error: cannot write {Path('images') / 'epoch_002.png'}: No space left on device" in err
    assert checkpoint.load_checkpoint(tmp_path / CHECKPOINT)["epoch"] == 2
    assert leftover_temp_files(tmp_path) == []


def test_the_same_command_after_a_full_disk_at_the_first_checkpoint(monkeypatch, gan_main, tmp_path):
    full = fill_the_disk("replace", monkeypatch)
    full["now"] = True
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1"])
    assert code == 2 and f"cannot write {CHECKPOINT}: No space left on device" in err
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["real_samples.png"]
    full["now"] = False  # space was freed
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1"])
    assert code == 0, err
    assert checkpoint.load_checkpoint(tmp_path / CHECKPOINT)["epoch"] == 1


def test_a_picture_that_cannot_be_written_costs_no_epoch(gan_main, tmp_path):
    (tmp_path / "images" / "losses.png").mkdir(parents=True)  # not a full disk: a folder in the way
    with pytest.warns(UserWarning, match=r"could not draw images/losses.png \(cannot write images/losses.png: Is a"):
        code, out, err = gan_main([*TINY_ARGS, "--epochs", "2"])
    assert code == 0, err
    assert checkpoint.load_checkpoint(tmp_path / CHECKPOINT)["epoch"] == 2
    assert (tmp_path / "images" / "epoch_002.png").is_file()


def at_the_end_of_epoch(epoch, action, monkeypatch):
    """Run action() just before gan.finish_epoch ends the given epoch (1-based), once the files
    of the epoch before are on disk (written on the writer's thread)."""
    real_finish_epoch = gan.finish_epoch

    def finish_epoch(state, *args, **kwargs):
        if state.progress.epoch == epoch - 1:
            args[-1].writer.wait()
            action()
        return real_finish_epoch(state, *args, **kwargs)

    monkeypatch.setattr(gan, "finish_epoch", finish_epoch)


def test_output_folders_removed_mid_run_stop_it_without_making_them_again(monkeypatch, gan_main, tmp_path):
    def remove_both():
        shutil.rmtree(tmp_path / "checkpoints")
        shutil.rmtree(tmp_path / "images")

    at_the_end_of_epoch(2, remove_both, monkeypatch)
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "2"])
    assert code == 2
    assert "gan.py: error: output folder checkpoints (--checkpoint-dir) was removed or replaced while this run" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_run_whose_folder_was_taken_over_never_writes_into_it(monkeypatch, gan_main, tmp_path):
    """Its folders removed, a second run starts there; the first must not overwrite its checkpoint."""
    other = {}

    def second_run_starts():
        shutil.rmtree(tmp_path / "checkpoints")
        other["lock"] = files.FolderLock(tmp_path / "checkpoints", "--checkpoint-dir")
        (tmp_path / CHECKPOINT).write_bytes(b"the second run's checkpoint")
        metricslog.append_metrics(tmp_path / "checkpoints" / metricslog.METRICS_LOG_NAME, [{"step": 1}])
        other["files"] = snapshot(tmp_path / "checkpoints")

    at_the_end_of_epoch(2, second_run_starts, monkeypatch)
    try:
        code, out, err = gan_main([*TINY_ARGS, "--epochs", "2"])
    finally:
        other["lock"].release()
    assert code == 2 and "output folder checkpoints (--checkpoint-dir) was removed or replaced" in err
    assert snapshot(tmp_path / "checkpoints") == other["files"]


def test_image_folder_replaced_by_a_file_stops_the_run_after_the_epochs_checkpoint(monkeypatch, gan_main, tmp_path):
    def replace_images():
        shutil.rmtree(tmp_path / "images")
        (tmp_path / "images").write_text("not a folder")

    at_the_end_of_epoch(2, replace_images, monkeypatch)
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "2"])
    assert code == 2
    assert "gan.py: error: output folder images (--image-dir) was removed or replaced while this run" in err
    assert checkpoint.load_checkpoint(tmp_path / CHECKPOINT)["epoch"] == 2  # saved before the pictures
    assert (tmp_path / "images").read_text() == "not a folder"
    assert leftover_temp_files(tmp_path) == []


def test_checkpoint_folder_replaced_by_a_file_during_a_save(monkeypatch, gan_main, tmp_path):
    real_fsync, saves = os.fsync, []

    def fsync(fd):
        real_fsync(fd)
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(".checkpoint.pt."):
            saves.append(1)
            if len(saves) == 2:  # epoch 2's, halfway through its save
                os.rename(tmp_path / "checkpoints", tmp_path / "moved")
                (tmp_path / "checkpoints").write_text("not a folder")

    monkeypatch.setattr(os, "fsync", fsync)
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "2"])
    assert code == 2
    assert f"gan.py: error: cannot write {CHECKPOINT}: its folder checkpoints was removed or replaced\n" in err
    assert "Traceback" not in err
    assert leftover_temp_files(tmp_path) == []  # not even in the folder it was moved to
    assert checkpoint.load_checkpoint(tmp_path / "moved" / "checkpoint.pt")["epoch"] == 1


# ---------------------------------------------------------------- atomic writes


def half_then(error):
    def write_fn(file):
        file.write(b"NEW CONTENT, HALF")
        raise error

    return write_fn


@pytest.mark.parametrize("existed", [True, False], ids=["over-a-file", "new-file"])
def test_atomic_write_keeps_the_old_file_when_the_writer_raises(existed, tmp_path):
    path = tmp_path / "checkpoint.pt"
    if existed:
        path.write_bytes(b"old checkpoint")
    with pytest.raises(RuntimeError, match="bug in the writer"):
        files.atomic_write(path, half_then(RuntimeError("bug in the writer")))
    with pytest.raises(errors.UserError, match=r"cannot write .*checkpoint.pt: No space left on device"):
        files.atomic_write(path, half_then(OSError(errno.ENOSPC, "No space left on device")))
    assert sorted(p.name for p in tmp_path.iterdir()) == (["checkpoint.pt"] if existed else [])
    if existed:
        assert path.read_bytes() == b"old checkpoint"


def test_atomic_write_keeps_the_old_file_when_fsync_fails(monkeypatch, tmp_path):
    path = tmp_path / "flags.json"
    path.write_text("{}")
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(errors.UserError, match="cannot write .*flags.json: No space left on device"):
        files.atomic_write(path, lambda file: file.write('{"epochs": 5}'), mode="w")
    assert path.read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["flags.json"]


def record_syncs(monkeypatch, folder_fsync_error=None):
    """Record atomic_write's fsyncs and renames in order: ("fsync", the stat of what was synced) or
    ("replace", None); a folder's fsync raises folder_fsync_error (after it is recorded), if given."""
    real_fsync, real_replace, events = os.fsync, os.replace, []

    def fsync(fd):
        events.append(("fsync", os.fstat(fd)))
        if folder_fsync_error is not None and stat.S_ISDIR(os.fstat(fd).st_mode):
            raise folder_fsync_error
        real_fsync(fd)

    def replace(source, destination):
        real_replace(source, destination)
        events.append(("replace", None))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def synced(events, path):
    """The events with each fsync named by what it synced: path ("file", once renamed there), its folder, or else."""
    named = []
    for what, synced_stat in events:
        if what == "fsync" and os.path.samestat(synced_stat, os.stat(path.parent)):
            what = "fsync folder"
        elif what == "fsync":
            what = "fsync file" if os.path.samestat(synced_stat, os.stat(path)) else "fsync other"
        named.append(what)
    return named


def test_atomic_write_fsyncs_the_folder_after_the_rename(monkeypatch, tmp_path):
    """POSIX: the rename is on disk only once the folder holding it is fsynced (a power loss
    before that may bring back the old file); the file's own data is fsynced before the rename."""
    path = tmp_path / "checkpoints" / "checkpoint.pt"
    events = record_syncs(monkeypatch)
    files.atomic_write_bytes(path, b"new checkpoint")
    assert synced(events, path) == ["fsync file", "replace", "fsync folder"]
    assert path.read_bytes() == b"new checkpoint"


@pytest.mark.parametrize("error_number", [errno.EINVAL, errno.EIO], ids=["EINVAL", "EIO"])
def test_a_folder_that_cannot_be_fsynced(error_number, monkeypatch, tmp_path):
    """EINVAL: a file system that syncs no folder (some network mounts) writes on; any other error
    is a WriteError that says the new file is in place."""
    path = tmp_path / "flags.json"
    record_syncs(monkeypatch, OSError(error_number, os.strerror(error_number)))
    if error_number == errno.EINVAL:
        files.atomic_write_bytes(path, b"{}")
    else:
        with pytest.raises(errors.UserError, match="flags.json: Input/output error; the new file is in place, but"):
            files.atomic_write_bytes(path, b"{}")
    assert [p.name for p in tmp_path.iterdir()] == ["flags.json"] and path.read_bytes() == b"{}"


def test_atomic_write_on_windows_syncs_the_file_and_cleans_up_by_name(monkeypatch, tmp_path):
    """Windows opens no folder as a file: the file is fsynced, no folder, and a failed write's temp
    file is removed by its name."""
    monkeypatch.setattr(files, "WINDOWS", True)
    monkeypatch.setattr(os, "O_DIRECTORY", None, raising=False)  # opening a folder would fail, as there
    path = tmp_path / "checkpoint.pt"
    events = record_syncs(monkeypatch)
    files.atomic_write_bytes(path, b"new checkpoint")
    assert synced(events, path) == ["fsync file", "replace"]
    with pytest.raises(RuntimeError, match="bug in the writer"):
        files.atomic_write(path, half_then(RuntimeError("bug in the writer")))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"] and path.read_bytes() == b"new checkpoint"


# ---------------------------------------------------------------- checkpoints never run code


def malicious_checkpoint(kind, marker):
    payload = RunsCode(marker)
    if kind == "pickle":
        return pickle.dumps(payload, protocol=2)  # what torch.load expects, so only the payload is refused
    buffer = io.BytesIO()
    torch.save({"netG": payload, "flags": {}, "epoch": 0, "step": 0} if kind == "torch-dict" else payload, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["pickle", "torch", "torch-dict"])
def test_a_checkpoint_that_runs_code_is_refused(kind, gan_main, tmp_path):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(RunsCode(marker))).close()  # the payload is live ...
    assert marker.exists()
    marker.unlink()
    evil = tmp_path / "evil.pt"
    evil.write_bytes(malicious_checkpoint(kind, marker))

    with pytest.raises(errors.UserError, match="cannot read checkpoint"):
        checkpoint.load_checkpoint(evil)
    for argv in (["--generate", "1", "--checkpoint", evil], [*TINY_ARGS, "--epochs", "1", "--resume", evil]):
        code, out, err = gan_main(argv)
        assert code == 2
        assert f"gan.py: error: cannot read checkpoint {evil}" in err
    assert not marker.exists()  # ... but never ran


# ---------------------------------------------------------------- broken files in a folder dataset


def png_bytes(image, **save_options):
    buffer = io.BytesIO()
    image.save(buffer, format=save_options.pop("format", "PNG"), **save_options)
    return buffer.getvalue()


def noise_image():
    """Incompressible pixels, so a cut file misses image data, not only its end marker."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))


def solid(mode, value, size=16):
    return Image.new(mode, (size, size), value)


def palette_image(transparent):
    image = Image.new("P", (16, 16), 1)
    image.putpalette([0, 0, 0, 200, 40, 90] + [0] * 762)
    if transparent:
        image.info["transparency"] = 1
    return image


def sixteen_bit_stripes():
    """Columns of 0, 128*257 and 255*257: scaled to 8 bits they are 0, 128 and 255."""
    values = np.zeros((16, 16), dtype=np.uint16)
    values[:, 5:10], values[:, 10:] = 128 * 257, 255 * 257
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    return image


# name -> (file bytes, expected RGB of every pixel or per column; None: unreadable)
READABLE = {
    "rgb.png": (lambda: png_bytes(solid("RGB", (10, 120, 250))), (10, 120, 250)),
    "grey.png": (lambda: png_bytes(solid("L", 77)), (77, 77, 77)),
    "bilevel.png": (lambda: png_bytes(solid("1", 1)), (255, 255, 255)),
    "opaque-rgba.png": (lambda: png_bytes(solid("RGBA", (200, 40, 90, 255))), (200, 40, 90)),
    "clear-rgba.png": (lambda: png_bytes(solid("RGBA", (200, 40, 90, 0))), (255, 255, 255)),
    "grey-alpha.png": (lambda: png_bytes(solid("LA", (30, 255))), (30, 30, 30)),
    # grey 30 at alpha 128 of 255, over white: 30 * 128/255 + 255 * 127/255
    "half-clear-grey-alpha.png": (lambda: png_bytes(solid("LA", (30, 128))), (142, 142, 142)),
    # 32-bit integer greyscale whose values stay within 8 bits: kept as they are, not read as 16-bit
    "32-bit-grey.tif": (lambda: png_bytes(solid("I", 200), format="TIFF"), (200, 200, 200)),
    "palette.png": (lambda: png_bytes(palette_image(transparent=False)), (200, 40, 90)),
    "palette-transparent.png": (lambda: png_bytes(palette_image(transparent=True)), (255, 255, 255)),
    "jpeg-named.png": (lambda: png_bytes(solid("RGB", (0, 0, 0)), format="JPEG"), (0, 0, 0)),
    "16-bit.png": (lambda: png_bytes(sixteen_bit_stripes()), None),
}
UNREADABLE = {
    "truncated.png": lambda: png_bytes(noise_image())[:1500],
    "truncated.jpg": lambda: png_bytes(noise_image(), format="JPEG")[:1500],
    "text.png": lambda: b"this is not an image\n",
    "empty.jpg": lambda: b"",
}


@pytest.mark.parametrize("name", list(READABLE))
def test_read_image_converts_every_mode_to_rgb(name, tmp_path):
    path = tmp_path / name
    path.write_bytes(READABLE[name][0]())
    image = folders.read_image(path, 16)
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
    expected = READABLE[name][1]
    if expected is not None:
        assert image.view(3, -1).unique(dim=1).T.tolist() == [list(expected)]
        return
    # 16-bit: scaled to 8 bits, not clipped (clipping would make 128*257 white)
    assert image[:, 0, :5].unique().tolist() == [0]
    assert image[:, 0, 5:10].unique().tolist() == [128]
    assert image[:, 0, 10:].unique().tolist() == [255]


@pytest.mark.parametrize("name", list(UNREADABLE))
def test_read_image_returns_none_for_broken_files(name, tmp_path):
    path = tmp_path / name
    path.write_bytes(UNREADABLE[name]())
    assert folders.read_image(path, 16) is None


def write_image_folder(folder):
    folder.mkdir()
    for name, (make, _) in {**READABLE, **{n: (m, None) for n, m in UNREADABLE.items()}}.items():
        (folder / name).write_bytes(make())


def test_folder_dataset_skips_broken_files_with_one_warning(tmp_path):
    write_image_folder(tmp_path / "data")
    readable, total = len(READABLE), len(READABLE) + len(UNREADABLE)
    args = [*TINY_ARGS, "--dataset", "folder", "--dataroot", "data", "--subset", readable, "--batch-size", 5]
    result = check_ok(run_gan([*args, "--epochs", "1"], tmp_path))
    assert f"{readable} images (held on cpu), 2 steps per epoch" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "skipped" in line]
    # the first three, sorted, named with the reason; the fourth counted
    named = (
        "empty.jpg (not an image format Pillow reads), text.png (not an image format Pillow reads), "
        "truncated.jpg (image file is truncated (65 bytes not processed)) and 1 more"
    )
    assert warnings == [f"warning: skipped 4 of {total} files in data that are not readable images: {named}"]
    assert "Traceback" not in result.stderr
    assert checkpoint.load_checkpoint(tmp_path / CHECKPOINT)["step"] == 2


def test_folder_of_only_broken_files_is_a_clear_error(gan_main, tmp_path):
    (tmp_path / "data").mkdir()
    for name, make in UNREADABLE.items():
        (tmp_path / "data" / name).write_bytes(make())
    with pytest.warns(UserWarning, match="skipped 4 of 4 files"):
        argv = [*TINY_ARGS, "--dataset", "folder", "--dataroot", "data", "--subset", "4", "--batch-size", "2"]
        code, out, err = gan_main([*argv, "--epochs", "1"])
    assert code == 2
    assert "gan.py: error: data folder data holds no readable images" in err


# ---------------------------------------------------------------- one run per folder


HOLD_LOCK = """
import sys, time
sys.path.insert(0, sys.argv[1])
import files
lock = files.FolderLock(sys.argv[2], "--checkpoint-dir")
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_in_a_checkpoint_dir_in_use_exits_2_naming_the_first(gan_main, tmp_path):
    # the first run: a process holding the folder's lock as training does (without torch: fast)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(GAN_PY.parent), "checkpoints"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        code, out, err = gan_main([*TINY_ARGS, "--epochs", "1"])
        assert code == 2
        assert err == (
            f"gan.py: error: checkpoints is in use by another run (process {holder.pid}): "
            "wait for it to end, or give another --checkpoint-dir\n"
        )
        assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]  # no images/ made either
    finally:
        holder.kill()
        holder.wait()
    # killed with -9, its lock file stays behind: the next run takes it over, and removes it at the end
    assert (tmp_path / "checkpoints" / files.LOCK_NAME).read_text() == f"{holder.pid}\n"
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1"])
    assert code == 0, err
    assert not (tmp_path / "checkpoints" / files.LOCK_NAME).exists()
    assert not (tmp_path / "images" / files.LOCK_NAME).exists()


def test_the_image_dir_is_locked_too(gan_main, tmp_path):
    lock = files.FolderLock(tmp_path / "images", "--image-dir")
    try:
        code, out, err = gan_main([*TINY_ARGS, "--epochs", "1"])
    finally:
        lock.release()
    assert code == 2 and f"images is in use by another run (process {os.getpid()})" in err
    assert not (tmp_path / "checkpoints").exists()


@contextlib.contextmanager
def lock_held_by_another_process(cwd, folder):
    """A process holding folder's lock, as a training run does; yields it, killed at the end."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(GAN_PY.parent), folder], cwd=cwd, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        yield holder
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


@pytest.mark.parametrize(
    "folder, flag, first_runs_file",
    [("checkpoints", "--checkpoint-dir", "checkpoint.pt"), ("images", "--image-dir", "epoch_001.png")],
)
def test_a_second_run_while_the_first_trains_is_told_the_folder_is_in_use(
    folder, flag, first_runs_file, gan_main, tmp_path
):
    """The live run's files are not an earlier run's: the folder is in use, and that is said first."""
    (tmp_path / folder).mkdir()
    (tmp_path / folder / first_runs_file).write_bytes(b"the first run's")
    with lock_held_by_another_process(tmp_path, folder) as holder:
        code, out, err = gan_main([*TINY_ARGS, "--epochs", "1"])
    assert code == 2
    assert err == (
        f"gan.py: error: {folder} is in use by another run (process {holder.pid}): "
        f"wait for it to end, or give another {flag}\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder]
    assert snapshot(tmp_path / folder) == {first_runs_file: b"the first run's"}


def test_the_run_lock_is_filelocks(tmp_path):
    """flock on POSIX, LockFileEx on Windows, as filelock chooses: a FolderLock and a
    filelock.FileLock of the same file each keep the other out."""
    folder = tmp_path / "checkpoints"
    lock = files.FolderLock(folder, "--checkpoint-dir")
    try:
        with pytest.raises(filelock.Timeout):
            filelock.FileLock(folder / files.LOCK_NAME).acquire(timeout=0)
    finally:
        lock.release()
    other = filelock.FileLock(folder / files.LOCK_NAME)
    other.acquire(timeout=0)
    try:
        with pytest.raises(errors.UserError, match="checkpoints is in use by another run"):
            files.FolderLock(folder, "--checkpoint-dir")
    finally:
        other.release()


@pytest.mark.parametrize(
    "windows, pid_text, release_steps",
    [
        (False, "{pid}\n", ["remove", "unlock"]),  # removed while locked: a waiting run retries on a new file
        # Windows bars others from reading the locked byte 0 (the PID follows it), and removes no open file
        (True, "\n{pid}\n", ["unlock", "remove"]),
    ],
    ids=["posix", "windows"],
)
def test_the_run_lock_file_on_each_system(windows, pid_text, release_steps, monkeypatch, tmp_path):
    monkeypatch.setattr(files, "WINDOWS", windows)
    folder = tmp_path / "images"
    lock = files.FolderLock(folder, "--image-dir")
    assert (folder / files.LOCK_NAME).read_bytes() == pid_text.format(pid=os.getpid()).encode()
    with pytest.raises(errors.UserError, match=rf"images is in use by another run \(process {os.getpid()}\)"):
        files.FolderLock(folder, "--image-dir")
    steps, real_close, real_remove = [], os.close, files.remove_file

    def close(fd):
        if fd == lock.fd:
            steps.append("unlock")
        real_close(fd)

    def remove_file(path):
        steps.append("remove")
        real_remove(path)

    monkeypatch.setattr(os, "close", close)
    monkeypatch.setattr(files, "remove_file", remove_file)
    lock.release()
    monkeypatch.undo()
    assert steps == release_steps and not (folder / files.LOCK_NAME).exists()
    files.FolderLock(folder, "--image-dir").release()  # free again


def test_a_second_interpolate_never_replaces_the_first(trained_run, gan_main, tmp_path):
    """As a second --generate writes into generated-2/: interpolation-2.png and .gif, then -3, ..."""
    argv = ["--interpolate", "--steps", "3", "--checkpoint", trained_run / CHECKPOINT]
    code, out, err = gan_main([*argv, "--seed", "2"])
    assert code == 0, err
    first = snapshot(tmp_path / "images")
    assert sorted(first) == ["interpolation.gif", "interpolation.png"]
    code, out, err = gan_main([*argv, "--seed", "3"])
    assert code == 0, err
    assert "wrote interpolation-2.png and interpolation-2.gif to images/ (8 walks, 3 steps, seed 3)" in out
    second = snapshot(tmp_path / "images")
    assert sorted(second) == ["interpolation-2.gif", "interpolation-2.png", "interpolation.gif", "interpolation.png"]
    assert {name: second[name] for name in first} == first
    assert second["interpolation-2.png"] != first["interpolation.png"]  # another seed: another walk
    # and a fresh run still takes them for an earlier run's pictures, alone too
    for name in first:
        (tmp_path / "images" / name).unlink()
    code, _, err = gan_main([*TINY_ARGS, "--epochs", "1", "--checkpoint-dir", "fresh"])
    assert code == 2 and "images holds an earlier run's pictures (interpolation-2.gif, interpolation-2.png)" in err


# ---------------------------------------------------------------- --save-every, and runs killed early


class Killed(BaseException):
    """Stands in for kill -9 in-process: nothing in gan.py catches it."""


def kill_at_step(monkeypatch, step):
    """Make the step-th call of gan.train_step (1-based) end the run before it trains; returns a
    function that disarms it."""
    real_train_step, calls = gan.train_step, []

    def train_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise Killed
        return real_train_step(*args, **kwargs)

    monkeypatch.setattr(gan, "train_step", train_step)
    return lambda: monkeypatch.setattr(gan, "train_step", real_train_step)


def test_kill_9_with_save_every_loses_at_most_n_steps(start_gan, gan_main, tmp_path):
    process = start_gan([*ENDLESS_ARGS, "--save-every", "1"])
    # mid-epoch 2: only --save-every can have saved the steps of the epoch in progress
    wait_until(reached_step(tmp_path, STEPS_PER_EPOCH + 2), process, tmp_path, "step 6")
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL
    state = checkpoint.load_checkpoint(tmp_path / CHECKPOINT)
    assert_consistent(state)
    assert 0 <= max(logged_steps(tmp_path)) - state["step"] <= 1
    assert state["step"] >= STEPS_PER_EPOCH + 1
    target_epochs = state["epoch"] + 1
    code, out, err = gan_main(["--resume", "--epochs", target_epochs, "--device", "cpu", "--workers", "0"])
    assert code == 0, err
    assert f"step {state['step']}" in out
    assert logged_steps(tmp_path) == list(range(1, target_epochs * STEPS_PER_EPOCH + 1))


def test_a_save_every_checkpoint_resumes_exactly(trained_run, monkeypatch, gan_main, tmp_path):
    """--save-every 3, killed at step 7: resuming its step-6 checkpoint ends with the very weights
    of the 2 epochs of trained_run (no --save-every): saving draws no random number either."""
    disarm = kill_at_step(monkeypatch, 7)
    with pytest.raises(Killed):
        gan_main([*TINY_ARGS, "--epochs", "2", "--save-every", "3"])
    state = checkpoint.load_checkpoint(tmp_path / CHECKPOINT)
    assert (state["epoch"], state["batch"], state["step"]) == (1, 2, 6)
    disarm()
    code, out, err = gan_main(["--resume", "--device", "cpu", "--workers", "0"])
    assert code == 0, err
    resumed, reference = (torch.load(run / CHECKPOINT) for run in (tmp_path, trained_run))
    for key in ("netG", "netD", "netG_ema", "optG", "optD"):
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")
    log = Path("checkpoints") / metricslog.METRICS_LOG_NAME
    assert (tmp_path / log).read_text() == (trained_run / log).read_text()


def test_a_fresh_run_keeps_the_log_of_a_run_without_checkpoint(gan_main, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    earlier = '{"epoch": 1, "step": 100, "loss_d": 1.0}\n{"epoch": 1, "step": 200, "loss_d": 0.5}\n'
    (tmp_path / "checkpoints" / metricslog.METRICS_LOG_NAME).write_text(earlier)
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1"])
    assert code == 0, err
    kept = Path("checkpoints") / "metrics.1.jsonl"
    assert f"kept the log of a run that saved no checkpoint as {kept}" in out
    assert (tmp_path / kept).read_text() == earlier
    assert logged_steps(tmp_path) == [2, 4]


def test_a_fresh_run_never_replaces_an_earlier_runs_files_without_its_checkpoint(trained_run, gan_main, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    for name in ("netG.pth", "netG_ema.pth", "flags.json"):
        shutil.copy(trained_run / "checkpoints" / name, tmp_path / "checkpoints" / name)
    before = snapshot(tmp_path)
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1"])
    assert code == 2
    assert err == (
        "gan.py: error: checkpoints holds an earlier run's files (netG.pth, netG_ema.pth, flags.json): "
        "train into another --checkpoint-dir, or move them away first\n"
    )
    assert snapshot(tmp_path) == before


def test_the_same_command_after_a_run_killed_in_its_first_epoch(monkeypatch, gan_main, tmp_path):
    """No checkpoint yet: the command starts afresh, over the killed run's log and real_samples.png,
    and no step is logged twice then or after a later resume."""
    disarm = kill_at_step(monkeypatch, 4)
    with pytest.raises(Killed):
        gan_main([*TINY_ARGS, "--epochs", "1", "--seed", "5"])
    assert logged_steps(tmp_path) == [2] and not (tmp_path / CHECKPOINT).exists()
    stale_samples = (tmp_path / "images" / "real_samples.png").read_bytes()
    disarm()
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1"])
    assert code == 0, err
    assert logged_steps(tmp_path) == [2, 4]
    assert (tmp_path / "images" / "real_samples.png").read_bytes() != stale_samples  # this run's images
    code, out, err = gan_main(["--resume", "--epochs", "2"])
    assert code == 0, err
    assert logged_steps(tmp_path) == [2, 4, 6, 8]


# ---------------------------------------------------------------- pictures never lose training


def test_a_picture_that_fails_to_draw_is_a_warning(monkeypatch, gan_main, tmp_path):
    def broken(*args, **kwargs):
        raise ValueError("cannot draw this")

    for name in ("grid_image", "plot_losses", "plot_real_vs_fake"):
        monkeypatch.setattr(artifacts, name, broken)
    with pytest.warns(UserWarning) as caught:
        code, out, err = gan_main([*TINY_ARGS, "--epochs", "2"])
    assert code == 0, err
    drawn = [str(warning.message) for warning in caught]
    assert "could not draw images/epoch_001.png (ValueError: cannot draw this); training goes on" in drawn
    assert "could not draw images/real_vs_fake.png (ValueError: cannot draw this); training goes on" in drawn
    assert checkpoint.load_checkpoint(tmp_path / CHECKPOINT)["epoch"] == 2


def test_a_damaged_metrics_log_costs_no_epoch(run_copy, gan_main):
    log = run_copy / "checkpoints" / metricslog.METRICS_LOG_NAME
    with open(log, "ab") as file:  # rows a hand edit or another program could leave
        file.write(b'{"epoch": 2, "step": 7, "loss_d": 1.0}\n[1, 2]\n"text"\n{"step": "8"}\n\xff\xfe\n')
    with pytest.warns(UserWarning, match="skipped 4 damaged lines"):
        code, out, err = gan_main(["--resume", "--epochs", "3"])
    assert code == 0, err
    assert checkpoint.load_checkpoint(run_copy / CHECKPOINT)["epoch"] == 3
    assert (run_copy / "images" / "losses.png").stat().st_size > 0


def test_a_damaged_epoch_grid_costs_no_epoch(run_copy, gan_main):
    # the GIF is rebuilt from the grids at start-up: a grid that is no image must not stop the run
    (run_copy / "images" / "epoch_001.png").write_bytes(b"not a png")
    (run_copy / "images" / "progress.gif").write_bytes(b"torn")
    with pytest.warns(UserWarning, match="could not draw images/progress.gif .*UnidentifiedImageError"):
        code, out, err = gan_main(["--resume", "--epochs", "3"])
    assert code == 0, err
    assert checkpoint.load_checkpoint(run_copy / CHECKPOINT)["epoch"] == 3


# ---------------------------------------------------------------- Ctrl-C outside training


def test_ctrl_c_while_importing_is_one_line(tmp_path):
    # a torch that is interrupted while it loads: the first thing gan.py imports
    (tmp_path / "torch.py").write_text("import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(30)\n")
    result = run_gan([*TINY_ARGS, "--epochs", "1"], tmp_path, timeout=60, PYTHONPATH=str(tmp_path))
    assert result.returncode == 130
    assert result.stderr == "interrupted while starting; nothing was written\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["torch.py"]


@pytest.mark.parametrize("interrupted, written", [("save_png", 3), ("save_grid", 10)])
def test_ctrl_c_during_generate_says_how_many_images_were_written(
    run_copy, monkeypatch, gan_main, interrupted, written
):
    real_function, calls = getattr(artifacts, interrupted), []

    def interrupt_after_3(*args, **kwargs):
        if len(calls) == 3 or interrupted == "save_grid":
            raise KeyboardInterrupt
        calls.append(real_function(*args, **kwargs))

    monkeypatch.setattr(artifacts, interrupted, interrupt_after_3)
    code, out, err = gan_main(["--generate", "10", "--seed", "4", "--device", "cpu"])
    assert code == 130
    assert err == f"interrupted: wrote {written} of 10 images to {Path('images') / 'generated'}/ (seed 4)\n"
    assert len(list((run_copy / "images" / "generated").glob("0*.png"))) == written


def test_sigterm_before_training_is_one_line_and_leaves_nothing(monkeypatch, gan_main, tmp_path):
    real_load_batches = gan.load_batches

    def load_batches(*args):
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, while the data loads
        time.sleep(5)
        return real_load_batches(*args)

    monkeypatch.setattr(gan, "load_batches", load_batches)
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1"])
    assert (code, err) == (143, "interrupted; nothing was written\n")
    assert not any(tmp_path.iterdir())
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # given back as it was


@pytest.mark.parametrize("signal_number, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_that_a_library_turns_into_an_error_of_its_own_is_still_an_interruption(
    signal_number, code, run_copy, gan_main, monkeypatch
):
    """torch's ONNX exporter, stopped mid-import, fails in its own except clause: an AttributeError
    raised while handling the Ctrl-C. It is the interruption, in one line; the export is not left."""
    import export

    def exporter_stopped_mid_import(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal_number)
            time.sleep(5)
        except KeyboardInterrupt:
            raise AttributeError("module 'torch._dynamo' has no attribute 'exc'") from None

    monkeypatch.setattr(export.torch.onnx, "export", exporter_stopped_mid_import)
    before = sorted(path.name for path in run_copy.iterdir())
    code_seen, out, err = gan_main(["--export", "exported"])
    assert (code_seen, err) == (code, "interrupted; nothing was written\n")
    assert sorted(path.name for path in run_copy.iterdir()) == before  # neither the export nor its staging


# gan.py and two decoding workers started, signalled and waited for: 27-61 s on a busy 2-core machine
@pytest.mark.timeout(120)
def test_sigterm_to_the_process_group_while_decoding_is_one_line(start_gan, tmp_path):
    (tmp_path / "data").mkdir()
    Image.new("RGB", (4000, 4000)).save(tmp_path / "data" / "0.png")  # small on disk, slow to decode
    for index in range(1, 40):
        os.link(tmp_path / "data" / "0.png", tmp_path / "data" / f"{index}.png")
    process = start_gan([*TINY_ARGS, "--dataset", "folder", "--dataroot", "data", "--workers", "2", "--epochs", "1"])
    workers = Path(f"/proc/{process.pid}/task/{process.pid}/children")

    def decoding():  # two workers, one of them 0.2 s of CPU into its images
        pids = workers.read_text().split()
        ticks = [int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11]) for pid in pids]
        return len(pids) == 2 and max(ticks) >= 20

    wait_until(decoding, process, tmp_path, "the decoding workers")
    # the worst order a group's signal can arrive in: the workers first, then the main process
    for worker in workers.read_text().split():
        os.kill(int(worker), signal.SIGTERM)
    time.sleep(1)
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    assert stderr_of(tmp_path) == "interrupted; nothing was written\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "stderr.txt", "stdout.txt"]


def test_a_stopped_decode_kills_its_workers_at_once(tmp_path, monkeypatch):
    """A stop while a worker is inside a chunk ends the decode at once: the workers ignore the stop
    signals, so the DataLoader's own shutdown would wait for each to finish its chunk first."""
    import multiprocessing

    for index in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{index}.png")
    real_read_image = folders.read_image

    def read_image(path, image_size):  # in the workers: every file but the first takes a minute
        if path.name != "0.png":
            time.sleep(60)
        return real_read_image(path, image_size)

    monkeypatch.setattr(folders, "read_image", read_image)
    monkeypatch.setattr(folders, "DECODE_CHUNK_FILES", 1)
    decoding = folders.decode_files(sorted(tmp_path.glob("*.png")), 8, 2, [])
    try:
        assert next(decoding).shape == (1, 3, 8, 8)  # the first file's chunk; the workers are in the others
        with pytest.raises(KeyboardInterrupt):
            decoding.throw(KeyboardInterrupt)
        assert multiprocessing.active_children() == []
    finally:
        decoding.close()
        for worker in multiprocessing.active_children():
            worker.kill()


# the DataLoader's own clean-up still calls the function this test takes away: its error there is the test's
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_stopped_decode_on_a_dataloader_it_does_not_know_raises_the_stop(tmp_path, monkeypatch):
    """Without the DataLoader internals that stop_decoding_now uses, the stop still comes out as
    the stop (its one line), through the DataLoader's own shutdown, not as an AttributeError."""
    import multiprocessing

    for index in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{index}.png")
    monkeypatch.delattr(torch.utils.data._utils.signal_handling, "_remove_worker_pids")
    monkeypatch.setattr(folders, "DECODE_CHUNK_FILES", 1)
    decoding = folders.decode_files(sorted(tmp_path.glob("*.png")), 8, 2, [])
    try:
        assert next(decoding).shape == (1, 3, 8, 8)
        with pytest.raises(KeyboardInterrupt):
            decoding.throw(KeyboardInterrupt)
    finally:
        decoding.close()
        for worker in multiprocessing.active_children():
            worker.kill()


def test_the_resume_command_names_the_folders_a_checkpoint_never_chooses():
    opts, _ = options.parse_flags(["--dataset", "folder", "--dataroot", "my data", "--image-dir", "pics"])
    assert startup.resume_command(opts.replace(checkpoint_dir="ck")) == (
        "python gan.py --resume --checkpoint-dir ck --image-dir pics --dataroot 'my data'"
    )
    defaults, _ = options.parse_flags([])
    assert startup.resume_command(defaults) == "python gan.py --resume --checkpoint-dir checkpoints"


@pytest.mark.parametrize("saving", ["ctrl-c", "save-every"])
def test_non_finite_weights_are_never_saved_over_the_last_good_checkpoint(saving, monkeypatch, gan_main, tmp_path):
    real_train_step, calls = gan.train_step, []

    def train_step(nets, *args, **kwargs):
        stats = real_train_step(nets, *args, **kwargs)
        calls.append(1)
        if len(calls) == STEPS_PER_EPOCH + 1:  # step 5: the weights diverge, between two log points
            next(nets.G.parameters()).data.fill_(math.nan)
        return stats

    monkeypatch.setattr(gan, "train_step", train_step)
    if saving == "ctrl-c":
        monkeypatch.setattr(gan, "stop_requested", lambda stop, step, opts, runtime: step == STEPS_PER_EPOCH + 1)
    flags = ["--save-every", "1"] if saving == "save-every" else []
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "2", *flags])
    assert code == faults.EXIT_DIVERGED, err
    assert "weights became non-finite at step 5" in err
    state = checkpoint.load_checkpoint(tmp_path / CHECKPOINT)
    assert state["step"] == STEPS_PER_EPOCH
