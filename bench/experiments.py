"""The parts of a run, each a function of the plan that returns its results as plain data.

Every run gets a fresh folder and a fresh store below ``base``, removed
once it is counted; a run that fails is recorded with its error rather
than raised, so one broken peer does not cost the rest of the run (a
failed pre-fill of the depot the scale part starts from still ends it).
Rounds are interleaved (round 1 of every case, then round 2, ...) so that
noise from other work on the machine spreads over all servers alike.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import drivers
import progress
import servers
import storages
from common import (
    DRAIN_LOOPS,
    KIB,
    MIB,
    RECOMMENDED_LOOP,
    BenchError,
    Plan,
    Results,
    Sample,
    remove,
)
from procs import process_tree, tail, tree_memory_kib
from profiling import PROFILE_RATE, recording, summarize_profile
from relay import through_postfix
from servers import OURS, PostofficeServer, SharedPostofficeServer, running

Log = Callable[[str], None]

# Messages a commit in the inline-or-blob comparison's batched case.
BLOB_BATCH = 8
BLOB_SIZES = (16 * KIB, 64 * KIB, 256 * KIB, 1 * MIB)


def measure(
    kind: str,
    work: Path,
    size: int,
    sessions: int,
    messages: int,
    round_number: int,
    prefilled: Path | None = None,
    expect_extra: int = 0,
    extra_transactions: int = 0,
) -> Sample:
    """Start a fresh server, send, stop, check the count."""
    sample = Sample(kind, size, sessions, messages, round_number)
    work.mkdir(parents=True)
    server = servers.create(kind, work, prefilled)
    helo = f"r{round_number}.{kind}.{size}.{sessions}.{work.name}.bench"
    # Dirty pages of earlier runs are written back now, not during this one.
    os.sync()
    try:
        with running(server):
            data_fs = work / "var" / "Data.fs"
            size_before = data_fs.stat().st_size if data_fs.exists() else 0
            user_before, system_before = server.cpu_seconds()
            sample.seconds = drivers.smtp_source(server.socket, sessions, size, messages, helo)
            user_after, system_after = server.cpu_seconds()
            sample.cpu_seconds = user_after - user_before + system_after - system_before
            sample.cpu_system_seconds = system_after - system_before
            if isinstance(server, PostofficeServer):
                sample.extra["storage"] = server.storage_path()
            sample.delivered = server.stop() - expect_extra
            if isinstance(server, PostofficeServer):
                sample.extra["transactions"] = server.transactions - extra_transactions
                sample.extra["bytes_per_message"] = (server.data_fs_bytes - size_before) / max(
                    1, sample.delivered
                )
        if sample.delivered != messages:
            sample.error = f"delivered {sample.delivered} of {messages}"
    except BenchError as exc:
        sample.error = f"{exc} [{server.output()[-300:]}]"
    return sample


def throughput(plan: Plan, base: Path, log: Log) -> list[Sample]:
    """Every server, size and session count, on an empty store."""
    samples = []
    for round_number in range(1, plan.rounds + 1):
        for size in plan.sizes:
            for sessions in plan.sessions:
                for kind in plan.servers:
                    messages = plan.sink_messages if kind == "sink" else plan.messages
                    work = base / f"r{round_number}-{kind}-{size}-{sessions}"
                    sample = measure(kind, work, size, sessions, messages, round_number)
                    samples.append(sample)
                    log(progress.describe(sample))
                    remove(work)
    return samples


def make_seed(plan: Plan, base: Path, log: Log, name: str = "prefilled") -> tuple[Path, int]:
    """A depot holding ``plan.prefill`` messages, queued and ledgered; its folder and commits."""
    seed = base / name
    seed.mkdir()
    depot = PostofficeServer(seed)
    depot.write_config()
    result = drivers.prefill(
        depot.config, plan.prefill, "seed.bench", max(120.0, plan.prefill / 200)
    )
    seed_count = depot.count()
    log(progress.prefilled(result, depot.data_fs.stat().st_size))
    return seed, int(seed_count["transactions"])


def scale(plan: Plan, base: Path, log: Log) -> list[Sample]:
    """1 KiB x 16 sessions on a depot holding ``plan.prefill`` messages, and on an empty one."""
    sessions = max(plan.sessions)
    seed, seed_transactions = make_seed(plan, base, log)
    samples = []
    for round_number in range(1, plan.rounds + 1):
        for kind in [k for k in OURS if k in plan.servers]:
            for label, prefilled in (("empty", None), ("full", seed / "var")):
                work = base / f"scale-{kind}-{label}-{round_number}"
                sample = measure(
                    kind,
                    work,
                    KIB,
                    sessions,
                    plan.scale_messages,
                    round_number,
                    prefilled=prefilled,
                    expect_extra=plan.prefill if prefilled else 0,
                    extra_transactions=seed_transactions if prefilled else 0,
                )
                sample.extra["depot"] = label
                samples.append(sample)
                log(f"{label:>5} depot: {progress.describe(sample)}")
                remove(work)
    remove(seed)
    return samples


# The second case of the peak-RSS part: messages near a limit much larger than the spool
# threshold, where memory held per message would show at once (16 x 40 MiB = 640 MiB).
BIG_RSS_MESSAGE = 40 * MIB
BIG_RSS_LIMIT = "50m"


def _rss_of(
    kind: str, plan: Plan, work: Path, limit_kib: int, message: int, max_size: str
) -> dict[str, Any]:
    """One server's memory, idle and at its peak, while every session is in DATA at once."""
    server = servers.create(kind, work)
    if isinstance(server, PostofficeServer):
        server.max_size = max_size
    result: dict[str, Any] = {
        "kind": kind,
        "message_bytes": message,
        "sessions": plan.rss_sessions,
        "max_message_size": getattr(server, "max_size", None),
        "limit_kib": limit_kib,
    }
    try:
        with running(server):
            assert server.proc is not None
            result["rss_idle_kib"] = tree_memory_kib(server.proc.pid, "VmRSS")
            result["seconds"] = drivers.send_concurrently(
                server.socket,
                plan.rss_sessions,
                message,
                f"rss.{kind}.bench",
                timeout=300,
            )
            result["hwm_kib"] = tree_memory_kib(server.proc.pid, "VmHWM")
            result["processes"] = len(process_tree(server.proc.pid))
            result["delivered"] = server.stop()
        if result["delivered"] != plan.rss_sessions:
            result["error"] = f"delivered {result['delivered']} of {plan.rss_sessions}"
    except BenchError as exc:
        result["error"] = f"{exc} [{server.output()[-300:]}]"
    return result


