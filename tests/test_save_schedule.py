"""Which epoch ends write everything (the checkpoint, the loss plot, the GIF frames) and which their
grid alone (save_schedule.py), on a clock each test sets; and that stops, kills and resumes keep
every file whole and the training exact."""

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import TINY_ARGS
from PIL import Image

import artifacts
import checkpoint
import faults
import gan
import metricslog
import options
import save_schedule
import steps
from checkpoint import Progress
from runlength import RunLength
from runtime import Runtime

STEPS_PER_EPOCH = 4  # TINY_ARGS: 32 images, batch 8; a log row every 2 steps
EXACT_KEYS = ("netG", "netD", "netG_ema", "optG", "optD", "fixed_noise", "rng", "epoch", "batch", "step")


def set_clock(monkeypatch, seconds):
    """Rank 0's clock reads the first of these seconds when training starts, the others at the
    successive epoch ends, then the last for ever."""
    readings = itertools.chain(seconds, itertools.repeat(seconds[-1]))
    monkeypatch.setattr(save_schedule, "time", SimpleNamespace(monotonic=lambda: next(readings)))


def record_writes(monkeypatch):
    """What the run writes, as it writes it: the (epoch, step) of each checkpoint, the last step and
    row count of each loss plot, the frames of each GIF append, and the grids' names."""
    written = {"checkpoints": [], "plots": [], "frames": [], "grids": []}
    real_write, real_plot = checkpoint.write_run_files, artifacts.plot_losses
    real_append, real_save_pil = artifacts.ProgressGif.append_encoded, artifacts.save_pil

    def write_run_files(state, folder):
        written["checkpoints"].append((state["epoch"], state["step"]))
        real_write(state, folder)

    def plot_losses(rows, path):
        written["plots"].append((rows[-1]["step"], len(rows)))
        real_plot(rows, path)

    def append_encoded(gif, blocks, size):
        written["frames"].append(len(blocks))
        real_append(gif, blocks, size)

    def save_pil(image, path, **kwargs):
        if path.name.startswith("epoch_"):
            written["grids"].append(path.name)
        real_save_pil(image, path, **kwargs)

    monkeypatch.setattr(checkpoint, "write_run_files", write_run_files)
    monkeypatch.setattr(artifacts, "plot_losses", plot_losses)
    monkeypatch.setattr(artifacts.ProgressGif, "append_encoded", append_encoded)
    monkeypatch.setattr(artifacts, "save_pil", save_pil)
    return written


def gif_frames_as_epochs(images):
    """For each frame of progress.gif, the epoch whose grid PNG it is (in the frame's 256 colours,
    pixel for pixel; 0 when none is); and each frame's duration."""
    grids = {}
    for path in sorted(images.glob("epoch_*.png")):
        with Image.open(path) as grid:
            as_frame = grid.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).convert("RGB")
            grids[int(path.stem[len("epoch_") :])] = np.asarray(as_frame)
    epochs, durations = [], []
    with Image.open(images / "progress.gif") as gif:
        for index in range(gif.n_frames):
            gif.seek(index)
            frame = np.asarray(gif.convert("RGB"))
            epochs.append(next((epoch for epoch, grid in grids.items() if np.array_equal(frame, grid)), 0))
            durations.append(gif.info["duration"])
    return epochs, durations


def assert_same_training(resumed, straight):
    for key in EXACT_KEYS:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")


def test_short_epochs_write_their_grid_and_everything_else_every_save_seconds(monkeypatch, gan_main, tmp_path):
    # training starts at 0 s, epochs end at 1, 20, 50, 61, 100 and 130 s: the first writes its
    # checkpoint (the plots wait for the clock), the fourth is 61 s after the start and writes
    # everything, the last is the run's end; the others draw their grid alone
    set_clock(monkeypatch, [0, 1, 20, 50, 61, 100, 130])
    written = record_writes(monkeypatch)
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "6"])
    assert code == 0, err
    assert written["checkpoints"] == [(1, 4), (4, 16), (6, 24)]
    assert written["plots"] == [(16, 8), (24, 12)]  # the last plot holds every row of the log
    assert written["frames"] == [4, 2]  # the frames of epochs 1 to 4; then 5 and 6's
    assert written["grids"] == [f"epoch_{epoch:03d}.png" for epoch in range(1, 7)]
    epochs, durations = gif_frames_as_epochs(tmp_path / "images")
    assert epochs == [1, 2, 3, 4, 5, 6]
    assert durations == [artifacts.FRAME_MS] * 5 + [artifacts.LAST_FRAME_MS]
    assert checkpoint.load_checkpoint(tmp_path / "checkpoints" / "checkpoint.pt")["step"] == 24


