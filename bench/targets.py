"""The targets postoffice is judged by, as one table of data rather than literals in the report.

A target is judged on the default path (``postoffice``); the same
measure for ``share = no`` (``po-direct``) is shown beside it, judged by
the same threshold.  A target is listed only when the part it is judged
on ran; a measure that part could not take (a peer not in
``--servers``, a case not in ``--sizes``) shows as not measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from common import KIB, RECOMMENDED_LOOP


@dataclass(frozen=True)
class Target:
    # As printed; {prefill}, {limit} and {floor} are figures of the run.
    name: str
    # Which part's measures it is judged on: throughput, scale, rss, consume, consume-zeo,
    # relay, drain, servers.
    part: str
    # Which of that part's measures (see the report's measures_of_* functions).
    measure: str
    # A number, or the name of a figure of the run (the peak-RSS limit depends on --rss-size).
    threshold: float | str
    # Met when the measure is at least the threshold; else when it is at most.
    at_least: bool = True
    unit: str = "x"
    # The share = no column when that path has no such measure.
    absent: str = "not measured"

    def met(self, value: float | None, threshold: float) -> bool | None:
        """None when there is nothing to judge, rather than a failure."""
        if value is None:
            return None
        return value >= threshold if self.at_least else value <= threshold


def vs_peer(size: int, sessions: int, peer: str) -> str:
    """The measure of a throughput ratio: ours over ``peer``, messages a second, in one case."""
    return f"{size} B x {sessions} / {peer}"


def through_postfix(size: int) -> str:
    """The measure of the relay part: ours over smtp-sink, both behind the same Postfix."""
    return f"{size} B through Postfix / sink"


ZEO = "... through the ZEO server of a running serve, "
SERVERS = {"zeo": "a stock ZEO server", "postgres": "RelStorage on PostgreSQL"}
RELAY = "through a private Postfix, {size} x 16 SMTP sessions >= 0.9 x smtp-sink behind it"

TARGETS = (
    Target("1 KiB x 16 sessions >= 2 x Dovecot", "throughput", vs_peer(KIB, 16, "dovecot"), 2.0),
    Target(
        "1 KiB x 16 sessions >= 0.6 x bare aiosmtpd", "throughput", vs_peer(KIB, 16, "bare"), 0.6
    ),
    # The Python ceiling: Python's own LMTP server that stores nothing.
    Target(
        "1 KiB x 16 sessions >= 0.8 x bare aiosmtpd", "throughput", vs_peer(KIB, 16, "bare"), 0.8
    ),
    Target("1 KiB x 1 session >= 2 x Dovecot", "throughput", vs_peer(KIB, 1, "dovecot"), 2.0),
    Target("1 KiB x 1 session >= 0.7 x bare aiosmtpd", "throughput", vs_peer(KIB, 1, "bare"), 0.7),
    Target(
        "50 KiB x 16 sessions >= 1.5 x Dovecot",
        "throughput",
        vs_peer(50 * KIB, 16, "dovecot"),
        1.5,
    ),
    Target("{prefill:,} queued >= 0.9 x empty depot", "scale", "full / empty", 0.9),
    Target(
        "peak RSS of serve, 16 x 10 MiB at once (max_message_size = 20m) <= 150 MiB",
        "rss",
        "peak MiB",
        150,
        at_least=False,
        unit="MiB",
    ),
    Target(
        "peak RSS of serve, 16 x 40 MiB at once (max_message_size = 50m) <= 200 MiB",
        "rss",
        "peak MiB 40m",
        200,
        at_least=False,
        unit="MiB",
    ),
    Target(RELAY.format(size="1 KiB"), "relay", through_postfix(KIB), 0.9, absent="n/a"),
    Target(RELAY.format(size="50 KiB"), "relay", through_postfix(50 * KIB), 0.9, absent="n/a"),
    Target(
        "a consumer pops and commits >= 1,000 msgs/s: on the file:// FileStorage "
        "(serve stopped), one commit a message",
        "consume",
        "file",
        1000,
        unit="msgs/s",
    ),
    Target(
        ZEO + "one commit a message (ZEO's bare one-object commits: {floor})",
        "consume-zeo",
        "zeo",
        1000,
        unit="msgs/s",
        absent="n/a (no ZEO)",
    ),
    Target(
        ZEO + "ten pops a commit",
        "consume-zeo",
        "zeo-batch",
        1000,
        unit="msgs/s",
        absent="n/a (no ZEO)",
    ),
    Target(
        "two consumers keep up with one serve at 1 KiB x 16 sessions, with consume() as "
        f"docs/consumers.md recommends (up to {RECOMMENDED_LOOP} pops a commit): queued when "
        "the load ends <= 5 % of delivered",
        "drain",
        f"{RECOMMENDED_LOOP} a commit",
        0.05,
        at_least=False,
        unit="%",
        absent="n/a (no ZEO)",
    ),
    *(
        target
        for backend, label in SERVERS.items()
        for target in (
            Target(
                f"on {label}, 2 serves taking 8 sessions each >= 0.95 x 1 serve taking 16 "
                "(1 KiB, two consumers popping)",
                "servers",
                f"{backend} 2 / 1",
                0.95,
                absent="n/a",
            ),
            Target(
                "... conflicts retried <= 5 % of commits, by the 2 serves and by the 2 "
                "consumers each (the larger share judged)",
                "servers",
                f"{backend} retried",
                0.05,
                at_least=False,
                unit="%",
                absent="n/a",
            ),
            Target(
                f"on {label}, two consumers keep up with 1 serve taking 16 sessions, with "
                f"consume() (up to {RECOMMENDED_LOOP} pops a commit): queued when the load "
                "ends <= 5 % of delivered",
                "servers",
                f"{backend} depth",
                0.05,
                at_least=False,
                unit="%",
                absent="n/a",
            ),
        )
    ),
)
