"""Offline quality benchmark on natural images: DCGAN recipes on random crops of bundled photographs.

No network, no GPU, no Inception weights. The photographs ship inside installed packages
(scikit-learn's china.jpg and flower.jpg; with scikit-image installed also its astronaut,
coffee, chelsea and rocket photographs, which are inside the wheel and need no download). Random
square crops (side 1-3x the image size, area-downsampled) are written as PNGs with a fixed seed;
each recipe is trained on them through the real CLI (`gan.py --dataset folder`), sampled with
`gan.py --generate`, and scored per seed by
  - FD: the Frechet distance in the features of a fixed, randomly initialised conv net
    (scores.RandomFeatures, seeded). Inception's ImageNet features are not available offline,
    and a digit classifier (quality.py) is blind to colour and texture. Random conv features are
    a known stand-in: Naeem et al. 2020 ("Reliable fidelity and diversity metrics for generative
    models", ICML) show that embeddings of a randomly initialised network rank generative models
    sensibly where ImageNet features do not apply, and random conv filters respond to exactly the
    local statistics that matter here: colour, edges, texture and periodic patterns. A random net
    says nothing about semantics; read FD here as "do the crops have the photos' colours and
    textures", not as FID.
  - spectral: the mean absolute difference of the generated and real mean log10 power spectra,
    azimuthally averaged (Durall et al. 2020, "Watch your up-convolution"; scores.py). It rises
    with checkerboard and lattice artifacts.
Both are against one half of the real crops; the other half scores the real-vs-real floor, with
as many images as each generated set.

    python benchmarks/photos.py                                   # 3 recipes, 2 seeds, 384 steps each
    python benchmarks/photos.py --recipes plain diffaugment --seeds 0 --grid-dir benchmarks/grids/photos

About 7 minutes on 2 idle CPU cores for the default 6 runs (one 384-step run takes about 1 minute with
--ema 0, 2 minutes for --recipe improved, whose EMA statistics are re-estimated at every epoch end).
The photo table also gives the lattice measures (scores.py): the share of the pixel-scale detail that
is the same in every sample, and the 2-D frequency where the samples' power most exceeds the real crops';
and the clipped share, the colour values at 0 or 255 (blown-out highlights, crushed shadows).
"""

import argparse
import os
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from quality import (
    NEIGHBOUR_COLUMNS,
    RECIPES,
    mean_and_spread,
    mean_only,
    nearest_neighbour_scores,
    neighbour_text,
    per_seed,
    print_recipe_table,
    spread_line,
    train_and_sample,
    write_pngs,
)
from scores import (
    RandomFeatures,
    clipped_share,
    fixed_detail_share,
    frechet_distance,
    spectral_score,
    spectral_spread,
    strongest_peak,
)

# photographs inside scikit-image's wheel (skimage.data loads them without pooch)
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
DEFAULT_RECIPES = ["plain", "diffaugment", "hinge+sn"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=DEFAULT_RECIPES, help="recipes to compare")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds per recipe")
    p.add_argument("--image-size", type=int, choices=[32, 64], default=32, help="side of the crops in pixels")
    p.add_argument(
        "--crops", type=int, default=4096, help="random crops written (half train-and-reference, half floor)"
    )
    p.add_argument("--crop-scale", type=float, default=3.0, help="crops are 1 to this many times the image size")
    p.add_argument("--crop-seed", type=int, default=0, help="seed of the crop positions")
    p.add_argument("--epochs", type=int, default=6, help="epochs per run (crops // batch-size steps each)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--width", type=int, default=32, help="ngf = ndf of the DCGAN")
    p.add_argument("--feature-seed", type=int, default=0, help="seed of the random feature net")
    p.add_argument("--work-dir", default=None, help="where crops and runs go [a temp folder]")
    p.add_argument("--grid-dir", default=None, help="where the sample grids go [WORK_DIR/grids]")
    p.add_argument("--keep-runs", action="store_true", help="keep each run's checkpoints and samples")
    p.add_argument("--device", default="cpu", help="gan.py's --device for the training runs (cuda: longer budgets)")
    args = p.parse_args(argv)
    args.samples = args.crops // 2  # as many as the floor's half, so both FDs have the same bias
    return args


# ---------------------------------------------------------------- data


def load_photographs():
    """The bundled colour photographs as (name, uint8 H x W x 3) pairs."""
    from sklearn.datasets import load_sample_images

    bundle = load_sample_images()
    photos = [(Path(name).stem, image) for name, image in zip(bundle.filenames, bundle.images)]
    try:
        import skimage.data
    except ImportError:
        print("scikit-image not installed: cropping scikit-learn's 2 photographs only")
        return photos
    return photos + [(name, getattr(skimage.data, name)()) for name in SKIMAGE_PHOTOS]


