"""Incremental framing: bytes in any chunking, plus SCM_RIGHTS fds, in; whole messages with their fds out.

Peers frame differently (QEMU writes header and payload at once; libvhost-user and DPDK send the header with
its fds, then the payload with a separate write), so messages are re-framed by the header's `size`, never by
read boundaries. Linux ends a recvmsg right after bytes that carried fds, so fds received with a chunk belong
to the message whose first byte is in that chunk.
"""
from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..model import Channel
from . import catalogue as cat
from .grammar import HEADER_SIZE, MAX_PAYLOAD_SIZE

_read_size = struct.Struct("<I").unpack_from
_NO_LIMITS: Mapping[int, int] = {}


class FramingError(Exception):
    """The stream cannot be framed any further; names the peer and the stream offset of the bad header."""

    def __init__(self, peer: str, offset: int, reason: str, message_number: int):
        self.peer, self.offset, self.reason, self.message_number = peer, offset, reason, message_number
        self.frames: list = []       # whole messages completed by the same chunk, before the bad header
        super().__init__(f"{peer}: message #{message_number} at stream offset {offset}: {reason}")


@dataclass
class Frame:
    """One whole message as it travelled: exact bytes and the fds that came with its first byte."""
    data: bytes
    fds: list[int] = field(default_factory=list)
    offset: int = 0              # stream offset of the message's first byte


@dataclass
class StrayFds:
    """fds that arrived with bytes in which no message begins (a peer bug); kept so nothing is lost."""
    fds: list[int]
    offset: int


class Framer:
    """Feed it what recvmsg returned; it yields Frames (and StrayFds) as they complete.

    After a FramingError the stream is unframeable; `take_rest()` hands back the unconsumed bytes so that a
    caller can still forward and record them exactly.

    max_payload bounds every message; request_limits raises it for some requests (the GPU socket's UPDATE).
    `for_channel` gives a framer with a channel's limits from the catalogue.
    """

    __slots__ = ("peer", "max_payload", "request_limits", "_buffer", "_buffer_offset", "_pending_fds",
                 "_pending_offset", "_messages", "_broken")

    def __init__(self, peer: str, max_payload: int = MAX_PAYLOAD_SIZE, request_limits: Mapping[int, int] = _NO_LIMITS):
        self.peer = peer
        self.max_payload = max_payload
        self.request_limits = request_limits
        self._buffer = bytearray()
        self._buffer_offset = 0        # stream offset of _buffer[0]
        self._pending_fds: list[int] = []     # fds received for the message that starts at _pending_offset
        self._pending_offset = -1
        self._messages = 0
        self._broken: FramingError | None = None

    @classmethod
    def for_channel(cls, peer: str, channel: Channel) -> Framer:
        """A framer with the limits of what a receiver on `channel` accepts."""
        return cls(peer, cat.max_payload(channel), cat.REQUEST_MAX_PAYLOAD.get(channel, _NO_LIMITS))

    def _limit(self, data, position: int) -> int:
        """The limit of the message whose header starts at `position`: its request's own, or max_payload."""
        if not self.request_limits:
            return self.max_payload
        return self.request_limits.get(_read_size(data, position)[0], self.max_payload)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def messages(self) -> int:
        return self._messages

    def take_whole(self, data: bytes) -> bool:
        """True, and counted as framed, if `data` is exactly one whole message starting on a message boundary
        with nothing buffered: the usual chunk, taken as it is without building a Frame. Else False, and
        nothing changes (give it to feed)."""
        if self._buffer or self._pending_fds or len(data) < HEADER_SIZE:
            return False
        size = _read_size(data, 8)[0]
        if HEADER_SIZE + size != len(data) or (size > self.max_payload and size > self._limit(data, 0)):
            return False
        self._messages += 1
        self._buffer_offset += len(data)
        return True

    def feed(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> list[Frame | StrayFds]:
        """Add one received chunk; return the messages it completes. Raises FramingError on an impossible size."""
        if self._broken is not None:
            raise self._broken
        chunk_start = self._buffer_offset + len(self._buffer)
        out: list[Frame | StrayFds] = []
        buffer = self._buffer
        if not buffer and len(data) >= HEADER_SIZE:
            # Fast path: the chunk starts on a message boundary; slice whole messages without copying to buffer.
            position = 0
            end = len(data)
            base = self._buffer_offset
            data = bytes(data)
            while end - position >= HEADER_SIZE:
                size = _read_size(data, position + 8)[0]
                if size > self.max_payload and size > self._limit(data, position):
                    self._buffer_offset = base + position
                    self._messages += len(out)
                    self._buffer += data[position:]
                    self._fail(size, out, self._limit(data, position))
                total = HEADER_SIZE + size
                if end - position < total:
                    break
                out.append(Frame(data[position:position + total], [], base + position))
                position += total
            self._messages += len(out)
            self._buffer_offset = base + position
            if self._pending_fds and out and out[0].offset == self._pending_offset:
                out[0].fds, self._pending_fds = self._pending_fds, []
            if position < end:
                buffer += data[position:]
        else:
            buffer += data
            while len(buffer) >= HEADER_SIZE:
                size = _read_size(buffer, 8)[0]
                if size > self.max_payload and size > self._limit(buffer, 0):
                    self._fail(size, out, self._limit(buffer, 0))
                total = HEADER_SIZE + size
                if len(buffer) < total:
                    break
                out.append(self._frame(bytes(buffer[:total])))
                del buffer[:total]
        if fds:
            self._attach(list(fds), chunk_start, out)
        return out

    def _frame(self, data: bytes) -> Frame:
        frame = Frame(data, [], self._buffer_offset)
        if self._pending_fds and self._pending_offset == self._buffer_offset:
            frame.fds, self._pending_fds = self._pending_fds, []
        self._messages += 1
        self._buffer_offset += len(data)
        return frame

    def _fail(self, size: int, completed: list, limit: int) -> None:
        self._broken = FramingError(
            self.peer, self._buffer_offset, f"payload size {size} exceeds the maximum {limit}", self._messages + 1)
        # The messages this chunk completed before the bad header are not lost: they ride on the error.
        self._broken.frames = completed
        raise self._broken

    def _attach(self, fds: list[int], chunk_start: int, frames: list) -> None:
        """The kernel ends a recvmsg right after the segment that carried fds, and glues earlier fd-less
        segments in front of it: so fds belong to the last message that begins in the chunk."""
        if self._buffer and self._buffer_offset >= chunk_start:
            self._pending_fds, self._pending_offset = self._pending_fds + fds, self._buffer_offset
            return
        for frame in reversed(frames):
            if isinstance(frame, Frame) and frame.offset >= chunk_start:
                frame.fds.extend(fds)
                return
        frames.append(StrayFds(fds, chunk_start))

    def take_rest(self) -> tuple[bytes, list[int]]:
        """The bytes not yet framed (a partial or unframeable message) and any fds still waiting for them."""
        rest, fds = bytes(self._buffer), self._pending_fds
        self._buffer_offset += len(self._buffer)
        self._buffer.clear()
        self._pending_fds = []
        return rest, fds
