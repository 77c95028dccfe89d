"""--conditional: labels from CIFAR-10 and from a folder's sub-folders, the class reaching G's
conditional BatchNorm and D's projection, and grids with one row per class."""

import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_ARGS, snapshot, write_cifar10_archive
from PIL import Image

import artifacts
import data
import models
import options
import sampling
import steps
from folders import HostImages, list_images
from runtime import Runtime
from utils import UserError

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
    with tarfile.open(tmp_path / data.CIFAR_ARCHIVE) as tar:
        tar.extractall(tmp_path, filter="data")
    names = [f"class-{index}" for index in range(10)][::-1]  # not CIFAR-10's: the names come from batches.meta
    meta = tmp_path / data.CIFAR_FOLDER / "batches.meta"
    meta.write_bytes(__import__("pickle").dumps({"label_names": names}))
    opts = parsed("--dataset", "cifar10", "--dataroot", tmp_path, "--image-size", 32, "--conditional", "--subset", 40)
    training = data.load_training_data(opts.replace(subset=None), torch.device("cpu"))
    assert training.class_names == tuple(names)
    torch.testing.assert_close(training.labels, torch.arange(40) % 10)  # image i has label i % 10, batch after batch
    torch.testing.assert_close(training.images, torch.from_numpy(images))
    assert data.load_training_data(opts.replace(conditional=False), "cpu").labels is None


def test_a_folders_classes_are_its_sub_folders_sorted_as_image_folder_sorts_them(tmp_path):
    from torchvision.datasets import ImageFolder

    root = class_folder(tmp_path / "data", ["zebra", "Apple", "mango"], broken=["mango/broken.png"])
    (root / "mango" / "deeper").mkdir()
    Image.fromarray(np.full((20, 20, 3), 60, np.uint8)).save(root / "mango" / "deeper" / "x.png")
    reference = ImageFolder(root, is_valid_file=lambda path: "broken" not in path)  # before any cache is there
    opts = parsed("--dataset", "folder", "--dataroot", root, "--conditional", "--batch-size", 2, "--subset", 10)
    with pytest.warns(UserWarning, match="skipped 1 of 11"):
        training = data.load_training_data(opts.replace(subset=None), torch.device("cpu"))
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
    ],
)
def test_a_folder_without_usable_class_folders_is_one_line_and_exit_2(layout, message, gan_main, tmp_path):
    root = tmp_path / "data"
    for name, count in layout.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / name / f"{name.strip('.')}{index}.png")
    before = snapshot(root)
    code, out, err = gan_main([*TINY_ARGS, "--dataset", "folder", "--dataroot", "data", "--conditional", "--epochs", 1])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "images").exists()
    assert {k: v for k, v in snapshot(root).items() if ".dcgan-cache" not in k} == before


def test_subset_keeps_each_class_its_share():
    opts = parsed("--conditional", "--subset", 20)  # fake data: 512 images labelled 0..9 in turn
    training = data.load_training_data(opts, torch.device("cpu"))
    assert torch.bincount(training.labels).tolist() == [2] * 10
    labels = torch.tensor([0] * 30 + [1] * 10 + [2] * 60)
    images = torch.arange(100)
    chosen, chosen_labels = data.choose_subset(images, 10, seed=4, labels=labels)
    assert torch.bincount(chosen_labels).tolist() == [3, 1, 6]
    torch.testing.assert_close(labels[chosen], chosen_labels)
    with pytest.raises(UserError, match="smaller than the number of classes"):
        data.choose_subset(images, 2, seed=4, labels=labels)


@pytest.mark.parametrize("streamed", [False, True])
def test_labels_travel_with_their_images_in_the_batches(streamed):
    images = torch.arange(24, dtype=torch.uint8).view(24, 1, 1, 1).expand(24, 3, 4, 4).contiguous()
    labels = torch.arange(24) % 5
    source = HostImages(images) if streamed else images
    batches = data.make_batches(source, 4, 4, seed=2, rank=1, world_size=2, labels=labels)
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
    for layer in G.modules():  # distinct gains and biases per class, so a wrong row shows
        if isinstance(layer, models.ConditionalBatchNorm2d):
            layer.gain.weight.data = torch.rand(layer.gain.weight.shape) + 0.5
            layer.bias.weight.data = torch.randn(layer.bias.weight.shape)
    return G, D


@pytest.mark.parametrize("arch", ["dcgan", "upsample-fullres"])
def test_the_class_picks_its_rows_of_gs_conditional_batch_norm(arch):
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
    for layer, features, used_labels, output in calls:
        assert used_labels is labels
        norm = layer.norm
        normalised = F.batch_norm(features, norm.running_mean, norm.running_var, eps=norm.eps)
        expected = normalised * layer.gain.weight[labels].view(3, -1, 1, 1) + layer.bias.weight[labels].view(
            3, -1, 1, 1
        )
        torch.testing.assert_close(output, expected)


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


def test_a_training_step_reaches_only_the_classes_of_its_batch():
    opts = parsed("--conditional", "--ema", "0").replace(num_classes=4)
    torch.manual_seed(0)
    nets = steps.build_nets(opts, CPU)
    cbn = next(m for m in nets.G.modules() if isinstance(m, models.ConditionalBatchNorm2d))
    gain, embed = cbn.gain.weight.detach().clone(), nets.D.embed.weight.detach().clone()
    steps.train_step(nets, torch.rand(8, 3, 16, 16) * 2 - 1, steps.Recipe(), CPU, labels=torch.full((8,), 2))
    moved = lambda old, new: (new.detach() != old).any(dim=1).tolist()  # noqa: E731
    assert moved(gain, cbn.gain.weight) == [False, False, True, False]
    assert moved(embed, nets.D.embed.weight) == [False, False, True, False]


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


def test_real_vs_fake_shows_each_grid_class_s_real_images_in_its_row():
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 0])
    images = torch.arange(7, dtype=torch.uint8).view(7, 1, 1, 1).expand(7, 3, 2, 2)
    opts = parsed("--conditional").replace(num_classes=3, class_names=("a", "b", "c"))
    rows = sampling.real_grid_images(images, labels, opts)[:, 0, 0, 0].view(3, 8)
    assert rows.tolist() == [[1, 3, 6, 1, 3, 6, 1, 3], [2, 5, 2, 5, 2, 5, 2, 5], [0, 4, 0, 4, 0, 4, 0, 4]]


def test_conditional_training_with_every_option_saves_the_class_names(gan_main, tmp_path):
    flags = ["--arch", "upsample-fullres", "--spectral-norm", "--loss", "hinge", "--diffaugment", "--d-steps", "2"]
    code, out, err = gan_main([*TINY_ARGS, *flags, "--spectral-loss", 1, "--conditional", "--epochs", 1])
    assert code == 0, err
    assert "32 images of 10 classes" in out
    saved = torch.load(tmp_path / "checkpoints" / "checkpoint.pt")
    assert saved["class_names"] == [str(index) for index in range(10)] and saved["flags"]["num_classes"] == 10
    assert saved["netD"]["embed.parametrizations.weight.original"].shape == (10, 16)
    with Image.open(tmp_path / "images" / "epoch_001.png") as grid:
        assert grid.height == 10 * 18 + 2 and grid.width > 8 * 18 + 2