def test_save_every_steps_stay_exact_at_epoch_ends(monkeypatch, gan_main):
    set_clock(monkeypatch, [0, 1, 2, 3, 4, 5])
    written = record_writes(monkeypatch)
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "5", "--save-every", "8"])
    assert code == 0, err
    # steps 8 and 16 end epochs 2 and 4; epoch 1 writes its checkpoint alone, epoch 3 (step 12) its grid
    assert written["checkpoints"] == [(1, 4), (2, 8), (4, 16), (5, 20)]
    assert written["frames"] == [2, 2, 1]


class Killed(BaseException):
    """Stands in for kill -9 in-process: nothing in gan.py catches it."""


def steps_counted(monkeypatch):
    """gan.train_step, counting its calls in done (a list); raise_at: the call that raises Killed."""
    real_train_step, done, raise_at = gan.train_step, [], {"step": math.inf}

    def train_step(*args, **kwargs):
        done.append(1)
        if len(done) == raise_at["step"]:
            raise Killed
        return real_train_step(*args, **kwargs)

    monkeypatch.setattr(gan, "train_step", train_step)
    return done, raise_at


def test_a_stop_writes_the_checkpoint_and_what_the_epoch_ends_left_and_resumes_exactly(monkeypatch, gan_main, tmp_path):
    code, _, err = gan_main([*TINY_ARGS, "--epochs", "3", "--checkpoint-dir", "straight", "--image-dir", "s"])
    assert code == 0, err
    set_clock(monkeypatch, [0, 0, 10])
    written = record_writes(monkeypatch)
    done, _ = steps_counted(monkeypatch)
    stop_at = {"step": 2 * STEPS_PER_EPOCH + 2}  # a Ctrl-C in epoch 3; epoch 2 drew its grid alone
    monkeypatch.setattr(faults.StopRequest, "requested", property(lambda self: len(done) >= stop_at["step"]))
    code, _, err = gan_main([*TINY_ARGS, "--epochs", "3"])
    assert code == 130 and "SIGINT: stopped at epoch 3, step 10" in err, err
    assert written["checkpoints"] == [(1, 4), (2, 10)]  # the stop's: 2 epochs done and 2 batches
    assert written["frames"] == [2] and written["plots"] == [(10, 5)]  # the stop draws what waited
    assert gif_frames_as_epochs(tmp_path / "images")[0] == [1, 2]
    stop_at["step"] = math.inf
    code, out, err = gan_main(["--resume", "--device", "cpu", "--workers", "0"])
    assert code == 0, err
    resumed, straight = (torch.load(tmp_path / run / "checkpoint.pt") for run in ("checkpoints", "straight"))
    assert_same_training(resumed, straight)
    assert gif_frames_as_epochs(tmp_path / "images")[0] == [1, 2, 3]


