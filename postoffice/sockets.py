"""Unix sockets and listening addresses, written once for every server of ours.

The LMTP server and the embedded ZEO server both put a socket file next to
data that must not leak, both must tell a socket left by a server that
died (remove it) from one a live server answers on (leave it, refuse to
start), and both must never create a socket wider than its mode, not even
between ``bind()`` and ``chmod()``.  TCP listeners must stay on loopback
unless the administrator said otherwise, since LMTP (and Postfix's policy
protocol) has no authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from postoffice.config import ListenAddress, parse_listen
from postoffice.errors import ConfigError, ListenError

log = logging.getLogger("postoffice.sockets")

# sun_path holds 108 bytes on Linux, the terminating NUL included.
MAX_SOCKET_PATH = 107
LISTEN_BACKLOG = 128
# How long a probe waits for a server to accept before calling it busy.
PROBE_TIMEOUT = 2.0

# os.umask() is process-wide: threads that set it must take turns.
_umask_lock = threading.Lock()


class SocketState(enum.Enum):
    """What answers on a socket path."""

    ABSENT = "absent"
    ALIVE = "alive"
    STALE = "stale"  # a socket file nobody accepts on: a server died
    BUSY = "busy"  # a server is there but does not accept in time
    FORBIDDEN = "forbidden"
    NOT_A_SOCKET = "not a socket"
    UNKNOWN = "unknown"  # connect() failed otherwise; nothing is assumed


def too_long(path: Path) -> bool:
    """A path bind() would refuse (or silently cut, on some systems)."""
    return len(os.fsencode(str(path))) > MAX_SOCKET_PATH


def probe(
    path: Path,
    greet: Callable[[socket.socket], None] | None = None,
    timeout: float = PROBE_TIMEOUT,
) -> SocketState:
    """Connect to ``path`` and say what is there; ``greet`` talks to a live server.

    A server that logs a bare connect-and-close as an error (ZEO does) is
    sent something it answers (``greet``); what it says does not matter.
    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return SocketState.ABSENT
    except OSError:
        return SocketState.UNKNOWN
    if not stat.S_ISSOCK(mode):
        return SocketState.NOT_A_SOCKET
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except ConnectionRefusedError:
            return SocketState.STALE
        except FileNotFoundError:
            return SocketState.ABSENT
        except PermissionError:
            return SocketState.FORBIDDEN
        except TimeoutError:
            return SocketState.BUSY
        except OSError:
            return SocketState.UNKNOWN
        if greet is not None:
            with contextlib.suppress(OSError, ValueError):
                greet(sock)
    return SocketState.ALIVE


_REFUSALS = {
    SocketState.ALIVE: "another server answers on unix:{path}; not starting",
    SocketState.BUSY: "unix:{path} is busy (a server there does not accept in time); not starting",
    SocketState.FORBIDDEN: "{path} exists and may not be connected to; not touching it",
    SocketState.NOT_A_SOCKET: "{path} exists and is not a socket; not touching it",
    SocketState.UNKNOWN: "cannot check the existing socket {path}; not touching it",
}


