"""Mail as users see it flow: SMTP into a private Postfix, LMTP out to the server under test.

``smtp-source`` (SMTP, 16 sessions) sends to a private Postfix instance
(``smtpd``, ``cleanup``, ``qmgr``, ``lmtp``) on a loopback port, whose
``lmtp`` client delivers to the server under test on its unix socket,
with the LMTP settings ``postfix-examples/lmtp-main.cf`` recommends.  The
same Postfix instance delivers to ``smtp-sink -L`` in the same run, which
is what Postfix alone manages; postoffice is judged against it.

The clock runs from the first SMTP connection to the last message the
server has acknowledged (Postfix's ``status=sent`` log lines, counted as
they come), and each run is then checked by the server's own count, as
in the other parts.  The instance follows what is known to work for a
private Postfix on this kind of machine: everything in one folder,
unchrooted services, logging to a file through ``postlogd``, no DNS,
nothing beyond loopback.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import progress
import servers
from common import RECIPIENT, SENDER, BenchError, Plan, Sample, remove
from procs import find_tool, tree_cpu_seconds, wait_until

Log = Callable[[str], None]

SESSIONS = 16
START_TIMEOUT = 30.0
# Postfix must relay at least this many messages a second, or the run is cut off.
SLOWEST_RATE = 20.0

# name type private unpriv chroot wakeup maxproc command: chroot n throughout, so
# that the lmtp client finds the server's socket by its path.
SERVICES = """\
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
smtp unix - - n - - smtp
relay unix - - n - - smtp
lmtp unix - - n - - lmtp
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""

# The LMTP client settings of postfix-examples/lmtp-main.cf.
LMTP_SETTINGS = {
    "lmtp_destination_recipient_limit": "50",
    "lmtp_destination_concurrency_limit": "20",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def open_for_postfix(path: Path) -> None:
    """Let Postfix's own users pass through the run's folders (temporary folders are 0700)."""
    for folder in [path, *path.parents]:
        if folder == Path(folder.anchor):
            break
        mode = stat.S_IMODE(folder.stat().st_mode)
        if mode & 0o011 != 0o011 and folder.stat().st_uid == os.geteuid():
            folder.chmod(mode | 0o011)


class PostfixRelay:
    """A private Postfix in ``folder`` relaying ``app.bench.example`` to ``socket_path``."""

    def __init__(self, folder: Path, socket_path: Path) -> None:
        self.folder = folder
        self.etc = folder / "etc"
        self.maillog = folder / "maillog"
        self.port = free_port()
        self.socket_path = socket_path

    def main_cf(self) -> dict[str, str]:
        domain = RECIPIENT.split("@", 1)[1]
        return {
            "compatibility_level": "3.6",
            "queue_directory": str(self.folder / "spool"),
            "data_directory": str(self.folder / "data"),
            "command_directory": "/usr/sbin",
            "daemon_directory": "/usr/lib/postfix/sbin",
            "shlib_directory": "/usr/lib/postfix",
            "meta_directory": "/etc/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "relay.bench.example",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": f"/var, /dev/stdout, {self.folder}",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "relay_domains": domain,
            "transport_maps": f"inline:{{ {domain}=lmtp:unix:{self.socket_path} }}",
            "relay_recipient_maps": "",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "disable_dns_lookups": "yes",
            "smtp_host_lookup": "native",
            "lmtp_host_lookup": "native",
            "biff": "no",
            **LMTP_SETTINGS,
        }

    def write(self) -> None:
        for folder in (self.folder, self.etc, self.folder / "spool"):
            folder.mkdir(parents=True, exist_ok=True)
            os.chown(folder, 0, 0)
            folder.chmod(0o755)
        open_for_postfix(self.folder)
        main = "".join(f"{key} = {value}\n" for key, value in self.main_cf().items())
        master = f"127.0.0.1:{self.port} inet n - n - - smtpd\n" + SERVICES
        for name, text in (("main.cf", main), ("master.cf", master)):
            (self.etc / name).write_text(text)

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        tool = find_tool("postfix") or "postfix"
        command = shlex.join([tool, "-c", str(self.etc), *args])
        # postfix says why start fails only when its output is a terminal.
        argv = ["script", "-qec", command, "/dev/null"] if shutil.which("script") else [command]
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=60, check=False, shell=len(argv) == 1
        )

    def start(self) -> None:
        self.write()
        started = self._postfix("start")
        if started.returncode != 0:
            raise BenchError(f"postfix start failed: {started.stdout}{started.stderr}"[-300:])
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            if time.monotonic() > deadline:
                raise BenchError(f"Postfix's smtpd not ready after {START_TIMEOUT:.0f}s")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                return sock.recv(3) == b"220"
        except OSError:
            return False

    def stop(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._postfix("stop")

    def cpu_seconds(self) -> float:
        """User + system CPU of Postfix so far: its master, the live services, and
        the services that exited (the master reaps them, so they are in its children's
        times)."""
        try:
            master = int((self.folder / "spool" / "pid" / "master.pid").read_text().split()[0])
            user, system = tree_cpu_seconds(master)
        except (OSError, ValueError, IndexError):
            return 0.0
        return user + system

    def sent(self) -> int:
        """Deliveries Postfix's lmtp client saw acknowledged so far."""
        try:
            text = self.maillog.read_bytes()
        except FileNotFoundError:
            return 0
        return len(re.findall(rb"postfix/lmtp\[\d+\]: .* status=sent ", text))

    def tail(self) -> str:
        try:
            return "\n".join(self.maillog.read_text(errors="replace").splitlines()[-5:])
        except FileNotFoundError:
            return ""


def send_smtp(port: int, size: int, messages: int, helo: str, timeout: float) -> None:
    """``smtp-source`` over SMTP: ``SESSIONS`` sessions, each connection kept for more mail."""
    tool = find_tool("smtp-source")
    if tool is None:
        raise BenchError("smtp-source not found (Debian package postfix)")
    argv = [tool, "-d", "-s", str(SESSIONS), "-l", str(size), "-m", str(messages), "-M", helo]
    argv += ["-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{port}"]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"smtp-source did not finish within {timeout:.0f}s") from None
    if done.returncode != 0:
        message = (done.stderr or done.stdout).decode(errors="replace").strip()
        raise BenchError(f"smtp-source exited {done.returncode}: {message[-300:]}")


