"""Kick and call eventfds relayed through eventfds of the proxy's, so that each notification is counted.

SET_VRING_KICK: the front-end writes its eventfd, the back-end reads it. The back-end is given a fresh eventfd
of the proxy's instead; the proxy reads the front-end's (when it becomes readable), counts, and writes the same
count into its own. SET_VRING_CALL is the same the other way round: the back-end writes the proxy's eventfd,
the proxy counts and writes the front-end's. An eventfd's value is the number of writes since the last read,
so nothing is lost when several notifications arrive before the proxy reads.
"""
from __future__ import annotations

import os

RELAYED_MAX = 1 << 32      # the most one relay passes on at once


class NotificationRelay:
    """One interposed kick or call eventfd of one ring. `given` is the fd to pass on (the caller sends and
    closes it); `source` is what the proxy watches; `pump()` moves what arrived and returns the count."""

    __slots__ = ("ring", "kind", "source", "sink", "given", "count")

    def __init__(self, ring: int, kind: str, original: int):
        """`original` is the fd the front-end passed (not taken over: it is duplicated)."""
        if kind not in ("kick", "call"):
            raise ValueError(f"kind must be 'kick' or 'call', not {kind!r}")
        self.ring = ring
        self.kind = kind
        theirs = os.dup(original)
        try:
            ours = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:
            os.close(theirs)
            raise
        try:
            self.given = os.dup(ours)
        except OSError:
            os.close(theirs)
            os.close(ours)
            raise
        # The front-end's fd keeps its flags (they are shared with the front-end): it is read only when epoll
        # says it is readable, and the proxy is its only reader, so a read never blocks.
        # kick: the front-end writes `theirs`, the proxy writes `ours`; call: the back-end writes `ours`.
        self.source, self.sink = (theirs, ours) if kind == "kick" else (ours, theirs)
        self.count = 0

    def pump(self) -> int:
        """Read what arrived on the source (0 when nothing did), pass the same count on to the sink."""
        try:
            value = os.eventfd_read(self.source)
        except BlockingIOError:
            return 0
        try:
            # At most RELAYED_MAX at once: a peer's huge value must not fill a blocking sink's counter (its write
            # would block the proxy); its reader is woken all the same.
            os.eventfd_write(self.sink, min(value, RELAYED_MAX))
        except BlockingIOError:
            pass       # the counter is at its maximum: the reader is woken anyway
        self.count += value
        return value

    def close(self) -> None:
        for fd in (self.source, self.sink):
            if fd >= 0:
                os.close(fd)
        self.source = self.sink = -1
