"""The parts of the benchmark that open the depot, run by ``bench/run.py`` as subprocesses.

Each runs in a process of its own so that ``run.py`` can bound it with a
timeout and never holds a FileStorage open while a server needs it.

    python3 bench/worker.py prefill CONFIG COUNT [--batch N] [--tag TAG] [--shared]
    python3 bench/worker.py count URI QUEUE
    python3 bench/worker.py consume URI QUEUE COUNT [--per-commit N]
    python3 bench/worker.py commit-floor URI COUNT
    python3 bench/worker.py drain URI QUEUE STOP_FILE [--per-commit N] [--limit SECONDS]

Each prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import transaction
from ZODB.FileStorage import FileStorage
from ZODB.utils import get_pickle_metadata

import postoffice
from postoffice import QueueEmpty, embedded, open_queue
from postoffice.config import load
from postoffice.deliver import Delivery, Depot

SENDER = "sender@client.bench.example"
RECIPIENT = "rcpt@app.bench.example"
BODY_LINE = b"X" * 78 + b"\r\n"
# Bytes FileStorage writes before each record's pickle (its data header).
DATA_HEADER = 42


def message(number: int, tag: str, size: int = 1024) -> bytes:
    """A message shaped like smtp-source's: From, To, Date, a unique Message-Id, a body.

    The Message-Id starts with a pseudo-random hex number, as most mailers'
    do, so the duplicate ledger's keys spread over its whole tree as they
    would in production (the number makes it unique and repeatable).
    """
    spread = random.Random(number).getrandbits(48)
    head = (
        f"From: <{SENDER}>\r\n"
        f"To: <{RECIPIENT}>\r\n"
        "Date: Tue, 24 Nov 2026 11:18:48 +0000\r\n"
        f"Message-Id: <{spread:012x}.{number}@{tag}>\r\n"
        "\r\n"
    ).encode("ascii")
    return head + BODY_LINE * max(1, size // len(BODY_LINE))


def prefill(
    config_path: str, count: int, batch: int, tag: str, shared: bool = False
) -> dict[str, object]:
    """Queue ``count`` messages through Depot.deliver_batch, as the server would store them.

    Every message goes through the rules and lands in the queue and in the
    duplicate ledger, like mail that came in over LMTP.  ``shared``: a
    ``file://`` depot is opened as ``serve`` opens it by default, served by
    ZEO's server in a thread and delivered into as its client (the CPU
    figure is then the whole process's: both sides of the socket).
    """
    settings = load(config_path)
    with embedded.shared(settings.zodb_uri, share=shared) as served:
        return _prefill(Depot(settings, db=served.db if served else None), count, batch, tag)


def _prefill(depot: Depot, count: int, batch: int, tag: str) -> dict[str, object]:
    start = time.perf_counter()
    cpu = time.process_time()
    queued = 0
    try:
        depot.prepare()
        for first in range(0, count, batch):
            deliveries = [
                Delivery(SENDER, (RECIPIENT,), message(n, tag))
                for n in range(first, min(count, first + batch))
            ]
            for outcomes in depot.deliver_batch(deliveries):
                for outcome in outcomes:
                    if outcome.queue_key is None:
                        raise SystemExit(f"prefill: not queued: {outcome.reply}")
                    queued += 1
    finally:
        depot.close()
    return {
        "queued": queued,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
    }


def inline_or_blob(config_path: str, size: int, count: int, batch: int) -> dict[str, object]:
    """Seconds per message and Data.fs bytes per message, stored inline and as blobs.

    The same messages go through ``Depot.deliver_batch`` twice, into two
    fresh depots beside the config: once with the blob threshold above
    their size (inline bytes in the record), once below it (a blob file
    each, synced before the commit).  ``batch`` messages per transaction.
    """
    import shutil
    from pathlib import Path

    import postoffice.store.records

    base = Path(config_path).parent
    settings = load(config_path)
    results: dict[str, object] = {"size": size, "count": count, "batch": batch}
    saved = postoffice.store.records.BLOB_THRESHOLD
    try:
        for label, threshold in (("inline", size * 2), ("blob", 0)):
            var = base / "var"
            shutil.rmtree(var, ignore_errors=True)
            postoffice.store.records.BLOB_THRESHOLD = threshold
            depot = Depot(settings)
            try:
                depot.prepare()
                start = time.perf_counter()
                for first in range(0, count, batch):
                    deliveries = [
                        Delivery(SENDER, (RECIPIENT,), message(n, f"{label}.blob.bench", size))
                        for n in range(first, min(count, first + batch))
                    ]
                    for outcomes in depot.deliver_batch(deliveries):
                        if outcomes[0].queue_key is None:
                            raise SystemExit(f"not queued: {outcomes[0].reply}")
                seconds = time.perf_counter() - start
            finally:
                depot.close()
            blobs = sum(f.stat().st_size for f in (var / "blobs").rglob("*.blob"))
            results[label] = {
                "ms_per_message": 1000 * seconds / count,
                "data_fs_bytes_per_message": (var / "Data.fs").stat().st_size / count,
                "blob_bytes_per_message": blobs / count,
            }
    finally:
        postoffice.store.records.BLOB_THRESHOLD = saved
    return results


def count(uri: str, queue_name: str, data_fs: str | None) -> dict[str, object]:
    """Messages in the queue; with ``data_fs``, also the transactions in that FileStorage.

    Messages over transactions is how many deliveries the server's group
    commit put into one commit on average, without asking the server.
    """
    with open_queue(uri, queue_name) as queue:
        result: dict[str, object] = {"count": len(queue)}
    if data_fs:
        storage = FileStorage(data_fs, read_only=True)
        try:
            result["transactions"] = sum(1 for _ in storage.iterator())
        finally:
            storage.close()
        result["data_fs_bytes"] = os.path.getsize(data_fs)
    return result


def anatomy(data_fs: str, skip: int) -> dict[str, object]:
    """Where the bytes of the commits go: record count and pickle bytes per class.

    Transactions after the first ``skip`` are read (the server's, not the
    set-up's); each record is charged to the class its pickle names.
    """
    storage = FileStorage(data_fs, read_only=True)
    classes: dict[str, list[int]] = {}
    transactions = 0
    try:
        for number, txn in enumerate(storage.iterator()):
            if number < skip:
                continue
            transactions += 1
            for record in txn:
                if record.data is None:
                    continue
                module, name = get_pickle_metadata(record.data)
                entry = classes.setdefault(f"{module}.{name}", [0, 0])
                entry[0] += 1
                entry[1] += len(record.data) + DATA_HEADER
    finally:
        storage.close()
    return {"transactions": transactions, "classes": classes}


def consume(uri: str, queue_name: str, limit: int, per_commit: int = 1) -> dict[str, object]:
    """Pop and commit, one message a transaction as the consumer API documents it.

    With ``per_commit`` above 1, that many pops share one commit (the
    batched loop of docs/consumers.md).
    """
    opened = time.perf_counter()
    with open_queue(uri, queue_name) as queue:
        start = time.perf_counter()
        popped = 0
        while popped < limit:
            try:
                queue.pop_next()
            except QueueEmpty:
                break
            popped += 1
            if popped % per_commit == 0:
                transaction.commit()
        transaction.commit()
        seconds = time.perf_counter() - start
        left = len(queue)
    return {
        "popped": popped,
        "seconds": seconds,
        "open_seconds": start - opened,
        "left": left,
        "per_commit": per_commit,
    }


# How long a drain consumer waits after finding the queue empty, as the
# polling loop of docs/consumers.md does (it says why not less).
IDLE_POLL = 0.05


def drain(
    uri: str, queue_name: str, stop_file: str, per_commit: int, limit: float
) -> dict[str, object]:
    """Pop while mail arrives, as an application does, until told to stop and the queue is empty.

    ``postoffice.consume()``, the loop of docs/consumers.md, with
    ``per_commit``; between its calls a fresh look at the database, and
    ``IDLE_POLL`` seconds of waiting after one that found nothing, as the
    polling loop there does.  It says it is ready (``STOP_FILE.ready-PID``)
    once the queue is open, so that the load starts with every consumer in
    place.  Besides its pops it says how often it committed, the
    transactions it retried, and the conflicts postoffice retried inside
    ``pop_next()`` (its claims), which the loop never sees, beside the
    claims' own commits.
    """
    from postoffice import retry

    popped = transient = commits = 0
    deadline = time.monotonic() + limit
    with open_queue(uri, queue_name) as queue:
        Path(f"{stop_file}.ready-{os.getpid()}").touch()
        start = time.perf_counter()
        last = start
        while time.monotonic() < deadline:
            done = postoffice.consume(queue, lambda message: None, per_commit=per_commit)
            if done.processed:
                last = time.perf_counter()
            popped += done.processed
            commits += done.commits
            transient += done.retried
            transaction.abort()
            if os.path.exists(stop_file) and not queue:
                break
            if not done.processed:
                time.sleep(IDLE_POLL)
    return {
        "popped": popped,
        "seconds": last - start,
        "transient": transient,
        "commits": commits,
        "conflicts_retried": int(retry.conflicts_retried),
        "claim_commits": int(retry.transactions_committed),
    }


def commit_floor(uri: str, count: int) -> dict[str, object]:
    """Transactions a second that change one small object and nothing else.

    What the storage (through ZEO: its protocol) can commit at all: the
    ceiling of any loop that commits once a message.
    """
    from persistent.mapping import PersistentMapping

    from postoffice.database import open_db

    db = open_db(uri)
    try:
        connection = db.open()
        root = connection.root()
        probe = root.get("bench-commit-probe")
        if probe is None:
            probe = root["bench-commit-probe"] = PersistentMapping()
        transaction.commit()
        start = time.perf_counter()
        for number in range(count):
            probe["n"] = number
            transaction.commit()
        seconds = time.perf_counter() - start
        connection.close()
    finally:
        db.close()
    return {"commits": count, "seconds": seconds}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/worker.py")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("prefill")
    p.add_argument("config")
    p.add_argument("count", type=int)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--tag", default="prefill.bench")
    p.add_argument("--shared", action="store_true", help="through serve's ZEO server thread")
    c = sub.add_parser("count")
    c.add_argument("uri")
    c.add_argument("queue")
    c.add_argument("--data-fs", help="also count the transactions in this Data.fs")
    b = sub.add_parser("inline-or-blob")
    b.add_argument("config")
    b.add_argument("size", type=int)
    b.add_argument("count", type=int)
    b.add_argument("--batch", type=int, default=1)
    a = sub.add_parser("anatomy")
    a.add_argument("data_fs")
    a.add_argument("--skip", type=int, default=0, help="transactions to leave out first")
    k = sub.add_parser("consume")
    k.add_argument("uri")
    k.add_argument("queue")
    k.add_argument("count", type=int)
    k.add_argument("--per-commit", type=int, default=1)
    d = sub.add_parser("drain")
    d.add_argument("uri")
    d.add_argument("queue")
    d.add_argument("stop_file")
    d.add_argument("--per-commit", type=int, default=1)
    d.add_argument("--limit", type=float, default=300.0, help="seconds at most")
    f = sub.add_parser("commit-floor")
    f.add_argument("uri")
    f.add_argument("count", type=int)
    args = parser.parse_args(argv)
    if args.what == "prefill":
        result = prefill(args.config, args.count, args.batch, args.tag, args.shared)
    elif args.what == "inline-or-blob":
        result = inline_or_blob(args.config, args.size, args.count, args.batch)
    elif args.what == "anatomy":
        result = anatomy(args.data_fs, args.skip)
    elif args.what == "count":
        result = count(args.uri, args.queue, args.data_fs)
    elif args.what == "commit-floor":
        result = commit_floor(args.uri, args.count)
    elif args.what == "drain":
        result = drain(args.uri, args.queue, args.stop_file, args.per_commit, args.limit)
    else:
        result = consume(args.uri, args.queue, args.count, args.per_commit)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
