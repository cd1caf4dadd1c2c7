"""Real Postfix parts for integration tests: a private Postfix instance and smtp-sink.

Follows /work/shared/POSTFIX.md: everything lives in one directory, every service
runs unchrooted, logging goes to a file through postlogd, nothing listens beyond
loopback and nothing looks up DNS. A part that is missing skips the test on a
developer machine but fails it in CI (``CI=true``), so CI never passes by skipping.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, NoReturn

import pytest

from postoffice.sockets import MAX_SOCKET_PATH
from tests.helpers import in_ci
from tests.integration.storage_servers import free_port

__all__ = [
    "PostfixInstance",
    "SinkMessage",
    "SmtpSink",
    "find_tool",
    "free_port",
    "in_ci",
    "main_cf_settings",
    "make_traversable",
    "parse_sink_dump",
    "require_root",
    "require_tool",
]

#: Debian installs the Postfix programs here; /usr/sbin is often not in a user's PATH.
TOOL_DIRS = ("/usr/sbin", "/usr/lib/postfix/sbin")

COMMAND_TIMEOUT = 30.0


def find_tool(name: str) -> str | None:
    """Path of a Postfix program, looking beyond PATH because Debian puts them in sbin."""
    found = shutil.which(name)
    if found:
        return found
    for folder in TOOL_DIRS:
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _missing(reason: str) -> NoReturn:
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing part is a failure, not a skip)")
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """Path of ``name``; skip the test locally when it is missing, fail it in CI."""
    path = find_tool(name)
    if path is None:
        _missing(f"{name} not found in PATH or {', '.join(TOOL_DIRS)}; install Debian's postfix")
    return path


def require_root() -> None:
    """Postfix only starts as root; skip locally, fail in CI, when we are not root."""
    if os.geteuid() != 0:
        _missing("a private Postfix instance needs root (postfix start refuses otherwise)")


def make_traversable(path: Path) -> None:
    """Let other users (postfix, nobody) pass through ``path`` and its parents.

    pytest makes its temporary folders 0700; Postfix daemons and pipe(8) commands
    run as other users and must reach sockets and files below them. Only the
    search (x) bit is added, so nobody can list the folders.
    """
    for folder in [path, *path.parents]:
        if folder == Path(folder.anchor):
            break
        info = folder.stat()
        if info.st_mode & 0o011 == 0o011 or info.st_uid != os.geteuid():
            continue
        folder.chmod(stat.S_IMODE(info.st_mode) | 0o011)


def _run(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if _pid_alive(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [pid for pid in alive if _pid_alive(pid)]
    return alive


def main_cf_settings(text: str) -> dict[str, str]:
    """``name = value`` settings of a main.cf fragment, continuation lines joined."""
    settings: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():
            assert name is not None, f"continuation without a setting: {line!r}"
            settings[name] += " " + line.strip()
            continue
        name, _, value = line.partition("=")
        name = name.strip()
        settings[name] = value.strip()
    return settings


def _inline_map(entries: Mapping[str, str]) -> str:
    """Postfix ``inline:`` map text; braces protect values holding spaces or commas."""
    parts = []
    for key, value in entries.items():
        if re.search(r"[\s,{}]", key + value):
            parts.append(f"{{ {key} = {value} }}")
        else:
            parts.append(f"{key}={value}")
    return "inline:{ " + ", ".join(parts) + " }"


# name, type, private, unpriv, chroot, wakeup, maxproc, command: chroot is always n,
# because a chrooted lmtp client looks up unix:/tmp/... inside the spool directory.
_SERVICES = [
    ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
    ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
    ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
    ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
    ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
    ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
    ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
    ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
    ("error", "unix", "-", "-", "n", "-", "-", "error"),
    ("retry", "unix", "-", "-", "n", "-", "-", "error"),
    ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
    ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("lmtp", "unix", "-", "-", "n", "-", "-", "lmtp"),
    ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
    ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
    ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
]


class PostfixInstance:
    """A private Postfix in ``base_dir``: smtpd on a loopback port, mail routed per domain.

    ``transports`` maps a domain to a Postfix transport (``"app.test":
    "lmtp:unix:/path/sock"``, ``"pipe.test": "postoffice-pipe:"``); those domains
    become ``relay_domains``. ``extra_master_cf`` is appended to master.cf (for a
    pipe service), ``extra_main_cf`` overrides or adds main.cf settings, and
    ``recipient_limits`` sets ``<transport>_destination_recipient_limit``.
    Used as a context manager it starts on entry and always stops on exit.
    """

    def __init__(
        self,
        base_dir: Path,
        transports: Mapping[str, str],
        extra_master_cf: str = "",
        extra_main_cf: Mapping[str, str] | None = None,
        *,
        recipient_limits: Mapping[str, int] | None = None,
        port: int | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.etc_dir = self.base_dir / "etc"
        self.spool_dir = self.base_dir / "spool"
        self.data_dir = self.base_dir / "data"
        self.maillog_path = self.base_dir / "maillog"
        self.port = port if port is not None else free_port()
        self.transports = dict(transports)
        self.extra_master_cf = extra_master_cf
        self.extra_main_cf = dict(extra_main_cf or {})
        self.recipient_limits = dict(recipient_limits or {})
        self.start_timeout = start_timeout
        self.running = False
        self._write_config()

    # -- configuration -------------------------------------------------------------

    def main_cf(self) -> dict[str, str]:
        """The main.cf settings, in order; caller's ``extra_main_cf`` wins."""
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.spool_dir),
            "data_directory": str(self.data_dir),
            "command_directory": "/usr/sbin",
            "daemon_directory": "/usr/lib/postfix/sbin",
            "shlib_directory": "/usr/lib/postfix",
            "meta_directory": "/etc/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "postfix.test",
            "mydomain": "test",
            "myorigin": "$myhostname",
            "maillog_file": str(self.maillog_path),
            "maillog_file_prefixes": f"/var, /dev/stdout, {self.base_dir}",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "relay_domains": " ".join(self.transports),
            "transport_maps": _inline_map(self.transports) if self.transports else "",
            "relay_recipient_maps": "",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "disable_dns_lookups": "yes",
            "smtp_host_lookup": "native",
            "lmtp_host_lookup": "native",
            "biff": "no",
            # Fail fast and visibly in tests instead of waiting minutes between retries.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
        }
        for transport, limit in self.recipient_limits.items():
            settings[f"{transport}_destination_recipient_limit"] = str(limit)
        settings.update(self.extra_main_cf)
        return settings

    def master_cf(self) -> str:
        """master.cf text: smtpd on our loopback port, the usual services, caller's lines."""
        lines = [f"127.0.0.1:{self.port} inet n - n - - smtpd"]
        lines += [" ".join(service) for service in _SERVICES]
        text = "\n".join(lines) + "\n"
        extra = textwrap.dedent(self.extra_master_cf).strip("\n")
        if extra:
            text += extra + "\n"
        return text

    def _write_config(self) -> None:
        # Postfix refuses a config or queue parent that is not root-owned or is
        # group/world writable; pytest's folders above it are 0700, so open them
        # for traversal by the postfix user (and nobody, for pipe commands).
        # Postfix creates the queue's subfolders itself, but not the queue folder.
        for folder in (self.base_dir, self.etc_dir, self.spool_dir):
            folder.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                os.chown(folder, 0, 0)
            folder.chmod(0o755)
        make_traversable(self.base_dir)
        main = "".join(f"{key} = {value}\n" for key, value in self.main_cf().items())
        for name, text in (("main.cf", main), ("master.cf", self.master_cf())):
            path = self.etc_dir / name
            path.write_text(text)
            path.chmod(0o644)

    # -- running -------------------------------------------------------------------

    def _postfix(self, *args: str) -> list[str]:
        return [find_tool("postfix") or "postfix", "-c", str(self.etc_dir), *args]

    def _postqueue(self, *args: str) -> list[str]:
        return [find_tool("postqueue") or "postqueue", "-c", str(self.etc_dir), *args]

    def _run_visible(self, argv: Sequence[str]) -> tuple[int, str]:
        """Run under script(1): postfix start/check only say why they fail on a tty."""
        script = shutil.which("script")
        command = shlex.join(argv)
        if script is None:
            proc = _run(argv)
            return proc.returncode, proc.stdout + proc.stderr
        proc = _run([script, "-qec", command, "/dev/null"])
        return proc.returncode, (proc.stdout + proc.stderr).replace("\r", "")

    def start(self) -> None:
        """Start Postfix and wait until smtpd answers; raise RuntimeError saying why not."""
        if self.running:
            return
        # Another pytest session may have reset /tmp/pytest-of-<user> to 0700
        # since __init__: Postfix's own users must still reach the instance.
        make_traversable(self.base_dir)
        code, output = self._run_visible(self._postfix("start"))
        self.running = True  # even a failed start may leave a master behind
        try:
            if code != 0:
                raise RuntimeError(
                    f"postfix start failed (exit {code}):\n{output}\n{self._log_tail()}"
                )
            self._wait_for_smtpd()
        except BaseException:
            self.stop()
            raise

    def _wait_for_smtpd(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                    sock.settimeout(5)
                    banner = sock.recv(512)
                    if banner.startswith(b"220"):
                        sock.sendall(b"QUIT\r\n")
                        return
                    last_error = RuntimeError(f"unexpected banner {banner!r}")
            except OSError as exc:
                last_error = exc
            time.sleep(0.1)
        raise RuntimeError(
            f"smtpd on 127.0.0.1:{self.port} not ready after {self.start_timeout}s: "
            f"{last_error}\n{self._log_tail()}"
        )

    def master_pid(self) -> int | None:
        """PID of this instance's master, from its pid file."""
        try:
            return int((self.spool_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def instance_pids(self) -> list[int]:
        """PIDs of every process of this instance (Postfix passes MAIL_CONFIG to all)."""
        marker = f"MAIL_CONFIG={self.etc_dir}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0"):
                pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        """Stop Postfix, then kill any process of this instance still left."""
        if not self.running:
            return
        self.running = False
        master = self.master_pid()
        with contextlib.suppress(subprocess.TimeoutExpired):
            _run(self._postfix("stop"), timeout=COMMAND_TIMEOUT)
        leftovers = set(self.instance_pids())
        if master is not None:
            leftovers.add(master)
        alive = _wait_gone(sorted(leftovers), timeout=10)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            alive = _wait_gone(alive, timeout=5)
            if not alive:
                break

    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- queue -----------------------------------------------------------------------

    def flush(self) -> None:
        """Ask Postfix to retry deferred mail now (postqueue -f)."""
        proc = _run(self._postqueue("-f"))
        if proc.returncode != 0:
            raise RuntimeError(f"postqueue -f failed: {proc.stderr.strip()}")

    def queue(self) -> list[dict[str, object]]:
        """The queue as postqueue -j reports it, one dict per message."""
        proc = _run(self._postqueue("-j"))
        if proc.returncode != 0:
            raise RuntimeError(f"postqueue -j failed: {proc.stderr.strip()}")
        return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]

    def queue_ids(self) -> list[str]:
        """Queue IDs of every message still in the queue."""
        return [str(entry["queue_id"]) for entry in self.queue()]

    def queue_is_empty(self) -> bool:
        return not self.queue_ids()

    def wait_until_queue_empty(self, timeout: float = 30.0) -> None:
        """Wait until Postfix delivered or bounced everything; TimeoutError says what is left."""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.queue()
            if not entries:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"queue not empty after {timeout}s: {json.dumps(entries, indent=1)}\n"
                    f"{self._log_tail()}"
                )
            time.sleep(0.2)

    def check(self, timeout: float = 60.0) -> str:
        """``postfix check``'s warnings (empty when none); AssertionError when it fails.

        Run under script(1) where there is one: postfix only says why
        ``check`` fails when its output is a terminal.
        """
        command = shlex.join(self._postfix("check"))
        script = shutil.which("script")
        argv = [script, "-qec", command, "/dev/null"] if script else self._postfix("check")
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        output = (proc.stdout + proc.stderr).replace("\r", "").strip()
        assert proc.returncode == 0, output
        return output

    # -- log ---------------------------------------------------------------------------

    def maillog(self) -> str:
        """Everything this instance has logged so far."""
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self, lines: int = 40) -> str:
        tail = self.maillog().splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.maillog_path} ---\n" + "\n".join(tail)

    def wait_for_log(self, regex: str | re.Pattern[str], timeout: float = 15.0) -> re.Match[str]:
        """First match of ``regex`` (MULTILINE) in the log; TimeoutError with the log tail."""
        pattern = re.compile(regex, re.MULTILINE) if isinstance(regex, str) else regex
        deadline = time.monotonic() + timeout
        while True:
            match = pattern.search(self.maillog())
            if match:
                return match
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{pattern.pattern!r} not in the log after {timeout}s\n{self._log_tail()}"
                )
            time.sleep(0.1)

    # -- mail --------------------------------------------------------------------------

    def send(
        self, sender: str, recipients: Sequence[str], message: bytes, timeout: float = 30.0
    ) -> dict[str, tuple[int, bytes]]:
        """Submit one message to this instance's smtpd; returns the refused recipients."""
        with smtplib.SMTP("127.0.0.1", self.port, "client.test", timeout) as client:
            return client.sendmail(sender, list(recipients), message)