def peak_rss(plan: Plan, base: Path, log: Log) -> dict[str, dict[str, Any]]:
    """Peak RSS (VmHWM of the server and its children) with concurrent large messages.

    Two cases: ``--rss-size`` messages (10 MiB) under a limit of twice that,
    and 40 MiB messages under a 50 MiB limit (keys ``KIND`` and
    ``KIND.40m``).  bare aiosmtpd is measured alongside in the first, for
    reference: it keeps every message whole in memory, as lines and then
    joined (the second would take it over a gigabyte).
    """
    results: dict[str, Any] = {}
    limit_kib = (2 * plan.rss_message * plan.rss_sessions + 100 * MIB) // KIB
    cases = [("", plan.rss_message, f"{2 * plan.rss_message // MIB}m")]
    cases.append((".40m", BIG_RSS_MESSAGE, BIG_RSS_LIMIT))
    for suffix, message, max_size in cases:
        for kind in ("postoffice", "po-direct", "bare"):
            if kind not in plan.servers or (suffix and kind == "bare"):
                continue
            work = base / f"rss-{kind}{suffix}"
            work.mkdir()
            results[kind + suffix] = _rss_of(kind, plan, work, limit_kib, message, max_size)
            log(progress.peak_rss(kind, message, plan.rss_sessions, results[kind + suffix]))
            remove(work)
    return results


