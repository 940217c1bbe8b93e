"""A vhost-user-blk back-end with three planted bugs, for the fuzzer's tests: `python3 planted_backend.py SOCKET`.

It serves one front-end connection after another on SOCKET, answers what the protocol requires (the values a
real qemu-storage-daemon gives), and dies by SIGABRT, after an assertion's line on stderr naming the bug, on:

1. a field value: SET_VRING_NUM with a ring size above virtio's 32768;
2. a state: GET_VRING_BASE for a ring that is not running (no SET_VRING_KICK since it was last stopped);
3. an fd-size mismatch: a SET_MEM_TABLE/ADD_MEM_REG region larger than its memfd (in C, touching the end of
   the region would be a SIGBUS).

Anything else it cannot frame or decode ends that connection, as a careful back-end refuses, never the process.
`python3 planted_backend.py SOCKET RECEIVED` also appends every byte it receives to the file RECEIVED, so that a
test can check what went on the wire.
"""
from __future__ import annotations

import os
import socket
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))     # run as a script from anywhere

from vhusniff.engine.sockio import receive_chunk, send_message  # noqa: E402
from vhusniff.model import Channel, Direction, Record  # noqa: E402
from vhusniff.protocol import catalogue as cat  # noqa: E402
from vhusniff.protocol.context import ContextTracker  # noqa: E402
from vhusniff.protocol.framing import Frame, Framer  # noqa: E402
from vhusniff.protocol.grammar import Message, build_message  # noqa: E402
from vhusniff.protocol.replies import reply_required  # noqa: E402
from vhusniff.replay.recording import default_answer, regions  # noqa: E402

F = cat.FrontendRequest
MAX_RING_SIZE = 32768
# What qemu-storage-daemon 7.2 answers (captures/qemu-blk-boot.pcapng).
VALUES = {F.GET_FEATURES: 0x175007E46, F.GET_PROTOCOL_FEATURES: 0x8F2B, F.GET_QUEUE_NUM: 1,
          F.GET_MAX_MEM_SLOTS: 32}


def planted_bug(text: str, condition: str) -> None:
    """Die as a C assert() does: its message, then SIGABRT."""
    print(f"planted_backend.py: planted bug: {text}: Assertion `{condition}' failed.", file=sys.stderr, flush=True)
    os.abort()


class Connection:
    def __init__(self, client: socket.socket):
        self.client = client
        self.tracker = ContextTracker("blk")
        self.running: set[int] = set()

    def handle(self, frame: Frame) -> None:
        """Answer one message."""
        record = Record(0, 1, Channel.MAIN, Direction.FRONTEND_TO_BACKEND, frame.data)
        message = self.tracker.decode_message(record)
        try:
            self.check(message, frame.fds)
            reply = self.answer(message)
        finally:
            for fd in frame.fds:
                os.close(fd)
        if reply is not None:
            send_message(self.client, reply, [])

    def check(self, message: Message, fds: list[int]) -> None:
        if message.kind is None:
            return
        if message.request == F.SET_VRING_NUM and message.payload.num > MAX_RING_SIZE:
            planted_bug(f"SET_VRING_NUM ring size {message.payload.num} taken as it is", "num <= 32768")
        if message.request == F.SET_VRING_KICK:
            self.running.add(message.payload.index)
        if message.request == F.GET_VRING_BASE:
            if message.payload.index not in self.running:
                planted_bug(f"GET_VRING_BASE stopped ring {message.payload.index}, which was not running",
                            "ring->running")
            self.running.discard(message.payload.index)
        for region, fd in zip(regions(message), fds, strict=False):
            if os.fstat(fd).st_size < region.mmap_offset + region.memory_size:
                planted_bug(f"memory region of {region.memory_size:#x} bytes mapped from a memfd of "
                            f"{os.fstat(fd).st_size:#x}", "region->mmap_offset + region->size <= fd_size")

    def answer(self, message: Message) -> bytes | None:
        context = self.tracker.context_for(1)
        if not reply_required(message, context):
            return None
        value = VALUES.get(message.request)
        if value is not None and not message.need_reply:
            return build_message(Channel.MAIN, message.request, struct.pack("<Q", value), reply=True)
        return default_answer(message, context)


def serve(client: socket.socket, received: str | None = None) -> None:
    connection, framer = Connection(client), Framer("planted back-end")
    with client:
        while True:
            try:
                data, fds, _truncated = receive_chunk(client)
            except OSError:
                return
            if not data:
                return
            if received is not None:
                with open(received, "ab") as log:
                    log.write(data)
            try:
                for frame in framer.feed(data, fds):
                    if not isinstance(frame, Frame):
                        return              # fds where no message begins: refuse the connection
                    connection.handle(frame)
            except Exception:      # unframeable, undecodable, or the peer went: refuse, as a careful back-end does
                return


def main(path: str, received: str | None = None) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    while True:
        client, _address = server.accept()
        serve(client, received)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
