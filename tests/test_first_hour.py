"""What a new user meets first: --help with every default and examples, and numbers that move
within the first epoch of a small dataset (the logging interval of short epochs)."""

import argparse
import json
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import GAN_PY, TINY_ARGS, subprocess_env

import checkpoint
import gan
import options
import startup
from errors import UserError, count_text, size_text


def help_entries(text):
    """{option string: its help text on one line} from --help output."""
    entries, current = {}, None
    for line in text.splitlines():
        flag = re.match(r"  (-[-\w]+)", line)
        if flag:
            current = entries.setdefault(flag.group(1), [])
        elif not line.startswith("   "):
            current = None  # a group title, a blank line, the epilog
        if current is not None:
            current.append(line.strip())
    return {flag: " ".join(lines) for flag, lines in entries.items()}


def test_help_shows_every_default_and_examples():
    done = subprocess.run(
        [sys.executable, str(GAN_PY), "--help"], env=subprocess_env(COLUMNS="100"), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    entries = help_entries(done.stdout)
    shown = 0
    for action in options.build_parser()._actions:
        if not action.option_strings or action.default in (None, argparse.SUPPRESS) or action.default is False:
            continue  # no value to show: a switch that is off, or a flag whose help says it in words
        entry = entries[action.option_strings[0]]
        assert f"(default: {action.default})" in entry, entry
        shown += 1
    assert shown >= 25  # every flag that takes a value and has one by default
    assert "(default: None)" not in done.stdout and "(default: False)" not in done.stdout  # noise
    assert "[default: random" in entries["--seed"] and "[default: all]" in entries["--subset"]
    examples = done.stdout.split("examples:")[1]
    for wanted in (
        "CIFAR-10",
        # the README's small-folder command, and how its run goes on (a checkpoint never chooses folders)
        "--dataset folder --dataroot icons/ --recipe improved --mirror --image-size 32 --ngf 32 --ndf 32 "
        "--batch-size 64 --epochs 30",
        "--resume --dataroot icons/",
        "--generate",
        "torchrun --nproc_per_node",
    ):
        assert wanted in examples, wanted
    assert "--arch upsample " not in examples  # a superseded recipe: docs/recipes.md keeps it


def test_help_opens_with_the_flags_most_runs_need():
    text = options.build_parser().format_help()
    first_group = text.split("the flags most runs need:")[1].split("\n\n")[0]
    listed = re.findall(r"^  (--[-\w]+)", first_group, re.M)
    assert listed == ["--dataset", "--dataroot", "--epochs", "--kimg", "--batch-size", "--image-size", "--recipe"]
    assert text.index("the flags most runs need:") < text.index("\ntraining:") < text.index("\n  --arch ")


@pytest.mark.parametrize(
    "typed, meant",
    [("--ephocs", "--epochs"), ("--epoch", "--epochs"), ("--batchsize", "--batch-size"), ("--lrr", "--lr")],
)
def test_a_misspelt_flag_is_refused_with_the_flag_it_likely_meant(typed, meant):
    with pytest.raises(UserError) as refused:
        options.parse_flags([typed, "5"])
    assert str(refused.value) == f"unrecognized arguments: {typed} 5 (did you mean {meant}?)"


def test_a_flag_is_never_taken_from_its_first_letters():
    """argparse would read --epoch 5 as --epochs 5, and --gen 3 as --generate 3, without a word."""
    for argv in (["--epoch", "5"], ["--gen", "3"], ["--batch", "8"]):
        with pytest.raises(UserError, match="unrecognized arguments"):
            options.parse_flags(argv)
    with pytest.raises(UserError) as refused:
        options.parse_flags(["--zzz"])
    assert str(refused.value) == "unrecognized arguments: --zzz"  # nothing close: no guess


@pytest.mark.parametrize(
    "log_every, steps_per_epoch, expected",
    [
        (100, 4, 2),  # 4 steps: rows at steps 2 and 4, never one every step
        (100, 22, 7),  # a 1,432-image folder at batch 64: 4 rows per epoch (7, 14, 21, 22)
        (100, 1, 2),  # one step per epoch: its end-of-epoch row only
        (100, 390, 100),  # CIFAR-10 at batch 128 keeps the flag exactly
        (5, 64, 5),
        (1, 4, 1),  # asked for every step: every step
    ],
)
def test_log_every_steps(log_every, steps_per_epoch, expected):
    assert gan.log_every_steps(SimpleNamespace(log_every=log_every), steps_per_epoch) == expected


def logged_steps(folder):
    rows = [json.loads(line) for line in (folder / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    return [(row["epoch"], row["step"]) for row in rows]


def tiny_args_without_log_every():
    args = list(TINY_ARGS)
    del args[args.index("--log-every") : args.index("--log-every") + 2]
    return args


@pytest.mark.parametrize(
    "flags, start_line, rows",
    [
        # the default --log-every 100 on 4-step epochs: numbers within epoch 1, two rows per epoch
        (["--epochs", "2"], "4 steps per epoch (logged every 2)", [(1, 2), (1, 4), (2, 6), (2, 8)]),
        # an epoch of at least 3 intervals keeps --log-every as given
        (
            ["--epochs", "1", "--subset", "160", "--log-every", "5"],
            "20 steps per epoch (logged every 5)",
            [(1, 5), (1, 10), (1, 15), (1, 20)],
        ),
    ],
)
def test_short_epochs_log_within_the_first_epoch(gan_main, tmp_path, flags, start_line, rows):
    code, out, err = gan_main([*tiny_args_without_log_every(), *flags])
    assert code == 0, err
    assert start_line in out
    assert logged_steps(tmp_path) == rows
    saved = json.loads((tmp_path / "checkpoints" / "flags.json").read_text())["log_every"]
    assert saved == (5 if "--log-every" in flags else 100)  # the flag as typed is saved, not the interval


# ---------------------------------------------------------------- what the messages say


def test_counts_and_sizes_read_as_english():
    assert [count_text(n, "image") for n in (0, 1, 2, 20000)] == ["0 images", "1 image", "2 images", "20,000 images"]
    sizes = [0, 1, 192, 6144, 3 * 2**20 // 2, 3 * 2**30]
    assert [size_text(n) for n in sizes] == ["0 bytes", "1 byte", "192 bytes", "6.0 KiB", "1.5 MiB", "3.0 GiB"]


def test_one_image_one_step(gan_main, tiny_args):
    code, out, err = gan_main([*tiny_args, "--epochs", "1", "--subset", "1", "--batch-size", "1"])
    assert code == 0, err
    assert "1 image (held on cpu), 1 step per epoch" in out


def test_an_error_starts_its_own_line_after_the_progress_bar(monkeypatch, gan_main, tiny_args):
    def full_disk(*args):
        raise UserError("cannot write checkpoints/checkpoint.pt: No space left on device")

    monkeypatch.setattr(checkpoint, "write_run_files", full_disk)
    code, out, err = gan_main([*tiny_args, "--epochs", "1"])
    assert code == 2 and "epoch 1/1" in err  # the bar was drawn on stderr
    before = err[: err.index("gan.py: error: cannot write")]
    assert before.endswith(("\r", "\n")), repr(before[-80:])  # the terminal's cursor is back at the line's start


def test_an_epoch_resumed_after_its_last_batch_says_so_instead_of_zeros(gan_main, tiny_args, tmp_path):
    code, out, err = gan_main([*tiny_args, "--epochs", "1"])
    assert code == 0, err
    path = tmp_path / "checkpoints" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    torch.save({**state, "epoch": 0, "batch": 4}, path)  # what a Ctrl-C after the epoch's last step saves
    code, out, err = gan_main(["--resume", "--epochs", "1", "--device", "cpu", "--no-compile"])
    assert code == 0, err
    assert "[1/1] no steps left in this epoch (resumed after its last batch)" in out
    assert "0.0000" not in out


def test_the_resume_command_names_the_script_as_it_was_run(monkeypatch):
    opts, _ = options.parse_flags(["--checkpoint-dir", "runs/a", "--cache-dir", "/tmp/c"])
    monkeypatch.setattr(sys, "argv", ["../dcgan/gan.py", "--checkpoint-dir", "runs/a"])
    assert startup.resume_command(opts) == "python ../dcgan/gan.py --resume --checkpoint-dir runs/a --cache-dir /tmp/c"
    monkeypatch.setattr(sys, "argv", ["/usr/bin/pytest"])
    assert startup.resume_command(opts) == "python gan.py --resume --checkpoint-dir runs/a --cache-dir /tmp/c"


def test_the_row_after_a_resume_inside_an_interval_says_how_many_steps_it_averages(monkeypatch, gan_main, tiny_args):
    # logged every 2 steps; stopped (as by Ctrl-C) after step 3, inside the interval of steps 3-4
    stop_at = [3]
    monkeypatch.setattr(gan, "stop_requested", lambda stop, step, *args: step in stop_at)
    code, out, err = gan_main([*tiny_args, "--epochs", "2"])
    assert code == 130 and "saved checkpoints/checkpoint.pt" in err
    stop_at.clear()
    code, out, err = gan_main(["--resume", "--epochs", "2", "--device", "cpu", "--no-compile"])
    assert code == 0, err
    rows = [json.loads(line) for line in open("checkpoints/metrics.jsonl")]
    assert [(row["step"], row["steps"]) for row in rows] == [(2, 2), (4, 1), (6, 2), (8, 2)]


def test_one_epoch_reads_as_one(gan_main, tiny_args):
    code, out, err = gan_main([*tiny_args, "--epochs", "1"])
    assert code == 0, err
    code, out, err = gan_main(["--resume", "--epochs", "1", "--device", "cpu", "--no-compile"])
    assert code == 0, err
    assert "resuming checkpoints/checkpoint.pt: 1 epoch done, step 4" in out
    assert "already trained 1 epoch; raise --epochs to train more" in out
