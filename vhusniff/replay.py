"""Replay a recorded session against a real peer, with fresh fds of the recorded kinds.

- `--as frontend CAPTURE --backend SOCK`: play the front-end's requests against a real back-end, wait for each
  reply the recording has (or the protocol requires), compare the replies with the recording field by field.
  Exit 0 when the reply stream is identical to the recording, 1 at a divergence (the first is named).
- `--as backend CAPTURE --listen SOCK`: answer a real front-end (QEMU) from the recorded back-end replies; a
  request the recording lacks gets a default answer (`--unknown default`, `--default-reply N`) or ends the
  session (`--unknown fail`, exit 1). The recorded back-end-channel requests (CONFIG_CHANGE_MSG, IOTLB_MSG,
  VRING_HOST_NOTIFIER_MSG, ...) go out on the socket the front-end passed in SET_BACKEND_REQ_FD, each right
  after the main-channel message recorded before it; the front-end's replies are awaited (without holding up
  the main channel), recorded and compared with the recorded ones.

Each recorded fd becomes a fresh one of its kind (memfd of the recorded size, eventfd, socket pair, pipe); fds
that were one object in the recording (same inode) are one object in the replay. Memory addresses stay as
recorded: a back-end only uses them as keys into the region table it is sent, and that table now describes
memory the replay owns.

Guest I/O is not in a capture (it lives in guest memory), so a replayed ring would not reach the positions the
recorded guest drove it to. The front-end replay therefore places each ring where the recorded session left it:
SET_VRING_BASE carries the base the recorded GET_VRING_BASE later reported, and the ring's avail and used
indexes in the replay's own memory are set to it, so the back-end sees a ring with nothing pending.

Hooks (`--hook`, `--mask-protocol-features`, ...: the proxy's options) see every message the replay sends and
receives, on both channels; the replayed session, hooks applied, is written with `-w` as a capture that
`vhusniff diff` compares and that notes the recording's device type (`device=blk`), so that readers name the
device's feature bits as they do in the recording. A hook's injected message goes where it makes sense for the
role, whichever channel the hook saw: as the front-end, requests on the main channel (once no other request
waits there for its reply; the back-end's reply is recorded and reported, not compared) and replies on the
back-end channel; as the back-end, replies on the main channel and requests on the back-end channel. Others are reported, naming message and channel, and
skipped; the fds passed with an injected message are closed once it is sent or skipped. A hook's delay holds
its message, on either channel and in either role.
"""
from __future__ import annotations

import argparse
import os
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

from . import catalogue as cat
from .analysis import Expect, expectation
from .diff import field_differences
from .fds import describe_fd
from .framing import Frame, Framer, FramingError
from .hooks import Flow, HookChain
from .model import Channel, Direction, FdInfo, Record, RecordKind
from .protocol import HEADER_SIZE, PAYLOADS, DecodeContext, Message, build_message, decode
from .session import ContextTracker
from .sockio import receive_chunk, send_message

F = cat.FrontendRequest
REPLY_TIMEOUT = 5.0
CONNECTION = 1                 # a replay has one connection; captures number them from 1
PAGE = 4096
# Fd kinds that are not memory; every other recorded kind (memfd, file, anon, ...) is replayed as a memfd.
NOT_MAPPED = frozenset({"eventfd", "socket", "pipe"})


def reply_required(message: Message, ctx: DecodeContext) -> bool:
    """Whether the protocol obliges the receiver of this request to answer (the analyzer's rules)."""
    return expectation(message, ctx.protocol_features, ctx.profile) in (Expect.REPLY, Expect.ACK)


@dataclass
class Exchange:
    """A recorded front-end request and the back-end reply that answered it (if any)."""
    number: int                      # record number in the capture, from 1
    request: Record
    reply: Record | None = None
    reply_number: int = 0


def _request_number(data: bytes) -> int:
    return struct.unpack_from("<I", data)[0] if len(data) >= 4 else -1


def _flags(data: bytes) -> int:
    return struct.unpack_from("<I", data, 4)[0] if len(data) >= 8 else 0


def load_exchanges(records: list[Record], connection: int | None) -> tuple[int, list[Exchange]]:
    """The main-channel request/reply pairs of one connection (the first one with messages by default).

    Unlike analysis.Analyzer, which matches a reply to the request in flight and reports what went wrong, this
    pairs by request number, passing over requests that got no reply: replay only needs, for each recorded
    request, the reply to send or expect."""
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
        flags = _flags(record.data)
        if record.direction == Direction.FRONTEND_TO_BACKEND and not flags & cat.FLAG_REPLY:
            exchange = Exchange(number, record)
            exchanges.append(exchange)
            waiting.append(exchange)
        elif record.direction == Direction.BACKEND_TO_FRONTEND and flags & cat.FLAG_REPLY:
            _pair_reply(waiting, record, number)
    if not exchanges:
        raise ValueError(f"connection {connection} holds no front-end request")
    return connection, exchanges


def _pair_reply(waiting: list, record: Record, number: int) -> None:
    """One request is outstanding per channel, so a reply answers the oldest unanswered request with its
    number; requests before that one got no reply."""
    request = _request_number(record.data)
    for index, candidate in enumerate(waiting):
        if _request_number(candidate.request.data) == request:
            candidate.reply, candidate.reply_number = record, number
            del waiting[:index + 1]
            return


@dataclass
class BackendExchange:
    """A recorded back-end request (back-end channel, back-end to front-end), the front-end's reply if any, and
    where it came in the main channel's sequence: `after` = (index of an exchange, 0 = after its request,
    1 = after its reply), the last main-channel message recorded before it; (-1, 1) when there was none."""
    number: int
    request: Record
    reply: Record | None = None
    reply_number: int = 0
    after: tuple[int, int] = (-1, 1)


def load_backend_requests(records: list[Record], connection: int,
                          exchanges: list[Exchange]) -> list[BackendExchange]:
    """The back-end-channel requests of one connection, in recorded order, each with the front-end's reply and
    its place after a main-channel message of `exchanges` (load_exchanges' pairs of the same connection)."""
    places: dict[int, tuple[int, int]] = {}
    for index, exchange in enumerate(exchanges):
        places[exchange.number] = (index, 0)
        if exchange.reply is not None:
            places[exchange.reply_number] = (index, 1)
    requests: list[BackendExchange] = []
    waiting: list[BackendExchange] = []
    after = (-1, 1)
    for number, record in enumerate(records, 1):
        if record.kind != RecordKind.MESSAGE or record.connection != connection:
            continue
        if record.channel == Channel.MAIN:
            after = places.get(number, after)
            continue
        if record.channel != Channel.BACKEND:
            continue
        flags = _flags(record.data)
        if record.direction == Direction.BACKEND_TO_FRONTEND and not flags & cat.FLAG_REPLY:
            request = BackendExchange(number, record, after=after)
            requests.append(request)
            waiting.append(request)
        elif record.direction == Direction.FRONTEND_TO_BACKEND and flags & cat.FLAG_REPLY:
            _pair_reply(waiting, record, number)
    return requests


