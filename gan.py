"""Train a DCGAN on CIFAR-10 or a folder of images, then sample, interpolate or evaluate it.

    python gan.py --epochs 25                 # train; grids in images/, checkpoints in checkpoints/
    python gan.py --generate 64               # images from the latest checkpoint
    torchrun --nproc_per_node=8 gan.py ...    # several GPUs

The file reads top to bottom as a recipe: resolve the options, set up the device, load the
data, build the networks, then the loop (train_epochs) and what happens around it. The maths
lives in steps.py; flags in options.py; checkpoints in checkpoint.py; pictures in artifacts.py.
"""

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

try:  # importing torch takes seconds: a Ctrl-C meanwhile gets one line, not a traceback
    from options import answer_help_and_flag_errors

    if __name__ == "__main__":
        answer_help_and_flag_errors(sys.argv[1:])  # before torch is imported: at once
    import torch
    from tqdm import tqdm

    import artifacts
    import checkpoint
    import faults
    import sampling
    from checkpoint import Progress, latest_checkpoint
    from data import load_training_data, make_batches
    from faults import ROLL_BACK, Interrupted, StopRequest
    from models import ema_decay_at, estimate_batch_norm
    from options import (
        MAX_SEED,
        merge_resume_flags,
        mixed_seed,
        parse_flags,
        random_seed,
        resume_command,
        resume_path,
        training_memory_problem,
    )
    from runtime import (
        any_rank,
        barrier,
        broadcast_int,
        launcher_words,
        rank_rng_states,
        setup_runtime,
        stop_distributed,
    )
    from steps import STAT_NAMES, Meter, Nets, Recipe, build_nets, epoch_summary, format_stat, train_step
    from utils import UserError, check_writable, count_text, error_prefix, locked_folders, no_new_empty_folders
    from writer import BackgroundWriter, InlineWriter
except KeyboardInterrupt:
    if __name__ != "__main__":
        raise
    print("interrupted while starting; nothing was written", file=sys.stderr)
    sys.exit(130)

# ---------------------------------------------------------------- setting up a run


def resolve_training_options(opts, explicit, runtime):
    """The run's options, read-only from here on, and the checkpoint it resumes (or None)."""
    if opts.resume is None:
        earlier = latest_checkpoint(opts.checkpoint_dir)
        if earlier.is_file():
            # a fresh run would overwrite that run's checkpoint and mix its metrics log
            raise UserError(
                f"{earlier} holds an earlier run: continue it with --resume, "
                "or train into another --checkpoint-dir (or delete that folder)"
            )
        files = checkpoint.earlier_run_files(opts.checkpoint_dir)
        if files:  # its checkpoint.pt is gone, but a fresh run would replace these
            raise UserError(
                f"{opts.checkpoint_dir} holds an earlier run's files ({', '.join(files)}): "
                "train into another --checkpoint-dir, or move them away first"
            )
        pictures = artifacts.earlier_run_pictures(opts.image_dir)
        # pictures beside the log of a run that never saved a checkpoint are that run's: replaced
        if pictures and not checkpoint.orphan_log(opts.checkpoint_dir):
            # a fresh run would overwrite some of that run's grids and leave the others beside its own
            raise UserError(
                f"{opts.image_dir} holds an earlier run's pictures ({', '.join(pictures)}): "
                "train into another --image-dir, or move them away first"
            )
        # under torchrun every rank must train on rank 0's seed, or their shards would overlap
        seed = opts.seed if opts.seed is not None else broadcast_int(random_seed(), runtime)
        check_class_loss(opts, explicit)
        return opts.replace(seed=seed), None
    path = resume_path(opts)
    if not opts.resume and not path.is_file():
        raise UserError(f"--resume: no checkpoint in {opts.checkpoint_dir}/ (give its path: --resume PATH)")
    state = checkpoint.load_checkpoint(path)
    opts, changes = merge_resume_flags(opts, explicit, state["flags"], path)
    for change in changes:
        say(runtime, f"resume: changed {change}")
    check_class_loss(opts, explicit)
    if "checkpoint_dir" not in explicit:  # the run goes on beside the checkpoint it resumes
        opts = opts.replace(checkpoint_dir=str(path.parent))
    elif latest_checkpoint(opts.checkpoint_dir).is_file() and not latest_checkpoint(opts.checkpoint_dir).samefile(path):
        raise UserError(
            f"{latest_checkpoint(opts.checkpoint_dir)} holds another run: resuming {path} there would replace it; "
            "give another --checkpoint-dir"
        )
    return opts.replace(seed=state.get("seed", opts.seed)), (state, path)


