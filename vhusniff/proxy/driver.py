"""The man-in-the-middle proxy: QEMU and a vhost-user back-end talk through it; it sees, records and changes.

One thread runs one epoll loop for every listening socket and connection (a cross-thread hand-off costs more
than the work). For each chunk a peer sends: frame it (vhusniff.protocol.framing); for each whole message write the
capture record (with its fd descriptions, so a `kill -9` never loses a message a peer already has), forward
it at once with its fds on its first byte, and close the proxy's copies.
Decoding for the live display waits until the loop is idle, so it never delays a message; hooks, when there
are any, decode before forwarding because they must.

Topologies (several routes in one proxy):
  forward  `Route.forward(listen, backend)`: the front-end (QEMU) connects to `listen`, the proxy connects
           to the listening back-end at `backend`, once per accepted connection;
  reverse  `Route.reverse(listen, frontend)`: QEMU listens (server=on), the back-end (e.g. DPDK client=1)
           connects to `listen`, and the proxy connects to QEMU at `frontend`.

Side channels: the socket QEMU passes in SET_BACKEND_REQ_FD (or GPU_SET_SOCKET) is replaced by one end of
a socket pair of the proxy's, and that channel is relayed and recorded too (Channel.BACKEND / Channel.GPU).

Device state (opt-in, `interpose_device_state`): the pipe end QEMU passes in SET_DEVICE_STATE_FD is replaced by
the same end of a pipe of the proxy's, and the proxy copies the migration stream between the two pipes in the
same loop (non-blocking), recording each chunk on Channel.DEVICE_STATE and an event with the total at EOF. A
pipe end the back-end returns in its reply (bit 8 clear) is interposed the same way.

Protocol errors are data: a peer that sends garbage, an impossible size, a flood of fds or closes halfway is
reported (stderr and an EVENT record naming connection and message number), its bytes are still forwarded and
captured exactly, and the other connections carry on.

    proxy = Proxy([Route.forward("front.sock", "back.sock")], capture="session.pcapng")
    proxy.start()            # background thread
    ...
    proxy.stop()
"""
from __future__ import annotations

import collections
import errno
import fcntl
import heapq
import itertools
import os
import resource
import select
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ..analysis.analyzer import Analyzer, connection_report
from ..capture.pcapng import CaptureWriter, capture_source
from ..dataplane.notify import NotificationRelay
from ..dataplane.rings import SAMPLE_INTERVAL_DEFAULT, RingWatch
from ..dataplane.sample import Reason, RingSample
from ..engine.core import (
    Capture,
    CloseChannel,
    CloseConnection,
    CloseFds,
    Fate,
    Note,
    Send,
    Session,
    ShutWrite,
    Side,
    StopReading,
    Wake,
)
from ..engine.fds import describe_fd
from ..engine.hooks import HookChain
from ..engine.sockio import ANCILLARY_SPACE, RECV_SIZE, received_fds, send_some
from ..model import Channel, Direction, EventKind, Record, RecordKind
from ..protocol.catalogue import FrontendRequest
from ..protocol.context import DEVICE_HINTS, ContextTracker, infer_device_type
from ..protocol.grammar import decode
from ..views.present import record_line
from .routes import (
    BACKEND,
    FRONTEND,
    TARGET_DOWN_ERRORS,
    ProxyError,
    Route,
    listen_at,
    listening_in_table,
    socket_identity,
    someone_listens,
)


class RecordSink(Protocol):
    """Where records go: a CaptureWriter, or any object with write(record) and close()."""

    def write(self, record: Record) -> None: ...

    def close(self) -> None: ...


# Bytes waiting in the proxy for one socket before it stops reading from the side that sends them.
# A back-pressure pause that lasts this long is told on stderr (every pause is recorded as an event).
STALL_REPORT_SECONDS = 1.0
MAX_BUFFERED_DEFAULT = 4 << 20
# After a connection closes, how long what its peer had not taken yet may still go out (from the loop).
LINGER_SECONDS = 5.0
# Out of fds: how soon to try accepting again when no connection closes meanwhile.
FD_RETRY_SECONDS = 0.5
# Free fds an accepted connection needs at once (its socket, the one to the target, and room for fd-passing).
FD_HEADROOM = 4
# Kept when a stream closes, for `stream_totals`; a long-running proxy forgets the oldest.
STREAM_TOTALS_KEPT = 4096
# Records waiting for the live display while traffic keeps the loop busy; past this they are shown at once.
DISPLAY_BACKLOG_KEPT = 1024
# Findings kept in `problems`; the oldest go first.
PROBLEMS_KEPT = 10000
_FDS_EXHAUSTED = (errno.EMFILE, errno.ENFILE)
# While a route's target is down, how often the proxy looks whether someone listens at its path again.
TARGET_CHECK_SECONDS = 0.1
# After the back-end closes or resets a connection, when (seconds after) the proxy looks whether it still listens.
# A dying process may close its listener a moment after its connections; QEMU's reconnect=N comes back 1 s or
# more after its own disconnect, and the proxy must be down before that.
TARGET_LOOKS_AFTER_LOSS = (0.0, 0.05, 0.2, 0.5)
_EPOLL_READ = select.EPOLLIN | select.EPOLLRDHUP
_EPOLL_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP   # worth a recvmsg
_MSG_CTRUNC = int(socket.MSG_CTRUNC)         # plain ints: enum operators cost microseconds per message
_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_EPOLL_WRITE = select.EPOLLOUT
_EPOLLIN = int(select.EPOLLIN)
# The requests whose eventfd --notifications relays, and what it counts.
_NOTIFICATION_REQUESTS = {int(FrontendRequest.SET_VRING_KICK): "kick", int(FrontendRequest.SET_VRING_CALL): "call"}


class _Endpoint:
    """One socket of a connection's channel: the proxy reads from it what `side` sends, in `direction`."""

    __slots__ = ("sock", "fd", "conn", "channel", "direction", "role", "side", "stream", "framer", "peer", "outbuf",
                 "read_closed", "write_shut", "shutdown_pending", "closed", "received", "write_plain",
                 "buffered", "paused", "paused_at", "linger_timer")

    def __init__(self, sock: socket.socket, conn: _Connection, channel: Channel, role: Side):
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.conn = conn
        self.channel = channel
        self.role = role               # who sends what is read from this socket
        self.side = role.label
        self.direction = role.direction
        self.stream = conn.session.stream(channel, role)    # the core's framer and unframed flag for it
        self.framer = self.stream.framer
        self.peer: _Endpoint          # the other side's socket of the same channel, linked once both exist
        self.outbuf: collections.deque = collections.deque()   # (bytes, fds) the kernel would not take yet
        self.read_closed = False
        self.write_shut = False
        self.shutdown_pending = False
        self.closed = False
        self.received = 0              # bytes read from this socket, for an independent count in tests
        self.write_plain: Callable[[int, bytes], None] | None = None   # the capture's writer of fd-less messages
        self.buffered = 0              # bytes in outbuf
        self.paused = False            # not read from: its peer's outbuf is over the proxy's max_buffered
        self.paused_at = 0.0
        self.linger_timer: list[Any] | None = None   # after the connection closed, while outbuf still goes out


