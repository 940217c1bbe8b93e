"""A back-end that dies and comes back at the same path (issue #12): the proxy must look to QEMU exactly like the
back-end would, refusing while it is down and listening again as soon as it is back.

Real peers: qemu-storage-daemon killed with SIGKILL during the guest's I/O and restarted at the same path, QEMU 7.2
with reconnect=1, a guest looping write-and-readback rounds; the direct run is the reference. Fake peers: the
timing faults a real daemon makes only by chance (a listener closed after its connections, a restarted socket
with the same inode).
"""
import socket
import struct
import threading
import time

import pytest

from peers import FakeBackend, FakeFrontend, kit, require  # noqa: F401  (kit is a fixture)
from vhusniff.capture.pcapng import read_capture
from vhusniff.lab import peers as lab
from vhusniff.model import Channel, Direction, RecordKind
from vhusniff.protocol import catalogue as cat
from vhusniff.proxy import Proxy, Route
from vhusniff.proxy.driver import TARGET_LOOKS_AFTER_LOSS

LOOP_SECONDS = 12
OUTAGE_SECONDS = 2.5          # the deliberate outage: the daemon is down this long
GET_FEATURES = int(cat.FrontendRequest.GET_FEATURES)
SET_OWNER = int(cat.FrontendRequest.SET_OWNER)
SET_VRING_KICK = int(cat.FrontendRequest.SET_VRING_KICK)
MEMORY_REQUESTS = {int(cat.FrontendRequest.SET_MEM_TABLE), int(cat.FrontendRequest.ADD_MEM_REG)}
GET_QUEUE_NUM = int(cat.FrontendRequest.GET_QUEUE_NUM)


def _request(record) -> int:
    return struct.unpack_from("<I", record.data)[0]


def _run_guest_through_a_restart(kit, tmp_path, through_proxy: bool, remove_socket: bool):
    """Boot a looping guest, kill -9 its qemu-storage-daemon after a few rounds, restart it on the same disk and
    path after OUTAGE_SECONDS; return the guest's result and the proxy (None when direct)."""
    require("qemu-storage-daemon")
    backend_path, proxy_path = tmp_path / "backend.sock", tmp_path / "proxy.sock"
    proxy = None
    first = lab.start_storage_daemon(tmp_path, backend_path, name="daemon1")
    try:
        if through_proxy:
            proxy = Proxy([Route.forward(proxy_path, backend_path, "blk")], capture=tmp_path / "restart.pcapng",
                          report=None).start()
        with lab.start_qemu(tmp_path, kit, proxy_path if through_proxy else backend_path, reconnect=1,
                            kernel_args=lab.loop_kernel_args(LOOP_SECONDS)) as guest:
            guest.wait_for_line(lambda line: line.endswith(" round 3 ok"), timeout=30)
            first.proc.kill()
            first.proc.wait()
            if remove_socket:
                backend_path.unlink()
            else:
                assert backend_path.is_socket(), "kill -9 leaves the socket file behind"
            time.sleep(OUTAGE_SECONDS)
            with lab.start_storage_daemon(tmp_path, backend_path, name="daemon2", disk_path=first.disk_path,
                                          remove_stale_socket=False):
                result = guest.wait(LOOP_SECONDS + 30)
    finally:
        first.stop()
        if proxy is not None:
            proxy.stop()
    return result, proxy


def _assert_every_round_passed(result):
    rounds = result.rounds
    assert result.clean_exit, result.console
    assert "vhost_backend_init failed" not in result.console, result.console
    # The daemon dies after round 3 and the disk blocks until it is back, so round 5 is I/O after the restart
    # (how many more fit in the loop's time depends on the machine's load).
    assert len(rounds) >= 5 and all(passed for _number, passed in rounds), result.guest_lines
    assert [number for number, _passed in rounds] == list(range(1, len(rounds) + 1))
    assert f"{lab.GUEST_MARK} rounds {len(rounds)} ok 0 failed" in result.guest_lines


def test_direct_guest_survives_a_backend_restart(kit, tmp_path):
    """The reference: without the proxy, QEMU's reconnect=1 carries the guest through the restart."""
    result, _ = _run_guest_through_a_restart(kit, tmp_path, through_proxy=False, remove_socket=False)
    _assert_every_round_passed(result)


@pytest.mark.parametrize("remove_socket", [False, True], ids=["stale-socket", "socket-removed"])
def test_guest_survives_a_backend_restart_through_the_proxy(kit, tmp_path, remove_socket):
    result, proxy = _run_guest_through_a_restart(kit, tmp_path, through_proxy=True, remove_socket=remove_socket)
    _assert_every_round_passed(result)
    records = list(read_capture(tmp_path / "restart.pcapng"))
    # QEMU was refused while the daemon was down, never accepted and dropped: exactly one connection after it.
    numbers = sorted({r.connection for r in records if r.kind == RecordKind.MESSAGE})
    assert numbers == [1, 2], [r.note for r in records if r.kind == RecordKind.EVENT]
    assert proxy.connections_total == 2
    first, second = ([_request(r) for r in records if r.kind == RecordKind.MESSAGE and r.connection == number
                      and r.channel == Channel.MAIN and r.direction == Direction.FRONTEND_TO_BACKEND]
                     for number in (1, 2))
    # A full handshake from the start, up to a started device: memory table and ring kicks again.
    assert second[:7] == first[:7] and second[0] == GET_FEATURES and SET_OWNER in second, second
    assert MEMORY_REQUESTS & set(second) and SET_VRING_KICK in second, second
    notes = [r.note for r in records if r.kind == RecordKind.EVENT and r.connection == 0]
    assert any("stops listening" in note for note in notes), notes
    assert any("listening on" in note and "again" in note for note in notes), notes


