"""postoffice against its peers, in one run: ``python3 bench/run.py`` (issue 6).

Each server is started in turn on a unix socket in a fresh temporary
folder with a fresh store, driven by Postfix's own LMTP client
``smtp-source -L`` with connections kept open across messages (``-d``, as
Postfix's connection cache does under load), stopped, and its delivered
count checked against what was sent.  A run whose count is wrong does not
count.  The peers:

- ``smtp-sink -L``: accepts and discards, the protocol limit;
- Dovecot's LMTP server delivering into Maildir with ``mail_fsync = always``,
  the production C delivery agent;
- ``bench/bare_lmtp.py``: aiosmtpd's LMTP answering 250 and storing
  nothing, the Python ceiling;
- ``postoffice serve`` on a ``file://`` FileStorage with blobs.

Rounds are interleaved (round 1 of every server and case, then round 2,
...) so that noise from other work on the machine spreads over all servers
alike; the table shows the median of the rounds, and the ratios of
postoffice to each peer come from the same invocation.  Then: throughput
with 100,000 messages already queued and in the duplicate ledger against
an empty depot, peak RSS with 16 concurrent 10 MiB messages, and the
consumer's pop-and-commit rate.  ``--quick`` does one round of everything
with fewer messages, in about a minute.

Needs: smtp-source and smtp-sink (Debian ``postfix``), Dovecot's LMTP
server (``dovecot-lmtpd``), the package installed (``pip install -e .``);
``bench/run.sh`` installs them.  Dovecot and smtp-sink drop privileges to
``nobody`` when run as root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
QUEUE = "Bench"
SENDER = "sender@client.bench.example"
RECIPIENT = "rcpt@app.bench.example"
KIB = 1024
MIB = 1024 * 1024

START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
# smtp-source must manage at least this many messages a second, or the run
# is cut off as hung (and reported as an error, not a number).
SLOWEST_RATE = 20.0
# Messages a commit in the inline-or-blob comparison's batched case.
BLOB_BATCH = 8
# py-spy samples a second.
PROFILE_RATE = 250

SERVER_LABELS = {
    "sink": "smtp-sink",
    "dovecot": "Dovecot LMTP",
    "bare": "bare aiosmtpd",
    "postoffice": "postoffice",
    "po-direct": "postoffice share=no",
}
# postoffice and its variant are "us"; the rest are the peers.
OURS = ("postoffice", "po-direct")


class BenchError(Exception):
    """A run that cannot be counted: the reason is shown in the table's place."""


# --- tools and processes ---------------------------------------------------------


