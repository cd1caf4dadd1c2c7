"""What sharing the embedded default costs: ``python3 bench/sharing.py``.

``postoffice serve`` on a ``file://`` depot with ``share`` (the default)
serves the FileStorage with ZEO's server in a thread, on a unix socket
beside it, and delivers as a ZEO client of that socket, so that consumers
can open the queues at the same time (``postoffice/embedded.py``).  This
measures deliveries per second through ``Depot.deliver_batch``, the call
the LMTP server makes:

- ``direct``: ``file://.../Data.fs?blobstorage_dir=...`` opened in-process
  (``share = no``);
- ``shared``: ``SharedDepot``'s own client (``SharedDepot.db``), as
  ``serve`` delivers by default;
- ``zeo``: another ZEO client of that server
  (``zeo://...?shared_blob_dir=true``), as ``postoffice-deliver`` is while
  ``serve`` runs;
- ``sqlite``, where RelStorage is installed: the measured alternative,
  ``sqlite://?data_dir=...&blob_dir=...&shared_blob_dir=true``, which
  several processes open at once with no server.  RelStorage runs SQLite
  in WAL mode with ``synchronous = NORMAL``, which does not sync at each
  commit ("it might lose a transaction" in an OS crash, says RelStorage),
  and the sqlite:// URI has no way to change that;
- ``sqlite-full``: the same storage built in code with
  ``synchronous = FULL``, so that a commit is on disk when it returns, as
  a 250 promises.

Cases: 1 KiB messages committed one per transaction and sixteen per
transaction (group commit), and 512 KiB messages one per transaction
(stored as blobs, written by the client straight into the shared blob
folder).  Each round starts from an empty depot in a fresh temporary
folder; rounds are interleaved so that noise on the machine spreads over
both ways alike, and the table shows the median.  Every delivery must be
answered 250, or the run stops.

    python3 bench/sharing.py [--messages 3000] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ZODB

from postoffice.config import Settings, loads
from postoffice.deliver import Delivery, Depot
from postoffice.embedded import SharedDepot

KIB = 1024
QUEUE = "Bench"
SENDER = "sender@client.bench.example"
RECIPIENT = "rcpt@app.bench.example"
CONFIG = f"""\
[post office]
zodb_uri = {{uri}}

[queue:{QUEUE}]
filters =
    to_hostname: app.bench.example
"""


@dataclass(frozen=True)
class Case:
    name: str
    size: int
    batch: int
    share: float  # of --messages: big messages are fewer


CASES = (
    Case("1 KiB, 1 a commit", KIB, 1, 1.0),
    Case("1 KiB, 16 a commit", KIB, 16, 1.0),
    Case("512 KiB (blob), 1 a commit", 512 * KIB, 1, 0.05),
)


def relstorage_installed() -> bool:
    try:
        import relstorage  # noqa: F401
    except ImportError:
        return False
    return True


WAYS: tuple[str, ...] = ("direct", "shared", "zeo")
if relstorage_installed():
    WAYS += ("sqlite", "sqlite-full")
HEADINGS = {
    "direct": "direct FileStorage",
    "shared": "shared (serve)",
    "zeo": "ZEO client",
    "sqlite": "sqlite:// (NORMAL)",
    "sqlite-full": "sqlite (FULL)",
}


def message(number: int, size: int) -> bytes:
    """A plain message of ``size`` bytes with a unique Message-Id (no duplicate discards)."""
    head = (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: bench {number}\r\n"
        f"Message-Id: <{number}.{time.time_ns()}@bench.example>\r\n\r\n"
    ).encode("ascii")
    line = b"x" * 78 + b"\r\n"
    body = (line * (size // len(line) + 1))[: max(size - len(head), 0)]
    return head + body


@contextmanager
def depot_for(way: str, folder: Path) -> Iterator[Depot]:
    """A Depot on the file, on the file shared as ``serve`` holds it, or through its ZEO."""
    uri = f"file://{folder}/Data.fs?blobstorage_dir={folder}/blobs"
    db = None
    if way.startswith("sqlite"):
        (folder / "sqlite").mkdir()
        uri = f"sqlite://?data_dir={folder}/sqlite&blob_dir={folder}/blobs&shared_blob_dir=true"
        if way == "sqlite-full":
            db = sqlite_full(folder)
    server = SharedDepot(uri).start() if way in ("shared", "zeo") else None
    if server is not None and way == "shared":
        db = server.db
    elif server is not None:
        uri = server.client_uri
    settings: Settings = loads(CONFIG.format(uri=uri), folder / "postoffice.ini")
    depot = Depot(settings, db=db)
    try:
        depot.prepare()
        yield depot
    finally:
        depot.close()
        if db is not None and server is None:
            db.close()
        if server is not None:
            server.stop()


def sqlite_full(folder: Path) -> ZODB.DB:
    """RelStorage on SQLite with ``synchronous = FULL``: what the URI cannot ask for."""
    from relstorage.adapters.sqlite.adapter import Sqlite3Adapter
    from relstorage.options import Options
    from relstorage.storage import RelStorage

    options = Options(blob_dir=str(folder / "blobs"), shared_blob_dir=True)
    adapter = Sqlite3Adapter(str(folder / "sqlite"), {"synchronous": 2}, options=options)
    return ZODB.DB(RelStorage(adapter, options=options))


def run_case(way: str, case: Case, count: int) -> float:
    """Deliveries per second for ``count`` messages, on an empty depot."""
    messages = [message(n, case.size) for n in range(count)]
    with tempfile.TemporaryDirectory(prefix="po-share.") as tmp, depot_for(way, Path(tmp)) as depot:
        started = time.perf_counter()
        for start in range(0, count, case.batch):
            batch = [
                Delivery(SENDER, (RECIPIENT,), raw) for raw in messages[start : start + case.batch]
            ]
            for outcomes in depot.deliver_batch(batch):
                if not outcomes[0].reply.startswith("250"):
                    raise SystemExit(f"{way}, {case.name}: {outcomes[0].reply}")
        elapsed = time.perf_counter() - started
    return count / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000, help="per 1 KiB case and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)

    results: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds):
        for case in CASES:
            for way in WAYS:
                count = max(16, int(args.messages * case.share))
                rate = run_case(way, case, count)
                results.setdefault((case.name, way), []).append(rate)
                print(
                    f"round {round_ + 1}: {case.name:28} {way:6} {rate:8.0f} msg/s",
                    file=sys.stderr,
                )

    medians = {key: statistics.median(rates) for key, rates in results.items()}
    if args.json:
        print(json.dumps([{"case": c, "way": w, "per_second": r} for (c, w), r in medians.items()]))
        return 0
    print(
        f"# {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
        f"load {os.getloadavg()[0]:.1f} at the end; "
        f"median of {args.rounds} rounds, deliveries/s"
    )
    print()
    others = [way for way in WAYS if way != "direct"]
    print(
        "| case | "
        + " | ".join(HEADINGS[way] for way in WAYS)
        + " | "
        + " | ".join(f"{way} / direct" for way in others)
        + " |"
    )
    print("|---|" + "---:|" * (len(WAYS) + len(others)))
    for case in CASES:
        direct = medians[(case.name, "direct")]
        rates = " | ".join(f"{medians[(case.name, way)]:,.0f}" for way in WAYS)
        ratios = " | ".join(f"{medians[(case.name, way)] / direct:.2f}" for way in others)
        print(f"| {case.name} | {rates} | {ratios} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
