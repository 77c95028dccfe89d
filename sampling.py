"""Using a generator: sampling, FID while training, and the after-training modes --generate,
--interpolate and --evaluate.

Every sampler draws its noise from its own torch.Generator, never from the global RNG: scoring
FID in the middle of a run must not change what the run trains next.
"""

import itertools
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import artifacts
import metrics
import models
from checkpoint import (
    METRICS_LOG_NAME,
    append_metrics,
    latest_checkpoint,
    load_checkpoint,
    load_module_state,
)
from data import load_dataset
from faults import Interrupted, exit_code_of
from folders import IMAGE_SUFFIXES, decode_files
from options import ARCHITECTURE_FLAGS, mixed_seed, random_seed, refuse_saved_folders
from utils import UserError, check_writable

GRID_COLUMNS = 8  # a class-row grid: one noise vector per column, drawn as every row's class
MAX_GRID_ROWS = 10


def generator_of(flags, num_classes=0):
    """The generator a checkpoint's flags describe (checkpoints from before --arch are dcgan)."""
    return models.build_generator(
        flags.get("arch", "dcgan"), flags["nz"], flags["ngf"], flags["image_size"], flags.get("nc", 3), num_classes
    )


@torch.no_grad()
def sample(G, noise, runtime, labels=None):
    """G's images (eval mode) for noise, of the classes in labels where G is class-conditional."""
    was_training = G.training
    G.eval()
    with runtime.autocast():
        noise = noise.to(runtime.device)
        images = (G(noise) if labels is None else G(noise, labels.to(runtime.device))).float()
    G.train(was_training)
    return images


def draw_noise(count, nz, generator, truncation=None):
    """count noise vectors from generator: normal, or normal truncated to [-T, T] (the truncation trick)."""
    if truncation is None:
        return torch.randn(count, nz, 1, 1, generator=generator)
    noise = torch.empty(count, nz, 1, 1)
    return torch.nn.init.trunc_normal_(noise, 0.0, 1.0, -truncation, truncation, generator=generator)


def generated_batches(G, count, nz, runtime, seed, batch_size=500, labels=None, truncation=None):
    """Yield `count` generated images in batches, so any count fits in memory.

    labels: the class of each image (count of them) for a class-conditional G.
    """
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, count, batch_size):
        noise = draw_noise(min(batch_size, count - start), nz, generator, truncation)
        yield sample(G, noise, runtime, None if labels is None else labels[start : start + len(noise)])


def balanced_labels(count, num_classes):
    """count class labels taking the classes in turn (None for an unconditional G)."""
    return torch.arange(count) % num_classes if num_classes else None


# ---------------------------------------------------------------- grids of classes


def grid_classes(num_classes, seed):
    """The classes of a grid's rows: every class up to MAX_GRID_ROWS, else a sample of them fixed
    by the run's seed (in class order), so every epoch's grid shows the same ones."""
    if num_classes <= MAX_GRID_ROWS:
        return torch.arange(num_classes)
    chosen = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))[:MAX_GRID_ROWS]
    return chosen.sort().values


def grid_row_names(opts):
    """The class name of each row of the run's grids, or None for an unconditional run."""
    if not opts.num_classes:
        return None
    return [opts.class_names[index] for index in grid_classes(opts.num_classes, opts.seed).tolist()]


def grid_samples(G, fixed_noise, opts, runtime):
    """The epoch grid's images: the 64 fixed noise vectors, or under --conditional one row per
    grid class, the first GRID_COLUMNS fixed vectors in every row (a column is one vector)."""
    if not opts.num_classes:
        return sample(G, fixed_noise, runtime)
    classes = grid_classes(opts.num_classes, opts.seed)
    noise = fixed_noise[:GRID_COLUMNS].repeat(len(classes), 1, 1, 1)
    return sample(G, noise, runtime, classes.repeat_interleave(GRID_COLUMNS))


def real_grid_images(images, labels, opts):
    """Real images laid out as grid_samples' fakes: the first 64, or each grid class's first
    GRID_COLUMNS (repeated where a class has fewer)."""
    if not opts.num_classes:
        return images[:64]
    rows = []
    for label in grid_classes(opts.num_classes, opts.seed).tolist():
        members = (labels == label).nonzero().flatten()
        rows.append(members.repeat(GRID_COLUMNS)[:GRID_COLUMNS])
    return images[torch.cat(rows).to(images.device) if isinstance(images, torch.Tensor) else torch.cat(rows)]


