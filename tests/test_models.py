"""The DCGAN networks: shapes at every size, depth, initialisation, spectral norm, EMA."""

import pytest
import torch
from torch import nn

from models import IMAGE_SIZES, Discriminator, Generator, init_weights, num_stages, update_ema


def count(module, kind):
    return sum(isinstance(m, kind) for m in module.modules())


@pytest.mark.parametrize("image_size", IMAGE_SIZES)
def test_shapes_at_every_image_size(image_size):
    torch.manual_seed(0)
    G, D = Generator(nz=8, ngf=4, image_size=image_size), Discriminator(ndf=4, image_size=image_size)
    G.apply(init_weights)
    D.apply(init_weights)
    images = G(torch.randn(2, 8, 1, 1))
    assert images.shape == (2, 3, image_size, image_size)
    assert images.min() >= -1 and images.max() <= 1  # tanh output
    logits = D(images)
    assert logits.shape == (2,)
    assert torch.isfinite(logits).all()


def test_image_sizes_are_the_powers_of_two_from_16_to_256():
    assert IMAGE_SIZES == (16, 32, 64, 128, 256)
    for bad in (8, 48, 512):
        with pytest.raises(ValueError, match="image_size"):
            num_stages(bad)


def test_each_doubling_of_the_side_adds_one_stage():
    for small, big in [(16, 32), (32, 64), (64, 128)]:
        assert count(Generator(8, 4, big), nn.ConvTranspose2d) == count(Generator(8, 4, small), nn.ConvTranspose2d) + 1
        assert count(Discriminator(4, big), nn.Conv2d) == count(Discriminator(4, small), nn.Conv2d) + 1
    # the 64x64 nets of the DCGAN paper: 5 (transposed) convolutions each
    assert count(Generator(100, 64, 64), nn.ConvTranspose2d) == 5
    assert count(Discriminator(64, 64), nn.Conv2d) == 5
    assert count(Generator(100, 64, 32), nn.ConvTranspose2d) == 4
    assert count(Discriminator(64, 32), nn.Conv2d) == 4


def test_channel_widths_follow_the_paper_at_64():
    convs = [m for m in Generator(100, 64, 64).modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [c.out_channels for c in convs] == [512, 256, 128, 64, 3]
    convs = [m for m in Discriminator(64, 64).modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]


def test_init_weights_follows_dcgan():
    torch.manual_seed(0)
    G, D = Generator(100, 64, 64), Discriminator(64, 64)
    G.apply(init_weights)
    D.apply(init_weights)
    gammas = []
    for module in (*G.modules(), *D.modules()):
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            weight = module.weight.detach()
            assert weight.mean().item() == pytest.approx(0.0, abs=2e-3)
            assert weight.std().item() == pytest.approx(0.02, abs=1.5e-3)
        elif isinstance(module, nn.BatchNorm2d):
            gammas.append(module.weight.detach())
            assert torch.equal(module.bias.detach(), torch.zeros_like(module.bias))
    gammas = torch.cat(gammas)
    assert len(gammas) == (512 + 256 + 128 + 64) + (128 + 256 + 512)
    assert gammas.mean().item() == pytest.approx(1.0, abs=3e-3)
    assert gammas.std().item() == pytest.approx(0.02, abs=3e-3)


def test_spectral_norm_discriminator_has_no_batchnorm_and_works():
    torch.manual_seed(0)
    D = Discriminator(ndf=4, image_size=16, spectral_norm=True)
    D.apply(init_weights)
    assert count(D, nn.BatchNorm2d) == 0
    assert count(Discriminator(ndf=4, image_size=16), nn.BatchNorm2d) == 1
    convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3
    assert all(torch.nn.utils.parametrize.is_parametrized(c, "weight") for c in convs)
    # init reached the raw weights under the parametrisation
    raw = torch.cat([c.parametrizations.weight.original.detach().flatten() for c in convs])
    assert raw.std().item() == pytest.approx(0.02, abs=2e-3)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    for _ in range(25):  # one power iteration per training-mode forward
        logits = D(images)
    assert logits.shape == (4,)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(c.parametrizations.weight.original.grad is not None for c in convs)
    D.eval()  # reading the weights must not run more power iterations
    for conv in convs:
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2).item()
        assert sigma == pytest.approx(1.0, abs=0.05)


def test_update_ema_by_hand():
    net, ema = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        ema.weight.copy_(torch.tensor([1.0, -2.0]))
        ema.bias.copy_(torch.tensor([0.0, 10.0]))
        net.weight.copy_(torch.tensor([3.0, 2.0]))
        net.bias.copy_(torch.tensor([1.0, 0.0]))
        net.running_mean.copy_(torch.tensor([5.0, 6.0]))
        net.num_batches_tracked.fill_(7)
    update_ema(ema, net, decay=0.9)
    # ema <- 0.9 * ema + 0.1 * net
    torch.testing.assert_close(ema.weight.detach(), torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * -2 + 0.1 * 2]))
    torch.testing.assert_close(ema.bias.detach(), torch.tensor([0.1 * 1, 0.9 * 10]))
    # buffers are copied, not averaged
    torch.testing.assert_close(ema.running_mean, torch.tensor([5.0, 6.0]))
    assert ema.num_batches_tracked.item() == 7
    # the source is untouched, and nothing asks for gradients
    torch.testing.assert_close(net.weight.detach(), torch.tensor([3.0, 2.0]))
    update_ema(ema, net, decay=0.0)
    torch.testing.assert_close(ema.weight.detach(), net.weight.detach())


def test_update_ema_on_a_generator_converges_to_it():
    torch.manual_seed(0)
    G, ema = Generator(8, 4, 16), Generator(8, 4, 16)
    G.apply(init_weights)
    ema.apply(init_weights)
    before = [p.detach().clone() for p in ema.parameters()]
    update_ema(ema, G, decay=0.5)
    for averaged, old, new in zip(ema.parameters(), before, G.parameters()):
        torch.testing.assert_close(averaged.detach(), (old + new.detach()) / 2)
