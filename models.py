"""DCGAN networks (Radford et al., 2015), an upsample-convolution variant, and their init.

Pure modules: no I/O, no flags, no device logic. Depth follows the image size: each factor of
two of the shorter side above 4 adds one stage to both networks. G starts from a seed map (4x4
for a square) whose sides keep the image's aspect (8 wide, 4 tall at 64x32), and D ends on it.
With num_classes, G takes the class through conditional BatchNorm and D through a projection;
without, they are plain DCGAN.
"""

import contextlib
import functools
import math

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.optim.swa_utils import update_bn

from imagesize import EXPECTED, SIDES, image_sides

IMAGE_SIZES = SIDES  # 16 .. 256: each side of an image_size (an int side, "WIDTHxHEIGHT" or (width, height))


def num_stages(image_size):
    """Up- or down-sampling stages between the seed and image_size: one per doubling of the shorter side above 4."""
    sides = image_sides(image_size)
    if not all(side in IMAGE_SIZES for side in sides):
        raise ValueError(f"image_size must be {EXPECTED}, got {image_size!r}")
    return int(math.log2(min(sides))) - 2


def seed_shape(image_size):
    """(height, width) of G's first map and D's last: 4 on the shorter side, the longer side's
    share of the aspect on the other (4 x 8 at 64x32), so that every stage doubles both sides."""
    width, height = image_sides(image_size)
    stages = num_stages(image_size)
    return height >> stages, width >> stages


CLASS_EMBEDDING_SIZE = 128  # BigGAN's shared class embedding
# G's last activation, which maps its colours into [-1, 1]. tanh (DCGAN's) reaches -1 and 1 only in
# the limit: where the real images are pure white or black, as the ground of flat art or of the
# digits is, G's pixels stop a few levels short, where tanh is flat and D's gradient barely moves
# them, each at its own level: a faint speckle. clip (hardtanh) is the identity inside [-1, 1] and
# reaches the bounds exactly, so a flat region can be drawn flat (BENCHMARKS.md, the clipped output).
OUTPUTS = {"tanh": nn.Tanh, "clip": nn.Hardtanh}


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose gain and bias depend on the class (SN-GAN, Miyato & Koyama 2018; BigGAN):
    the statistics are shared by all classes; the affine map is 1 + W_gain e_y and W_bias e_y,
    linear in the class's vector e_y of G's shared embedding, as BigGAN computes them.

    Linear maps of a dense embedding rather than a table of rows: every step moves all the
    embedding's dimensions at once, and on the digits benchmark a table of per-class rows, each
    moved by Adam's step alone, still drew every class alike after 448 steps (BENCHMARKS.md).
    """

    def __init__(self, num_features, embedding_size=CLASS_EMBEDDING_SIZE):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_features, affine=False)
        self.gain = nn.Linear(embedding_size, num_features, bias=False)
        self.bias = nn.Linear(embedding_size, num_features, bias=False)

    def forward(self, features, class_vectors):
        gain, bias = 1 + self.gain(class_vectors), self.bias(class_vectors)
        # indexing rather than view(len(features), ...): an exported graph keeps its batch size free
        return self.norm(features) * gain[:, :, None, None] + bias[:, :, None, None]


def batch_norm_of(num_classes):
    """G's BatchNorm layer: the plain one, or the conditional one with num_classes."""
    return ConditionalBatchNorm2d if num_classes else nn.BatchNorm2d


class ClassGenerator(nn.Module):
    """What both generators share: forward through self.main, with the class's vector of the
    shared embedding for the conditional BatchNorm layers when num_classes is set.

    labels: class indices (N,), or weights over the classes (N, num_classes) that mix their
    vectors (a walk from one class to another).
    """

    def add_class_embedding(self, num_classes):
        self.num_classes = num_classes
        # a plain attribute when unconditional: no parameters, the state_dict's keys as before
        self.embed = nn.Embedding(num_classes, CLASS_EMBEDDING_SIZE) if num_classes else None

    def forward(self, noise, labels=None):
        if not self.num_classes:
            return self.main(noise)
        if labels is None:
            raise ValueError("a class-conditional generator needs labels")
        vectors = (
            labels.to(self.embed.weight.dtype) @ self.embed.weight if labels.is_floating_point() else self.embed(labels)
        )
        features = noise
        for layer in self.main:
            features = layer(features, vectors) if isinstance(layer, ConditionalBatchNorm2d) else layer(features)
        return features