class FreshFds:
    """Creates fds of the recorded kinds and keeps the replay's own ends (memory, sockets, pipes) open.

    `make` returns a new fd for the caller to send and close; one recorded object (same kind and inode) maps
    to one fresh object, as it did in the recorded session.
    """

    def __init__(self, on_backend_socket=None):
        self._objects: dict[tuple[str, int], int] = {}
        self._kept: list[int] = []
        self.regions: list[tuple[int, int, int, int]] = []   # (uaddr, size, mmap_offset, memfd)
        self.on_backend_socket = on_backend_socket

    def make(self, info: FdInfo, min_size: int = 0) -> int:
        key = (info.kind, info.inode)
        if info.inode and key in self._objects:
            fd = self._objects[key]
            if info.kind not in NOT_MAPPED and os.fstat(fd).st_size < min_size:
                os.ftruncate(fd, min_size)
            return os.dup(fd)
        fd = self._create(info, min_size)
        if info.inode:
            self._objects[key] = os.dup(fd)
        return fd

    def _create(self, info: FdInfo, min_size: int) -> int:
        if info.kind == "eventfd":
            return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        if info.kind == "socket":
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            if self.on_backend_socket is not None:
                self.on_backend_socket(ours)
            else:
                self._kept.append(ours.detach())
            return theirs.detach()
        if info.kind == "pipe":
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            self._kept.append(read_end)
            return write_end
        # Not in NOT_MAPPED (memfd, regular file, anything else a peer maps): shared memory, sparse, of the
        # recorded size.
        fd = os.memfd_create(info.name or "vhusniff-replay", os.MFD_CLOEXEC)
        os.ftruncate(fd, max(info.size, min_size, PAGE))
        return fd

    def remember_region(self, uaddr: int, size: int, mmap_offset: int, fd: int) -> None:
        self.regions.append((uaddr, size, mmap_offset, os.dup(fd)))

    def write_u16(self, uaddr: int, value: int) -> bool:
        """Write guest memory at a front-end address; False when no region holds it."""
        for base, size, mmap_offset, fd in self.regions:
            if base <= uaddr and uaddr + 2 <= base + size:
                os.pwrite(fd, struct.pack("<H", value), uaddr - base + mmap_offset)
                return True
        return False

    def close(self) -> None:
        for fd in self._kept + list(self._objects.values()) + [entry[3] for entry in self.regions]:
            os.close(fd)
        self._kept, self._objects, self.regions = [], {}, []


def _regions(message: Message) -> list:
    if message.kind is None or message.request not in (F.ADD_MEM_REG, F.SET_MEM_TABLE):
        return []
    regions = message.payload.region
    return list(regions) if isinstance(regions, list) else [regions]


def ring_positions(exchanges: list[Exchange]) -> dict[int, int]:
    """For each SET_VRING_BASE (by record number), the base its ring's next GET_VRING_BASE reported."""
    positions: dict[int, int] = {}
    open_start: dict[int, int] = {}
    tracker = ContextTracker()
    for exchange in exchanges:
        message = tracker.decode(exchange.request)
        if message.kind is None:
            continue
        if message.request == F.SET_VRING_BASE:
            open_start[message.payload.index] = exchange.number
        elif message.request == F.GET_VRING_BASE and exchange.reply is not None:
            reply = decode(exchange.reply.data, Channel.MAIN, message.context)
            start = open_start.pop(message.payload.index, None)
            if start is not None and reply.kind and reply.kind.startswith("vring_base"):
                positions[start] = reply.payload.num
    return positions


class Recorder:
    """The replay's own capture: every message it sent or received, hooks applied, plus events; `report` also
    says an event on the replay's output."""

    def __init__(self, writer, out=sys.stdout):
        self.writer, self.out = writer, out
        self.lock = threading.Lock()

    def message(self, channel: Channel, direction: Direction, data: bytes, fds: list[FdInfo] = (),
                note: str = "") -> None:
        if self.writer is not None:
            with self.lock:
                self.writer.write(Record(time.time_ns(), CONNECTION, channel, direction, data, list(fds),
                                         note=note))

    def event(self, text: str) -> None:
        if self.writer is not None:
            with self.lock:
                self.writer.write(Record(time.time_ns(), CONNECTION, kind=RecordKind.EVENT, note=text))

    def report(self, text: str, indent: str = "") -> None:
        self.event(text)
        _say(self.out, indent + text)


class MessageCounter:
    """Message numbers of the replayed connection, all channels, from 1 (what Flow.number means)."""

    def __init__(self):
        self.value = 0
        self.lock = threading.Lock()

    def next(self) -> int:
        with self.lock:
            self.value += 1
            return self.value


class SessionEnd(Exception):
    """A hook disconnected the session (the reason is the message)."""


def _injection_fits(injected, sender: Direction) -> bool:
    """Whether a hook's injected message is one the replay, speaking as `sender`, can send: a front-end sends
    requests on the main channel and replies on the back-end channel, a back-end the other way round."""
    if injected.direction != sender or injected.channel not in (Channel.MAIN, Channel.BACKEND):
        return False
    is_reply = bool(_flags(injected.data) & cat.FLAG_REPLY)
    from_requester = (injected.channel == Channel.MAIN) == (sender == Direction.FRONTEND_TO_BACKEND)
    return is_reply != from_requester


def _skip_injection(injected, sender: Direction, context: DecodeContext, recorder: Recorder) -> None:
    """Report and skip a hook's injected message the replay's role cannot send, naming message and channel."""
    _close_all(injected.fds)
    role, wants = (("front-end", "requests on the main channel, replies on the back-end channel")
                   if sender == Direction.FRONTEND_TO_BACKEND else
                   ("back-end", "replies on the main channel, requests on the back-end channel"))
    channel = "back-end" if injected.channel == Channel.BACKEND else injected.channel.name.lower()
    text = (f"a hook injected {decode(injected.data, injected.channel, context).summary()[:60]} on the "
            f"{channel} channel {injected.direction.arrow}: {role} replay sends only what a {role} sends "
            f"({sender.arrow}: {wants}); skipped")
    recorder.report(text)