# -- smtp-sink ---------------------------------------------------------------------------


class SinkMessage(NamedTuple):
    """One mail transaction smtp-sink received. ``data`` has LF line ends, dots unstuffed."""

    mail_from: str
    rcpt_to: list[str]
    data: bytes


def _address(args: str) -> str:
    """The address out of MAIL/RCPT arguments such as ``<a@b> SIZE=12 BODY=8BITMIME``."""
    args = args.strip()
    if args.startswith("<"):
        end = args.find(">")
        return args[1:end] if end != -1 else args[1:]
    return args.split(" ", 1)[0] if args else ""


def parse_sink_dump(raw: bytes) -> SinkMessage:
    """Parse one smtp-sink ``-d`` file.

    The file holds ``X-Client-Addr:``, ``X-Client-Proto:``, ``X-Helo-Args:``,
    ``X-Mail-Args:`` and one ``X-Rcpt-Args:`` per RCPT (raw arguments, ESMTP
    parameters included), then a three-line ``Received:`` header that smtp-sink
    adds, then the message data, then one empty line (what is left of the final
    CRLF.CRLF). smtp-sink drops every CR byte and the first dot of every line, so
    the data has LF line ends and is dot-unstuffed.
    """
    lines = raw.split(b"\n")
    mail_from = ""
    rcpt_to: list[str] = []
    index = 0
    while index < len(lines) and not lines[index].startswith(b"Received:"):
        name, _, value = lines[index].decode("utf-8", "replace").partition(":")
        if name == "X-Mail-Args":
            mail_from = _address(value)
        elif name == "X-Rcpt-Args":
            rcpt_to.append(_address(value))
        index += 1
    index += 1  # the Received: line, then its continuation lines
    while index < len(lines) and lines[index][:1] in (b" ", b"\t"):
        index += 1
    data = b"\n".join(lines[index:])
    if data.endswith(b"\n\n"):
        data = data[:-1]  # the empty line smtp-sink appends
    return SinkMessage(mail_from, rcpt_to, data)


