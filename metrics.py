"""Image-quality metrics for gan.py: FID, Inception Score and KID via torchmetrics, and
precision, recall, density and coverage from the same Inception features.

A module of its own because it wraps an optional, heavy dependency (Inception weights
downloaded on first use) and its real-image cache. torchmetrics computes FID, IS and
KID; no maintained library computes all four nearest-neighbour metrics from features (torch-fidelity
has precision and recall only, through full distance matrices), so they are written here, in chunks.
"""

from pathlib import Path

import torch

from checkpoint import save_checkpoint, why_unreadable
from errors import UserError
from files import no_new_empty_folders

KID_REAL_LIMIT = 10_000  # KID keeps every real feature; more than this adds memory, not accuracy
# Kept for each generated image scored: KID's 2,048 Inception pool features and IS's 1,008 logits,
# in float32, each concatenated into a copy when scored (the real images' side is not counted: a
# lower bound, so that no evaluation that fits is refused)
SCORING_BYTES_PER_IMAGE = 2 * 4 * (2048 + 1008)
PRECISION_RECALL_K = 3  # Kynkaanniemi et al. 2019, and StyleGAN2-ADA's pr50k3
DENSITY_COVERAGE_K = 5  # Naeem et al. 2020, and StudioGAN
DISTANCE_CHUNK_VALUES = 1 << 25  # distances held at once (128 MiB in fp32): 50k x 50k never is
REAL_ORDER_SEED = 0  # the real images are fed in one fixed shuffled order (see add_real_images)
INCEPTION_URL = (  # torch-fidelity's FID Inception weights, as torchmetrics downloads them
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
WEIGHTS_HINT = (
    "the Inception weights could not be loaded ({reason}). They are downloaded on first use "
    "into {folder}; on an offline machine download " + INCEPTION_URL + " elsewhere and copy it there"
)


class MetricsUnavailable(UserError):
    """Inception weights or the metric packages cannot be had (offline, not installed)."""


def build_metrics(device, eval_samples, feature=None):
    """FID, IS and KID metrics on device; feature replaces Inception (tests use a tiny net)."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.inception import InceptionScore
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError as error:
        raise MetricsUnavailable(
            f"metrics need torchmetrics[image] ({error}); pip install -r requirements.txt"
        ) from None
    subset_size = min(1000, eval_samples)
    # under torchrun only rank 0 scores, while the others wait at a barrier: a metric that gathered
    # its state across ranks in compute() would pair its collectives with that barrier and hang
    local = {"sync_on_compute": False}
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    if feature is None:
        refuse_unsafe_weights(folder / INCEPTION_URL.rsplit("/", 1)[1])
    try:
        # torch hub makes its folders before it downloads: a failed download leaves none of them behind
        with no_new_empty_folders([folder]):
            metrics = {
                "fid": FrechetInceptionDistance(feature=feature or 2048, reset_real_features=False, **local),
                "is": InceptionScore(feature=feature or "logits_unbiased", **local),
                "kid": KernelInceptionDistance(
                    feature=feature or 2048, subset_size=subset_size, reset_real_features=False, **local
                ),
            }
    except (OSError, RuntimeError, ValueError, ImportError) as error:  # download or hub failures
        raise MetricsUnavailable(WEIGHTS_HINT.format(reason=_short(error), folder=folder)) from None
    return {name: metric.to(device) for name, metric in metrics.items()}


def refuse_unsafe_weights(path):
    """torch-fidelity unpickles the weights file in full (weights_only=False), where a file copied in
    by hand could run code: a file there must load as tensors alone first."""
    if not path.is_file():
        return  # downloaded from INCEPTION_URL on first use
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types; all mean "not the weights"
        raise MetricsUnavailable(
            f"{path} is not the Inception weights file: {why_unreadable(error)}; remove it, and it is "
            f"downloaded from {INCEPTION_URL} on first use"
        ) from None


def _short(error):
    text = str(error).strip().splitlines()
    return (text[0] if text else error.__class__.__name__)[:160]


def add_real_images(metrics, real_uint8, cache_path, batch_size=256, keep_real=KID_REAL_LIMIT):
    """Feed the real images to FID and KID once; later runs read the cached statistics.

    The images go in one fixed shuffled order, so the first keep_real of them, whose features KID
    keeps and precision/recall/density/coverage use, are a random sample of the whole set (a
    folder lists its files sorted, often class by class). FID's sums do not depend on the order.
    """
    fid, kid = metrics["fid"], metrics["kid"]
    cache_path = Path(cache_path)
    if cache_path.is_file():
        try:
            cached = torch.load(cache_path, map_location="cpu", weights_only=True)
            _restore_real(fid, kid, cached, min(keep_real, len(real_uint8)))
            return
        except Exception:  # a cache from another version or a torn file: recompute it
            pass
    device = fid.device
    order = torch.randperm(len(real_uint8), generator=torch.Generator().manual_seed(REAL_ORDER_SEED))
    for start in range(0, len(real_uint8), batch_size):
        batch = real_uint8[order[start : start + batch_size]].to(device)
        fid.update(batch, real=True)
        if start < keep_real:
            kid.update(batch, real=True)
    save_checkpoint(_real_state(fid, kid), cache_path)


def _real_state(fid, kid):
    return {
        "fid_sum": fid.real_features_sum.cpu(),
        "fid_cov_sum": fid.real_features_cov_sum.cpu(),
        "fid_count": fid.real_features_num_samples.cpu(),
        "kid_features": torch.cat(kid.real_features).cpu(),
        "real_order_seed": REAL_ORDER_SEED,
    }


def _restore_real(fid, kid, cached, real_kept):
    if cached["fid_sum"].shape != fid.real_features_sum.shape:
        raise ValueError("cached statistics come from another feature extractor")
    if cached.get("real_order_seed") != REAL_ORDER_SEED or len(cached["kid_features"]) < real_kept:
        raise ValueError("the cache keeps fewer real features, or others, than this evaluation needs")
    fid.real_features_sum = cached["fid_sum"].to(fid.device)
    fid.real_features_cov_sum = cached["fid_cov_sum"].to(fid.device)
    fid.real_features_num_samples = cached["fid_count"].to(fid.device)
    kid.real_features = [cached["kid_features"].to(kid.device)]


def score_generator(metrics, sample_batches):
    """FID, IS, KID, precision, recall, density and coverage of generated images;
    sample_batches yields float images in [-1, 1]."""
    return score_images(metrics, (images.float().add(1).mul(127.5).round().clamp(0, 255) for images in sample_batches))


@torch.no_grad()
def score_images(metrics, batches):
    """The scores of score_generator for batches of images with values 0..255 (uint8 or float)."""
    for metric in metrics.values():
        _reset_fake(metric)
    for images in batches:
        # greyscale images as the RGB files they decode to
        images_uint8 = images.to(metrics["fid"].device, torch.uint8).expand(-1, 3, -1, -1)
        metrics["fid"].update(images_uint8, real=False)
        metrics["kid"].update(images_uint8, real=False)
        metrics["is"].update(images_uint8)
    is_mean, is_std = metrics["is"].compute()
    kid = metrics["kid"]
    # KID draws subsets of subset_size from each side; a small dataset holds fewer real images
    kid.subset_size = min(kid.subset_size, sum(map(len, kid.real_features)), sum(map(len, kid.fake_features)))
    kid_mean, kid_std = kid.compute()
    # KID keeps the Inception pool features FID sums (the same 2048 numbers per image), so the
    # nearest-neighbour metrics read them there: no second pass through Inception
    neighbours = nearest_neighbour_scores(torch.cat(kid.real_features), torch.cat(kid.fake_features))
    return {
        "fid": float(metrics["fid"].compute()),
        "is": float(is_mean),
        "is_std": float(is_std),
        "kid": float(kid_mean),
        "kid_std": float(kid_std),
        **neighbours,
    }


def nearest_neighbour_scores(real_features, fake_features, chunk_values=DISTANCE_CHUNK_VALUES):
    """Precision and recall (Kynkaanniemi et al. 2019, k=3), density and coverage (Naeem et al.
    2020, k=5) of equally many real and generated feature vectors; {} when there are too few.

    The papers compare sets of equal size (a k-NN radius shrinks as its set grows): the first
    min(len(real), len(fake)) of each are used. Precision: the share of generated points inside
    some real point's k-NN ball; recall: the share of real points inside some generated point's
    ball (a point on the edge is inside, as in the paper's code). Density: the real balls each
    generated point is in, over k, averaged (about 1 when the sets match; it can pass 1); coverage:
    the share of real balls holding a generated point (strict inequalities, as in their code).
    """
    count = min(len(real_features), len(fake_features))
    if count <= max(PRECISION_RECALL_K, DENSITY_COVERAGE_K):
        return {}  # no k-th neighbour to measure a ball by
    real, fake = real_features[:count].float(), fake_features[:count].float()
    real_radii = kth_neighbour_distances(real, (PRECISION_RECALL_K, DENSITY_COVERAGE_K), chunk_values)
    fake_radii = kth_neighbour_distances(fake, (PRECISION_RECALL_K,), chunk_values)[PRECISION_RECALL_K]
    precision_radii, density_radii = real_radii[PRECISION_RECALL_K][None, :], real_radii[DENSITY_COVERAGE_K][None, :]
    fake_in_a_real_ball = torch.zeros(count, dtype=torch.bool, device=fake.device)
    real_in_a_fake_ball = torch.zeros(count, dtype=torch.bool, device=fake.device)
    nearest_fake = torch.full((count,), float("inf"), device=fake.device)
    balls_entered = 0
    for start, distances in distance_chunks(fake, real, chunk_values):  # rows: generated, columns: real
        fake_in_a_real_ball[start : start + len(distances)] = (distances <= precision_radii).any(dim=1)
        real_in_a_fake_ball |= (distances <= fake_radii[start : start + len(distances), None]).any(dim=0)
        balls_entered += int((distances < density_radii).sum())
        nearest_fake = torch.minimum(nearest_fake, distances.min(dim=0).values)
    return {
        "precision": int(fake_in_a_real_ball.sum()) / count,
        "recall": int(real_in_a_fake_ball.sum()) / count,
        "density": balls_entered / (DENSITY_COVERAGE_K * count),
        "coverage": int((nearest_fake < real_radii[DENSITY_COVERAGE_K]).sum()) / count,
    }


def distance_chunks(rows, columns, chunk_values=DISTANCE_CHUNK_VALUES):
    """(first row, Euclidean distances of a block of rows to every column), block by block."""
    chunk_rows = max(1, chunk_values // len(columns))
    for start in range(0, len(rows), chunk_rows):
        yield start, torch.cdist(rows[start : start + chunk_rows], columns)


def kth_neighbour_distances(features, ks, chunk_values=DISTANCE_CHUNK_VALUES):
    """{k: each point's distance to its k-th nearest other point of the same set} for k in ks.

    A point is its own nearest neighbour at distance 0, hence the (k+1)-th smallest distance.
    """
    largest = max(ks)
    per_k = {k: [] for k in ks}
    for _, distances in distance_chunks(features, features, chunk_values):
        smallest = distances.topk(largest + 1, dim=1, largest=False).values  # ascending
        for k in ks:
            per_k[k].append(smallest[:, k])
    return {k: torch.cat(values) for k, values in per_k.items()}


def _reset_fake(metric):
    """Drop the generated images' state and keep the real one (reset_real_features=False)."""
    metric.reset()
    if hasattr(metric, "features"):  # InceptionScore keeps only generated features
        metric.features = []


def real_cache_path(folder, dataset, count, image_size):
    return Path(folder) / f"fid_real_{dataset}_{count}_{image_size}px.pt"


# ---------------------------------------------------------------- class-conditional scores


class ClassScorer:
    """Intra-FID (the mean over classes of each class's FID against that class's real images, as
    StudioGAN reports it) and class consistency (the share of samples whose features lie nearest
    the real mean of the class they were drawn as) for a class-conditional generator.

    Features come from FID's own network; the distance from torchmetrics' Frechet formula.
    """

    def __init__(self, feature_net, real_uint8, labels, num_classes, cache_path, batch_size=256):
        self.feature_net, self.num_classes = feature_net, num_classes
        self.real = self.real_statistics(real_uint8, labels, Path(cache_path), batch_size)
        counts, sums, _ = self.real
        self.real_means = (sums / counts.clamp_min(1).unsqueeze(1)).float()
        self.reset()

    def real_statistics(self, real_uint8, labels, cache_path, batch_size):
        if cache_path.is_file():
            try:
                cached = torch.load(cache_path, map_location="cpu", weights_only=True)
                if cached["counts"].shape == (self.num_classes,):
                    return cached["counts"], cached["sums"], cached["products"]
            except Exception:  # another version's or a torn file: recompute it
                pass
        statistics = None
        for start in range(0, len(real_uint8), batch_size):
            batch = real_uint8[start : start + batch_size].to(self.device)
            statistics = self.accumulate(statistics, self.features(batch), labels[start : start + batch_size])
        counts, sums, products = statistics
        save_checkpoint({"counts": counts, "sums": sums, "products": products}, cache_path)
        return statistics

    @torch.no_grad()
    def features(self, images_uint8):
        return self.feature_net(images_uint8).double().cpu()

    def accumulate(self, statistics, features, labels):
        """statistics (per-class counts, sums, sums of outer products; None: none yet) plus features."""
        if statistics is None:
            size = features.shape[1]
            statistics = (
                torch.zeros(self.num_classes, dtype=torch.float64),
                torch.zeros(self.num_classes, size, dtype=torch.float64),
                torch.zeros(self.num_classes, size, size, dtype=torch.float64),
            )
        counts, sums, products = statistics
        labels = labels.cpu()
        counts += torch.bincount(labels, minlength=self.num_classes).double()
        sums.index_add_(0, labels, features)
        products.index_add_(0, labels, features.unsqueeze(2) * features.unsqueeze(1))
        return statistics

    def reset(self):
        self.fake, self.hits, self.seen = None, 0, 0

    def observe(self, sample_batches, labels):
        """Pass sample_batches (floats in [-1, 1], of the classes in labels, in order) through,
        adding each batch to the generated statistics."""
        self.reset()
        start = 0
        for images in sample_batches:
            images_uint8 = images.float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
            features = self.features(images_uint8.expand(-1, 3, -1, -1).to(self.device))
            batch_labels = labels[start : start + len(images)].cpu()
            self.fake = self.accumulate(self.fake, features, batch_labels)
            nearest = torch.cdist(features.float(), self.real_means).argmin(dim=1)
            self.hits += int((nearest == batch_labels).sum())
            self.seen += len(images)
            start += len(images)
            yield images

    @property
    def device(self):
        return next(iter(self.feature_net.parameters()), torch.empty(0)).device

    def compute(self):
        """{"intra_fid": mean per-class FID, "class_consistency": share} of the batches observed."""
        from torchmetrics.image.fid import _compute_fid

        distances = []
        for label in range(self.num_classes if self.fake is not None else 0):
            real, fake = [statistic[label] for statistic in self.real], [statistic[label] for statistic in self.fake]
            if real[0] < 2 or fake[0] < 2:
                continue  # a covariance needs two samples
            distances.append(float(_compute_fid(*mean_and_covariance(*real), *mean_and_covariance(*fake))))
        intra = sum(distances) / len(distances) if distances else float("nan")
        return {"intra_fid": intra, "class_consistency": self.hits / max(self.seen, 1)}


def mean_and_covariance(count, total, products):
    """The mean and the unbiased covariance of count features from their sum and sum of outer products."""
    mean = total / count
    return mean, (products - count * torch.outer(mean, mean)) / (count - 1)


def class_cache_path(real_cache):
    """Where the real images' per-class statistics go, beside the overall ones."""
    return Path(real_cache).with_name(Path(real_cache).stem + "_classes.pt")
