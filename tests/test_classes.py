"""--conditional: labels from CIFAR-10 and from a folder's sub-folders, the class reaching G's
conditional BatchNorm and D's projection, and grids with one row per class."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    TINY_ARGS,
    as_pixels,
    png_pixels,
    run_in_process,
    snapshot,
    write_cifar10_archive,
)
from PIL import Image

import after_training
import artifacts
import classnames
import metrics
import models
import options
import sampling
import startup
import steps
import utils
from errors import UserError
from folders import HostImages, list_images
from runtime import Runtime

CPU = Runtime(torch.device("cpu"))


def parsed(*flags):
    return options.parse_flags([*TINY_ARGS, *map(str, flags)])[0]


def class_folder(root, classes, per_class=3, broken=()):
    """root/<class>/<i>.png, every image of class number k a solid grey of 20 * (k + 1)."""
    for number, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for index in range(per_class):
            Image.fromarray(np.full((20, 20, 3), 20 * (number + 1), np.uint8)).save(folder / f"{index}.png")
    for path in broken:
        (root / path).write_bytes(b"not an image")
    return root


# ---------------------------------------------------------------- labels from the data


def test_cifar_labels_and_class_names_come_from_the_archive_in_order(tmp_path):
    images = write_cifar10_archive(tmp_path, images_per_batch=8)
    with tarfile.open(tmp_path / utils.CIFAR_ARCHIVE) as tar:
        tar.extractall(tmp_path, filter="data")
    names = [f"class-{index}" for index in range(10)][::-1]  # not CIFAR-10's: the names come from batches.meta
    meta = tmp_path / utils.CIFAR_FOLDER / "batches.meta"
    meta.write_bytes(__import__("pickle").dumps({"label_names": names}))
    opts = parsed("--dataset", "cifar10", "--dataroot", tmp_path, "--image-size", 32, "--conditional", "--subset", 40)
    training = utils.load_training_data(opts.replace(subset=None), torch.device("cpu"))
    assert training.class_names == tuple(names)
    torch.testing.assert_close(training.labels, torch.arange(40) % 10)  # image i has label i % 10, batch after batch
    torch.testing.assert_close(training.images, torch.from_numpy(images))
    assert utils.load_training_data(opts.replace(conditional=False), "cpu").labels is None


@pytest.mark.parametrize("bad", ["../escape", "", "Cat"])
def test_cifar_names_that_cannot_be_folders_give_way_to_cifars_own(bad, tmp_path):
    names = ["cat", *(f"class-{index}" for index in range(8)), bad]  # "Cat" repeats "cat" once case is folded
    (tmp_path / "batches.meta").write_bytes(__import__("pickle").dumps({"label_names": names}))
    assert utils.cifar_class_names(tmp_path) == utils.CIFAR_CLASSES
    names[-1] = "class-8"
    (tmp_path / "batches.meta").write_bytes(__import__("pickle").dumps({"label_names": names}))
    assert utils.cifar_class_names(tmp_path) == tuple(names)
    for wrong_count in (names[:9], [*names, "class-10"]):  # a class per label 0..9, no more, no fewer
        (tmp_path / "batches.meta").write_bytes(__import__("pickle").dumps({"label_names": wrong_count}))
        assert utils.cifar_class_names(tmp_path) == utils.CIFAR_CLASSES


def test_a_folders_classes_are_its_sub_folders_sorted_as_image_folder_sorts_them(tmp_path):
    from torchvision.datasets import ImageFolder

    root = class_folder(tmp_path / "data", ["zebra", "Apple", "mango"], broken=["mango/broken.png"])
    (root / "mango" / "deeper").mkdir()
    Image.fromarray(np.full((20, 20, 3), 60, np.uint8)).save(root / "mango" / "deeper" / "x.png")
    reference = ImageFolder(root, is_valid_file=lambda path: "broken" not in path)  # before any cache is there
    opts = parsed("--dataset", "folder", "--dataroot", root, "--conditional", "--batch-size", 2, "--subset", 10)
    with pytest.warns(UserWarning, match="skipped 1 of 11"):
        training = utils.load_training_data(opts.replace(subset=None), torch.device("cpu"))
    assert training.class_names == tuple(reference.classes) == ("Apple", "mango", "zebra")
    files = [path for path in list_images(root) if path.name != "broken.png"]
    assert dict(zip(map(str, files), training.labels.tolist())) == dict(reference.samples)
    # each row's label is its image's: class k was drawn in grey 20 * (position in ["zebra", "Apple", "mango"] + 1)
    grey_of_class = {0: 40, 1: 60, 2: 20}
    assert [int(image[0, 0, 0]) for image in training.images] == [grey_of_class[k] for k in training.labels.tolist()]


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"cats": 2, ".": 1}, "holds images directly in it"),
        ({"cats": 2}, "has 1 class sub-folder(s); it needs at least 2"),
        ({"cats": 2, "dogs": 0}, "class folder data/dogs holds no readable images"),
        ({"Cat": 1, "cat": 1}, "the class names 'Cat' and 'cat' differ only in case"),  # one folder elsewhere
        ({"a\\b": 1, "c": 1}, "the class name 'a\\\\b' holds a path separator"),  # a folder within a folder on Windows
        ({"line\nbreak": 1, "c": 1}, "the class name 'line\\nbreak' holds a control character"),
        ({"cats": 1, "dogs": 1, "owls": 1}, "--subset 2 is smaller than the number of classes (3)"),
    ],
)
def test_a_folder_without_usable_class_folders_is_refused_before_decoding(
    layout, message, gan_main, tmp_path, cache_dir
):
    root = tmp_path / "data"
    for name, count in layout.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / name / f"{name.strip('.')}{index}.png")
    before = snapshot(root)
    folder = ["--dataset", "folder", "--dataroot", "data", "--subset", 2, "--batch-size", 2]  # past the count check
    code, out, err = gan_main([*TINY_ARGS, *folder, "--conditional", "--epochs", 1])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "images").exists()
    assert snapshot(root) == before  # the decoded-image cache lives outside the data
    assert list(cache_dir.rglob("*")) == []  # and was never made: nothing was decoded
    assert "image cache" not in out


def test_subset_keeps_each_class_its_share():
    opts = parsed("--conditional", "--subset", 20)  # fake data: 512 images labelled 0..9 in turn
    training = utils.load_training_data(opts, torch.device("cpu"))
    assert torch.bincount(training.labels).tolist() == [2] * 10
    labels = torch.tensor([0] * 30 + [1] * 10 + [2] * 60)
    images = torch.arange(100)
    chosen, chosen_labels = utils.choose_subset(images, 10, seed=4, labels=labels)
    assert torch.bincount(chosen_labels).tolist() == [3, 1, 6]
    torch.testing.assert_close(labels[chosen], chosen_labels)
    with pytest.raises(UserError, match="smaller than the number of classes"):
        utils.choose_subset(images, 2, seed=4, labels=labels)


def test_subset_keeps_an_image_of_a_class_too_small_for_its_share(tmp_path):
    root = tmp_path / "data"
    for name, count, grey in (("many", 200, 20), ("few", 2, 40)):
        (root / name).mkdir(parents=True)
        for index in range(count):
            Image.fromarray(np.full((20, 20, 3), grey, np.uint8)).save(root / name / f"{index}.png")
    opts = parsed("--dataset", "folder", "--dataroot", root, "--conditional", "--subset", 10, "--batch-size", 2)
    training = utils.load_training_data(opts, torch.device("cpu"))
    assert training.class_names == ("few", "many")
    assert torch.bincount(training.labels).tolist() == [1, 9]  # its share, 10 * 2 / 202, would be none
    assert [int(image[0, 0, 0]) for image in training.images[training.labels == 0]] == [40]
    again = utils.load_training_data(opts, torch.device("cpu"))  # the same images at every start
    assert torch.equal(again.images, training.images) and torch.equal(again.labels, training.labels)


def test_a_subset_smaller_than_cifars_classes_is_refused_before_any_download(gan_main, tmp_path, monkeypatch):
    downloads = []
    monkeypatch.setattr(utils, "_download_cifar10", downloads.append)
    argv = [*TINY_ARGS, "--dataset", "cifar10", "--dataroot", "data", "--conditional", "--subset", 8, "--epochs", 1]
    code, out, err = gan_main([*argv, "--batch-size", 2])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--subset 8 is smaller than the number of classes (10): --conditional needs an image of every class" in err
    assert list(tmp_path.iterdir()) == [] and downloads == []  # no data/ made, nothing downloaded


@pytest.mark.parametrize("streamed", [False, True])
def test_labels_travel_with_their_images_in_the_batches(streamed):
    images = torch.arange(24, dtype=torch.uint8).view(24, 1, 1, 1).expand(24, 3, 4, 4).contiguous()
    labels = torch.arange(24) % 5
    source = HostImages(images) if streamed else images
    batches = utils.make_batches(source, 4, 4, seed=2, rank=1, world_size=2, labels=labels)
    seen = []
    for real, batch_labels in batches.labelled_epoch(1, start=1):
        indices = ((real[:, 0, 0, 0] + 1) * 127.5).round().long()
        torch.testing.assert_close(batch_labels, indices % 5)
        seen += indices.tolist()
    assert len(seen) == 8 and len(set(seen)) == 8  # batches 1 and 2 of rank 1, each image once


# ---------------------------------------------------------------- the networks

# the logits of the networks before --conditional existed, for torch.manual_seed(0), init_weights
# and noise from seed 1 (nz 8, width 8, 16 px): without --conditional they are the same networks
OLD_LOGITS = {
    "dcgan": [-0.067205, 0.089291, -0.064778, 0.021725],
    "upsample": [-0.06046, -0.252983, 0.048849, 0.16652],
    "upsample-fullres": [0.224104, 0.04479, 0.073679, 0.272842],
}


def bn_keys(index):
    return [f"main.{index}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def sn_keys(index):
    return [f"main.{index}.parametrizations.weight.{k}" for k in ("original", "0._u", "0._v")]


UNCONDITIONAL_KEYS = {
    "dcgan": (
        ["main.0.weight", *bn_keys(1), "main.3.weight", *bn_keys(4), "main.6.weight"],
        [*sn_keys(0), *sn_keys(2), *sn_keys(4)],
    ),
    "upsample-fullres": (
        ["main.1.weight", *bn_keys(3), "main.6.weight", *bn_keys(7), "main.10.weight", *bn_keys(11)]
        + ["main.13.weight"],
        [*sn_keys(0), *sn_keys(2), "main.5.bias", *sn_keys(5)],
    ),
}


@pytest.mark.parametrize("arch", list(OLD_LOGITS))
def test_without_conditional_the_networks_are_the_ones_before_it(arch):
    torch.manual_seed(0)
    G, D = models.build_generator(arch, 8, 8, 16), models.build_discriminator(arch, 8, 16)
    G.apply(models.init_weights)
    D.apply(models.init_weights)
    logits = D(G(torch.randn(4, 8, 1, 1, generator=torch.Generator().manual_seed(1))))
    assert logits.tolist() == pytest.approx(OLD_LOGITS[arch], abs=1e-5)
    if arch in UNCONDITIONAL_KEYS:
        g_keys, d_keys = UNCONDITIONAL_KEYS[arch]
        assert list(G.state_dict()) == g_keys
        assert list(models.build_discriminator(arch, 8, 16, spectral_norm=True).state_dict()) == d_keys


def conditional_pair(arch="dcgan", spectral_norm=False, classes=4):
    torch.manual_seed(0)
    G = models.build_generator(arch, 8, 8, 16, num_classes=classes)
    D = models.build_discriminator(arch, 8, 16, spectral_norm=spectral_norm, num_classes=classes)
    G.apply(models.init_weights)
    D.apply(models.init_weights)
    for layer in G.modules():  # gains and biases far apart per class, so a wrong class shows
        if isinstance(layer, models.ConditionalBatchNorm2d):
            layer.gain.weight.data = torch.randn(layer.gain.weight.shape) * 0.05
            layer.bias.weight.data = torch.randn(layer.bias.weight.shape) * 0.1
    return G, D


@pytest.mark.parametrize("arch", ["dcgan", "upsample-fullres"])
def test_the_class_sets_the_gain_and_bias_of_gs_conditional_batch_norm(arch):
    G, _ = conditional_pair(arch)
    G.eval()
    calls = []
    layers = [m for m in G.modules() if isinstance(m, models.ConditionalBatchNorm2d)]
    for layer in layers:
        # a copy: the in-place ReLU after the layer overwrites its output
        layer.register_forward_hook(lambda layer, inputs, output: calls.append((layer, *inputs, output.clone())))
    labels = torch.tensor([3, 0, 2])
    G(torch.randn(3, 8, 1, 1), labels)
    assert [call[0] for call in calls] == layers and len(layers) == (2 if arch == "dcgan" else 3)
    vectors = G.embed.weight[labels]  # the classes' rows of G's shared embedding
    for layer, features, used_vectors, output in calls:
        torch.testing.assert_close(used_vectors, vectors, rtol=0, atol=0)
        norm = layer.norm
        normalised = F.batch_norm(features, norm.running_mean, norm.running_var, eps=norm.eps)
        gain = 1 + vectors @ layer.gain.weight.T  # BigGAN's 1 + W_gain e_y
        bias = vectors @ layer.bias.weight.T
        torch.testing.assert_close(output, normalised * gain.view(3, -1, 1, 1) + bias.view(3, -1, 1, 1))


@pytest.mark.parametrize("arch", ["dcgan", "upsample"])
def test_changing_one_images_class_changes_that_image_alone(arch):
    G, D = conditional_pair(arch)
    G.eval()
    noise = torch.randn(3, 8, 1, 1)
    before, after = G(noise, torch.tensor([1, 2, 3])), G(noise, torch.tensor([1, 0, 3]))
    assert torch.equal(before[[0, 2]], after[[0, 2]]) and not torch.allclose(before[1], after[1])
    images = torch.randn(3, 3, 16, 16)
    logits, changed = D(images, torch.tensor([1, 2, 3])), D(images, torch.tensor([1, 0, 3]))
    assert torch.equal(logits[[0, 2]], changed[[0, 2]]) and logits[1] != changed[1]


@pytest.mark.parametrize("arch", ["dcgan", "upsample"])
@pytest.mark.parametrize("spectral_norm", [False, True])
def test_the_projection_adds_the_class_embedding_dotted_with_ds_pooled_last_features(arch, spectral_norm):
    _, D = conditional_pair(arch, spectral_norm)
    D.eval()  # spectral norm's power iteration holds still: both calls see one weight
    last_features = []
    body_end = D.main[-1 - D.head_layers]  # the LeakyReLU before the head
    body_end.register_forward_hook(lambda layer, inputs, output: last_features.append(output))
    images = torch.randn(2, 3, 16, 16)
    first, second = D(images, torch.tensor([0, 3])), D(images, torch.tensor([2, 3]))
    pooled = last_features[0].sum(dim=(2, 3))
    embedding = D.embed.weight.detach()
    by_hand = (embedding[0] - embedding[2]) @ pooled[0]
    assert (first[0] - second[0]).item() == pytest.approx(by_hand.item(), rel=1e-4, abs=1e-6)
    assert first[1].item() == second[1].item()
    plain = D.main(images).flatten()  # the head alone: the unconditional logit
    assert first[1].item() == pytest.approx((plain[1] + embedding[3] @ pooled[1]).item(), rel=1e-4, abs=1e-6)


def test_without_the_class_loss_a_training_step_reaches_only_the_classes_of_its_batch():
    opts = parsed("--conditional", "--ema", "0", "--class-loss", 0).replace(num_classes=4)
    torch.manual_seed(0)
    nets = steps.build_nets(opts, CPU)
    g_embed, d_embed = nets.G.embed.weight.detach().clone(), nets.D.embed.weight.detach().clone()
    recipe = steps.Recipe.from_options(opts)
    steps.train_step(nets, torch.rand(8, 3, 16, 16) * 2 - 1, recipe, CPU, labels=torch.full((8,), 2))
    moved = lambda old, new: (new.detach() != old).any(dim=1).tolist()  # noqa: E731
    assert moved(g_embed, nets.G.embed.weight) == [False, False, True, False]
    assert moved(d_embed, nets.D.embed.weight) == [False, False, True, False]


def class_loss_by_hand(D, images, labels):
    """Cross-entropy of D's class scores, each class's embedding dotted with D's pooled last features."""
    last_features = []
    hook = D.main[-1 - D.head_layers].register_forward_hook(lambda layer, inputs, output: last_features.append(output))
    logits = D(images, labels)
    hook.remove()
    scores = last_features[0].sum(dim=(2, 3)) @ D.embed.weight.t()
    return logits, F.cross_entropy(scores, labels)


