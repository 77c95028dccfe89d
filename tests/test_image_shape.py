"""--image-size WIDTHxHEIGHT: the flag, the networks of both orientations, a folder's crop and cache,
DiffAugment, and one tiny landscape run (32 wide, 16 tall) whose files are measured by hand."""

import json

import numpy as np
import pytest
import torch
from conftest import load_folder, measured_values, png_pixels, ready_for_main_in_process
from PIL import Image
from torch import nn

import augment
import gan
import metrics
import options
import savedflags
from folders import read_image
from models import ARCHITECTURES, build_discriminator, build_generator, count_values, init_weights

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
LANDSCAPE_ARGS = (
    "--dataset", "folder", "--dataroot", "data", "--image-size", "32x16", "--nz", "8", "--ngf", "8",
    "--ndf", "8", "--batch-size", "4", "--device", "cpu", "--no-compile", "--workers", "0", "--seed", "1",
    "--log-every", "2",
)  # fmt: skip


def band_image(path, width, height, colours, vertical=True):
    """A PNG of equal bands of colours, side by side (vertical) or stacked."""
    pixels = np.zeros((height, width, 3), np.uint8)
    for index, colour in enumerate(colours):
        if vertical:
            pixels[:, index * width // len(colours) : (index + 1) * width // len(colours)] = colour
        else:
            pixels[index * height // len(colours) : (index + 1) * height // len(colours)] = colour
    Image.fromarray(pixels).save(path)


class MeanColour(nn.Module):
    """Inception's stand-in for FID: each image's three channel means."""

    num_features = 3

    def forward(self, images_uint8):
        return images_uint8.float().mean(dim=(2, 3))


# ---------------------------------------------------------------- the flag


def test_the_flag_reads_width_then_height_and_keeps_squares_as_their_side():
    assert options.parse_flags(["--image-size", "64x32"])[0].image_size == "64x32"
    assert options.parse_flags(["--image-size", "16x256"])[0].image_size == "16x256"
    assert options.parse_flags(["--image-size", "64x64"])[0].image_size == 64  # the same run as --image-size 64
    assert options.parse_flags(["--image-size", "32"])[0].image_size == 32
    from imagesize import image_sides

    assert image_sides("64x32") == (64, 32) and image_sides(32) == (32, 32)


@pytest.mark.parametrize("value", ["64x48", "8x16", "512x64", "64x", "x32", "64x32x16", "0x32"])
def test_a_size_that_is_not_two_powers_of_two_from_16_to_256_is_one_line(gan_main, tmp_path, value):
    code, _, err = gan_main(["--image-size", value])
    assert code == 2 and "Traceback" not in err
    assert err.strip().endswith(
        f"argument --image-size: must be a power of two from 16 to 256, or WIDTHxHEIGHT with each side one "
        f"(64x32), got {value}"
    )
    assert not any(tmp_path.iterdir())


def test_saved_sizes_are_valid_only_as_the_flag_writes_them():
    parser = options.build_parser()
    for value in (64, 16, "64x32", "16x256"):
        assert savedflags.saved_flag_is_valid(parser, "image_size", value), value
    for value in ("64x64", "64X32", "64", [64, 32], 64.0, True, "64x48", 512):
        assert not savedflags.saved_flag_is_valid(parser, "image_size", value), value


def test_cifar10_refuses_a_size_that_is_not_square_before_anything_is_made(gan_main, tmp_path, monkeypatch):
    refusal = (
        "--image-size 64x32 is not square, and CIFAR-10's images are: train on a --dataset folder of images "
        "of that shape (or give a square size)"
    )
    code, _, err = gan_main(["--image-size", "64x32", "--device", "cpu", "--epochs", "1"])
    assert code == 2 and "Traceback" not in err and err.strip().endswith(refusal)
    assert not any(tmp_path.iterdir())
    # --evaluate --images scores against CIFAR-10 at the size given: refused before Inception is built
    monkeypatch.setattr(metrics, "build_metrics", lambda *args: pytest.fail("built the scorers first"))
    (tmp_path / "pics").mkdir()
    for name in ("a.png", "b.png"):
        band_image(tmp_path / "pics" / name, 64, 32, [RED, GREEN])
    code, _, err = gan_main(
        ["--evaluate", "--images", "pics", "--image-size", "64x32", "--device", "cpu"], MeanColour()
    )
    assert code == 2 and "Traceback" not in err and err.strip().endswith(refusal)
    assert [path.name for path in tmp_path.iterdir()] == ["pics"]


# ---------------------------------------------------------------- the networks


@pytest.mark.parametrize(("image_size", "height", "width"), [("32x16", 16, 32), ("16x32", 32, 16)])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_the_networks_draw_and_judge_both_orientations(arch, image_size, height, width):
    """Two stages (the shorter side, 16 = 4 x 2 x 2) from a seed of 4 on the shorter side and 8 on the longer."""
    torch.manual_seed(0)
    seed = (4, 8) if width > height else (8, 4)
    for nc, num_classes, spectral_norm in ((3, 0, False), (1, 3, True)):
        G = build_generator(arch, 8, 4, image_size, nc=nc, num_classes=num_classes)
        D = build_discriminator(arch, 4, image_size, spectral_norm, nc=nc, num_classes=num_classes)
        G.apply(init_weights)
        D.apply(init_weights)
        labels = torch.tensor([0, 2]) if num_classes else None
        images = G(torch.randn(2, 8, 1, 1), labels)
        assert images.shape == (2, nc, height, width)
        assert D(images, labels).shape == (2,)
        first = G.main[0] if arch == "dcgan" else G.main[1]
        last = D.main[-1]
        if arch == "dcgan":  # a kernel of the seed's shape from 1x1, and back to 1x1
            assert first.weight.shape == (8, 8, *seed) and last.weight.shape == (1, 8, *seed)
        else:  # nz -> 8 channels of the seed's map, and that map flattened -> 1
            assert first.weight.shape == (8 * seed[0] * seed[1], 8) and last.weight.shape == (1, 8 * seed[0] * seed[1])


@pytest.mark.parametrize("arch", ["dcgan", "upsample-fullres"])
def test_the_memory_estimate_counts_what_non_square_networks_hold(arch):
    """count_values's (parameters, values the layers output) against the networks' own, hooked."""
    assert count_values(arch, 8, 8, 8, "32x16") == measured_values(arch, "32x16")


# ---------------------------------------------------------------- a folder's images


def test_a_folders_image_is_resized_to_cover_the_shape_and_centre_cropped(tmp_path):
    # 96 x 32, three upright bands: at 32x16 (scale 1/2: 48 x 16) the centre 32 columns keep a quarter of
    # the red band, the green and a quarter of the blue (8, 16 and 8 columns), with blurred seams
    band_image(tmp_path / "wide.png", 96, 32, [RED, GREEN, BLUE])
    wide = read_image(tmp_path / "wide.png", "32x16")
    assert wide.shape == (3, 16, 32)
    assert wide[:, 8, 2].tolist() == list(RED) and wide[:, 8, 16].tolist() == list(GREEN)
    assert wide[:, 8, 29].tolist() == list(BLUE)
    # 32 x 96, three stacked bands: at 32x16 nothing is resized and the centre 16 rows are green alone
    band_image(tmp_path / "tall.png", 32, 96, [RED, GREEN, BLUE], vertical=False)
    tall = read_image(tmp_path / "tall.png", "32x16")
    assert tall.shape == (3, 16, 32)
    assert torch.equal(tall, torch.tensor(GREEN, dtype=torch.uint8).view(3, 1, 1).expand(3, 16, 32))
    # at 16x32 (scale 1/2: 16 x 48) the centre 32 rows are a quarter red, the green, a quarter blue
    tall_crop = read_image(tmp_path / "tall.png", "16x32")
    assert tall_crop.shape == (3, 32, 16)
    assert tall_crop[:, 2, 8].tolist() == list(RED) and tall_crop[:, 29, 8].tolist() == list(BLUE)


def test_the_cache_of_one_orientation_never_serves_the_other(tmp_path, cache_dir):
    (tmp_path / "data").mkdir()
    band_image(tmp_path / "data" / "a.png", 48, 48, [RED, GREEN, BLUE])
    band_image(tmp_path / "data" / "b.png", 48, 48, [BLUE, RED, GREEN], vertical=False)
    said = []
    for image_size in ("32x16", "16x32", "32x16"):
        images = load_folder(tmp_path / "data", image_size, 0, cache_dir, say=said.append)
        direct = torch.stack([read_image(tmp_path / "data" / name, image_size) for name in ("a.png", "b.png")])
        assert torch.equal(images, direct), image_size
    assert said[0].startswith("image cache: no cache yet, building one")
    assert said[1].startswith("image cache: no cache for --image-size 16x32 yet, building one")
    assert said[2].startswith("image cache: reusing") and "images-32x16px-" in said[2]
    names = sorted(path.name.split("-")[1] for path in (cache_dir / "folders").glob("images-*.npy"))
    assert names == ["16x32px", "32x16px"]


def test_diffaugment_shifts_and_cuts_out_by_the_height_and_the_width():
    shifts = augment.random_shifts(torch.zeros(4000, 3, 16, 64), torch.Generator().manual_seed(0))
    assert set(shifts[:, 0].tolist()) == set(range(-2, 3)) and set(shifts[:, 1].tolist()) == set(range(-8, 9))
    # a portrait batch: the cut-out rectangle's centre lands anywhere, also in the lower half
    corners = augment.random_cutout_corners(torch.zeros(4000, 3, 64, 16), torch.Generator().manual_seed(0))
    assert (corners[:, 0].min(), corners[:, 0].max()) == (-16, 48)
    assert (corners[:, 1].min(), corners[:, 1].max()) == (-4, 12)
    cut = augment.cutout(torch.ones(1, 3, 64, 16), torch.tensor([[0, 0]]))
    assert (cut[0, :, :32, :8] == 0).all() and cut.sum() == 3 * (64 * 16 - 32 * 8)


# ---------------------------------------------------------------- a landscape run, measured by hand


class ShapeRecordingFeatures(MeanColour):
    """MeanColour, recording the shapes of the images it is given."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def forward(self, images_uint8):
        self.shapes.add(tuple(images_uint8.shape[-2:]))
        return super().forward(images_uint8)


@pytest.fixture(scope="module")
def landscape_run(tmp_path_factory):
    """8 images of 48 x 24 in data/, one epoch at --image-size 32x16 with FID, then --generate 3 --seed 4:
    (the run's folder, the feature net FID used)."""
    folder = tmp_path_factory.mktemp("landscape")
    (folder / "data").mkdir()
    for index in range(8):
        colours = [RED, GREEN, BLUE][index % 3 :] + [RED, GREEN, BLUE][: index % 3]
        band_image(folder / "data" / f"{index}.png", 48, 24, colours, vertical=index % 2 == 0)
    features = ShapeRecordingFeatures()
    with pytest.MonkeyPatch.context() as patch:
        ready_for_main_in_process(patch)
        patch.chdir(folder)
        fid_flags = ["--fid-every", "1", "--eval-samples", "8"]
        assert gan.main([*LANDSCAPE_ARGS, "--epochs", "1", *fid_flags], features) == 0
        assert gan.main(["--generate", "3", "--seed", "4", "--device", "cpu"]) == 0
    return folder, features


def png_size(path):
    with Image.open(path) as image:
        return image.size


def test_the_grids_tiles_are_32_wide_and_16_tall(landscape_run):
    folder, _ = landscape_run
    # 8 x 8 tiles with 2 pixels of padding before each and after the last: 8 * (32 + 2) + 2 by 8 * (16 + 2) + 2
    assert png_size(folder / "images" / "epoch_001.png") == (274, 146)
    assert png_size(folder / "images" / "progress.gif") == (274, 146)
    # the 8 real images in one row: 8 * (32 + 2) + 2 by 16 + 2 + 2
    assert png_size(folder / "images" / "real_samples.png") == (274, 20)
    real = png_pixels(folder / "images" / "real_samples.png")
    # the first tile is the seeded draw's first image, scaled by 2/3: the even ones have upright bands
    # (left to right), the odd ones stacked bands (top to bottom), in the colours turned by index % 3
    first = int(torch.randperm(8, generator=torch.Generator().manual_seed(1))[0])
    colours = [RED, GREEN, BLUE][first % 3 :] + [RED, GREEN, BLUE][: first % 3]
    if first % 2 == 0:
        assert real[:, 10, 2 + 2].tolist() == list(colours[0]) and real[:, 10, 2 + 29].tolist() == list(colours[2])
    else:
        assert real[:, 2 + 1, 2 + 16].tolist() == list(colours[0]) and real[:, 2 + 14, 2 + 16].tolist() == list(
            colours[2]
        )


def test_generate_writes_32_by_16_pngs_and_load_generator_draws_them(landscape_run):
    folder, _ = landscape_run
    written = sorted((folder / "images" / "generated").glob("0*.png"))
    assert [png_size(path) for path in written] == [(32, 16)] * 3
    # three images in a column (grid_side(3) = 1): 32 + 2 + 2 by 3 * (16 + 2) + 2
    assert png_size(folder / "images" / "generated" / "grid.png") == (36, 56)
    generator = gan.load_generator(folder / "checkpoints" / "checkpoint.pt", device="cpu")
    assert (generator.width, generator.height) == (32, 16)
    sampled = generator.sample(3, seed=4)
    assert sampled.shape == (3, 3, 16, 32)
    assert torch.equal(sampled.int(), torch.stack([png_pixels(path) for path in written]))


def test_evaluating_a_non_square_checkpoint_against_cifar10_is_refused_before_inception(
    landscape_run, gan_main, monkeypatch
):
    folder, _ = landscape_run
    checkpoints = sorted(path.name for path in (folder / "checkpoints").iterdir())
    log = (folder / "checkpoints" / "metrics.jsonl").read_bytes()
    monkeypatch.setattr(metrics, "build_metrics", lambda *args: pytest.fail("built the scorers first"))
    checkpoint = folder / "checkpoints" / "checkpoint.pt"
    code, _, err = gan_main(["--evaluate", "--checkpoint", checkpoint, "--dataset", "cifar10", "--device", "cpu"])
    assert code == 2 and "Traceback" not in err
    assert err.strip().endswith(
        "--image-size 32x16 is not square, and CIFAR-10's images are: train on a --dataset folder of images "
        "of that shape (or give a square size)"
    )
    assert sorted(path.name for path in (folder / "checkpoints").iterdir()) == checkpoints
    assert (folder / "checkpoints" / "metrics.jsonl").read_bytes() == log


def test_the_run_keeps_the_size_as_typed_and_fid_sees_the_images_at_it(landscape_run):
    folder, features = landscape_run
    flags = json.loads((folder / "checkpoints" / "flags.json").read_text())
    assert flags["image_size"] == "32x16"
    assert options.parse_flags(["--config", str(folder / "checkpoints" / "flags.json")])[0].image_size == "32x16"
    assert features.shapes == {(16, 32)}  # real and generated images alike, before Inception's own resize
    assert (folder / "checkpoints" / "fid_real_folder_8_32x16px.pt").is_file()
