"""The proxy against real peers (QEMU, qemu-storage-daemon, dpdk-testpmd) and, for faults real peers cannot
make, a fake Python peer. Skips when a program is missing outside CI, fails in CI."""
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from peers import FakeBackend, FakeFrontend, kit, message, open_fds, require  # noqa: F401  (kit is a fixture)
from vhusniff.capture.pcapng import read_capture
from vhusniff.lab import peers as lab
from vhusniff.lab.command import run_lab
from vhusniff.model import Channel, Direction, EventKind, RecordKind
from vhusniff.protocol import catalogue as cat
from vhusniff.proxy import Proxy, ProxyError, Route

GET_FEATURES, SET_OWNER, SET_BACKEND_REQ_FD, GET_QUEUE_NUM, GET_VRING_BASE = 1, 3, 21, 17, 11


def messages(records, channel=None):
    return [r for r in records if r.kind == RecordKind.MESSAGE and (channel is None or r.channel == channel)]


def events(records):
    return [r.note for r in records if r.kind == RecordKind.EVENT]


def header(record):
    return struct.unpack_from("<III", record.data)


# ---------------------------------------------------------------- real peers

def test_blk_guest_boots_through_the_proxy_and_the_capture_holds_every_message(kit, tmp_path):
    require("qemu-storage-daemon")
    capture = tmp_path / "boot.pcapng"
    run = run_lab(tmp_path, "blk", capture_path=capture, report=lambda text: None)
    assert run.result.blk_io_ok and run.result.clean_exit, run.result.console
    written = (tmp_path / "storage-daemon.img").read_bytes()
    offset = lab.PATTERN_OFFSET_MIB << 20
    assert written[offset:offset + 16] == b"VHUSNIFF-PATTERN", "the guest's write reached the back-end's disk"

    on_disk = list(read_capture(capture))
    assert [(r.connection, r.channel, r.direction, r.data, r.note) for r in on_disk] == \
        [(r.connection, r.channel, r.direction, r.data, r.note) for r in run.records]
    main = messages(on_disk, Channel.MAIN)
    # Independent count: what each side's socket delivered to the proxy, against what the capture holds.
    proxy_counts = run.connections
    assert proxy_counts == 1
    names = Counter()
    for direction in Direction:
        sent = [r for r in main if r.direction == direction]
        assert sent, f"no {direction.arrow} messages"
        for record in sent:
            request, flags, size = header(record)
            assert len(record.data) == 12 + size and not record.note
            names[(direction, request)] += 1
    requests = [r for r in main if r.direction == Direction.FRONTEND_TO_BACKEND]
    replies = [r for r in main if r.direction == Direction.BACKEND_TO_FRONTEND]
    # The session's shape: every reply answers a request that always has one or asked for one.
    always = {1, 11, 15, 17, 24, 36}
    expected_replies = [header(r)[0] for r in requests if header(r)[0] in always or header(r)[1] & 0x8]
    assert [header(r)[0] for r in replies] == expected_replies
    assert all(header(r)[1] == 0x5 for r in replies)
    # fds described: eventfds for call/kick/err, a 256 MiB memfd for ADD_MEM_REG, a socket for the channel.
    kinds = {header(r)[0]: [fd.kind for fd in r.fds] for r in requests if r.fds}
    assert kinds[13] == ["eventfd"] and kinds[12] == ["eventfd"] and kinds[14] == ["eventfd"]
    assert kinds[37] == ["memfd"] and kinds[21] == ["socket"]
    memory = next(r for r in requests if header(r)[0] == 37).fds[0]
    assert memory.size == lab.GUEST_MEMORY_MB << 20 and memory.inode > 0
    assert any("backend channel interposed" in note for note in events(on_disk))
    assert "front-end closed: connection closed" in " ".join(events(on_disk))


