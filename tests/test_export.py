"""The generator leaves the program: --export writes model.safetensors + config.json, a model card,
generator.onnx and generator.pt2 that give the images --generate gives; the exported folder serves
as --checkpoint; gan.load_generator loads every file the program writes; --config repeats a run.

Three exports cover every architecture, plain and conditional, colour and greyscale, tanh and clip,
square and not (16 wide, 32 tall).
"""

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_ARGS, png_pixels, ready_for_main_in_process, snapshot, subprocess_env

import gan
import options
import startup
from errors import UserError
from files import current_umask

VARIANTS = {
    "dcgan-plain-tanh": ["--arch", "dcgan"],
    "upsample-conditional-grey-clip": ["--arch", "upsample", "--conditional", "--channels", "1", "--g-output", "clip"],
    "fullres-conditional-clip-16x32": [
        *["--arch", "upsample-fullres", "--conditional", "--g-output", "clip", "--image-size", "16x32"]
    ],
}
EXPECTED_CONFIG = {
    "dcgan-plain-tanh": {"arch": "dcgan", "image_size": 16, "channels": 3, "g_output": "tanh", "class_names": []},
    "upsample-conditional-grey-clip": {
        "arch": "upsample",
        "image_size": 16,
        "channels": 1,
        "g_output": "clip",
        "class_names": [str(k) for k in range(10)],
    },
    "fullres-conditional-clip-16x32": {
        "arch": "upsample-fullres",
        "image_size": "16x32",
        "channels": 3,
        "g_output": "clip",
        "class_names": [str(k) for k in range(10)],
    },
}
IMAGE_SHAPES = {  # (height, width) of each variant's images
    "dcgan-plain-tanh": (16, 16),
    "upsample-conditional-grey-clip": (16, 16),
    "fullres-conditional-clip-16x32": (32, 16),
}
CONDITIONAL_VARIANTS = [variant for variant, flags in VARIANTS.items() if "--conditional" in flags]


def call_gan(argv, capsys, cwd):
    """gan.main(argv) run in the folder cwd; asserts it succeeded."""
    here = os.getcwd()
    os.chdir(cwd)
    try:
        capsys.readouterr()
        code = gan.main([str(a) for a in argv])
        out, err = capsys.readouterr()
    finally:
        os.chdir(here)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """gan.main in-process with the StopRequest's signal handlers left alone, as conftest's gan_main."""
    patch = pytest.MonkeyPatch()
    ready_for_main_in_process(patch)
    yield
    patch.undo()


@pytest.fixture(scope="module")
def exports(tmp_path_factory, in_process):
    """A 1-epoch run of each variant and its --export, each in a folder of its own: {variant: folder}."""
    folders, cwd = {}, os.getcwd()
    for variant, flags in VARIANTS.items():
        folders[variant] = tmp_path_factory.mktemp(variant)
        os.chdir(folders[variant])
        try:
            assert gan.main([*TINY_ARGS, *flags, "--epochs", "1"]) == 0
            assert gan.main(["--export", "export"]) == 0
        finally:
            os.chdir(cwd)
    return folders


@pytest.fixture(params=list(VARIANTS))
def exported(request, exports):
    """(folder, variant) of each variant's run and export."""
    return exports[request.param], request.param


def trained(folder):
    return gan.load_generator(folder / "checkpoints" / "checkpoint.pt", device="cpu")


def inputs(generator, batch, seed=7):
    noise = torch.randn(batch, generator.nz, generator=torch.Generator().manual_seed(seed))
    if not generator.class_names:
        return (noise,)
    return noise, torch.arange(batch) % len(generator.class_names)


