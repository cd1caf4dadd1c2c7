"""A received message past ``SPOOL_THRESHOLD`` goes to a file that becomes its blob.

Both front doors (the LMTP session and ``postoffice-deliver``) hand the
octets they receive, in order, to a :class:`Spooler`.  Up to the threshold
they stay in memory and the message is plain ``bytes``, as before.  Past
it, everything goes to a file in the storage's blob temporary directory
(``storage.temporaryDirectory()``: the folder ZODB itself writes new blobs
to, on the filesystem of the blob folder), so a front door holds at most
the threshold of any message, whatever its size, and the file becomes the
stored blob with ``Blob.consumeFile``: a rename, no second copy.

A stored message starts with the three lines postoffice adds
(``message.added_headers``), which name the recipient and the arrival
time, known only when the depot decides.  So the file begins with *room*
for them: as many octets as those lines take for the envelope's first
recipient with an arrival time of the same number of digits as now
(``X-Postoffice-Date`` is whole seconds: ten digits until 2286).  When the
depot stores the message it writes the lines into that room
(:meth:`Spooled.blob_file`) and the file is the stored message.  A second
accepted recipient, or lines of another length (a clock that jumped by a
digit, a first line ending not yet seen when the room was made), get a copy
made by streaming, never the whole message in memory.

The room is written in place, and the file given to ZODB is a hard link
to the spool file, not the spool file itself: a commit that conflicts is
decided and stored again (``retry.committed``), and the next attempt
needs the file once more.  The front door removes the spool file after the
delivery, whatever became of it (:meth:`Spooled.remove`); ZODB removes the
link when its transaction aborts, or keeps the data as the committed blob.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from postoffice import clock
from postoffice.message import added_headers, line_ending

log = logging.getLogger("postoffice.spool")

# Octets a front door keeps in memory before it spools a message to a file.
SPOOL_THRESHOLD = 1024 * 1024
# Octets read or copied at a time from a spool file.
READ_CHUNK = 1024 * 1024
# Octets of the start of a message kept in memory, to name its Message-Id in
# the log (``deliver.LOG_HEAD`` is this value).
HEAD = 64 * 1024
PREFIX = "spool-"

_END_OF_HEADERS = re.compile(rb"\r?\n\r?\n|\r\r")
_links = itertools.count(1)


def room_for(sender: str, recipient: str, eol: bytes, now: float) -> int:
    """Octets of the lines postoffice adds, for this recipient and a time of now's digits."""
    return len(added_headers(sender, recipient, int(now), eol))


