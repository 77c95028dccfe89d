"""A run's length and what it leaves to go back to: --kimg in whole steps (ending inside an epoch,
resumed exactly), --snapshot-every/--keep-snapshots, the one progress bar of the whole run, the
closing line, and real_samples.png drawn at random from --seed.

One --kimg run with snapshots (`kimg_run`) is shared by the tests that read it; they write elsewhere.
"""

import contextlib
import io
import json
import re

import numpy as np
import pytest
import torch
from conftest import TINY_ARGS, png_pixels, read_metrics_log, ready_for_main_in_process
from conftest import snapshot as folder_files
from PIL import Image

import export
import gan
import options
import runlength
from checkpoint import Progress
from runlength import RunLength, kimg_steps

KIMG_6 = ["--kimg", "0.044"]  # 44 images at 8 a step: 5.5 steps, rounded up to 6; TINY_ARGS' epochs are 4 steps
SNAPSHOTS = ["--snapshot-every", "2", "--keep-snapshots", "2"]
BAR_START = re.compile(r"(epoch \d+/\d+): +\d+%\|[^|]*\| (\d+)/(\d+) steps")


def main_in_process(argv):
    """gan.main(argv) as conftest's gan_main calls it, for a run that a module's tests share."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        ready_for_main_in_process(patch)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = gan.main([str(word) for word in argv])
    return code, out.getvalue(), err.getvalue()


def folders(root):
    return ["--checkpoint-dir", root / "checkpoints", "--image-dir", root / "images"]


def bar_start(err):
    """(description, steps done, steps in all) of the first progress bar drawn on stderr."""
    first = BAR_START.search(err)
    return first[1], int(first[2]), int(first[3])


def summaries(out):
    return re.findall(r"^\[(\d+/\d+)\] Loss_D", out, re.M)


def load(path):
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def kimg_run(tmp_path_factory):
    """A --kimg run of 6 steps (into the second epoch) with a snapshot every 2 steps, the 2 newest kept."""
    root = tmp_path_factory.mktemp("kimg_run")
    code, out, err = main_in_process([*TINY_ARGS, *KIMG_6, *SNAPSHOTS, *folders(root)])
    assert code == 0, err
    return root, out, err


# ---------------------------------------------------------------- --kimg in steps


@pytest.mark.parametrize(
    "kimg, batch_size, world_size, steps",
    [
        (0.048, 8, 1, 6),  # 48 images: 6 whole steps
        (0.044, 8, 1, 6),  # 44 images: 5.5 steps, rounded up
        (0.3, 64, 1, 5),  # 300 / 64 = 4.69
        (16.1, 100, 1, 161),  # the float 16.1 * 1000 is 16100.000000000002: 162 steps if read as a float
        (16.1, 50, 1, 322),
        (0.064, 8, 2, 4),  # two processes take 16 images a step
        (0.064, 8, 3, 3),  # 24 a step: 2.67
        (1, 128, 8, 1),  # 1,000 images, 1,024 a step: one step, never none
        (25_000, 128, 1, 195_313),
    ],
)
def test_kimg_gives_whole_steps_of_the_global_batch(kimg, batch_size, world_size, steps):
    opts, _ = options.parse_flags(["--kimg", str(kimg), "--batch-size", str(batch_size)])
    assert kimg_steps(opts.kimg, opts.batch_size, world_size) == steps
    length = RunLength.of(opts, steps_per_epoch=7, world_size=world_size, progress=Progress())
    assert length.total_steps == steps
    assert length.last_epoch == -(-steps // 7)


@pytest.mark.parametrize(
    "before, after, change",
    [
        (0.1234567, 0.1234568, "--kimg 0.1234567 -> 0.1234568"),  # 6 digits would call them the same
        (1234567, 25000, "--kimg 1234567 -> 25000"),  # neither 1.23457e+06 nor 25000.0
        (0.05, 0.05, None),
    ],
)
def test_kimg_is_written_and_compared_as_typed(before, after, change):
    typed = [options.parse_flags(["--kimg", str(kimg)])[0].as_dict() for kimg in (before, after)]
    assert runlength.length_change(*typed) == change
    assert runlength.length_text(typed[0]) == f"--kimg {before}"


def test_epochs_give_their_steps_and_end_at_an_epoch_end():
    opts, _ = options.parse_flags(["--epochs", "3"])
    length = RunLength.of(opts, steps_per_epoch=4, world_size=2, progress=Progress())
    assert (length.total_steps, length.last_epoch, length.images_per_step) == (12, 3, 256)
    assert not length.done(Progress(epoch=2, batch=3, step=11)) and length.done(Progress(epoch=3, step=12))
    assert not length.ends_inside_epoch(Progress(epoch=2, batch=3, step=12))


def test_a_kimg_run_ends_at_its_step_inside_an_epoch(kimg_run):
    root, out, err = kimg_run
    state = load(root / "checkpoints" / "checkpoint.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (1, 2, 6)  # 2 batches into the second epoch
    assert state["flags"]["kimg"] == 0.044
    assert [row["step"] for row in read_metrics_log(root / "checkpoints" / "metrics.jsonl")] == [2, 4, 6]
    assert "4 steps per epoch (logged every 2), --kimg 0.044: 6 steps of 8 images, seed 1" in out
    assert summaries(out) == ["1/2", "2/2"]  # the second epoch's summary at the run's end
    names = sorted(path.name for path in (root / "images").iterdir())
    assert names == [
        "epoch_001.png",
        "epoch_002.png",
        "losses.png",
        "progress.gif",
        "real_samples.png",
        "real_vs_fake.png",
    ]
    assert bar_start(err) == ("epoch 1/2", 0, 6)
    assert out.splitlines()[-1] == (
        f"finished at step 6: pictures in {root / 'images'}/, the checkpoint {root / 'checkpoints' / 'checkpoint.pt'}, "
        f"2 snapshots in {root / 'checkpoints' / 'snapshots'}/. Draw from it: python gan.py --generate 64 "
        f"--checkpoint-dir {root / 'checkpoints'} --image-dir {root / 'images'}"
    )


def test_a_kimg_run_resumes_exactly_to_its_total_and_trains_on_when_raised(
    kimg_run, gan_main, tiny_args, tmp_path, monkeypatch
):
    straight = load(kimg_run[0] / "checkpoints" / "checkpoint.pt")
    resume = ["--resume", "--device", "cpu", "--no-compile"]
    # stopped (as by Ctrl-C) after step 3; the resume goes on to the checkpoint's --kimg
    stop_at = [3]
    monkeypatch.setattr(gan, "stop_requested", lambda stop, step, *args: step in stop_at)
    code, out, err = gan_main([*tiny_args, *KIMG_6, "--checkpoint-dir", "stopped"])
    assert code == 130, err
    stop_at.clear()
    # a snapshot's write cut short by a kill -9 left its temp file: the next run in the folder removes it
    torn = tmp_path / "stopped" / "snapshots" / ".snapshot-0000002.pt.k9x2ab7q.tmp"
    torn.parent.mkdir()
    torn.write_bytes(b"half a snapshot")
    code, out, err = gan_main([*resume, "--checkpoint-dir", "stopped"])
    assert code == 0, err
    assert not torn.exists()
    assert bar_start(err) == ("epoch 1/2", 3, 6)
    # a shorter --kimg (3 steps, inside the first epoch), resumed with the longer one
    code, out, err = gan_main([*tiny_args, "--kimg", "0.024", "--checkpoint-dir", "raised", "--image-dir", "raised_i"])
    assert code == 0, err
    assert load("raised/checkpoint.pt")["step"] == 3 and summaries(out) == ["1/1"]
    code, out, err = gan_main([*resume, "--kimg", "0.044", "--checkpoint-dir", "raised", "--image-dir", "raised_i"])
    assert code == 0, err
    assert "resume: changed --kimg 0.024 -> 0.044" in out
    for name in ("stopped", "raised"):
        resumed = load(f"{name}/checkpoint.pt")
        assert (resumed["epoch"], resumed["batch"], resumed["step"]) == (1, 2, 6)
        for key in ("netG", "netD", "netG_ema", "optG", "optD", "rng"):
            torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")
    code, out, err = gan_main([*resume, "--checkpoint-dir", "raised", "--image-dir", "raised_i"])
    assert code == 0, err
    assert "already trained 6 steps, and --kimg 0.044: 6 steps of 8 images; raise --kimg to train more" in out
    # --epochs typed gives the run a length in epochs again: to the end of the second
    code, out, err = gan_main([*resume, "--epochs", "2", "--checkpoint-dir", "raised", "--image-dir", "raised_i"])
    assert code == 0, err
    assert "resume: changed --kimg 0.044 -> --epochs 2" in out
    assert bar_start(err) == ("epoch 2/2", 6, 8)
    assert load("raised/checkpoint.pt")["step"] == 8 and load("raised/checkpoint.pt")["flags"]["kimg"] is None


def test_a_mid_epoch_resume_with_another_batch_size_carries_the_images_the_epoch_has_done(gan_main, tiny_args):
    """Stopped 2 batches of 8 into a 32-image epoch, resumed with --batch-size 4: 16 images done are
    4 batches of 4, so the epoch's 4 other batches finish it, at step 2 + 4."""
    code, _, err = gan_main([*tiny_args, "--kimg", "0.016"])
    assert code == 0, err
    saved = torch.load("checkpoints/checkpoint.pt", weights_only=True)
    assert (saved["epoch"], saved["batch"], saved["step"]) == (0, 2, 2)
    code, _, err = gan_main(["--resume", "--batch-size", "4", "--epochs", "1"])
    assert code == 0, err
    saved = torch.load("checkpoints/checkpoint.pt", weights_only=True)
    assert (saved["epoch"], saved["batch"], saved["step"]) == (1, 0, 6)


