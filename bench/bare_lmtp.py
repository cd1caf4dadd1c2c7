"""A bare aiosmtpd LMTP server that stores nothing: the Python ceiling.

It answers ``250`` for every recipient after the final dot and keeps only a
counter, so the benchmark can tell how much of postoffice's time is
aiosmtpd's protocol handling (its DATA loop reads line by line) and how
much is ours (rules, ZODB, the commit).  It is a peer in ``bench/run.py``,
not part of the package.

    python3 bench/bare_lmtp.py unix:/path/to/socket

Prints ``listening on unix:PATH`` once it accepts connections, and
``delivered N messages, M recipients`` when SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any

from aiosmtpd.lmtp import LMTP


class CountingHandler:
    """One ``250`` per recipient, as RFC 2033 wants; the message is thrown away."""

    def __init__(self) -> None:
        self.messages = 0
        self.recipients = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages += 1
        self.recipients += len(envelope.rcpt_tos)
        return "\r\n".join(f"250 2.0.0 <{rcpt}> Ok" for rcpt in envelope.rcpt_tos)


async def serve(path: str) -> CountingHandler:
    """Listen on the unix socket ``path`` until SIGTERM/SIGINT; return the counts."""
    handler = CountingHandler()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = await loop.create_unix_server(
        lambda: LMTP(handler, decode_data=False, enable_SMTPUTF8=True), path
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening on unix:{path}", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return handler


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].startswith("unix:"):
        print("usage: bare_lmtp.py unix:PATH", file=sys.stderr)
        return 64
    # aiosmtpd logs every command at INFO; that would be the benchmark.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    handler = asyncio.run(serve(argv[0][len("unix:") :]))
    print(f"delivered {handler.messages} messages, {handler.recipients} recipients", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
