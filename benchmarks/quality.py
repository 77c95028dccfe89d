"""Offline quality benchmark: DCGAN recipes on scikit-learn's handwritten digits.

No network, no GPU, no Inception weights: a small CNN trained here on the 1797 bundled
8x8 digits stands in for Inception. Each recipe is trained through the real CLI
(`gan.py --dataset folder`), sampled with `gan.py --generate`, and scored by
  - FD: the Frechet distance between generated and real digits in the classifier's
    penultimate features (torchmetrics' FrechetInceptionDistance with that feature net);
  - coverage: how many of the 10 digits get at least 1% of the samples, and the
    normalised entropy of the predicted-class histogram (1.0: all ten equally often);
  - spectral: the distance between the generated and real mean log power spectra
    (benchmarks/scores.py; rises with checkerboard artifacts).

    python benchmarks/quality.py                      # 8 recipes, 2 seeds: about 20 minutes on 2 busy CPU cores
    python benchmarks/quality.py --seeds 0 --recipes plain combined
"""

import argparse
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scores import mean_log_spectrum, spectral_distance, spectral_score, spectral_spread
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from metrics import nearest_neighbour_scores  # noqa: E402

IMAGE_SIZE = 32
NUM_CLASSES = 10
COVERAGE_SHARE = 0.01  # a digit counts as found when at least 1% of the samples are classified as it

