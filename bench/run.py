"""postoffice against its peers, in one run: ``python3 bench/run.py``.

Each server is started in turn on a unix socket in a fresh temporary
folder with a fresh store, driven by Postfix's own LMTP client
``smtp-source -L`` with connections kept open across messages (``-d``, as
Postfix's connection cache does under load), stopped, and its delivered
count checked against what was sent.  A run whose count is wrong does not
count.  The peers:

- ``smtp-sink -L``: accepts and discards, the protocol limit;
- Dovecot's LMTP server delivering into Maildir with ``mail_fsync = always``,
  the production C delivery agent;
- ``bench/bare_lmtp.py``: aiosmtpd's LMTP answering 250 and storing
  nothing, the Python ceiling;
- ``postoffice serve`` on a ``file://`` FileStorage with blobs.

Rounds are interleaved (round 1 of every server and case, then round 2,
...) so that noise from other work on the machine spreads over all servers
alike; the table shows the median of the rounds, and the ratios of
postoffice to each peer come from the same invocation.  Then: throughput
with 100,000 messages already queued and in the duplicate ledger against
an empty depot, peak RSS with 16 concurrent 10 MiB messages, the
consumer's pop-and-commit rate, two consumers popping while serve takes
mail, and one serve against two on a shared ZEO or PostgreSQL depot.
``--quick`` does one round of everything with fewer messages, in about a
minute.

Needs: smtp-source and smtp-sink (Debian ``postfix``), Dovecot's LMTP
server (``dovecot-lmtpd``), PostgreSQL's server programs (``postgresql``),
the package installed with its ``postgresql`` and ``metrics`` extras;
``bench/run.sh`` installs them.  Dovecot and smtp-sink drop privileges to
``nobody`` when run as root.

This file is the command line only; the rest of the harness is split by
job so that each can be read (and changed) alone: ``servers.py`` starts
and counts the servers, ``drivers.py`` puts the load on them,
``experiments.py`` runs the parts, ``targets.py`` says what they are
judged by, ``report.py`` and ``progress.py`` write stdout and stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import common
import experiments
import report
from common import KIB, MIB, Plan, Results
from procs import find_tool
from servers import OURS, SERVERS, postoffice_available


def parse_sizes(text: str) -> list[int]:
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        factor = 1
        if part.endswith("k"):
            factor, part = KIB, part[:-1]
        elif part.endswith("m"):
            factor, part = MIB, part[:-1]
        sizes.append(int(part) * factor)
    return sizes


def build_plan(args: argparse.Namespace) -> Plan:
    quick = args.quick
    parts = {"throughput", "scale", "rss", "consume", "drain", "servers", "blob", "relay"}
    if args.only:
        parts = set(args.only.split(","))
    if args.profile:
        parts.add("profile")
    return Plan(
        servers=args.servers.split(","),
        sizes=parse_sizes(args.sizes),
        sessions=[int(s) for s in args.sessions.split(",")],
        rounds=args.rounds or (1 if quick else 3),
        messages=args.messages or (1000 if quick else 3000),
        sink_messages=args.sink_messages or (5000 if quick else 20000),
        prefill=args.prefill or (5000 if quick else 100_000),
        scale_messages=args.scale_messages or (1000 if quick else 10_000),
        rss_message=parse_sizes(args.rss_size)[0],
        rss_sessions=16,
        consume=args.consume or (1000 if quick else 3000),
        parts=parts,
        profile=args.profile_messages or (2000 if quick else 20000),
        profile_gil=args.profile_gil,
        profile_full=args.profile_full,
        profile_server=args.profile_server,
        blob_messages=100 if quick else 400,
    )


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="one round, fewer messages (~1 min)")
    parser.add_argument("--rounds", type=int, help="rounds per case (default 3; median shown)")
    parser.add_argument("--messages", type=int, help="messages per run (default 3000)")
    parser.add_argument(
        "--sink-messages", type=int, help="messages per smtp-sink run (default 20000)"
    )
    parser.add_argument(
        "--servers",
        default="sink,dovecot,bare,postoffice,po-direct",
        help="comma-separated, of sink,dovecot,bare,postoffice,po-direct (share = no)",
    )
    parser.add_argument("--sizes", default="1k,50k", help="message payload sizes (smtp-source -l)")
    parser.add_argument("--sessions", default="1,4,16", help="concurrent sessions (smtp-source -s)")
    parser.add_argument("--prefill", type=int, help="messages already queued (default 100000)")
    parser.add_argument(
        "--scale-messages", type=int, help="messages per run of the scale part (default 10000)"
    )
    parser.add_argument("--rss-size", default="10m", help="message size of the peak-RSS run")
    parser.add_argument("--consume", type=int, help="messages the consumer pops (default 3000)")
    parser.add_argument(
        "--only",
        help="comma-separated parts: throughput,scale,rss,consume,drain,servers,blob,relay,profile",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also profile the server with py-spy"
    )
    parser.add_argument("--profile-messages", type=int, help="messages sent while profiling")
    parser.add_argument(
        "--profile-gil",
        action="store_true",
        help="sample only the thread holding the GIL (py-spy --gil)",
    )
    parser.add_argument(
        "--profile-full",
        action="store_true",
        help="profile on a depot pre-filled with --prefill messages",
    )
    parser.add_argument(
        "--profile-server",
        choices=OURS,
        default="postoffice",
        help="which of ours to profile (po-direct: share = no)",
    )
    parser.add_argument("--json", type=Path, help="write every sample to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    return parser


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def exit_on_sigterm() -> None:
    """A timeout or a kill unwinds the run, so its servers are killed and its folder removed.

    The servers run in sessions of their own, so they do not get the
    signal; without this they would outlive a run stopped with SIGTERM.
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def write_json(path: Path, plan: Plan, results: Results, targets: list[report.Row]) -> None:
    """Every sample, for a script to read: the keys are a format, keep them."""
    path.write_text(
        json.dumps(
            {
                "plan": asdict(plan) | {"parts": sorted(plan.parts)},
                "samples": [asdict(s) | {"rate": s.rate} for s in results.samples],
                "scale": [asdict(s) | {"rate": s.rate} for s in results.scaled],
                "rss": results.rss,
                "consumer": results.consumed,
                "drain": results.drained,
                "servers": results.served,
                "profile": results.profiled,
                "inline_or_blob": results.blobs,
                "relay": [asdict(s) | {"rate": s.rate} for s in results.relayed],
                "targets": targets,
                "cpus": os.cpu_count(),
            },
            indent=2,
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = make_parser()
    args = options.parse_args(argv)
    common.KEEP = args.keep
    plan = build_plan(args)
    for kind in plan.servers:
        if kind not in SERVERS:
            options.error(f"unknown server {kind!r}")
    unknown = plan.parts - set(experiments.PARTS)
    if unknown:
        options.error(f"unknown parts: {', '.join(sorted(unknown))}")

    if find_tool("smtp-source") is None:
        log("bench: smtp-source not found; run bench/run.sh (installs Debian's postfix)")
        return 69
    why = postoffice_available()
    if why is not None:
        log(f"bench: postoffice serve cannot run here ({why}); measuring the peers only")
        plan.servers = [k for k in plan.servers if k not in OURS]
        plan.parts -= {"scale", "rss", "consume", "drain", "servers", "blob", "profile"}

    exit_on_sigterm()
    base = Path(tempfile.mkdtemp(prefix="po-bench-"))
    # Dovecot's and smtp-sink's unprivileged processes must reach their sockets and Maildir.
    base.chmod(0o755)
    log(f"bench: working in {base}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    started = time.monotonic()
    try:
        results = experiments.run(plan, base, log)
    finally:
        common.remove(base)
    text, targets = report.render(plan, results)
    print(text)
    log(f"bench: done in {time.monotonic() - started:.0f}s; load now {os.getloadavg()[0]:.2f}")
    if args.json:
        write_json(args.json, plan, results, targets)
    return 1 if results.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
