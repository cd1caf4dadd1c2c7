"""Conflicts are retried with growing pauses; deliveries wait them out, then defer."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from ZODB.POSException import ConflictError

from postoffice import deliver, retry
from postoffice.deliver import Depot
from postoffice.errors import StorageUnavailable
from tests.helpers import DELIVERY_DEPOT, T0, codes, message, settings_for, stored, uri_for


class FakeClock:
    """time.monotonic and time.sleep of postoffice.retry: sleeping moves the clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.pauses: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(retry.time, "monotonic", fake.monotonic)
    monkeypatch.setattr(retry.time, "sleep", fake.sleep)
    return fake


def test_the_first_attempt_does_not_wait(clock: FakeClock) -> None:
    assert next(retry.attempts(3, 10.0)) == 0
    assert clock.pauses == []


def test_at_least_the_minimum_attempts_even_when_patience_is_spent(clock: FakeClock) -> None:
    numbers = []
    for number in retry.attempts(5, 0.0):
        numbers.append(number)
        clock.now += 100  # every attempt takes longer than all the patience
    assert numbers == [0, 1, 2, 3, 4]


def test_attempts_go_on_while_patience_lasts(clock: FakeClock) -> None:
    numbers = list(retry.attempts(2, 30.0))
    assert len(numbers) > 2
    assert sum(clock.pauses) > 30.0 - retry.BACKOFF_MAX
    assert sum(clock.pauses[:-1]) <= 30.0


def test_pauses_grow_and_stay_under_the_cap(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retry.random, "uniform", lambda low, high: high)  # the longest pause
    list(retry.attempts(12, 0.0))
    assert clock.pauses[:4] == [0.005, 0.01, 0.02, 0.04]
    assert max(clock.pauses) == retry.BACKOFF_MAX


@pytest.fixture
def conflicting(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Make the next ``n`` delivery transactions conflict, as another writer's commit would."""
    remaining = [0]
    apply = Depot._apply

    def conflicting_apply(self: Depot, *args, **kwargs):  # type: ignore[no-untyped-def]
        if remaining[0] > 0:
            remaining[0] -= 1
            raise ConflictError("injected: another writer changed this bucket")
        return apply(self, *args, **kwargs)

    monkeypatch.setattr(Depot, "_apply", conflicting_apply)
    monkeypatch.setattr(retry.time, "sleep", lambda seconds: None)
    yield remaining


def test_a_delivery_waits_out_conflicts_and_is_stored_once(
    tmp_path: Path, conflicting: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    depot = Depot(settings_for(tmp_path, **DELIVERY_DEPOT))
    depot.prepare()
    conflicting[0] = deliver.COMMIT_ATTEMPTS + 5  # more than the minimum: patience covers it
    with caplog.at_level(logging.DEBUG, logger="postoffice.retry"):
        outcomes = depot.deliver("s@outside.example", ["rcpt@a.example"], message(1), now=T0)
    depot.close()
    assert codes(outcomes) == ["250 2.0.0"]
    assert conflicting[0] == 0
    assert len(stored(uri_for(tmp_path))) == 1
    # Each retry says what collided, for whoever looks at DEBUG.
    retried = [r for r in caplog.records if r.name == "postoffice.retry"]
    assert len(retried) == deliver.COMMIT_ATTEMPTS + 5
    assert all(r.levelno == logging.DEBUG for r in retried)
    assert "another writer changed this bucket" in retried[0].getMessage()


def test_endless_conflicts_defer_and_store_nothing(
    tmp_path: Path, conflicting: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deliver, "COMMIT_PATIENCE", 0.0)
    depot = Depot(settings_for(tmp_path, **DELIVERY_DEPOT))
    depot.prepare()
    conflicting[0] = 10**9
    outcomes = depot.deliver("s@outside.example", ["rcpt@a.example"], message(1), now=T0)
    depot.close()
    assert codes(outcomes) == ["451 4.3.0"]
    assert 10**9 - conflicting[0] == deliver.COMMIT_ATTEMPTS
    assert stored(uri_for(tmp_path)) == []


def test_creating_the_queues_waits_out_conflicts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two serve processes starting together on one ZEO create the same queues."""
    remaining = [deliver.COMMIT_ATTEMPTS + 3]
    real = deliver.reconcile

    def conflicting_reconcile(*args: object, **kwargs: object) -> list[str]:
        if remaining[0] > 0:
            remaining[0] -= 1
            raise ConflictError("another serve created the queues meanwhile")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(deliver, "reconcile", conflicting_reconcile)
    monkeypatch.setattr(retry.time, "sleep", lambda seconds: None)
    depot = Depot(settings_for(tmp_path, **DELIVERY_DEPOT))
    depot.prepare()
    outcomes = depot.deliver("s@outside.example", ["rcpt@a.example"], message(1), now=T0)
    depot.close()
    assert remaining == [0]
    assert codes(outcomes) == ["250 2.0.0"]


def test_endless_conflicts_creating_the_queues_are_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def conflicting_reconcile(*args: object, **kwargs: object) -> list[str]:
        raise ConflictError("always")

    monkeypatch.setattr(deliver, "reconcile", conflicting_reconcile)
    monkeypatch.setattr(deliver, "COMMIT_PATIENCE", 0.0)
    monkeypatch.setattr(retry.time, "sleep", lambda seconds: None)
    depot = Depot(settings_for(tmp_path, **DELIVERY_DEPOT))
    with pytest.raises(StorageUnavailable, match="could not create the queues: too many conflicts"):
        depot.prepare()
    depot.close()
