"""A queue's throttle state: recent arrivals of each sender key, and throttles.

Two attributes of the queue, read and written only here:

- ``_senders``: ``OOBTree`` throttle key -> (arrival times, throttled until);
- ``_senders_by_time``: ``OOTreeSet`` of (last activity, key), oldest
  first, so that keys nobody used for a window are dropped in O(log n).

A key's activity is its last arrival or the end of its throttle, whichever
is later.  Arrivals are kept only as far as the window asks, and at most
``_MAX_ARRIVALS`` of them, so one busy sender cannot make its entry grow.

A key is the sender's address, then the values of the discriminator
headers (``ooo_loop_headers``), joined by NUL (``decide.throttle_key``).
The old API asks about a user: the keys of one address are next to each
other in the tree, the bare address first, so :meth:`SenderThrottle.keys_of`
finds them all in O(log n + k).  A throttle set on the bare address holds
for every key of that address.

Times are kept as float seconds since the epoch, nothing else: the old
API's ``datetime`` and ``timedelta`` values are turned into seconds by
:func:`seconds` and :func:`duration` before anything is written (and a
``datetime`` an earlier version let in is read as seconds).
"""

from __future__ import annotations

import datetime
import email.utils
from collections.abc import Iterator, Mapping, Sequence
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
        arrivals, until = self._senders.get(key, ((), None))
        if until is not None and type(until) is not float:
            until = seconds(until)  # a datetime, written through the old API before
        if any(type(t) is not float for t in arrivals):
            arrivals = tuple(seconds(t) for t in arrivals)
        return arrivals, until

    def view(self, key: str, now: float, window: float) -> ThrottleView:
        """What the decision asks of a key: its throttle, last arrival, arrivals in the window.

        A throttle of the key's bare address (the old API's ``throttle(user,
        until)``) holds for the key too.
        """
        arrivals, until = self._entry(key)
        user, _, discriminators = key.partition(_SEP)
        if discriminators:
            _, user_until = self._entry(user)
            if user_until is not None and (until is None or user_until > until):
                until = user_until
        in_window = sum(1 for t in arrivals if t > now - window)
        last = arrivals[-1] if arrivals else None
        return ThrottleView(throttled_until=until, last_arrival=last, arrivals_in_window=in_window)

    def keys_of(self, user: str, values: Sequence[str] | None = None) -> Iterator[str]:
        """Keys of one address; with ``values``, those whose discriminators include them all.

        The values may come in any order (a header dict names no order).
        """
        wanted = sorted(values or ())
        for key in self._senders.keys(min=user):
            if key != user and not key.startswith(user + _SEP):
                break
            if not wanted or _includes(key.split(_SEP)[1:], wanted):
                yield key

    def throttled(self, now: float) -> Iterator[tuple[str, float]]:
        """(key, until) of each key throttled at ``now``, in key order (reads every key).

        For ``postoffice throttles list``: an administrator's look, not the
        delivery path, so a walk over the tree is fine.
        """
        for key in self._senders:
            _arrivals, until = self._entry(key)
            if until is not None and until > now:
                yield key, until

    def forget(self, key: str) -> bool:
        """Drop a key, its throttle and its arrivals: the sender starts afresh.

        The arrivals go too, or the next automatic reply of a sender just
        cleared would be counted with the burst that throttled it.
        """
        if key not in self._senders:
            return False
        arrivals, until = self._entry(key)
        del self._senders[key]
        activity = _activity(arrivals, until)
        if activity is not None:
            try:
                self._by_time.discard((activity, key))
            except TypeError:
                self._heal()
                self._by_time.discard((activity, key))
        return True

    def record_arrival(
        self, key: str, now: float, window: float, throttle_until: float | None = None
    ) -> None:
        """Count one arrival of this sender key; keep only what the window needs."""
        now = seconds(now)
        throttle_until = None if throttle_until is None else seconds(throttle_until)
        arrivals, until = self._entry(key)
        previous_activity = _activity(arrivals, until)
        kept = (*tuple(t for t in arrivals if t > now - window)[-_MAX_ARRIVALS:], now)
        if throttle_until is not None:
            until = max(until or 0.0, throttle_until)
        self._set(key, kept, until, previous_activity)
        self.prune(now - window)

    def set_throttle(self, key: str, until: float) -> None:
        until = seconds(until)
        arrivals, old_until = self._entry(key)
        self._set(key, arrivals, until, _activity(arrivals, old_until))

    def _set(
        self,
        key: str,
        arrivals: tuple[float, ...],
        until: float | None,
        previous_activity: float | None,
    ) -> None:
        self._senders[key] = (arrivals, until)
        activity = _activity(arrivals, until)
        try:
            self._index(key, previous_activity, activity)
        except TypeError:
            self._heal()
            self._index(key, previous_activity, activity)

    def _index(self, key: str, previous: float | None, activity: float | None) -> None:
        if previous is not None:
            self._by_time.discard((previous, key))
        if activity is not None:
            self._by_time.add((activity, key))

    def _heal(self) -> None:
        """Make every time in the index seconds again.

        An earlier version let the old API store a ``datetime`` as a
        throttle's end; in the index it cannot be compared with the
        seconds of the other entries, and every insert raised TypeError
        (a 451 for every delivery).  Rebuilt once, in O(n).
        """
        entries = [(seconds(activity), key) for activity, key in self._by_time]
        self._by_time.clear()
        for entry in entries:
            self._by_time.add(entry)

    def prune(self, before: float, limit: int = PRUNE_BATCH) -> int:
        """Drop sender keys with no arrival and no throttle after ``before``."""
        try:
            return self._prune(before, limit)
        except TypeError:
            self._heal()
            return self._prune(before, limit)

    def _prune(self, before: float, limit: int) -> int:
        removed = 0
        # The truth of a tree is O(1); its len() walks every bucket.
        while removed < limit and self._by_time:
            activity, key = self._by_time.minKey()
            if activity >= before:
                break
            self._by_time.remove((activity, key))
            if key in self._senders and _activity(*self._entry(key)) == activity:
                del self._senders[key]
            removed += 1
        return removed