class Generator(ClassGenerator):
    """Noise (nz x 1 x 1) to an image (nc x H x W) in [-1, 1]."""

    def __init__(self, nz=100, ngf=64, image_size=64, nc=3, num_classes=0, output="tanh"):
        super().__init__()
        norm = batch_norm_of(num_classes)
        stages = num_stages(image_size)
        channels = ngf * 2 ** (stages - 1)
        # nz x 1 x 1 -> (ngf*8) x 4 x 4 at 64x64; a kernel of the seed's shape: (ngf*4) x 4 x 8 at 64x32
        layers = [
            nn.ConvTranspose2d(nz, channels, seed_shape(image_size), 1, 0, bias=False),
            norm(channels),
            nn.ReLU(True),
        ]
        # each stage doubles both sides and halves the channels: ... -> ngf x H/2 x W/2
        for _ in range(stages - 1):
            layers += [
                nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False),
                norm(channels // 2),
                nn.ReLU(True),
            ]
            channels //= 2
        # ngf x H/2 x W/2 -> nc x H x W
        layers += [nn.ConvTranspose2d(channels, nc, 4, 2, 1, bias=False), OUTPUTS[output]()]
        self.main = nn.Sequential(*layers)
        self.nz = nz
        self.add_class_embedding(num_classes)


class ProjectionDiscriminator(nn.Module):
    """What both discriminators share: self.main ends in `head_layers` layers that make the logit
    from the last features. With num_classes, the projection discriminator (Miyato & Koyama,
    2018): the logit gains <embed(y), features summed over the seed's map (4x4 for a square)>."""

    head_layers = 1

    def add_projection(self, channels, num_classes, wrap):
        # a plain attribute when unconditional: no parameters, the state_dict's keys as before
        self.embed = wrap(nn.Embedding(num_classes, channels)) if num_classes else None

    def forward(self, images, labels=None, class_scores=False):
        """The logits; with class_scores, also each image's score for every class: its pooled last
        features dotted with each class's embedding (N, num_classes), the projection's own terms."""
        if self.embed is None:
            return self.main(images).flatten()
        if labels is None:
            raise ValueError("a class-conditional discriminator needs labels")
        features = self.main[: -self.head_layers](images)
        logits = self.main[-self.head_layers :](features).flatten()
        pooled = features.sum(dim=(2, 3))
        logits = logits + projection(self.embed, labels, pooled)
        return (logits, pooled @ self.embed.weight.t()) if class_scores else logits


def projection(embed, labels, pooled):
    """<embed(y), pooled> per image; labels as indices (N,) or class weights (N, num_classes)."""
    rows = labels.to(embed.weight.dtype) @ embed.weight if labels.is_floating_point() else embed(labels)
    return (rows * pooled).sum(dim=1)


class Discriminator(ProjectionDiscriminator):
    """An image (nc x H x W) to one logit per image.

    With spectral_norm the convolutions are spectrally normalised (Miyato et al., 2018)
    and BatchNorm is left out, as in SN-GAN's discriminator.
    """

    def __init__(self, ndf=64, image_size=64, nc=3, spectral_norm=False, num_classes=0):
        super().__init__()
        wrap = full_precision_spectral_norm if spectral_norm else (lambda m: m)
        layers, channels = strided_convolutions(nc, ndf, image_size, wrap, batch_norm=not spectral_norm)
        # (ndf*8) x 4 x 4 -> 1 x 1 x 1: a logit; the loss applies the sigmoid. The kernel is the seed's
        # shape, as G's first: (ndf*4) x 4 x 8 -> 1 x 1 x 1 at 64x32
        layers.append(wrap(nn.Conv2d(channels, 1, seed_shape(image_size), 1, 0, bias=False)))
        self.main = nn.Sequential(*layers)
        self.add_projection(channels, num_classes, wrap)


