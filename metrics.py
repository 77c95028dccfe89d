"""Image-quality metrics for gan.py: FID, Inception Score and KID via torchmetrics.

Kept apart from utils.py because it wraps an optional, heavy dependency (Inception
weights downloaded on first use) and its real-image cache. Nothing here is hand-written
maths: torchmetrics computes every figure.
"""

from pathlib import Path

import torch

from checkpoint import save_checkpoint
from utils import UserError

KID_REAL_LIMIT = 10_000  # KID keeps every real feature; more than this adds memory, not accuracy
WEIGHTS_HINT = (
    "the Inception weights could not be loaded ({reason}). They are downloaded on first use "
    "into {folder}; on an offline machine copy weights-inception-2015-12-05-6726825d.pth there"
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
    try:
        metrics = {
            "fid": FrechetInceptionDistance(feature=feature or 2048, reset_real_features=False),
            "is": InceptionScore(feature=feature or "logits_unbiased"),
            "kid": KernelInceptionDistance(feature=feature or 2048, subset_size=subset_size, reset_real_features=False),
        }
    except (OSError, RuntimeError, ValueError, ImportError) as error:  # download or hub failures
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        raise MetricsUnavailable(WEIGHTS_HINT.format(reason=_short(error), folder=folder)) from None
    return {name: metric.to(device) for name, metric in metrics.items()}


def _short(error):
    text = str(error).strip().splitlines()
    return (text[0] if text else error.__class__.__name__)[:160]


def add_real_images(metrics, real_uint8, cache_path, batch_size=256):
    """Feed the real images to FID and KID once; later runs read the cached statistics."""
    fid, kid = metrics["fid"], metrics["kid"]
    cache_path = Path(cache_path)
    if cache_path.is_file():
        try:
            cached = torch.load(cache_path, map_location="cpu", weights_only=True)
            _restore_real(fid, kid, cached)
            return
        except Exception:  # a cache from another version or a torn file: recompute it
            pass
    device = fid.device
    for start in range(0, len(real_uint8), batch_size):
        batch = real_uint8[start : start + batch_size].to(device)
        fid.update(batch, real=True)
        if start < KID_REAL_LIMIT:
            kid.update(batch, real=True)
    save_checkpoint(_real_state(fid, kid), cache_path)


def _real_state(fid, kid):
    return {
        "fid_sum": fid.real_features_sum.cpu(),
        "fid_cov_sum": fid.real_features_cov_sum.cpu(),
        "fid_count": fid.real_features_num_samples.cpu(),
        "kid_features": torch.cat(kid.real_features).cpu(),
    }


def _restore_real(fid, kid, cached):
    if cached["fid_sum"].shape != fid.real_features_sum.shape:
        raise ValueError("cached statistics come from another feature extractor")
    fid.real_features_sum = cached["fid_sum"].to(fid.device)
    fid.real_features_cov_sum = cached["fid_cov_sum"].to(fid.device)
    fid.real_features_num_samples = cached["fid_count"].to(fid.device)
    kid.real_features = [cached["kid_features"].to(kid.device)]


@torch.no_grad()
def score_generator(metrics, sample_batches):
    """FID, IS and KID of generated images; sample_batches yields float images in [-1, 1]."""
    for metric in metrics.values():
        _reset_fake(metric)
    for images in sample_batches:
        images_uint8 = images.float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
        images_uint8 = images_uint8.expand(-1, 3, -1, -1)  # greyscale images as the RGB files they decode to
        images_uint8 = images_uint8.to(metrics["fid"].device)
        metrics["fid"].update(images_uint8, real=False)
        metrics["kid"].update(images_uint8, real=False)
        metrics["is"].update(images_uint8)
    is_mean, is_std = metrics["is"].compute()
    kid = metrics["kid"]
    # KID draws subsets of subset_size from each side; a small dataset holds fewer real images
    kid.subset_size = min(kid.subset_size, sum(map(len, kid.real_features)), sum(map(len, kid.fake_features)))
    kid_mean, kid_std = kid.compute()
    return {
        "fid": float(metrics["fid"].compute()),
        "is": float(is_mean),
        "is_std": float(is_std),
        "kid": float(kid_mean),
        "kid_std": float(kid_std),
    }


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