class MainChannel:
    """The front-end replay's main channel, shared by the replay loop and the back-end-channel threads.

    As with a real front-end, one request is outstanding at a time: whoever sends a request holds the channel
    (`turn`) until its reply is in. A request a hook injects (from either thread) therefore goes once the
    channel is free; the back-end's reply to it is run through the hooks, recorded and reported, not compared
    with the recording. A hook's disconnect from a back-end-channel thread ends the session (`end`)."""

    def __init__(self, sock: socket.socket, replies: "ReplyReader", recorder: Recorder, chain: HookChain,
                 counter: MessageCounter, tracker: ContextTracker, out, diverge, reply_timeout: float):
        self.sock, self.replies, self.recorder, self.chain = sock, replies, recorder, chain
        self.counter, self.tracker, self.out, self.diverge = counter, tracker, out, diverge
        self.reply_timeout = reply_timeout
        self.turn = threading.Lock()
        self.ended = ""                               # why a hook ended the session, from another thread
        self.side: list[BackendChannelServer] = []    # the back-end channel servers, newest last

    def context(self) -> DecodeContext:
        return self.tracker.context_for(CONNECTION)

    def send(self, data: bytes, fds: list[int], note: str = "") -> None:
        """Send and record a request (the caller holds the turn); the fds are closed. OSError: not sent."""
        infos = [describe_fd(fd) for fd in fds]
        try:
            if self.ended:
                raise OSError(f"the session was ended: {self.ended}")
            send_message(self.sock, data, fds)
        finally:
            _close_all(fds)
        self.recorder.message(Channel.MAIN, Direction.FRONTEND_TO_BACKEND, data, infos, note)

    def route(self, injected) -> None:
        """A hook's injected message, from the replay loop or a back-end-channel thread: a main-channel request
        to the back-end, a reply on the newest back-end channel; anything else is reported and skipped."""
        context = self.context()
        if not _injection_fits(injected, Direction.FRONTEND_TO_BACKEND):
            _skip_injection(injected, Direction.FRONTEND_TO_BACKEND, context, self.recorder)
            return
        message = decode(injected.data, injected.channel, context)
        label = f"injected {message.summary()[:60]}"
        if injected.channel == Channel.BACKEND:
            if not self.side:
                _close_all(injected.fds)
                self.recorder.report(f"back-end channel: {label} not sent: the back-end channel was never set up")
                return
            self.side[-1].send_injected(injected.data, injected.fds, label)
            return
        # The replay loop holds the turn at most until its reply comes or times out.
        if not self.turn.acquire(timeout=2 * self.reply_timeout + 1):
            _close_all(injected.fds)
            self.recorder.report(f"{label}: not sent: the main channel stayed busy")
            return
        try:
            reply_flow = self._exchange(injected.data, injected.fds, message, context, label)
        finally:
            self.turn.release()
        if reply_flow is None:
            return
        for again in reply_flow.injected:
            self.route(again)
        if reply_flow.disconnect_reason:
            self.end(reply_flow.disconnect_reason)

    def _exchange(self, data: bytes, fds: list[int], message: Message, context: DecodeContext,
                  label: str) -> Flow | None:
        """An injected request and, when the protocol requires one, the back-end's reply (the turn is held)."""
        try:
            self.send(data, fds, "injected by hook")
        except OSError as error:
            self.recorder.report(f"{label}: could not be sent: {error.strerror or error}")
            return None
        self.tracker.observe(CONNECTION, message, context)
        if not reply_required(message, context):
            _say(self.out, f"      {label}: sent")
            return None
        frame = self.replies.next()
        if frame is None:
            self.diverge(f"{label}: no reply from the back-end ({self.ended or self.replies.ended})")
            return None
        infos, flow = _hooked_received(self.chain, frame, Channel.MAIN, Direction.BACKEND_TO_FRONTEND, self.counter,
                                       self.context())
        self.recorder.message(Channel.MAIN, Direction.BACKEND_TO_FRONTEND, flow.final_bytes(), infos)
        reply = _as_sent(flow)
        _say(self.out, f"      {label}: reply {reply.summary()[:72]}")
        if reply.request != message.request or not reply.is_reply:
            self.diverge(f"{label}: the back-end answered {reply.summary()}")
        return flow

    def end(self, reason: str) -> None:
        """A hook disconnected: the replay loop stops at its next step, the back-end sees the socket close."""
        if self.ended:
            return
        self.ended = reason
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.recorder.report(f"session ended by a hook: {reason}")



class BackendChannelServer(threading.Thread):
    """Answers the back-end's requests on the replay's side-channel socket: an ack of 0 when one is due.

    Hooks act here as on every other message: a delay holds the request (so its answer too) or the answer, a
    dropped request is not answered, a dropped answer not sent, injections go right after their message (a
    front-end reply on this channel, a front-end request on the main channel, see MainChannel.route), and a
    disconnect ends the session."""

    def __init__(self, sock: socket.socket, recorder: Recorder, chain: HookChain, counter: MessageCounter,
                 context, main: MainChannel, out=sys.stdout):
        super().__init__(daemon=True, name="vhusniff-replay-backend-channel")
        self.sock, self.recorder, self.chain, self.counter, self.context = sock, recorder, chain, counter, context
        self.main, self.out = main, out
        self.busy = threading.Lock()       # held while a message is handled
        self.send_lock = threading.Lock()

    def stop(self) -> None:
        """End the thread: the session is over, whether or not the back-end has closed its end yet."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.join(timeout=1)

    def wait_idle(self, deadline: float) -> bool:
        """Wait (until `deadline`, a monotonic time) until nothing is being handled or waiting to be read."""
        while time.monotonic() < deadline and self.is_alive():
            try:
                waiting = bool(select.select([self.sock], [], [], 0)[0])
            except (OSError, ValueError):
                return True
            if not waiting and self.busy.acquire(blocking=False):
                self.busy.release()
                return True
            time.sleep(0.01)
        return not self.is_alive()

    def run(self) -> None:
        framer = Framer("back-end channel")
        try:
            while True:
                # Readable first, then busy while reading and handling: wait_idle never sees a gap between.
                select.select([self.sock], [], [])
                with self.busy:
                    data, fds, _truncated = receive_chunk(self.sock)
                    if not data:
                        _close_all(fds)
                        return
                    for frame in framer.feed(data, fds):
                        if isinstance(frame, Frame):
                            self._handle(frame)
                        else:
                            _close_all(frame.fds)
        except (OSError, FramingError, ValueError, SessionEnd):
            return
        finally:
            self.sock.close()

    def _handle(self, frame: Frame) -> None:
        context = self.context()
        infos, flow = _hooked_received(self.chain, frame, Channel.BACKEND, Direction.BACKEND_TO_FRONTEND,
                                       self.counter, context)
        self.recorder.message(Channel.BACKEND, Direction.BACKEND_TO_FRONTEND, flow.final_bytes(), infos)
        message = _as_sent(flow)
        if flow.disconnect_reason and not flow.disconnect_after_forward:
            self._end(flow.disconnect_reason)
            return
        for injected in flow.injected:
            self._route(injected)
        if flow.dropped:
            self.recorder.report(f"hook dropped back-end request {message.summary()}: not answered")
        elif reply_required(message, context):
            self._answer(message, context)
        if flow.disconnect_reason:
            self._end(flow.disconnect_reason)

    def _answer(self, message: Message, context: DecodeContext) -> None:
        reply = build_message(Channel.BACKEND, message.request, {"ack": 0}, reply=True, kind="ack")
        flow = _hooked(self.chain, reply, Channel.BACKEND, Direction.FRONTEND_TO_BACKEND, self.counter, context)
        if flow.disconnect_reason and not flow.disconnect_after_forward:
            self._end(flow.disconnect_reason)
            return
        if flow.dropped:
            self.recorder.report(f"hook dropped the answer {flow.message.summary()}")
        else:
            if flow.delay_seconds:
                time.sleep(flow.delay_seconds)
            self._send(flow.final_bytes(), [], "", "answer")
        for injected in flow.injected:
            self._route(injected)
        if flow.disconnect_reason:
            self._end(flow.disconnect_reason)

    def send_injected(self, data: bytes, fds: list[int], label: str) -> None:
        """A hook's reply for the back-end on this channel (from this thread or the replay loop)."""
        if self._send(data, fds, "injected by hook", label):
            _say(self.out, f"      back-end channel: {label}: sent")

    def _send(self, data: bytes, fds: list[int], note: str, label: str) -> bool:
        infos = [describe_fd(fd) for fd in fds]
        try:
            with self.send_lock:
                send_message(self.sock, data, fds)
        except OSError as error:
            self.recorder.report(f"back-end channel: {label} could not be sent: {error.strerror or error}")
            return False
        finally:
            _close_all(fds)
        self.recorder.message(Channel.BACKEND, Direction.FRONTEND_TO_BACKEND, data, infos, note)
        return True

    def _route(self, injected) -> None:
        self.main.route(injected)

    def _end(self, reason: str) -> None:
        self.main.end(reason)
        raise SessionEnd(reason)



def _hooked(chain: HookChain, data: bytes, channel: Channel, direction: Direction, counter: MessageCounter,
            context: DecodeContext, fds: list[int] | None = None, message: Message | None = None) -> Flow:
    flow = Flow(data, fds if fds is not None else [], CONNECTION, channel, direction, counter.next(), context,
                message)
    return chain.run(flow) if chain else flow


def _hooked_received(chain: HookChain, frame: Frame, channel: Channel, direction: Direction,
                     counter: MessageCounter, context: DecodeContext) -> tuple[list, Flow]:
    """A message the peer sent us: its fds described and closed (a replay keeps none of them), the hooks run
    and their delay served. Returns (fd descriptions, flow)."""
    infos = [describe_fd(fd) for fd in frame.fds]
    _close_all(frame.fds)
    flow = _hooked(chain, frame.data, channel, direction, counter, context)
    if flow.delay_seconds:
        time.sleep(flow.delay_seconds)
    return infos, flow


