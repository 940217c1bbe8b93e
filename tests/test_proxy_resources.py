"""The proxy's resource behaviour under faults only a fake peer makes: a peer that stops reading (back-pressure,
closing without blocking), running out of file descriptors, and memory over a long session.

The principle: the proxy never leaves a session worse off than a direct connection would, and one
connection's trouble never stalls the others."""
import gc
import hashlib
import os
import resource
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from peers import FakeBackend, FakeFrontend, message
from vhusniff.analysis.analyzer import Analyzer
from vhusniff.cli import proxy as proxy_cli
from vhusniff.engine.sockio import RECV_SIZE
from vhusniff.model import Channel, Direction, EventKind, Record, RecordKind
from vhusniff.proxy import Proxy, Route
from vhusniff.proxy import driver as proxy_module

ROOT = Path(__file__).resolve().parent.parent
GET_FEATURES, SET_OWNER, GET_QUEUE_NUM = 1, 3, 17
MiB = 1 << 20


def _poll(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _settled(value, quiet=0.3, timeout=20.0):
    """Poll value() until it has not changed for `quiet` seconds; returns it."""
    deadline = time.monotonic() + timeout
    last, since = value(), time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() > deadline:
            raise AssertionError("value kept changing")
        time.sleep(0.02)
        now = value()
        if now != last:
            last, since = now, time.monotonic()
    return last


class StuckBackend:
    """A back-end that accepts and then reads nothing until told to (`read_all`)."""

    def __init__(self, path):
        self.path = str(path)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(8)
        self.server.settimeout(5)

    def accept(self) -> socket.socket:
        client, _ = self.server.accept()
        client.settimeout(10)
        return client

    def close(self):
        self.server.close()


def _read_until_eof(sock, limit=None):
    digest, total = hashlib.sha256(), 0
    while limit is None or total < limit:
        data = sock.recv(1 << 20)
        if not data:
            break
        digest.update(data)
        total += len(data)
    return total, digest.hexdigest()


class Flood:
    """Writes `blocks` blocks of 4 KiB-payload SET_OWNER messages (each numbered) as fast as the socket takes
    them, in a thread; `sent` counts the bytes the kernel took, `digest` hashes them in order."""

    def __init__(self, sock, blocks, messages_per_block=1024):
        self.sock, self.sent, self.digest = sock, 0, hashlib.sha256()
        self.blocks, self.per_block = blocks, messages_per_block
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        filler = b"\xa5" * (4096 - 12 - 8)
        for block in range(self.blocks):
            data = b"".join(message(SET_OWNER, struct.pack("<Q", block * self.per_block + n) + filler)
                            for n in range(self.per_block))
            view = memoryview(data)
            while view:
                taken = self.sock.send(view)
                self.digest.update(view[:taken])
                self.sent += taken
                view = view[taken:]

    @property
    def total(self):
        return self.blocks * self.per_block * 4096


def _events(records):
    return [r.note for r in records if r.kind == RecordKind.EVENT]


# ---------------------------------------------------------------- back-pressure

def test_backend_that_never_reads_is_met_with_back_pressure_and_gets_every_byte_in_order(tmp_path):
    limit = 4 * MiB
    stuck = StuckBackend(tmp_path / "stuck.sock")
    events = []
    with FakeBackend(tmp_path / "fake.sock") as fake:
        proxy = Proxy([Route.forward(tmp_path / "a.sock", stuck.path), Route.forward(tmp_path / "b.sock", fake.path)],
                      keep_records=False, max_buffered=limit, report=None,
                      on_record=lambda r: events.append(r) if r.kind == RecordKind.EVENT else None).start()
        try:
            flooder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            flooder.connect(str(tmp_path / "a.sock"))
            backend = stuck.accept()
            flood = Flood(flooder, blocks=52)            # 208 MiB
            stalled_at = _settled(lambda: flood.sent)
            assert stalled_at < flood.total, "the flood went through a back-end that reads nothing"
            # What the front-end got rid of: the proxy's out-buffer plus the kernel's socket buffers.
            assert stalled_at <= limit + RECV_SIZE + 2 * MiB, stalled_at
            assert proxy.buffered_peak <= limit + RECV_SIZE, proxy.buffered_peak
            pauses = [n for n in _events(events) if "is not taking what the front-end sends" in n]
            assert len(pauses) == 1, _events(events)
            assert "back-end" in pauses[0] and events[-1].connection == 1
            # A pause is recorded at once and told on stderr once it lasts (a short one is flow control).
            _poll(lambda: any("has taken nothing" in p for p in proxy.problems), what="the lasting stall told")
            # Meanwhile another connection is served as usual.
            healthy = FakeFrontend(tmp_path / "b.sock")
            for _ in range(20):
                assert healthy.ask(GET_QUEUE_NUM) == 42
            healthy.close()
            # The back-end reads again: every byte arrives, in order.
            received, digest = _read_until_eof(backend, flood.total)
            flood.thread.join(10)
            assert received == flood.sent == flood.total
            assert digest == flood.digest.hexdigest()
            notes = _events(events)
            paused = sum("is not taking" in n for n in notes)
            resumed = sum("took the backlog" in n for n in notes)
            assert paused >= 1 and resumed == paused, notes      # every episode reported once, and its end
            stalls = sum("has taken nothing" in p for p in proxy.problems)
            assert 1 <= stalls <= paused, list(proxy.problems)
            assert proxy.buffered_peak <= limit + RECV_SIZE
            flooder.close()
            backend.close()
        finally:
            proxy.stop()
            stuck.close()


def test_max_buffered_is_a_cli_option():
    parser = proxy_cli.build_parser()
    args = parser.parse_args(["--listen", "a", "--backend", "b", "--max-buffered", "1048576"])
    assert args.max_buffered == 1 << 20
    assert parser.parse_args(["--listen", "a", "--backend", "b"]).max_buffered == proxy_module.MAX_BUFFERED_DEFAULT


# ---------------------------------------------------------------- closing never blocks

class Pinger:
    """Asks GET_QUEUE_NUM over and over on a healthy connection, in a thread; keeps the worst round trip."""

    def __init__(self, path):
        self.client = FakeFrontend(path)
        self.worst, self.trips, self.stop = 0.0, 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            started = time.perf_counter()
            assert self.client.ask(GET_QUEUE_NUM) == 42
            self.worst = max(self.worst, time.perf_counter() - started)
            self.trips += 1

    def finish(self):
        self.stop = True
        self.thread.join(5)
        self.client.close()


LINGER_STALL_BOUND = 0.5


def test_closing_a_connection_whose_peer_is_full_never_stalls_the_others(tmp_path, monkeypatch):
    monkeypatch.setattr(proxy_module, "LINGER_SECONDS", 2 * LINGER_STALL_BOUND)
    stuck = StuckBackend(tmp_path / "stuck.sock")
    events = []
    with FakeBackend(tmp_path / "fake.sock") as fake:
        proxy = Proxy([Route.forward(tmp_path / "a.sock", stuck.path), Route.forward(tmp_path / "b.sock", fake.path)],
                      keep_records=False, report=None,
                      on_record=lambda r: events.append(r) if r.kind == RecordKind.EVENT else None).start()
        try:
            pinger = Pinger(tmp_path / "b.sock")
            _poll(lambda: pinger.trips > 10, what="the healthy connection")
            # Two connections whose back-ends take nothing: one reads its backlog after the close, one never.
            flows = []
            for _ in range(2):
                front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                front.connect(str(tmp_path / "a.sock"))
                back = stuck.accept()
                payload = b"".join(message(SET_OWNER, struct.pack("<Q", n) + b"\x5a" * 4000) for n in range(512))
                front.sendall(payload)                      # ~2 MiB: the kernel's buffers and the proxy's
                flows.append((front, back, hashlib.sha256(payload).hexdigest(), len(payload)))
            worst_before = pinger.worst
            for front, back, _digest, _size in flows:
                back.shutdown(socket.SHUT_WR)               # the back-end stops sending, still reads nothing
                front.close()                               # then the front-end goes: the proxy closes the pair
            _poll(lambda: sum("closed too" in n for n in _events(events)) == 2, what="both closes")
            trips_at_close = pinger.trips
            _poll(lambda: pinger.trips > trips_at_close + 20, what="round trips after the closes")
            # The first back-end reads what was sent before the close: all of it, in order.
            front, back, digest, size = flows[0]
            assert _read_until_eof(back) == (size, digest)
            # The second takes nothing: after the grace period the rest is dropped, and that is said.
            _poll(lambda: any("not delivered after the connection ended" in n for n in _events(events)),
                  what="the undelivered bytes to be reported")
            pinger.finish()
            # A blocking close would stall the loop for the whole linger (1 s); scheduling on a busy machine
            # can delay a round trip by a tenth of that, so half the linger tells the two apart.
            assert pinger.worst < LINGER_STALL_BOUND, f"a round trip took {pinger.worst * 1000:.0f} ms (before: " \
                                       f"{worst_before * 1000:.0f} ms)"
            dropped = [n for n in _events(events) if "not delivered after" in n]
            assert len(dropped) == 1 and "byte(s) for the back-end" in dropped[0], dropped
            assert flows[1][1].recv(1 << 20), "what the kernel took was delivered"
            for _front, back, _digest, _size in flows:
                back.close()
        finally:
            proxy.stop()
            stuck.close()


# ---------------------------------------------------------------- memory of the live display

def _session(connection, pairs, start_ns):
    """A connection's records: connected, `pairs` GET_FEATURES request/reply pairs, closed."""
    request = message(GET_FEATURES)
    reply = struct.pack("<III", GET_FEATURES, 0x5, 8) + struct.pack("<Q", 1 << 32)
    ns = start_ns
    yield Record(ns, connection, Channel.MAIN, Direction.FRONTEND_TO_BACKEND, b"", [], RecordKind.EVENT,
                 "connected: front-end via p.sock, back-end at b.sock", EventKind.CONNECTED)
    yield Record(ns, connection, Channel.MAIN, Direction.FRONTEND_TO_BACKEND, b"", [], RecordKind.EVENT,
                 "blk", EventKind.DEVICE)
    for _ in range(pairs):
        ns += 1000
        yield Record(ns, connection, Channel.MAIN, Direction.FRONTEND_TO_BACKEND, request)
        ns += 9000
        yield Record(ns, connection, Channel.MAIN, Direction.BACKEND_TO_FRONTEND, reply)
    yield Record(ns + 1, connection, Channel.MAIN, Direction.FRONTEND_TO_BACKEND, b"", [], RecordKind.EVENT,
                 "front-end closed: connection closed after message #2", EventKind.CLOSED)


def test_streaming_analyzer_memory_is_flat_over_a_long_session():
    analyzer = Analyzer(keep=False)
    decoded = {}           # the two messages decoded once: the test measures the analysis, not the decoder

    def run(first_connection, connections, pairs):
        for connection in range(first_connection, first_connection + connections):
            for record in _session(connection, pairs, connection * 10**9):
                if record.kind == RecordKind.MESSAGE:
                    if record.direction not in decoded:
                        decoded[record.direction] = analyzer.tracker.decode(record)
                    analyzer.feed(record, decoded[record.direction])
                else:
                    analyzer.feed(record)
            assert analyzer.state(connection).ended
            analyzer.forget(connection)          # as the proxy does once the report is printed

    run(1, 10, 1000)                             # warm-up: caches and summaries reach their size
    gc.collect()
    warm = len(gc.get_objects())
    run(11, 100, 1000)                           # 100,000 request/reply pairs more, over 100 connections
    gc.collect()
    grown = len(gc.get_objects()) - warm
    assert grown < 500, f"{grown} more live objects after 100,000 pairs"
    assert analyzer.transactions == [] and analyzer.findings == []
    assert len(analyzer.connections) == 0 and analyzer.tracker.contexts == {}
    summary = analyzer.summary[(Channel.MAIN, "GET_FEATURES")]
    assert summary.count == summary.answered == 110 * 1000
    assert summary.min_seconds == summary.max_seconds == pytest.approx(9e-6)


def test_offline_analyzer_still_keeps_every_transaction():
    analyzer = Analyzer()
    for record in _session(1, 50, 0):
        analyzer.feed(record)
    assert len(analyzer.transactions) == 50 and all(t.outcome == "answered" for t in analyzer.transactions)
    assert analyzer.summary == {}


def test_live_display_forgets_ended_connections(tmp_path):
    lines = []
    with FakeBackend(tmp_path / "fake.sock") as fake:
        proxy = Proxy([Route.forward(tmp_path / "p.sock", fake.path)], display=lines.append, keep_records=False,
                      report=None).start()
        for _ in range(30):
            client = FakeFrontend(tmp_path / "p.sock")
            assert client.ask(GET_FEATURES) == 42
            client.close()
        assert proxy.wait_until(lambda p: p.active_connections == 0 and p.connections_total == 30)
        proxy.stop()
    analyzer = proxy._display_tracker
    assert sum(line.startswith("Connection ") for line in lines) == 30, "each report printed once"
    assert analyzer.connections.keys() <= {0} and analyzer.transactions == []


def test_live_display_backlog_stays_bounded_under_endless_traffic(tmp_path, monkeypatch):
    """Traffic that never lets the loop go idle: the display catches up as it goes instead of queueing every
    record (which grew the proxy by ~0.4 KiB a message)."""
    monkeypatch.setattr(proxy_module, "DISPLAY_BACKLOG_KEPT", 64)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    backend = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "echo_backend.py"),
                                str(tmp_path / "echo.sock")], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert backend.stdout.readline().strip() == "ready"
        longest = [0]
        proxy = None

        def show(_line):
            longest[0] = max(longest[0], len(proxy._display_backlog))
        proxy = Proxy([Route.forward(tmp_path / "p.sock", tmp_path / "echo.sock")], display=show,
                      keep_records=False, report=None).start()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(tmp_path / "p.sock"))
        requests = 5000
        request = message(GET_QUEUE_NUM)
        sender = threading.Thread(target=client.sendall, args=(request * requests,))
        sender.start()
        expected, got = requests * 20, 0
        while got < expected:
            got += len(client.recv(RECV_SIZE))
        sender.join()
        client.close()
        assert proxy.wait_until(lambda p: p.active_connections == 0)
        proxy.stop()
    finally:
        backend.kill()
        backend.wait()
    assert 0 < longest[0] <= 64, longest[0]


