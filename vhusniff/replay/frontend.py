"""`replay --as frontend`: a scripted front-end plays a recorded connection's requests to a real back-end and
compares the replies with the recorded ones."""
from __future__ import annotations

import socket
import struct
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from ..engine import Session, Side
from ..engine.hooks import HookChain
from ..model import Channel, FdInfo, Record
from ..protocol import catalogue as cat
from ..protocol.context import ContextTracker
from ..protocol.grammar import (
    FIXED_SIZE,
    HEADER_SIZE,
    HEADER_STRUCT,
    DecodeContext,
    Message,
    build_message,
    decode,
)
from .driver import CONNECTION, REPLY_TIMEOUT, Driver, Recorder, Timer, close_all, say
from .fresh import FreshFds
from .recording import (
    Exchange,
    decode_recorded,
    device_type,
    load_exchanges,
    regions,
    reply_differences,
    ring_positions,
    side_channel_replies,
)

F = cat.FrontendRequest
QUIET = 0.05          # after the last reply: how long the back-end may still send what nothing asked for


@dataclass
class ReplayResult:
    requests_sent: int = 0
    replies_compared: int = 0
    divergences: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    gpu_requests: int = 0              # the back-end's requests on the GPU socket
    gpu_replies: int = 0               # our answers to them (recorded ones where the recording has them)

    @property
    def identical(self) -> bool:
        return not self.divergences


@dataclass
class Outgoing:
    """A main-channel request of the script's, from being handed to the session until its reply is in."""
    exchange: Exchange | None          # None: a hook's injection
    label: str
    recorded: Message | None = None    # the request decoded: a recorded one from the start, an injected one as it goes
    timer: Timer | None = None         # the wait for its reply, once it went

    def message(self) -> Message:
        """The request decoded, once known: a recorded request at once, an injected one when it has gone."""
        assert self.recorded is not None, "asked of a recorded request, or of an injected one that has gone"
        return self.recorded