def clear_stale(
    path: Path,
    greet: Callable[[socket.socket], None] | None = None,
    alive: str | None = None,
) -> None:
    """Remove a socket file nobody answers on; ListenError for anything else there.

    ``alive`` words the refusal when a server answers (the caller knows
    what that server is).
    """
    state = probe(path, greet)
    if state is SocketState.ABSENT:
        return
    if state is SocketState.STALE:
        log.info("removing stale socket %s (nothing answers on it)", path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    if state is SocketState.ALIVE and alive is not None:
        raise ListenError(alive)
    raise ListenError(_REFUSALS[state].format(path=path))


@contextlib.contextmanager
def umask_at_least(mask: int) -> Iterator[None]:
    """Files created in the block get none of ``mask``'s bits, whatever the umask was."""
    with _umask_lock:
        previous = os.umask(0o777)
        os.umask(previous | mask)
        try:
            yield
        finally:
            os.umask(previous)


def bind_unix(path: Path, mode: int, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """A listening unix socket with exactly ``mode``, never wider, not even for a moment.

    bind() creates the file with 0777 minus the umask, so it is created
    under a umask that leaves at most ``mode``, then chmod()ed to be sure.
    """
    if too_long(path):
        raise ListenError(f"socket path too long ({MAX_SOCKET_PATH} bytes at most): {path}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ListenError(f"cannot create {path.parent}: {exc}") from None
    clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with umask_at_least(0o777 & ~mode):
            sock.bind(str(path))
        os.chmod(path, mode)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from None
    return sock


def file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode): whether the socket file is still the one we made."""
    try:
        info = path.lstat()
    except OSError:
        return None
    return (info.st_dev, info.st_ino)


def remove_if_ours(path: Path, ours: tuple[int, int] | None) -> None:
    """Remove our socket at stop; another server may have started on the path since."""
    if ours is not None and file_id(path) == ours:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# What listens for each ini section, as a refusal names it.
_PROTOCOLS = {"lmtp": "LMTP", "policy": "Postfix's policy protocol"}


def check_loopback(address: ListenAddress, allow_remote: bool, section: str = "lmtp") -> None:
    """No authentication: TCP beyond loopback only with ``allow_remote = yes``.

    A name is resolved as the listening socket will resolve it
    (``AI_PASSIVE``, as asyncio's ``create_server`` does): without it, glibc
    reads ``*`` as loopback here, and then binds ``*`` to every interface.
    """
    if address.path is not None or allow_remote:
        return
    host = address.host or ""
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = socket.getaddrinfo(
                host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except OSError as exc:
            raise ConfigError(f"listen {address}: cannot resolve {host!r}: {exc}") from None
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not addresses or not all(a.is_loopback for a in addresses):
        protocol = _PROTOCOLS.get(section, section.upper())
        raise ConfigError(
            f"listen {address}: not a loopback address; {protocol} has no "
            f"authentication, set allow_remote = yes in [{section}] to listen there"
        )


def listen_address(text: str, allow_remote: bool, section: str) -> ListenAddress:
    """``text`` as an address to listen on, refused as configuration if unusable.

    A TCP address beyond loopback without ``allow_remote`` is refused here,
    before anything opens: neither LMTP nor the policy protocol has
    authentication.  ``section`` is the ini section the refusal names.
    """
    try:
        address = parse_listen(text)
    except ValueError as exc:
        raise ConfigError(f"listen {text!r}: {exc}") from None
    check_loopback(address, allow_remote, section)
    return address


@dataclass(frozen=True)
class Listening:
    """An asyncio server listening on an address, and the socket file it made.

    ``socket_id`` identifies our unix socket file, so that a stop removes
    it (:func:`remove_if_ours`) but never one another server put there since.
    """

    server: asyncio.AbstractServer
    listening_on: str
    socket_id: tuple[int, int] | None = None


async def start_listening(
    address: ListenAddress, mode: int, factory: Callable[[], asyncio.BaseProtocol]
) -> Listening:
    """Listen on ``address`` with ``factory``'s protocols, the way every server of ours does.

    A unix socket is born with ``mode`` (:func:`bind_unix`: a stale one is
    replaced, a live one refused); TCP reuses the address and takes the
    port the system gives for port 0.  ListenError when it cannot listen.
    """
    loop = asyncio.get_running_loop()
    if address.path is not None:
        sock = bind_unix(address.path, mode)
        socket_id = file_id(address.path)
        try:
            server = await loop.create_unix_server(factory, sock=sock)
        except BaseException:
            sock.close()
            remove_if_ours(address.path, socket_id)
            raise
        return Listening(server, str(address), socket_id)
    assert address.port is not None
    try:
        server = await loop.create_server(
            factory, address.host, address.port, reuse_address=True, backlog=LISTEN_BACKLOG
        )
    except OSError as exc:
        raise ListenError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    bound = server.sockets[0].getsockname()
    return Listening(server, str(ListenAddress(host=bound[0], port=bound[1])))
