"""Train a DCGAN on CIFAR-10 or a folder of images, then sample, interpolate or evaluate it.

    python gan.py --epochs 25                 # train; grids in images/, checkpoints in checkpoints/
    python gan.py --generate 64               # images from the latest checkpoint
    torchrun --nproc_per_node=8 gan.py ...    # several GPUs

The file reads top to bottom as a recipe: main, the run's mode, then training: the options
resolved against any checkpoint (startup.py), the data (utils.py), the networks and the loop,
with what happens at each log row, save and epoch end. The maths lives in steps.py; flags in
options.py; what rank 0 writes in outputs.py; the after-training modes in after_training.py.
"""

import sys
import time

try:  # importing torch takes seconds: a Ctrl-C meanwhile gets one line, not a traceback
    from options import answer_help_and_flag_errors

    if __name__ == "__main__":
        answer_help_and_flag_errors(sys.argv[1:])  # before torch is imported: at once
    import math

    from tqdm import tqdm

    import after_training
    import faults
    import startup
    from augment import STRENGTH_LABELS, strength_row
    from checkpoint import latest_checkpoint
    from compiling import compile_if_it_pays, training_step
    from errors import UserError, count_text, error_prefix
    from faults import Interrupted, StopRequest, handle_divergence, weights_finite
    from files import check_writable, locked_folders, no_new_empty_folders
    from generator import load_generator as load_generator  # the Python API: G = gan.load_generator(path)
    from modes import AFTER_TRAINING_MODES
    from options import parse_flags
    from outputs import finished_line, run_outputs, summary_writer_class
    from runlength import RunLength, RunProgressBar
    from runtime import any_rank, barrier, launcher_words, rank_rng_states, setup_runtime, stop_distributed
    from save_schedule import SaveSchedule
    from snapshots import snapshot_due
    from steps import STAT_NAMES, Meter, Recipe, ema_decay_at, epoch_summary, format_stat, train_step
    from utils import load_batches
except KeyboardInterrupt:
    if __name__ != "__main__":
        raise
    print("interrupted while starting; nothing was written", file=sys.stderr)
    sys.exit(130)


# ---------------------------------------------------------------- main


def main(argv=None, metric_feature=None):
    """Exit code of one invocation; metric_feature replaces Inception (tests use a tiny net)."""
    try:
        with faults.sigterm_as_ctrl_c():
            run(argv, metric_feature)
    except UserError as error:
        close_progress_bars()
        print(f"{error_prefix()}: error: {error}", file=sys.stderr)
        return getattr(error, "exit_code", 2)
    except Interrupted as interruption:
        close_progress_bars()
        if not interruption.printed:
            print_interruption(interruption)
        return interruption.exit_code
    except KeyboardInterrupt as interrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return faults.exit_code_of(interrupt)
    except Exception as error:  # a library that met the Ctrl-C in an except clause of its own
        interrupt = faults.interrupt_within(error)
        if interrupt is None:
            raise
        print("interrupted; nothing was written", file=sys.stderr)
        return faults.exit_code_of(interrupt)
    return 0


def run(argv=None, metric_feature=None):
    opts, explicit = parse_flags(argv)
    runtime = setup_runtime(opts)
    # folders made on the way to an error (or a Ctrl-C) are not left behind empty
    outputs = (opts.dataroot, opts.image_dir, opts.checkpoint_dir, opts.export)
    made_here = tuple(folder for folder in outputs if folder is not None) if runtime.is_main else ()
    with no_new_empty_folders(made_here):
        return run_mode(opts, explicit, runtime, metric_feature)


def run_mode(opts, explicit, runtime, metric_feature):
    try:
        after_training_mode = any(getattr(opts, mode) not in (None, False) for mode in AFTER_TRAINING_MODES)
        if not after_training_mode:
            return train(opts, explicit, runtime, metric_feature)
        if runtime.distributed:
            raise UserError(
                "--generate, --interpolate, --evaluate and --export run in one process: start them without torchrun"
            )
        return after_training.use_generator(opts, explicit, runtime, metric_feature)
    except Interrupted as interruption:
        if runtime.distributed:  # rank 0 speaks for all, and no rank leaves before it has saved and said so:
            if runtime.is_main:  # torchrun stops the other ranks as soon as one has ended
                print_interruption(interruption)
            barrier(runtime)
            interruption.printed = True
        raise
    finally:
        stop_distributed()


def print_interruption(interruption):
    print(interruption, file=sys.stderr, flush=True)


