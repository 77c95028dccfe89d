"""The training data as the loop takes it: CIFAR-10 (downloaded) or an image folder (decoded into
the cache), loaded by data.py and folders.py in turns under torchrun, then cut into batches on the
device by data.make_batches.
"""

from data import load_training_data, make_batches
from errors import UserError
from runtime import barrier


def load_batches(opts, runtime):
    """The training data and its batches, on the device if they fit."""
    data = prepared_in_turns(lambda: load_training_data(opts, runtime.device, say=runtime.say), runtime)
    batches = make_batches(
        data.images,
        opts.batch_size,
        opts.image_size,
        opts.seed,
        runtime.rank,
        runtime.world_size,
        runtime.device,
        labels=data.labels,
        channels=data.channels,
        **runtime.batch_layout,
    )
    if len(batches) == 0:  # every process takes its own batch of each step
        raise UserError(
            f"the dataset has {len(data.images)} images, fewer than one step takes: --batch-size {opts.batch_size} "
            f"x {runtime.world_size} processes = {opts.batch_size * runtime.world_size}"
        )
    return data, batches


def prepared_in_turns(load, runtime):
    """load() in three turns: rank 0; then the first process of every other machine; then the rest.

    Two processes downloading or extracting CIFAR-10 (or building a folder's cache) into one folder
    at once would tear it. With a shared filesystem rank 0's copy serves everyone; without one,
    each machine's first process makes the machine's own copy before its other processes read it.
    """
    turn = 0 if runtime.is_main else 1 if runtime.local_rank == 0 else 2
    loaded = None
    for current in range(3):
        if current == turn:
            loaded = load()
        if current < 2:
            barrier(runtime)
    return loaded