def test_stream_totals_match_the_records(kit, tmp_path):
    """What each socket delivered (bytes and framed messages, counted on the receive side) is in the records."""
    require("qemu-storage-daemon")
    run_records = []
    socket_path, proxy_path = tmp_path / "b.sock", tmp_path / "p.sock"
    with lab.start_storage_daemon(tmp_path, socket_path):
        proxy = Proxy([Route.forward(proxy_path, socket_path)], on_record=run_records.append, report=None).start()
        with lab.start_qemu(tmp_path, kit, proxy_path) as guest:
            assert guest.wait(60).blk_io_ok
        assert proxy.wait_until(lambda p: p.active_connections == 0 and p.connections_total == 1)
        proxy.stop()
    assert proxy.stream_totals
    for (connection, channel, direction), (framed, received) in proxy.stream_totals.items():
        recorded = [r for r in messages(run_records, channel) if r.direction == direction
                    and r.connection == connection]
        assert len(recorded) == framed
        assert sum(len(r.data) for r in recorded) == received


def test_reverse_topology_qemu_listens_and_testpmd_connects(kit, tmp_path):
    require("dpdk-testpmd")
    run = run_lab(tmp_path, "net", reverse=True, capture_path=tmp_path / "rev.pcapng", report=lambda text: None)
    assert run.result.net_io_ok and run.result.clean_exit, run.result.console
    main = messages(run.records, Channel.MAIN)
    assert len(main) > 30
    assert {r.direction for r in main} == set(Direction)
    assert messages(run.records, Channel.BACKEND) or any("backend channel interposed" in n
                                                         for n in events(run.records))
    assert "connected: back-end via" in events(run.records)[0]
    assert len(list(read_capture(tmp_path / "rev.pcapng"))) == len(run.records)


def test_testpmd_crashes_qemu_and_the_proxy_records_it(kit, tmp_path):
    require("dpdk-testpmd")
    capture = tmp_path / "crash.pcapng"
    run = run_lab(tmp_path, "net", msix=True, capture_path=capture, report=lambda text: None)
    assert run.result.exit_code == -signal.SIGSEGV, run.result.console
    on_disk = list(read_capture(capture))          # readable to its end: no CaptureError
    assert len(on_disk) == len(run.records)
    assert header(messages(on_disk)[-1])[0] == 18, "the last message is the SET_VRING_ENABLE QEMU died after"
    notes = events(on_disk)
    assert any(note.startswith("front-end closed") for note in notes)
    assert notes[-1].startswith("front-end closed: connection closed") or "connection closed" in notes[-1]


def test_backend_killed_mid_session_other_connection_keeps_working(kit, tmp_path):
    require("qemu-storage-daemon")
    before = open_fds()
    backend_path, proxy_path = tmp_path / "b.sock", tmp_path / "p.sock"
    with FakeBackend(tmp_path / "fake.sock") as fake, lab.start_storage_daemon(tmp_path, backend_path) as daemon:
        proxy = Proxy([Route.forward(proxy_path, backend_path), Route.forward(tmp_path / "p2.sock", fake.path)],
                      report=None).start()
        other = FakeFrontend(tmp_path / "p2.sock")
        with lab.start_qemu(tmp_path, kit, proxy_path) as guest:
            assert proxy.wait_until(lambda p: len(messages(p.records)) >= 12)
            daemon.proc.kill()
            # EOF, a reset or a broken pipe, on the main socket or the back-end channel first: all name the back-end.
            assert proxy.wait_until(lambda p: any("back-end" in n and ("closed" in n or "disconnected" in n)
                                                  for n in events(p.records))), events(proxy.records)
            assert other.ask(GET_FEATURES) == 42, "the other connection still works"
            guest.stop()
        assert proxy.wait_until(lambda p: p.active_connections == 1)
        other.close()
        proxy.stop()
    qemu_connection = [r for r in proxy.records if r.kind == RecordKind.EVENT and r.connection == 1]
    assert any("after message #" in r.note for r in qemu_connection)
    assert open_fds() == before