# ---------------------------------------------------------------- file descriptors

def _limit(soft, hard):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class CliProxy:
    """`vhusniff proxy` in a subprocess with its own open-file limit, in front of the echo back-end."""

    def __init__(self, tmp_path, soft, hard):
        self.backend_path, self.path = tmp_path / "echo.sock", tmp_path / "proxy.sock"
        self.stderr_path = tmp_path / "proxy.err"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.backend = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "echo_backend.py"),
                                         str(self.backend_path)], stdout=subprocess.PIPE, text=True, env=env)
        assert self.backend.stdout.readline().strip() == "ready"
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen([sys.executable, "-m", "vhusniff.cli.main", "proxy", "-q", "--listen",
                                          str(self.path), "--backend", str(self.backend_path)],
                                         env=env, stderr=stderr, preexec_fn=_limit(soft, hard))
        _poll(self.path.exists, what="the proxy to listen")

    def stderr(self):
        return self.stderr_path.read_text()

    def cpu_seconds(self):
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self):
        self.proc.terminate()
        code = self.proc.wait(10)
        self.backend.kill()
        self.backend.wait()
        return code


def _connect(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))        # blocking: waits for room in the listener's backlog, as QEMU's would
    sock.settimeout(10)
    return sock


def _answered(socks, timeout):
    """Which of `socks` (each sent one GET_FEATURES) have their 20-byte reply within `timeout`."""
    poller, pending = select.poll(), {s.fileno(): s for s in socks}
    for sock in socks:
        poller.register(sock, select.POLLIN)
    got, deadline = set(), time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for fd, _event in poller.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            sock = pending.pop(fd)
            poller.unregister(fd)
            data = b""
            while len(data) < 20:
                chunk = sock.recv(20 - len(data))
                assert chunk, "the proxy closed a connection"
                data += chunk
            got.add(sock)
    return got


