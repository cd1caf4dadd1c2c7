"""``postoffice policy`` as Postfix's smtpd meets it: a real process on a real socket.

The service runs as ``postoffice -C FILE policy`` next to a real ``postoffice
serve`` on a FileStorage depot (which ``serve`` shares over ZEO, and the
policy service reads through it).  A throttled sender is made the way it
happens: two messages from one sender in quick succession delivered over
LMTP, or an application throttling it through the consumer API.  Requests
are written as Postfix 3.7's smtpd writes them.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import transaction

from postoffice import open_queue
from tests.helpers import (
    ENVELOPE,
    HERE_URI,
    Process,
    client,
    message,
    reply_codes,
    run_postoffice,
    send,
    uri_for,
    wait_for,
    write_config,
)
from tests.integration.postfix_instance import free_port

WAIT = 30.0
LOOPER = "looper@outside.test"


def write_policy_config(folder: Path, **queues: str) -> Path:
    """Queues Alpha and Beta by envelope recipient, one envelope reject filter, the throttle on."""
    return write_config(
        folder,
        zodb_uri=HERE_URI,
        ooo_loop_frequency=2,
        ooo_throttle_period=3600,
        reject_filters=["to_hostname: .refused.test" + ENVELOPE],
        lmtp={"listen": f"unix:{folder / 'lmtp.sock'}"},
        queues={
            "Alpha": "to_hostname: alpha.test" + ENVELOPE,
            "Beta": "to_hostname: beta.test" + ENVELOPE,
            **{name: f"to_hostname: {host}" + ENVELOPE for name, host in queues.items()},
        },
        extra=f"\n[policy]\nlisten = unix:{folder / 'policy.sock'}\n",
    )


def rcpt(recipient: str, sender: str = "someone@outside.test", **more: str) -> dict[str, str]:
    """The attributes of an RCPT-time request, as Postfix 3.7's smtpd sends them."""
    attributes = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "client_address": "192.0.2.10",
        "client_name": "mail.outside.test",
        "client_port": "40000",
        "reverse_client_name": "mail.outside.test",
        "server_address": "127.0.0.1",
        "server_port": "25",
        "helo_name": "mail.outside.test",
        "sender": sender,
        "recipient": recipient,
        "recipient_count": "0",
        "queue_id": "",
        "instance": "1a2b.5f0c3d1e.8e1f.0",
        "size": "0",
        "etrn_domain": "",
        "stress": "",
        "sasl_method": "",
        "sasl_username": "",
        "sasl_sender": "",
        "ccert_subject": "",
        "ccert_issuer": "",
        "ccert_fingerprint": "",
        "encryption_protocol": "",
        "encryption_cipher": "",
        "encryption_keysize": "0",
        "policy_context": "",
        "compatibility_level": "3.6",
        "mail_version": "3.7.11",
    }
    attributes.update(more)
    return attributes


def wire(attributes: dict[str, str]) -> bytes:
    return "".join(f"{name}={value}\n" for name, value in attributes.items()).encode() + b"\n"


class PolicyClient:
    """One connection to the service, as smtpd keeps it: request after request."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT)
        self.sock.connect(str(path))
        self.buffer = b""

    def send(self, data: bytes) -> bool:
        """Write ``data``; False when the service already closed the connection."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def answer(self) -> str | None:
        """The next answer's ``action=`` value; None when the service closed the connection."""
        while b"\n\n" not in self.buffer:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                assert not self.buffer, f"a partial answer: {self.buffer!r}"
                return None
            self.buffer += chunk
        answer, self.buffer = self.buffer.split(b"\n\n", 1)
        [line] = answer.decode().split("\n")
        assert line.startswith("action="), line
        return line[len("action=") :]

    def ask(self, attributes: dict[str, str]) -> str:
        """Send one request and read its answer, which must come."""
        self.send(wire(attributes))
        answer = self.answer()
        assert answer is not None, "the service closed the connection instead of answering"
        return answer

    def close(self) -> None:
        self.sock.close()


