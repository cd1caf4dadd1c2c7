"""The ``postoffice`` command as an administrator meets it: real files, real database."""

from __future__ import annotations

import json
import logging
import mailbox
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import transaction

from postoffice import cli, config, open_queue
from postoffice.deliver import Depot
from tests.helpers import HERE_URI, config_text, message


def config_with(zodb_uri: str = HERE_URI, **options: object) -> str:
    """The configuration of these tests, on another database or with more options."""
    return config_text(
        zodb_uri,
        maildir="%(here)s/Maildir",
        reject_filters=["to_hostname: .refused.example"],
        **options,  # type: ignore[arg-type]
    )


CONFIG = config_with()


def maildir_message(n: int, to: str = "user@a.example") -> bytes:
    """A message as a Maildir or the command's standard input holds it: LF line ends."""
    return message(n, sender="sender@outside.example", to=to, body=f"body {n}\n", eol="\n")


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "postoffice.ini"
    path.write_text(CONFIG)
    return path


def served(cfg: Path) -> config.Settings:
    """The depot of ``cfg`` as the first ``serve`` leaves it: folder and queues made."""
    settings = config.load(cfg)
    depot = Depot(settings)
    try:
        depot.prepare()
    finally:
        depot.close()
    return settings


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
    served(cfg)
    env = dict(os.environ, POSTOFFICE_CONFIG=str(cfg))
    result = run("check", cwd=tmp_path / "..", env=env)
    assert result.returncode == 0, result.stderr
    assert "configuration is valid (2 queues)" in result.stdout
    assert "is reachable" in result.stdout


