"""``postoffice throttles``: seeing and lifting the mail-loop throttle, on a real depot."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from postoffice import config
from postoffice.clock import iso
from postoffice.deliver import Depot
from tests.helpers import HERE_URI, config_text, message, run_postoffice

LOOPER = "loop@outside.example"


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "postoffice.ini"
    path.write_text(config_text(HERE_URI, ooo_loop_frequency=1, ooo_throttle_period=3600))
    return path


def deliver(cfg: Path, n: int, now: float, to: str = "user@a.example") -> str:
    """One message from the looping sender, as serve stores it; its reply."""
    depot = Depot(config.load(cfg))
    try:
        (outcome,) = depot.deliver(LOOPER, [to], message(n, sender=LOOPER, to=to), now=now)
    finally:
        depot.close()
    return outcome.reply


def throttle_the_looper(cfg: Path) -> float:
    """Two messages a second apart: over one a minute, so the second is refused; the end."""
    now = time.time()
    assert deliver(cfg, 1, now).startswith("250")
    refused = deliver(cfg, 2, now + 1)
    until = now + 1 + 3600
    assert refused.startswith("550 5.7.1")
    # The refusal tells the sender's postmaster until when.
    assert f"throttled until {iso(until)}" in refused
    return until


def test_list_shows_the_throttled_sender_and_until_when(cfg: Path) -> None:
    until = throttle_the_looper(cfg)
    listed = run_postoffice("-C", str(cfg), "throttles", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == [
        {"queue": "A", "sender": LOOPER, "headers": [], "until": iso(until)}
    ]
    table = run_postoffice("-C", str(cfg), "throttles", "list")
    header, row = table.stdout.splitlines()
    assert header.split() == ["queue", "sender", "until", "headers"]
    assert row.split() == ["A", f"<{LOOPER}>", iso(until), "-"]
    only_b = run_postoffice("-C", str(cfg), "throttles", "list", "B")
    assert only_b.stdout == "postoffice: no sender is throttled\n"


def test_clear_lets_the_sender_through_again(cfg: Path) -> None:
    throttle_the_looper(cfg)
    cleared = run_postoffice("-C", str(cfg), "throttles", "clear", LOOPER.upper())
    assert cleared.returncode == 0, cleared.stderr
    assert cleared.stdout == f"postoffice: cleared 1 throttle entries of <{LOOPER.upper()}>\n"
    listed = run_postoffice("-C", str(cfg), "throttles", "list", "--json")
    assert json.loads(listed.stdout) == []
    # Its burst is forgotten too: the next message is the first of a new count.
    assert deliver(cfg, 3, time.time() + 2).startswith("250")


def test_clear_of_a_sender_without_a_throttle_is_an_error(cfg: Path) -> None:
    throttle_the_looper(cfg)
    result = run_postoffice("-C", str(cfg), "throttles", "clear", "nobody@outside.example")
    assert result.returncode == 65
    assert result.stderr == ("postoffice: no throttle state for sender <nobody@outside.example>\n")
    in_b = run_postoffice("-C", str(cfg), "throttles", "clear", LOOPER, "B")
    assert in_b.returncode == 65
    assert "in queue 'B'" in in_b.stderr
    # Nothing was cleared by the failed attempts.
    assert (
        len(json.loads(run_postoffice("-C", str(cfg), "throttles", "list", "--json").stdout)) == 1
    )


def test_an_unknown_queue_names_the_known_ones(cfg: Path) -> None:
    throttle_the_looper(cfg)
    result = run_postoffice("-C", str(cfg), "throttles", "list", "Nope")
    assert result.returncode == 65
    assert result.stderr == "postoffice: no queue 'Nope' (known queues: 'A', 'B')\n"