@pytest.mark.parametrize("weight", [0.5, 0])
def test_the_class_loss_adds_the_cross_entropy_of_ds_class_scores_to_both_losses(weight):
    opts = parsed("--conditional", "--class-loss", weight, "--loss", "hinge").replace(num_classes=4)
    torch.manual_seed(0)
    nets = steps.build_nets(opts, CPU)
    recipe = steps.Recipe.from_options(opts)
    real, fake = torch.rand(6, 3, 16, 16) * 2 - 1, torch.rand(6, 3, 16, 16) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3, 1, 2])
    # D in training mode normalises each batch by its own statistics: the same batches by hand below
    loss_d, _, _ = steps.d_forward(nets.D, real, fake, recipe, labels)
    loss_g = steps.g_forward(nets.D, real, fake, recipe, labels)
    real_logits, real_class_loss = class_loss_by_hand(nets.D, real, labels)
    fake_logits, fake_class_loss = class_loss_by_hand(nets.D, fake, labels)
    hinge_d = F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    assert real_class_loss.item() > 0.1 and fake_class_loss.item() > 0.1  # terms that would show
    assert loss_d.item() == pytest.approx((hinge_d + weight * real_class_loss).item(), rel=1e-5)
    assert loss_g.item() == pytest.approx((-fake_logits.mean() + weight * fake_class_loss).item(), rel=1e-5)


