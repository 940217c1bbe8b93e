"""The sans-io session core: one object per vhost-user connection, all its channels, no I/O.

A driver (the proxy's epoll loop, replay's scripted peers, the fuzzer) feeds a `Session` what happened:
bytes and fds received from a side on a channel, a side that closed, a send that failed, a timer that fired,
each with the time it happened. The session answers with commands, in the order the driver must carry them
out: record this, send that (fds on its first byte), close these fds, shut that side's writing half, close a
channel or the connection, wake me in T seconds. It owns framing, the message count, hook dispatch with the
one interpretation of every verdict (forward, change, drop, delay, inject, disconnect), the half-close policy,
and the ledger of the fds it holds: every fd a driver hands in leaves in exactly one Send or CloseFds.

It reads no clock, touches no socket and runs no thread, so its behaviour is tested by playbooks: events in,
commands asserted (tests/test_core.py).
"""
from __future__ import annotations

import enum
from collections import deque
from typing import NamedTuple

from ..model import Channel, Direction, EventKind, Record
from ..protocol import catalogue as cat
from ..protocol.context import ContextTracker
from ..protocol.framing import Frame, Framer, FramingError, StrayFds
from ..protocol.grammar import DEFAULT_CONTEXT, DecodeContext, Message, decode
from ..protocol.replies import Expect, expectation
from .hooks import Flow, HookChain

# QEMU's chardev accepts at most 16 fds a message (TCP_MAX_FDS); more is a finding, still forwarded.
MAX_FDS_SEEN_IN_PRACTICE = 16
# After one side closes its sending half, how long the other may keep talking before the pair is closed.
HALF_CLOSE_GRACE_SECONDS = 5.0
HALF_CLOSE = "half-close"                     # the Wake token of the half-close grace period


class Side(enum.IntEnum):
    """A party of the connection; its value is the Direction of what it sends."""
    FRONTEND = 0
    BACKEND = 1

    @property
    def other(self) -> Side:
        return Side.BACKEND if self is Side.FRONTEND else Side.FRONTEND

    @property
    def label(self) -> str:
        return "front-end" if self is Side.FRONTEND else "back-end"

    @property
    def direction(self) -> Direction:
        return Direction(self.value)


# ---- commands: what a driver must do, in order ----

class Fate(enum.Enum):
    """What became of a captured message, as data (its note says it to a person)."""
    FORWARDED = "forwarded"
    DROPPED = "dropped"                  # a hook dropped it
    NOT_FORWARDED = "not forwarded"      # a hook disconnected instead of forwarding it
    NOT_DELIVERED = "not delivered"      # the side it was for had closed

class Capture(NamedTuple):
    """Record a message as it travelled (fds described by the driver, before they are sent or closed)."""
    timestamp_ns: int
    channel: Channel
    direction: Direction
    data: bytes
    fds: list
    note: str
    unframed: bool = False           # not one well-framed message: the rest of a stream that cannot be framed
    fate: Fate = Fate.FORWARDED
    # With Session(follow=True), for a forwarded message: it decoded in the session's context as it travelled,
    # and whether the protocol now awaits a reply to it (protocol.replies, the one reply rule).
    message: Message | None = None
    awaits_reply: bool = False


class Note(NamedTuple):
    """Record a lifecycle event or finding; `problem` ones are also reported. `describe` fds are named in it."""
    timestamp_ns: int
    channel: Channel
    text: str
    problem: bool = False
    describe: tuple = ()
    kind: EventKind = EventKind.NOTE


class Send(NamedTuple):
    """Send to side `to` on `channel`, fds on the first byte; the fds become the driver's. With `interpose`,
    the driver relays the channel named there through a pair of its own and sends its end instead of fds[0]
    (it then calls Session.interposed)."""
    channel: Channel
    to: Side
    data: bytes
    fds: list
    interpose: Channel | None = None


class CloseFds(NamedTuple):
    fds: list


class StopReading(NamedTuple):
    channel: Channel
    side: Side


