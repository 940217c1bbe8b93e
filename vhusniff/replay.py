"""Replay a recorded session against a real peer, with fresh fds of the recorded kinds.

- `--as frontend`: play the front-end's requests against a real back-end, wait for each reply the recording
  has, and compare the replies with the recording field by field.
- `--as backend`: answer a real front-end (QEMU) from the recorded back-end replies.

Guest I/O is not in a capture (it lives in guest memory), so a replayed ring would not reach the positions the
recorded guest drove it to. The front-end replay therefore places each ring where the recorded session left it:
SET_VRING_BASE carries the base the recorded GET_VRING_BASE later reported, and the ring's avail and used
indexes in the replay's own memory are set to it, so the back-end sees a ring with nothing pending.
"""
from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

from . import catalogue as cat
from .framing import Frame, Framer, FramingError
from .model import Channel, Direction, FdInfo, Record, RecordKind
from .protocol import HEADER_SIZE, DecodeContext, Message, build_message, decode, iter_fields
from .session import ContextTracker
from .sockio import receive_chunk, send_message

F = cat.FrontendRequest
REPLY_TIMEOUT = 5.0


@dataclass
class Exchange:
    """A recorded front-end request and the back-end reply that answered it (if any)."""
    number: int                      # message number in the capture
    request: Record
    reply: Record | None = None
    reply_number: int = 0


def load_exchanges(records: list[Record], connection: int | None) -> tuple[int, list[Exchange]]:
    """The main-channel request/reply pairs of one connection (the first one with messages by default)."""
    numbered = [(n, r) for n, r in enumerate(records, 1) if r.kind == RecordKind.MESSAGE and r.channel == Channel.MAIN]
    if connection is None:
        if not numbered:
            raise ValueError("the capture holds no main-channel message")
        connection = numbered[0][1].connection
    exchanges: list[Exchange] = []
    waiting: list[Exchange] = []
    for number, record in numbered:
        if record.connection != connection:
            continue
        flags = struct.unpack_from("<I", record.data, 4)[0] if len(record.data) >= 8 else 0
        if record.direction == Direction.FRONTEND_TO_BACKEND and not flags & cat.FLAG_REPLY:
            exchange = Exchange(number, record)
            exchanges.append(exchange)
            waiting.append(exchange)
        elif flags & cat.FLAG_REPLY:
            # Replies answer the oldest unanswered request with the same request number (one outstanding per
            # channel in practice; matching by number also survives requests that got no reply).
            request = struct.unpack_from("<I", record.data)[0]
            for index, candidate in enumerate(waiting):
                if struct.unpack_from("<I", candidate.request.data)[0] == request:
                    candidate.reply, candidate.reply_number = record, number
                    del waiting[:index + 1]
                    break
    return connection, exchanges


class FreshFds:
    """Creates fds of the recorded kinds, and keeps the replay's own ends (memory, sockets) open."""

    def __init__(self):
        self.kept: list[int] = []
        self.memory: list[tuple[int, int, int, int]] = []   # (uaddr, size, mmap_offset, memfd)
        self.backend_sockets: list[socket.socket] = []

    def make(self, info: FdInfo) -> int:
        if info.kind == "eventfd":
            return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        if info.kind == "socket":
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self.backend_sockets.append(ours)
            return theirs.detach()
        if info.kind == "pipe":
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            self.kept.append(read_end)
            return write_end
        # memfd, regular file, and anything else that is mapped: shared memory of the recorded size.
        fd = os.memfd_create(info.name or "vhusniff-replay", os.MFD_CLOEXEC)
        os.ftruncate(fd, max(info.size, 4096))
        return fd

    def remember_region(self, uaddr: int, size: int, mmap_offset: int, fd: int) -> None:
        self.memory.append((uaddr, size, mmap_offset, os.dup(fd)))

    def write_u16(self, uaddr: int, value: int) -> bool:
        """Write guest memory at a front-end address; False when no region holds it."""
        for base, size, mmap_offset, fd in self.memory:
            if base <= uaddr < base + size:
                os.pwrite(fd, struct.pack("<H", value), uaddr - base + mmap_offset)
                return True
        return False

    def close(self) -> None:
        for fd in self.kept + [entry[3] for entry in self.memory]:
            os.close(fd)
        for sock in self.backend_sockets:
            sock.close()


