"""A vhost-user echo back-end for many connections at once: one thread, one epoll; every whole message gets a
20-byte reply (its request number, flags REPLY, u64 42). fds that come with a message are closed.

    python3 benchmarks/echo_backend.py SOCKET      # prints "ready" once listening; runs until killed

It raises its own soft open-file limit to the hard one, so that it can hold as many connections as a test or
benchmark opens. Used by benchmarks/bench_soak.py and the proxy's fd-budget tests.
"""
import os
import resource
import select
import socket
import struct
import sys

HEADER = struct.Struct("<III")


def serve(path: str) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4096)
    server.setblocking(False)
    poller = select.epoll()
    poller.register(server.fileno(), select.EPOLLIN)
    clients: dict[int, tuple[socket.socket, bytearray, bytearray]] = {}   # socket, unread, unsent
    print("ready", flush=True)
    while True:
        for fd, mask in poller.poll():
            if fd == server.fileno():
                while True:
                    try:
                        client, _ = server.accept()
                    except BlockingIOError:
                        break
                    client.setblocking(False)
                    clients[client.fileno()] = (client, bytearray(), bytearray())
                    poller.register(client.fileno(), select.EPOLLIN)
                continue
            client, pending, unsent = clients[fd]
            if mask & select.EPOLLOUT:
                _flush(poller, client, unsent)
                if not mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    continue
            try:
                data, ancillary, _flags, _ = client.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
            except BlockingIOError:
                continue
            except OSError:
                data, ancillary = b"", []
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    for (passed,) in struct.iter_unpack("i", payload[:len(payload) - len(payload) % 4]):
                        os.close(passed)
            if not data:
                poller.unregister(fd)
                client.close()
                del clients[fd]
                continue
            pending += data
            while len(pending) >= 12:
                request, _flags, size = HEADER.unpack_from(pending)
                if len(pending) < 12 + size:
                    break
                del pending[:12 + size]
                unsent += HEADER.pack(request, 5, 8) + struct.pack("<Q", 42)
            _flush(poller, client, unsent)


def _flush(poller, client: socket.socket, unsent: bytearray) -> None:
    """Send what the kernel takes; keep the rest (never drop a reply) and wait until it can take more."""
    try:
        while unsent:
            del unsent[:client.send(unsent)]
    except BlockingIOError:
        pass
    except OSError:
        unsent.clear()
    try:
        poller.modify(client.fileno(), select.EPOLLIN | (select.EPOLLOUT if unsent else 0))
    except OSError:
        pass

if __name__ == "__main__":
    serve(sys.argv[1])
