"""The load: smtp-source over LMTP, concurrent large messages, and the depot workers.

Everything that opens the depot (pre-filling, counting, consuming) runs
in ``bench/worker.py`` as a subprocess with a timeout, so that a hung
store cannot hang the run and the harness never holds a FileStorage
open while a server needs it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from common import BENCH, KIB, QUEUE, RECIPIENT, SENDER, BenchError
from procs import find_tool

# smtp-source must manage at least this many messages a second, or the run
# is cut off as hung (and reported as an error, not a number).
SLOWEST_RATE = 20.0


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


def smtp_sources(loads: Sequence[tuple[Path, int, int, str]], size: int) -> float:
    """``smtp-source`` runs at the same time, one per (socket, sessions, messages, helo).

    The wall seconds from the first start to the last finish: what the
    servers behind those sockets managed together.
    """
    start = time.perf_counter()
    with ThreadPoolExecutor(len(loads)) as pool:
        runs = [
            pool.submit(smtp_source, sock, sessions, size, messages, helo)
            for sock, sessions, messages, helo in loads
        ]
        for run in runs:
            run.result()
    return time.perf_counter() - start


def lmtp_reply(stream: BinaryIO) -> tuple[int, str]:
    """One (possibly multi-line) reply: its code and its last line."""
    while True:
        line = stream.readline()
        if not line:
            raise BenchError("the server closed the connection")
        if line[3:4] != b"-":
            return int(line[:3]), line.decode(errors="replace").strip()


def _open_data(sock: socket.socket, path: Path, number: int, size: int, helo: str) -> None:
    """Connect one session and take it into DATA, past the message's header."""
    sock.connect(str(path))
    stream = sock.makefile("rb")
    steps = [
        (None, 220),
        (f"LHLO {helo}", 250),
        (f"MAIL FROM:<{SENDER}> SIZE={size}", 250),
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
    sessions: list[socket.socket] = []
    try:
        for number in range(count):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sessions.append(sock)
            _open_data(sock, path, number, blocks * len(block), helo)
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


# --- bench/worker.py, for what needs the depot open ------------------------------------------


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


def prefill(config: Path, count: int, tag: str, timeout: float) -> dict[str, Any]:
    """Queue ``count`` messages, ledgered, through the depot as the server stores them."""
    return run_worker(["prefill", str(config), str(count), "--tag", tag], timeout)


def count(uri: str, data_fs: Path) -> dict[str, Any]:
    """Messages in the queue, and the transactions and bytes of its Data.fs."""
    return run_worker(["count", uri, QUEUE, "--data-fs", str(data_fs)], 300)


def consume(uri: str, count: int, timeout: float, per_commit: int | None = None) -> dict[str, Any]:
    """Pop and commit ``count`` messages (``per_commit`` pops to a commit, if given)."""
    batching = [] if per_commit is None else ["--per-commit", str(per_commit)]
    return run_worker(["consume", uri, QUEUE, str(count), *batching], timeout)


def start_drainers(
    uri: str, stop_file: Path, count: int, per_commit: int, limit: float
) -> list[subprocess.Popen[bytes]]:
    """``count`` consumers popping as mail arrives, once each says it is ready."""
    procs = [
        subprocess.Popen(
            [
                *(sys.executable, str(BENCH / "worker.py"), "drain", uri, QUEUE, str(stop_file)),
                *("--per-commit", str(per_commit), "--limit", str(limit)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(count)
    ]
    deadline = time.monotonic() + 60
    while len(list(stop_file.parent.glob(f"{stop_file.name}.ready-*"))) < count:
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            finish_drainers(procs, 5)
            raise BenchError("the consumers did not open the queue")
        time.sleep(0.05)
    return procs


def finish_drainers(procs: list[subprocess.Popen[bytes]], timeout: float) -> list[dict[str, Any]]:
    """What each consumer popped, once told to stop (the caller made the stop file)."""
    results: list[dict[str, Any]] = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise BenchError("a consumer did not finish") from None
        if proc.returncode != 0:
            raise BenchError(f"a consumer failed: {err.decode(errors='replace')[-500:]}")
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    return results


def queue_length(uri: str) -> int:
    """Messages waiting in the queue now, through ``uri``."""
    return int(run_worker(["count", uri, QUEUE], 120)["count"])


def commit_floor(uri: str, count: int, timeout: float) -> dict[str, Any]:
    """How fast the storage behind ``uri`` commits a change of one small object."""
    return run_worker(["commit-floor", uri, str(count)], timeout)


def inline_or_blob(config: Path, size: int, count: int, batch: int) -> dict[str, Any]:
    """Store cost of messages of ``size`` kept inline and kept in blobs, ``batch`` a commit."""
    return run_worker(
        ["inline-or-blob", str(config), str(size), str(count), "--batch", str(batch)], 300
    )
