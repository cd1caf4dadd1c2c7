"""Bounces and notices we write, and the ready SMTP ``send``.

The builders are checked on what a recipient's mail program and an MTA
see; ``SMTPSender`` talks to a real aiosmtpd server on 127.0.0.1.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from email import message_from_bytes, policy
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from postoffice import SMTPSender
from postoffice.notices import (
    DEFAULT_BOUNCE_REASON,
    format_error,
    make_bounce,
    make_notice,
    message_sender,
    to_wire,
)
from postoffice.store import stored_message
from tests.helpers import message


def original(from_line: str = "Sender <sender@outside.example>") -> Any:
    """A stored message to the help desk from ``from_line``, with a Date."""
    return stored_message(
        message(
            sender=from_line,
            to="Help Desk <help@a.example>",
            subject="help me",
            date="Tue, 24 Nov 2026 11:18:48 +0000",
            body="Body line.\n",
        )
    )


# --- message_sender ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("from_line", "expected"),
    [
        ("Sender <Sender@Outside.example>", "Sender@Outside.example"),
        ("sender@outside.example (comment)", "sender@outside.example"),
        ('"Doe, Jane" <jane@outside.example>', "jane@outside.example"),
        ("=?utf-8?q?a=40evil=2Eexample=2C?= <real@outside.example>", "real@outside.example"),
        ("undisclosed-recipients:;", None),
        ("not an address", None),
        ("", None),
    ],
)
def test_message_sender_reads_the_address_as_written(from_line: str, expected: str | None) -> None:
    assert message_sender(original(from_line)) == expected


def test_message_sender_without_from_is_none() -> None:
    assert message_sender(stored_message(b"Subject: x\r\n\r\nbody\r\n")) is None


# --- the builders ------------------------------------------------------------------------------


def test_bounce_has_our_marks_the_reason_and_the_original_headers() -> None:
    bounce = make_bounce(original(), "Bounces <bounces@a.example>", "No such ticket.")
    assert bounce["X-Postoffice"] == "Bounced"
    assert bounce["Auto-Submitted"] == "auto-replied"
    assert bounce["To"] == "sender@outside.example"
    assert bounce["From"] == "Bounces <bounces@a.example>"
    assert bounce["Subject"] == "Your message to Help Desk <help@a.example> has bounced."
    assert bounce["In-Reply-To"] == "<1@outside.example>"
    assert bounce["Message-Id"].endswith("@a.example>")
    text = bounce.get_body(("plain",)).get_content()
    assert "No such ticket." in text
    assert "Tue, 24 Nov 2026 11:18:48 +0000" in text
    (headers,) = [p for p in bounce.iter_attachments()]
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Message-Id: <1@outside.example>" in headers.get_content()
    assert "Body line." not in headers.get_content()  # headers only: no amplification


def test_bounce_without_a_reason_gives_the_default_one() -> None:
    bounce = make_bounce(original(), "bounces@a.example")
    assert DEFAULT_BOUNCE_REASON in bounce.get_body(("plain",)).get_content()


def test_notice_says_the_message_is_kept() -> None:
    notice = make_notice(original(), "app@a.example")
    assert notice["X-Postoffice"] == "Bounced"
    assert notice["Auto-Submitted"] == "auto-replied"
    assert notice["Subject"].startswith("An error has occurred while processing your email")
    assert "set aside" in notice.get_content()


def test_format_error_takes_exc_info_an_exception_or_text() -> None:
    try:
        raise KeyError("ticket 12")
    except KeyError as exc:
        from_info = format_error(sys.exc_info())
        from_exc = format_error(exc)
    assert "Traceback" in from_info and "KeyError: 'ticket 12'" in from_info
    assert from_exc == from_info
    assert format_error("plain words") == "plain words"


def test_to_wire_uses_crlf_everywhere() -> None:
    assert to_wire(b"A: b\nC: d\r\n\nbody\rmore\n") == b"A: b\r\nC: d\r\n\r\nbody\r\nmore\r\n"
    wire = to_wire(make_notice(original(), "app@a.example"))
    assert b"\n" not in wire.replace(b"\r\n", b"")


# --- SMTPSender against a real SMTP server -----------------------------------------------------


class Recorder:
    """aiosmtpd handler keeping every envelope it is handed."""

    def __init__(self) -> None:
        self.envelopes: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(
            (envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content))
        )
        return "250 OK"


@pytest.fixture
def smtp_server() -> Iterator[tuple[Controller, Recorder]]:
    recorder = Recorder()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(recorder, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield controller, recorder
    finally:
        controller.stop()


def test_smtp_sender_delivers_envelope_and_message(
    smtp_server: tuple[Controller, Recorder],
) -> None:
    controller, recorder = smtp_server
    send = SMTPSender("127.0.0.1", controller.port, timeout=10)
    notice = make_notice(original(), "App <app@a.example>")
    send("App <app@a.example>", ["sender@outside.example"], notice)
    ((mail_from, rcpt_tos, data),) = recorder.envelopes
    assert mail_from == "app@a.example"  # the envelope takes the address, not the name
    assert rcpt_tos == ["sender@outside.example"]
    received = message_from_bytes(data, policy=policy.default)
    assert received["X-Postoffice"] == "Bounced"
    assert received["Subject"] == notice["Subject"]
