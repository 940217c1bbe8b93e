"""Incremental framing: bytes in any chunking, plus SCM_RIGHTS fds, in; whole messages with their fds out.

Peers frame differently (QEMU writes header and payload at once; libvhost-user and DPDK send the header with
its fds, then the payload with a separate write), so messages are re-framed by the header's `size`, never by
read boundaries. Linux ends a recvmsg right after bytes that carried fds, so fds received with a chunk belong
to the message whose first byte is in that chunk.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .protocol import HEADER_SIZE, MAX_PAYLOAD_SIZE

_read_size = struct.Struct("<I").unpack_from


class FramingError(Exception):
    """The stream cannot be framed any further; names the peer and the stream offset of the bad header."""

    def __init__(self, peer: str, offset: int, reason: str, message_number: int):
        self.peer, self.offset, self.reason, self.message_number = peer, offset, reason, message_number
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
    """

    __slots__ = ("peer", "max_payload", "_buffer", "_buffer_offset", "_pending_fds", "_messages", "_broken")

    def __init__(self, peer: str, max_payload: int = MAX_PAYLOAD_SIZE):
        self.peer = peer
        self.max_payload = max_payload
        self._buffer = bytearray()
        self._buffer_offset = 0        # stream offset of _buffer[0]
        self._pending_fds: list[int] = []
        self._messages = 0
        self._broken: FramingError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def messages(self) -> int:
        return self._messages

    def feed(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> list[Frame | StrayFds]:
        """Add one received chunk; return the messages it completes. Raises FramingError on an impossible size."""
        if self._broken is not None:
            raise self._broken
        out: list[Frame | StrayFds] = []
        buffer = self._buffer
        if fds:
            if buffer:
                # No message begins in this chunk's first byte: a message is already under way.
                out.append(StrayFds(list(fds), self._buffer_offset + len(buffer)))
            else:
                self._pending_fds = list(fds)
        if not buffer and len(data) >= HEADER_SIZE:
            # Fast path: the chunk starts on a message boundary; slice whole messages without copying to buffer.
            position = 0
            end = len(data)
            while end - position >= HEADER_SIZE:
                size = _read_size(data, position + 8)[0]
                if size > self.max_payload:
                    self._buffer += data[position:]
                    self._fail(size)
                total = HEADER_SIZE + size
                if end - position < total:
                    break
                out.append(Frame(bytes(data[position:position + total]), self._take_fds(), self._buffer_offset))
                self._buffer_offset += total
                position += total
            if position < end:
                buffer += data[position:]
            return out
        buffer += data
        while len(buffer) >= HEADER_SIZE:
            size = _read_size(buffer, 8)[0]
            if size > self.max_payload:
                self._fail(size)
            total = HEADER_SIZE + size
            if len(buffer) < total:
                break
            out.append(Frame(bytes(buffer[:total]), self._take_fds(), self._buffer_offset))
            del buffer[:total]
            self._buffer_offset += total
        return out

    def _take_fds(self) -> list[int]:
        self._messages += 1
        fds, self._pending_fds = self._pending_fds, []
        return fds

    def _fail(self, size: int) -> None:
        self._broken = FramingError(
            self.peer, self._buffer_offset,
            f"payload size {size} exceeds the maximum {self.max_payload}", self._messages + 1)
        raise self._broken

    def take_rest(self) -> tuple[bytes, list[int]]:
        """The bytes not yet framed (a partial or unframeable message) and any fds still waiting for them."""
        rest, fds = bytes(self._buffer), self._pending_fds
        self._buffer_offset += len(self._buffer)
        self._buffer.clear()
        self._pending_fds = []
        return rest, fds