def close_progress_bars():
    """A bar still open when a run stops would put the message at the end of its line."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


# ---------------------------------------------------------------- training


def train(opts, explicit, runtime, metric_feature=None):
    opts, resumed = startup.resolve_training_options(opts, explicit, runtime)
    folders = ((opts.checkpoint_dir, "--checkpoint-dir"), (opts.image_dir, "--image-dir")) if runtime.is_main else ()
    for folder, _ in folders:
        check_writable(folder)
    with locked_folders(folders) as locks:  # one run at a time in a folder
        return train_in_locked_folders(opts, resumed, runtime, metric_feature, locks)


def train_in_locked_folders(opts, resumed, runtime, metric_feature, locks):
    if opts.tensorboard:
        summary_writer_class()  # fail fast, before the data, when it is missing; no event file yet
    data, batches = load_batches(opts, runtime)
    opts = startup.with_data_traits(opts, data, resumed)
    runtime = compile_if_it_pays(runtime, opts, len(batches), resumed)
    state = startup.start_state(opts, runtime, resumed)
    length = RunLength.of(opts, len(batches), runtime.world_size, state.progress)
    if length.done(state.progress):
        runtime.say(length.already_trained(state.progress))
        return state
    with run_outputs(opts, runtime, state.progress, data, locks, metric_feature) as outputs:
        stop = StopRequest(announce=runtime.is_main)
        stop.install()
        outputs.start(fresh=resumed is None)
        runtime.say(describe(opts, runtime, len(data.images), batches, length))
        train_epochs(state, batches, length, opts, runtime, outputs, stop)
        outputs.draw_real_vs_fake(state.nets, state.fixed_noise)
    if runtime.is_main:  # once every file is on disk
        runtime.say(finished_line(opts, state.progress))
    return state


def train_epochs(state, batches, length, opts, runtime, outputs, stop):
    """The epochs: D and G steps, a log row every log_every_steps, a grid after each (the checkpoint
    and the other pictures when save_schedule.py says), until the run's length (runlength.py), with
    one progress bar for the whole run."""
    log_every = log_every_steps(opts, len(batches))
    recipe = Recipe.from_options(opts)
    saves = SaveSchedule(opts, runtime, length)
    step = training_step(train_step, runtime)  # compiled whole under --compile max
    bar = RunProgressBar(length, state.progress, disable=not runtime.is_main)
    while not length.done(state.progress):
        progress, started, first_batch = state.progress, time.perf_counter(), state.progress.batch
        bar.follow(length, progress)
        meter = Meter(runtime.device)
        for real, labels in batches.labelled_epoch(progress.epoch, start=progress.batch):
            update_g = (progress.step + 1) % opts.d_steps == 0
            decay = ema_decay_at(opts.ema, progress.step)
            stats = step(state.nets, real, recipe, runtime, update_g, decay, labels, progress.step)
            meter.add(stats)
            progress.step += 1
            progress.batch += 1
            bar.update(1)
            if progress.step % log_every == 0 and not log_interval(state, meter, bar, opts, runtime, outputs):
                break  # rolled back to the last checkpoint: train its next epoch again
            if snapshot_due(progress.step, opts) and not save_snapshot(state, opts, runtime, outputs):
                break
            if length.ends_inside_epoch(progress):  # --kimg: the run ends here, its pictures and checkpoint too
                finish_epoch(state, meter, bar, first_batch, started, length, saves, stop, opts, runtime, outputs)
                break
            if save_due(progress, len(batches), opts) and not save_mid_epoch(state, opts, runtime, outputs):
                break
            if stop_requested(stop, progress.step, log_every, runtime):
                save_and_stop(state, stop, bar, opts, runtime, outputs, f"stopped at epoch {progress.epoch + 1}")
        else:
            if finish_epoch(state, meter, bar, first_batch, started, length, saves, stop, opts, runtime, outputs):
                raise stopped(stop, f"{stop.name}: stopped after epoch {progress.epoch}", opts, runtime)
    bar.close()


def log_every_steps(opts, steps_per_epoch):
    """Steps between log rows: --log-every, or a third of an epoch when that is shorter (2 at the least).

    A small folder's 22-step epoch would otherwise show no numbers until its last step and plot one
    point per epoch; 2 steps at the least, so the GPU never waits for a read at every step. The one
    place that says the interval: torchrun's ranks agree to stop at logging points, and a resumed
    run (same flags, same data) must log at the steps a run in one go does.
    """
    return min(opts.log_every, max(2, steps_per_epoch // 3))


def log_interval(state, meter, bar, opts, runtime, outputs):
    """Log the interval's means; False when they were not finite and the run rolled back."""
    if meter.steps == 0:
        return True
    averaged = meter.steps  # fewer than the interval's after a resume inside it: the row says so
    means = meter.read_interval(runtime) | strength_row(state.nets.augment_strength)  # augment_p under --ada
    if not all(math.isfinite(v) for v in means.values() if v is not None):
        return handle_divergence(state, "losses", opts, runtime, outputs)
    shown = STAT_NAMES | STRENGTH_LABELS
    bar.set_postfix({label: format_stat(means[name], 3) for name, label in shown.items() if name in means})
    outputs.log({"epoch": state.progress.epoch + 1, "step": state.progress.step, "steps": averaged, **means})
    return True


