"""A queue's throttle state: recent arrivals of each sender key, and throttles.

Two attributes of the queue, read and written only here:

- ``_senders``: ``OOBTree`` throttle key -> (arrival times, throttled until);
- ``_senders_by_time``: ``OOTreeSet`` of (last activity, key), oldest
  first, so that keys nobody used for a window are dropped in O(log n).

A key's activity is its last arrival or the end of its throttle, whichever
is later.  Arrivals are kept only as far as the window asks, and at most
``_MAX_ARRIVALS`` of them, so one busy sender cannot make its entry grow.
"""

from __future__ import annotations

from email.message import Message

from BTrees.OOBTree import OOBTree, OOTreeSet

from postoffice.decide import ThrottleView
from postoffice.store.records import PRUNE_BATCH

_MAX_ARRIVALS = 1000
# The window of the old API's frequency questions, which name none.
OLD_API_WINDOW = 24 * 3600.0


class SenderThrottle:
    """The throttle state of one queue, over the queue's own trees."""

    def __init__(self, senders: OOBTree, by_time: OOTreeSet) -> None:
        self._senders = senders
        self._by_time = by_time

    def _entry(self, key: str) -> tuple[tuple[float, ...], float | None]:
        entry: tuple[tuple[float, ...], float | None] = self._senders.get(key, ((), None))
        return entry

    def view(self, key: str, now: float, window: float) -> ThrottleView:
        """What the decision asks of a key: its throttle, last arrival, arrivals in the window."""
        arrivals, until = self._entry(key)
        in_window = sum(1 for t in arrivals if t > now - window)
        last = arrivals[-1] if arrivals else None
        return ThrottleView(throttled_until=until, last_arrival=last, arrivals_in_window=in_window)

    def record_arrival(
        self, key: str, now: float, window: float, throttle_until: float | None = None
    ) -> None:
        """Count one arrival of this sender key; keep only what the window needs."""
        arrivals, until = self._entry(key)
        previous_activity = _activity(arrivals, until)
        kept = (*tuple(t for t in arrivals if t > now - window)[-_MAX_ARRIVALS:], now)
        if throttle_until is not None:
            until = max(until or 0.0, throttle_until)
        self._set(key, kept, until, previous_activity)
        self.prune(now - window)

    def set_throttle(self, key: str, until: float) -> None:
        arrivals, old_until = self._entry(key)
        self._set(key, arrivals, until, _activity(arrivals, old_until))

    def _set(
        self,
        key: str,
        arrivals: tuple[float, ...],
        until: float | None,
        previous_activity: float | None,
    ) -> None:
        if previous_activity is not None:
            self._by_time.discard((previous_activity, key))
        self._senders[key] = (arrivals, until)
        activity = _activity(arrivals, until)
        if activity is not None:
            self._by_time.add((activity, key))

    def prune(self, before: float, limit: int = PRUNE_BATCH) -> int:
        """Drop sender keys with no arrival and no throttle after ``before``."""
        removed = 0
        # The truth of a tree is O(1); its len() walks every bucket.
        while removed < limit and self._by_time:
            activity, key = self._by_time.minKey()
            if activity >= before:
                break
            self._by_time.remove((activity, key))
            entry = self._senders.get(key)
            if entry is not None and _activity(*entry) == activity:
                del self._senders[key]
            removed += 1
        return removed


def _activity(arrivals: tuple[float, ...], until: float | None) -> float | None:
    last = arrivals[-1] if arrivals else None
    if until is None:
        return last
    return until if last is None else max(last, until)


def user_key(user: str, headers: tuple[str, ...] | None) -> str:
    """The throttle key of the old API: the sender address and discriminator values."""
    return "\x00".join([user.strip().lower(), *(headers or ())])


def sender_of(message: Message) -> str:
    """The address a message is from, as the old API counted it ("" for none)."""
    from postoffice.notices import message_sender

    return message_sender(message) or ""