class UpsampleGenerator(ClassGenerator):
    """Noise (nz x 1 x 1) to an image (nc x H x W) in [-1, 1], without transposed convolutions.

    Each doubling is a nearest-neighbour upsample then a 3x3 convolution: every output pixel
    gets the same number of kernel taps, so there is none of the uneven overlap that gives
    transposed convolutions their checkerboard artifacts (Odena et al., 2016, "Deconvolution
    and Checkerboard Artifacts", Distill, https://distill.pub/2016/deconv-checkerboard/).
    Widths follow the DCGAN Generator, so the two are compared at the same ngf.
    """

    def __init__(self, nz=100, ngf=64, image_size=64, nc=3, full_size_block=False, num_classes=0, output="tanh"):
        super().__init__()
        norm = batch_norm_of(num_classes)
        stages = num_stages(image_size)
        channels = ngf * 2 ** (stages - 1)
        seed_height, seed_width = seed_shape(image_size)
        # nz x 1 x 1 -> (ngf*8) x 4 x 4 at 64x64, (ngf*4) x 4 x 8 at 64x32; no bias as BatchNorm's beta takes its place
        layers = [
            nn.Flatten(),
            nn.Linear(nz, channels * seed_height * seed_width, bias=False),
            nn.Unflatten(1, (channels, seed_height, seed_width)),
            norm(channels),
            nn.ReLU(True),
        ]
        # each block doubles both sides and halves the channels: ... -> ngf x H/2 x W/2
        for _ in range(stages - 1):
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(channels, channels // 2, 3, 1, 1, bias=False),
                norm(channels // 2),
                nn.ReLU(True),
            ]
            channels //= 2
        # ngf x H/2 x W/2 -> nc x H x W: the last doubling goes straight to colours, as DCGAN's
        # does. A nearest-neighbour doubling has no power at the highest frequencies of the full
        # size (its response is zero at half the sampling rate), and a convolution only filters
        # what it is given, so that G cannot draw the finest detail. full_size_block adds a
        # BatchNorm-ReLU convolution at full size first: the ReLU makes those frequencies (its
        # cost per step: BENCHMARKS.md).
        layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        if full_size_block:
            layers += [nn.Conv2d(channels, channels, 3, 1, 1, bias=False), norm(channels), nn.ReLU(True)]
        layers += [nn.Conv2d(channels, nc, 3, 1, 1, bias=False), OUTPUTS[output]()]
        self.main = nn.Sequential(*layers)
        self.nz = nz
        self.add_class_embedding(num_classes)


class UpsampleDiscriminator(ProjectionDiscriminator):
    """An image (nc x H x W) to one logit per image: strided convolutions, then a linear layer.

    Kernels are 4x4 at stride 2, a size the stride divides, so the gradient D sends back to G
    has no checkerboard pattern either (Odena et al., 2016). A linear layer over the seed's map is
    a convolution of its shape, so this is the DCGAN Discriminator plus one bias: the arch differs in G.
    With spectral_norm the convolutions and the linear layer are spectrally normalised and
    BatchNorm is left out.
    """

    head_layers = 2  # Flatten, Linear

    def __init__(self, ndf=64, image_size=64, nc=3, spectral_norm=False, num_classes=0):
        super().__init__()
        wrap = full_precision_spectral_norm if spectral_norm else (lambda m: m)
        layers, channels = strided_convolutions(nc, ndf, image_size, wrap, batch_norm=not spectral_norm)
        # (ndf*8) x 4 x 4 -> (ndf*8*16) -> 1: a logit; the loss applies the sigmoid (at 64x32:
        # (ndf*4) x 4 x 8 -> (ndf*4*32) -> 1)
        seed_height, seed_width = seed_shape(image_size)
        layers += [nn.Flatten(), wrap(nn.Linear(channels * seed_height * seed_width, 1))]
        self.main = nn.Sequential(*layers)
        self.add_projection(channels, num_classes, wrap)


# A flag picks the pair by name; both generators take noise shaped (N, nz, 1, 1).
ARCHITECTURES = {
    "dcgan": (Generator, Discriminator),
    "upsample": (UpsampleGenerator, UpsampleDiscriminator),
    "upsample-fullres": (functools.partial(UpsampleGenerator, full_size_block=True), UpsampleDiscriminator),
}


def _architecture(arch):
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {tuple(ARCHITECTURES)}, got {arch!r}")
    return ARCHITECTURES[arch]


def build_generator(arch, nz, ngf, image_size, nc=3, num_classes=0, output="tanh"):
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {tuple(OUTPUTS)}, got {output!r}")
    return _architecture(arch)[0](nz, ngf, image_size, nc=nc, num_classes=num_classes, output=output)


def build_discriminator(arch, ndf, image_size, spectral_norm=False, nc=3, num_classes=0):
    return _architecture(arch)[1](ndf, image_size, nc=nc, spectral_norm=spectral_norm, num_classes=num_classes)


class FullPrecisionSpectralNorm(_SpectralNorm):
    """torch's spectral norm, its power iteration and sigma computed in fp32 under autocast too.

    CUDA's autocast runs torch.mv in bf16 or fp16 (the CPU's keeps it in fp32): sigma would get
    about 3 significant digits, and D's weights a scale that jitters from step to step.
    """

    def forward(self, weight):
        device_type = weight.device.type
        full = torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) else None
        with full or contextlib.nullcontext():
            return super().forward(weight.float())


