"""End to end through a real Postfix: smtpd in, ``lmtp:unix:`` out to ``postoffice serve``.

Each test configures and starts a private Postfix instance in its temporary
folder (smtpd on a loopback port, the application domains routed to our
socket) and runs ``postoffice -C FILE serve`` as a subprocess. What is
checked is what a mail administrator sees: where Postfix's message ends up,
what Postfix writes in its log for our replies, that a 5xx becomes a bounce
to the sender and a 4xx a deferral that Postfix retries until the depot is
back. The last test loads the files of ``postfix-examples/`` into an
instance (``postfix check``, the chrooted lmtp client, the socket in the
queue directory with mode 0660 and group ``postfix``) and delivers through
them, so the examples are known to work as written.

The queues are read after ``serve`` has stopped, straight from the
FileStorage: that works whatever URI ``serve`` offers consumers while it runs.
"""

from __future__ import annotations

import grp
import os
import re
from pathlib import Path

import pytest

from tests.helpers import stored, uri_for, write_config
from tests.integration.conftest import PostfixFactory
from tests.integration.postfix_instance import (
    PostfixInstance,
    SmtpSink,
    main_cf_settings,
    make_traversable,
    require_root,
    require_tool,
)
from tests.integration.servers import (
    QUEUES,
    SENDER,
    WAIT,
    Serve,
    ZeoServer,
    delivery_status,
    make_message,
    parse,
    socket_path,
    start_serve,
)

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "postfix-examples"


# Routed to postoffice: two domains with a queue, one without.
POSTOFFICE_DOMAINS = ("app.test", "other.test", "unknown.test")


def file_uri(folder: Path) -> str:
    return uri_for(folder / "var")


def write_serve_config(folder: Path, zodb_uri: str, sock: Path) -> Path:
    """postoffice.ini with the two test queues, listening on ``sock``."""
    # 0666 only because this socket is in a test folder; production uses 0660
    # with the group postfix (postfix-examples/lmtp-postoffice.ini).
    lmtp = {"listen": f"unix:{sock}", "socket_mode": "0666"}
    return write_config(folder, zodb_uri=zodb_uri, lmtp=lmtp, queues=QUEUES)


def test_message_lands_in_the_queue_of_each_recipient(
    postfix_factory: PostfixFactory, servers: list[Serve], tmp_path: Path
) -> None:
    sock = socket_path(tmp_path, "po.sock")
    server = start_serve(servers, write_serve_config(tmp_path, file_uri(tmp_path), sock))
    pf = postfix_factory({domain: f"lmtp:unix:{sock}" for domain in POSTOFFICE_DOMAINS})

    message = make_message("alice@app.test, bob@other.test", "m1")
    assert pf.send(SENDER, ["alice@app.test", "bob@other.test"], message) == {}

    assert "queued in App" in delivery_status(pf, "alice@app.test", "sent")
    assert "queued in Other" in delivery_status(pf, "bob@other.test", "sent")
    pf.wait_until_queue_empty(WAIT)
    server.stop()

    for queue_name, recipient in (("App", "alice@app.test"), ("Other", "bob@other.test")):
        (raw,) = stored(file_uri(tmp_path), queue_name)
        # Our three lines on top, in this order, then what Postfix sent.
        assert raw.startswith(
            f"Return-Path: <{SENDER}>\r\nX-Original-To: {recipient}\r\nX-Postoffice-Date: ".encode()
        )
        copy = parse(raw)
        assert copy["Return-Path"] == f"<{SENDER}>"
        assert copy["X-Original-To"] == recipient
        assert copy["Message-Id"] == "<m1@sender.test>"
        assert copy["Subject"] == "order m1"
        assert "postfix.test" in copy["Received"]  # it really came through Postfix
        # The bytes as they came over LMTP: CRLF line ends, the body untouched.
        assert raw.endswith(b"\r\n\r\nBody of m1.\r\n")


