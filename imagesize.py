"""Image sizes, square or not: --image-size 64 (kept as the int 64) or --image-size 64x32 (64 wide,
32 tall, kept as the text "64x32"), each side a power of two from 16 to 256. Flags, checkpoints and
config.json keep a size as the flag reads it, so the files of square runs are what they always were;
the code asks image_sides(size) for (width, height). Imports no torch, as options.py.
"""

import re

SIDES = tuple(2**k for k in range(4, 9))  # 16 .. 256: the sides the networks take
EXPECTED = "a power of two from 16 to 256, or WIDTHxHEIGHT with each side one (64x32)"
SIZE_TEXT = re.compile(r"(\d+)(?:[xX](\d+))?")


def parse_image_size(text):
    """--image-size's value: the side (an int) for a square (64, or 64x64), else "WIDTHxHEIGHT";
    ValueError for anything else."""
    width, height = image_sides(text)
    if width not in SIDES or height not in SIDES:
        raise ValueError(f"image_size must be {EXPECTED}, got {text}")
    return image_size_of(width, height)


def image_sides(image_size):
    """(width, height) of a size as flags keep it (64 or "64x32"), or of a (width, height) pair;
    ValueError for anything else (a size read from a damaged file). Any positive sides: the
    networks take SIDES alone (models.num_stages), a folder's decoding any."""
    width = height = None
    if isinstance(image_size, str):
        match = SIZE_TEXT.fullmatch(image_size.strip())
        if match is not None:
            width, height = int(match[1]), int(match[2] or match[1])
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2:
        width, height = image_size
    elif isinstance(image_size, int):
        width = height = image_size
    if not all(type(side) is int and side > 0 for side in (width, height)):  # True is no side
        raise ValueError(f"image_size must be {EXPECTED}, got {image_size!r}")
    return width, height


def image_size_of(width, height):
    """The size as flags keep it: the side of a square, else "WIDTHxHEIGHT"."""
    return width if width == height else f"{width}x{height}"


def is_image_size(value):
    """Whether a value read from a file is a size as flags keep it: 64 or "64x32", not 64.0, "64" or "64x64"."""
    try:
        return type(value) in (int, str) and parse_image_size(str(value)) == value
    except ValueError:
        return False


def shape_size(shape):
    """The size, as flags keep it, of images of shape (..., height, width)."""
    return image_size_of(shape[-1], shape[-2])
