"""The README's quick start installs postoffice as written, with Debian's own Python.

Debian 12's ``/usr/bin/python3`` refuses ``pip install`` outside a virtual
environment (PEP 668), so the quick start makes one first.  This test takes
the quick start's command line from the README and runs its first two
commands, ``python3 -m venv .venv`` and ``.venv/bin/pip install -e .``,
from the top of the repository, with ``/usr/bin/python3`` and the virtual
environment in a temporary folder.  pip fetches the dependencies as it would
for a user.  Then the installed ``postoffice`` has to answer ``--version``
and pass ``check`` on a configuration with a FileStorage, the way a user's
first run does (before the first ``serve``, with no database yet).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.helpers import in_ci, uri_for, write_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]
DEBIAN_PYTHON = Path("/usr/bin/python3")


def quick_start() -> list[list[str]]:
    """The README's run command, split into its ``&&``-joined commands."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    for block in blocks:
        if "postoffice serve" in block:
            return [shlex.split(part) for part in block.strip().split("&&")]
    raise AssertionError("the README's quick start has no command that runs postoffice serve")


def require_debian_venv() -> None:
    """Debian's Python with a working ``venv``: ``ensurepip`` comes with python3-venv."""
    check = [str(DEBIAN_PYTHON), "-c", "import venv, ensurepip"]
    if DEBIAN_PYTHON.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return
    reason = f"{DEBIAN_PYTHON} is missing or lacks venv/ensurepip (Debian package python3-venv)"
    if in_ci():
        pytest.fail(f"{reason}; .ci/test installs it")
    pytest.skip(reason)


def clean_env() -> dict[str, str]:
    """The user's environment: nothing that points Python at this checkout or another env."""
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_BREAK_SYSTEM_PACKAGES"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def test_the_quick_start_installs_a_working_postoffice_with_debians_python(
    tmp_path: Path,
) -> None:
    make_venv, install, run = quick_start()
    # The command as the README gives it: the venv, the editable install, the server.
    assert make_venv == ["python3", "-m", "venv", ".venv"]
    assert install == [".venv/bin/pip", "install", "-e", "."]
    assert run == [".venv/bin/postoffice", "serve"]
    require_debian_venv()
    venv = tmp_path / ".venv"
    env = clean_env()

    made = subprocess.run(
        [str(DEBIAN_PYTHON), *make_venv[1:3], str(venv)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), *install[1:]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr

    program = venv / "bin" / "postoffice"
    version = subprocess.run(
        [str(program), "--version"], env=env, capture_output=True, text=True, timeout=30
    )
    assert version.returncode == 0, version.stderr
    assert re.fullmatch(r"postoffice \S+\n", version.stdout), version.stdout
    config = write_config(tmp_path, zodb_uri=uri_for(tmp_path / "var"))
    checked = subprocess.run(
        [str(program), "-C", str(config), "check"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "configuration is valid (2 queues)" in checked.stdout + checked.stderr
    # The venv's own Python runs it, not the one that runs the tests.
    assert program.read_text().splitlines()[0] == f"#!{venv / 'bin' / 'python3'}"