def test_unknown_recipient_is_bounced_with_our_reply(
    postfix_factory: PostfixFactory, servers: list[Serve], tmp_path: Path
) -> None:
    sock = socket_path(tmp_path, "po.sock")
    server = start_serve(servers, write_serve_config(tmp_path, file_uri(tmp_path), sock))
    # The sender's domain goes to smtp-sink, which catches the bounce.
    with SmtpSink(tmp_path / "sink", socket_path=socket_path(tmp_path, "sink.sock")) as sink:
        transports = {domain: f"lmtp:unix:{sock}" for domain in POSTOFFICE_DOMAINS}
        transports["sender.test"] = sink.transport
        pf = postfix_factory(transports)

        # One message, one good and one unknown recipient: one LMTP transaction
        # whose replies Postfix must match to the right recipients.
        message = make_message("alice@app.test, nobody@unknown.test", "m2")
        assert pf.send(SENDER, ["alice@app.test", "nobody@unknown.test"], message) == {}

        assert "queued in App" in delivery_status(pf, "alice@app.test", "sent")
        reason = delivery_status(pf, "nobody@unknown.test", "bounced")
        assert "said: 550 5.1.1 <nobody@unknown.test>: no queue for this recipient" in reason

        (bounce,) = sink.wait_for_messages(1, timeout=WAIT)
        pf.wait_until_queue_empty(WAIT)
    server.stop()

    # The bounce goes to the envelope sender, from the null sender, and says why.
    assert bounce.mail_from == ""
    assert bounce.rcpt_to == [SENDER]
    text = re.sub(rb"\s+", b" ", bounce.data)
    assert b"Subject: Undelivered Mail Returned to Sender" in text
    # The delivery report names the refused recipient only, with our reply.
    assert b"Final-Recipient: rfc822; nobody@unknown.test Original-Recipient" in text
    assert b"Status: 5.1.1" in text
    assert b"Diagnostic-Code: smtp; 550 5.1.1 <nobody@unknown.test>: no queue for this" in text
    assert b"Final-Recipient: rfc822; alice@app.test" not in text
    assert b"Message-Id: <m2@sender.test>" in text  # the returned original

    (raw,) = stored(file_uri(tmp_path), "App")
    assert parse(raw)["X-Original-To"] == "alice@app.test"
    assert stored(file_uri(tmp_path), "Other") == []


def test_unreachable_depot_defers_until_zeo_is_back(
    postfix_factory: PostfixFactory, servers: list[Serve], tmp_path: Path
) -> None:
    sock = socket_path(tmp_path, "po.sock")
    zeo_sock = socket_path(tmp_path, "zeo.sock")
    depot = tmp_path / "depot"
    depot.mkdir()
    zeo_uri = f"zeo://{zeo_sock}?wait_timeout=1&blob_dir={depot}/blobs&shared_blob_dir=true"
    server = start_serve(servers, write_serve_config(tmp_path, zeo_uri, sock))
    pf = postfix_factory({domain: f"lmtp:unix:{sock}" for domain in POSTOFFICE_DOMAINS})

    assert pf.send(SENDER, ["alice@app.test"], make_message("alice@app.test", "m3")) == {}

    reason = delivery_status(pf, "alice@app.test", "deferred")
    assert "said: 451 4.3.0" in reason
    # Postfix keeps the message, for this recipient, and has not bounced it.
    (entry,) = pf.queue()
    recipients = entry["recipients"]
    assert isinstance(recipients, list)
    assert [r["address"] for r in recipients] == ["alice@app.test"]
    assert "status=bounced" not in pf.maillog()

    zeo = ZeoServer(zeo_sock, depot)
    try:
        zeo.start()
        pf.flush()
        assert "queued in App" in delivery_status(pf, "alice@app.test", "sent")
        pf.wait_until_queue_empty(WAIT)
        server.stop()
    finally:
        zeo.stop()

    # Every 451 stored nothing: the message is in the depot exactly once.
    (raw,) = stored(uri_for(depot), "App")
    copy = parse(raw)
    assert copy["X-Original-To"] == "alice@app.test"
    assert copy["Message-Id"] == "<m3@sender.test>"


