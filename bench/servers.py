"""The servers under test: started fresh for every run, stopped, and asked what they delivered.

Each one listens on a unix socket in the run's own folder and is counted
in its own way once stopped (smtp-sink's counter, Dovecot's Maildir, the
count bare_lmtp.py prints, ``len()`` of postoffice's queue), so that a
server which answers 250 but loses mail does not count.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import drivers
from common import BENCH, QUEUE, BenchError
from procs import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    connectable,
    error_lines,
    find_tool,
    kill_group,
    process_tree,
    stop_process,
    tail,
    tree_cpu_seconds,
    unprivileged_user,
    wait_until,
)


class Server:
    """One server under test, started fresh in ``work`` for every run."""

    name = ""
    label = ""
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

    def _printed(self, text: bytes) -> bool:
        """Ready test of the servers that say on stdout when they listen."""
        return text in (self.work / "server.out").read_bytes()

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> int:
        """Stop the server; the number of messages it delivered."""
        raise NotImplementedError

    def cpu_seconds(self) -> tuple[float, float]:
        return tree_cpu_seconds(self.proc.pid) if self.proc else (0.0, 0.0)

    def kill(self) -> None:
        """Last resort after an error: nothing of ours may outlive the run."""
        if self.proc is not None:
            kill_group(self.proc)

    def output(self) -> str:
        return tail(self.work / "server.err") or tail(self.work / "server.out")


class SinkServer(Server):
    """``smtp-sink -L -c``: its running counter says how many messages it got."""

    name = "sink"
    label = "smtp-sink"
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
    label = "Dovecot LMTP"
    note = "Dovecot 2.3 LMTP into Maildir, mail_fsync = always"

    def start(self) -> None:
        dovecot = find_tool("dovecot")
        if dovecot is None or not Path("/usr/lib/dovecot/lmtp").exists():
            raise BenchError("Dovecot's LMTP server not found (Debian package dovecot-lmtpd)")
        mail = self.work / "mail"
        mail.mkdir()
        self.config = self.work / "dovecot.conf"
        self.config.write_text(self._config(mail))
        proc = self._spawn([dovecot, "-F", "-c", str(self.config)])
        wait_until(lambda: connectable(self.socket), START_TIMEOUT, "dovecot", proc)

    def _config(self, mail: Path) -> str:
        """Mail owned by ``nobody`` when we are root; else everything runs as us."""
        user = unprivileged_user()
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(mail, entry.pw_uid, entry.pw_gid)
            ids = f"uid={entry.pw_uid} gid={entry.pw_gid}"
            internal = ""
        else:
            me = pwd.getpwuid(os.getuid()).pw_name
            ids = f"uid={os.getuid()} gid={os.getgid()}"
            internal = f"default_internal_user = {me}\ndefault_login_user = {me}\n"
        return (
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
    label = "bare aiosmtpd"
    note = "aiosmtpd 1.4 LMTP, answers 250, stores nothing"

    def start(self) -> None:
        proc = self._spawn([sys.executable, str(BENCH / "bare_lmtp.py"), f"unix:{self.socket}"])
        wait_until(lambda: self._printed(b"listening on"), START_TIMEOUT, "bare_lmtp.py", proc)

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
    label = "postoffice"
    note = (
        "postoffice serve, file:// FileStorage with blobs, the default path "
        "(serve runs ZEO's server on the file in a thread and delivers as its client)"
    )
    max_size = "50m"
    share = True

    def __init__(self, work: Path, prefilled: Path | None = None) -> None:
        super().__init__(work)
        self.prefilled = prefilled
        self.config = work / "postoffice.ini"
        self.data_fs = work / "var" / "Data.fs"
        self.uri = f"file://{work}/var/Data.fs?blobstorage_dir={work}/var/blobs"
        self.printed = ""
        self.transactions = 0
        self.data_fs_bytes = 0
        # What serve logged when it stopped: its commits retried after a conflict.
        self.conflicts: int | None = None

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
        wait_until(lambda: self._printed(b"listening on"), START_TIMEOUT, "postoffice serve", proc)
        self.printed = (self.work / "server.out").read_text(errors="replace")

    def stop(self) -> int:
        assert self.proc is not None
        code = stop_process(self.proc)
        if code != 0:
            raise BenchError(f"postoffice serve exited with {code}: {self.output()}")
        self.conflicts = retried_line(self.work / "server.err")
        answer = self.count()
        self.transactions = int(answer["transactions"])
        self.data_fs_bytes = int(answer["data_fs_bytes"])
        return int(answer["count"])

    def count(self) -> dict[str, Any]:
        """What the depot holds, read by a worker once nobody else has it open."""
        return drivers.count(self.uri, self.data_fs)

    def consumer_uri(self) -> str | None:
        """The URI ``serve`` printed for consumers while it runs (none with ``share = no``)."""
        printed = re.search(r"consumers use (\S+)", self.printed)
        return printed.group(1) if printed else None

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
    label = "postoffice share=no"
    note = "postoffice serve with share = no: the FileStorage opened by serve itself"
    share = False


SHARED_CONFIG = """\
[post office]
zodb_uri = {uri}
max_message_size = 50m

