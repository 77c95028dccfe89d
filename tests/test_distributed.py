"""Scale out with torchrun: two real gloo processes on the CPU.

Each run starts tests/ddp_worker.py, which runs gan.py's CLI and then saves its rank's
parameters and a fingerprint of the batches it trained on, so the ranks can be compared.
"""

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import GAN_PY, TINY_ARGS, subprocess_env
from ddp_worker import fingerprints

import errors
import options
import runtime
import startup
import utils
from checkpoint import Progress
from runtime import Runtime, choose_precision

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"
TIMEOUT_WORKER = Path(__file__).resolve().parent / "timeout_worker.py"
STEPS_PER_EPOCH = 2  # TINY_ARGS: 32 images, batches of 8, split over 2 ranks
TIMEOUT_S = 300  # a hung job fails the test instead of the whole suite
# ddp_run's three two-process jobs took 1 to 2 minutes on a busy 2-core machine, counted in the time
# of whichever of its tests runs first (the Ctrl-C test adds 40 to 77 s of its own jobs)
WITH_DDP_RUN = pytest.mark.timeout(240)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(args, cwd, processes=2, script=WORKER, **env):
    """gan.py's CLI (through the worker, or gan.py itself) in that many processes; the CompletedProcess."""
    script_args = [str(WORKER), str(cwd)] if script == WORKER else [str(script)]
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", *script_args, *map(str, args),
    ]  # fmt: skip
    return subprocess.run(
        command, cwd=cwd, env=subprocess_env(**env), capture_output=True, text=True, timeout=TIMEOUT_S
    )


def check_ok(result):
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-5000:]}"
    )
    return result


def rank_state(folder, rank):
    return torch.load(Path(folder) / f"rank{rank}.pt", weights_only=True)