def _consume_round(plan: Plan, work: Path, round_number: int) -> list[dict[str, Any]]:
    """One round of the consumer loops on a depot pre-filled with three times the count."""
    server = PostofficeServer(work)
    server.write_config()
    limit = max(120.0, plan.consume / 50)
    measured: list[dict[str, Any]] = []
    try:
        drivers.prefill(
            server.config, 3 * plan.consume, f"c{round_number}.bench", max(120.0, plan.consume / 30)
        )
        os.sync()
        with running(server):
            uri = server.consumer_uri()
            if uri:
                for mode, per_commit in (("zeo", 1), ("zeo-batch", 10)):
                    measured.append(
                        {"mode": mode} | drivers.consume(uri, plan.consume, limit, per_commit)
                    )
                floor = drivers.commit_floor(uri, plan.consume, limit)
            server.stop()
        measured.append({"mode": "file"} | drivers.consume(server.uri, plan.consume, limit))
        for result in measured:
            if result["popped"] != plan.consume:
                result["error"] = f"popped {result['popped']} of {plan.consume}"
        if measured[-1]["left"] != plan.consume * (3 - len(measured)):
            measured[-1]["error"] = f"{measured[-1]['left']} messages left at the end"
        if uri:
            measured.append({"mode": "zeo-floor", "popped": floor["commits"]} | floor)
    except BenchError as exc:
        measured.append({"mode": "file", "error": str(exc)})
    return measured


def consumer(plan: Plan, base: Path, log: Log) -> list[dict[str, Any]]:
    """``open_queue`` + ``pop_next`` + ``transaction.commit()`` per message.

    Per round, on one depot pre-filled with three times the count: through
    the URI a running ``postoffice serve`` prints (its ZEO server, the way
    applications read while it runs), one message a commit and then ten;
    the rate of bare one-object commits through that URI (ZEO's ceiling for
    any one-commit-a-message loop); then on the ``file://`` depot itself
    once serve has stopped.  With ``share = no`` serve prints no such URI
    and only the last is measured.
    """
    results: list[dict[str, Any]] = []
    for round_number in range(1, plan.rounds + 1):
        work = base / f"consume-{round_number}"
        work.mkdir()
        for result in _consume_round(plan, work, round_number):
            results.append(result)
            log(progress.consumed(round_number, result))
        remove(work)
    return results


# Consumers popping while mail arrives, in the drain part; and how much of
# what was delivered may still wait when the load ends, for them to keep up.
DRAINERS = 2
DRAIN_SESSIONS = 16
KEEP_UP = 0.05


def drain(plan: Plan, base: Path, log: Log) -> list[dict[str, Any]]:
    """Two consumers of one queue against one ``serve`` at 16 sessions, at the same time.

    The consumers run ``postoffice.consume()``, the loop of
    docs/consumers.md, at each of ``DRAIN_LOOPS`` pops a commit, through
    the URI ``serve`` prints, and are in place
    before the load starts.  The queue's depth when ``smtp-source`` ends
    says whether they kept up; then they are told to stop once the queue is
    empty, and every message must have been popped exactly once (the
    counts add up, nothing left).
    """
    results: list[dict[str, Any]] = []
    for round_number in range(1, plan.rounds + 1):
        for per_commit in DRAIN_LOOPS:
            work = base / f"drain-{round_number}-{per_commit}"
            work.mkdir()
            result = _drain_round(plan, work, round_number, per_commit)
            results.append(result)
            log(progress.drained(round_number, result))
            remove(work)
    return results


def _drain_round(plan: Plan, work: Path, round_number: int, per_commit: int) -> dict[str, Any]:
    server = PostofficeServer(work)
    result: dict[str, Any] = {"per_commit": per_commit, "messages": plan.messages}
    stop_file = work / "stop"
    limit = max(120.0, plan.messages / 20)
    try:
        with running(server):
            uri = server.consumer_uri()
            if uri is None:
                raise BenchError("serve printed no consumer URI (share = no?)")
            consumers = drivers.start_drainers(uri, stop_file, DRAINERS, per_commit, limit)
            try:
                helo = f"r{round_number}.drain{per_commit}.{work.name}.bench"
                result["seconds"] = drivers.smtp_source(
                    server.socket, DRAIN_SESSIONS, KIB, plan.messages, helo
                )
                result["depth"] = drivers.queue_length(uri)
            finally:
                stop_file.touch()
                popped = drivers.finish_drainers(consumers, limit)
            result["consumers"] = popped
            left = server.stop()
            result["serve_commits"] = server.transactions
            result["serve_conflicts"] = server.conflicts
        total = sum(int(p["popped"]) for p in popped)
        if total != plan.messages or left != 0:
            result["error"] = f"popped {total} of {plan.messages}, {left} left in the queue"
    except BenchError as exc:
        result["error"] = f"{exc} [{server.output()[-300:]}]"
    return result


