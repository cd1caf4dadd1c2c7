"""The report on stdout: markdown tables of the medians, and the targets, met or not.

Medians only: a run that did not count is left out of them (and listed),
so one failed run shows as a gap, never as a low number.  The ratios of
postoffice to each peer are taken within the one invocation, as the
rounds were interleaved for that.  What the targets (``targets.py``) are
judged on is worked out apart from the text, by ``measures``, so that a
table and a target can never disagree about a number's meaning.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from common import DRAIN_LOOPS, KIB, RECOMMENDED_LOOP, Plan, Results, Sample, human_size
from progress import describe
from servers import OURS, SERVER_LABELS, SERVERS
from targets import TARGETS, through_postfix, vs_peer

# A target as reported (and written to --json): what, measured, met, share = no, met.
Row = tuple[str, str, bool | None, str, bool | None]
# A measure for the default path and for share = no.
Measure = tuple[float | None, float | None]
Rates = dict[tuple[int, int, str], float | None]


# --- figures --------------------------------------------------------------------------------


def cases(plan: Plan) -> list[tuple[int, int]]:
    return [(size, sessions) for size in plan.sizes for sessions in plan.sessions]


def median_rate(samples: Sequence[Sample]) -> float | None:
    rates = [s.rate for s in samples if s.rate is not None]
    return statistics.median(rates) if rates else None


def median_rates(plan: Plan, samples: Sequence[Sample]) -> Rates:
    """Messages a second per (size, sessions, server), the median over the rounds."""
    return {
        (size, sessions, kind): median_rate(counted(samples, kind, size, sessions))
        for size, sessions in cases(plan)
        for kind in plan.servers
    }


def counted(samples: Sequence[Sample], kind: str, size: int, sessions: int) -> list[Sample]:
    """The runs of one server and case that count."""
    return [
        s
        for s in samples
        if (s.server, s.size, s.sessions) == (kind, size, sessions) and s.rate is not None
    ]


def ratio(mine: float | None, theirs: float | None) -> float | None:
    return mine / theirs if mine and theirs else None


def peer_ratio(rates: Rates, kind: str, size: int, sessions: int, peer: str) -> float | None:
    return ratio(rates.get((size, sessions, kind)), rates.get((size, sessions, peer)))


def on_depot(scaled: Sequence[Sample], kind: str, depot: str) -> list[Sample]:
    """The scale part's runs of ``kind`` on the ``empty`` or the ``full`` depot."""
    return [s for s in scaled if s.server == kind and s.extra["depot"] == depot]


def depot_rate(scaled: Sequence[Sample], kind: str, depot: str) -> float | None:
    return median_rate(on_depot(scaled, kind, depot))


def peak_mib(result: dict[str, Any]) -> float | None:
    return None if "error" in result else result["hwm_kib"] / KIB


