"""`replay --as backend`: a scripted back-end answers a real front-end (QEMU) from the recording and plays the
recorded back-end requests of the side channels: the back-end channel (the socket the front-end passed in
SET_BACKEND_REQ_FD) and the GPU socket (GPU_SET_SOCKET: scanouts, display updates, cursor)."""
from __future__ import annotations

import os
import socket
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..engine import Session, Side
from ..engine.hooks import HookChain
from ..model import Channel, EventKind, FdInfo
from ..protocol import catalogue as cat
from ..protocol.context import ContextTracker
from ..protocol.grammar import HEADER_SIZE, HEADER_STRUCT, DecodeContext, Message, decode, request_name
from .driver import CONNECTION, REPLY_TIMEOUT, Driver, Recorder, Timer, close_all, say
from .fresh import FreshFds
from .recording import (
    BackendExchange,
    Exchange,
    answer,
    device_type,
    find_recorded,
    load_backend_requests,
    load_exchanges,
    reply_differences,
    request_number,
)

F = cat.FrontendRequest


SIDE_CHANNELS = (Channel.BACKEND, Channel.GPU)     # the channels whose requests the back-end sends
_LABELS = {Channel.BACKEND: "back-end channel", Channel.GPU: "GPU channel"}
_OPENED_BY = {Channel.BACKEND: "SET_BACKEND_REQ_FD", Channel.GPU: "GPU_SET_SOCKET"}


@dataclass
class SideChannelResult:
    """What the scripted back-end sent on one side channel, and how the front-end answered."""
    sent: int = 0                    # requests sent (recorded and injected)
    replies: int = 0                 # the front-end's replies to them
    differences: list[str] = field(default_factory=list)   # replies unlike the recording, or missing
    not_played: int = 0              # recorded requests whose place in the sequence never came


@dataclass
class ServeResult:
    requests: int = 0
    replies: int = 0
    not_recorded: list[str] = field(default_factory=list)
    failed: str = ""                 # why the session was ended by policy (unknown request with --unknown fail)
    ended: str = ""                  # how the front-end's connection ended
    stuck: str = ""                  # a reply's header promised bytes that nothing we send later can supply
    side: dict[Channel, SideChannelResult] = field(
        default_factory=lambda: {channel: SideChannelResult() for channel in SIDE_CHANNELS})
    recorded: int = 0                # the recorded front-end requests
    never_came: list[str] = field(default_factory=list)    # recorded requests the front-end never sent

    @property
    def incomplete(self) -> bool:
        """The front-end left before it sent every recorded request: the session did not go as recorded."""
        return bool(self.never_came)

    def summary(self, played: Sequence[Channel]) -> str:
        """One line; a side channel is counted when it had recorded requests to play (`played`) or sent any."""
        backend = ""
        for channel, counts in self.side.items():
            if channel in played or counts.sent:
                backend += (f"; {_LABELS[channel]}: {counts.sent} requests sent, {counts.replies} replies, "
                            f"{len(counts.differences)} differences, {counts.not_played} recorded requests "
                            f"not played")
        missing = ""
        if self.never_came:
            missing = (f"; {len(self.never_came)} of {self.recorded} recorded requests never came (first: "
                       f"{self.never_came[0]})")
        return (f"{self.ended or self.failed}: {self.requests} requests, {self.replies} replies, "
                f"{len(self.not_recorded)} not in the recording{missing}{backend}")


class RingKicks:
    """Watches the kick eventfds a front-end hands over. A kick after SET_VRING_ENABLE num=1 is the evidence
    that the guest's driver started the ring and submitted requests (which nothing serves in a back-end
    replay); QEMU itself may kick once right after SET_VRING_KICK. Each wake-up is recorded as an event
    `ring N kicked (K kicks)`, up to MAX_EVENTS per ring."""

    MAX_EVENTS = 50

    def __init__(self, driver: Driver, recorder: Recorder):
        self.driver, self.recorder = driver, recorder
        self.rings: dict[int, int] = {}          # fd -> ring index
        self.events: dict[int, int] = {}         # fd -> events recorded

    def watch(self, index: int, fd: int) -> None:
        for old, ring in list(self.rings.items()):
            if ring == index:
                self._forget(old)
        self.rings[fd] = index
        self.driver.watch(fd, lambda: self._kicked(fd))

    def _kicked(self, fd: int) -> None:
        try:
            count = int.from_bytes(os.read(fd, 8), "little")
        except BlockingIOError:
            return
        self.events[fd] = self.events.get(fd, 0) + 1
        self.recorder.report(f"ring {self.rings[fd]} kicked ({count} kick(s))")
        if self.events[fd] >= self.MAX_EVENTS:
            self.driver.unwatch(fd)

    def _forget(self, fd: int) -> None:
        self.driver.unwatch(fd)
        del self.rings[fd]
        self.events.pop(fd, None)
        os.close(fd)

    def close(self) -> None:
        for fd in list(self.rings):
            self._forget(fd)