def test_qemu_killed_then_a_new_qemu_is_a_new_connection(kit, tmp_path):
    require("qemu-storage-daemon")
    backend_path, proxy_path = tmp_path / "b.sock", tmp_path / "p.sock"
    with lab.start_storage_daemon(tmp_path, backend_path) as daemon:
        proxy = Proxy([Route.forward(proxy_path, backend_path)], report=None).start()
        with lab.start_qemu(tmp_path, kit, proxy_path, name="qemu1") as guest:
            assert proxy.wait_until(lambda p: len(messages(p.records)) >= 12)
            guest.proc.kill()
            assert proxy.wait_until(lambda p: p.active_connections == 0)
        assert daemon.running
        with lab.start_qemu(tmp_path, kit, proxy_path, name="qemu2") as guest:
            result = guest.wait(60)
        assert proxy.wait_until(lambda p: p.active_connections == 0)
        proxy.stop()
    assert result.blk_io_ok, result.console
    assert proxy.connections_total == 2
    first = [n for n in events(proxy.records) if "connection closed" in n]
    assert first and {r.connection for r in messages(proxy.records)} == {1, 2}


def test_backend_restarted_qemu_reconnects_and_that_is_a_new_connection(kit, tmp_path):
    """QEMU's reconnect=1 and a qemu-storage-daemon killed during the handshake and restarted: the proxy records
    the first connection's end and a second connection with a whole new handshake, and QEMU, which would give
    up after a few protocol errors, waits for the back-end as it would without the proxy and boots."""
    require("qemu-storage-daemon")
    backend_path, proxy_path = tmp_path / "b.sock", tmp_path / "p.sock"
    proxy = Proxy([Route.forward(proxy_path, backend_path)], report=None).start()
    try:
        with lab.start_storage_daemon(tmp_path, backend_path, name="daemon1") as first, \
                lab.start_qemu(tmp_path, kit, proxy_path, reconnect=1) as guest:
            assert proxy.wait_until(lambda p: len(messages(p.records)) >= 12)
            first.proc.kill()
            first.proc.wait()
            assert proxy.wait_until(lambda p: p.active_connections == 0), events(proxy.records)
            with lab.start_storage_daemon(tmp_path, backend_path, name="daemon2"):
                result = guest.wait(60)
    finally:
        proxy.stop()
    assert result.blk_io_ok, result.console
    numbers = sorted({r.connection for r in messages(proxy.records)})
    assert numbers[0] == 1 and len(numbers) >= 2
    second = [header(r)[0] for r in messages(proxy.records, Channel.MAIN) if r.connection == numbers[-1]
              and r.direction == Direction.FRONTEND_TO_BACKEND]
    assert second[0] == GET_FEATURES and len(second) >= 12, second     # a handshake from the start
    first_end = [r.note for r in proxy.records if r.kind == RecordKind.EVENT and r.connection == 1]
    assert any("back-end" in note and "after message #" in note for note in first_end), first_end
    outage = events(proxy.records)
    assert any("stops listening" in note for note in outage) and any("listening on" in note and "again" in note
                                                                     for note in outage), outage


# ---------------------------------------------------------------- faults only a fake peer makes

@pytest.fixture
def fake_pair(tmp_path):
    """A proxy with two routes to one fake back-end; yields (proxy, fake back-end, first path, second path)."""
    before = open_fds()
    with FakeBackend(tmp_path / "fake.sock") as fake:
        proxy = Proxy([Route.forward(tmp_path / "a.sock", fake.path), Route.forward(tmp_path / "b.sock", fake.path)],
                      capture=tmp_path / "faults.pcapng", report=None).start()
        yield proxy, fake, tmp_path / "a.sock", tmp_path / "b.sock"
        proxy.stop()
    _wait_for(lambda: open_fds() == before)     # no fd leaked (the fakes close theirs from their threads)


def _check_other_connection(path):
    other = FakeFrontend(path)
    assert other.ask(GET_QUEUE_NUM) == 42
    other.close()


