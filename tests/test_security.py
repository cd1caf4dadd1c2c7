"""What a local user or a remote sender must not be able to do through postoffice.

- The LMTP socket never exists with a wider mode than configured, not even
  for the moment between bind() and chmod(), whatever the umask.
- TCP listening beyond loopback is refused unless ``allow_remote = yes``
  (LMTP has no authentication), with one line and exit 78; nothing listens.
- Header values of a sender's message (CR/LF raw, or hidden in RFC 2047
  words) cannot add headers or recipients to our bounces and notices.
- ``postoffice-deliver`` reads its configuration and regexp files with its
  own rights (it has no setuid path): run as ``nobody``, it cannot read a
  root-only file, directly or through a symlink, and defers (exit 75) with
  one line; a symlink at the socket path is never followed.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import socket
import stat
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterator
from email import message_from_bytes, policy
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import transaction

from postoffice import SMTPSender, config, open_queue
from postoffice.config import parse_listen
from postoffice.deliver import Depot
from postoffice.errors import ConfigError, ListenError
from postoffice.lmtp import LmtpServer
from postoffice.notices import to_wire
from postoffice.pipe import CONFIG_FAILED
from postoffice.sockets import bind_unix, check_loopback
from tests.helpers import ENVELOPE, message, settings_for, uri_for, write_config, write_lmtp_config
from tests.integration.nobody import nobody_ids
from tests.integration.postfix_instance import (
    SmtpSink,
    free_port,
    make_traversable,
    require_root,
)

pytestmark = pytest.mark.timeout(120)

# --- the socket's mode ----------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o660, 0o666], ids=["0600", "0660", "0666"])
def test_the_socket_is_born_with_its_mode_under_umask_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    """The mode right after bind(), before any chmod, is already no wider than configured.

    bind() creates the file in one step, so its mode at that instant is the
    widest it ever has: checking it there leaves no window to race.
    """
    born: list[int] = []

    class Recording(socket.socket):
        def bind(self, address: Any) -> None:
            super().bind(address)
            if self.family == socket.AF_UNIX:
                born.append(stat.S_IMODE(os.lstat(address).st_mode))

    monkeypatch.setattr(socket, "socket", Recording)
    path = tmp_path / "lmtp.sock"
    previous = os.umask(0)
    try:
        listener = bind_unix(path, mode)
    finally:
        os.umask(previous)
    listener.close()
    assert born and born[0] & ~mode == 0, f"born {born[0]:o}, configured {mode:o}"
    assert stat.S_IMODE(path.lstat().st_mode) == mode


def watch_modes(path: Path, stop: threading.Event, seen: set[int]) -> None:
    """Every mode ``path`` is seen with, as fast as we can look, until ``stop``."""
    while not stop.is_set():
        with contextlib.suppress(FileNotFoundError):
            seen.add(stat.S_IMODE(os.lstat(path).st_mode))


@pytest.mark.integration
def test_no_moment_where_the_socket_of_a_starting_server_is_world_writable(
    tmp_path: Path,
) -> None:
    """``postoffice serve`` started under umask 0, watched by another thread the whole time."""
    path = write_lmtp_config(tmp_path, zodb_uri="memory://", mode="0660")
    sock = tmp_path / "lmtp.sock"
    for _run in range(4):
        seen: set[int] = set()
        stop = threading.Event()
        watcher = threading.Thread(target=watch_modes, args=(sock, stop, seen))
        watcher.start()
        proc = subprocess.Popen(
            [sys.executable, "-m", "postoffice.lmtp", "-C", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            umask=0,
        )
        try:
            assert proc.stdout is not None
            assert b"listening on unix:" in proc.stdout.readline()
        finally:
            proc.terminate()
            proc.wait(30)
            stop.set()
            watcher.join(10)
        assert seen, "the watcher saw the socket"
        assert all(mode & ~0o660 == 0 for mode in seen), sorted(f"{m:o}" for m in seen)


# --- TCP beyond loopback ----------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "0"])
def test_serve_refuses_a_non_loopback_address_with_one_line(tmp_path: Path, host: str) -> None:
    path = write_lmtp_config(tmp_path, zodb_uri="memory://")
    port = free_port()
    address = f"{host}:{port}"
    result = subprocess.run(
        [sys.executable, "-m", "postoffice.cli", "-C", str(path), "serve", "--listen", address],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 78
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("postoffice: listen ") and "allow_remote = yes" in line
    assert "Traceback" not in result.stderr + result.stdout
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", port))


@pytest.mark.parametrize(
    "listen",
    ["0.0.0.0:8024", "[::]:8024", "*:8024", "0:8024", "[::ffff:127.0.0.1]:8024", "192.0.2.1:8024"],
)
def test_every_spelling_of_beyond_loopback_is_refused(listen: str) -> None:
    """``*`` included: glibc reads it as loopback, except for the passive lookup a bind makes."""
    with pytest.raises(ConfigError, match="allow_remote"):
        check_loopback(parse_listen(listen), allow_remote=False)
    check_loopback(parse_listen(listen), allow_remote=True)  # said explicitly: allowed


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:8024", "127.1:8024", "[::1]:8024", "localhost:8024", "unix:/x/y.sock"]
)
def test_loopback_and_unix_addresses_need_nothing(listen: str) -> None:
    check_loopback(parse_listen(listen), allow_remote=False)


def test_allow_remote_is_read_from_the_config(tmp_path: Path) -> None:
    path = write_lmtp_config(tmp_path, zodb_uri="memory://")
    text = path.read_text().replace("[lmtp]\n", "[lmtp]\nallow_remote = yes\n")
    path.write_text(text)
    assert config.load(path).lmtp.allow_remote is True
    path.write_text(text.replace("allow_remote = yes", "allow_remote = no"))
    assert config.load(path).lmtp.allow_remote is False


# --- headers from a sender in our bounces and notices ---------------------------------------

SENDER = "s@outside.test"
CRLF_Q = "=?utf-8?q?a=0D=0ABcc:_evil@x.test?="
CRLF_B = "=?utf-8?b?" + base64.b64encode(b"hi\r\nBcc: evil@x.test\r\n\r\nbody").decode() + "?="
SEPARATORS_B = (
    "=?utf-8?b?"
    + base64.b64encode("x\u2028Bcc: evil@x.test\x85Cc: e@x.test\x0bX: y\x0cZ: w".encode()).decode()
    + "?="
)
# (what is tried, the header lines of the original that try it)
HOSTILE = [
    ("encoded CRLF in Subject", [f"Subject: {CRLF_Q}"]),
    ("encoded CRLF in To", [f"To: {CRLF_Q} <help@a.test>"]),
    ("encoded CRLF in From", [f"From: {CRLF_Q} <{SENDER}>"]),
    ("encoded colon and comma in From", [f"From: =?utf-8?q?x:evil@x.test,?= <{SENDER}>"]),
    ("encoded address in From", [f"From: =?utf-8?q?<evil@x.test>?= <{SENDER}>"]),
    ("base64 CRLF and a blank line", [f"Subject: {CRLF_B}", f"To: {CRLF_B} <help@a.test>"]),
    ("unicode line separators", [f"Subject: {SEPARATORS_B}", f"To: {SEPARATORS_B}"]),
    ("bare CR", ["Subject: hi\rBcc: evil@x.test", "To: help@a.test\rCc: evil@x.test"]),
    ("encoded NUL", ["To: =?utf-8?q?=00Bcc:_evil@x.test?= <help@a.test>"]),
    ("encoded CRLF in Date", [f"Date: {CRLF_Q}"]),
    ("encoded CRLF in Message-Id", [f"Message-Id: <{CRLF_Q}@x.test>"]),
    ("folded Bcc", ["Subject: a\r\n Bcc: evil@x.test", "To: help@a.test\r\n\tBcc: evil@x.test"]),
    ("long run of words", ["Subject: " + " ".join([CRLF_B] * 40)]),
]
OUR_HEADERS = {
    "From",
    "To",
    "Subject",
    "Date",
    "Message-Id",
    "In-Reply-To",
    "References",
    "X-Postoffice",
    "Auto-Submitted",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
}


def original(number: int, lines: list[str]) -> bytes:
    """A message with the hostile lines, and the defaults for whatever they leave out."""
    names = {line.split(":", 1)[0] for line in lines}
    defaults = {
        "sender": ("From", f"Sender <{SENDER}>"),
        "to": ("To", "help@a.test"),
        "subject": ("Subject", "help"),
        "message_id": ("Message-Id", f"<{number}@outside.test>"),
        "date": ("Date", "Tue, 24 Nov 2026 11:18:48 +0000"),
    }
    headers: dict[str, Any] = {
        field: None if name in names else value for field, (name, value) in defaults.items()
    }
    extra = [f"X-Unique: {number}"] if "Message-Id" in names else []  # no two alike for the ledger
    return message(number, *extra, *lines, **headers, body="Body.\n")


def check_ours(wire: bytes, kind: str) -> Message:
    """Our mail as it goes out: only our headers, each once, each line whole; MIME intact."""
    head, separator, _body = wire.partition(b"\r\n\r\n")
    assert separator, "a header block and a body"
    assert b"\x00" not in head
    names = []
    for line in head.split(b"\r\n"):
        assert b"\r" not in line and b"\n" not in line, line
        if line[:1] in (b" ", b"\t"):
            continue  # folding: part of the header above
        name, colon, _value = line.partition(b":")
        assert colon, line
        names.append(name.decode("ascii"))
    assert set(names) <= OUR_HEADERS, set(names) - OUR_HEADERS
    assert len(names) == len(set(names)), names
    parsed = message_from_bytes(wire, policy=policy.default)
    assert parsed["To"] == SENDER
    assert parsed["X-Postoffice"] == "Bounced"
    if kind == "bounce":
        parts = [part.get_content_type() for part in parsed.iter_parts()]
        assert parts == ["text/plain", "text/rfc822-headers"]
    return parsed


class Recorder:
    """A ``send`` that keeps what would go on the wire, and passes it on to a real MTA if given."""

    def __init__(self, forward: SMTPSender | None = None) -> None:
        self.sent: list[tuple[str, list[str], bytes]] = []
        self.forward = forward

    def __call__(self, from_addr: str, to_addrs: list[str], message: Message) -> None:
        self.sent.append((from_addr, list(to_addrs), to_wire(message)))
        if self.forward is not None:
            self.forward(from_addr, to_addrs, message)


@pytest.fixture
def hostile_queue(tmp_path: Path) -> Iterator[Depot]:
    """A depot whose queue A holds every hostile original, delivered as the LMTP server would."""
    depot = Depot(settings_for(tmp_path, queues={"A": "to_hostname: a.test" + ENVELOPE}))
    for number, (what, lines) in enumerate(HOSTILE):
        (outcome,) = depot.deliver(SENDER, [f"help{number}@a.test"], original(number, lines))
        assert "queued in A" in outcome.reply, (what, outcome.reply)
    yield depot
    depot.close()


def bounce_and_quarantine_all(depot: Depot, send: Recorder) -> None:
    """What a consumer does: bounce one half, quarantine the other with a notice."""
    with open_queue(depot.db(), "A") as queue:
        for number in range(len(HOSTILE)):
            message = queue.pop_next()
            if number % 2 == 0:
                queue.bounce(message, send, "Bounces <bounces@a.test>", "No such ticket.")
            else:
                queue.quarantine(message, "broken", send=send, notice_from="app@a.test")
            transaction.commit()


def test_sender_headers_cannot_inject_into_our_bounces_and_notices(hostile_queue: Depot) -> None:
    send = Recorder()
    bounce_and_quarantine_all(hostile_queue, send)
    assert len(send.sent) == len(HOSTILE)
    for number, ((what, _lines), (from_addr, to_addrs, wire)) in enumerate(
        zip(HOSTILE, send.sent, strict=True)
    ):
        assert to_addrs == [SENDER], what
        assert from_addr in ("Bounces <bounces@a.test>", "app@a.test")
        parsed = check_ours(wire, "bounce" if number % 2 == 0 else "notice")
        assert "evil" not in str(parsed["To"]), what


@pytest.mark.integration
def test_an_mta_gets_one_recipient_and_only_our_headers(
    hostile_queue: Depot, tmp_path: Path
) -> None:
    """The same mail through ``SMTPSender`` to Postfix's smtp-sink: the envelope it records."""
    with SmtpSink(tmp_path / "sink") as sink:
        assert sink.port is not None
        send = Recorder(SMTPSender("127.0.0.1", sink.port, timeout=10))
        bounce_and_quarantine_all(hostile_queue, send)
        received = sink.wait_for_messages(len(HOSTILE), timeout=30)
    assert len(received) == len(HOSTILE)
    for got in received:
        assert got.rcpt_to == [SENDER]
        assert got.mail_from in ("bounces@a.test", "app@a.test")
        head = got.data.split(b"\n\n", 1)[0]  # smtp-sink drops CRs
        names = {
            line.split(b":", 1)[0].decode() for line in head.split(b"\n") if line[:1] not in b" \t"
        }
        assert names <= OUR_HEADERS, names - OUR_HEADERS