# The servers part: the storage servers, and the serves a case runs against one.
BACKENDS = ("zeo", "postgres")
SERVE_COUNTS = (1, 2)


def shared_servers(plan: Plan, base: Path, log: Log) -> list[dict[str, Any]]:
    """One serve against two on one depot in a storage server, two consumers popping.

    On a stock ZEO server (``runzeo`` with postfix-examples/zeo.conf) and on
    RelStorage in a private PostgreSQL server, each case on a fresh depot:
    1 KiB messages, 16 ``smtp-source`` sessions into one serve, or 8 into
    each of two serves at the same time (same configuration but for the
    socket); two consumers (``postoffice.consume()``, as docs/consumers.md
    recommends) in place before the load starts and stopped once the queue is
    empty.  Every message must have been popped exactly once, and the
    conflicts every serve and consumer retried are kept beside their
    commits.  A PostgreSQL that cannot start makes its rows errors.
    """
    results: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        cluster: Any = None
        cluster_error = None
        if "postgres" in BACKENDS:
            try:
                cluster = stack.enter_context(storages.postgres_cluster(base))
            except BenchError as exc:
                cluster_error = str(exc)
        for round_number in range(1, plan.rounds + 1):
            for backend in BACKENDS:
                for serves in SERVE_COUNTS:
                    work = base / f"servers-{round_number}-{backend}-{serves}"
                    work.mkdir()
                    result: dict[str, Any] = {
                        "backend": backend,
                        "serves": serves,
                        "messages": plan.messages,
                        "round": round_number,
                    }
                    if backend == "postgres" and cluster is None:
                        result["error"] = f"PostgreSQL: {cluster_error}"
                    else:
                        result |= _served_round(plan, work, backend, serves, cluster)
                    results.append(result)
                    log(progress.served(result))
                    remove(work)
    return results


def _served_round(plan: Plan, work: Path, backend: str, count: int, cluster: Any) -> dict[str, Any]:
    result: dict[str, Any] = {}
    limit = max(120.0, plan.messages / 20)
    serves: list[SharedPostofficeServer] = []
    try:
        with contextlib.ExitStack() as stack:
            if backend == "zeo":
                depot = stack.enter_context(storages.zeo_depot(work / "zeo"))
            else:
                database = work.name.replace("-", "_")
                depot = storages.postgres_depot(cluster, database, work / "blobs")
            for number in range(1, count + 1):
                folder = work / f"serve-{number}"
                folder.mkdir()
                serve = SharedPostofficeServer(folder, depot.uri, storages.free_port())
                serves.append(serve)
                stack.enter_context(running(serve))
            stop_file = work / "stop"
            consumers = drivers.start_drainers(
                depot.uri, stop_file, DRAINERS, RECOMMENDED_LOOP, limit
            )
            try:
                sessions = DRAIN_SESSIONS // count
                share = plan.messages // count
                loads = [
                    (
                        serve.socket,
                        sessions,
                        plan.messages - share * (count - 1) if number == 0 else share,
                        f"{work.name}.s{number}.bench",
                    )
                    for number, serve in enumerate(serves)
                ]
                result["seconds"] = drivers.smtp_sources(loads, KIB)
                result["depth"] = drivers.queue_length(depot.uri)
            finally:
                stop_file.touch()
                popped = drivers.finish_drainers(consumers, limit)
            result["consumers"] = popped
            accepted = sum(serve.stop() for serve in serves)
            result["serve_commits"] = [serve.transactions for serve in serves]
            result["serve_conflicts"] = [serve.conflicts for serve in serves]
            result["logged_errors"] = [
                line for serve in serves for line in serve.errors_logged()
            ] + depot.errors_logged()
            left = drivers.queue_length(depot.uri)
        total = sum(int(p["popped"]) for p in popped)
        if total != plan.messages or left != 0 or accepted != plan.messages:
            result["error"] = (
                f"popped {total} of {plan.messages} ({accepted} accepted), {left} left in the queue"
            )
    except BenchError as exc:
        output = " ".join(serve.output() for serve in serves).strip()
        result["error"] = f"{exc} [{output[-300:]}]" if output else str(exc)
    return result