def open_metrics(opts, runtime, real_uint8, feature=None):
    """FID, IS and KID with the real images' statistics loaded (cached on disk)."""
    scorers = metrics.build_metrics(runtime.device, opts.eval_samples, feature)
    cache_folder = opts.dataroot if opts.dataset == "cifar10" else opts.checkpoint_dir
    cache = metrics.real_cache_path(cache_folder, opts.dataset, len(real_uint8), real_uint8.shape[-1])
    # precision and recall compare as many real images as generated ones: keep that many features
    metrics.add_real_images(scorers, real_uint8, cache, keep_real=max(metrics.KID_REAL_LIMIT, opts.eval_samples))
    return scorers


def score(scorers, G, opts, runtime, seed):
    """FID, IS, KID, precision, recall, density and coverage of opts.eval_samples images; the global RNG is left as it was."""
    devices = [runtime.device] if runtime.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # IS and KID shuffle with the global RNG
        torch.manual_seed(seed)
        labels = balanced_labels(opts.eval_samples, G.num_classes)
        return metrics.score_generator(
            scorers, generated_batches(G, opts.eval_samples, G.nz, runtime, seed, labels=labels)
        )


class TrainingEvaluator:
    """--fid-every: scores at the end of some epochs, keeps best.pt; without Inception weights it
    warns once and training goes on (the saved flags still say --fid-every, for a later resume)."""

    def __init__(self, opts, runtime, real_uint8, feature=None):
        self.opts, self.runtime, self.real_uint8, self.feature = opts, runtime, real_uint8, feature
        self.scorers, self.unavailable = None, False

    def due(self, epoch):
        return bool(self.opts.fid_every) and epoch % self.opts.fid_every == 0 and not self.unavailable

    def evaluate(self, G, epoch):
        """The scores of G after an epoch, or None where the metrics cannot be had."""
        if self.scorers is None:
            try:
                self.scorers = open_metrics(self.opts, self.runtime, self.real_uint8, self.feature)
            except metrics.MetricsUnavailable as error:
                print(f"warning: {error}; training goes on without FID", file=sys.stderr)
                self.unavailable = True
                return None
        return score(self.scorers, G, self.opts, self.runtime, mixed_seed(self.opts.seed, epoch))


# ---------------------------------------------------------------- after training


def load_generator_for_use(opts, explicit, runtime):
    """The generator of a checkpoint (its EMA copy when it has one) and the checkpoint's flags."""
    path = Path(opts.checkpoint) if opts.checkpoint else latest_checkpoint(opts.checkpoint_dir)
    state = load_checkpoint(path)
    flags = state["flags"]
    mismatched = [name for name in ARCHITECTURE_FLAGS if name in explicit and flags.get(name) != getattr(opts, name)]
    if mismatched:
        given = ", ".join(
            f"--{n.replace('_', '-')} {getattr(opts, n)} (checkpoint: {flags.get(n)})" for n in mismatched
        )
        raise UserError(f"checkpoint {path} was trained with another architecture: {given}")
    class_names = saved_class_names(state, path)
    try:
        G = generator_of(flags, len(class_names))
    except (KeyError, TypeError, ValueError, RuntimeError) as error:  # RuntimeError: a negative size
        raise UserError(f"checkpoint {path} has unusable flags ({error})") from None
    use_ema = state.get("netG_ema") is not None
    load_module_state(G, state["netG_ema"] if use_ema else state["netG"], "generator", path)
    print(f"using the {'EMA' if use_ema else 'raw'} generator of {path} (epoch {state['epoch']})")
    G.to(runtime.device)
    if use_ema:  # checkpoints saved mid-epoch, or by older versions, hold the trained G's statistics
        models.estimate_batch_norm(G, flags["nz"], runtime.device, num_classes=len(class_names))
    G.class_names = class_names
    return G.eval(), flags


def saved_class_names(state, path):
    """The class names a checkpoint keeps (an empty tuple for an unconditional run)."""
    names = state.get("class_names") or ()
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) and name for name in names):
        raise UserError(f"checkpoint {path} is damaged: unusable class_names")
    return tuple(names)