class ShutWrite(NamedTuple):
    """Pass a close on: shut the writing half toward `side` (once what is queued for it has gone)."""
    channel: Channel
    side: Side


class CloseChannel(NamedTuple):
    channel: Channel


class CloseConnection(NamedTuple):
    reason: str


class Inject(NamedTuple):
    """A hook injected this as coming from the scripted `side` (see Session's `scripted`): the driver hands it
    to that side's script, which sends it with Session.send_injected when its protocol lets it."""
    channel: Channel
    side: Side
    data: bytes
    fds: list


class Wake(NamedTuple):
    """Call Session.timer(token, now) after `seconds`."""
    seconds: float
    token: object


class Awaited(NamedTuple):
    """A request the protocol requires an answer to, not answered yet."""
    number: int                      # its message number on the connection
    request: int
    name: str
    expect: str                      # protocol.replies.Expect.REPLY or ACK
    since_ns: int


Command = Capture | Note | Send | CloseFds | StopReading | ShutWrite | CloseChannel | CloseConnection | Inject | Wake

# Requests whose one fd is a socket that opens a side channel: request -> the channel it carries.
_SIDE_CHANNEL_REQUESTS = {int(request): channel for request, channel in cat.SIDE_CHANNEL_REQUESTS.items()}
_SET_DEVICE_STATE_FD = int(cat.DEVICE_STATE_REQUEST)
_CLOSE_MARK = object()                        # a held "close the connection" after delayed messages


class Stream:
    """What one side sends on one channel: its framer and whether it could still be framed."""
    __slots__ = ("framer", "unframed", "read_closed")

    def __init__(self, peer: str, channel: Channel = Channel.MAIN):
        self.framer = Framer.for_channel(peer, channel)     # each channel's limits (the GPU's UPDATE is large)
        self.unframed = False
        self.read_closed = False


