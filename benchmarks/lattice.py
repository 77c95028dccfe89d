"""Where does the lattice in --diffaugment samples come from? The measurements behind issue 13.

Not a test and not part of the benchmark tables. gan.py and steps.py are used as they are: the
augmentation variants are applied by a worker that patches steps.diff_augment (and, to emulate
CUDA's bf16 autocast on a CPU, the generator's output dtype) and then calls gan.main().

    python benchmarks/lattice.py translate                 # steps.translate: whole-pixel, uniform shifts?
    python benchmarks/lattice.py augment                   # spectra of augmented vs un-augmented real crops
    python benchmarks/lattice.py train --variants plain diffaugment colour translation cutout
    python benchmarks/lattice.py analyse /tmp/dcgan-photo-benchmark/lattice/*/*-seed0

The analysis also scores an untrained generator of each --arch (step 0), where the lattice of
the transposed convolutions is plainest.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from photos import load_photographs, random_crops, save_grid
from quality import ROOT, read_pngs, train_and_sample, write_pngs
from scores import RandomFeatures, frechet_distance, mean_log_spectrum, spectral_distance

NO_EMA = ["--ema", "0"]
# name: (gan.py flags, augmentation the worker installs in place of steps.diff_augment)
VARIANTS = {
    "plain": (NO_EMA, None),
    "diffaugment": ([*NO_EMA, "--diffaugment"], None),
    "colour": ([*NO_EMA, "--diffaugment"], "colour"),
    "translation": ([*NO_EMA, "--diffaugment"], "translation"),
    "cutout": ([*NO_EMA, "--diffaugment"], "cutout"),
    "no-colour": ([*NO_EMA, "--diffaugment"], "no-colour"),
    "hinge+sn": ([*NO_EMA, "--loss", "hinge", "--spectral-norm"], None),
    "diffaugment-long": ([*NO_EMA, "--diffaugment"], None),
    "plain-long": (NO_EMA, None),
    "upsample": ([*NO_EMA, "--arch", "upsample"], None),
    "upsample-diffaugment": ([*NO_EMA, "--arch", "upsample", "--diffaugment"], None),
    # bf16 autocast as on CUDA: G's output is bf16 and the augmentation runs under autocast
    "autocast": ([*NO_EMA, "--diffaugment"], "autocast"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    translate = sub.add_parser("translate", help="steps.translate: whole-pixel moves, uniform shifts")
    translate.add_argument("--images", type=int, default=2000, help="coordinate images shifted per setting")
    augment = sub.add_parser("augment", help="spectral score of augmented real crops")
    train = sub.add_parser("train", help="train variants on the photo crops and analyse them")
    train.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["plain", "diffaugment"])
    train.add_argument("--seed", type=int, default=0, help="training seed of every variant")
    train.add_argument("--epochs", type=int, default=6, help="epochs for all but the -long variants")
    train.add_argument("--long-epochs", type=int, default=24, help="epochs of the -long variants")
    analyse = sub.add_parser("analyse", help="lattice measurements of finished runs")
    analyse.add_argument("runs", nargs="+", help="run folders (with images/generated and images/epoch_*.png)")
    for parser in (augment, train, analyse):
        parser.add_argument("--crops", type=int, default=4096, help="random 32 px crops, as photos.py")
        parser.add_argument("--batch-size", type=int, default=64, help="images per step")
        parser.add_argument("--width", type=int, default=32, help="ngf = ndf")
        parser.add_argument(
            "--work-dir", default=str(Path(tempfile.gettempdir()) / "dcgan-photo-benchmark"), help="crops and runs"
        )
    worker = sub.add_parser("worker", help="(internal) gan.py with a patched augmentation")
    worker.add_argument("patch", help="augmentation patch: none, colour, translation, cutout, no-colour, autocast")
    worker.add_argument("gan_args", nargs=argparse.REMAINDER, help="-- then gan.py's flags")
    return p.parse_args(argv)


# ---------------------------------------------------------------- augmentation variants


def colour(images):
    """steps.diff_augment's three colour operations alone (brightness, saturation, contrast)."""
    n = images.shape[0]

    def uniform():
        return torch.rand(n, 1, 1, 1, device=images.device, dtype=images.dtype)

    images = images + (uniform() - 0.5)
    mean = images.mean(dim=1, keepdim=True)
    images = (images - mean) * (uniform() * 2) + mean
    mean = images.mean(dim=[1, 2, 3], keepdim=True)
    return (images - mean) * (uniform() + 0.5) + mean


