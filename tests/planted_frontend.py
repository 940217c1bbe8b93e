"""A vhost-user front-end with two planted bugs, for the fuzzer's back-end role: `python3 planted_frontend.py SOCKET`.

It connects to SOCKET, plays the start of a vhost-user-blk handshake as QEMU does (GET_FEATURES,
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM), and exits with 0 when the replies were good. It
dies by SIGABRT, after an assertion's line on stderr naming the bug, on a reply it trusts where it should not:

1. a GET_FEATURES reply without VERSION_1, which it requires (it goes on as if the bit were there);
2. a GET_QUEUE_NUM reply above its 64 queues (it would index its queue array with it).

A reply it cannot take (the connection closed, a header that is not a reply to its request) is a refusal: exit 1.
Only the standard library, so that it starts quickly at every execution.
`python3 planted_frontend.py SOCKET RECEIVED` also appends every byte it receives to the file RECEIVED, so that a
test can check what went on the wire.
"""
from __future__ import annotations

import os
import socket
import struct
import sys

HEADER = struct.Struct("<III")
VERSION = 0x1
FLAG_REPLY = 0x4
GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM = 1, 15, 16, 17
VERSION_1 = 1 << 32
MAX_QUEUES = 64
PROTOCOL_FEATURES = 0x8F2B        # what QEMU 7.2 sets with qemu-storage-daemon (captures/qemu-blk-boot.pcapng)


def planted_bug(text: str, condition: str) -> None:
    """Die as a C assert() does: its message, then SIGABRT."""
    print(f"planted_frontend.py: planted bug: {text}: Assertion `{condition}' failed.", file=sys.stderr, flush=True)
    os.abort()


def refuse(text: str) -> None:
    print(f"planted_frontend.py: {text}", file=sys.stderr, flush=True)
    sys.exit(1)


class Peer:
    def __init__(self, sock: socket.socket, received: str | None):
        self.sock, self.received = sock, received

    def read(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                refuse(f"the back-end closed the connection ({len(data)} of {count} bytes read)")
            if self.received is not None:
                with open(self.received, "ab") as log:
                    log.write(chunk)
            data += chunk
        return data

    def ask(self, request: int) -> int:
        """Send `request`, read its reply (trusting the header's size, as a C front-end does): its u64."""
        self.sock.sendall(HEADER.pack(request, VERSION, 0))
        number, flags, size = HEADER.unpack(self.read(HEADER.size))
        payload = self.read(size)
        if number != request or not flags & FLAG_REPLY:
            refuse(f"reply {number} flags {flags:#x} to request {request}")
        if size != 8:
            refuse(f"reply {number} of {size} bytes, not 8")
        return int(struct.unpack("<Q", payload)[0])


def main(path: str, received: str | None = None) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    peer = Peer(sock, received)
    features = peer.ask(GET_FEATURES)
    if not features & VERSION_1:
        planted_bug(f"GET_FEATURES reply {features:#x} without VERSION_1 taken as it is", "features & VERSION_1")
    protocol_features = peer.ask(GET_PROTOCOL_FEATURES) & PROTOCOL_FEATURES
    sock.sendall(HEADER.pack(SET_PROTOCOL_FEATURES, VERSION, 8) + struct.pack("<Q", protocol_features))
    queues = peer.ask(GET_QUEUE_NUM)
    if queues > MAX_QUEUES:
        planted_bug(f"GET_QUEUE_NUM reply {queues} taken as it is", "queues <= 64")
    sock.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
