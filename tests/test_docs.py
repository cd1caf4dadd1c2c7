"""The operator's manual builds: ``mkdocs build --strict`` passes with no warning.

A strict build fails on a page missing from the nav, a link to a page or an
anchor that does not exist, and a link out of ``docs/`` (which a reader of
the built site could not follow).  Building it is how a broken link is
found before a reader finds it.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from postoffice.cli import build_parser
from tests.helpers import in_ci

ROOT = Path(__file__).resolve().parents[1]
OPERATIONS = ROOT / "docs" / "operations.md"


def test_the_manual_builds_strict_without_a_warning(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        if in_ci():
            pytest.fail("mkdocs is not installed; the test extra installs it")
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    site = tmp_path / "site"

    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output
    for page in ("index", "install", "operations", "upgrading", "systemd", "postfix"):
        built = site / (page + "/index.html" if page != "index" else "index.html")
        assert built.exists(), f"{page}.md was not built"
    # The upgrade guide leads with the routing change.
    upgrading = (site / "upgrading" / "index.html").read_text()
    assert upgrading.index("to_hostname") < upgrading.index("LMTP instead of a Maildir")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands argparse knows below ``parser``, by name (none for a leaf)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def options(parser: argparse.ArgumentParser) -> list[str]:
    """Each option of ``parser`` by its longest spelling, ``--help`` left out."""
    return [
        max(action.option_strings, key=len)
        for action in parser._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction)
    ]


def mentions(text: str, option: str) -> bool:
    """``option`` is in ``text`` as a word of its own (``--to`` is not found in ``--token``)."""
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command line a user can type: each subcommand, and each of theirs, with its parser."""
    for name, child in subcommands(parser).items():
        yield (*path, name), child
        yield from commands(child, (*path, name))


def documented_rows() -> list[list[str]]:
    """The first cell of each row of the commands table in operations.md, split into words."""
    section = OPERATIONS.read_text().split("## The commands", 1)[1].split("\n## ", 1)[0]
    return [row.split() for row in re.findall(r"^\| `([^`]+)` \|", section, re.MULTILINE)]


def test_the_operations_page_lists_every_command_with_its_options() -> None:
    """An administrator reading operations.md sees each subcommand, and every option it takes."""
    parser = build_parser()
    rows = documented_rows()
    known = dict(commands(parser))
    text = OPERATIONS.read_text()
    for option in options(parser):
        assert mentions(text, option), f"postoffice {option} is not in operations.md"

    for path, sub in known.items():
        # The row for this command, not one of its own subcommands' rows.
        mine = [
            row
            for row in rows
            if tuple(row[: len(path)]) == path
            and (len(row) == len(path) or row[len(path)] not in subcommands(sub))
        ]
        if subcommands(sub) and not options(sub):
            continue  # ``quarantine`` alone does nothing; its subcommands have the rows
        assert len(mine) == 1, f"postoffice {' '.join(path)}: rows {mine}"
        for option in options(sub):
            documented = mentions(" ".join(mine[0]), option)
            assert documented, f"postoffice {' '.join(path)}: {option} is not in its row"
    # And no row for a command that no longer exists.
    for row in rows:
        words = tuple(w for w in row if re.fullmatch(r"[a-z][a-z-]*", w))
        assert any(words[: len(path)] == path for path in known), f"no such command: {row}"