def translation(images):
    """steps.translate with steps.diff_augment's random shifts."""
    import steps

    return steps.translate(images, steps.random_shifts(images))


def random_cutout(images):
    import steps

    return steps.cutout(images, steps.random_cutout_corners(images))


def reference_translate(images, shifts):
    """The DiffAugment paper's rand_translation with given shifts: pad by side//8 + 1 with zeros, then index."""
    n, _, height, width = images.shape
    pad = max(height, width) // 8 + 1
    padded = F.pad(images, [pad, pad, pad, pad])
    rows = (torch.arange(height, device=images.device) + pad).view(1, -1) + shifts[:, :1]
    cols = (torch.arange(width, device=images.device) + pad).view(1, -1) + shifts[:, 1:]
    batch = torch.arange(n, device=images.device).view(-1, 1, 1)
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def install_patch(name):
    """Replace steps.diff_augment (and for autocast the generator's output dtype) before gan.main runs."""
    import models
    import steps

    original = steps.diff_augment
    if name == "colour":
        steps.diff_augment = lambda images, generator=None: colour(images)
    elif name == "translation":
        steps.diff_augment = lambda images, generator=None: translation(images)
    elif name == "cutout":
        steps.diff_augment = lambda images, generator=None: random_cutout(images)
    elif name == "no-colour":
        steps.diff_augment = lambda images, generator=None: random_cutout(translation(images))
    elif name == "autocast":
        generator_forward = models.Generator.forward

        def bf16_forward(self, noise):
            # a training G under CUDA autocast returns bf16 (ConvTranspose2d runs in bf16, tanh keeps it)
            images = generator_forward(self, noise)
            return images.to(torch.bfloat16) if self.training else images

        def augment_under_autocast(images, generator=None):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                augmented = original(images, generator)
            return augmented.float()  # D itself stays fp32: CPU bf16 convolutions are 25x slower here

        models.Generator.forward = bf16_forward
        steps.diff_augment = augment_under_autocast
    elif name != "none":
        raise ValueError(name)


def run_worker(args):
    install_patch(args.patch)
    print(f"lattice.py worker: augmentation patch {args.patch!r}", file=sys.stderr)
    import gan

    sys.exit(gan.main([a for a in args.gan_args if a != "--"]))


# ---------------------------------------------------------------- 1. does steps.translate move whole pixels?


def coordinate_images(count, size):
    """Two channels holding each pixel's column and row index (+1, so the zero fill stands out)."""
    cols = torch.arange(size, dtype=torch.float32).view(1, 1, 1, -1).expand(count, 1, size, size)
    rows = torch.arange(size, dtype=torch.float32).view(1, 1, -1, 1).expand(count, 1, size, size)
    return torch.cat([cols, rows], 1) + 1


def split_images(moved, source):
    """How many images have inside pixels that do not all move by the same integer."""
    inside = (moved > 0).all(dim=1)
    delta = (moved - source).round().long()
    split = 0
    for k in range(len(moved)):
        if delta[k, 0][inside[k]].unique().numel() > 1 or delta[k, 1][inside[k]].unique().numel() > 1:
            split += 1
    return split


def translate_table(args):
    import steps

    torch.manual_seed(0)
    print(
        "| size | images | split images (pixels not all moved by one integer) | equals the paper's code | shifts drawn |"
    )
    print("|---|---|---|---|---|")
    for size in (32, 64):
        source = coordinate_images(args.images, size)
        shifts = steps.random_shifts(source)
        values, counts = shifts.flatten().unique(return_counts=True)
        drawn = f"{int(values.min())}..{int(values.max())}, each {100 * counts.min() / counts.sum():.1f}-{100 * counts.max() / counts.sum():.1f}%"
        settings = {
            "fp32": source,
            "bf16 (G's output under CUDA autocast)": source.bfloat16(),
        }
        for name, images in settings.items():
            moved = steps.translate(images, shifts)
            reference = reference_translate(images, shifts)
            split = split_images(moved.float(), source)
            same = torch.equal(moved, reference)
            print(f"| {size} | {name} | {split} / {args.images} | {same} | {drawn} |")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = steps.translate(source, shifts)
        split = split_images(under.float(), source)
        same = torch.equal(under, reference_translate(source, shifts))
        print(f"| {size} | fp32 under bf16 autocast | {split} / {args.images} | {same} | {drawn} |")
    print("\nbf16 values of 1..64 are exact, so a whole-pixel gather cannot split an image in any precision.")