def ring_positions(exchanges: list[Exchange]) -> dict[int, int]:
    """For each SET_VRING_BASE (by message number), the base its ring's next GET_VRING_BASE reported."""
    positions: dict[int, int] = {}
    open_start: dict[int, int] = {}
    for exchange in exchanges:
        message = decode(exchange.request.data)
        if message.kind is None:
            continue
        if message.request == F.SET_VRING_BASE:
            open_start[message.payload.index] = exchange.number
        elif message.request == F.GET_VRING_BASE and exchange.reply is not None:
            reply = decode(exchange.reply.data)
            start = open_start.pop(message.payload.index, None)
            if start is not None and reply.kind and reply.kind.startswith("vring_base"):
                positions[start] = reply.payload.num
    return positions


def field_diff(recorded: Message, replayed: Message) -> list[str]:
    """Field-by-field differences, as `name: recorded X, replayed Y`."""
    old, new = list(iter_fields(recorded)), list(iter_fields(replayed))
    lines = []
    for (name, value), (_new_name, new_value) in zip(old, new):
        if value != new_value:
            lines.append(f"{name}: recorded {value!r}, replayed {new_value!r}")
    if len(old) != len(new):
        lines.append(f"field count: recorded {len(old)}, replayed {len(new)}")
    return lines


class BackendChannelServer(threading.Thread):
    """Answers the back-end's requests on the replay's side-channel socket: an ack of 0 when one is due."""

    def __init__(self, sock: socket.socket, connection: int, record):
        super().__init__(daemon=True)
        self.sock, self.connection, self.record = sock, connection, record

    def run(self) -> None:
        framer = Framer(f"connection {self.connection} back-end channel")
        try:
            while True:
                data, fds, _truncated = receive_chunk(self.sock)
                if not data:
                    return
                for frame in framer.feed(data, fds):
                    if not isinstance(frame, Frame):
                        continue
                    for fd in frame.fds:
                        os.close(fd)
                    self.record(Channel.BACKEND, Direction.BACKEND_TO_FRONTEND, frame.data)
                    message = decode(frame.data, Channel.BACKEND)
                    spec = message.spec
                    if message.need_reply or (spec and spec.reply_rule is cat.ReplyRule.ALWAYS):
                        reply = build_message(Channel.BACKEND, message.request, {"ack": 0}, reply=True, kind="ack")
                        send_message(self.sock, reply)
                        self.record(Channel.BACKEND, Direction.FRONTEND_TO_BACKEND, reply)
        except (OSError, FramingError):
            return


@dataclass
class ReplayResult:
    replies_compared: int = 0
    divergences: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)