def test_a_conditional_checkpoint_from_before_the_class_loss_resumes_without_it():
    opts, explicit = options.parse_flags([*TINY_ARGS, "--conditional", "--resume"])
    saved = {name: value for name, value in opts.as_dict().items() if name != "class_loss"}
    resumed, changes = startup.merge_resume_flags(opts, explicit, saved, "checkpoint.pt")
    assert resumed.class_loss == 0.0 and changes == []
    opts, explicit = options.parse_flags([*TINY_ARGS, "--conditional", "--resume", "--class-loss", "1"])
    resumed, changes = startup.merge_resume_flags(opts, explicit, saved, "checkpoint.pt")
    assert resumed.class_loss == 1.0 and changes == ["--class-loss 0.0 -> 1.0"]
    saved_with_it = {**saved, "class_loss": 0.5}
    assert startup.merge_resume_flags(opts.replace(class_loss=1.0), set(), saved_with_it, "c.pt")[0].class_loss == 0.5


def test_conditional_training_takes_its_own_learning_rate_unless_one_is_typed():
    assert parsed("--conditional").lr == options.CONDITIONAL_LR == 3e-4
    assert parsed("--conditional", "--lr", "1e-3").lr == 1e-3
    assert parsed("--conditional", "--recipe", "dcgan").lr == 3e-4  # the recipe's own is 2e-4
    assert parsed().lr == 2e-4
    # a resume goes on at the rate the checkpoint trained at (conditional runs saved before had 2e-4)
    opts, explicit = options.parse_flags([*TINY_ARGS, "--conditional", "--resume"])
    saved = {**opts.as_dict(), "lr": 2e-4}
    assert startup.merge_resume_flags(opts, explicit, saved, "checkpoint.pt")[0].lr == 2e-4


def test_a_config_of_a_conditional_run_keeps_its_learning_rate(tmp_path):
    """--config repeats the run: its --lr stands as the run trained with it, not --conditional's own."""
    (tmp_path / "flags.json").write_text(json.dumps({**parsed("--conditional", "--lr", "5e-4").as_dict()}))
    assert parsed("--config", tmp_path / "flags.json").lr == 5e-4
    assert parsed("--config", tmp_path / "flags.json", "--lr", "1e-3").lr == 1e-3


