"""DCGAN networks (Radford et al., 2015) and their weight initialisation.

Pure modules: no I/O, no flags, no device logic. Depth follows the image size:
each factor of two above 4x4 adds one stage to both networks.
"""

import math

import torch
from torch import nn

IMAGE_SIZES = tuple(2**k for k in range(4, 9))  # 16 .. 256


def num_stages(image_size):
    """Up- or down-sampling stages between 4x4 and image_size."""
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {image_size}")
    return int(math.log2(image_size)) - 2


class Generator(nn.Module):
    """Noise (nz x 1 x 1) to an image (nc x S x S) in [-1, 1]."""

    def __init__(self, nz=100, ngf=64, image_size=64, nc=3):
        super().__init__()
        stages = num_stages(image_size)
        channels = ngf * 2 ** (stages - 1)
        # nz x 1 x 1 -> (ngf*8) x 4 x 4 at 64x64
        layers = [
            nn.ConvTranspose2d(nz, channels, 4, 1, 0, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(True),
        ]
        # each stage doubles the side and halves the channels: ... -> ngf x S/2 x S/2
        for _ in range(stages - 1):
            layers += [
                nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(channels // 2),
                nn.ReLU(True),
            ]
            channels //= 2
        # ngf x S/2 x S/2 -> nc x S x S
        layers += [nn.ConvTranspose2d(channels, nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        self.nz = nz

    def forward(self, noise):
        return self.main(noise)


class Discriminator(nn.Module):
    """An image (nc x S x S) to one logit per image.

    With spectral_norm the convolutions are spectrally normalised (Miyato et al., 2018)
    and BatchNorm is left out, as in SN-GAN's discriminator.
    """

    def __init__(self, ndf=64, image_size=64, nc=3, spectral_norm=False):
        super().__init__()
        stages = num_stages(image_size)
        wrap = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
        # nc x S x S -> ndf x S/2 x S/2, no BatchNorm on the input layer (paper, section 3)
        layers = [wrap(nn.Conv2d(nc, ndf, 4, 2, 1, bias=False)), nn.LeakyReLU(0.2, inplace=True)]
        channels = ndf
        # each stage halves the side and doubles the channels: ... -> (ndf*8) x 4 x 4 at 64x64
        for _ in range(stages - 1):
            layers.append(wrap(nn.Conv2d(channels, channels * 2, 4, 2, 1, bias=False)))
            if not spectral_norm:
                layers.append(nn.BatchNorm2d(channels * 2))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            channels *= 2
        # (ndf*8) x 4 x 4 -> 1 x 1 x 1: a logit; the loss applies the sigmoid
        layers.append(wrap(nn.Conv2d(channels, 1, 4, 1, 0, bias=False)))
        self.main = nn.Sequential(*layers)

    def forward(self, images):
        return self.main(images).flatten()


def init_weights(module):
    """DCGAN init: conv weights N(0, 0.02); BatchNorm gamma N(1, 0.02), beta 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        weight = getattr(module, "parametrizations", None)
        target = weight.weight.original if weight is not None else module.weight
        nn.init.normal_(target, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


@torch.no_grad()
def update_ema(ema_net, net, decay):
    """ema <- decay * ema + (1 - decay) * net for parameters; buffers are copied.

    Hand-written because torch.optim.swa_utils.AveragedModel reads a device counter
    on every update, a host sync in the hot loop.
    """
    ema_params = list(ema_net.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in net.parameters()], 1.0 - decay)
    for ema_buffer, buffer in zip(ema_net.buffers(), net.buffers()):
        ema_buffer.copy_(buffer)


def ema_decay_at(decay, step):
    """The decay to use at a step: ramps up from 0.1 so early averages forget the random init.

    Without the ramp a 0.999 average still holds 0.999**700 = 50% of the initial weights after
    700 steps, and its samples are grey noise in short runs (seen on the digits benchmark).
    Same schedule as TensorFlow's ExponentialMovingAverage with num_updates.
    """
    return min(decay, (1.0 + step) / (10.0 + step))