def replay_as_frontend(records: list[Record], backend_path: str, connection: int | None = None,
                       writer=None, out=sys.stdout, reply_timeout: float = REPLY_TIMEOUT) -> ReplayResult:
    """Play one recorded connection's front-end side against a real back-end and compare the replies."""
    connection, exchanges = load_exchanges(records, connection)
    positions = ring_positions(exchanges)
    result = ReplayResult()
    fresh = FreshFds()
    tracker = ContextTracker()
    pending_ring_position: dict[int, int] = {}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(backend_path)
    sock.settimeout(reply_timeout)
    replies = ReplyReader(sock, f"back-end {backend_path}")
    side_servers: list[BackendChannelServer] = []
    start = time.time_ns()

    def record(channel, direction, data, fds=()):
        if writer is not None:
            writer.write(Record(time.time_ns(), 0, channel, direction, data, list(fds)))

    try:
        for exchange in exchanges:
            data = exchange.request.data
            message = tracker.decode(exchange.request)
            fds = [fresh.make(info) for info in exchange.request.fds]
            data = _rewrite(message, data, exchange.number, positions, pending_ring_position, fresh)
            if message.kind and message.request in (F.ADD_MEM_REG, F.SET_MEM_TABLE):
                regions = message.payload.region
                for region, fd in zip(regions if isinstance(regions, list) else [regions], fds):
                    fresh.remember_region(region.userspace_addr, region.memory_size, region.mmap_offset, fd)
            send_message(sock, data, fds)
            record(Channel.MAIN, Direction.FRONTEND_TO_BACKEND, data, exchange.request.fds)
            for fd in fds:
                os.close(fd)
            for new_socket in fresh.backend_sockets[len(side_servers):]:
                server = BackendChannelServer(new_socket, connection,
                                              lambda ch, d, data: record(ch, d, data))
                server.start()
                side_servers.append(server)
            if exchange.reply is None:
                continue
            reply_frame = replies.next()
            if reply_frame is None:
                result.divergences.append(f"message #{exchange.number} {message.name}: no reply within "
                                          f"{reply_timeout:g} s (recorded reply #{exchange.reply_number})")
                break
            for fd in reply_frame.fds:
                os.close(fd)
            record(Channel.MAIN, Direction.BACKEND_TO_FRONTEND, reply_frame.data)
            recorded = tracker.decode(exchange.reply)
            replayed = decode(reply_frame.data, Channel.MAIN, recorded.context)
            result.replies_compared += 1
            differences = field_diff(recorded, replayed)
            line = f"#{exchange.number:<4} {message.name:<24} reply " + ("same" if not differences else "DIFFERS")
            result.log.append(line)
            print(line, file=out)
            for difference in differences:
                text = f"message #{exchange.number} {message.name} reply: {difference}"
                result.divergences.append(text)
                print("      " + difference, file=out)
    finally:
        sock.close()
        fresh.close()
    elapsed = (time.time_ns() - start) / 1e9
    print(f"replayed {len(exchanges)} requests of connection {connection}, compared {result.replies_compared} "
          f"replies in {elapsed:.2f} s: " + ("identical to the recording" if not result.divergences else
                                            f"{len(result.divergences)} divergences, first: "
                                            f"{result.divergences[0]}"), file=out)
    return result


def _rewrite(message: Message, data: bytes, number: int, positions: dict[int, int],
             pending: dict[int, int], fresh: FreshFds) -> bytes:
    """What must change for a replay: ring bases and the ring indexes in the replay's own memory."""
    if message.kind is None:
        return data
    if message.request == F.SET_VRING_BASE and number in positions:
        index = message.payload.index
        pending[index] = positions[number]
        return data[:HEADER_SIZE] + struct.pack("<II", index, positions[number])
    if message.request == F.SET_VRING_ADDR and message.payload.index in pending:
        position = pending.pop(message.payload.index)
        # avail ring: flags u16, idx u16; used ring: flags u16, idx u16.
        fresh.write_u16(message.payload.avail + 2, position)
        fresh.write_u16(message.payload.used + 2, position)
    return data


class ReplyReader:
    """Whole messages from a socket, one at a time, keeping any that arrived together for later."""

    def __init__(self, sock: socket.socket, peer: str):
        self.sock, self.framer, self.backlog = sock, Framer(peer), []

    def next(self) -> Frame | None:
        while not self.backlog:
            try:
                data, fds, _truncated = receive_chunk(self.sock)
            except OSError:  # includes the reply timeout
                return None
            if not data:
                return None
            self.backlog.extend(frame for frame in self.framer.feed(data, fds) if isinstance(frame, Frame))
        return self.backlog.pop(0)


def replay_as_backend(records: list[Record], listen_path: str, connection: int | None = None,
                      unknown_policy: str = "default", writer=None, out=sys.stdout, once: bool = True) -> int:
    """Answer a real front-end from the recorded replies. Returns 0 when every request found its answer."""
    connection, exchanges = load_exchanges(records, connection)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(listen_path):
        os.unlink(listen_path)
    listener.bind(listen_path)
    os.chmod(listen_path, 0o600)
    listener.listen(1)
    status = 0
    try:
        while True:
            peer, _ = listener.accept()
            status = _serve_front_end(peer, exchanges, unknown_policy, writer, out)
            peer.close()
            if once:
                return status
    finally:
        listener.close()
        os.unlink(listen_path)