class ScriptedFrontend:
    """The front-end side of a replayed connection. Like a real front-end it has one main-channel request
    outstanding at a time: the next recorded request, or a request a hook injected, goes once the reply the
    protocol requires (or the recording has) is in. It answers the back-end's requests on the back-end channel
    with an ack of 0 when one is due, and on the GPU socket with the recorded replies to the same request, in
    recorded order (zeroes where none was recorded). Each ring is placed where the recorded session left it."""

    side = Side.FRONTEND
    quiet = QUIET        # after the last reply, how long to wait before closing (a subclass may not wait)

    def __init__(self, driver: Driver, exchanges: list[Exchange], fresh: FreshFds, result: ReplayResult, out,
                 reply_timeout: float, device: str | None, decoder=decode):
        self.driver, self.exchanges, self.fresh, self.result, self.out = driver, exchanges, fresh, result, out
        self.reply_timeout = reply_timeout
        self.recorded_tracker = ContextTracker(device)
        self.recorded_tracker.decoder = decoder       # a fuzzer's decodes the same recorded requests every time
        self.positions = ring_positions(exchanges, decoder)
        self.pending_ring: dict[int, int] = {}
        self.next = 0                                  # index of the next recorded exchange
        self.injected: deque[tuple[Channel, bytes, list[int]]] = deque()   # a hook's messages, in order
        self.outgoing: Outgoing | None = None          # handed to the session, not yet answered
        self.over = False
        # Once a request's header promised more bytes than it carries, the back-end frames what follows otherwise
        # than the recording: requests go back to back, and replies are counted, not paired (see _out_of_step).
        self.out_of_step = False
        self.bytes_sent = 0                            # main-channel bytes the script sent, since it went out of step
        self.bytes_framed = 0                          # of those, the bytes the session framed into messages
        self.replies_owed = 0                          # replies the protocol requires to the messages so framed
        self.settle_timer: Timer | None = None
        # the recorded GPU-socket replies per request number (side_channel_replies), set by replay_as_frontend
        self.gpu_replies: dict[int, deque[Record]] = {}

    def start(self) -> None:
        self.step()

    def step(self) -> None:
        """Send what comes next, when the main channel is free."""
        if self.over:
            return
        # A back-end-channel reply goes at once, unless a main-channel request injected before it waits.
        while self.injected and self.injected[0][0] == Channel.BACKEND:
            self.driver.send_injected(*self.injected.popleft())
        if self.outgoing is not None:
            return
        if self.injected:
            self.outgoing = Outgoing(None, "")
            self.driver.send_injected(*self.injected.popleft())
        elif self.next < len(self.exchanges):
            exchange = self.exchanges[self.next]
            self.next += 1
            recorded = decode_recorded(self.recorded_tracker, exchange.request)
            sizes = [region.mmap_offset + region.memory_size for region in regions(recorded)]
            fds = [self.fresh.make(info, sizes[i] if i < len(sizes) else 0)
                   for i, info in enumerate(exchange.request.fds)]
            data = self._rewrite(recorded, exchange)
            if self.out_of_step or promised_beyond(data):
                self._send_out_of_step(exchange, recorded, data, fds)
                return
            self.outgoing = Outgoing(exchange, f"#{exchange.number:<4} {recorded.name:<24}", recorded)
            self.driver.send(Channel.MAIN, data, fds)
        elif self.out_of_step:
            self.driver.after(0, self._settle)
        else:
            self.driver.after(self.quiet, self.finish)

    # ---- a header that promised more than its message carries ----

    def _send_out_of_step(self, exchange: Exchange, recorded: Message, data: bytes, fds: list[int]) -> None:
        """Send a request as it is and go on at once: the first one promised more bytes than it carries, so the
        back-end reads the next requests' bytes as its payload (as the session's framer does), and no reply can
        be told to answer one request of ours."""
        if not self.out_of_step:
            self.out_of_step = True
            promised = HEADER_STRUCT.unpack_from(data)[2]
            self.diverge(f"message #{exchange.number} {recorded.name}: its header promises {promised} payload "
                         f"bytes, it carries {len(data) - HEADER_SIZE}: the back-end reads the next requests as "
                         f"its payload")
        self.result.requests_sent += 1
        self.result.log.append(f"#{exchange.number:<4} {recorded.name:<24} sent out of step")
        self.bytes_sent += len(data)
        self.driver.send(Channel.MAIN, data, fds)
        self.driver.soon(self.step)

    def _going_out_of_step(self, message: Message, awaits_reply: bool) -> None:
        """A message as the session framed it from our bytes out of step: the back-end owes it a reply if the
        protocol requires one."""
        self.bytes_framed += len(message.raw)
        if awaits_reply:
            self.replies_owed += 1

    def _settle(self) -> None:
        """Everything is sent out of step. Bytes left unframed are a message the back-end waits for and never gets:
        the script ends here rather than wait for a reply that cannot come. Else it waits for the replies owed."""
        if self.over:
            return
        if self.bytes_framed < self.bytes_sent:
            text = (f"the last {self.bytes_sent - self.bytes_framed} bytes sent do not make a whole message: the "
                    f"back-end waits for the rest of it, which no request of the recording supplies")
            # Closing our side hands the session's framer's partial message to the back-end as it is (a front-end
            # that stopped mid-message); the connection ends once that is sent.
            self.driver.close_side(Channel.MAIN)
            self.driver.after(0, lambda: None if self.over else self.stop(text))
        elif self.replies_owed <= 0:
            self.finish()
        else:
            self.settle_timer = self.driver.after(self.reply_timeout, self.timed_out)

    def _reply_out_of_step(self, message: Message) -> None:
        if message.is_reply:
            self.replies_owed -= 1
        if self.replies_owed <= 0 and self.settle_timer is not None:
            self.settle_timer.cancel()
            self.settle_timer = None
            self.finish()

    def finish(self) -> None:
        if self.over:
            return
        if self.outgoing is not None or self.injected or self.driver.busy():
            self.driver.after(self.quiet, self.finish)
            return
        self.over = True
        self.driver.close("replay finished")

    # ---- what the session hands over ----

    def going(self, channel: Channel, message: Message, context: DecodeContext, fds: list[int],
              awaits_reply: bool) -> None:
        """Our message leaves for the back-end now, hooks applied: place memory and rings first."""
        if channel == Channel.MAIN and self.out_of_step:
            self._going_out_of_step(message, awaits_reply)
            return
        outgoing = self.outgoing
        if channel != Channel.MAIN or outgoing is None or outgoing.timer is not None:
            return
        for region, fd in zip(regions(message), fds, strict=False):
            self.fresh.remember_region(region.userspace_addr, region.memory_size, region.mmap_offset, fd)
        self._place_ring(message)
        if outgoing.exchange is None:
            outgoing.label, outgoing.recorded = f"injected {message.summary()[:60]}", message
        else:
            self.result.requests_sent += 1
        if outgoing.exchange is not None and outgoing.exchange.reply is not None or awaits_reply:
            outgoing.timer = self.driver.after(self.reply_timeout, self.timed_out)
            return
        if outgoing.exchange is None:
            say(self.out, f"      {outgoing.label}: sent")
        else:
            self.result.log.append(f"{outgoing.label} sent")
        self.outgoing = None
        self.driver.soon(self.step)

    def deliver(self, channel: Channel, message: Message, context: DecodeContext, fds: list[int],
                infos: list[FdInfo], awaits_reply: bool) -> None:
        close_all(fds)
        if channel == Channel.GPU:
            self.result.gpu_requests += 1
            if awaits_reply:
                self.result.gpu_replies += 1
                self.driver.send(Channel.GPU, self._gpu_answer(message), [])
            return
        if channel == Channel.BACKEND:
            if awaits_reply:
                self.driver.send(Channel.BACKEND, build_message(Channel.BACKEND, message.request, {"ack": 0},
                                                                reply=True, kind="ack"), [])
            return
        outgoing = self.outgoing
        if channel != Channel.MAIN or self.over:
            return
        if self.out_of_step:
            self._reply_out_of_step(message)
            return
        if outgoing is None or outgoing.timer is None:
            self.diverge(f"after message #{self._last_number()}: the back-end sent {message.summary()}, which "
                         f"nothing asked for")
            return
        outgoing.timer.cancel()
        self.outgoing = None
        if outgoing.exchange is None:
            say(self.out, f"      {outgoing.label}: reply {message.summary()[:72]}")
            if message.request != outgoing.message().request or not message.is_reply:
                self.diverge(f"{outgoing.label}: the back-end answered {message.summary()}")
        else:
            self._compare(outgoing, outgoing.exchange, message, infos)
        self.driver.soon(self.step)

    def _compare(self, outgoing: Outgoing, exchange: Exchange, replayed: Message, infos: list[FdInfo]) -> None:
        self.result.replies_compared += 1
        if exchange.reply is None:
            differences = [f"the back-end replied ({replayed.summary()}); the recording has no reply"]
        else:
            expected = decode_recorded(self.recorded_tracker, exchange.reply)
            differences = reply_differences(expected, replayed, exchange.reply.fds, infos)
        line = f"{outgoing.label} reply " + ("same" if not differences else "DIFFERS")
        self.result.log.append(line)
        say(self.out, line)
        for difference in differences:
            self.diverge(f"message #{exchange.number} {outgoing.message().name} reply: {difference}")

    def dropped(self, channel: Channel, side: Side, message: Message) -> None:
        outgoing = self.outgoing
        if channel != Channel.MAIN or outgoing is None:
            return
        exchange = outgoing.exchange
        if side == Side.FRONTEND and outgoing.timer is None:
            self.outgoing = None
            if exchange is not None and exchange.reply is not None:
                self.diverge(f"message #{exchange.number} {outgoing.message().name}: dropped by a hook, so its "
                             f"recorded reply #{exchange.reply_number} was not asked for")
        elif side == Side.BACKEND and outgoing.timer is not None and message.is_reply:
            outgoing.timer.cancel()
            self.outgoing = None
            self.diverge(f"{self._what(outgoing)}: the reply was dropped by a hook")
        self.driver.soon(self.step)

    def inject(self, channel: Channel, data: bytes, fds: list[int]) -> None:
        """A hook's injection: a main-channel request goes in its turn, a back-end-channel reply at once."""
        self.injected.append((channel, data, fds))
        self.driver.soon(self.step)

    def timed_out(self) -> None:
        if self.out_of_step and self.outgoing is None:
            self.stop(f"no reply (timeout; waited up to {self.reply_timeout:g} s for {self.replies_owed} replies the "
                      f"protocol requires to the messages the back-end read out of step)")
            return
        if self.driver.holding_for(Side.FRONTEND):          # a hook's delay is not the back-end's slowness
            # The timer is cancelled whenever its request stops waiting, so one waits while it fires.
            assert self.outgoing is not None, "a reply timer fired with no request waiting"
            self.outgoing.timer = self.driver.after(self.reply_timeout, self.timed_out)
            return
        self.stop(f"no reply (timeout; waited up to {self.reply_timeout:g} s; {self._expected()})")

    def peer_closed(self, channel: Channel) -> None:
        self.ended("the back-end closed the connection")
        self.driver.close_side(channel)

    def channel_closed(self, channel: Channel) -> None:
        pass

    def ended(self, reason: str) -> None:
        if self.over:
            return
        if self.outgoing is not None and self.outgoing.timer is not None:
            self.stop(f"no reply ({reason}; {self._expected()})")
        elif self.outgoing is not None and self.outgoing.exchange is not None:
            self.stop(f"not sent, {reason}")
        elif self.next < len(self.exchanges):
            exchange = self.exchanges[self.next]
            self.outgoing = Outgoing(exchange, "", decode_recorded(self.recorded_tracker, exchange.request))
            self.stop(f"not sent, {reason}")
        else:
            self.over = True
            self.diverge(f"after the last request: {reason}")

    def our_end(self, fd: int) -> socket.socket | None:
        return self.fresh.take_our_end(fd)

    def discard(self) -> None:
        """The session is over: a hook's injections still waiting are not sent."""
        for _channel, _data, fds in self.injected:
            close_all(fds)
        self.injected.clear()

    # ---- helpers ----

    def stop(self, text: str) -> None:
        """A divergence the replay cannot go past: say it of the outgoing request and end the session."""
        self.over = True
        self.diverge(f"{self._what(self.outgoing)}: {text}")
        self.driver.close(text)

    def diverge(self, text: str) -> None:
        self.result.divergences.append(text)
        say(self.out, "      " + text)

    def _what(self, outgoing: Outgoing | None) -> str:
        if outgoing is None:
            return f"after message #{self._last_number()}"
        if outgoing.exchange is None:
            return outgoing.label or "a hook's injected request"
        return f"message #{outgoing.exchange.number} {outgoing.message().name}"

    def _expected(self) -> str:
        exchange = self.outgoing.exchange if self.outgoing else None
        if exchange is not None and exchange.reply is not None:
            return f"recorded reply #{exchange.reply_number}"
        return "the protocol requires a reply"

    def _last_number(self) -> int:
        return self.exchanges[self.next - 1].number if self.next else 0

    def _gpu_answer(self, message: Message) -> bytes:
        """The recorded reply to a GPU request (the display the recorded front-end had: its size, its EDID), the
        next in recorded order, the last one again once they run out; zeroes of the reply's size when none."""
        recorded = self.gpu_replies.get(message.request)
        if recorded:
            return (recorded.popleft() if len(recorded) > 1 else recorded[0]).data
        spec = message.spec
        kind = spec.reply_kinds[0] if spec is not None and spec.reply_kinds else "empty"
        return build_message(Channel.GPU, message.request, bytes(FIXED_SIZE.get(kind) or 0), reply=True)

    def _rewrite(self, message: Message, exchange: Exchange) -> bytes:
        """SET_VRING_BASE starts the ring where the recorded session's next GET_VRING_BASE found it."""
        data = exchange.request.data
        if message.kind is None or message.is_reply or message.request != F.SET_VRING_BASE or \
                exchange.number not in self.positions:
            return data
        index, position = message.payload.index, self.positions[exchange.number]
        self.pending_ring[index] = position
        return data[:HEADER_SIZE] + struct.pack("<II", index, position)

    def _place_ring(self, message: Message) -> None:
        """Before SET_VRING_ADDR goes out, set the ring's avail and used idx in our memory to its base, so that
        the back-end (libvhost-user reads used->idx here) sees nothing pending."""
        if message.kind is None or message.is_reply or message.request != F.SET_VRING_ADDR or \
                message.payload.index not in self.pending_ring:
            return
        position = self.pending_ring.pop(message.payload.index) & 0xFFFF
        # Both rings start with flags:u16, then idx:u16.
        self.fresh.write_u16(message.payload.avail + 2, position)
        self.fresh.write_u16(message.payload.used + 2, position)