@pytest.mark.parametrize("fault", ["garbage", "oversize", "fd-flood", "half-close"])
def test_bad_input_is_reported_forwarded_and_isolated(fake_pair, tmp_path, fault):
    proxy, fake, path, other_path = fake_pair
    bad = FakeFrontend(path)
    assert bad.ask(GET_FEATURES) == 42                      # message #1 and its reply #2
    if fault == "garbage":
        sent = b"\xde\xad\xbe\xef" * 8 + os.urandom(64)     # a header whose size is 0xefbeadde
        bad.send(sent)
    elif fault == "oversize":
        sent = message(SET_OWNER, b"\0" * 0x2000)
        bad.send(sent)
    elif fault == "fd-flood":
        eventfds = [os.eventfd(0) for _ in range(200)]
        sent = message(SET_OWNER)
        bad.send(sent, eventfds)
        for fd in eventfds:
            os.close(fd)
    else:
        sent = message(GET_FEATURES)[:7]                    # half a header, then close the sending side
        bad.send(sent)
        bad.sock.shutdown(socket.SHUT_WR)
    _check_other_connection(other_path)
    wanted = {"garbage": "cannot be framed at message #3", "oversize": "cannot be framed at message #3",
              "fd-flood": "message #3 carries 200 fds", "half-close": "incomplete message #3"}[fault]
    assert proxy.wait_until(lambda p: any(wanted in n for n in events(p.records)))
    assert any("connection 1: " in text and wanted in text for text in proxy.problems)
    bad.close()
    assert proxy.wait_until(lambda p: p.active_connections == 0)
    proxy.stop()
    recorded = b"".join(r.data for r in messages(read_capture(tmp_path / "faults.pcapng"))
                        if r.connection == 1 and r.direction == Direction.FRONTEND_TO_BACKEND)
    assert recorded == message(GET_FEATURES) + sent, "the capture keeps the exact bytes"
    # The capture says, as a flag, which bytes are not a well-framed message.
    unframed = [r.unframed for r in messages(read_capture(tmp_path / "faults.pcapng")) if r.connection == 1
                and r.direction == Direction.FRONTEND_TO_BACKEND]
    assert unframed == [False, fault != "fd-flood"]
    if fault == "fd-flood":
        assert [len(r.fds) for r in messages(proxy.records) if r.connection == 1] == [0, 0, 200]
        # The fake back-end reads in its own thread; nothing answers SET_OWNER, so wait for it to have read.
        _wait_for(lambda: fake.fd_targets.count("anon_inode:[eventfd]") >= 200)
        assert fake.fd_targets.count("anon_inode:[eventfd]") == 200, "all 200 fds were forwarded"


def test_64_concurrent_connections(tmp_path):
    before = open_fds()
    with FakeBackend(tmp_path / "fake.sock") as fake:
        proxy = Proxy([Route.forward(tmp_path / "p.sock", fake.path)], keep_records=True, report=None).start()
        clients = [FakeFrontend(tmp_path / "p.sock") for _ in range(64)]
        assert proxy.wait_until(lambda p: p.active_connections == 64)
        for _round_number in range(3):
            for client in clients:
                client.send(message(GET_FEATURES))
            for client in clients:
                assert struct.unpack_from("<Q", client.receive().data, 12)[0] == 42
        for client in clients:
            client.close()
        assert proxy.wait_until(lambda p: p.active_connections == 0)
        proxy.stop()
        assert fake.connections == 64
    assert proxy.connections_total == 64
    assert len(messages(proxy.records)) == 64 * 3 * 2
    assert open_fds() == before


def test_live_display_prints_each_connections_report_when_it_ends(tmp_path):
    lines: list[str] = []
    with FakeBackend(tmp_path / "fake.sock") as fake:
        proxy = Proxy([Route.forward(tmp_path / "p.sock", fake.path)], display=lines.append, report=None).start()
        client = FakeFrontend(tmp_path / "p.sock")
        assert client.ask(GET_FEATURES) == 42
        client.send(message(GET_VRING_BASE, struct.pack("<II", 0, 0)))   # never answered: the fake ignores it
        assert proxy.wait_until(lambda p: len(p.records) >= 4)          # connected, request, reply, this one
        client.close()
        assert proxy.wait_until(lambda p: p.active_connections == 0)
        proxy.stop()
    text = "\n".join(lines)
    assert "Connection 1" in text and "Ended:" in text, text
    # The report names the request left waiting, as `vhusniff report` would.
    assert "GET_VRING_BASE" in text.split("Ended:", 1)[1].splitlines()[0], text