def relay_one(kind: str, work: Path, size: int, messages: int, round_number: int) -> Sample:
    """One run: a fresh server and a fresh Postfix in front of it; seconds, then the count."""
    sample = Sample(kind, size, SESSIONS, messages, round_number)
    work.mkdir(parents=True)
    open_for_postfix(work)
    server = servers.create(kind, work / "server")
    server.work.mkdir()
    relay = PostfixRelay(work / "postfix", server.socket)
    helo = f"r{round_number}.{kind}.{size}.relay.{work.name}.bench"
    timeout = max(60.0, messages / SLOWEST_RATE)
    try:
        with servers.running(server):
            # Postfix's lmtp client runs as the postfix user.
            server.socket.chmod(0o666)
            try:
                relay.start()
                os.sync()
                user_before, system_before = server.cpu_seconds()
                postfix_before = relay.cpu_seconds()
                start = time.perf_counter()
                send_smtp(relay.port, size, messages, helo, timeout)
                assert server.proc is not None
                wait_until(
                    lambda: relay.sent() >= messages,
                    timeout,
                    f"Postfix relaying to {kind}",
                    server.proc,
                )
                sample.seconds = time.perf_counter() - start
                user_after, system_after = server.cpu_seconds()
                sample.cpu_seconds = user_after - user_before + system_after - system_before
                sample.cpu_system_seconds = system_after - system_before
                sample.extra["postfix_cpu_seconds"] = relay.cpu_seconds() - postfix_before
            finally:
                relay.stop()
            sample.delivered = server.stop()
        if sample.delivered != messages:
            sample.error = f"delivered {sample.delivered} of {messages}"
    except BenchError as exc:
        sample.error = f"{exc} [{server.output()[-200:]} {relay.tail()[-200:]}]"
    return sample


def through_postfix(plan: Plan, base: Path, log: Log) -> list[Sample]:
    """smtp-sink and postoffice behind the same Postfix set-up, each size, rounds interleaved."""
    if os.geteuid() != 0:
        raise BenchError("the relay part starts a private Postfix, which needs root")
    samples = []
    for round_number in range(1, plan.rounds + 1):
        for size in plan.sizes:
            for kind in ("sink", "postoffice"):
                work = base / f"relay-r{round_number}-{kind}-{size}"
                sample = relay_one(kind, work, size, plan.messages, round_number)
                samples.append(sample)
                log("through Postfix: " + progress.describe(sample))
                remove(work)
    return samples