class Session:
    """One vhost-user connection between a front-end and a back-end, as a state machine.

    hooks: a HookChain (vhusniff.engine.hooks) or None; tracker: the ContextTracker hooks decode with.
    interpose_device_state: ask the driver to relay SET_DEVICE_STATE_FD's pipe.
    follow, device: follow the negotiated context (from `device`) and the replies the protocol awaits; each
    forwarded message's Capture then carries it decoded and whether it awaits a reply.
    scripted: the side a script plays (replay), if any. A hook's injection then goes to that script (Inject)
    when it is something that side sends (the front-end: main-channel requests, back-end-channel replies; the
    back-end the other way round), and is reported and skipped otherwise.
    """

    def __init__(self, number: int, hooks: HookChain | None = None, tracker: ContextTracker | None = None,
                 interpose_device_state: bool = False, scripted: Side | None = None, follow: bool = False,
                 device: str | None = None):
        self.number = number
        self.messages = 0                     # messages framed on every channel, from 1
        self.closed = False
        self.hooks: HookChain | None = hooks if hooks else None
        self.tracker = tracker
        self.interpose_device_state = interpose_device_state
        self.scripted = scripted
        # follow: decode every forwarded message in the context it negotiates and keep the requests awaiting
        # an answer (replay and the fuzzer need both; the proxy's fast path does without).
        self.followed: ContextTracker | None = ContextTracker(device) if follow else None
        self._awaiting: dict[Channel, deque[Awaited]] = {}
        self.channels: set[Channel] = set()
        self._streams: dict[tuple[Channel, Side], Stream] = {}
        self._write_shut: set[tuple[Channel, Side]] = set()
        self._held: dict[tuple[Channel, Side], deque] = {}
        self._half_closing = False
        self.open_channel(Channel.MAIN)

    # ---- the streams a driver may read directly ----

    def stream(self, channel: Channel, side: Side) -> Stream:
        """What `side` sends on `channel`: a driver's fast path reads its framer and `unframed` directly."""
        return self._streams[(channel, side)]

    def framer(self, channel: Channel, side: Side) -> Framer:
        return self._streams[(channel, side)].framer

    def plain(self, channel: Channel, side: Side) -> bool:
        """True when a whole fd-less message may bypass received(): no hooks, framed, nothing held for its
        destination. The driver then counts it in `messages` and records and sends it itself (the proxy's fast
        path tests the same things inline: without hooks nothing is ever held)."""
        return self.hooks is None and not self._streams[(channel, side)].unframed and not self._held

    def open_channel(self, channel: Channel) -> None:
        self.channels.add(channel)
        where = f"connection {self.number}" + ("" if channel == Channel.MAIN else f" {channel.name.lower()} channel")
        for side in Side:
            self._streams[(channel, side)] = Stream(f"{where} {side.label}", channel)
            self._write_shut.discard((channel, side))

    # ---- events in ----

    def received(self, channel: Channel, side: Side, data: bytes, fds: list, now_ns: int,
                 truncated: bool = False) -> list:
        """`side` sent `data` (with `fds`) on `channel`; b"" means it closed its sending half."""
        out: list = []
        if truncated:
            out.append(Note(now_ns, channel, f"{side.label} sent more fds than the proxy can receive at once near "
                                             f"message #{self.messages + 1}; the kernel dropped the rest "
                                             f"(MSG_CTRUNC)", True, kind=EventKind.PROTOCOL_ERROR))
        if self._gone_already(channel, fds, out):
            return out
        if channel == Channel.DEVICE_STATE:
            # The migration stream is opaque bytes, not messages: recorded and passed on chunk by chunk (the
            # driver relays the pipe and says how it ended).
            if data:
                self._forward(channel, side, data, list(fds), now_ns, "device-state stream", out)
            return out
        if not data:
            if fds:
                out.append(CloseFds(list(fds)))
            self._end_of_stream(channel, side, now_ns, out)
            return out
        stream = self._streams[(channel, side)]
        if stream.unframed:
            self._forward(channel, side, data, list(fds), now_ns, "unframed: continuation of an unframeable stream",
                          out, unframed=True)
            return out
        try:
            frames = stream.framer.feed(data, fds)
            error = None
        except FramingError as framing_error:
            frames, error = framing_error.frames, framing_error
        for position, frame in enumerate(frames):
            if self.closed:
                # A hook or a close ended the connection: the rest of the chunk goes nowhere.
                left = [fd for unsent in frames[position:] for fd in unsent.fds]
                if error is not None:
                    left += list(fds)
                if left:
                    out.append(CloseFds(left))
                return out
            if isinstance(frame, Frame):
                self._message(channel, side, frame, now_ns, out)
            else:
                self._stray(channel, side, frame, now_ns, out)
        if error is not None:
            if self.closed:
                if fds:
                    out.append(CloseFds(list(fds)))
                return out
            self._unframeable(channel, side, stream, error, list(fds), now_ns, out)
        return out

    def _gone_already(self, channel: Channel, fds: list, out: list) -> bool:
        """The connection or the channel has ended: what still comes is not forwarded, its fds are closed."""
        if self.closed or channel not in self.channels:
            if fds:
                out.append(CloseFds(list(fds)))
            return True
        return False

    def whole(self, channel: Channel, side: Side, data: bytes, fds: list, now_ns: int) -> list:
        """A whole message the driver framed itself (framer(...).take_whole counted it): forwarded as any other."""
        out: list = []
        if not self._gone_already(channel, fds, out):
            self._message(channel, side, Frame(data, list(fds), 0), now_ns, out)
        return out

    def _message(self, channel: Channel, side: Side, frame: Frame, now_ns: int, out: list) -> None:
        """One whole message: numbered, then forwarded, or given to the hooks first."""
        self.messages += 1
        if self.hooks is None:
            self._forward(channel, side, frame.data, frame.fds, now_ns, "", out)
        else:
            self._hooked(channel, side, frame, now_ns, out)

    def send_failed(self, channel: Channel, to: Side, reason: str, now_ns: int) -> list:
        out: list = [Note(now_ns, channel, f"message #{self.messages} not delivered: sending to the {to.label} "
                                           f"failed: {reason}", True, kind=EventKind.NOTE)]
        self._gone(channel, to, reason, now_ns, out)
        return out

    def failed(self, channel: Channel, side: Side, reason: str, now_ns: int) -> list:
        """A side's socket failed (reset, error): it is gone."""
        out: list = []
        self._gone(channel, side, reason, now_ns, out)
        return out

    def hung_up(self, channel: Channel, side: Side, now_ns: int) -> list:
        """A side that had closed its sending half is gone altogether: nothing more can reach it."""
        out: list = []
        if self.closed:
            return out
        if channel != Channel.MAIN:
            self._close_channel(channel, out)
        else:
            self.close(f"{side.label} closed: connection closed after message #{self.messages}", now_ns, out)
        return out

    def send_injected(self, channel: Channel, side: Side, data: bytes, fds: list, now_ns: int) -> list:
        """The scripted side sends a hook's injection it was handed in an Inject: recorded and sent, no hooks."""
        out: list = []
        if self._gone_already(channel, fds, out):
            return out
        self._deliver_or_hold(channel, side, data, list(fds), "injected by hook", 0.0, now_ns, out)
        return out

    def interposed(self, channel: Channel, replaced: bool, now_ns: int) -> list:
        """The driver carried out a Send's interpose for a side channel: its two ends now feed received()."""
        out: list = []
        if replaced:
            out.append(Note(now_ns, channel, f"{channel.name.lower()} channel replaced by message #{self.messages}",
                            kind=EventKind.CHANNEL_CLOSED))
            self._drop_channel_state(channel, out)
        self.open_channel(channel)
        out.append(Note(now_ns, channel, f"{channel.name.lower()} channel interposed: the proxy relays the socket "
                                         f"passed in message #{self.messages}", kind=EventKind.CHANNEL_OPENED))
        return out

    def timer(self, token, now_ns: int) -> list:
        out: list = []
        if self.closed:
            return out
        if token == HALF_CLOSE:
            self.close(f"connection closed: the other side kept it open {HALF_CLOSE_GRACE_SECONDS:g} s after a "
                       f"close", now_ns, out)
        else:
            self._release_held(token, now_ns, out)
        return out

    def close(self, reason: str, now_ns: int, out: list | None = None) -> list:
        """End the connection: held messages and pending fds are closed, the driver closes the sockets."""
        out = [] if out is None else out
        if self.closed:
            return out
        self.closed = True
        left: list = []
        for held in self._held.values():
            for item in held:
                left.extend(item[2])
        self._held.clear()
        for stream in self._streams.values():
            left.extend(stream.framer.take_rest()[1])
        if left:
            out.append(CloseFds(left))
        out.append(CloseConnection(reason))
        out.append(Note(now_ns, Channel.MAIN, reason,
                        reason.startswith(("front-end disconnected", "back-end disconnected")), kind=EventKind.CLOSED))
        return out

    # ---- forwarding ----

    def _forward(self, channel: Channel, side: Side, data: bytes, fds: list, now_ns: int, note: str,
                 out: list, unframed: bool = False) -> None:
        """Record, then send to the other side; a message toward a closed side is recorded as not delivered."""
        to = side.other
        interpose = None
        if fds and channel == Channel.MAIN and len(data) >= 8:
            request = int.from_bytes(data[:4], "little")
            if request == _SET_DEVICE_STATE_FD:
                is_reply = bool(int.from_bytes(data[4:8], "little") & cat.FLAG_REPLY)
                if self.interpose_device_state and is_reply == (side == Side.BACKEND):
                    interpose = Channel.DEVICE_STATE
            elif side == Side.FRONTEND and len(fds) == 1:
                interpose = _SIDE_CHANNEL_REQUESTS.get(request)
        deliverable = channel in self.channels and (channel, to) not in self._write_shut
        if not deliverable:
            note = (note + "; " if note else "") + f"not delivered: the {to.label} side is closed"
        if deliverable and self.followed is not None and not unframed and channel != Channel.DEVICE_STATE:
            message = self.followed.decode_message(Record(now_ns, self.number, channel, side.direction, data))
            out.append(Capture(now_ns, channel, side.direction, data, fds, note, unframed, Fate.FORWARDED, message,
                               self._follow_reply(channel, message, now_ns)))
        else:
            out.append(Capture(now_ns, channel, side.direction, data, fds, note, unframed,
                               Fate.FORWARDED if deliverable else Fate.NOT_DELIVERED))
        if deliverable:
            out.append(Send(channel, to, data, fds, interpose))
        elif fds:
            out.append(CloseFds(fds))
        if len(fds) > MAX_FDS_SEEN_IN_PRACTICE:
            out.append(Note(now_ns, channel, f"{side.label} message #{self.messages} carries {len(fds)} fds (QEMU "
                                             f"accepts at most {MAX_FDS_SEEN_IN_PRACTICE}, DPDK and libvhost-user 8);"
                                             f" forwarded", True, kind=EventKind.PROTOCOL_ERROR))

    def awaiting(self, channel: Channel = Channel.MAIN) -> tuple[Awaited, ...]:
        """The requests on `channel` still awaiting the answer the protocol requires, oldest first (follow)."""
        return tuple(self._awaiting.get(channel, ()))

    def context(self) -> DecodeContext:
        """What the session has negotiated so far, as its messages travelled (follow)."""
        return self.followed.context_for(self.number) if self.followed is not None else DEFAULT_CONTEXT

    def _follow_reply(self, channel: Channel, message: Message, now_ns: int) -> bool:
        """Keep the requests awaiting an answer: a reply answers the oldest request of its number."""
        waiting = self._awaiting.setdefault(channel, deque())
        if message.is_reply:
            for position, awaited in enumerate(waiting):
                if awaited.request == message.request:
                    del waiting[position]
                    break
            return False
        context = message.context
        expect = expectation(message, context.protocol_features, context.profile)
        if expect not in (Expect.REPLY, Expect.ACK):
            return False
        waiting.append(Awaited(self.messages, message.request, message.name, expect, now_ns))
        return True

    def _stray(self, channel: Channel, side: Side, stray: StrayFds, now_ns: int, out: list) -> None:
        out.append(Note(now_ns, channel, f"{side.label} sent {len(stray.fds)} fd(s) with bytes at stream offset "
                                         f"{stray.offset} where no message begins (after message #{self.messages}); "
                                         f"fds described here and closed", True, tuple(stray.fds),
                                         kind=EventKind.PROTOCOL_ERROR))
        out.append(CloseFds(list(stray.fds)))

    def _unframeable(self, channel: Channel, side: Side, stream: Stream, error: FramingError, chunk_fds: list,
                     now_ns: int, out: list) -> None:
        rest, rest_fds = stream.framer.take_rest()
        self.messages += 1
        out.append(Note(now_ns, channel, f"{side.label} stream cannot be framed at message #{self.messages} (stream "
                                         f"offset {error.offset}): {error.reason}; forwarding the rest unchanged, "
                                         f"unframed", True, kind=EventKind.PROTOCOL_ERROR))
        stream.unframed = True
        self._forward(channel, side, rest, rest_fds + chunk_fds, now_ns, f"unframed: {error.reason}", out,
                      unframed=True)

    # ---- hooks: the one place a verdict is interpreted ----

    def _hooked(self, channel: Channel, side: Side, frame: Frame, now_ns: int, out: list) -> None:
        hooks, tracker = self.hooks, self.tracker
        assert hooks is not None and tracker is not None, "only a session with hooks is given whole frames to hook"
        message = tracker.decode_message(Record(now_ns, self.number, channel, side.direction, frame.data))
        flow = Flow(frame.data, list(frame.fds), self.number, channel, side.direction, self.messages,
                    message.context, message)
        hooks.run(flow)
        self.apply(flow, channel, side, frame.fds, now_ns, out)

    def apply(self, flow, channel: Channel, side: Side, received_fds: list, now_ns: int, out: list) -> None:
        """Carry out what the hooks decided for one message (`received_fds` are the fds it came with)."""
        if flow.disconnect_reason and not flow.disconnect_after_forward:
            out.append(Capture(now_ns, channel, side.direction, flow.original, received_fds,
                               f"not forwarded: {flow.disconnect_reason}", fate=Fate.NOT_FORWARDED))
            if received_fds:
                out.append(CloseFds(list(received_fds)))
            self.close(f"hook disconnected at message #{self.messages}: {flow.disconnect_reason}", now_ns, out)
            return
        delay = flow.delay_seconds
        if flow.dropped:
            out.append(Capture(now_ns, channel, side.direction, flow.original, received_fds,
                               "dropped by hook (not forwarded)", fate=Fate.DROPPED))
            if received_fds:
                out.append(CloseFds(list(received_fds)))
        else:
            data = flow.final_bytes()
            kept = set(flow.fds)
            unused = [fd for fd in received_fds if fd not in kept]
            if unused:
                out.append(CloseFds(unused))
            self._deliver_or_hold(channel, side, data, list(flow.fds),
                                  "modified by hook" if data != flow.original else "", delay, now_ns, out)
        for injected in flow.injected:
            sender = Side(int(injected.direction))
            refusal = self._refusal(injected, self.scripted) if self.scripted is not None else ""
            if refusal:
                out.append(Note(now_ns, injected.channel, refusal, True, kind=EventKind.HOOK))
                if injected.fds:
                    out.append(CloseFds(list(injected.fds)))
                continue
            if injected.channel not in self.channels:
                out.append(Note(now_ns, injected.channel, f"hook injection after message #{self.messages} has no "
                                                          f"{injected.channel.name.lower()} channel to travel on; "
                                                          f"not sent", True, kind=EventKind.HOOK))
                if injected.fds:
                    out.append(CloseFds(list(injected.fds)))
                continue
            self._deliver_or_hold(injected.channel, sender, injected.data, list(injected.fds), "injected by hook",
                                  delay, now_ns, out, to_script=self.scripted is not None)
        if flow.disconnect_reason:
            reason = f"hook disconnected after message #{self.messages}: {flow.disconnect_reason}"
            destination = (channel, side.other)
            if delay or self._held.get(destination):
                self._hold(destination, delay, now_ns, (_CLOSE_MARK, reason, [], "", False))
                if len(self._held[destination]) == 1:
                    out.append(Wake(delay, destination))
            else:
                self.close(reason, now_ns, out)

    def _refusal(self, injected, side: Side) -> str:
        """Why the scripted `side` cannot send a hook's injected message ("" when it can)."""
        if injected.direction == side.direction and injected.channel in (Channel.MAIN, Channel.BACKEND):
            is_reply = len(injected.data) >= 8 and bool(int.from_bytes(injected.data[4:8], "little") & cat.FLAG_REPLY)
            if is_reply != ((injected.channel == Channel.MAIN) == (side == Side.FRONTEND)):
                return ""
        context = self.tracker.context_for(self.number) if self.tracker is not None else DEFAULT_CONTEXT
        summary = decode(injected.data, injected.channel, context).summary()[:60]
        wants = ("requests on the main channel, replies on the back-end channel" if side == Side.FRONTEND else
                 "replies on the main channel, requests on the back-end channel")
        channel = "back-end" if injected.channel == Channel.BACKEND else injected.channel.name.lower()
        return (f"a hook injected {summary} on the {channel} channel {injected.direction.arrow}: {side.label} replay "
                f"sends only what a {side.label} sends ({side.direction.arrow}: {wants}); skipped")

    def _deliver_or_hold(self, channel: Channel, side: Side, data: bytes, fds: list, note: str, delay: float,
                         now_ns: int, out: list, to_script: bool = False) -> None:
        """Forward now, or hold behind a delay; `to_script`: hand it to the scripted sender (Inject) instead."""
        destination = (channel, side.other)
        if delay > 0 or self._held.get(destination):
            self._hold(destination, delay, now_ns, (side, data, fds, note, to_script))
            if len(self._held[destination]) == 1:
                out.append(Wake(delay, destination))
        elif to_script:
            out.append(Inject(channel, side, data, fds))
        else:
            self._forward(channel, side, data, fds, now_ns, note, out)

    def _hold(self, destination, delay: float, now_ns: int, item: tuple) -> None:
        """Delayed messages wait in order per destination; Wake releases them, never a sleep."""
        held = self._held.setdefault(destination, deque())
        due = now_ns + int(delay * 1e9)
        if held:
            due = max(due, held[-1][-1])
        held.append(item + (due,))

    def _release_held(self, destination, now_ns: int, out: list) -> None:
        held = self._held.get(destination)
        channel = destination[0]
        while held and held[0][-1] <= now_ns and not self.closed:
            item = held.popleft()
            if item[0] is _CLOSE_MARK:
                self.close(item[1], now_ns, out)
                return
            side, data, fds, note, to_script, _due = item
            if channel not in self.channels:
                if fds:
                    out.append(CloseFds(fds))
                continue
            if to_script:
                out.append(Inject(channel, side, data, fds))
                continue
            self._forward(channel, side, data, fds, now_ns, "delayed by hook" + ("; " + note if note else ""), out)
        if held:
            out.append(Wake(max(0.0, (held[0][-1] - now_ns) / 1e9), destination))
        else:
            self._held.pop(destination, None)

    # ---- closing ----

    def _end_of_stream(self, channel: Channel, side: Side, now_ns: int, out: list) -> None:
        stream = self._streams[(channel, side)]
        rest, rest_fds = stream.framer.take_rest()
        if rest:
            text = f"incomplete message #{self.messages + 1} ({len(rest)} bytes) when the {side.label} closed"
            out.append(Note(now_ns, channel, f"{side.label} closed mid-message: {text}; forwarded unframed", True,
                            kind=EventKind.PROTOCOL_ERROR))
            self._forward(channel, side, rest, rest_fds, now_ns, f"unframed: {text}", out, unframed=True)
            if self.closed:
                return
        elif rest_fds:
            out.append(CloseFds(rest_fds))
        stream.read_closed = True
        out.append(StopReading(channel, side))
        if channel != Channel.MAIN:
            out.append(Note(now_ns, channel, f"{side.label} closed the {channel.name.lower()} channel after message "
                                             f"#{self.messages}; closing that channel", kind=EventKind.CHANNEL_CLOSED))
            self._close_channel(channel, out)
            return
        if self._streams[(channel, side.other)].read_closed:
            self.close(f"{side.label} closed too: connection closed after message #{self.messages}", now_ns, out)
            return
        out.append(Note(now_ns, Channel.MAIN, f"{side.label} closed its side (EOF) after message #{self.messages}; "
                                              f"passing the close on to the {side.other.label}",
                                                  kind=EventKind.HALF_CLOSED))
        self._write_shut.add((channel, side.other))
        out.append(ShutWrite(channel, side.other))
        if not self._half_closing:
            self._half_closing = True
            out.append(Wake(HALF_CLOSE_GRACE_SECONDS, HALF_CLOSE))

    def _gone(self, channel: Channel, side: Side, reason: str, now_ns: int, out: list) -> None:
        if self.closed:
            return
        if channel != Channel.MAIN:
            out.append(Note(now_ns, channel, f"{side.label} {channel.name.lower()} channel: {reason}; closing that "
                                             f"channel", True, kind=EventKind.CHANNEL_CLOSED))
            self._close_channel(channel, out)
            return
        self.close(f"{side.label} disconnected ({reason}) after message #{self.messages}", now_ns, out)

    def _close_channel(self, channel: Channel, out: list) -> None:
        if channel not in self.channels:
            return
        self._drop_channel_state(channel, out)
        self.channels.discard(channel)
        out.append(CloseChannel(channel))

    def _drop_channel_state(self, channel: Channel, out: list) -> None:
        left: list = []
        for side in Side:
            held = self._held.pop((channel, side), None)
            for item in held or ():
                left.extend(item[2])
            stream = self._streams.get((channel, side))
            if stream is not None:
                left.extend(stream.framer.take_rest()[1])
        if left:
            out.append(CloseFds(left))
