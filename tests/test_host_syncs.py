"""The hot loop makes the host wait for the device nowhere: no tensor built from host data, no
value read back, no copy between host and device but the streamed images' own, at every step
after the first of each recipe. Counted on the CPU by a TorchDispatchMode around the batches,
the steps and the statistics' sums; copies to the device, by streaming to the meta device.
"""

import pytest
import torch
from conftest import TINY_ARGS
from torch.utils._python_dispatch import TorchDispatchMode

import gan
import steps
import utils
from folders import HostImages

aten = torch.ops.aten
# torch.tensor(data) on the device: a copy from pageable host memory, which waits for the device
MADE_FROM_HOST_DATA = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
# the host reads a value on the device, or an op whose result's shape depends on one
READ_BY_THE_HOST = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
}


def copy_between_devices(func, args, kwargs):
    """The copy from one device to another as "copy to DEVICE" (", non-blocking" added where the host
    need not wait for it); None for any other op."""
    if func is aten._to_copy.default and "device" in kwargs and torch.device(kwargs["device"]) != args[0].device:
        target, non_blocking = torch.device(kwargs["device"]), kwargs.get("non_blocking", False)
    elif func is aten.copy_.default and args[0].device != args[1].device:
        target, non_blocking = args[0].device, kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
    else:
        return None
    return f"copy to {target.type}" + (", non-blocking" if non_blocking else "")


class HostTraffic(TorchDispatchMode):
    """The ops that would make the host wait for a GPU (or copy to it), recorded per training step.

    Adam's step is not watched (paused): on the CPU foreach Adam keeps its step counters on the
    host, and counts and reads them there; on CUDA fused Adam keeps them on the device, one kernel.
    """

    def __init__(self):
        super().__init__()
        self.steps_done = 0
        self.per_step = {}
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        from_host = func in MADE_FROM_HOST_DATA or func in READ_BY_THE_HOST
        seen = copy_between_devices(func, args, kwargs) or (str(func) if from_host else None)
        if seen and not self.paused:
            self.per_step.setdefault(self.steps_done, []).append(seen)
        return func(*args, **kwargs)


@pytest.fixture
def host_traffic(monkeypatch):
    """A HostTraffic watching, in gan.main's loop, each batch's making, each step and each sum of its statistics."""
    traffic = HostTraffic()
    real_train_step, real_add, real_load = gan.train_step, steps.Meter.add, gan.load_batches
    real_adam_step = steps.EagerAdam.step

    def train_step(*args, **kwargs):
        with traffic:
            stats = real_train_step(*args, **kwargs)
        traffic.steps_done += 1
        return stats

    def adam_step(optimizer, closure=None):
        traffic.paused = True
        try:
            return real_adam_step(optimizer, closure)
        finally:
            traffic.paused = False

    def add(meter, stats):
        with traffic:
            real_add(meter, stats)

    def load_batches(opts, runtime):
        data, batches = real_load(opts, runtime)
        epoch_of = batches.labelled_epoch

        def labelled_epoch(epoch, start=0):
            batch_iterator = epoch_of(epoch, start)
            while True:
                with traffic:
                    batch = next(batch_iterator, None)
                if batch is None:
                    return
                yield batch

        batches.labelled_epoch = labelled_epoch
        return data, batches

    monkeypatch.setattr(gan, "train_step", train_step)
    monkeypatch.setattr(steps.Meter, "add", add)
    monkeypatch.setattr(steps.EagerAdam, "step", adam_step)
    monkeypatch.setattr(gan, "load_batches", load_batches)
    return traffic


RECIPES = {
    "plain": [],
    "improved": ["--recipe", "improved"],  # the spectral loss, of both batches, at every G step
    # classes, and colour images trained on as their luma
    "conditional greyscale": ["--conditional", "--channels", "1"],
    # and R1 at step 2 (of 0 to 3), with a G step at every second D step
    "streamed": ["--conditional", "--channels", "1", "--r1", "1", "--r1-every", "2", "--d-steps", "2", "--ema", "0"],
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_no_step_after_the_first_waits_for_the_device(host_traffic, monkeypatch, gan_main, recipe):
    if recipe == "streamed":
        monkeypatch.setenv(utils.STREAM_VARIABLE, "1")
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1", *RECIPES[recipe]])
    assert code == 0, err
    assert host_traffic.steps_done == 4
    after_the_first = {step: ops for step, ops in host_traffic.per_step.items() if step > 0}
    assert after_the_first == {}


def test_streamed_batches_copy_their_images_alone_to_the_device_and_without_waiting():
    """The meta device stands in for a GPU: every copy from the host is seen. The images' copy is
    non-blocking (from a pinned buffer on CUDA); the labels stay on the device, picked there by
    the epoch's order, which reaches the device once an epoch."""
    images = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(32) % 10
    batches = utils.make_batches(HostImages(images), 8, 16, seed=1, device="meta", labels=labels)
    traffic = HostTraffic()
    batch_iterator = batches.labelled_epoch(0)
    copies = []
    for _ in range(len(batches)):
        with traffic:
            batch, batch_labels = next(batch_iterator)
        copies.append(traffic.per_step.pop(0, []))
        assert batch.device.type == batch_labels.device.type == "meta"
    images_copy = "copy to meta, non-blocking"
    assert copies == [["copy to meta", images_copy]] + [[images_copy]] * 3