# Every recipe but "+ema" and "combined" turns the moving average off, so each row adds one thing.
RECIPES = {
    "plain": ["--ema", "0"],
    "hinge+sn": ["--ema", "0", "--loss", "hinge", "--spectral-norm"],
    "diffaugment": ["--ema", "0", "--diffaugment"],
    "ttur": ["--ema", "0", "--ttur"],
    "ema": ["--ema", "0.999"],
    "ema0.99": ["--ema", "0.99"],
    "d-steps2": ["--ema", "0", "--d-steps", "2"],
    "combined": ["--loss", "hinge", "--spectral-norm", "--diffaugment", "--ttur", "--ema", "0.999"],
    "combined-ema0": ["--loss", "hinge", "--spectral-norm", "--diffaugment", "--ttur", "--ema", "0"],
    "upsample": ["--ema", "0", "--arch", "upsample"],
    "upsample+diffaugment": ["--ema", "0", "--arch", "upsample", "--diffaugment"],
    "upsample+ema": ["--arch", "upsample", "--ema", "0.999"],
    "upsample+diffaugment+ema": ["--arch", "upsample", "--diffaugment", "--ema", "0.999"],
    "dcgan-recipe": ["--recipe", "dcgan"],  # the defaults: plain DCGAN plus the EMA
    "improved": ["--recipe", "improved"],
    "upsample+ema+spectral": ["--arch", "upsample", "--ema", "0.999", "--spectral-loss", "1"],
    "improved-spectral1": ["--recipe", "improved", "--spectral-loss", "1"],
    "improved-spectral0.3": ["--recipe", "improved", "--spectral-loss", "0.3"],
    "improved-spectral0": ["--recipe", "improved", "--spectral-loss", "0"],
    "improved+diffaugment": ["--recipe", "improved", "--diffaugment"],
    "improved+r1-0.1": ["--recipe", "improved", "--r1", "0.1"],
    "improved+r1-1": ["--recipe", "improved", "--r1", "1"],
    "improved-ema0": ["--recipe", "improved", "--ema", "0"],
    # the recipe with its G's last activation as before it clipped
    "improved-tanh": ["--recipe", "improved", "--g-output", "tanh"],
    # the recipe at the rate it had before it set --lr 3e-4, and above it
    "improved-lr2e-4": ["--recipe", "improved", "--lr", "0.0002"],
    "improved-lr5e-4": ["--recipe", "improved", "--lr", "0.0005"],
    # trained on the digits sorted into one sub-folder per digit; sampled with --generate per class
    "improved+conditional": ["--recipe", "improved", "--conditional"],
    "improved+conditional+class-loss2": ["--recipe", "improved", "--conditional", "--class-loss", "2"],
    "improved+conditional+class-loss0.5": ["--recipe", "improved", "--conditional", "--class-loss", "0.5"],
    "improved+conditional-ema0": ["--recipe", "improved", "--conditional", "--ema", "0"],
    "improved+conditional-class-loss0": ["--recipe", "improved", "--conditional", "--class-loss", "0"],
    "improved+conditional+hinge+sn": ["--recipe", "improved", "--conditional", "--loss", "hinge", "--spectral-norm"],
    "improved+conditional+lr2e-3": ["--recipe", "improved", "--conditional", "--lr", "0.002", "--beta2", "0.99"],
    "improved+conditional+lr2e-4": ["--recipe", "improved", "--conditional", "--lr", "0.0002"],
    "improved+conditional+lr5e-4": ["--recipe", "improved", "--conditional", "--lr", "0.0005"],
    # the digits PNGs are RGB files of grey digits: --channels 3 keeps the 3 channels auto would drop
    "rgb-improved": ["--recipe", "improved", "--channels", "3"],
    # trained on the same digits written as greyscale PNGs: gan.py trains them with 1 channel
    "grey-improved": ["--recipe", "improved"],
    "grey-improved+conditional": ["--recipe", "improved", "--conditional"],
    # the CPU's bf16 against fp32, typed so that neither depends on what --precision auto picks
    "improved-fp32": ["--recipe", "improved", "--precision", "fp32"],
    "improved-bf16": ["--recipe", "improved", "--precision", "bf16"],
}
# the digits' folder each recipe trains on (the others: digits/, RGB PNGs in one folder)
LAYOUTS = {
    "improved+conditional": "digits-by-class",
    "improved+conditional+class-loss2": "digits-by-class",
    "improved+conditional+class-loss0.5": "digits-by-class",
    "improved+conditional-ema0": "digits-by-class",
    "improved+conditional-class-loss0": "digits-by-class",
    "improved+conditional+hinge+sn": "digits-by-class",
    "improved+conditional+lr2e-3": "digits-by-class",
    "improved+conditional+lr2e-4": "digits-by-class",
    "improved+conditional+lr5e-4": "digits-by-class",
    "grey-improved": "digits-grey",
    "grey-improved+conditional": "digits-grey-by-class",
}
# the default set fits in about 20 minutes on 2 busy CPU cores (5 on idle ones)
DEFAULT_RECIPES = ["plain", "hinge+sn", "diffaugment", "ttur", "d-steps2", "ema", "combined", "combined-ema0"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=DEFAULT_RECIPES, help="recipes to compare")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds per recipe")
    p.add_argument("--epochs", type=int, default=8, help="epochs per run (1797 // batch-size steps each)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step")
    p.add_argument("--width", type=int, default=16, help="ngf = ndf of the DCGAN")
    p.add_argument("--samples", type=int, default=500, help="generated digits scored per run")
    p.add_argument(
        "--class-samples",
        type=int,
        default=500,
        help="generated digits per class of a conditional run, for its per-class FD and class consistency "
        "(at least --samples)",
    )
    p.add_argument("--jobs", type=int, default=3, help="training runs in parallel, one CPU thread each")
    p.add_argument("--work-dir", default=None, help="where digits, runs and the classifier go [a temp folder]")
    p.add_argument("--device", default="cpu", help="gan.py's --device for the training runs (cuda: longer budgets)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- data


def load_digits_uint8():
    """The 1797 digits as uint8 (N, 3, 32, 32) and their labels: upsampled, grey to RGB."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)  # values 0..16
    images = F.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False).clamp(0, 1)
    images = images.mul(255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return images, torch.from_numpy(digits.target).long()


def write_pngs(images, folder, grey=False):
    """The images as PNGs in folder (greyscale PNGs, mode L, with grey)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.png"))) == len(images):
        return
    for index, image in enumerate(images):
        pixels = image.permute(1, 2, 0).numpy()
        (Image.fromarray(pixels[:, :, 0], "L") if grey else Image.fromarray(pixels)).save(folder / f"{index:04d}.png")


def digits_image_folder(work_dir):
    """The 1,797 digits as 32x32 PNGs in an ImageFolder layout (one class folder, WORK_DIR/digits/0/),
    for the whole-process timing benchmarks."""
    folder = Path(work_dir) / "digits"
    write_pngs(load_digits_uint8()[0], folder / "0")
    return folder


def write_digit_folders(images, labels, work_dir):
    """The four layouts of the digits: {layout name: folder}. The by-class ones hold one sub-folder
    per digit (0/ ... 9/), the layout --conditional learns classes from."""
    folders = {}
    for name, grey, by_class in (
        ("digits", False, False), ("digits-grey", True, False),
        ("digits-by-class", False, True), ("digits-grey-by-class", True, True),
    ):  # fmt: skip
        folder = work_dir / name
        if by_class:
            for digit in range(NUM_CLASSES):
                write_pngs(images[labels == digit], folder / str(digit), grey)
        else:
            write_pngs(images, folder, grey)
        folders[name] = folder
    return folders


def read_pngs(folder):
    from PIL import Image

    files = sorted(p for p in folder.glob("*.png") if p.name != "grid.png")
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8) for p in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------- the stand-in for Inception


