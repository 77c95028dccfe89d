"""The pictures a run draws: sample grids, the progress GIF, the loss and FID plots and the
real-vs-fake figure. Each written atomically, except the progress GIF (see ProgressGif).

Work per epoch stays constant as a run grows: the GIF gets one frame appended, never
re-encoded, and the plots draw at most MAX_PLOT_POINTS points from rows kept in memory.
Drawing never loses training: a picture that fails to draw is a warning (a full disk is not), and
an epoch's pictures are drawn after its checkpoint is saved.
"""

import contextlib
import io
import math
import os
import struct
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from files import WriteError, atomic_write_bytes
from utils import to_float_images

MAX_PLOT_POINTS = 1000
GRID_PADDING = 2
LABEL_FONT_PIXELS = 11  # fits the 18-pixel rows of a 16-pixel grid
REAL_VS_FAKE_GRID_PIXELS = 540  # about the width of each grid in the DCGAN tutorial's figure
TITLE_FONT_PIXELS, FIGURE_MARGIN = 16, 12
FRAME_MS, LAST_FRAME_MS = 400, 2000
# What a training run (or --generate/--interpolate after it) leaves in --image-dir; a fresh run
# never mixes its pictures with these. real_samples.png alone, from a run stopped before its
# first epoch ended, is replaced instead.
RUN_PICTURES = (
    "epoch_[0-9][0-9][0-9]*.png", "progress.gif", "losses.png", "fid.png", "real_vs_fake.png",
    "interpolation.png", "interpolation.gif", "interpolation-[0-9]*.png", "interpolation-[0-9]*.gif",
    "generated", "generated-[0-9]*",
)  # fmt: skip


def is_empty_folder(path):
    return path.is_dir() and not any(path.iterdir())


@contextlib.contextmanager
def drawing(path):
    """A picture's drawing: any failure but a full disk becomes a warning, so that nothing that
    only draws a picture can lose a trained epoch (a full disk would fail the next checkpoint too)."""
    try:
        yield
    except WriteError as error:
        if error.disk_full:
            raise
        warnings.warn(f"could not draw {path} ({error}); training goes on", stacklevel=3)
    except Exception as error:
        warnings.warn(f"could not draw {path} ({error.__class__.__name__}: {error}); training goes on", stacklevel=3)


# ---------------------------------------------------------------- grids


def grid_image(images, nrow=8, scale=1):
    """Images in [-1, 1] as one PIL grid with 2-pixel padding; with scale, each pixel a square of
    scale x scale pixels."""
    grid = to_pil(tile(images.detach().float().cpu().clamp(-1, 1).add(1).div(2), nrow, GRID_PADDING))
    return grid if scale == 1 else grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)


def tile(images, nrow, padding=2):
    """(N, C, H, W) images as one (3, H', W') grid, nrow to a row, black padding around each: the
    layout of torchvision's make_grid, in a few tensor ops (importing torchvision takes seconds)."""
    if images.size(1) == 1:
        images = images.expand(-1, 3, -1, -1)
    count, channels, height, width = images.shape
    if count == 1:
        return images[0]
    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    blanks = images.new_zeros(rows * columns - count, channels, height, width)
    cells = F.pad(torch.cat([images, blanks]), (padding, 0, padding, 0))  # each cell: padding above and left
    grid = cells.view(rows, columns, channels, height + padding, width + padding).permute(2, 0, 3, 1, 4)
    grid = grid.reshape(channels, rows * (height + padding), columns * (width + padding))
    return F.pad(grid, (0, padding, 0, padding))  # and below and right of the last row and column


