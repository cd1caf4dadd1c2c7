"""Running ``postoffice-deliver`` as user nobody, as ``pipe(8)`` does with ``user=nobody``.

Where this test's interpreter lives where nobody cannot go (pyenv under
/root), :func:`nobody_command` finds a Python of the same version that
nobody can run and hands it a copy of the installed packages.
"""

from __future__ import annotations

import importlib.metadata
import os
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import postoffice
from tests.integration.postfix_instance import make_traversable, require_root

WAIT = 60.0


def nobody_ids() -> tuple[int, int]:
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def runs_as_nobody(argv: list[str], env: dict[str, str] | None = None) -> bool:
    uid, gid = nobody_ids()
    try:
        proc = subprocess.run(
            argv,
            user=uid,
            group=gid,
            extra_groups=[],
            cwd="/",
            env=env or {"PATH": "/usr/bin:/bin"},
            capture_output=True,
            timeout=WAIT,
            check=False,
        )
    except OSError:
        return False
    return proc.returncode == 0


def distributions_of(name: str) -> set[str]:
    """``name`` and what it needs at run time (no extras), by distribution name."""
    found: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        key = re.sub(r"[-_.]+", "-", current).lower()
        if key in found:
            continue
        try:
            requires = importlib.metadata.requires(current) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        found.add(key)
        for requirement in requires:
            if "extra ==" in requirement:
                continue
            match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
            if match:
                todo.append(match.group())
    return found


def copy_installation(site: Path) -> None:
    """postoffice and the distributions it needs, into ``site`` (hard links where possible)."""
    site.mkdir(parents=True)
    package = Path(postoffice.__file__).resolve().parent
    shutil.copytree(package, site / "postoffice")
    for name in distributions_of("postoffice") - {"postoffice", "setuptools"}:
        dist = importlib.metadata.distribution(name)
        for file in dist.files or []:
            source = Path(str(file.locate())).resolve()
            if ".." in file.parts or not source.is_file():
                continue  # scripts in bin/ and the like
            target = site / file
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
    for folder in [site, *site.rglob("*")]:
        if folder.is_dir():
            folder.chmod(0o755)


def find_nobody_command(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The words that run ``python -m postoffice.pipe`` as user nobody.

    This interpreter if nobody can run it and import the package (as on a
    Debian machine with Debian's python3); else a Python of the same
    version that nobody can run, with a copy of the installation on
    PYTHONPATH and ``-S`` so that the system's own packages stay out.
    """
    require_root()
    if runs_as_nobody([sys.executable, "-c", "import postoffice.pipe"]):
        return [sys.executable, "-m", "postoffice.pipe"]
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [f"/usr/bin/{version}", f"/usr/local/bin/{version}", shutil.which(version)]
    site = tmp_path_factory.mktemp("nobody-python") / "site"
    copy_installation(site)
    make_traversable(site)
    for candidate in filter(None, candidates):
        command = [candidate, "-S", "-m", "postoffice.pipe"]
        probe = [candidate, "-S", "-c", "import postoffice.pipe"]
        if runs_as_nobody(probe, {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site)}):
            return ["/usr/bin/env", f"PYTHONPATH={site}", *command]
    pytest.fail(
        f"user nobody can run neither {sys.executable} nor a {version} with a copy of "
        "postoffice; the pipe(8) test needs one"
    )