def _activity(arrivals: tuple[float, ...], until: float | None) -> float | None:
    last = arrivals[-1] if arrivals else None
    if until is None:
        return last
    return until if last is None else max(last, until)


_SEP = "\x00"


def _includes(parts: list[str], wanted: list[str]) -> bool:
    """Every value of ``wanted`` (sorted) among ``parts``, as many times as it is there."""
    rest = sorted(parts)
    for value in wanted:
        try:
            rest.remove(value)
        except ValueError:
            return False
    return True


def normal_user(user: str) -> str:
    """The address of the old API's ``user``: a From value (``Name <a@b>``) or an address.

    Lower-cased, as ``ParsedMessage.from_address`` is, so that the keys of
    the old API are the keys deliveries count under.
    """
    address = email.utils.parseaddr(user)[1] if "<" in user else user
    return (address or user).strip().lower()


Headers = Mapping[str, str] | Sequence[str] | None


def header_values(headers: Headers) -> tuple[str, ...] | None:
    """The discriminator values a ``headers`` argument names (None: all of the user's keys).

    A dict (0.25's form) is ``{header name: value}``: its values, stripped
    as deliveries strip them.  A sequence is the values themselves, in the
    order of ``ooo_loop_headers``.
    """
    if headers is None:
        return None
    if isinstance(headers, Mapping):
        return tuple(str(value or "").strip() for value in headers.values())
    if isinstance(headers, str):
        return (headers,)
    return tuple(headers)


def split_key(key: str) -> tuple[str, tuple[str, ...]]:
    """A key as (sender address, discriminator header values)."""
    user, *values = key.split(_SEP)
    return user, tuple(values)


def user_key(user: str, headers: Sequence[str] | None) -> str:
    """The throttle key of the old API: the sender address and discriminator values."""
    return _SEP.join([normal_user(user), *(headers or ())])


def seconds(value: object) -> float:
    """A time as float seconds since the epoch: a number, or a ``datetime`` (0.25's type).

    A naive datetime is local time, as 0.25's ``datetime.now()`` gave it;
    an aware one is converted.  Anything else is a TypeError.
    """
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"a time must be a datetime or seconds since the epoch, not {value!r}")


def duration(value: object) -> float:
    """An interval as float seconds: a number, or a ``timedelta`` (0.25's type)."""
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"an interval must be a timedelta or seconds, not {value!r}")


def sender_of(message: Message) -> str:
    """The address a message is from, as the old API counted it ("" for none)."""
    from postoffice.notices import message_sender

    return message_sender(message) or ""
