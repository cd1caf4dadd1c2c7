"""``postoffice dead-letters`` and the dead-letter area, on a real depot.

Dead letters are made the way they happen: a filter with a bug raises
while ``serve``'s decision runs, the message is answered 250 and kept.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from postoffice import config, open_queue
from postoffice.deliver import Depot
from postoffice.message import ParsedMessage
from tests.helpers import HERE_URI, config_text, message, run_postoffice


class Boom:
    """A filter with a bug: every call raises."""

    def __call__(self, message: ParsedMessage, recipient: str) -> str | None:
        raise RuntimeError("bug in a filter")


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "postoffice.ini"
    path.write_text(config_text(HERE_URI, dead_letter_max=2))
    return path


def deliver_with_a_bug(cfg: Path, *numbers: int) -> None:
    settings = config.load(cfg)
    depot = Depot(dataclasses.replace(settings, reject_filters=(Boom(),)))
    try:
        for n in numbers:
            (outcome,) = depot.deliver("s@outside.example", [f"user{n}@a.example"], message(n))
            assert outcome.reply.startswith("250 2.0.0")
    finally:
        depot.close()


def listed(cfg: Path) -> list[dict[str, object]]:
    result = run_postoffice("-C", str(cfg), "dead-letters", "list", "--json")
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, object]] = json.loads(result.stdout)
    return rows


def test_list_show_and_the_counts_of_queues_and_check(cfg: Path) -> None:
    deliver_with_a_bug(cfg, 1)
    (row,) = listed(cfg)
    assert (row["sender"], row["recipients"], row["message_id"]) == (
        "s@outside.example",
        ["user1@a.example"],
        "<1@outside.example>",
    )
    assert row["error"] == "RuntimeError: bug in a filter"
    shown = run_postoffice("-C", str(cfg), "dead-letters", "show", str(row["id"]))
    assert shown.returncode == 0
    assert "Subject: number 1" in shown.stdout
    assert "Traceback" in shown.stdout and "RuntimeError: bug in a filter" in shown.stdout

    queues = run_postoffice("-C", str(cfg), "queues", "--json")
    assert json.loads(queues.stdout)["dead_letters"] == 1
    table = run_postoffice("-C", str(cfg), "queues")
    assert table.stdout.splitlines()[-1] == "dead letters: 1, kept for review: 0"
    check = run_postoffice("-C", str(cfg), "check")
    assert "postoffice: warning: 1 dead letters (postoffice dead-letters list)" in check.stdout


def test_requeue_delivers_again_through_the_rules_once_fixed(cfg: Path) -> None:
    deliver_with_a_bug(cfg, 1, 2)
    result = run_postoffice("-C", str(cfg), "dead-letters", "requeue")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert all(" 250 2.0.0 <user" in line and "queued in A" in line for line in lines)
    assert listed(cfg) == []
    with open_queue(config.load(cfg).zodb_uri, "A") as queue:
        assert sorted(queue.pop_next()["Subject"] for _ in range(2)) == ["number 1", "number 2"]


def test_delete_needs_ids_or_all_and_unknown_ids_are_named(cfg: Path) -> None:
    deliver_with_a_bug(cfg, 1, 2)
    first, second = (row["id"] for row in listed(cfg))
    bare = run_postoffice("-C", str(cfg), "dead-letters", "delete")
    assert bare.returncode == 64
    assert "--all" in bare.stderr
    wrong = run_postoffice("-C", str(cfg), "dead-letters", "delete", str(first), "123")
    assert wrong.returncode == 65
    assert wrong.stderr == "postoffice: no dead letter 123\n"
    assert len(listed(cfg)) == 2  # a wrong id deletes none
    assert run_postoffice("-C", str(cfg), "dead-letters", "show", "123").returncode == 65
    one = run_postoffice("-C", str(cfg), "dead-letters", "delete", str(first))
    assert one.stdout == "postoffice: deleted 1 dead letters\n"
    assert [row["id"] for row in listed(cfg)] == [second]
    assert run_postoffice("-C", str(cfg), "dead-letters", "delete", "--all").returncode == 0
    assert listed(cfg) == []


def test_past_the_limit_the_oldest_goes_with_an_error_line(
    cfg: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="postoffice.store"):
        deliver_with_a_bug(cfg, 1, 2, 3)
    dropped = [r.getMessage() for r in caplog.records if r.name == "postoffice.store"]
    assert len(dropped) == 1
    assert "dropped" in dropped[0] and "<user1@a.example>" in dropped[0]
    assert "dead_letter_max = 2" in dropped[0]
    assert [row["recipients"] for row in listed(cfg)] == [["user2@a.example"], ["user3@a.example"]]