# --- files read with the command's own rights ----------------------------------------------

GOOD_MESSAGE = (
    b"From: a@outside.test\nTo: x@alpha.test\nMessage-Id: <nobody-1@outside.test>\n\nHello.\n"
)
SECRET = "root-only secret 5f3a"


@pytest.fixture
def as_nobody(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., tuple[int, str]]:
    """Run ``postoffice-deliver -C CONFIG`` as user nobody; (exit status, stderr)."""
    require_root()
    command: list[str] = request.getfixturevalue("nobody_command")
    uid, gid = nobody_ids()
    make_traversable(tmp_path)
    log = tmp_path / "deliver.log"
    log.touch()
    os.chown(log, uid, gid)

    def run(config_path: Path) -> tuple[int, str]:
        proc = subprocess.run(
            [*command, "-C", str(config_path), "-f", "a@outside.test", "--", "x@alpha.test"],
            input=GOOD_MESSAGE,
            capture_output=True,
            user=uid,
            group=gid,
            extra_groups=[],
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "POSTOFFICE_LOG": str(log)},
            timeout=60,
            check=False,
        )
        stderr = proc.stderr.decode("utf-8", "replace")
        assert SECRET not in stderr + log.read_text(), "a root-only file leaked"
        assert "Traceback" not in stderr
        return proc.returncode, stderr

    return run