GPU_SET_SOCKET = 33


@pytest.mark.parametrize("request_number, channel_kind", [(SET_BACKEND_REQ_FD, Channel.BACKEND),
                                                           (GPU_SET_SOCKET, Channel.GPU)], ids=["backend", "gpu"])
def test_side_channel_is_relayed_and_recorded(tmp_path, request_number, channel_kind):
    with FakeBackend(tmp_path / "fake.sock") as fake:
        proxy = Proxy([Route.forward(tmp_path / "p.sock", fake.path)], report=None).start()
        frontend = FakeFrontend(tmp_path / "p.sock")
        ours, theirs = socket.socketpair()
        frontend.send(message(request_number, flags=0x9), [theirs.fileno()])
        theirs.close()
        assert frontend.receive().data[:4] == struct.pack("<I", request_number)
        channel = fake.channel_sockets[0]
        channel.sendall(message(2, flags=0x9))               # CONFIG_CHANGE_MSG, asking for an ack
        ours.settimeout(5)
        assert ours.recv(64) == message(2, flags=0x9)
        ours.sendall(message(2, struct.pack("<Q", 0), flags=0x5))
        channel.settimeout(5)
        assert channel.recv(64) == message(2, struct.pack("<Q", 0), flags=0x5)
        frontend.close()
        assert proxy.wait_until(lambda p: p.active_connections == 0)
        proxy.stop()
        ours.close()
    side = messages(proxy.records, channel_kind)
    assert [(r.direction, header(r)[0]) for r in side] == [(Direction.BACKEND_TO_FRONTEND, 2),
                                                          (Direction.FRONTEND_TO_BACKEND, 2)]
    assert fake.fd_targets[0].startswith("socket:")
    assert messages(proxy.records, Channel.MAIN)[0].fds[0].kind == "socket"
    assert any(r.kind == RecordKind.EVENT and r.channel == channel_kind and "interposed" in r.note
               for r in proxy.records)


SET_DEVICE_STATE_FD = 42


def _wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _write_all_and_close(fd, data):
    with open(fd, "wb", closefd=True) as stream:
        stream.write(data)