def random_crops(photos, count, size, max_scale, seed):
    """count square crops as uint8 (N, 3, size, size): photo, side and place drawn per crop."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(count):
        _, photo = photos[rng.integers(len(photos))]
        height, width = photo.shape[:2]
        side = int(rng.integers(size, min(int(size * max_scale), height, width) + 1))
        top, left = rng.integers(height - side + 1), rng.integers(width - side + 1)
        crop = Image.fromarray(photo[top : top + side, left : left + side])
        crops.append(np.asarray(crop.resize((size, size), Image.Resampling.BOX)))
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


def save_grid(images_uint8, path, scale=2):
    """The first 64 images as an 8x8 grid, enlarged (nearest) so single-pixel patterns show."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(images_uint8[:64], nrow=8, padding=2, pad_value=255).permute(1, 2, 0).numpy()
    image = Image.fromarray(grid)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST).save(path)


# ---------------------------------------------------------------- scoring


class PhotoScorer:
    """FD, precision/recall (k=3) and density/coverage (k=5) in random-conv features, spectral score
    and the lattice measures against the reference half."""

    def __init__(self, reference, feature_seed):
        self.reference = reference
        self.feature = RandomFeatures(seed=feature_seed)
        with torch.no_grad():
            self.reference_features = self.feature(reference)

    @torch.no_grad()
    def __call__(self, images_uint8):
        return {
            "fd": frechet_distance(self.feature, self.reference, images_uint8),
            **nearest_neighbour_scores(self.reference_features, self.feature(images_uint8)),
            "spectral": spectral_score(images_uint8, self.reference),
            "fixed": fixed_detail_share(images_uint8),
            "peak": strongest_peak(images_uint8, self.reference),
            "clipped": clipped_share(images_uint8),
        }


def print_table(results, args, floor, photo_names):
    steps = (args.crops // args.batch_size) * args.epochs
    print()
    print(
        f"{args.crops} crops of {args.image_size} px from {', '.join(photo_names)}; {steps} steps per run "
        f"(batch {args.batch_size}, ngf=ndf={args.width}), {args.samples} samples, seeds {args.seeds}"
    )
    print(
        f"real-vs-real floors ({args.samples} vs {args.samples} crops): FD {floor['fd']:.3f}, "
        f"precision {floor['precision']:.2f}, recall {floor['recall']:.2f}, density {floor['density']:.2f}, "
        f"coverage {floor['coverage']:.2f}, spectral {floor['spectral']:.4f}, fixed-detail share {floor['fixed']:.4f}, "
        f"clipped share {floor['clipped']:.4f}"
    )
    print(spread_line(floor["spread"]))
    print()
    print_recipe_table(
        results,
        [
            ("FD ↓ (per seed)", "fd", per_seed(".3f")),
            ("FD mean ± std", "fd", mean_and_spread(".3f")),
            *NEIGHBOUR_COLUMNS,
            ("spectral ↓ (per seed)", "spectral", per_seed(".3f")),
            ("spectral mean ± std", "spectral", mean_and_spread(".3f")),
            ("fixed-detail share", "fixed", per_seed(".3f")),
            ("strongest peak (gen/real power)", "peak", per_seed("s")),
            ("clipped share (at 0 or 255)", "clipped", per_seed(".3f")),
            ("seconds per run", "seconds", mean_only(".0f")),
        ],
    )


def main(argv=None):
    args = parse_args(argv)
    work_dir = Path(args.work_dir or Path(tempfile.gettempdir()) / "dcgan-photo-benchmark")
    grid_dir = Path(args.grid_dir or work_dir / "grids")
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs; work folder {work_dir}")
    photos = load_photographs()
    crops = random_crops(photos, args.crops, args.image_size, args.crop_scale, args.crop_seed)
    crops_dir = work_dir / f"crops{args.image_size}-n{args.crops}-seed{args.crop_seed}"
    write_pngs(crops, crops_dir)
    order = torch.randperm(len(crops), generator=torch.Generator().manual_seed(args.crop_seed))
    reference, held_out = crops[order[: args.samples]], crops[order[args.samples : 2 * args.samples]]
    scorer = PhotoScorer(reference, args.feature_seed)
    floor = {**scorer(held_out), "spread": spectral_spread(crops)}
    save_grid(held_out, grid_dir / "real.png")
    results = {recipe: [] for recipe in args.recipes}
    for recipe in args.recipes:
        for seed in args.seeds:
            generated, seconds = train_and_sample(recipe, seed, args, crops_dir, work_dir / "runs", args.image_size)
            scores = {**scorer(generated), "seconds": seconds}
            results[recipe].append(scores)
            save_grid(generated, grid_dir / f"{recipe}-seed{seed}.png")
            if not args.keep_runs:
                shutil.rmtree(work_dir / "runs" / f"{recipe}-seed{seed}")
            print(
                f"{recipe:12s} seed {seed}: FD {scores['fd']:.3f}  {neighbour_text(scores)}  "
                f"spectral {scores['spectral']:.4f}  "
                f"fixed {scores['fixed']:.3f}  peak {scores['peak']}  clipped {scores['clipped']:.3f}  ({seconds:.0f}s)",
                flush=True,
            )
    print_table(results, args, floor, [name for name, _ in photos])
    print(
        f"\ngrids (first 64 samples, 2x nearest): {grid_dir}/<recipe>-seed<seed>.png; real crops: {grid_dir}/real.png"
    )


if __name__ == "__main__":
    main()
