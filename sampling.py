"""Using a trained generator: sampling, --generate, --interpolate and --evaluate.

Apart from gan.py so that the training file stays one sitting's read; the training loop
uses sample(), generated_batches() and open_metrics() from here for its grids and FID.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import utils
from models import Generator
from utils import ARCHITECTURE_FLAGS, UserError, latest_checkpoint


def build_generator(flags):
    return Generator(flags["nz"], flags["ngf"], flags["image_size"])


@torch.no_grad()
def sample(G, noise, runtime):
    was_training = G.training
    G.eval()
    with runtime.autocast():
        images = G(noise.to(runtime.device)).float()
    G.train(was_training)
    return images


def generated_batches(G, count, nz, runtime, batch_size=500, seed=None):
    """Yield `count` generated images in batches, so any count fits in memory."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed if seed is not None else torch.seed())
    for start in range(0, count, batch_size):
        noise = torch.randn(min(batch_size, count - start), nz, 1, 1, generator=generator)
        yield sample(G, noise, runtime)


def open_metrics(opts, runtime, real_uint8, during_training, feature=None):
    """Metrics with the real statistics loaded; None (with a warning) if unavailable while training."""
    import metrics

    try:
        scorers = metrics.build_metrics(runtime.device, opts.eval_samples, feature or METRIC_FEATURE)
    except metrics.MetricsUnavailable as error:
        if not during_training:
            raise
        print(f"warning: {error}; training goes on without FID", file=sys.stderr)
        return None
    cache_folder = opts.dataroot if opts.dataset == "cifar10" else opts.checkpoint_dir
    cache = metrics.real_cache_path(cache_folder, opts.dataset, len(real_uint8), real_uint8.shape[-1])
    metrics.add_real_images(scorers, real_uint8, cache)
    return scorers


METRIC_FEATURE = None  # tests put a small stand-in network here instead of Inception


def load_generator_for_use(opts, explicit, runtime):
    """The generator of a checkpoint (its EMA copy when it has one) for the modes below."""
    path = Path(opts.checkpoint) if opts.checkpoint else latest_checkpoint(opts.checkpoint_dir)
    state = utils.load_checkpoint(path)
    flags = state["flags"]
    mismatched = [name for name in ARCHITECTURE_FLAGS if name in explicit and flags.get(name) != getattr(opts, name)]
    if mismatched:
        given = ", ".join(
            f"--{n.replace('_', '-')} {getattr(opts, n)} (checkpoint: {flags.get(n)})" for n in mismatched
        )
        raise UserError(f"checkpoint {path} was trained with another architecture: {given}")
    try:
        G = build_generator(flags)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:  # RuntimeError: a negative size
        raise UserError(f"checkpoint {path} has unusable flags ({error})") from None
    use_ema = state.get("netG_ema") is not None
    utils.load_module_state(G, state["netG_ema"] if use_ema else state["netG"], "generator", path)
    print(f"using the {'EMA' if use_ema else 'raw'} generator of {path} (epoch {state['epoch']})")
    return G.to(runtime.device).eval(), flags


def generate(opts, explicit, runtime):
    G, flags = load_generator_for_use(opts, explicit, runtime)
    folder = Path(opts.image_dir) / "generated"
    utils.check_writable(folder)
    seed = utils.seed_or_random(opts.seed)
    digits = max(4, len(str(opts.generate - 1)))
    index, grid = 0, []
    for images in generated_batches(G, opts.generate, flags["nz"], runtime, seed=seed):
        for image in images.cpu():
            utils.save_png(image.add(1).div(2).clamp(0, 1), folder / f"{index:0{digits}d}.png")
            index += 1
        grid.extend(images[: 64 - len(grid)].cpu())
    utils.save_grid(torch.stack(grid), folder / "grid.png", nrow=utils.grid_side(len(grid)))
    print(f"wrote {index} images and grid.png to {folder}/ (seed {seed})")


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
    utils.check_writable(folder)
    seed = utils.seed_or_random(opts.seed)
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(walks, flags["nz"], 1, 1, generator=generator)
    end = torch.randn(walks, flags["nz"], 1, 1, generator=generator)
    noise = slerp(start, end, torch.linspace(0, 1, opts.steps))  # (steps, walks, ...)
    images = sample(G, noise.flatten(0, 1), runtime).view(
        opts.steps, walks, 3, flags["image_size"], flags["image_size"]
    )
    # rows are walks, columns are steps along them
    utils.save_grid(images.transpose(0, 1).flatten(0, 1), folder / "interpolation.png", nrow=opts.steps)
    frames = [utils.grid_image(images[step], nrow=utils.grid_side(walks)) for step in range(opts.steps)]
    utils.save_gif(frames + frames[::-1][1:-1], folder / "interpolation.gif", frame_seconds=0.15)
    print(
        f"wrote interpolation.png and interpolation.gif to {folder}/ ({walks} walks, {opts.steps} steps, seed {seed})"
    )


def evaluate(opts, explicit, runtime):
    G, flags = load_generator_for_use(opts, explicit, runtime)
    # batch_size too: the dataset must hold one batch, and a tiny training set holds no default one
    for name in ("dataset", "dataroot", "subset", "batch_size"):
        if name not in explicit and name in flags:
            setattr(opts, name, flags[name])
    opts.image_size = flags["image_size"]
    if opts.seed is None:
        opts.seed = flags.get("seed") or 0
    real = utils.load_dataset(opts, torch.device("cpu"))
    scorers = open_metrics(opts, runtime, real, during_training=False)
    import metrics

    scores = metrics.score_generator(
        scorers, generated_batches(G, opts.eval_samples, flags["nz"], runtime, seed=opts.seed)
    )
    print(
        f"FID {scores['fid']:.2f}  IS {scores['is']:.2f} ± {scores['is_std']:.2f}  "
        f"KID {scores['kid']:.4f} ± {scores['kid_std']:.4f}  ({opts.eval_samples} generated images)"
    )
    log_path = Path(opts.checkpoint_dir) / utils.METRICS_LOG_NAME
    utils.check_writable(log_path.parent)
    utils.append_metrics(
        log_path, [{"evaluate": str(opts.checkpoint or latest_checkpoint(opts.checkpoint_dir)), **scores}]
    )
    return scores
