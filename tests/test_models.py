"""The networks (DCGAN and upsample): shapes at every size, depth, initialisation, spectral norm, EMA."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from models import (
    ARCHITECTURES,
    IMAGE_SIZES,
    Discriminator,
    Generator,
    UpsampleDiscriminator,
    UpsampleGenerator,
    build_discriminator,
    build_generator,
    estimate_batch_norm,
    init_weights,
    num_stages,
    update_ema,
)


def count(module, kind):
    return sum(isinstance(m, kind) for m in module.modules())


@pytest.mark.parametrize("spectral_norm", [False, True])
@pytest.mark.parametrize("image_size", IMAGE_SIZES)
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_shapes_at_every_image_size(arch, image_size, spectral_norm):
    torch.manual_seed(0)
    G = build_generator(arch, nz=8, ngf=4, image_size=image_size)
    D = build_discriminator(arch, ndf=4, image_size=image_size, spectral_norm=spectral_norm)
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
    """Repeated updates towards a fixed G: the average halves its distance to G every time."""
    torch.manual_seed(0)
    G, ema = Generator(8, 4, 16), Generator(8, 4, 16)
    G.apply(init_weights)
    ema.apply(init_weights)
    start = [p.detach().clone() for p in ema.parameters()]
    for updates in range(1, 31):
        update_ema(ema, G, decay=0.5)
        if updates in (1, 2):
            for averaged, old, new in zip(ema.parameters(), start, G.parameters()):
                torch.testing.assert_close(averaged, new.detach() + 0.5**updates * (old - new.detach()))
    for averaged, new in zip(ema.parameters(), G.parameters()):
        torch.testing.assert_close(averaged, new.detach(), rtol=0, atol=1e-6)  # from ~0.02 apart


def test_update_ema_on_a_net_without_buffers():
    net, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    update_ema(ema, net, decay=0.0)
    torch.testing.assert_close(ema.weight.detach(), net.weight.detach())


def test_update_ema_copies_every_buffer_of_an_upsample_generator():
    torch.manual_seed(0)
    G, ema = UpsampleGenerator(8, 4, 16), UpsampleGenerator(8, 4, 16)
    G(torch.randn(4, 8, 1, 1))  # a training-mode forward moves G's running statistics
    update_ema(ema, G, decay=0.9)
    buffers = list(G.buffers())
    assert len(buffers) == 3 * count(G, nn.BatchNorm2d)  # mean, var, num_batches_tracked
    for ema_buffer, buffer in zip(ema.buffers(), buffers, strict=True):
        torch.testing.assert_close(ema_buffer, buffer)


@torch.no_grad()
def layer_inputs(G, noise, layers):
    """What each of G's given layers is given when G runs on this noise, in G's order."""
    seen = []
    hooks = [layer.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0])) for layer in layers]
    G(noise)
    for hook in hooks:
        hook.remove()
    return seen


def batch_norm_inputs(G, noise):
    """What each BatchNorm layer of G sees on this noise in training mode, flattened to (N*H*W, C)."""
    layers = [m for m in G.modules() if isinstance(m, nn.BatchNorm2d)]
    return [seen.transpose(0, 1).flatten(1).T for seen in layer_inputs(G.train(), noise, layers)]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_estimate_batch_norm_gives_a_generator_the_statistics_of_its_own_outputs(arch):
    torch.manual_seed(0)
    G = build_generator(arch, nz=8, ngf=4, image_size=16).apply(init_weights).eval()
    for m in G.modules():  # statistics that belong to some other network
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(3.0)
            m.running_var.fill_(0.01)
    estimate_batch_norm(G, 8, torch.device("cpu"), samples=512, batch_size=128, seed=5)
    assert not G.training  # left in the mode it was in
    noise = torch.Generator().manual_seed(5)
    inputs = batch_norm_inputs(G, torch.cat([torch.randn(128, 8, 1, 1, generator=noise) for _ in range(4)]))
    layers = [m for m in G.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(inputs) == len(layers) > 0
    for m, seen in zip(layers, inputs):
        torch.testing.assert_close(m.running_mean, seen.mean(0), rtol=1e-3, atol=2e-4)  # equal batches: the mean
        torch.testing.assert_close(m.running_var, seen.var(0), rtol=0.05, atol=1e-6)  # mean of batch variances


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_a_clipped_generator_draws_pure_white_and_black_where_tanh_stops_short(arch):
    """--g-output clip: G's colours are its last convolution's output cut at -1 and 1, the bounds
    reached exactly; tanh's, the same convolution squashed and never at the bounds."""
    torch.manual_seed(0)
    clipped = build_generator(arch, nz=8, ngf=4, image_size=16, output="clip").apply(init_weights).eval()
    squashed = build_generator(arch, nz=8, ngf=4, image_size=16).eval()
    last = [m for m in clipped.main if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))][-1]
    noise = torch.randn(4, 8, 1, 1)
    with torch.no_grad():  # colours well beyond [-1, 1] for many pixels, inside it for others
        last.weight.mul_(1.5 / clipped.main[:-1](noise).std())
        before = clipped.main[:-1](noise)
    squashed.load_state_dict(clipped.state_dict())
    with torch.no_grad():
        drawn, tanh_drawn = clipped(noise), squashed(noise)
    assert (before > 1).float().mean() > 0.02 and (before < -1).float().mean() > 0.02 and (before.abs() < 0.9).any()
    assert torch.equal(drawn, before.clamp(-1, 1))
    assert torch.equal(tanh_drawn, before.tanh()) and tanh_drawn.abs().max() < 1
    with pytest.raises(ValueError, match="output must be one of"):
        build_generator(arch, nz=8, ngf=4, image_size=16, output="sigmoid")