def consumer_rates(consumed: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Pops (or for zeo-floor, commits) a second per loop, the median over the rounds."""
    rates: dict[str, float | None] = {}
    for mode in ("zeo", "zeo-batch", "zeo-floor", "file"):
        good = [r for r in consumed if r.get("mode") == mode and "error" not in r]
        rates[mode] = statistics.median(r["popped"] / r["seconds"] for r in good) if good else None
    return rates


def drain_depths(drained: Sequence[dict[str, Any]]) -> dict[int, float | None]:
    """Per loop (pops a commit): queue depth at the end of the load over what was delivered."""
    depths: dict[int, float | None] = {}
    for per_commit in DRAIN_LOOPS:
        good = _drained(drained, per_commit)
        depths[per_commit] = _depth(good) if good else None
    return depths


def _drained(drained: Sequence[dict[str, Any]], per_commit: int) -> list[dict[str, Any]]:
    """The rounds of one loop that ran without an error."""
    return [r for r in drained if r["per_commit"] == per_commit and "error" not in r]


def _depth(good: Sequence[dict[str, Any]]) -> float:
    """Queued when the load ended, of what was delivered: the median of the rounds."""
    return statistics.median(r["depth"] / r["messages"] for r in good)


def drain_lines(drained: Sequence[dict[str, Any]]) -> list[str]:
    if not drained:
        return []
    lines = ["", "Two consumers popping while one serve takes 1 KiB x 16 sessions, medians:", ""]
    lines += [
        "| loop | delivered msgs/s | popped msgs/s, both | left queued at the end "
        "| serve's conflicts retried, of all commits in the depot |"
    ]
    lines += ["|---|---:|---:|---:|---:|"]
    for per_commit in DRAIN_LOOPS:
        good = _drained(drained, per_commit)
        if not good:
            continue
        delivered = statistics.median(r["messages"] / r["seconds"] for r in good)
        popped = statistics.median(
            sum(c["popped"] for c in r["consumers"]) / max(c["seconds"] for c in r["consumers"])
            for r in good
        )
        depth = _depth(good)
        conflicts = [
            r["serve_conflicts"] / r["serve_commits"]
            for r in good
            if r.get("serve_conflicts") is not None and r.get("serve_commits")
        ]
        retried = f"{statistics.median(conflicts):.1%}" if conflicts else "not logged"
        lines.append(
            f"| {per_commit} a commit | {delivered:,.0f} | {popped:,.0f} | {depth:.1%} "
            f"| {retried} |"
        )
    lines += [f"- drain error: {r['error'][-300:]}" for r in drained if "error" in r]
    return lines


BACKEND_LABELS = {"zeo": "stock ZEO server", "postgres": "RelStorage on PostgreSQL"}


def _served(served: Sequence[dict[str, Any]], backend: str, serves: int) -> list[dict[str, Any]]:
    """The rounds of one case of the servers part that ran without an error."""
    return [
        r for r in served if (r["backend"], r["serves"]) == (backend, serves) and "error" not in r
    ]


def served_rate(served: Sequence[dict[str, Any]], backend: str, serves: int) -> float | None:
    """Messages a second, all serves together, first start to last finish: the median."""
    good = _served(served, backend, serves)
    return statistics.median(r["messages"] / r["seconds"] for r in good) if good else None


def retried(result: dict[str, Any]) -> dict[str, tuple[int, int] | None]:
    """Conflicts retried and commits, of the serves, of the consumers, and of both.

    A consumer's retries are the conflicts postoffice retried inside
    ``pop_next()`` and the transient errors its loop aborted; its commits,
    those of its loop and of its claims.  None for the serves when one did
    not log its line.
    """
    consumers = result["consumers"]
    mine = (
        sum(int(c["conflicts_retried"]) + int(c["transient"]) for c in consumers),
        sum(int(c["commits"]) + int(c.get("claim_commits", 0)) for c in consumers),
    )
    conflicts = result["serve_conflicts"]
    if any(c is None for c in conflicts):
        return {"serves": None, "consumers": mine, "all": None}
    serves = (sum(conflicts), sum(result["serve_commits"]))
    return {"serves": serves, "consumers": mine, "all": (serves[0] + mine[0], serves[1] + mine[1])}


def retried_share(
    served: Sequence[dict[str, Any]], backend: str, serves: int, whose: str
) -> float | None:
    """Conflicts retried of commits made, by ``whose`` (serves, consumers, all): the median."""
    shares = [
        counts[0] / counts[1]
        for r in _served(served, backend, serves)
        if (counts := retried(r)[whose]) is not None and counts[1]
    ]
    return statistics.median(shares) if shares else None


def served_lines(served: Sequence[dict[str, Any]]) -> list[str]:
    if not served:
        return []
    rows = []
    for backend, label in BACKEND_LABELS.items():
        one = served_rate(served, backend, 1)
        for serves in sorted({r["serves"] for r in served}):
            if not _served(served, backend, serves):
                rows.append([label, str(serves), "error", "", "", "", "", ""])
                continue
            rate = served_rate(served, backend, serves)
            good = _served(served, backend, serves)
            rows.append(
                [
                    label,
                    str(serves),
                    fmt_rate(rate),
                    fmt(ratio(rate, one), "x") if serves > 1 else "-",
                    *(
                        fmt(retried_share(served, backend, serves, whose), "%", "not logged")
                        for whose in ("serves", "consumers", "all")
                    ),
                    f"{statistics.median(r['depth'] / r['messages'] for r in good):.1%}",
                ]
            )
    head = [
        "depot",
        "serves",
        "msgs/s, all serves",
        "/ 1 serve",
        "serves' conflicts retried, of their commits",
        "consumers'",
        "both",
        "queued when the load ended",
    ]
    errors = [r for r in served if "error" in r]
    logged = [line for r in served for line in r.get("logged_errors", [])]
    return [
        "",
        "One serve against two on one shared depot, 1 KiB x 16 sessions in all (8 into each "
        f"of two), two consumers running consume() (up to {RECOMMENDED_LOOP} pops a commit), "
        "medians:",
        "",
        *table(head, rows),
        *(
            f"- servers error, {r['backend']}, {r['serves']} serves, round {r['round']}: "
            f"{r['error'][-300:]}"
            for r in errors
        ),
        *([f"- {len(logged)} ERROR lines logged, the first: {logged[0]}"] if logged else []),
    ]


def measures_of_servers(served: Sequence[dict[str, Any]]) -> dict[str, Measure]:
    """Per storage: the rate of two serves over one, the conflicts retried with two, and
    what was left queued at the end of the load with one."""
    measured: dict[str, Measure] = {}
    for backend in BACKEND_LABELS:
        two = served_rate(served, backend, 2)
        measured[f"{backend} 2 / 1"] = (ratio(two, served_rate(served, backend, 1)), None)
        shares = [retried_share(served, backend, 2, whose) for whose in ("serves", "consumers")]
        known = [share for share in shares if share is not None]
        measured[f"{backend} retried"] = (max(known) if len(known) == 2 else None, None)
        one = _served(served, backend, 1)
        depth = statistics.median(r["depth"] / r["messages"] for r in one) if one else None
        measured[f"{backend} depth"] = (depth, None)
    return measured


def through_zeo(consumed: Sequence[dict[str, Any]]) -> bool:
    """Whether serve printed a consumer URI, so the loops through ZEO ran."""
    return any(r.get("mode") == "zeo" for r in consumed)


# --- formatting -----------------------------------------------------------------------------


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def fmt_rate(rate: float | None) -> str:
    return "error" if rate is None else f"{rate:,.0f}"


def fmt(value: float | None, unit: str, absent: str = "not measured") -> str:
    if value is None:
        return absent
    if unit == "%":
        return f"{value:.1%}"
    return f"{value:.2f}" if unit == "x" else f"{value:,.0f} {unit}"


def mark(met: bool | None) -> str:
    return "n/a" if met is None else ("yes" if met else "NO")


def case_cells(size: int, sessions: int) -> list[str]:
    return [human_size(size), str(sessions)]


def labels(kinds: Sequence[str]) -> list[str]:
    return [SERVER_LABELS[k] for k in kinds]


# --- throughput -----------------------------------------------------------------------------


def rate_lines(plan: Plan, rates: Rates) -> list[str]:
    rounds = f"median of {plan.rounds} round{'s' if plan.rounds > 1 else ''}"
    rows = [
        case_cells(size, sessions) + [fmt_rate(rates[size, sessions, k]) for k in plan.servers]
        for size, sessions in cases(plan)
    ]
    return [
        f"Messages per second, {rounds}:",
        "",
        *table(["size", "sessions", *labels(plan.servers)], rows),
    ]


def ratio_lines(plan: Plan, rates: Rates, ours: list[str], peers: list[str]) -> list[str]:
    if not (ours and peers):
        return []
    head = ["size", "sessions"] + [
        f"{SERVER_LABELS[o]} / {SERVER_LABELS[p]}" for o in ours for p in peers
    ]
    rows = [
        case_cells(size, sessions)
        + [fmt(peer_ratio(rates, o, size, sessions, p), "x", "-") for o in ours for p in peers]
        for size, sessions in cases(plan)
    ]
    return ["", "Ratios, ours / peer (same run):", "", *table(head, rows)]


def cpu_cell(ok: Sequence[Sample]) -> str:
    if not ok:
        return "-"
    per_msg = statistics.median(1000 * s.cpu_seconds / s.messages for s in ok)
    system = statistics.median(1000 * s.cpu_system_seconds / s.messages for s in ok)
    return f"{per_msg:.2f} ({system:.2f})"


def cpu_lines(plan: Plan, samples: Sequence[Sample]) -> list[str]:
    rows = [
        case_cells(size, sessions)
        + [cpu_cell(counted(samples, kind, size, sessions)) for kind in plan.servers]
        for size, sessions in cases(plan)
    ]
    return [
        "",
        "Server CPU per message in ms, user + system (system alone in brackets), "
        "all its processes, medians:",
        "",
        *table(["size", "sessions", *labels(plan.servers)], rows),
    ]


def store_cells(ok: Sequence[Sample]) -> list[str]:
    """Messages a commit and Data.fs bytes a message, or dashes where commits are unknown."""
    commits = [s.extra.get("transactions", 0) for s in ok]
    if not ok or not all(commits):
        return ["-", "-"]
    batch = statistics.median(s.messages / c for s, c in zip(ok, commits, strict=True))
    written = statistics.median(s.extra["bytes_per_message"] for s in ok)
    return [f"{batch:.1f}", f"{written:,.0f}"]


def store_lines(plan: Plan, samples: Sequence[Sample], ours: list[str]) -> list[str]:
    if not ours:
        return []
    head = ["size", "sessions"] + [
        f"{SERVER_LABELS[k]} {what}" for k in ours for what in ("msgs/commit", "Data.fs B/msg")
    ]
    rows = [
        case_cells(size, sessions)
        + [cell for kind in ours for cell in store_cells(counted(samples, kind, size, sessions))]
        for size, sessions in cases(plan)
    ]
    return ["", "Group commit and write volume, medians:", "", *table(head, rows)]


def server_lines(plan: Plan, results: Results, ours: list[str]) -> list[str]:
    """What each server is, how ours held its storage, and the runs that did not count."""
    lines = ["", "Servers:"]
    lines += [f"- {SERVER_LABELS[k]}: {SERVERS[k].note}" for k in plan.servers]
    for kind in ours:
        storage = next(
            (
                s.extra["storage"]
                for s in results.samples
                if s.server == kind and "storage" in s.extra
            ),
            None,
        )
        if storage:
            lines.append(f"- {SERVER_LABELS[kind]} ran with: {storage}.")
    errors = [s for s in results.samples + results.scaled if s.error]
    if errors:
        lines += ["", f"{len(errors)} runs did not count:"]
        lines += [f"- {describe(s)}" for s in errors]
    return lines


def throughput_lines(plan: Plan, results: Results, rates: Rates) -> list[str]:
    if not results.samples:
        return []
    ours = [k for k in OURS if k in plan.servers]
    peers = [k for k in plan.servers if k not in OURS]
    return [
        *rate_lines(plan, rates),
        *ratio_lines(plan, rates, ours, peers),
        *cpu_lines(plan, results.samples),
        *store_lines(plan, results.samples, ours),
        *server_lines(plan, results, ours),
    ]


def measures_of_throughput(plan: Plan, rates: Rates) -> dict[str, Measure]:
    """Every ratio of ours to a peer in this run, by ``targets.vs_peer``."""
    return {
        vs_peer(size, sessions, peer): (
            peer_ratio(rates, "postoffice", size, sessions, peer),
            peer_ratio(rates, "po-direct", size, sessions, peer),
        )
        for size, sessions in cases(plan)
        for peer in plan.servers
        if peer not in OURS
    }


# --- the other parts ------------------------------------------------------------------------


def scale_lines(plan: Plan, scaled: Sequence[Sample]) -> list[str]:
    lines: list[str] = []
    for kind in OURS:
        if not any(s.server == kind for s in scaled):
            continue
        full, empty = depot_rate(scaled, kind, "full"), depot_rate(scaled, kind, "empty")
        written = [
            [
                s.extra["bytes_per_message"]
                for s in on_depot(scaled, kind, depot)
                if s.rate is not None
            ]
            for depot in ("full", "empty")
        ]
        grows = (
            f" (Data.fs grows {statistics.median(written[0]):,.0f} and "
            f"{statistics.median(written[1]):,.0f} B/msg)."
            if all(written)
            else "."
        )
        lines += [
            "",
            f"{SERVER_LABELS[kind]} with {plan.prefill:,} messages queued and ledgered, "
            f"1 KiB x {max(plan.sessions)} sessions: {fmt_rate(full)} msgs/s; "
            f"empty depot: {fmt_rate(empty)} msgs/s{grows}",
        ]
    return lines


def measures_of_scale(scaled: Sequence[Sample]) -> dict[str, Measure]:
    mine, direct = (
        ratio(depot_rate(scaled, kind, "full"), depot_rate(scaled, kind, "empty")) for kind in OURS
    )
    return {"full / empty": (mine, direct)}


def relay_rate(relayed: Sequence[Sample], kind: str, size: int) -> float | None:
    """Median messages a second behind Postfix, first SMTP connection to last one stored."""
    return median_rate([s for s in relayed if (s.server, s.size) == (kind, size)])


def relay_cpu_ms(relayed: Sequence[Sample], kind: str, size: int, whose: str) -> str:
    """Median CPU a message of Postfix (``whose`` = "postfix") or of the server behind it."""
    ok = [s for s in relayed if (s.server, s.size) == (kind, size) and s.rate is not None]
    spent = [
        s.extra.get("postfix_cpu_seconds", 0.0) if whose == "postfix" else s.cpu_seconds for s in ok
    ]
    if not ok or not all(spent):
        return "-"
    return f"{statistics.median(c / s.messages for c, s in zip(spent, ok, strict=True)) * 1000:.2f}"


def relay_lines(plan: Plan, relayed: Sequence[Sample]) -> list[str]:
    if not relayed:
        return []
    rows = []
    for size in plan.sizes:
        sink, ours = relay_rate(relayed, "sink", size), relay_rate(relayed, "postoffice", size)
        rows.append(
            [
                human_size(size),
                fmt_rate(sink),
                fmt_rate(ours),
                fmt(ratio(ours, sink), "x"),
                relay_cpu_ms(relayed, "sink", size, "postfix"),
                relay_cpu_ms(relayed, "postoffice", size, "postfix"),
                relay_cpu_ms(relayed, "postoffice", size, "server"),
            ]
        )
    failed = [f"- {describe(s)}" for s in relayed if s.rate is None]
    return [
        "",
        f"Through a private Postfix (smtp-source, {relayed[0].sessions} SMTP sessions -> "
        "smtpd, cleanup, qmgr, lmtp -> the server): msgs/s from the first SMTP "
        "connection to the last message stored",
        "",
        *table(
            [
                "size",
                "smtp-sink -L",
                "postoffice",
                "postoffice / sink",
                "Postfix CPU ms/msg, to smtp-sink",
                "Postfix CPU ms/msg, to postoffice",
                "postoffice CPU ms/msg",
            ],
            rows,
        ),
        *failed,
    ]


def measures_of_relay(plan: Plan, relayed: Sequence[Sample]) -> dict[str, Measure]:
    return {
        through_postfix(size): (
            ratio(relay_rate(relayed, "postoffice", size), relay_rate(relayed, "sink", size)),
            None,
        )
        for size in plan.sizes
    }


def rss_line(kind: str, result: dict[str, Any]) -> str:
    label = SERVER_LABELS[result.get("kind", kind)]
    if "error" in result:
        return f"Peak RSS of {label}: error: {result['error']}"
    limit_note = (
        f" (max_message_size = {result['max_message_size']})" if result["max_message_size"] else ""
    )
    return (
        f"Peak RSS of {label} with {result['sessions']} concurrent "
        f"{human_size(result['message_bytes'])} messages{limit_note}: "
        f"{result['hwm_kib'] / KIB:,.0f} MiB over {result['processes']} process(es) "
        f"(idle before: {result['rss_idle_kib'] / KIB:,.0f} MiB; "
        f"sent in {result['seconds']:.1f}s)."
    )


def rss_lines(rss: dict[str, dict[str, Any]]) -> list[str]:
    return [line for kind, result in rss.items() for line in ("", rss_line(kind, result))]


def measures_of_rss(rss: dict[str, dict[str, Any]]) -> dict[str, Measure]:
    """Peak MiB of ``--rss-size`` messages, and (``40m``) of 40 MiB ones under a 50 MiB limit."""
    measured: dict[str, Measure] = {}
    for suffix, measure in (("", "peak MiB"), (".40m", "peak MiB 40m")):
        mine, direct = (
            peak_mib(rss[kind + suffix]) if kind + suffix in rss else None for kind in OURS
        )
        measured[measure] = (mine, direct)
    return measured


def consumer_lines(consumed: Sequence[dict[str, Any]]) -> list[str]:
    if not consumed:
        return []
    by_mode = consumer_rates(consumed)
    text = (
        "Consumer pop-and-commit, one commit per message: "
        f"{fmt_rate(by_mode['file'])} msgs/s on the file:// depot with serve stopped"
    )
    if through_zeo(consumed):
        text += (
            f"; {fmt_rate(by_mode['zeo'])} msgs/s through the ZEO server of a running "
            "serve (the URI it prints).  Through ZEO, ten pops a commit: "
            f"{fmt_rate(by_mode['zeo-batch'])} msgs/s; bare one-object commits through "
            f"the same URI: {fmt_rate(by_mode['zeo-floor'])} a second (the ceiling of "
            "any loop that commits once a message)"
        )
    errors = [f"- consumer error: {r['error'][-300:]}" for r in consumed if "error" in r]
    return ["", text + ".", *errors]


# --- the targets ----------------------------------------------------------------------------


def measures(plan: Plan, results: Results, rates: Rates) -> dict[str, dict[str, Measure]]:
    """The measures of each part that ran, by the part names ``targets.TARGETS`` uses."""
    measured: dict[str, dict[str, Measure]] = {}
    if results.samples and any(k in plan.servers for k in OURS):
        measured["throughput"] = measures_of_throughput(plan, rates)
    if results.scaled:
        measured["scale"] = measures_of_scale(results.scaled)
    if results.rss and any(k in results.rss for k in OURS):
        measured["rss"] = measures_of_rss(results.rss)
    if results.relayed:
        measured["relay"] = measures_of_relay(plan, results.relayed)
    if results.drained:
        depths = drain_depths(results.drained)
        measured["drain"] = {f"{n} a commit": (depths[n], None) for n in depths}
    if results.served:
        measured["servers"] = measures_of_servers(results.served)
    if results.consumed:
        by_mode = consumer_rates(results.consumed)
        measured["consume"] = {"file": (by_mode["file"], by_mode["file"])}
        if through_zeo(results.consumed):
            measured["consume-zeo"] = {mode: (by_mode[mode], None) for mode in ("zeo", "zeo-batch")}
    return measured


def figures(plan: Plan, results: Results) -> dict[str, Any]:
    """What the targets' names and thresholds take from the run."""
    found: dict[str, Any] = {"prefill": plan.prefill}
    for result in (results.rss or {}).values():
        found["limit"] = result["limit_kib"] / KIB
    if results.consumed:
        found["floor"] = fmt(consumer_rates(results.consumed)["zeo-floor"], "a second")
    return found


def judge(measured: dict[str, dict[str, Measure]], found: dict[str, Any]) -> list[Row]:
    """One row for each target whose part ran, in the order of the table."""
    rows: list[Row] = []
    for target in TARGETS:
        if target.part not in measured:
            continue
        value, direct = measured[target.part].get(target.measure, (None, None))
        threshold = target.threshold
        if isinstance(threshold, str):
            threshold = found[threshold]
        rows.append(
            (
                target.name.format_map(found),
                fmt(value, target.unit),
                target.met(value, threshold),
                fmt(direct, target.unit, target.absent),
                target.met(direct, threshold),
            )
        )
    return rows


def target_lines(rows: list[Row]) -> list[str]:
    if not rows:
        return []
    return [
        "",
        "Targets (judged on the default path; share = no beside it):",
        "",
        *table(
            ["target", "postoffice", "met", "share = no", "met"],
            [[n, v, mark(m), dv, mark(dm)] for n, v, m, dv, dm in rows],
        ),
    ]


# --- after the targets ----------------------------------------------------------------------


def blob_table(results: Sequence[dict[str, Any]]) -> str:
    """Inline against blob: ms per message and bytes written per message."""
    lines = [
        "Inline or blob (Depot.deliver_batch straight, no LMTP): ms per message, "
        "and Data.fs + blob bytes per message",
        "",
        "| size | msgs/commit | inline ms | blob ms | inline Data.fs B | blob Data.fs + file B |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {human_size(r['size'])} | {r['batch']} | error | | | |")
            continue
        inline, blob = r["inline"], r["blob"]
        lines.append(
            f"| {human_size(r['size'])} | {r['batch']} | {inline['ms_per_message']:.2f} | "
            f"{blob['ms_per_message']:.2f} | {inline['data_fs_bytes_per_message']:,.0f} | "
            f"{blob['data_fs_bytes_per_message']:,.0f} + {blob['blob_bytes_per_message']:,.0f} |"
        )
    return "\n".join(lines)


def profile_heading(plan: Plan, profiled: dict[str, Any]) -> str:
    gil = " (only samples holding the GIL)" if plan.profile_gil else ""
    return (
        f"\nProfile of {SERVER_LABELS[plan.profile_server]}{gil}"
        f"{' on a pre-filled depot' if plan.profile_full else ''}, "
        f"{profiled['messages']} x 1 KiB over "
        f"{max(plan.sessions)} sessions ({profiled['rate']:,.0f} msgs/s under py-spy):\n"
    )


def render(plan: Plan, results: Results) -> tuple[str, list[Row]]:
    """All of stdout, and the targets with whether each is met (for --json)."""
    rates = median_rates(plan, results.samples)
    rows = judge(measures(plan, results, rates), figures(plan, results))
    lines = [
        *throughput_lines(plan, results, rates),
        *scale_lines(plan, results.scaled),
        *rss_lines(results.rss or {}),
        *consumer_lines(results.consumed),
        *drain_lines(results.drained),
        *served_lines(results.served),
        *relay_lines(plan, results.relayed),
        *target_lines(rows),
    ]
    parts = ["\n".join(lines)]
    if results.blobs:
        parts += ["", blob_table(results.blobs)]
    if results.profiled is not None and "summary" in results.profiled:
        parts += [profile_heading(plan, results.profiled), results.profiled["summary"]]
    return "\n".join(parts), rows
