"""The ready ``SMTPSender`` against Postfix's own ``smtp-sink``.

A consumer bounces one message and quarantines another with a notice; the
sink, started by the test on 127.0.0.1 and dumping every transaction to a
file, shows what an MTA receives: the envelope (MAIL FROM our address, RCPT
TO the original sender) and our marks.  A decision whose transaction is
aborted sends nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from email import message_from_bytes, policy
from pathlib import Path

import pytest
import transaction

from postoffice import SMTPSender, open_queue
from postoffice.deliver import Depot
from tests.helpers import message, settings_for
from tests.integration.postfix_instance import SinkMessage, SmtpSink

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def ticket(number: int) -> bytes:
    """A help request from sender N to the help desk."""
    return message(
        number,
        sender=f"Sender {number} <sender{number}@outside.example>",
        to="Help Desk <help@a.example>",
        subject=f"ticket {number}",
        body=f"Please help with {number}.\n",
    )


@pytest.fixture
def depot(tmp_path: Path) -> Iterator[Depot]:
    one = Depot(settings_for(tmp_path, queues={"A": "to_hostname: a.example"}))
    for number in range(4):
        (outcome,) = one.deliver(
            f"sender{number}@outside.example", ["help@a.example"], ticket(number)
        )
        assert outcome.reply.startswith("250 "), outcome.reply
    yield one
    one.close()


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[SmtpSink]:
    with SmtpSink(tmp_path / "sink") as running:
        yield running


def _by_recipient(received: list[SinkMessage]) -> dict[str, SinkMessage]:
    return {m.rcpt_to[0]: m for m in received}


def test_bounce_and_notice_arrive_with_envelope_and_marks_none_when_aborted(
    depot: Depot, sink: SmtpSink
) -> None:
    assert sink.port is not None
    send = SMTPSender("127.0.0.1", sink.port, timeout=10)
    with open_queue(depot.db(), "A") as queue:
        # Decided, then aborted: neither may reach the MTA.
        queue.bounce(queue.pop_next(), send, "bounces@a.example", "not today")
        queue.quarantine(queue.pop_next(), "broken", send=send, notice_from="app@a.example")
        transaction.abort()
        # The same two messages, decided again and committed.
        bounced = queue.pop_next()
        queue.bounce(bounced, send, "Bounces <bounces@a.example>", "No such ticket.")
        transaction.commit()
        failed = queue.pop_next()
        transaction.abort()
        queue.quarantine(failed, "broken", send=send, notice_from="App <app@a.example>")
        transaction.commit()
        # A third, bounced and aborted for good.
        queue.bounce(queue.pop_next(), send, "bounces@a.example")
        transaction.abort()

    received = sink.wait_for_messages(2, timeout=15)
    assert len(received) == 2, [m.rcpt_to for m in received]
    got = _by_recipient(received)
    assert set(got) == {"sender0@outside.example", "sender1@outside.example"}

    bounce = got["sender0@outside.example"]
    assert bounce.mail_from == "bounces@a.example"
    assert bounce.rcpt_to == ["sender0@outside.example"]
    parsed = message_from_bytes(bounce.data, policy=policy.default)
    assert parsed["X-Postoffice"] == "Bounced"
    assert parsed["Auto-Submitted"] == "auto-replied"
    assert parsed["Subject"] == "Your message to Help Desk <help@a.example> has bounced."
    assert "No such ticket." in parsed.get_body(("plain",)).get_content()

    notice = got["sender1@outside.example"]
    assert notice.mail_from == "app@a.example"
    assert notice.rcpt_to == ["sender1@outside.example"]
    parsed = message_from_bytes(notice.data, policy=policy.default)
    assert parsed["X-Postoffice"] == "Bounced"
    assert parsed["Auto-Submitted"] == "auto-replied"
    assert parsed["In-Reply-To"] == "<1@outside.example>"

    with open_queue(depot.db(), "A") as queue:
        assert queue.count_quarantined_messages() == 1
        assert len(queue) == 2  # the two aborted in the end are still there
