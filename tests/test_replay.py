"""``postoffice replay`` on a real depot: mail delivered over LMTP, then re-decided by the command.

The depot is filled the way production fills it (an LMTP server on a unix
socket, a consumer quarantining one message), and the command runs as a
subprocess under a changed configuration, as a rule writer runs it before
deploying that configuration.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import transaction

from postoffice import open_queue
from postoffice.lmtp import LmtpServer
from postoffice.store import find_folder
from tests.helpers import (
    ENVELOPE,
    HERE_URI,
    Process,
    client,
    mail,
    run_postoffice,
    send,
    stored,
    uri_for,
    write_config,
    write_lmtp_config,
)


def new_rules(folder: Path, name: str = "new.ini", **options: object) -> Path:
    """The rules a writer wants to try: gamma.test joins Alpha, Beta becomes Support,
    invoices are refused and BUY NOW no longer is."""
    return write_config(
        folder,
        name=name,
        zodb_uri=HERE_URI,
        ooo_loop_frequency=2,
        reject_filters=["header_regexp: Subject: .*invoice.*"],
        queues={
            "Alpha": "to_hostname: alpha.test gamma.test" + ENVELOPE,
            "Support": "to_hostname: beta.test" + ENVELOPE,
        },
        **options,
    )


@pytest.fixture
def depot(start: Callable[..., LmtpServer], tmp_path: Path) -> Path:
    """Mail of every kind stored under the LMTP test rules; the old ini file."""
    server = start(discard="reject_filters, no_queue, throttle")
    lmtp = client(tmp_path / "lmtp.sock")
    send(lmtp, ["user@alpha.test"], mail(subject="plain"))
    send(lmtp, ["user@beta.test"], mail(["user@beta.test"], subject="to beta"))
    send(lmtp, ["user@alpha.test"], mail(subject="your invoice"))
    send(lmtp, ["user@alpha.test"], mail(subject="BUY NOW"))
    send(lmtp, ["x@gamma.test"], mail(["x@gamma.test"], subject="to gamma"))
    send(lmtp, ["user@alpha.test"], mail(sender="loop@outside.test", subject="loop 1"))
    send(lmtp, ["user@alpha.test"], mail(sender="loop@outside.test", subject="loop 2"))
    lmtp.quit()
    server.stop()
    # The application quarantines the invoice.
    with open_queue(uri_for(tmp_path / "var"), "Alpha") as queue:
        popped = [queue.pop_next() for _ in range(len(queue))]
        (invoice,) = [m for m in popped if m["Subject"] == "your invoice"]
        transaction.abort()  # the consumer loop: abort, quarantine, commit
        queue.quarantine(invoice, "ValueError: no customer number")
        transaction.commit()  # the others are given back at close
    with open_queue(uri_for(tmp_path / "var"), "Alpha") as queue:
        assert len(queue) == 2 and queue.count_quarantined_messages() == 1
    return tmp_path / "postoffice.ini"


def replay(*args: str) -> dict[str, Any]:
    result = run_postoffice(*args, "--json")
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def by_subject(report: dict[str, Any], folder: Path) -> dict[str, tuple[str, str, str]]:
    """Subject -> (where it is, the kind of change, what would happen) of each change."""
    subjects = {}
    with open_queue(uri_for(folder / "var"), "Alpha") as queue:
        folder_of = find_folder(queue._p_jar.root(), "/postoffice")
        texts = {}
        for q in folder_of.values():
            for key, raw, _ in q.messages():
                texts[key] = raw
            for key, raw, _, _ in q.quarantined():
                texts[key] = raw
        for key, record in folder_of.review_area().items():
            texts[key] = record.raw
    for change in report["changes"]:
        raw = texts[change["id"]]
        subject = next(
            line.split(b": ", 1)[1].decode()
            for line in raw.splitlines()
            if line.startswith(b"Subject: ")
        )
        new = change["new"]
        subjects[subject] = (
            change["where"],
            change["change"],
            f"{new['outcome']} {new['queue'] or new['rule']}",
        )
    return subjects


def fingerprint(folder: Path) -> tuple[str, int]:
    data = (folder / "var" / "Data.fs").read_bytes()
    return hashlib.sha256(data).hexdigest(), len(data)


def test_replay_reports_each_change_against_what_the_mail_was_stored_under(
    depot: Path, tmp_path: Path
) -> None:
    new = new_rules(tmp_path)
    before = fingerprint(tmp_path)
    report = replay("-C", str(new), "replay")
    assert fingerprint(tmp_path) == before, "replay wrote to the depot"

    assert report["messages"] == 7 and report["compared_with"] == "what they were stored under"
    assert report["counts"] == {
        "other queue": 1,
        "refused": 1,
        "discarded": 0,
        "queued": 2,
        "not re-decided": 1,
        "unchanged": 2,
    }
    assert by_subject(report, tmp_path) == {
        "to beta": ("queue Beta", "other queue", "queued Support"),
        "your invoice": ("quarantine of Alpha", "refused", "refused reject_filter"),
        "BUY NOW": ("review", "queued", "queued Alpha"),
        "to gamma": ("review", "queued", "queued Alpha"),
    }
    (refused,) = [c for c in report["changes"] if c["change"] == "refused"]
    assert refused["new"]["reason"].startswith("550 5.7.1 rejected: header matches")
    assert refused["stored"]["reason"] == "quarantined: ValueError: no customer number"
    assert refused["recipient"] == "user@alpha.test"
    assert refused["sender"] == "envelope@outside.test"


def test_the_human_table_names_each_change_and_counts_them(depot: Path, tmp_path: Path) -> None:
    result = run_postoffice("-C", str(new_rules(tmp_path)), "replay")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("postoffice: replayed 7 stored messages under ")
    (beta,) = [line for line in lines if line.startswith("queue Beta")]
    assert "<user@beta.test>" in beta
    assert "queued in Beta -> queued in Support  [other queue]" in beta
    (gamma,) = [line for line in lines if "<x@gamma.test>" in line]
    assert gamma.startswith("review ") and "kept for review (no_queue) -> queued in Alpha" in gamma
    assert lines[-1] == (
        "changes: other queue 1, refused 1, discarded 0, queued 2, not re-decided 1, unchanged 2"
    )


def test_new_rules_that_discard_say_so(depot: Path, tmp_path: Path) -> None:
    report = replay("-C", str(new_rules(tmp_path, discard="reject_filters")), "replay")
    (invoice,) = [c for c in report["changes"] if c["where"] == "quarantine of Alpha"]
    assert invoice["change"] == "discarded"
    assert (invoice["new"]["outcome"], invoice["new"]["rule"]) == ("review", "reject_filter")


def test_from_old_rules_compares_both_decisions_today(depot: Path, tmp_path: Path) -> None:
    new = new_rules(tmp_path)
    report = replay("-C", str(new), "replay", "--from", str(depot))
    assert report["compared_with"] == str(depot)
    # The throttled one is decided alike by both (no history): no longer a special case.
    assert report["counts"] == {
        "other queue": 1,
        "refused": 1,
        "discarded": 0,
        "queued": 2,
        "not re-decided": 0,
        "unchanged": 3,
    }
    assert all(c["old"] is not None for c in report["changes"])
    same = replay("-C", str(new), "replay", "--from", str(new))
    assert same["changes"] == [] and same["counts"]["unchanged"] == 7


def test_queue_names_and_since_narrow_the_replay(depot: Path, tmp_path: Path) -> None:
    new = str(new_rules(tmp_path))
    beta = replay("-C", new, "replay", "Beta")
    assert beta["messages"] == 1 and beta["counts"]["other queue"] == 1
    alpha = replay("-C", new, "replay", "Alpha")
    # Alpha: two waiting, one quarantined, and the throttled one kept for review (bound for it).
    assert alpha["messages"] == 4

    yesterday = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)).date()
    assert replay("-C", new, "replay", "--since", yesterday.isoformat())["messages"] == 7
    assert replay("-C", new, "replay", "--since", "2999-01-01T00:00")["messages"] == 0

    bad = run_postoffice("-C", new, "replay", "--since", "last tuesday")
    assert bad.returncode == 64
    assert bad.stderr == "postoffice: --since: not an ISO 8601 date or time: 'last tuesday'\n"


def test_replay_of_a_depot_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    new = new_rules(tmp_path)
    (tmp_path / "var").mkdir()
    result = run_postoffice("-C", str(new), "replay")
    assert result.returncode == 66
    assert result.stderr.startswith("postoffice: no database at ")
    assert "(postoffice serve creates it)" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "var" / "Data.fs").exists()


# --- recent deliveries kept for replay (replay_keep) ------------------------------------


def test_kept_recent_deliveries_replay_refused_and_consumed_mail_once_each(
    start: Callable[..., LmtpServer], tmp_path: Path
) -> None:
    server = start(replay_keep=100, max_size="1m")
    lmtp = client(tmp_path / "lmtp.sock")
    send(lmtp, ["user@alpha.test"], mail(subject="consumed"))
    send(lmtp, ["user@alpha.test"], mail(subject="waiting"))
    refused = [
        send(lmtp, ["user@alpha.test"], mail(subject="BUY NOW")),
        send(lmtp, ["x@gamma.test"], mail(["x@gamma.test"], subject="to gamma")),
    ]
    big = send(lmtp, ["user@alpha.test"], mail(subject="big", body=(b"x" * 76 + b"\r\n") * 4000))
    lmtp.quit()
    server.stop()
    assert [r[0][0] for r in refused] == [550, 550] and big[0][0] == 250
    with open_queue(uri_for(tmp_path / "var"), "Alpha") as queue:
        assert queue.pop_next()["Subject"] == "consumed"
        transaction.commit()

    report = replay("-C", str(new_rules(tmp_path)), "replay")
    # consumed, BUY NOW, to gamma from the recent ones; waiting and big from the queue, once.
    assert report["messages"] == 5
    changes = {(c["where"], c["recipient"], c["change"]) for c in report["changes"]}
    assert changes == {
        ("recent", "user@alpha.test", "queued"),  # BUY NOW, refused then
        ("recent", "x@gamma.test", "queued"),
    }
    (buy,) = [c for c in report["changes"] if c["recipient"] == "user@alpha.test"]
    assert buy["stored"]["outcome"] == "refused" and buy["stored"]["rule"] == "reject_filter"
    assert buy["stored"]["reason"].startswith("550 5.7.1 rejected")
    assert report["counts"]["unchanged"] == 3


def test_replay_keep_keeps_the_newest_and_not_big_messages(
    start: Callable[..., LmtpServer], tmp_path: Path
) -> None:
    server = start(replay_keep=2, max_size="1m")
    lmtp = client(tmp_path / "lmtp.sock")
    for n in range(3):
        send(lmtp, ["x@gamma.test"], mail(["x@gamma.test"], subject=f"refused {n}"))
    big = mail(["x@gamma.test"], subject="big", body=(b"x" * 76 + b"\r\n") * 4000)
    send(lmtp, ["x@gamma.test"], big)
    lmtp.quit()
    server.stop()
    report = replay("-C", str(new_rules(tmp_path)), "replay")
    assert report["messages"] == 2  # the two newest small ones; the 300 KiB one is not kept
    with open_queue(uri_for(tmp_path / "var"), "Alpha") as queue:
        recent = find_folder(queue._p_jar.root(), "/postoffice").recent_area()
        subjects = [b"refused 1" in r.raw or b"refused 2" in r.raw for _, r in recent.items()]
        assert subjects == [True, True]


def test_replay_runs_beside_a_serve_process_that_shares_its_file(tmp_path: Path) -> None:
    """The depot of a running `serve` is read through its ZEO server; serve goes on delivering."""
    config_path = write_lmtp_config(tmp_path)
    proc = Process(tmp_path, config_path)
    try:
        proc.wait_for("postoffice: listening on unix:", stream="out")
        lmtp = client(tmp_path / "lmtp.sock")
        send(lmtp, ["user@beta.test"], mail(["user@beta.test"]))
        report = replay("-C", str(new_rules(tmp_path)), "replay")
        assert report["messages"] == 1 and report["counts"]["other queue"] == 1
        assert send(lmtp, ["user@alpha.test"], mail())[0][0] == 250
        lmtp.quit()
    finally:
        assert proc.stop() == 0
    assert len(stored(uri_for(tmp_path / "var"), "Alpha")) == 1