class DigitClassifier(nn.Module):
    """A small CNN on 32x32 digits; its 64 penultimate features play Inception's 2048."""

    num_features = 64

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16 x 16 x 16
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 32 x 8 x 8
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 32 x 4 x 4
            nn.Flatten(), nn.Linear(32 * 4 * 4, self.num_features), nn.ReLU(),  # 64
        )  # fmt: skip
        self.head = nn.Linear(self.num_features, NUM_CLASSES)

    def features(self, images_uint8):
        grey = images_uint8.float().mean(dim=1, keepdim=True).div(127.5).sub(1.0)
        return self.body(grey)

    def forward(self, images_uint8):
        return self.head(self.features(images_uint8))


class PenultimateFeatures(nn.Module):
    """The feature net torchmetrics' FID calls: uint8 (N, 3, H, W) -> (N, 64) float."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, images_uint8):
        return self.classifier.features(images_uint8)


def train_classifier(images, labels, path, epochs=15, seed=0):
    """Train on 80% of the digits, report accuracy on the other 20%; cached in path."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    held_out, train = order[: len(images) // 5], order[len(images) // 5 :]
    if path.is_file():
        classifier = DigitClassifier()
        classifier.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        # the initial weights from the seed too: drawn from whatever state the global RNG was in,
        # every work folder had another classifier, so another feature space for its FDs
        torch.manual_seed(seed)
        classifier = DigitClassifier()
        optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
        for _ in range(epochs):
            for batch in torch.randperm(len(train), generator=generator).split(64):
                chosen = train[batch]
                loss = F.cross_entropy(classifier(images[chosen]), labels[chosen])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(classifier.state_dict(), path)
    classifier.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = (classifier(images[held_out]).argmax(1) == labels[held_out]).float().mean().item()
    return classifier, accuracy


# ---------------------------------------------------------------- scoring


class Scorer:
    """FD and spectral score against all real digits (real statistics computed once), class coverage,
    and precision/recall (k=3) and density/coverage (k=5) in the same features against a fixed
    sample of as many real digits as are scored (the papers' equal set sizes)."""

    def __init__(self, classifier, real_images, samples):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.classifier = classifier
        self.fid = FrechetInceptionDistance(feature=PenultimateFeatures(classifier), reset_real_features=False)
        self.fid.update(real_images, real=True)
        self.real_spectrum = mean_log_spectrum(real_images)
        with torch.no_grad():
            self.reference_features = classifier.features(real_images[real_sample(len(real_images), samples)])

    @torch.no_grad()
    def __call__(self, images_uint8):
        self.fid.reset()  # drops the generated images only
        self.fid.update(images_uint8, real=False)
        histogram = torch.bincount(self.classifier(images_uint8).argmax(1), minlength=NUM_CLASSES).double()
        shares = histogram / histogram.sum()
        seen = shares[shares > 0]
        entropy = abs(float((seen * seen.log()).sum())) / math.log(NUM_CLASSES)
        return {
            "fd": float(self.fid.compute()),
            **nearest_neighbour_scores(self.reference_features, self.classifier.features(images_uint8)),
            "found": int((shares >= COVERAGE_SHARE).sum()),
            "entropy": entropy,
            "spectral": spectral_distance(mean_log_spectrum(images_uint8), self.real_spectrum),
        }


def class_scores(scorer, per_class, real_images, labels, samples):
    """A conditional run's scores: class consistency (the share of samples the classifier assigns
    to the class they were drawn as), the FD of each class against that class's real digits, and
    the usual scores of samples // 10 images of each class (as many as an unconditional run's)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    with torch.no_grad():
        hits = [(scorer.classifier(images).argmax(1) == digit).float() for digit, images in per_class.items()]
    class_fd = {}
    for digit, images in sorted(per_class.items()):
        fid = FrechetInceptionDistance(feature=PenultimateFeatures(scorer.classifier))
        fid.update(real_images[labels == digit], real=True)
        fid.update(images, real=False)
        class_fd[digit] = float(fid.compute())
    # every class is drawn from the same noise: take each class's share from other noise vectors,
    # so that the overall scores see as many distinct ones as an unconditional run's
    share = samples // NUM_CLASSES
    overall = scorer(torch.cat([images[d * share : (d + 1) * share] for d, images in sorted(per_class.items())]))
    return {
        **overall,
        "consistency": float(torch.cat(hits).mean()),
        "class_fd": statistics.fmean(class_fd.values()),
        "worst_class_fd": max(class_fd.values()),
        "class_fds": class_fd,
    }


def real_sample(count, samples, seed=0):
    """The indices of a fixed random sample of samples of count real images."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:samples]