class _Connection:
    """A front-end/back-end pair and its side channels, numbered from 1 across the whole proxy."""

    __slots__ = ("number", "route", "session", "channels", "closed", "started_ns", "streams", "rings", "relays",
                 "device_unknown")

    def __init__(self, number: int, route: Route, session: Session):
        self.number = number
        self.route = route
        self.session = session         # the sans-io core: everything about messages is decided there
        self.channels: dict[Channel, tuple[_Endpoint, _Endpoint]] = {}
        self.closed = False
        self.started_ns = time.time_ns()
        self.streams: list[_StreamRelay] = []      # device-state pipes being relayed
        self.rings: RingWatch | None = None         # with rings or notifications: the data plane followed
        self.relays: dict[tuple[int, str], NotificationRelay] = {}   # (ring, kick|call) -> its relay
        # no --device for the route and none inferred yet: each main-channel message is looked at until one tells
        self.device_unknown = not route.device

    @property
    def messages(self) -> int:
        return self.session.messages

    def endpoint(self, channel: Channel, role: Side) -> _Endpoint | None:
        pair = self.channels.get(channel)
        return None if pair is None else pair[role]


class _StreamRelay:
    """One interposed device-state pipe: bytes read from `source` are written to `sink` (both non-blocking)."""

    __slots__ = ("conn", "source", "sink", "direction", "what", "pending", "total", "chunks", "eof", "done",
                 "sink_watched", "source_watched")

    def __init__(self, conn: _Connection, source: int, sink: int, direction: Direction, what: str):
        os.set_blocking(source, False)
        os.set_blocking(sink, False)
        self.conn = conn
        self.source = source           # -1 once closed
        self.sink = sink
        self.direction = direction
        self.what = what
        self.pending = b""             # read but not yet taken by the sink
        self.total = 0
        self.chunks = 0
        self.eof = False
        self.done = False
        self.sink_watched = False
        self.source_watched = True


def _stderr_report(text: str) -> None:
    print(f"vhusniff proxy: {text}", file=sys.stderr, flush=True)