def test_estimate_batch_norm_is_seeded_and_leaves_the_weights_alone():
    torch.manual_seed(0)
    G = Generator(8, 4, 16).apply(init_weights)
    weights = {k: v.clone() for k, v in G.state_dict().items() if "running" not in k and "num_batches" not in k}
    first, second = Generator(8, 4, 16), Generator(8, 4, 16)
    for copy_ in (first, second):
        copy_.load_state_dict(G.state_dict())
    G(torch.randn(4, 8, 1, 1))  # moves G's own statistics, which the estimate must not depend on
    for net in (first, second, G):
        estimate_batch_norm(net, 8, torch.device("cpu"), samples=256, batch_size=64)
    for a, b, c in zip(first.buffers(), second.buffers(), G.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    for name, value in weights.items():
        torch.testing.assert_close(G.state_dict()[name], value, rtol=0, atol=0)


# ---------------------------------------------------------------- the upsample architecture


@pytest.mark.parametrize("image_size", IMAGE_SIZES)
def test_upsample_generator_upsamples_once_per_stage_without_transposed_convolutions(image_size):
    G = UpsampleGenerator(8, 4, image_size)
    stages = num_stages(image_size)
    assert count(G, nn.ConvTranspose2d) == 0
    upsamples = [m for m in G.modules() if isinstance(m, nn.Upsample)]
    assert len(upsamples) == stages
    assert all(m.scale_factor == 2 and m.mode == "nearest" for m in upsamples)
    convs = [m for m in G.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == stages
    assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) and c.padding == (1, 1) for c in convs)
    # BatchNorm after the linear layer and after every block but the last, which is the output
    assert count(G, nn.BatchNorm2d) == stages
    assert isinstance(G.main[-1], nn.Tanh) and convs[-1].out_channels == 3


@pytest.mark.parametrize("image_size", IMAGE_SIZES)
def test_upsample_discriminator_batchnorm_everywhere_but_the_first_block(image_size):
    stages = num_stages(image_size)
    D = UpsampleDiscriminator(4, image_size)
    assert count(D, nn.Conv2d) == stages
    assert count(D, nn.BatchNorm2d) == stages - 1
    assert count(D, nn.Linear) == 1
    assert count(UpsampleDiscriminator(4, image_size, spectral_norm=True), nn.BatchNorm2d) == 0


def test_upsample_widths_follow_dcgan_at_64():
    G = UpsampleGenerator(100, 64, 64)
    (linear,) = [m for m in G.modules() if isinstance(m, nn.Linear)]
    assert (linear.in_features, linear.out_features) == (100, 512 * 4 * 4)
    convs = [m for m in G.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [256, 128, 64, 3]
    D = UpsampleDiscriminator(64, 64)
    convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512]
    (linear,) = [m for m in D.modules() if isinstance(m, nn.Linear)]
    assert (linear.in_features, linear.out_features) == (512 * 4 * 4, 1)


def test_upsample_generator_parameters_in_the_ballpark_of_dcgan():
    for image_size in (32, 64):
        dcgan = sum(p.numel() for p in Generator(100, 64, image_size).parameters())
        upsample = sum(p.numel() for p in UpsampleGenerator(100, 64, image_size).parameters())
        assert 0.5 * dcgan < upsample < 1.0 * dcgan  # 3x3 kernels where DCGAN has 4x4


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_init_weights_reaches_linear_layers(spectral_norm):
    torch.manual_seed(0)
    G = UpsampleGenerator(100, 32, 32)
    D = UpsampleDiscriminator(32, 32, spectral_norm=spectral_norm)
    G.apply(init_weights)
    D.apply(init_weights)
    (g_linear,) = [m for m in G.modules() if isinstance(m, nn.Linear)]
    (d_linear,) = [m for m in D.modules() if isinstance(m, nn.Linear)]
    assert g_linear.bias is None  # it would precede BatchNorm, whose beta does its work
    # under spectral norm .weight is computed from the raw weight, which init must reach
    d_raw = d_linear.parametrizations.weight.original if spectral_norm else d_linear.weight
    for raw in (g_linear.weight, d_raw):
        assert raw.mean().item() == pytest.approx(0.0, abs=1e-3)
        assert raw.std().item() == pytest.approx(0.02, abs=1e-3)
    # PyTorch's default bias is uniform, not zero
    assert torch.equal(d_linear.bias.detach(), torch.zeros_like(d_linear.bias))