def check_class_loss(opts, explicit):
    """--class-loss weighs a loss on the classes: typed for a run without them, it would do nothing."""
    if "class_loss" in explicit and not opts.conditional:
        raise UserError("--class-loss applies to --conditional training (the run has no classes)")


@dataclass
class TrainState:
    """What a run carries from step to step, and what a checkpoint saves."""

    nets: Nets
    progress: Progress
    fixed_noise: torch.Tensor


def start_state(opts, runtime, resumed):
    """Networks seeded from --seed (every rank alike), then the resumed checkpoint if any."""
    torch.manual_seed(opts.seed)
    nets = build_nets(opts, runtime)
    fixed_noise = torch.randn(64, opts.nz, 1, 1, generator=torch.Generator().manual_seed(opts.seed))
    state = TrainState(nets, Progress(), fixed_noise)
    if resumed is not None:
        restore(state, *resumed, runtime)
        carry_position(state.progress, *resumed, opts, runtime)
        done = count_text(state.progress.epoch, "epoch")
        say(runtime, f"resuming {resumed[1]}: {done} done, step {state.progress.step}")
    if resumed is None:
        # each rank draws its own noise for the steps
        torch.manual_seed(mixed_seed(opts.seed, state.progress.step, runtime.rank))
    elif runtime.distributed:
        restore_rank_rng(resumed[0], opts, runtime, state.progress.step)
    state.fixed_noise = state.fixed_noise.to(runtime.device)
    return state


def carry_position(progress, saved, path, opts, runtime):
    """A mid-epoch checkpoint's batch index counted in this run's global batch (batch size x processes).

    Another number of processes (or --batch-size) gives batches of another size: the images the
    epoch has done are carried over when they make whole batches of the new size, else refused.
    """
    saved_processes = saved.get("world_size", 1)
    saved_global = saved["flags"].get("batch_size", opts.batch_size) * saved_processes
    global_batch = opts.batch_size * runtime.world_size
    if saved_processes != runtime.world_size:
        say(
            runtime,
            f"resume: changed processes {saved_processes} -> {runtime.world_size} "
            f"(global batch {saved_global} -> {global_batch}; the noise each process draws starts afresh)",
        )
    if progress.batch == 0 or saved_global == global_batch:
        return
    images_done = progress.batch * saved_global
    if images_done % global_batch:
        raise UserError(
            f"{path} stopped {images_done} images into epoch {progress.epoch + 1}, which is no whole number of "
            f"this run's batches of {global_batch} ({opts.batch_size} x {runtime.world_size} processes): resume it "
            f"with {saved_processes} process(es) and --batch-size {saved_global // saved_processes}"
        )
    progress.batch = images_done // global_batch


def restore_rank_rng(saved, opts, runtime, step):
    """This rank's own RNG state from the checkpoint; fresh noise when it has none for this rank
    (an older checkpoint, or one saved by another number of processes)."""
    ranks = saved["rng"].get("ranks")
    if not isinstance(ranks, list) or len(ranks) != runtime.world_size:
        torch.manual_seed(mixed_seed(opts.seed, step, runtime.rank))
        return
    try:
        torch.set_rng_state(ranks[runtime.rank]["cpu"])
        if runtime.device.type == "cuda" and "cuda" in ranks[runtime.rank]:
            torch.cuda.set_rng_state(ranks[runtime.rank]["cuda"], runtime.device)
    except (KeyError, TypeError, RuntimeError) as error:
        raise UserError(f"checkpoint is damaged: unusable RNG state of rank {runtime.rank} ({error})") from None