def test_class_loss_without_classes_is_refused_and_nothing_is_written(gan_main, tmp_path):
    code, out, err = gan_main([*TINY_ARGS, "--epochs", 1, "--class-loss", 0.5])
    assert code == 2 and "--class-loss applies to --conditional training" in err
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(path.name for path in tmp_path.iterdir()) == []
    assert steps.Recipe.from_options(parsed("--class-loss", 3)).class_loss == 0.0  # nothing to weigh


def test_the_ema_batch_norm_statistics_are_estimated_over_balanced_classes():
    G, _ = conditional_pair(classes=3)
    drawn = []
    G.register_forward_pre_hook(lambda module, inputs: drawn.append(inputs[1]))
    models.estimate_batch_norm(G, 8, "cpu", samples=300, batch_size=40, num_classes=3)
    labels = torch.cat(drawn)
    assert len(labels) == 320 and torch.bincount(labels[:300]).tolist() == [100, 100, 100]
    assert labels[:6].tolist() == [0, 1, 2, 0, 1, 2]
    # the statistics are those of that draw: the first layer's mean over its 320 images and their pixels
    noise = torch.Generator().manual_seed(0)
    first = G.main[0](torch.cat([torch.randn(40, 8, 1, 1, generator=noise) for _ in range(8)]))
    torch.testing.assert_close(G.main[1].norm.running_mean, first.mean(dim=(0, 2, 3)))


# ---------------------------------------------------------------- grids with one row per class


def test_a_class_grid_draws_every_column_s_noise_as_each_row_s_class():
    G, _ = conditional_pair(classes=3)
    seen = []
    G.register_forward_pre_hook(lambda module, inputs: seen.append(inputs))
    fixed_noise = torch.randn(64, 8, 1, 1)
    opts = parsed("--conditional").replace(num_classes=3, class_names=("a", "b", "c"))
    images = sampling.grid_samples(G, fixed_noise, opts, CPU)
    noise, labels = seen[0]
    assert images.shape == (24, 3, 16, 16)
    torch.testing.assert_close(noise.view(3, 8, 8), fixed_noise[:8].view(1, 8, 8).expand(3, 8, 8))
    assert labels.view(3, 8).tolist() == [[0] * 8, [1] * 8, [2] * 8]
    assert sampling.grid_row_names(opts) == ["a", "b", "c"]


def test_more_than_ten_classes_show_ten_fixed_by_the_seed():
    first, again, other = (sampling.grid_classes(25, seed) for seed in (1, 1, 2))
    assert len(first) == 10 and len(set(first.tolist())) == 10 and first.tolist() == sorted(first.tolist())
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert sampling.grid_classes(7, 1).tolist() == list(range(7))


def test_the_labelled_grid_is_the_grid_with_a_name_left_of_each_row():
    images = torch.rand(24, 3, 16, 16) * 2 - 1
    plain = np.asarray(artifacts.grid_image(images))
    labelled = np.asarray(artifacts.labelled_grid_image(images, ["cat", "dog", "a-long-name"]))
    margin = labelled.shape[1] - plain.shape[1]
    assert labelled.shape[0] == plain.shape[0] == 3 * 18 + 2 and margin > 20
    assert np.array_equal(labelled[:, margin:], plain)
    rows_with_text = [labelled[2 + 18 * row : 18 * (row + 1), :margin].max() > 128 for row in range(3)]
    assert rows_with_text == [True, True, True]
    assert np.asarray(artifacts.labelled_grid_image(images, ["x", "y", "z"])).shape[1] < labelled.shape[1]