class Services:
    """``postoffice serve`` and ``postoffice policy`` on one depot, in ``folder``."""

    def __init__(self, folder: Path, with_serve: bool = True) -> None:
        self.folder = folder
        self.config = write_policy_config(folder)
        self.uri = uri_for(folder / "var")
        self.policy_sock = folder / "policy.sock"
        self.lmtp_sock = folder / "lmtp.sock"
        self.serve: Process | None = None
        if with_serve:
            self.start_serve()
        self.policy = Process(
            folder, self.config, module="postoffice.cli", args=("policy",), name="policy"
        )
        self.policy.wait_for("policy service listening on", stream="out", timeout=WAIT)

    def start_serve(self) -> None:
        self.serve = Process(self.folder, self.config, name="serve")
        self.serve.wait_for("listening on", stream="out", timeout=WAIT)

    def connect(self) -> PolicyClient:
        return PolicyClient(self.policy_sock)

    def ask(self, attributes: dict[str, str]) -> str:
        connection = self.connect()
        try:
            return connection.ask(attributes)
        finally:
            connection.close()

    def log(self) -> str:
        return self.policy.err.read_text(errors="replace")

    def stop(self) -> None:
        for process in (self.policy, self.serve):
            if process is not None and process.proc.poll() is None:
                process.stop()


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """One serve and one policy service for the tests that change nothing but a throttle."""
    running = Services(tmp_path_factory.mktemp("policy"))
    yield running
    running.stop()


@pytest.fixture
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Services]]:
    """Services of a test's own (signals, outages), stopped after it."""
    started: list[Services] = []
    yield started
    for one in started:
        one.stop()


# --- the answers --------------------------------------------------------------------


def test_a_reject_filter_refuses_the_recipient_with_5_7_1(services: Services) -> None:
    assert services.ask(rcpt("user@shop.refused.test")) == (
        "REJECT 5.7.1 rejected: envelope recipient user@shop.refused.test "
        "matches to_hostname .refused.test"
    )


def test_a_recipient_no_queue_takes_is_refused_with_5_1_1(services: Services) -> None:
    assert services.ask(rcpt("nobody@unknown.test")) == (
        "REJECT 5.1.1 <nobody@unknown.test>: no queue for this recipient"
    )


def test_an_acceptable_recipient_is_left_to_the_rules_after_data(services: Services) -> None:
    assert services.ask(rcpt("user@alpha.test")) == "DUNNO"
    assert services.ask(rcpt("User@BETA.test", sender="")) == "DUNNO"


@pytest.mark.parametrize(
    "attributes",
    [
        rcpt("nobody@unknown.test", protocol_state="DATA"),
        rcpt("nobody@unknown.test", protocol_state="END-OF-MESSAGE"),
        rcpt("nobody@unknown.test", protocol_state="MAIL"),
        rcpt("nobody@unknown.test", request="smtpd_other_thing"),
        {"request": "smtpd_access_policy", "recipient": "nobody@unknown.test"},
    ],
    ids=["DATA", "END-OF-MESSAGE", "MAIL", "other request", "no protocol_state"],
)
def test_other_states_and_requests_are_dunno(
    services: Services, attributes: dict[str, str]
) -> None:
    assert services.ask(attributes) == "DUNNO"


def test_a_sender_throttled_by_its_deliveries_is_deferred(services: Services) -> None:
    lmtp = client(services.lmtp_sock)
    try:
        replies = [
            send(lmtp, ["user@alpha.test"], message(n, sender=LOOPER, to="user@alpha.test"), LOOPER)
            for n in (9001, 9002)
        ]
    finally:
        lmtp.close()
    # Two messages in a moment: the second trips the loop throttle after DATA.
    assert [reply_codes(r) for r in replies] == [[(250, "2.0.0")], [(550, "5.7.1")]]

    assert services.ask(rcpt("user@alpha.test", sender=LOOPER)) == (
        f"DEFER_IF_PERMIT 4.7.1 <{LOOPER}>: sender is throttled (mail loop suspected)"
    )
    # For that queue only, and for that sender only.
    assert services.ask(rcpt("user@beta.test", sender=LOOPER)) == "DUNNO"
    assert services.ask(rcpt("user@alpha.test", sender="other@outside.test")) == "DUNNO"
    # Nothing was stored or counted by asking: the queue holds the first message only.
    with open_queue(services.uri, "Alpha") as queue:
        assert len(queue) == 1