def test_the_bar_counts_the_whole_run_fresh_and_resumed(gan_main, tiny_args):
    code, out, err = gan_main([*tiny_args, "--epochs", "1"])
    assert code == 0, err
    assert bar_start(err) == ("epoch 1/1", 0, 4)
    code, out, err = gan_main(["--resume", "--epochs", "3", "--device", "cpu", "--no-compile"])
    assert code == 0, err
    assert bar_start(err) == ("epoch 2/3", 4, 12)
    drawn = BAR_START.findall(err)  # one bar for the run, never restarting at an epoch
    assert {total for _, _, total in drawn} == {"12"}
    done = [int(steps) for _, steps, _ in drawn]
    assert done == sorted(done) and done[-1] == 12
    assert re.search(r"epoch 3/3: 100%\|[^|]*\| 12/12 steps \[[^,]+, [\d,]+ img/s, Loss_D=", err)
    assert out.splitlines()[-1] == (
        "finished at step 12: pictures in images/, the checkpoint checkpoints/checkpoint.pt. "
        "Draw from it: python gan.py --generate 64"
    )
    # at half the batch size an epoch takes 8 steps: the 12 taken, then 8 to the end of epoch 4
    code, out, err = gan_main(["--resume", "--epochs", "4", "--batch-size", "4", "--device", "cpu", "--no-compile"])
    assert code == 0, err
    assert "8 steps per epoch (logged every 2), 20 steps in all" in out
    assert bar_start(err) == ("epoch 4/4", 12, 20) and re.search(r"\| 20/20 steps", err)
    assert out.splitlines()[-1].startswith("finished at step 20:")