@pytest.mark.parametrize("name", ["café", "Ωμέγα", "кошка"])
def test_class_names_beyond_ascii_are_drawn_in_their_letters_not_as_boxes(name):
    import matplotlib
    from matplotlib.ft2font import FT2Font
    from PIL import ImageDraw, ImageFont

    dejavu = str(Path(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"))
    assert set(map(ord, name)) <= set(FT2Font(dejavu).get_charmap())  # a glyph for every letter: no box
    images = -torch.ones(16, 3, 16, 16)  # black, as the margin is
    labelled = artifacts.labelled_grid_image(images, [name, "b"])
    margin = labelled.width - artifacts.grid_image(images).width
    drawn = labelled.crop((0, 0, margin, labelled.height // 2))
    reference = Image.new("RGB", (200, 40))
    ImageDraw.Draw(reference).text((10, 10), name, fill=(255, 255, 255), font=ImageFont.truetype(dejavu, 11))
    # the label's pixels are DejaVu Sans's own rendering of the name, wherever it was placed
    assert np.array_equal(np.asarray(drawn.crop(drawn.getbbox())), np.asarray(reference.crop(reference.getbbox())))


def test_real_vs_fake_shows_each_grid_class_s_real_images_in_its_row():
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 0])
    images = torch.arange(7, dtype=torch.uint8).view(7, 1, 1, 1).expand(7, 3, 2, 2)
    opts = parsed("--conditional").replace(num_classes=3, class_names=("a", "b", "c"))
    rows = sampling.real_grid_images(images, labels, opts)[:, 0, 0, 0].view(3, 8)
    assert rows.tolist() == [[1, 3, 6, 1, 3, 6, 1, 3], [2, 5, 2, 5, 2, 5, 2, 5], [0, 4, 0, 4, 0, 4, 0, 4]]


def test_real_vs_fake_shows_real_samples_draw_without_classes():
    """Not the data's first 64 (a folder's first class, or its first files): the same seeded draw
    from all of it as real_samples.png."""
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 3, 2, 2)
    shown = sampling.real_grid_images(images, None, parsed("--seed", "7"))
    drawn = torch.randperm(100, generator=torch.Generator().manual_seed(7))[:64]
    assert shown[:, 0, 0, 0].tolist() == drawn.tolist()
    assert torch.equal(shown, sampling.drawn_real_samples(images, 7))


def test_conditional_training_with_every_option_saves_the_class_names(gan_main, tmp_path):
    flags = ["--arch", "upsample-fullres", "--spectral-norm", "--loss", "hinge", "--diffaugment", "--d-steps", "2"]
    code, out, err = gan_main([*TINY_ARGS, *flags, "--spectral-loss", 1, "--conditional", "--epochs", 1])
    assert code == 0, err
    assert "32 images of 10 classes" in out
    saved = torch.load(tmp_path / "checkpoints" / "checkpoint.pt")
    assert saved["class_names"] == [str(index) for index in range(10)] and saved["flags"]["num_classes"] == 10
    assert saved["netD"]["embed.parametrizations.weight.original"].shape == (10, 16)
    # the learning rate --conditional trains at unless --lr is typed
    assert [group["lr"] for group in saved["optG"]["param_groups"] + saved["optD"]["param_groups"]] == [3e-4, 3e-4]
    with Image.open(tmp_path / "images" / "epoch_001.png") as grid:
        assert grid.height == 10 * 18 + 2 and grid.width > 8 * 18 + 2


# ---------------------------------------------------------------- drawing a class after training


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    """A 1-epoch --conditional run on CIFAR-10-format data (classes airplane ... truck)."""
    folder = tmp_path_factory.mktemp("conditional_run")
    (folder / "data").mkdir()
    write_cifar10_archive(folder / "data", images_per_batch=8)
    flags = [*TINY_ARGS, "--dataset", "cifar10", "--dataroot", "data", "--conditional", "--epochs", 1]
    assert run_in_process(flags, folder) == 0
    return folder


def trained_generator(run):
    """The run's EMA generator as --generate uses it, built here by hand."""
    saved = torch.load(run / "checkpoints" / "checkpoint.pt")
    G = models.build_generator("dcgan", 8, 8, 16, num_classes=len(saved["class_names"]))
    G.load_state_dict(saved["netG_ema"])
    models.estimate_batch_norm(G, 8, "cpu", num_classes=len(saved["class_names"]))
    return G.eval(), saved["class_names"]


def test_generate_writes_each_class_into_its_own_folder_as_image_folder_reads_it(conditional_run, gan_main, tmp_path):
    from torchvision.datasets import ImageFolder

    checkpoint = conditional_run / "checkpoints" / "checkpoint.pt"
    code, out, err = gan_main(["--generate", 3, "--checkpoint", checkpoint, "--seed", 5])
    assert code == 0, err
    generated = tmp_path / "images" / "generated"
    dataset = ImageFolder(generated)
    G, names = trained_generator(conditional_run)
    assert dataset.classes == sorted(names) and len(dataset) == 30
    assert sorted(dataset.targets) == [target for target in range(10) for _ in range(3)]
    noise = torch.randn(3, 8, 1, 1, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for label in (0, 3):  # image k of each class: the seed's k-th noise vector drawn as that class
            expected = as_pixels(G(noise, torch.full((3,), label)))
            for index in range(3):
                got = png_pixels(generated / names[label] / f"{index:04d}.png")
                assert (got - expected[index]).abs().max() <= 1
    assert f"of each class ({', '.join(names)})" in out
    with Image.open(generated / "grid.png") as grid:
        assert grid.height == 10 * 18 + 2  # a labelled row per class, 3 columns
        assert grid.width > 3 * 18 + 2


def test_generate_one_class_by_name_or_by_index(conditional_run, gan_main, tmp_path):
    checkpoint = conditional_run / "checkpoints" / "checkpoint.pt"
    for name, folder in (("cat", "by_name"), ("3", "by_index")):
        code, out, err = gan_main(["--generate", 2, "--class", name, "--checkpoint", checkpoint, "--seed", 5,
                                   "--image-dir", folder])  # fmt: skip
        assert code == 0, err
        assert sorted(p.name for p in (tmp_path / folder / "generated").iterdir()) == ["cat", "grid.png"]
    assert snapshot(tmp_path / "by_name") == snapshot(tmp_path / "by_index")
    G, _ = trained_generator(conditional_run)
    noise = torch.randn(2, 8, 1, 1, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = as_pixels(G(noise, torch.full((2,), 3)))
    assert (png_pixels(tmp_path / "by_name" / "generated" / "cat" / "0001.png") - expected[1]).abs().max() <= 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--generate", 2, "--class", "zebra"], "no such class in"),
        (["--interpolate", "--class", "cat", "--to-class", "10"], "--to-class 10: no such class"),
        (["--generate", 2, "--class", "9" * 5000], "no such class in"),  # past int()'s 4300 digits
    ],
    ids=["name", "index", "long-index"],
)
def test_an_unknown_class_lists_the_classes_and_writes_nothing(flags, message, conditional_run, gan_main, tmp_path):
    code, out, err = gan_main([*flags, "--checkpoint", conditional_run / "checkpoints" / "checkpoint.pt"])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert "its classes are 0: airplane, 1: automobile, 2: bird, 3: cat," in err and "9: truck" in err
    assert list(tmp_path.iterdir()) == []


ESCAPE = "../../../escape"  # from --image-dir run/out: out/generated/<class> would be tmp_path/escape


@pytest.mark.parametrize(
    "names, message",
    [
        ({0: ESCAPE}, f"the class name {ESCAPE!r} holds a path separator (/ or \\)"),
        ({0: "ABSOLUTE"}, "holds a path separator"),  # tmp_path/absolute, written as the name
        ({0: "..\\..\\..\\escape"}, "holds a path separator"),  # Windows' separator, on any system
        ({0: ".."}, "the class name '..' is .., which names the folder above"),
        ({0: "."}, "the class name '.' is ., which names the folder itself"),
        ({0: "nul\x00byte"}, "the class name 'nul\\x00byte' holds a control character"),
        ({0: "two\nlines"}, "the class name 'two\\nlines' holds a control character"),
        ({0: ""}, "the class name '' is empty"),
        ({0: "C:escape"}, "the class name 'C:escape' names a Windows drive"),
        ({0: "bad\udcffbyte"}, "the class name 'bad\\udcffbyte' is not valid text"),  # a byte UTF-8 cannot decode
        ({0: "x" * 300}, "is longer than a folder name may be (255 bytes)"),
        ({0: "\u732b" * 100}, "is longer than a folder name may be (255 bytes)"),  # 100 letters, 300 bytes
        ({0: "Grid.PNG"}, "the class name 'Grid.PNG' is grid.png, the name of the grid --generate writes beside"),
        ({0: "a", 1: "a"}, "the class name 'a' comes twice"),
        ({0: "Cat", 1: "cat"}, "the class names 'Cat' and 'cat' differ only in case"),
        ({0: "caf\u00e9", 1: "cafe\u0301"}, "differ only in case (or in how an accent is encoded)"),
    ],
)
def test_a_checkpoint_whose_class_names_are_no_folder_names_is_refused_and_nothing_is_written(
    names, message, conditional_run, gan_main, tmp_path
):
    saved = torch.load(conditional_run / "checkpoints" / "checkpoint.pt")
    for index, name in names.items():
        saved["class_names"][index] = str(tmp_path / "absolute") if name == "ABSOLUTE" else name
    torch.save(saved, tmp_path / "shared.pt")
    for mode in (
        ["--generate", 2, "--image-dir", "run/out"],
        ["--interpolate", "--image-dir", "run/out"],
        ["--evaluate"],
    ):
        code, out, err = gan_main([*mode, "--checkpoint", "shared.pt", "--seed", 1])
        assert code == 2 and "error: checkpoint shared.pt" in err and message in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert sorted(tmp_path.rglob("*")) == [tmp_path / "shared.pt"]  # no folder, inside --image-dir or out


def test_resuming_a_checkpoint_whose_class_names_are_no_folder_names_is_refused(conditional_run, gan_main, tmp_path):
    saved = torch.load(conditional_run / "checkpoints" / "checkpoint.pt")
    saved["class_names"][3] = "two\nlines"  # a message naming it would take two lines
    (tmp_path / "run").mkdir()
    torch.save(saved, tmp_path / "run" / "checkpoint.pt")
    before = snapshot(tmp_path)
    data = ["--dataset", "cifar10", "--dataroot", conditional_run / "data"]
    code, out, err = gan_main(["--resume", "run/checkpoint.pt", *data, "--epochs", 2, "--device", "cpu"])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "checkpoint run/checkpoint.pt: the class name 'two\\nlines' holds a control character" in err
    assert snapshot(tmp_path) == before
    assert [path.name for path in sorted(tmp_path.rglob("*"))] == ["run", "checkpoint.pt"]  # no images/ either


def test_a_class_typed_with_its_accent_decomposed_names_the_class_written_composed(conditional_run, gan_main, tmp_path):
    """A macOS keyboard or file name may give "café" as "cafe" + a combining accent: it looks the
    same, and it names the same class, on the command line and in G.sample."""
    import unicodedata

    import gan

    composed, typed = (unicodedata.normalize(form, "café") for form in ("NFC", "NFD"))
    assert typed != composed
    saved = torch.load(conditional_run / "checkpoints" / "checkpoint.pt")
    saved["class_names"][3] = composed  # cat
    (tmp_path / "run").mkdir()
    torch.save(saved, tmp_path / "run" / "checkpoint.pt")
    code, out, err = gan_main(["--generate", 3, "--class", typed, "--seed", 2, "--checkpoint", "run/checkpoint.pt"])
    assert code == 0, err
    written = sorted((tmp_path / "images" / "generated" / composed).iterdir())
    assert [path.name for path in written] == ["0000.png", "0001.png", "0002.png"]
    G = gan.load_generator(tmp_path / "run" / "checkpoint.pt", device="cpu")
    assert torch.equal(G.sample(3, seed=2, label=typed), G.sample(3, seed=2, label=3))
    assert torch.equal(png_pixels(written[1]), G.sample(3, seed=2, label=3)[1].to(torch.int32))


def test_a_class_whose_every_image_is_unreadable_is_refused(gan_main, tmp_path):
    """The listing sees two image files in dogs/; decoding finds neither readable: a class with no
    images would be drawn from nothing."""
    class_folder(tmp_path / "data", ["cats"], per_class=16)
    (tmp_path / "data" / "dogs").mkdir()
    class_folder(tmp_path / "data", [], broken=["dogs/1.png", "dogs/2.png"])
    argv = [*TINY_ARGS, "--dataset", "folder", "--dataroot", "data", "--conditional", "--subset", 16]
    code, out, err = gan_main([*argv, "--epochs", 1])
    assert code == 2 and err.strip().endswith("error: --conditional: class folder data/dogs holds no readable images")
    assert not (tmp_path / "checkpoints").exists()


def test_a_folder_whose_classes_changed_is_refused_before_it_is_decoded_again(gan_main, tmp_path, cache_dir):
    """Class i of the checkpoint would draw another class; decoding first would replace the
    folder's cache with one of a run that never starts."""
    from test_metrics import StandInFeatures

    class_folder(tmp_path / "data", ["cat", "dog"], per_class=16)
    code, out, err = gan_main([*TINY_ARGS, "--dataset", "folder", "--dataroot", "data", "--conditional", "--epochs", 1])
    assert code == 0, err
    class_folder(tmp_path / "data", ["ant"])
    before, cache = snapshot(tmp_path), snapshot(cache_dir)
    message = "the checkpoint was trained on the classes cat, dog; data folder data has ant, cat, dog"
    code, out, err = gan_main(["--resume", "--dataroot", "data", "--epochs", 2, "--device", "cpu"])
    assert code == 2 and err.strip().endswith(message), err
    code, out, err = gan_main(["--evaluate", "--eval-samples", 8, "--device", "cpu"], StandInFeatures())
    assert code == 2 and err.strip().endswith(message), err
    assert snapshot(tmp_path) == before and snapshot(cache_dir) == cache


def test_data_whose_classes_are_not_the_checkpoint_s_is_refused_whatever_its_source(conditional_run, gan_main):
    """The check after decoding, for data whose classes the listing does not tell (CIFAR-10's
    batches.meta, fake data)."""
    from test_metrics import StandInFeatures

    checkpoint = conditional_run / "checkpoints" / "checkpoint.pt"
    code, out, err = gan_main(["--evaluate", "--checkpoint", checkpoint, "--dataset", "fake"], StandInFeatures())
    classes = "airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck"
    assert code == 2 and err.strip().endswith(
        f"{checkpoint} was trained on the classes {classes}; the data has 0, 1, 2, 3, 4, 5, 6, 7, 8, 9"
    ), err
    saved = torch.load(checkpoint)
    data = utils.TrainingData(torch.zeros(1), None, tuple(str(index) for index in range(10)), 3)
    opts = parsed("--conditional")
    with pytest.raises(UserError) as refused:
        startup.with_data_traits(opts, data, (saved, Path("run.pt")))
    assert (
        str(refused.value)
        == f"run.pt was trained on the classes {classes}; the data now has 0, 1, 2, 3, 4, 5, 6, 7, 8, 9"
    )
    reordered = utils.TrainingData(torch.zeros(1), None, tuple(reversed(saved["class_names"])), 3)
    with pytest.raises(
        UserError, match="; the data now has truck, ship, horse, frog, dog, deer, cat, bird, automobile, airplane$"
    ):
        startup.with_data_traits(opts, reordered, (saved, Path("run.pt")))  # class i would draw class 9 - i
    unconditional = utils.TrainingData(torch.zeros(1), None, None, 3)
    with pytest.raises(UserError, match="; the data now has none \\(unconditional\\)$"):
        startup.with_data_traits(opts, unconditional, (saved, Path("run.pt")))
    named = startup.with_data_traits(
        opts, utils.TrainingData(torch.zeros(1), None, tuple(saved["class_names"]), 3), (saved, Path("run.pt"))
    )
    assert named.class_names == tuple(saved["class_names"]) and named.num_classes == 10


def test_every_class_folder_is_made_by_one_function_that_keeps_it_inside(tmp_path):
    assert classnames.class_folder(tmp_path, "café") == tmp_path / "café"
    for name in (ESCAPE, "..", str(tmp_path), "a\\b", "C:x", "nul\x00"):
        with pytest.raises(ValueError, match="class name"):  # a bug: every way in checks the names first
            classnames.class_folder(tmp_path, name)


def test_class_on_an_unconditional_checkpoint_is_refused(trained_run, gan_main, tmp_path):
    for mode in (["--generate", 2], ["--interpolate"]):
        code, out, err = gan_main(
            [*mode, "--class", "cat", "--checkpoint", trained_run / "checkpoints" / "checkpoint.pt"]
        )
        assert code == 2 and "was trained without --conditional, so it has no classes" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--generate", 2, "--truncation", 0], "--truncation: must be a positive number, got 0"),
        (["--generate", 2, "--truncation", -1], "--truncation: must be a positive number, got -1"),
        (["--truncation", 1, "--epochs", 1], "--truncation applies to --generate, --interpolate and --evaluate"),
        (["--class", "cat", "--evaluate"], "--class applies to --generate and --interpolate"),
        (["--generate", 2, "--to-class", "cat"], "--to-class applies to --interpolate"),
    ],
)
def test_bad_sampling_flags_are_one_line_and_exit_2(flags, message, gan_main, tmp_path):
    code, out, err = gan_main(flags)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_truncated_noise_stays_within_its_bounds():
    noise = sampling.draw_noise(4000, 8, torch.Generator().manual_seed(0), truncation=0.7)
    assert noise.abs().max() <= 0.7 and noise.abs().max() > 0.69 and noise.shape == (4000, 8, 1, 1)
    assert noise.std().item() == pytest.approx(0.38, abs=0.02)  # a unit normal cut at 0.7 sigma: std 0.38
    plain = sampling.draw_noise(4000, 8, torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain, torch.randn(4000, 8, 1, 1, generator=torch.Generator().manual_seed(0)))


