"""Processes of the harness: finding the peers' tools, waiting on them, reading /proc.

A server under test is a process tree (Dovecot forks its lmtp processes,
``serve`` may run a ZEO child), so CPU and memory are summed over the
tree, and a server that will not stop is killed with its process group:
nothing started by a run may outlive it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from common import BenchError

START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0


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
    """A server is ready when its socket accepts, not when the socket file exists."""
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
    """Poll ``ready``, but give up as soon as the server has died or the time is up."""
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


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Last resort after an error: the process and everything it started, at once."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def tail(path: Path, lines: int = 5) -> str:
    """The last lines of a log, on one line: enough to say why a run failed."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])


def error_lines(path: Path) -> list[str]:
    """The lines a log wrote at ERROR: a healthy run writes none."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if " ERROR " in line]


def unprivileged_user() -> str | None:
    """The user smtp-sink and Dovecot's mail processes run as, when we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("nobody",):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise BenchError("running as root but there is no user 'nobody' to drop privileges to")