def restore(state, saved, path, runtime):
    checkpoint.restore_state(state.nets, saved, runtime, path)
    state.progress = Progress.from_checkpoint(saved)
    fixed = saved.get("fixed_noise")
    if isinstance(fixed, torch.Tensor) and fixed.shape == state.fixed_noise.shape:
        state.fixed_noise = fixed.to(state.fixed_noise.dtype)


def keep_orphan_log(opts, runtime):
    """A fresh run's log starts empty; the rows of a run that saved no checkpoint here (killed in
    its first epoch, or stopped by a full disk) are kept beside it, under another name."""
    kept = checkpoint.set_aside_orphan_log(opts.checkpoint_dir)
    if kept is not None:
        say(runtime, f"kept the log of a run that saved no checkpoint as {kept}")


def load_batches(opts, runtime):
    """The training data and its batches, on the device if they fit; under torchrun the processes
    take turns to download or decode it (prepared_in_turns)."""
    data = prepared_in_turns(
        lambda: load_training_data(opts, runtime.device, say=lambda text: say(runtime, text)),
        runtime,
    )
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


def with_data_traits(opts, data, resumed):
    """The options completed by what the data says: its classes (under --conditional) and channels."""
    names = data.class_names or ()
    if resumed is not None:
        saved_channels = resumed[0]["flags"].get("nc", 3)
        if saved_channels != data.channels:
            raise UserError(
                f"{resumed[1]} was trained on {saved_channels}-channel images; the data now gives "
                f"{data.channels} (--channels {saved_channels} trains on them as it did)"
            )
        saved_names = tuple(resumed[0].get("class_names") or ())
        if saved_names != names:
            raise UserError(
                f"{resumed[1]} was trained on the classes {class_list(saved_names)}; "
                f"the data now has {class_list(names)}"
            )
    return opts.replace(num_classes=len(names), class_names=names, nc=data.channels)


def class_list(names):
    return ", ".join(names) if names else "none (unconditional)"


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


