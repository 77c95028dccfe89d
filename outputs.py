"""Everything rank 0 writes while a run trains: checkpoints, the metrics log, pictures, TensorBoard
and FID (RunOutputs), and the writer that puts those files on disk. The other ranks of a torchrun
job get NoOutputs, which writes nothing.

The files of each epoch's end (its grid; the checkpoint, GIF frames and plots when save_schedule.py
says) are written on a thread of their own on an accelerator (BackgroundWriter), so the training
never waits while a PNG is encoded or a checkpoint is fsynced; on the CPU, where such a thread takes
its time from the steps, InlineWriter writes them where they are handed over. Jobs run one at a
time in the order given (a checkpoint before its pictures). A job must own what it writes: copies
taken on the training thread before it is handed over. After a job fails, the later ones are
dropped (no picture of an epoch whose checkpoint failed) and the error is raised on the training
thread at its next hand-over, wait or close.
"""

import contextlib
import queue
import threading
import warnings
from pathlib import Path

import artifacts
import checkpoint
import metricslog
import sampling
import snapshots
from augment import STRENGTH_LABELS
from errors import UserError, count_text
from models import estimate_batch_norm
from startup import generate_command
from steps import STAT_NAMES

# A checkpoint, its pictures, and the grids and log rows of the short epochs that train while they
# are written: the training runs at most this many jobs ahead of the disk
PENDING_JOBS = 16


class BackgroundWriter:
    def __init__(self, pending_jobs=PENDING_JOBS):
        self.jobs = queue.Queue(maxsize=pending_jobs)
        self.error = None
        # not a daemon: a write under way when the program exits is finished, never cut short
        self.thread = threading.Thread(target=self.work, name="epoch-files", daemon=False)
        self.thread.start()

    def submit(self, job):
        """Queue job (a function of no arguments); blocks while the queue is full. Raises a
        failed earlier job's error instead, and then queues nothing."""
        self.raise_error()
        self.jobs.put(job)

    def wait(self):
        """Return once every queued job has run; raise the error of one that failed."""
        self.jobs.join()
        self.raise_error()

    def close(self, raise_errors=True):
        """Run what is queued, stop the thread. A failed job's error is raised, or with
        raise_errors=False (the training is failing already) shown as a warning."""
        self.jobs.put(None)
        self.thread.join()
        if raise_errors:
            self.raise_error()
        elif self.error is not None:
            warnings.warn(f"also, writing a file failed: {self.error}", stacklevel=2)

    def raise_error(self):
        error, self.error = self.error, None
        if error is not None:
            raise error

    def work(self):
        while (job := self.jobs.get()) is not None:
            try:
                if self.error is None:
                    job()
            except BaseException as error:  # handed to the training thread, which decides
                self.error = error
            finally:
                self.jobs.task_done()
        self.jobs.task_done()


class InlineWriter:
    """BackgroundWriter's interface, each job run where it is handed over: its error is raised there."""

    def submit(self, job):
        job()

    def wait(self):
        pass

    def close(self, raise_errors=True):
        pass


def epoch_file_writer(runtime):
    """Where rank 0's files are written: on a thread of their own while the steps run on an
    accelerator, where they were handed over on the CPU (docs/speed.md)."""
    return InlineWriter() if runtime.device.type == "cpu" else BackgroundWriter()


@contextlib.contextmanager
def run_outputs(opts, runtime, progress, real, locks, metric_feature=None):
    """Rank 0's RunOutputs (NoOutputs on the other ranks). However the run ends, every file handed
    to its writer is written before this returns, so a stopped run has saved what it says.

    real: the training data (its images and, under --conditional, labels).
    """
    if not runtime.is_main:
        yield NoOutputs()
        return
    writer = epoch_file_writer(runtime)
    try:
        yield RunOutputs(opts, runtime, real, progress, locks, writer, metric_feature)
    except BaseException:
        writer.close(raise_errors=False)  # the run's own error is the one to tell
        raise
    writer.close()


class NoOutputs:
    """RunOutputs' interface for the ranks that write nothing: rank 0 writes for all of them."""

    def start(self, fresh):
        pass

    def log(self, row):
        pass

    def save_checkpoint(self, state, rank_rng, ema_statistics_estimated=False, path=None):
        pass

    def save_snapshot(self, state):
        pass

    def wait(self):
        pass

    def rolled_back(self, step):
        pass

    def end_epoch(self, state, rank_rng, writes):
        return None

    def draw_progress(self):
        pass

    def draw_real_vs_fake(self, nets, fixed_noise):
        pass


