"""The ``postoffice`` command as an administrator meets it: real files, real database."""

from __future__ import annotations

import json
import logging
import mailbox
import os
import subprocess
import sys
from pathlib import Path

import pytest
import transaction

from postoffice import cli, config, open_queue
from postoffice.deliver import Depot
from tests.helpers import HERE_URI, config_text, message

CONFIG = config_text(
    HERE_URI, maildir="%(here)s/Maildir", reject_filters=["to_hostname: .refused.example"]
)


def maildir_message(n: int, to: str = "user@a.example") -> bytes:
    """A message as a Maildir or the command's standard input holds it: LF line ends."""
    return message(n, sender="sender@outside.example", to=to, body=f"body {n}\n", eol="\n")


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "postoffice.ini"
    path.write_text(CONFIG)
    return path


def run(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    stdin: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """The installed command, as a person runs it (a subprocess, real exit codes)."""
    return subprocess.run(
        [sys.executable, "-m", "postoffice.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=60,
        input=stdin.decode() if stdin else None,
    )


def test_missing_config_is_one_line_and_exit_78(tmp_path: Path) -> None:
    result = run("-C", str(tmp_path / "nope.ini"), "queues")
    assert result.returncode == 78
    assert result.stderr.strip().splitlines() == [
        f"postoffice: {tmp_path / 'nope.ini'}: no such configuration file"
    ]


def test_bad_config_names_file_section_option(tmp_path: Path) -> None:
    path = tmp_path / "postoffice.ini"
    path.write_text(CONFIG.replace("[queue:B]\nfilters =", "[queue:B]\nfilterz ="))
    result = run("-C", str(path), "check")
    assert result.returncode == 78
    [line] = result.stderr.strip().splitlines()
    assert str(path) in line and "[queue:B]" in line and "filterz" in line
    assert "Traceback" not in result.stderr


def test_unknown_subcommand_is_usage_error(cfg: Path) -> None:
    result = run("-C", str(cfg), "frobnicate")
    assert result.returncode == 64
    assert "Traceback" not in result.stderr


def test_config_found_through_environment(cfg: Path, tmp_path: Path) -> None:
    env = dict(os.environ, POSTOFFICE_CONFIG=str(cfg))
    result = run("check", cwd=tmp_path / "..", env=env)
    assert result.returncode == 0, result.stderr
    assert "configuration is valid (2 queues)" in result.stdout
    assert "is reachable" in result.stdout


def test_unreachable_database_is_one_line_exit_75(tmp_path: Path) -> None:
    path = tmp_path / "postoffice.ini"
    path.write_text(
        CONFIG.replace(
            "file://%(here)s/var/Data.fs?blobstorage_dir=%(here)s/var/blobs",
            "zeo://%(here)s/nobody.sock?wait_timeout=1",
        )
    )
    result = run("-C", str(path), "queues")
    assert result.returncode == 75
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_queues_lists_depth_and_quarantine(cfg: Path) -> None:
    settings = config.load(cfg)
    depot = Depot(settings)
    depot.deliver("s@outside.example", ["user@a.example"], maildir_message(1))
    depot.deliver("s@outside.example", ["user@a.example"], maildir_message(2))
    depot.close()
    with open_queue(settings.zodb_uri, "A") as queue:
        popped = queue.pop_next()
        transaction.abort()
        queue.quarantine(popped, "it broke")
        transaction.commit()
    result = run("-C", str(cfg), "queues", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["A"]["depth"] == 1
    assert rows["A"]["quarantined"] == 1
    assert rows["A"]["oldest"] is not None
    assert rows["B"]["depth"] == 0


def test_quarantine_list_show_requeue_delete(cfg: Path) -> None:
    settings = config.load(cfg)
    depot = Depot(settings)
    for n in (1, 2):
        depot.deliver("s@outside.example", ["user@a.example"], maildir_message(n))
    depot.close()
    with open_queue(settings.zodb_uri, "A") as queue:
        for _ in range(2):
            popped = queue.pop_next()
            queue.quarantine(popped, ValueError(f"bad {popped['Subject']}"))
        transaction.commit()
    listing = run("-C", str(cfg), "quarantine", "list", "A")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.strip().splitlines()
    assert len(lines) == 2
    first_id = lines[0].split("\t")[0]
    assert "<1@outside.example>" in lines[0]
    shown = run("-C", str(cfg), "quarantine", "show", "A", first_id)
    assert "Subject: number 1" in shown.stdout
    assert "ValueError: bad number 1" in shown.stdout
    second_id = lines[1].split("\t")[0]
    assert run("-C", str(cfg), "quarantine", "delete", "A", second_id).returncode == 0
    assert run("-C", str(cfg), "quarantine", "requeue", "A").returncode == 0
    with open_queue(settings.zodb_uri, "A") as queue:
        assert queue.count_quarantined_messages() == 0
        assert len(queue) == 1
        assert queue.pop_next()["Subject"] == "number 1"
        transaction.abort()


def test_quarantine_of_unknown_queue_names_known_ones(cfg: Path) -> None:
    assert run("-C", str(cfg), "check").returncode == 0
    result = run("-C", str(cfg), "quarantine", "list", "Nope")
    assert result.returncode != 0
    assert "'Nope'" in result.stderr and "'A'" in result.stderr and "'B'" in result.stderr


def test_try_prints_decision_and_stores_nothing(cfg: Path, tmp_path: Path) -> None:
    eml = tmp_path / "m.eml"
    eml.write_bytes(maildir_message(7))
    assert run("-C", str(cfg), "check").returncode == 0
    result = run(
        "-C",
        str(cfg),
        "try",
        str(eml),
        "--rcpt",
        "user@a.example",
        "--rcpt",
        "x@refused.example",
        "--sender",
        "s@outside.example",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0].startswith("user@a.example: accept (rule 9) 250 2.0.0 queue=A")
    assert out[1].startswith("x@refused.example: reject (rule 4) 550 5.7.1")
    with open_queue(config.load(cfg).zodb_uri, "A") as queue:
        assert len(queue) == 0


def test_try_names_the_filter_and_address_that_routed_each_recipient(
    cfg: Path, tmp_path: Path
) -> None:
    """A message To: a customer of queue A and Cc: one of B: each copy goes to its own queue."""
    eml = tmp_path / "m.eml"
    eml.write_bytes(
        message(3, "Cc: b1@b.example", sender="s@outside.example", to="a1@a.example", eol="\n")
    )
    result = run(
        "-C", str(cfg), "try", str(eml), "--rcpt", "a1@a.example", "--rcpt", "b1@b.example"
    )
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()[:2]
    assert first.startswith("a1@a.example: accept (rule 9) 250 2.0.0 queue=A")
    assert "envelope recipient a1@a.example matches to_hostname a.example" in first
    assert second.startswith("b1@b.example: accept (rule 9) 250 2.0.0 queue=B")
    assert "envelope recipient b1@b.example matches to_hostname b.example" in second


def make_maildir(path: Path, messages: list[bytes]) -> mailbox.Maildir:
    box = mailbox.Maildir(str(path), create=True)
    for raw in messages:
        box.add(mailbox.MaildirMessage(raw))
    return box


def test_import_maildir_decides_queues_and_archives(cfg: Path, tmp_path: Path) -> None:
    """The old cron script: X-Original-To is the recipient; everything decided is archived."""
    accepted = (
        b"X-Original-To: user@a.example\nReturn-Path: <s@outside.example>\n" + maildir_message(1)
    )
    refused = b"X-Original-To: x@refused.example\n" + maildir_message(2, to="x@refused.example")
    no_queue = b"X-Original-To: x@nowhere.example\n" + maildir_message(3, to="x@nowhere.example")
    make_maildir(tmp_path / "Maildir", [accepted, refused, no_queue])
    settings = config.load(cfg)
    depot = Depot(settings)
    try:
        counts = cli.import_maildir(depot, tmp_path / "Maildir", now=1_700_000_000)
    finally:
        depot.close()
    assert counts == {"queued": 1, "discarded": 0, "rejected": 2, "deferred": 0}
    box = mailbox.Maildir(str(tmp_path / "Maildir"), create=False)
    assert len(box) == 0
    archive = box.get_folder("2023.11.14")
    assert len(archive) == 3
    with open_queue(settings.zodb_uri, "A") as queue:
        assert len(queue) == 1
        popped = queue.pop_next()
        assert popped["Subject"] == "number 1"
        assert popped["Return-Path"] == "<s@outside.example>"
        assert popped["X-Original-To"] == "user@a.example"
        transaction.abort()


def test_import_maildir_command_leaves_mail_when_database_is_down(tmp_path: Path) -> None:
    path = tmp_path / "postoffice.ini"
    path.write_text(
        CONFIG.replace(
            "file://%(here)s/var/Data.fs?blobstorage_dir=%(here)s/var/blobs",
            "zeo://%(here)s/nobody.sock?wait_timeout=1",
        )
    )
    make_maildir(tmp_path / "Maildir", [b"X-Original-To: user@a.example\n" + maildir_message(1)])
    result = run("-C", str(path), "import-maildir")
    assert result.returncode == 75
    box = mailbox.Maildir(str(tmp_path / "Maildir"), create=False)
    assert len(box) == 1  # still there for the next run


def test_import_maildir_command(cfg: Path, tmp_path: Path) -> None:
    make_maildir(
        tmp_path / "Maildir",
        [b"X-Original-To: user@b.example\n" + maildir_message(1, to="user@b.example")],
    )
    result = run("-C", str(cfg), "import-maildir")
    assert result.returncode == 0, result.stderr
    assert "imported 1 queued" in result.stdout
    with open_queue(config.load(cfg).zodb_uri, "B") as queue:
        assert len(queue) == 1


def test_shell_offers_the_folder_as_root_too(cfg: Path) -> None:
    """``root`` is the old ``po_debug`` name of the queues folder."""
    fill = Depot(config.load(cfg))
    fill.prepare()
    fill.close()
    result = run("-C", str(cfg), "shell", stdin=b"print('same', root is folder, sorted(root))\n")
    assert result.returncode == 0, result.stderr
    assert "same True ['A', 'B']" in result.stdout


def test_import_maildir_takes_each_arrival_time_from_the_file(cfg: Path, tmp_path: Path) -> None:
    """A backlog from one sender, a message an hour: all queued, dated by their files."""
    settings = config.load(cfg)
    throttled = cfg.read_text().replace(
        "[post office]\n", "[post office]\nooo_loop_frequency = 1\n"
    )
    cfg.write_text(throttled)
    settings = config.load(cfg)
    backlog = [
        b"X-Original-To: user@a.example\n" + maildir_message(n, to="user@a.example")
        for n in range(1, 4)
    ]
    box = make_maildir(tmp_path / "Maildir", backlog)
    t0 = 1_700_000_000
    for hour, key in enumerate(sorted(box.keys(), reverse=True)):  # file order is not time order
        os.utime(os.path.join(str(tmp_path / "Maildir"), box._lookup(key)), (t0 + hour * 3600,) * 2)
    depot = Depot(settings)
    try:
        counts = cli.import_maildir(depot, tmp_path / "Maildir", now=t0 + 4 * 3600)
    finally:
        depot.close()
    assert counts == {"queued": 3, "discarded": 0, "rejected": 0, "deferred": 0}
    with open_queue(settings.zodb_uri, "A") as queue:
        popped = [queue.pop_next() for _ in range(3)]
        transaction.abort()
    dates = [int(m["X-Postoffice-Date"]) for m in popped]
    assert dates == [t0, t0 + 3600, t0 + 7200]
    assert [m["Subject"] for m in popped] == ["number 3", "number 2", "number 1"]


def test_import_maildir_says_why_it_refused_a_message(
    cfg: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused mail is archived, not queued: the log says so, as a warning."""
    cfg.write_text(
        cfg.read_text().replace("[post office]\n", "[post office]\nooo_loop_frequency = 1\n")
    )
    settings = config.load(cfg)
    backlog = [
        b"X-Original-To: user@a.example\n" + maildir_message(n, to="user@a.example")
        for n in range(1, 3)
    ]
    box = make_maildir(tmp_path / "Maildir", backlog)
    for key in box.iterkeys():  # both in the same second: a loop
        os.utime(os.path.join(str(tmp_path / "Maildir"), box._lookup(key)), (1_700_000_000,) * 2)
    depot = Depot(settings)
    try:
        with caplog.at_level(logging.INFO, logger="postoffice"):
            counts = cli.import_maildir(depot, tmp_path / "Maildir")
    finally:
        depot.close()
    assert counts["queued"] == 1 and counts["rejected"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("550" in text and "not queued" in text for text in warnings), warnings


def test_version_is_the_installed_one() -> None:
    from importlib import metadata

    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"postoffice {metadata.version('postoffice')}"


def test_check_never_prints_the_database_password(tmp_path: Path) -> None:
    for uri, code in [
        ("zeo://po:hunter2@%(here)s/nobody.sock?wait_timeout=1", 75),
        ("postgres://po:hunter2@127.0.0.1/mail", 78),
    ]:
        path = tmp_path / "postoffice.ini"
        path.write_text(
            CONFIG.replace("file://%(here)s/var/Data.fs?blobstorage_dir=%(here)s/var/blobs", uri)
        )
        result = run("-C", str(path), "check")
        assert result.returncode == code, result.stderr
        assert "hunter2" not in result.stdout + result.stderr
        assert "po:***@" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_serve_with_a_scheme_nothing_resolves_exits_before_listening(tmp_path: Path) -> None:
    path = tmp_path / "postoffice.ini"
    path.write_text(
        CONFIG.replace(
            "file://%(here)s/var/Data.fs?blobstorage_dir=%(here)s/var/blobs",
            "postgres://po:hunter2@127.0.0.1/mail",
        )
        + f"\n[lmtp]\nlisten = unix:{tmp_path / 'lmtp.sock'}\n"
    )
    result = run("-C", str(path), "serve")
    assert result.returncode == 78
    [line] = result.stderr.strip().splitlines()
    assert "no resolver for postgres: URIs" in line and "postoffice[postgresql]" in line
    assert "hunter2" not in line
    assert not (tmp_path / "lmtp.sock").exists()