def _as_sent(flow: Flow) -> Message:
    """The message as it goes on the wire: the flow's own decoding, unless a hook changed the bytes."""
    return decode(flow.final_bytes(), flow.channel, flow.context) if flow.modified else flow.message


def _track(tracker: ContextTracker, flow: Flow) -> Message:
    """_as_sent, with the tracker following what it negotiates (as tracker.decode would, without decoding
    again: the flow was decoded in the tracker's current context)."""
    message = _as_sent(flow)
    tracker.observe(CONNECTION, message, flow.context)
    return message


class ReplyReader:
    """Whole messages from a socket, one at a time, keeping any that arrived together for later."""

    def __init__(self, sock: socket.socket, peer: str):
        self.sock, self.framer, self.backlog = sock, Framer(peer), []
        self.ended = ""

    def _read_once(self) -> bool:
        """One receive, framed into the backlog; False, with `ended` saying why, when the stream is over."""
        try:
            data, fds, _truncated = receive_chunk(self.sock)
        except socket.timeout:
            self.ended = "timeout"
            return False
        except OSError as error:
            self.ended = f"socket error: {error.strerror or error}"
            return False
        if not data:
            _close_all(fds)
            self.ended = "the back-end closed the connection"
            return False
        try:
            frames = self.framer.feed(data, fds)
        except FramingError as error:
            self.ended = f"unframeable reply: {error}"
            return False
        for frame in frames:
            if isinstance(frame, Frame):
                self.backlog.append(frame)
            else:
                _close_all(frame.fds)
        return True

    def next(self) -> Frame | None:
        while not self.backlog:
            if not self._read_once():
                return None
        return self.backlog.pop(0)

    def pending(self) -> bool:
        """Has the peer sent something no request asked for (already here, or arriving now)? Its fds are closed."""
        if not self.backlog and select.select([self.sock], [], [], 0.05)[0]:
            self._read_once()
        for frame in self.backlog:
            _close_all(frame.fds)
            frame.fds = []
        return bool(self.backlog)

    def close(self) -> None:
        for frame in self.backlog:
            _close_all(frame.fds)
        self.backlog = []


@dataclass
class ReplayResult:
    requests_sent: int = 0
    replies_compared: int = 0
    divergences: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def identical(self) -> bool:
        return not self.divergences


def device_type(records: list[Record], connection: int) -> str | None:
    """The virtio device type of a recorded connection, as reading a capture finds it (the proxy's and lab's
    `device=...` note, or what the messages imply)."""
    tracker = ContextTracker()
    for record in records:
        if record.connection == connection:
            tracker.decode(record)
    return tracker.context_for(connection).device_type


def _device_note(device: str | None) -> str:
    """Written into the replay's own capture, so that its readers name the device's feature bits."""
    return f", device={device}" if device else ""


def replay_as_frontend(records: list[Record], backend_path: str, connection: int | None = None,
                       writer=None, out=sys.stdout, reply_timeout: float = REPLY_TIMEOUT, hooks=(),
                       on_hook_error: str = "forward") -> ReplayResult:
    """Play one recorded connection's front-end side against a real back-end and compare the replies."""
    connection, exchanges = load_exchanges(records, connection)
    device = device_type(records, connection)
    positions = ring_positions(exchanges)
    result = ReplayResult()
    recorder = Recorder(writer, out)
    counter = MessageCounter()
    chain = HookChain(list(hooks), on_hook_error, report=lambda text: _say(out, text))
    recorded_tracker, tracker = ContextTracker(device), ContextTracker(device)
    main: MainChannel | None = None

    def start_side_server(sock: socket.socket) -> None:
        server = BackendChannelServer(sock, recorder, chain, counter, lambda: tracker.context_for(CONNECTION), main,
                                      out)
        main.side.append(server)
        server.start()

    fresh = FreshFds(on_backend_socket=start_side_server)
    pending_ring_position: dict[int, int] = {}
    started = time.monotonic()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(backend_path)
    except OSError as error:
        sock.close()
        fresh.close()
        result.divergences.append(f"cannot connect to the back-end at {backend_path}: {error.strerror}")
        _say(out, f"vhusniff replay: {result.divergences[0]}")
        return result
    sock.settimeout(reply_timeout)
    replies = ReplyReader(sock, f"back-end {backend_path}")
    recorder.event(f"replay --as frontend: connection {connection} of the recording, back-end {backend_path}"
                   f"{_device_note(device)}")

    def diverge(text: str) -> None:
        result.divergences.append(text)
        _say(out, "      " + text)

    main = MainChannel(sock, replies, recorder, chain, counter, tracker, out, diverge, reply_timeout)

    try:
        for exchange in exchanges:
            recorded = recorded_tracker.decode(exchange.request)
            if main.ended:
                diverge(f"message #{exchange.number} {recorded.name}: not sent, {main.ended}")
                break
            context = tracker.context_for(CONNECTION)
            need_sizes = [region.mmap_offset + region.memory_size for region in _regions(recorded)]
            fds = [fresh.make(info, need_sizes[i] if i < len(need_sizes) else 0)
                   for i, info in enumerate(exchange.request.fds)]
            data = _rewrite(recorded, exchange.request.data, exchange.number, positions, pending_ring_position)
            flow = _hooked(chain, data, Channel.MAIN, Direction.FRONTEND_TO_BACKEND, counter, context, fds)
            label = f"#{exchange.number:<4} {recorded.name:<24}"
            if flow.disconnect_reason and not flow.disconnect_after_forward:
                _close_all(fds)
                recorder.event(flow.disconnect_reason)
                diverge(f"message #{exchange.number} {recorded.name}: not sent, {flow.disconnect_reason}")
                break
            if flow.dropped:
                _close_all(fds)
                recorder.event(f"hook dropped message #{exchange.number} {recorded.name}")
                _say(out, f"{label} dropped by a hook")
                if exchange.reply is not None:
                    diverge(f"message #{exchange.number} {recorded.name}: dropped by a hook, so its recorded reply "
                            f"#{exchange.reply_number} was not asked for")
                for injected in flow.injected:
                    main.route(injected)
                continue
            if flow.delay_seconds:
                time.sleep(flow.delay_seconds)
            data = flow.final_bytes()
            message = _track(tracker, flow)
            for region, fd in zip(_regions(message), fds):
                fresh.remember_region(region.userspace_addr, region.memory_size, region.mmap_offset, fd)
            _place_ring(message, pending_ring_position, fresh)
            wait = exchange.reply is not None or reply_required(message, context)
            frame = reply_flow = None
            with main.turn:         # the main channel is ours until the reply is in
                try:
                    main.send(data, fds)
                except OSError as error:
                    diverge(f"message #{exchange.number} {recorded.name}: could not be sent: "
                            f"{main.ended or error.strerror or error}")
                    break
                result.requests_sent += 1
                if wait:
                    frame = replies.next()
                if frame is not None:
                    reply_infos, reply_flow = _hooked_received(chain, frame, Channel.MAIN,
                                                               Direction.BACKEND_TO_FRONTEND, counter,
                                                               tracker.context_for(CONNECTION))
                    recorder.message(Channel.MAIN, Direction.BACKEND_TO_FRONTEND, reply_flow.final_bytes(),
                                     reply_infos)
            # A hook's injected requests go once the channel is free: after the reply, if one was due.
            for injected in flow.injected:
                main.route(injected)
            if not wait:
                result.log.append(f"{label} sent")
                if flow.disconnect_reason:
                    recorder.event(flow.disconnect_reason)
                    break
                continue
            if frame is None:
                expected = (f"recorded reply #{exchange.reply_number}" if exchange.reply is not None
                            else "the protocol requires a reply")
                why = main.ended or f"{replies.ended}; waited up to {reply_timeout:g} s"
                diverge(f"message #{exchange.number} {recorded.name}: no reply ({why}; {expected})")
                break
            replayed = _track(tracker, reply_flow)
            result.replies_compared += 1
            if exchange.reply is None:
                differences = [f"the back-end replied ({replayed.summary()}); the recording has no reply"]
            else:
                expected_reply = recorded_tracker.decode(exchange.reply)
                differences = _reply_differences(expected_reply, replayed, exchange.reply.fds, reply_infos)
            line = f"{label} reply " + ("same" if not differences else "DIFFERS")
            result.log.append(line)
            _say(out, line)
            for difference in differences:
                diverge(f"message #{exchange.number} {recorded.name} reply: {difference}")
            for injected in reply_flow.injected:
                main.route(injected)
            if flow.disconnect_reason or reply_flow.disconnect_reason:
                recorder.event(flow.disconnect_reason or reply_flow.disconnect_reason)
                break
        else:
            # Let the back-end-channel threads finish what they are handling (a hook's delay, its injections).
            deadline = time.monotonic() + 2 * reply_timeout + 1
            for server in main.side:
                server.wait_idle(deadline)
            if main.ended:
                diverge(f"after the last request: {main.ended}")
            elif replies.pending():
                extra = decode(replies.backlog[0].data, Channel.MAIN, tracker.context_for(CONNECTION))
                diverge(f"after the last request: the back-end sent {extra.summary()}, which nothing asked for")
    finally:
        with main.turn:
            sock.close()
        replies.close()
        for server in main.side:
            server.stop()
        fresh.close()
    result.elapsed = time.monotonic() - started
    verdict = ("identical to the recording" if not result.divergences else
               f"{len(result.divergences)} divergences; first divergence: {result.divergences[0]}")
    summary = (f"replayed {result.requests_sent} of {len(exchanges)} requests of connection {connection}, "
               f"compared {result.replies_compared} replies in {result.elapsed:.2f} s: {verdict}")
    recorder.report(summary)
    return result