@pytest.mark.parametrize("backend_fd", [False, True], ids=["frontend-pipe", "backend-reply-fd"])
@pytest.mark.parametrize("save", [True, False], ids=["save", "load"])
def test_device_state_stream_is_interposed_relayed_and_recorded(tmp_path, save, backend_fd):
    from vhusniff.protocol.grammar import decode
    from vhusniff.views.present import record_line
    state = os.urandom(300_000)          # more than a pipe holds: the relay must wait for the reader
    before = open_fds()
    with FakeBackend(tmp_path / "fake.sock", return_state_fd=backend_fd) as fake:
        shown: list[str] = []
        proxy = Proxy([Route.forward(tmp_path / "p.sock", fake.path)], capture=tmp_path / "state.pcapng",
                      interpose_device_state=True, display=shown.append, report=None).start()
        frontend = FakeFrontend(tmp_path / "p.sock")
        read_end, write_end = os.pipe()
        given, ours = (write_end, read_end) if save else (read_end, write_end)
        original_inode = os.fstat(given).st_ino
        frontend.send(message(SET_DEVICE_STATE_FD, struct.pack("<II", 0 if save else 1, 0)), [given])
        os.close(given)
        reply = frontend.receive()
        value = struct.unpack_from("<Q", reply.data, 12)[0]
        if backend_fd:                   # the front-end must use the back-end's fd instead of its own
            assert value == 0 and len(reply.fds) == 1
            os.close(ours)
            ours = reply.fds[0]
        else:
            assert value == 0x100 and not reply.fds
        _wait_for(lambda: fake.state_fds)
        theirs = fake.state_fds.pop()
        writer_fd, reader_fd = (theirs, ours) if save else (ours, theirs)
        writer = threading.Thread(target=_write_all_and_close, args=(writer_fd, state))
        writer.start()
        received = _read_all(reader_fd)
        os.close(reader_fd)
        writer.join(5)
        assert received == state
        assert proxy.wait_until(lambda p: any(f"device-state stream ended (EOF): {len(state)} bytes" in n
                                              for n in events(p.records)))
        frontend.close()
        assert proxy.wait_until(lambda p: p.active_connections == 0)
        proxy.stop()
    direction = Direction.BACKEND_TO_FRONTEND if save else Direction.FRONTEND_TO_BACKEND
    assert fake.fd_targets[0].startswith("pipe:") and fake.fd_targets[0] != f"pipe:[{original_inode}]"
    for records in (proxy.records, list(read_capture(tmp_path / "state.pcapng"))):
        stream = messages(records, Channel.DEVICE_STATE)
        assert stream and {(r.direction, r.note) for r in stream} == {(direction, "device-state stream")}
        assert b"".join(r.data for r in stream) == state
    # Shown as an opaque stream, never as malformed vhost-user messages (live display and `vhusniff read`).
    stream_lines = [line for line in shown if "c1/device_state" in line and "DEVICE_STATE_STREAM" in line]
    assert len(stream_lines) == len(messages(proxy.records, Channel.DEVICE_STATE))
    assert all("bytes (opaque)" in line and "[" not in line for line in stream_lines)
    assert not [line for line in shown if "[expert]" in line and "DEVICE_STATE_FD" not in line], shown
    record = messages(proxy.records, Channel.DEVICE_STATE)[0]
    assert record_line(1, 0.0, record, decode(record.data, Channel.DEVICE_STATE)) == record_line(1, 0.0, record, None)
    interposed = [n for n in events(proxy.records) if "device-state stream interposed" in n]
    assert len(interposed) == (2 if backend_fd else 1)
    assert not proxy.problems, proxy.problems
    _wait_for(lambda: open_fds() == before)     # no fd leaked (the fakes close theirs from their threads)


def test_device_state_fd_is_forwarded_unchanged_without_the_flag(tmp_path):
    before = open_fds()
    with FakeBackend(tmp_path / "fake.sock") as fake:
        proxy = Proxy([Route.forward(tmp_path / "p.sock", fake.path)], report=None).start()
        frontend = FakeFrontend(tmp_path / "p.sock")
        read_end, write_end = os.pipe()
        inode = os.fstat(write_end).st_ino
        frontend.send(message(SET_DEVICE_STATE_FD, struct.pack("<II", 0, 0)), [write_end])
        os.close(write_end)
        assert struct.unpack_from("<Q", frontend.receive().data, 12)[0] == 0x100
        _wait_for(lambda: fake.state_fds)
        theirs = fake.state_fds.pop()
        assert os.fstat(theirs).st_ino == inode, "the back-end got the front-end's own pipe"
        os.write(theirs, b"state")
        os.close(theirs)
        assert _read_all(read_end) == b"state"
        os.close(read_end)
        frontend.close()
        assert proxy.wait_until(lambda p: p.active_connections == 0)
        proxy.stop()
    assert fake.fd_targets == [f"pipe:[{inode}]"]
    assert not [r for r in proxy.records if r.channel == Channel.DEVICE_STATE]
    _wait_for(lambda: open_fds() == before)     # no fd leaked (the fakes close theirs from their threads)