def test_a_throttle_an_application_sets_is_seen_by_the_next_request(services: Services) -> None:
    connection = services.connect()
    try:
        request = rcpt("user@beta.test", sender="chatty@outside.test")
        assert connection.ask(request) == "DUNNO"
        with open_queue(services.uri, "Beta") as queue:
            queue.throttle("Chatty <chatty@outside.test>", time.time() + 3600)
            transaction.commit()
        # The same connection, a fresh read of the depot.
        assert connection.ask(request) == (
            "DEFER_IF_PERMIT 4.7.1 <chatty@outside.test>: sender is throttled (mail loop suspected)"
        )
    finally:
        connection.close()


# --- connections ----------------------------------------------------------------------


def test_several_requests_on_one_connection_get_one_answer_each(services: Services) -> None:
    connection = services.connect()
    try:
        asked = [
            ("user@alpha.test", "DUNNO"),
            ("nobody@unknown.test", "REJECT 5.1.1 <nobody@unknown.test>: no queue"),
            ("user@beta.test", "DUNNO"),
            ("x@refused.test", "REJECT 5.7.1 rejected: envelope recipient x@refused.test"),
        ]
        for recipient, expected in asked:
            assert connection.ask(rcpt(recipient)).startswith(expected)
        # Pipelined: three requests in one write, three answers in order.
        assert connection.send(b"".join(wire(rcpt(r)) for r, _ in asked[:3]))
        answers = [connection.answer() for _ in range(3)]
        assert [a.split(" ")[0] if a else a for a in answers] == ["DUNNO", "REJECT", "DUNNO"]
    finally:
        connection.close()


def test_fifty_connections_at_once_are_each_answered(services: Services) -> None:
    connections = [services.connect() for _ in range(50)]
    try:
        # All fifty are open before any asks; each then asks twice.
        for n, connection in enumerate(connections):
            assert connection.send(wire(rcpt(f"user{n}@alpha.test" if n % 2 else f"u{n}@x.test")))
        for n, connection in enumerate(connections):
            expected = "DUNNO" if n % 2 else f"REJECT 5.1.1 <u{n}@x.test>: no queue"
            answer = connection.answer()
            assert answer is not None and answer.startswith(expected)
        for connection in connections:
            assert connection.ask(rcpt("user@beta.test")) == "DUNNO"
    finally:
        for connection in connections:
            connection.close()


LONGEST = rcpt("user@alpha.test", ccert_subject="s" * (4096 - len("ccert_subject=")))
MOST = {**rcpt("user@alpha.test"), **{f"x{n}": "1" for n in range(1000 - len(rcpt("a")))}}


def test_a_line_of_4096_octets_and_1000_attributes_are_still_a_request(
    services: Services,
) -> None:
    assert len(MOST) == 1000
    assert services.ask(LONGEST) == "DUNNO"
    assert services.ask(MOST) == "DUNNO"


