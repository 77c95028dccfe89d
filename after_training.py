"""The modes that use a trained generator: --generate (PNGs of any class), --interpolate (latent
walks) and --evaluate (a checkpoint's samples, or any folder of images, scored against the
training data).
"""

import itertools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import artifacts
import export
import metrics
import snapshots
from checkpoint import exported_file, latest_checkpoint, load_generator_file
from classnames import GENERATED_GRID, class_folder, index_of, refuse_other_classes
from errors import UserError, count_text
from faults import Interrupted, exit_code_of
from files import check_writable
from folders import IMAGE_SUFFIXES, decode_files, refuse_beyond_memory, refuse_missing_folder
from generator import generator_from
from imagesize import image_sides, shape_size
from metricslog import METRICS_LOG_NAME, append_metrics
from modes import refuse_flags_of_other_datasets
from runtime import random_seed
from sampling import (
    GRID_COLUMNS,
    MAX_GRID_ROWS,
    draw_noise,
    generated_batches,
    grid_classes,
    open_class_scorer,
    open_metrics,
    sample,
    score,
)
from startup import refuse_architecture_change, refuse_saved_folders, refuse_scoring_beyond_memory, upgraded
from utils import load_dataset, load_training_data, refuse_non_square_cifar10

# the peak memory of --interpolate per value of its walks' images, with a margin (BENCHMARKS.md)
WALK_BYTES_PER_VALUE = 32


def use_generator(opts, explicit, runtime, metric_feature=None):
    """The mode the flags chose: --generate, --interpolate, or --evaluate (of a checkpoint or a folder)."""
    if opts.generate is not None:
        return generate(opts, explicit, runtime)
    if opts.interpolate:
        return interpolate(opts, explicit, runtime)
    if opts.export is not None:
        return export_generator(opts, explicit, runtime)
    if opts.images is not None:
        return evaluate_images(opts, explicit, runtime, metric_feature)
    return evaluate(opts, explicit, runtime, metric_feature)


def export_generator(opts, explicit, runtime):
    """--export DIR: the generator as a folder other programs load without this one (export.py)."""
    G, state = load_generator_for_use(opts, explicit, runtime)
    seed = export.SAMPLE_SEED if opts.seed is None else opts.seed  # of samples.png
    onnx_difference, pt2_difference = export.export(
        G, state["flags"], state, checkpoint_path(opts), opts.export, runtime, seed
    )
    print(
        f"wrote {opts.export}/: model.safetensors, config.json, README.md, samples.png, generator.onnx "
        f"(within {onnx_difference:.1g} of the generator) and generator.pt2 (within {pt2_difference:.1g})"
    )


def load_generator_for_use(opts, explicit, runtime):
    """The generator of a checkpoint (its EMA copy when it has one, unless --raw) and what was
    loaded with it (its flags, upgraded)."""
    path = checkpoint_path(opts)
    state = upgraded(load_generator_file(path), path)
    if opts.raw:
        refuse_raw(state, path)
    refuse_architecture_change(
        opts, explicit, state["flags"], f"checkpoint {path} was trained with another architecture"
    )
    G = generator_from(state, path, runtime, use_ema=False if opts.raw else None)
    print(f"using the {'EMA' if G.uses_ema else 'raw'} generator of {path} ({trained_as(state, path)})")
    return G, state


def refuse_raw(state, path):
    """--raw asks for the trained G, which a file holding the moving average alone does not: a
    snapshot of a run with an EMA, netG_ema.pth, or an export of the EMA."""
    if state.get("netG_ema") is not None and (snapshots.is_snapshot(state) or state.get("plain")):
        what = "is a snapshot of" if snapshots.is_snapshot(state) else "holds"
        raise UserError(
            f"--raw: {path} {what} the moving average (EMA) alone; the trained generator is in the run's checkpoint.pt"
        )


def trained_as(state, path):
    """Where a loaded file's flags came from, or its epoch."""
    if snapshots.is_snapshot(state):
        return f"a snapshot at step {state['step']}"
    if state.get("plain"):
        return f"flags from {path.parent / ('config.json' if path.suffix == '.safetensors' else 'flags.json')}"
    return f"epoch {state['epoch']}"


def checkpoint_path(opts):
    return exported_file(opts.checkpoint) if opts.checkpoint else latest_checkpoint(opts.checkpoint_dir)


def class_index(G, name, path, flag="--class"):
    """The index of the class a user named (by name, or by index), or a UserError listing the classes."""
    if not G.num_classes:
        raise UserError(f"{flag} {name}: {path} was trained without --conditional, so it has no classes")
    named = index_of(G.class_names, name)
    if named is not None:
        return named
    # past int()'s 4,300 digits a number is a ValueError; leading zeros ("03") are still an index
    if name.isdecimal() and len(name.lstrip("0")) <= len(str(G.num_classes)) and int(name) < G.num_classes:
        return int(name)
    listed = ", ".join(f"{index}: {class_name}" for index, class_name in enumerate(G.class_names))
    raise UserError(f"{flag} {name}: no such class in {path}; its classes are {listed}")