def test_mail_waits_in_postfix_while_serve_is_down(
    postfix_factory: PostfixFactory, servers: list[Serve], tmp_path: Path
) -> None:
    sock = socket_path(tmp_path, "po.sock")
    config_path = write_serve_config(tmp_path, file_uri(tmp_path), sock)
    pf = postfix_factory({domain: f"lmtp:unix:{sock}" for domain in POSTOFFICE_DOMAINS})

    assert pf.send(SENDER, ["alice@app.test"], make_message("alice@app.test", "m4")) == {}
    reason = delivery_status(pf, "alice@app.test", "deferred")
    assert reason.startswith("connect to ") and f"[{sock}]: No such file or directory" in reason

    server = start_serve(servers, config_path)
    pf.flush()
    assert "queued in App" in delivery_status(pf, "alice@app.test", "sent")
    pf.wait_until_queue_empty(WAIT)
    server.stop()

    (raw,) = stored(file_uri(tmp_path), "App")
    assert parse(raw)["Message-Id"] == "<m4@sender.test>"


# --- the files of postfix-examples/, as written ---------------------------------------


def master_cf_services(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


class ExampleInstance(PostfixInstance):
    """The harness's instance, with the lmtp service line of lmtp-master.cf instead of its own."""

    example_services: list[str] = master_cf_services((EXAMPLES / "lmtp-master.cf").read_text())

    def master_cf(self) -> str:
        names = {line.split()[0] for line in self.example_services}
        own = [line for line in super().master_cf().splitlines() if line.split()[0] not in names]
        return "\n".join([*own, *self.example_services]) + "\n"


def test_the_lmtp_examples_deliver_through_a_chrooted_client(
    servers: list[Serve], tmp_path: Path
) -> None:
    require_tool("postfix")
    require_tool("postqueue")
    require_root()
    make_traversable(tmp_path)
    main_cf = main_cf_settings((EXAMPLES / "lmtp-main.cf").read_text())
    # The stock line, chrooted: the case the socket's place in the spool is for.
    assert [line.split() for line in ExampleInstance.example_services] == [
        ["lmtp", "unix", "-", "-", "y", "-", "-", "lmtp"]
    ]

    pf = ExampleInstance(tmp_path / "pf", {}, extra_main_cf=main_cf)
    # What docs/postfix.md tells the administrator to create, in this instance's spool.
    spool_socket_dir = pf.spool_dir / "postoffice"
    spool_socket_dir.mkdir()
    os.chown(spool_socket_dir, os.geteuid(), grp.getgrnam("postfix").gr_gid)
    spool_socket_dir.chmod(0o2750)
    sock = socket_path(spool_socket_dir, "lmtp.sock")
    assert pf.check() == ""  # no warning either

    ini_lmtp = (EXAMPLES / "lmtp-postoffice.ini").read_text()
    ini_lmtp = ini_lmtp.replace("/var/spool/postfix", str(pf.spool_dir))
    assert "socket_mode = 0660" in ini_lmtp
    config_path = write_config(
        tmp_path,
        zodb_uri=file_uri(tmp_path),
        queues={"Customer A": "to_hostname: app.customera.example"},
        extra="\n" + ini_lmtp,
    )
    server = start_serve(servers, config_path)
    info = sock.stat()
    assert oct(info.st_mode & 0o777) == oct(0o660)
    assert info.st_gid == grp.getgrnam("postfix").gr_gid  # from the setgid folder

    with pf:
        recipient = "orders@app.customera.example"
        # The lmtp client runs as the postfix user: without the group bits it
        # cannot connect, and Postfix keeps the mail (the mistake docs/postfix.md warns of).
        sock.chmod(0o600)
        assert pf.send(SENDER, [recipient], make_message(recipient, "m5")) == {}
        reason = delivery_status(pf, recipient, "deferred")
        assert reason == "connect to postfix.test[postoffice/lmtp.sock]: Permission denied"
        # With the example's mode it connects through the group postfix alone.
        sock.chmod(0o660)
        pf.flush()
        assert "queued in Customer A" in delivery_status(pf, recipient, "sent")
        pf.wait_until_queue_empty(WAIT)
    server.stop()

    (raw,) = stored(file_uri(tmp_path), "Customer A")
    assert parse(raw)["X-Original-To"] == recipient