class RunOutputs:
    """Everything rank 0 writes: checkpoints, the log, pictures, TensorBoard and FID.

    The files are written by self.writer in the order they are handed over, from copies taken on
    the training thread. FID is computed on the training thread. Each write checks that the run
    still holds its folder just before it writes there.
    """

    def __init__(self, opts, runtime, real, progress, locks, writer, metric_feature=None):
        self.opts, self.runtime, self.writer, self.real = opts, runtime, writer, real
        self.image_dir, self.checkpoint_dir = Path(opts.image_dir), Path(opts.checkpoint_dir)
        self.locks = locks
        self.log_path = self.checkpoint_dir / metricslog.METRICS_LOG_NAME
        rows = metricslog.truncate_metrics(self.log_path, progress.step)
        self.pictures = artifacts.EpochPictures(self.image_dir, rows, progress.epoch)
        self.tensorboard = open_tensorboard(opts)
        self.evaluator = sampling.TrainingEvaluator(opts, runtime, real.images, metric_feature, real.labels)
        # real_vs_fake.png's real half, in the fake half's layout (rows of classes under --conditional)
        self.real_rows = sampling.real_grid_images(real.images, real.labels, opts).cpu()

    def start(self, fresh):
        """real_samples.png, written anew by a fresh run."""
        real = sampling.drawn_real_samples(self.real.images, self.opts.seed)
        self.writer.submit(lambda: self.pictures.write_real_samples(real, self.opts.image_size, fresh))

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

    def save_snapshot(self, state):
        """The generator of this step as a snapshot (snapshots.py), copied now, written into the folder
        this run still holds; then the oldest beyond --keep-snapshots are deleted."""
        saved = snapshots.snapshot_state(state.nets, state.progress, self.opts)

        def write():
            self.check_folders(self.checkpoint_dir)
            snapshots.write_snapshot(saved, self.checkpoint_dir, self.opts.keep_snapshots)

        self.writer.submit(write)

    def wait(self):
        """Return once every file handed over is on disk."""
        self.writer.wait()

    def rolled_back(self, step):
        """The run went back to the checkpoint of step: the log, the plots and the GIF forget what came later."""
        self.pictures.rows = metricslog.truncate_metrics(self.log_path, step)
        self.pictures.forget_frames_after(step)

    def log(self, row):
        """A row of the metrics log, behind the checkpoint handed over before it: the log on disk
        never runs ahead of the checkpoint on disk by more than the rows a resume drops."""
        self.writer.submit(lambda: self.write_row(row))

    def write_row(self, row):
        self.check_folders(self.checkpoint_dir)
        metricslog.append_metrics(self.log_path, [row])
        self.pictures.rows.append(row)
        if self.tensorboard is not None:
            for name in STAT_NAMES | STRENGTH_LABELS:  # the losses, and --ada's strength
                if row.get(name) is not None:
                    self.tensorboard.add_scalar(name, row[name], row["step"])

    def end_epoch(self, state, rank_rng, writes):
        """FID, the checkpoint (writes.checkpoint), then the pictures of the epoch just ended (the
        progress pictures with writes.progress: save_schedule.py); returns the FID or None.

        The checkpoint comes before the pictures: a picture that fails (or a full disk) then never
        costs the epoch. Without writes.progress its GIF frame waits for the next epoch end that
        draws them; without writes.checkpoint a grid may belong to an epoch newer than the
        checkpoint (a resume trains that epoch again and draws it anew). On an accelerator all is
        written on the writer's thread while the next epoch trains, and a write that failed is
        raised at the next hand-over.
        """
        estimated = estimate_ema_statistics(state.nets, self.opts, self.runtime)
        G = state.nets.for_samples
        fid = self.evaluate(state, G, rank_rng)  # before the checkpoint: it keeps the best FID
        if writes.checkpoint:
            self.save_checkpoint(state, rank_rng, estimated)
        samples = sampling.grid_samples(G, state.fixed_noise, self.opts, self.runtime).detach().float().cpu()
        epoch, step = state.progress.epochs_begun, state.progress.step
        self.writer.submit(lambda: self.draw_epoch(samples, epoch, step, fid is not None, writes.progress))
        return fid

    def draw_progress(self):
        """The GIF frames and the loss plot that epoch ends without writes.progress left for later."""

        def draw():
            self.check_folders(self.image_dir)
            self.pictures.draw_progress()

        self.writer.submit(draw)

    def draw_epoch(self, samples, epoch, step, scored, progress):
        """The epoch's grid; with progress the GIF frames and loss plot; the FID plot when it was scored."""
        self.check_folders(self.image_dir)
        self.pictures.add_epoch(samples, epoch, sampling.grid_row_names(self.opts), step)
        if progress:
            self.pictures.draw_progress()
        if scored:
            with artifacts.drawing(self.image_dir / "fid.png"):
                artifacts.plot_fid(self.pictures.rows, self.image_dir / "fid.png")
        if self.tensorboard is not None:
            with artifacts.drawing("the TensorBoard samples"):
                self.tensorboard.add_images("samples", samples.float().add(1).div(2).clamp(0, 1), epoch)
                self.tensorboard.flush()

    def evaluate(self, state, G, rank_rng):
        """FID after this epoch if it is due: logged, and best.pt kept. Returns the FID or None."""
        epoch = state.progress.epochs_begun
        if not self.evaluator.due(epoch) or (scores := self.evaluator.evaluate(G, epoch)) is None:
            return None
        self.log({"epoch": epoch, "step": state.progress.step, **scores})
        if scores["fid"] < state.progress.best_fid:  # best.pt: the state of the best evaluation so far
            state.progress.best_fid = scores["fid"]
            # evaluated on the epoch's end, after the EMA's statistics were estimated
            self.save_checkpoint(state, rank_rng, ema_statistics_estimated=True, path=self.checkpoint_dir / "best.pt")
        return scores["fid"]

    def draw_real_vs_fake(self, nets, fixed_noise):
        """real_vs_fake.png: the real images beside the fixed noise's samples at the run's end."""
        fake = sampling.grid_samples(nets.for_samples, fixed_noise, self.opts, self.runtime).detach().float().cpu()
        row_names = sampling.grid_row_names(self.opts)

        def draw():
            self.check_folders(self.image_dir)
            self.pictures.write_real_vs_fake(self.real_rows, fake, self.opts.image_size, row_names)

        self.writer.submit(draw)


def finished_line(opts, progress):
    """What a finished run wrote, and the command that draws from it."""
    found = snapshots.snapshot_files(opts.checkpoint_dir)
    kept = f", {count_text(len(found), 'snapshot')} in {found[0].parent}/" if found else ""
    return (
        f"finished at step {progress.step}: pictures in {Path(opts.image_dir)}/, the checkpoint "
        f"{checkpoint.latest_checkpoint(opts.checkpoint_dir)}{kept}. Draw from it: {generate_command(opts)}"
    )


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