def test_out_of_fds_the_proxy_waits_without_spinning_or_dying_and_serves_again(tmp_path):
    proxy = CliProxy(tmp_path, 64, 64)
    try:
        clients = [_connect(proxy.path) for _ in range(45)]        # more than 64 fds can serve (2 each)
        for client in clients:
            client.sendall(message(GET_FEATURES))
        _poll(lambda: "out of file descriptors" in proxy.stderr(), what="the shortage to be reported")
        served = _answered(clients, 2.0)
        waiting = [c for c in clients if c not in served]
        assert 10 <= len(served) < len(clients) and waiting
        cpu_before, wall_before = proxy.cpu_seconds(), time.monotonic()
        # Open connections go on working; nobody spins meanwhile.
        for _round in range(10):
            for client in served:
                client.sendall(message(GET_FEATURES))
            assert _answered(list(served), 5.0) == served
        _poll(lambda: time.monotonic() - wall_before > 1.0, what="a second to pass")
        cpu = proxy.cpu_seconds() - cpu_before
        assert cpu < 0.3 * (time.monotonic() - wall_before), f"{cpu:.2f} s of CPU while out of fds"
        assert proxy.proc.poll() is None, proxy.stderr()
        assert proxy.stderr().count("out of file descriptors") == 1, proxy.stderr()
        # Some close: the waiting ones are served.
        for client in list(served)[:10]:
            client.close()
        later = _answered(waiting, 5.0)
        assert len(later) >= 5, f"only {len(later)} waiting connection(s) served after 10 closed"
        for client in clients:
            client.close()
    finally:
        code = proxy.close()
    assert code == 0 and "Traceback" not in proxy.stderr(), proxy.stderr()


def test_1024_concurrent_connections_with_the_common_soft_limit(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"hard open-file limit {hard}: too low for 1,024 connections from one test process")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    proxy = CliProxy(tmp_path, 1024, 4096)
    try:
        clients = [_connect(proxy.path) for _ in range(1024)]
        for client in clients:
            client.sendall(message(GET_FEATURES))
        served = _answered(clients, 20.0)
        assert len(served) == 1024, proxy.stderr()
        assert "open-file limit raised from 1024 to 4096" in proxy.stderr()
        for client in clients:
            client.close()
    finally:
        code = proxy.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert code == 0 and "Traceback" not in proxy.stderr(), proxy.stderr()
