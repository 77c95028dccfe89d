"""Using the trained generator: --generate, --interpolate and slerp, the progress GIF,
the EMA generator, and --tensorboard."""

import functools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    TINY_ARGS,
    as_pixels,
    drawn_pixels,
    png_pixels,
    run_in_process,
    saved_generator,
    truncated_noise,
)
from PIL import Image

import after_training
import artifacts
import folders
import gan
import models
import modes
import options
import outputs
import sampling
import steps
from runtime import Runtime, choose_precision

SIDE = 16  # TINY_ARGS' --image-size
PADDING = 2  # artifacts.save_grid's padding between and around the images


def auto_precision_runtime():
    """The CPU runtime a run without --precision trains in: bf16 autocast where the CPU has bf16."""
    cpu = torch.device("cpu")
    return Runtime(cpu, choose_precision("auto", cpu))


def grid_pixels(columns, rows, side=SIDE):
    """(width, height) of a save_grid image of rows x columns tiles."""
    return columns * (side + PADDING) + PADDING, rows * (side + PADDING) + PADDING


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def gif_frames(path):
    with Image.open(path) as image:
        return image.n_frames


@pytest.fixture(scope="module")
def raw_run(tmp_path_factory):
    """A 1-epoch TINY_ARGS run trained with --ema 0: its checkpoint has no EMA generator."""
    folder = tmp_path_factory.mktemp("raw_run")
    assert run_in_process([*TINY_ARGS, "--epochs", "1", "--ema", "0"], folder) == 0
    return folder


# ---------------------------------------------------------------- --generate


def test_generate_writes_n_images_and_a_grid(trained_run, gan_main, tmp_path):
    checkpoint = trained_run / "checkpoints" / "checkpoint.pt"
    code, out, err = gan_main(["--generate", 7, "--checkpoint", checkpoint, "--seed", 3])
    assert code == 0, err
    folder = tmp_path / "images" / "generated"
    singles = sorted(p.name for p in folder.glob("*.png") if p.name != "grid.png")
    assert singles == [f"{i:04d}.png" for i in range(7)]
    for name in singles:
        assert pixels(folder / name).shape == (SIDE, SIDE, 3)
    # 7 images in a grid of side floor(sqrt(7)) = 2: 2 columns, 4 rows
    with Image.open(folder / "grid.png") as grid:
        assert grid.size == grid_pixels(columns=2, rows=4)
    assert "using the EMA generator" in out
    assert "wrote 7 images" in out and "seed 3" in out
    assert "Traceback" not in err


def test_generate_honours_image_dir(trained_run, gan_main, tmp_path):
    checkpoint = trained_run / "checkpoints" / "checkpoint.pt"
    code, out, err = gan_main(["--generate", 2, "--checkpoint", checkpoint, "--image-dir", "elsewhere", "--seed", 1])
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "elsewhere" / "generated").iterdir()) == [
        "0000.png",
        "0001.png",
        "grid.png",
    ]
    assert not (tmp_path / "images").exists()


def test_a_second_generate_writes_into_a_fresh_folder(trained_run, gan_main, tmp_path):
    checkpoint = trained_run / "checkpoints" / "checkpoint.pt"
    code, out, err = gan_main(["--generate", 3, "--checkpoint", checkpoint, "--seed", 1])
    assert code == 0, err
    first = {p.name: p.read_bytes() for p in (tmp_path / "images" / "generated").iterdir()}
    code, out, err = gan_main(["--generate", 2, "--checkpoint", checkpoint, "--seed", 2])
    assert code == 0, err
    assert out.splitlines()[-2:] == [
        "images/generated/ holds the images of an earlier --generate: writing into images/generated-2/",
        "wrote 2 images and grid.png to images/generated-2/ (seed 2)",
    ]
    assert {p.name: p.read_bytes() for p in (tmp_path / "images" / "generated").iterdir()} == first
    assert sorted(p.name for p in (tmp_path / "images" / "generated-2").iterdir()) == [
        "0000.png",
        "0001.png",
        "grid.png",
    ]


def test_same_seed_gives_the_same_images(trained_run, gan_main, tmp_path):
    checkpoint = trained_run / "checkpoints" / "checkpoint.pt"
    for folder, seed in (("first", 3), ("second", 3), ("other", 4)):
        code, _, err = gan_main(["--generate", 5, "--checkpoint", checkpoint, "--seed", seed, "--image-dir", folder])
        assert code == 0, err
    for index in range(5):
        name = f"generated/{index:04d}.png"
        np.testing.assert_array_equal(pixels(tmp_path / "first" / name), pixels(tmp_path / "second" / name))
    different = [
        not np.array_equal(
            pixels(tmp_path / "first" / f"generated/{i:04d}.png"), pixels(tmp_path / "other" / f"generated/{i:04d}.png")
        )
        for i in range(5)
    ]
    assert all(different), "another seed gives other images"


