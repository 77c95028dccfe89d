"""The metrics log, metrics.jsonl in --checkpoint-dir: a JSON row per log interval and per epoch,
appended as the run goes. A resumed run cuts it back to its checkpoint's step, so that no step
appears twice; a fresh run sets aside a log that no checkpoint stands beside.
"""

import json
import os
import warnings
from pathlib import Path

from checkpoint import latest_checkpoint
from files import WriteError, atomic_write

METRICS_LOG_NAME = "metrics.jsonl"


def parse_metrics(text):
    """(rows, number of damaged lines); the last line, if torn by a crash, is not counted."""
    rows, damaged = [], 0
    lines = text.splitlines()
    for index, line in enumerate(lines):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: nested too deep
            row = None
        if isinstance(row, dict) and type(row.get("step", 0)) is int:  # not True
            rows.append(row)
        elif line.strip() and not (index == len(lines) - 1 and not text.endswith("\n")):
            damaged += 1
    return rows, damaged


def append_metrics(path, rows):
    """Append rows to the JSONL log. Appending is safe: a torn last line is skipped on read."""
    if not rows:
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as file:
            file.write("".join(json.dumps(row) + "\n" for row in rows))
    except OSError as error:
        raise WriteError(path, error) from None


def orphan_log(checkpoint_dir):
    """The metrics log of a run that saved no checkpoint in checkpoint_dir (rows, but no checkpoint.pt), or None."""
    path = Path(checkpoint_dir) / METRICS_LOG_NAME
    if latest_checkpoint(checkpoint_dir).exists() or not path.is_file():
        return None
    rows, _ = parse_metrics(path.read_bytes().decode("utf-8", errors="replace"))
    return path if rows else None


def set_aside_orphan_log(checkpoint_dir):
    """Rename an orphan log to metrics.N.jsonl (the first free N); returns the new path or None."""
    path = orphan_log(checkpoint_dir)
    if path is None:
        return None
    number = 1
    while (kept := path.with_name(f"metrics.{number}.jsonl")).exists():
        number += 1
    try:
        os.rename(path, kept)
    except OSError as error:
        raise WriteError(kept, error) from None
    return kept


def truncate_metrics(path, last_step):
    """The log's rows up to last_step; later ones (logged after the checkpoint a run starts
    from, or by a run killed before its first checkpoint) are dropped, so no step appears twice."""
    text = Path(path).read_bytes().decode("utf-8", errors="replace") if Path(path).is_file() else ""
    rows, damaged = parse_metrics(text)
    if damaged:
        warnings.warn(f"skipped {damaged} damaged lines of {path}", stacklevel=2)
    kept = [row for row in rows if row.get("step", 0) <= last_step]
    # a line torn by a crash mid-append would swallow the next row appended after it
    torn = bool(text) and not text.endswith("\n")
    if len(kept) != len(rows) or torn or damaged:
        atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept)), mode="w")
    return kept