def labelled_grid_image(images, row_names, nrow=8, scale=1):
    """grid_image with each row's name written in a margin on its left (a class-row grid)."""
    from PIL import ImageDraw

    grid = grid_image(images, nrow, scale)
    # an enlarged grid's names are larger too, up to a title's size
    font = dejavu_font(min(LABEL_FONT_PIXELS * scale, TITLE_FONT_PIXELS))
    measure = ImageDraw.Draw(grid)
    boxes = [measure.textbbox((0, 0), name, font=font) for name in row_names]
    margin = max(box[2] for box in boxes) + 6
    canvas = Image.new("RGB", (grid.width + margin, grid.height))
    canvas.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    padding = GRID_PADDING * scale
    row_pixels = (grid.height - padding) / len(row_names)
    for row, (name, box) in enumerate(zip(row_names, boxes)):
        middle = padding + row * row_pixels + (row_pixels - padding) / 2
        # whole pixels: a fractional position blurs small text across two rows of pixels
        draw.text((3, round(middle - (box[1] + box[3]) / 2)), name, fill=(255, 255, 255), font=font)
    return canvas


def dejavu_font(pixels):
    """The font of the pictures' words (class names, titles): DejaVu Sans, which matplotlib ships,
    for its glyphs of Latin, Greek and Cyrillic (Pillow's default font draws "кошка" as five boxes);
    Pillow's default where it is missing. CJK and other scripts DejaVu lacks are boxes in both."""
    from PIL import ImageFont

    path = dejavu_sans_path()
    return ImageFont.load_default() if path is None else ImageFont.truetype(path, pixels)