def _say(out, text: str) -> None:
    print(text, file=out, flush=True)


def _close_all(fds) -> None:
    for fd in fds:
        os.close(fd)


def _reply_differences(recorded: Message, replayed: Message, recorded_fds: list[FdInfo],
                       replayed_fds: list[FdInfo]) -> list[str]:
    if recorded.request != replayed.request or recorded.is_reply != replayed.is_reply:
        return [f"recorded {recorded.summary()}, replayed {replayed.summary()}"]
    differences = field_differences(recorded, replayed, labels=("recorded", "replayed"))
    recorded_kinds, replayed_kinds = [fd.kind for fd in recorded_fds], [fd.kind for fd in replayed_fds]
    if len(recorded_kinds) != len(replayed_kinds):
        differences.append(f"fds: recorded {recorded_kinds}, replayed {replayed_kinds}")
    return differences


def _rewrite(message: Message, data: bytes, number: int, positions: dict[int, int],
             pending: dict[int, int]) -> bytes:
    """SET_VRING_BASE starts the ring where the recorded session's next GET_VRING_BASE found it."""
    if message.kind is None or message.request != F.SET_VRING_BASE or number not in positions:
        return data
    index = message.payload.index
    pending[index] = positions[number]
    return data[:HEADER_SIZE] + struct.pack("<II", index, positions[number])


def _place_ring(message: Message, pending: dict[int, int], fresh: FreshFds) -> None:
    """Before SET_VRING_ADDR goes out, set the ring's avail and used idx in our memory to its base, so that the
    back-end (libvhost-user reads used->idx here) sees nothing pending."""
    if message.kind is None or message.request != F.SET_VRING_ADDR or message.payload.index not in pending:
        return
    position = pending.pop(message.payload.index) & 0xFFFF
    # Both rings start with flags:u16, then idx:u16.
    fresh.write_u16(message.payload.avail + 2, position)
    fresh.write_u16(message.payload.used + 2, position)


# ---- back-end role ----

@dataclass
class ServeResult:
    requests: int = 0
    replies: int = 0
    not_recorded: list[str] = field(default_factory=list)
    failed: str = ""                 # why the session was ended by policy (unknown request with --unknown fail)
    ended: str = ""                  # how the front-end's connection ended
    backend_sent: int = 0            # back-end-channel requests sent (recorded and injected)
    backend_replies: int = 0         # the front-end's replies to them
    backend_differences: list[str] = field(default_factory=list)   # replies unlike the recording, or missing
    backend_not_played: int = 0      # recorded back-end requests whose place in the sequence never came


def replay_as_backend(records: list[Record], listen_path: str, connection: int | None = None,
                      unknown_policy: str = "default", writer=None, out=sys.stdout, once: bool = True,
                      default_reply: int = 0, hooks=(), on_hook_error: str = "forward",
                      reply_timeout: float = REPLY_TIMEOUT) -> int:
    """Answer a real front-end from the recorded replies and play the recorded back-end-channel requests.
    Exit status: 1 when the policy failed a request."""
    connection, exchanges = load_exchanges(records, connection)
    backend_requests = load_backend_requests(records, connection, exchanges)
    device = device_type(records, connection)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(listen_path):
        os.unlink(listen_path)
    listener.bind(listen_path)
    listener.listen(1)
    extra = f", {len(backend_requests)} back-end-channel requests" if backend_requests else ""
    _say(out, f"replaying the back-end of connection {connection} ({len(exchanges)} recorded requests{extra}) "
              f"on {listen_path}")
    status = 0
    try:
        while True:
            peer, _ = listener.accept()
            result = serve_front_end(peer, exchanges, unknown_policy, Recorder(writer, out), out, default_reply,
                                     HookChain(list(hooks), on_hook_error, report=lambda text: _say(out, text)),
                                     backend_requests=backend_requests, reply_timeout=reply_timeout,
                                     device=device)
            peer.close()
            status = 1 if result.failed else 0
            if once:
                return status
    finally:
        listener.close()
        if os.path.exists(listen_path):
            os.unlink(listen_path)