def real_floor(classifier, real_images, samples, seed=0):
    """FD and spectral score between two random halves of the real digits, and the nearest-neighbour
    scores of samples other real digits against the scorer's real sample: what a perfect generator scores."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    order = real_sample(len(real_images), len(real_images), seed)  # begins with the scorer's real sample
    half = len(order) // 2
    first, second = real_images[order[:half]], real_images[order[half:]]
    fid = FrechetInceptionDistance(feature=PenultimateFeatures(classifier))
    fid.update(first, real=True)
    fid.update(second, real=False)
    others = real_images[order[samples : 2 * samples]]  # disjoint from it
    with torch.no_grad():
        reference, other = (classifier.features(real_images[order[:samples]]), classifier.features(others))
    return {
        "fd": float(fid.compute()),
        **nearest_neighbour_scores(reference, other),
        "spectral": spectral_score(second, first),
        "spread": spectral_spread(real_images),
    }


# ---------------------------------------------------------------- training through the CLI


def train_and_sample(recipe, seed, args, digits_dir, runs_dir, image_size=IMAGE_SIZE):
    """Train one recipe with gan.py on the PNGs in digits_dir, then write args.samples images with --generate."""
    run_dir = runs_dir / f"{recipe}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resumed or appended one
    run_dir.mkdir(parents=True)
    common = [
        "--device",
        args.device,
        "--checkpoint-dir",
        str(run_dir / "checkpoints"),
        "--image-dir",
        str(run_dir / "images"),
    ]
    train = [
        "--dataset", "folder", "--dataroot", str(digits_dir), "--image-size", str(image_size),
        "--ngf", str(args.width), "--ndf", str(args.width), "--batch-size", str(args.batch_size),
        "--epochs", str(args.epochs), "--seed", str(seed), "--workers", "0", "--log-every", "1000",
        *RECIPES[recipe],
    ]  # fmt: skip
    conditional = "--conditional" in RECIPES[recipe]
    generate = ["--generate", str(args.class_samples if conditional else args.samples), "--seed", "12345"]
    seconds = run_gan_commands([train, generate], common, run_dir)
    generated = run_dir / "images" / "generated"
    if conditional:  # {digit: its images}, from --generate's folder per class
        return {int(folder.name): read_pngs(folder) for folder in generated.iterdir() if folder.is_dir()}, seconds
    return read_pngs(generated), seconds


def run_gan_commands(flag_lists, common, run_dir):
    """gan.py with each list of flags (and common) in turn, one CPU thread, in run_dir; their seconds
    in all. RuntimeError, with the end of its stderr, where one fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.perf_counter()
    for flags in flag_lists:
        command = [sys.executable, str(ROOT / "gan.py"), *flags, *common]
        done = subprocess.run(command, cwd=run_dir, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def summarise(values):
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, spread


def spread_line(spread):
    """The real-vs-real spectral spread as one line: a score below its largest value is within it."""
    mean, std = summarise(spread)
    return f"real-vs-real spectral over {len(spread)} random half-splits: {mean:.4f} ± {std:.4f}, largest {max(spread):.4f}"


def print_table(results, args, floor, accuracy):
    steps = (1797 // args.batch_size) * args.epochs
    print()
    print(
        f"{steps} steps per run (batch {args.batch_size}, ngf=ndf={args.width}), {args.samples} samples, seeds {args.seeds}"
    )
    print(
        f"classifier held-out accuracy {accuracy:.3f}; real-vs-real floors: FD {floor['fd']:.2f}, "
        f"spectral {floor['spectral']:.4f}, precision {floor['precision']:.2f}, recall {floor['recall']:.2f}, "
        f"density {floor['density']:.2f}, coverage {floor['coverage']:.2f}"
    )
    print(spread_line(floor["spread"]))
    print()
    print_recipe_table(
        results,
        [
            ("FD (lower is better)", "fd", mean_and_spread(".2f")),
            ("FD per seed", "fd", per_seed(".1f")),
            *NEIGHBOUR_COLUMNS,
            ("digits found (of 10)", "found", mean_and_spread(".1f")),
            ("class entropy (1 = even)", "entropy", mean_and_spread(".3f")),
            ("spectral (lower is better)", "spectral", mean_and_spread(".3f")),
            ("seconds per run", "seconds", mean_only(".0f")),
        ],
    )
    conditional = {recipe: rows for recipe, rows in results.items() if "consistency" in rows[0]}
    if conditional:
        print()
        print(f"conditional runs: {args.class_samples} samples per class")
        print()
        print_recipe_table(
            conditional,
            [
                ("class consistency (target >= 0.95)", "consistency", per_seed(".3f")),
                ("mean per-class FD", "class_fd", per_seed(".0f")),
                ("worst class FD", "worst_class_fd", per_seed(".0f")),
            ],
        )
        for recipe, rows in conditional.items():
            for seed, row in zip(args.seeds, rows):
                fds = " ".join(f"{digit}:{fd:.0f}" for digit, fd in sorted(row["class_fds"].items()))
                print(f"{recipe} seed {seed} per-class FD: {fds}")


# ---------------------------------------------------------------- the tables both benchmarks print


def per_seed(spec):
    return lambda values: " / ".join(f"{value:{spec}}" for value in values)


# the scores of metrics.nearest_neighbour_scores, as table columns and as a run's progress line
NEIGHBOUR_COLUMNS = [
    ("precision ↑", "precision", per_seed(".2f")),
    ("recall ↑", "recall", per_seed(".2f")),
    ("density", "density", per_seed(".2f")),
    ("coverage ↑", "coverage", per_seed(".2f")),
]


def neighbour_text(scores):
    return (
        f"P {scores['precision']:.2f}  R {scores['recall']:.2f}  D {scores['density']:.2f}  C {scores['coverage']:.2f}"
    )


def mean_and_spread(spec):
    return lambda values: "{0:{spec}} ± {1:{spec}}".format(*summarise(values), spec=spec)


def mean_only(spec):
    return lambda values: f"{summarise(values)[0]:{spec}}"


def print_recipe_table(results, columns):
    """A markdown table with a row per recipe and its flags; columns are (title, key, render),
    render turning the recipe's per-seed values of key into the cell."""
    print("| " + " | ".join(["recipe", "flags", *(title for title, _, _ in columns)]) + " |")
    print("|" + "---|" * (len(columns) + 2))
    for recipe, rows in results.items():
        cells = [render([row[key] for row in rows]) for _, key, render in columns]
        print("| " + " | ".join([recipe, f"`{' '.join(RECIPES[recipe])}`", *cells]) + " |")


def main(argv=None):
    args = parse_args(argv)
    if args.class_samples < args.samples:
        raise SystemExit("--class-samples must be at least --samples: the overall scores take each class's share")
    work_dir = Path(args.work_dir or Path(tempfile.gettempdir()) / "dcgan-quality-benchmark")
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs; work folder {work_dir}")
    images, labels = load_digits_uint8()
    folders = write_digit_folders(images, labels, work_dir)
    # not classifier.pt: classifiers trained before the seed fix were each different
    classifier, accuracy = train_classifier(images, labels, work_dir / "classifier-seed0.pt")
    print(f"digit classifier: held-out accuracy {accuracy:.3f} ({len(images) // 5} digits)")
    scorer = Scorer(classifier, images, args.samples)
    floor = real_floor(classifier, images, args.samples)
    runs = [(recipe, seed) for recipe in args.recipes for seed in args.seeds]
    results = {recipe: [] for recipe in args.recipes}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [
            pool.submit(train_and_sample, r, s, args, folders[LAYOUTS.get(r, "digits")], work_dir / "runs")
            for r, s in runs
        ]
        for (recipe, seed), future in zip(runs, futures):
            generated, seconds = future.result()
            if isinstance(generated, dict):
                scores = {**class_scores(scorer, generated, images, labels, args.samples), "seconds": seconds}
                print(f"{recipe} seed {seed}: class consistency {scores['consistency']:.3f}", flush=True)
            else:
                scores = {**scorer(generated), "seconds": seconds}
            results[recipe].append(scores)
            print(
                f"{recipe:12s} seed {seed}: FD {scores['fd']:.2f}  {neighbour_text(scores)}  found {scores['found']}  "
                f"entropy {scores['entropy']:.3f}  spectral {scores['spectral']:.3f}  ({seconds:.0f}s)",
                flush=True,
            )
    print_table(results, args, floor, accuracy)


if __name__ == "__main__":
    main()
