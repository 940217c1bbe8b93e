"""The one event loop of a replayed connection: a core Session between the real peer's sockets and a scripted
peer in this process. No threads, no sleeps.

The driver feeds the session what the real peer sends (read when a selector says so) and what the script
sends, so that hooks act on both alike, through the core's one reading of their verdicts. It carries out the
session's commands in order: it records (Capture, Note), sends to the real peer or hands to the script (Send,
Inject), closes fds, and runs the session's Wake timers beside the script's own (reply timeouts) on the same
loop. What the session hands the script reaches it once the session's whole answer has been carried out, so
that a hook's injections keep their place right after their message.
"""
from __future__ import annotations

import functools
import heapq
import itertools
import os
import selectors
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Protocol

from ..engine import (
    Capture,
    CloseChannel,
    CloseConnection,
    CloseFds,
    Command,
    Fate,
    Inject,
    Note,
    Send,
    Session,
    ShutWrite,
    Side,
    StopReading,
    Wake,
)
from ..engine.core import HALF_CLOSE
from ..engine.fds import describe_fd
from ..engine.sockio import receive_chunk, send_message
from ..model import Channel, Direction, EventKind, FdInfo, Record, RecordKind
from ..protocol import catalogue as cat
from ..protocol.grammar import DecodeContext, Message, decode

CONNECTION = 1                 # a replay has one connection; captures number them from 1
REPLY_TIMEOUT = 5.0            # default: how long a scripted peer waits for a reply it is due
SEND_TIMEOUT = 5.0             # a real peer that stops reading ends the connection instead of hanging it


def say(out, text: str) -> None:
    print(text, file=out, flush=True)


def close_all(fds) -> None:
    for fd in fds:
        os.close(fd)


class Recorder:
    """The replay's own capture: every message as it travelled, hooks applied, plus events; `report` also says
    an event on the replay's output."""

    def __init__(self, writer, out=sys.stdout):
        self.writer, self.out = writer, out

    def message(self, channel: Channel, direction: Direction, data: bytes, fds=(), note: str = "",
                timestamp: int | None = None, unframed: bool = False) -> None:
        if self.writer is not None:
            self.writer.write(Record(timestamp or time.time_ns(), CONNECTION, channel, direction, data, list(fds),
                                     note=note, unframed=unframed))

    def event(self, text: str, timestamp: int | None = None, kind: EventKind = EventKind.NOTE) -> None:
        if self.writer is not None:
            self.writer.write(Record(timestamp or time.time_ns(), CONNECTION, kind=RecordKind.EVENT, note=text,
                                     event=kind))

    def connected(self, text: str, device: str | None) -> None:
        """The connection began; a DEVICE event follows when the device type is known."""
        self.event(text, kind=EventKind.CONNECTED)
        if device:
            self.event(device, kind=EventKind.DEVICE)

    def report(self, text: str, indent: str = "", kind: EventKind = EventKind.NOTE) -> None:
        self.event(text, kind=kind)
        say(self.out, indent + text)


class Timer:
    __slots__ = ("due", "callback", "cancelled")

    def __init__(self, due: float, callback: Callable[[], None]):
        self.due, self.callback, self.cancelled = due, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class Script(Protocol):
    """What a Driver calls on the scripted peer it runs (ScriptedFrontend and ScriptedBackend)."""

    def start(self) -> None: ...

    def deliver(self, channel: Channel, message: Message, context: DecodeContext, fds: list[int],
                infos: list[FdInfo], awaits_reply: bool) -> None: ...

    def going(self, channel: Channel, message: Message, context: DecodeContext, fds: list[int],
              awaits_reply: bool) -> None: ...

    def dropped(self, channel: Channel, side: Side, message: Message) -> None: ...

    def inject(self, channel: Channel, data: bytes, fds: list[int]) -> None: ...

    def peer_closed(self, channel: Channel) -> None: ...

    def channel_closed(self, channel: Channel) -> None: ...

    def ended(self, reason: str) -> None: ...

    def our_end(self, fd: int) -> socket.socket | None: ...


# How the script's messages enter the session: Session.received or Session.send_injected.
Feed = Callable[[Channel, Side, bytes, list[int], int], list[Command]]


