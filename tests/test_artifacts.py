"""The pictures of a run: the progress GIF grows by appending (constant work per epoch), a torn
GIF is rebuilt, plots draw a bounded number of points and skip damaged log rows."""

import numpy as np
import pytest
import torch
from conftest import read_metrics_log
from PIL import Image

import artifacts
import metricslog


def frame(value, size=(20, 12)):
    """A solid grey frame whose value tells frames apart."""
    return Image.new("RGB", size, (value, value, value))


def gif_contents(path):
    """(grey value of each frame, duration of each frame in ms), read back with PIL."""
    values, durations = [], []
    with Image.open(path) as gif:
        for index in range(gif.n_frames):
            gif.seek(index)
            values.append(int(np.asarray(gif.convert("RGB"))[0, 0, 0]))
            durations.append(gif.info["duration"])
    return values, durations


def append(gif, image):
    """One PIL frame at the end of gif, encoded as an epoch end encodes its frame."""
    gif.append_encoded([artifacts.encode_frame(image, artifacts.FRAME_MS)], image.size)


def test_appended_frames_make_a_gif_pil_reads(tmp_path):
    gif = artifacts.ProgressGif(tmp_path / "progress.gif")
    gif.open([])
    for value in (10, 120, 250):
        append(gif, frame(value))
    values, durations = gif_contents(tmp_path / "progress.gif")
    assert values == [10, 120, 250]
    assert durations == [artifacts.FRAME_MS, artifacts.FRAME_MS, artifacts.LAST_FRAME_MS]


def test_a_walk_gif_holds_each_frame_frame_seconds_and_the_last_longer(tmp_path):
    artifacts.save_gif([frame(10), frame(120), frame(250)], tmp_path / "walk.gif", frame_seconds=0.1)
    assert gif_contents(tmp_path / "walk.gif") == ([10, 120, 250], [100, 100, artifacts.LAST_FRAME_MS])


def test_a_png_holds_each_value_rounded_to_the_nearest_level(tmp_path):
    """0.5 is 127.5 levels: 128 in the file; 0.3 is 76.5: 77 (cut off, they would be 127 and 76)."""
    values = torch.tensor([0.0, 0.3, 0.5, 1.0]).view(1, 1, 4)
    artifacts.save_png(values, tmp_path / "levels.png")
    with Image.open(tmp_path / "levels.png") as image:
        assert np.asarray(image.convert("L"))[0].tolist() == [0, 77, 128, 255]


def test_appending_a_frame_never_reencodes_earlier_ones(tmp_path, monkeypatch):
    """The work of an epoch's frame is one encode, whether it is the 2nd frame or the 60th."""
    gif = artifacts.ProgressGif(tmp_path / "progress.gif")
    gif.open([])
    encodes = []
    real_encode = artifacts.encode_frame
    monkeypatch.setattr(artifacts, "encode_frame", lambda *a: encodes.append(1) or real_encode(*a))
    monkeypatch.setattr(artifacts.Image, "open", lambda *a, **k: pytest.fail("an earlier frame was decoded"))
    per_append = []
    for value in range(60):
        before = len(encodes)
        append(gif, frame(value * 4))
        per_append.append(len(encodes) - before)
    assert per_append == [1] * 60
    monkeypatch.undo()
    values, _ = gif_contents(tmp_path / "progress.gif")
    assert values == [value * 4 for value in range(60)]


def save_frames(folder, count):
    paths = []
    for index in range(count):
        paths.append(folder / f"epoch_{index + 1:03d}.png")
        frame(20 * index + 5).save(paths[-1])
    return paths


@pytest.mark.parametrize("damage", ["torn", "missing", "too few frames", "not a gif"])
def test_a_damaged_gif_is_rebuilt_from_the_epoch_grids_at_start(tmp_path, damage):
    paths = save_frames(tmp_path, 3)
    gif_path = tmp_path / "progress.gif"
    gif = artifacts.ProgressGif(gif_path)
    gif.open(paths[:3])
    intact = gif_path.read_bytes()
    if damage == "torn":  # a crash in the middle of an append
        gif_path.write_bytes(intact[: len(intact) - 40])
    elif damage == "missing":
        gif_path.unlink()
    elif damage == "too few frames":
        artifacts.ProgressGif(gif_path).open(paths[:2])
    else:
        gif_path.write_text("not a gif")
    reopened = artifacts.ProgressGif(gif_path)
    reopened.open(paths)
    assert gif_path.read_bytes() == intact
    append(reopened, frame(200))
    assert gif_contents(gif_path) == ([5, 25, 45, 200], [400, 400, 400, 2000])


def test_an_intact_gif_is_kept_as_it_is(tmp_path, monkeypatch):
    paths = save_frames(tmp_path, 2)
    artifacts.ProgressGif(tmp_path / "progress.gif").open(paths)
    monkeypatch.setattr(artifacts, "encode_frame", lambda *a: pytest.fail("re-encoded an intact GIF"))
    artifacts.ProgressGif(tmp_path / "progress.gif").open(paths)


@pytest.mark.real_loss_plot
def test_loss_plot_draws_a_bounded_number_of_points(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn = []
    real_plot = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, x, y, **k: drawn.append(len(x)) or real_plot(self, x, y, **k))
    rows = [{"step": s, "loss_d": 1.0, "loss_g": 2.0, "d_real": 0.5, "d_fake": 0.5} for s in range(25_000)]
    artifacts.plot_losses(rows, tmp_path / "losses.png")
    assert drawn and max(drawn) <= artifacts.MAX_PLOT_POINTS
    assert artifacts.binned([1, 2, 3, 4, 5, 6], points=3) == [1.5, 3.5, 5.5]