def dejavu_sans_path():
    """DejaVuSans.ttf in matplotlib's own data (no font search, which scans the system's fonts
    at its first use), or where a distribution's matplotlib leaves it to the system; None if absent."""
    import matplotlib

    bundled = Path(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
    if bundled.is_file():
        return str(bundled)
    from matplotlib import font_manager

    try:
        return font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"), fallback_to_default=False)
    except ValueError:
        return None


def epoch_grid_image(images, row_names=None, scale=1):
    """An epoch's grid: 8 x 8 samples, or a labelled row per class."""
    return grid_image(images, scale=scale) if row_names is None else labelled_grid_image(images, row_names, scale=scale)


def save_grid(images, path, nrow=8):
    """Save images in [-1, 1] as one PNG grid."""
    save_pil(grid_image(images, nrow), path)


def to_pil(image):
    """One float (3, H, W) image in [0, 1] as a PIL image; (1, H, W) as a greyscale one."""
    pixels = to_uint8(image).permute(1, 2, 0)
    return Image.fromarray(pixels[:, :, 0].numpy(), "L") if pixels.shape[-1] == 1 else Image.fromarray(pixels.numpy())


def to_uint8(images):
    """Float images in [0, 1] as the bytes a PNG holds, rounded to the nearest level."""
    return images.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def save_png(image, path):
    """Save one float (3, H, W) or greyscale (1, H, W) image in [0, 1] as PNG, atomically."""
    save_pil(to_pil(image), path)


def save_pil(image, path):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def grid_side(count):
    return max(1, int(math.sqrt(count)))


def save_gif(frames, path, frame_seconds=0.4):
    """An animated GIF of PIL images, the last one held longer (for --interpolate)."""
    durations = [int(frame_seconds * 1000)] * (len(frames) - 1) + [LAST_FRAME_MS]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    atomic_write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------- a training run's pictures


class EpochPictures:
    """images/: real_samples.png once, then per epoch a grid; its GIF frame and the loss plot
    when draw_progress is called (at the epoch ends that save: save_schedule.py)."""

    def __init__(self, image_dir, rows, epochs_done):
        self.image_dir = Path(image_dir)
        self.rows = rows  # the metrics log, kept in memory so a plot never re-reads it
        # (step at the epoch's end, size, encoded GIF frame) of the epochs whose frames wait for draw_progress
        self.frames = []
        self.gif = ProgressGif(self.image_dir / "progress.gif")
        with drawing(self.gif.path):
            self.gif.open([self.grid_path(e) for e in range(1, epochs_done + 1) if self.grid_path(e).is_file()])

    def grid_path(self, epoch):
        return self.image_dir / f"epoch_{epoch:03d}.png"

    def write_real_samples(self, real_uint8, image_size, replace=False):
        """Once per run: a resumed run keeps it, a fresh one (replace) writes its own."""
        path = self.image_dir / "real_samples.png"
        if replace or not path.exists():
            with drawing(path):
                save_grid(to_float_images(real_uint8, image_size), path)

    def add_epoch(self, samples, epoch, row_names=None, step=0):
        """The epoch's grid (labelled rows of classes with row_names) as a PNG; its GIF frame waits
        for draw_progress. step: the run's step at the epoch's end, for forget_frames_after."""
        with drawing(self.grid_path(epoch)):
            grid = epoch_grid_image(samples, row_names)
            save_pil(grid, self.grid_path(epoch))
            # encoded now, a few times smaller than the picture, and the work spread over the epochs
            self.frames.append((step, grid.size, encode_frame(grid, FRAME_MS)))

    def draw_progress(self):
        """The waiting GIF frames, in the order of their epochs, and the loss plot of every row so far."""
        frames, self.frames = self.frames, []
        if frames:
            with drawing(self.gif.path):
                self.gif.append_encoded([block for _, _, block in frames], frames[0][1])
        with drawing(self.image_dir / "losses.png"):
            plot_losses(self.rows, self.image_dir / "losses.png")

    def forget_frames_after(self, step):
        """Drop the waiting frames of epochs that ended after step (a rollback trains them again)."""
        self.frames = [frame for frame in self.frames if frame[0] <= step]

    def write_real_vs_fake(self, real_uint8, fake, image_size, row_names=None):
        path = self.image_dir / "real_vs_fake.png"
        with drawing(path):
            plot_real_vs_fake(to_float_images(real_uint8, image_size), fake, path, row_names)


# ---------------------------------------------------------------- the progress GIF


class ProgressGif:
    """images/progress.gif, grown by one frame per epoch.

    PIL can only write a whole GIF, which would re-encode every earlier frame each epoch. Here
    each frame is encoded alone by PIL and its blocks are appended before the GIF's trailer, so
    an epoch's cost does not depend on how many came before. Appending is not atomic: a GIF
    torn by a crash (or of another length than the run's epochs) is rebuilt from the epoch
    PNGs once, at start-up.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.last_delay_at = None  # file offset of the last frame's delay, held longer than the others

    def open(self, frame_paths):
        """Check the GIF holds exactly these frames; rebuild it from them if not."""
        try:
            count, self.last_delay_at = gif_frames(self.path.read_bytes())
        except (OSError, ValueError):
            count = None
        if count != len(frame_paths):
            self.rebuild(frame_paths)

    def rebuild(self, frame_paths):
        self.last_delay_at = None
        if not frame_paths:
            self.path.unlink(missing_ok=True)
            return
        with Image.open(frame_paths[0]) as first:
            data = bytearray(gif_header(*first.size))
        for index, frame_path in enumerate(frame_paths):
            with Image.open(frame_path) as image:
                block = encode_frame(image, FRAME_MS if index < len(frame_paths) - 1 else LAST_FRAME_MS)
            self.last_delay_at = len(data) + 4
            data += block
        atomic_write_bytes(self.path, bytes(data) + b";")

    def append_encoded(self, blocks, size):
        """Add frames encoded by encode_frame at FRAME_MS, of size (width, height), in one write;
        the new last one is held longer, the previous last goes back to the usual delay."""
        last_delay_in_blocks = sum(map(len, blocks[:-1])) + 4  # a block starts with its delay's extension
        new = bytearray(b"".join(blocks))
        new[last_delay_in_blocks : last_delay_in_blocks + 2] = struct.pack("<H", LAST_FRAME_MS // 10)
        if self.last_delay_at is None or not self.path.is_file():  # the first frames, or the GIF was removed
            header = gif_header(*size)
            atomic_write_bytes(self.path, header + new + b";")
            self.last_delay_at = len(header) + last_delay_in_blocks
            return
        try:
            with open(self.path, "r+b") as file:
                file.seek(self.last_delay_at)
                file.write(struct.pack("<H", FRAME_MS // 10))
                end = file.seek(-1, os.SEEK_END)  # the trailer byte
                file.write(new + b";")
                file.flush()
                os.fsync(file.fileno())
        except OSError as error:
            raise WriteError(self.path, error) from None
        self.last_delay_at = end + last_delay_in_blocks


def gif_header(width, height):
    """GIF89a, a screen of the frames' size without a global palette, and loop forever."""
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    return b"GIF89a" + screen + b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"


def encode_frame(image, delay_ms):
    """One frame's blocks: a graphic control extension, then PIL's image with its palette made local.

    Its 256 colours are chosen by PIL's fast octree: PIL's default (median cut) took many times as
    long, more than the rest of an epoch's pictures at 64 px (BENCHMARKS.md).
    """
    buffer = io.BytesIO()
    image.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(buffer, format="GIF")
    data = buffer.getvalue()
    packed = data[10]
    palette_size = 3 * 2 ** ((packed & 7) + 1) if packed & 0x80 else 0
    palette = data[13 : 13 + palette_size]
    position = skip_extensions(data, 13 + palette_size)
    descriptor = bytearray(data[position : position + 10])
    if descriptor[9] & 0x80 or not palette_size:
        palette = b""  # the frame has its own palette already
    else:  # the global palette becomes this frame's local one
        descriptor[9] = (descriptor[9] & 0x40) | 0x80 | (packed & 7)
    image_data = data[position + 10 : data.rindex(b";")]
    control = b"\x21\xf9\x04\x04" + struct.pack("<H", delay_ms // 10) + b"\x00\x00"
    return control + bytes(descriptor) + palette + image_data


def skip_extensions(data, position):
    """The offset of the next image descriptor, skipping extension blocks."""
    while data[position] == 0x21:
        position = skip_sub_blocks(data, position + 2)
    if data[position] != 0x2C:
        raise ValueError("no image descriptor where one was expected")
    return position


def skip_sub_blocks(data, position):
    while data[position]:
        position += data[position] + 1
    return position + 1


def gif_frames(data):
    """(number of frames, offset of the last frame's delay) of a whole GIF; ValueError if torn."""
    if data[:6] not in (b"GIF87a", b"GIF89a") or not data.endswith(b";"):
        raise ValueError("not a whole GIF")
    packed = data[10]
    position = 13 + (3 * 2 ** ((packed & 7) + 1) if packed & 0x80 else 0)
    frames, last_delay_at = 0, None
    try:
        while data[position] != 0x3B:
            if data[position] == 0x21:
                if data[position + 1] == 0xF9:
                    last_delay_at = position + 4
                position = skip_sub_blocks(data, position + 2)
            elif data[position] == 0x2C:
                local = data[position + 9]
                position += 10 + (3 * 2 ** ((local & 7) + 1) if local & 0x80 else 0)
                position = skip_sub_blocks(data, position + 1)  # after the LZW code size
                frames += 1
            else:
                raise ValueError("unknown GIF block")
    except IndexError:
        raise ValueError("GIF ends inside a block") from None
    return frames, last_delay_at


# ---------------------------------------------------------------- plots


def binned(values, points=MAX_PLOT_POINTS):
    """At most `points` means of consecutive values: a plot's cost stays flat as a run grows."""
    if len(values) <= points:
        return list(values)
    size = math.ceil(len(values) / points)
    return [sum(values[i : i + size]) / len(values[i : i + size]) for i in range(0, len(values), size)]


def loss_columns(rows):
    """{step, loss_d, loss_g, d_real, d_fake: the values to plot}, from the rows with all five numbers."""
    keys = ("step", "loss_d", "loss_g", "d_real", "d_fake")
    rows = [r for r in rows if all(isinstance(r.get(k), (int, float)) for k in keys)]
    return {k: binned([r[k] for r in rows]) for k in keys}


def plot_losses(rows, path):
    """Loss_D and Loss_G, and D(x) and D(G(z)), against training step (rows with all four numbers)."""
    column = loss_columns(rows)
    margins = {"left": 0.1, "right": 0.98, "bottom": 0.08, "top": 0.96, "hspace": 0.08}
    figure, (loss_axes, score_axes) = new_figure((8, 6), 2, 1, margins, sharex=True)
    loss_axes.plot(column["step"], column["loss_d"], label="Loss_D")
    loss_axes.plot(column["step"], column["loss_g"], label="Loss_G")
    loss_axes.set_ylabel("loss")
    # powers of ten beyond these in an offset above the axis: the tick labels stay narrow enough for the fixed margins
    loss_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    loss_axes.legend()
    score_axes.plot(column["step"], column["d_real"], label="D(x)")
    score_axes.plot(column["step"], column["d_fake"], label="D(G(z))")
    score_axes.set_ylabel("D output")
    score_axes.set_xlabel("step")
    score_axes.set_ylim(0, 1)
    score_axes.legend()
    save_figure(figure, path)


NEIGHBOUR_METRICS = ("precision", "recall", "density", "coverage")


def plot_fid(rows, path):
    """FID against epoch, and beside it precision, recall, density and coverage (higher is better)."""
    rows = [r for r in rows if isinstance(r.get("fid"), (int, float)) and isinstance(r.get("epoch"), int)]
    margins = {"left": 0.07, "right": 0.99, "bottom": 0.12, "top": 0.95, "wspace": 0.2}
    figure, (fid_axes, neighbour_axes) = new_figure((11, 4), 1, 2, margins)
    fid_axes.plot([r["epoch"] for r in rows], [r["fid"] for r in rows], marker="o")
    fid_axes.set_xlabel("epoch")
    fid_axes.set_ylabel("FID (lower is better)")
    for name in NEIGHBOUR_METRICS:
        scored = [r for r in rows if isinstance(r.get(name), (int, float))]
        if scored:
            neighbour_axes.plot([r["epoch"] for r in scored], [r[name] for r in scored], marker="o", label=name)
    neighbour_axes.set_xlabel("epoch")
    neighbour_axes.set_ylabel("higher is better (density: 1 matches the data)")
    if neighbour_axes.lines:
        neighbour_axes.legend()
    save_figure(figure, path)


def plot_real_vs_fake(real_images, fake_images, path, row_names=None):
    """The DCGAN tutorial's last figure: real images beside generated ones (rows of classes with
    row_names), each grid under its title, enlarged by a whole number so that no pixel is blurred."""
    from PIL import ImageDraw

    side = max(real_images.shape[-2:])
    scale = max(1, round(REAL_VS_FAKE_GRID_PIXELS / (8 * (side + GRID_PADDING) + GRID_PADDING)))
    grids = [epoch_grid_image(images, row_names, scale) for images in (real_images, fake_images)]
    font = dejavu_font(TITLE_FONT_PIXELS)
    top = FIGURE_MARGIN + TITLE_FONT_PIXELS + FIGURE_MARGIN
    width = sum(grid.width for grid in grids) + 3 * FIGURE_MARGIN
    canvas = Image.new("RGB", (width, top + max(grid.height for grid in grids) + FIGURE_MARGIN), "white")
    draw = ImageDraw.Draw(canvas)
    left = FIGURE_MARGIN
    for grid, title in zip(grids, ("Real images", "Fake images")):
        canvas.paste(grid, (left, top))
        box = draw.textbbox((0, 0), title, font=font)
        draw.text((left + (grid.width - box[2] - box[0]) // 2, FIGURE_MARGIN - box[1]), title, fill="black", font=font)
        left += grid.width + FIGURE_MARGIN
    save_pil(canvas, path)


def new_figure(size_inches, rows, columns, margins, **options):
    """A figure and its axes. matplotlib is imported here, at the first plot, not at start-up
    (pyplot takes a good part of a second); a Figure of its own, unlike pyplot's, keeps no global
    state, so it can be drawn on any thread, and needs no display. margins: subplots_adjust's
    fractions, fixed, where tight_layout would draw the whole figure once more to find them."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=size_inches)
    figure.subplots_adjust(**margins)
    return figure, figure.subplots(rows, columns, **options)


def save_figure(figure, path):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())