class BackendRequests:
    """The scripted back-end's requests on one side channel (the back-end channel or the GPU socket), recorded
    or injected by a hook, one at a time: when one requires a reply (the one reply rule, in the live context) the
    next waits until the front-end's reply comes or `reply_timeout` passes; the main channel is served meanwhile
    (QEMU answers CONFIG_CHANGE_MSG only after its GET_CONFIG). A hook's injection goes ahead of queued recorded
    requests."""

    def __init__(self, driver: Driver, fresh: FreshFds, result: ServeResult, recorder: Recorder, out,
                 reply_timeout: float, channel: Channel = Channel.BACKEND):
        self.driver, self.fresh, self.recorder, self.out = driver, fresh, recorder, out
        self.channel, self.label = channel, _LABELS[channel]
        self.result = result.side[channel]
        self.reply_timeout = reply_timeout
        # (data, fds, recorded): a recorded request (its fresh fds are made as it goes), or a hook's injection
        # with its fds (recorded None)
        self.queue: deque[tuple[bytes, list[int], BackendExchange | None]] = deque()
        self.sending: deque[BackendExchange | None] = deque()    # handed to the session, not yet gone
        self.waiting: tuple[Message, BackendExchange | None, Timer] | None = None   # (request, recorded, timer)

    def play(self, recorded: BackendExchange) -> None:
        self.queue.append((recorded.request.data, [], recorded))
        self.pump()

    def inject(self, data: bytes, fds: list[int]) -> None:
        self.queue.appendleft((data, fds, None))
        self.pump()

    def pump(self) -> None:
        while self.queue and self.waiting is None and not self.sending:
            data, fds, recorded = self.queue.popleft()
            if self.channel not in self.driver.sockets:
                close_all(fds)
                self.result.not_played += recorded is not None
                summary = decode(data, self.channel, self.driver.context()).summary()
                self.recorder.report(f"{self.label}: {summary[:60]} ({_origin(recorded).strip() or 'injected'}) "
                                     f"not sent: no {self.label} (the front-end passed no socket in "
                                     f"{_OPENED_BY[self.channel]}, or closed it)")
                continue
            self.sending.append(recorded)
            if recorded is None:
                self.driver.send_injected(self.channel, data, fds)
            else:
                self.driver.send(self.channel, data, [self.fresh.make(info) for info in recorded.request.fds])

    def going(self, message: Message, awaits_reply: bool) -> None:
        recorded = self.sending.popleft() if self.sending else None
        self.result.sent += 1
        label = f"{self.label}: {_origin(recorded)}{message.summary()[:60]}"
        if awaits_reply:
            self.waiting = (message, recorded, self.driver.after(self.reply_timeout, self.expire))
            say(self.out, f"{label}: sent, waiting for the front-end's reply")
        else:
            say(self.out, f"{label}: sent")
            self.driver.soon(self.pump)

    def dropped(self, side: Side, message: Message) -> None:
        if side == Side.BACKEND and self.sending:
            self.sending.popleft()
        elif side == Side.FRONTEND and (waiting := self._answered(message)) is not None:
            waiting[2].cancel()
            self.waiting = None
            self.result.replies += 1
        self.driver.soon(self.pump)

    def received(self, message: Message, infos: list[FdInfo]) -> None:
        """What the front-end sent on the side channel: a reply, or something nothing asked for."""
        waiting = self._answered(message)
        if waiting is None:
            self._differ(f"{self.label}: the front-end sent {message.summary()[:60]}, which nothing asked for")
            return
        asked, recorded, timer = waiting
        timer.cancel()
        self.waiting = None
        self.result.replies += 1
        differences: list[str] = []
        if recorded is not None and recorded.reply is not None:
            expected = decode(recorded.reply.data, self.channel, self.driver.context())
            differences = reply_differences(expected, message, recorded.reply.fds, infos)
        verdict = ("(none recorded)" if recorded is None or recorded.reply is None
                   else "same" if not differences else "DIFFERS")
        say(self.out, f"{self.label}: {_origin(recorded)}{asked.name} reply {message.summary()[:60]}: {verdict}")
        for difference in differences:
            self._differ(f"{self.label} {_origin(recorded)}{asked.name} reply: {difference}")
        self.driver.soon(self.pump)

    def _answered(self, message: Message) -> tuple[Message, BackendExchange | None, Timer] | None:
        """What `message` answers: the request waiting for its reply (None when it answers nothing)."""
        waiting = self.waiting
        if waiting is not None and message.is_reply and message.request == waiting[0].request:
            return waiting
        return None

    def expire(self) -> None:
        """A reply due past its time: say so and let the next request go."""
        # The timer is cancelled whenever the request stops waiting, so one waits while it fires.
        assert self.waiting is not None, "a reply timer fired with no request waiting"
        asked, recorded, _timer = self.waiting
        self.waiting = None
        self._differ(f"{self.label} {_origin(recorded)}{asked.name}: no reply from the front-end within "
                     f"{self.reply_timeout:g} s")
        self.pump()

    def finish(self, why: str) -> None:
        """The channel or the session ended: a reply still due is missing, queued requests are not sent."""
        if self.waiting is not None:
            asked, recorded, timer = self.waiting
            timer.cancel()
            self.waiting = None
            self._differ(f"{self.label} {_origin(recorded)}{asked.name}: no reply ({why})")
        for _data, fds, _recorded in self.queue:
            close_all(fds)
        self.result.not_played += sum(1 for item in self.queue if item[2] is not None)
        self.queue.clear()

    def _differ(self, text: str) -> None:
        self.result.differences.append(text)
        self.recorder.report(text, indent="      ")