def generate(opts, explicit, runtime):
    """N images: of one class (--class), of every class (one sub-folder each), or unconditional."""
    G, state = load_generator_for_use(opts, explicit, runtime)
    flags = state["flags"]
    if opts.class_name is not None:
        classes = [class_index(G, opts.class_name, checkpoint_path(opts))]
    else:
        classes = list(range(G.num_classes)) or [None]
    folder = fresh_generated_folder(opts.image_dir)
    seed = opts.seed if opts.seed is not None else random_seed()
    firsts = []
    try:
        for label in classes:
            target = folder if label is None else class_folder(folder, G.class_names[label])
            firsts.append(write_generated(G, label, opts, flags["nz"], runtime, seed, target))
        save_generated_grid(G, classes, firsts, folder / GENERATED_GRID)
    except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM: say what is on disk
        written = sum(1 for _ in folder.rglob("[0-9]*.png"))
        total = count_text(opts.generate * len(classes), "image")
        raise Interrupted(
            exit_code_of(interrupt), f"interrupted: wrote {written} of {total} to {folder}/ (seed {seed})"
        ) from None
    if classes == [None]:
        print(f"wrote {count_text(opts.generate, 'image')} and grid.png to {folder}/ (seed {seed})")
    elif len(classes) == 1:
        name = G.class_names[classes[0]]
        target = class_folder(folder, name)
        print(f"wrote {opts.generate} images of class {name} into {target}/, and grid.png (seed {seed})")
    else:
        names = ", ".join(G.class_names[label] for label in classes)
        print(
            f"wrote {opts.generate} images of each class ({names}) into {folder}/<class>/, and grid.png (seed {seed})"
        )


def write_generated(G, label, opts, nz, runtime, seed, folder):
    """opts.generate images of class label (None: unconditional) as PNGs in folder; returns the first 64.

    Every class is drawn from the same noise (the same seed): image k of each class shares its noise.
    """
    digits = max(4, len(str(opts.generate - 1)))
    labels = None if label is None else torch.full((opts.generate,), label)
    index, first = 0, []
    for images in generated_batches(G, opts.generate, nz, runtime, seed, labels=labels, truncation=opts.truncation):
        for image in images.cpu():
            artifacts.save_png(image.add(1).div(2).clamp(0, 1), folder / f"{index:0{digits}d}.png")
            index += 1
        first.extend(images[: 64 - len(first)].cpu())
    return first


def save_generated_grid(G, classes, firsts, path):
    """grid.png: the first 64 images of one class (or of an unconditional G), or a labelled row
    of each class (up to MAX_GRID_ROWS of them)."""
    if len(classes) == 1:
        images = torch.stack(firsts[0])
        artifacts.save_grid(images, path, nrow=artifacts.grid_side(len(images)))
        return
    shown = classes[:MAX_GRID_ROWS]
    columns = min(GRID_COLUMNS, len(firsts[0]))
    images = torch.stack([image for first in firsts[: len(shown)] for image in first[:columns]])
    grid = artifacts.labelled_grid_image(images, [G.class_names[label] for label in shown], nrow=columns)
    artifacts.save_pil(grid, path)


