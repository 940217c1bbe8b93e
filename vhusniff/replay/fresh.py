"""Fresh fds of each recorded kind, for a scripted peer to send in place of the recorded ones."""
from __future__ import annotations

import os
import socket
import struct

from ..model import FdInfo

PAGE = 4096
# Fd kinds that are not memory; every other recorded kind (memfd, file, anon, ...) is replayed as a memfd.
NOT_MAPPED = frozenset({"eventfd", "socket", "pipe"})
# A memfd recorded under this name is made at its recorded size even where a region claims more: how a fuzzer's
# reproducer keeps a memfd smaller than the region it is said to map.
SHORT_MEMFD = "vhusniff-short-memfd"
# An eventfd recorded under this name is made with its counter at the maximum, so that no one can signal it again:
# a write blocks, or fails with EAGAIN on a non-blocking fd. How a fuzzer hands a back-end a dead kick or call fd.
DEAD_EVENTFD = "vhusniff-dead-eventfd"
EVENTFD_MAX = 0xFFFFFFFFFFFFFFFE        # the largest value an eventfd's counter holds


class FreshFds:
    """Creates fds of the recorded kinds and keeps the replay's own ends (memory, sockets, pipes) open.

    `make` returns a new fd for the caller to send and close; one recorded object (same kind and inode, and for an
    eventfd the same kernel eventfd id: every eventfd shares one inode) maps to one fresh object, as it did in
    the recorded session. The replay's end of a socket pair waits in
    `take_our_end` for the driver that relays the channel it carries.
    """

    def __init__(self) -> None:
        self._objects: dict[tuple[str, int, str], int] = {}
        self._kept: list[int] = []
        self._our_ends: dict[int, socket.socket] = {}         # inode of the end we give away -> our end
        self.regions: list[tuple[int, int, int, int]] = []   # (uaddr, size, mmap_offset, memfd)

    def make(self, info: FdInfo, min_size: int = 0) -> int:
        if info.kind == "memfd" and info.name == SHORT_MEMFD:
            min_size = 0
        key = (info.kind, info.inode, info.name if info.kind == "eventfd" else "")
        if info.inode and key in self._objects:
            fd = self._objects[key]
            if info.kind not in NOT_MAPPED:
                _grow(fd, min_size)
            return os.dup(fd)
        fd = self._create(info, min_size)
        if info.inode:
            self._objects[key] = os.dup(fd)
        return fd

    def _create(self, info: FdInfo, min_size: int) -> int:
        if info.kind == "eventfd":
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            if info.name == DEAD_EVENTFD:
                os.eventfd_write(fd, EVENTFD_MAX)
            return fd
        if info.kind == "socket":
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self._our_ends[os.fstat(theirs.fileno()).st_ino] = ours
            return theirs.detach()
        if info.kind == "pipe":
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            self._kept.append(read_end)
            return write_end
        # Not in NOT_MAPPED (memfd, regular file, anything else a peer maps): shared memory, sparse, of the
        # recorded size.
        fd = os.memfd_create(info.name or "vhusniff-replay", os.MFD_CLOEXEC)
        os.ftruncate(fd, max(info.size, PAGE))
        _grow(fd, min_size)
        return fd

    def take_our_end(self, fd: int) -> socket.socket | None:
        """The replay's end of the socket pair whose other end `fd` is (None when fd is no such end)."""
        try:
            return self._our_ends.pop(os.fstat(fd).st_ino, None)
        except OSError:
            return None

    def remember_region(self, uaddr: int, size: int, mmap_offset: int, fd: int) -> None:
        self.regions.append((uaddr, size, mmap_offset, os.dup(fd)))

    def write_u16(self, uaddr: int, value: int) -> bool:
        """Write guest memory at a front-end address; False when no region holds it."""
        for base, size, mmap_offset, fd in self.regions:
            if base <= uaddr and uaddr + 2 <= base + size:
                try:
                    os.pwrite(fd, struct.pack("<H", value), uaddr - base + mmap_offset)
                except (OSError, OverflowError):     # a region no memfd can be (a fuzzed size or offset)
                    return False
                return True
        return False

    def close(self) -> None:
        for fd in self._kept + list(self._objects.values()) + [entry[3] for entry in self.regions]:
            os.close(fd)
        for ours in self._our_ends.values():
            ours.close()
        self._kept, self._objects, self.regions, self._our_ends = [], {}, [], {}


def _grow(fd: int, size: int) -> None:
    """Grow a memfd to the size a region claims, when the kernel allows that size (a recorded or fuzzed region
    may claim more than any file can hold: the memfd then stays as it is)."""
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
    except (OSError, OverflowError):
        pass