def generate(opts, explicit, runtime):
    G, flags = load_generator_for_use(opts, explicit, runtime)
    folder = fresh_generated_folder(opts.image_dir)
    seed = opts.seed if opts.seed is not None else random_seed()
    digits = max(4, len(str(opts.generate - 1)))
    index, grid = 0, []
    try:
        for images in generated_batches(G, opts.generate, flags["nz"], runtime, seed):
            for image in images.cpu():
                artifacts.save_png(image.add(1).div(2).clamp(0, 1), folder / f"{index:0{digits}d}.png")
                index += 1
            grid.extend(images[: 64 - len(grid)].cpu())
        artifacts.save_grid(torch.stack(grid), folder / "grid.png", nrow=artifacts.grid_side(len(grid)))
    except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM: say what is on disk
        raise Interrupted(
            exit_code_of(interrupt), f"interrupted: wrote {index} of {opts.generate} images to {folder}/ (seed {seed})"
        ) from None
    print(f"wrote {index} images and grid.png to {folder}/ (seed {seed})")


def fresh_generated_folder(image_dir):
    """image_dir/generated, or generated-2, -3, ... when it holds an earlier --generate's images:
    the images of two checkpoints (or seeds) are never mixed in one folder, nor any overwritten."""
    base = Path(image_dir) / "generated"
    for number in itertools.count(1):
        folder = base if number == 1 else base.with_name(f"generated-{number}")
        if not folder.exists() or artifacts.is_empty_folder(folder):
            if number > 1:
                print(f"{base}/ holds the images of an earlier --generate: writing into {folder}/")
            check_writable(folder)
            return folder


def slerp(start, end, fractions):
    """Spherical interpolation between two batches of noise vectors, at each fraction."""
    start_flat, end_flat = start.flatten(1), end.flatten(1)
    cos = F.cosine_similarity(start_flat, end_flat).clamp(-1.0, 1.0)
    omega = torch.acos(cos).unsqueeze(0).unsqueeze(-1)  # (1, walks, 1)
    t = fractions.view(-1, 1, 1)
    sin_omega = torch.sin(omega)
    # nearly parallel vectors: fall back to a straight line to avoid dividing by ~0
    linear = sin_omega.abs() < 1e-6
    weight_start = torch.where(linear, 1 - t, torch.sin((1 - t) * omega) / sin_omega.clamp_min(1e-12))
    weight_end = torch.where(linear, t, torch.sin(t * omega) / sin_omega.clamp_min(1e-12))
    mixed = weight_start * start_flat.unsqueeze(0) + weight_end * end_flat.unsqueeze(0)
    return mixed.view(len(fractions), *start.shape)  # (steps, walks, nz, 1, 1)


def interpolate(opts, explicit, runtime, walks=8):
    G, flags = load_generator_for_use(opts, explicit, runtime)
    folder = Path(opts.image_dir)
    check_writable(folder)
    seed = opts.seed if opts.seed is not None else random_seed()
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(walks, flags["nz"], 1, 1, generator=generator)
    end = torch.randn(walks, flags["nz"], 1, 1, generator=generator)
    noise = slerp(start, end, torch.linspace(0, 1, opts.steps))  # (steps, walks, ...)
    side = flags["image_size"]
    # in batches, as --generate: a long walk must not need G's activations for all its images at once
    batches = noise.flatten(0, 1).split(500)
    images = torch.cat([sample(G, batch, runtime) for batch in batches]).view(opts.steps, walks, 3, side, side)
    # rows are walks, columns are steps along them
    frames = [artifacts.grid_image(images[step], nrow=artifacts.grid_side(walks)) for step in range(opts.steps)]
    try:
        artifacts.save_grid(images.transpose(0, 1).flatten(0, 1), folder / "interpolation.png", nrow=opts.steps)
        artifacts.save_gif(frames + frames[::-1][1:-1], folder / "interpolation.gif", frame_seconds=0.15)
    except KeyboardInterrupt as interrupt:
        written = "interpolation.png" if (folder / "interpolation.png").is_file() else "nothing"
        raise Interrupted(exit_code_of(interrupt), f"interrupted: wrote {written} to {folder}/") from None
    print(
        f"wrote interpolation.png and interpolation.gif to {folder}/ ({walks} walks, {opts.steps} steps, seed {seed})"
    )


