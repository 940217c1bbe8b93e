"""What a passed fd is, described while the proxy still holds it, so a capture says what travelled.

`describe_fd` reads fstat and, unless the file type settles it, /proc/self/fd/N (the kernel's name for the
open file); for a memfd it also asks F_GET_SEALS, for a socket its type, and for an eventfd its id. It never
raises: an fd it cannot read is described as "unknown".

Every eventfd shares one anonymous inode, so the inode cannot tell a ring's kick, call and err apart. The kernel
(5.13 and later) numbers each eventfd in /proc/self/fdinfo/N (`eventfd-id: 5`); the description keeps that line
as its name, `eventfd-id:5`, and an eventfd from an older kernel has no name.
"""
from __future__ import annotations

import fcntl
import os
import socket
import stat

from ..model import FdInfo

F_GET_SEALS = 1034          # linux/fcntl.h: F_LINUX_SPECIFIC_BASE + 10

_SOCKET_TYPES = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "dgram", socket.SOCK_SEQPACKET: "seqpacket"}
_FAMILIES = {socket.AF_UNIX: "unix", socket.AF_INET: "inet", socket.AF_INET6: "inet6"}


def describe_fd(fd: int) -> FdInfo:
    """memfd (name, size, seals), eventfd, socket (family/type), pipe, userfaultfd, file (path), or anon/unknown."""
    try:
        status = os.fstat(fd)
    except OSError:
        return FdInfo("unknown")
    inode = status.st_ino
    file_type = stat.S_IFMT(status.st_mode)
    # The file type settles sockets and pipes; the rest needs the kernel's name for the open file.
    if file_type == stat.S_IFSOCK:
        return FdInfo("socket", inode, name=_socket_name(fd))
    if file_type == stat.S_IFIFO:
        return FdInfo("pipe", inode)
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return FdInfo("unknown", inode)
    if target == "anon_inode:[eventfd]":
        return FdInfo("eventfd", inode, name=_eventfd_id(fd))
    if target.startswith("/memfd:"):
        name = target[len("/memfd:"):]
        if name.endswith(" (deleted)"):
            name = name[:-len(" (deleted)")]
        return FdInfo("memfd", inode, status.st_size, name, _seals(fd))
    if target.startswith("anon_inode:"):
        anon = target[len("anon_inode:"):].strip("[]")
        if anon == "userfaultfd":
            return FdInfo("userfaultfd", inode)
        return FdInfo("anon", inode, name=anon)
    if file_type in (stat.S_IFREG, stat.S_IFBLK, stat.S_IFCHR):
        return FdInfo("file", inode, status.st_size if file_type == stat.S_IFREG else -1, target)
    return FdInfo("unknown", inode, name=target)


EVENTFD_ID = b"eventfd-id:"      # the fdinfo line, and (without its blank) an eventfd description's name


def _eventfd_id(fd: int) -> str:
    """`eventfd-id:N` from the fd's fdinfo, or "" when the kernel does not say (before 5.13) or cannot be read."""
    try:
        info = os.open(f"/proc/self/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        text = os.read(info, 512)
    except OSError:
        return ""
    finally:
        os.close(info)
    start = text.find(EVENTFD_ID)
    if start < 0:
        return ""
    start += len(EVENTFD_ID)
    end = text.find(b"\n", start)
    number = text[start:end if end >= 0 else len(text)].strip()
    return "eventfd-id:" + number.decode() if number.isdigit() else ""


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