# ---------------------------------------------------------------- snapshots


def test_snapshots_keep_the_newest_and_hold_the_generator_alone(kimg_run):
    root = kimg_run[0]
    folder = root / "checkpoints" / "snapshots"
    assert sorted(path.name for path in folder.iterdir()) == ["snapshot-0000004.pt", "snapshot-0000006.pt"]
    latest, four = load(folder / "snapshot-0000006.pt"), load(folder / "snapshot-0000004.pt")
    assert (four["step"], four["epoch"], four["batch"]) == (4, 0, 4)  # taken before the epoch's end
    no_discriminator_optimizers_or_rng = {"format", "netG", "netG_ema", "netG_ema_own_statistics", "flags", "seed"}
    assert set(latest) == no_discriminator_optimizers_or_rng | {"epoch", "batch", "step"}
    checkpoint = load(root / "checkpoints" / "checkpoint.pt")
    # the step's EMA weights; its BatchNorm statistics are the trained G's (estimated on loading),
    # where the run's end estimated the checkpoint's own
    assert latest["netG_ema_own_statistics"] is False and checkpoint["netG_ema_own_statistics"] is True
    for name, value in checkpoint["netG_ema"].items():
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(latest["netG_ema"][name], value), name
    assert torch.equal(latest["netG"]["main.0.weight"], checkpoint["netG_ema"]["main.0.weight"])


class ChannelMeans(torch.nn.Module):
    """A stand-in for Inception: uint8 images -> their channel means."""

    num_features = 3

    def forward(self, images_uint8):
        return images_uint8.float().mean(dim=(2, 3))


