"""What a passed fd is, described while the proxy still holds it, so a capture says what travelled.

`describe_fd` reads /proc/self/fd/N (the kernel's name for the open file) and fstat; for a memfd it also asks
F_GET_SEALS, for a socket its type. It never raises: an fd it cannot read is described as "unknown".
"""
from __future__ import annotations

import fcntl
import os
import socket
import stat

from .model import FdInfo

F_GET_SEALS = 1034          # linux/fcntl.h: F_LINUX_SPECIFIC_BASE + 10

_SOCKET_TYPES = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "dgram", socket.SOCK_SEQPACKET: "seqpacket"}
_FAMILIES = {socket.AF_UNIX: "unix", socket.AF_INET: "inet", socket.AF_INET6: "inet6"}


def describe_fd(fd: int) -> FdInfo:
    """memfd (name, size, seals), eventfd, socket (family/type), pipe, userfaultfd, file (path), or anon/unknown."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
        status = os.fstat(fd)
    except OSError:
        return FdInfo("unknown")
    inode = status.st_ino
    if target.startswith("/memfd:"):
        name = target[len("/memfd:"):]
        if name.endswith(" (deleted)"):
            name = name[:-len(" (deleted)")]
        return FdInfo("memfd", inode, status.st_size, name, _seals(fd))
    if target.startswith("anon_inode:"):
        anon = target[len("anon_inode:"):].strip("[]")
        if anon == "eventfd":
            return FdInfo("eventfd", inode)
        if anon == "userfaultfd":
            return FdInfo("userfaultfd", inode)
        return FdInfo("anon", inode, name=anon)
    if target.startswith("socket:"):
        return FdInfo("socket", inode, name=_socket_name(fd))
    if target.startswith("pipe:") or stat.S_ISFIFO(status.st_mode):
        return FdInfo("pipe", inode)
    if stat.S_ISREG(status.st_mode) or stat.S_ISBLK(status.st_mode) or stat.S_ISCHR(status.st_mode):
        size = status.st_size if stat.S_ISREG(status.st_mode) else -1
        return FdInfo("file", inode, size, target)
    return FdInfo("unknown", inode, name=target)


def _seals(fd: int) -> int:
    try:
        return fcntl.fcntl(fd, F_GET_SEALS)
    except OSError:
        return 0


def _socket_name(fd: int) -> str:
    try:
        view = socket.socket(fileno=fd)
    except OSError:
        return ""
    try:
        family = _FAMILIES.get(view.family, str(int(view.family)))
        kind = _SOCKET_TYPES.get(view.type, str(int(view.type)))
        return f"{family}/{kind}"
    finally:
        view.detach()      # the fd is the caller's, not this view's

