"""Nothing lost, nothing doubled: faults under load, with real parts only.

The promise to users: a 250 means the message is in the database
exactly once; anything else means Postfix still has it. Each test sends a
few thousand messages with Postfix's ``smtp-source`` and breaks something
while they flow:

- the ZEO server is stopped for several seconds and started again, under
  load through a real Postfix instance to ``postoffice serve``;
- ``postoffice serve`` is killed with SIGKILL under load and started again;
  then the ZEO server is frozen (SIGSTOP) longer than Postfix waits for the
  reply after DATA, so commits finish after Postfix gave up on them and
  Postfix delivers those messages again (the duplicate ledger's case);
- two ``serve`` processes write to one ZEO server while two consumer
  processes pop the same queues.

The accounting is done from evidence, never from what the test meant to
happen: Postfix's log (every Message-Id its cleanup accepted, every
``status=sent`` with the reply text it got), ``serve``'s log (one line per
recipient decision, with the reply) and the depot read back afterwards.
Every 250 that names a queue key must find that key in the depot holding
that Message-Id; every 250 that says "duplicate" must find the Message-Id
stored; every accepted message is stored exactly once; Postfix's queue ends
empty. The figures of a run are printed (``pytest -s``) and written down in
docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from postoffice.database import open_db
from postoffice.store import find_folder
from tests.helpers import write_config
from tests.integration.conftest import PostfixFactory
from tests.integration.postfix_instance import PostfixInstance, require_tool
from tests.integration.servers import (
    QUEUES,
    WAIT,
    Serve,
    ZeoServer,
    finished,
    reaped,
    socket_path,
    start_serve,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MESSAGES = 2000
SENDER = "sender@sender.test"
OUTAGE = 5.0  # seconds without a ZEO server
DOWN = 2.0  # seconds without serve after SIGKILL
# Postfix's wait for the reply after the final dot, in the lost-reply fault.
DATA_DONE_TIMEOUT = 3
# Every wait for the end of a phase (the load, Postfix's retries) is bounded by this.
DRAIN = 120.0


# --- the parts ----------------------------------------------------------------------------


def zeo_uri(zeo: ZeoServer) -> str:
    # wait_timeout: while the server is away, a commit waits 3 s, then gets 451.
    return f"zeo://{zeo.sock}?wait_timeout=3&blob_dir={zeo.folder / 'blobs'}&shared_blob_dir=true"


def start_zeo(zeo_servers: list[ZeoServer], tmp_path: Path) -> ZeoServer:
    folder = tmp_path / "depot"
    folder.mkdir()
    zeo = ZeoServer(socket_path(tmp_path, "zeo.sock"), folder)
    zeo_servers.append(zeo)
    zeo.start()
    return zeo


def serve_config(folder: Path, zeo: ZeoServer, sock: Path) -> Path:
    """A folder with postoffice.ini: the two queues, a ZEO depot, listening on ``sock``."""
    folder.mkdir(exist_ok=True)
    # 0666 only because the socket is in a test folder (the postfix user connects).
    lmtp = {"listen": f"unix:{sock}", "socket_mode": "0666", "max_sessions": 64}
    return write_config(folder, zodb_uri=zeo_uri(zeo), lmtp=lmtp, queues=QUEUES)


def start_postfix(postfix_factory: PostfixFactory, sock: Path, **main_cf: str) -> PostfixInstance:
    """Postfix delivering app.test and other.test to ``sock``; long queue ids (never reused)."""
    return postfix_factory(
        {"app.test": f"lmtp:unix:{sock}", "other.test": f"lmtp:unix:{sock}"},
        extra_main_cf={"enable_long_queue_ids": "yes", **main_cf},
    )


def smtp_source(
    target: str,
    count: int,
    sessions: int,
    host: str,
    rcpt: str,
    log: Path,
    *,
    lmtp: bool = False,
    keep_going: bool = False,
) -> subprocess.Popen[bytes]:
    """Postfix's load generator; unique Message-Ids ``<pid.session.count@host>``.

    It stops at the first reply it did not expect (exit 1), unless
    ``keep_going`` (``-A``): then it goes on with the next message, and
    never sends again one that was refused.
    """
    argv = [require_tool("smtp-source"), *(["-L"] if lmtp else []), *(["-A"] if keep_going else [])]
    argv += ["-s", str(sessions), "-m", str(count), "-f", SENDER, "-t", rcpt, "-M", host, target]
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)


@dataclass
class UnderLoad:
    """A ZEO depot, ``serve`` on it, Postfix in front, and smtp-source sending through it."""

    zeo: ZeoServer
    server: Serve
    pf: PostfixInstance
    source: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(
        cls,
        postfix_factory: PostfixFactory,
        zeo_servers: list[ZeoServer],
        servers: list[Serve],
        public_dir: Path,
        tmp_path: Path,
        host: str,
        **main_cf: str,
    ) -> UnderLoad:
        zeo = start_zeo(zeo_servers, tmp_path)
        sock = socket_path(public_dir, "po.sock")  # Postfix's lmtp client must reach it
        server = start_serve(servers, serve_config(tmp_path / "serve", zeo, sock))
        pf = start_postfix(postfix_factory, sock, **main_cf)
        log = tmp_path / "smtp-source.log"
        source = smtp_source(f"127.0.0.1:{pf.port}", MESSAGES, 8, host, "orders@app.test", log)
        return cls(zeo, server, pf, source, log)

    def finish(self) -> tuple[int, DepotContents]:
        """The load sent, Postfix's queue drained, serve and ZEO stopped: (flushes, depot)."""
        finish(self.source, self.log)
        flushes = drain(self.pf)
        self.server.stop()
        depot = DepotContents.read(zeo_uri(self.zeo))
        self.zeo.stop()
        return flushes, depot


