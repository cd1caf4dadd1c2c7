"""Fixtures shared by the unit and the integration tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from postoffice import config
from postoffice.lmtp import LmtpServer
from postoffice.store import records
from tests.helpers import write_lmtp_config
from tests.integration.nobody import find_nobody_command


@pytest.fixture(autouse=True)
def keys_from_the_real_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test makes queue and ledger keys from its own clock, not from an earlier test's.

    Keys only ever grow within a process (``records.new_key``): after a
    test that moved the clock ahead, every key the test process made would
    still be ahead of the real clock, and a message the next test queues
    here would pop after one that a subprocess (``postoffice review
    requeue``) queued later.
    """
    monkeypatch.setattr(records, "_last_key", 0)
    monkeypatch.setattr(records, "_last_time", -(1 << 62))


@pytest.fixture(scope="module")
def nobody_command(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The words that run ``python -m postoffice.pipe`` as user nobody."""
    return find_nobody_command(tmp_path_factory)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., LmtpServer]]:
    """Start LmtpServers in threads from ``write_lmtp_config`` under tmp_path; stop them after."""
    servers: list[LmtpServer] = []

    def run(folder: Path = tmp_path, **options: object) -> LmtpServer:
        path = write_lmtp_config(folder, **options)  # type: ignore[arg-type]
        server = LmtpServer(config.load(path), settings_path=path, grace=5)
        servers.append(server.start())
        return server

    yield run
    for server in servers:
        server.stop()


@pytest.fixture
def server(start: Callable[..., LmtpServer]) -> LmtpServer:
    """One LmtpServer on ``tmp_path/lmtp.sock`` with the LMTP test configuration."""
    return start()


@pytest.fixture
def sock(tmp_path: Path, server: LmtpServer) -> Path:
    """The socket of :func:`server`, started."""
    return tmp_path / "lmtp.sock"