# ---------------------------------------------------------------- 2. spectra of augmented real crops


def crops_and_halves(args):
    crops = random_crops(load_photographs(), args.crops, 32, 3.0, 0)
    order = torch.randperm(len(crops), generator=torch.Generator().manual_seed(0))
    half = len(crops) // 2
    return crops, crops[order[:half]], crops[order[half:]]


def to_uint8(images):
    return images.float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def augment_table(args):
    import steps

    _, reference, held_out = crops_and_halves(args)
    real = held_out.float().div(127.5).sub(1)
    torch.manual_seed(0)
    shifts = steps.random_shifts(real)
    ops = {
        "none (real-vs-real floor)": lambda: real,
        "steps.translate, fp32": lambda: steps.translate(real, shifts),
        "steps.translate, bf16 images": lambda: steps.translate(real.bfloat16(), shifts),
        "translate as the paper's code": lambda: reference_translate(real, shifts),
        "colour": lambda: colour(real),
        "cutout": lambda: random_cutout(real),
        "steps.diff_augment": lambda: steps.diff_augment(real),
    }
    reference_spectrum = mean_log_spectrum(reference)
    print("| augmentation of the held-out real crops | spectral score vs reference crops | rings most changed |")
    print("|---|---|---|")
    for name, op in ops.items():
        spectrum = mean_log_spectrum(to_uint8(op()))
        print(
            f"| {name} | {spectral_distance(spectrum, reference_spectrum):.4f} | {top_rings(spectrum, reference_spectrum)} |"
        )


def top_rings(spectrum, reference_spectrum, count=3):
    difference = np.asarray(spectrum) - np.asarray(reference_spectrum)
    rings = np.argsort(-np.abs(difference))[:count]
    return ", ".join(f"r{ring + 1} {difference[ring]:+.2f}" for ring in rings)


# ---------------------------------------------------------------- 3. training and analysis


def train_variants(args):
    crops, _, _ = crops_and_halves(args)
    crops_dir = Path(args.work_dir) / f"crops32-n{args.crops}-seed0"
    write_pngs(crops, crops_dir)
    runs = []
    for variant in args.variants:
        flags, patch = VARIANTS[variant]
        epochs = args.long_epochs if variant.endswith("-long") else args.epochs
        run_args = argparse.Namespace(
            width=args.width, batch_size=args.batch_size, epochs=epochs, samples=args.crops // 2, device="cpu"
        )
        program = [sys.executable, str(Path(__file__).resolve()), "worker", patch or "none", "--"]
        runs_dir = Path(args.work_dir) / "lattice" / variant
        _, seconds = train_and_sample(variant, args.seed, run_args, crops_dir, runs_dir, 32, flags, program)
        print(f"{variant}: {epochs * (args.crops // args.batch_size)} steps, {seconds:.0f}s", flush=True)
        runs.append(runs_dir / f"{variant}-seed{args.seed}")
    analyse_runs(args, runs)


def grid_tiles(path, size=32, padding=2):
    """The 64 images of an 8x8 gan.py grid (torchvision make_grid, 2-pixel padding) as uint8."""
    from PIL import Image

    grid = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    step = size + padding
    tiles = [
        grid[:, padding + r * step :][:, :size, padding + c * step :][:, :, :size] for r in range(8) for c in range(8)
    ]
    return torch.stack(tiles)


def grey_highpass(images_uint8):
    """Greyscale minus its 3x3 box blur: the pixel-scale detail where a lattice lives."""
    grey = images_uint8.float().mean(dim=1, keepdim=True)
    return (grey - F.avg_pool2d(grey, 3, 1, 1, count_include_pad=False))[:, 0]


def lattice_measures(images_uint8, reference):
    """Spectral score; share of the detail that is the same in every image (a fixed-phase lattice)."""
    detail = grey_highpass(images_uint8)
    fixed_share = float(detail.mean(0).pow(2).mean() / detail.pow(2).mean())
    return {
        "spectral": spectral_distance(mean_log_spectrum(images_uint8), mean_log_spectrum(reference)),
        "fixed": fixed_share,
        "detail_rms": float(detail.pow(2).mean().sqrt()),
        "mean_detail": detail.mean(0),
    }