def test_the_export_folder_holds_the_weights_config_card_samples_and_graphs(exported):
    folder, variant = exported
    names = sorted(path.name for path in (folder / "export").iterdir())
    assert (folder / "export").stat().st_mode & 0o777 == 0o777 & ~current_umask()  # a folder's usual mode
    assert names == ["README.md", "config.json", "generator.onnx", "generator.pt2", "model.safetensors", "samples.png"]
    config = json.loads((folder / "export" / "config.json").read_text())
    assert {name: config[name] for name in EXPECTED_CONFIG[variant]} == EXPECTED_CONFIG[variant]
    assert (config["nz"], config["ngf"], config["generator"]) == (8, 8, "ema")
    assert (config["epoch"], config["step"]) == (1, 4)
    assert not {"dataroot", "image_dir", "checkpoint_dir", "cache_dir"} & set(config["flags"])  # no paths shared
    card = (folder / "export" / "README.md").read_text()
    assert 'torch.export.load("generator.pt2").module()' in card and "![samples](samples.png)" in card
    assert "| `--arch` | `" + config["arch"] + "` |" in card
    height, width = IMAGE_SHAPES[variant]
    assert f"DCGAN generator, {width}x{height} px" in card and f", {height}, {width}) in [-1, 1]" in card


@pytest.mark.parametrize("variant", CONDITIONAL_VARIANTS)
def test_a_conditional_model_card_lists_the_classes_by_the_index_the_graphs_take(exports, variant):
    """The graphs take labels as 0-based indices into config.json's class_names (here the fake
    data's classes "0" to "9"): the card's list pairs each index with its class, starting at 0."""
    folder = exports[variant] / "export"
    assert json.loads((folder / "config.json").read_text())["class_names"] == [str(k) for k in range(10)]
    card = (folder / "README.md").read_text()
    assert "\nClasses, by index: 0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7, 8: 8, 9: 9.\n" in card