MALFORMED = {
    "no request=": (wire(rcpt("user@alpha.test"))[len(b"request=smtpd_access_policy\n") :], True),
    "a line without =": (b"request=smtpd_access_policy\nrecipient user@alpha.test\n\n", True),
    "an empty request": (b"\n", True),
    "a line over 4096 octets": (
        wire(rcpt("user@alpha.test", ccert_subject="s" * (4097 - len("ccert_subject=")))),
        False,
    ),
    "over 1000 attributes": (wire({**MOST, "one_more": "1"}), False),
    "100 KB without a line end": (b"request=" + b"x" * 100_000, False),
    "binary noise": (bytes(range(256)) * 40 + b"\n\n", True),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_request_is_deferred_or_closed_and_the_next_connection_is_served(
    services: Services, name: str
) -> None:
    data, framed = MALFORMED[name]
    connection = services.connect()
    try:
        connection.send(data)
        answer = connection.answer()
        assert answer is None or answer.startswith("DEFER_IF_PERMIT 4.3.0 ")
        if framed:
            # The request's framing held: the connection goes on.
            assert answer is not None
            assert connection.ask(rcpt("nobody@unknown.test")).startswith("REJECT 5.1.1")
        elif answer is not None:
            assert connection.answer() is None  # answered, then closed
    finally:
        connection.close()
    assert services.ask(rcpt("nobody@unknown.test")) == (
        "REJECT 5.1.1 <nobody@unknown.test>: no queue for this recipient"
    )
    assert services.policy.proc.poll() is None
    assert "Traceback" not in services.log()


def test_a_client_gone_in_the_middle_of_a_request_harms_nobody(services: Services) -> None:
    connection = services.connect()
    connection.send(b"request=smtpd_access_policy\nprotocol_state=RCPT\nrecip")
    connection.close()
    assert services.ask(rcpt("user@alpha.test")) == "DUNNO"


# --- signals and outages ------------------------------------------------------------------


def test_sigterm_stops_cleanly_with_exit_0(
    own: list[Services], tmp_path_factory: pytest.TempPathFactory
) -> None:
    running = Services(tmp_path_factory.mktemp("term"), with_serve=False)
    own.append(running)
    idle = running.connect()
    assert idle.ask(rcpt("user@alpha.test")) == "DUNNO"
    running.policy.proc.send_signal(signal.SIGTERM)
    assert running.policy.proc.wait(WAIT) == 0
    assert idle.answer() is None  # the idle connection was closed
    idle.close()
    assert not running.policy_sock.exists()  # its socket is gone with it
    assert "Traceback" not in running.log()


def test_sighup_reloads_the_rules_and_a_bad_file_keeps_the_old_ones(
    own: list[Services], tmp_path_factory: pytest.TempPathFactory
) -> None:
    running = Services(tmp_path_factory.mktemp("hup"), with_serve=False)
    own.append(running)
    kept = running.connect()  # a connection open across both reloads
    try:
        assert kept.ask(rcpt("user@gamma.test")) == (
            "REJECT 5.1.1 <user@gamma.test>: no queue for this recipient"
        )
        write_policy_config(running.folder, Gamma="gamma.test")
        running.policy.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded the rules" in running.log(), WAIT, "the reload")
        assert kept.ask(rcpt("user@gamma.test")) == "DUNNO"
        assert running.ask(rcpt("user@gamma.test")) == "DUNNO"

        good = running.config.read_text()
        running.config.write_text(good.replace("[queue:Gamma]", "[queue:Gamma]\nfilterz = x"))
        running.policy.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in running.log(), WAIT, "the refused reload")
        [line] = [line for line in running.log().splitlines() if "reload refused" in line]
        assert "ERROR" in line and "filterz" in line and "old rules stay in force" in line
        assert kept.ask(rcpt("user@gamma.test")) == "DUNNO"  # Gamma is still known
        assert running.policy.proc.poll() is None
    finally:
        kept.close()


def test_an_unreachable_depot_gives_dunno_logged_once_and_serve_starts_beside_it(
    own: list[Services], tmp_path_factory: pytest.TempPathFactory
) -> None:
    # No serve: the FileStorage is shared by nobody, and the policy service never opens it.
    running = Services(tmp_path_factory.mktemp("away"), with_serve=False)
    own.append(running)
    for _ in range(5):
        assert running.ask(rcpt("user@alpha.test", sender=LOOPER)) == "DUNNO"
    # What the envelope decides on the configuration alone is still refused.
    assert running.ask(rcpt("nobody@unknown.test")).startswith("REJECT 5.1.1")
    warnings = [
        line for line in running.log().splitlines() if "cannot read the queue state" in line
    ]
    assert len(warnings) == 1 and "WARNING" in warnings[0]

    # serve starts while the policy service runs (no lock held), and shares the depot.
    running.start_serve()
    with open_queue(running.uri, "Alpha") as queue:
        queue.throttle(LOOPER, time.time() + 3600)
        transaction.commit()

    def deferred() -> bool:
        return running.ask(rcpt("user@alpha.test", sender=LOOPER)).startswith("DEFER_IF_PERMIT")

    wait_for(deferred, WAIT, "the throttle, read once the depot is shared", pause=0.2)
    assert "the queue state can be read again" in running.log()
    # serve goes away again: the throttle is not known, and mail is not held up.
    assert running.serve is not None
    assert running.serve.stop() == os.EX_OK
    wait_for(
        lambda: running.ask(rcpt("user@alpha.test", sender=LOOPER)) == "DUNNO",
        WAIT,
        "DUNNO once serve is gone",
        pause=0.2,
    )
    warnings = [
        line for line in running.log().splitlines() if "cannot read the queue state" in line
    ]
    assert len(warnings) == 2  # once per outage


