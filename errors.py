"""What the user is told when something is wrong: one exception type carrying the message,
printed without a traceback (exit code 2), and the words that start and fill such lines.
"""

import math
import os


class UserError(Exception):
    """A problem with the user's input or environment: printed without a traceback, exit 2."""


def error_prefix():
    """What starts an error line: the program, and under torchrun the rank that had the error."""
    rank = os.environ.get("RANK")
    return f"gan.py (rank {rank})" if rank not in (None, "0") else "gan.py"


def count_text(count, noun):
    """'1 image', '2 images', '20,000 images'."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def size_text(size_bytes):
    """A size for people: bytes below a KiB, else KiB, MiB, GiB, ... up to EiB, with one decimal."""
    if size_bytes < 2**10:
        return count_text(size_bytes, "byte")
    power = min(int(math.log(size_bytes, 2**10)), 6)
    return f"{size_bytes / 2 ** (10 * power):.1f} {'KMGTPE'[power - 1]}iB"