def test_the_safetensors_hold_the_ema_generator_with_its_own_statistics(exported):
    from safetensors.torch import load_file

    folder, _ = exported
    weights = load_file(folder / "export" / "model.safetensors")
    expected = trained(folder).G.state_dict()
    assert sorted(weights) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor.contiguous()), name
    # saved at the epoch's end, the average's BatchNorm statistics were estimated for its own weights
    state = torch.load(folder / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert state["netG_ema_own_statistics"] is True
    assert all(torch.equal(weights[name], tensor) for name, tensor in state["netG_ema"].items())
    assert not all(torch.equal(weights[name], tensor) for name, tensor in state["netG"].items())


def test_the_onnx_graph_gives_the_generators_images_at_any_batch_size(exported):
    import onnxruntime

    folder, variant = exported
    generator = trained(folder)
    session = onnxruntime.InferenceSession(
        str(folder / "export" / "generator.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [node.name for node in session.get_inputs()]
    assert names == ["noise", "labels"][: len(inputs(generator, 1))]
    assert session.get_outputs()[0].shape[1:] == [generator.channels, *IMAGE_SHAPES[variant]]
    for batch in (1, 3, 9):
        given = inputs(generator, batch)
        got = session.run(None, {name: value.numpy() for name, value in zip(names, given)})[0]
        with torch.no_grad():
            expected = generator(*given)
        assert got.shape == (batch, generator.channels, *IMAGE_SHAPES[variant])
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-3, rtol=0)


@pytest.mark.parametrize("variant", CONDITIONAL_VARIANTS)
def test_a_conditional_generator_draws_image_k_from_noise_k_in_class_k(exports, variant):
    """The graphs are traced from forward and checked against forward, so a forward that mixed up
    the labels would pass both checks: here it is held to the network itself, with labels in no
    symmetric order, and to each image drawn alone."""
    G = trained(exports[variant])
    noise, labels = inputs(G, 5)
    assert labels.tolist() == [0, 1, 2, 3, 4]
    with torch.no_grad():
        images = G(noise, labels)
        assert torch.equal(images, G.G(noise.view(5, G.nz, 1, 1), labels))
        for k in range(5):
            torch.testing.assert_close(images[k : k + 1], G(noise[k : k + 1], labels[k : k + 1]), atol=1e-5, rtol=0)


PT2_PROBE = """
import sys, torch
for graph, *inputs in (line.split() for line in sys.stdin.read().splitlines()):
    G = torch.export.load(graph).module()
    torch.save(G(*[torch.load(path) for path in inputs]), graph + ".images.pt")
print([name for name in sys.modules if name in ("gan", "models", "generator", "steps")])
"""


def test_the_pt2_graphs_load_with_torch_alone_and_give_the_generators_images(tmp_path_factory, exports):
    """In one fresh Python outside the repository, with nothing of it importable."""
    work = tmp_path_factory.mktemp("pt2")
    lines, expected = [], {}
    for variant in VARIANTS:
        folder = exports[variant]
        generator = trained(folder)
        given = inputs(generator, 5)
        paths = []
        for index, tensor in enumerate(given):
            paths.append(work / f"{variant}-input{index}.pt")
            torch.save(tensor, paths[-1])
        graph = work / f"{variant}.pt2"
        graph.write_bytes((folder / "export" / "generator.pt2").read_bytes())
        lines.append(" ".join(map(str, [graph, *paths])))
        with torch.no_grad():
            expected[variant] = (graph, generator(*given))
    env = {key: value for key, value in subprocess_env().items() if key != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-I", "-c", PT2_PROBE],
        input="\n".join(lines),
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # none of the program's modules was imported
    for variant, (graph, images) in expected.items():
        # the graph is G in the contiguous layout, and --generate's G is channels_last on the CPU: the
        # two layouts' kernels round differently, by a few 1e-6 at the default size (docs/export.md)
        torch.testing.assert_close(torch.load(f"{graph}.images.pt"), images, atol=1e-5, rtol=0, msg=variant)


def test_generate_from_the_exported_folder_writes_the_checkpoints_pngs(exported, capsys, in_process):
    folder, variant = exported
    label = [] if variant == "dcgan-plain-tanh" else ["--class", "3"]
    for source, images in (
        ("checkpoints/checkpoint.pt", "from_checkpoint"),
        ("export/model.safetensors", "from_export"),
        ("export", "from_export_folder"),  # the folder --export wrote stands for its model.safetensors
    ):
        out = call_gan(
            ["--generate", "6", "--seed", "5", *label, "--checkpoint", source, "--image-dir", images], capsys, folder
        )
    assert "using the EMA generator of export/model.safetensors (flags from export/config.json)" in out
    written = sorted((folder / "from_checkpoint" / "generated").rglob("0*.png"))
    assert len(written) == 6
    for path in written:
        for twin in ("from_export", "from_export_folder"):
            assert path.read_bytes() == (folder / twin / path.relative_to(folder / "from_checkpoint")).read_bytes()


def test_load_generator_samples_what_generate_writes_from_every_kind_of_file(exported, capsys, in_process):
    folder, variant = exported
    label = [] if variant == "dcgan-plain-tanh" else ["--class", "2"]
    call_gan(["--generate", "5", "--seed", "9", *label, "--image-dir", "api"], capsys, folder)
    pngs = sorted((folder / "api" / "generated").rglob("0*.png"))
    written = torch.stack([png_pixels(path) for path in pngs])
    for path in ("checkpoints/checkpoint.pt", "checkpoints/netG_ema.pth", "export/model.safetensors", "export"):
        generator = gan.load_generator(folder / path, device="cpu")
        sampled = generator.sample(5, seed=9, label=None if variant == "dcgan-plain-tanh" else "2")
        assert sampled.dtype == torch.uint8 and sampled.shape == (5, generator.channels, *IMAGE_SHAPES[variant])
        assert torch.equal(sampled.int().expand(-1, 3, -1, -1), written), path


def test_an_export_never_replaces_a_folder_and_names_the_pip_command_when_onnx_is_missing(
    trained_run, tmp_path, gan_main, monkeypatch
):
    from conftest import copy_run, snapshot

    copy_run(trained_run, tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    code, _, err = gan_main(["--export", "taken"])
    assert code == 2 and "--export taken holds files: give a new or empty folder" in err
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real_find_spec(name, *a)
    )
    before = snapshot(tmp_path)
    code, _, err = gan_main(["--export", "new"])
    assert code == 2
    assert err.strip().endswith("--export needs onnx: pip install onnx onnxscript onnxruntime")
    assert snapshot(tmp_path) == before and not (tmp_path / "new").exists()


def test_the_samples_are_the_grid_of_what_generate_draws_for_the_seed(trained_run, tmp_path, gan_main):
    from conftest import copy_run

    import artifacts

    copy_run(trained_run, tmp_path)
    code, _, err = gan_main(["--export", "seeded", "--seed", "3"])
    assert code == 0, err
    pixels = gan.load_generator(tmp_path / "checkpoints" / "checkpoint.pt", device="cpu").sample(64, seed=3)
    expected = artifacts.grid_image(pixels.float().div(127.5).sub(1))
    assert torch.equal(png_pixels(tmp_path / "seeded" / "samples.png"), png_pixels_of(expected))


def test_a_conditional_export_s_samples_are_a_row_of_each_class_drawn_from_the_seed(exports, tmp_path):
    """--export --seed 3 of a conditional run: samples.png is the labelled grid of each class's row,
    the GRID_COLUMNS images G.sample (and --generate) draws for that class with seed 3."""
    import artifacts
    import export
    from sampling import GRID_COLUMNS, MAX_GRID_ROWS

    G = trained(exports["fullres-conditional-clip-16x32"])
    export.write_samples(G.G, G.flags, G.runtime, tmp_path, seed=3)  # as --export --seed 3 calls it
    shown = G.class_names[:MAX_GRID_ROWS]
    assert shown == tuple(str(k) for k in range(10))  # every class has its row
    rows = torch.cat([G.sample(GRID_COLUMNS, seed=3, label=name) for name in shown])
    expected = artifacts.labelled_grid_image(rows.float().div(127.5).sub(1), list(shown))
    assert torch.equal(png_pixels(tmp_path / "samples.png"), png_pixels_of(expected))


def png_pixels_of(image):
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).int()


def test_raw_exports_the_trained_generator_instead_of_its_average(trained_run, tmp_path, gan_main):
    from conftest import copy_run
    from safetensors.torch import load_file

    copy_run(trained_run, tmp_path)
    code, _, err = gan_main(["--export", "raw", "--raw"])
    assert code == 0, err
    state = torch.load(tmp_path / "checkpoints" / "checkpoint.pt", weights_only=True)
    weights = load_file(tmp_path / "raw" / "model.safetensors")
    assert all(torch.equal(weights[name], tensor) for name, tensor in state["netG"].items())
    assert json.loads((tmp_path / "raw" / "config.json").read_text())["generator"] == "trained"
    # read back as what it holds: the trained G, which --raw may ask for; drawn as --raw draws it
    for source, raw in (
        ("checkpoints/checkpoint.pt", ["--raw"]),
        ("raw/model.safetensors", []),
        ("raw/model.safetensors", ["--raw"]),
    ):
        folder = f"drawn_{len(raw)}_{Path(source).stem}"
        code, out, err = gan_main(["--generate", 3, "--seed", 4, *raw, "--checkpoint", source, "--image-dir", folder])
        assert code == 0 and f"using the raw generator of {source}" in out, err
    for name in ("0000.png", "0001.png", "0002.png"):
        drawn = {
            (tmp_path / folder / "generated" / name).read_bytes()
            for folder in ("drawn_1_checkpoint", "drawn_0_model", "drawn_1_model")
        }
        assert len(drawn) == 1, name


@pytest.mark.parametrize("source", ["export/model.safetensors", "checkpoints/netG_ema.pth"])
def test_raw_is_refused_on_a_file_that_holds_the_moving_average_alone(source, exports, gan_main, tmp_path):
    folder = exports["dcgan-plain-tanh"]
    before = snapshot(folder)
    code, out, err = gan_main(["--generate", 2, "--raw", "--checkpoint", folder / source])
    message = f"--raw: {folder / source} holds the moving average (EMA) alone; the trained generator is in the run's checkpoint.pt"
    assert code == 2 and err.strip().endswith(message), err
    assert snapshot(folder) == before and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- --config


def test_config_starts_a_run_with_a_runs_flags_and_typed_flags_win(tmp_path):
    saved = {
        **options.parse_flags([*TINY_ARGS, "--recipe", "improved", "--lr", "5e-4"])[0].as_dict(),
        "dataroot": "/elsewhere",
        "checkpoint_dir": "/tmp/not-here",
        "resume": "x.pt",
    }
    (tmp_path / "flags.json").write_text(json.dumps(saved))
    opts, explicit = options.parse_flags(["--config", str(tmp_path / "flags.json"), "--epochs", "7"])
    assert (opts.arch, opts.g_output, opts.spectral_loss, opts.lr) == ("upsample-fullres", "clip", 3.0, 5e-4)
    assert (opts.nz, opts.batch_size, opts.seed, opts.epochs) == (8, 8, 1, 7)
    # never the folders, nor the mode: a config does not choose where files go
    assert (opts.dataroot, opts.checkpoint_dir, opts.resume) == ("data", "checkpoints", None)
    assert explicit == {"config", "epochs"}  # the config's values are the run's, not typed ones
    # a typed recipe wins over the config's values of its flags
    opts, _ = options.parse_flags(["--config", str(tmp_path / "flags.json"), "--recipe", "dcgan"])
    assert (opts.arch, opts.g_output) == ("dcgan", "tanh")


def test_config_and_resume_take_neither_this_machine_s_settings_nor_a_length_a_typed_one_replaces(tmp_path):
    """A run's flags.json or checkpoint from an H100 (bf16, 8 workers) repeats its training, not its
    machine; and a typed --epochs sets the length of a run whose file says --kimg."""
    machine = ["--precision", "bf16", "--workers", "8", "--device", "cuda"]
    saved = options.parse_flags([*TINY_ARGS, "--kimg", "0.05", *machine])[0].as_dict()
    defaults = options.parse_flags([])[0]
    (tmp_path / "flags.json").write_text(json.dumps(saved))
    opts, _ = options.parse_flags(["--config", str(tmp_path / "flags.json"), "--epochs", "3"])
    assert (opts.kimg, opts.epochs, opts.lr, opts.nz) == (None, 3, 2e-4, 8)
    assert (opts.precision, opts.workers, opts.device) == ("auto", defaults.workers, "auto")
    typed, explicit = options.parse_flags(["--resume", "--epochs", "3"])
    resumed, _ = startup.merge_resume_flags(typed, explicit, saved, tmp_path / "checkpoint.pt")
    assert (resumed.kimg, resumed.epochs, resumed.nz) == (None, 3, 8)
    assert (resumed.precision, resumed.workers, resumed.device) == ("auto", defaults.workers, "auto")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"lr": -1}', "says --lr -1, which that flag refuses"),
        ('{"arch": "resnet"}', "says --arch 'resnet', which that flag refuses"),
        ('{"spectral_norm": "false"}', "says --spectral-norm 'false', which that flag refuses"),  # not on
        ('{"mirror": 1}', "says --mirror 1, which that flag refuses"),
        ("[1, 2]", "is not a run's flags.json"),
        ("{not json", "cannot be read"),
        ("[" * 100_000 + "]" * 100_000, "cannot be read: it nests too deep"),
        (" " * (2 << 20), "cannot be read: it is larger than a flags.json"),
    ],
    ids=["lr", "arch", "on-off-text", "on-off-number", "list", "not-json", "nested", "huge"],
)
def test_a_bad_config_is_one_line(tmp_path, content, message):
    (tmp_path / "flags.json").write_text(content)
    with pytest.raises(UserError, match=message):
        options.parse_flags(["--config", str(tmp_path / "flags.json")])