def scores_line(scores, what):
    """The line --evaluate prints: FID, IS, KID, then precision, recall, density and coverage of `what`."""
    neighbours = "".join(
        f"  {name} {scores[name]:.3f}" for name in ("precision", "recall", "density", "coverage") if name in scores
    )
    return (
        f"FID {scores['fid']:.2f}  IS {scores['is']:.2f} ± {scores['is_std']:.2f}  "
        f"KID {scores['kid']:.4f} ± {scores['kid_std']:.4f}{neighbours}  ({what})"
    )


def evaluate(opts, explicit, runtime, feature=None):
    G, flags = load_generator_for_use(opts, explicit, runtime)
    path = Path(opts.checkpoint) if opts.checkpoint else latest_checkpoint(opts.checkpoint_dir)
    refuse_saved_folders(flags, opts, explicit, path, ("dataroot",))
    # the log row and the real statistics go beside the checkpoint evaluated, unless told otherwise
    folder = opts.checkpoint_dir if "checkpoint_dir" in explicit else str(path.parent)
    check_writable(folder)  # before the minutes of scoring, not after
    # the data it trained on, unless typed now; batch_size too: the dataset must hold one batch
    trained_on = {name: flags[name] for name in ("dataset", "subset", "batch_size") if name in flags}
    typed = {name: getattr(opts, name) for name in explicit if name in trained_on}
    seed = opts.seed if opts.seed is not None else (flags.get("seed") or 0)
    eval_opts = opts.replace(
        **{**trained_on, **typed}, image_size=flags["image_size"], seed=seed, checkpoint_dir=folder
    )
    real = load_dataset(eval_opts, torch.device("cpu"), cache_dir=folder, say=print)
    scorers = open_metrics(eval_opts, runtime, real, feature)
    scores = score(scorers, G, eval_opts, runtime, seed)
    print(scores_line(scores, f"{opts.eval_samples} generated images"))
    log_path = Path(folder) / METRICS_LOG_NAME
    append_metrics(log_path, [{"evaluate": str(path), **scores}])
    return scores


# ---------------------------------------------------------------- --evaluate --images DIR


def evaluate_images(opts, explicit, runtime, feature=None):
    """--evaluate --images DIR: any tool's images scored against the training data, as a checkpoint's are.

    Every image of DIR counts; each is brought to the real images' size the way a training folder is
    (shorter side bilinear, centre crop), and Inception then resizes both sides alike.
    """
    files = image_files(opts.images)  # a bad folder fails here, before minutes of decoding
    folder = opts.checkpoint_dir
    check_writable(folder)
    # the subset is drawn as training draws it; the dataset must hold one image, not a batch
    real_opts = opts.replace(batch_size=1, seed=opts.seed if opts.seed is not None else 0, eval_samples=len(files))
    real = load_dataset(real_opts, torch.device("cpu"), cache_dir=folder, say=print)
    side = real.shape[-1]
    images = decode_images(opts.images, files, side, opts.workers)
    scorers = open_metrics(real_opts.replace(eval_samples=len(images)), runtime, real, feature)
    devices = [runtime.device] if runtime.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # IS and KID shuffle with the global RNG
        torch.manual_seed(real_opts.seed)
        scores = metrics.score_images(scorers, images.split(500))
    print(scores_line(scores, f"{len(images)} images of {opts.images} at {side} px, against {len(real)} real"))
    append_metrics(Path(folder) / METRICS_LOG_NAME, [{"images": str(opts.images), "count": len(images), **scores}])
    return scores


def image_files(folder):
    """The image files in --images DIR (searched recursively); one line for a folder that cannot be scored."""
    root = Path(folder)
    if root.exists() and not root.is_dir():
        raise UserError(f"--images {folder} is a file: it names a folder of images")
    if not root.is_dir():
        raise UserError(f"--images {folder} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:  # FID needs a covariance
        raise UserError(
            f"--images {folder} holds {len(files)} image files; scoring needs 2 at the least "
            f"({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return files


def decode_images(folder, files, side, workers):
    """The readable files as uint8 (N, 3, side, side), decoded as a training folder is; a warning for the others."""
    skipped = []
    chunks = list(decode_files(files, side, workers, skipped))
    readable = sum(map(len, chunks))
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} of {len(files)} files in {folder} that are not readable images", stacklevel=2
        )
    if readable < 2:
        raise UserError(f"--images {folder} holds {readable} readable images; scoring needs 2 at the least")
    return torch.cat(chunks)
