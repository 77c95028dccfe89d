"""What the tests put in place of a part they do not test, where the real one costs a run most of its time."""

import io

from PIL import Image

import artifacts

_white = io.BytesIO()
Image.new("L", (1, 1), 255).save(_white, format="png")
ONE_WHITE_PIXEL = _white.getvalue()


def one_pixel_loss_plot(rows, path):
    """losses.png as one white pixel, written where and when the plot would be (through the function
    save_figure writes with), from the same columns of the same rows. matplotlib's plot is most of
    what a tiny run's epoch end costs, and its import most of what is left: the suite's runs would
    spend more time drawing than training. The plot itself is drawn by the tests marked
    real_loss_plot and by every `python gan.py` process the tests start."""
    artifacts.loss_columns(rows)
    artifacts.atomic_write_bytes(path, ONE_WHITE_PIXEL)
