"""Smoke tests of the Postfix test harness itself: if these fail, no integration test can pass."""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from tests.helpers import message
from tests.integration.conftest import PostfixFactory
from tests.integration.postfix_instance import SmtpSink, parse_sink_dump

pytestmark = pytest.mark.integration


def _message(subject: str, to: str) -> bytes:
    return message(
        sender="sender@example.test",
        to=to,
        message_id=f"<{subject.replace(' ', '-')}@example.test>",
        subject=subject,
        body="first line\n.leading dot survives\n\nlast line\n",
    )


def test_postfix_delivers_over_lmtp_to_smtp_sink(
    postfix_factory: PostfixFactory, tmp_path: Path
) -> None:
    with SmtpSink(tmp_path / "dump", socket_path=tmp_path / "lmtp.sock") as sink:
        postfix = postfix_factory({"app.test": sink.transport})
        refused = postfix.send(
            "sender@example.test",
            ["one@app.test", "two@app.test"],
            _message("via postfix", "one@app.test"),
        )
        assert refused == {}
        postfix.wait_until_queue_empty(timeout=20)
        postfix.wait_for_log(r"status=sent", timeout=5)
        [received] = sink.wait_for_messages(1)

    assert received.mail_from == "sender@example.test"
    assert received.rcpt_to == ["one@app.test", "two@app.test"]
    assert b"Subject: via postfix\n" in received.data
    assert b"\n.leading dot survives\n" in received.data
    assert received.data.endswith(b"last line\n")
    assert "status=bounced" not in postfix.maillog()


def test_smtp_sink_dump_round_trips_an_smtplib_message(tmp_path: Path) -> None:
    sent = _message("direct", "rcpt@sink.test")
    with SmtpSink(tmp_path / "dump") as sink:
        assert sink.port is not None
        with smtplib.SMTP("127.0.0.1", sink.port, "client.test", timeout=10) as client:
            client.sendmail("from@example.test", ["a@sink.test", "b@sink.test"], sent)
            client.sendmail("", ["c@sink.test"], b"Subject: second\r\n\r\nhi\r\n")
        # Two messages dumped within one clock tick have no defined order.
        received = sorted(sink.wait_for_messages(2), key=lambda m: m.rcpt_to)

    assert [m.mail_from for m in received] == ["from@example.test", ""]
    assert [m.rcpt_to for m in received] == [["a@sink.test", "b@sink.test"], ["c@sink.test"]]
    assert received[0].data == sent.replace(b"\r\n", b"\n")
    assert received[1].data == b"Subject: second\n\nhi\n"


def test_parse_sink_dump_reads_esmtp_parameters_and_bounce_sender() -> None:
    raw = (
        b"X-Client-Addr: 127.0.0.1\n"
        b"X-Client-Proto: LMTP\n"
        b"X-Helo-Args: postfix.test\n"
        b"X-Mail-Args: <> SIZE=20 BODY=8BITMIME\n"
        b"X-Rcpt-Args: <a@app.test> NOTIFY=NEVER ORCPT=rfc822;a@app.test\n"
        b"Received: from postfix.test ([127.0.0.1])\n"
        b"\tby sink (smtp-sink) with LMTP id 0001;\n"
        b"\tMon, 1 Jan 2024 00:00:00 +0000 (UTC)\n"
        b"Subject: x\n\nbody\n\n"
    )
    parsed = parse_sink_dump(raw)
    assert parsed.mail_from == ""
    assert parsed.rcpt_to == ["a@app.test"]
    assert parsed.data == b"Subject: x\n\nbody\n"