def _request_summary(exchange: Exchange) -> str:
    """A recorded request named as `read` names it (its request name), for what replay says of it."""
    return request_name(Channel.MAIN, request_number(exchange.request.data))


def _origin(recorded: BackendExchange | None) -> str:
    """How a back-end request is named in what replay says: by its number in the recording, or as a hook's."""
    return f"recorded #{recorded.number} " if recorded is not None else "injected "


class ScriptedBackend:
    """The back-end side of a replayed connection: each request of the front-end gets the recorded reply (or a
    default one, or ends the session, by `unknown_policy`); each recorded side-channel request (back-end channel,
    GPU socket) goes once the main-channel message recorded before it has been received (a request) or has gone
    (a reply), in recorded order on its channel."""

    side = Side.BACKEND

    def __init__(self, driver: Driver, exchanges: list[Exchange], backend_requests: Sequence[BackendExchange],
                 unknown_policy: str, default_reply: int, recorder: Recorder, out, reply_timeout: float,
                 gpu_requests: Sequence[BackendExchange] = ()):
        self.driver, self.exchanges, self.unknown_policy = driver, exchanges, unknown_policy
        self.default_reply, self.recorder, self.out = default_reply, recorder, out
        self.fresh = FreshFds()
        self.result = ServeResult(recorded=len(exchanges))
        self.answered: set[int] = set()        # indexes of the recorded exchanges a live request matched
        self.to_play = {Channel.BACKEND: deque(backend_requests), Channel.GPU: deque(gpu_requests)}
        self.side_requests = {channel: BackendRequests(driver, self.fresh, self.result, recorder, out, reply_timeout,
                                                       channel) for channel in SIDE_CHANNELS}
        self.kicks = RingKicks(driver, recorder)
        self.held: list[int] = []            # other sockets the front-end passed: closed at the end
        self.cursor = 0
        # Our main-channel messages on their way: ("reply", index of the recorded exchange or None) or
        # ("injected", None).
        self.replies: deque[tuple[str, int | None]] = deque()

    def start(self) -> None:
        pass

    def deliver(self, channel: Channel, message: Message, context: DecodeContext, fds: list[int],
                infos: list[FdInfo], awaits_reply: bool) -> None:
        if channel in self.side_requests:
            close_all(fds)
            self.side_requests[channel].received(message, infos)
        elif channel == Channel.MAIN:
            self._keep(message, fds, infos)
            self._answer(message, context)
        else:
            close_all(fds)

    def _keep(self, message: Message, fds: list[int], infos: list[FdInfo]) -> None:
        """The fds a request brought: kick eventfds are watched, sockets kept until the end, the rest closed."""
        kick = message.raw[HEADER_SIZE] if message.request == F.SET_VRING_KICK and len(message.raw) > HEADER_SIZE \
            else None
        for fd, info in zip(fds, infos, strict=True):
            if info.kind == "socket":
                self.held.append(fd)
            elif kick is not None and info.kind == "eventfd":
                self.kicks.watch(kick, fd)
            else:
                os.close(fd)

    def _answer(self, message: Message, context: DecodeContext) -> None:
        self.result.requests += 1
        match, self.cursor = find_recorded(self.exchanges, self.cursor, message.raw)
        if match is None:
            self.result.not_recorded.append(message.summary())
            if self.unknown_policy == "fail":
                self.result.failed = (f"request #{self.result.requests} {message.summary()} is not in the "
                                      f"recording (policy: fail)")
                self.recorder.report(self.result.failed)
                self.driver.close(self.result.failed)
                return
        reply, reply_fds = answer(message, match, context, self.fresh, self.default_reply)
        shown = decode(reply, Channel.MAIN, self.driver.context()).summary() if reply else "(no reply)"
        note = "" if match else "  [not in the recording: default answer]"
        say(self.out, f"#{self.result.requests:<4} {message.summary()[:72]:<72} -> {shown}{note}")
        index = self.cursor - 1 if match is not None else None
        if index is not None:
            self.answered.add(index)
            self._reached((index, 0))
        if reply is not None:
            self.replies.append(("reply", index))
            self.driver.send(Channel.MAIN, reply, reply_fds)
            promised = HEADER_STRUCT.unpack_from(reply)[2] if len(reply) >= HEADER_SIZE else 0
            if promised > len(reply) - HEADER_SIZE:
                # A front-end reads a reply whole before its next request, so nothing we send later on this
                # channel can be the rest this header promises: closing our side hands the session's framer's
                # partial reply to the front-end as it is, then the end, at once rather than at a timeout.
                self.result.stuck = (f"request #{self.result.requests}: the reply's header promises {promised} "
                                     f"payload bytes, it carries {len(reply) - HEADER_SIZE}")
                self.recorder.report(self.result.stuck)
                self.driver.close_side(Channel.MAIN)
        elif index is not None:
            self._reached((index, 1))

    def _reached(self, place: tuple[int, int]) -> None:
        """The live session got to this place of the recording: play the side-channel requests recorded up to it."""
        for channel, to_play in self.to_play.items():
            while to_play and to_play[0].after <= place:
                self.side_requests[channel].play(to_play.popleft())

    def going(self, channel: Channel, message: Message, context: DecodeContext, fds: list[int],
              awaits_reply: bool) -> None:
        if channel in self.side_requests:
            self.side_requests[channel].going(message, awaits_reply)
        elif channel == Channel.MAIN and self.replies:
            self._gone(*self.replies.popleft(), message)

    def _gone(self, kind: str, index: int | None, message: Message | None) -> None:
        """One of our main-channel messages went (or a hook dropped it: `message` None)."""
        if kind == "injected":
            if message is not None:
                say(self.out, f"injected to the front-end: {message.summary()[:72]}")
            return
        self.result.replies += message is not None
        if index is not None:
            self._reached((index, 1))

    def dropped(self, channel: Channel, side: Side, message: Message) -> None:
        if channel in self.side_requests:
            self.side_requests[channel].dropped(side, message)
        elif channel == Channel.MAIN and side == Side.BACKEND and self.replies:
            self._gone(*self.replies.popleft(), None)

    def inject(self, channel: Channel, data: bytes, fds: list[int]) -> None:
        """A hook's injection: a main-channel reply goes now, a side-channel request in its turn."""
        if channel in self.side_requests:
            self.side_requests[channel].inject(data, fds)
        else:
            self.replies.append(("injected", None))
            self.driver.send_injected(channel, data, fds)

    def peer_closed(self, channel: Channel) -> None:
        self.result.ended = self.result.ended or (f"front-end closed the connection after "
                                                  f"{self.result.requests} requests")
        self.driver.close_side(channel)

    def channel_closed(self, channel: Channel) -> None:
        if channel in self.side_requests:
            self.recorder.event(f"{_LABELS[channel]} closed", kind=EventKind.CHANNEL_CLOSED)
            self.side_requests[channel].finish(f"the {_LABELS[channel]} closed")

    def ended(self, reason: str) -> None:
        self.result.ended = self.result.ended or reason

    def our_end(self, fd: int) -> socket.socket | None:
        return None

    def close(self) -> None:
        self.result.never_came = [f"#{exchange.number} {_request_summary(exchange)}"
                                  for index, exchange in enumerate(self.exchanges) if index not in self.answered]
        for channel, requests in self.side_requests.items():
            requests.finish("the session ended")
            self.result.side[channel].not_played += len(self.to_play[channel])
        self.fresh.close()
        close_all(self.held)
        self.kicks.close()


