"""The line each run leaves on stderr as it finishes, so a long run shows where it is.

These lines are the raw figures the report's medians are taken from; a
run that does not count says why here, at the moment it fails.
"""

from __future__ import annotations

from typing import Any

from common import KIB, Sample, human_size
from servers import SERVER_LABELS


def describe(sample: Sample) -> str:
    """One run of smtp-source: rate, the server's CPU, and for ours how it committed."""
    what = (
        f"round {sample.round} {SERVER_LABELS[sample.server]:<13} "
        f"{human_size(sample.size):>6} x {sample.sessions:>2}"
    )
    if sample.rate is None:
        return f"{what}: ERROR {sample.error}"
    cpu = sample.cpu_seconds / sample.seconds * 100 if sample.seconds else 0
    system = sample.cpu_system_seconds / sample.seconds * 100 if sample.seconds else 0
    commits = sample.extra.get("transactions")
    written = sample.extra.get("bytes_per_message", 0)
    batching = f", {commits} commits, Data.fs +{written:,.0f} B/msg" if commits else ""
    return (
        f"{what}: {sample.messages} in {sample.seconds:.2f}s = {sample.rate:,.0f} msgs/s"
        f" (server CPU {cpu:.0f}%, {system:.0f}% of it system{batching})"
    )


def prefilled(result: dict[str, Any], data_fs_bytes: int) -> str:
    return (
        f"prefilled {result['queued']:,} messages (queued and ledgered) in "
        f"{result['seconds']:.1f}s; Data.fs {human_size(data_fs_bytes)}"
    )


def peak_rss(kind: str, message: int, sessions: int, result: dict[str, Any]) -> str:
    return (
        f"peak RSS of {SERVER_LABELS[kind]}, {sessions} x "
        f"{human_size(message)} at once (max_message_size = {result['max_message_size']}): "
        + (
            f"{result['hwm_kib'] / KIB:,.0f} MiB (idle {result['rss_idle_kib'] / KIB:,.0f} MiB)"
            if "error" not in result
            else f"ERROR {result['error']}"
        )
    )


def consumed(round_number: int, result: dict[str, Any]) -> str:
    """A consumer loop's pops, or for the ZEO floor, its bare commits."""
    what = f"round {round_number} consumer via {result['mode']}"
    done = "popped and committed"
    if result["mode"] == "zeo-floor":
        what, done = f"round {round_number} ZEO", "one-object commits"
    if "error" in result:
        return f"{what}: ERROR {result['error']}"
    return (
        f"{what}: {result['popped']} {done} in {result['seconds']:.2f}s"
        f" = {result['popped'] / result['seconds']:,.0f} a second"
    )


def drained(round_number: int, result: dict[str, Any]) -> str:
    """Delivery rate, and how much was still waiting when the load ended."""
    what = f"round {round_number} drain, {result['per_commit']} a commit"
    if "error" in result:
        return f"{what}: ERROR {result['error']}"
    return (
        f"{what}: {result['messages'] / result['seconds']:,.0f} delivered a second, "
        f"{result['depth']} of {result['messages']} still queued when the load ended"
    )


def served(result: dict[str, Any]) -> str:
    """One case of the servers part: the rate of its serves, and the conflicts retried."""
    what = (
        f"round {result['round']} {result['backend']}, {result['serves']} serve"
        f"{'s' if result['serves'] > 1 else ''}"
    )
    if "error" in result:
        return f"{what}: ERROR {result['error']}"
    consumers = result["consumers"]
    return (
        f"{what}: {result['messages']} in {result['seconds']:.2f}s = "
        f"{result['messages'] / result['seconds']:,.0f} msgs/s; serves retried "
        f"{result['serve_conflicts']} of {result['serve_commits']} commits; consumers popped "
        f"{[c['popped'] for c in consumers]}, retried "
        f"{[c['conflicts_retried'] + c['transient'] for c in consumers]} of "
        f"{[c['commits'] + c.get('claim_commits', 0) for c in consumers]} commits (theirs and "
        f"their claims'); {result['depth']} queued at the end"
        + (
            f"; {len(result['logged_errors'])} ERROR lines logged"
            if result["logged_errors"]
            else ""
        )
    )


def inline_or_blob(result: dict[str, Any]) -> str:
    size = human_size(result["size"])
    if "error" in result:
        return f"inline or blob, {size}: ERROR {result['error']}"
    return (
        f"inline or blob, {size} x {result['count']}, {result['batch']} a commit: "
        f"inline {result['inline']['ms_per_message']:.2f} ms/msg, "
        f"blob {result['blob']['ms_per_message']:.2f} ms/msg"
    )
