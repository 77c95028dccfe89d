"""How the training step is compiled once the run's length is known: whether --compile auto's
compile repays its cost, --compile max's whole step in CUDA graphs, and the time the first
compiled step took. Which compiles may run at all (a compiler, the device) runtime.py decides.
"""

import dataclasses
import time

import torch

from checkpoint import Progress
from runlength import RunLength

# --compile auto's estimate of a compile's cost and of what it saves per step: estimates, not yet
# measured on a GPU (docs/speed.md says where they come from). A run compiles when its steps times
# the saving exceed the cost.
COMPILE_SECONDS = 60.0
STEP_SECONDS_SAVED = 0.002


def steps_left(opts, resumed, steps_per_epoch, world_size=1):
    """The steps this run will train: to its length (--epochs or --kimg), from the checkpoint it
    resumes (if any)."""
    saved = resumed[0] if resumed else {}
    progress = Progress(epoch=saved.get("epoch", 0), batch=saved.get("batch", 0), step=saved.get("step", 0))
    length = RunLength.of(opts, steps_per_epoch, world_size, progress)
    return max(0, length.total_steps - progress.step)


def compile_pays(steps):
    return steps * STEP_SECONDS_SAVED > COMPILE_SECONDS


def compile_if_it_pays(runtime, opts, steps_per_epoch, resumed):
    """The runtime the run trains with: under --compile auto compiled only where its steps win the
    compile's time back; --compile on, off and max as given."""
    if not runtime.compile_auto:
        return runtime
    steps = steps_left(opts, resumed, steps_per_epoch, runtime.world_size)
    if compile_pays(steps):
        return dataclasses.replace(runtime, compile_auto=False)
    runtime.say(
        f"--compile auto: {steps:,} steps would not win back a compile (about {COMPILE_SECONDS:.0f} s); "
        "training uncompiled (--compile on compiles anyway)"
    )
    return dataclasses.replace(runtime, compile=False, compile_auto=False)


def training_step(step, runtime):
    """What the loop calls for one step: step (train_step, or what a test put in its place), under
    --compile max compiled whole into CUDA graphs; a compiled one says how long its first call
    took (the compile, then one step)."""
    if runtime.whole_step:
        return FirstStepTimed(WholeStep(step, runtime), runtime)
    if runtime.compile:
        return FirstStepTimed(step, runtime)
    return step


class FirstStepTimed:
    """step, and a line saying the time its first call took: torch.compile compiles there."""

    def __init__(self, step, runtime):
        self.step, self.runtime, self.timed = step, runtime, False

    def __call__(self, *args, **kwargs):
        if self.timed:
            return self.step(*args, **kwargs)
        started = time.perf_counter()
        stats = self.step(*args, **kwargs)
        if self.runtime.device.type == "cuda":
            torch.cuda.synchronize(self.runtime.device)  # once: the first step's kernels are part of its time
        self.timed = True
        self.runtime.say(
            f"compiled the steps in {time.perf_counter() - started:.1f} s (the first step, compile included)"
        )
        return stats


# ---------------------------------------------------------------- --compile max


class WholeStep:
    """train_step as one function compiled with mode="reduce-overhead": torch.compile captures what
    it traces (the forwards, the backwards, the fused capturable Adam updates and the EMA update)
    as CUDA graphs and replays each with one launch instead of a launch per kernel. Dynamo breaks
    the step's graph at each backward, so the step is a few graphs, not literally one.

    The EMA's decay goes in as a device tensor: as a Python number, every new value of its ramp
    (ema_decay_at) would compile the step again. The statistics returned live in the graphs'
    memory, overwritten by the next replay: the loop adds them to its Meter before that.
    """

    def __init__(self, step, runtime):
        self.decay = None
        self.compiled = torch.compile(step, mode=runtime.compile_mode, dynamic=False)

    def __call__(self, nets, real, recipe, runtime, update_g=True, ema_decay=0.0, labels=None, step=0):
        # the run's step count is left out: it schedules --r1 alone, which --compile max refuses, and
        # a Python number that changes at every call would compile the step again each time
        if self.decay is None:
            self.decay = torch.zeros((), device=real.device)
        self.decay.fill_(ema_decay)  # a copy into the tensor the graphs read, no host sync
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(nets, real, recipe, runtime, update_g, self.decay, labels)