def peak_frequencies(images_uint8, reference, count=4):
    """The 2-D frequencies (cycles per image) where generated power most exceeds the real power."""

    def mean_power(images):
        grey = images.float().mean(dim=1)
        grey = grey - grey.mean(dim=(1, 2), keepdim=True)
        power = torch.fft.fft2(grey).abs().pow(2)
        return (power / power.sum(dim=(1, 2), keepdim=True).clamp_min(1e-10)).mean(0)

    ratio = (mean_power(images_uint8) / mean_power(reference).clamp_min(1e-12)).log10()
    size = ratio.shape[-1]
    freqs = (np.fft.fftfreq(size) * size).astype(int)
    best = torch.argsort(ratio.flatten(), descending=True)
    seen, peaks = set(), []
    for index in best.tolist():
        row, col = freqs[index // size], freqs[index % size]
        key = (abs(row), abs(col))
        if key not in seen:
            seen.add(key)
            peaks.append(f"({key[0]},{key[1]}) {10 ** float(ratio.flatten()[index]):.0f}x")
        if len(peaks) == count:
            break
    return ", ".join(peaks)


@torch.no_grad()
def untrained_samples(count, width, arch="dcgan", seed=0):
    """Samples of a freshly initialised generator (BatchNorm on batch statistics, as in training)."""
    import models

    with torch.random.fork_rng(devices=[]):  # leaves the global RNG as it was
        torch.manual_seed(seed)
        generator = models.build_generator(arch, 100, width, 32)
        generator.apply(models.init_weights)
        images = generator.train()(torch.randn(count, 100, 1, 1))
    return to_uint8(images)


def analyse_runs(args, runs):
    _, reference, held_out = crops_and_halves(args)
    feature = RandomFeatures(seed=0)
    floor = lattice_measures(held_out, reference)
    print(
        f"\nreal-vs-real: spectral {floor['spectral']:.4f}, fixed-detail share {floor['fixed']:.5f}, detail rms {floor['detail_rms']:.2f}"
    )
    print(
        "\n| run | FD | spectral | fixed-detail share | detail rms | peak 2-D frequencies (gen/real power) | spectral by epoch (64 fixed-noise samples) |"
    )
    print("|---|---|---|---|---|---|---|")
    grid_dir = Path(args.work_dir) / "lattice-grids"
    samples = {
        f"untrained-{arch} G (step 0)": (untrained_samples(len(held_out), args.width, arch), None)
        for arch in ("dcgan", "upsample")
    }
    for run in map(Path, runs):
        samples[f"{run.parent.name}/{run.name}"] = (read_pngs(run / "images" / "generated"), run)
    for name, (generated, run) in samples.items():
        measures = lattice_measures(generated, reference)
        epochs = sorted((run / "images").glob("epoch_*.png")) if run else []
        by_epoch = [spectral_distance(mean_log_spectrum(grid_tiles(p)), mean_log_spectrum(reference)) for p in epochs]
        shown = " ".join(
            f"{i + 1}:{s:.2f}"
            for i, s in enumerate(by_epoch)
            if i in (0, 1, 3, 5) or (i + 1) % 6 == 0 or i == len(by_epoch) - 1
        )
        fd = frechet_distance(feature, reference, generated)
        print(
            f"| {name} | {fd:.3f} | {measures['spectral']:.3f} | {measures['fixed']:.5f} | "
            f"{measures['detail_rms']:.2f} | {peak_frequencies(generated, reference)} | {shown} |",
            flush=True,
        )
        stem = name.split(" ")[0].replace("/", "-")
        save_grid(generated, grid_dir / f"{stem}.png", scale=3)
        save_detail(measures["mean_detail"], grid_dir / f"{stem}-mean-detail.png")
    save_detail(floor["mean_detail"], grid_dir / "real-mean-detail.png")
    print(f"\ngrids and mean-detail images (x8, grey 128 = 0, +-16 grey levels full scale): {grid_dir}")


def save_detail(mean_detail, path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = mean_detail.mul(127 / 16).add(128).round().clamp(0, 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    image.resize((image.width * 8, image.height * 8), Image.Resampling.NEAREST).save(path)


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))  # gan.py, steps.py and models.py
    if args.command == "worker":
        run_worker(args)
    torch.set_num_threads(1)
    {"translate": translate_table, "augment": augment_table, "train": train_variants}.get(
        args.command, lambda a: analyse_runs(a, a.runs)
    )(args)


if __name__ == "__main__":
    main()