# ---------------------------------------------------------------- fake peers: timing faults


def _refused(path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    finally:
        probe.close()
    return False


def _events(proxy) -> list[str]:
    return [r.note for r in proxy.records if r.kind == RecordKind.EVENT and r.connection == 0]


def _wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def proxied(tmp_path):
    """A proxy in front of a fake back-end; yields (proxy, back-end, proxy path, back-end path)."""
    backend_path, proxy_path = tmp_path / "backend.sock", tmp_path / "proxy.sock"
    backend = FakeBackend(backend_path)
    proxy = Proxy([Route.forward(proxy_path, backend_path)], report=None).start()
    yield proxy, backend, proxy_path, backend_path
    proxy.stop()
    backend.close()


def test_backend_death_closes_the_door_before_the_frontend_comes_back(proxied):
    """The back-end dies: the proxy stops listening on its own, so the front-end's first reconnect is refused
    (as the dead back-end would refuse it) instead of being accepted and closed."""
    proxy, backend, proxy_path, _backend_path = proxied
    frontend = FakeFrontend(proxy_path)
    assert frontend.ask(GET_QUEUE_NUM) == 42
    backend.close()                    # its connections and its listener go, like a killed process's
    assert proxy.wait_until(lambda p: any("stops listening" in n for n in _events(p)), timeout=2), _events(proxy)
    assert _refused(proxy_path)
    frontend.close()
    assert proxy.connections_total == 1


def test_listener_closed_shortly_after_the_connections_is_still_noticed(proxied):
    """A dying process may close its listener a moment after its connections: the proxy looks again."""
    proxy, backend, proxy_path, _backend_path = proxied
    frontend = FakeFrontend(proxy_path)
    assert frontend.ask(GET_QUEUE_NUM) == 42
    backend.close_connections()
    closer = threading.Timer(0.15, backend.close)
    closer.start()
    try:
        assert proxy.wait_until(lambda p: any("stops listening" in n for n in _events(p)), timeout=2), \
            _events(proxy)
    finally:
        closer.join()
    assert _refused(proxy_path)
    frontend.close()


def test_backend_closing_a_connection_but_alive_keeps_the_proxy_listening(proxied):
    proxy, backend, proxy_path, _backend_path = proxied
    frontend = FakeFrontend(proxy_path)
    assert frontend.ask(GET_QUEUE_NUM) == 42
    backend.close_connections()
    assert proxy.wait_until(lambda p: p.active_connections == 0)
    frontend.close()
    # The proxy looks a few times, each look a connection the live back-end sees end at once; then it stops.
    looks = len(TARGET_LOOKS_AFTER_LOSS)
    assert _wait_for(lambda: backend.connections == 1 + looks, timeout=3), backend.connections
    assert not any("stops listening" in note for note in _events(proxy)), _events(proxy)
    again = FakeFrontend(proxy_path)
    assert again.ask(GET_QUEUE_NUM) == 42
    again.close()
    assert backend.connections == 2 + looks


def test_restarted_backend_with_the_same_socket_inode_is_noticed(tmp_path):
    """ext4 and tmpfs give a restarted back-end's socket the dead one's inode number: the proxy must not go by
    inode numbers. Here the very same socket file goes from bound-but-not-listening (refused) to listening."""
    backend_path, proxy_path = tmp_path / "backend.sock", tmp_path / "proxy.sock"
    backend = FakeBackend(backend_path, listening=False)
    inode = backend_path.stat().st_ino
    proxy = Proxy([Route.forward(proxy_path, backend_path)], report=None).start()
    try:
        refused_front = FakeFrontend(proxy_path)          # accepted, then the target refuses: outage begins
        with pytest.raises((EOFError, OSError)):
            refused_front.receive()
        refused_front.close()
        assert proxy.wait_until(lambda p: any("stops listening" in n for n in _events(p)), timeout=2)
        assert _refused(proxy_path)
        backend.listen()
        assert backend_path.stat().st_ino == inode
        assert _wait_for(lambda: not _refused(proxy_path), timeout=3), _events(proxy)
        frontend = FakeFrontend(proxy_path)
        assert frontend.ask(GET_QUEUE_NUM) == 42
        frontend.close()
        assert any("listening on" in n and "again" in n for n in _events(proxy)), _events(proxy)
    finally:
        proxy.stop()
        backend.close()


def test_reverse_route_notices_qemu_listening_again_without_connecting_to_it(tmp_path):
    """Reverse topology: QEMU listens (server=on) and is the proxy's target. When it is down and comes back, the
    proxy must see it listening without a probe connection, which QEMU would take as a vhost-user client."""
    qemu_path, proxy_path = tmp_path / "qemu.sock", tmp_path / "proxy.sock"
    qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    qemu.bind(str(qemu_path))                               # bound, not listening yet: connects are refused
    proxy = Proxy([Route.reverse(proxy_path, qemu_path)], report=None).start()
    try:
        backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        backend.connect(str(proxy_path))                    # accepted, then QEMU refuses: the outage begins
        assert backend.recv(1) == b""
        backend.close()
        assert proxy.wait_until(lambda p: any("stops listening" in n for n in _events(p)), timeout=2)
        qemu.listen(4)
        assert _wait_for(lambda: not _refused(proxy_path), timeout=3), _events(proxy)
        qemu.setblocking(False)
        with pytest.raises(BlockingIOError):
            qemu.accept()                                   # the proxy made no connection of its own to QEMU
    finally:
        proxy.stop()
        qemu.close()