def full_precision_spectral_norm(module):
    """nn.utils.parametrizations.spectral_norm(module) (same state_dict keys), in fp32 under autocast."""
    parametrize.register_parametrization(module, "weight", FullPrecisionSpectralNorm(module.weight))
    return module


def strided_convolutions(nc, ndf, image_size, wrap, batch_norm):
    """Both discriminators' body: 4x4 stride-2 convolutions from H x W down to the seed's map (4 x 4 for a square).

    Returns the layers and the channels they end with (ndf * 2**(stages-1)).
    """
    # nc x H x W -> ndf x H/2 x W/2, no BatchNorm on the input layer (DCGAN paper, section 3)
    layers = [wrap(nn.Conv2d(nc, ndf, 4, 2, 1, bias=False)), nn.LeakyReLU(0.2, inplace=True)]
    channels = ndf
    # each stage halves both sides and doubles the channels: ... -> (ndf*8) x 4 x 4 at 64x64, (ndf*4) x 4 x 8 at 64x32
    for _ in range(num_stages(image_size) - 1):
        layers.append(wrap(nn.Conv2d(channels, channels * 2, 4, 2, 1, bias=False)))
        if batch_norm:
            layers.append(nn.BatchNorm2d(channels * 2))
        layers.append(nn.LeakyReLU(0.2, inplace=True))
        channels *= 2
    return layers, channels


def init_weights(module):
    """DCGAN init: conv and linear weights N(0, 0.02), linear bias 0; BatchNorm gamma N(1, 0.02), beta 0.

    Conditional BatchNorm's gain and bias maps are linear layers (so N(0, 0.02)); G's class
    embedding starts N(0, 1), the projection's class embedding as a linear layer's weights.
    """
    if isinstance(module, ClassGenerator) and module.embed is not None:
        nn.init.normal_(module.embed.weight)  # BigGAN's shared embedding: unit vectors' scale
    elif isinstance(module, ProjectionDiscriminator) and module.embed is not None:
        weight = getattr(module.embed, "parametrizations", None)
        nn.init.normal_(weight.weight.original if weight is not None else module.embed.weight, 0.0, 0.02)
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        # under spectral norm, .weight is computed from .original: initialise the raw weight
        weight = getattr(module, "parametrizations", None)
        target = weight.weight.original if weight is not None else module.weight
        nn.init.normal_(target, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d) and module.affine:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


@torch.no_grad()
def update_ema(ema_net, net, decay):
    """ema <- decay * ema + (1 - decay) * net for parameters; buffers are copied. decay: a number,
    or a 0-dim tensor on the nets' device.

    The copied BatchNorm statistics are the trained G's, not the average's: before the average
    draws samples, estimate_batch_norm gives it its own.

    Hand-written because torch.optim.swa_utils.AveragedModel reads a device counter
    on every update, a host sync in the hot loop.
    """
    ema_params = list(ema_net.parameters())
    params = [p.detach() for p in net.parameters()]
    if isinstance(decay, torch.Tensor):  # --compile max's, in its CUDA graphs' memory (compiling.py)
        torch._foreach_mul_(ema_params, decay)
        torch._foreach_add_(ema_params, torch._foreach_mul(params, 1 - decay))
    else:
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    ema_buffers = list(ema_net.buffers())
    if ema_buffers:  # _foreach_copy_ refuses empty lists; a net may have no buffers
        torch._foreach_copy_(ema_buffers, list(net.buffers()))


