"""End to end through a real Postfix: smtpd in, ``pipe(8)`` out to ``postoffice-deliver``.

Each test starts a private Postfix instance in its temporary folder whose
``postoffice-pipe`` service is the entry of ``postfix-examples/pipe-master.cf``
and whose main.cf settings are those of ``pipe-main.cf`` (one recipient per
run), with this test's paths and ``user=nobody``.  What is checked is what a
mail administrator sees: the message in the queue, Postfix's log line and
its bounce carrying our reason and status for a refused recipient, and a
deferral (not a bounce) while the database cannot be reached, delivered once
it is back.

The command runs as ``nobody``, so nobody must reach the interpreter, the
package, the configuration and the database folder.  Where this test's
interpreter lives where nobody cannot go (pyenv under /root), the
:func:`nobody_command` fixture finds a Python of the same version that
nobody can run and hands it a copy of the installed packages.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from postoffice.sockets import MAX_SOCKET_PATH
from tests.helpers import ENVELOPE, stored, uri_for, write_config
from tests.integration.conftest import PostfixFactory
from tests.integration.nobody import nobody_ids
from tests.integration.postfix_instance import (
    PostfixInstance,
    SmtpSink,
    main_cf_settings,
    make_traversable,
)
from tests.integration.servers import SENDER, ZeoServer, delivery_status, make_message, parse

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "postfix-examples"
WAIT = 60.0
LIMIT = 100 * 1024  # max_message_size of the test depot


# --- the example files, with this test's paths ---------------------------------------------


def example_service(command: list[str], config: Path, log: Path) -> str:
    """The entry of pipe-master.cf, running our command as nobody with our config."""
    text = (EXAMPLES / "pipe-master.cf").read_text()
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    entry = "\n".join(lines)
    for old, new in (
        ("user=postoffice", "user=nobody"),
        (
            "/usr/local/bin/postoffice-deliver",
            " ".join(["/usr/bin/env", f"POSTOFFICE_LOG={log}", *command]),
        ),
        ("/etc/postoffice.ini", str(config)),
    ):
        assert old in entry, f"pipe-master.cf no longer has {old!r}"
        entry = entry.replace(old, new, 1)
    return entry


def example_main_cf() -> dict[str, str]:
    """pipe-main.cf's settings, less the example's domains (the test routes its own)."""
    settings = main_cf_settings((EXAMPLES / "pipe-main.cf").read_text())
    assert "postoffice-pipe:" in settings.pop("transport_maps")
    del settings["relay_domains"]
    assert settings["postoffice-pipe_destination_recipient_limit"] == "1"
    return settings


# --- helpers ------------------------------------------------------------------------------


class NobodyDepot:
    """The test's depot, owned by nobody; its config file and the command's log."""

    def __init__(self, base: Path, uri: str | None = None) -> None:
        self.folder = base / "depot"
        self.folder.mkdir()
        uid, gid = nobody_ids()
        os.chown(self.folder, uid, gid)
        self.folder.chmod(0o700)
        self.file_uri = uri_for(self.folder)
        self.config = write_config(
            base,
            zodb_uri=uri or self.file_uri,
            max_message_size="100k",
            queues={"App": "to_hostname: app.test" + ENVELOPE},
        )
        self.config.chmod(0o644)
        self.log = self.folder / "deliver.log"
        make_traversable(base)

    def stored(self, queue: str = "App", uri: str | None = None) -> list[bytes]:
        return stored(uri or self.file_uri, queue)

    def logged(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def start_postfix(
    factory: PostfixFactory,
    depot: NobodyDepot,
    command: list[str],
    transports: dict[str, str] | None = None,
) -> PostfixInstance:
    routes = {"app.test": "postoffice-pipe:", "unknown.test": "postoffice-pipe:"}
    routes.update(transports or {})
    return factory(
        routes,
        example_service(command, depot.config, depot.log),
        example_main_cf(),
    )


# --- tests --------------------------------------------------------------------------------


def test_pipe_examples_deliver_each_recipient_into_the_queue(
    postfix_factory: PostfixFactory, nobody_command: list[str], tmp_path: Path
) -> None:
    depot = NobodyDepot(tmp_path)
    pf = start_postfix(postfix_factory, depot, nobody_command)
    assert pf.check() == ""  # the example entry and settings, without a warning

    # One SMTP transaction, two recipients: one run of the command each.
    message = make_message("alice@app.test, bob@app.test", "m1")
    assert pf.send(SENDER, ["alice@app.test", "bob@app.test"], message) == {}
    # A bounce (null sender) must keep its empty Return-Path.
    assert pf.send("", ["alice@app.test"], make_message("alice@app.test", "m2")) == {}

    for recipient in ("alice@app.test", "bob@app.test"):
        status = delivery_status(pf, recipient, "sent")
        assert status == "delivered via postoffice-pipe service", pf.maillog()
    # Three runs of the command, each logged as sent: m1 twice (one recipient a
    # run), m2 once.
    pf.wait_for_log(r"(?s)(status=sent.*){3}", timeout=WAIT)
    pf.wait_until_queue_empty(WAIT)
    pf.stop()

    kept = depot.stored()
    assert len(kept) == 3, depot.logged()
    by_token = {(parse(raw)["Message-Id"], parse(raw)["X-Original-To"]): raw for raw in kept}
    assert set(by_token) == {
        ("<m1@sender.test>", "alice@app.test"),
        ("<m1@sender.test>", "bob@app.test"),
        ("<m2@sender.test>", "alice@app.test"),
    }
    raw = by_token[("<m1@sender.test>", "bob@app.test")]
    # Our three lines on top, LF line ends as pipe(8) writes them, one
    # Return-Path only (the example sets no R flag), the body untouched.
    assert raw.startswith(
        f"Return-Path: <{SENDER}>\nX-Original-To: bob@app.test\nX-Postoffice-Date: ".encode()
    )
    assert b"\r" not in raw
    assert raw.count(b"\nReturn-Path:") == 0
    assert raw.endswith(b"\n\nBody of m1.\n")
    assert "postfix.test" in parse(raw)["Received"]  # it really came through Postfix
    bounce = by_token[("<m2@sender.test>", "alice@app.test")]
    assert bounce.startswith(b"Return-Path: <>\nX-Original-To: alice@app.test\n")
    assert "queued in App" in depot.logged()


def test_refused_recipient_bounces_with_our_reason_and_status(
    postfix_factory: PostfixFactory, nobody_command: list[str], tmp_path: Path
) -> None:
    depot = NobodyDepot(tmp_path)
    sink_sock = tmp_path / "sink.sock"
    assert len(str(sink_sock)) <= MAX_SOCKET_PATH
    with SmtpSink(tmp_path / "sink", socket_path=sink_sock) as sink:
        # The sender's domain goes to smtp-sink, which catches the bounces.
        pf = start_postfix(postfix_factory, depot, nobody_command, {"sender.test": sink.transport})

        assert pf.send(SENDER, ["nobody@unknown.test"], make_message("x", "m3")) == {}
        reason = delivery_status(pf, "nobody@unknown.test", "bounced")
        assert reason == "<nobody@unknown.test>: no queue for this recipient"

        # Over max_message_size: the command stops reading and exits 69; Postfix,
        # whose write then fails with EPIPE, goes by our status, not "Broken pipe".
        big = make_message(
            "alice@app.test", "m4", body=("y" * 998 + "\r\n") * 999 + "y" * 998
        )  # 1 MB
        assert pf.send(SENDER, ["alice@app.test"], big) == {}
        reason = delivery_status(pf, "alice@app.test", "bounced")
        assert reason == f"message size exceeds the limit of {LIMIT} bytes"

        bounces = sink.wait_for_messages(2, timeout=WAIT)
        pf.wait_until_queue_empty(WAIT)

    texts = [re.sub(rb"\s+", b" ", b.data) for b in bounces]
    assert all(b.mail_from == "" and b.rcpt_to == [SENDER] for b in bounces)
    no_queue = next(t for t in texts if b"nobody@unknown.test" in t)
    assert b"Status: 5.1.1" in no_queue
    assert b"Diagnostic-Code: x-unix; <nobody@unknown.test>: no queue for this recipient" in (
        no_queue
    )
    too_big = next(t for t in texts if b"Final-Recipient: rfc822; alice@app.test" in t)
    assert b"Status: 5.3.4" in too_big
    assert f"message size exceeds the limit of {LIMIT} bytes".encode() in too_big
    assert depot.stored() == []


def test_unreachable_database_defers_until_zeo_is_back(
    postfix_factory: PostfixFactory,
    nobody_command: list[str],
    zeo_servers: list[ZeoServer],
    tmp_path: Path,
) -> None:
    zeo_sock = tmp_path / "zeo.sock"
    assert len(str(zeo_sock)) <= MAX_SOCKET_PATH
    server_folder = tmp_path / "server"
    server_folder.mkdir()
    # The client's blob cache is nobody's; the server's data stays root's.
    cache = tmp_path / "depot" / "zeo-cache"
    depot = NobodyDepot(tmp_path, f"zeo://{zeo_sock}?wait_timeout=1&blob_dir={cache}")
    pf = start_postfix(postfix_factory, depot, nobody_command)

    assert pf.send(SENDER, ["alice@app.test"], make_message("alice@app.test", "m5")) == {}

    reason = delivery_status(pf, "alice@app.test", "deferred")
    assert reason == "storage temporarily unavailable, try again later"
    (entry,) = pf.queue()  # Postfix keeps it, for this recipient, and bounced nothing
    recipients = entry["recipients"]
    assert isinstance(recipients, list)
    assert [r["address"] for r in recipients] == ["alice@app.test"]
    assert "status=bounced" not in pf.maillog()
    assert "timed out waiting for connection" in depot.logged()  # the detail is in our log

    zeo = ZeoServer(zeo_sock, server_folder)
    zeo_servers.append(zeo)
    zeo.start()
    pf.flush()
    assert delivery_status(pf, "alice@app.test", "sent") == "delivered via postoffice-pipe service"
    pf.wait_until_queue_empty(WAIT)
    pf.stop()
    zeo.stop()

    # Every deferral stored nothing: the message is in the depot exactly once.
    server_uri = f"file://{server_folder}/Data.fs?blobstorage_dir={server_folder}/blobs"
    (raw,) = depot.stored(uri=server_uri)
    copy = parse(raw)
    assert copy["X-Original-To"] == "alice@app.test"
    assert copy["Message-Id"] == "<m5@sender.test>"