def test_config_repeats_an_unconditional_run_with_another_seed(trained_run, tmp_path, gan_main):
    """The flags.json of a run as it is (class_loss 1.0 in it, --conditional off) starts another."""
    from conftest import copy_run

    copy_run(trained_run, tmp_path)
    argv = ["--config", "checkpoints/flags.json", "--seed", "2", "--epochs", "1"]
    code, _, err = gan_main([*argv, "--checkpoint-dir", "seed2", "--image-dir", "seed2_images"])
    assert code == 0, err
    first = json.loads((tmp_path / "checkpoints" / "flags.json").read_text())
    again = json.loads((tmp_path / "seed2" / "flags.json").read_text())
    differing = {name for name in first if first[name] != again.get(name)}
    # what was typed, and this machine's settings, which a config never sets (the first run typed them)
    assert differing == {"seed", "epochs", "checkpoint_dir", "image_dir", "config", "device", "compile", "workers"}


def test_export_refuses_a_link_and_a_parent_that_is_a_file_in_one_line(trained_run, tmp_path, gan_main):
    from conftest import copy_run, snapshot

    copy_run(trained_run, tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    before = snapshot(tmp_path)
    code, _, err = gan_main(["--export", "link"])
    assert code == 2 and err.strip().endswith("--export link is a symbolic link: give a new or empty folder")
    code, _, err = gan_main(["--export", "checkpoints/checkpoint.pt/inside"])
    assert code == 2 and "output folder checkpoints/checkpoint.pt is a file: give a folder" in err
    code, _, err = gan_main(["--export", "checkpoints/flags.json"])
    assert code == 2 and err.strip().endswith("--export checkpoints/flags.json is a file: give a new or empty folder")
    code, _, err = gan_main(["--export", "new/deeper/out", "--checkpoint", "missing.pt"])
    assert code == 2 and "missing.pt does not exist" in err
    assert snapshot(tmp_path) == before and not (tmp_path / "new").exists()  # no folder left behind


def test_a_generator_file_with_non_finite_weights_is_refused(exports, tmp_path, gan_main):
    """A diverged run's weights draw flat images: refused from model.safetensors and netG.pth alike."""
    import shutil

    from safetensors.torch import load_file, save_file

    source = exports["dcgan-plain-tanh"]
    shutil.copytree(source / "export", tmp_path / "export")
    weights = load_file(tmp_path / "export" / "model.safetensors")
    weights["main.0.weight"][0, 0, 0, 0] = float("nan")
    save_file(weights, tmp_path / "export" / "model.safetensors")
    with pytest.raises(UserError, match=r"model.safetensors holds non-finite weights \(netG.main.0.weight"):
        gan.load_generator(tmp_path / "export" / "model.safetensors", device="cpu")
    shutil.copytree(source / "checkpoints", tmp_path / "checkpoints")
    state = torch.load(tmp_path / "checkpoints" / "netG.pth", weights_only=True)
    state["main.0.weight"][0, 0, 0, 0] = float("inf")
    torch.save(state, tmp_path / "checkpoints" / "netG.pth")
    code, _, err = gan_main(["--generate", "4", "--checkpoint", "checkpoints/netG.pth"])
    assert code == 2 and "netG.pth holds non-finite weights (netG.main.0.weight)" in err
    assert not (tmp_path / "images").exists()
    # float8, whose values torch cannot check: refused as a tensor gan.py never writes
    weights["main.0.weight"] = weights["main.0.weight"].to(torch.float8_e4m3fn)
    save_file(weights, tmp_path / "export" / "model.safetensors")
    with pytest.raises(UserError, match=r"model.safetensors is damaged: unusable tensors \(main.0.weight\)$"):
        gan.load_generator(tmp_path / "export" / "model.safetensors", device="cpu")


SIZE_REFUSED = "image_size must be a power of two from 16 to 256, or WIDTHxHEIGHT with each side one (64x32)"


@pytest.mark.parametrize(
    ("name", "value", "refusal"),
    [
        ("channels", 0, "channels must be positive whole numbers"),
        ("nz", "8", "nz must be positive whole numbers"),
        ("ngf", True, "ngf must be positive whole numbers"),
        ("image_size", 16.0, SIZE_REFUSED),
        ("image_size", "16x48", SIZE_REFUSED),
        ("epoch", -5, "epoch and step must be whole numbers from 0"),
        ("step", "x", "epoch and step must be whole numbers from 0"),
    ],
)
def test_an_exported_config_with_unusable_sizes_is_one_line(exports, tmp_path, name, value, refusal):
    import shutil

    shutil.copytree(exports["dcgan-plain-tanh"] / "export", tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    (tmp_path / "export" / "config.json").write_text(json.dumps({**config, name: value}))
    with pytest.raises(UserError) as refused:
        gan.load_generator(tmp_path / "export" / "model.safetensors", device="cpu")
    assert str(refused.value).endswith(f"config.json is damaged: {refusal}")


@pytest.mark.parametrize(
    "flag, value, refused",
    [
        ("loss", "bce`|\n\n## injected\n<img src=x onerror=alert(1)>", True),
        ("lr", math.inf, True),
        ("zz\nnew", 1, False),
    ],
    ids=["markdown in a flag", "infinite lr", "unknown name"],
)
def test_a_re_export_copies_only_flags_the_program_takes(exports, tmp_path, gan_main, flag, value, refused):
    """A shared export's config.json goes into the new config.json and model card: a value its flag
    could not take is refused, as --resume refuses it; a name the program does not know is left out."""
    import shutil

    shutil.copytree(exports["upsample-conditional-grey-clip"] / "export", tmp_path / "shared")
    config = json.loads((tmp_path / "shared" / "config.json").read_text())
    config["flags"][flag] = value
    (tmp_path / "shared" / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")  # as a user's export would show them
        code, out, err = gan_main(["--export", "again", "--checkpoint", "shared/model.safetensors"])
    # the noise and the labels share the batch axis, which the exporter warned of
    assert not [str(warning.message) for warning in shown if "axis name" in str(warning.message)]
    if refused:
        assert code == 2 and err.strip().endswith(
            f"checkpoint shared/model.safetensors is damaged: it says --{flag} {value!r}"
        ), err
        assert not (tmp_path / "again").exists()
        return
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    del config["flags"][flag]
    assert again["flags"] == config["flags"] and "zz" not in (tmp_path / "again" / "README.md").read_text()


@pytest.mark.parametrize("source", ["export/model.safetensors", "export"])
def test_resuming_an_export_is_refused_naming_what_it_is(source, exports, gan_main):
    folder = exports["dcgan-plain-tanh"]
    before = snapshot(folder)
    code, out, err = gan_main(["--resume", folder / source, "--epochs", 3])
    assert code == 2 and err.strip().endswith(
        f"{folder / source} is an export, the generator alone: resume the run's checkpoint.pt "
        f"(--generate --checkpoint {folder / source} draws from it)"
    ), err
    assert snapshot(folder) == before


def test_config_goes_with_training_only():
    with pytest.raises(UserError, match="--config is read by training only, not by --generate"):
        options.parse_flags(["--generate", "4", "--config", "flags.json"])
    with pytest.raises(UserError, match="--config starts a run"):
        options.parse_flags(["--resume", "--config", "flags.json"])


def test_sample_with_seed_0_and_a_truncation_draws_what_generate_writes_for_them(trained_run, tmp_path, gan_main):
    """Seed 0 is a seed, not "none given", and the truncation reaches the noise: the Python API
    draws the pixels of --generate 4 --seed 0 --truncation 0.5."""
    from conftest import copy_run

    copy_run(trained_run, tmp_path)
    code, _, err = gan_main(["--generate", "4", "--seed", "0", "--truncation", "0.5", "--device", "cpu"])
    assert code == 0, err
    written = torch.stack([png_pixels(path) for path in sorted((tmp_path / "images" / "generated").glob("0*.png"))])
    G = gan.load_generator(tmp_path / "checkpoints" / "checkpoint.pt", device="cpu")
    assert torch.equal(G.sample(4, seed=0, truncation=0.5).int(), written)
    assert not torch.equal(G.sample(4, seed=0).int(), written)  # the truncation changes the images


def test_sample_refuses_a_class_outside_the_generator_s_listing_its_classes(exports):
    G = gan.load_generator(exports["upsample-conditional-grey-clip"] / "export" / "model.safetensors", device="cpu")
    assert G.class_names == tuple(str(index) for index in range(10))
    for label in (-1, 10, "zebra", True):
        with pytest.raises(ValueError, match=f"no class {label!r}; the classes are 0, 1, 2, .*, 9"):
            G.sample(2, seed=1, label=label)


def test_the_model_card_quotes_the_last_fid_of_training_not_of_an_evaluate(tmp_path):
    """The card's "Its last FID while training was 40.50 (epoch 2)." comes from the log beside the
    checkpoint: the last training row's, though epoch 1 scored better and an evaluate better still."""
    import export

    rows = [
        {"epoch": 1, "step": 4, "fid": 30.0},
        {"epoch": 2, "step": 8, "fid": 40.5},
        {"evaluate": "x.pt", "fid": 10.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert export.last_fid(tmp_path / "checkpoint.pt") == (40.5, 2)
    assert export.last_fid(tmp_path / "elsewhere" / "checkpoint.pt") is None


def test_a_graph_whose_images_are_not_the_generator_s_is_refused(exports):
    """The check each graph passes before an export is kept: NaN images, or images further from
    the generator's than the tolerance, fail it."""
    import export

    G = gan.load_generator(exports["dcgan-plain-tanh"] / "checkpoints" / "checkpoint.pt", device="cpu")
    inputs = export.example_inputs(G, batch=3)
    with torch.no_grad():
        images = G(*inputs)
    assert export.largest_difference(images, G, inputs, "generator.onnx", export.GRAPH_TOLERANCE) == 0
    for got in (torch.full_like(images, math.nan), images + 2 * export.GRAPH_TOLERANCE):
        with pytest.raises(RuntimeError, match="generator.onnx's images differ from the generator's by"):
            export.largest_difference(got, G, inputs, "generator.onnx", export.GRAPH_TOLERANCE)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"n": 0}, "n must be a whole number of images, 1 or more, got 0"),
        ({"n": 2.5}, "n must be a whole number of images, 1 or more, got 2.5"),
        ({"seed": -1}, r"seed must be a whole number from 0 to 2\*\*63-1, got -1"),
        ({"seed": 2**63}, r"seed must be a whole number from 0 to 2\*\*63-1"),
        ({"truncation": 0}, "truncation must be a positive number, got 0"),
        ({"truncation": -1.0}, "truncation must be a positive number, got -1.0"),
        ({"truncation": math.nan}, "truncation must be a positive number, got nan"),
    ],
)
def test_sample_refuses_what_the_command_line_refuses(exports, arguments, message):
    G = gan.load_generator(exports["dcgan-plain-tanh"] / "export" / "model.safetensors", device="cpu")
    with pytest.raises(ValueError, match=message):
        G.sample(**{"n": 2, "seed": 1, **arguments})
