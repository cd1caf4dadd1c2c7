"""What the envelope alone decides at RCPT time: a pure function.

Postfix asks its policy service about each ``RCPT TO`` inside the sending
server's own SMTP session.  A refusal there reaches the real sender (its
own server tells it) instead of becoming a bounce that Postfix sends later
to an envelope sender that is often forged (backscatter).  So the refusals
that need nothing but the envelope are made here, with the same rules as
the decision after DATA (:mod:`postoffice.decide`):

- a reject filter that reads the envelope recipient matches: refused (5.7.1);
- no queue can take the recipient: refused (5.1.1).  A queue whose filters
  need the message (a header or body regexp, a ``to_hostname`` that also
  reads To or Cc) still counts as one that can: only the content tells;
- the sender is throttled (the out-of-office loop throttle) in the queue
  that takes the recipient: deferred (4.7.1).  Only an existing throttle
  counts; arrivals are counted after DATA, where the message is stored;
- otherwise nothing is decided here (DUNNO) and the rules after DATA apply.

A family of refusals that ``[post office] discard`` turns into a discard
kept for review is left to the rules after DATA too: refusing it here
would lose the copy the administrator asked to keep.

:func:`decide` reads the settings, the envelope, the time and a read-only
view of the throttle state, and returns a :class:`PolicyDecision`; it
changes nothing.  The protocol server (:mod:`postoffice.policy.server`)
only translates that into Postfix's ``action=`` lines.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from postoffice.config import Settings
from postoffice.decide import DISCARD_FAMILY, Rule
from postoffice.filters import ENVELOPE_HEADER, Filter, ToHostname
from postoffice.message import domain_of


class Verdict(enum.Enum):
    REJECT = "reject"  # refused now, a 5xx in the sender's SMTP session
    DEFER = "defer"  # a 4xx now, unless a later restriction refuses outright
    DUNNO = "dunno"  # nothing decided here: the rules after DATA decide


@dataclass(frozen=True)
class PolicyDecision:
    """What the policy service answers for one recipient, and why.

    ``reply`` is the enhanced status code and text Postfix passes on to
    the client (empty for DUNNO); ``reason`` is for the log.
    ``state_unknown`` says the answer is DUNNO only because the throttle
    state could not be read: with it, the answer may be a deferral.
    """

    verdict: Verdict
    reply: str = ""
    reason: str = ""
    state_unknown: bool = False


class ThrottleState(Protocol):
    """The one question the decision asks of the depot."""

    def is_throttled(self, queue: str, sender: str, now: float) -> bool | None:
        """Whether ``sender`` is throttled in ``queue`` at ``now``; None when it cannot be read."""
        ...


class _Unknown:
    """The state when there is no depot to ask: nothing is known."""

    def is_throttled(self, queue: str, sender: str, now: float) -> bool | None:
        return None


UNKNOWN: ThrottleState = _Unknown()


@dataclass(frozen=True)
class Route:
    """Which queue takes a recipient, as far as the envelope tells.

    ``queue`` None with ``certain``: no queue can take it.  ``queue`` None
    without ``certain``: a queue may, depending on the message.
    """

    queue: str | None
    certain: bool
    why: str = ""


def envelope_match(one: Filter, recipient: str) -> bool | None:
    """Whether a filter matches from the envelope recipient alone; None: the message tells.

    Only ``to_hostname`` reads the envelope recipient (its ``X-Original-To``
    header); one that also reads message headers matches if the envelope
    does, and is otherwise undecided.  Every other filter needs the message.
    """
    if not isinstance(one, ToHostname):
        return None
    if any(h.lower() == ENVELOPE_HEADER for h in one.headers):
        domain = domain_of(recipient)
        if domain and one.matching_host(domain) is not None:
            return True
    return None if needs_message(one) else False


def needs_message(one: Filter) -> bool:
    """A filter that may match on what the message says, not only on the envelope."""
    if not isinstance(one, ToHostname):
        return True
    return any(h.lower() != ENVELOPE_HEADER for h in one.headers)


def rejecting_filter(settings: Settings, recipient: str) -> str | None:
    """The reject filter the envelope recipient matches, as its reply names it; or None."""
    for one in settings.reject_filters:
        if isinstance(one, ToHostname) and envelope_match(one, recipient):
            host = one.matching_host(domain_of(recipient) or "")
            return f"envelope recipient {recipient} matches to_hostname {host}"
    return None


def route(settings: Settings, recipient: str) -> Route:
    """The first queue, in file order, whose filters all match, as far as the envelope tells.

    A queue with no filters matches nothing (as after DATA).  A queue that
    might match, before any that surely does, makes the route uncertain.
    """
    for rule in settings.queues:
        if not rule.filters:
            continue
        answers = [envelope_match(one, recipient) for one in rule.filters]
        if False in answers:
            continue
        if all(answers):
            return Route(rule.name, True, f"envelope recipient matches queue {rule.name}")
        return Route(None, False, f"queue {rule.name} may take it, depending on the message")
    return Route(None, True, "no queue matches the envelope recipient")


def _content_rejects(settings: Settings) -> bool:
    """Some reject filter reads the message: after DATA it may still match."""
    return any(needs_message(one) for one in settings.reject_filters)


def _refused(settings: Settings, rule: Rule) -> bool:
    """The configuration refuses this family after DATA (``discard`` does not keep it)."""
    return DISCARD_FAMILY[rule] not in settings.discard


def decide(
    settings: Settings, recipient: str, sender: str, now: float, state: ThrottleState
) -> PolicyDecision:
    """The answer for one ``RCPT TO``: refuse, defer, or leave it to the rules after DATA."""
    recipient = recipient.strip().strip("<>").strip()
    sender = sender.strip().strip("<>").strip()
    if not recipient:
        return PolicyDecision(Verdict.DUNNO, reason="no recipient")

    matched = rejecting_filter(settings, recipient)
    if matched is not None:
        if not _refused(settings, Rule.REJECT_FILTER):
            return PolicyDecision(Verdict.DUNNO, reason=f"{matched}; discard keeps it for review")
        return PolicyDecision(Verdict.REJECT, f"5.7.1 rejected: {matched}", matched)

    where = route(settings, recipient)
    if where.queue is None:
        if not where.certain:
            return PolicyDecision(Verdict.DUNNO, reason=where.why)
        if not _refused(settings, Rule.NO_QUEUE):
            return PolicyDecision(Verdict.DUNNO, reason=f"{where.why}; discard keeps it for review")
        if not _refused(settings, Rule.REJECT_FILTER) and _content_rejects(settings):
            # After DATA a content reject filter comes first, and would be discarded.
            return PolicyDecision(Verdict.DUNNO, reason=f"{where.why}; a reject filter may keep it")
        reply = f"5.1.1 <{recipient}>: no queue for this recipient"
        return PolicyDecision(Verdict.REJECT, reply, where.why)

    if settings.ooo_loop_frequency <= 0 or not sender or not _refused(settings, Rule.THROTTLED):
        return PolicyDecision(Verdict.DUNNO, reason=where.why)
    throttled = state.is_throttled(where.queue, sender.lower(), now)
    if throttled is None:
        return PolicyDecision(
            Verdict.DUNNO, reason=f"{where.why}; throttle state unknown", state_unknown=True
        )
    if throttled:
        reply = f"4.7.1 <{sender}>: sender is throttled (mail loop suspected)"
        return PolicyDecision(Verdict.DEFER, reply, f"sender throttled in queue {where.queue}")
    return PolicyDecision(Verdict.DUNNO, reason=where.why)