def test_generate_spans_several_internal_batches(trained_run, gan_main, monkeypatch, tmp_path):
    # the real internal batch is 500 images; 3 makes 7 images take batches of 3, 3 and 1
    batch_sizes = []
    real_batches = sampling.generated_batches

    def small_batches(*args, **kwargs):
        for images in real_batches(*args, **{**kwargs, "batch_size": 3}):
            batch_sizes.append(len(images))
            yield images

    monkeypatch.setattr(after_training, "generated_batches", small_batches)
    checkpoint = trained_run / "checkpoints" / "checkpoint.pt"
    code, out, err = gan_main(["--generate", 7, "--checkpoint", checkpoint, "--seed", 0])
    assert code == 0, err
    assert batch_sizes == [3, 3, 1]
    folder = tmp_path / "images" / "generated"
    images = [pixels(folder / f"{i:04d}.png") for i in range(7)]
    assert not (folder / "0007.png").exists()
    # every batch drew its own noise: no image repeats one of another batch
    assert len({image.tobytes() for image in images}) == 7
    with Image.open(folder / "grid.png") as grid:
        assert grid.size == grid_pixels(columns=2, rows=4)


def test_the_generated_grid_holds_the_first_64_images_of_all_the_batches(trained_run, gan_main, monkeypatch, tmp_path):
    """--generate 100 drawn in batches of 30 (30, 30, 30, 10): grid.png is 8 x 8 tiles, images
    0000 to 0063 in order (two whole batches and 4 of the third), not the first 64 of each batch."""
    real_batches = sampling.generated_batches
    monkeypatch.setattr(
        after_training, "generated_batches", lambda *a, **k: real_batches(*a, **{**k, "batch_size": 30})
    )
    checkpoint = trained_run / "checkpoints" / "checkpoint.pt"
    code, _, err = gan_main(["--generate", 100, "--checkpoint", checkpoint, "--seed", 0])
    assert code == 0, err
    folder = tmp_path / "images" / "generated"
    assert (folder / "0099.png").is_file() and not (folder / "0100.png").exists()
    grid = png_pixels(folder / "grid.png")
    assert grid.shape[1:] == grid_pixels(columns=8, rows=8)[::-1]
    tile = SIDE + PADDING
    for index in range(64):
        row, column = divmod(index, 8)
        drawn = grid[:, PADDING + row * tile :, PADDING + column * tile :][:, :SIDE, :SIDE]
        assert torch.equal(drawn, png_pixels(folder / f"{index:04d}.png")), index


def test_generate_from_a_checkpoint_without_ema_uses_the_raw_generator(raw_run, gan_main, tmp_path):
    checkpoint = raw_run / "checkpoints" / "checkpoint.pt"
    code, out, err = gan_main(["--generate", 3, "--checkpoint", checkpoint, "--seed", 1])
    assert code == 0, err
    assert "using the raw generator" in out
    assert len(list((tmp_path / "images" / "generated").glob("0*.png"))) == 3


def test_generate_refuses_an_explicit_other_architecture(trained_run, gan_main, tmp_path):
    checkpoint = trained_run / "checkpoints" / "checkpoint.pt"
    code, _, err = gan_main(["--generate", 3, "--checkpoint", checkpoint, "--image-size", 32])
    assert code == 2
    assert "another architecture" in err and "--image-size 32 (checkpoint: 16)" in err
    assert "Traceback" not in err
    assert not (tmp_path / "images" / "generated").exists()


@pytest.mark.parametrize("saved", ["clip", "tanh", None])  # None: a checkpoint from before --g-output
def test_generate_draws_with_the_last_activation_the_checkpoint_names(saved, trained_run, gan_main, tmp_path):
    """At a tiny --truncation every image is G's image of the zero vector: its last convolution's
    colours cut at -1 and 1 (clip), or squashed by tanh (tanh, and checkpoints without the flag)."""
    state = torch.load(trained_run / "checkpoints" / "checkpoint.pt", weights_only=True)
    G = models.build_generator("dcgan", 8, 8, 16)
    G.load_state_dict(state["netG_ema"])
    models.estimate_batch_norm(G, 8, "cpu")
    last = [name for name, m in G.main.named_children() if isinstance(m, torch.nn.ConvTranspose2d)][-1]
    with torch.no_grad():  # colours beyond [-1, 1] for some pixels, inside it for others
        G.main[int(last)].weight.mul_(1.5 / G.eval().main[:-1](torch.zeros(1, 8, 1, 1)).std())
        before = G.main[:-1](torch.zeros(1, 8, 1, 1))[0]
    state["netG_ema"][f"main.{last}.weight"] = G.main[int(last)].weight.clone()
    if saved is None:
        del state["flags"]["g_output"]
    else:
        state["flags"]["g_output"] = saved
    torch.save(state, tmp_path / "saved.pt")
    code, _, err = gan_main(["--generate", 1, "--truncation", 1e-6, "--checkpoint", "saved.pt", "--seed", 1])
    assert code == 0, err
    drawn = png_pixels(tmp_path / "images" / "generated" / "0000.png")
    clipped, squashed = (as_pixels(colours) for colours in (before.clamp(-1, 1), before.tanh()))
    expected, other = (clipped, squashed) if saved == "clip" else (squashed, clipped)
    assert (drawn - expected).abs().max() <= 2
    assert (drawn - other).abs().max() > 20


