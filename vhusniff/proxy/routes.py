"""Where a proxy listens and connects: routes, listening sockets that never take over a live one, and whether
anyone listens at a target's path."""
from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from ..engine.core import Side

FRONTEND, BACKEND = Side.FRONTEND.label, Side.BACKEND.label
# A connect to the target that fails with one of these means nobody listens there: the target is down.
TARGET_DOWN_ERRORS = (errno.ECONNREFUSED, errno.ENOENT)
# __SO_ACCEPTCON in /proc/net/unix's Flags column: the socket listens.
_ACCEPTING = 0x10000


class ProxyError(Exception):
    """The proxy cannot start (a socket path taken, a directory missing); the message says what to do."""


@dataclass(frozen=True)
class Route:
    """One listening socket and where its connections go."""
    listen: Path
    target: Path
    listener_role: str = FRONTEND     # who connects to `listen`: FRONTEND (forward) or BACKEND (reverse)
    device: str | None = None         # "blk", "net"... when known: noted so that decoding names device features

    @classmethod
    def forward(cls, listen, backend, device: str | None = None) -> Route:
        return cls(Path(listen), Path(backend), FRONTEND, device)

    @classmethod
    def reverse(cls, listen_backend, frontend, device: str | None = None) -> Route:
        return cls(Path(listen_backend), Path(frontend), BACKEND, device)

    @property
    def target_role(self) -> str:
        """Who is at `target`: the side that does not connect to `listen`."""
        return BACKEND if self.listener_role == FRONTEND else FRONTEND


def someone_listens(path: Path) -> bool | None:
    """Whether a process listens on the Unix socket at `path`: a non-blocking connect, closed at once (the
    listener sees a connection end without a message). False when refused or absent; None when it cannot tell."""
    try:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    except OSError:
        return None
    try:
        code = probe.connect_ex(str(path))
    except OSError:                # a path too long for a socket address
        return None
    finally:
        probe.close()
    if code in (0, errno.EAGAIN, errno.EINPROGRESS):     # EAGAIN: its backlog is full, but it listens
        return True
    return False if code in TARGET_DOWN_ERRORS else None


def listen_at(path: Path, mode: int) -> socket.socket:
    """A listening Unix socket at `path`, mode `mode`; only a stale socket (nobody listening) is replaced."""
    path = Path(path)
    try:
        status = path.lstat()
    except FileNotFoundError:
        status = None
    if status is not None:
        if not stat.S_ISSOCK(status.st_mode):
            raise ProxyError(f"{path} exists and is not a socket; not removing it (choose another path)")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink()          # stale: a socket file nobody listens on
        except OSError as error:
            raise ProxyError(f"{path}: cannot tell whether someone listens there ({error.strerror}); "
                             f"not removing it") from None
        else:
            raise ProxyError(f"{path}: another process is listening there; not removing it")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        os.chmod(path, mode)       # before listen(): nobody can connect in between
        listener.listen(64)
    except OSError as error:
        listener.close()
        raise ProxyError(f"cannot listen on {path}: {error.strerror or error}") from None
    listener.setblocking(False)
    return listener


def listening_in_table(path: Path, absent: bool | None = None) -> bool | None:
    """Whether a socket listens at `path`, by the kernel's table of Unix sockets, making no connection (QEMU
    would take a probe of its server socket as a vhost-user client). None when the table cannot be read; when no
    socket in it has that path, `absent` (None by default: the table names sockets by the path they were bound
    with, which may be spelled otherwise)."""
    try:
        table = Path("/proc/net/unix").read_text()
    except OSError:
        return None
    spellings = {str(path), os.path.abspath(path), os.path.realpath(path)}
    found = False
    for line in table.splitlines()[1:]:
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[7] in spellings:
            found = True
            if int(fields[3], 16) & _ACCEPTING:
                return True
    return False if found else absent


def socket_identity(path: Path) -> tuple[int, int, int] | None:
    """(device, inode, change time) of the socket file at `path`: a new bind makes a new file, with a new change
    time even where the file system hands it the dead one's inode number."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return (status.st_dev, status.st_ino, status.st_ctime_ns) if stat.S_ISSOCK(status.st_mode) else None