def test_a_snapshot_draws_what_the_checkpoint_of_its_step_draws(kimg_run, gan_main, tmp_path, monkeypatch):
    checkpoints = kimg_run[0] / "checkpoints"
    four = checkpoints / "snapshots" / "snapshot-0000004.pt"
    before = folder_files(kimg_run[0])
    drawn = {}
    for name, source in (("snapshot", ["--checkpoint", checkpoints / "snapshots" / "snapshot-0000006.pt"]),
                         ("checkpoint", ["--checkpoint-dir", checkpoints])):  # fmt: skip
        code, out, err = gan_main(["--generate", "5", "--seed", "3", "--device", "cpu", *source, "--image-dir", name])
        assert code == 0, err
        drawn[name] = folder_files(tmp_path / name)
    # 5 PNGs and grid.png, byte for byte
    assert len(drawn["snapshot"]) == 6 and drawn["snapshot"] == drawn["checkpoint"]
    G = gan.load_generator(checkpoints / "snapshots" / "snapshot-0000006.pt", device="cpu")  # the Python API
    assert torch.equal(G.sample(5, seed=3)[4].int(), png_pixels(tmp_path / "snapshot" / "generated" / "0004.png"))
    code, out, err = gan_main(["--interpolate", "--steps", "3", "--checkpoint", four, "--device", "cpu"])
    assert code == 0 and "using the EMA generator of " in out and "(a snapshot at step 4)" in out, err
    evaluate = ["--evaluate", "--eval-samples", "16", "--checkpoint", four, "--checkpoint-dir", "scores"]
    code, out, err = gan_main([*evaluate, "--device", "cpu"], ChannelMeans())
    assert code == 0 and "FID " in out, err
    # the graphs take seconds to build and check (tests/test_export.py); the weights, config and card are written
    monkeypatch.setattr(export, "write_onnx", lambda *args: 0.0)
    monkeypatch.setattr(export, "write_pt2", lambda *args: 0.0)
    code, out, err = gan_main(["--export", "exported", "--checkpoint", four, "--device", "cpu"])
    assert code == 0, err
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert (config["step"], config["generator"]) == (4, "ema")
    assert folder_files(kimg_run[0]) == before


def test_a_snapshot_is_no_point_to_resume_from(kimg_run, gan_main, tmp_path):
    path = kimg_run[0] / "checkpoints" / "snapshots" / "snapshot-0000006.pt"
    before = folder_files(kimg_run[0])
    code, out, err = gan_main(["--resume", path])
    assert code == 2
    assert err == (
        f"gan.py: error: {path} is a snapshot (the generator alone, at step 6), not a point to resume from: "
        f"resume the run's checkpoint.pt, or draw from this step with --generate --checkpoint {path}\n"
    )
    code, out, err = gan_main(["--generate", "2", "--raw", "--checkpoint", path])
    assert code == 2 and "is a snapshot of the moving average (EMA) alone" in err
    assert folder_files(kimg_run[0]) == before and list(tmp_path.iterdir()) == []


def test_a_fresh_run_leaves_an_earlier_runs_snapshots_alone(kimg_run, gan_main, tiny_args, tmp_path):
    (tmp_path / "checkpoints" / "snapshots").mkdir(parents=True)
    kept = tmp_path / "checkpoints" / "snapshots" / "snapshot-0000004.pt"
    kept.write_bytes((kimg_run[0] / "checkpoints" / "snapshots" / "snapshot-0000004.pt").read_bytes())
    code, out, err = gan_main([*tiny_args, "--epochs", "1", *SNAPSHOTS])
    assert code == 2
    assert "checkpoints holds an earlier run's files (snapshots/)" in err
    assert [path.name for path in tmp_path.rglob("*")] == ["checkpoints", "snapshots", "snapshot-0000004.pt"]


# ---------------------------------------------------------------- refused


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--kimg", "0"], "argument --kimg: must be a positive number, got 0"),
        (["--kimg", "nan"], "argument --kimg: must be a positive number, got nan"),
        (["--kimg", "inf"], "argument --kimg: must be a positive number, got inf"),
        (["--kimg", "1", "--epochs", "2"], "--kimg and --epochs both say how long to train: give one of them"),
        (["--snapshot-every", "-2"], "argument --snapshot-every: must be zero or more, got -2"),
        (["--snapshot-every", "2", "--keep-snapshots", "0"], "argument --keep-snapshots: must be a positive integer"),
        (
            ["--keep-snapshots", "2"],
            "--keep-snapshots K applies with --snapshot-every STEPS (the run keeps no snapshots)",
        ),
        (["--snapshot-every", "2", "--generate", "4"], "--snapshot-every is read by training only, not by --generate"),
        (["--kimg", "2", "--interpolate"], "--kimg is read by training only, not by --interpolate"),
    ],
)
def test_bad_length_and_snapshot_flags_are_refused(flags, message, gan_main, tiny_args, tmp_path):
    training = "--generate" not in flags and "--interpolate" not in flags
    code, out, err = gan_main([*(tiny_args if training else []), *flags])
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_resuming_with_keep_snapshots_needs_snapshots_in_the_run(gan_main, tiny_args, tmp_path):
    code, out, err = gan_main([*tiny_args, "--epochs", "1"])
    assert code == 0, err
    before = folder_files(tmp_path)
    code, out, err = gan_main(["--resume", "--epochs", "2", "--keep-snapshots", "3"])
    assert code == 2 and "--keep-snapshots K applies with --snapshot-every STEPS" in err
    assert folder_files(tmp_path) == before


