"""The plain records that flow through vhusniff:
socket -> framer -> Record -> state/hooks -> forward -> capture -> views.

Nothing here knows about sockets or about the payload grammar; a Record holds exact bytes and fd descriptions.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple


class Channel(enum.IntEnum):
    """Which socket of a connection a message travelled on."""
    MAIN = 0            # the vhost-user socket itself: front-end requests, back-end replies
    BACKEND = 1         # the socket passed in SET_BACKEND_REQ_FD: back-end requests, front-end replies
    GPU = 2             # the socket passed in GPU_SET_SOCKET (vhost-user-gpu protocol)
    DEVICE_STATE = 3    # the pipe passed in SET_DEVICE_STATE_FD (opaque migration stream)


class Direction(enum.IntEnum):
    """Who sent the bytes, whatever the channel."""
    FRONTEND_TO_BACKEND = 0
    BACKEND_TO_FRONTEND = 1

    @property
    def arrow(self) -> str:
        return "F>B" if self is Direction.FRONTEND_TO_BACKEND else "B>F"


class RecordKind(enum.IntEnum):
    MESSAGE = 0         # one whole vhost-user message (or the unframeable rest of a stream, see note)
    EVENT = 1           # connection lifecycle or proxy finding: text in `note`, no message bytes


class EventKind(enum.IntEnum):
    """What an EVENT record says happened, as data; its note words it for a person (capture format 2)."""
    NOTE = 0            # anything else worth a line
    CONNECTED = 1       # a connection began: both sides reached
    CLOSED = 2          # the connection ended: a side closed or failed, a hook, the proxy stopping
    HALF_CLOSED = 3     # one side closed its sending half; the close was passed on to the other
    CHANNEL_OPENED = 4  # a side channel (back-end requests, GPU, device-state pipe) is relayed
    CHANNEL_CLOSED = 5  # a side channel ended; the connection goes on
    PROTOCOL_ERROR = 6  # an unframeable stream, fds where no message begins, too many fds, cut control data
    TARGET_DOWN = 7     # nobody listens at a route's target: the proxy stops listening too
    TARGET_UP = 8       # someone listens at the target again: the proxy listens again
    RESOURCE = 9        # back-pressure, out of fds, bytes a closed peer never took
    HOOK = 10           # what a hook did that is not a message of its own
    DEVICE = 11         # the connection's device type: the note is its name (blk, net, fs, gpu, ...)
    PEER = 12           # a real peer (lab, replay target) started, exited or crashed
    RING = 13           # a data-plane sample of one ring (vhusniff.dataplane.sample): packed in the record's data


class FdInfo(NamedTuple):
    """What an fd was, described when it passed, so a reader knows without holding it. (A named tuple, not a
    dataclass: the proxy builds one per passed fd, and a frozen dataclass costs three times as much.)"""
    kind: str                    # memfd | eventfd | socket | pipe | userfaultfd | file | anon | unknown
    inode: int = 0
    size: int = -1               # memfd/file size in bytes, -1 when not known
    name: str = ""               # memfd name, file path, socket type, anon-inode name, or eventfd-id:N
    seals: int = 0               # F_GET_SEALS bits for a memfd

    def summary(self) -> str:
        text = self.kind
        if self.kind == "eventfd" and self.name.startswith("eventfd-id:"):
            text = self.name         # `eventfd-id:5`: the kernel's number for it (all eventfds share one inode)
        elif self.name:
            text += f":{self.name}"
        if self.size >= 0:
            text += f" size={self.size}"
        if self.seals:
            text += f" seals={self.seals:#x}"
        return f"{text} ino={self.inode}"


@dataclass(slots=True)
class Record:
    """One captured thing: a message with its exact bytes and fds, or a lifecycle event."""
    timestamp_ns: int
    connection: int
    channel: Channel = Channel.MAIN
    direction: Direction = Direction.FRONTEND_TO_BACKEND
    data: bytes = b""
    fds: list[FdInfo] = field(default_factory=list)
    kind: RecordKind = RecordKind.MESSAGE
    note: str = ""               # event text, or why a message record is not a well-framed message
    event: EventKind = EventKind.NOTE     # for an EVENT record: what happened
    unframed: bool = False       # a MESSAGE record's bytes are not one well-framed message (an unframeable rest)
    device: str = ""             # a version-1 event's `device=NAME` (compat.migrate_v1_event); format 2 says it
                                 # with a DEVICE event instead
    source: str = ""             # where it was captured (host, proxy instance, route): its interface's description
                                 # (capture.pcapng.capture_source); a reader keys connections by source and number
    source_tag: int = 0          # the 24-bit tag of its source its pseudo-header carries (capture.pcapng.source_tag),
                                 # 0 when not told: what a reader that sees no interface keys connections by