class BackendChannel:
    """The back-end replay's end of the back-end channel (the socket the front-end passed in SET_BACKEND_REQ_FD).

    Back-end requests, recorded or injected by a hook, go out one at a time: when one requires a reply (the
    one reply rule, in the live session's context) the next waits in the queue until the front-end's reply
    comes or `reply_timeout` passes. Replies are read from the session's select loop, never by blocking, since
    the front-end may first have to ask something on the main channel (QEMU answers CONFIG_CHANGE_MSG only
    after its GET_CONFIG). Recorded requests run through the hooks; injected ones go as they are, like the
    proxy's. Everything sent and received is recorded on the back-end channel."""

    def __init__(self, recorder: Recorder, chain: HookChain, counter: MessageCounter, context, fresh: FreshFds,
                 out, result: ServeResult, send_main, reply_timeout: float):
        self.recorder, self.chain, self.counter, self.context = recorder, chain, counter, context
        self.fresh, self.out, self.result, self.send_main = fresh, out, result, send_main
        self.reply_timeout = reply_timeout
        self.sock: socket.socket | None = None
        self.framer = Framer("front-end (back-end channel)")
        self.queue: list[tuple[bytes, list[int] | None, BackendExchange | None]] = []
        self.waiting: tuple[Message, BackendExchange | None, float] | None = None

    def attach(self, sock: socket.socket) -> None:
        if self.sock is not None:
            self.sock.close()
            self.framer = Framer("front-end (back-end channel)")
        self.sock = sock
        self.sock.setblocking(False)

    @property
    def readable(self) -> list[socket.socket]:
        return [self.sock] if self.sock is not None else []

    def time_left(self) -> float | None:
        return None if self.waiting is None else max(0.0, self.waiting[2] - time.monotonic())

    def play(self, recorded: BackendExchange) -> None:
        self.queue.append((recorded.request.data, None, recorded))
        self.pump()

    def inject(self, data: bytes, fds: list[int]) -> None:
        """A hook's message for the front-end's back-end channel: ahead of queued recorded requests."""
        self.queue.insert(0, (data, list(fds), None))
        self.pump()

    def pump(self) -> None:
        while self.queue and self.waiting is None:
            data, fds, recorded = self.queue.pop(0)
            if self.sock is None:
                _close_all(fds or [])
                self.result.backend_not_played += recorded is not None
                what = f"recorded #{recorded.number}" if recorded else "injected by a hook"
                self.recorder.report(f"back-end channel: {decode(data, Channel.BACKEND, self.context()).summary()} "
                             f"({what}) not sent: no back-end channel (the front-end passed no socket "
                             f"in SET_BACKEND_REQ_FD, or closed it)")
                continue
            if recorded is None:
                self._send_injected(data, fds)
            else:
                self._send_recorded(recorded)

    def _send_recorded(self, recorded: BackendExchange) -> None:
        context = self.context()
        fds = [self.fresh.make(info) for info in recorded.request.fds]
        flow = _hooked(self.chain, recorded.request.data, Channel.BACKEND, Direction.BACKEND_TO_FRONTEND,
                       self.counter, context, fds)
        label = f"back-end channel: recorded #{recorded.number} {flow.message.summary()[:60]}"
        if flow.disconnect_reason and not flow.disconnect_after_forward:
            _close_all(fds)
            raise SessionEnd(flow.disconnect_reason)
        if flow.dropped:
            _close_all(fds)
            self.recorder.event(f"hook dropped back-end request #{recorded.number} {flow.message.summary()}")
            _say(self.out, f"{label}: dropped by a hook")
            for injected in flow.injected:               # injections still go, as in the proxy
                self.route_injected(injected)
            return
        if flow.delay_seconds:
            time.sleep(flow.delay_seconds)
        data, message = flow.final_bytes(), _as_sent(flow)
        self._send(data, fds, message, recorded, context, label)
        for injected in flow.injected:
            self.route_injected(injected)
        if flow.disconnect_reason:
            raise SessionEnd(flow.disconnect_reason)

    def _send_injected(self, data: bytes, fds: list[int]) -> None:
        context = self.context()
        message = decode(data, Channel.BACKEND, context)
        self._send(data, fds, message, None, context, f"back-end channel: injected {message.summary()[:60]}",
                   "injected by hook")

    def _send(self, data: bytes, fds: list[int], message: Message, recorded: BackendExchange | None,
              context: DecodeContext, label: str, note: str = "") -> None:
        infos = [describe_fd(fd) for fd in fds]
        try:
            send_message(self.sock, data, fds)
        except OSError as error:
            self.recorder.report(f"{label}: could not be sent: {error.strerror or error}")
            return
        finally:
            _close_all(fds)
        self.result.backend_sent += 1
        self.recorder.message(Channel.BACKEND, Direction.BACKEND_TO_FRONTEND, data, infos, note)
        if reply_required(message, context):
            self.waiting = (message, recorded, time.monotonic() + self.reply_timeout)
            _say(self.out, f"{label}: sent, waiting for the front-end's reply")
        else:
            _say(self.out, f"{label}: sent")

    def route_injected(self, injected) -> None:
        """Where a hook's injected message goes in the back-end role: back-end-channel requests to the front-end's
        back-end socket, main-channel replies to the front-end; anything else is reported and skipped."""
        if not _injection_fits(injected, Direction.BACKEND_TO_FRONTEND):
            _skip_injection(injected, Direction.BACKEND_TO_FRONTEND, self.context(), self.recorder)
        elif injected.channel == Channel.BACKEND:
            self.inject(injected.data, injected.fds)
        else:
            self.send_main(injected.data, injected.fds)

    def readable_now(self) -> None:
        """Read what the front-end sent on the back-end channel: replies, or something nothing asked for."""
        try:
            data, fds, _truncated = receive_chunk(self.sock)
        except BlockingIOError:
            return
        except OSError as error:
            self._closed(f"socket error: {error.strerror or error}")
            return
        if not data:
            _close_all(fds)
            self._closed("the front-end closed it")
            return
        try:
            frames = self.framer.feed(data, fds)
        except FramingError as error:
            self._closed(f"unframeable stream: {error}")
            return
        for frame in frames:
            if isinstance(frame, Frame):
                self._received(frame)
            else:
                _close_all(frame.fds)

    def _received(self, frame: Frame) -> None:
        infos, flow = _hooked_received(self.chain, frame, Channel.BACKEND, Direction.FRONTEND_TO_BACKEND,
                                       self.counter, self.context())
        data, message = flow.final_bytes(), _as_sent(flow)
        self.recorder.message(Channel.BACKEND, Direction.FRONTEND_TO_BACKEND, data, infos)
        if self.waiting is not None and message.is_reply and message.request == self.waiting[0].request:
            asked, recorded, _deadline = self.waiting
            self.waiting = None
            self.result.backend_replies += 1
            if flow.dropped:
                self.recorder.event(f"hook dropped the front-end's reply {message.summary()}")
                differences = []
            elif recorded is None or recorded.reply is None:
                differences = []
            else:
                expected = decode(recorded.reply.data, Channel.BACKEND, self.context())
                differences = _reply_differences(expected, message, recorded.reply.fds, infos)
            where = _origin(recorded)
            verdict = ("(none recorded)" if recorded is None or recorded.reply is None
                       else "same" if not differences else "DIFFERS")
            _say(self.out, f"back-end channel: {where}{asked.name} reply {message.summary()[:60]}: {verdict}")
            for difference in differences:
                self._differ(f"back-end channel {where}{asked.name} reply: {difference}")
        else:
            self._differ(f"back-end channel: the front-end sent {message.summary()}, which nothing asked for")
        for injected in flow.injected:
            self.route_injected(injected)
        if flow.disconnect_reason:
            raise SessionEnd(flow.disconnect_reason)
        self.pump()

    def expire(self) -> None:
        """A reply due past its time: say so and let the next request go."""
        if self.waiting is None or time.monotonic() < self.waiting[2]:
            return
        asked, recorded, _deadline = self.waiting
        self.waiting = None
        where = _origin(recorded)
        self._differ(f"back-end channel {where}{asked.name}: no reply from the front-end within "
                     f"{self.reply_timeout:g} s")
        self.pump()

    def _closed(self, why: str) -> None:
        self.recorder.event(f"back-end channel closed: {why}")
        self.sock.close()
        self.sock = None
        self.finish("the back-end channel closed")

    def finish(self, why: str) -> None:
        """The channel or the session ended: a reply still due is missing, queued requests are not sent."""
        if self.waiting is not None:
            asked, recorded, _deadline = self.waiting
            where = _origin(recorded)
            self._differ(f"back-end channel {where}{asked.name}: no reply ({why})")
            self.waiting = None
        for _data, fds, _recorded in self.queue:
            _close_all(fds or [])
        self.result.backend_not_played += sum(1 for item in self.queue if item[2] is not None)
        self.queue = []

    def close(self) -> None:
        self.finish("the session ended")
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _differ(self, text: str) -> None:
        self.result.backend_differences.append(text)
        self.recorder.report(text, indent="      ")