@pytest.mark.parametrize("image_size", (16, 32))
def test_upsample_spectral_norm_discriminator_is_normalised_everywhere(image_size):
    torch.manual_seed(0)
    D = UpsampleDiscriminator(ndf=4, image_size=image_size, spectral_norm=True)
    D.apply(init_weights)
    assert count(D, nn.BatchNorm2d) == 0
    layers = [m for m in D.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == num_stages(image_size) + 1
    assert all(parametrize.is_parametrized(layer, "weight") for layer in layers)
    images = torch.rand(4, 3, image_size, image_size) * 2 - 1
    for _ in range(25):  # one power iteration per training-mode forward
        logits = D(images)
    logits.sum().backward()
    assert all(layer.parametrizations.weight.original.grad is not None for layer in layers)
    D.eval()
    for layer in layers:
        sigma = torch.linalg.matrix_norm(layer.weight.detach().flatten(1), ord=2).item()
        assert sigma == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_upsample_gradients_reach_every_parameter(spectral_norm):
    torch.manual_seed(0)
    G = UpsampleGenerator(8, 4, 16)
    D = UpsampleDiscriminator(4, 16, spectral_norm=spectral_norm)
    G.apply(init_weights)
    D.apply(init_weights)
    logits = D(G(torch.randn(4, 8, 1, 1)))
    F.softplus(-logits).mean().backward()  # the non-saturating generator loss
    for name, parameter in (*G.named_parameters(), *D.named_parameters()):
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_upsample_generator_depends_on_the_noise():
    torch.manual_seed(0)
    G = UpsampleGenerator(8, 4, 16)
    G.apply(init_weights)
    noise = torch.randn(4, 8, 1, 1)
    # training mode: BatchNorm uses the batch's statistics, so the images must differ within a batch
    images = G(noise)
    assert (images[0] - images[1:]).abs().amax() > 1e-3
    G.eval()
    first, again, other = G(noise), G(noise.clone()), G(torch.randn(4, 8, 1, 1))
    torch.testing.assert_close(first, again)
    assert (first - other).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every image changed


def colour_convolution_input(G, noise):
    """What G's last convolution, the one to colours, is given."""
    last = [m for m in G.modules() if isinstance(m, nn.Conv2d)][-1]
    return layer_inputs(G, noise, [last])[0]


@pytest.mark.parametrize("image_size", [16, 64])
def test_upsample_fullres_convolves_at_full_size_before_the_colours(image_size):
    """The plain upsample G's colour convolution only filters a nearest-neighbour doubling (every
    2x2 block equal: no power at the highest frequencies); the full-size block's ReLU gives it
    detail at the full size. Otherwise the two are the same network, one block longer."""
    torch.manual_seed(0)
    plain = build_generator("upsample", nz=8, ngf=4, image_size=image_size).apply(init_weights)
    full = build_generator("upsample-fullres", nz=8, ngf=4, image_size=image_size).apply(init_weights)
    noise = torch.randn(4, 8, 1, 1)
    blocky = colour_convolution_input(plain, noise)
    assert blocky.shape[-1] == image_size
    torch.testing.assert_close(blocky, F.interpolate(blocky[..., ::2, ::2], scale_factor=2, mode="nearest"))
    detailed = colour_convolution_input(full, noise)
    assert detailed.shape == blocky.shape
    assert (detailed - F.interpolate(detailed[..., ::2, ::2], scale_factor=2, mode="nearest")).abs().amax() > 1e-3
    assert count(full, nn.Conv2d) == count(plain, nn.Conv2d) + 1
    assert count(full, nn.BatchNorm2d) == count(plain, nn.BatchNorm2d) + 1
    assert count(full, nn.Upsample) == count(plain, nn.Upsample) == num_stages(image_size)
    assert full(noise).shape == (4, 3, image_size, image_size)


def test_architectures_registry_builds_either_pair():
    assert list(ARCHITECTURES) == ["dcgan", "upsample", "upsample-fullres"]
    noise = torch.randn(2, 8, 1, 1)
    for arch, (generator_class, discriminator_class) in ARCHITECTURES.items():
        G = build_generator(arch, nz=8, ngf=4, image_size=32)
        D = build_discriminator(arch, ndf=4, image_size=32, spectral_norm=True)
        assert type(G) is getattr(generator_class, "func", generator_class) and type(D) is discriminator_class
        assert G.nz == 8
        assert count(D, nn.BatchNorm2d) == 0  # spectral_norm was passed through
        assert D(G(noise)).shape == (2,)  # the same noise and images fit both architectures
    assert type(build_discriminator("upsample", 4, 32)) is UpsampleDiscriminator
    assert count(build_discriminator("upsample", 4, 32), nn.BatchNorm2d) == 2
    with pytest.raises(ValueError, match="arch"):
        build_generator("stylegan", 8, 4, 32)
    with pytest.raises(ValueError, match="arch"):
        build_discriminator("stylegan", 4, 32, False)