class Driver:
    """Runs one Session whose `session.scripted` side is a script (a `Script`) and whose other side is a real
    peer on sockets (`attach`)."""

    def __init__(self, session: Session, recorder: Recorder, out, device: str | None):
        self.session, self.recorder, self.out = session, recorder, out
        assert session.scripted is not None, "replay builds its Session with the side its script plays"
        self.scripted: Side = session.scripted
        self.real = self.scripted.other
        self.script: Script | None = None          # set by run()
        self.selector = selectors.DefaultSelector()
        self.sockets: dict[Channel, socket.socket] = {}
        self._timers: list[tuple[float, int, Timer]] = []      # a heap: (due, order, timer)
        self._order = itertools.count()
        self._wakes: Counter[object] = Counter()   # the session's Wake tokens not yet fired
        self._feeds: deque[tuple[Feed, Channel, bytes, list[int]]] = deque()   # what the script sends, in order
        self._later: deque[Callable[[], None]] = deque()   # calls to the script after the current commands
        # (message, context, fd descriptions, whether it awaits a reply) of the last Capture
        self._last: tuple[Message, DecodeContext, list[FdInfo], bool] | None = None
        # Bytes for the real peer not sent yet, per channel: messages without fds go in one send when the loop would
        # wait (or before a message with fds, or a close), as a peer writes them back to back. One send a message
        # would wake the real peer once a message, each wake-up costing a context switch on a loaded machine.
        self._outbox: dict[Channel, bytearray] = {}
        self.finished = False

    # ---- for the script ----

    def context(self) -> DecodeContext:
        """What the session has negotiated, as its messages travelled (the core follows it)."""
        return self.session.context()

    def send(self, channel: Channel, data: bytes, fds: list[int]) -> None:
        """The script sends a message: through the session (hooks), then to the real peer."""
        self._feeds.append((self.session.received, channel, data, fds))

    def send_injected(self, channel: Channel, data: bytes, fds: list[int]) -> None:
        """The script sends a hook's injection it was handed (no hooks)."""
        self._feeds.append((self.session.send_injected, channel, data, fds))

    def close_side(self, channel: Channel) -> None:
        """The script closes its sending half, as a peer that saw the other close does."""
        self._feeds.append((self.session.received, channel, b"", []))

    def close(self, reason: str) -> None:
        """End the connection (the script's verdict: a policy, a missing reply, the end of the script)."""
        self._later.append(lambda: self._execute(self.session.close(reason, time.time_ns())))

    def soon(self, callback: Callable[[], None]) -> None:
        self._later.append(callback)

    def after(self, seconds: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + seconds, callback)
        heapq.heappush(self._timers, (timer.due, next(self._order), timer))
        return timer

    def watch(self, fd: int | socket.socket, callback: Callable[[], None]) -> None:
        self.selector.register(fd, selectors.EVENT_READ, callback)

    def unwatch(self, fd: int | socket.socket) -> None:
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def holding_for(self, side: Side) -> bool:
        """Does the session hold (a hook's delay) something on its way to `side`?"""
        # A token is HALF_CLOSE or the (channel, side) a held message waits to reach.
        return any(count and isinstance(token, tuple) and token[1] == side for token, count in self._wakes.items())

    def busy(self) -> bool:
        """Is anything still on its way: held by a hook, or queued by the script?"""
        return bool(self._feeds or self._later) or any(count and token != HALF_CLOSE
                                                       for token, count in self._wakes.items())

    # ---- the loop ----

    def attach(self, channel: Channel, sock: socket.socket) -> None:
        """The real peer's socket for `channel`, read by the loop from now on."""
        old = self.sockets.pop(channel, None)
        if old is not None:
            self.unwatch(old)
            old.close()
        sock.settimeout(SEND_TIMEOUT)
        self.sockets[channel] = sock
        self.watch(sock, lambda: self._readable(channel, sock))

    def run(self, script: Script) -> None:
        self.script = script
        script.start()
        self._drain()
        while not self.finished:
            if self._outbox:
                self._flush_all()
                self._drain()
                continue
            timeout = None
            if self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            for key, _events in self.selector.select(timeout):
                key.data()
            self._run_due_timers()
            self._drain()

    def shut(self) -> None:
        """Close the real peer's sockets and the loop's selector."""
        for sock in self.sockets.values():
            sock.close()
        self.sockets = {}
        self.selector.close()

    def _readable(self, channel: Channel, sock: socket.socket) -> None:
        if self.sockets.get(channel) is not sock:
            return
        now = time.time_ns()
        try:
            data, fds, truncated = receive_chunk(sock)
        except (TimeoutError, BlockingIOError):
            return
        except OSError as error:
            self._execute(self.session.failed(channel, self.real, error.strerror or str(error), now))
            return
        self._execute(self.session.received(channel, self.real, data, fds, now, truncated))

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            timer = heapq.heappop(self._timers)[2]
            if not timer.cancelled:
                timer.callback()
            self._drain()

    def _drain(self) -> None:
        while self._later or self._feeds:
            while self._later:
                self._later.popleft()()
            if self._feeds:
                feed, channel, data, fds = self._feeds.popleft()
                self._execute(feed(channel, self.scripted, data, fds, time.time_ns()))

    def _wake(self, token: object) -> None:
        self._wakes[token] -= 1
        self._execute(self.session.timer(token, time.time_ns()))

    # ---- carrying out the session's commands ----

    def _running(self) -> Script:
        """The script: commands are carried out only from run(), which sets it first."""
        assert self.script is not None, "the session's commands are carried out only from run()"
        return self.script

    def _execute(self, commands: list[Command]) -> None:
        for command in commands:
            if type(command) is Capture:
                self._capture(command)
            elif type(command) is Send:
                self._send(command)
            elif type(command) is Note:
                self.recorder.event(command.text, command.timestamp_ns, command.kind)
                if command.problem:
                    say(self.out, command.text)
            elif type(command) is CloseFds:
                close_all(command.fds)
            elif type(command) is Wake:
                self._wakes[command.token] += 1
                self.after(command.seconds, functools.partial(self._wake, command.token))
            elif type(command) is Inject:
                self._running().inject(command.channel, command.data, command.fds)
            else:
                self._close(command)

    def _capture(self, capture: Capture) -> None:
        # The script's own fds are described for the recording only (the /proc reads cost a fuzzer's every case);
        # the real peer's are handed to the script with their descriptions.
        described = capture.fds if self.recorder.writer is not None or capture.direction != self.scripted.direction \
            else ()
        infos = [describe_fd(fd) for fd in described]
        # A forwarded message comes decoded by the core, which follows the negotiation; others did not travel.
        message = capture.message or decode(capture.data, capture.channel, self.context())
        context = message.context
        self.recorder.message(capture.channel, capture.direction, capture.data, infos, capture.note,
                              capture.timestamp_ns, capture.unframed)
        self._last = (message, context, infos, capture.awaits_reply)
        if capture.fate is Fate.DROPPED:
            side = Side(int(capture.direction))
            self.recorder.report(f"hook dropped {side.label} {'reply' if message.is_reply else 'request'} "
                                 f"{message.summary()}", kind=EventKind.HOOK)
            script = self._running()
            self._later.append(lambda: script.dropped(capture.channel, side, message))

    def _send(self, send: Send) -> None:
        assert self._last is not None, "the session captures each message right before it sends it"
        message, context, infos, awaits_reply = self._last
        script = self._running()
        fds = send.fds
        if send.to == self.scripted:
            if send.interpose in cat.BACKEND_REQUEST_CHANNELS and fds:
                self._interpose(socket.socket(fileno=fds[0]), send.interpose)
                fds, infos = fds[1:], infos[1:]
            self._later.append(lambda: script.deliver(send.channel, message, context, fds, infos, awaits_reply))
            return
        script.going(send.channel, message, context, fds, awaits_reply)
        side_channel = send.interpose if send.interpose in cat.BACKEND_REQUEST_CHANNELS and fds else None
        ours = script.our_end(fds[0]) if side_channel is not None else None
        sock = self.sockets.get(send.channel)
        if sock is not None and not fds:
            self._outbox.setdefault(send.channel, bytearray()).extend(send.data)
            return
        # fds ride on the first byte of a send: what waits goes first, so that they stay with their own message
        self._flush(send.channel)
        sock = self.sockets.get(send.channel)
        try:
            if sock is None:
                raise OSError(f"no {send.channel.name.lower()} channel socket")
            send_message(sock, send.data, fds)
        except OSError as error:
            if ours is not None:
                ours.close()
            self._execute(self.session.send_failed(send.channel, send.to, error.strerror or str(error),
                                                   time.time_ns()))
            return
        finally:
            close_all(fds)
        if ours is not None and side_channel is not None:
            self._interpose(ours, side_channel)

    def _flush(self, channel: Channel) -> None:
        """Send what waits for the real peer on `channel`."""
        pending = self._outbox.pop(channel, None)
        sock = self.sockets.get(channel)
        if not pending or sock is None:
            return
        try:
            send_message(sock, bytes(pending))
        except OSError as error:
            self._execute(self.session.send_failed(channel, self.real, error.strerror or str(error), time.time_ns()))

    def _flush_all(self) -> None:
        for channel in list(self._outbox):
            self._flush(channel)

    def _interpose(self, sock: socket.socket, channel: Channel) -> None:
        """Read and write a side channel (back-end requests, the GPU socket) on `sock` from now on."""
        replaced = channel in self.sockets
        self.attach(channel, sock)
        self._execute(self.session.interposed(channel, replaced, time.time_ns()))

    def _close(self, command: Command) -> None:
        script = self._running()
        if type(command) is StopReading:
            sock = self.sockets.get(command.channel)
            if command.side == self.real and sock is not None:
                self.unwatch(sock)
        elif type(command) is ShutWrite:
            if command.side == self.real:
                self._flush(command.channel)
                try:
                    self.sockets[command.channel].shutdown(socket.SHUT_WR)
                except (KeyError, OSError):
                    pass
            else:
                self._later.append(lambda: script.peer_closed(command.channel))
        elif type(command) is CloseChannel:
            self._flush(command.channel)
            sock = self.sockets.pop(command.channel, None)
            if sock is not None:
                self.unwatch(sock)
                sock.close()
            self._later.append(lambda: script.channel_closed(command.channel))
        elif type(command) is CloseConnection:
            self._flush_all()
            self.finished = True
            for sock in self.sockets.values():
                self.unwatch(sock)
                sock.close()
            self.sockets = {}
            self._later.append(lambda: script.ended(command.reason))