def _origin(recorded: BackendExchange | None) -> str:
    """How a back-end request is named in what replay says: by its number in the recording, or as a hook's."""
    return f"recorded #{recorded.number} " if recorded is not None else "injected "


def serve_front_end(peer: socket.socket, exchanges: list[Exchange], unknown_policy: str, recorder: Recorder,
                    out, default_reply: int = 0, chain: HookChain | None = None, *,
                    backend_requests: list[BackendExchange] = (),
                    reply_timeout: float = REPLY_TIMEOUT, device: str | None = None) -> ServeResult:
    """One front-end connection, answered from the recording until the front-end leaves. Each recorded
    back-end-channel request is sent on the front-end's back-end socket once the main-channel message recorded
    before it has been received (a request) or sent (a reply)."""
    chain = chain or HookChain([])
    framer = Framer("front-end")
    fresh = FreshFds()
    tracker = ContextTracker(device)
    counter = MessageCounter()
    held: list[int] = []             # other sockets the front-end passed: closed at the end
    kicks = RingKicks(recorder)
    cursor = 0
    result = ServeResult()
    to_play = list(backend_requests)

    def context() -> DecodeContext:
        return tracker.context_for(CONNECTION)

    def send_main(data: bytes, fds: list[int]) -> None:
        """A message for the front-end on the main channel that is not the reply to its request: a hook's."""
        infos = [describe_fd(fd) for fd in fds]
        try:
            send_message(peer, data, fds)
        finally:
            _close_all(fds)
        recorder.message(Channel.MAIN, Direction.BACKEND_TO_FRONTEND, data, infos, "injected by hook")
        _say(out, f"injected to the front-end: {decode(data, Channel.MAIN, context()).summary()[:72]}")

    channel = BackendChannel(recorder, chain, counter, context, fresh, out, result, send_main, reply_timeout)

    def reached(place: tuple[int, int]) -> None:
        """The live session got to this place of the recording: play the back-end requests recorded up to it."""
        while to_play and to_play[0].after <= place:
            channel.play(to_play.pop(0))

    recorder.event(f"replay --as backend: front-end connected{_device_note(device)}")
    try:
        while True:
            watched = [peer, *kicks.fds, *channel.readable]
            readable, _, _ = select.select(watched, [], [], channel.time_left())
            kicks.observe(fd for fd in readable if isinstance(fd, int))
            if channel.sock is not None and channel.sock in readable:
                channel.readable_now()
            channel.expire()
            if peer not in readable:
                continue
            try:
                data, fds, _truncated = receive_chunk(peer)
            except OSError as error:
                result.ended = f"front-end connection ended: {error.strerror or error}"
                return result
            if not data:
                _close_all(fds)
                result.ended = f"front-end closed the connection after {result.requests} requests"
                return result
            try:
                frames = framer.feed(data, fds)
            except FramingError as error:
                result.ended = f"front-end sent an unframeable stream: {error}"
                return result
            for frame in frames:
                if not isinstance(frame, Frame):
                    _close_all(frame.fds)
                    continue
                infos = [describe_fd(fd) for fd in frame.fds]
                kick_index = _kick_index(frame.data) if frame.fds else None
                backend_socket = None
                for fd, info in zip(frame.fds, infos):
                    if info.kind == "socket" and _request_number(frame.data) == F.SET_BACKEND_REQ_FD \
                            and backend_socket is None:
                        backend_socket = fd
                    elif info.kind == "socket":
                        held.append(fd)
                    elif kick_index is not None and info.kind == "eventfd":
                        kicks.watch(kick_index, fd)
                    else:
                        os.close(fd)
                flow = _hooked(chain, frame.data, Channel.MAIN, Direction.FRONTEND_TO_BACKEND, counter, context())
                if flow.disconnect_reason and not flow.disconnect_after_forward:
                    _close_all([backend_socket] if backend_socket is not None else [])
                    raise SessionEnd(flow.disconnect_reason)
                if flow.dropped:
                    _close_all([backend_socket] if backend_socket is not None else [])
                    recorder.event(f"hook dropped front-end message {flow.message.summary()}")
                    for injected in flow.injected:       # injections still go, as in the proxy
                        channel.route_injected(injected)
                    continue
                if flow.delay_seconds:
                    time.sleep(flow.delay_seconds)
                if backend_socket is not None:
                    channel.attach(socket.socket(fileno=backend_socket))
                request = flow.final_bytes()
                recorder.message(Channel.MAIN, Direction.FRONTEND_TO_BACKEND, request, infos)
                request_context = context()
                message = _track(tracker, flow)
                result.requests += 1
                match, cursor = _find_recorded(exchanges, cursor, request)
                if match is None:
                    result.not_recorded.append(message.summary())
                    if unknown_policy == "fail":
                        result.failed = (f"request #{result.requests} {message.summary()} is not in the recording "
                                         f"(policy: fail)")
                        recorder.report(result.failed)
                        return result
                reply, reply_fds = answer(message, match, request_context, fresh, default_reply)
                reply_context = context()
                reply_message = decode(reply, Channel.MAIN, reply_context) if reply else None
                note = "" if match else "  [not in the recording: default answer]"
                _say(out, f"#{result.requests:<4} {message.summary()[:72]:<72} -> "
                          f"{reply_message.summary() if reply else '(no reply)'}{note}")
                # A hook's injection goes right after its message; then what the recording had after it.
                for injected in flow.injected:
                    channel.route_injected(injected)
                index = cursor - 1 if match is not None else None
                if index is not None:
                    reached((index, 0))
                if reply is not None:
                    _send_reply(peer, reply, reply_fds, reply_message, reply_context, chain, counter, recorder,
                                channel, tracker, result)
                if index is not None:
                    reached((index, 1))
                if flow.disconnect_reason:
                    raise SessionEnd(flow.disconnect_reason)
    except SessionEnd as end:
        recorder.event(str(end))
        result.ended = str(end)
        return result
    finally:
        channel.close()
        result.backend_not_played += len(to_play)
        fresh.close()
        _close_all(held)
        kicks.close()
        backend = ""
        if backend_requests or result.backend_sent:
            backend = (f"; back-end channel: {result.backend_sent} requests sent, {result.backend_replies} replies, "
                       f"{len(result.backend_differences)} differences, {result.backend_not_played} recorded "
                       f"requests not played")
        summary = (f"{result.ended or result.failed}: {result.requests} requests, {result.replies} replies, "
                   f"{len(result.not_recorded)} not in the recording{backend}")
        recorder.event(f"replay --as backend: {summary}")
        _say(out, summary)


def _send_reply(peer: socket.socket, reply: bytes, reply_fds: list[int], reply_message: Message,
                reply_context: DecodeContext, chain: HookChain, counter: MessageCounter, recorder: Recorder,
                channel: BackendChannel, tracker: ContextTracker, result: ServeResult) -> None:
    """Our reply to the front-end's request, through the hooks (drop, delay, injection, disconnect)."""
    reply_flow = _hooked(chain, reply, Channel.MAIN, Direction.BACKEND_TO_FRONTEND, counter, reply_context,
                         reply_fds, reply_message)
    if reply_flow.disconnect_reason and not reply_flow.disconnect_after_forward:
        _close_all(reply_fds)
        raise SessionEnd(reply_flow.disconnect_reason)
    if reply_flow.dropped:
        _close_all(reply_fds)
        recorder.event(f"hook dropped the reply {reply_flow.message.summary()}")
    else:
        if reply_flow.delay_seconds:
            time.sleep(reply_flow.delay_seconds)
        reply = reply_flow.final_bytes()
        reply_infos = [describe_fd(fd) for fd in reply_fds]
        try:
            send_message(peer, reply, reply_fds)
        finally:
            _close_all(reply_fds)
        result.replies += 1
        recorder.message(Channel.MAIN, Direction.BACKEND_TO_FRONTEND, reply, reply_infos)
        _track(tracker, reply_flow)
    for injected in reply_flow.injected:
        channel.route_injected(injected)
    if reply_flow.disconnect_reason:
        raise SessionEnd(reply_flow.disconnect_reason)


