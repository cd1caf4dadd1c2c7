"""The policy service's decision, a pure function: what the envelope alone refuses or defers.

The throttle state is a real :class:`postoffice.store.Queue` per queue name,
throttled through the store's own API, as a consumer or a delivery leaves it.
Where the policy service refuses, the decision after DATA must refuse too
(with the same status), or the service would refuse mail that ``serve`` takes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from postoffice.config import Settings, loads
from postoffice.decide import Action, Envelope
from postoffice.decide import decide as decide_after_data
from postoffice.message import ParsedMessage
from postoffice.policy.decide import UNKNOWN, PolicyDecision, Verdict, decide, route
from postoffice.store import FolderState, Queue, QueuesFolder
from tests.helpers import ENVELOPE, T0, config_text, message

RULES = config_text(
    ooo_loop_frequency=2,
    ooo_throttle_period=300,
    reject_filters=["to_hostname: .refused.example", "header_regexp: Subject: .*BUY NOW"],
    queues={
        "A": "to_hostname: a.example bücher.example" + ENVELOPE,
        "Content": ["to_hostname: c.example" + ENVELOPE, "header_regexp: Subject: order"],
        "Empty": None,
    },
)


def settings(text: str = RULES) -> Settings:
    return loads(text, Path("/nonexistent/postoffice.ini"))


class Throttles:
    """The throttle state as the store keeps it: a real Queue per name."""

    def __init__(self, *names: str) -> None:
        self.queues = {name: Queue() for name in names}

    def is_throttled(self, queue: str, sender: str, now: float) -> bool | None:
        target = self.queues.get(queue)
        return target is not None and target.is_throttled(sender, now)


def ask(recipient: str, sender: str = "someone@outside.test", **kw: object) -> PolicyDecision:
    rules = kw.pop("rules", None) or settings()
    state = kw.pop("state", None) or Throttles("A", "Content")
    return decide(rules, recipient, sender, T0, state)  # type: ignore[arg-type]


def test_a_reject_filter_on_the_envelope_recipient_refuses_with_5_7_1() -> None:
    decision = ask("user@shop.refused.example")
    assert decision.verdict is Verdict.REJECT
    assert decision.reply == (
        "5.7.1 rejected: envelope recipient user@shop.refused.example "
        "matches to_hostname .refused.example"
    )


def test_a_wildcard_reject_filter_matches_on_a_label_boundary_only() -> None:
    assert ask("user@badrefused.example").reply.startswith("5.1.1")  # not .refused.example


def test_a_recipient_no_queue_can_take_is_refused_with_5_1_1() -> None:
    decision = ask("nobody@unknown.example")
    assert decision == PolicyDecision(
        Verdict.REJECT,
        "5.1.1 <nobody@unknown.example>: no queue for this recipient",
        "no queue matches the envelope recipient",
    )


def test_a_queue_without_filters_takes_nobody() -> None:
    assert ask("user@empty.example").verdict is Verdict.REJECT


def test_a_known_recipient_is_left_to_the_rules_after_data() -> None:
    decision = ask("user@a.example")
    assert decision.verdict is Verdict.DUNNO
    assert decision.reply == ""


def test_the_domain_matches_in_any_case_and_in_its_idna_form() -> None:
    assert ask("User@A.EXAMPLE").verdict is Verdict.DUNNO
    assert ask("leser@xn--bcher-kva.example").verdict is Verdict.DUNNO
    assert ask("leser@bücher.example").verdict is Verdict.DUNNO


def test_a_queue_whose_other_filters_need_the_message_counts_as_one_that_can() -> None:
    # Content takes c.example only when the Subject says so: only DATA tells.
    assert ask("user@c.example").verdict is Verdict.DUNNO
    assert route(settings(), "user@c.example").certain is False


def test_a_to_hostname_that_reads_headers_too_may_match_on_them() -> None:
    rules = settings(
        config_text(queues={"Headers": "to_hostname: h.example;headers=To,Cc,X-Original-To"})
    )
    # The envelope recipient is elsewhere, but To or Cc may name h.example.
    assert ask("user@elsewhere.example", rules=rules).verdict is Verdict.DUNNO
    assert route(rules, "user@elsewhere.example").certain is False
    assert route(rules, "user@h.example") == route(rules, "other@H.example")
    assert route(rules, "user@h.example").queue == "Headers"


def test_without_a_header_reading_queue_the_unknown_recipient_is_refused() -> None:
    rules = settings(
        config_text(queues={"A": "to_hostname: a.example" + ENVELOPE, "B": "body_regexp: x"})
    )
    # A body_regexp queue needs the message: it might take anyone.
    assert ask("user@elsewhere.example", rules=rules).verdict is Verdict.DUNNO
    only_envelope = settings(config_text(queues={"A": "to_hostname: a.example" + ENVELOPE}))
    assert ask("user@elsewhere.example", rules=only_envelope).verdict is Verdict.REJECT


def test_a_throttled_sender_is_deferred_for_the_queue_that_takes_the_recipient() -> None:
    rules = settings(RULES.replace("[queue:Empty]", "[queue:B]\nfilters = to_hostname: b.example"))
    state = Throttles("A", "B")
    state.queues["A"].throttle("Looper@Outside.test", T0 + 300)
    decision = ask("user@a.example", "looper@outside.test", rules=rules, state=state)
    assert decision.verdict is Verdict.DEFER
    assert (
        decision.reply == "4.7.1 <looper@outside.test>: sender is throttled (mail loop suspected)"
    )
    # The throttle is per queue and per sender.
    assert ask("user@b.example", "looper@outside.test", rules=rules, state=state).verdict is (
        Verdict.DUNNO
    )
    assert ask("user@a.example", "other@outside.test", state=state).verdict is Verdict.DUNNO


def test_a_throttle_that_ended_defers_nothing() -> None:
    state = Throttles("A")
    state.queues["A"].throttle("looper@outside.test", T0 - 1)
    assert ask("user@a.example", "looper@outside.test", state=state).verdict is Verdict.DUNNO


def test_a_throttle_of_one_discriminated_key_holds_for_the_address() -> None:
    # With ooo_loop_headers the key holds header values; the envelope knows the address only.
    state = Throttles("A")
    state.queues["A"].set_throttle("looper@outside.test\x00Out of office", T0 + 300)
    assert ask("user@a.example", "looper@outside.test", state=state).verdict is Verdict.DEFER


def test_the_null_sender_and_a_throttle_off_are_never_deferred() -> None:
    state = Throttles("A")
    state.queues["A"].throttle("", T0 + 300)
    assert ask("user@a.example", "", state=state).verdict is Verdict.DUNNO
    state.queues["A"].throttle("looper@outside.test", T0 + 300)
    off = settings(RULES.replace("ooo_loop_frequency = 2", "ooo_loop_frequency = 0"))
    assert ask("user@a.example", "looper@outside.test", rules=off, state=state).verdict is (
        Verdict.DUNNO
    )


def test_an_unreadable_throttle_state_gives_dunno_and_says_so() -> None:
    decision = decide(settings(), "user@a.example", "looper@outside.test", T0, UNKNOWN)
    assert decision.verdict is Verdict.DUNNO
    assert decision.state_unknown
    # The refusals that need no state do not wait for it.
    refused = decide(settings(), "nobody@unknown.example", "x@outside.test", T0, UNKNOWN)
    assert refused.verdict is Verdict.REJECT and not refused.state_unknown


def test_families_that_discard_keeps_for_review_are_left_to_the_rules_after_data() -> None:
    state = Throttles("A")
    state.queues["A"].throttle("looper@outside.test", T0 + 300)
    rules = settings(RULES.replace("[post office]", "[post office]\ndiscard = all"))
    for recipient, sender in (
        ("user@shop.refused.example", "x@outside.test"),
        ("nobody@unknown.example", "x@outside.test"),
        ("user@a.example", "looper@outside.test"),
    ):
        assert ask(recipient, sender, rules=rules, state=state).verdict is Verdict.DUNNO


def test_no_queue_is_left_alone_when_a_content_reject_filter_would_discard_first() -> None:
    # After DATA the Subject filter comes first, and discard keeps what it matches.
    rules = settings(RULES.replace("[post office]", "[post office]\ndiscard = reject_filters"))
    assert ask("nobody@unknown.example", rules=rules).verdict is Verdict.DUNNO
    # The envelope reject filter is discarded after DATA: left alone too.
    assert ask("user@shop.refused.example", rules=rules).verdict is Verdict.DUNNO


def test_an_empty_recipient_decides_nothing() -> None:
    assert ask("").verdict is Verdict.DUNNO
    assert ask("<>").verdict is Verdict.DUNNO


RECIPIENTS = [
    "user@a.example",
    "USER@a.example",
    "user@shop.refused.example",
    "user@refused.example",
    "user@badrefused.example",
    "nobody@unknown.example",
    "user@empty.example",
    "user@c.example",
    "no-domain",
    "user@[192.0.2.1]",
]


@pytest.mark.parametrize("recipient", RECIPIENTS)
def test_what_the_policy_service_refuses_the_rules_after_data_refuse_alike(
    recipient: str,
) -> None:
    """A message that passes every content rule, decided after DATA as ``serve`` decides it."""
    rules = settings()
    before = ask(recipient)
    raw = message(1, sender="someone@outside.test", to=recipient)
    after = decide_after_data(
        ParsedMessage(raw),
        Envelope("someone@outside.test", (recipient,)),
        recipient,
        T0,
        FolderState(QueuesFolder()),
        rules,
    )
    if before.verdict is Verdict.REJECT:
        assert after.action is Action.REJECT
        assert before.reply.startswith(after.status)
        assert f"{after.code} {after.status} {after.reason}".endswith(before.reply[6:])
    where = route(rules, recipient)
    if where.queue is not None:
        assert after.action is Action.ACCEPT and after.queue == where.queue
