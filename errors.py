"""What the user is told when something is wrong: one exception type carrying the message,
printed without a traceback (exit code 2), and the words that start and fill such lines.
"""

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
