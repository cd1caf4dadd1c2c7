"""The decision for one recipient (docs/decisions.md), row by row and in table order.

Pure rules are tested through ``decide`` with a small in-memory queue state;
the stateful parts of the throttle (what is counted, per queue, over time)
through ``Depot.deliver`` on a real FileStorage, since what matters there is
what the depot remembers between messages.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import transaction

from postoffice import pipe
from postoffice.clock import iso
from postoffice.config import Settings, loads
from postoffice.decide import (
    Action,
    Decision,
    Envelope,
    Rule,
    ThrottleView,
    decide,
    throttle_key,
)
from postoffice.deliver import Depot
from postoffice.message import ParsedMessage
from postoffice.store import find_folder
from tests.helpers import DAY, ENVELOPE, HOUR, T0, config_text, message

CONFIG = config_text(
    max_message_size="4k",
    ooo_loop_frequency=1,
    ooo_throttle_period=300,
    reject_filters=["header_regexp: Subject: .*forbidden", "to_hostname: .partycentral.example"],
    queues={
        "Customer A": "to_hostname: a.example app.a.example" + ENVELOPE,
        "Customer B": "to_hostname: .b.example" + ENVELOPE,
        "Only subject": ["to_hostname: .both.example", "header_regexp: Subject: both"],
        "Fallback": "to_hostname: .both.example",
        "Nothing": None,
    },
)


@dataclass
class MemoryState:
    """The questions ``decide`` asks, answered from dictionaries (what the store keeps)."""

    delivered: dict[tuple[str, str, str], float] = field(default_factory=dict)
    senders: dict[tuple[str, str], tuple[list[float], float | None]] = field(default_factory=dict)
    asked: list[tuple[str, str]] = field(default_factory=list)

    def is_duplicate(self, queue: str, message_id: str, recipient: str, since: float) -> bool:
        arrival = self.delivered.get((queue, message_id, recipient.lower()))
        return arrival is not None and arrival >= since

    def throttle_view(self, queue: str, key: str, now: float, window: float) -> ThrottleView:
        self.asked.append((queue, key))
        arrivals, until = self.senders.get((queue, key), ([], None))
        return ThrottleView(
            throttled_until=until,
            last_arrival=arrivals[-1] if arrivals else None,
            arrivals_in_window=sum(1 for t in arrivals if t > now - window),
        )

    def sender(
        self, queue: str, key: str, arrivals: list[float], until: float | None = None
    ) -> None:
        self.senders[(queue, key)] = (arrivals, until)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return loads(CONFIG, tmp_path / "postoffice.ini")


def raw(*extra: str, **headers: Any) -> bytes:
    """Message 1 to rcpt@a.example (queue Customer A); ``headers`` as ``message`` takes them."""
    return message(1, *extra, **headers)


def run(
    settings: Settings,
    message: bytes,
    rcpt: str = "rcpt@a.example",
    state: MemoryState | None = None,
    now: float = T0,
) -> Decision:
    envelope = Envelope("sender@outside.example", (rcpt,))
    return decide(ParsedMessage(message), envelope, rcpt, now, state or MemoryState(), settings)


def assert_row(decision: Decision, rule: Rule, code: int, status: str, exit_code: int) -> None:
    assert (decision.rule, decision.code, decision.status, pipe.exit_code(decision)) == (
        rule,
        code,
        status,
        exit_code,
    ), decision


# --- rows 1 to 9 ------------------------------------------------------------------


def test_row1_size_over_the_limit(settings: Settings) -> None:
    big = raw(body="x" * 4096)
    decision = run(settings, big)
    assert_row(decision, Rule.SIZE, 552, "5.3.4", os.EX_UNAVAILABLE)
    assert decision.action is Action.REJECT
    assert str(len(big)) in decision.reason and "4096" in decision.reason


def test_row1_size_exactly_at_the_limit_passes(settings: Settings) -> None:
    base = raw(body="")
    exact = raw(body="x" * (4096 - len(base)))
    assert len(exact) == 4096
    assert run(settings, exact).rule is Rule.QUEUED
    assert run(settings, exact + b"x").rule is Rule.SIZE


def test_row1_no_limit_when_absent(tmp_path: Path) -> None:
    unlimited = loads(CONFIG.replace("max_message_size = 4k\n", ""), tmp_path / "p.ini")
    assert run(unlimited, raw(body="x" * 100_000)).rule is Rule.QUEUED


@pytest.mark.parametrize("value", ["Bounced", "bounced", " BOUNCED "])
def test_row2_our_own_bounce_is_discarded(settings: Settings, value: str) -> None:
    decision = run(settings, raw(f"X-Postoffice: {value}"))
    assert_row(decision, Rule.OWN_BOUNCE, 250, "2.0.0", os.EX_OK)
    assert decision.action is Action.DISCARD


def test_row2_other_x_postoffice_values_pass(settings: Settings) -> None:
    assert run(settings, raw("X-Postoffice: Bounced-not")).rule is Rule.QUEUED


@pytest.mark.parametrize(
    "message",
    [
        raw(sender=None),
        raw(message_id=None),
        raw(sender="sender@outside.example", to="sender@outside.example"),
    ],
    ids=["no From", "no Message-Id", "From equals To"],
)
def test_row3_missing_headers_are_discarded(settings: Settings, message: bytes) -> None:
    decision = run(settings, message)
    assert_row(decision, Rule.MISSING_HEADERS, 250, "2.0.0", os.EX_OK)
    assert decision.action is Action.DISCARD


def test_row4_reject_filter(settings: Settings) -> None:
    decision = run(settings, raw(subject="a forbidden thing"))
    assert_row(decision, Rule.REJECT_FILTER, 550, "5.7.1", os.EX_UNAVAILABLE)
    assert decision.action is Action.REJECT
    assert "forbidden" in decision.reason  # the filter's reason goes to the sender


def test_row4_reject_to_hostname_uses_the_envelope(settings: Settings) -> None:
    decision = run(settings, raw(to="list@lists.example"), rcpt="x@partycentral.example")
    assert decision.rule is Rule.REJECT_FILTER
    assert "partycentral.example" in decision.reason


def test_row5_no_queue(settings: Settings) -> None:
    decision = run(settings, raw(to="x@unknown.example"), rcpt="x@unknown.example")
    assert_row(decision, Rule.NO_QUEUE, 550, "5.1.1", os.EX_NOUSER)
    assert "x@unknown.example" in decision.reason


def test_row6_duplicate(settings: Settings) -> None:
    state = MemoryState()
    state.delivered[("Customer A", "<1@outside.example>", "rcpt@a.example")] = T0 - HOUR
    decision = run(settings, raw(), state=state)
    assert_row(decision, Rule.DUPLICATE, 250, "2.0.0", os.EX_OK)
    assert decision.action is Action.DISCARD
    assert decision.queue == "Customer A"


def test_row6_duplicate_window_is_24_hours(settings: Settings) -> None:
    state = MemoryState()
    state.delivered[("Customer A", "<1@outside.example>", "rcpt@a.example")] = T0 - DAY - 1
    assert run(settings, raw(), state=state).rule is Rule.QUEUED


def test_row6_same_message_id_other_recipient_or_queue_is_not_a_duplicate(
    settings: Settings,
) -> None:
    state = MemoryState()
    state.delivered[("Customer B", "<1@outside.example>", "rcpt@a.example")] = T0
    state.delivered[("Customer A", "<1@outside.example>", "other@a.example")] = T0
    assert run(settings, raw(), state=state).rule is Rule.QUEUED


def test_row6_message_id_compared_without_comments(settings: Settings) -> None:
    state = MemoryState()
    state.delivered[("Customer A", "<1@outside.example>", "rcpt@a.example")] = T0
    message = raw(message_id="  <1@outside.example> (resent)")
    assert run(settings, message, state=state).rule is Rule.DUPLICATE


@pytest.mark.parametrize(
    "header",
    [
        "Precedence: bulk",
        "Precedence: junk",
        "Precedence: list",
        "Auto-Submitted: auto-replied",
        "Auto-Submitted: auto-generated",
        "Auto-Submitted: auto-notified",
        "X-Autoreply: yes",
        "X-Autorespond: Out of office",
        "X-MS-Exchange-Inbox-Rules-Loop: rcpt@a.example",
    ],
)
def test_row7_automatic_replies(settings: Settings, header: str) -> None:
    decision = run(settings, raw(header))
    assert_row(decision, Rule.AUTO_REPLY, 550, "5.7.1", os.EX_UNAVAILABLE)
    assert decision.action is Action.REJECT
    assert header.split(":")[0] in decision.reason


def test_row8_throttled(settings: Settings) -> None:
    state = MemoryState()
    state.sender("Customer A", "sender@outside.example", [T0 - 10])
    decision = run(settings, raw(), state=state)
    assert_row(decision, Rule.THROTTLED, 550, "5.7.1", os.EX_UNAVAILABLE)
    assert decision.action is Action.REJECT
    assert "loop" in decision.reason


def test_row9_queued(settings: Settings) -> None:
    decision = run(settings, raw())
    assert_row(decision, Rule.QUEUED, 250, "2.0.0", os.EX_OK)
    assert decision.action is Action.ACCEPT
    assert decision.queue == "Customer A"
    assert "Customer A" in decision.reason


# --- queues: file order, all filters, none -------------------------------------------


def test_first_queue_in_file_order_wins(settings: Settings) -> None:
    # Both "Only subject" and "Fallback" match; the earlier section wins.
    message = raw(to="x@both.example", subject="both of them")
    assert run(settings, message, rcpt="x@both.example").queue == "Only subject"


def test_a_queue_needs_every_filter_to_match(settings: Settings) -> None:
    message = raw(to="x@both.example", subject="only one")
    assert run(settings, message, rcpt="x@both.example").queue == "Fallback"


def test_a_queue_without_filters_matches_nothing(tmp_path: Path) -> None:
    only_empty = loads(config_text(queues={"Nothing": None}), tmp_path / "p")
    assert run(only_empty, raw()).rule is Rule.NO_QUEUE


def test_each_recipient_is_decided_on_its_own(settings: Settings) -> None:
    message = raw(to="list@lists.example")
    assert run(settings, message, rcpt="x@a.example").queue == "Customer A"
    assert run(settings, message, rcpt="x@shop.b.example").queue == "Customer B"
    assert run(settings, message, rcpt="x@c.example").rule is Rule.NO_QUEUE


# --- table order ----------------------------------------------------------------------


def test_order_size_before_own_bounce(settings: Settings) -> None:
    assert run(settings, raw("X-Postoffice: Bounced", body="x" * 5000)).rule is Rule.SIZE


def test_order_own_bounce_before_missing_headers(settings: Settings) -> None:
    assert run(settings, raw("X-Postoffice: Bounced", sender=None)).rule is Rule.OWN_BOUNCE


def test_order_no_from_and_unknown_recipient_is_discarded_not_refused(
    settings: Settings,
) -> None:
    decision = run(settings, raw(sender=None, to="x@unknown.example"), rcpt="x@unknown.example")
    assert decision.rule is Rule.MISSING_HEADERS
    assert decision.code == 250


def test_order_missing_headers_before_reject_filter(settings: Settings) -> None:
    decision = run(settings, raw(message_id=None, subject="forbidden"))
    assert decision.rule is Rule.MISSING_HEADERS


def test_order_reject_filter_beats_no_queue(settings: Settings) -> None:
    decision = run(settings, raw(subject="forbidden", to="x@unknown.example"), "x@unknown.example")
    assert (decision.rule, decision.status) == (Rule.REJECT_FILTER, "5.7.1")


def test_order_no_queue_before_auto_reply(settings: Settings) -> None:
    message = raw("Precedence: bulk", to="x@unknown.example")
    assert run(settings, message, rcpt="x@unknown.example").rule is Rule.NO_QUEUE


def test_order_duplicate_beats_auto_reply(settings: Settings) -> None:
    state = MemoryState()
    state.delivered[("Customer A", "<1@outside.example>", "rcpt@a.example")] = T0
    decision = run(settings, raw("Auto-Submitted: auto-replied"), state=state)
    assert decision.rule is Rule.DUPLICATE
    assert decision.code == 250


def test_order_auto_reply_before_throttle(settings: Settings) -> None:
    state = MemoryState()
    state.sender("Customer A", "sender@outside.example", [T0 - 1], until=T0 + 100)
    decision = run(settings, raw("Precedence: junk"), state=state)
    assert decision.rule is Rule.AUTO_REPLY
    assert decision.count_arrival  # it still counts towards the throttle


# --- rule 3 in detail -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "to"),
    [
        ("sender@outside.example", "SENDER@Outside.Example"),
        ("Me <sender@outside.example>", '"Someone else" <sender@outside.example>'),
        ("a@x.example, b@y.example", "b@y.example, a@x.example"),
        ("(comment) sender@outside.example", "sender@outside.example (another)"),
    ],
)
def test_rule3_from_equal_to_to_as_address_lists(settings: Settings, sender: str, to: str) -> None:
    decision = run(settings, raw(sender=sender, to=to), rcpt="rcpt@a.example")
    assert decision.rule is Rule.MISSING_HEADERS
    assert "same" in decision.reason


@pytest.mark.parametrize(
    ("sender", "to"),
    [
        ("sender@outside.example", "sender@outside.example, rcpt@a.example"),
        ("sender@outside.example", "other@outside.example"),
        ("a@x.example, b@y.example", "a@x.example"),
    ],
)
def test_rule3_different_lists_pass(settings: Settings, sender: str, to: str) -> None:
    assert run(settings, raw(sender=sender, to=to)).rule is Rule.QUEUED


@pytest.mark.parametrize(
    "sender", ["", "   ", "<>", "undisclosed", "@", "sender@", '"unterminated <a@b.c']
)
def test_rule3_empty_or_unparseable_from_counts_missing(settings: Settings, sender: str) -> None:
    decision = run(settings, raw(sender=sender))
    assert decision.rule is Rule.MISSING_HEADERS
    assert "From" in decision.reason


@pytest.mark.parametrize("message_id", ["", "   ", "<>", "(only a comment)", "two words"])
def test_rule3_empty_or_unparseable_message_id_counts_missing(
    settings: Settings, message_id: str
) -> None:
    decision = run(settings, raw(message_id=message_id))
    assert decision.rule is Rule.MISSING_HEADERS
    assert "Message-Id" in decision.reason


@pytest.mark.parametrize("message_id", ["<a@b>", "<a@b> (comment)", "bare-id@host", "<x>"])
def test_rule3_usable_message_ids(settings: Settings, message_id: str) -> None:
    assert run(settings, raw(message_id=message_id)).rule is Rule.QUEUED


def test_rule3_first_from_counts(settings: Settings) -> None:
    assert run(settings, raw("From: late@outside.example", sender="")).rule is (
        Rule.MISSING_HEADERS
    )
    assert run(settings, raw("From: ", sender="sender@outside.example")).rule is Rule.QUEUED


def test_rule3_first_message_id_counts(settings: Settings) -> None:
    message = raw("Message-Id: <late@outside.example>", message_id="")
    assert run(settings, message).rule is Rule.MISSING_HEADERS


def test_rule3_first_to_counts(settings: Settings) -> None:
    message = raw("To: sender@outside.example", sender="sender@outside.example")
    assert run(settings, message).rule is Rule.QUEUED
    same_first = raw(
        "To: rcpt@a.example", sender="sender@outside.example", to="sender@outside.example"
    )
    assert run(settings, same_first).rule is Rule.MISSING_HEADERS


def test_rule3_message_id_header_name_any_case(settings: Settings) -> None:
    message = raw("MESSAGE-ID: <7@outside.example>", message_id=None)
    assert run(settings, message).rule is Rule.QUEUED


# --- rule 7 in detail -----------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        "Precedence: BULK",
        "Precedence: Junk; reason=vacation",
        "Precedence:   list  ",
        "Auto-Submitted: Auto-Replied; owner-email=x@y",
        "auto-submitted: auto-generated",
        "X-AUTOREPLY: 1",
    ],
)
def test_rule7_keyword_before_semicolon_case_insensitive(settings: Settings, header: str) -> None:
    assert run(settings, raw(header)).rule is Rule.AUTO_REPLY


@pytest.mark.parametrize(
    "header",
    [
        "Auto-Submitted: no",
        "Auto-Submitted: No; but it says so",
        "Auto-Submitted:",
        "Precedence:",
        "Precedence: first-class",
        "Precedence: bulky",
        "Precedence: ; bulk",
        "X-Autoreply:",
        "X-Autorespond:   ",
        "X-MS-Exchange-Inbox-Rules-Loop:",
        "X-Auto-Response-Suppress: All",
    ],
)
def test_rule7_passes(settings: Settings, header: str) -> None:
    assert run(settings, raw(header)).rule is Rule.QUEUED


# --- rule 8 in detail (pure) --------------------------------------------------------------

SENDER_KEY = "sender@outside.example"


def test_rule8_instantaneous_frequency(settings: Settings) -> None:
    # ooo_loop_frequency = 1: more than one message a minute trips it.
    state = MemoryState()
    state.sender("Customer A", SENDER_KEY, [T0 - 59])
    tripped = run(settings, raw(), state=state)
    assert tripped.rule is Rule.THROTTLED
    assert tripped.throttle_until == T0 + 300
    assert tripped.count_arrival
    # The sender's postmaster reads until when in the refusal.
    assert f"throttled until {iso(T0 + 300)}" in tripped.reason
    state.sender("Customer A", SENDER_KEY, [T0 - 60])
    assert run(settings, raw(), state=state).rule is Rule.QUEUED


def test_rule8_average_frequency_over_four_periods(settings: Settings) -> None:
    # Window = 4 / frequency minutes = 240 s.  Four earlier arrivals plus this one
    # in the window is 1.25 a minute, although the last was over a minute ago.
    state = MemoryState()
    state.sender("Customer A", SENDER_KEY, [T0 - 200, T0 - 150, T0 - 100, T0 - 61])
    tripped = run(settings, raw(), state=state)
    assert tripped.rule is Rule.THROTTLED
    assert "averages" in tripped.reason
    assert tripped.throttle_until == T0 + 300
    state.sender("Customer A", SENDER_KEY, [T0 - 300, T0 - 150, T0 - 100, T0 - 61])
    assert run(settings, raw(), state=state).rule is Rule.QUEUED


def test_rule8_already_throttled_is_refused_without_extending(settings: Settings) -> None:
    state = MemoryState()
    state.sender("Customer A", SENDER_KEY, [T0 - 3600], until=T0 + 5)
    decision = run(settings, raw(), state=state)
    assert decision.rule is Rule.THROTTLED
    assert decision.throttle_until is None
    assert decision.count_arrival
    assert f"throttled until {iso(T0 + 5)}" in decision.reason


def test_rule8_throttle_over_after_its_period(settings: Settings) -> None:
    state = MemoryState()
    state.sender("Customer A", SENDER_KEY, [T0 - 3600], until=T0 - 1)
    assert run(settings, raw(), state=state).rule is Rule.QUEUED


def test_rule8_is_per_queue(settings: Settings) -> None:
    state = MemoryState()
    state.sender("Customer B", SENDER_KEY, [T0 - 1], until=T0 + 300)
    assert run(settings, raw(), state=state).rule is Rule.QUEUED
    assert state.asked == [("Customer A", SENDER_KEY)]


def test_rule8_bcc_is_neither_refused_nor_counted(settings: Settings) -> None:
    state = MemoryState()
    state.sender("Customer A", SENDER_KEY, [T0 - 1], until=T0 + 300)
    decision = run(settings, raw(to="list@lists.example"), rcpt="rcpt@a.example", state=state)
    assert decision.rule is Rule.QUEUED
    assert not decision.count_arrival
    assert decision.throttle_key is None


def test_rule8_cc_recipient_is_visible(settings: Settings) -> None:
    state = MemoryState()
    state.sender("Customer A", SENDER_KEY, [T0 - 1])
    message = raw("Cc: Rcpt <RCPT@a.example>", to="list@lists.example")
    assert run(settings, message, state=state).rule is Rule.THROTTLED


def test_rule8_sender_is_the_from_addr_spec_lower_cased(settings: Settings) -> None:
    message = ParsedMessage(raw(sender='"Big Boss" <Sender@OUTSIDE.example>'))
    assert throttle_key(message, ()) == SENDER_KEY
    assert run(settings, raw(sender='"Big Boss" <Sender@OUTSIDE.example>')).throttle_key == (
        SENDER_KEY
    )


def test_rule8_loop_headers_are_part_of_the_key(tmp_path: Path) -> None:
    text = CONFIG.replace(
        "ooo_loop_frequency = 1\n", "ooo_loop_frequency = 1\nooo_loop_headers = To,Subject\n"
    )
    with_headers = loads(text, tmp_path / "p.ini")
    state = MemoryState()
    first = run(with_headers, raw(subject="Out of office"), state=state)
    second = run(with_headers, raw(subject="Re: Out of office"), state=state)
    assert first.throttle_key != second.throttle_key
    assert first.throttle_key is not None and "Out of office" in first.throttle_key
    state.sender("Customer A", first.throttle_key, [T0 - 1])
    assert run(with_headers, raw(subject="Out of office"), state=state).rule is Rule.THROTTLED
    assert run(with_headers, raw(subject="Re: Out of office"), state=state).rule is Rule.QUEUED


def test_rule8_off_when_frequency_is_zero(tmp_path: Path) -> None:
    off = loads(CONFIG.replace("ooo_loop_frequency = 1\n", ""), tmp_path / "p.ini")
    state = MemoryState()
    state.sender("Customer A", SENDER_KEY, [T0 - 1], until=T0 + 300)
    decision = run(off, raw(), state=state)
    assert decision.rule is Rule.QUEUED
    assert not decision.count_arrival


def test_rule8_uses_the_time_given_not_the_date_header(settings: Settings) -> None:
    state = MemoryState()
    state.sender("Customer A", SENDER_KEY, [T0 - 1])
    dated = raw("Date: Mon, 01 Jan 2001 00:00:00 +0000")
    assert run(settings, dated, state=state).rule is Rule.THROTTLED
    assert run(settings, dated, state=state, now=T0 + 3600).rule is Rule.QUEUED


def test_decide_changes_nothing(settings: Settings) -> None:
    state = MemoryState()
    message = ParsedMessage(raw())
    before = message.raw
    for _ in range(3):
        decision = decide(
            message, Envelope("s@x", ("rcpt@a.example",)), "rcpt@a.example", T0, state, settings
        )
        assert decision.rule is Rule.QUEUED
    assert state.delivered == {} and state.senders == {}
    assert message.raw == before


# --- rule 8 with a real depot: what is counted, and when ------------------------------------


@pytest.fixture
def depot(tmp_path: Path) -> Iterator[Depot]:
    uri = f"file://{tmp_path}/Data.fs?blobstorage_dir={tmp_path}/blobs"
    text = CONFIG.replace("zodb_uri = memory://", f"zodb_uri = {uri}")
    one = Depot(loads(text, tmp_path / "postoffice.ini"))
    one.prepare()
    yield one
    one.close()


class Mailer:
    """Messages from one sender with fresh Message-Ids, delivered at chosen times."""

    def __init__(self, depot: Depot) -> None:
        self.depot = depot
        self.number = 0

    def send(
        self,
        at: float,
        rcpts: tuple[str, ...] = ("rcpt@a.example",),
        to: str = "rcpt@a.example",
        subject: str = "hello",
        extra: str | None = None,
    ) -> list[int]:
        """Deliver at ``T0 + at``; the reply code for each recipient."""
        self.number += 1
        message = raw(
            *([extra] if extra else []),
            message_id=f"<{self.number}@outside.example>",
            to=to,
            subject=subject,
        )
        outcomes = self.depot.deliver("sender@outside.example", rcpts, message, now=T0 + at)
        return [o.decision.code for o in outcomes]


def arrivals(depot: Depot, queue: str, at: float, key: str = SENDER_KEY) -> int:
    manager = transaction.TransactionManager()
    connection = depot.db().open(transaction_manager=manager)
    try:
        folder = find_folder(connection.root(), "/postoffice")
        return folder[queue].throttle_view(key, T0 + at, 240.0).arrivals_in_window
    finally:
        manager.abort()
        connection.close()


def test_depot_throttle_trips_and_expires(depot: Depot) -> None:
    mail = Mailer(depot)
    assert mail.send(0) == [250]
    assert mail.send(10) == [550]  # 6 a minute: tripped, throttled until 310
    assert mail.send(600) == [250]  # the period is over and the sender is slow again


def test_depot_throttle_period_holds_while_slow(depot: Depot) -> None:
    mail = Mailer(depot)
    assert mail.send(0) == [250]
    assert mail.send(10) == [550]
    # 80 s after the last message would be slow enough, but the 300 s period holds.
    assert mail.send(90) == [550]


def test_depot_a_loop_stays_throttled_while_it_goes_on(depot: Depot) -> None:
    mail = Mailer(depot)
    assert mail.send(0) == [250]
    assert mail.send(10) == [550]
    assert mail.send(300) == [550]
    # The period ran out at 310, but the refused arrival at 300 was counted:
    # 11 s later the loop trips the throttle again.
    assert mail.send(311) == [550]


def test_depot_one_arrival_per_message_per_queue(depot: Depot) -> None:
    mail = Mailer(depot)
    rcpts = ("one@a.example", "two@a.example", "three@app.a.example", "four@x.b.example")
    to = ", ".join(rcpts)
    assert mail.send(0, rcpts, to=to) == [250, 250, 250, 250]
    assert arrivals(depot, "Customer A", 0) == 1
    assert arrivals(depot, "Customer B", 0) == 1


def test_depot_auto_replies_are_counted(depot: Depot) -> None:
    mail = Mailer(depot)
    assert mail.send(0, extra="Auto-Submitted: auto-replied") == [550]
    assert arrivals(depot, "Customer A", 0) == 1
    # Without that count this one would be the sender's first: 250.
    assert mail.send(10) == [550]


def test_depot_throttled_arrivals_are_counted(depot: Depot) -> None:
    mail = Mailer(depot)
    mail.send(0)
    mail.send(10)
    mail.send(20)
    assert arrivals(depot, "Customer A", 20) == 3


def test_depot_bcc_neither_refused_nor_counted(depot: Depot) -> None:
    mail = Mailer(depot)
    assert mail.send(0, ("hidden@a.example",), to="list@lists.example") == [250]
    assert arrivals(depot, "Customer A", 0) == 0
    assert mail.send(10) == [250]  # the BCC copy did not count
    # Now throttled: the visible recipient is refused, the BCC one still accepted.
    codes = mail.send(20, ("rcpt@a.example", "hidden@a.example"), to="rcpt@a.example")
    assert codes == [550, 250]


def test_depot_throttle_state_is_per_queue(depot: Depot) -> None:
    mail = Mailer(depot)
    assert mail.send(0) == [250]
    assert mail.send(5, ("rcpt@x.b.example",), to="rcpt@x.b.example") == [250]
    assert mail.send(10) == [550]


def test_depot_uses_arrival_time_not_the_date_header(depot: Depot) -> None:
    mail = Mailer(depot)
    # Date headers an hour apart, arrivals 5 s apart: a loop.
    assert mail.send(0, extra="Date: Mon, 01 Jan 2024 10:00:00 +0000") == [250]
    assert mail.send(5, extra="Date: Mon, 01 Jan 2024 11:00:00 +0000") == [550]
    # Identical Date headers, arrivals far apart: not a loop.
    assert mail.send(1000, extra="Date: Mon, 01 Jan 2024 11:00:00 +0000") == [250]
    assert mail.send(2000, extra="Date: Mon, 01 Jan 2024 11:00:00 +0000") == [250]


def test_depot_loop_headers_make_separate_keys(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/Data.fs?blobstorage_dir={tmp_path}/blobs"
    text = CONFIG.replace("zodb_uri = memory://", f"zodb_uri = {uri}").replace(
        "ooo_loop_frequency = 1\n", "ooo_loop_frequency = 1\nooo_loop_headers = Subject\n"
    )
    depot = Depot(loads(text, tmp_path / "postoffice.ini"))
    try:
        mail = Mailer(depot)
        assert mail.send(0, subject="Ticket 1") == [250]
        assert mail.send(5, subject="Ticket 2") == [250]
        assert mail.send(10, subject="Ticket 1") == [550]
    finally:
        depot.close()


def test_rule8_idn_recipient_in_to_is_visible(settings: Settings, tmp_path: Path) -> None:
    text = CONFIG.replace("a.example app.a.example", "bücher.example")
    idn = loads(text, tmp_path / "p.ini")
    state = MemoryState()
    state.sender("Customer A", SENDER_KEY, [T0 - 1])
    message = raw(to="Rcpt <rcpt@xn--bcher-kva.example>")
    assert run(idn, message, rcpt="rcpt@bücher.example", state=state).rule is Rule.THROTTLED


# --- discard instead of refuse: the same rules, a 250 and a copy kept for review --------


def discarding(settings: Settings, *families: str) -> Settings:
    return replace(settings, discard=frozenset(families))


def family_cases(settings: Settings) -> dict[str, tuple[bytes, str, MemoryState]]:
    """One message a family refuses under CONFIG, with its recipient and state."""
    throttled = MemoryState()
    throttled.sender("Customer A", "sender@outside.example", [T0 - 10])
    return {
        "reject_filters": (raw(subject="forbidden fruit"), "rcpt@a.example", MemoryState()),
        "no_queue": (raw(), "rcpt@nowhere.example", MemoryState()),
        "auto_reply": (raw("Auto-Submitted: auto-replied"), "rcpt@a.example", MemoryState()),
        "throttle": (raw(), "rcpt@a.example", throttled),
    }


@pytest.mark.parametrize("family", ["reject_filters", "no_queue", "auto_reply", "throttle"])
def test_a_discarded_family_answers_250_keeps_the_rule_and_says_what_it_replaced(
    settings: Settings, family: str
) -> None:
    mail, rcpt, state = family_cases(settings)[family]
    refused = run(settings, mail, rcpt, state=state)
    assert refused.action is Action.REJECT and not refused.review

    kept = run(discarding(settings, family), mail, rcpt, state=state)
    assert_row(kept, refused.rule, 250, "2.0.0", os.EX_OK)
    assert (kept.action, kept.review) == (Action.DISCARD, True)
    assert kept.refusal == f"{refused.code} {refused.status} {refused.reason}"
    assert refused.reason in kept.reason and f"instead of {refused.code}" in kept.reason
    # What the store must remember is the same as for the refusal (the throttle counts it).
    assert (kept.queue, kept.throttle_key, kept.count_arrival, kept.throttle_until) == (
        refused.queue,
        refused.throttle_key,
        refused.count_arrival,
        refused.throttle_until,
    )


@pytest.mark.parametrize("family", ["reject_filters", "no_queue", "auto_reply", "throttle"])
def test_discarding_one_family_leaves_the_others_refused(settings: Settings, family: str) -> None:
    others = [f for f in ("reject_filters", "no_queue", "auto_reply", "throttle") if f != family]
    mail, rcpt, state = family_cases(settings)[family]
    decision = run(discarding(settings, *others), mail, rcpt, state=state)
    assert decision.action is Action.REJECT and decision.code == 550


def test_discard_leaves_the_size_limit_a_refusal(settings: Settings) -> None:
    every = discarding(settings, "reject_filters", "no_queue", "auto_reply", "throttle")
    decision = run(every, raw(size=8000))
    assert_row(decision, Rule.SIZE, 552, "5.3.4", os.EX_UNAVAILABLE)
