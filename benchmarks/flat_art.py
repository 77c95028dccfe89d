"""Offline quality benchmark on flat art: glyphs and symbols in one flat colour on white, sharp edges.

No network, no GPU, no Inception weights. The images are rendered here from the fonts matplotlib
ships (DejaVu, STIX, Computer Modern): letters, digits and symbols (stars, hearts, arrows, suits,
...), each in one random flat colour on a white background, filled or outlined, drawn at 4x and
area-downsampled to 32 px, so their edges are antialiased as an icon's are and everything else is
flat. Each recipe is trained on them through the real CLI (`gan.py --dataset folder`), sampled
with `gan.py --generate`, and scored per seed against one half of the images by
  - FD in the features of a fixed random conv net (scores.RandomFeatures), as photos.py;
  - precision and recall (k=3), density and coverage (k=5) in the same features
    (metrics.nearest_neighbour_scores, the code gan.py --evaluate uses on Inception features);
  - flat share (scores.flat_share): the share of pixels whose largest colour step to a neighbour is
    below 0.02. Speckle on flat regions lowers it; a spectral loss can be met with speckle, and
    FD in random features barely sees it;
  - spectral: the mean log power spectrum distance (scores.spectral_score).
The other half of the images scores the real-vs-real floor with as many images as each generated set.

    python benchmarks/flat_art.py                                   # 3 recipes, 2 seeds
    python benchmarks/flat_art.py --recipes plain improved --seeds 1 --epochs 55 --width 16 --grid-dir benchmarks/grids/flat

Long on 2 CPU cores: one 1,320-step run at --width 16 took 9-18 minutes with 4-5 runs sharing the cores
(load 13-20); the default 6 runs of 960 steps at --width 32 take well over an hour.
"""

import argparse
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from photos import save_grid
from quality import (
    NEIGHBOUR_COLUMNS,
    RECIPES,
    mean_and_spread,
    mean_only,
    neighbour_text,
    per_seed,
    print_recipe_table,
    train_and_sample,
    write_pngs,
)
from scores import RandomFeatures, flat_share, frechet_distance, spectral_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from metrics import nearest_neighbour_scores  # noqa: E402

DEFAULT_RECIPES = ["plain", "dcgan-recipe", "improved"]
RENDER_SCALE = 4  # drawn at 4x, then area-averaged: antialiased edges, flat insides
# Letters, digits and symbols; each font keeps those it has a glyph for.
CHARACTERS = "ABCDEFGHKMNPRSTWXYZabdeghkmqrs0123456789&@#%?★☆♠♣♥♦♪♫☀☁☂☎☺☻✈✉✓✔✖✚✿❤➔⚑⚓⚡⬆⬇⬅➡●■▲▼◆◇○□△▽◎☯☮☢☣♚♛♞⌂⌘∞∑∏√∫≈≠Ω"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=DEFAULT_RECIPES, help="recipes to compare")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds per recipe")
    p.add_argument("--images", type=int, default=1536, help="images rendered (half train-and-reference, half floor)")
    p.add_argument("--art-seed", type=int, default=0, help="seed of the glyphs, colours and styles")
    p.add_argument("--epochs", type=int, default=40, help="epochs per run (images // batch-size steps each)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--width", type=int, default=32, help="ngf = ndf of the DCGAN")
    p.add_argument("--feature-seed", type=int, default=0, help="seed of the random feature net")
    p.add_argument("--work-dir", default=None, help="where images and runs go [a temp folder]")
    p.add_argument("--grid-dir", default=None, help="where the sample grids go [WORK_DIR/grids]")
    p.add_argument("--keep-runs", action="store_true", help="keep each run's checkpoints and samples")
    p.add_argument("--device", default="cpu", help="gan.py's --device for the training runs")
    args = p.parse_args(argv)
    args.samples = args.images // 2  # as many as the floor's half, so every score has the same bias
    return args


# ---------------------------------------------------------------- data


def glyph_fonts():
    """(font path, the characters of CHARACTERS it draws) for every font matplotlib ships."""
    import matplotlib
    from matplotlib.ft2font import FT2Font

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    fonts = []
    for path in sorted(folder.glob("*.ttf")):
        if path.name.startswith("LastResort"):  # a box with the code point for every character
            continue
        font = FT2Font(str(path))
        drawn = [c for c in CHARACTERS if font.get_char_index(ord(c))]
        if len(drawn) >= 10:  # the size-variant and last-resort fonts have a handful at most
            fonts.append((path, drawn))
    return fonts