class RunOutputs:
    """Everything rank 0 writes: checkpoints, the log, pictures, TensorBoard and FID.

    The files are written by self.writer in the order they are handed over, from copies taken on
    the training thread: on a thread of their own on an accelerator, in line on the CPU
    (epoch_file_writer). FID is computed on the training thread. Each write checks that the run
    still holds its folder just before it writes there.
    """

    def __init__(self, opts, runtime, real_uint8, progress, locks, writer, metric_feature=None, labels=None):
        self.opts, self.runtime, self.writer = opts, runtime, writer
        self.image_dir, self.checkpoint_dir = Path(opts.image_dir), Path(opts.checkpoint_dir)
        self.locks = locks
        self.log_path = self.checkpoint_dir / checkpoint.METRICS_LOG_NAME
        rows = checkpoint.truncate_metrics(self.log_path, progress.step)
        self.pictures = artifacts.EpochPictures(self.image_dir, rows, progress.epoch)
        self.tensorboard = open_tensorboard(opts)
        self.evaluator = sampling.TrainingEvaluator(opts, runtime, real_uint8, metric_feature, labels)

    def check_folders(self, *folders):
        """The run still holds these output folders (all when none given): none was removed or replaced."""
        for lock in self.locks:
            if not folders or any(lock.path.parent == Path(folder) for folder in folders):
                lock.check_held()

    def save_checkpoint(self, state, rank_rng, ema_statistics_estimated=False, path=None):
        """The checkpoint and the files beside it (or the checkpoint alone at path: best.pt), copied
        now, written into the folder this run still holds."""
        saved = checkpoint.checkpoint_state(
            state.nets, state.progress, state.fixed_noise, self.opts, self.runtime, ema_statistics_estimated, rank_rng
        )

        def write():
            self.check_folders(self.checkpoint_dir)
            if path is None:
                checkpoint.write_run_files(saved, self.checkpoint_dir)
            else:
                checkpoint.save_checkpoint(saved, path)

        self.writer.submit(write)

    def log(self, row):
        """A row of the metrics log, behind the checkpoint handed over before it: the log on disk
        never runs ahead of the checkpoint on disk by more than the rows a resume drops."""
        self.writer.submit(lambda: self.write_row(row))

    def write_row(self, row):
        self.check_folders(self.checkpoint_dir)
        checkpoint.append_metrics(self.log_path, [row])
        self.pictures.rows.append(row)
        if self.tensorboard is not None:
            for name in STAT_NAMES:
                if row.get(name) is not None:
                    self.tensorboard.add_scalar(name, row[name], row["step"])

    def epoch_pictures(self, samples, epoch, scored):
        """The epoch's grid, GIF frame and plots (the FID plot when it was scored): handed over after
        its checkpoint, so a drawing never costs it."""
        samples = samples.detach().float().cpu()
        self.writer.submit(lambda: self.draw_epoch(samples, epoch, scored))

    def draw_epoch(self, samples, epoch, scored):
        self.check_folders(self.image_dir)
        self.pictures.add_epoch(samples, epoch, sampling.grid_row_names(self.opts))
        if scored:
            with artifacts.drawing(self.image_dir / "fid.png"):
                artifacts.plot_fid(self.pictures.rows, self.image_dir / "fid.png")
        if self.tensorboard is not None:
            with artifacts.drawing("the TensorBoard samples"):
                self.tensorboard.add_images("samples", samples.float().add(1).div(2).clamp(0, 1), epoch)
                self.tensorboard.flush()

    def evaluate(self, state, G, opts, runtime, rank_rng):
        """FID after this epoch if it is due: logged, and best.pt kept. Returns the FID or None."""
        epoch = state.progress.epoch
        if not self.evaluator.due(epoch) or (scores := self.evaluator.evaluate(G, epoch)) is None:
            return None
        self.log({"epoch": epoch, "step": state.progress.step, **scores})
        if scores["fid"] < state.progress.best_fid:  # best.pt: the state of the best evaluation so far
            state.progress.best_fid = scores["fid"]
            # evaluated on the epoch's end, after the EMA's statistics were estimated
            self.save_checkpoint(state, rank_rng, ema_statistics_estimated=True, path=self.checkpoint_dir / "best.pt")
        return scores["fid"]

    def draw_real_vs_fake(self, fake):
        fake = fake.detach().float().cpu()
        row_names = sampling.grid_row_names(self.opts)

        def draw():
            self.check_folders(self.image_dir)
            self.pictures.write_real_vs_fake(self.real_rows, fake, self.opts.image_size, row_names)

        self.writer.submit(draw)


def epoch_file_writer(runtime):
    """Where rank 0's files are written: on a thread of their own while the steps run on an
    accelerator, where they were handed over on the CPU. There a writer thread took its time from
    the steps' threads: a 6-epoch run on 2 cores took 16.0-16.8 s with it and 13.8-13.9 s without
    (BENCHMARKS.md, epoch_end.py)."""
    return InlineWriter() if runtime.device.type == "cpu" else BackgroundWriter()


@contextlib.contextmanager
def run_outputs(opts, runtime, state, images, locks, metric_feature, labels):
    """Rank 0's RunOutputs (None on the other ranks). However the run ends, every file handed to
    its writer is written before this returns, so a stopped run has saved what it says."""
    if not runtime.is_main:
        yield None
        return
    writer = epoch_file_writer(runtime)
    try:
        yield RunOutputs(opts, runtime, images, state.progress, locks, writer, metric_feature, labels)
    except BaseException:
        writer.close(raise_errors=False)  # the run's own error is the one to tell
        raise
    writer.close()


def open_tensorboard(opts):
    """Rank 0's TensorBoard writer, or None without --tensorboard."""
    if not opts.tensorboard:
        return None
    return summary_writer_class()(log_dir=str(Path(opts.checkpoint_dir) / "tensorboard"))