def inline_or_blob(plan: Plan, base: Path, log: Log) -> list[dict[str, Any]]:
    """Store cost of a message kept inline in its record against one in a blob file.

    Straight through ``Depot.deliver_batch`` (no LMTP), one message a
    commit and ``BLOB_BATCH`` a commit, for the sizes around the
    threshold in ``postoffice/store/records.py``.
    """
    results = []
    for size in BLOB_SIZES:
        for batch in (1, BLOB_BATCH):
            work = base / f"blob-{size}-{batch}"
            work.mkdir()
            depot = PostofficeServer(work)
            depot.write_config()
            count = max(batch, plan.blob_messages * 64 * KIB // max(size, 64 * KIB))
            os.sync()
            try:
                result = drivers.inline_or_blob(depot.config, size, count, batch)
            except BenchError as exc:
                result = {"size": size, "batch": batch, "error": str(exc)}
            results.append(result)
            log(progress.inline_or_blob(result))
            remove(work)
    return results


def profile(plan: Plan, base: Path, log: Log) -> dict[str, Any]:
    """py-spy on the postoffice server during a 1 KiB x 16 sessions run."""
    spy = shutil.which("py-spy")
    if spy is None:
        return {"error": "py-spy not installed (pip install py-spy)"}
    work = base / "profile"
    work.mkdir()
    seed = make_seed(plan, base, log, "profile-seed")[0] / "var" if plan.profile_full else None
    server = servers.create(plan.profile_server, work, seed)
    raw = work / "profile.txt"
    messages = int(plan.profile)
    result: dict[str, Any] = {"messages": messages}
    try:
        with running(server):
            assert server.proc is not None
            with recording(spy, server.proc.pid, raw, work / "py-spy.err", plan.profile_gil):
                time.sleep(1.0)
                seconds = drivers.smtp_source(
                    server.socket, max(plan.sessions), KIB, messages, f"profile.{work.name}.bench"
                )
            result["rate"] = messages / seconds
            result["delivered"] = server.stop()
        result["summary"] = summarize_profile(raw, seconds, PROFILE_RATE)
        kept = Path(tempfile.gettempdir()) / "postoffice-bench-profile.txt"
        shutil.copy(raw, kept)
        result["raw"] = str(kept)
    except (BenchError, OSError) as exc:
        result["error"] = f"{exc} [{tail(work / 'py-spy.err')}]"
    log(f"profile: {result.get('error') or result['raw']}")
    remove(work)
    return result


# Each part, in the order a run takes them: the field of ``Results`` it fills, and how.
PARTS: dict[str, tuple[str, Callable[[Plan, Path, Log], Any]]] = {
    "throughput": ("samples", throughput),
    "scale": ("scaled", scale),
    "rss": ("rss", peak_rss),
    "consume": ("consumed", consumer),
    "drain": ("drained", drain),
    "servers": ("served", shared_servers),
    "blob": ("blobs", inline_or_blob),
    "relay": ("relayed", through_postfix),
    "profile": ("profiled", profile),
}


def run(plan: Plan, base: Path, log: Log) -> Results:
    """The parts the plan asks for, in the order of ``PARTS``."""
    results = Results()
    for part, (name, experiment) in PARTS.items():
        if part in plan.parts:
            setattr(results, name, experiment(plan, base, log))
    return results