def test_generate_takes_a_checkpoint_from_before_g_output_as_tanh(trained_run, gan_main, tmp_path):
    state = torch.load(trained_run / "checkpoints" / "checkpoint.pt", weights_only=True)
    del state["flags"]["g_output"]
    torch.save(state, tmp_path / "old.pt")
    code, _, err = gan_main(["--generate", 1, "--checkpoint", "old.pt", "--g-output", "tanh"])
    assert code == 0, err
    code, _, err = gan_main(["--generate", 1, "--checkpoint", "old.pt", "--g-output", "clip"])
    assert code == 2 and "another architecture: --g-output clip (checkpoint: tanh)" in err


def test_generate_refuses_weights_that_do_not_fit_the_saved_flags(trained_run, gan_main, tmp_path):
    state = torch.load(trained_run / "checkpoints" / "checkpoint.pt", weights_only=True)
    state["flags"]["ngf"] = 16  # the weights are those of ngf 8
    torch.save(state, tmp_path / "mismatched.pt")
    code, out, err = gan_main(["--generate", 3, "--checkpoint", "mismatched.pt"])
    assert code == 2
    assert "mismatched.pt does not fit this generator" in err and "size mismatch" in err


def test_generate_refuses_unusable_saved_flags(trained_run, gan_main, tmp_path):
    state = torch.load(trained_run / "checkpoints" / "checkpoint.pt", weights_only=True)
    state["flags"]["image_size"] = 20
    torch.save(state, tmp_path / "odd.pt")
    code, _, err = gan_main(["--generate", 3, "--checkpoint", "odd.pt"])
    assert code == 2 and "unusable flags" in err


def test_generate_without_a_checkpoint_is_a_clear_error(gan_main, tmp_path):
    code, _, err = gan_main(["--generate", 3])
    assert code == 2 and "checkpoints/checkpoint.pt does not exist" in err


# ---------------------------------------------------------------- --interpolate and slerp


def test_interpolate_writes_a_grid_and_a_gif(trained_run, gan_main, tmp_path):
    checkpoint = trained_run / "checkpoints" / "checkpoint.pt"
    steps = 5
    code, out, err = gan_main(["--interpolate", "--steps", steps, "--checkpoint", checkpoint, "--seed", 2])
    assert code == 0, err
    assert "using the EMA generator" in out
    # rows are the 8 walks, columns the steps along each
    with Image.open(tmp_path / "images" / "interpolation.png") as grid:
        assert grid.size == grid_pixels(columns=steps, rows=8)
    # there and back again, without repeating the two ends: 2 * steps - 2 frames
    assert gif_frames(tmp_path / "images" / "interpolation.gif") == 2 * steps - 2
    with Image.open(tmp_path / "images" / "interpolation.gif") as gif:
        assert gif.size == grid_pixels(columns=2, rows=4)  # the 8 walks at one step


def test_walks_beyond_the_memory_are_refused_before_they_are_drawn(trained_run, gan_main, tmp_path, monkeypatch):
    """8 walks of 16x16 px images, 10 steps: 61,440 values, 1.9 MiB at 32 bytes each."""
    checkpoint = trained_run / "checkpoints" / "checkpoint.pt"
    needed = 8 * 10 * 3 * 16 * 16 * after_training.WALK_BYTES_PER_VALUE
    monkeypatch.setattr(folders, "available_ram_bytes", lambda: needed - 1)
    monkeypatch.setattr(after_training, "sample", lambda *args: pytest.fail("drew before the memory check"))
    code, out, err = gan_main(["--interpolate", "--checkpoint", checkpoint, "--image-dir", "walks"])
    assert code == 2 and err.strip().endswith(
        "error: --steps 10: 8 walks of 16x16 px images need about 1.9 MiB of memory, and 1.9 MiB is available: "
        "take fewer --steps"
    )
    assert not (tmp_path / "walks").exists()
    monkeypatch.setattr(folders, "available_ram_bytes", lambda: needed)
    monkeypatch.setattr(after_training, "sample", sampling.sample)
    code, out, err = gan_main(["--interpolate", "--checkpoint", checkpoint, "--image-dir", "walks"])
    assert code == 0 and (tmp_path / "walks" / "interpolation.gif").is_file(), err


