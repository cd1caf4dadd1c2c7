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
import transaction

from postoffice import open_queue
from postoffice.config import Settings
from postoffice.decide import Action, Envelope, Rule, ThrottleView, decide
from postoffice.deliver import Depot
from postoffice.message import ParsedMessage, added_headers, line_ending
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


def check_message(raw: bytes, number: int, depot: Depot, settings: Settings) -> bool:
    """Decided for every recipient without an error; if queued, popped back intact.

    True when the message was queued (and read back through ``pop_next``).
    """
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
    if outcome.decision.action is not Action.ACCEPT:
        return False
    assert outcome.decision.queue == "A"
    assert outcome.queue_key is not None
    expected = added_headers("sender@outside.example", rcpt, int(now), line_ending(raw))
    # What a consumer gets: the message popped is the one stored, its bytes
    # exactly those stored, every header readable.
    with open_queue(depot.db(), "A") as queue:
        popped = queue.pop_next()
        while popped.postoffice_id != outcome.queue_key:  # left by a test that failed
            popped = queue.pop_next()
        transaction.commit()
    assert popped.as_bytes() == expected + raw
    headers = [(name, str(value)) for name, value in popped.items()]  # parses every value
    assert headers[:2] == [("Return-Path", "<sender@outside.example>"), ("X-Original-To", rcpt)]
    # A message that starts with an indented line continues our last one.
    assert headers[2][0] == "X-Postoffice-Date" and headers[2][1].startswith(str(int(now)))
    return True


def corpus_cases() -> list[tuple[int, Path]]:
    """Each corpus file with its number (its arrival time and recipient in ``check_message``)."""
    python = [(number, path) for number, path in enumerate(PYTHON_FILES)]
    shared = [(10_000 + number, path) for number, path in enumerate(SHARED_FILES)]
    return python + shared


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


def test_the_corpora_are_mostly_queued(tmp_path: Path) -> None:
    """Guard against a vacuous pass: most corpus messages are queued and popped back.

    Counted here over both corpora, in a depot of its own, so that this
    test says the same whether it runs alone or after the tests above.
    """
    cases = corpus_cases()
    if not cases:
        pytest.fail(f"no corpus in {SHARED_CORPUS} nor in {PYTHON_CORPUS}")
    depot = corpus_depot(tmp_path)
    try:
        accepted = sum(
            check_message(path.read_bytes(), number, depot, depot.settings)
            for number, path in cases
        )
    finally:
        depot.close()
    # Most corpus messages have a From and a Message-Id and are not auto-replies.
    assert accepted >= len(cases) // 3, (accepted, len(cases))