@dataclass
class Spooled:
    """A message in a spool file: ``start`` octets of room, then the ``size`` octets received."""

    path: str
    start: int
    size: int
    eol: bytes
    head: bytes  # the first HEAD octets, for the log
    _removed: bool = field(default=False, repr=False)

    def __len__(self) -> int:
        return self.size

    def chunks(self, chunk: int = READ_CHUNK) -> Iterator[bytes]:
        """The message as it was received, in pieces of ``chunk`` octets."""
        with open(self.path, "rb") as handle:
            handle.seek(self.start)
            while piece := handle.read(chunk):
                yield piece

    def read(self) -> bytes:
        """The whole message in memory: only where it must be (a storage without blobs)."""
        with open(self.path, "rb") as handle:
            handle.seek(self.start)
            return handle.read()

    def header_block(self) -> bytes:
        """The message up to and with the empty line that ends its headers.

        What the rules read of the headers; the body stays in the file.  A
        message that is all headers gives all of it (bounded by the size
        limit, like the message).
        """
        block = b""
        for piece in self.chunks(64 * 1024):
            searched = max(0, len(block) - 3)
            block += piece
            if block[:1] in (b"\r", b"\n"):
                return block[:2] if block.startswith(b"\r\n") else block[:1]
            end = _END_OF_HEADERS.search(block, searched)
            if end is not None:
                return block[: end.end()]
        return block

    def fits(self, lines: bytes) -> bool:
        """Whether the added lines fill the room exactly (the file can be stored as it is)."""
        return len(lines) == self.start

    def blob_file(self, lines: bytes, in_place: bool) -> str:
        """A file holding ``lines`` then the message, synced, for ``Blob.consumeFile``.

        ``in_place`` (when :meth:`fits`): the lines go into the room and the
        file is a hard link to the spool file.  Else, or where the filesystem
        has no hard links, a copy next to it, streamed.
        """
        if in_place and self.fits(lines):
            fd = os.open(self.path, os.O_WRONLY)
            try:
                os.pwrite(fd, lines, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            link = f"{self.path}.{next(_links)}"
            try:
                os.link(self.path, link)
                return link
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EXDEV):
                    raise
                log.debug("no hard link for %s (%s); copying it", self.path, exc)
        return self._copy(lines)

    def _copy(self, lines: bytes) -> str:
        fd, name = tempfile.mkstemp(prefix=PREFIX, suffix=".copy", dir=os.path.dirname(self.path))
        try:
            with open(fd, "wb") as target, open(self.path, "rb") as source:
                target.write(lines)
                source.seek(self.start)
                shutil.copyfileobj(source, target, READ_CHUNK)
                target.flush()
                os.fsync(target.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise
        return name

    def remove(self) -> None:
        """The spool file goes (a stored blob keeps its data through its own link)."""
        if self._removed:
            return
        self._removed = True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class Spooler:
    """The octets of one message as they arrive: in memory up to the threshold, then a file.

    ``directory`` is the storage's blob temporary directory (None when
    there is none: the system's, and ZODB copies where it cannot rename).
    ``eol`` is the line ending the front door expects (CRLF for LMTP, LF
    for a pipe), used for the room only until the message shows its own.
    Writing is plain file I/O into the page cache; :meth:`finish` syncs.
    """

    def __init__(
        self,
        directory: str | None,
        sender: str,
        recipient: str,
        eol: bytes,
        threshold: int = SPOOL_THRESHOLD,
    ) -> None:
        self._directory = directory
        self._sender = sender
        self._recipient = recipient
        self._eol = eol
        self._threshold = threshold
        self._memory: list[bytes] = []
        self._writer: _Writer | None = None
        # The message's own line ending, once its first line end was in memory.
        self._seen_eol: bytes | None = None
        self.size = 0
        self.head = b""

    @property
    def spooling(self) -> bool:
        """Whether the message went to a file."""
        return self._writer is not None

    def write(self, data: bytes) -> None:
        if not data:
            return
        if len(self.head) < HEAD:
            self.head += data[: HEAD - len(self.head)]
        self.size += len(data)
        if self._writer is not None:
            self._writer.write(data)
            return
        self._memory.append(data)
        if self.size > self._threshold:
            self._to_file()

    def _to_file(self) -> None:
        received = b"".join(self._memory)
        self._memory = []
        if b"\n" in received:
            self._seen_eol = line_ending(received)
        eol = self._seen_eol or self._eol
        room = room_for(self._sender, self._recipient, eol, clock.now())
        self._writer = _Writer(self._directory, room)
        self._writer.write(received)

    def finish(self) -> bytes | Spooled:
        """The message: bytes, or the synced spool file (blocking: call it off the event loop)."""
        if self._writer is None:
            data = b"".join(self._memory)
            self._memory = []
            return data
        writer, self._writer = self._writer, None
        try:
            path, start = writer.close()
        except BaseException:
            writer.abandon()
            raise
        eol = self._seen_eol
        if eol is None:  # no line end in the first threshold's octets: look in the file
            with open(path, "rb") as handle:
                handle.seek(start)
                eol = _line_ending_in(handle)
        return Spooled(path, start, self.size, eol, self.head)

    def abandon(self) -> None:
        """Nothing is kept: the message was refused, or the client went away."""
        self._memory = []
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.abandon()


def _line_ending_in(handle: BinaryIO) -> bytes:
    """``message.line_ending`` of a file, read in pieces up to its first LF."""
    before = b""
    offset = 0
    while piece := handle.read(64 * 1024):
        at = piece.find(b"\n")
        if at >= 0:
            if offset + at == 0:
                return b"\n"
            previous = piece[at - 1 : at] if at > 0 else before
            return b"\r\n" if previous == b"\r" else b"\n"
        before = piece[-1:]
        offset += len(piece)
    return b"\r\n"


class _Writer:
    """The spool file while it is written."""

    def __init__(self, directory: str | None, room: int) -> None:
        fd, self.path = tempfile.mkstemp(prefix=PREFIX, dir=directory)
        self.start = room
        try:
            self._handle = open(fd, "wb", buffering=READ_CHUNK)  # noqa: SIM115 (closed in close)
            self._handle.seek(room)
        except BaseException:
            os.close(fd)
            self.abandon()
            raise

    def write(self, data: bytes) -> None:
        self._handle.write(data)

    def close(self) -> tuple[str, int]:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        return self.path, self.start

    def abandon(self) -> None:
        with contextlib.suppress(Exception):
            self._handle.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