def test_unreachable_database_is_one_line_exit_75(tmp_path: Path) -> None:
    path = tmp_path / "postoffice.ini"
    path.write_text(
        config_with(
            "zeo://%(here)s/nobody.sock?wait_timeout=1",
        )
    )
    result = run("-C", str(path), "queues")
    assert result.returncode == 75
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_a_listing_piped_into_a_reader_that_went_away_ends_quietly(cfg: Path) -> None:
    """``postoffice queues | head -1``: no "unexpected error", the status of a SIGPIPE."""
    served(cfg)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before anything is written
    try:
        result = subprocess.run(
            [sys.executable, "-m", "postoffice.cli", "-C", str(cfg), "queues"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (128 + signal.SIGPIPE, "")


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
    rows = {row["name"]: row for row in json.loads(result.stdout)["queues"]}
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
    header, *lines = listing.stdout.strip().splitlines()
    assert header.split() == ["id", "message-id", "from", "error"]
    assert len(lines) == 2
    first_id = lines[0].split()[0]
    assert "<1@outside.example>" in lines[0]
    shown = run("-C", str(cfg), "quarantine", "show", "A", first_id)
    assert "Subject: number 1" in shown.stdout
    assert "ValueError: bad number 1" in shown.stdout
    second_id = lines[1].split()[0]
    assert run("-C", str(cfg), "quarantine", "delete", "A", second_id).returncode == 0
    assert run("-C", str(cfg), "quarantine", "requeue", "A").returncode == 0
    with open_queue(settings.zodb_uri, "A") as queue:
        assert queue.count_quarantined_messages() == 0
        assert len(queue) == 1
        assert queue.pop_next()["Subject"] == "number 1"
        transaction.abort()


def test_quarantine_of_unknown_queue_names_known_ones(cfg: Path) -> None:
    served(cfg)
    result = run("-C", str(cfg), "quarantine", "list", "Nope")
    assert result.returncode != 0
    assert "'Nope'" in result.stderr and "'A'" in result.stderr and "'B'" in result.stderr


def test_try_prints_decision_and_stores_nothing(cfg: Path, tmp_path: Path) -> None:
    eml = tmp_path / "m.eml"
    eml.write_bytes(maildir_message(7))
    served(cfg)
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
    # As postoffice-deliver would exit for these two: the refused one wins (69).
    assert result.returncode == 69, result.stderr
    out = result.stdout.splitlines()
    assert out[0].startswith("user@a.example: accept (rule 9) 250 2.0.0 queue=A")
    assert out[1].startswith("x@refused.example: reject (rule 4) 550 5.7.1")
    with open_queue(config.load(cfg).zodb_uri, "A") as queue:
        assert len(queue) == 0


@pytest.mark.parametrize(
    ("rcpts", "status"),
    [
        (["user@a.example"], 0),
        (["nobody@nowhere.example"], 67),
        (["user@a.example", "nobody@nowhere.example"], 67),
        (["nobody@nowhere.example", "x@refused.example"], 69),
    ],
)
def test_try_exits_as_the_pipe_would(cfg: Path, rcpts: list[str], status: int) -> None:
    """A script can test a rule change by the exit status alone, message on standard input."""
    served(cfg)
    argv = ["-C", str(cfg), "try", "-", "--sender", "s@outside.example"]
    for rcpt in rcpts:
        argv += ["--rcpt", rcpt]
    result = run(*argv, stdin=maildir_message(8))
    assert result.returncode == status, result.stdout + result.stderr
    assert len(result.stdout.splitlines()) == len(rcpts)


def test_try_json_gives_each_decision_and_the_exit(cfg: Path) -> None:
    served(cfg)
    result = run(
        "-C", str(cfg), "try", "-", "--json", "--rcpt", "user@a.example",
        "--rcpt", "nobody@nowhere.example", stdin=maildir_message(9),
    )  # fmt: skip
    assert result.returncode == 67
    report = json.loads(result.stdout)
    assert report["exit"] == 67
    assert report["note"] is None
    first, second = report["recipients"]
    assert (first["recipient"], first["action"], first["queue"], first["exit"]) == (
        "user@a.example", "accept", "A", 0,
    )  # fmt: skip
    assert (second["action"], second["rule"], second["code"], second["exit"]) == (
        "reject", "no_queue", 550, 67,
    )  # fmt: skip


def test_try_of_a_missing_file_exits_66(cfg: Path, tmp_path: Path) -> None:
    result = run("-C", str(cfg), "try", str(tmp_path / "gone.eml"), "--rcpt", "user@a.example")
    assert result.returncode == 66
    assert result.stderr == f"postoffice: {tmp_path / 'gone.eml'}: No such file or directory\n"


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
        config_with(
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
    served(cfg)
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
        path.write_text(config_with(uri))
        result = run("-C", str(path), "check")
        assert result.returncode == code, result.stderr
        assert "hunter2" not in result.stdout + result.stderr
        assert "po:***@" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_serve_with_a_scheme_nothing_resolves_exits_before_listening(tmp_path: Path) -> None:
    path = tmp_path / "postoffice.ini"
    path.write_text(
        config_with("postgress://po:hunter2@127.0.0.1/mail")
        + f"\n[lmtp]\nlisten = unix:{tmp_path / 'lmtp.sock'}\n"
    )
    result = run("-C", str(path), "serve")
    assert result.returncode == 78
    [line] = result.stderr.strip().splitlines()
    assert "no resolver for postgress: URIs" in line
    assert "hunter2" not in line
    assert not (tmp_path / "lmtp.sock").exists()


# --- check refuses what serve refuses, and creates nothing -------------------------------


def test_check_before_the_first_serve_creates_nothing(cfg: Path, tmp_path: Path) -> None:
    result = run("-C", str(cfg), "check")
    assert result.returncode == 0, result.stderr
    data_fs = tmp_path / "var" / "Data.fs"
    assert f"postoffice: warning: no database at {data_fs} yet" in result.stdout
    assert not (tmp_path / "var").exists()
    for command in (["queues"], ["quarantine", "list", "A"], ["dead-letters", "list"]):
        read = run("-C", str(cfg), *command)
        assert read.returncode == 66, command
        assert (
            read.stderr
            == f"postoffice: no database at {data_fs} yet (postoffice serve creates it)\n"
        )
    assert not (tmp_path / "var").exists()


def test_check_json_reports_what_it_found(cfg: Path) -> None:
    served(cfg)
    result = run("-C", str(cfg), "check", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["config"] == str(cfg)
    assert (report["queues"], report["database_exists"], report["dead_letters"]) == (2, True, 0)
    assert report["database"].startswith("file://")
    assert report["warnings"] == []


def test_check_refuses_a_listen_address_serve_refuses(tmp_path: Path) -> None:
    path = tmp_path / "postoffice.ini"
    path.write_text(config_with(lmtp={"listen": "0.0.0.0:2424"}))
    for command in ("check", "serve"):
        result = run("-C", str(path), command)
        assert result.returncode == 78, command
        [line] = result.stderr.splitlines()
        assert "not a loopback address" in line and "allow_remote = yes" in line
    assert not (tmp_path / "var").exists()  # serve refused before opening the database
    policy = tmp_path / "policy.ini"
    policy.write_text(config_with(extra="\n[policy]\nlisten = 0.0.0.0:10040\n"))
    for command in ("check", "policy"):
        result = run("-C", str(policy), command)
        assert result.returncode == 78, command
        assert "not a loopback address" in result.stderr


def test_check_warns_of_an_open_socket_and_of_queues_that_take_no_mail(tmp_path: Path) -> None:
    path = tmp_path / "postoffice.ini"
    path.write_text(config_text(HERE_URI, lmtp={"socket_mode": "0666"}, queues={"A": None}))
    result = run("-C", str(path), "check")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if "warning:" in line]
    assert any("socket_mode = 0666 lets every local user deliver" in w for w in warnings)
    assert any("[queue:A] has no filters: it takes no mail" in w for w in warnings)
    empty = tmp_path / "empty.ini"
    empty.write_text(config_text(HERE_URI, queues={}))
    assert (
        "no [queue:NAME] section: every recipient is refused"
        in run("-C", str(empty), "check").stdout
    )


# --- quarantine: ids that are not there, and deleting all ----------------------------------


def quarantined(cfg: Path, count: int) -> list[int]:
    settings = served(cfg)
    depot = Depot(settings)
    for n in range(count):
        depot.deliver("s@outside.example", ["user@a.example"], maildir_message(n))
    depot.close()
    with open_queue(settings.zodb_uri, "A") as queue:
        for _ in range(count):
            queue.quarantine(queue.pop_next(), "broken")
        transaction.commit()
    listed = json.loads(run("-C", str(cfg), "quarantine", "list", "A", "--json").stdout)
    assert [row["error"] for row in listed] == ["broken"] * count
    return [row["id"] for row in listed]


@pytest.mark.parametrize("action", ["show", "requeue", "delete"])
def test_an_id_that_is_not_quarantined_is_named_and_exits_65(cfg: Path, action: str) -> None:
    (kept,) = quarantined(cfg, 1)
    result = run("-C", str(cfg), "quarantine", action, "A", "123")
    assert result.returncode == 65
    assert result.stderr == "postoffice: no quarantined message 123 in queue 'A'\n"
    if action != "show":  # a good id with a bad one acts on neither
        assert run("-C", str(cfg), "quarantine", action, "A", str(kept), "123").returncode == 65
    assert quarantined_ids(cfg) == [kept]


def quarantined_ids(cfg: Path) -> list[int]:
    listed = run("-C", str(cfg), "quarantine", "list", "A", "--json")
    return [row["id"] for row in json.loads(listed.stdout)]


def test_delete_without_ids_deletes_nothing_and_says_how(cfg: Path) -> None:
    ids = quarantined(cfg, 2)
    bare = run("-C", str(cfg), "quarantine", "delete", "A")
    assert bare.returncode == 64
    assert bare.stderr == (
        "postoffice: nothing deleted: name the ids, or add --all to delete every "
        "quarantined message of A\n"
    )
    assert quarantined_ids(cfg) == ids
    every = run("-C", str(cfg), "quarantine", "delete", "A", "--all")
    assert every.stdout == "postoffice: deleted 2 quarantined messages from A\n"
    assert quarantined_ids(cfg) == []
