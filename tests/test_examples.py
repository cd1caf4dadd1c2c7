"""The systemd unit in ``postfix-examples/`` is one systemd accepts, and it fits the other examples.

``systemd-analyze verify`` reads the unit as systemd would load it: an
unknown key, a bad value or a missing program is reported.  It also checks
that the programs of ``ExecStart=`` and ``ExecReload=`` exist, so the test
verifies a copy whose ``ExecStart=`` names a ``postoffice`` made for the test
(this checkout's, run by this Python) with the arguments as written.  The
rest of the checks hold the unit to what the other examples and the program
do: the folders it may write are the ones the socket and the database live
in, and the exit status it does not restart on is the one a bad
configuration gives.
"""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import in_ci, run_postoffice, write_config

EXAMPLES = Path(__file__).resolve().parents[1] / "postfix-examples"
UNIT = EXAMPLES / "postoffice.service"


def unit_options(text: str) -> dict[str, dict[str, list[str]]]:
    """The unit's sections and keys, each key with all its values in order (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service() -> dict[str, list[str]]:
    return unit_options(UNIT.read_text())["Service"]


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if in_ci():
            pytest.fail("systemd-analyze is missing (Debian package systemd); .ci/test installs it")
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    return tool


def test_systemd_accepts_the_unit_without_a_warning(tmp_path: Path) -> None:
    """``systemd-analyze verify`` passes the unit as written but for the program's path."""
    tool = systemd_analyze()
    program = tmp_path / "bin" / "postoffice"
    program.parent.mkdir()
    program.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m postoffice.cli "$@"\n')
    program.chmod(0o755)
    text = UNIT.read_text()
    written = service()["ExecStart"][0]
    assert written.startswith("/usr/local/bin/postoffice "), written
    copy = tmp_path / "postoffice.service"
    copy.write_text(text.replace("ExecStart=/usr/local/bin/postoffice ", f"ExecStart={program} "))
    assert copy.read_text() != text

    result = subprocess.run(
        [tool, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )

    # Other units of this machine may draw complaints too; ours must draw none.
    ours = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "postoffice.service" in line
    ]
    assert result.returncode == 0, result.stdout + result.stderr
    assert ours == []


def test_the_unit_runs_serve_as_postoffice_and_reloads_with_sighup() -> None:
    options = service()
    assert options["User"] == ["postoffice"]
    assert options["Group"] == ["postoffice"]
    assert shlex.split(options["ExecStart"][0])[1:] == ["-C", "/etc/postoffice.ini", "serve"]
    assert options["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert options["UMask"] == ["0007"]
    assert options["Restart"] == ["on-failure"]
    assert options["NoNewPrivileges"] == ["yes"]
    assert options["ProtectSystem"] == ["strict"]
    assert options["PrivateTmp"] == ["yes"]


def test_the_unit_may_write_where_the_socket_and_the_database_are() -> None:
    """ProtectSystem=strict leaves writable only these: the socket's and the database's folders."""
    writable = {Path(p) for line in service()["ReadWritePaths"] for p in line.split()}
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(EXAMPLES / "lmtp-postoffice.ini")
    listen = ini["lmtp"]["listen"]
    assert listen.startswith("unix:")
    socket_folder = Path(listen.removeprefix("unix:")).parent
    # The database folder docs/postfix.md and docs/install.md give in zodb_uri.
    database_folder = Path("/var/lib/postoffice")
    assert socket_folder in writable
    assert database_folder in writable
    docs = (EXAMPLES.parent / "docs" / "postfix.md").read_text()
    assert "file:///var/lib/postoffice/Data.fs" in docs


def test_a_bad_configuration_exits_with_the_status_the_unit_does_not_restart_on(
    tmp_path: Path,
) -> None:
    """Exit 78 for a file serve cannot use: restarting it every few seconds would not help."""
    assert service()["RestartPreventExitStatus"] == ["78"]
    config = write_config(tmp_path, ooo_loop_frequency="often")

    result = run_postoffice("-C", str(config), "serve")

    assert result.returncode == 78, result.stderr
    assert "ooo_loop_frequency" in result.stderr