def _serve_front_end(peer: socket.socket, exchanges: list[Exchange], unknown_policy: str, writer, out) -> int:
    framer = Framer("front-end")
    fresh = FreshFds()
    tracker = ContextTracker()
    cursor = 0
    served = 0

    def record(direction, data):
        if writer is not None:
            writer.write(Record(time.time_ns(), 0, Channel.MAIN, direction, data))

    try:
        while True:
            data, fds, _truncated = receive_chunk(peer)
            if not data:
                print(f"front-end closed the connection after {served} requests", file=out)
                return 0
            for frame in framer.feed(data, fds):
                if not isinstance(frame, Frame):
                    continue
                for fd in frame.fds:
                    os.close(fd)
                record(Direction.FRONTEND_TO_BACKEND, frame.data)
                message = tracker.decode(Record(0, 0, Channel.MAIN, Direction.FRONTEND_TO_BACKEND, frame.data))
                served += 1
                match = None
                for index in range(cursor, len(exchanges)):
                    if struct.unpack_from("<I", exchanges[index].request.data)[0] == message.request:
                        match, cursor = exchanges[index], index + 1
                        break
                reply, reply_fds = _answer(message, match, unknown_policy, fresh)
                if reply is None and match is None and unknown_policy == "fail":
                    print(f"request #{served} {message.name} is not in the recording: closing (policy fail)",
                          file=out)
                    return 1
                print(f"#{served:<4} {message.summary()[:70]:<70} -> " +
                      (decode(reply).summary() if reply else "(no reply)") +
                      ("" if match else "  [not in the recording]"), file=out)
                if reply is not None:
                    send_message(peer, reply, reply_fds)
                    record(Direction.BACKEND_TO_FRONTEND, reply)
                    for fd in reply_fds:
                        os.close(fd)
    except OSError as error:
        print(f"front-end connection ended: {error}", file=out)
        return 0
    finally:
        fresh.close()


def _answer(message: Message, match: Exchange | None, unknown_policy: str, fresh: FreshFds):
    """The reply for a live request: the recorded one, or an ack of 0 when one is due and none was recorded."""
    if match is not None and match.reply is not None:
        reply = match.reply.data
        spec = message.spec
        if message.need_reply or spec is None or spec.reply_rule is not cat.ReplyRule.ACK_IF_ASKED:
            return reply, [fresh.make(info) for info in match.reply.fds]
    spec = message.spec
    if message.need_reply or (spec and spec.reply_rule is cat.ReplyRule.ALWAYS):
        if match is None and unknown_policy == "fail":
            return None, []
        kind = "ack"
        if spec and spec.reply_kinds[0] not in ("ack", "empty"):
            kind = spec.reply_kinds[0]
        try:
            return build_message(Channel.MAIN, message.request, _default_payload(kind), reply=True, kind=kind), []
        except Exception:
            return build_message(Channel.MAIN, message.request, {"ack": 0}, reply=True, kind="ack"), []
    return None, []


def _default_payload(kind: str) -> dict:
    from .protocol import PAYLOADS
    structure = PAYLOADS[kind][0]
    return {sub.name: 0 for sub in structure.subcons if sub.name}


def main(argv: list[str] | None = None) -> int:
    from .capture import CaptureError, CaptureWriter, read_capture
    parser = argparse.ArgumentParser(prog="vhusniff replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("capture")
    parser.add_argument("--as", dest="role", choices=("frontend", "backend"), required=True)
    parser.add_argument("--backend", help="back-end socket to connect to (--as frontend)")
    parser.add_argument("--listen", help="socket to listen on for the front-end (--as backend)")
    parser.add_argument("--connection", type=int, help="which recorded connection (default: the first)")
    parser.add_argument("--unknown", choices=("default", "fail"), default="default",
                        help="--as backend: a request the recording lacks gets a default answer, or fails")
    parser.add_argument("-w", dest="write", help="capture the replayed session to this file")
    args = parser.parse_args(argv)
    try:
        records = list(read_capture(args.capture))
    except CaptureError as error:
        print(f"vhusniff replay: {error}", file=sys.stderr)
        return 2
    writer = CaptureWriter(args.write) if args.write else None
    try:
        if args.role == "frontend":
            if not args.backend:
                parser.error("--as frontend needs --backend SOCKET")
            result = replay_as_frontend(records, args.backend, args.connection, writer)
            return 0 if not result.divergences else 1
        if not args.listen:
            parser.error("--as backend needs --listen SOCKET")
        return replay_as_backend(records, args.listen, args.connection, args.unknown, writer)
    finally:
        if writer is not None:
            writer.close()
