"""Refusals discarded instead, and ``postoffice review``: real server, real pipe, real depot.

Mail comes in through the front doors Postfix uses (an LMTP server on a
unix socket, ``postoffice-deliver`` as a subprocess), into a FileStorage
with blobs; the review area is read back with the ``postoffice review``
command and a consumer, the way an administrator and an application do.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import ZODB
from ZODB.FileStorage import FileStorage
from ZODB.utils import get_pickle_metadata

from postoffice import open_queue
from postoffice.lmtp import LmtpServer
from tests.helpers import (
    ENVELOPE,
    client,
    mail,
    run_pipe,
    run_postoffice,
    send,
    stored,
    uri_for,
    write_config,
)

ALL = "reject_filters, no_queue, auto_reply, throttle"
FIXTURE = Path(__file__).parent / "data" / "store-format.fs"


def deliver_one_of_each_family(sock: Path) -> list[tuple[int, str]]:
    """Over LMTP: a reject filter, no queue, an auto-reply, a loop (its second is throttled)."""
    lmtp = client(sock)
    replies = []
    replies += send(lmtp, ["user@alpha.test"], mail(subject="BUY NOW cheap"))
    replies += send(lmtp, ["nobody@gamma.test"], mail(["nobody@gamma.test"]))
    replies += send(lmtp, ["user@alpha.test"], mail(headers=["Auto-Submitted: auto-replied"]))
    replies += send(lmtp, ["user@alpha.test"], mail(sender="loop@outside.test"))
    replies += send(lmtp, ["user@alpha.test"], mail(sender="loop@outside.test"))
    lmtp.quit()
    return replies


def review_list(config_path: Path) -> list[dict[str, object]]:
    result = run_postoffice("-C", str(config_path), "review", "list", "--json")
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, object]] = json.loads(result.stdout)
    return rows


def test_each_family_discarded_is_answered_250_kept_for_review_and_never_queued(
    start: Callable[..., LmtpServer], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="postoffice.deliver")
    server = start(discard=ALL)
    replies = deliver_one_of_each_family(tmp_path / "lmtp.sock")
    server.stop()

    assert [code for code, _ in replies] == [250] * 5
    kept = [text for _, text in replies[:3] + replies[4:]]
    assert all("kept for review" in text and "instead of 550" in text for text in kept)
    assert "queued in Alpha" in replies[3][1]
    # The application's queue holds the one message no rule refused.
    (queued,) = stored(uri_for(tmp_path / "var"), "Alpha")
    assert b"From: loop@outside.test" in queued

    rows = review_list(tmp_path / "postoffice.ini")
    assert [(r["rule"], r["queue"], r["recipient"]) for r in rows] == [
        ("reject_filter", None, "user@alpha.test"),
        ("no_queue", None, "nobody@gamma.test"),
        ("auto_reply", "Alpha", "user@alpha.test"),
        ("throttled", "Alpha", "user@alpha.test"),
    ]
    assert [str(r["refusal"]).split()[:2] for r in rows] == [
        ["550", "5.7.1"],
        ["550", "5.1.1"],
        ["550", "5.7.1"],
        ["550", "5.7.1"],
    ]
    assert all(r["sender"] == "envelope@outside.test" for r in rows)
    # The decision is logged, with the rule, like every other.
    lines = [r.getMessage() for r in caplog.records if " status=" in r.getMessage()]
    assert len(lines) == 5
    for line, rule in zip(
        lines[:3] + lines[4:], ["reject_filter", "no_queue", "auto_reply", "throttled"], strict=True
    ):
        assert re.search(rf" rule={rule} reason=.* status=discarded \(250 2\.0\.0 ", line), line


def test_by_default_the_same_mail_is_refused_and_nothing_is_kept(
    start: Callable[..., LmtpServer], tmp_path: Path
) -> None:
    server = start()
    replies = deliver_one_of_each_family(tmp_path / "lmtp.sock")
    server.stop()
    assert [(code, text.split()[0]) for code, text in replies] == [
        (550, "5.7.1"),
        (550, "5.1.1"),
        (550, "5.7.1"),
        (250, "2.0.0"),
        (550, "5.7.1"),
    ]
    assert review_list(tmp_path / "postoffice.ini") == []
    result = run_postoffice("-C", str(tmp_path / "postoffice.ini"), "review", "list")
    assert result.stdout.strip() == "postoffice: nothing to review"


def test_discarding_some_families_leaves_the_others_refused(
    start: Callable[..., LmtpServer], tmp_path: Path
) -> None:
    server = start(discard="no_queue, throttle")
    replies = deliver_one_of_each_family(tmp_path / "lmtp.sock")
    server.stop()
    assert [code for code, _ in replies] == [550, 250, 550, 250, 250]
    rows = review_list(tmp_path / "postoffice.ini")
    assert [r["rule"] for r in rows] == ["no_queue", "throttled"]


def pipe_depot(folder: Path, discard: str | None) -> Path:
    return write_config(
        folder,
        zodb_uri=uri_for(folder / "var"),
        discard=discard,
        reject_filters=[r"header_regexp: Subject: .*[Vv]iagra"],
        queues={"App": "to_hostname: app.test" + ENVELOPE},
    )


def test_the_pipe_exits_0_for_a_discarded_refusal_and_69_for_one_still_refused(
    tmp_path: Path,
) -> None:
    config_path = pipe_depot(tmp_path, "no_queue")
    log = tmp_path / "pipe.log"
    raw = mail(["someone@elsewhere.test"]).replace(b"\r\n", b"\n")
    result = run_pipe(config_path, "s@sender.test", ["someone@elsewhere.test"], raw, log)
    assert (result.returncode, result.stderr) == (0, b"")

    spam = mail(["alice@app.test"], subject="Viagra").replace(b"\r\n", b"\n")
    result = run_pipe(config_path, "s@sender.test", ["alice@app.test"], spam, log)
    assert result.returncode == 69
    assert result.stderr.decode().startswith("5.7.1 ")

    (row,) = review_list(config_path)
    assert (row["rule"], row["recipient"], row["sender"]) == (
        "no_queue",
        "someone@elsewhere.test",
        "s@sender.test",
    )
    assert stored(uri_for(tmp_path / "var"), "App") == []
    assert (
        "status=discarded (250 2.0.0 <someone@elsewhere.test> accepted, kept for review"
        in log.read_text()
    )


def test_show_requeue_and_delete(start: Callable[..., LmtpServer], tmp_path: Path) -> None:
    server = start(discard=ALL)
    deliver_one_of_each_family(tmp_path / "lmtp.sock")
    server.stop()
    cfg = str(tmp_path / "postoffice.ini")
    rows = review_list(tmp_path / "postoffice.ini")
    spam, nowhere, auto, loop = (int(str(r["id"])) for r in rows)

    shown = run_postoffice("-C", cfg, "review", "show", str(spam))
    assert shown.returncode == 0
    assert shown.stdout.startswith(
        "Return-Path: <envelope@outside.test>\nX-Original-To: user@alpha"
    )
    assert "Subject: BUY NOW cheap" in shown.stdout
    assert shown.stdout.rstrip().endswith(
        "reject_filter: 550 5.7.1 rejected: "
        + ("header matches 'Subject: .*BUY NOW.*' (header_regexp: Subject: .*BUY NOW.*)")
    )

    # A wrong id or queue changes nothing, and says so in one line.
    for args, code in [
        (["requeue", "--to", "Alpha", str(auto), "12345"], 65),
        (["requeue", "--to", "Nope", str(auto)], 67),
        (["delete", "12345"], 65),
        (["show", "12345"], 65),
    ]:
        result = run_postoffice("-C", cfg, "review", *args)
        assert result.returncode == code, result
        assert result.stderr.startswith("postoffice: ") and len(result.stderr.splitlines()) == 1
    assert len(review_list(tmp_path / "postoffice.ini")) == 4

    moved = run_postoffice("-C", cfg, "review", "requeue", "--to", "Alpha", str(auto), str(loop))
    assert (moved.returncode, moved.stdout.strip()) == (
        0,
        "postoffice: moved 2 messages from the review area to Alpha",
    )
    deleted = run_postoffice("-C", cfg, "review", "delete", str(spam))
    assert deleted.returncode == 0
    assert [int(str(r["id"])) for r in review_list(tmp_path / "postoffice.ini")] == [nowhere]

    # The application gets the requeued ones, as it gets any message, envelope lines and all.
    with open_queue(uri_for(tmp_path / "var"), "Alpha") as queue:
        popped = [queue.pop_next() for _ in range(len(queue))]
        assert [m["X-Original-To"] for m in popped] == ["user@alpha.test"] * 3
        assert popped[1]["Auto-Submitted"] == "auto-replied"
        assert popped[2]["From"] == "loop@outside.test"


def test_the_review_area_keeps_the_newest_review_max(
    start: Callable[..., LmtpServer], tmp_path: Path
) -> None:
    server = start(discard=ALL, review_max=2)
    deliver_one_of_each_family(tmp_path / "lmtp.sock")
    server.stop()
    rows = review_list(tmp_path / "postoffice.ini")
    assert [r["rule"] for r in rows] == ["auto_reply", "throttled"]


def test_review_records_pickle_as_the_classes_the_store_always_had(
    start: Callable[..., LmtpServer], tmp_path: Path
) -> None:
    server = start(discard=ALL)
    deliver_one_of_each_family(tmp_path / "lmtp.sock")
    server.stop()
    storage = FileStorage(str(tmp_path / "var" / "Data.fs"), read_only=True)
    try:
        names = {
            ".".join(get_pickle_metadata(record.data))
            for txn in storage.iterator()
            for record in txn
            if record.data
        }
    finally:
        storage.close()
    ours = {name for name in names if name.startswith("postoffice")}
    assert ours <= {
        "postoffice.store.MessageRecord",
        "postoffice.store.QuarantineRecord",
        "postoffice.store.MessageTree",
        "postoffice.store.Ledger",
        "postoffice.store.LedgerTimes",
        "postoffice.store.Queue",
        "postoffice.store.QueuesFolder",
    }
    assert "postoffice.store.QuarantineRecord" in ours


def test_a_depot_written_before_the_review_area_lists_nothing_and_takes_discards(
    tmp_path: Path,
) -> None:
    (tmp_path / "var").mkdir()
    shutil.copyfile(FIXTURE, tmp_path / "var" / "Data.fs")
    config_path = write_config(
        tmp_path,
        zodb_uri=f"file://{tmp_path / 'var' / 'Data.fs'}",
        discard="no_queue",
        queues={"A": "to_hostname: a.example"},
    )
    assert review_list(config_path) == []
    raw = mail(["x@elsewhere.test"]).replace(b"\r\n", b"\n")
    result = run_pipe(config_path, "s@sender.test", ["x@elsewhere.test"], raw, tmp_path / "log")
    assert result.returncode == 0, result.stderr
    assert [r["recipient"] for r in review_list(config_path)] == ["x@elsewhere.test"]
    db = ZODB.DB(FileStorage(str(tmp_path / "var" / "Data.fs"), read_only=True))
    try:
        with db.transaction() as connection:
            queue = connection.root()["postoffice"]["A"]
            assert len(queue) == 3  # what the old depot held is still there
    finally:
        db.close()


def test_requeue_without_ids_moves_everything_kept(
    start: Callable[..., LmtpServer], tmp_path: Path
) -> None:
    server = start(discard="no_queue")
    lmtp = client(tmp_path / "lmtp.sock")
    for n in range(3):
        send(lmtp, [f"u{n}@gamma.test"], mail([f"u{n}@gamma.test"]))
    lmtp.quit()
    server.stop()
    moved = run_postoffice(
        "-C", str(tmp_path / "postoffice.ini"), "review", "requeue", "--to", "Beta"
    )
    assert moved.stdout.strip() == "postoffice: moved 3 messages from the review area to Beta"
    assert review_list(tmp_path / "postoffice.ini") == []
    rcpts = [raw.split(b"\r\n")[1] for raw in stored(uri_for(tmp_path / "var"), "Beta")]
    assert rcpts == [
        b"X-Original-To: u0@gamma.test",
        b"X-Original-To: u1@gamma.test",
        b"X-Original-To: u2@gamma.test",
    ]