def summary_writer_class():
    """TensorBoard's writer class; a clear error when --tensorboard asks for a package that is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


# ---------------------------------------------------------------- the loop


def train(opts, explicit, runtime, metric_feature=None):
    opts, resumed = resolve_training_options(opts, explicit, runtime)
    problem = training_memory_problem(opts, runtime.device, runtime.amp_dtype is not None)
    if problem:
        raise UserError(problem)
    if opts.dataset == "folder" and Path(opts.image_dir).resolve().is_relative_to(Path(opts.dataroot).resolve()):
        # the folder is searched recursively: the next start would train on this run's grids
        raise UserError(f"--image-dir {opts.image_dir} is inside --dataroot {opts.dataroot}: give one outside it")
    outputs = ((opts.checkpoint_dir, "--checkpoint-dir"), (opts.image_dir, "--image-dir")) if runtime.is_main else ()
    for folder, _ in outputs:
        check_writable(folder)
    with locked_folders(outputs) as locks:  # one run at a time in a folder
        return train_in_locked_folders(opts, resumed, runtime, metric_feature, locks)


def train_in_locked_folders(opts, resumed, runtime, metric_feature, locks):
    if opts.tensorboard:
        summary_writer_class()  # fail fast, before the data, when it is missing; no event file yet
    data, batches = load_batches(opts, runtime)
    opts, images = with_data_traits(opts, data, resumed), data.images
    state = start_state(opts, runtime, resumed)
    if state.progress.epoch >= opts.epochs:
        say(runtime, f"already trained {count_text(state.progress.epoch, 'epoch')}; raise --epochs to train more")
        return state
    if runtime.is_main and resumed is None:
        keep_orphan_log(opts, runtime)
    with run_outputs(opts, runtime, state, images, locks, metric_feature, data.labels) as outputs:
        if outputs is not None:
            real = images[:64].cpu()
            outputs.writer.submit(lambda: outputs.pictures.write_real_samples(real, opts.image_size, resumed is None))
            # real_vs_fake.png's real half, in the fake half's layout (rows of classes under --conditional)
            outputs.real_rows = sampling.real_grid_images(images, data.labels, opts).cpu()
        say(runtime, describe(opts, runtime, len(images), batches))
        stop = StopRequest(announce=runtime.is_main)
        stop.install()
        train_epochs(state, batches, opts, runtime, outputs, stop)
        if outputs is not None:
            outputs.draw_real_vs_fake(
                sampling.grid_samples(generator_for_samples(state.nets), state.fixed_noise, opts, runtime)
            )
    return state


def train_epochs(state, batches, opts, runtime, outputs, stop):
    """The epochs: D and G steps, a log row every log_every_steps, pictures and a checkpoint after each."""
    recipe = Recipe.from_options(opts)
    log_every = log_every_steps(opts, len(batches))
    while state.progress.epoch < opts.epochs:
        progress, meter, started = state.progress, Meter(runtime.device), time.perf_counter()
        first_batch = progress.batch
        bar = progress_bar(progress, len(batches), opts, runtime)
        for real, labels in batches.labelled_epoch(progress.epoch, start=progress.batch):
            update_g = (progress.step + 1) % opts.d_steps == 0
            decay = ema_decay_at(opts.ema, progress.step)
            stats = train_step(state.nets, real, recipe, runtime, update_g, decay, labels)
            meter.add(stats)
            progress.step += 1
            progress.batch += 1
            bar.update(1)
            if progress.step % log_every == 0 and not log_interval(state, meter, bar, opts, runtime, outputs):
                break  # rolled back to the last checkpoint: train its next epoch again
            if save_due(progress, len(batches), opts) and not save_mid_epoch(state, opts, runtime, outputs):
                break
            if stop_requested(stop, progress.step, log_every, runtime):
                save_and_stop(state, stop, bar, opts, runtime, outputs, f"stopped at epoch {progress.epoch + 1}")
        else:
            if log_interval(state, meter, bar, opts, runtime, outputs) and weights_finite(
                state, opts, runtime, outputs
            ):
                images_done = (progress.batch - first_batch) * opts.batch_size * runtime.world_size
                finish_epoch(state, meter, images_done, time.perf_counter() - started, opts, runtime, outputs)
                if any_rank(stop.requested, runtime):
                    raise stopped(stop, f"{stop.name}: stopped after epoch {progress.epoch}", opts, runtime)
        bar.close()


def progress_bar(progress, steps_per_epoch, opts, runtime):
    return tqdm(
        total=steps_per_epoch,
        initial=progress.batch,
        desc=f"epoch {progress.epoch + 1}/{opts.epochs}",
        disable=not runtime.is_main,
        leave=False,
        dynamic_ncols=True,
    )


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
    means = meter.read_interval(runtime)
    if not all(math.isfinite(v) for v in means.values() if v is not None):
        return handle_divergence(state, "losses", opts, runtime, outputs)
    bar.set_postfix({label: format_stat(means[name], 3) for name, label in STAT_NAMES.items()})
    if outputs is not None:
        outputs.log({"epoch": state.progress.epoch + 1, "step": state.progress.step, "steps": averaged, **means})
    return True


def weights_finite(state, opts, runtime, outputs):
    parameters = (*state.nets.G.parameters(), *state.nets.D.parameters())
    if bool(torch.stack([p.isfinite().all() for p in parameters]).all()):
        return True
    return handle_divergence(state, "weights", opts, runtime, outputs)


def handle_divergence(state, what, opts, runtime, outputs):
    """Roll back to the last checkpoint (returns False) or raise Diverged, as --on-nan says."""
    progress = state.progress
    where = f"{what} became non-finite at step {progress.step} (epoch {progress.epoch + 1})"
    if outputs is not None:
        outputs.writer.wait()  # the last checkpoint on disk, not in the writer's queue
    barrier(runtime)  # every rank diverges at the same step: on disk before any rank looks
    path = latest_checkpoint(opts.checkpoint_dir)
    verdict = faults.on_divergence(where, opts.on_nan, path, progress.rollbacks)
    if verdict != ROLL_BACK:
        raise verdict
    rollbacks = progress.rollbacks + 1
    saved = checkpoint.load_checkpoint(path)
    restore(state, saved, path, runtime)
    state.progress.rollbacks = rollbacks
    if outputs is not None:
        outputs.pictures.rows = checkpoint.truncate_metrics(outputs.log_path, state.progress.step)
    noise_seed = (opts.seed + 1_000 * rollbacks) % MAX_SEED
    torch.manual_seed(mixed_seed(noise_seed, runtime.rank) if runtime.distributed else noise_seed)
    say(runtime, f"{where}; rolled back to {path} (epoch {saved['epoch']}) with noise seed {noise_seed}")
    return False


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
    rank_rng = rank_rng_states(runtime)
    if outputs is not None:
        outputs.save_checkpoint(state, rank_rng)
    return True


def save_and_stop(state, stop, bar, opts, runtime, outputs, what):
    bar.close()
    # non-finite weights are not saved over the last good checkpoint (on_nan stop raises Diverged here)
    if weights_finite(state, opts, runtime, outputs):
        rank_rng = rank_rng_states(runtime)
        if outputs is not None:
            outputs.save_checkpoint(state, rank_rng)
    if outputs is not None:
        outputs.writer.wait()  # what was saved is on disk before the message says so
    raise stopped(stop, f"{stop.name}: {what}, step {state.progress.step}", opts, runtime)


def stopped(stop, what, opts, runtime):
    command = resume_command(opts, launcher_words(runtime))
    return faults.interruption(stop, what, latest_checkpoint(opts.checkpoint_dir), command)


def finish_epoch(state, meter, images_done, seconds, opts, runtime, outputs):
    """FID, the checkpoint, then the pictures (rank 0), and the epoch's summary line.

    The checkpoint comes before the pictures: a picture that fails (or a full disk) then never
    costs the epoch, and no picture on disk belongs to an epoch without its checkpoint. On an
    accelerator both are written on the writer's thread while the next epoch trains, and a write
    that failed is raised at the next hand-over.
    """
    progress = state.progress
    progress.epoch += 1
    progress.batch = 0
    rank_rng = rank_rng_states(runtime)
    if runtime.is_main:
        estimated = estimate_ema_statistics(state.nets, opts, runtime)
        G = generator_for_samples(state.nets)
        fid = outputs.evaluate(state, G, opts, runtime, rank_rng)  # before the checkpoint: it keeps the best FID
        outputs.save_checkpoint(state, rank_rng, estimated)
        samples = sampling.grid_samples(G, state.fixed_noise, opts, runtime)
        outputs.epoch_pictures(samples, progress.epoch, fid is not None)
        say(runtime, epoch_summary(meter.epoch_means(), progress.epoch, opts.epochs, seconds, images_done, fid))
    barrier(runtime)


def estimate_ema_statistics(nets, opts, runtime):
    """The EMA generator's own BatchNorm statistics, for the epoch's pictures, FID and checkpoint.

    Only where something draws with them: checkpoints saved mid-epoch or on a Ctrl-C skip it and
    say so (netG_ema_own_statistics), and whatever loads them estimates then. Run as training
    runs (autocast, memory format), so the pictures see the statistics of the forward they use.
    Returns whether it estimated (False without an EMA).
    """
    if nets.G_ema is None:
        return False
    with runtime.autocast():
        estimate_batch_norm(nets.G_ema, opts.nz, runtime.device, num_classes=opts.num_classes)
    return True


def generator_for_samples(nets):
    return nets.G_ema if nets.G_ema is not None else nets.G


def describe(opts, runtime, image_count, batches):
    processes = f", {runtime.world_size} processes" if runtime.distributed else ""
    classes = f" of {opts.num_classes} classes" if opts.num_classes else ""
    classes += ", greyscale (1 channel)" if opts.nc == 1 else ""
    return (
        f"training on {runtime.device} ({runtime.precision_name}{', compiled' if runtime.compile else ''}"
        f"{processes}): {count_text(image_count, 'image')}{classes} ({batches.describe()}), "
        f"{count_text(len(batches), 'step')} per epoch "
        f"(logged every {log_every_steps(opts, len(batches))}), seed {opts.seed}"
    )


def say(runtime, message):
    if runtime.is_main:
        tqdm.write(message)


# ---------------------------------------------------------------- main


def run(argv=None, metric_feature=None):
    opts, explicit = parse_flags(argv)
    runtime = setup_runtime(opts)
    # folders made on the way to an error (or a Ctrl-C) are not left behind empty
    made_here = (opts.dataroot, opts.image_dir, opts.checkpoint_dir) if runtime.is_main else ()
    with no_new_empty_folders(made_here):
        return run_mode(opts, explicit, runtime, metric_feature)


def run_mode(opts, explicit, runtime, metric_feature):
    try:
        if runtime.distributed and (opts.generate or opts.interpolate or opts.evaluate):
            raise UserError("--generate, --interpolate and --evaluate run in one process: start them without torchrun")
        if opts.generate is not None:
            return sampling.generate(opts, explicit, runtime)
        if opts.interpolate:
            return sampling.interpolate(opts, explicit, runtime)
        if opts.evaluate and opts.images is not None:
            return sampling.evaluate_images(opts, explicit, runtime, metric_feature)
        if opts.evaluate:
            return sampling.evaluate(opts, explicit, runtime, metric_feature)
        return train(opts, explicit, runtime, metric_feature)
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
    return 0


def close_progress_bars():
    """A bar still open when a run stops would put the message at the end of its line."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":
    import warnings

    # a warning is one line for the user ("warning: skipped 3 of 40 files ..."), not two with our source line
    warnings.formatwarning = lambda message, category, *where: f"warning: {message}\n"
    sys.exit(main())