def test_truncation_reaches_the_generated_images(trained_run, gan_main, tmp_path):
    """At a tiny T every noise vector is about zero: every image is G's image of the zero vector."""
    checkpoint = trained_run / "checkpoints" / "checkpoint.pt"
    code, out, err = gan_main(["--generate", 2, "--truncation", 1e-6, "--checkpoint", checkpoint, "--seed", 1])
    assert code == 0, err
    saved = torch.load(checkpoint)
    G = models.build_generator("dcgan", 8, 8, 16)
    G.load_state_dict(saved["netG_ema"])
    models.estimate_batch_norm(G, 8, "cpu")
    with torch.no_grad():
        expected = as_pixels(G.eval()(torch.zeros(1, 8, 1, 1)))[0]
    for name in ("0000.png", "0001.png"):
        assert (png_pixels(tmp_path / "images" / "generated" / name) - expected).abs().max() <= 1


def test_a_walk_between_classes_holds_the_noise_and_moves_the_class(conditional_run, gan_main, tmp_path):
    G, names = trained_generator(conditional_run)
    walk = after_training.Walks(2, start_class=1, end_class=3, num_classes=10)
    opts, _ = options.parse_flags(["--interpolate", "--steps", "5"])
    noise, weights = after_training.walk_inputs(walk, 8, opts, seed=0)
    assert noise.shape == (5, 2, 8, 1, 1) and torch.equal(noise[0], noise[4]) and torch.equal(noise[1], noise[3])
    assert weights.shape == (10, 10)
    assert weights[0].tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 0, 0] and weights[-1].tolist() == [0, 0, 0, 1] + [0] * 6
    assert weights[4].tolist() == pytest.approx([0, 0.5, 0, 0.5] + [0] * 6)  # the middle step, both walks
    with torch.no_grad():  # a one-hot weight row draws exactly the class it names
        torch.testing.assert_close(G(noise[0], weights[:2]), G(noise[0], torch.tensor([1, 1])), rtol=0, atol=0)
    code, out, err = gan_main(["--interpolate", "--class", "automobile", "--to-class", "cat", "--steps", 5,
                               "--checkpoint", conditional_run / "checkpoints" / "checkpoint.pt"])  # fmt: skip
    assert code == 0, err
    assert "8 walks from automobile to cat, 5 steps" in out
    with Image.open(tmp_path / "images" / "interpolation.png") as grid:
        assert grid.size == (5 * 18 + 2, 8 * 18 + 2)


