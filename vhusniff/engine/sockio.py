"""The two socket operations vhost-user needs: send one message with its fds on its first byte, and receive a
chunk with whatever fds came with it."""
from __future__ import annotations

import array
import socket

# Room for far more fds than any peer sends (QEMU's limit is 16), so a flood is seen, not silently cut.
MAX_FDS_PER_RECV = 253
RECV_SIZE = 65536
ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_RECV * array.array("i").itemsize)


def send_some(sock: socket.socket, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> int:
    """One send: fds (if any) on its first byte. Returns how many bytes the kernel took."""
    if fds:
        return sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    return sock.send(data)


def send_message(sock: socket.socket, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send all of data; fds ride on the first byte only (the spec's rule), and the rest follows plainly."""
    sent = send_some(sock, data, fds)
    if sent < len(data):
        sock.sendall(data[sent:])


def receive_chunk(sock: socket.socket) -> tuple[bytes, list[int], bool]:
    """(bytes, fds, control truncated?) from one recvmsg; b"" means the peer closed its side."""
    data, ancillary, flags, _address = sock.recvmsg(RECV_SIZE, ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC)
    return data, received_fds(ancillary), bool(flags & socket.MSG_CTRUNC)


def received_fds(ancillary) -> list[int]:
    """The fds of recvmsg's ancillary data (SCM_RIGHTS), in order."""
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(payload[:len(payload) - len(payload) % received.itemsize])
            fds.extend(received)
    return fds