@pytest.mark.real_loss_plot
def test_each_line_of_the_loss_plot_draws_its_own_column_under_its_own_name(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(artifacts, "save_figure", lambda figure, path: figures.append(figure))
    rows = [{"step": s, "loss_d": 1.0 + s, "loss_g": 2.0 + s, "d_real": 0.1 * s, "d_fake": 0.05 * s} for s in (2, 4)]
    artifacts.plot_losses(rows, tmp_path / "losses.png")
    drawn = {line.get_label(): line.get_ydata().tolist() for axes in figures[0].axes for line in axes.get_lines()}
    assert drawn == {"Loss_D": [3.0, 5.0], "Loss_G": [4.0, 6.0], "D(x)": [0.2, 0.4], "D(G(z))": [0.1, 0.2]}
    assert all(line.get_xdata().tolist() == [2, 4] for axes in figures[0].axes for line in axes.get_lines())


@pytest.mark.real_loss_plot
def test_damaged_log_rows_are_skipped_with_one_warning(tmp_path):
    log = tmp_path / metricslog.METRICS_LOG_NAME
    good = '{"epoch": 1, "step": 2, "loss_d": 1.0, "loss_g": 2.0, "d_real": 0.5, "d_fake": 0.4}\n'
    log.write_bytes(
        good.encode()
        + b'{"epoch": 1, "step": 4, "loss_d": 1.0}\n'  # no loss_g: kept, but not plotted
        + b'"a string"\n[1, 2]\n{"step": "4"}\n\xff\xfe not utf-8\n'
        + good.replace('"step": 2', '"step": 6').encode()
    )
    with pytest.warns(UserWarning, match="skipped 4 damaged lines"):
        rows = read_metrics_log(log)
    assert [row["step"] for row in rows] == [2, 4, 6]
    artifacts.plot_losses(rows, tmp_path / "losses.png")  # does not fail on the incomplete row
    assert (tmp_path / "losses.png").stat().st_size > 0


@pytest.mark.real_loss_plot
@pytest.mark.parametrize("low, high", [(0, 1.5), (-150, 300), (-9999.5, 25000.25), (-0.00012, 0.00031), (1e6, 1e6 + 3)])
def test_every_word_of_the_loss_plot_lies_inside_the_picture(low, high, tmp_path, monkeypatch):
    """The plot's margins are fixed (no layout pass): the tick labels, their power of ten and the
    axis labels fit inside them whatever the size of the losses."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    drawn = {}
    monkeypatch.setattr(artifacts, "save_figure", lambda figure, path: drawn.update(figure=figure))
    rows = [
        {"step": s, "loss_d": low + (high - low) * (s % 7) / 7, "loss_g": high, "d_real": 0.5, "d_fake": 0.4}
        for s in range(300)
    ]
    artifacts.plot_losses(rows, tmp_path / "losses.png")
    figure = drawn["figure"]
    words = figure.get_tightbbox(FigureCanvasAgg(figure).get_renderer())  # in inches
    width, height = figure.get_size_inches()
    assert words.x0 >= 0 and words.y0 >= 0 and words.x1 <= width and words.y1 <= height, words
    assert [axes.get_ylabel() for axes in figure.axes] == ["loss", "D output"]


def test_real_vs_fake_shows_each_grid_whole_under_its_title(tmp_path):
    """Each grid enlarged by a whole number (8-pixel images: 7 times, to about the tutorial's size),
    its pixels unchanged, under a title that the picture's edge does not cut."""
    import torch

    real, fake = torch.rand(16, 3, 8, 8) * 2 - 1, torch.rand(64, 3, 8, 8) * 2 - 1
    artifacts.plot_real_vs_fake(real, fake, tmp_path / "real_vs_fake.png")
    picture = Image.open(tmp_path / "real_vs_fake.png")
    real_grid, fake_grid = artifacts.grid_image(real, scale=7), artifacts.grid_image(fake, scale=7)
    assert real_grid.size == (574, 154) and fake_grid.size == (574, 574)
    margin, top = artifacts.FIGURE_MARGIN, 2 * artifacts.FIGURE_MARGIN + artifacts.TITLE_FONT_PIXELS
    assert picture.size == (2 * 574 + 3 * margin, top + 574 + margin)
    shown_real = picture.crop((margin, top, margin + 574, top + 154))
    shown_fake = picture.crop((2 * margin + 574, top, 2 * margin + 2 * 574, top + 574))
    assert np.array_equal(np.asarray(shown_real), np.asarray(real_grid))
    assert np.array_equal(np.asarray(shown_fake), np.asarray(fake_grid))
    pixels = np.asarray(picture.convert("L"))
    assert (pixels[0] == 255).all() and (pixels[:, 0] == 255).all() and (pixels[:, -1] == 255).all()
    titles = pixels[:top]
    assert (titles[:, : margin + 574] < 128).any() and (titles[:, margin + 574 :] < 128).any(), "both titles"
    assert (titles[: margin // 2] == 255).all(), "nothing of a title at the picture's top edge"


def test_real_vs_fake_puts_the_two_grids_side_by_side(tmp_path):
    import torch

    real = torch.full((16, 3, 8, 8), -1.0)  # black
    fake = torch.full((16, 3, 8, 8), 1.0)  # white
    artifacts.plot_real_vs_fake(real, fake, tmp_path / "real_vs_fake.png")
    picture = np.asarray(Image.open(tmp_path / "real_vs_fake.png").convert("L")).astype(int)
    left, right = np.split(picture[:, : picture.shape[1] // 2 * 2], 2, axis=1)
    assert (left < 30).mean() > 0.1, "the black real grid on the left"
    assert right.mean() > left.mean() + 25, "the white fake grid on the right"
    assert (right < 30).mean() < (left < 30).mean() / 2