def test_interpolation_rows_walk_from_the_start_noise_to_the_end_noise(trained_run, gan_main, tmp_path):
    checkpoint = trained_run / "checkpoints" / "checkpoint.pt"
    code, _, err = gan_main(["--interpolate", "--steps", 4, "--checkpoint", checkpoint, "--seed", 2])
    assert code == 0, err
    # the ends of each walk, drawn independently: --seed 2 gives the start noise, then the end noise
    state = torch.load(checkpoint, weights_only=True)
    G = sampling.generator_of(state["flags"])
    G.load_state_dict(state["netG_ema"])
    generator = torch.Generator().manual_seed(2)
    ends = [torch.randn(8, state["flags"]["nz"], 1, 1, generator=generator) for _ in range(2)]
    with torch.no_grad():
        expected = [G.eval()(noise).add(1).mul(127.5).round().permute(0, 2, 3, 1).numpy() for noise in ends]
    grid = pixels(tmp_path / "images" / "interpolation.png").astype(int)
    tile = SIDE + PADDING
    for walk in range(8):
        row = [grid[PADDING + walk * tile :, PADDING + c * tile :][:SIDE, :SIDE] for c in range(4)]
        np.testing.assert_allclose(row[0], expected[0][walk], atol=1)
        np.testing.assert_allclose(row[-1], expected[1][walk], atol=1)
        assert np.abs(row[1] - row[0]).sum() > 0 and np.abs(row[2] - row[-1]).sum() > 0, "steps in between"


def test_interpolate_walks_between_noise_truncated_as_truncation_says(trained_run, gan_main, tmp_path):
    """--interpolate --truncation 0.5 --seed 2: each row starts and ends at G's images of --seed 2's
    start and end noise drawn from a normal truncated to [-0.5, 0.5], by hand."""
    checkpoint = trained_run / "checkpoints" / "checkpoint.pt"
    argv = ["--interpolate", "--steps", 3, "--checkpoint", checkpoint, "--seed", 2, "--truncation", 0.5]
    code, _, err = gan_main([*argv, "--precision", "fp32"])
    assert code == 0, err
    G, nz = saved_generator(checkpoint)
    generator = torch.Generator().manual_seed(2)
    start, end = (drawn_pixels(G, truncated_noise(8, nz, 0.5, generator)) for _ in range(2))
    grid = png_pixels(tmp_path / "images" / "interpolation.png")
    tile = SIDE + PADDING
    for walk in range(8):
        row = grid[:, PADDING + walk * tile :][:, :SIDE]
        torch.testing.assert_close(row[:, :, PADDING : PADDING + SIDE], start[walk], rtol=0, atol=1)
        torch.testing.assert_close(row[:, :, PADDING + 2 * tile :][:, :, :SIDE], end[walk], rtol=0, atol=1)


def test_slerp_endpoints_are_the_inputs():
    generator = torch.Generator().manual_seed(0)
    start, end = torch.randn(3, 8, 1, 1, generator=generator), torch.randn(3, 8, 1, 1, generator=generator)
    path = after_training.slerp(start, end, torch.tensor([0.0, 1.0]))
    assert path.shape == (2, 3, 8, 1, 1)
    torch.testing.assert_close(path[0], start)
    torch.testing.assert_close(path[1], end)


def test_slerp_of_orthogonal_unit_vectors_by_hand():
    start = torch.tensor([[1.0, 0.0, 0.0]]).view(1, 3, 1, 1)
    end = torch.tensor([[0.0, 1.0, 0.0]]).view(1, 3, 1, 1)
    fractions = torch.tensor([0.0, 0.25, 0.5, 1.0])
    path = after_training.slerp(start, end, fractions).flatten(1)
    torch.testing.assert_close(path[2], torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2))
    # on the unit circle at angle t * pi/2: (cos, sin), norm 1 all the way (a straight line dips to 0.71)
    for t, point in zip(fractions.tolist(), path):
        angle = t * math.pi / 2
        torch.testing.assert_close(point, torch.tensor([math.cos(angle), math.sin(angle), 0.0]))
        assert point.norm().item() == pytest.approx(1.0, abs=1e-6)


def test_a_walk_of_each_class_draws_every_step_of_a_row_in_that_row_s_class():
    """--interpolate of a conditional G walks one class per row; the walks are drawn flattened step
    by step (step 0 of every row, then step 1, ...), so the labels of each step are the rows' classes
    in row order, not one class for several steps."""
    classes = torch.tensor([4, 1, 7])  # rows in no sorted order, as a sample of more than 10 classes may not be
    walk = after_training.Walks(3, classes, row_names=["four", "one", "seven"])
    opts, _ = options.parse_flags(["--interpolate", "--steps", "4"])
    noise, labels = after_training.walk_inputs(walk, 8, opts, seed=0)
    assert noise.shape == (4, 3, 8, 1, 1) and labels.shape == (4 * 3,)
    for step, step_labels in enumerate(labels.view(4, 3)):
        assert step_labels.tolist() == [4, 1, 7], step


