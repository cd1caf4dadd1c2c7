"""``[metrics]``: what ``serve`` is doing, as Prometheus text over HTTP (prometheus_client).

Off unless ``[metrics] listen = HOST:PORT`` is set; loopback only unless
``allow_remote`` (the figures name queues and say how much mail waits).
Counters are kept as deliveries happen; the queues' state (depth, oldest
message, quarantine, dead letters) is read from the depot at each scrape,
in a connection of its own, so a scrape shows what a consumer would see.
The registry is this server's own, not prometheus_client's global one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import transaction
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from postoffice import clock, config, retry, sockets
from postoffice.deliver import STATUS, Outcome
from postoffice.errors import ConfigError, ListenError

log = logging.getLogger("postoffice.metrics")


class Metrics:
    """The figures of one ``serve``: updated by the depot and the server, read by scrapes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.deliveries = Counter(
            "postoffice_deliveries",
            "Recipient decisions, by queue and status (sent, discarded, refused, deferred)",
            ["queue", "status"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "postoffice_refusals",
            "Recipients refused or discarded instead, by the rule that decided",
            ["rule"],
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "postoffice_commit_seconds",
            "Time to decide and commit one batch of deliveries",
            registry=self.registry,
        )
        self.sessions = Gauge(
            "postoffice_sessions_open", "LMTP sessions open", registry=self.registry
        )

    def delivered(self, outcomes: Sequence[Outcome], seconds: float) -> None:
        """A batch decided (and committed unless deferred) in ``seconds``."""
        self.commit_seconds.observe(seconds)
        for outcome in outcomes:
            decision = outcome.decision
            status = STATUS[decision.action]
            self.deliveries.labels(decision.queue or "", status).inc()
            if status in ("refused", "discarded") or decision.review:
                self.refusals.labels(decision.rule.name.lower()).inc()

    def watch(self, open_folder: Callable[[], Any]) -> None:
        """Read the queues' state at each scrape through ``open_folder`` (a context manager)."""
        self.registry.register(_DepotCollector(open_folder))


class _DepotCollector(Collector):
    def __init__(self, open_folder: Callable[[], Any]) -> None:
        self._open_folder = open_folder

    def collect(self) -> Iterator[Any]:
        conflicts = CounterMetricFamily(
            "postoffice_conflicts_retried", "Commits retried after a ZODB conflict"
        )
        conflicts.add_metric([], int(retry.conflicts_retried))
        yield conflicts
        up = GaugeMetricFamily("postoffice_depot_up", "1 when the depot could be read")
        try:
            families = list(self._queues())
        except Exception as exc:  # the depot away: say so, do not fail the scrape
            log.debug("metrics: depot not read: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _queues(self) -> Iterator[Any]:
        depth = GaugeMetricFamily("postoffice_queue_depth", "Messages waiting", labels=["queue"])
        oldest = GaugeMetricFamily(
            "postoffice_queue_oldest_age_seconds",
            "Age of the oldest waiting message (0 when none waits)",
            labels=["queue"],
        )
        held = GaugeMetricFamily(
            "postoffice_quarantined", "Messages in the quarantine", labels=["queue"]
        )
        dead = GaugeMetricFamily("postoffice_dead_letters", "Messages in the dead-letter area")
        now = clock.now()
        with self._open_folder() as folder:
            for name, queue in folder.items():
                depth.add_metric([name], len(queue))
                arrival = queue.oldest_arrival()
                oldest.add_metric([name], max(0.0, now - arrival) if arrival else 0.0)
                held.add_metric([name], queue.count_quarantined_messages())
            dead.add_metric([], folder.count_dead_letters())
        yield from (depth, oldest, held, dead)


def start(settings: config.MetricsSettings, metrics: Metrics) -> Callable[[], None] | None:
    """Answer scrapes where ``[metrics]`` says; the function that stops it (None: off).

    An address beyond loopback without ``allow_remote`` is a configuration
    error; one that is taken is a ListenError, as for the LMTP socket.
    """
    if settings.listen is None:
        return None
    address = config.parse_listen(settings.listen)
    sockets.check_loopback(address, settings.allow_remote, config.METRICS_SECTION)
    if address.port is None:
        raise ConfigError(f"[metrics] listen {settings.listen!r}: HOST:PORT")
    try:
        server, thread = start_http_server(
            address.port, addr=address.host or "127.0.0.1", registry=metrics.registry
        )
    except OSError as exc:
        raise ListenError(f"[metrics] listen {settings.listen}: {exc.strerror or exc}") from None
    log.info("metrics on http://%s/metrics", settings.listen)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop


@contextlib.contextmanager
def folder_of(db: Any, path: str) -> Iterator[Any]:
    """The queues folder in a connection of its own, for one scrape; nothing written."""
    from postoffice.store import find_folder

    manager = transaction.TransactionManager()
    connection = db.open(transaction_manager=manager)
    try:
        yield find_folder(connection.root(), path)
    finally:
        manager.abort()
        connection.close()