# As few as give the statistics of many more, as it runs at every epoch end (measured: BENCHMARKS.md)
EMA_STATISTICS_SAMPLES = 512


@torch.no_grad()
def estimate_batch_norm(G, nz, device, samples=EMA_STATISTICS_SAMPLES, batch_size=256, seed=0, num_classes=0):
    """Replace G's BatchNorm running statistics with those of its own outputs on seeded noise.

    An EMA generator's weights are an average, so the statistics it copied from the trained G
    do not fit it; drawn in eval mode with them, its samples scored 1.3-8x the Frechet distance
    of the same weights with their own statistics (BENCHMARKS.md; BigGAN's "standing statistics",
    Brock et al., 2018). Seeded, so the same weights always get the same statistics. A
    class-conditional G draws the classes in turn, so every class weighs the same.
    """
    noise = torch.Generator().manual_seed(seed)
    batches = [torch.randn(batch_size, nz, 1, 1, generator=noise) for _ in range(math.ceil(samples / batch_size))]
    update_bn(batches, BalancedClasses(G, num_classes) if num_classes else G, device=device)


class BalancedClasses(nn.Module):
    """G called on noise alone, its classes taken in turn (0, 1, ..., K-1, 0, ...) across calls:
    what torch's update_bn, which passes one tensor, needs to run a conditional G."""

    def __init__(self, G, num_classes):
        super().__init__()
        self.G, self.num_classes, self.drawn = G, num_classes, 0

    def forward(self, noise):
        labels = (self.drawn + torch.arange(len(noise), device=noise.device)) % self.num_classes
        self.drawn += len(noise)
        return self.G(noise, labels)


def count_values(arch, nz, ngf, ndf, image_size):
    """(parameters of G and D, values their layers output for one image), counted on the meta
    device so that nothing is allocated; None where a layer is too large to count (over 2**63)."""
    try:
        with torch.device("meta"):
            G = build_generator(arch, nz, ngf, image_size)
            D = build_discriminator(arch, ndf, image_size)  # spectral norm adds two vectors per layer
    except (RuntimeError, TypeError, OverflowError):  # overflowed, or a size past a C long
        return None
    parameters = sum(p.numel() for net in (G, D) for p in net.parameters())
    g_outputs, image_shape = layer_outputs(G.main, (nz, 1, 1))
    d_outputs, _ = layer_outputs(D.main, image_shape)
    return parameters, g_outputs + d_outputs


def layer_outputs(layers, shape):
    """The number of values the layers output for one input of shape (C, H, W), and the last shape;
    in-place activations and reshapes are not counted, as they take no memory of their own."""
    total = 0
    for layer in layers:
        new_values = not getattr(layer, "inplace", False) and not isinstance(layer, (nn.Flatten, nn.Unflatten))
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            transposed = isinstance(layer, nn.ConvTranspose2d)
            sides = zip(shape[1:], layer.kernel_size, layer.stride, layer.padding)  # height, then width
            shape = (layer.out_channels, *(convolved(*side, transposed) for side in sides))
        elif isinstance(layer, nn.Upsample):
            shape = (shape[0], *(int(side * layer.scale_factor) for side in shape[1:]))
        elif isinstance(layer, nn.Linear):
            shape = (layer.out_features,)
        elif isinstance(layer, nn.Unflatten):
            shape = tuple(layer.unflattened_size)
        elif isinstance(layer, nn.Flatten):
            shape = (math.prod(shape),)
        total += math.prod(shape) if new_values else 0
    return total, shape


def convolved(side, kernel, stride, padding, transposed):
    """One side of a (transposed) convolution's output."""
    if transposed:
        return (side - 1) * stride - 2 * padding + kernel
    return (side + 2 * padding - kernel) // stride + 1
