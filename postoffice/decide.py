"""The decision for one envelope recipient : a pure function.

``decide`` reads the message, the envelope, the time and a read-only view
of the queue state as it was before this message, and returns a
:class:`Decision`.  It changes nothing: storing the message, recording the
Message-Id in the duplicate ledger, counting the arrival for the throttle
are the caller's work (:mod:`postoffice.deliver`), driven by the fields of
the decision.  The LMTP and pipe front doors only translate it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Protocol

from postoffice.clock import iso
from postoffice.config import Settings
from postoffice.filters import all_match, first_match, idna
from postoffice.message import ParsedMessage

AUTO_REPLY_PRECEDENCE = frozenset({"bulk", "junk", "list"})
AUTO_REPLY_PRESENT = ("X-Autoreply", "X-Autorespond", "X-MS-Exchange-Inbox-Rules-Loop")
DUPLICATE_WINDOW = 24 * 3600


class Action(enum.Enum):
    ACCEPT = "accept"  # store in ``queue``, reply 250
    DISCARD = "discard"  # reply 250, store nothing in a queue (``review``: keep a copy aside)
    REJECT = "reject"  # 5xx, never stored
    DEFER = "defer"  # 4xx, Postfix keeps it


class Rule(enum.IntEnum):
    """The rules in the order they are applied (docs/decisions.md numbers them so)."""

    SIZE = 1
    OWN_BOUNCE = 2
    MISSING_HEADERS = 3
    REJECT_FILTER = 4
    NO_QUEUE = 5
    DUPLICATE = 6
    AUTO_REPLY = 7
    THROTTLED = 8
    QUEUED = 9
    STORAGE = 10
    ERROR = 11


# The refusals ``[post office] discard`` can turn into a discard kept for
# review, by the family name the option gives them.
DISCARD_FAMILY = {
    Rule.REJECT_FILTER: "reject_filters",
    Rule.NO_QUEUE: "no_queue",
    Rule.AUTO_REPLY: "auto_reply",
    Rule.THROTTLED: "throttle",
}


@dataclass(frozen=True)
class Envelope:
    """What the MTA told us about the message, not what the message says."""

    sender: str  # "" for the null sender
    recipients: tuple[str, ...]
    declared_size: int | None = None


@dataclass(frozen=True)
class Decision:
    """What happens to a message for one recipient, and why.

    ``count_arrival`` and ``throttle_until`` tell the store what the throttle
    must remember; ``decide`` itself remembers nothing.  ``review`` (with
    DISCARD) says the store keeps the message in the review area: a refusal
    the configuration turned into a discard, so that nobody is bounced and
    nothing is lost; ``refusal`` is then the reply it replaced.
    """

    action: Action
    rule: Rule
    code: int
    status: str
    reason: str
    queue: str | None = None
    throttle_key: str | None = None
    count_arrival: bool = False
    throttle_until: float | None = None
    review: bool = False
    refusal: str | None = None


@dataclass(frozen=True)
class ThrottleView:
    """The throttle state of one sender key in one queue, before this message."""

    throttled_until: float | None
    last_arrival: float | None
    arrivals_in_window: int


class QueueState(Protocol):
    """Read-only questions the decision asks of the store."""

    def is_duplicate(self, queue: str, message_id: str, recipient: str, since: float) -> bool: ...

    def throttle_view(self, queue: str, key: str, now: float, window: float) -> ThrottleView: ...


def reject(rule: Rule, code: int, status: str, reason: str, **kw: object) -> Decision:
    return Decision(Action.REJECT, rule, code, status, reason, **kw)  # type: ignore[arg-type]


def discard(rule: Rule, reason: str, **kw: object) -> Decision:
    return Decision(Action.DISCARD, rule, 250, "2.0.0", reason, **kw)  # type: ignore[arg-type]


def refuse(decision: Decision, settings: Settings) -> Decision:
    """A refusal as the configuration wants it: as it is, or discarded and kept for review.

    A refusal after DATA makes Postfix send a bounce to the envelope
    sender, often forged; ``discard`` names the families whose refusals
    are answered 250 instead, the message kept where a person can look.
    """
    family = DISCARD_FAMILY.get(decision.rule)
    if family is None or family not in settings.discard:
        return decision
    refusal = f"{decision.code} {decision.status}"
    return replace(
        decision,
        action=Action.DISCARD,
        code=250,
        status="2.0.0",
        reason=f"{decision.reason} (instead of {refusal})",
        review=True,
        refusal=f"{refusal} {decision.reason}",
    )


def too_big(limit: int, size: int | None = None) -> Decision:
    """Rule 1; ``size`` None when reading stopped at the limit (the size is not known)."""
    said = "" if size is None else f" {size}"
    return reject(Rule.SIZE, 552, "5.3.4", f"message size{said} exceeds the limit of {limit} bytes")


def deferred(reason: str) -> Decision:
    return Decision(Action.DEFER, Rule.STORAGE, 451, "4.3.0", reason)


def decide(
    message: ParsedMessage,
    envelope: Envelope,
    recipient: str,
    now: float,
    state: QueueState,
    settings: Settings,
) -> Decision:
    """Apply the rules in order (docs/decisions.md); the first that applies decides."""
    limit = settings.max_message_size
    if limit is not None and len(message) > limit:
        return too_big(limit, len(message))

    if (message.get("X-Postoffice") or "").strip().lower() == "bounced":
        return discard(Rule.OWN_BOUNCE, "our own bounce came back")

    missing = _missing_headers(message)
    if missing:
        return discard(Rule.MISSING_HEADERS, missing)

    reason = first_match(settings.reject_filters, message, recipient)
    if reason is not None:
        return refuse(reject(Rule.REJECT_FILTER, 550, "5.7.1", f"rejected: {reason}"), settings)

    queue, why = _first_queue(settings, message, recipient)
    if queue is None:
        no_queue = f"<{recipient}>: no queue for this recipient"
        return refuse(reject(Rule.NO_QUEUE, 550, "5.1.1", no_queue), settings)

    message_id = message.message_id or ""
    if state.is_duplicate(queue, message_id, recipient, now - DUPLICATE_WINDOW):
        return discard(
            Rule.DUPLICATE, f"duplicate of {message_id} already queued in {queue}", queue=queue
        )

    key = None
    counted = False
    if settings.ooo_loop_frequency > 0 and _is_visible_recipient(message, recipient):
        key = throttle_key(message, settings.ooo_loop_headers)
        counted = True

    auto = auto_reply_reason(message)
    if auto is not None:
        refused = reject(
            Rule.AUTO_REPLY,
            550,
            "5.7.1",
            f"automatic reply refused: {auto}",
            queue=queue,
            throttle_key=key,
            count_arrival=counted,
        )
        return refuse(refused, settings)

    if key is not None:
        throttled = _throttle(key, queue, now, state, settings)
        if throttled is not None:
            reason, until = throttled
            refused = reject(
                Rule.THROTTLED,
                550,
                "5.7.1",
                reason,
                queue=queue,
                throttle_key=key,
                count_arrival=True,
                throttle_until=until,
            )
            return refuse(refused, settings)

    return Decision(
        Action.ACCEPT,
        Rule.QUEUED,
        250,
        "2.0.0",
        f"queued in {queue} ({'; '.join(why)})",
        queue=queue,
        throttle_key=key,
        count_arrival=counted,
    )


def _first_queue(
    settings: Settings, message: ParsedMessage, recipient: str
) -> tuple[str | None, tuple[str, ...]]:
    """The first queue, in file order, whose filters all match; and what matched."""
    for rule in settings.queues:
        why = all_match(rule.filters, message, recipient)
        if why is not None:
            return rule.name, why
    return None, ()


def _missing_headers(message: ParsedMessage) -> str | None:
    """Rule 3: mail without From or Message-Id, or From equal to To, is discarded."""
    sender = message.addresses("From", first_only=True)
    if not sender:
        return "no usable From header"
    if message.message_id is None:
        return "no Message-Id header"
    recipients = message.addresses("To", first_only=True)
    if recipients and sorted(set(sender)) == sorted(set(recipients)):
        return "From is the same as To"
    return None


def auto_reply_reason(message: ParsedMessage) -> str | None:
    """Rule 7: the headers by which automatic replies announce themselves."""
    precedence = _keyword(message.get("Precedence"))
    if precedence in AUTO_REPLY_PRECEDENCE:
        return f"Precedence: {precedence}"
    submitted = _keyword(message.get("Auto-Submitted"))
    if submitted and submitted != "no":
        return f"Auto-Submitted: {submitted}"
    for name in AUTO_REPLY_PRESENT:
        value = message.get(name)
        if value is not None and value.strip():
            return f"{name} present"
    return None


def _keyword(value: str | None) -> str | None:
    if value is None:
        return None
    keyword = value.split(";", 1)[0].strip().lower()
    return keyword or None


def _is_visible_recipient(message: ParsedMessage, recipient: str) -> bool:
    """A recipient not in To or Cc got a BCC: it cannot be a mail loop."""
    wanted = _comparable(recipient)
    listed = message.addresses("To") + message.addresses("Cc")
    return any(_comparable(address) == wanted for address in listed)


def _comparable(address: str) -> str:
    """Lower case, the domain in IDNA form: ``a@bücher.example`` is ``a@xn--bcher-kva...``."""
    local, _, domain = address.strip().strip("<>").rpartition("@")
    return f"{local.lower()}@{idna(domain)}" if local else address.lower()


def throttle_key(message: ParsedMessage, headers: tuple[str, ...]) -> str:
    """The sender (From addr-spec, lower-cased) plus the discriminator header values."""
    parts = [message.from_address or ""]
    parts.extend((message.get(h) or "").strip() for h in headers)
    return "\x00".join(parts)


def throttle_window(frequency: float) -> float:
    """The average is taken over the last ``4 / frequency`` minutes (old package)."""
    return 4.0 / frequency * 60.0


def _throttle(
    key: str, queue: str, now: float, state: QueueState, settings: Settings
) -> tuple[str, float | None] | None:
    """Rule 8: throttled already, or this arrival makes the sender go too fast."""
    frequency = settings.ooo_loop_frequency
    window = throttle_window(frequency)
    view = state.throttle_view(queue, key, now, window)
    until = now + settings.ooo_throttle_period
    if view.throttled_until is not None and now < view.throttled_until:
        # Already throttled: refused and counted, but the period is not extended.
        return f"sender is throttled until {iso(view.throttled_until)} (mail loop suspected)", None
    if view.last_arrival is not None:
        delta = now - view.last_arrival
        instant = float("inf") if delta <= 0 else 60.0 / delta
        if instant > frequency:
            return (
                f"sender sends {instant:.1f} msgs/min, over {frequency:g}; throttled until "
                f"{iso(until)} (mail loop suspected)"
            ), until
    average = 60.0 * (view.arrivals_in_window + 1) / window
    if average > frequency:
        return (
            f"sender averages {average:.1f} msgs/min, over {frequency:g}; throttled until "
            f"{iso(until)} (mail loop suspected)"
        ), until
    return None
