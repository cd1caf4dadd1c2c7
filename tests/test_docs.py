"""The operator's manual builds: ``mkdocs build --strict`` passes with no warning.

A strict build fails on a page missing from the nav, a link to a page or an
anchor that does not exist, and a link out of ``docs/`` (which a reader of
the built site could not follow).  Building it is how a broken link is
found before a reader finds it.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import in_ci

ROOT = Path(__file__).resolve().parents[1]


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