def test_device_state_relay_is_cut_and_closed_when_the_connection_closes(tmp_path):
    before = open_fds()
    with FakeBackend(tmp_path / "fake.sock") as fake:
        proxy = Proxy([Route.forward(tmp_path / "p.sock", fake.path)], interpose_device_state=True,
                      report=None).start()
        frontend = FakeFrontend(tmp_path / "p.sock")
        read_end, write_end = os.pipe()
        frontend.send(message(SET_DEVICE_STATE_FD, struct.pack("<II", 0, 0)), [write_end])
        os.close(write_end)
        assert struct.unpack_from("<Q", frontend.receive().data, 12)[0] == 0x100
        _wait_for(lambda: fake.state_fds)
        theirs = fake.state_fds.pop()
        os.write(theirs, b"partial state")                   # the back-end keeps its end open
        assert os.read(read_end, 100) == b"partial state"
        frontend.close()
        assert proxy.wait_until(lambda p: p.active_connections == 0)
        assert _read_all(read_end) == b"", "the proxy closed its end of the front-end's pipe"
        with pytest.raises(BrokenPipeError):
            os.write(theirs, b"more")                        # and its read end of the back-end's pipe
        os.close(theirs)
        os.close(read_end)
        proxy.stop()
    assert any("cut short: the connection closed" in n and "after 13 bytes" in n for n in events(proxy.records))
    _wait_for(lambda: open_fds() == before)     # no fd leaked (the fakes close theirs from their threads)


HOOK_DELAY = 1.2


def test_hooks_drop_modify_and_delay_without_blocking_others(tmp_path):
    from vhusniff.engine.rewrites import DropRequest

    class DelayFirstConnection:
        def message(self, flow):
            if flow.connection == 1 and flow.direction == Direction.BACKEND_TO_FRONTEND:
                flow.delay(HOOK_DELAY)

    class ChangeQueueCount:
        def message(self, flow):
            if flow.message.is_reply and flow.message.request == GET_QUEUE_NUM:
                flow.layer.queue_num = 7

    with FakeBackend(tmp_path / "fake.sock") as fake:
        proxy = Proxy([Route.forward(tmp_path / "p.sock", fake.path)], report=None,
                      hooks=[DropRequest("SET_OWNER"), ChangeQueueCount(), DelayFirstConnection()]).start()
        slow, fast = FakeFrontend(tmp_path / "p.sock"), FakeFrontend(tmp_path / "p.sock")
        started = time.monotonic()
        slow.send(message(GET_FEATURES))
        assert fast.ask(GET_QUEUE_NUM) == 7
        fast_done = time.monotonic() - started
        slow.receive()
        slow_done = time.monotonic() - started
        fast.send(message(SET_OWNER))
        assert fast.ask(GET_FEATURES) == 42
        slow.close(), fast.close()
        assert proxy.wait_until(lambda p: p.active_connections == 0)
        proxy.stop()
    # Not blocked: the other connection is answered well before the delay ends, even on a busy machine.
    assert fast_done < HOOK_DELAY / 2 and HOOK_DELAY <= slow_done
    assert SET_OWNER not in [struct.unpack_from("<I", f.data)[0] for f in fake.frames]
    notes = {r.note for r in messages(proxy.records)}
    assert {"dropped by hook (not forwarded)", "modified by hook", "delayed by hook"} <= notes
    modified = next(r for r in messages(proxy.records) if r.note == "modified by hook")
    assert struct.unpack_from("<Q", modified.data, 12)[0] == 7, "the record holds what was forwarded"


def test_hooks_see_the_device_type_the_route_names(tmp_path):
    seen = []

    class WatchContext:
        def message(self, flow):
            seen.append(flow.context.device_type)

    with FakeBackend(tmp_path / "fake.sock") as fake:
        proxy = Proxy([Route.forward(tmp_path / "p.sock", fake.path, "net")], report=None,
                      hooks=[WatchContext()]).start()
        client = FakeFrontend(tmp_path / "p.sock")
        assert client.ask(GET_FEATURES) == 42
        client.close()
        assert proxy.wait_until(lambda p: p.active_connections == 0)
        proxy.stop()
    assert seen == ["net", "net"]