def metric_steps(folder):
    rows = [json.loads(line) for line in (Path(folder) / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if "loss_d" in row]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """A 1-epoch two-process run, then its resume to 2 epochs; the outputs of both. With --ada and
    --mirror, whose state each rank keeps: the checkpoint falls inside ADA's interval of 4 steps."""
    folder = tmp_path_factory.mktemp("ddp_run")
    # without --seed: each rank would draw its own random seed unless rank 0's reaches them all
    unseeded = [arg for arg in TINY_ARGS if arg not in ("--seed", TINY_ARGS[TINY_ARGS.index("--seed") + 1])]
    unseeded += ["--ada", "--mirror"]
    first = check_ok(torchrun([*unseeded, "--epochs", "1", "--ema", "0.9"], folder))
    first_states = [rank_state(folder, rank) for rank in (0, 1)]
    first_metric_steps = metric_steps(folder)
    first_files = sorted(p.name for p in (folder / "images").iterdir())
    checkpoint_after_first = torch.load(folder / "checkpoints" / "checkpoint.pt", weights_only=True)
    shutil.copytree(folder / "checkpoints", folder / "after_first")
    resumed = check_ok(torch_resume(folder))
    # the same 2 epochs in one go, for the exact-resume tests
    straight = tmp_path_factory.mktemp("ddp_straight")
    straight_args = [*unseeded, "--seed", checkpoint_after_first["seed"], "--epochs", "2", "--ema", "0.9"]
    check_ok(torchrun(straight_args, straight))
    return {
        "straight_args": straight_args,
        "straight_checkpoint": torch.load(straight / "checkpoints" / "checkpoint.pt", weights_only=True),
        "straight_log": (straight / "checkpoints" / "metrics.jsonl").read_text(),
        "folder": folder,
        "first": first,
        "first_states": first_states,
        "first_metric_steps": first_metric_steps,
        "first_files": first_files,
        "first_checkpoint": checkpoint_after_first,
        "resumed": resumed,
        "resumed_states": [rank_state(folder, rank) for rank in (0, 1)],
    }


def torch_resume(folder):
    # with FID after the epoch: rank 0 alone scores while the other rank waits at the epoch's barrier
    flags = ["--resume", "--epochs", "2", "--fid-every", "1", "--eval-samples", "16"]
    return torchrun(flags, folder, DDP_WORKER_STAND_IN_FEATURES="1")


def assert_same_parameters(states, what):
    rank0, rank1 = states
    names = rank0[f"{what}_params"] if what != "G_ema" else rank0["G_params"]
    assert names
    for name in names:
        torch.testing.assert_close(rank0[what][name], rank1[what][name], rtol=0, atol=0, msg=f"{what}.{name}")


@WITH_DDP_RUN
def test_without_seed_every_rank_trains_on_rank_zeros_random_seed(ddp_run):
    seeds = re.findall(r"seed (\d+)$", ddp_run["first"].stdout, re.M)
    assert len(seeds) == 1  # printed once, by rank 0
    assert ddp_run["first_checkpoint"]["seed"] == int(seeds[0])
    # one seed on both ranks: one permutation, split into disjoint shards (test_each_rank_trains_on_its_own_shard)


@WITH_DDP_RUN
def test_rank_zero_alone_writes_the_outputs(ddp_run):
    stdout, stderr = ddp_run["first"].stdout, ddp_run["first"].stderr
    cpu = torch.device("cpu")
    precision = Runtime(cpu, choose_precision("auto", cpu)).precision_name  # bf16 where the CPU has it
    assert stdout.count(f"training on cpu ({precision}, 2 processes)") == 1
    summaries = [line for line in stdout.splitlines() if line.startswith("[1/1] Loss_D")]
    assert len(summaries) == 1
    assert stderr.count("epoch 1/1:   0%") == 1, "one progress bar, rank 0's"
    assert ddp_run["first_files"] == [
        "epoch_001.png",
        "losses.png",
        "progress.gif",
        "real_samples.png",
        "real_vs_fake.png",
    ]
    # the metrics log has each logged step once, not once per rank
    assert ddp_run["first_metric_steps"] == [2]
    assert ddp_run["first_checkpoint"]["epoch"] == 1 and ddp_run["first_checkpoint"]["step"] == STEPS_PER_EPOCH


@WITH_DDP_RUN
@pytest.mark.parametrize("what", ["G", "D", "G_ema"])
def test_both_ranks_end_with_the_same_weights(ddp_run, what):
    assert_same_parameters(ddp_run["first_states"], what)
    assert_same_parameters(ddp_run["resumed_states"], what)


@WITH_DDP_RUN
def test_rank_zero_saves_the_weights_it_trained(ddp_run):
    rank0 = ddp_run["first_states"][0]
    saved = ddp_run["first_checkpoint"]
    for name in rank0["G_params"]:
        torch.testing.assert_close(saved["netG"][name], rank0["G"][name], rtol=0, atol=0)
        torch.testing.assert_close(saved["netG_ema"][name], rank0["G_ema"][name], rtol=0, atol=0)


@WITH_DDP_RUN
def test_each_rank_trains_on_its_own_shard(ddp_run):
    for states in (ddp_run["first_states"], ddp_run["resumed_states"]):
        batches = [state["batches"] for state in states]
        assert [len(b) for b in batches] == [STEPS_PER_EPOCH, STEPS_PER_EPOCH]
        assert all(len(batch) == 8 for rank in batches for batch in rank)
        images = [{value for batch in rank for value in batch} for rank in batches]
        assert len(images[0]) == len(images[1]) == 16, "no image twice within a rank"
        assert not images[0] & images[1], "the ranks' shards are disjoint"


@WITH_DDP_RUN
def test_resume_under_torchrun_continues_from_the_checkpoint(ddp_run):
    stdout = ddp_run["resumed"].stdout
    assert stdout.count("resuming checkpoints/checkpoint.pt: 1 epoch done, step 2") == 1
    assert [line[:5] for line in stdout.splitlines() if line.startswith("[")] == ["[2/2]"]
    state = torch.load(ddp_run["folder"] / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 2 * STEPS_PER_EPOCH
    assert metric_steps(ddp_run["folder"]) == [2, 4]
    assert (ddp_run["folder"] / "images" / "epoch_002.png").is_file()
    # training went on from the saved weights: the second epoch moved them
    first_G = ddp_run["first_states"][0]["G"]
    resumed_G = ddp_run["resumed_states"][0]["G"]
    assert any(not torch.equal(first_G[name], resumed_G[name]) for name in ddp_run["first_states"][0]["G_params"])
    # and the second epoch drew a new permutation of the images
    first_images = {v for rank in ddp_run["first_states"] for batch in rank["batches"] for v in batch}
    second_images = {v for rank in ddp_run["resumed_states"] for batch in rank["batches"] for v in batch}
    assert first_images == second_images, "the same 32 images"
    first_order = [batch for rank in ddp_run["first_states"] for batch in rank["batches"]]
    second_order = [batch for rank in ddp_run["resumed_states"] for batch in rank["batches"]]
    assert first_order != second_order


EXACT_KEYS = ("netG", "netD", "netG_ema", "optG", "optD", "fixed_noise", "rng", "augment", "epoch", "batch", "step")


def assert_same_checkpoint(resumed, straight):
    for key in EXACT_KEYS:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")


@WITH_DDP_RUN
def test_under_torchrun_every_rank_holds_the_sums_of_all_ranks_and_the_same_p(ddp_run):
    """--ada: each step's signs are all-reduced, so the checkpoint (rank 0's) holds the interval's
    sums over both ranks' images: 2 steps of 8 images on each of 2 ranks."""
    saved = ddp_run["first_checkpoint"]["augment"]
    assert saved["steps"] == 2 and saved["signs"][1].item() == 2 * 8 * 2 and saved["p"].item() == 0.0
    for states in (ddp_run["first_states"], ddp_run["resumed_states"]):
        rank0, rank1 = (state["augment"] for state in states)
        torch.testing.assert_close(rank0, rank1, rtol=0, atol=0)
    torch.testing.assert_close(ddp_run["first_states"][0]["augment"], saved, rtol=0, atol=0)
    assert ddp_run["resumed_states"][0]["augment"]["steps"] == 0  # step 4 ended the interval: p moved or held


@WITH_DDP_RUN
def test_one_epoch_and_a_resume_under_torchrun_equal_two_epochs_in_one_go(ddp_run):
    resumed = torch.load(ddp_run["folder"] / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert len(resumed["rng"]["ranks"]) == 2 and resumed["world_size"] == 2
    assert_same_checkpoint(resumed, ddp_run["straight_checkpoint"])
    # the resume also scored FID (its own RNG streams: the weights are untouched); the losses agree
    resumed_log = (ddp_run["folder"] / "checkpoints" / "metrics.jsonl").read_text().splitlines()
    assert [line for line in resumed_log if '"fid"' not in line] == ddp_run["straight_log"].splitlines()


@WITH_DDP_RUN
def test_a_ctrl_c_on_one_rank_stops_both_at_one_step_and_resumes_exactly(ddp_run, tmp_path):
    # the Ctrl-C reaches rank 1 alone after its first step; the ranks agree at the logging point, step 2
    interrupted = torchrun(ddp_run["straight_args"], tmp_path, DDP_WORKER_SIGINT="1:1")
    assert interrupted.returncode != 0  # torchrun reports a worker's 130 as a failure
    # rank 1's; rank 0 may be stopped by torchrun once rank 1 has ended (but not before it saved)
    assert "130" in re.findall(r"exitcode\s*:\s*(-?\d+)", interrupted.stderr)
    resume_lines = [line for line in interrupted.stderr.splitlines() if "Resume with:" in line]
    assert resume_lines == [
        f"SIGINT: stopped at epoch 1, step {STEPS_PER_EPOCH}; saved {Path('checkpoints') / 'checkpoint.pt'}. "
        "Resume with: torchrun --nproc_per_node=2 gan.py --resume --checkpoint-dir checkpoints"
    ]
    assert "FutureWarning" not in interrupted.stderr
    stopped = torch.load(tmp_path / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert (stopped["epoch"], stopped["batch"], stopped["step"]) == (0, STEPS_PER_EPOCH, STEPS_PER_EPOCH)
    check_ok(torchrun(["--resume"], tmp_path))
    resumed = torch.load(tmp_path / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert_same_checkpoint(resumed, ddp_run["straight_checkpoint"])


@pytest.mark.timeout(120)
def test_conditional_training_under_torchrun_keeps_each_image_with_its_label(tmp_path):
    flags = [*TINY_ARGS, "--conditional", "--epochs", "1"]
    check_ok(torchrun(flags, tmp_path))
    # every image's label, as one process trains on them (fake data: image k is class k % 10)
    truth = one_process_labels(flags)
    assert sorted(truth.values()) == sorted(k % 10 for k in range(32))
    ranks = [labelled_images(rank_state(tmp_path, rank)) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 16 and not ranks[0].keys() & ranks[1].keys()
    assert {**ranks[0], **ranks[1]} == truth
    states = [rank_state(tmp_path, rank) for rank in (0, 1)]
    assert "embed.weight" in states[0]["G_params"] and "embed.weight" in states[0]["D_params"]
    for what in ("G", "D", "G_ema"):
        assert_same_parameters(states, what)
    assert torch.load(tmp_path / "checkpoints" / "checkpoint.pt")["class_names"] == [str(k) for k in range(10)]


def one_process_labels(flags):
    """{image fingerprint: its label} over the batches of a one-process run's first epoch, drawn
    in-process through the program's own data path, and fingerprinted as ddp_worker.py does."""
    opts, _ = options.parse_flags(flags)
    _, batches = utils.load_batches(opts, runtime.setup_runtime(opts))
    return {
        image: label
        for real, labels in batches.labelled_epoch(0)
        for image, label in zip(fingerprints(real), labels.tolist(), strict=True)
    }


def labelled_images(state):
    """{image fingerprint: its label} over every batch a rank trained on."""
    return {
        image: label
        for images, labels in zip(state["batches"], state["labels"], strict=True)
        for image, label in zip(images, labels, strict=True)
    }


@WITH_DDP_RUN
def test_a_two_process_checkpoint_resumed_in_one_process_says_so(ddp_run, gan_main, tmp_path):
    shutil.copytree(ddp_run["folder"] / "after_first", tmp_path / "checkpoints")
    code, out, err = gan_main(["--resume", "--epochs", "2", "--device", "cpu"])
    assert code == 0, err
    assert "resume: changed processes 2 -> 1 (global batch 16 -> 8; the noise each process draws starts afresh)" in out
    state = torch.load(tmp_path / "checkpoints" / "checkpoint.pt", weights_only=True)
    # epoch 2 in batches of 8: 4 steps after the 2 of epoch 1
    assert (state["epoch"], state["batch"], state["step"], state["world_size"]) == (2, 0, STEPS_PER_EPOCH + 4, 1)


@WITH_DDP_RUN
def test_a_two_process_checkpoint_resumed_by_three_processes_gives_each_its_own_fresh_noise(ddp_run, tmp_path):
    """torchrun with more processes than saved RNG states: the resume says so, goes on from the saved
    epoch and step in steps of 3 x 8 images (one disjoint batch per rank), and every rank draws its
    noise from the fresh seed mixed_seed(seed, step, rank); the checkpoint then holds 3 RNG states."""
    shutil.copytree(ddp_run["folder"] / "after_first", tmp_path / "checkpoints")
    result = check_ok(torchrun(["--resume", "--epochs", "2"], tmp_path, processes=3))
    changed = "resume: changed processes 2 -> 3 (global batch 16 -> 24; the noise each process draws starts afresh)"
    assert result.stdout.count(changed) == 1
    state = torch.load(tmp_path / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["batch"], state["step"], state["world_size"]) == (2, 0, STEPS_PER_EPOCH + 1, 3)
    assert len(state["rng"]["ranks"]) == 3
    ranks = [rank_state(tmp_path, rank) for rank in range(3)]
    images = [set(rank["batches"][0]) for rank in ranks]
    assert [len(rank["batches"]) for rank in ranks] == [1, 1, 1] and len(set.union(*images)) == 24
    seed = ddp_run["first_checkpoint"]["seed"]
    for rank, saved in enumerate(ranks):
        fresh = torch.Generator().manual_seed(runtime.mixed_seed(seed, STEPS_PER_EPOCH, rank)).get_state()
        assert torch.equal(saved["first_step_rng"], fresh), f"rank {rank}"


def test_a_mid_epoch_position_is_carried_over_to_another_number_of_processes():
    opts, _ = options.parse_flags(["--batch-size", "8"])
    saved = {"world_size": 2, "flags": {"batch_size": 8}}  # 3 batches of 16: 48 images into the epoch
    progress = Progress(epoch=1, batch=3, step=9)
    startup.carry_position(progress, saved, "ck.pt", opts, Runtime(torch.device("cpu"), world_size=1))
    assert (progress.epoch, progress.batch, progress.step) == (1, 6, 9)
    progress = Progress(epoch=1, batch=3, step=9)
    with pytest.raises(errors.UserError, match="48 images into epoch 2, which is no whole number of this run's "):
        startup.carry_position(progress, saved, "ck.pt", opts, Runtime(torch.device("cpu"), world_size=5))


def test_fewer_images_than_one_step_of_all_processes_is_refused(monkeypatch, tmp_path):
    """Rank 0 of 2 (no process group is needed to load the data but for its barrier)."""
    monkeypatch.setattr(utils, "barrier", lambda runtime: None)
    opts, _ = options.parse_flags([*TINY_ARGS, "--subset", "12", "--checkpoint-dir", str(tmp_path)])
    with pytest.raises(errors.UserError) as refused:
        utils.load_batches(opts, Runtime(torch.device("cpu"), rank=0, world_size=2))
    assert (
        str(refused.value) == "the dataset has 12 images, fewer than one step takes: --batch-size 8 x 2 processes = 16"
    )


@WITH_DDP_RUN
def test_fid_under_torchrun_is_scored_by_rank_zero_alone(ddp_run):
    """The metrics compute on rank 0 without collectives: gathering across ranks there would pair
    with the other rank's barrier and hang the job (NCCL's watchdog kills it after its timeout)."""
    rows = [json.loads(line) for line in (ddp_run["folder"] / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    scores = [row for row in rows if "fid" in row]
    assert [(row["epoch"], row["step"]) for row in scores] == [(2, 2 * STEPS_PER_EPOCH)]
    assert scores[0]["fid"] >= 0 and scores[0]["kid_std"] >= 0
    assert ddp_run["resumed"].stdout.count("FID ") == 1
    assert (ddp_run["folder"] / "checkpoints" / "best.pt").is_file()


@pytest.mark.timeout(120)
def test_a_rollback_without_a_shared_filesystem_takes_rank_zeros_checkpoint_on_every_rank(tmp_path):
    """Each rank in a folder of its own, as on two machines: the checkpoint of epoch 1 is on rank
    0's disk alone. Rank 1's losses turn NaN in epoch 2 (the logged means are every rank's); both
    ranks roll back to rank 0's checkpoint and train epoch 2 again to the same weights."""
    flags = [*TINY_ARGS, "--epochs", "2", "--on-nan", "rollback"]
    result = check_ok(torchrun(flags, tmp_path, DDP_WORKER_OWN_DISK="1", DDP_WORKER_NAN=f"1:{STEPS_PER_EPOCH + 1}"))
    assert result.stdout.count("rolled back to checkpoints/checkpoint.pt (epoch 1) with noise seed 1001") == 1
    assert not (tmp_path / "disk1" / "checkpoints" / "checkpoint.pt").exists()
    saved = torch.load(tmp_path / "disk0" / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert (saved["epoch"], saved["step"], saved["rollbacks"]) == (2, 2 * STEPS_PER_EPOCH, 1)
    states = [rank_state(tmp_path, rank) for rank in (0, 1)]
    for what in ("G", "D", "G_ema"):
        assert_same_parameters(states, what)


@pytest.mark.timeout(60)
def test_ranks_wait_for_the_data_longer_than_for_a_training_collective(tmp_path):
    """Rank 0 prepares the data for 2 s, longer than the 1 s the worker gives the training
    collectives: rank 1 waits for it at the data's barrier, and then gives up on a collective
    rank 0 comes 2 s late to, after the collectives' 1 s."""
    port = free_port()
    processes = [
        subprocess.Popen(
            [sys.executable, str(TIMEOUT_WORKER), str(tmp_path)],
            env=subprocess_env(
                RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [process.communicate(timeout=50)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
    assert (tmp_path / "rank1.txt").exists(), outputs
    lines = (tmp_path / "rank1.txt").read_text().splitlines()
    prepared, collective = (float(re.search(r"[0-9.]+ s", line).group()[:-2]) for line in lines)
    assert lines[0].startswith("prepared after") and 2 <= prepared < 5, outputs
    assert lines[1].startswith("collective timed out after") and 1 <= collective < 2, outputs


def test_an_error_on_one_rank_stops_the_whole_job(tmp_path):
    result = torchrun([*TINY_ARGS, "--epochs", "1"], tmp_path, DDP_WORKER_FAIL_RANK="1")
    assert result.returncode != 0
    assert "gan.py (rank 1): error: injected data failure on rank 1" in result.stderr
    assert not (tmp_path / "checkpoints" / "checkpoint.pt").exists()
    assert not list(tmp_path.glob("rank*.pt"))


def test_a_bad_flag_stops_every_rank_with_its_message(tmp_path):
    """`torchrun gan.py` itself: each rank answers the flag error before it imports torch. torchrun
    stops the other ranks as soon as one fails, so a rank may end by torchrun's SIGTERM: before it
    read its flags (no message of its own) or after printing its message, while it exits."""
    result = torchrun([*TINY_ARGS, "--image-size", "20"], tmp_path, script=GAN_PY)
    assert result.returncode != 0
    exit_codes = sorted(int(code) for code in re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", result.stderr, re.M))
    assert len(exit_codes) == 2 and 2 in exit_codes and set(exit_codes) <= {2, -signal.SIGTERM}, result.stderr
    message = "argument --image-size: must be a power of two from 16 to 256, or WIDTHxHEIGHT with each side one (64x32), got 20"
    # one line from each rank that exited 2, and at most one from each rank
    assert exit_codes.count(2) <= result.stderr.count(message) <= len(exit_codes)
    assert f'File "{GAN_PY}"' not in result.stderr  # torchrun's own traceback only, none from gan.py
    assert not list(tmp_path.iterdir())


def torchrun_of_two_on(monkeypatch, device):
    """gan.main as rank 0 of two processes on device, without a process group (the refusals come first)."""
    import gan

    monkeypatch.setattr(gan, "setup_runtime", lambda opts: Runtime(torch.device(device), rank=0, world_size=2))


@pytest.mark.parametrize(
    ("device", "flags", "message"),
    [
        ("cpu", ["--sync-bn"], "--sync-bn needs CUDA GPUs; it does not run on cpu"),
        (
            "cuda",
            ["--sync-bn", "--r1", "1"],
            "--r1 with --sync-bn: R1 differentiates D's gradient again, which SyncBatchNorm cannot; add "
            "--spectral-norm (a D without BatchNorm), drop --sync-bn, or use --r1 0",
        ),
    ],
)
def test_sync_bn_combinations_torchrun_cannot_train_are_refused_before_anything_is_written(
    monkeypatch, gan_main, tmp_path, device, flags, message
):
    torchrun_of_two_on(monkeypatch, device)
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1", *flags])
    assert (code, out, err) == (2, "", f"gan.py: error: {message}\n")
    assert list(tmp_path.iterdir()) == []


def test_r1_with_sync_bn_trains_with_a_d_without_batchnorm(monkeypatch):
    """--spectral-norm leaves D without BatchNorm: R1's double backward never meets SyncBatchNorm."""
    opts, explicit = options.parse_flags([*TINY_ARGS, "--sync-bn", "--r1", "1", "--spectral-norm"])
    two_gpus = Runtime(torch.device("cuda", 0), rank=0, world_size=2)
    startup.refuse_what_torchrun_cannot_train(opts, two_gpus)  # no error
    with pytest.raises(errors.UserError, match="--r1 with --sync-bn"):
        startup.refuse_what_torchrun_cannot_train(opts.replace(spectral_norm=False), two_gpus)
    # one process: --sync-bn has nothing to synchronise, and nothing is refused
    startup.refuse_what_torchrun_cannot_train(opts.replace(spectral_norm=False), Runtime(torch.device("cpu")))