[lmtp]
listen = unix:{socket}

[metrics]
listen = 127.0.0.1:{port}

[queue:{queue}]
filters =
    to_hostname: app.bench.example
"""


class SharedPostofficeServer(PostofficeServer):
    """``serve`` as one client of a storage server others share (a zeo:// or postgres:// URI).

    Nobody can count its depot for it (other serves write there too), so
    it is asked before it stops, at its ``[metrics]`` endpoint on
    loopback: the batches it committed and the recipients it accepted.
    """

    name = "po-shared"
    label = "postoffice (shared depot)"

    def __init__(self, work: Path, zodb_uri: str, metrics_port: int) -> None:
        super().__init__(work)
        self.uri = zodb_uri
        self.metrics_port = metrics_port
        self.accepted = 0

    def write_config(self) -> None:
        self.config.write_text(
            SHARED_CONFIG.format(
                uri=self.uri, socket=self.socket, port=self.metrics_port, queue=QUEUE
            )
        )

    def scrape(self) -> dict[str, float]:
        """The figures of its ``[metrics]`` endpoint, by sample name and labels."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=STOP_TIMEOUT) as answer:
                text = answer.read().decode()
        except OSError as exc:
            raise BenchError(f"scraping {url}: {exc}") from None
        found = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                found[name] = float(value)
        return found

    def stop(self) -> int:
        """Stop it; the recipients it accepted (its commits are in ``transactions``)."""
        assert self.proc is not None
        figures = self.scrape()
        self.transactions = int(figures.get("postoffice_commit_seconds_count", 0))
        self.accepted = int(
            figures.get(f'postoffice_deliveries_total{{queue="{QUEUE}",status="sent"}}', 0)
        )
        code = stop_process(self.proc)
        if code != 0:
            raise BenchError(f"postoffice serve exited with {code}: {self.output()}")
        self.conflicts = retried_line(self.work / "server.err")
        return self.accepted

    def errors_logged(self) -> list[str]:
        """Its ERROR lines: a healthy run logs none."""
        return error_lines(self.work / "server.err")


def retried_line(log: Path) -> int | None:
    """What serve logged when it stopped: its commits retried after a conflict."""
    retried = re.search(r"(\d+) commits retried after a conflict", log.read_text(errors="replace"))
    return int(retried.group(1)) if retried else None


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
    cls.name: cls
    for cls in (SinkServer, DovecotServer, BareServer, PostofficeServer, DirectPostofficeServer)
}
SERVER_LABELS = {name: cls.label for name, cls in SERVERS.items()}
# postoffice and its variant are "us"; the rest are the peers.
OURS = ("postoffice", "po-direct")


def create(kind: str, work: Path, prefilled: Path | None = None) -> Server:
    """A server of ``kind``; only ours can start on a pre-filled depot."""
    cls = SERVERS[kind]
    if issubclass(cls, PostofficeServer):
        return cls(work, prefilled)
    return cls(work)


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    """Started, and killed on the way out whatever happened, stopped or not."""
    try:
        server.start()
        yield server
    finally:
        server.kill()