def nobody_depot(tmp_path: Path, regexp_file: Path | None = None) -> Path:
    """A config (0644) and a database folder nobody may write; optionally a regexp file."""
    depot = tmp_path / "depot"
    depot.mkdir()
    os.chown(depot, *nobody_ids())
    rules = [f"header_regexp_file: {regexp_file}"] if regexp_file else []
    path = write_config(
        tmp_path,
        zodb_uri=uri_for(depot),
        reject_filters=[*rules, "header_regexp: X-Never: never"],
        queues={"Alpha": "to_hostname: alpha.test" + ENVELOPE},
    )
    path.chmod(0o644)
    return path


def root_only(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_nobody_delivers_when_it_may_read_everything(
    as_nobody: Callable[..., tuple[int, str]], tmp_path: Path
) -> None:
    """The control: the setup itself lets nobody deliver, so a 75 below is about rights."""
    rules = tmp_path / "rules.txt"
    rules.write_text("Subject: never\n")
    rules.chmod(0o644)
    assert as_nobody(nobody_depot(tmp_path, rules)) == (0, "")


def test_a_root_only_config_is_not_read(
    as_nobody: Callable[..., tuple[int, str]], tmp_path: Path
) -> None:
    path = nobody_depot(tmp_path)
    path.write_text(path.read_text() + f"# {SECRET}\n")
    path.chmod(0o600)
    assert as_nobody(path) == (75, CONFIG_FAILED)


def test_a_root_only_regexp_file_is_not_read(
    as_nobody: Callable[..., tuple[int, str]], tmp_path: Path
) -> None:
    rules = root_only(tmp_path / "rules.txt", f"Subject: {SECRET}\n")
    assert as_nobody(nobody_depot(tmp_path, rules)) == (75, CONFIG_FAILED)


def test_a_symlink_to_a_root_only_file_gives_no_more_rights(
    as_nobody: Callable[..., tuple[int, str]], tmp_path: Path
) -> None:
    """A regexp file that is a symlink into a private folder: the target's rights apply."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    target = root_only(private / "shadow", f"Subject: {SECRET}\n")
    link = tmp_path / "rules.txt"
    link.symlink_to(target)
    assert as_nobody(nobody_depot(tmp_path, link)) == (75, CONFIG_FAILED)


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
def test_a_symlink_at_the_socket_path_is_never_followed(tmp_path: Path, dangling: bool) -> None:
    """The server neither removes, nor chmods, nor binds through a symlink where its socket goes."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    target = private / "precious"
    if not dangling:
        root_only(target, "precious")
    sock = tmp_path / "lmtp.sock"
    sock.symlink_to(target)
    path = write_lmtp_config(tmp_path, zodb_uri="memory://", mode="0666")
    with pytest.raises(ListenError, match="not a socket"):
        LmtpServer(config.load(path)).start()
    assert sock.is_symlink() and os.readlink(sock) == str(target)
    if dangling:
        assert not target.exists()
    else:
        assert target.read_text() == "precious"
        assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_postoffice_deliver_has_no_setuid_path() -> None:
    """It runs with the rights pipe(8) gives it (``user=`` in master.cf), nothing more."""
    script = Path(sysconfig.get_path("scripts")) / "postoffice-deliver"
    if not script.exists():
        pytest.skip(f"{script} is not installed")
    mode = script.stat().st_mode
    assert not mode & (stat.S_ISUID | stat.S_ISGID)
    assert re.match(rb"#!.*python", script.read_bytes()), "a script, which setuid cannot affect"


# --- the install order of docs/postfix.md: check as root, serve as the service user -------------


def test_check_as_root_creates_nothing_and_serve_as_another_user_exits_78(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """``check`` before the first ``serve`` must not leave root's files in the way.

    And when root's files are in the way anyway (root ran ``serve`` once),
    the service user's ``serve`` stops with a configuration error (78),
    which systemd does not restart for ever as it does a 75.
    """
    require_root()
    pipe_command: list[str] = request.getfixturevalue("nobody_command")
    cli_command = [*pipe_command[:-1], "postoffice.cli"]
    make_traversable(tmp_path)
    cfg = nobody_depot(tmp_path)
    data_fs = tmp_path / "depot" / "Data.fs"

    checked = subprocess.run(
        [sys.executable, "-m", "postoffice.cli", "-C", str(cfg), "check"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert f"no database at {data_fs} yet (postoffice serve creates it)" in checked.stdout
    assert sorted(p.name for p in (tmp_path / "depot").iterdir()) == []

    root_depot = Depot(config.load(cfg))  # root makes the database (and its lock file)
    root_depot.prepare()
    root_depot.close()
    uid, gid = nobody_ids()
    served = subprocess.run(
        [*cli_command, "-C", str(cfg), "serve", "--listen", f"unix:{tmp_path}/lmtp.sock"],
        capture_output=True, text=True, user=uid, group=gid, extra_groups=[], cwd="/",
        env={"PATH": "/usr/bin:/bin"}, timeout=60, check=False,
    )  # fmt: skip
    assert served.returncode == 78, served.stderr
    (line,) = served.stderr.splitlines()
    assert "Permission denied" in line
    assert line.endswith("(run as the user that owns the database)")
