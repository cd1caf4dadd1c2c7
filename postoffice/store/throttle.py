"""A queue's throttle state: recent arrivals of each sender key, and throttles.

Kept in lanes, as the duplicate ledger is (``duplicates.py``): a process
counts arrivals in the lane of its key salt (``records.own_lane``), so
that two writers in different processes (two serves, a serve and a pipe
run) never write to, and never split, the same tree; every question reads
every lane.  Each lane is a pair:

- an ``OOBTree``, throttle key -> (arrival times, throttled until): the
  arrivals this lane's writers counted, and a throttle they set;
- an ``OOTreeSet`` of (last activity, key) of that tree's entries, oldest
  first, so that keys nobody used for a window are dropped in O(log n).

A key's arrivals are those of all lanes together, its throttle the latest
of theirs.  Its activity in a lane is its last arrival there or the end of
its throttle there, whichever is later.  Arrivals are kept only as far as
the window asks, and at most ``_MAX_ARRIVALS`` of them in a lane, so one
busy sender cannot make an entry grow.

The queue's attributes: ``_sender_lanes``, a tuple of ``LANES`` such
pairs; and ``_senders`` with ``_senders_by_time``, the one pair of the
releases before lanes, still read and pruned, never written to (but to
lift a throttle it holds, or to forget a key).

A key is the sender's address, then the values of the discriminator
headers (``ooo_loop_headers``), joined by NUL (``decide.throttle_key``).
The old API asks about a user: the keys of one address are next to each
other in a tree, the bare address first, so :meth:`SenderThrottle.keys_of`
finds them all in O(lanes x (log n + k)).  A throttle set on the bare
address holds for every key of that address.

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
from postoffice.store.records import LANES, PRUNE_BATCH, Laned

_MAX_ARRIVALS = 1000
# The window of the old API's frequency questions, which name none.
OLD_API_WINDOW = 24 * 3600.0

# One lane of the throttle state: its entries, and their activity index.
Lane = tuple[OOBTree, OOTreeSet]
Entry = tuple[tuple[float, ...], float | None]


def new_lanes() -> tuple[Lane, ...]:
    """The empty lanes of a new queue's throttle state (or of an older queue, at its upgrade)."""
    return tuple((OOBTree(), OOTreeSet()) for _ in range(LANES))


