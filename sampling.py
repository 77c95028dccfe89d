"""Drawing from a generator, and scoring it while training (--fid-every): the grids of the fixed
noise, batches of samples of any class, and FID, IS, KID and the neighbour measures.

Every sampler draws its noise from its own torch.Generator, never from the global RNG: scoring
FID in the middle of a run must not change what the run trains next.
"""

import sys

import torch

import metrics
import models
from imagesize import shape_size
from runtime import mixed_seed

GRID_COLUMNS = 8  # a class-row grid: one noise vector per column, drawn as every row's class
MAX_GRID_ROWS = 10


def generator_of(flags, num_classes=0):
    """The generator a checkpoint's flags describe (as startup.upgraded reads them)."""
    return models.build_generator(
        flags["arch"], flags["nz"], flags["ngf"], flags["image_size"], flags["nc"], num_classes, flags["g_output"]
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
    """Real images laid out as grid_samples' fakes: real_samples.png's 64 (drawn_real_samples), or
    each grid class's first GRID_COLUMNS (repeated where a class has fewer)."""
    if not opts.num_classes:
        return drawn_real_samples(images, opts.seed)
    rows = []
    for label in grid_classes(opts.num_classes, opts.seed).tolist():
        members = (labels == label).nonzero().flatten()
        rows.append(members.repeat(GRID_COLUMNS)[:GRID_COLUMNS])
    return images[torch.cat(rows).to(images.device) if isinstance(images, torch.Tensor) else torch.cat(rows)]


def drawn_real_samples(images, seed, count=64):
    """real_samples.png's images: count drawn at random from the whole data (every class of a folder
    of classes), the same for a seed, through a generator of their own: the training's random
    stream is the one it would be without the picture."""
    rows = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]
    return images[rows.to(images.device) if isinstance(images, torch.Tensor) else rows].cpu()


def open_metrics(opts, runtime, real_uint8, feature=None, scorers=None):
    """FID, IS and KID (scorers, when already built) with the real images' statistics loaded (cached on disk)."""
    scorers = scorers or metrics.build_metrics(runtime.device, opts.eval_samples, feature)
    # precision and recall compare as many real images as generated ones: keep that many features
    keep_real = max(metrics.KID_REAL_LIMIT, opts.eval_samples)
    metrics.add_real_images(scorers, real_uint8, real_cache(opts, real_uint8), keep_real=keep_real)
    return scorers


def real_cache(opts, real_uint8):
    """Where the real images' statistics are cached: a folder's beside its run's checkpoint;
    CIFAR-10's in --dataroot, shared by every run, so a --subset's name there holds the seed that
    drew it (another seed's subset holds other images)."""
    shared = opts.dataset == "cifar10"
    drawn = f"{len(real_uint8)}_seed{opts.seed}" if shared and opts.subset is not None else len(real_uint8)
    folder = opts.dataroot if shared else opts.checkpoint_dir
    return metrics.real_cache_path(folder, opts.dataset, drawn, shape_size(real_uint8.shape))


def open_class_scorer(opts, scorers, real_uint8, labels, num_classes):
    """Intra-FID and class consistency for a conditional run (None for an unconditional one)."""
    if not num_classes:
        return None
    cache = metrics.class_cache_path(real_cache(opts, real_uint8))
    return metrics.ClassScorer(scorers["fid"].inception, real_uint8, labels, num_classes, cache)


def score(scorers, G, opts, runtime, seed, class_scorer=None):
    """FID, IS, KID, precision, recall, density and coverage of opts.eval_samples images (of every
    class in turn for a conditional G, with intra-FID and class consistency where class_scorer is
    given); the global RNG is left as it was."""
    devices = [runtime.device] if runtime.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # IS and KID shuffle with the global RNG
        torch.manual_seed(seed)
        labels = balanced_labels(opts.eval_samples, G.num_classes)
        truncation = opts.truncation
        batches = generated_batches(G, opts.eval_samples, G.nz, runtime, seed, labels=labels, truncation=truncation)
        if class_scorer is not None:
            batches = class_scorer.observe(batches, labels)
        scores = metrics.score_generator(scorers, batches)
    if class_scorer is not None:
        scores.update(class_scorer.compute())
    return scores


class TrainingEvaluator:
    """--fid-every: scores at the end of some epochs, keeps best.pt; without Inception weights it
    warns once and training goes on (the saved flags still say --fid-every, for a later resume)."""

    def __init__(self, opts, runtime, real_uint8, feature=None, labels=None):
        self.opts, self.runtime, self.real_uint8, self.feature = opts, runtime, real_uint8, feature
        self.labels = labels  # the real images' classes, for intra-FID and class consistency
        self.scorers, self.class_scorer, self.unavailable = None, None, False

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
            num_classes = self.opts.num_classes if self.labels is not None else 0
            self.class_scorer = open_class_scorer(self.opts, self.scorers, self.real_uint8, self.labels, num_classes)
        seed = mixed_seed(self.opts.seed, epoch)
        return score(self.scorers, G, self.opts, self.runtime, seed, self.class_scorer)
