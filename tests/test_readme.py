"""The README's flag table and --help agree: every flag --help lists has a row, every row names a
flag that exists, and each row's default is the parser's default.

The table is read from the rows under README.md's "## Flags" heading, one flag a row:
`| `--flag` or `--flag METAVAR` | default | what |`. The default column is written as a user would
type the value (`2e-4`, `64`, `dcgan`), `off` for a switch, `min(K, cores)` for a default that
follows the CPU count, and for a flag without a default value the first words of its help's
"[default: ...]" (`random`, `all`, `latest`), else `—`.
"""

import argparse
import os
import re

import pytest
from conftest import ROOT

import options

FLAG_ROW = re.compile(r"^\|\s*`(--[a-z0-9-]+)[^`]*`\s*\|([^|]*)\|")
STATED_DEFAULT = re.compile(r"\[default: ([^,\]]+)")
CORES_DEFAULT = re.compile(r"min\((\d+), cores\)")


def flag_table(readme_text):
    """{flag: default cell} of the rows under the README's '## Flags' heading."""
    section = readme_text.split("\n## Flags\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = FLAG_ROW.match(line)
        if match:
            assert match[1] not in rows, f"{match[1]} has two rows in the README's flag table"
            rows[match[1]] = match[2].strip()
    return rows


def help_flags(parser):
    """{flag: argparse action} of every long flag that --help lists."""
    return {
        option: action
        for action in parser._actions
        if action.help != argparse.SUPPRESS
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }


def means_default(cell, action, cores):
    """Does the table's default cell say the action's default?"""
    if action.default is None:
        stated = STATED_DEFAULT.search(action.help or "")
        return cell == (stated[1].strip() if stated else "—")
    if action.default is False:
        return cell == "off"
    per_core = CORES_DEFAULT.fullmatch(cell)
    if per_core:
        return action.default == min(int(per_core[1]), cores)
    try:
        value = (action.type or str)(cell)  # the cell read as the flag reads a typed value
    except (argparse.ArgumentTypeError, TypeError, ValueError):
        return False
    return value == action.default


def table_drift(readme_text, parser, cores):
    """The differences between the table and the parser, as lines for a failure message."""
    table, flags = flag_table(readme_text), help_flags(parser)
    missing = sorted(set(flags) - set(table))
    unknown = sorted(set(table) - set(flags))
    wrong = [
        f"{flag}: README says {table[flag]!r}, --help {flags[flag].default!r}"
        for flag in sorted(set(table) & set(flags))
        if not means_default(table[flag], flags[flag], cores)
    ]
    return (
        [f"in --help, not in the README's flag table: {flag}" for flag in missing]
        + [f"in the README's flag table, not a flag: {flag}" for flag in unknown]
        + wrong
    )


@pytest.mark.parametrize("cores", [1, 64])
def test_readme_flag_table_matches_help(monkeypatch, cores):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)  # defaults that follow the CPU count
    drift = table_drift((ROOT / "README.md").read_text(encoding="utf-8"), options.build_parser(), cores)
    assert drift == []


def test_flag_table_drift_is_found():
    """The check itself: a flag added without a row, a row for a removed flag, a changed default."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    cores = os.cpu_count() or 1
    parser = options.build_parser()
    already = set(table_drift(readme, parser, cores))  # the test above reports these
    parser.add_argument("--new-flag", type=int, default=3, help="added without a row")
    broken = readme.replace("| `--ttur` |", "| `--tturbo` |").replace("| `--nz` | 100 |", "| `--nz` | 128 |")
    assert set(table_drift(broken, parser, cores)) - already == {
        "in --help, not in the README's flag table: --new-flag",
        "in --help, not in the README's flag table: --ttur",
        "in the README's flag table, not a flag: --tturbo",
        "--nz: README says '128', --help 100",
    }