def serve_front_end(peer: socket.socket, exchanges: list[Exchange], unknown_policy: str, recorder: Recorder,
                    out, default_reply: int = 0, chain: HookChain | None = None, *,
                    backend_requests: Sequence[BackendExchange] = (), reply_timeout: float = REPLY_TIMEOUT,
                    device: str | None = None, gpu_requests: Sequence[BackendExchange] = ()) -> ServeResult:
    """One front-end connection, answered from the recording until the front-end leaves."""
    session = Session(CONNECTION, chain, ContextTracker(device), scripted=Side.BACKEND, follow=True, device=device)
    driver = Driver(session, recorder, out, device)
    script = ScriptedBackend(driver, exchanges, list(backend_requests), unknown_policy, default_reply, recorder,
                             out, reply_timeout, list(gpu_requests))
    recorder.connected("replay --as backend: front-end connected", device)
    try:
        driver.attach(Channel.MAIN, peer)
        driver.run(script)
    finally:
        script.close()
        driver.shut()
        played = [channel for channel, requests in ((Channel.BACKEND, backend_requests), (Channel.GPU, gpu_requests))
                  if requests]
        summary = script.result.summary(played)
        recorder.event(f"replay --as backend: {summary}")
        say(out, summary)
    return script.result


def replay_as_backend(records: list, listen_path: str, connection: int | None = None,
                      unknown_policy: str = "default", writer=None, out=sys.stdout, once: bool = True,
                      default_reply: int = 0, hooks=(), on_hook_error: str = "forward",
                      reply_timeout: float = REPLY_TIMEOUT, device: str | None = None) -> int:
    """Answer a real front-end from the recorded replies and play the recorded back-end-channel requests.
    Exit status: 1 when the policy failed a request, or when the front-end left before it sent every recorded
    request (each missing one is named)."""
    connection, exchanges = load_exchanges(records, connection)
    backend_requests = load_backend_requests(records, connection, exchanges)
    gpu_requests = load_backend_requests(records, connection, exchanges, Channel.GPU)
    device = device or device_type(records, connection)          # `device`: the device type, over the recording's
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(listen_path):
        os.unlink(listen_path)
    listener.bind(listen_path)
    listener.listen(1)
    extra = f", {len(backend_requests)} back-end-channel requests" if backend_requests else ""
    extra += f", {len(gpu_requests)} GPU-channel requests" if gpu_requests else ""
    say(out, f"replaying the back-end of connection {connection} ({len(exchanges)} recorded requests{extra}) "
             f"on {listen_path}")
    try:
        while True:
            peer, _ = listener.accept()
            result = serve_front_end(peer, exchanges, unknown_policy, Recorder(writer, out), out, default_reply,
                                     HookChain(list(hooks), on_hook_error, report=lambda text: say(out, text)),
                                     backend_requests=backend_requests, reply_timeout=reply_timeout,
                                     device=device, gpu_requests=gpu_requests)
            if result.never_came:
                say(out, f"{len(result.never_came)} of {result.recorded} recorded requests never came: "
                         + ", ".join(result.never_came[:10])
                         + (f", ... and {len(result.never_came) - 10} more" if len(result.never_came) > 10 else ""))
            status = 1 if result.failed or result.incomplete else 0
            if once:
                return status
    finally:
        listener.close()
        if os.path.exists(listen_path):
            os.unlink(listen_path)
