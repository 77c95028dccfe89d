"""The epoch's files written off the training thread (outputs.py's writers): in order, from copies taken
first, errors raised on the training thread later, and a stopped run waits for them. The runs
here are on the CPU, which writes in line; as_on_an_accelerator gives them the writer thread that
CUDA and MPS runs get."""

import threading

import pytest
import torch
from conftest import TINY_ARGS

import checkpoint
import faults
import gan
import outputs
from outputs import BackgroundWriter, InlineWriter
from runtime import Runtime

STEPS_PER_EPOCH = 4  # TINY_ARGS: 32 images, batch 8


@pytest.fixture
def as_on_an_accelerator(monkeypatch):
    monkeypatch.setattr(outputs, "epoch_file_writer", lambda runtime: BackgroundWriter())


def test_jobs_run_in_order_on_their_own_thread_and_the_queue_is_bounded():
    release, done = threading.Event(), []

    def job(name, wait=False):
        return lambda: (release.wait() if wait else None, done.append((name, threading.current_thread().name)))

    writer = BackgroundWriter(pending_jobs=1)
    writer.submit(job("first", wait=True))
    try:
        writer.submit(job("second"))  # fills the queue while the first runs
        blocked = threading.Thread(target=writer.submit, args=(job("third"),), daemon=True)
        blocked.start()
        blocked.join(timeout=0.5)
        assert blocked.is_alive(), "a full queue makes the training wait"
    finally:
        release.set()  # a failed check must not leave the writer's thread in the first job for ever
    blocked.join()
    writer.close()
    assert done == [("first", "epoch-files"), ("second", "epoch-files"), ("third", "epoch-files")]


def test_a_failed_job_drops_the_later_ones_and_is_raised_at_the_next_hand_over():
    done = []
    writer = BackgroundWriter()
    writer.submit(lambda: 1 / 0)
    writer.submit(lambda: done.append("picture of a checkpoint that failed"))
    with pytest.raises(ZeroDivisionError):
        writer.wait()
    writer.submit(lambda: done.append("later"))
    writer.submit(lambda: 1 / 0)
    with pytest.warns(UserWarning, match="writing a file failed: division by zero"):
        writer.close(raise_errors=False)  # the training failed first: its error is the one raised
    assert done == ["later"]


def test_the_checkpoint_holds_the_state_it_was_handed_over_in(as_on_an_accelerator, monkeypatch, gan_main, tmp_path):
    """The step-2 checkpoint (--save-every 2) is written only after step 3 has changed every weight
    and Adam moment: what it holds must still be step 2's, taken as copies before the hand-over."""
    step_three_done, at_hand_over, written = threading.Event(), {}, {}
    real_train_step, real_state, real_write = gan.train_step, checkpoint.checkpoint_state, checkpoint.write_run_files

    def train_step(nets, *args, **kwargs):
        stats = real_train_step(nets, *args, **kwargs)
        if nets.opt_G.state_dict()["state"][0]["step"] == 3:
            step_three_done.set()
        return stats

    def checkpoint_state(nets, progress, *args, **kwargs):
        if progress.step == 2:
            at_hand_over["netG"] = {k: v.clone() for k, v in nets.G.state_dict().items()}
            at_hand_over["exp_avg"] = nets.opt_G.state_dict()["state"][0]["exp_avg"].clone()
        return real_state(nets, progress, *args, **kwargs)

    def write_run_files(state, folder):
        if state["step"] == 2:
            assert step_three_done.wait(timeout=60)
            written.update(state)
        real_write(state, folder)

    monkeypatch.setattr(gan, "train_step", train_step)
    monkeypatch.setattr(checkpoint, "checkpoint_state", checkpoint_state)
    monkeypatch.setattr(checkpoint, "write_run_files", write_run_files)
    code, _, err = gan_main([*TINY_ARGS, "--epochs", "1", "--save-every", "2"])
    assert code == 0, err
    for name, value in at_hand_over["netG"].items():
        torch.testing.assert_close(written["netG"][name], value, rtol=0, atol=0)
    torch.testing.assert_close(written["optG"]["state"][0]["exp_avg"], at_hand_over["exp_avg"], rtol=0, atol=0)
    assert not torch.equal(
        at_hand_over["exp_avg"],
        checkpoint.load_checkpoint(tmp_path / "checkpoints" / "checkpoint.pt")["optG"]["state"][0]["exp_avg"],
    )


def test_epoch_files_are_written_off_the_training_thread_checkpoint_first(as_on_an_accelerator, monkeypatch, gan_main):
    writes = []
    real_write = checkpoint.atomic_write_bytes
    import artifacts

    def record(path, data):
        writes.append((path.name, threading.current_thread().name))
        real_write(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", record)
    monkeypatch.setattr(artifacts, "atomic_write_bytes", record)
    code, _, err = gan_main([*TINY_ARGS, "--epochs", "1"])
    assert code == 0, err
    assert [name for name, _ in writes] == [
        "real_samples.png", "checkpoint.pt", "netG.pth", "netD.pth", "netG_ema.pth",
        "epoch_001.png", "progress.gif", "losses.png", "real_vs_fake.png",
    ]  # fmt: skip
    assert {thread for _, thread in writes} == {"epoch-files"}


def test_a_stop_waits_for_the_files_in_the_queue_before_saying_what_it_saved(
    as_on_an_accelerator, monkeypatch, gan_main, tmp_path
):
    """Ctrl-C in epoch 2, while epoch 1's checkpoint is still being written: the message comes
    after both that write and the stop's own checkpoint are on disk."""
    release, order = threading.Event(), []
    real_write = checkpoint.write_run_files

    def slow_write(state, folder):
        if state["step"] == STEPS_PER_EPOCH:
            release.wait(timeout=60)
        real_write(state, folder)
        order.append(f"wrote step {state['step']}")

    def stop_requested(stop, step, *args):
        if step == STEPS_PER_EPOCH + 1:
            release.set()  # let epoch 1's write go on, now that the training is ahead of it
            return True
        return False

    real_interruption = faults.interruption
    monkeypatch.setattr(checkpoint, "write_run_files", slow_write)
    monkeypatch.setattr(gan, "stop_requested", stop_requested)
    monkeypatch.setattr(faults, "interruption", lambda *a: order.append("message") or real_interruption(*a))
    code, _, err = gan_main([*TINY_ARGS, "--epochs", "2"])
    assert code != 0 and "stopped at epoch 2, step 5" in err, err
    assert order == [f"wrote step {STEPS_PER_EPOCH}", "wrote step 5", "message"]
    assert checkpoint.load_checkpoint(tmp_path / "checkpoints" / "checkpoint.pt")["step"] == 5


def test_on_the_cpu_the_files_are_written_on_the_training_thread(monkeypatch, gan_main):
    """A writer thread on the CPU takes its time from the steps' threads (BENCHMARKS.md)."""
    threads = set()
    real_write = checkpoint.atomic_write_bytes
    monkeypatch.setattr(
        checkpoint, "atomic_write_bytes", lambda *a: threads.add(threading.current_thread().name) or real_write(*a)
    )
    code, _, err = gan_main([*TINY_ARGS, "--epochs", "1"])
    assert code == 0, err
    assert threads == {threading.main_thread().name}
    assert isinstance(outputs.epoch_file_writer(Runtime(torch.device("cpu"))), InlineWriter)
    on_cuda = outputs.epoch_file_writer(Runtime(torch.device("cuda")))  # no GPU needed to build it
    on_cuda.close()
    assert isinstance(on_cuda, BackgroundWriter)