def promised_beyond(data: bytes) -> bool:
    """Whether a message's header promises more payload than the message carries."""
    return len(data) >= HEADER_SIZE and HEADER_STRUCT.unpack_from(data)[2] > len(data) - HEADER_SIZE


def play_frontend(driver: Driver, sock: socket.socket, script: ScriptedFrontend, fresh: FreshFds) -> None:
    """Run a scripted front-end on a connected back-end socket to its end; whatever happens, its fds and the
    driver's sockets are closed."""
    try:
        driver.attach(Channel.MAIN, sock)
        driver.run(script)
    finally:
        script.discard()
        driver.shut()
        fresh.close()


def replay_as_frontend(records: list, backend_path: str, connection: int | None = None, writer=None,
                       out=sys.stdout, reply_timeout: float = REPLY_TIMEOUT, hooks=(),
                       on_hook_error: str = "forward", device: str | None = None) -> ReplayResult:
    """Play one recorded connection's front-end side against a real back-end and compare the replies (`device`:
    the device type, over the recording's)."""
    connection, exchanges = load_exchanges(records, connection)
    device = device or device_type(records, connection)
    result = ReplayResult()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(backend_path)
    except OSError as error:
        sock.close()
        result.divergences.append(f"cannot connect to the back-end at {backend_path}: {error.strerror}")
        say(out, f"vhusniff replay: {result.divergences[0]}")
        return result
    recorder = Recorder(writer, out)
    chain = HookChain(list(hooks), on_hook_error, report=lambda text: say(out, text))
    session = Session(CONNECTION, chain, ContextTracker(device), scripted=Side.FRONTEND, follow=True,
                      device=device)
    driver, fresh = Driver(session, recorder, out, device), FreshFds()
    recorder.connected(f"replay --as frontend: connection {connection} of the recording, back-end {backend_path}",
                       device)
    started = time.monotonic()
    script = ScriptedFrontend(driver, exchanges, fresh, result, out, reply_timeout, device)
    script.gpu_replies = side_channel_replies(records, connection, Channel.GPU)
    play_frontend(driver, sock, script, fresh)
    result.elapsed = time.monotonic() - started
    verdict = ("identical to the recording" if not result.divergences else
               f"{len(result.divergences)} divergences; first divergence: {result.divergences[0]}")
    gpu = f", answered {result.gpu_replies} of {result.gpu_requests} GPU-socket requests" \
        if result.gpu_requests else ""
    recorder.report(f"replayed {result.requests_sent} of {len(exchanges)} requests of connection {connection}, "
                    f"compared {result.replies_compared} replies{gpu} in {result.elapsed:.2f} s: {verdict}")
    return result