class SenderThrottle:
    """The throttle state of one queue, over the queue's own trees."""

    def __init__(self, legacy: Lane, lanes: Sequence[Lane] | None) -> None:
        # lanes None: a queue written before lanes, until its upgrade.
        self._parts = Laned(legacy, lanes)

    def _entry(self, key: str) -> Entry:
        """A key's arrivals in every lane (in time order) and its latest throttle."""
        arrivals: list[float] = []
        until: float | None = None
        for lane in self._parts.all():
            found = _lane_entry(lane, key)
            if found is None:
                continue
            arrivals.extend(found[0])
            if found[1] is not None and (until is None or found[1] > until):
                until = found[1]
        return tuple(sorted(arrivals)), until

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
        """Keys of one address, in order; with ``values``, those whose discriminators include them.

        The values may come in any order (a header dict names no order).
        """
        wanted = sorted(values or ())
        found: set[str] = set()
        for senders, _by_time in self._parts.all():
            for key in senders.keys(min=user):
                if key != user and not key.startswith(user + _SEP):
                    break
                found.add(key)
        for key in sorted(found):
            if not wanted or _includes(key.split(_SEP)[1:], wanted):
                yield key

    def throttled(self, now: float) -> Iterator[tuple[str, float]]:
        """(key, until) of each key throttled at ``now``, in key order (reads every key).

        For ``postoffice throttles list``: an administrator's look, not the
        delivery path, so a walk over the trees is fine.
        """
        keys = sorted({key for senders, _by_time in self._parts.all() for key in senders})
        for key in keys:
            _arrivals, until = self._entry(key)
            if until is not None and until > now:
                yield key, until

    def forget(self, key: str) -> bool:
        """Drop a key from every lane, its throttle and its arrivals: the sender starts afresh.

        The arrivals go too, or the next automatic reply of a sender just
        cleared would be counted with the burst that throttled it.
        """
        forgotten = False
        for lane in self._parts.all():
            found = _lane_entry(lane, key)
            if found is None:
                continue
            del lane[0][key]
            _unindex(lane, key, _activity(*found))
            forgotten = True
        return forgotten

    def record_arrival(
        self, key: str, now: float, window: float, throttle_until: float | None = None
    ) -> None:
        """Count an arrival of this sender key in this process's lane, as far as the window asks."""
        now = seconds(now)
        throttle_until = None if throttle_until is None else seconds(throttle_until)
        own = self._parts.own()
        arrivals, until = _lane_entry(own, key) or ((), None)
        previous_activity = _activity(arrivals, until)
        kept = (*tuple(t for t in arrivals if t > now - window)[-_MAX_ARRIVALS:], now)
        if throttle_until is not None:
            until = max(until or 0.0, throttle_until)
        _set(own, key, kept, until, previous_activity)
        self.prune(now - window, everywhere=False)

    def set_throttle(self, key: str, until: float) -> None:
        """The key's throttle ends at ``until``: set in this process's lane, lifted in the others.

        Lifted, so that a throttle can be made shorter as well as longer
        (the latest of the lanes' would hold otherwise).
        """
        until = seconds(until)
        own = self._parts.own()
        for lane in self._parts.all():
            found = _lane_entry(lane, key)
            if lane is own:
                arrivals, old_until = found or ((), None)
                _set(lane, key, arrivals, until, _activity(arrivals, old_until))
            elif found is not None and found[1] is not None:
                _set(lane, key, found[0], None, _activity(*found))

    def prune(self, before: float, limit: int = PRUNE_BATCH, everywhere: bool = True) -> int:
        """Drop up to ``limit`` sender keys with no arrival and no throttle after ``before``.

        Lane by lane, as ``Laned.to_prune`` orders them (not
        ``everywhere``: at each arrival).
        """
        removed = 0
        for lane in self._parts.to_prune(everywhere):
            if removed >= limit:
                break
            try:
                removed += _prune_lane(lane, before, limit - removed)
            except TypeError:
                _heal(lane)
                removed += _prune_lane(lane, before, limit - removed)
        return removed


def _lane_entry(lane: Lane, key: str) -> Entry | None:
    """A key's entry in one lane, its times as seconds; None if the lane has none."""
    found = lane[0].get(key)
    if found is None:
        return None
    arrivals, until = found
    if until is not None and type(until) is not float:
        until = seconds(until)  # a datetime, written through the old API before
    if any(type(t) is not float for t in arrivals):
        arrivals = tuple(seconds(t) for t in arrivals)
    return tuple(arrivals), until


def _set(
    lane: Lane,
    key: str,
    arrivals: tuple[float, ...],
    until: float | None,
    previous_activity: float | None,
) -> None:
    lane[0][key] = (arrivals, until)
    activity = _activity(arrivals, until)
    try:
        _index(lane, key, previous_activity, activity)
    except TypeError:
        _heal(lane)
        _index(lane, key, previous_activity, activity)


def _index(lane: Lane, key: str, previous: float | None, activity: float | None) -> None:
    by_time = lane[1]
    if previous is not None:
        by_time.discard((previous, key))
    if activity is not None:
        by_time.add((activity, key))


def _unindex(lane: Lane, key: str, activity: float | None) -> None:
    if activity is None:
        return
    try:
        lane[1].discard((activity, key))
    except TypeError:
        _heal(lane)
        lane[1].discard((activity, key))


def _heal(lane: Lane) -> None:
    """Make every time in a lane's index seconds again.

    An earlier version let the old API store a ``datetime`` as a
    throttle's end; in the index it cannot be compared with the seconds
    of the other entries, and every insert raised TypeError (a 451 for
    every delivery).  Rebuilt once, in O(n).
    """
    by_time = lane[1]
    entries = [(seconds(activity), key) for activity, key in by_time]
    by_time.clear()
    for entry in entries:
        by_time.add(entry)


def _prune_lane(lane: Lane, before: float, limit: int) -> int:
    senders, by_time = lane
    removed = 0
    # The truth of a tree is O(1); its len() walks every bucket.
    while removed < limit and by_time:
        activity, key = by_time.minKey()
        if activity >= before:
            break
        by_time.remove((activity, key))
        found = _lane_entry(lane, key)
        if found is not None and _activity(*found) == activity:
            del senders[key]
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