class Proxy:
    """The proxy as an object: `start()` runs it in a background thread, `run()` in this one, `stop()` ends it.

    capture: a path (written as it goes, flushed per message) or an object with write(record)/close().
    hooks: objects with `message(flow)` (vhusniff.engine.hooks); none keeps the fast path.
    display: a callable given one text line per record (the `vhusniff read` format), or None.
    on_record: a callable given every Record as it is made (from the proxy thread).
    keep_records: keep every Record in `self.records` (tests, analysis); off for long-running use.
    max_buffered: bytes that may wait in the proxy for one socket; past it the proxy stops reading from the
        side that sends them (reported once per episode) until that socket has taken half of it.
    rings: map guest memory read-only and sample every running ring (vhusniff.dataplane) when it starts and
        stops and every `rings_interval` seconds, as RING event records. Off, the message path is unchanged.
    notifications: relay each ring's kick and call eventfds through the proxy's and count them (in the samples).
    """

    def __init__(self, routes, capture=None, hooks=(), *, on_hook_error: str = "forward", display=None,
                 colour: bool = False, on_record=None, keep_records: bool = True, socket_mode: int = 0o600,
                 interpose_device_state: bool = False, report=_stderr_report,
                 max_buffered: int = MAX_BUFFERED_DEFAULT, rings: bool = False,
                 rings_interval: float = SAMPLE_INTERVAL_DEFAULT, notifications: bool = False):
        self.routes = [r for r in routes]
        self.rings = rings
        self.rings_interval = rings_interval
        self.notifications = notifications
        self.socket_mode = socket_mode
        self.interpose_device_state = interpose_device_state
        self.report = report
        self.on_record = on_record
        self.keep_records = keep_records
        self.records: list[Record] = []
        self.problems: collections.deque = collections.deque(maxlen=PROBLEMS_KEPT)   # findings, as reported
        self.max_buffered = max_buffered
        self.buffered_peak = 0                 # the most bytes that ever waited for one socket
        self.fd_limit: int | None = None       # the soft RLIMIT_NOFILE in force once open
        self.connections_total = 0
        # (connection, channel, direction) -> (messages framed, bytes received), kept when a stream closes.
        self.stream_totals: dict[tuple[int, Channel, Direction], tuple[int, int]] = {}
        self.connections: dict[int, _Connection] = {}
        self._capture_target = capture
        self._writer: RecordSink | None = None
        self._stream_writer: Callable[..., Callable[[int, bytes], None]] | None = None
        self._display = display
        self._colour = colour
        self._display_backlog: collections.deque = collections.deque()
        self._display_tracker: Analyzer | None = None
        self._display_first_ns = None
        self._display_number = 0
        self._hooks = None
        if hooks:
            self._hooks = HookChain(list(hooks), on_error=on_hook_error, report=self._report_only) or None
        self._plain_fast = False       # set in open(): whole fd-less messages may skip framing and Record
        # Something besides the capture wants every Record (kept, shown, called back); waiters come and go.
        self._observed_always = keep_records or display is not None or on_record is not None
        self._epoll: select.epoll | None = None
        self._handlers: dict[int, tuple[Callable[[Any, int], None], Any]] = {}
        self._listeners: list[tuple[socket.socket, Route]] = []
        self._refusals: dict[Route, int] = {}
        # Routes whose target was found down: the listener is closed meanwhile. Route -> (when (monotonic),
        # the target's socket file then).
        self._outages: dict[Route, tuple[float, tuple | None]] = {}
        self._looking_for_target: set[Route] = set()     # a back-end closed a connection: is it still there?
        self._timers: list = []
        self._lingering: set[_Endpoint] = set()
        self._accept_paused = False     # out of fds: listeners unwatched until some free up
        self._fd_shortage_said = False  # one report per shortage, until a connection is accepted again
        self._fd_retry: list[Any] | None = None
        self._timer_sequence = itertools.count()
        self._wake_read, self._wake_write = -1, -1
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._changed = threading.Condition()
        self._waiters = 0              # threads in wait_until(); the loop notifies only when there are some
        self._opened = False
        self._finished = threading.Event()

    # ---- public API ----

    @property
    def _poller(self) -> select.epoll:
        if self._epoll is None:
            raise ProxyError("the proxy is not open")
        return self._epoll

    @property
    def active_connections(self) -> int:
        return len(self.connections)

    def open(self) -> None:
        """Bind every listening socket (mode `socket_mode`) and open the capture; raises ProxyError."""
        if self._opened:
            return
        self._raise_fd_limit()
        self._epoll = select.epoll()
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poller.register(self._wake_read, select.EPOLLIN)
        try:
            for route in self.routes:
                self._watch_listener(listen_at(route.listen, self.socket_mode), route)
            if isinstance(self._capture_target, (str, os.PathLike)):
                routes = " ".join(f"{route.listen}->{route.target}" for route in self.routes)
                self._writer = CaptureWriter(self._capture_target, flush_each=True, source=capture_source(routes))
            elif self._capture_target is not None:
                self._writer = self._capture_target
            # A writer that packs a stream's fd-less records itself lets whole messages skip Record.
            self._stream_writer = getattr(self._writer, "stream_writer", None)
            self._plain_fast = self._hooks is None and (self._writer is None or self._stream_writer is not None)
            if self.rings:
                # The rings follow ring set-up messages, which carry no fds: every message goes through _execute.
                self._plain_fast = False
        except BaseException:
            self._close_listeners()
            self._close_loop()
            raise
        self._opened = True

    def start(self) -> Proxy:
        """Open and run the loop in a daemon thread; returns at once."""
        self.open()
        self._thread = threading.Thread(target=self._run_loop, name="vhusniff-proxy", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Open and run the loop in this thread until `request_stop()` (e.g. from a signal handler)."""
        self.open()
        self._run_loop()

    def request_stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler or another thread)."""
        self._stopping = True
        if self._wake_write >= 0:
            try:
                os.write(self._wake_write, b"x")
            except OSError:
                pass

    def stop(self, timeout: float = 10.0) -> None:
        """Close every connection (recorded), the listeners and the capture; wait for the thread."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise ProxyError(f"proxy thread did not finish within {timeout:g} s")
        elif self._opened and not self._finished.is_set():
            self._shutdown()

    def wait_until(self, condition, timeout: float = 10.0) -> bool:
        """Wait until condition(proxy) holds (checked whenever a record or connection changes); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            self._waiters += 1
            try:
                while not condition(self):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._changed.wait(min(left, 0.2))
            finally:
                self._waiters -= 1
        return True

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ---- the loop ----

    def _run_loop(self) -> None:
        poll = self._poller.poll
        handlers = self._handlers
        try:
            while not self._stopping:
                timeout = 0 if self._display_backlog else self._next_timer_timeout() if self._timers else -1
                events = poll(timeout)
                for fd, mask in events:
                    handler = handlers.get(fd)
                    if handler is not None:
                        handler[0](handler[1], mask)
                if self._timers:
                    self._run_due_timers()
                if not events and self._display_backlog:
                    # A line at a time while the loop is idle: a message arriving meanwhile waits for one line.
                    self._show_backlog(1)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self._finished.is_set():
            return
        for conn in list(self.connections.values()):
            self._close_connection(conn, "proxy stopping: connection closed")
        for endpoint in list(self._lingering):
            self._flush_lingering(endpoint, 0, "the proxy stopped")
        for route in list(self._refusals):
            self._note_refusals(route)
        self._close_listeners()
        self._show_backlog(None)
        if self._writer is not None:
            self._writer.close()
        self._close_loop()
        self._finished.set()
        with self._changed:
            self._changed.notify_all()

    def _close_loop(self) -> None:
        for fd in (self._wake_read, self._wake_write):
            if fd >= 0:
                os.close(fd)
        self._wake_read = self._wake_write = -1
        if self._epoll is not None:
            self._epoll.close()

    def _close_listeners(self) -> None:
        for listener, _route in self._listeners:
            listener.close()
        for route in [route for _listener, route in self._listeners] + list(self._outages):
            try:
                os.unlink(route.listen)
            except OSError:
                pass
        self._listeners = []
        self._outages.clear()

    def _next_timer_timeout(self) -> float:
        if not self._timers:
            return -1
        return max(0.0, self._timers[0][0] - time.monotonic())

    def _schedule(self, delay: float, callback, *args):
        entry = [time.monotonic() + delay, next(self._timer_sequence), callback, args, True]
        heapq.heappush(self._timers, entry)
        return entry

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _due, _seq, callback, args, live = heapq.heappop(self._timers)
            if live:
                callback(*args)

    # ---- connections ----

    def _accept(self, listening: tuple[socket.socket, Route], _mask: int) -> None:
        listener, route = listening
        try:
            self._check_fd_headroom()
            accepted, _address = listener.accept()
            if self._fd_shortage_said:
                self._fd_shortage_said = False
                self._proxy_event("file descriptors are free again: accepting new connections",
                                  kind=EventKind.RESOURCE)
        except OSError as error:
            if error.errno in _FDS_EXHAUSTED:
                self._out_of_fds("accepting a connection")
            return
        target_role = route.target_role
        outgoing = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        outgoing.settimeout(2.0)       # a Unix connect waits only when the listener's backlog is full
        try:
            outgoing.connect(str(route.target))
        except OSError as error:
            outgoing.close()
            accepted.close()
            # A client that retries at once (DPDK client mode) would flood the record: say it once per outage.
            refused = self._refusals.get(route, 0)
            self._refusals[route] = refused + 1
            if refused == 0:
                self._proxy_event(f"{route.listener_role} connected on {route.listen}, but the {target_role} at "
                                  f"{route.target} refused: {error.strerror or error}; closing it (repeats are "
                                  f"counted, not recorded)", problem=True, kind=EventKind.TARGET_DOWN)
            if error.errno in TARGET_DOWN_ERRORS:
                self._mirror_outage(route)
            return
        self._note_refusals(route)
        self.connections_total += 1
        number = self.connections_total
        conn = _Connection(number, route, self._new_session(number, route))
        sockets = {route.listener_role: accepted, target_role: outgoing}
        self.connections[number] = conn
        if self.rings or self.notifications:
            conn.rings = RingWatch(map_memory=self.rings, device=route.device)
            if self.rings:
                self._schedule(self.rings_interval, self._ring_tick, conn)
        self._event(conn, Channel.MAIN, f"connected: {route.listener_role} via {route.listen}, "
                    f"{target_role} at {route.target}" + (f", device={route.device}" if route.device else ""),
                    kind=EventKind.CONNECTED)
        if route.device:
            self._event(conn, Channel.MAIN, route.device, kind=EventKind.DEVICE)
        self._add_channel(conn, Channel.MAIN, sockets[FRONTEND], sockets[BACKEND])

    def _new_session(self, number: int, route: Route) -> Session:
        tracker = None
        if self._hooks is not None:
            tracker = ContextTracker(route.device)       # one per connection: it goes when the connection does
        return Session(number, self._hooks, tracker, self.interpose_device_state)

    def _watch_listener(self, listener: socket.socket, route: Route) -> None:
        self._listeners.append((listener, route))
        self._poller.register(listener.fileno(), select.EPOLLIN)
        self._handlers[listener.fileno()] = (self._accept, (listener, route))

    def _mirror_outage(self, route: Route) -> None:
        """The target is down: stop listening too (the socket file stays), so that the next connect fails
        with ECONNREFUSED as it would without the proxy. Accepting and then closing looks like a protocol
        error instead: QEMU's vhost-user-blk spends its few realize retries on it and gives up, or (QEMU 7.2,
        after realize) is left with a connection it never uses, where it would have waited for the back-end
        with reconnect=N."""
        listening = next((pair for pair in self._listeners if pair[1] == route), None)
        if listening is None or route in self._outages:
            return
        listener = listening[0]
        self._poller.unregister(listener.fileno())
        del self._handlers[listener.fileno()]
        self._listeners.remove(listening)
        listener.close()
        self._outages[route] = (time.monotonic(), socket_identity(route.target))
        self._proxy_event(f"the {route.target_role} at {route.target} is down: the proxy stops listening on "
                          f"{route.listen} until someone listens there again, so connections to it are refused "
                          f"as they would be by the {route.target_role}", kind=EventKind.TARGET_DOWN)
        self._schedule(TARGET_CHECK_SECONDS, self._check_target, route)

    def _check_target(self, route: Route) -> None:
        """During an outage: once someone listens at the target's path again, listen again. This asks the
        socket, not the file: a restarted peer's socket file often has the dead one's inode number."""
        if route not in self._outages or self._stopping:
            return
        if not self._target_is_back(route):
            self._schedule(TARGET_CHECK_SECONDS, self._check_target, route)
            return
        try:
            listener = listen_at(route.listen, self.socket_mode)
        except ProxyError as error:
            self._proxy_event(f"cannot listen on {route.listen} again: {error}; retrying", problem=True)
            self._schedule(TARGET_CHECK_SECONDS * 10, self._check_target, route)
            return
        down_for = time.monotonic() - self._outages.pop(route)[0]
        self._note_refusals(route)
        self._watch_listener(listener, route)
        self._proxy_event(f"the {route.target_role} at {route.target} listens again after {down_for:.1f} s: "
                          f"listening on {route.listen} again", kind=EventKind.TARGET_UP)

    def _target_is_back(self, route: Route) -> bool:
        """A back-end is asked with a connect it sees close at once. QEMU (a reverse route's target) is not: it
        would take the probe as a vhost-user client, so the kernel's socket table is read instead, or failing
        that the socket file compared with the dead one's (a new bind makes a new file)."""
        if route.target_role == BACKEND:
            return someone_listens(route.target) is not False
        listening = listening_in_table(route.target)
        if listening is not None:
            return listening
        identity = socket_identity(route.target)
        return identity is not None and identity != self._outages[route][1]

    def _watch_for_target_loss(self, endpoint: _Endpoint) -> None:
        """The back-end closed or reset a connection's main channel. If it died, QEMU (reconnect=N) comes
        back within a second or two: the proxy must be down by then, so look now and a few times shortly after
        (each look a connect that is closed at once). Only a back-end is looked at: a probe of QEMU's own
        server socket (reverse route) would be taken by QEMU as a vhost-user connection."""
        route = endpoint.conn.route
        if (endpoint.side != BACKEND or endpoint.channel != Channel.MAIN or route.target_role != BACKEND
                or route in self._outages or route in self._looking_for_target):
            return
        self._looking_for_target.add(route)
        self._schedule(TARGET_LOOKS_AFTER_LOSS[0], self._look_for_target, route, 0)

    def _look_for_target(self, route: Route, look: int) -> None:
        if self._stopping or route in self._outages:
            self._looking_for_target.discard(route)
            return
        if someone_listens(route.target) is False:
            self._looking_for_target.discard(route)
            self._mirror_outage(route)
            return
        if look + 1 < len(TARGET_LOOKS_AFTER_LOSS):
            self._schedule(TARGET_LOOKS_AFTER_LOSS[look + 1] - TARGET_LOOKS_AFTER_LOSS[look],
                           self._look_for_target, route, look + 1)
        else:
            self._looking_for_target.discard(route)

    def _note_refusals(self, route: Route) -> None:
        repeats = self._refusals.pop(route, 0) - 1
        if repeats > 0:
            self._proxy_event(f"{route.target} refused {repeats} more connection(s) from {route.listen}'s "
                              f"{route.listener_role}")

    def _proxy_event(self, text: str, problem: bool = False, kind: EventKind = EventKind.NOTE) -> None:
        """An event of no connection (connection 0)."""
        if problem:
            self._report_only(text)
        self._emit(Record(time.time_ns(), 0, Channel.MAIN, Direction.FRONTEND_TO_BACKEND, b"", [],
                          RecordKind.EVENT, text, kind))

    # ---- the fd budget ----

    def _raise_fd_limit(self) -> None:
        """Each connection holds two fds and more with side channels: the common soft limit of 1,024 would
        stop the proxy at about 500 connections. Raise it to the hard limit, as far as the kernel allows."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = hard
        if hard == resource.RLIM_INFINITY:
            try:
                wanted = int(Path("/proc/sys/fs/nr_open").read_text())
            except (OSError, ValueError):
                wanted = soft
        if soft != resource.RLIM_INFINITY and soft < wanted:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
                if self.report is not None:
                    self.report(f"open-file limit raised from {soft} to {wanted} (the hard limit)")
            except (OSError, ValueError):
                pass
        self.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]

    def _check_fd_headroom(self) -> None:
        """Raise EMFILE unless FD_HEADROOM fds are free: accepting a connection the proxy then cannot connect
        onwards would close it on the client, where a direct connection would have waited in the backlog."""
        probes = []
        try:
            for _ in range(FD_HEADROOM):
                probes.append(os.dup(self._wake_read))
        finally:
            for fd in probes:
                os.close(fd)

    def _out_of_fds(self, doing: str) -> None:
        """Stop accepting until a connection closes (or a short while passes); say so once per shortage.
        The listeners stay open, so new clients wait in their backlog; open connections go on."""
        if not self._fd_shortage_said:
            self._fd_shortage_said = True
            self._proxy_event(f"out of file descriptors while {doing} (limit {self.fd_limit}): not accepting "
                              f"new connections until some are free; open ones go on", problem=True,
                              kind=EventKind.RESOURCE)
        if self._accept_paused:
            return
        self._accept_paused = True
        for listener, _route in self._listeners:
            try:
                self._poller.modify(listener.fileno(), 0)
            except OSError:
                pass
        self._fd_retry = self._schedule(FD_RETRY_SECONDS, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if not self._accept_paused or self._stopping:
            return
        self._accept_paused = False
        if self._fd_retry is not None:
            self._fd_retry[4] = False
            self._fd_retry = None
        for listener, _route in self._listeners:
            try:
                self._poller.modify(listener.fileno(), select.EPOLLIN)
            except OSError:
                pass

    def _no_fds_for(self, conn: _Connection, channel: Channel, what: str, error: OSError) -> str:
        """A side channel the proxy cannot interpose on for want of fds: passed on unchanged instead."""
        text = f"{what} not interposed: {error.strerror or error}; passed on unchanged (not recorded)"
        if error.errno in _FDS_EXHAUSTED:
            self._out_of_fds(f"interposing on the {what}")
        self._event(conn, channel, text, problem=True, kind=EventKind.RESOURCE)
        return text

    def _add_channel(self, conn: _Connection, channel: Channel, front_sock: socket.socket,
                     back_sock: socket.socket) -> None:
        front = _Endpoint(front_sock, conn, channel, Side.FRONTEND)
        back = _Endpoint(back_sock, conn, channel, Side.BACKEND)
        front.peer, back.peer = back, front
        conn.channels[channel] = (front, back)
        for endpoint in (front, back):
            if self._stream_writer is not None and self._plain_fast:
                endpoint.write_plain = self._stream_writer(conn.number, channel, endpoint.direction)
            self._poller.register(endpoint.fd, _EPOLL_READ)
            self._handlers[endpoint.fd] = (self._on_event, endpoint)

    def _on_event(self, endpoint: _Endpoint, mask: int) -> None:
        """Everything an endpoint's socket reports. The common case, one whole message without fds and
        without hooks, is handled right here in one frame: it is the proxy's per-message cost. Anything else
        goes to the connection's session core (vhusniff.engine.core), which decides what to do."""
        if mask != _EPOLLIN or endpoint.read_closed or endpoint.closed:
            self._on_other_event(endpoint, mask)
            return
        try:
            # sockio.receive_chunk, inlined: this is the hottest line of the proxy.
            data, ancillary, flags, _address = endpoint.sock.recvmsg(RECV_SIZE, ANCILLARY_SPACE, _CMSG_CLOEXEC)
        except BlockingIOError:
            return
        except OSError as error:
            self._peer_gone(endpoint, f"{error.strerror or error}")
            return
        timestamp = time.time_ns()
        if (flags & _MSG_CTRUNC or not self._plain_fast or endpoint.stream.unframed
                or not endpoint.framer.take_whole(data)):
            self._on_chunk(endpoint, data, ancillary, flags, timestamp)
            return
        # One whole message, no hooks: what the session would say (record it, send it), said here.
        endpoint.received += len(data)
        conn = endpoint.conn
        peer = endpoint.peer
        if ancillary or peer.outbuf or peer.closed or peer.write_shut:
            self._execute(conn, conn.session.whole(endpoint.channel, endpoint.role, data,
                                                   received_fds(ancillary) if ancillary else [], timestamp))
            return
        conn.session.messages += 1
        if endpoint.write_plain is not None:
            endpoint.write_plain(timestamp, data)
        if conn.device_unknown and data[0] in DEVICE_HINTS:
            self._infer_device(conn, endpoint.channel, data)
        if self._observed_always or self._waiters:
            self._observe(Record(timestamp, conn.number, endpoint.channel, endpoint.direction, data))
        try:
            sent = peer.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            self._send_failed(conn, peer, error)
            return
        if sent < len(data):
            self._queue(peer, data[sent:], [])

    def _on_other_event(self, endpoint: _Endpoint, mask: int) -> None:
        if endpoint.closed:
            return
        if mask & _EPOLL_WRITE:
            self._flush_out(endpoint)
            if endpoint.closed:
                return
        if not endpoint.read_closed:
            if mask & _EPOLL_READABLE:
                self._on_event(endpoint, _EPOLLIN)
        elif mask & (select.EPOLLHUP | select.EPOLLERR):
            # It had closed its sending half; now it is gone altogether, so nothing more can reach it.
            conn = endpoint.conn
            self._execute(conn, conn.session.hung_up(endpoint.channel, endpoint.role, time.time_ns()))

    def _on_chunk(self, endpoint: _Endpoint, data: bytes, ancillary, flags: int, timestamp: int) -> None:
        """A received chunk in general: any framing, fds, hooks, a closing peer; the session decides."""
        endpoint.received += len(data)
        if not data:
            self._watch_for_target_loss(endpoint)
        conn = endpoint.conn
        self._execute(conn, conn.session.received(endpoint.channel, endpoint.role, data,
                                                  received_fds(ancillary) if ancillary else [], timestamp,
                                                  bool(flags & _MSG_CTRUNC)))

    def _execute(self, conn: _Connection, commands: list) -> None:
        """Carry out the session's commands, in order."""
        for command in commands:
            kind = type(command)
            if kind is Capture:
                self._emit(Record(command.timestamp_ns, conn.number, command.channel, command.direction,
                                  command.data, [describe_fd(fd) for fd in command.fds] if command.fds else [],
                                  RecordKind.MESSAGE, command.note, unframed=command.unframed))
                if conn.rings is not None and command.fate == Fate.FORWARDED:
                    self._emit_samples(conn, conn.rings.observe(command.channel, command.direction, command.data,
                                                                command.fds))
                if conn.device_unknown and not command.unframed:
                    self._infer_device(conn, command.channel, command.data)
            elif kind is Send:
                self._send_command(conn, command)
            elif kind is Note:
                text = command.text
                if command.describe:
                    text += ": " + ", ".join(describe_fd(fd).summary() for fd in command.describe)
                self._event(conn, command.channel, text, command.problem, command.kind)
            elif kind is CloseFds:
                for fd in command.fds:
                    os.close(fd)
            elif kind is StopReading:
                endpoint = conn.endpoint(command.channel, command.side)
                if endpoint is not None:
                    endpoint.read_closed = True
                    self._rearm(endpoint)
            elif kind is ShutWrite:
                endpoint = conn.endpoint(command.channel, command.side)
                if endpoint is not None:
                    self._shut_write(endpoint)
            elif kind is CloseChannel:
                self._close_channel(conn, command.channel)
            elif kind is CloseConnection:
                self._teardown(conn)
            elif kind is Wake:
                self._schedule(command.seconds, self._wake, conn, command.token)

    def _infer_device(self, conn: _Connection, channel: Channel, data: bytes) -> None:
        """Nobody stated the device type: record it (a DEVICE event), and how it was decided, once a message
        tells it (the rules of protocol.context, the same that reading the capture follows)."""
        found = infer_device_type(channel, data)
        if found is not None:
            conn.device_unknown = False
            device, how = found
            self._event(conn, Channel.MAIN, f"device type {device} inferred from {how} (message #{conn.messages})")
            self._event(conn, Channel.MAIN, device, kind=EventKind.DEVICE)

    def _wake(self, conn: _Connection, token) -> None:
        if not conn.closed:
            self._execute(conn, conn.session.timer(token, time.time_ns()))

    def _peer_gone(self, endpoint: _Endpoint, reason: str) -> None:
        self._watch_for_target_loss(endpoint)
        conn = endpoint.conn
        self._execute(conn, conn.session.failed(endpoint.channel, endpoint.role, reason, time.time_ns()))

    def _shut_write(self, endpoint: _Endpoint) -> None:
        if endpoint.outbuf:
            endpoint.shutdown_pending = True
            return
        if not endpoint.write_shut and not endpoint.closed:
            endpoint.write_shut = True
            try:
                endpoint.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _rearm(self, endpoint: _Endpoint) -> None:
        """Watch for what the endpoint can use now: writable while its outbuf holds something, readable
        unless its sender closed or the proxy holds too much for the other side."""
        mask = (_EPOLL_WRITE if endpoint.outbuf else 0) | \
            (0 if endpoint.read_closed or endpoint.paused else _EPOLL_READ)
        try:
            self._poller.modify(endpoint.fd, mask)
        except OSError:
            pass

    def _close_channel(self, conn: _Connection, channel: Channel, linger: bool = False) -> None:
        pair = conn.channels.pop(channel, None)
        if pair is None:
            return
        for endpoint in pair:
            self._close_endpoint(endpoint, linger)

    def _close_endpoint(self, endpoint: _Endpoint, linger: bool = False) -> None:
        """Close it; with `linger`, what its peer has not taken yet still goes out from the loop (a direct
        connection's kernel buffer would have delivered it after the close too)."""
        if endpoint.closed:
            return
        endpoint.closed = True
        totals = self.stream_totals
        totals[(endpoint.conn.number, endpoint.channel, endpoint.direction)] = \
            (endpoint.framer.messages, endpoint.received)
        if len(totals) > STREAM_TOTALS_KEPT:
            del totals[next(iter(totals))]
        if linger and endpoint.outbuf and not self._stopping:
            self._lingering.add(endpoint)
            self._handlers[endpoint.fd] = (self._flush_lingering, endpoint)
            try:
                self._poller.modify(endpoint.fd, _EPOLL_WRITE)
            except OSError:
                pass
            endpoint.linger_timer = self._schedule(LINGER_SECONDS, self._flush_lingering, endpoint, 0,
                                                   f"it took nothing more for {LINGER_SECONDS:g} s")
            return
        self._release_socket(endpoint)

    def _release_socket(self, endpoint: _Endpoint) -> None:
        self._handlers.pop(endpoint.fd, None)
        try:
            self._poller.unregister(endpoint.fd)
        except (OSError, ValueError):
            pass
        for _data, fds in endpoint.outbuf:
            for fd in fds:
                os.close(fd)
        endpoint.outbuf.clear()
        endpoint.buffered = 0
        endpoint.sock.close()

    def _flush_lingering(self, endpoint: _Endpoint, _mask: int, give_up: str | None = None) -> None:
        """Send what the kernel takes now, without blocking; when all went, or on `give_up`, let it go."""
        if endpoint not in self._lingering:
            return
        failure = None
        error = self._drain(endpoint)
        if error is not None:
            failure = f"sending failed: {error.strerror or error}"
        elif endpoint.outbuf:
            if give_up is None:
                return
            failure = give_up
        self._lingering.discard(endpoint)
        if endpoint.linger_timer is not None:
            endpoint.linger_timer[4] = False
            endpoint.linger_timer = None
        undelivered = endpoint.buffered
        self._release_socket(endpoint)
        if undelivered:
            self._event(endpoint.conn, endpoint.channel, f"{undelivered} byte(s) for the {endpoint.side} not "
                        f"delivered after the connection ended: {failure}", problem=True, kind=EventKind.RESOURCE)
        self._resume_accepting()

    def _close_connection(self, conn: _Connection, reason: str) -> None:
        """End a connection for a reason of the proxy's own (stopping): through its session, like any end."""
        self._execute(conn, conn.session.close(reason, time.time_ns()))

    def _teardown(self, conn: _Connection) -> None:
        """The session ended the connection: close its sockets and streams, never blocking the loop."""
        if conn.closed:
            return
        conn.closed = True
        for relay in list(conn.streams):
            self._end_stream(relay, "cut short: the connection closed")
        if conn.rings is not None:
            self._end_data_plane(conn)
        for channel in [c for c in conn.channels if c != Channel.MAIN] + [Channel.MAIN]:
            pair = conn.channels.get(channel)
            if pair is None:
                continue
            for endpoint in pair:
                # What the kernel takes now goes at once; the rest lingers (never blocking the loop).
                if endpoint.outbuf:
                    self._flush_out(endpoint)
            self._close_channel(conn, channel, linger=True)
        self.connections.pop(conn.number, None)
        self._resume_accepting()

    # ---- forwarding ----

    def _send_command(self, conn: _Connection, command: Send) -> None:
        """Send as the session said (fds on the first byte), interposing on a side channel where it asks;
        then close the proxy's copies of the fds (what waits in an out-buffer is closed when it leaves)."""
        fds = command.fds
        if command.channel == Channel.DEVICE_STATE:
            self._stream_chunk(conn, command)
            return
        endpoint = conn.endpoint(command.channel, command.to)
        if endpoint is None or endpoint.closed or conn.closed:
            for fd in fds:
                os.close(fd)
            return
        substitute = relay = None
        if command.interpose == Channel.DEVICE_STATE:
            substitute, relay = self._substitute_device_state(endpoint.peer, command.data, fds)
        elif command.interpose is not None:
            substitute = self._substitute_side_channel(conn, command.interpose, fds)
        elif self.notifications and command.channel == Channel.MAIN and command.to == Side.BACKEND \
                and len(command.data) >= 12 and conn.rings is not None:
            substitute = self._substitute_notification(conn, command.data, fds)
        sent_fds = substitute if substitute is not None else fds
        try:
            owned = self._send(endpoint, command.data, sent_fds)
        except OSError as error:
            self._close_fds(fds, sent_fds, substitute, True)
            self._send_failed(conn, endpoint, error)
            return
        if not fds:
            return
        self._close_fds(fds, sent_fds, substitute, owned)
        if isinstance(relay, _StreamRelay):
            self._event(conn, Channel.DEVICE_STATE, f"device-state stream interposed: the proxy relays the "
                        f"{relay.what} ({relay.direction.arrow})", kind=EventKind.CHANNEL_OPENED)
        elif isinstance(relay, str):
            self._event(conn, Channel.DEVICE_STATE, relay)

    def _send_failed(self, conn: _Connection, destination: _Endpoint, error: OSError) -> None:
        self._watch_for_target_loss(destination)
        self._execute(conn, conn.session.send_failed(destination.channel, destination.role,
                                                     error.strerror or str(error), time.time_ns()))

    @staticmethod
    def _close_fds(received: list[int], sent: list[int], substitute, sent_owned_by_caller: bool) -> None:
        """The proxy's copies go once forwarded; what still waits in an out-buffer is closed when it leaves."""
        if substitute is not None:
            for fd in received:
                os.close(fd)
        if sent_owned_by_caller:
            for fd in sent:
                os.close(fd)

    def _send(self, endpoint: _Endpoint, data: bytes, fds: list[int]) -> bool:
        """Send now if the kernel takes it; else queue. True if the caller may close the fds now."""
        if endpoint.outbuf:
            self._queue(endpoint, data, fds)
            return False
        try:
            sent = send_some(endpoint.sock, data, fds)
        except BlockingIOError:
            self._queue(endpoint, data, fds)
            return False
        if sent < len(data):
            self._queue(endpoint, data[sent:], [])
        return True

    def _queue(self, endpoint: _Endpoint, data: bytes, fds: list[int]) -> None:
        """Keep what the kernel would not take yet. Past max_buffered, stop reading from the side that sends
        it (back-pressure, as a direct connection's full socket buffer would do) until the endpoint drains."""
        first = not endpoint.outbuf
        endpoint.outbuf.append((data, fds))
        endpoint.buffered += len(data)
        if first:
            self._rearm(endpoint)
        if endpoint.buffered > self.max_buffered:
            if endpoint.buffered > self.buffered_peak:
                self.buffered_peak = endpoint.buffered
            source = endpoint.peer
            if not source.paused and not source.closed:
                self._pause_reading(source)

    def _pause_reading(self, source: _Endpoint) -> None:
        destination = source.peer
        source.paused = True
        source.paused_at = time.monotonic()
        self._rearm(source)
        # Recorded at once; told on stderr only if it lasts: a GPU's 4 MB UPDATE pauses its sender for a moment
        # as a full socket buffer would, which is flow control, not a problem.
        self._event(source.conn, source.channel, f"the {destination.side} is not taking what the {source.side} "
                    f"sends: {destination.buffered} bytes wait in the proxy (limit {self.max_buffered}); not "
                    f"reading from the {source.side} until the {destination.side} takes them",
                    kind=EventKind.RESOURCE)
        self._schedule(STALL_REPORT_SECONDS, self._report_stall, source, source.paused_at)

    def _report_stall(self, source: _Endpoint, paused_at: float) -> None:
        if source.paused and source.paused_at == paused_at and not source.closed and not source.conn.closed:
            destination = source.peer
            self._report_only(f"connection {source.conn.number}: the {destination.side} has taken nothing for "
                              f"{STALL_REPORT_SECONDS:g} s: {destination.buffered} bytes wait in the proxy; the "
                              f"{source.side} is not read from until it does")

    def _resume_reading(self, source: _Endpoint) -> None:
        destination = source.peer
        source.paused = False
        self._rearm(source)
        self._event(source.conn, source.channel, f"the {destination.side} took the backlog "
                    f"({destination.buffered} bytes still wait): reading from the {source.side} again after "
                    f"{time.monotonic() - source.paused_at:.3f} s", kind=EventKind.RESOURCE)

    @staticmethod
    def _drain(endpoint: _Endpoint) -> OSError | None:
        """Send what the kernel takes of the out-buffer now (fds close once sent); the error that stopped it."""
        while endpoint.outbuf:
            data, fds = endpoint.outbuf[0]
            try:
                sent = send_some(endpoint.sock, data, fds)
            except BlockingIOError:
                return None
            except OSError as error:
                return error
            for fd in fds:
                os.close(fd)
            endpoint.buffered -= sent
            if sent < len(data):
                endpoint.outbuf[0] = (data[sent:], [])
            else:
                endpoint.outbuf.popleft()
        return None

    def _flush_out(self, endpoint: _Endpoint) -> None:
        error = self._drain(endpoint)
        if error is not None:
            if not endpoint.conn.closed:
                self._peer_gone(endpoint, error.strerror or str(error))
            return
        if endpoint.closed or endpoint.conn.closed:
            return
        source = endpoint.peer
        if source.paused and endpoint.buffered <= self.max_buffered // 2 and not source.closed:
            self._resume_reading(source)
        if endpoint.outbuf:
            return
        self._rearm(endpoint)
        if endpoint.shutdown_pending:
            endpoint.shutdown_pending = False
            self._shut_write(endpoint)

    def _substitute_side_channel(self, conn: _Connection, channel: Channel, fds: list[int]) -> list[int] | None:
        """For SET_BACKEND_REQ_FD / GPU_SET_SOCKET: relay the passed socket through a pair of the proxy's."""
        if len(fds) != 1 or describe_fd(fds[0]).kind != "socket":
            return None
        what = f"{channel.name.lower()} channel of message #{conn.messages}"
        try:
            frontend_side = socket.socket(fileno=os.dup(fds[0]))
        except OSError as error:
            self._no_fds_for(conn, channel, what, error)
            return None
        try:
            proxy_end, backend_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as error:
            frontend_side.close()
            self._no_fds_for(conn, channel, what, error)
            return None
        replaced = channel in conn.channels
        if replaced:
            for endpoint in conn.channels.pop(channel):
                self._close_endpoint(endpoint)
        self._execute(conn, conn.session.interposed(channel, replaced, time.time_ns()))
        self._add_channel(conn, channel, frontend_side, proxy_end)
        # The original fd is described in the record and closed like any other; its dup relays the channel.
        return [backend_end.detach()]

    # ---- device state (SET_DEVICE_STATE_FD) ----

    def _substitute_device_state(self, endpoint: _Endpoint, data: bytes, fds: list[int]):
        """For SET_DEVICE_STATE_FD and its reply: pass on the same end of a pipe of the proxy's and relay.

        Returns (fds to send instead or None, the relay started, or a note saying why nothing was interposed)."""
        conn = endpoint.conn
        is_reply = endpoint.role == Side.BACKEND     # the session asks only for a request's or its reply's pipe
        what = f"pipe end the {endpoint.side} passed in message #{conn.messages}"
        if len(fds) != 1:
            return None, f"SET_DEVICE_STATE_FD message #{conn.messages} carries {len(fds)} fds; not interposed"
        try:
            status = os.fstat(fds[0])
            access = fcntl.fcntl(fds[0], fcntl.F_GETFL) & os.O_ACCMODE
        except OSError as error:
            return None, f"SET_DEVICE_STATE_FD message #{conn.messages}: cannot inspect its fd " \
                         f"({error.strerror}); not interposed"
        if not stat.S_ISFIFO(status.st_mode) or access == os.O_RDWR:
            return None, f"SET_DEVICE_STATE_FD message #{conn.messages}: its fd ({describe_fd(fds[0]).kind}) is " \
                         f"not a one-way pipe end; forwarded unchanged, not interposed"
        peer = endpoint.peer
        if peer.closed or peer.write_shut:
            return None, None
        recipient_writes = access == os.O_WRONLY
        try:
            theirs = os.dup(fds[0])
            try:
                read_end, write_end = os.pipe2(os.O_CLOEXEC)
            except OSError:
                os.close(theirs)
                raise
        except OSError as error:
            self._no_fds_for(conn, Channel.DEVICE_STATE, f"device-state pipe of message #{conn.messages}", error)
            return None, None
        if recipient_writes:     # the recipient writes into our pipe; we copy into the fd it would have had
            given, relay = write_end, _StreamRelay(conn, read_end, theirs, peer.direction, what)
        else:                    # the recipient reads our pipe; we fill it from the fd it would have had
            given, relay = read_end, _StreamRelay(conn, theirs, write_end, endpoint.direction, what)
        conn.streams.append(relay)
        if Channel.DEVICE_STATE not in conn.session.channels:
            conn.session.open_channel(Channel.DEVICE_STATE)
        self._poller.register(relay.source, select.EPOLLIN)
        self._handlers[relay.source] = (self._on_stream_source, relay)
        if not is_reply and len(data) >= 16:
            saving = int.from_bytes(data[12:16], "little") == 0
            if saving != recipient_writes:
                self._event(conn, Channel.DEVICE_STATE, f"SET_DEVICE_STATE_FD message #{conn.messages} says "
                            f"{'save' if saving else 'load'} but passes the pipe's "
                            f"{'write' if recipient_writes else 'read'} end; relayed as the pipe end says",
                            problem=True, kind=EventKind.PROTOCOL_ERROR)
        return [given], relay

    def _on_stream_source(self, relay: _StreamRelay, _mask: int) -> None:
        if relay.done:
            return
        try:
            data = os.read(relay.source, RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as error:
            self._end_stream(relay, f"reading failed ({error.strerror or error})", problem=True)
            return
        if not data:
            relay.eof = True
            self._handlers.pop(relay.source, None)
            if relay.source_watched:
                self._poller.unregister(relay.source)
            os.close(relay.source)
            relay.source = -1
            if not relay.pending:
                self._end_stream(relay, None)
            return
        relay.chunks += 1
        relay.total += len(data)
        # The session records the chunk and says where it goes (_stream_chunk): the stream is one of its channels.
        conn = relay.conn
        self._execute(conn, conn.session.received(Channel.DEVICE_STATE, Side(int(relay.direction)), data, [],
                                                  time.time_ns()))

    def _stream_chunk(self, conn: _Connection, command: Send) -> None:
        """A device-state chunk the session sends on: into the pipe of the relay it came through."""
        sender = command.to.other.direction
        relay = next((r for r in reversed(conn.streams) if r.direction == sender and not r.done), None)
        if relay is None:
            return
        relay.pending += command.data
        self._flush_stream(relay)

    def _flush_stream(self, relay: _StreamRelay, _mask: int = 0) -> None:
        if relay.done:
            return
        while relay.pending:
            try:
                written = os.write(relay.sink, relay.pending)
            except BlockingIOError:
                break
            except OSError as error:
                self._end_stream(relay, f"the reader's end is gone ({error.strerror or error}); "
                                        f"{len(relay.pending)} byte(s) not delivered", problem=True)
                return
            relay.pending = relay.pending[written:]
        if relay.pending:
            # Back-pressure: stop reading until the sink takes what it has.
            if not relay.sink_watched:
                relay.sink_watched = True
                self._poller.register(relay.sink, select.EPOLLOUT)
                self._handlers[relay.sink] = (self._flush_stream, relay)
            if relay.source >= 0 and relay.source_watched:
                relay.source_watched = False      # unregistered: a hang-up would be reported even with mask 0
                self._poller.unregister(relay.source)
            return
        if relay.sink_watched:
            relay.sink_watched = False
            self._handlers.pop(relay.sink, None)
            self._poller.unregister(relay.sink)
        if relay.eof:
            self._end_stream(relay, None)
        elif relay.source >= 0 and not relay.source_watched:
            relay.source_watched = True
            self._poller.register(relay.source, select.EPOLLIN)

    def _end_stream(self, relay: _StreamRelay, trouble: str | None, problem: bool = False) -> None:
        if relay.done:
            return
        relay.done = True
        for fd in (relay.source, relay.sink):
            if fd < 0:
                continue
            self._handlers.pop(fd, None)
            try:
                self._poller.unregister(fd)
            except (OSError, ValueError):
                pass
            os.close(fd)
        relay.source = relay.sink = -1
        conn = relay.conn
        if relay in conn.streams:
            conn.streams.remove(relay)
        key = (conn.number, Channel.DEVICE_STATE, relay.direction)
        chunks, total = self.stream_totals.get(key, (0, 0))
        self.stream_totals[key] = (chunks + relay.chunks, total + relay.total)
        if trouble is None:
            text = f"device-state stream ended (EOF): {relay.total} bytes relayed {relay.direction.arrow}"
        else:
            text = f"device-state stream ended after {relay.total} bytes {relay.direction.arrow}: {trouble}"
        self._event(conn, Channel.DEVICE_STATE, text, problem=problem, kind=EventKind.CHANNEL_CLOSED)

    # ---- the data plane (rings, notifications) ----

    def _emit_samples(self, conn: _Connection, samples: list[RingSample], now: int | None = None) -> None:
        if not samples:
            return
        timestamp = time.time_ns() if now is None else now
        watch = conn.rings
        for sample in samples:
            # The live display shows a periodic sample only when the ring moved: an idle ring is one line, not five
            # a second. The capture keeps them all.
            self._emit(Record(timestamp, conn.number, Channel.MAIN, Direction.FRONTEND_TO_BACKEND, sample.pack(), [],
                              RecordKind.EVENT, sample.note(), EventKind.RING),
                       show=sample.reason != Reason.PERIODIC or watch is None or watch.news(sample))

    def _ring_tick(self, conn: _Connection) -> None:
        if conn.closed or conn.rings is None or self._stopping:
            return
        self._emit_samples(conn, conn.rings.sample_running(Reason.PERIODIC))
        self._schedule(self.rings_interval, self._ring_tick, conn)

    def _substitute_notification(self, conn: _Connection, data: bytes, fds: list[int]) -> list[int] | None:
        """For SET_VRING_KICK / SET_VRING_CALL with an eventfd: pass on an eventfd of the proxy's and count."""
        kind = _NOTIFICATION_REQUESTS.get(int.from_bytes(data[:4], "little"))
        if kind is None:
            return None
        message = decode(data)
        if message.kind != "vring_fd" or message.problems:
            return None
        ring = message.payload.index
        old = conn.relays.pop((ring, kind), None)
        if old is not None:
            self._close_relay(old)
        if len(fds) != 1 or describe_fd(fds[0]).kind != "eventfd":
            return None
        try:
            relay = NotificationRelay(ring, kind, fds[0])
        except OSError as error:
            self._no_fds_for(conn, Channel.MAIN, f"{kind} eventfd of ring {ring}", error)
            return None
        conn.relays[(ring, kind)] = relay
        self._poller.register(relay.source, select.EPOLLIN)
        self._handlers[relay.source] = (self._on_notification, (conn, relay))
        given, relay.given = relay.given, -1
        return [given]

    def _on_notification(self, target: tuple[_Connection, NotificationRelay], _mask: int) -> None:
        conn, relay = target
        try:
            count = relay.pump()
        except OSError as error:
            self._close_relay(relay)
            conn.relays.pop((relay.ring, relay.kind), None)
            self._event(conn, Channel.MAIN, f"{relay.kind} relay of ring {relay.ring} failed "
                        f"({error.strerror or error}); no longer relayed", problem=True, kind=EventKind.RESOURCE)
            return
        if count and conn.rings is not None:
            if relay.kind == "kick":
                conn.rings.count(relay.ring, kicks=count)
            else:
                conn.rings.count(relay.ring, calls=count)

    def _close_relay(self, relay: NotificationRelay) -> None:
        if relay.source >= 0:
            self._handlers.pop(relay.source, None)
            try:
                self._poller.unregister(relay.source)
            except (OSError, ValueError):
                pass
        relay.close()

    def _end_data_plane(self, conn: _Connection) -> None:
        """The connection ended: last samples, every mapping and relayed eventfd closed."""
        assert conn.rings is not None
        for relay in conn.relays.values():
            self._close_relay(relay)      # not pumped: the front-end's fd may be blocking, and nothing waits
        conn.relays.clear()
        self._emit_samples(conn, conn.rings.close())

    # ---- records, events, display ----

    def _emit(self, record: Record, show: bool = True) -> None:
        if self._writer is not None:
            self._writer.write(record)
        self._observe(record, show)

    def _observe(self, record: Record, show: bool = True) -> None:
        if self.keep_records:
            self.records.append(record)
        if self._display is not None and show:
            self._display_backlog.append(record)
            if len(self._display_backlog) > DISPLAY_BACKLOG_KEPT:
                # Traffic that never lets the loop idle: show as it goes, so the backlog (memory) stays bounded.
                self._show_backlog(1)
        if self.on_record is not None:
            self.on_record(record)
        if self._waiters:
            with self._changed:
                self._changed.notify_all()

    def _event(self, conn: _Connection, channel: Channel, text: str, problem: bool = False,
               kind: EventKind = EventKind.NOTE) -> None:
        if problem:
            self._report_only(f"connection {conn.number}: {text}")
        self._emit(Record(time.time_ns(), conn.number, channel, Direction.FRONTEND_TO_BACKEND, b"", [],
                          RecordKind.EVENT, text, kind))

    def _report_only(self, text: str) -> None:
        self.problems.append(text)
        if self.report is not None:
            self.report(text)

    def _show_backlog(self, limit: int | None) -> None:
        """Show what was forwarded, while the loop is idle; when a connection ends, its report and state.

        The session analysis runs here, off the forwarding path, and only when there is a display."""
        if self._display is None:
            return
        if self._display_tracker is None:
            self._display_tracker = Analyzer(keep=False)   # streaming: memory stays flat however long
        analyzer = self._display_tracker
        shown = 0
        while self._display_backlog and (limit is None or shown < limit):
            record = self._display_backlog.popleft()
            if self._display_first_ns is None:
                self._display_first_ns = record.timestamp_ns
            self._display_number += 1
            relative = (record.timestamp_ns - self._display_first_ns) / 1e9
            # Events are decoded (for their device note) by feed itself.
            message = analyzer.tracker.decode(record) if record.kind == RecordKind.MESSAGE else None
            findings = analyzer.feed(record, message, self._display_number)
            self._display(record_line(self._display_number, relative, record, message, self._colour))
            for finding in findings:
                self._display(f"        [expert] {finding.line()}")
            if record.kind == RecordKind.EVENT and record.connection not in analyzer.forgotten \
                    and analyzer.state(record.connection).ended:
                self._display(connection_report(analyzer, record.connection))
                analyzer.forget(record.connection)
            shown += 1