def stop_requested(stop, step, log_every, runtime):
    if not runtime.distributed:
        return stop.requested
    # every rank must stop at the same step, so they agree only at logging points
    return step % log_every == 0 and any_rank(stop.requested, runtime)


def save_due(progress, steps_per_epoch, opts):
    """--save-every N: after every N-th step, except an epoch's last (its end saves anyway)."""
    return bool(opts.save_every) and progress.step % opts.save_every == 0 and progress.batch < steps_per_epoch


def save_mid_epoch(state, opts, runtime, outputs):
    """The checkpoint a Ctrl-C writes, of finite weights only; False when they were not and the run rolled back."""
    if not weights_finite(state, opts, runtime, outputs):
        return False
    outputs.save_checkpoint(state, rank_rng_states(runtime))
    return True


def save_snapshot(state, opts, runtime, outputs):
    """--snapshot-every: the generator of this step, of finite weights only; False when they were
    not and the run rolled back."""
    if not weights_finite(state, opts, runtime, outputs):
        return False
    outputs.save_snapshot(state)
    return True


def save_and_stop(state, stop, bar, opts, runtime, outputs, what):
    bar.close()
    # non-finite weights are not saved over the last good checkpoint (on_nan stop raises Diverged here)
    if weights_finite(state, opts, runtime, outputs):
        outputs.save_checkpoint(state, rank_rng_states(runtime))
    outputs.draw_progress()  # the GIF frames and the loss plot that the last epoch ends left for later
    outputs.wait()  # what was saved is on disk before the message says so
    raise stopped(stop, f"{stop.name}: {what}, step {state.progress.step}", opts, runtime)


def stopped(stop, what, opts, runtime):
    command = startup.resume_command(opts, launcher_words(runtime))
    return faults.interruption(stop, what, latest_checkpoint(opts.checkpoint_dir), command)


def finish_epoch(state, meter, bar, first_batch, started, length, saves, stop, opts, runtime, outputs):
    """The epoch's last log row; then, its weights finite, FID, the grid and (when save_schedule.py
    says) the checkpoint and the other pictures (rank 0: outputs.end_epoch), and its summary line.
    A --kimg run that ends inside an epoch ends it here too, and the checkpoint stands where it
    stopped. True when a stop was asked for: all is saved, and the run stops here."""
    if not (log_interval(state, meter, bar, opts, runtime, outputs) and weights_finite(state, opts, runtime, outputs)):
        return False  # rolled back to the last checkpoint
    progress = state.progress
    images_done = (progress.batch - first_batch) * opts.batch_size * runtime.world_size
    seconds = time.perf_counter() - started
    stopping, writes = saves.agree(progress, stop.requested)
    if not length.ends_inside_epoch(progress):
        progress.epoch += 1
        progress.batch = 0
    fid = outputs.end_epoch(state, rank_rng_states(runtime), writes)
    if runtime.is_main:
        means = meter.epoch_means()
        runtime.say(epoch_summary(means, progress.epochs_begun, length.last_epoch, seconds, images_done, fid))
    barrier(runtime)
    return stopping


def describe(opts, runtime, image_count, batches, length):
    processes = f", {runtime.world_size} processes" if runtime.distributed else ""
    classes = f" of {opts.num_classes} classes" if opts.num_classes else ""
    classes += ", greyscale (1 channel)" if opts.nc == 1 else ""
    return (
        f"training on {runtime.device} ({runtime.precision_name}{', compiled' if runtime.compile else ''}"
        f"{processes}): {count_text(image_count, 'image')}{classes} ({batches.describe()}), "
        f"{count_text(len(batches), 'step')} per epoch (logged every {log_every_steps(opts, len(batches))}), "
        f"{length.describe()}, seed {opts.seed}"
    )


if __name__ == "__main__":
    import warnings

    # a warning is one line for the user ("warning: skipped 3 of 40 files ..."), not two with our source line
    warnings.formatwarning = lambda message, category, *where: f"warning: {message}\n"
    sys.exit(main())
