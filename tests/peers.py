"""Shared helpers for tests that run real vhost-user peers (or, for faults real peers cannot make, a fake one).

Outside CI a test skips when its program is missing; in CI (CI=true) it fails instead, so that a broken
install cannot pass as a green run. Import what you need:

    from peers import require, kit, qemu10, FakeBackend, FakeFrontend, open_fds
"""
from __future__ import annotations

import os
import shutil
import socket
import struct
import threading

import pytest

from vhusniff.engine.sockio import receive_chunk, send_message
from vhusniff.lab import peers as lab
from vhusniff.protocol.framing import Frame, Framer

IN_CI = os.environ.get("CI", "").lower() == "true"
_HEADER = struct.Struct("<III")
REPLY_FLAGS = 0x5
# Requests a fake back-end answers even without NEED_REPLY (a subset of the spec's "always" replies).
ALWAYS_REPLY = {1, 15, 17, 36, 40}


def require(*programs: str) -> None:
    for program in programs:
        if shutil.which(program) is None and not IN_CI:
            pytest.skip(f"{program} not installed (run .ci/install-deps.sh)")


@pytest.fixture(scope="session")
def kit() -> lab.GuestKit:
    require("qemu-system-x86_64")
    return lab.prepare()


@pytest.fixture(scope="session")
def qemu10() -> lab.QemuProgram:
    """QEMU 10 unpacked from bookworm-backports (.ci/install-deps.sh fetches it; fetching needs root)."""
    if not (lab.qemu10_dir() / "root/usr/bin/qemu-system-x86_64").is_file() and os.geteuid() != 0 and not IN_CI:
        pytest.skip("QEMU 10 not unpacked (run .ci/install-deps.sh)")
    return lab.qemu10()


def open_fds() -> set[int]:
    """The fds this process holds now (compare before/after to find leaks)."""
    return {int(name) for name in os.listdir("/proc/self/fd")}


def message(request: int, payload: bytes = b"", flags: int = 0x1) -> bytes:
    return _HEADER.pack(request, flags, len(payload)) + payload


class FakeBackend:
    """A listening vhost-user back-end in a thread: answers GET_* and NEED_REPLY with a u64, keeps what it got.

    `frames` holds every message received (all connections, in order), `fd_kinds` the fds' targets; fds it
    receives are closed. `channel_sockets` holds side-channel sockets passed in SET_BACKEND_REQ_FD or GPU_SET_SOCKET.
    SET_DEVICE_STATE_FD (42) is answered with u64 0x100 (ok, no fd) and its pipe end kept in `state_fds` for the
    test to write/read and close; with return_state_fd, the back-end answers 0 with the end of a pipe of its own
    (read end for save, write end for load), closes the one it got and keeps its other end in `state_fds`.
    With listening=False the socket is only bound (connects are refused) until `listen()`; `close_connections()`
    drops the clients and keeps listening, `close()` drops both, as a dying process would.
    """

    def __init__(self, path, reply_value: int = 42, return_state_fd: bool = False, listening: bool = True):
        self.path = str(path)
        self.reply_value = reply_value
        self.return_state_fd = return_state_fd
        self.state_fds: list[int] = []
        self.frames: list[Frame] = []
        self.fd_targets: list[str] = []
        self.channel_sockets: list[socket.socket] = []
        self.connections = 0
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        self._threads: list[threading.Thread] = []
        self._clients: list[socket.socket] = []
        self._closing = False
        self._accepter = threading.Thread(target=self._accept_loop, daemon=True)
        if listening:
            self.listen()

    def listen(self) -> None:
        """Start listening on the socket bound at construction (the same socket file, the same inode)."""
        self._server.listen(128)
        self._accepter.start()

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            self._clients.append(client)
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            thread.start()
            self._threads.append(thread)       # started first: close() may join it from another thread

    def _serve(self, client: socket.socket) -> None:
        framer = Framer("fake back-end", max_payload=1 << 30)
        try:
            while True:
                data, fds, _ = receive_chunk(client)
                if not data:
                    return
                for frame in framer.feed(data, fds):
                    if not isinstance(frame, Frame):
                        continue
                    self.frames.append(frame)
                    request, flags, _size = _HEADER.unpack_from(frame.data)
                    if request == 42:
                        self._device_state(client, frame)
                        continue
                    for fd in frame.fds:
                        try:
                            self.fd_targets.append(os.readlink(f"/proc/self/fd/{fd}"))
                        except OSError:
                            self.fd_targets.append("?")
                        if request in (21, 33) and len(frame.fds) == 1:   # SET_BACKEND_REQ_FD, GPU_SET_SOCKET
                            self.channel_sockets.append(socket.socket(fileno=fd))
                        else:
                            os.close(fd)
                    if request in ALWAYS_REPLY or flags & 0x8:
                        client.sendall(_HEADER.pack(request, REPLY_FLAGS, 8) + struct.pack("<Q", self.reply_value))
        except Exception:      # the connection went away (OSError) or the test sent garbage: stop serving it
            return
        finally:
            client.close()

    def _device_state(self, client: socket.socket, frame: Frame) -> None:
        for fd in frame.fds:
            self.fd_targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        if not self.return_state_fd:
            self.state_fds.extend(frame.fds)
            client.sendall(_HEADER.pack(42, REPLY_FLAGS, 8) + struct.pack("<Q", 0x100))
            return
        for fd in frame.fds:
            os.close(fd)
        read_end, write_end = os.pipe()
        saving = struct.unpack_from("<I", frame.data, 12)[0] == 0
        given, kept = (read_end, write_end) if saving else (write_end, read_end)
        self.state_fds.append(kept)
        send_message(client, _HEADER.pack(42, REPLY_FLAGS, 8) + struct.pack("<Q", 0), [given])
        os.close(given)

    def close_connections(self) -> None:
        """Drop every client connection (each sees EOF); the listener stays."""
        for client in list(self._clients):
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in list(self._threads):
            thread.join(2)

    def close(self) -> None:
        self._closing = True
        try:
            # Wakes the accepting thread and stops listening now: a blocked accept() would keep the socket alive.
            self._server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._server.close()
        self.close_connections()
        for sock in self.channel_sockets:
            sock.close()
        for fd in self.state_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.state_fds.clear()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FakeFrontend:
    """A front-end connection to a proxy's listening socket, with framed request/reply helpers."""

    def __init__(self, path, timeout: float = 5.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.framer = Framer("fake front-end", max_payload=1 << 30)
        self.backlog: list[Frame] = []

    def send(self, data: bytes, fds=()) -> None:
        send_message(self.sock, data, list(fds))

    def receive(self) -> Frame:
        while not self.backlog:
            data, fds, _ = receive_chunk(self.sock)
            if not data:
                raise EOFError("proxy closed the connection")
            self.backlog.extend(f for f in self.framer.feed(data, fds) if isinstance(f, Frame))
        return self.backlog.pop(0)

    def ask(self, request: int, payload: bytes = b"") -> int:
        """Send a request that always has a reply; return the reply's u64."""
        self.send(message(request, payload))
        reply = self.receive()
        for fd in reply.fds:
            os.close(fd)
        return struct.unpack_from("<Q", reply.data, 12)[0]

    def close(self) -> None:
        self.sock.close()