def finish(source: subprocess.Popen[bytes], log: Path, timeout: float = DRAIN) -> None:
    try:
        code = source.wait(timeout)
    except subprocess.TimeoutExpired:
        source.kill()
        source.wait()
        pytest.fail(f"smtp-source did not finish in {timeout}s: {log.read_text()}")
    assert code == 0, f"smtp-source exited {code}: {log.read_text()}"


def wait_for(what: str, condition: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def sent_count(pf: PostfixInstance) -> int:
    return pf.maillog().count("status=sent")


def drain(pf: PostfixInstance, timeout: float = DRAIN) -> int:
    """Flush Postfix until its queue is empty; how many flushes it took."""
    deadline = time.monotonic() + timeout
    flushes = 0
    while pf.queue_ids():
        if time.monotonic() > deadline:
            pf.wait_until_queue_empty(0)  # raises, with what is left and the log
        pf.flush()
        flushes += 1
        time.sleep(1.0)
    return flushes


# --- the evidence -------------------------------------------------------------------------

POSTFIX_LINE = re.compile(
    r"postfix/(?P<daemon>[\w-]+)\[\d+\]: (?P<qid>[0-9A-Za-z]+): (?P<text>.*)$"
)
POSTFIX_STATUS = re.compile(r"to=<(?P<rcpt>[^>]*)>, .*status=(?P<status>\w+) \((?P<text>.*)\)$")
SERVE_LINE = re.compile(
    r"msgid=(?P<mid>\S+) from=<[^>]*> to=<(?P<rcpt>[^>]*)> size=\d+ queue=(?P<queue>\S+) "
    r".* status=\w+ \((?P<reply>.*)\)$",
    re.M,
)
QUEUED = re.compile(r"^250 2\.0\.0 <(?P<rcpt>[^>]*)> queued in (?P<queue>\S+) as (?P<key>\d+)$")
DUPLICATE = re.compile(r"^250 2\.0\.0 <[^>]*> accepted, not queued: duplicate of (?P<mid>\S+) ")


@dataclass
class PostfixLog:
    """What Postfix's log says: accepted Message-Ids, and each delivery attempt's outcome."""

    accepted: list[str] = field(default_factory=list)
    sent: list[tuple[str, str, str]] = field(default_factory=list)  # (mid, rcpt, reply)
    deferred: list[tuple[str, str]] = field(default_factory=list)  # (mid, reason)
    other: list[str] = field(default_factory=list)  # bounced, expired: never expected

    @classmethod
    def read(cls, pf: PostfixInstance) -> PostfixLog:
        found = cls()
        ids: dict[str, str] = {}
        for line in pf.maillog().splitlines():
            match = POSTFIX_LINE.search(line)
            if not match:
                continue
            qid, text = match["qid"], match["text"]
            if match["daemon"] == "cleanup" and text.startswith("message-id="):
                ids[qid] = text.removeprefix("message-id=").split()[0]
                found.accepted.append(ids[qid])
            elif status := POSTFIX_STATUS.search(text):
                mid = ids.get(qid, f"?{qid}")
                if status["status"] == "sent":
                    reply = status["text"]
                    found.sent.append((mid, status["rcpt"], reply))
                elif status["status"] == "deferred":
                    found.deferred.append((mid, status["text"]))
                else:
                    found.other.append(line)
        return found


@dataclass
class ServeLog:
    """Every recipient decision ``serve`` logged: (Message-Id, recipient, reply)."""

    decisions: list[tuple[str, str, str]]

    @classmethod
    def read(cls, *servers: Serve) -> ServeLog:
        decisions = []
        for server in servers:
            for match in SERVE_LINE.finditer(server.log()):
                reply = match["reply"]
                decisions.append((match["mid"], match["rcpt"], reply))
        return cls(decisions)

    def replies(self, prefix: str) -> list[tuple[str, str, str]]:
        return [d for d in self.decisions if d[2].startswith(prefix)]


@dataclass
class DepotContents:
    """The depot read back: queue -> key -> (Message-Id, X-Original-To)."""

    queues: dict[str, dict[int, tuple[str, str]]]
    dead_letters: int

    @classmethod
    def read(cls, uri: str) -> DepotContents:
        db = open_db(uri)
        try:
            with db.transaction() as connection:
                folder = find_folder(connection.root(), "/postoffice", create=False)
                queues = {
                    name: {key: _identity(raw) for key, raw, _ in queue.messages()}
                    for name, queue in folder.items()
                }
                return cls(queues, folder.dead_letter_count())
        finally:
            db.close()

    def message_ids(self) -> Counter[tuple[str, str]]:
        """How often each (Message-Id, recipient) is stored, over every queue."""
        return Counter(pair for keys in self.queues.values() for pair in keys.values())

    def size(self) -> int:
        return sum(len(keys) for keys in self.queues.values())


def _identity(raw: bytes) -> tuple[str, str]:
    message_id = re.search(rb"(?mi)^Message-Id: (.*?)\r?$", raw)
    recipient = re.search(rb"(?m)^X-Original-To: (.*?)\r?$", raw)
    assert message_id and recipient, raw[:500]
    return message_id.group(1).decode(), recipient.group(1).decode()


def check_250s(replies: list[tuple[str, str, str]], depot: DepotContents, who: str) -> Counter[str]:
    """Every 250 is backed by the depot; returns how many were "queued" and "duplicate"."""
    kinds: Counter[str] = Counter()
    stored = depot.message_ids()
    for mid, rcpt, reply in replies:
        if queued := QUEUED.match(reply):
            entry = depot.queues.get(queued["queue"], {}).get(int(queued["key"]))
            assert entry == (mid, rcpt), f"{who} got {reply!r} for {mid}, the depot has {entry}"
            kinds["queued"] += 1
        elif duplicate := DUPLICATE.match(reply):
            assert duplicate["mid"] == mid, reply
            assert stored[(mid, rcpt)] == 1, f"{who} got {reply!r}, stored {stored[(mid, rcpt)]}x"
            kinds["duplicate"] += 1
        else:
            pytest.fail(f"{who} got an unexpected 250 for {mid}: {reply!r}")
    return kinds


def account(pf: PostfixInstance, servers: list[Serve], depot: DepotContents) -> dict[str, int]:
    """The promise, checked from the logs and the depot; the figures of the run."""
    postfix = PostfixLog.read(pf)
    serve = ServeLog.read(*servers)
    accepted = Counter(postfix.accepted)
    assert len(accepted) == MESSAGES, f"Postfix accepted {len(accepted)} distinct Message-Ids"
    assert max(accepted.values()) == 1, "smtp-source repeated a Message-Id"
    assert postfix.other == [], postfix.other[:5]  # nothing bounced, nothing expired
    assert pf.queue_ids() == []

    # Postfix delivered each message once: one status=sent per message.
    sent = Counter(mid for mid, _rcpt, _reply in postfix.sent)
    assert sent == accepted, (sent - accepted, accepted - sent)
    # In the depot: exactly the messages Postfix accepted, each exactly once.
    stored = depot.message_ids()
    missing = set(accepted) - {mid for mid, _rcpt in stored}
    assert not missing, (
        f"{len(missing)} accepted messages are not in the depot: {sorted(missing)[:5]}"
    )
    doubled = [pair for pair, count in stored.items() if count > 1]
    assert not doubled, f"{len(doubled)} messages are stored twice or more: {doubled[:5]}"
    assert {mid for mid, _rcpt in stored} == set(accepted)
    assert depot.size() == MESSAGES
    assert depot.dead_letters == 0

    # Every 250 Postfix got, and every 250 serve logged, is backed by the depot.
    from_postfix = check_250s(postfix.sent, depot, "Postfix")
    from_serve = check_250s(serve.replies("250"), depot, "serve")
    # No key was promised twice. (A server killed between its commit and its
    # log line queued a message it never logged: the log may count fewer.)
    keys = [m["key"] for _mid, _rcpt, reply in serve.replies("250") if (m := QUEUED.match(reply))]
    assert len(keys) == len(set(keys))
    assert from_serve["queued"] <= MESSAGES
    # A message stored without serve's 250 for it (committed by a server that
    # was killed before it answered, or a commit whose end was cut off and got
    # 451) came again from Postfix and was then found in the duplicate ledger.
    logged = {(mid, rcpt) for mid, rcpt, reply in serve.decisions if QUEUED.match(reply)}
    found_again = {(mid, rcpt) for mid, rcpt, reply in postfix.sent if DUPLICATE.match(reply)}
    unanswered = set(stored) - logged
    assert unanswered <= found_again, sorted(unanswered - found_again)[:5]
    refused = [d for d in serve.decisions if not d[2].startswith(("250", "451"))]
    assert refused == [], refused[:5]
    return {
        "accepted by Postfix": len(accepted),
        "stored": depot.size(),
        "Postfix deferrals": len(postfix.deferred),
        "Postfix deferrals after a 451": sum("451 4.3.0" in r for _m, r in postfix.deferred),
        "serve 451 replies": len(serve.replies("451")),
        "serve 250 queued": from_serve["queued"],
        "serve 250 duplicate": from_serve["duplicate"],
        "Postfix sent, queued": from_postfix["queued"],
        "Postfix sent, duplicate": from_postfix["duplicate"],
    }


def report(name: str, figures: dict[str, object]) -> None:
    print(f"\n{name}: " + json.dumps(figures, indent=1))


def deferral_reasons(pf: PostfixInstance) -> Counter[str]:
    """Postfix's deferral reasons, numbers and addresses blurred, to see which faults hit."""
    blurred = (
        re.sub(r"<[^>]*>|\[[^\]]*\]|\d+", "#", reason)
        for _m, reason in PostfixLog.read(pf).deferred
    )
    return Counter(blurred)


# --- the tests ----------------------------------------------------------------------------


def test_zeo_outage_under_load_loses_and_doubles_nothing(
    postfix_factory: PostfixFactory,
    zeo_servers: list[ZeoServer],
    servers: list[Serve],
    public_dir: Path,
    tmp_path: Path,
) -> None:
    require_tool("smtp-source")
    began = time.monotonic()
    load = UnderLoad.start(
        postfix_factory, zeo_servers, servers, public_dir, tmp_path, "outage.test"
    )
    zeo, server, pf = load.zeo, load.server, load.pf
    wait_for("a quarter of the load delivered", lambda: sent_count(pf) >= MESSAGES // 4)
    stopped = time.monotonic()
    zeo.stop()
    delivered_before = sent_count(pf)
    still_sending = load.source.poll() is None
    waiting_in_postfix = len(pf.queue_ids())
    time.sleep(OUTAGE)
    zeo.start()
    outage = time.monotonic() - stopped
    flushes, depot = load.finish()

    figures = account(pf, servers, depot)
    # The outage was felt: deliveries were refused with 451 and Postfix kept them.
    assert figures["serve 451 replies"] > 0
    assert figures["Postfix deferrals after a 451"] > 0
    # Only because the server was away: no object id handed out twice after it
    # came back (ZEO clients keep ids fetched ahead; postoffice.store drops them).
    assert "already has the same oid" not in server.log()
    report(
        "ZEO outage",
        {
            **figures,
            "delivered before the outage": delivered_before,
            "smtp-source still sending at the outage": still_sending,
            "in Postfix's queue at the outage": waiting_in_postfix,
            "outage seconds": round(outage, 1),
            "flushes": flushes,
            "deferral reasons": deferral_reasons(pf).most_common(5),
            "seconds": round(time.monotonic() - began, 1),
        },
    )


def test_serve_killed_and_replies_lost_under_load(
    postfix_factory: PostfixFactory,
    zeo_servers: list[ZeoServer],
    servers: list[Serve],
    public_dir: Path,
    tmp_path: Path,
) -> None:
    require_tool("smtp-source")
    began = time.monotonic()
    load = UnderLoad.start(
        postfix_factory,
        zeo_servers,
        servers,
        public_dir,
        tmp_path,
        "crash.test",
        lmtp_data_done_timeout=f"{DATA_DONE_TIMEOUT}s",
    )
    zeo, server, pf = load.zeo, load.server, load.pf
    # 1. SIGKILL mid-load: no clean-up, sessions and commits cut wherever they are.
    wait_for("a quarter of the load delivered", lambda: sent_count(pf) >= MESSAGES // 4)
    server.kill()
    killed_at = sent_count(pf)
    time.sleep(DOWN)
    server.start()  # replaces the stale socket the killed server left
    # 2. Lost replies: commits stall in a frozen ZEO server until Postfix stops
    # waiting for the reply to DATA, then go through. Postfix has those
    # messages still and delivers them again; they must not be stored twice.
    wait_for("half of the load delivered", lambda: sent_count(pf) >= MESSAGES // 2, DRAIN)
    assert zeo.process is not None
    frozen_at = sent_count(pf)
    zeo.process.send_signal(signal.SIGSTOP)
    try:
        wait_for(
            "Postfix giving up on a reply",
            lambda: "timed out while sending end of data" in pf.maillog(),
            DATA_DONE_TIMEOUT + 30,
        )
    finally:
        zeo.process.send_signal(signal.SIGCONT)
    flushes, depot = load.finish()

    figures = account(pf, servers, depot)
    reasons = deferral_reasons(pf)
    # Both faults were felt: refused connections while serve was down, and
    # messages committed after Postfix gave up, delivered again and found in
    # the duplicate ledger.
    assert any("connect to" in reason or "lost connection" in reason for reason in reasons)
    assert figures["Postfix sent, duplicate"] > 0, reasons
    report(
        "serve killed, replies lost",
        {
            **figures,
            "delivered before SIGKILL": killed_at,
            "delivered before the freeze": frozen_at,
            "flushes": flushes,
            "deferral reasons": reasons.most_common(6),
            "seconds": round(time.monotonic() - began, 1),
        },
    )


CONSUMER = textwrap.dedent(
    """
    import json, os, sys, time
    import transaction
    from postoffice import QueueEmpty, open_queue
    from postoffice.database import open_db

    uri, out, stop_file, deadline = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    popped, errors, empty, during_load = [], [], 0, None
    end = time.monotonic() + deadline
    db = open_db(uri)
    with open_queue(db, "App") as app, open_queue(db, "Other") as other:
        while time.monotonic() < end:
            stopping = os.path.exists(stop_file)  # all mail is in before it appears
            if stopping and during_load is None:
                during_load = len(popped)
            transaction.abort()  # a fresh look at the database
            got = 0
            for name, queue in (("App", app), ("Other", other)):
                while queue:
                    try:
                        message = queue.pop_next()
                    except QueueEmpty:  # the other consumer holds the rest
                        empty += 1
                        break
                    except Exception as exc:
                        errors.append(f"pop {name}: {exc!r}")
                        transaction.abort()
                        break
                    try:
                        transaction.commit()
                    except Exception as exc:
                        errors.append(f"commit {name}: {exc!r}")
                        transaction.abort()
                        continue
                    popped.append([name, message["Message-Id"], message["X-Original-To"]])
                    got += 1
            if stopping and not got:
                break
            if not got:
                time.sleep(0.02)
    db.close()
    with open(out, "w") as handle:
        json.dump(
            {"popped": popped, "errors": errors, "empty": empty, "during_load": during_load},
            handle,
        )
    """
)


def test_two_servers_and_two_consumers_share_one_zeo_server(
    zeo_servers: list[ZeoServer], servers: list[Serve], tmp_path: Path
) -> None:
    require_tool("smtp-source")
    began = time.monotonic()
    zeo = start_zeo(zeo_servers, tmp_path)
    sockets = []
    for name in ("serve1", "serve2"):
        sock = socket_path(tmp_path / name, "po.sock")
        start_serve(servers, serve_config(tmp_path / name, zeo, sock))
        sockets.append(sock)

    stop_file = tmp_path / "stop"
    outputs = [tmp_path / f"consumer-{n}.json" for n in (1, 2)]
    repo = Path(__file__).resolve().parents[2]
    consumers = [
        subprocess.Popen(
            [sys.executable, "-c", CONSUMER, zeo_uri(zeo), str(out), str(stop_file), str(DRAIN)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=repo,
            env={**os.environ, "PYTHONPATH": str(repo)},
        )
        for out in outputs
    ]
    with reaped(consumers):
        # Four loads at once, straight over LMTP: each server gets mail for
        # both queues, so both servers write to both queues while both
        # consumers pop from them. With -A a refused message is not sent
        # again: what the servers queued is what the consumers must get.
        per_load = MESSAGES // 4
        loads = []
        targets = [(sock, domain) for sock in sockets for domain in ("app.test", "other.test")]
        for number, (sock, domain) in enumerate(targets):
            log = tmp_path / f"smtp-source-{number}.log"
            process = smtp_source(
                f"unix:{sock}",
                per_load,
                4,
                f"w{number}.test",
                f"orders@{domain}",
                log,
                lmtp=True,
                keep_going=True,
            )
            loads.append((process, log))
        for process, log in loads:
            finish(process, log)
        loaded = time.monotonic() - began
        stop_file.touch()
        finished(consumers, DRAIN + 30)
    for server in servers:
        server.stop()
    depot = DepotContents.read(zeo_uri(zeo))
    zeo.stop()

    results = [json.loads(out.read_text()) for out in outputs]
    # No consumer saw an exception: no ConflictError from popping or
    # committing, no "too busy" (asserted with the figures, at the end).
    busy = [e for r in results for e in r["errors"] if "too busy to claim" in e]
    assert [e for r in results for e in r["errors"] if e not in busy] == []
    popped = Counter((queue, mid, rcpt) for r in results for queue, mid, rcpt in r["popped"])
    serve = ServeLog.read(*servers)
    queued = [(QUEUED.match(reply), mid, rcpt) for mid, rcpt, reply in serve.decisions]
    expected = Counter((match["queue"], mid, rcpt) for match, mid, rcpt in queued if match)
    deferred = serve.replies("451")
    # Each message was decided once: queued, or refused for now (never sent again).
    assert len(serve.decisions) == MESSAGES
    assert sum(expected.values()) + len(deferred) == MESSAGES, Counter(
        d[2][:3] for d in serve.decisions
    )
    assert max(expected.values()) == 1
    # Every message queued was consumed exactly once, from its queue; none is left.
    assert popped == expected
    assert depot.size() == 0
    assert depot.dead_letters == 0
    # Both servers wrote, both consumers consumed, also while the load ran.
    assert all(ServeLog.read(s).decisions for s in servers)
    assert all(r["popped"] for r in results), [len(r["popped"]) for r in results]
    assert sum(r["during_load"] for r in results) > 0
    conflicts = [
        line
        for server in servers
        for line in server.log().splitlines()
        if "too many conflicts" in line or "ConflictError" in line
    ]
    report(
        "two servers, two consumers",
        {
            "messages": MESSAGES,
            "queued": sum(expected.values()),
            "451 after too many conflicts": len(deferred),
            "consumer pops refused as too busy": len(busy),
            "conflict warnings in serve's log": len(conflicts),
            "per server": [len(ServeLog.read(s).decisions) for s in servers],
            "per consumer": [len(r["popped"]) for r in results],
            "popped while the load ran": [r["during_load"] for r in results],
            "consumer QueueEmpty (held by the other)": [r["empty"] for r in results],
            "seconds to load": round(loaded, 1),
            "seconds": round(time.monotonic() - began, 1),
        },
    )
    # Conflicts between the writers and the consumers are retried inside
    # postoffice (with a random pause that grows), never seen by a client.
    assert deferred == [], conflicts[:3]
    assert busy == []
    assert conflicts == []
