"""Real and malformed mail through the decision and the depot, without an exception.

Two corpora: Python's own email test messages (``test/test_email/data`` in
the standard library) and the real-world corpus in ``tests/corpus`` (a copy
of the project's shared one, licences in ``tests/corpus/LICENSES``) or
``$POSTOFFICE_CORPUS`` (bounces, spam, broken MIME,
8-bit headers, CR-only files, an empty file).  Every message must be decided, for several
recipients, without raising; every one that is accepted must read back from
the queue with its bytes intact.

The filters configured here exercise every filter type on every message, so
the header and body decoding paths all run against hostile input.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from postoffice import open_queue
from postoffice.config import Settings
from postoffice.decide import Action, Envelope, Rule, ThrottleView, decide
from postoffice.deliver import Depot
from postoffice.message import ParsedMessage, added_headers, line_ending, to_email_message
from tests.helpers import (
    PYTHON_CORPUS,
    SHARED_CORPUS,
    T0,
    in_ci,
    python_corpus,
    settings_for,
    shared_corpus,
)

# Every filter type on every message: the header and body decoding paths all run.
DEPOT: dict[str, Any] = {
    "ooo_loop_frequency": 1,
    "ooo_loop_headers": "Subject",
    "reject_filters": [
        "header_regexp: X-Corpus-Reject: yes",
        "body_regexp: ^this line rejects the message$",
        "to_hostname: .rejected.example",
    ],
    "queues": {
        "Never": [
            "to_hostname: a.example;headers=X-Original-To",
            r"header_regexp: Subject: .*(?<!\w)never(?!\w)",
            r"body_regexp: (?i)^\s*never ever\s*$",
        ],
        "A": "to_hostname: .a.example",
    },
}

# Recipients tried with ``decide``: queue A, no queue, a reject filter, IDN.
RECIPIENTS = (
    "rcpt@a.example",
    "nobody@unknown.example",
    "x@rejected.example",
    "r@bücher.a.example",
)


PYTHON_FILES = python_corpus()
SHARED_FILES = shared_corpus()


class NoHistory:
    """A queue state with no earlier mail: every message is the first of its sender."""

    def is_duplicate(self, queue: str, message_id: str, recipient: str, since: float) -> bool:
        return False

    def throttle_view(self, queue: str, key: str, now: float, window: float) -> ThrottleView:
        return ThrottleView(None, None, 0)


def corpus_depot(folder: Path) -> Depot:
    depot = Depot(settings_for(folder, **DEPOT))
    depot.prepare()
    return depot


@pytest.fixture(scope="module")
def depot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Depot]:
    one = corpus_depot(tmp_path_factory.mktemp("corpus-depot"))
    yield one
    one.close()


@pytest.fixture(scope="module")
def settings(depot: Depot) -> Settings:
    return depot.settings


# How many corpus messages were checked, and how many of them were queued.
TALLY = {"checked": 0, "accepted": 0}


def check_message(raw: bytes, number: int, depot: Depot, settings: Settings) -> None:
    parsed = ParsedMessage(raw)
    envelope = Envelope("sender@outside.example", RECIPIENTS)
    for rcpt in RECIPIENTS:
        decision = decide(parsed, envelope, rcpt, T0, NoHistory(), settings)
        assert decision.rule is not Rule.ERROR
        assert decision.code in (250, 550, 552)
        if rcpt.endswith("@rejected.example") and decision.action is not Action.DISCARD:
            assert decision.rule is Rule.REJECT_FILTER

    # Arrivals far apart (no corpus sender trips the throttle), one recipient
    # a file (no duplicates across files that share a Message-Id).
    now = T0 + 1000.0 * number
    rcpt = f"m{number}@a.example"
    (outcome,) = depot.deliver("sender@outside.example", [rcpt], raw, now=now)
    assert outcome.decision.rule not in (Rule.ERROR, Rule.STORAGE), outcome.reply
    TALLY["checked"] += 1
    if outcome.decision.action is not Action.ACCEPT:
        return
    TALLY["accepted"] += 1
    assert outcome.decision.queue == "A"
    assert outcome.queue_key is not None
    expected = added_headers("sender@outside.example", rcpt, int(now), line_ending(raw))
    with open_queue(depot.db(), "A") as queue:
        stored = queue._messages[outcome.queue_key].raw
    assert stored == expected + raw
    to_email_message(stored)  # what a consumer's pop_next() parses


@pytest.mark.parametrize(
    "path", PYTHON_FILES or [None], ids=[p.name for p in PYTHON_FILES] or ["missing"]
)
def test_python_email_corpus(path: Path | None, depot: Depot, settings: Settings) -> None:
    if path is None:
        reason = (
            f"Python's email test corpus is not installed ({PYTHON_CORPUS}); "
            "on Debian it comes with libpython3.11-testsuite"
        )
        if in_ci():
            pytest.fail(f"{reason} (CI=true: a missing part is a failure, not a skip)")
        pytest.skip(reason)
    check_message(path.read_bytes(), PYTHON_FILES.index(path), depot, settings)


@pytest.mark.parametrize(
    "path",
    SHARED_FILES or [None],
    ids=[str(p.relative_to(SHARED_CORPUS)) for p in SHARED_FILES] or ["missing"],
)
def test_shared_real_world_corpus(path: Path | None, depot: Depot, settings: Settings) -> None:
    if path is None:
        pytest.fail(f"no corpus in {SHARED_CORPUS} (its MANIFEST.tsv is missing)")
    check_message(path.read_bytes(), 10_000 + SHARED_FILES.index(path), depot, settings)


def test_the_corpora_are_mostly_queued() -> None:
    """Guard against a vacuous pass: the corpus tests above really stored mail."""
    total = len(PYTHON_FILES) + len(SHARED_FILES)
    if total == 0 or TALLY["checked"] < total:
        pytest.skip("needs every corpus test of this module to run first")
    # Most corpus messages have a From and a Message-Id and are not auto-replies.
    assert TALLY["accepted"] >= total // 3, TALLY
