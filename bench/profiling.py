"""py-spy on a running server, and what its raw stacks say, per thread and per function.

py-spy is attached from outside (``--pid``) rather than run as the
server's parent, so the server starts exactly as in the timed runs.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

# py-spy samples a second.
PROFILE_RATE = 250

# Frames every thread has below the work itself: left out of "by total".
ENTRY_POINTS = re.compile(
    r"Thread\.|_bootstrap|_run_code|_run_module|runners\.py|<module>|run_forever"
    r"|run_until_complete|cmd_serve|serve \(|main \("
)


@contextlib.contextmanager
def recording(spy: str, pid: int, raw: Path, err: Path, gil: bool) -> Iterator[None]:
    """py-spy records ``pid`` and its children into ``raw`` for as long as the block runs."""
    with err.open("wb") as errors:
        spy_proc = subprocess.Popen(
            [
                spy, "record", "--pid", str(pid), "--rate", str(PROFILE_RATE),
                "--format", "raw", "--threads", "--nonblocking", "--subprocesses",
                "--output", str(raw),
                *(["--gil"] if gil else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=errors,
            start_new_session=True,
        )  # fmt: skip
    try:
        yield
    finally:
        spy_proc.send_signal(signal.SIGINT)
        try:
            spy_proc.wait(60)
        except subprocess.TimeoutExpired:
            spy_proc.kill()
            spy_proc.wait(10)


def _count_stacks(text: str) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Samples per thread, per function on top of the stack (own), per function anywhere."""
    threads: dict[str, int] = {}
    own: dict[str, int] = {}
    total: dict[str, int] = {}
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
    return threads, own, total


def _top(counts: dict[str, int], everything: int, top: int) -> list[str]:
    return [
        f"  {100 * count / everything:5.1f}%  {frame}"
        for frame, count in sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    ]


def summarize_profile(raw: Path, seconds: float, rate: int, top: int = 20) -> str:
    """Per thread: how busy it was, and the functions holding its samples (own and total).

    py-spy's raw format is one record per distinct stack, ``process PID:
    "CMD";thread (TID): NAME;frame;frame;... COUNT``; idle samples (a thread waiting in
    select() or on a lock) are left out by py-spy, so a thread's samples
    over ``seconds * rate`` is how busy it was.  Frames are counted per
    function, without their line numbers.
    """
    threads, own, total = _count_stacks(raw.read_text(errors="replace"))
    possible = max(1.0, seconds * rate)
    everything = sum(threads.values()) or 1
    out = [f"busy per thread (share of the {seconds:.1f}s run in which it was sampled running):"]
    for thread, count in sorted(threads.items(), key=lambda kv: -kv[1]):
        out.append(f"  {100 * count / possible:5.1f}%  {thread}")
    out.append(f"top {top} functions by own samples (% of all samples):")
    out += _top(own, everything, top)
    out.append(f"top {top} functions by total samples, below the thread entry points:")
    out += _top({f: c for f, c in total.items() if not ENTRY_POINTS.search(f)}, everything, top)
    return "\n".join(out)