# ---------------------------------------------------------------- real_samples.png


def colour(index):
    return (index * 3, (index * 7 + 50) % 256, (200 - index * 2) % 256)


def test_real_samples_are_a_seeded_draw_from_every_class(gan_main, tiny_args, tmp_path):
    # 70 images of class a, then 10 of b: the first 64 by name are all a's
    for index in range(80):
        folder = tmp_path / "data" / ("a" if index < 70 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.broadcast_to(np.array(colour(index), dtype=np.uint8), (16, 16, 3))
        Image.fromarray(np.ascontiguousarray(pixels)).save(folder / f"img_{index:02d}.png")
    args = [word for word in tiny_args if word not in ("--subset", "32")]
    run_folders = ["--checkpoint-dir", "run", "--image-dir", "run_images"]
    code, out, err = gan_main([*args, "--dataset", "folder", "--dataroot", "data", "--kimg", "0.008", *run_folders])
    assert code == 0, err
    order = torch.randperm(80, generator=torch.Generator().manual_seed(1))[:64].tolist()  # --seed 1
    assert order != list(range(64)) and max(order) >= 70
    grid = np.asarray(Image.open(tmp_path / "run_images" / "real_samples.png").convert("RGB")).astype(int)
    for place, index in enumerate(order):
        row, col = divmod(place, 8)
        cell = grid[2 + row * 18 : 2 + row * 18 + 16, 2 + col * 18 : 2 + col * 18 + 16]
        assert np.abs(cell - np.array(colour(index))).max() <= 1, f"place {place}: image {index}"
    # one step (--kimg 0.008: 8 images), and the closing line keeps the folders typed
    assert load(tmp_path / "run" / "checkpoint.pt")["step"] == 1
    assert out.splitlines()[-1] == (
        "finished at step 1: pictures in run_images/, the checkpoint run/checkpoint.pt. "
        "Draw from it: python gan.py --generate 64 --checkpoint-dir run --image-dir run_images"
    )


def test_the_bar_shows_images_a_second(monkeypatch):
    length = RunLength(steps_per_epoch=4, total_steps=8, last_epoch=2, images_per_step=24, epochs=2)
    bar = runlength.RunProgressBar(length, Progress(epoch=1, step=4), disable=False, file=io.StringIO())
    try:
        monkeypatch.setattr(bar, "_ema_dn", lambda: 5)  # tqdm's smoothed rate: 5 steps in 2 seconds
        monkeypatch.setattr(bar, "_ema_dt", lambda: 2)
        assert (bar.n, bar.total, bar.format_dict["images_per_s"]) == (4, 8, "60")  # 2.5 steps/s x 24 images
        assert re.fullmatch(r"epoch 2/2:  50%\|[^|]*\| 4/8 steps \[00:0\d<00:01, 60 img/s\]", str(bar))
    finally:
        bar.close()


def test_a_kimg_run_that_ends_on_an_epoch_s_last_step_saves_the_next_epoch_s_start(gan_main, tiny_args, tmp_path):
    """--kimg 0.064 is 8 steps: exactly 2 epochs of 4. The checkpoint stands at epoch 2's end (epoch
    2, batch 0), as a run of --epochs 2 leaves it, and a raise to 0.096 trains the third epoch once."""
    code, out, err = gan_main([*tiny_args, "--kimg", "0.064"])
    assert code == 0, err
    state = load(tmp_path / "checkpoints" / "checkpoint.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (2, 0, 8)
    code, out, err = gan_main(["--resume", "--kimg", "0.096"])
    assert code == 0, err
    assert summaries(out) == ["3/3"] and "no steps left" not in out
    state = load(tmp_path / "checkpoints" / "checkpoint.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (3, 0, 12)