def fresh_generated_folder(image_dir):
    """image_dir/generated, or generated-2, -3, ... when it holds an earlier --generate's images:
    the images of two checkpoints (or seeds) are never mixed in one folder, nor any overwritten."""
    base = Path(image_dir) / "generated"
    for number in itertools.count(1):
        folder = base if number == 1 else base.with_name(f"generated-{number}")
        if not os.path.lexists(folder) or artifacts.is_empty_folder(folder):  # a broken link is stepped around too
            if number > 1:
                if base.is_dir():
                    what = f"{base}/ holds the images of an earlier --generate"
                else:
                    what = f"{base} is a file" if base.is_file() else f"{base} is a link to nowhere"
                print(f"{what}: writing into {folder}/")
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
    """Latent walks as a grid (a row per walk) and a GIF: between noise vectors, within one class
    (--class) or one class per row (a conditional G), or from --class to --to-class at fixed noise."""
    G, state = load_generator_for_use(opts, explicit, runtime)
    flags = state["flags"]
    walk = plan_walks(G, opts, flags, walks)
    refuse_walks_beyond_memory(walk.count, opts.steps, flags["image_size"])
    folder = Path(opts.image_dir)
    check_writable(folder)
    seed = opts.seed if opts.seed is not None else random_seed()
    noise, labels = walk_inputs(walk, flags["nz"], opts, seed)
    # in batches, as --generate: a long walk must not need G's activations for all its images at once
    flat_labels = [None] * len(noise.flatten(0, 1).split(500)) if labels is None else labels.split(500)
    images = torch.cat([sample(G, batch, runtime, y) for batch, y in zip(noise.flatten(0, 1).split(500), flat_labels)])
    images = images.view(opts.steps, walk.count, *images.shape[1:])
    # rows are walks, columns are steps along them
    frames = [artifacts.grid_image(images[step], nrow=artifacts.grid_side(walk.count)) for step in range(opts.steps)]
    grid_path, gif_path = fresh_interpolation_paths(folder)
    try:
        rows = images.transpose(0, 1).flatten(0, 1)
        if walk.row_names is None:
            artifacts.save_grid(rows, grid_path, nrow=opts.steps)
        else:
            artifacts.save_pil(artifacts.labelled_grid_image(rows, walk.row_names, nrow=opts.steps), grid_path)
        artifacts.save_gif(frames + frames[::-1][1:-1], gif_path, frame_seconds=0.15)
    except KeyboardInterrupt as interrupt:
        written = grid_path.name if grid_path.is_file() else "nothing"
        raise Interrupted(exit_code_of(interrupt), f"interrupted: wrote {written} to {folder}/") from None
    print(
        f"wrote {grid_path.name} and {gif_path.name} to {folder}/ ({walk.count} walks{walk.what}, "
        f"{opts.steps} steps, seed {seed})"
    )


def refuse_walks_beyond_memory(walks, steps, image_size):
    """The walks' images are held whole, for the grid and the GIF: more than the memory can hold is
    refused before minutes of drawing, not ended by the system."""
    width, height = image_sides(image_size)
    refuse_beyond_memory(
        walks * steps * 3 * width * height * WALK_BYTES_PER_VALUE,
        f"--steps {steps}: {walks} walks of {width}x{height} px images need about",
        ": take fewer --steps",
    )


def fresh_interpolation_paths(folder):
    """interpolation.png and .gif in folder, or interpolation-2, -3, ... when an earlier --interpolate
    wrote those: as --generate's images, walks are never replaced."""
    for number in itertools.count(1):
        stem = "interpolation" if number == 1 else f"interpolation-{number}"
        paths = folder / f"{stem}.png", folder / f"{stem}.gif"
        if not any(os.path.lexists(path) for path in paths):
            return paths


@dataclass(frozen=True)
class Walks:
    """What --interpolate walks: count walks, each in a class (classes, or None) or from one class
    to another at fixed noise (start_class to end_class); rows named by class, or not."""

    count: int
    classes: torch.Tensor | None = None
    start_class: int | None = None
    end_class: int | None = None
    num_classes: int = 0
    row_names: list | None = None
    what: str = ""


def plan_walks(G, opts, flags, walks):
    path = checkpoint_path(opts)
    if opts.class_name is None:
        if not G.num_classes:
            return Walks(walks)
        classes = grid_classes(G.num_classes, flags.get("seed") or 0)
        names = [G.class_names[label] for label in classes.tolist()]
        return Walks(len(classes), classes, row_names=names, what=", one per class")
    start = class_index(G, opts.class_name, path)
    if opts.to_class is None:
        return Walks(walks, torch.full((walks,), start), what=f" within {G.class_names[start]}")
    end = class_index(G, opts.to_class, path, "--to-class")
    what = f" from {G.class_names[start]} to {G.class_names[end]}"
    return Walks(walks, start_class=start, end_class=end, num_classes=G.num_classes, what=what)