def test_hooks_inject_and_disconnect_after_forward(tmp_path):
    class InjectAndHangUp:
        def message(self, flow):
            if flow.message.is_reply and flow.message.request == GET_QUEUE_NUM:
                # One more reply to the front-end right after this one, then close both sides.
                flow.inject(message(GET_QUEUE_NUM, struct.pack("<Q", 9), flags=5))
                flow.disconnect("test hangs up", after_forward=True)

    with FakeBackend(tmp_path / "fake.sock") as fake:
        proxy = Proxy([Route.forward(tmp_path / "p.sock", fake.path)], report=None,
                      hooks=[InjectAndHangUp()]).start()
        client = FakeFrontend(tmp_path / "p.sock")
        assert client.ask(GET_QUEUE_NUM) == 42
        injected = client.receive()
        assert struct.unpack_from("<IIIQ", injected.data) == (GET_QUEUE_NUM, 5, 8, 9)
        with pytest.raises(EOFError):
            client.receive()
        assert proxy.wait_until(lambda p: p.active_connections == 0)
        proxy.stop()
    replies = [r for r in messages(proxy.records) if r.direction == Direction.BACKEND_TO_FRONTEND]
    assert [struct.unpack_from("<Q", r.data, 12)[0] for r in replies] == [42, 9], "the injected reply is recorded"
    assert any("test hangs up" in note for note in events(proxy.records))


# ---------------------------------------------------------------- sockets and the command line

def test_listening_socket_is_0600_and_only_stale_sockets_are_replaced(tmp_path):
    path = tmp_path / "p.sock"
    path.write_text("precious")
    with pytest.raises(ProxyError, match="not a socket"):
        Proxy([Route.forward(path, tmp_path / "none.sock")]).open()
    assert path.read_text() == "precious"
    path.unlink()
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(path))
    live.listen()
    with pytest.raises(ProxyError, match="another process is listening"):
        Proxy([Route.forward(path, tmp_path / "none.sock")]).open()
    live.close()                                   # the file stays: now a stale socket
    assert path.exists()
    proxy = Proxy([Route.forward(path, tmp_path / "none.sock")], report=None).start()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    proxy.stop()
    assert not path.exists()


def _start_cli_proxy(tmp_path, fake, *options):
    capture = tmp_path / "cli.pcapng"
    process = subprocess.Popen([sys.executable, "-m", "vhusniff.cli.main", "proxy", "-q", "--listen",
                                str(tmp_path / "p.sock"), "--backend", fake.path, "-w", str(capture), *options],
                               stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    deadline = time.monotonic() + 10
    while not (tmp_path / "p.sock").exists():
        assert time.monotonic() < deadline and process.poll() is None, process.stderr.read()
        time.sleep(0.02)
    return process, capture


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_cli_proxy_signals_leave_a_readable_capture(tmp_path, how):
    with FakeBackend(tmp_path / "fake.sock") as fake:
        process, capture = _start_cli_proxy(tmp_path, fake)
        client = FakeFrontend(tmp_path / "p.sock")
        for _ in range(5):
            assert client.ask(GET_FEATURES) == 42
        process.send_signal(how)
        assert process.wait(10) == (-signal.SIGKILL if how == signal.SIGKILL else 0)
        client.close()
    records = list(read_capture(capture))
    assert len(messages(records)) == 10, "every forwarded message is in the capture"
    if how != signal.SIGKILL:
        assert events(records)[-1] == "proxy stopping: connection closed"


def test_cli_proxy_device_option_names_the_device_features_in_the_capture(tmp_path):
    with FakeBackend(tmp_path / "fake.sock") as fake:
        process, capture = _start_cli_proxy(tmp_path, fake, "--device", "net")
        client = FakeFrontend(tmp_path / "p.sock")
        assert client.ask(GET_FEATURES) == 42                 # bits 1, 3 and 5
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        client.close()
    records = list(read_capture(capture))
    assert [r.note for r in records if r.kind == RecordKind.EVENT and r.event == EventKind.DEVICE] == ["net"]
    shown = subprocess.run([sys.executable, "-m", "vhusniff.cli.main", "read", str(capture)], capture_output=True,
                           text=True, check=True).stdout
    reply = next(line for line in shown.splitlines() if "GET_FEATURES reply" in line)
    net, blk = cat.feature_names("net"), cat.feature_names("blk")
    assert all(net[bit] in reply for bit in (1, 3, 5)), reply
    assert blk[5] not in reply or blk[5] == net[5], reply