class SmtpSink:
    """smtp-sink writing each received transaction to its own file under ``dump_dir``.

    With ``socket_path`` it listens on that unix socket (LMTP unless ``lmtp=False``);
    otherwise on a free 127.0.0.1 port (SMTP unless ``lmtp=True``). ``transport`` is
    the Postfix next hop to route to it. A context manager; kills the process on exit.
    """

    def __init__(
        self,
        dump_dir: Path,
        *,
        socket_path: Path | None = None,
        lmtp: bool | None = None,
        port: int | None = None,
        backlog: int = 64,
        extra_args: Sequence[str] = (),
        start_timeout: float = 10.0,
    ) -> None:
        self.dump_dir = Path(dump_dir).absolute()
        self.socket_path = Path(socket_path).absolute() if socket_path is not None else None
        self.lmtp = lmtp if lmtp is not None else socket_path is not None
        if self.socket_path is not None and len(str(self.socket_path)) > MAX_SOCKET_PATH:
            raise ValueError(f"unix socket path too long for the kernel: {self.socket_path}")
        self.port = None if self.socket_path is not None else (port or free_port())
        self.backlog = backlog
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """smtp-sink's listen address: ``unix:/path`` or ``127.0.0.1:port``."""
        if self.socket_path is not None:
            return f"unix:{self.socket_path}"
        return f"127.0.0.1:{self.port}"

    @property
    def transport(self) -> str:
        """The Postfix transport:nexthop that delivers to this sink."""
        protocol = "lmtp" if self.lmtp else "smtp"
        if self.socket_path is not None:
            return f"{protocol}:unix:{self.socket_path}"
        return f"{protocol}:[127.0.0.1]:{self.port}"

    def argv(self) -> list[str]:
        tool = require_tool("smtp-sink")
        argv = [tool, "-d", f"{self.dump_dir}/%Y%m%d%H/%M."]
        if self.lmtp:
            argv.append("-L")
        if os.geteuid() == 0:
            argv += ["-u", "root"]  # smtp-sink insists on -u when run as root
        return [*argv, *self.extra_args, self.address, str(self.backlog)]

    def start(self) -> None:
        """Start smtp-sink and wait until it accepts connections."""
        if self.process is not None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        if self.socket_path is not None:
            self.socket_path.parent.mkdir(parents=True, exist_ok=True)
            make_traversable(self.socket_path.parent)
            self.socket_path.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        if self.socket_path is not None:
            # Postfix's lmtp client runs as the postfix user and needs write access.
            self.socket_path.chmod(0o666)

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self.process.stdout.read() if self.process.stdout else b""
                raise RuntimeError(
                    f"smtp-sink exited with {self.process.returncode}: "
                    f"{output.decode(errors='replace')}"
                )
            try:
                if self.socket_path is not None:
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                        sock.settimeout(2)
                        sock.connect(str(self.socket_path))
                else:
                    socket.create_connection(("127.0.0.1", self.port or 0), timeout=2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"smtp-sink not listening on {self.address} after {self.start_timeout}s")

    def stop(self) -> None:
        """Kill smtp-sink (it has no clean shutdown) and reap it."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)

    def __enter__(self) -> SmtpSink:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _open_files(self) -> set[Path]:
        """Files smtp-sink has open: transactions still in progress (opened at MAIL)."""
        if self.process is None or self.process.poll() is not None:
            return set()
        fd_dir = Path(f"/proc/{self.process.pid}/fd")
        found = set()
        with contextlib.suppress(OSError):
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    found.add(Path(os.readlink(fd)))
        return found

    def dump_files(self) -> list[Path]:
        """Dump files of finished transactions, oldest first.

        smtp-sink creates the file at MAIL FROM and closes it at the final dot,
        before it replies, so a file it still holds open is skipped. The order
        is by modification time, whose clock ticks coarsely (milliseconds): files
        finished within one tick come in no defined order, so compare as sets.
        """
        busy = self._open_files()
        files = [p for p in self.dump_dir.rglob("*") if p.is_file() and p not in busy]
        return sorted(files, key=lambda path: (path.stat().st_mtime_ns, str(path)))

    def messages(self) -> list[SinkMessage]:
        """Every finished transaction as (mail_from, [rcpt_to, ...], data), oldest first."""
        return [parse_sink_dump(path.read_bytes()) for path in self.dump_files()]

    def wait_for_messages(self, count: int, timeout: float = 15.0) -> list[SinkMessage]:
        """Wait until at least ``count`` transactions were dumped, then return them all."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages()
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(f"smtp-sink got {len(found)} of {count} messages in {timeout}s")
            time.sleep(0.1)