def test_a_conditional_interpolation_walks_one_class_per_labelled_row(conditional_run, gan_main, tmp_path):
    code, out, err = gan_main(
        ["--interpolate", "--steps", 3, "--checkpoint", conditional_run / "checkpoints" / "checkpoint.pt"]
    )
    assert code == 0, err
    assert "10 walks, one per class, 3 steps" in out
    with Image.open(tmp_path / "images" / "interpolation.png") as grid:
        assert grid.height == 10 * 18 + 2 and grid.width > 3 * 18 + 2  # the names' margin


# ---------------------------------------------------------------- greyscale folders


def grey_folder(root, count=16, colour_file=False):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), "L").save(root / f"{index:02d}.png")
    if colour_file:
        Image.fromarray(np.full((20, 20, 3), (200, 10, 10), np.uint8)).save(root / "colour.png")
    return root


def test_a_greyscale_folder_trains_and_draws_with_one_channel(gan_main, tmp_path):
    grey_folder(tmp_path / "data")
    code, out, err = gan_main([*TINY_ARGS, "--dataset", "folder", "--dataroot", "data", "--subset", 16, "--epochs", 1])
    assert code == 0, err
    assert "16 images, greyscale (1 channel)" in out
    saved = torch.load(tmp_path / "checkpoints" / "checkpoint.pt")
    assert saved["flags"]["nc"] == 1 and saved["flags"]["channels"] == "auto"
    assert saved["netG"]["main.6.weight"].shape[1] == 1 and saved["netD"]["main.0.weight"].shape[1] == 1
    grid = png_pixels(tmp_path / "images" / "epoch_001.png")
    assert torch.equal(grid[0], grid[1]) and torch.equal(grid[1], grid[2])
    code, out, err = gan_main(["--generate", 2, "--seed", 1])
    assert code == 0, err
    with Image.open(tmp_path / "images" / "generated" / "0001.png") as image:
        assert image.mode == "L" and image.size == (16, 16)
    code, out, err = gan_main(["--resume", "--dataroot", "data", "--channels", "3", "--epochs", 2, "--device", "cpu"])
    assert code == 2 and "was trained on 1-channel images; the data now gives 3" in err