def walk_inputs(walk, nz, opts, seed):
    """The noise (steps, walks, nz, 1, 1) and the labels of the flattened walks (None: unconditional).

    Labels are class indices, or for a walk between classes, weights over the classes that move
    from one to the other while the noise holds still.
    """
    generator = torch.Generator().manual_seed(seed)
    start = draw_noise(walk.count, nz, generator, opts.truncation)
    end = draw_noise(walk.count, nz, generator, opts.truncation)
    fractions = torch.linspace(0, 1, opts.steps)
    if walk.end_class is None:
        noise = slerp(start, end, fractions)  # (steps, walks, ...)
        labels = None if walk.classes is None else walk.classes.repeat(opts.steps)
        return noise, labels
    noise = start.unsqueeze(0).expand(opts.steps, *start.shape)
    weights = torch.zeros(opts.steps, walk.num_classes)
    weights[:, walk.start_class] += 1 - fractions
    weights[:, walk.end_class] += fractions
    return noise, weights.repeat_interleave(walk.count, dim=0)


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
    G, state = load_generator_for_use(opts, explicit, runtime)
    flags = state["flags"]
    path = checkpoint_path(opts)
    refuse_saved_folders(flags, opts, explicit, path, ("dataroot",))
    # the log row and the real statistics go beside the checkpoint evaluated, unless told otherwise
    folder = opts.checkpoint_dir if "checkpoint_dir" in explicit else str(path.parent)
    check_writable(folder)  # before the minutes of scoring, not after
    # the data it trained on, unless typed now; batch_size too: the dataset must hold one batch
    trained_on = {name: flags[name] for name in ("dataset", "subset", "batch_size") if name in flags}
    typed = {name: getattr(opts, name) for name in explicit if name in trained_on}
    run_seed = flags.get("seed") or 0
    seed = opts.seed if opts.seed is not None else run_seed  # the samples' noise
    # a --subset is drawn with the run's seed, as training drew it: --seed changes the samples alone
    eval_opts = opts.replace(
        **{**trained_on, **typed},
        image_size=flags["image_size"],
        seed=run_seed,
        checkpoint_dir=folder,
        class_names=tuple(G.class_names),
    )
    refuse_flags_of_other_datasets(eval_opts.dataset, explicit)
    refuse_non_square_cifar10(eval_opts)
    if eval_opts.dataset == "folder":  # told before Inception's weights, which may be the next complaint
        refuse_missing_folder(eval_opts.dataroot)
    refuse_scoring_beyond_memory(opts.eval_samples, runtime.device, f"--eval-samples {opts.eval_samples}")
    # Inception first: offline without its weights, fail before minutes of decoding the data
    scorers = metrics.build_metrics(runtime.device, eval_opts.eval_samples, feature)
    real = load_training_data(eval_opts, torch.device("cpu"), say=print, with_labels=bool(G.num_classes))
    if real.class_names is not None:
        refuse_other_classes(G.class_names, real.class_names, path, "the data")
    scorers = open_metrics(eval_opts, runtime, real.images, feature, scorers)
    class_scorer = open_class_scorer(eval_opts, scorers, real.images, real.labels, G.num_classes)
    scores = score(scorers, G, eval_opts, runtime, seed, class_scorer)
    classes = (
        f"  intra-FID {scores['intra_fid']:.2f}  class consistency {scores['class_consistency']:.3f}"
        if class_scorer is not None
        else ""
    )
    print(scores_line(scores, f"{opts.eval_samples} generated images") + classes)
    log_path = Path(folder) / METRICS_LOG_NAME
    append_metrics(log_path, [{"evaluate": str(path), **scores}])
    return scores


# ---------------------------------------------------------------- --evaluate --images DIR


def evaluate_images(opts, explicit, runtime, feature=None):
    """--evaluate --images DIR: any tool's images scored against the training data, as a checkpoint's are.

    Every image of DIR counts; each is brought to the real images' size the way a training folder is
    (resized bilinear to cover it, centre crop), and Inception then resizes both sides alike.
    """
    files = image_files(opts.images)  # a bad folder fails here, before minutes of decoding
    folder = opts.checkpoint_dir
    check_writable(folder)
    # the subset is drawn as training draws it; the dataset must hold one image, not a batch
    real_opts = opts.replace(batch_size=1, seed=opts.seed if opts.seed is not None else 0, eval_samples=len(files))
    refuse_flags_of_other_datasets(real_opts.dataset, explicit)
    refuse_non_square_cifar10(real_opts)
    refuse_scoring_beyond_memory(len(files), runtime.device, f"--images {opts.images}")
    # Inception first: offline without its weights, fail before minutes of decoding (KID's subsets
    # shrink to the images there are when scored)
    scorers = metrics.build_metrics(runtime.device, real_opts.eval_samples, feature)
    real = load_dataset(real_opts, torch.device("cpu"), say=print)
    size = shape_size(real.shape)  # a side, or "WIDTHxHEIGHT"
    images = decode_images(opts.images, files, size, opts.workers)
    scorers = open_metrics(real_opts.replace(eval_samples=len(images)), runtime, real, feature, scorers)
    devices = [runtime.device] if runtime.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # IS and KID shuffle with the global RNG
        torch.manual_seed(real_opts.seed)
        scores = metrics.score_images(scorers, images.split(500))
    print(scores_line(scores, f"{len(images)} images of {opts.images} at {size} px, against {len(real)} real"))
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
            f"--images {folder} holds {count_text(len(files), 'image file')}; scoring needs 2 at the least "
            f"({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return files


def decode_images(folder, files, image_size, workers):
    """The readable files as uint8 (N, 3, H, W) of image_size, decoded as a training folder is; a
    warning for the others."""
    skipped = []
    chunks = list(decode_files(files, image_size, workers, skipped))
    readable = sum(map(len, chunks))
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} of {len(files)} files in {folder} that are not readable images", stacklevel=2
        )
    if readable < 2:
        raise UserError(f"--images {folder} holds {readable} readable images; scoring needs 2 at the least")
    return torch.cat(chunks)