def render_glyph(font_path, character, colour, outlined, size, rng):
    """One glyph as uint8 (size, size, 3): flat colour on white, centred with some jitter in scale and place."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = size * RENDER_SCALE
    font = ImageFont.truetype(str(font_path), int(canvas * rng.uniform(0.55, 0.9)))
    image = Image.new("RGB", (canvas, canvas), "white")
    draw = ImageDraw.Draw(image)
    stroke = RENDER_SCALE * int(rng.integers(1, 3)) if outlined else 0
    left, top, right, bottom = draw.textbbox((0, 0), character, font=font, stroke_width=stroke)
    room_x, room_y = canvas - (right - left), canvas - (bottom - top)
    x = room_x / 2 + rng.uniform(-0.25, 0.25) * max(room_x, 0) - left
    y = room_y / 2 + rng.uniform(-0.25, 0.25) * max(room_y, 0) - top
    fill = "white" if outlined else colour
    draw.text((x, y), character, font=font, fill=fill, stroke_width=stroke, stroke_fill=colour)
    return np.asarray(image.resize((size, size), Image.Resampling.BOX))


def flat_colour(rng):
    """A saturated colour that stands out from white: hue at random, saturation and value bounded."""
    import colorsys

    red, green, blue = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.5, 1.0), rng.uniform(0.35, 0.9))
    return (round(255 * red), round(255 * green), round(255 * blue))


def render_flat_art(count, size=32, seed=0):
    """count glyph images as uint8 (N, 3, size, size); about a third outlined, the rest filled."""
    rng = np.random.default_rng(seed)
    fonts = glyph_fonts()
    images = []
    for _ in range(count):
        font_path, characters = fonts[rng.integers(len(fonts))]
        character = characters[rng.integers(len(characters))]
        images.append(render_glyph(font_path, character, flat_colour(rng), rng.uniform() < 1 / 3, size, rng))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------- scoring


class FlatArtScorer:
    """FD, precision/recall/density/coverage, flat share and spectral score against the reference half."""

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
            "flat": float(flat_share(images_uint8).mean()),
            "spectral": spectral_score(images_uint8, self.reference),
        }


def speckled(images_uint8, amplitude, seed=0):
    """The images with uniform noise of +-amplitude (0..255 units) on every pixel and channel."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(images_uint8.shape, generator=generator).mul(2).sub(1).mul(amplitude)
    return images_uint8.float().add(noise).round().clamp(0, 255).to(torch.uint8)


def print_table(results, args, floor, speckle_rows):
    steps = (args.images // args.batch_size) * args.epochs
    print()
    print(
        f"{args.images} glyph images of 32 px; {steps} steps per run (batch {args.batch_size}, "
        f"ngf=ndf={args.width}), {args.samples} samples, seeds {args.seeds}"
    )
    print(
        f"real-vs-real floor ({args.samples} vs {args.samples}): FD {floor['fd']:.3f}, precision "
        f"{floor['precision']:.3f}, recall {floor['recall']:.3f}, density {floor['density']:.3f}, coverage "
        f"{floor['coverage']:.3f}, spectral {floor['spectral']:.4f}"
    )
    low, high = np.percentile(floor["flat_per_image"], [10, 90])
    print(
        f"flat share: real {floor['flat']:.3f} (reference half {floor['reference_flat']:.3f}; "
        f"per image 10th-90th percentile {low:.3f}-{high:.3f})"
    )
    for amplitude, share in speckle_rows:
        print(f"flat share of the real images with +-{amplitude} (of 255) speckle: {share:.3f}")
    print()
    print_recipe_table(
        results,
        [
            ("FD ↓ (per seed)", "fd", per_seed(".3f")),
            *NEIGHBOUR_COLUMNS,
            ("flat share (real: floor)", "flat", per_seed(".3f")),
            ("spectral ↓", "spectral", mean_and_spread(".3f")),
            ("seconds per run", "seconds", mean_only(".0f")),
        ],
    )


def real_floor(scorer, held_out, reference):
    """The scores of the held-out real half: what a perfect generator would get."""
    floor = scorer(held_out)
    floor["flat_per_image"] = flat_share(held_out).numpy()
    floor["reference_flat"] = float(flat_share(reference).mean())
    return floor


def main(argv=None):
    args = parse_args(argv)
    work_dir = Path(args.work_dir or Path(tempfile.gettempdir()) / "dcgan-flat-art-benchmark")
    grid_dir = Path(args.grid_dir or work_dir / "grids")
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs; work folder {work_dir}")
    art = render_flat_art(args.images, seed=args.art_seed)
    art_dir = work_dir / f"glyphs32-n{args.images}-seed{args.art_seed}"
    write_pngs(art, art_dir)
    order = torch.randperm(len(art), generator=torch.Generator().manual_seed(args.art_seed))
    reference, held_out = art[order[: args.samples]], art[order[args.samples : 2 * args.samples]]
    scorer = FlatArtScorer(reference, args.feature_seed)
    floor = real_floor(scorer, held_out, reference)
    speckle_rows = [(amplitude, float(flat_share(speckled(held_out, amplitude)).mean())) for amplitude in (4, 8, 16)]
    save_grid(held_out, grid_dir / "real.png")
    results = {recipe: [] for recipe in args.recipes}
    for recipe in args.recipes:
        for seed in args.seeds:
            generated, seconds = train_and_sample(recipe, seed, args, art_dir, work_dir / "runs", 32)
            scores = {**scorer(generated), "seconds": seconds}
            results[recipe].append(scores)
            save_grid(generated, grid_dir / f"{recipe}-seed{seed}.png")
            if not args.keep_runs:
                shutil.rmtree(work_dir / "runs" / f"{recipe}-seed{seed}")
            print(
                f"{recipe:14s} seed {seed}: FD {scores['fd']:.3f}  {neighbour_text(scores)}  "
                f"flat {scores['flat']:.3f}  "
                f"spectral {scores['spectral']:.4f}  ({seconds:.0f}s)",
                flush=True,
            )
    print_table(results, args, floor, speckle_rows)
    print(f"\ngrids (first 64 samples, 2x nearest): {grid_dir}/<recipe>-seed<seed>.png; real: {grid_dir}/real.png")


if __name__ == "__main__":
    main()
