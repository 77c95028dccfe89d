"""The flag table of docs/flags.md and --help agree: every flag --help lists has a row, every row
names a flag that exists, and each row's default is the parser's default. And every gan.py command
in the README's code blocks parses as written.

The table is read from the rows under docs/flags.md's "## Flags" heading, one flag a row:
`| `--flag` or `--flag METAVAR` | default | what |`. The default column is written as a user would
type the value (`2e-4`, `64`, `dcgan`), `off` for a switch, `min(K, cores)` for a default that
follows the CPU count, and for a flag without a default value words taken from its help's
"[default: ...]" (`random`, `all`, `latest`, `~/.cache/dcgan`), else `—`. Backticks around a cell are
ignored.
"""

import argparse
import os
import re
import shlex

import pytest
from conftest import ROOT

import options
from errors import UserError

FLAGS_PAGE = ROOT / "docs" / "flags.md"
FLAG_ROW = re.compile(r"^\|\s*`(--[a-z0-9-]+)[^`]*`\s*\|([^|]*)\|")
STATED_DEFAULT = re.compile(r"\[default: ([^\]]+)\]")
CORES_DEFAULT = re.compile(r"min\((\d+), cores\)")


def flag_table(flags_page):
    """{flag: default cell} of the rows under docs/flags.md's '## Flags' heading."""
    section = flags_page.split("\n## Flags\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = FLAG_ROW.match(line)
        if match:
            assert match[1] not in rows, f"{match[1]} has two rows in docs/flags.md's flag table"
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
    cell = cell.strip("`")
    if action.default is None:
        stated = STATED_DEFAULT.search(action.help or "")
        return bool(cell) and cell in stated[1] if stated else cell == "—"
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


def table_drift(flags_page, parser, cores):
    """The differences between the table and the parser, as lines for a failure message."""
    table, flags = flag_table(flags_page), help_flags(parser)
    missing = sorted(set(flags) - set(table))
    unknown = sorted(set(table) - set(flags))
    wrong = [
        f"{flag}: docs/flags.md says {table[flag]!r}, --help {flags[flag].default!r}"
        for flag in sorted(set(table) & set(flags))
        if not means_default(table[flag], flags[flag], cores)
    ]
    return (
        [f"in --help, not in docs/flags.md's flag table: {flag}" for flag in missing]
        + [f"in docs/flags.md's flag table, not a flag: {flag}" for flag in unknown]
        + wrong
    )


@pytest.mark.parametrize("cores", [1, 64])
def test_flag_table_matches_help(monkeypatch, cores):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)  # defaults that follow the CPU count
    drift = table_drift(FLAGS_PAGE.read_text(encoding="utf-8"), options.build_parser(), cores)
    assert drift == []


def test_flag_table_drift_is_found():
    """The check itself: a flag added without a row, a row for a removed flag, a changed default."""
    page = FLAGS_PAGE.read_text(encoding="utf-8")
    cores = os.cpu_count() or 1
    parser = options.build_parser()
    already = set(table_drift(page, parser, cores))  # the test above reports these
    parser.add_argument("--new-flag", type=int, default=3, help="added without a row")
    broken = page.replace("| `--ttur` |", "| `--tturbo` |").replace("| `--nz` | 100 |", "| `--nz` | 128 |")
    assert set(table_drift(broken, parser, cores)) - already == {
        "in --help, not in docs/flags.md's flag table: --new-flag",
        "in --help, not in docs/flags.md's flag table: --ttur",
        "in docs/flags.md's flag table, not a flag: --tturbo",
        "--nz: docs/flags.md says '128', --help 100",
    }


def readme_commands(markdown):
    """(command, the words after gan.py) of every gan.py command in the code blocks of `markdown`;
    a line ending in a backslash goes on on the next line, and a # starts a comment."""
    commands, in_block, pending = [], False, ""
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        command, pending = pending.strip(), ""
        words = shlex.split(command, comments=True)
        if words[:1] in (["python"], ["torchrun"]) and "gan.py" in words:
            commands.append((command, words[words.index("gan.py") + 1 :]))
    return commands


def command_problems(argv, parser):
    """Why gan.py would refuse argv, or take one of its flags for another: [] when it parses as written."""
    if argv == ["--help"]:
        return []
    flags = help_flags(parser)
    typed = [word.split("=", 1)[0] for word in argv if word.startswith("--")]
    problems = [
        f"{flag} is not a flag of gan.py (argparse reads a prefix as the whole flag)"
        for flag in typed
        if flag not in flags
    ]
    try:
        options.parse_flags(argv)
    except UserError as error:
        problems.append(str(error))
    return problems


def test_readme_commands_parse():
    """Every gan.py command the README shows names flags that exist, with values they take, in a mode
    that reads them: checked by the program's own flag parsing."""
    commands = readme_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(commands) >= 10, "the README's code blocks were not found"
    parser = options.build_parser()
    refused = {command: command_problems(argv, parser) for command, argv in commands}
    assert {command: problems for command, problems in refused.items() if problems} == {}


def test_bad_readme_command_is_found():
    """The check itself: a continued line is read whole, and a prefix of a flag, an unknown flag, a bad
    value and a flag of another mode are each refused."""
    block = "```\npython gan.py --dataset folder \\\n    --dataroot icons/ --epochs 3   # a comment\n```\n"
    assert readme_commands(block) == [
        ("python gan.py --dataset folder      --dataroot icons/ --epochs 3   # a comment",
         ["--dataset", "folder", "--dataroot", "icons/", "--epochs", "3"]),
    ]  # fmt: skip
    parser = options.build_parser()
    assert command_problems(["--dataset", "folder", "--dataroot", "icons/", "--epochs", "3"], parser) == []
    for argv in (["--epoch", "3"], ["--tturbo"], ["--epochs", "none"], ["--resume", "--class", "cat"]):
        assert command_problems(argv, parser), argv