def find_tool(name: str) -> str | None:
    """Postfix and Dovecot keep their programs in sbin, often not on a user's PATH."""
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/local/sbin", "/usr/lib/postfix/sbin"):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (which may hold spaces)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rsplit(")", 1)[1].split()


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant (Dovecot's lmtp processes, an embedded ZEO)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def tree_cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds used by the tree so far, reaped children included."""
    ticks = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for number, member in enumerate(process_tree(pid)):
        try:
            fields = _stat_fields(member)
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
        if number == 0:
            user += int(fields[13])  # cutime
            system += int(fields[14])  # cstime
    return user / ticks, system / ticks


def tree_memory_kib(pid: int, key: str) -> int:
    """Sum of ``key`` (VmHWM, VmRSS) over the tree, in KiB, from /proc/PID/status."""
    total = 0
    for member in process_tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        match = re.search(rf"^{key}:\s+(\d+) kB", status, re.MULTILINE)
        if match:
            total += int(match.group(1))
    return total


def connectable(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def wait_until(
    ready: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise BenchError(f"{what}: the server exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not ready after {timeout:.0f}s")
        time.sleep(0.02)


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int | None:
    """Signal the server and wait; kill its process group if it does not go."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            raise BenchError(f"did not stop within {STOP_TIMEOUT:.0f}s; killed") from None
    return proc.returncode


def tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])


def run_worker(args: Sequence[str], timeout: float) -> dict[str, Any]:
    """bench/worker.py in its own process, bounded in time; its JSON answer."""
    try:
        done = subprocess.run(
            [sys.executable, str(BENCH / "worker.py"), *args],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"worker {args[0]} took more than {timeout:.0f}s") from None
    if done.returncode != 0:
        raise BenchError(f"worker {args[0]} failed: {done.stderr.decode(errors='replace')[-500:]}")
    return json.loads(done.stdout.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


def unprivileged_user() -> str | None:
    """The user smtp-sink and Dovecot's mail processes run as, when we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("nobody",):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise BenchError("running as root but there is no user 'nobody' to drop privileges to")


# --- the servers ---------------------------------------------------------------------


class Server:
    """One server under test, started fresh in ``work`` for every run."""

    name = ""
    note = ""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.socket = work / "lmtp.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        with (
            (self.work / "server.out").open("wb") as out,
            (self.work / "server.err").open("wb") as err,
        ):
            self.proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=self.work,
                start_new_session=True,
                **kwargs,
            )
        return self.proc

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> int:
        """Stop the server; the number of messages it delivered."""
        raise NotImplementedError

    def cpu_seconds(self) -> tuple[float, float]:
        return tree_cpu_seconds(self.proc.pid) if self.proc else (0.0, 0.0)

    def kill(self) -> None:
        """Last resort after an error: nothing of ours may outlive the run."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)

    def output(self) -> str:
        return tail(self.work / "server.err") or tail(self.work / "server.out")


class SinkServer(Server):
    """``smtp-sink -L -c``: its running counter says how many messages it got."""

    name = "sink"
    note = "smtp-sink -L (accepts and discards)"

    def start(self) -> None:
        sink = find_tool("smtp-sink")
        if sink is None:
            raise BenchError("smtp-sink not found (Debian package postfix)")
        user = unprivileged_user()
        argv = [sink, "-c", "-L"] + (["-u", user] if user else [])
        proc = self._spawn([*argv, f"unix:{self.socket}", "256"])
        wait_until(lambda: connectable(self.socket), START_TIMEOUT, "smtp-sink", proc)

    def delivered(self) -> int:
        counts = re.findall(rb"mesg=(\d+)", (self.work / "server.out").read_bytes())
        return int(counts[-1]) if counts else 0

    def stop(self) -> int:
        assert self.proc is not None
        stop_process(self.proc)
        return self.delivered()


class DovecotServer(Server):
    """Dovecot's LMTP server alone, with a private config, delivering into Maildir.

    The smallest config found to work with Debian 12's Dovecot 2.3: only
    the lmtp protocol, no SSL, a static userdb (and a static passdb, which
    the auth process insists on) mapping every recipient to ``nobody``,
    ``mail_fsync = always`` as a mail server that promises durability runs.
    """

    name = "dovecot"
    note = "Dovecot 2.3 LMTP into Maildir, mail_fsync = always"

    def start(self) -> None:
        dovecot = find_tool("dovecot")
        if dovecot is None or not Path("/usr/lib/dovecot/lmtp").exists():
            raise BenchError("Dovecot's LMTP server not found (Debian package dovecot-lmtpd)")
        mail = self.work / "mail"
        mail.mkdir()
        user = unprivileged_user()
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(mail, entry.pw_uid, entry.pw_gid)
            ids = f"uid={entry.pw_uid} gid={entry.pw_gid}"
            internal = ""
        else:
            # Not root: everything runs as the current user.
            me = pwd.getpwuid(os.getuid()).pw_name
            ids = f"uid={os.getuid()} gid={os.getgid()}"
            internal = f"default_internal_user = {me}\ndefault_login_user = {me}\n"
        self.config = self.work / "dovecot.conf"
        self.config.write_text(
            f"base_dir = {self.work}/run\n"
            f"state_dir = {self.work}/state\n"
            "protocols = lmtp\n"
            "ssl = no\n"
            f"log_path = {self.work}/dovecot.log\n"
            f"mail_location = maildir:{mail}/%u\n"
            "mail_fsync = always\n"
            f"{internal}"
            "passdb {\n  driver = static\n  args = nopassword=y\n}\n"
            f"userdb {{\n  driver = static\n  args = {ids} home={mail}/%u\n}}\n"
            f"service lmtp {{\n  unix_listener {self.socket} {{\n    mode = 0666\n  }}\n}}\n"
        )
        proc = self._spawn([dovecot, "-F", "-c", str(self.config)])
        wait_until(lambda: connectable(self.socket), START_TIMEOUT, "dovecot", proc)

    def stop(self) -> int:
        assert self.proc is not None
        dovecot = find_tool("dovecot")
        if dovecot is not None and self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(
                    [dovecot, "-c", str(self.config), "stop"],
                    capture_output=True,
                    timeout=STOP_TIMEOUT,
                    check=False,
                )
        stop_process(self.proc)
        mail = self.work / "mail"
        return sum(
            1
            for folder in mail.glob("*/*")
            if folder.name in {"new", "cur"}
            for item in folder.iterdir()
            if item.is_file()
        )

    def output(self) -> str:
        return tail(self.work / "dovecot.log") or super().output()


class BareServer(Server):
    """bench/bare_lmtp.py: prints how many messages it answered when it stops."""

    name = "bare"
    note = "aiosmtpd 1.4 LMTP, answers 250, stores nothing"

    def start(self) -> None:
        proc = self._spawn([sys.executable, str(BENCH / "bare_lmtp.py"), f"unix:{self.socket}"])
        wait_until(
            lambda: b"listening on" in (self.work / "server.out").read_bytes(),
            START_TIMEOUT,
            "bare_lmtp.py",
            proc,
        )

    def stop(self) -> int:
        assert self.proc is not None
        stop_process(self.proc)
        match = re.search(rb"delivered (\d+) messages", (self.work / "server.out").read_bytes())
        if match is None:
            raise BenchError(f"bare_lmtp.py printed no count: {self.output()}")
        return int(match.group(1))


POSTOFFICE_CONFIG = """\
[post office]
zodb_uri = file://%(here)s/var/Data.fs?blobstorage_dir=%(here)s/var/blobs
max_message_size = {max_size}
{share}
[lmtp]
listen = unix:{socket}

[queue:{queue}]
filters =
    to_hostname: app.bench.example
"""


class PostofficeServer(Server):
    """``postoffice -C CONFIG serve``: the default path for a file:// depot."""

    name = "postoffice"
    note = (
        "postoffice serve, file:// FileStorage with blobs, the default path "
        "(serve opens the file and shares it through a ZEO server thread)"
    )
    max_size = "50m"
    share = True

    def __init__(self, work: Path, prefilled: Path | None = None) -> None:
        super().__init__(work)
        self.prefilled = prefilled
        self.config = work / "postoffice.ini"
        self.uri = f"file://{work}/var/Data.fs?blobstorage_dir={work}/var/blobs"
        self.printed = ""
        self.transactions = 0
        self.data_fs_bytes = 0

    def write_config(self) -> None:
        self.config.write_text(
            POSTOFFICE_CONFIG.format(
                max_size=self.max_size,
                socket=self.socket,
                queue=QUEUE,
                share="" if self.share else "share = no\n",
            )
        )

    def start(self) -> None:
        self.write_config()
        if self.prefilled is not None:
            shutil.copytree(self.prefilled, self.work / "var")
            # Or the server's first fsync would write the whole copy out, in the timed run.
            os.sync()
        proc = self._spawn(postoffice_command(self.config))
        wait_until(
            lambda: b"listening on" in (self.work / "server.out").read_bytes(),
            START_TIMEOUT,
            "postoffice serve",
            proc,
        )
        self.printed = (self.work / "server.out").read_text(errors="replace")

    def stop(self) -> int:
        assert self.proc is not None
        code = stop_process(self.proc)
        if code != 0:
            raise BenchError(f"postoffice serve exited with {code}: {self.output()}")
        data_fs = str(self.work / "var" / "Data.fs")
        answer = run_worker(["count", self.uri, QUEUE, "--data-fs", data_fs], 300)
        self.transactions = int(answer["transactions"])
        self.data_fs_bytes = int(answer["data_fs_bytes"])
        return int(answer["count"])

    def storage_path(self) -> str:
        """What ``serve`` did with the file:// URI: opened it itself, or shared it via ZEO."""
        assert self.proc is not None
        members = process_tree(self.proc.pid)
        zeo = re.search(r"zeo://\S+", self.printed)
        if zeo:
            how = "child process" if len(members) > 1 else "in the server process"
            return f"embedded ZEO ({how}), consumers use {zeo.group(0)}"
        return "FileStorage opened by the server process itself (no ZEO)"


class DirectPostofficeServer(PostofficeServer):
    """``share = no``: serve opens the FileStorage itself, and nobody else can."""

    name = "po-direct"
    note = "postoffice serve with share = no: the FileStorage opened by serve itself"
    share = False


def postoffice_command(config: Path) -> list[str]:
    """``postoffice -C CONFIG serve``, through the interpreter running the benchmark."""
    return [sys.executable, "-m", "postoffice.cli", "-C", str(config), "serve"]


def postoffice_available() -> str | None:
    """None when ``postoffice serve`` can run here, else why not."""
    check = subprocess.run(
        [sys.executable, "-c", "import postoffice.cli, postoffice.lmtp"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if check.returncode != 0:
        return check.stderr.decode(errors="replace").strip().splitlines()[-1]
    return None


SERVERS: dict[str, type[Server]] = {
    "sink": SinkServer,
    "dovecot": DovecotServer,
    "bare": BareServer,
    "postoffice": PostofficeServer,
    "po-direct": DirectPostofficeServer,
}


# --- driving -----------------------------------------------------------------------------


@dataclass
class Sample:
    """One run: one server, one case, fresh store."""

    server: str
    size: int
    sessions: int
    messages: int
    round: int
    seconds: float = 0.0
    delivered: int = 0
    cpu_seconds: float = 0.0  # user + system
    cpu_system_seconds: float = 0.0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float | None:
        if self.error is not None or self.seconds <= 0:
            return None
        return self.messages / self.seconds


def smtp_source(
    socket_path: Path,
    sessions: int,
    size: int,
    messages: int,
    helo: str,
    timeout: float | None = None,
) -> float:
    """Send ``messages`` over ``sessions`` kept-open LMTP connections; wall seconds taken.

    ``-d`` keeps each connection for the next message, as Postfix's
    connection cache does under load; ``-M`` gives every run its own
    host name, so Message-Ids never repeat across runs.
    """
    tool = find_tool("smtp-source")
    if tool is None:
        raise BenchError("smtp-source not found (Debian package postfix)")
    argv = [
        tool,
        "-L",
        "-d",
        "-s",
        str(sessions),
        "-l",
        str(size),
        "-m",
        str(messages),
        "-M",
        helo,
        "-f",
        SENDER,
        "-t",
        RECIPIENT,
        f"unix:{socket_path}",
    ]
    timeout = timeout or max(60.0, messages / SLOWEST_RATE)
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"smtp-source did not finish within {timeout:.0f}s") from None
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        message = (done.stderr or done.stdout).decode(errors="replace").strip()
        raise BenchError(f"smtp-source exited {done.returncode}: {message[-300:]}")
    return seconds


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        server.start()
        yield server
    finally:
        server.kill()


def measure(
    kind: str,
    work: Path,
    size: int,
    sessions: int,
    messages: int,
    round_number: int,
    prefilled: Path | None = None,
    expect_extra: int = 0,
    extra_transactions: int = 0,
) -> Sample:
    """Start a fresh server, send, stop, check the count."""
    sample = Sample(kind, size, sessions, messages, round_number)
    work.mkdir(parents=True)
    server = (
        SERVERS[kind](work, prefilled)  # type: ignore[call-arg]
        if kind in OURS
        else SERVERS[kind](work)
    )
    helo = f"r{round_number}.{kind}.{size}.{sessions}.{work.name}.bench"
    # Dirty pages of earlier runs are written back now, not during this one.
    os.sync()
    try:
        with running(server):
            data_fs = work / "var" / "Data.fs"
            size_before = data_fs.stat().st_size if data_fs.exists() else 0
            user_before, system_before = server.cpu_seconds()
            sample.seconds = smtp_source(server.socket, sessions, size, messages, helo)
            user_after, system_after = server.cpu_seconds()
            sample.cpu_seconds = user_after - user_before + system_after - system_before
            sample.cpu_system_seconds = system_after - system_before
            if isinstance(server, PostofficeServer):
                sample.extra["storage"] = server.storage_path()
            sample.delivered = server.stop() - expect_extra
            if isinstance(server, PostofficeServer):
                sample.extra["transactions"] = server.transactions - extra_transactions
                sample.extra["bytes_per_message"] = (server.data_fs_bytes - size_before) / max(
                    1, sample.delivered
                )
        if sample.delivered != messages:
            sample.error = f"delivered {sample.delivered} of {messages}"
    except BenchError as exc:
        sample.error = f"{exc} [{server.output()[-300:]}]"
    return sample


# --- the parts of a run ---------------------------------------------------------------------


@dataclass
class Plan:
    servers: list[str]
    sizes: list[int]
    sessions: list[int]
    rounds: int
    messages: int
    sink_messages: int
    prefill: int
    # Messages of each scale run: a run of 3,000 lasts about 1.5 s, too short
    # for a stable ratio between two runs (it moved from 0.77 to 0.93).
    scale_messages: int
    rss_message: int
    rss_sessions: int
    consume: int
    parts: set[str]
    profile: float
    profile_gil: bool = False
    profile_full: bool = False
    profile_server: str = "postoffice"
    blob_messages: int = 400


def throughput(plan: Plan, base: Path, log: Callable[[str], None]) -> list[Sample]:
    samples = []
    for round_number in range(1, plan.rounds + 1):
        for size in plan.sizes:
            for sessions in plan.sessions:
                for kind in plan.servers:
                    messages = plan.sink_messages if kind == "sink" else plan.messages
                    work = base / f"r{round_number}-{kind}-{size}-{sessions}"
                    sample = measure(kind, work, size, sessions, messages, round_number)
                    samples.append(sample)
                    log(describe(sample))
                    remove(work)
    return samples


def describe(sample: Sample) -> str:
    what = (
        f"round {sample.round} {SERVER_LABELS[sample.server]:<13} "
        f"{human_size(sample.size):>6} x {sample.sessions:>2}"
    )
    if sample.rate is None:
        return f"{what}: ERROR {sample.error}"
    cpu = sample.cpu_seconds / sample.seconds * 100 if sample.seconds else 0
    system = sample.cpu_system_seconds / sample.seconds * 100 if sample.seconds else 0
    commits = sample.extra.get("transactions")
    written = sample.extra.get("bytes_per_message", 0)
    batching = f", {commits} commits, Data.fs +{written:,.0f} B/msg" if commits else ""
    return (
        f"{what}: {sample.messages} in {sample.seconds:.2f}s = {sample.rate:,.0f} msgs/s"
        f" (server CPU {cpu:.0f}%, {system:.0f}% of it system{batching})"
    )


def make_seed(
    plan: Plan, base: Path, log: Callable[[str], None], name: str = "prefilled"
) -> tuple[Path, int]:
    """A depot holding ``plan.prefill`` messages, queued and ledgered; its folder and commits."""
    seed = base / name
    seed.mkdir()
    PostofficeServer(seed).write_config()
    result = run_worker(
        ["prefill", str(seed / "postoffice.ini"), str(plan.prefill), "--tag", "seed.bench"],
        max(120.0, plan.prefill / 200),
    )
    seed_count = run_worker(
        ["count", PostofficeServer(seed).uri, QUEUE, "--data-fs", str(seed / "var" / "Data.fs")],
        300,
    )
    log(
        f"prefilled {result['queued']:,} messages (queued and ledgered) in "
        f"{result['seconds']:.1f}s; Data.fs {human_size((seed / 'var' / 'Data.fs').stat().st_size)}"
    )
    return seed, int(seed_count["transactions"])


def scale(plan: Plan, base: Path, log: Callable[[str], None]) -> list[Sample]:
    """1 KiB x 16 sessions on a depot holding ``plan.prefill`` messages, and on an empty one."""
    sessions = max(plan.sessions)
    seed, seed_transactions = make_seed(plan, base, log)
    samples = []
    for round_number in range(1, plan.rounds + 1):
        for kind in [k for k in OURS if k in plan.servers]:
            for label, prefilled in (("empty", None), ("full", seed / "var")):
                work = base / f"scale-{kind}-{label}-{round_number}"
                sample = measure(
                    kind,
                    work,
                    KIB,
                    sessions,
                    plan.scale_messages,
                    round_number,
                    prefilled=prefilled,
                    expect_extra=plan.prefill if prefilled else 0,
                    extra_transactions=seed_transactions if prefilled else 0,
                )
                sample.extra["depot"] = label
                samples.append(sample)
                log(f"{label:>5} depot: {describe(sample)}")
                remove(work)
    remove(seed)
    return samples


def lmtp_reply(stream: Any) -> tuple[int, str]:
    """One (possibly multi-line) reply: its code and its last line."""
    while True:
        line = stream.readline()
        if not line:
            raise BenchError("the server closed the connection")
        if line[3:4] != b"-":
            return int(line[:3]), line.decode(errors="replace").strip()


def send_concurrently(path: Path, count: int, size: int, helo: str, timeout: float) -> float:
    """``count`` messages of ``size`` octets, every one of them in DATA at the same time.

    smtp-source cannot do this: it writes a message body with blocking
    writes, so its sessions take turns in DATA and a server never holds
    more than one or two large messages at once.  Here every session is
    opened and taken to DATA first, the bodies are sent a 64 KiB block at a
    time to each session in turn, and only then does every session get its
    final dot: the worst case for the server's memory.
    """
    line = b"X" * 78 + b"\r\n"
    block = line * (64 * KIB // len(line))
    blocks = max(1, size // len(block))
    start = time.perf_counter()
    sessions = []
    try:
        for number in range(count):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sessions.append(sock)
            sock.connect(str(path))
            stream = sock.makefile("rb")
            steps = [
                (None, 220),
                (f"LHLO {helo}", 250),
                (f"MAIL FROM:<{SENDER}> SIZE={blocks * len(block)}", 250),
                (f"RCPT TO:<{RECIPIENT}>", 250),
                ("DATA", 354),
            ]
            for command, expected in steps:
                if command is not None:
                    sock.sendall(command.encode("ascii") + b"\r\n")
                code, text = lmtp_reply(stream)
                if code != expected:
                    raise BenchError(f"{command or 'greeting'}: {text}")
            sock.sendall(
                f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\n"
                f"Message-Id: <{number}.{helo}>\r\nSubject: large\r\n\r\n".encode("ascii")
            )
        for _ in range(blocks):
            for sock in sessions:
                sock.sendall(block)
        for sock in sessions:
            sock.sendall(b".\r\n")
        for sock in sessions:
            code, text = lmtp_reply(sock.makefile("rb"))
            if code != 250:
                raise BenchError(f"after the final dot: {text}")
            sock.sendall(b"QUIT\r\n")
    except OSError as exc:
        raise BenchError(f"large messages: {exc}") from None
    finally:
        for sock in sessions:
            sock.close()
    return time.perf_counter() - start


def peak_rss(plan: Plan, base: Path, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Peak RSS (VmHWM of the server and its children) with concurrent large messages.

    bare aiosmtpd is measured alongside for reference: it keeps every
    message whole in memory, as lines and then joined.
    """
    results: dict[str, Any] = {}
    total = plan.rss_message * plan.rss_sessions
    limit_kib = (2 * total + 100 * MIB) // KIB
    for kind in ("postoffice", "po-direct", "bare"):
        if kind not in plan.servers:
            continue
        work = base / f"rss-{kind}"
        work.mkdir()
        server: Server
        if kind in OURS:
            server = SERVERS[kind](work)
            assert isinstance(server, PostofficeServer)
            server.max_size = f"{2 * plan.rss_message // MIB}m"
        else:
            server = BareServer(work)
        result: dict[str, Any] = {
            "message_bytes": plan.rss_message,
            "sessions": plan.rss_sessions,
            "max_message_size": getattr(server, "max_size", None),
            "limit_kib": limit_kib,
        }
        try:
            with running(server):
                assert server.proc is not None
                result["rss_idle_kib"] = tree_memory_kib(server.proc.pid, "VmRSS")
                result["seconds"] = send_concurrently(
                    server.socket,
                    plan.rss_sessions,
                    plan.rss_message,
                    f"rss.{kind}.bench",
                    timeout=300,
                )
                result["hwm_kib"] = tree_memory_kib(server.proc.pid, "VmHWM")
                result["processes"] = len(process_tree(server.proc.pid))
                result["delivered"] = server.stop()
            if result["delivered"] != plan.rss_sessions:
                result["error"] = f"delivered {result['delivered']} of {plan.rss_sessions}"
        except BenchError as exc:
            result["error"] = f"{exc} [{server.output()[-300:]}]"
        results[kind] = result
        log(
            f"peak RSS of {SERVER_LABELS[kind]}, {plan.rss_sessions} x "
            f"{human_size(plan.rss_message)} at once: "
            + (
                f"{result['hwm_kib'] / KIB:,.0f} MiB (idle {result['rss_idle_kib'] / KIB:,.0f} MiB)"
                if "error" not in result
                else f"ERROR {result['error']}"
            )
        )
        remove(work)
    return results


def consumer(plan: Plan, base: Path, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """``open_queue`` + ``pop_next`` + ``transaction.commit()`` per message.

    Per round, on one depot pre-filled with three times the count: through
    the URI a running ``postoffice serve`` prints (its ZEO server, the way
    applications read while it runs), one message a commit and then ten;
    the rate of bare one-object commits through that URI (ZEO's ceiling for
    any one-commit-a-message loop); then on the ``file://`` depot itself
    once serve has stopped.  With ``share = no`` serve prints no such URI
    and only the last is measured.
    """
    results: list[dict[str, Any]] = []
    for round_number in range(1, plan.rounds + 1):
        work = base / f"consume-{round_number}"
        work.mkdir()
        server = PostofficeServer(work)
        server.write_config()
        count = str(plan.consume)
        limit = max(120.0, plan.consume / 50)
        measured: list[dict[str, Any]] = []
        try:
            tag = f"c{round_number}.bench"
            run_worker(
                ["prefill", str(server.config), str(3 * plan.consume), "--tag", tag],
                max(120.0, plan.consume / 30),
            )
            os.sync()
            with running(server):
                printed = re.search(r"consumers use (\S+)", server.printed)
                if printed:
                    uri = printed.group(1)
                    for mode, per_commit in (("zeo", "1"), ("zeo-batch", "10")):
                        measured.append(
                            {"mode": mode}
                            | run_worker(
                                ["consume", uri, QUEUE, count, "--per-commit", per_commit], limit
                            )
                        )
                    floor = run_worker(["commit-floor", uri, count], limit)
                server.stop()
            measured.append(
                {"mode": "file"} | run_worker(["consume", server.uri, QUEUE, count], limit)
            )
            for result in measured:
                if result["popped"] != plan.consume:
                    result["error"] = f"popped {result['popped']} of {plan.consume}"
            if measured[-1]["left"] != plan.consume * (3 - len(measured)):
                measured[-1]["error"] = f"{measured[-1]['left']} messages left at the end"
            if printed:
                measured.append({"mode": "zeo-floor", "popped": floor["commits"]} | floor)
        except BenchError as exc:
            measured.append({"mode": "file", "error": str(exc)})
        for result in measured:
            results.append(result)
            what = f"round {round_number} consumer via {result['mode']}"
            done = "popped and committed"
            if result["mode"] == "zeo-floor":
                what, done = f"round {round_number} ZEO", "one-object commits"
            if "error" in result:
                log(f"{what}: ERROR {result['error']}")
            else:
                log(
                    f"{what}: {result['popped']} {done} in {result['seconds']:.2f}s"
                    f" = {result['popped'] / result['seconds']:,.0f} a second"
                )
        remove(work)
    return results


BLOB_SIZES = (16 * KIB, 64 * KIB, 256 * KIB, 1 * MIB)


def inline_or_blob(plan: Plan, base: Path, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Store cost of a message kept inline in its record against one in a blob file.

    Straight through ``Depot.deliver_batch`` (no LMTP), one message a
    commit and ``BLOB_BATCH`` a commit, for the sizes around the
    threshold in ``postoffice/store.py``.
    """
    results = []
    for size in BLOB_SIZES:
        for batch in (1, BLOB_BATCH):
            work = base / f"blob-{size}-{batch}"
            work.mkdir()
            PostofficeServer(work).write_config()
            count = max(batch, plan.blob_messages * 64 * KIB // max(size, 64 * KIB))
            os.sync()
            try:
                result = run_worker(
                    [
                        "inline-or-blob",
                        str(work / "postoffice.ini"),
                        str(size),
                        str(count),
                        "--batch",
                        str(batch),
                    ],
                    300,
                )
            except BenchError as exc:
                result = {"size": size, "batch": batch, "error": str(exc)}
            results.append(result)
            if "error" in result:
                log(f"inline or blob, {human_size(size)}: ERROR {result['error']}")
            else:
                log(
                    f"inline or blob, {human_size(size)} x {count}, {batch} a commit: "
                    f"inline {result['inline']['ms_per_message']:.2f} ms/msg, "
                    f"blob {result['blob']['ms_per_message']:.2f} ms/msg"
                )
            remove(work)
    return results


def profile(plan: Plan, base: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """py-spy on the postoffice server during a 1 KiB x 16 sessions run."""
    spy = shutil.which("py-spy")
    if spy is None:
        return {"error": "py-spy not installed (pip install py-spy)"}
    work = base / "profile"
    work.mkdir()
    seed = make_seed(plan, base, log, "profile-seed")[0] / "var" if plan.profile_full else None
    server = SERVERS[plan.profile_server](work, seed)  # type: ignore[call-arg]
    raw = work / "profile.txt"
    messages = int(plan.profile)
    result: dict[str, Any] = {"messages": messages}
    try:
        with running(server):
            assert server.proc is not None
            with (work / "py-spy.err").open("wb") as err:
                spy_proc = subprocess.Popen(
                    [
                        spy, "record", "--pid", str(server.proc.pid), "--rate", str(PROFILE_RATE),
                        "--format", "raw", "--threads", "--nonblocking", "--subprocesses",
                        "--output", str(raw),
                        *(["--gil"] if plan.profile_gil else []),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    start_new_session=True,
                )  # fmt: skip
            time.sleep(1.0)
            try:
                seconds = smtp_source(
                    server.socket, max(plan.sessions), KIB, messages, f"profile.{work.name}.bench"
                )
            finally:
                spy_proc.send_signal(signal.SIGINT)
                try:
                    spy_proc.wait(60)
                except subprocess.TimeoutExpired:
                    spy_proc.kill()
                    spy_proc.wait(10)
            result["rate"] = messages / seconds
            result["delivered"] = server.stop()
        result["summary"] = summarize_profile(raw, seconds, PROFILE_RATE)
        kept = Path(tempfile.gettempdir()) / "postoffice-bench-profile.txt"
        shutil.copy(raw, kept)
        result["raw"] = str(kept)
    except (BenchError, OSError) as exc:
        result["error"] = f"{exc} [{tail(work / 'py-spy.err')}]"
    log(f"profile: {result.get('error') or result['raw']}")
    remove(work)
    return result


def summarize_profile(raw: Path, seconds: float, rate: int, top: int = 20) -> str:
    """Per thread: how busy it was, and the functions holding its samples (own and total).

    py-spy's raw format is one record per distinct stack, ``process PID:
    "CMD";thread (TID): NAME;frame;frame;... COUNT``; idle samples (a thread waiting in
    select() or on a lock) are left out by py-spy, so a thread's samples
    over ``seconds * rate`` is how busy it was.  Frames are counted per
    function, without their line numbers.
    """
    threads: dict[str, int] = {}
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    text = raw.read_text(errors="replace")
    # A process name is its command line, and the ZEO child's holds newlines:
    # a record ends with " COUNT" at the end of a line, not at every newline.
    for record in re.finditer(r"(.*?) (\d+)\n", text, re.DOTALL):
        stack, count = record.group(1), int(record.group(2))
        process, thread, frames = "serve", "?", []
        for frame in stack.split(";"):
            if frame.startswith("process "):
                process = "zeo" if "postoffice.embedded" in frame else "serve"
            elif frame.startswith("thread ("):
                thread = frame.split(": ", 1)[-1]
                if thread.endswith("zeo client networking thread"):
                    thread = "zeo client networking thread"
            else:
                frames.append(frame)
        name = f"{process}: {thread}"
        threads[name] = threads.get(name, 0) + count
        named = [f"[{name}] {re.sub(r':[0-9]+[)]$', ')', frame)}" for frame in frames]
        if named:
            own[named[-1]] = own.get(named[-1], 0) + count
        for frame in set(named):
            total[frame] = total.get(frame, 0) + count
    possible = max(1.0, seconds * rate)
    everything = sum(threads.values()) or 1
    out = [f"busy per thread (share of the {seconds:.1f}s run in which it was sampled running):"]
    for thread, count in sorted(threads.items(), key=lambda kv: -kv[1]):
        out.append(f"  {100 * count / possible:5.1f}%  {thread}")
    out.append(f"top {top} functions by own samples (% of all samples):")
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"  {100 * count / everything:5.1f}%  {frame}")
    out.append(f"top {top} functions by total samples, below the thread entry points:")
    entry = re.compile(
        r"Thread\.|_bootstrap|_run_code|_run_module|runners\.py|<module>|run_forever"
        r"|run_until_complete|cmd_serve|serve \(|main \("
    )
    kept = [(f, c) for f, c in total.items() if not entry.search(f)]
    for frame, count in sorted(kept, key=lambda kv: -kv[1])[:top]:
        out.append(f"  {100 * count / everything:5.1f}%  {frame}")
    return "\n".join(out)


# --- the report -----------------------------------------------------------------------------


def human_size(size: float) -> str:
    for unit, factor in (("MiB", MIB), ("KiB", KIB)):
        if size >= factor:
            value = size / factor
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size:.0f} B"


def median_rate(samples: Sequence[Sample]) -> float | None:
    rates = [s.rate for s in samples if s.rate is not None]
    return statistics.median(rates) if rates else None


def fmt_rate(rate: float | None) -> str:
    return "error" if rate is None else f"{rate:,.0f}"


def fmt_ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or not theirs:
        return "-"
    return f"{ours / theirs:.2f}"


Target = tuple[str, str, "bool | None", str, "bool | None"]


def report(
    plan: Plan,
    samples: list[Sample],
    scaled: list[Sample],
    rss: dict[str, dict[str, Any]] | None,
    consumed: list[dict[str, Any]],
) -> tuple[str, list[Target]]:
    """The markdown tables, and the targets of issue 6 with whether each is met.

    A target row is (what, measured, met, measured with share = no, met);
    the targets are judged on the default path, ``share = no`` is shown
    beside it.
    """
    lines: list[str] = []
    ours = [k for k in OURS if k in plan.servers]
    peers = [k for k in plan.servers if k not in OURS]
    cases = [(size, sessions) for size in plan.sizes for sessions in plan.sessions]
    rates: dict[tuple[int, int, str], float | None] = {}
    for size, sessions in cases:
        for kind in plan.servers:
            rates[size, sessions, kind] = median_rate(
                [s for s in samples if (s.server, s.size, s.sessions) == (kind, size, sessions)]
            )

    def table(head: list[str], rows: list[list[str]]) -> list[str]:
        return [
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
            *("| " + " | ".join(row) + " |" for row in rows),
        ]

    def ok_samples(kind: str, size: int, sessions: int) -> list[Sample]:
        return [
            s
            for s in samples
            if (s.server, s.size, s.sessions) == (kind, size, sessions) and s.rate is not None
        ]

    if samples:
        rounds = f"median of {plan.rounds} round{'s' if plan.rounds > 1 else ''}"
        lines += [f"Messages per second, {rounds}:", ""]
        lines += table(
            ["size", "sessions"] + [SERVER_LABELS[k] for k in plan.servers],
            [
                [human_size(size), str(sessions)]
                + [fmt_rate(rates[size, sessions, k]) for k in plan.servers]
                for size, sessions in cases
            ],
        )
        if ours and peers:
            lines += ["", "Ratios, ours / peer (same run):", ""]
            lines += table(
                ["size", "sessions"]
                + [f"{SERVER_LABELS[o]} / {SERVER_LABELS[p]}" for o in ours for p in peers],
                [
                    [human_size(size), str(sessions)]
                    + [
                        fmt_ratio(rates[size, sessions, o], rates[size, sessions, p])
                        for o in ours
                        for p in peers
                    ]
                    for size, sessions in cases
                ],
            )
        cpu_rows = []
        for size, sessions in cases:
            row = [human_size(size), str(sessions)]
            for kind in plan.servers:
                ok = ok_samples(kind, size, sessions)
                if not ok:
                    row.append("-")
                    continue
                per_msg = statistics.median(1000 * s.cpu_seconds / s.messages for s in ok)
                system = statistics.median(1000 * s.cpu_system_seconds / s.messages for s in ok)
                row.append(f"{per_msg:.2f} ({system:.2f})")
            cpu_rows.append(row)
        lines += [
            "",
            "Server CPU per message in ms, user + system (system alone in brackets), "
            "all its processes, medians:",
            "",
        ]
        lines += table(["size", "sessions"] + [SERVER_LABELS[k] for k in plan.servers], cpu_rows)
        if ours:
            store_rows = []
            for size, sessions in cases:
                row = [human_size(size), str(sessions)]
                for kind in ours:
                    ok = ok_samples(kind, size, sessions)
                    commits = [s.extra.get("transactions", 0) for s in ok]
                    if not ok or not all(commits):
                        row += ["-", "-"]
                        continue
                    batch = statistics.median(
                        s.messages / c for s, c in zip(ok, commits, strict=True)
                    )
                    row.append(f"{batch:.1f}")
                    row.append(
                        f"{statistics.median(s.extra['bytes_per_message'] for s in ok):,.0f}"
                    )
                store_rows.append(row)
            lines += ["", "Group commit and write volume, medians:", ""]
            lines += table(
                ["size", "sessions"]
                + [
                    f"{SERVER_LABELS[k]} {what}"
                    for k in ours
                    for what in ("msgs/commit", "Data.fs B/msg")
                ],
                store_rows,
            )
        lines += ["", "Servers:"]
        lines += [f"- {SERVER_LABELS[k]}: {SERVERS[k].note}" for k in plan.servers]
        for kind in ours:
            storage = next(
                (s.extra["storage"] for s in samples if s.server == kind and "storage" in s.extra),
                None,
            )
            if storage:
                lines.append(f"- {SERVER_LABELS[kind]} ran with: {storage}.")
        errors = [s for s in samples + scaled if s.error]
        if errors:
            lines += ["", f"{len(errors)} runs did not count:"]
            lines += [f"- {describe(s)}" for s in errors]

    targets: list[Target] = []

    def fmt(value: float | None, unit: str, absent: str = "not measured") -> str:
        if value is None:
            return absent
        return f"{value:.2f}" if unit == "x" else f"{value:,.0f} {unit}"

    def target(
        name: str,
        value: float | None,
        direct: float | None,
        floor: float,
        unit: str = "x",
        absent: str = "not measured",
    ) -> None:
        targets.append(
            (
                name,
                fmt(value, unit),
                None if value is None else value >= floor,
                fmt(direct, unit, absent),
                None if direct is None else direct >= floor,
            )
        )

    def ratio(kind: str, size: int, sessions: int, peer: str) -> float | None:
        mine, theirs = rates.get((size, sessions, kind)), rates.get((size, sessions, peer))
        return mine / theirs if mine and theirs else None

    if ours and samples:
        for name, size, sessions, peer, floor in (
            ("1 KiB x 16 sessions >= 2 x Dovecot", KIB, 16, "dovecot", 2.0),
            ("1 KiB x 16 sessions >= 0.6 x bare aiosmtpd", KIB, 16, "bare", 0.6),
            ("1 KiB x 1 session >= 2 x Dovecot", KIB, 1, "dovecot", 2.0),
            ("50 KiB x 16 sessions >= 1.5 x Dovecot", 50 * KIB, 16, "dovecot", 1.5),
        ):
            target(
                name,
                ratio("postoffice", size, sessions, peer),
                ratio("po-direct", size, sessions, peer),
                floor,
            )
    if scaled:
        ratios: dict[str, float | None] = {}
        for kind in OURS:
            mine = [s for s in scaled if s.server == kind]
            if not mine:
                continue
            empty = median_rate([s for s in mine if s.extra["depot"] == "empty"])
            full = median_rate([s for s in mine if s.extra["depot"] == "full"])
            ratios[kind] = full / empty if full and empty else None
            written = {
                label: statistics.median(
                    s.extra["bytes_per_message"]
                    for s in mine
                    if s.extra["depot"] == label and s.rate is not None
                )
                for label in ("empty", "full")
                if any(s.extra["depot"] == label and s.rate is not None for s in mine)
            }
            lines += [
                "",
                f"{SERVER_LABELS[kind]} with {plan.prefill:,} messages queued and ledgered, "
                f"1 KiB x {max(plan.sessions)} sessions: {fmt_rate(full)} msgs/s; "
                f"empty depot: {fmt_rate(empty)} msgs/s"
                + (
                    f" (Data.fs grows {written['full']:,.0f} and {written['empty']:,.0f} B/msg)."
                    if len(written) == 2
                    else "."
                ),
            ]
        target(
            f"{plan.prefill:,} queued >= 0.9 x empty depot",
            ratios.get("postoffice"),
            ratios.get("po-direct"),
            0.9,
        )
    peaks: dict[str, float | None] = {}
    rss_limit = None
    for kind, result in (rss or {}).items():
        label = SERVER_LABELS[kind]
        rss_limit = result["limit_kib"] / KIB
        if "error" in result:
            lines += ["", f"Peak RSS of {label}: error: {result['error']}"]
            peaks[kind] = None
            continue
        limit_note = (
            f" (max_message_size = {result['max_message_size']})"
            if result["max_message_size"]
            else ""
        )
        lines += [
            "",
            f"Peak RSS of {label} with {result['sessions']} concurrent "
            f"{human_size(result['message_bytes'])} messages{limit_note}: "
            f"{result['hwm_kib'] / KIB:,.0f} MiB over {result['processes']} process(es) "
            f"(idle before: {result['rss_idle_kib'] / KIB:,.0f} MiB; "
            f"sent in {result['seconds']:.1f}s).",
        ]
        peaks[kind] = result["hwm_kib"] / KIB
    if rss_limit is not None and any(k in peaks for k in OURS):
        mine, direct = peaks.get("postoffice"), peaks.get("po-direct")
        targets.append(
            (
                f"peak RSS, 16 x 10 MiB at once <= 2 x 160 MiB + 100 MiB = {rss_limit:,.0f} MiB",
                fmt(mine, "MiB"),
                None if mine is None else mine <= rss_limit,
                fmt(direct, "MiB"),
                None if direct is None else direct <= rss_limit,
            )
        )
    if consumed:
        by_mode: dict[str, float | None] = {}
        for mode in ("zeo", "zeo-batch", "zeo-floor", "file"):
            good = [r for r in consumed if r.get("mode") == mode and "error" not in r]
            by_mode[mode] = (
                statistics.median(r["popped"] / r["seconds"] for r in good) if good else None
            )
        text = (
            "Consumer pop-and-commit, one commit per message: "
            f"{fmt_rate(by_mode['file'])} msgs/s on the file:// depot with serve stopped"
        )
        if any(r.get("mode") == "zeo" for r in consumed):
            text += (
                f"; {fmt_rate(by_mode['zeo'])} msgs/s through the ZEO server of a running "
                "serve (the URI it prints).  Through ZEO, ten pops a commit: "
                f"{fmt_rate(by_mode['zeo-batch'])} msgs/s; bare one-object commits through "
                f"the same URI: {fmt_rate(by_mode['zeo-floor'])} a second (the ceiling of "
                "any loop that commits once a message)"
            )
        lines += ["", text + "."]
        lines += [f"- consumer error: {r['error'][-300:]}" for r in consumed if "error" in r]
        target(
            "a consumer pops and commits >= 1,000 msgs/s: on the file:// FileStorage "
            "(serve stopped), one commit a message",
            by_mode["file"],
            by_mode["file"],
            1000,
            "msgs/s",
        )
        if any(r.get("mode") == "zeo" for r in consumed):
            floor = fmt(by_mode["zeo-floor"], "a second")
            for mode, how in (
                ("zeo", f"one commit a message (ZEO's bare one-object commits: {floor})"),
                ("zeo-batch", "ten pops a commit"),
            ):
                target(
                    f"... through the ZEO server of a running serve, {how}",
                    by_mode[mode],
                    None,
                    1000,
                    "msgs/s",
                    "n/a (no ZEO)",
                )
    if targets:
        lines += [
            "",
            "Targets of issue 6 (judged on the default path; share = no beside it):",
            "",
        ]

        def mark(met: bool | None) -> str:
            return "n/a" if met is None else ("yes" if met else "NO")

        lines += table(
            ["target", "postoffice", "met", "share = no", "met"],
            [[n, v, mark(m), dv, mark(dm)] for n, v, m, dv, dm in targets],
        )
    return "\n".join(lines), targets


def blob_table(results: list[dict[str, Any]]) -> str:
    """Inline against blob: ms per message and bytes written per message."""
    lines = [
        "Inline or blob (Depot.deliver_batch straight, no LMTP): ms per message, "
        "and Data.fs + blob bytes per message",
        "",
        "| size | msgs/commit | inline ms | blob ms | inline Data.fs B | blob Data.fs + file B |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {human_size(r['size'])} | {r['batch']} | error | | | |")
            continue
        inline, blob = r["inline"], r["blob"]
        lines.append(
            f"| {human_size(r['size'])} | {r['batch']} | {inline['ms_per_message']:.2f} | "
            f"{blob['ms_per_message']:.2f} | {inline['data_fs_bytes_per_message']:,.0f} | "
            f"{blob['data_fs_bytes_per_message']:,.0f} + {blob['blob_bytes_per_message']:,.0f} |"
        )
    return "\n".join(lines)


def remove(path: Path) -> None:
    if KEEP:
        return
    shutil.rmtree(path, ignore_errors=True)


KEEP = False


def parse_sizes(text: str) -> list[int]:
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        factor = 1
        if part.endswith("k"):
            factor, part = KIB, part[:-1]
        elif part.endswith("m"):
            factor, part = MIB, part[:-1]
        sizes.append(int(part) * factor)
    return sizes


def build_plan(args: argparse.Namespace) -> Plan:
    quick = args.quick
    parts = {"throughput", "scale", "rss", "consume", "blob"}
    if args.only:
        parts = set(args.only.split(","))
    if args.profile:
        parts.add("profile")
    return Plan(
        servers=args.servers.split(","),
        sizes=parse_sizes(args.sizes),
        sessions=[int(s) for s in args.sessions.split(",")],
        rounds=args.rounds or (1 if quick else 3),
        messages=args.messages or (1000 if quick else 3000),
        sink_messages=args.sink_messages or (5000 if quick else 20000),
        prefill=args.prefill or (5000 if quick else 100_000),
        scale_messages=args.scale_messages or (1000 if quick else 10_000),
        rss_message=parse_sizes(args.rss_size)[0],
        rss_sessions=16,
        consume=args.consume or (1000 if quick else 3000),
        parts=parts,
        profile=args.profile_messages or (2000 if quick else 20000),
        profile_gil=args.profile_gil,
        profile_full=args.profile_full,
        profile_server=args.profile_server,
        blob_messages=100 if quick else 400,
    )


def main(argv: Sequence[str] | None = None) -> int:
    global KEEP
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="one round, fewer messages (~1 min)")
    parser.add_argument("--rounds", type=int, help="rounds per case (default 3; median shown)")
    parser.add_argument("--messages", type=int, help="messages per run (default 3000)")
    parser.add_argument(
        "--sink-messages", type=int, help="messages per smtp-sink run (default 20000)"
    )
    parser.add_argument(
        "--servers",
        default="sink,dovecot,bare,postoffice,po-direct",
        help="comma-separated, of sink,dovecot,bare,postoffice,po-direct (share = no)",
    )
    parser.add_argument("--sizes", default="1k,50k", help="message payload sizes (smtp-source -l)")
    parser.add_argument("--sessions", default="1,4,16", help="concurrent sessions (smtp-source -s)")
    parser.add_argument("--prefill", type=int, help="messages already queued (default 100000)")
    parser.add_argument(
        "--scale-messages", type=int, help="messages per run of the scale part (default 10000)"
    )
    parser.add_argument("--rss-size", default="10m", help="message size of the peak-RSS run")
    parser.add_argument("--consume", type=int, help="messages the consumer pops (default 3000)")
    parser.add_argument(
        "--only", help="comma-separated parts: throughput,scale,rss,consume,blob,profile"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also profile the server with py-spy"
    )
    parser.add_argument("--profile-messages", type=int, help="messages sent while profiling")
    parser.add_argument(
        "--profile-gil",
        action="store_true",
        help="sample only the thread holding the GIL (py-spy --gil)",
    )
    parser.add_argument(
        "--profile-full",
        action="store_true",
        help="profile on a depot pre-filled with --prefill messages",
    )
    parser.add_argument(
        "--profile-server",
        choices=OURS,
        default="postoffice",
        help="which of ours to profile (po-direct: share = no)",
    )
    parser.add_argument("--json", type=Path, help="write every sample to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    args = parser.parse_args(argv)
    KEEP = args.keep
    plan = build_plan(args)
    for kind in plan.servers:
        if kind not in SERVERS:
            parser.error(f"unknown server {kind!r}")
    unknown = plan.parts - {"throughput", "scale", "rss", "consume", "blob", "profile"}
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if find_tool("smtp-source") is None:
        log("bench: smtp-source not found; run bench/run.sh (installs Debian's postfix)")
        return 69
    why = postoffice_available()
    if why is not None:
        log(f"bench: postoffice serve cannot run here ({why}); measuring the peers only")
        plan.servers = [k for k in plan.servers if k not in OURS]
        plan.parts -= {"scale", "rss", "consume", "blob", "profile"}

    base = Path(tempfile.mkdtemp(prefix="po-bench-"))
    # Dovecot's and smtp-sink's unprivileged processes must reach their sockets and Maildir.
    base.chmod(0o755)
    log(f"bench: working in {base}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    started = time.monotonic()
    samples: list[Sample] = []
    scaled: list[Sample] = []
    rss: dict[str, dict[str, Any]] | None = None
    consumed: list[dict[str, Any]] = []
    profiled: dict[str, Any] | None = None
    blobs: list[dict[str, Any]] = []
    try:
        if "throughput" in plan.parts:
            samples = throughput(plan, base, log)
        if "scale" in plan.parts:
            scaled = scale(plan, base, log)
        if "rss" in plan.parts:
            rss = peak_rss(plan, base, log)
        if "consume" in plan.parts:
            consumed = consumer(plan, base, log)
        if "blob" in plan.parts:
            blobs = inline_or_blob(plan, base, log)
        if "profile" in plan.parts:
            profiled = profile(plan, base, log)
    finally:
        remove(base)
    text, targets = report(plan, samples, scaled, rss, consumed)
    print(text)
    if blobs:
        print()
        print(blob_table(blobs))
    if profiled is not None and "summary" in profiled:
        gil = " (only samples holding the GIL)" if plan.profile_gil else ""
        print(
            f"\nProfile of {SERVER_LABELS[plan.profile_server]}{gil}"
            f"{' on a pre-filled depot' if plan.profile_full else ''}, "
            f"{profiled['messages']} x 1 KiB over "
            f"{max(plan.sessions)} sessions ({profiled['rate']:,.0f} msgs/s under py-spy):\n"
        )
        print(profiled["summary"])
    log(f"bench: done in {time.monotonic() - started:.0f}s; load now {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "plan": asdict(plan) | {"parts": sorted(plan.parts)},
                    "samples": [asdict(s) | {"rate": s.rate} for s in samples],
                    "scale": [asdict(s) | {"rate": s.rate} for s in scaled],
                    "rss": rss,
                    "consumer": consumed,
                    "profile": profiled,
                    "inline_or_blob": blobs,
                    "targets": targets,
                    "cpus": os.cpu_count(),
                },
                indent=2,
            )
        )
    failed = (
        any(s.error for s in samples + scaled)
        or any("error" in r for r in (rss or {}).values())
        or any("error" in r for r in consumed)
        or any("error" in r for r in blobs)
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