# --- the command line -----------------------------------------------------------------------


def test_listen_on_a_loopback_port_for_smtpd_inet_form(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    folder = tmp_path_factory.mktemp("tcp")
    config = write_policy_config(folder)
    port = free_port()
    policy = Process(
        folder,
        config,
        module="postoffice.cli",
        args=("policy", "--listen", f"127.0.0.1:{port}"),
        name="policy",
    )
    try:
        policy.wait_for(f"listening on 127.0.0.1:{port}", stream="out", timeout=WAIT)
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
            sock.sendall(wire(rcpt("nobody@unknown.test")))
            answer = b""
            while not answer.endswith(b"\n\n"):
                chunk = sock.recv(4096)
                assert chunk, "closed without an answer"
                answer += chunk
        assert (
            answer == b"action=REJECT 5.1.1 <nobody@unknown.test>: no queue for this recipient\n\n"
        )
        assert not (folder / "policy.sock").exists()  # --listen replaced [policy] listen
    finally:
        assert policy.stop() == 0


def test_an_address_beyond_loopback_is_refused_without_allow_remote(tmp_path: Path) -> None:
    config = write_policy_config(tmp_path)
    result = run_postoffice("-C", str(config), "policy", "--listen", "192.0.2.1:10040")
    assert result.returncode == 78
    [line] = result.stderr.strip().splitlines()
    assert "192.0.2.1:10040" in line and "allow_remote = yes in [policy]" in line


def test_a_socket_another_policy_service_answers_on_is_left_alone(services: Services) -> None:
    result = run_postoffice("-C", str(services.config), "policy")
    assert result.returncode == 69
    assert "another server answers on" in result.stderr
    # The running one still answers on its socket.
    assert services.ask(rcpt("user@alpha.test")) == "DUNNO"


def test_help_says_what_the_policy_service_is_for() -> None:
    result = run_postoffice("--help")
    assert "policy" in result.stdout and "RCPT time" in result.stdout
    result = run_postoffice("policy", "--help")
    assert result.returncode == 0 and "--listen" in result.stdout


def test_a_depot_that_does_not_answer_holds_no_request_and_no_stop(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # A ZEO server nobody runs: opening it waits for one (wait_timeout) in the reader's thread.
    folder = tmp_path_factory.mktemp("hang")
    config = write_policy_config(folder)
    config.write_text(
        config.read_text().replace(
            f"zodb_uri = {HERE_URI}", f"zodb_uri = zeo://{folder / 'nobody.sock'}?wait_timeout=120"
        )
    )
    policy = Process(folder, config, module="postoffice.cli", args=("policy",), name="policy")
    policy.wait_for("policy service listening on", stream="out", timeout=WAIT)
    sock = folder / "policy.sock"
    started = time.monotonic()
    first = PolicyClient(sock)
    assert first.ask(rcpt("user@alpha.test", sender=LOOPER)) == "DUNNO"
    assert time.monotonic() - started < WAIT  # the request's own wait, not the opening's
    first.close()
    # While the opening still hangs, the next requests do not wait behind it.
    started = time.monotonic()
    connection = PolicyClient(sock)
    for _ in range(20):
        assert connection.ask(rcpt("user@alpha.test", sender=LOOPER)) == "DUNNO"
    assert time.monotonic() - started < 5.0
    connection.close()
    log = policy.err.read_text()
    assert log.count("cannot read the queue state") == 1
    # And SIGTERM does not wait for the opening either.
    started = time.monotonic()
    assert policy.stop() == 0
    assert time.monotonic() - started < 20.0


def test_a_control_character_in_an_address_cannot_end_the_answer(services: Services) -> None:
    answer = services.ask(rcpt("no\rbody@unknown.test"))
    assert answer == "REJECT 5.1.1 <no?body@unknown.test>: no queue for this recipient"