def _kick_index(data: bytes) -> int | None:
    """The ring of a SET_VRING_KICK (bits 0-7 of its u64), else None."""
    if _request_number(data) != F.SET_VRING_KICK or len(data) < HEADER_SIZE + 8:
        return None
    return data[HEADER_SIZE]


class RingKicks:
    """Watches the kick eventfds a front-end hands over. A kick after SET_VRING_ENABLE num=1 is the evidence
    that the guest's driver started the ring and submitted requests (which nothing serves in a back-end
    replay); QEMU itself may kick once right after SET_VRING_KICK. Each wake-up is recorded as an event
    `ring N kicked (K kicks)`, up to MAX_EVENTS per ring."""

    MAX_EVENTS = 50

    def __init__(self, recorder: Recorder):
        self.recorder = recorder
        self.rings: dict[int, int] = {}          # fd -> ring index
        self.events: dict[int, int] = {}         # fd -> events recorded

    @property
    def fds(self) -> list[int]:
        return [fd for fd in self.rings if self.events.get(fd, 0) < self.MAX_EVENTS]

    def watch(self, index: int, fd: int) -> None:
        for old, ring in list(self.rings.items()):
            if ring == index:
                del self.rings[old]
                self.events.pop(old, None)
                os.close(old)
        self.rings[fd] = index

    def observe(self, readable) -> None:
        for fd in readable:
            try:
                count = int.from_bytes(os.read(fd, 8), "little")
            except BlockingIOError:
                continue
            self.events[fd] = self.events.get(fd, 0) + 1
            self.recorder.report(f"ring {self.rings[fd]} kicked ({count} kick(s))")

    def close(self) -> None:
        _close_all(self.rings)
        self.rings, self.events = {}, {}


def _find_recorded(exchanges: list[Exchange], cursor: int, request: bytes) -> tuple[Exchange | None, int]:
    """The next recorded exchange for a live request, searching forward: the same bytes first (a GET_CONFIG or a
    GET_VRING_BASE of the same ring), else the same request number. The cursor moves past the match."""
    number = _request_number(request)
    fallback = None
    for index in range(cursor, len(exchanges)):
        recorded = exchanges[index].request.data
        if _request_number(recorded) != number:
            continue
        if recorded[HEADER_SIZE:] == request[HEADER_SIZE:]:
            return exchanges[index], index + 1
        if fallback is None:
            fallback = index
    if fallback is None:
        return None, cursor
    return exchanges[fallback], fallback + 1


def answer(message: Message, match: Exchange | None, context: DecodeContext, fresh: FreshFds,
           default_reply: int = 0) -> tuple[bytes | None, list[int]]:
    """The reply for a live request: the recorded one when the live request still calls for it, else a
    default when the protocol requires a reply (an ack or u64 of `default_reply`, other kinds zeroed)."""
    required = reply_required(message, context)
    if match is not None and match.reply is not None:
        # A recorded ack for a request that now did not ask for one must not be sent: QEMU would take it as
        # the reply to its next request.
        if required or message.spec is None or message.spec.reply_rule is not cat.ReplyRule.ACK_IF_ASKED:
            return match.reply.data, [fresh.make(info) for info in match.reply.fds]
    if not required:
        return None, []
    return default_answer(message, context, default_reply), []


def default_answer(message: Message, context: DecodeContext, value: int = 0) -> bytes:
    """A reply of the request's first reply kind: u64 kinds carry `value`, a config echoes the requested
    offset and size with zeroed data, anything else is zero-filled."""
    spec = message.spec
    kind = spec.reply_kinds[0] if spec and spec.reply_kinds else "ack"
    if kind == "empty" or (message.need_reply and spec and spec.reply_rule is cat.ReplyRule.ACK_IF_ASKED):
        kind = "ack"
    structure = PAYLOADS[kind][0]
    names = [sub.name for sub in structure.subcons if sub.name]
    if kind == "config" and message.kind == "config":
        payload = dict(offset=message.payload.offset, size=message.payload.size, flags=message.payload.flags,
                       data=bytes(message.payload.size))
    elif len(names) == 1 and structure.sizeof() == 8:
        payload = {names[0]: value}
    else:
        try:
            return build_message(Channel.MAIN, message.request, bytes(structure.sizeof()), reply=True, ctx=context)
        except Exception:  # a variable layout without a size of its own: answer with an ack instead
            kind, payload = "ack", {"ack": value}
    return build_message(Channel.MAIN, message.request, payload, reply=True, kind=kind, ctx=context)


def main(argv: list[str] | None = None) -> int:
    from .capture import CaptureWriter
    from .diff import load_or_report
    from .hooks import HookError, add_hook_arguments, hooks_from_arguments
    parser = argparse.ArgumentParser(prog="vhusniff replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("capture")
    parser.add_argument("--as", dest="role", choices=("frontend", "backend"), required=True)
    parser.add_argument("--backend", metavar="SOCKET", help="back-end socket to connect to (--as frontend)")
    parser.add_argument("--listen", metavar="SOCKET", help="socket to listen on for the front-end (--as backend)")
    parser.add_argument("--connection", type=int, help="which recorded connection (default: the first)")
    parser.add_argument("--timeout", type=float, default=REPLY_TIMEOUT,
                        help="seconds to wait for each reply: the back-end's (--as frontend), the front-end's on "
                             "the back-end channel (--as backend) (default: %(default)s)")
    parser.add_argument("--unknown", choices=("default", "fail"), default="default",
                        help="--as backend: a request the recording lacks gets a default answer, or ends the "
                             "session with exit status 1")
    parser.add_argument("--default-reply", type=lambda text: int(text, 0), default=0, metavar="N",
                        help="--as backend: the u64 (ack status or value) of a default answer (default: 0)")
    parser.add_argument("--keep-listening", action="store_true",
                        help="--as backend: serve one front-end connection after another")
    parser.add_argument("-w", dest="write", metavar="FILE", help="capture the replayed session to this file")
    add_hook_arguments(parser)
    args = parser.parse_args(argv)
    if args.role == "frontend" and not args.backend:
        parser.error("--as frontend needs --backend SOCKET")
    if args.role == "backend" and not args.listen:
        parser.error("--as backend needs --listen SOCKET")
    records = load_or_report(args.capture, "vhusniff replay")
    if records is None:
        return 2
    try:
        hooks = hooks_from_arguments(args)
    except HookError as error:
        print(f"vhusniff replay: {error}", file=sys.stderr)
        return 2
    # Every record reaches the file at once: a replay stopped by a signal leaves a readable capture.
    writer = CaptureWriter(args.write, flush_each=True) if args.write else None
    try:
        if args.role == "frontend":
            result = replay_as_frontend(records, args.backend, args.connection, writer, reply_timeout=args.timeout,
                                        hooks=hooks, on_hook_error=args.on_hook_error)
            return 0 if result.identical else 1
        return replay_as_backend(records, args.listen, args.connection, args.unknown, writer,
                                 once=not args.keep_listening, default_reply=args.default_reply, hooks=hooks,
                                 on_hook_error=args.on_hook_error, reply_timeout=args.timeout)
    except ValueError as error:
        print(f"vhusniff replay: {args.capture}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if writer is not None:
            writer.close()