def test_one_colour_image_keeps_three_channels_and_the_flag_decides_over_the_data(tmp_path):
    mixed, grey = grey_folder(tmp_path / "mixed", colour_file=True), grey_folder(tmp_path / "grey")
    channels = {}
    for root, flag in ((mixed, "auto"), (mixed, "1"), (grey, "auto"), (grey, "3")):
        opts = parsed("--dataset", "folder", "--dataroot", root, "--channels", flag, "--subset", 16)
        channels[root.name, flag] = utils.load_training_data(opts, torch.device("cpu")).channels
    assert channels == {("mixed", "auto"): 3, ("mixed", "1"): 1, ("grey", "auto"): 1, ("grey", "3"): 3}
    colour = torch.tensor([200, 10, 10], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    luma = utils.to_float_images(colour, 4, channels=1)
    assert luma.shape == (2, 1, 4, 4)
    assert luma[0, 0, 0, 0].item() == pytest.approx((0.299 * 200 + 0.587 * 10 + 0.114 * 10) / 127.5 - 1)
    batch = next(utils.DeviceBatches(colour[:, :, :, :].clone(), 2, 4, seed=0, channels=1).epoch(0))
    torch.testing.assert_close(batch, luma)
    # every channel counts: a blue tint over equal red and green is colour too
    for tint in ((90, 90, 200), (90, 200, 200), (200, 90, 90)):
        tinted = torch.tensor(tint, dtype=torch.uint8).view(1, 3, 1, 1).expand(4, 3, 4, 4)
        assert not utils.all_greyscale(tinted) and utils.all_greyscale(tinted[:, :1].expand(4, 3, 4, 4))


# ---------------------------------------------------------------- intra-FID and class consistency


def class_pixels(rng, count, centre):
    """count 1x1 RGB images around centre, with correlated channels."""
    values = rng.normal(centre, 20, size=(count, 3)) + rng.normal(0, 10, size=(count, 1))
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


def test_intra_fid_is_the_mean_per_class_frechet_distance_and_consistency_the_nearest_class(tmp_path):
    from test_metrics import PixelFeatures, frechet_by_hand

    rng = np.random.default_rng(0)
    centres = [(60, 60, 60), (190, 120, 60), (60, 120, 200)]
    real = [class_pixels(rng, 80, centre) for centre in centres]
    fake = [class_pixels(rng, 60, np.add(centre, 12)) for centre in centres]
    real_labels = torch.arange(3).repeat_interleave(80)
    real_uint8 = torch.from_numpy(np.concatenate(real)).view(-1, 3, 1, 1)
    scorer = metrics.ClassScorer(PixelFeatures(), real_uint8, real_labels, 3, tmp_path / "classes.pt")
    fake_labels = torch.arange(3).repeat(60)  # drawn as the classes in turn, as the evaluation draws them
    by_class = [iter(fake[label]) for label in range(3)]
    fake_uint8 = torch.from_numpy(np.stack([next(by_class[label]) for label in fake_labels.tolist()]))
    fake_images = fake_uint8.float().view(-1, 3, 1, 1).div(127.5).sub(1)
    passed = list(scorer.observe(iter(fake_images.split(50)), fake_labels))
    assert torch.equal(torch.cat(passed), fake_images)  # the batches go on to FID unchanged
    scores = scorer.compute()
    expected = np.mean([frechet_by_hand(real[k].astype(float), fake[k].astype(float)) for k in range(3)])
    assert scores["intra_fid"] == pytest.approx(expected, rel=1e-4)
    assert scores["class_consistency"] == 1.0
    list(scorer.observe(iter(fake_images.split(50)), (fake_labels + 1) % 3))  # every sample asked as another class
    assert scorer.compute()["class_consistency"] == 0.0
    cached = metrics.ClassScorer(PixelFeatures(), real_uint8[:3], real_labels[:3], 3, tmp_path / "classes.pt")
    torch.testing.assert_close(cached.real_means, scorer.real_means)  # read back, not recomputed from 3 images


def test_fid_every_and_evaluate_report_intra_fid_and_class_consistency(gan_main, tmp_path):
    from test_metrics import StandInFeatures

    run = [*TINY_ARGS, "--conditional", "--eval-samples", 40, "--epochs", 1, "--fid-every", 1]
    code, out, err = gan_main(run, StandInFeatures())
    assert code == 0, err
    rows = [__import__("json").loads(line) for line in (tmp_path / "checkpoints" / "metrics.jsonl").open()]
    scored = [row for row in rows if "fid" in row]
    assert len(scored) == 1 and 0 <= scored[0]["class_consistency"] <= 1 and scored[0]["intra_fid"] > 0
    code, out, err = gan_main(["--evaluate", "--eval-samples", 40, "--device", "cpu", "--seed", 3], StandInFeatures())
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("FID"))
    assert "intra-FID" in line and "class consistency" in line


def test_an_interpolation_of_more_than_ten_classes_walks_the_ten_rows_of_the_run_s_grids():
    """Past 10 classes --interpolate walks the classes the run's grids show, chosen by the run's
    seed: --seed here draws the noise alone."""
    G, _ = conditional_pair(classes=25)
    G.class_names = tuple(f"class{index}" for index in range(25))
    opts, _ = options.parse_flags(["--interpolate", "--seed", "7"])
    walks = after_training.plan_walks(G, opts, {"seed": 1}, walks=8)
    shown = sampling.grid_classes(25, 1).tolist()
    assert walks.classes.tolist() == shown and shown != sampling.grid_classes(25, 7).tolist()
    assert walks.row_names == [f"class{index}" for index in shown] and walks.count == 10


def test_a_class_folder_named_as_generate_s_grid_is_refused_before_training(gan_main, tmp_path):
    """--generate writes grid.png beside a folder of each class: a class of that name would stop it
    half-way, so the data folder is refused at once, before anything is decoded or written."""
    class_folder(tmp_path / "data", ["grid.png", "b"], per_class=4)
    before = snapshot(tmp_path)
    flags = [*TINY_ARGS, "--dataset", "folder", "--dataroot", "data", "--conditional", "--subset", 8, "--epochs", 1]
    code, out, err = gan_main([*flags, "--cache-dir", "cache"])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "the class name 'grid.png' is grid.png, the name of the grid --generate writes beside" in err
    assert "rename the sub-folder" in err
    assert snapshot(tmp_path) == before and not (tmp_path / "cache").exists()


def test_a_class_given_by_its_index_may_have_leading_zeros_but_no_more_digits_than_an_index_takes():
    G, _ = conditional_pair(classes=12)
    G.class_names = tuple(f"class{index}" for index in range(12))
    assert [after_training.class_index(G, name, "c.pt") for name in ("3", "03", "0011", "class7")] == [3, 3, 11, 7]
    for name in ("12", "9" * 5000):
        with pytest.raises(UserError, match="no such class in c.pt"):
            after_training.class_index(G, name, "c.pt")


def test_a_conditional_subset_of_one_image_per_class_is_taken():
    opts, _ = options.parse_flags([*TINY_ARGS, "--conditional", "--subset", "10", "--batch-size", "5"])
    data = utils.load_training_data(opts, "cpu")
    assert sorted(data.labels.tolist()) == list(range(10))