def test_a_run_killed_after_an_epoch_that_saved_nothing_resumes_exactly_from_its_last_save(
    monkeypatch, gan_main, tmp_path
):
    code, _, err = gan_main([*TINY_ARGS, "--epochs", "3", "--checkpoint-dir", "straight", "--image-dir", "s"])
    assert code == 0, err
    set_clock(monkeypatch, [0, 0, 10])  # epoch 1 writes its checkpoint and grid, epoch 2 its grid alone
    _, kill = steps_counted(monkeypatch)
    kill["step"] = 2 * STEPS_PER_EPOCH + 2  # in epoch 3
    with pytest.raises(Killed):
        gan_main([*TINY_ARGS, "--epochs", "3"])
    images = tmp_path / "images"
    assert sorted(path.name for path in images.glob("epoch_*.png")) == ["epoch_001.png", "epoch_002.png"]
    assert not (images / "progress.gif").exists()  # no epoch end has drawn the progress pictures yet
    state = checkpoint.load_checkpoint(tmp_path / "checkpoints" / "checkpoint.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (1, 0, 4)
    kill["step"] = math.inf
    code, out, err = gan_main(["--resume", "--device", "cpu", "--workers", "0"])
    assert code == 0, err
    assert "resuming checkpoints/checkpoint.pt: 1 epoch done, step 4" in out
    resumed, straight = (torch.load(tmp_path / run / "checkpoint.pt") for run in ("checkpoints", "straight"))
    assert_same_training(resumed, straight)
    log = metricslog.METRICS_LOG_NAME
    assert (tmp_path / "checkpoints" / log).read_text() == (tmp_path / "straight" / log).read_text()
    assert gif_frames_as_epochs(images) == ([1, 2, 3], [artifacts.FRAME_MS] * 2 + [artifacts.LAST_FRAME_MS])


def test_a_rollback_drops_the_waiting_frames_of_the_epochs_it_trains_again(monkeypatch, gan_main, tmp_path):
    """Epoch 1 writes its checkpoint and grid, epochs 2 and 3 their grids alone; a NaN in epoch 4
    rolls back to epoch 1's checkpoint: the waiting frames of 2 and 3 are forgotten, epoch 1's kept,
    and the GIF ends with one frame of each epoch as it was trained the second time."""
    set_clock(monkeypatch, [0, 0, 10, 20])
    written = record_writes(monkeypatch)
    real_d_step, calls = steps.d_step, []

    def d_step(*args, **kwargs):
        stats = real_d_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3 * STEPS_PER_EPOCH + 2:
            stats["loss_d"] = torch.full_like(stats["loss_d"], math.nan)
        return stats

    monkeypatch.setattr(steps, "d_step", d_step)
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "4", "--on-nan", "rollback"])
    assert code == 0, err
    assert "rolled back to checkpoints/checkpoint.pt (epoch 1)" in out
    assert written["checkpoints"] == [(1, 4), (4, 16)] and written["frames"] == [4]
    assert written["grids"] == [f"epoch_{epoch:03d}.png" for epoch in (1, 2, 3, 2, 3, 4)]
    assert gif_frames_as_epochs(tmp_path / "images")[0] == [1, 2, 3, 4]


# ---------------------------------------------------------------- the decision itself


def schedule(rank=0, world_size=1):
    opts, _ = options.parse_flags([*TINY_ARGS, "--epochs", "10"])
    length = RunLength.of(opts, 4, world_size, Progress())
    return save_schedule.SaveSchedule(opts, Runtime(torch.device("cpu"), rank=rank, world_size=world_size), length)


CHECKPOINT_ONLY = save_schedule.EpochEndWrites(checkpoint=True, progress=False)
GRID_ONLY = save_schedule.EpochEndWrites(checkpoint=False, progress=False)
EVERYTHING = save_schedule.EpochEndWrites(checkpoint=True, progress=True)


def test_a_stop_at_an_epoch_end_writes_everything(monkeypatch):
    set_clock(monkeypatch, [0, 5, 6])
    saves = schedule()
    assert saves.agree(Progress(epoch=0, step=4), stop_requested=False) == (False, CHECKPOINT_ONLY)  # the first
    assert saves.agree(Progress(epoch=1, step=8), stop_requested=False) == (False, GRID_ONLY)
    assert saves.agree(Progress(epoch=2, step=12), stop_requested=True) == (True, EVERYTHING)


def test_the_clock_counts_from_the_start_of_training_then_from_each_full_save(monkeypatch):
    set_clock(monkeypatch, [100, 130, 159, 160, 200, 219, 220])
    saves = schedule()
    writes = [saves.agree(Progress(epoch=epoch, step=4 * epoch + 4), False)[1] for epoch in range(6)]
    assert writes == [CHECKPOINT_ONLY, GRID_ONLY, EVERYTHING, GRID_ONLY, GRID_ONLY, EVERYTHING]


@pytest.fixture
def one_process_group():
    """A gloo group of this one process: all_reduce sums this rank's values alone."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_under_torchrun_only_rank_0s_clock_decides(monkeypatch, one_process_group):
    """Each rank adds its flags to one all_reduce: a rank but 0 brings its stop request, never its clock."""
    first_epoch = Progress(epoch=0, step=4)
    set_clock(monkeypatch, [0, 61])  # a minute after the start: rank 0's clock would save everything
    assert schedule(rank=1, world_size=2).agree(first_epoch, stop_requested=False) == (False, CHECKPOINT_ONLY)
    set_clock(monkeypatch, [0, 61])
    assert schedule(rank=1, world_size=2).agree(first_epoch, stop_requested=True) == (True, EVERYTHING)
    set_clock(monkeypatch, [0, 61])
    assert schedule(rank=0, world_size=2).agree(first_epoch, stop_requested=False) == (False, EVERYTHING)