def test_slerp_keeps_the_angle_proportional_to_the_fraction():
    generator = torch.Generator().manual_seed(1)
    start, end = torch.randn(1, 100, 1, 1, generator=generator), torch.randn(1, 100, 1, 1, generator=generator)
    end = end / end.norm() * start.norm()  # equal norms: the path stays on their sphere
    omega = torch.acos(torch.nn.functional.cosine_similarity(start.flatten(1), end.flatten(1))).item()
    fractions = torch.linspace(0, 1, 7)
    path = after_training.slerp(start, end, fractions).flatten(2)[:, 0]
    for t, point in zip(fractions.tolist(), path):
        angle = torch.acos(torch.nn.functional.cosine_similarity(point, start.flatten(), dim=0).clamp(-1, 1)).item()
        assert angle == pytest.approx(t * omega, abs=1e-3)
        assert point.norm().item() == pytest.approx(start.norm().item(), rel=1e-5)


@pytest.mark.parametrize("offset", [0.0, 1e-7, 1e-4])
def test_slerp_of_nearly_parallel_vectors_is_finite(offset):
    start = torch.randn(2, 16, 1, 1, generator=torch.Generator().manual_seed(2))
    end = start + offset
    path = after_training.slerp(start, end, torch.linspace(0, 1, 5))
    assert torch.isfinite(path).all()
    # so close together the arc is the straight line
    straight = torch.stack([(1 - t) * start + t * end for t in torch.linspace(0, 1, 5)])
    torch.testing.assert_close(path, straight, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- progress GIF and EMA of a training run


def test_progress_gif_has_one_frame_per_epoch(trained_run, raw_run):
    assert gif_frames(trained_run / "images" / "progress.gif") == 2
    assert gif_frames(raw_run / "images" / "progress.gif") == 1
    with (
        Image.open(trained_run / "images" / "progress.gif") as gif,
        Image.open(trained_run / "images" / "epoch_002.png") as last,
    ):
        assert gif.size == last.size


def test_training_keeps_an_ema_generator(trained_run):
    folder = trained_run / "checkpoints"
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert state["netG_ema"] is not None and state["netG_ema"].keys() == state["netG"].keys()
    standalone = torch.load(folder / "netG_ema.pth", weights_only=True)
    for name, value in state["netG_ema"].items():
        torch.testing.assert_close(standalone[name], value)
    weights = [name for name in state["netG"] if name.endswith("weight")]
    differing = [name for name in weights if not torch.allclose(state["netG_ema"][name], state["netG"][name])]
    assert differing == weights, "after 8 steps the average lags behind every weight of G"
    # and it moved with G: the warm-up decays (0.1 at step 0, 0.47 at step 7) leave 0.01% of the
    # initial weights in it, so it sits far nearer G's last weights than G's first
    start, ema, last = (
        flat(weights_of) for weights_of in (initial_generator(state["flags"]), state["netG_ema"], state["netG"])
    )
    assert torch.dist(ema, last) < 0.5 * torch.dist(start, last)


def initial_generator(flags):
    """The generator a run with these flags starts from (seeded from --seed, as gan.start_state does)."""
    typed = {name: flags[name] for name in (*modes.ARCHITECTURE_FLAGS, "seed")}
    argv = [
        f"--{name.replace('_', '-')}" + ("" if value is True else f"={value}")
        for name, value in typed.items()
        if value is not False
    ]
    opts, _ = options.parse_flags(argv)
    torch.manual_seed(opts.seed)
    return steps.build_nets(opts, Runtime(torch.device("cpu"))).G.state_dict()


def flat(state_dict):
    return torch.cat([value.flatten() for name, value in state_dict.items() if name.endswith(("weight", "bias"))])


def test_the_saved_ema_generator_has_batchnorm_statistics_of_its_own(trained_run, raw_run):
    """The average's statistics are estimated from its own samples before the epoch's pictures
    and the checkpoint; the trained G keeps the running statistics of its training batches."""
    state = torch.load(trained_run / "checkpoints" / "checkpoint.pt", weights_only=True)
    G = sampling.generator_of(state["flags"])
    G.load_state_dict(state["netG_ema"])
    statistics = [name for name in state["netG"] if "running" in name]
    assert statistics
    assert all(not torch.allclose(state["netG_ema"][name], state["netG"][name]) for name in statistics)
    assert not torch.allclose(flat(state["netG_ema"]), flat(initial_generator(state["flags"])))  # an average that moved
    with auto_precision_runtime().autocast():  # as the run estimated them (bf16 on a CPU that has it)
        models.estimate_batch_norm(G.to(memory_format=torch.channels_last), state["flags"]["nz"], torch.device("cpu"))
    for name in statistics:
        torch.testing.assert_close(G.state_dict()[name], state["netG_ema"][name])
    raw = torch.load(raw_run / "checkpoints" / "checkpoint.pt", weights_only=True)
    G.load_state_dict(raw["netG"])
    models.estimate_batch_norm(G, raw["flags"]["nz"], torch.device("cpu"))
    assert all(not torch.allclose(G.state_dict()[name], raw["netG"][name]) for name in statistics)


def test_generate_gives_an_ema_generator_its_own_statistics_whatever_the_checkpoint_holds(
    trained_run, gan_main, tmp_path, monkeypatch
):
    """A checkpoint saved mid-epoch, or by an older version, holds the trained G's statistics
    in netG_ema: --generate draws the same images as from one with the average's own."""
    state = torch.load(trained_run / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert state["netG_ema_own_statistics"] is True
    statistics = [name for name in state["netG"] if "running" in name]
    copied = {**state, "netG_ema": {**state["netG_ema"], **{k: state["netG"][k] for k in statistics}}}
    torch.save({**copied, "netG_ema_own_statistics": False}, tmp_path / "copied.pt")
    del copied["netG_ema_own_statistics"]  # as an older version saved it
    torch.save(copied, tmp_path / "older.pt")
    estimates = []
    real_estimate = models.estimate_batch_norm
    monkeypatch.setattr(models, "estimate_batch_norm", lambda *a, **k: estimates.append(1) or real_estimate(*a, **k))
    for checkpoint, folder, estimated in (
        (trained_run / "checkpoints" / "checkpoint.pt", "own", 0),  # its statistics are the estimate already
        (tmp_path / "copied.pt", "copied", 1),
        (tmp_path / "older.pt", "older", 1),
    ):
        estimates.clear()
        code, _, err = gan_main(["--generate", 4, "--checkpoint", checkpoint, "--seed", 2, "--image-dir", folder])
        assert code == 0, err
        assert len(estimates) == estimated, folder
    for index in range(4):
        name = f"generated/{index:04d}.png"
        np.testing.assert_array_equal(pixels(tmp_path / "own" / name), pixels(tmp_path / "copied" / name))
        np.testing.assert_array_equal(pixels(tmp_path / "own" / name), pixels(tmp_path / "older" / name))


def test_the_ema_statistics_are_estimated_once_per_epoch_end_and_the_grid_draws_with_them(
    gan_main, tiny_args, tmp_path, monkeypatch
):
    """Each epoch's end estimates once (the grid, FID and checkpoint share it; the final
    real-vs-fake picture too); a mid-epoch checkpoint (--save-every) does not estimate and says so."""
    import checkpoint
    import outputs

    events = []
    real_estimate, real_state = outputs.estimate_batch_norm, checkpoint.checkpoint_state
    monkeypatch.setattr(
        outputs, "estimate_batch_norm", lambda *a, **k: events.append("estimate") or real_estimate(*a, **k)
    )

    def checkpoint_state(*args, **kwargs):  # on the training thread, when a checkpoint is handed over
        state = real_state(*args, **kwargs)
        events.append(f"save step {state['step']} own {state['netG_ema_own_statistics']}")
        return state

    monkeypatch.setattr(checkpoint, "checkpoint_state", checkpoint_state)
    code, _, err = gan_main([*tiny_args, "--epochs", "2", "--save-every", "3"])  # 4 steps per epoch
    assert code == 0, err
    assert events == [
        "save step 3 own False",
        "estimate",
        "save step 4 own True",
        "save step 6 own False",
        "estimate",
        "save step 8 own True",
    ]
    state = torch.load(tmp_path / "checkpoints" / "checkpoint.pt", weights_only=True)
    G = sampling.generator_of(state["flags"])
    G.load_state_dict(state["netG_ema"])  # the estimated statistics of epoch 2's end
    drawn = sampling.sample(G.to(memory_format=torch.channels_last), state["fixed_noise"], auto_precision_runtime())
    np.testing.assert_array_equal(
        pixels(tmp_path / "images" / "epoch_002.png"), np.asarray(artifacts.grid_image(drawn))
    )


def test_ema_zero_keeps_no_average(raw_run):
    folder = raw_run / "checkpoints"
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["netG_ema"] is None
    assert not (folder / "netG_ema.pth").exists()
    assert (folder / "netG.pth").exists()


def test_ema_is_the_running_average_by_hand():
    opts, _ = options.parse_flags(
        ["--device", "cpu", "--image-size", "16", "--nz", "8", "--ngf", "8", "--ndf", "8", "--ema", "0.5"]
    )
    runtime = Runtime(torch.device("cpu"))
    torch.manual_seed(0)
    nets = steps.build_nets(opts, runtime)
    recipe = steps.Recipe()
    real = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected = [p.detach().clone() for p in nets.G.parameters()]  # the average starts at G
    for _ in range(2):
        steps.train_step(nets, real, recipe, runtime, update_g=True, ema_decay=opts.ema)
        expected = [0.5 * old + 0.5 * new.detach() for old, new in zip(expected, nets.G.parameters())]
    for averaged, want in zip(nets.G_ema.parameters(), expected):
        torch.testing.assert_close(averaged, want)
    # BatchNorm statistics are copied, not averaged
    for ema_buffer, buffer in zip(nets.G_ema.buffers(), nets.G.buffers()):
        torch.testing.assert_close(ema_buffer, buffer)
    # a D-only step leaves the average alone
    before = [p.clone() for p in nets.G_ema.parameters()]
    steps.train_step(nets, real, recipe, runtime, update_g=False, ema_decay=opts.ema)
    for old, new in zip(before, nets.G_ema.parameters()):
        torch.testing.assert_close(old, new, rtol=0, atol=0)


def test_ema_zero_builds_no_average():
    opts, _ = options.parse_flags(["--device", "cpu", "--image-size", "16", "--ngf", "8", "--ndf", "8", "--ema", "0"])
    assert steps.build_nets(opts, Runtime(torch.device("cpu"))).G_ema is None


# ---------------------------------------------------------------- --tensorboard


def test_tensorboard_missing_is_a_clear_error(monkeypatch, gan_main, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what `import` sees when it is absent
    code, out, err = gan_main([*TINY_ARGS, "--epochs", "1", "--tensorboard"])
    assert code == 2
    assert "--tensorboard needs the tensorboard package: pip install tensorboard" in err
    assert not (tmp_path / "checkpoints" / "checkpoint.pt").exists(), "refused before training"


def test_tensorboard_writes_event_files(gan_main, tmp_path):
    pytest.importorskip("tensorboard")
    code, _, err = gan_main([*TINY_ARGS, "--epochs", "1", "--tensorboard"])
    assert code == 0, err
    events = list((tmp_path / "checkpoints" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_tensorboard_gets_each_log_rows_losses_and_adas_strength_and_the_grid(monkeypatch, gan_main, tmp_path):
    scalars, images = [], []

    class Recorder:  # torch's SummaryWriter, as much of it as the run uses
        def __init__(self, log_dir):
            assert log_dir == str(Path("checkpoints") / "tensorboard")

        def add_scalar(self, name, value, step):
            scalars.append((name, step, value))

        def add_images(self, name, batch, step):
            images.append((name, step, tuple(batch.shape), float(batch.min()) >= 0 and float(batch.max()) <= 1))

        def flush(self):
            pass

    monkeypatch.setattr(gan, "summary_writer_class", lambda: Recorder)
    monkeypatch.setattr(outputs, "summary_writer_class", lambda: Recorder)
    code, _, err = gan_main([*TINY_ARGS, "--epochs", "1", "--tensorboard", "--ada"])
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "loss_d" in row]
    assert [row["step"] for row in rows] == [2, 4]
    names = ("loss_d", "loss_g", "d_real", "d_fake", "augment_p")
    assert scalars == [(name, row["step"], row[name]) for row in rows for name in names]
    assert images == [("samples", 1, (64, 3, 16, 16), True)]


def test_generate_file_names_are_padded_for_large_counts(trained_run, gan_main, monkeypatch, tmp_path):
    # 12,345 images would take minutes; only the names are checked, so stop after the first batch
    saved = []
    monkeypatch.setattr(after_training.artifacts, "save_png", lambda image, path: saved.append(path.name))
    monkeypatch.setattr(after_training.artifacts, "save_grid", lambda images, path, nrow=8: saved.append(path.name))
    monkeypatch.setattr(
        after_training, "generated_batches", functools.partial(_first_batch_only, after_training.generated_batches)
    )
    checkpoint = trained_run / "checkpoints" / "checkpoint.pt"
    code, _, err = gan_main(["--generate", 12345, "--checkpoint", checkpoint, "--seed", 0])
    assert code == 0, err
    assert saved[0] == "00000.png" and saved[-2] == "00499.png" and saved[-1] == "grid.png"


def _first_batch_only(real_batches, *args, **kwargs):
    yield next(real_batches(*args, **kwargs))


@pytest.mark.parametrize(
    ("count", "first", "last"),
    [(1001, "0000.png", "1000.png"), (10000, "0000.png", "9999.png"), (10001, "00000.png", "10000.png")],
)
def test_generate_pads_file_names_to_the_digits_of_the_last_image_s_number(
    count, first, last, trained_run, gan_main, monkeypatch, tmp_path
):
    """Images are numbered from 0, so --generate 10000 ends at 9999.png: 4 digits, as few as ever,
    and one more only from 10001 images. Every name has the last one's width, so they sort in order.
    Only the names are checked: the PNGs are not written, and the batches are blank images."""
    saved = []
    monkeypatch.setattr(after_training.artifacts, "save_png", lambda image, path: saved.append(path.name))
    monkeypatch.setattr(after_training.artifacts, "save_grid", lambda images, path, nrow=8: saved.append(path.name))

    def blank_batches(G, n, nz, runtime, seed, batch_size=500, **kwargs):
        for start in range(0, n, batch_size):
            yield torch.zeros(min(batch_size, n - start), 3, SIDE, SIDE)

    monkeypatch.setattr(after_training, "generated_batches", blank_batches)
    checkpoint = trained_run / "checkpoints" / "checkpoint.pt"
    code, _, err = gan_main(["--generate", count, "--checkpoint", checkpoint, "--seed", 0])
    assert code == 0, err
    names = saved[:-1]
    assert (len(names), names[0], names[-1], saved[-1]) == (count, first, last, "grid.png")
    assert {len(name) for name in names} == {len(last)} and names == sorted(names)
    assert [int(name.removesuffix(".png")) for name in names] == list(range(count))


def test_evaluate_images_counts_files_whose_suffix_is_in_capitals(gan_main, tmp_path):
    """A camera's IMG_0001.JPG and a tool's .PNG are images as much as .png ones: --evaluate --images
    scores all six files, whatever the case of their suffix."""
    from test_metrics import StandInFeatures, write_colour_pngs

    write_colour_pngs(tmp_path / "real", [(i, 2 * i, 3 * i) for i in range(8)], (16, 16))
    (tmp_path / "theirs").mkdir()
    names = ("a.png", "b.PNG", "c.JPG", "d.Jpeg", "e.jpg", "f.Png")
    for index, name in enumerate(names):
        Image.new("RGB", (16, 16), (10 * index, 20, 30)).save(tmp_path / "theirs" / name)
    argv = ["--evaluate", "--images", "theirs", "--device", "cpu", "--dataset", "folder", "--dataroot", "real"]
    code, out, err = gan_main([*argv, "--image-size", "16", "--workers", "0"], StandInFeatures())
    assert code == 0, err
    assert "6 images of theirs at 16 px, against 8 real" in out
    row = json.loads((tmp_path / "checkpoints" / "metrics.jsonl").read_text().splitlines()[-1])
    assert (row["images"], row["count"]) == ("theirs", 6)


# ---------------------------------------------------------------- --generate from the plain state_dicts


@pytest.mark.parametrize("name, kind", [("netG_ema.pth", "EMA"), ("netG.pth", "raw")])
def test_generate_from_a_plain_state_dict_beside_flags_json(name, kind, trained_run, gan_main, tmp_path):
    """netG.pth and netG_ema.pth are gan.py's files too: they draw what checkpoint.pt's generators draw."""
    folder = trained_run / "checkpoints"
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    code, out, err = gan_main(["--generate", 3, "--checkpoint", folder / name, "--seed", 5, "--image-dir", "plain"])
    assert code == 0, err
    assert f"using the {kind} generator of {folder / name} (flags from {folder / 'flags.json'})" in out
    G = sampling.generator_of(state["flags"])
    G.load_state_dict(state["netG_ema"] if kind == "EMA" else state["netG"])
    if kind == "EMA":
        models.estimate_batch_norm(G, state["flags"]["nz"], torch.device("cpu"))
    noise = torch.randn(3, state["flags"]["nz"], 1, 1, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = G.eval()(noise).add(1).div(2).clamp(0, 1).mul(255).round().to(torch.uint8)
    for index in range(3):
        drawn = torch.from_numpy(pixels(tmp_path / "plain" / "generated" / f"{index:04d}.png").copy()).permute(2, 0, 1)
        assert (drawn.int() - expected[index].int()).abs().max() <= 1  # PNG's rounding of the same floats


def test_generate_from_a_plain_state_dict_without_flags_json_says_what_to_give(trained_run, gan_main, tmp_path):
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "netG.pth").write_bytes((trained_run / "checkpoints" / "netG.pth").read_bytes())
    code, out, err = gan_main(["--generate", 3, "--checkpoint", tmp_path / "alone" / "netG.pth"])
    assert code == 2 and "Traceback" not in err
    assert (
        f"holds only a network's weights, and the sizes to build it come from {tmp_path / 'alone' / 'flags.json'}"
        in err
    )
    assert "give checkpoint.pt instead" in err
    assert not (tmp_path / "images").exists()


def test_a_file_where_the_generated_folder_goes_is_named_as_a_file(trained_run, gan_main, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "generated").write_text("my notes")
    code, out, err = gan_main(["--generate", 1, "--checkpoint", trained_run / "checkpoints" / "checkpoint.pt"])
    assert code == 0, err
    assert "images/generated is a file: writing into images/generated-2/" in out
    assert (tmp_path / "images" / "generated").read_text() == "my notes"
    (tmp_path / "images" / "generated").unlink()
    (tmp_path / "images" / "generated").symlink_to(tmp_path / "moved")  # a link to a folder since removed
    code, out, err = gan_main(["--generate", 1, "--checkpoint", trained_run / "checkpoints" / "checkpoint.pt"])
    assert code == 0, err
    assert "images/generated is a link to nowhere: writing into images/generated-3/" in out
    assert (tmp_path / "images" / "generated").is_symlink() and not (tmp_path / "moved").exists()


def test_a_resume_with_ema_0_leaves_no_older_average_beside_its_checkpoint(run_copy, gan_main):
    """netG_ema.pth would otherwise stay beside a checkpoint without one, and be drawn as its EMA."""
    assert (run_copy / "checkpoints" / "netG_ema.pth").is_file()
    code, out, err = gan_main(["--resume", "--epochs", 3, "--ema", 0])
    assert code == 0, err
    assert torch.load(run_copy / "checkpoints" / "checkpoint.pt")["netG_ema"] is None
    assert sorted(path.name for path in (run_copy / "checkpoints").glob("netG*.pth")) == ["netG.pth"]
