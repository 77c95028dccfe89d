"""A trained generator outside training: rebuilt from any file the program writes (checkpoint.pt,
netG.pth or netG_ema.pth with the flags.json beside it, an exported model.safetensors with its
config.json), ready to draw, and the Python API other programs use:

    import gan
    G = gan.load_generator("checkpoints/checkpoint.pt")
    images = G.sample(16, seed=0)     # uint8 (16, C, H, W): what --generate 16 --seed 0 writes
"""

import math

import torch
from torch import nn

import models
from artifacts import to_uint8
from checkpoint import exported_file, load_generator_file, load_module_state
from classnames import checkpoint_class_names, index_of
from errors import UserError
from imagesize import image_sides
from options import MAX_SEED
from runtime import Runtime, choose_device, choose_precision, random_seed
from sampling import generated_batches, generator_of
from startup import built_from_flags, upgraded


def load_generator(path, device=None):
    """The generator in path, as a TrainedGenerator on device (the device --device auto picks when
    None), drawing in the precision --precision auto picks there, as --generate does."""
    device = choose_device("auto" if device is None else str(device))
    runtime = Runtime(device, choose_precision("auto", device))
    path = exported_file(path)
    state = upgraded(load_generator_file(path), path)
    return TrainedGenerator(generator_from(state, path, runtime), runtime, state["flags"])


def generator_from(state, path, runtime, use_ema=None):
    """The network of a loaded file (its EMA copy when it has one, unless use_ema is False), in eval
    mode on runtime's device, with BatchNorm statistics of its own weights."""
    flags = state["flags"]
    class_names = checkpoint_class_names(state, path)
    use_ema = state.get("netG_ema") is not None if use_ema is None else use_ema
    if use_ema and state.get("netG_ema") is None:
        raise UserError(f"{path} holds no moving average of the generator (it trained with --ema 0)")
    weights = state["netG_ema"] if use_ema else state["netG"]
    # sizes the weights do not have (nz 2,000,000) are refused before they take memory
    load_module_state(
        built_from_flags(path, generator_of, flags, len(class_names), meta=True), weights, "generator", path
    )
    G = built_from_flags(path, generator_of, flags, len(class_names))
    load_module_state(G, weights, "generator", path)
    G.to(runtime.device, memory_format=runtime.memory_format)
    if use_ema and not state.get("netG_ema_own_statistics"):
        # saved mid-epoch or on a Ctrl-C, or by an older version: the trained G's statistics
        with runtime.autocast():  # as training estimates them at an epoch's end
            models.estimate_batch_norm(G, flags["nz"], runtime.device, num_classes=len(class_names))
    G.class_names = class_names
    G.uses_ema = use_ema
    return G.eval()


class TrainedGenerator(nn.Module):
    """A trained G for other programs: forward(noise[, labels]) gives images in [-1, 1] in fp32,
    and sample() gives the uint8 images --generate writes for the same count, seed and class."""

    def __init__(self, G, runtime, flags):
        super().__init__()
        self.G = G
        self.runtime = runtime
        self.flags = dict(flags)
        self.nz, self.image_size, self.channels = flags["nz"], flags["image_size"], flags["nc"]
        self.width, self.height = image_sides(self.image_size)
        self.class_names = G.class_names

    def forward(self, noise, labels=None):
        """noise (N, nz) or (N, nz, 1, 1); labels (N,) class indices for a class-conditional G."""
        noise = noise.reshape(noise.shape[0], self.nz, 1, 1)
        return self.G(noise) if labels is None else self.G(noise, labels)

    @torch.no_grad()
    def sample(self, n, seed=None, label=None, truncation=None):
        """n images as uint8 (n, C, H, W) on the CPU: --generate n --seed seed [--class label]
        [--truncation T] writes these pixels. label: a class name or index (a conditional G needs one)."""
        refuse_sampling_arguments(n, seed, truncation)
        labels = None
        if self.class_names:
            if label is None:
                raise ValueError(f"name a class to draw: {', '.join(self.class_names)}")
            labels = torch.full((n,), self.class_index(label))
        elif label is not None:
            raise ValueError("this generator was trained without classes")
        seed = random_seed() if seed is None else seed
        batches = generated_batches(self.G, n, self.nz, self.runtime, seed, labels=labels, truncation=truncation)
        return uint8_pixels(torch.cat([images.cpu() for images in batches]))

    def class_index(self, label):
        if type(label) is int and 0 <= label < len(self.class_names):  # not True, an int to Python
            return label
        named = index_of(self.class_names, label)
        if named is not None:
            return named
        raise ValueError(f"no class {label!r}; the classes are {', '.join(self.class_names)}")


def refuse_sampling_arguments(n, seed, truncation):
    """The checks the command line makes of --generate, --seed and --truncation, as ValueErrors."""
    if type(n) is not int or n < 1:
        raise ValueError(f"n must be a whole number of images, 1 or more, got {n!r}")
    if seed is not None and not (type(seed) is int and 0 <= seed <= MAX_SEED):
        raise ValueError(f"seed must be a whole number from 0 to 2**63-1, got {seed!r}")
    if truncation is not None and not (isinstance(truncation, (int, float)) and 0 < truncation < math.inf):
        raise ValueError(f"truncation must be a positive number, got {truncation!r}")


def uint8_pixels(images):
    """Images in [-1, 1] as the PNGs of --generate hold them: uint8 (N, C, H, W)."""
    return to_uint8(images.float().add(1).div(2).clamp(0, 1))
