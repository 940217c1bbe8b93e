"""The data plane seen from the proxy (--rings, --notifications, `vhusniff rings`), against real guests.

One blk guest boot through `run_lab(--rings --notifications)` is shared by the tests that read its capture.
Unit tests build a split ring in a memfd (as a guest driver lays it out) to check the sampler and the in-flight
decoder against known bytes.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import signal
import struct
import subprocess
import sys
import time

import pytest

from peers import kit, require  # noqa: F401  (kit is a fixture)
from vhusniff.analysis.rings import STUCK_SECONDS, RingChecks
from vhusniff.capture.pcapng import read_capture
from vhusniff.dataplane.inflight import pending_requests
from vhusniff.dataplane.memory import GuestMemory, map_region
from vhusniff.dataplane.notify import RELAYED_MAX, NotificationRelay
from vhusniff.dataplane.rings import RingWatch
from vhusniff.dataplane.sample import Reason, RingSample, SampleError, SampleFlag, unpack_sample
from vhusniff.lab import peers as lab
from vhusniff.lab.command import run_lab
from vhusniff.model import Channel, Direction, EventKind, Record, RecordKind
from vhusniff.protocol.grammar import build_message
from vhusniff.proxy import Proxy, Route

JSON_KEYS = {"connection", "ring", "time", "avail_idx", "used_idx", "in_flight", "kicks", "calls"}


def vhusniff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhusniff", *args], capture_output=True, text=True, timeout=120)


# ---- a split ring laid out in a memfd, as a guest driver would ----

GUEST_BASE = 0x7F0000000000      # the front-end's virtual address of the region
PHYS_BASE = 0x100000             # its guest-physical address
NUM = 8
DESC, AVAIL, USED, DATA = 0x0, 0x1000, 0x2000, 0x3000


class SplitRing:
    """A memfd holding one split ring of NUM entries and its buffers; written only by the test (the 'guest')."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("test-guest-ram")
        os.ftruncate(self.fd, 0x10000)
        self.view = mmap.mmap(self.fd, 0x10000)

    def close(self) -> None:
        self.view.close()
        os.close(self.fd)

    def post_blk(self, slot: int, head: int, kind: int, sector: int, length: int) -> None:
        """A virtio-blk request chain: header, data, status byte, posted at avail ring `slot`."""
        header_at = DATA + 0x100 * head
        struct.pack_into("<IIQ", self.view, header_at, kind, 0, sector)
        descs = [(PHYS_BASE + header_at, 16, 1), (PHYS_BASE + header_at + 16, length, 1 | 2),
                 (PHYS_BASE + header_at + 0xF0, 1, 2)]
        for position, (addr, size, flags) in enumerate(descs):
            struct.pack_into("<QIHH", self.view, DESC + 16 * (head + position), addr, size, flags, head + position + 1)
        struct.pack_into("<H", self.view, AVAIL + 4 + 2 * slot, head)

    def set_indexes(self, avail: int, used: int) -> None:
        struct.pack_into("<H", self.view, AVAIL + 2, avail)
        struct.pack_into("<H", self.view, USED + 2, used)

    def messages(self):
        """What a front-end sends to set the ring up, as (data, fds) pairs."""
        region = dict(guest_phys_addr=PHYS_BASE, memory_size=0x10000, userspace_addr=GUEST_BASE, mmap_offset=0)
        yield build_message(Channel.MAIN, 5, dict(nregions=1, padding=0, region=[region])), [self.fd]
        yield build_message(Channel.MAIN, 8, dict(index=0, num=NUM)), []
        yield build_message(Channel.MAIN, 9, dict(index=0, flags=0, desc=GUEST_BASE + DESC, used=GUEST_BASE + USED,
                                                  avail=GUEST_BASE + AVAIL, log=0)), []
        yield build_message(Channel.MAIN, 12, dict(index=0, flags=0, reserved=0)), []


@pytest.fixture
def split_ring():
    ring = SplitRing()
    yield ring
    ring.close()


def packed_watch(ring: SplitRing, device: str | None = None) -> RingWatch:
    """A watch that has seen RING_PACKED negotiated and `ring`'s memory laid out as a packed ring's set up."""
    watch = RingWatch(device=device)
    features = build_message(Channel.MAIN, 2, dict(features=1 << 34 | 1 << 32))        # RING_PACKED, VERSION_1
    watch.observe(Channel.MAIN, Direction.FRONTEND_TO_BACKEND, features, [])
    for data, fds in ring.messages():
        watch.observe(Channel.MAIN, Direction.FRONTEND_TO_BACKEND, data, fds)
    return watch


def test_sample_round_trips_and_bad_data_is_named():
    sample = RingSample(3, Reason.STOPPED, SampleFlag.MAPPED | SampleFlag.STOPPED, 70, 65, num=256, in_flight=5,
                        base=70, kicks=9, calls=8)
    assert unpack_sample(sample.pack()) == sample
    assert sample.note() == "ring 3 stopped: avail 70 used 65 in flight 5 kicks 9 calls 8 base 70"
    with pytest.raises(SampleError, match="ring sample of 4 bytes"):
        unpack_sample(b"\x01\x00\x00\x00")
    with pytest.raises(SampleError, match="version 9"):
        unpack_sample(b"\x09" + sample.pack()[1:])


def test_memory_is_mapped_read_only_and_translated_both_ways(split_ring):
    split_ring.view[0x3000:0x3004] = b"ring"
    memory = GuestMemory()
    memory.add(map_region(split_ring.fd, PHYS_BASE, 0x10000, GUEST_BASE, 0))
    assert memory.read(GUEST_BASE + 0x3000, 4) == b"ring"
    assert memory.read(PHYS_BASE + 0x3000, 4, physical=True) == b"ring"
    assert memory.read(GUEST_BASE + 0xFFFE, 4) is None            # runs past the region
    with pytest.raises(TypeError):
        memory.regions[0].view[0] = 1                          # PROT_READ: the proxy cannot write guest memory
    assert memory.remove(PHYS_BASE, 0x10000) and memory.regions == []
    assert memory.read(GUEST_BASE, 1) is None


def test_region_past_its_fds_end_is_not_mapped(split_ring):
    region = map_region(split_ring.fd, 0, 0x20000, GUEST_BASE, 0)
    assert region.view is None and "past its fd's size" in region.problem


def test_watch_samples_a_split_ring_set_up_by_messages(split_ring):
    watch = RingWatch(device="blk")
    samples = []
    for data, fds in split_ring.messages():
        samples += watch.observe(Channel.MAIN, Direction.FRONTEND_TO_BACKEND, data, fds)
    assert [(s.ring, s.reason, s.avail_idx, s.used_idx) for s in samples] == [(0, Reason.STARTED, 0, 0)]
    split_ring.post_blk(3, 0, 1, 2048, 4096)
    split_ring.post_blk(4, 3, 0, 8, 512)
    split_ring.set_indexes(avail=5, used=3)
    running = watch.sample_running()
    assert [(s.avail_idx, s.used_idx, s.in_flight, s.num, s.mapped) for s in running] == [(5, 3, 2, NUM, True)]
    assert running[0].pending == (
        "head 0: 3 desc, 16 B out, 4097 B in blk.type=OUT blk.sector=2048 blk.length=4096",
        "head 3: 3 desc, 16 B out, 513 B in blk.type=IN blk.sector=8 blk.length=512")
    assert unpack_sample(running[0].pack()) == running[0]
    assert running[0].note().endswith("; in flight: " + " | ".join(running[0].pending))
    reply = build_message(Channel.MAIN, 11, dict(index=0, num=5), reply=True)
    stopped = watch.observe(Channel.MAIN, Direction.BACKEND_TO_FRONTEND, reply, [])
    assert [(s.reason, s.base, bool(s.flags & SampleFlag.STOPPED)) for s in stopped] == [(Reason.STOPPED, 5, True)]
    assert watch.sample_running() == []
    watch.close()
    assert watch.memory.regions == []


def test_in_flight_blk_requests_are_decoded(split_ring):
    memory = GuestMemory()
    memory.add(map_region(split_ring.fd, PHYS_BASE, 0x10000, GUEST_BASE, 0))
    split_ring.post_blk(3, 0, 1, 2048, 4096)      # avail slots 3 and 4: what lies between used 3 and avail 5
    split_ring.post_blk(4, 3, 0, 8, 512)
    split_ring.set_indexes(avail=5, used=3)
    pending = pending_requests(memory, NUM, GUEST_BASE + DESC, GUEST_BASE + AVAIL, GUEST_BASE + USED, "blk")
    assert [(p.head, p.descriptors, p.fields) for p in pending] == [
        (0, 3, {"blk.type": "OUT", "blk.sector": 2048, "blk.length": 4096}),
        (3, 3, {"blk.type": "IN", "blk.sector": 8, "blk.length": 512})]
    assert pending[0].readable == 16 and pending[0].writable == 4096 + 1
    memory.close()


# ---- a real blk guest through `run_lab(--rings --notifications)` ----

@pytest.fixture(scope="module")
def blk_rings_capture(kit, tmp_path_factory):  # noqa: F811
    require("qemu-storage-daemon")
    workdir = tmp_path_factory.mktemp("rings-blk")
    capture = workdir / "rings.pcapng"
    run = run_lab(workdir, "blk", capture_path=capture, report=lambda text: None, display=LIVE_LINES.append,
                  data_plane=dict(rings=True, notifications=True, rings_interval=0.05))
    assert run.ok, run.result.console
    return capture


LIVE_LINES: list[str] = []        # what the proxy's live display showed during the shared boot


def test_live_display_shows_the_rings_when_they_move(blk_rings_capture):
    shown = [line for line in LIVE_LINES if " --- ring 0 " in line]
    recorded = [unpack_sample(r.data) for r in read_capture(blk_rings_capture)
                if r.kind == RecordKind.EVENT and r.event == EventKind.RING]
    assert any(" ring 0 periodic: avail " in line for line in shown)
    # Every start, stop and moving sample is shown; an idle ring's repeats are only recorded.
    moving = [s for s in recorded if s.reason.name != "PERIODIC"] + \
        [b for a, b in zip(recorded, recorded[1:], strict=False) if b.reason.name == "PERIODIC"
         and (a.avail_idx, a.used_idx, a.kicks, a.calls) != (b.avail_idx, b.used_idx, b.kicks, b.calls)]
    assert len(moving) <= len(shown) < len(recorded)


def test_blk_guest_ring0_used_index_advances_and_kicks_are_counted(blk_rings_capture):
    done = vhusniff("rings", str(blk_rings_capture), "-T", "json", "-q")
    assert done.returncode == 0, done.stderr
    samples = json.loads(done.stdout)
    assert samples and all(JSON_KEYS <= set(sample) for sample in samples)
    ring0 = [s for s in samples if s["connection"] == 1 and s["ring"] == 0 and s["mapped"]]
    used = [s["used_idx"] for s in ring0]
    # The guest wrote and read back 1 MiB: the device used well over a hundred requests.
    assert max(used) - min(used) > 100, used
    assert ring0[-1]["kicks"] > 100 and ring0[-1]["calls"] > 100
    assert [s["time"] for s in ring0] == sorted(s["time"] for s in ring0)
    assert {"started", "stopped", "periodic"} <= {s["reason"] for s in ring0}


def test_ring_samples_are_events_every_reader_shows(blk_rings_capture):
    records = [r for r in read_capture(blk_rings_capture) if r.kind == RecordKind.EVENT and r.event == EventKind.RING]
    assert records and all(unpack_sample(r.data).note() == r.note for r in records)
    shown = vhusniff("read", str(blk_rings_capture), "-Y", "event == RING", "-q")
    assert shown.returncode == 0 and shown.stdout.count("ring 0 ") == len(records)
    text = vhusniff("rings", str(blk_rings_capture), "-q")
    assert text.returncode == 0 and text.stdout.startswith("connection 1 ring 0 (split, size ")


def test_timeline_draws_the_rings_in_a_lane_not_as_event_lines(blk_rings_capture, tmp_path):
    picture = tmp_path / "rings.svg"
    assert vhusniff("timeline", str(blk_rings_capture), "-o", str(picture), "-q").returncode == 0
    svg = picture.read_text()
    assert "rings (used, avail)" in svg and svg.count('class="ring" data-ring="0"') == 2
    events = [r for r in read_capture(blk_rings_capture) if r.kind == RecordKind.EVENT]
    assert svg.count('<g class="event"') == sum(r.event != EventKind.RING for r in events)


def test_stopped_storage_daemon_during_guest_io_is_a_stuck_ring(kit, tmp_path):  # noqa: F811
    require("qemu-storage-daemon")
    backend_socket, proxy_socket = tmp_path / "backend.sock", tmp_path / "proxy.sock"
    capture = tmp_path / "stuck.pcapng"
    stopped_at: list[int] = []

    def ring0(proxy) -> list[RingSample]:
        return [unpack_sample(r.data) for r in list(proxy.records)
                if r.kind == RecordKind.EVENT and r.event == EventKind.RING]

    def stuck_long_enough(proxy) -> bool:
        after = [r for r in list(proxy.records) if r.kind == RecordKind.EVENT and r.event == EventKind.RING
                 and r.timestamp_ns >= stopped_at[0]]
        stuck = [r for r in after if unpack_sample(r.data).in_flight > 0]
        return bool(stuck) and stuck[-1].timestamp_ns - stuck[0].timestamp_ns > (STUCK_SECONDS + 0.5) * 1e9

    with lab.start_storage_daemon(tmp_path, backend_socket) as backend, \
            Proxy([Route.forward(proxy_socket, backend_socket, "blk")], capture=capture, report=None, rings=True,
                  notifications=True, rings_interval=0.1) as proxy, \
            lab.start_qemu(tmp_path, kit, proxy_socket, kernel_args=lab.loop_kernel_args(12)) as guest:
        assert proxy.wait_until(lambda p: any(s.used_idx > 50 for s in ring0(p)), 90), guest.console_lines()
        os.kill(backend.proc.pid, signal.SIGSTOP)
        stopped_at.append(time.time_ns())
        try:
            assert proxy.wait_until(stuck_long_enough, 30), [s.note() for s in ring0(proxy)]
        finally:
            os.kill(backend.proc.pid, signal.SIGCONT)
        result = guest.wait(90)
        assert "rounds" in result.console and " 0 failed" in result.console, result.console
    checks = RingChecks()
    findings = [f for number, record in enumerate(read_capture(capture), 1) for f in checks.feed(record, number)]
    stuck = [f for f in findings if f.check == "stuck-ring"]
    assert len(stuck) == 1 and stuck[0].text.startswith("ring 0: "), findings
    # What the stopped daemon left in flight, decoded from guest memory: the guest's 1 KiB-block reads and writes.
    held = [request for sample in ring0_samples(capture) for request in sample.pending]
    assert held and all(" blk.type=" in request and " blk.sector=" in request for request in held), held
    assert "kicks-without-progress" in {f.check for f in findings}
    expert = vhusniff("expert", str(capture), "-q")
    assert "stuck-ring" in expert.stdout, expert.stdout + expert.stderr
    picture = tmp_path / "stuck.svg"
    assert vhusniff("timeline", str(capture), "-o", str(picture), "-q").returncode == 0
    svg = picture.read_text()
    assert svg.count('class="ring" data-ring="0"') == 2       # used and avail
    assert "stuck-ring: ring 0: " in svg and 'fill="#d62728"><title>#' in svg


def ring0_samples(capture) -> list[RingSample]:
    return [unpack_sample(r.data) for r in read_capture(capture) if r.kind == RecordKind.EVENT
            and r.event == EventKind.RING and unpack_sample(r.data).ring == 0]


def test_a_real_boot_gives_no_ring_finding(blk_rings_capture):
    checks = RingChecks()
    assert [f for number, record in enumerate(read_capture(blk_rings_capture), 1)
            for f in checks.feed(record, number)] == []


def test_mappings_and_relayed_eventfds_go_with_their_connections(tmp_path):
    """Many connections, each with a memory table, an added and a removed region, and relayed kick/call fds:
    afterwards the proxy holds no fd and no mapping more than before. (Fake peers: a real front-end costs
    seconds per connection, and this needs dozens; the real-guest tests above cover the behaviour.)"""
    from peers import FakeBackend, FakeFrontend, open_fds

    def region_maps() -> int:
        with open("/proc/self/maps") as maps:
            return sum("memfd:vhusniff-leak-test" in line for line in maps)

    def connection(proxy: Proxy) -> int:
        number = proxy.connections_total + 1
        client = FakeFrontend(tmp_path / "proxy.sock")
        table, added = os.memfd_create("vhusniff-leak-test"), os.memfd_create("vhusniff-leak-test")
        kick, call = os.eventfd(0), os.eventfd(0)
        for fd, size in ((table, 0x10000), (added, 0x1000)):
            os.ftruncate(fd, size)
        region = dict(guest_phys_addr=PHYS_BASE, memory_size=0x10000, userspace_addr=GUEST_BASE, mmap_offset=0)
        extra = dict(guest_phys_addr=0x900000, memory_size=0x1000, userspace_addr=0x7E0000000000, mmap_offset=0)
        client.send(build_message(Channel.MAIN, 5, dict(nregions=1, padding=0, region=[region])), [table])
        client.send(build_message(Channel.MAIN, 37, dict(padding=0, region=extra)), [added])
        client.send(build_message(Channel.MAIN, 8, dict(index=0, num=NUM)))
        client.send(build_message(Channel.MAIN, 9, dict(index=0, flags=0, desc=GUEST_BASE + DESC,
                                                        used=GUEST_BASE + USED, avail=GUEST_BASE + AVAIL, log=0)))
        client.send(build_message(Channel.MAIN, 13, dict(index=0, flags=0, reserved=0)), [call])
        client.send(build_message(Channel.MAIN, 12, dict(index=0, flags=0, reserved=0)), [kick])
        os.eventfd_write(kick, 1)
        assert proxy.wait_until(lambda p: any(unpack_sample(r.data).kicks == 1 for r in list(p.records)
                                              if r.event == EventKind.RING and r.kind == RecordKind.EVENT
                                              and r.connection == number), 10)
        mapped = region_maps()
        client.send(build_message(Channel.MAIN, 38, dict(padding=0, region=extra)))
        client.ask(1)         # GET_FEATURES: answered once everything before it has passed
        unmapped_one = region_maps()
        for fd in (table, added, kick, call):
            os.close(fd)
        client.close()
        assert proxy.wait_until(lambda p: p.active_connections == 0, 10)
        proxy.records.clear()
        assert (mapped, unmapped_one) == (2, 1)
        return mapped

    with FakeBackend(tmp_path / "backend.sock") as backend, \
            Proxy([Route.forward(tmp_path / "proxy.sock", backend.path, "blk")], report=None, rings=True,
                  notifications=True, rings_interval=0.01) as proxy:
        connection(proxy)                         # the first one opens what stays (listeners, epoll, ...)
        fds_before, maps_before = open_fds(), region_maps()
        for _ in range(40):
            connection(proxy)
        assert proxy.connections_total == 41
        assert region_maps() == maps_before == 0

        def targets(fds) -> dict[int, str]:
            return {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in fds if os.path.exists(f"/proc/self/fd/{fd}")}
        # The fake back-end (in this process) closes its end of each connection from its own thread: wait for it.
        assert proxy.wait_until(lambda p: open_fds() == fds_before, 10), targets(open_fds() ^ fds_before)


def test_receive_buffers_waiting_for_packets_are_not_a_stuck_ring():
    def sample(flags: SampleFlag) -> Record:
        ring = RingSample(0, Reason.PERIODIC, SampleFlag.MAPPED | flags, 256, 3, num=256, in_flight=253)
        return Record(0, 1, data=ring.pack(), kind=RecordKind.EVENT, note=ring.note(), event=EventKind.RING)

    for flags, expected in ((SampleFlag.RECEIVE_BUFFERS, []), (SampleFlag(0), ["stuck-ring"])):
        checks = RingChecks()
        found = []
        for number, seconds in enumerate((0, 1, 2, 3), 1):
            record = sample(flags)
            record.timestamp_ns = int(seconds * 1e9)
            found += checks.feed(record, number)
        assert [f.check for f in found] == expected


def test_net_guest_rings_advance_with_its_packets(kit, tmp_path):  # noqa: F811
    require("dpdk-testpmd")
    capture = tmp_path / "net.pcapng"
    run = run_lab(tmp_path, "net", capture_path=capture, report=lambda text: None,
                  data_plane=dict(rings=True, notifications=True, rings_interval=0.05))
    assert run.ok, run.result.console
    samples = [unpack_sample(r.data) for r in read_capture(capture)
               if r.kind == RecordKind.EVENT and r.event == EventKind.RING]
    receive = [s for s in samples if s.ring == 0 and s.mapped]
    transmit = [s for s in samples if s.ring == 1 and s.mapped]
    # The guest's ARP requests go out on ring 1 and testpmd echoes them back into ring 0's buffers.
    assert max(s.used_idx for s in transmit) > 0 and transmit[-1].kicks > 0
    assert max(s.used_idx for s in receive) > 0 and receive[-1].calls > 0
    # Ring 0 holds the guest's empty receive buffers: in flight, flagged as such, and no finding.
    assert any(s.in_flight > 100 and s.flags & SampleFlag.RECEIVE_BUFFERS for s in receive)
    expert = vhusniff("expert", str(capture), "-q")
    assert expert.stdout.startswith("0 finding(s)"), expert.stdout


def test_display_filters_know_the_ring_fields(blk_rings_capture):
    done = vhusniff("read", str(blk_rings_capture), "-q", "-Y", "ring.index == 0 && ring.used_idx > 100",
                    "-T", "fields", "-e", "ring.used_idx", "-e", "ring.kicks", "-e", "ring.reason")
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert rows and all(int(used) > 100 and int(kicks) > 0 and reason in {"PERIODIC", "STOPPED", "FINAL"}
                        for used, kicks, reason in rows), rows


def test_a_huge_eventfd_value_is_relayed_capped_and_counted_without_harm():
    frontend_call = os.eventfd(0)           # blocking, as a front-end's may be: the relay must never fill it
    relay = NotificationRelay(0, "call", frontend_call)
    try:
        os.eventfd_write(relay.given, 0xFFFFFFFFFFFFFFFE)     # the back-end writes the largest value there is
        assert relay.pump() == 0xFFFFFFFFFFFFFFFE
        assert os.eventfd_read(frontend_call) == RELAYED_MAX
        sample = RingSample(0, Reason.PERIODIC, SampleFlag(0), 0, 0, calls=relay.count)
        assert unpack_sample(sample.pack()).calls == relay.count & 0xFFFFFFFF
    finally:
        relay.close()
        os.close(relay.given)
        os.close(frontend_call)


def test_fuse_requests_held_by_a_stopped_virtiofsd_are_decoded(kit, tmp_path):  # noqa: F811
    require(str(lab.VIRTIOFSD))
    backend_socket, proxy_socket = tmp_path / "backend.sock", tmp_path / "proxy.sock"
    capture = tmp_path / "fs.pcapng"

    def pending(proxy) -> list[str]:
        return [request for r in list(proxy.records) if r.kind == RecordKind.EVENT and r.event == EventKind.RING
                for request in unpack_sample(r.data).pending]

    def started(proxy) -> bool:
        return any(r.kind == RecordKind.EVENT and r.event == EventKind.RING for r in list(proxy.records))

    with lab.start_virtiofsd(tmp_path, backend_socket) as backend, \
            Proxy([Route.forward(proxy_socket, backend_socket, "fs")], capture=capture, report=None, rings=True,
                  rings_interval=0.05) as proxy, \
            lab.start_qemu(tmp_path, kit, proxy_socket, device="fs") as guest:
        assert proxy.wait_until(started, 90), guest.console_lines()
        # Stopped as its rings start: the guest's first FUSE request (the mount's INIT) waits in the ring.
        os.kill(backend.proc.pid, signal.SIGSTOP)
        try:
            assert proxy.wait_until(lambda p: any("fuse.opcode=" in request for request in pending(p)), 60), \
                guest.console_lines()
        finally:
            os.kill(backend.proc.pid, signal.SIGCONT)
        result = guest.wait(90)
    assert result.fs_io_ok, result.console
    held = [request for request in pending(proxy) if "fuse.opcode=" in request]
    # The mount's INIT as a rule; a later request of the mount if INIT slipped through before the stop.
    assert held and all(re.search(r"fuse\.opcode=[A-Z_]+ fuse\.unique=\d+ fuse\.nodeid=\d+", r) for r in held), held


def test_rings_names_a_bad_sample_by_file_and_record_and_shows_the_rest(tmp_path):
    from vhusniff.capture.pcapng import write_capture
    good = RingSample(0, Reason.PERIODIC, SampleFlag.MAPPED, 9, 7, num=128, in_flight=2, kicks=3, calls=2)
    capture = tmp_path / "damaged.pcapng"
    write_capture(capture, [Record(1_000_000_000, 1, data=good.pack(), kind=RecordKind.EVENT, note=good.note(),
                                   event=EventKind.RING),
                            Record(1_100_000_000, 1, data=b"\x01\x00\x00\x00", kind=RecordKind.EVENT, note="cut",
                                   event=EventKind.RING)])
    done = vhusniff("rings", str(capture), "-T", "json", "-q")
    assert done.returncode == 2
    assert json.loads(done.stdout) == [dict(frame=1, connection=1, ring=0, time=0.0, avail_idx=9, used_idx=7,
                                            in_flight=2, kicks=3, calls=2, reason="periodic", mapped=True,
                                            stopped=False, layout="split", num=128, base=None, pending=[],
                                            findings=[])]
    assert done.stderr == f"vhusniff rings: {capture}: record 2: ring sample of 4 bytes, expected 36\n"
    missing = vhusniff("rings", str(tmp_path / "nothing.pcapng"))
    assert missing.returncode == 2 and "nothing.pcapng" in missing.stderr and "Traceback" not in missing.stderr


def test_packed_ring_in_flight_is_counted_from_the_descriptor_flags(split_ring):
    watch = packed_watch(split_ring)
    avail, used = 1 << 7, 1 << 15
    # Three made available in the first lap (AVAIL=1, USED=0), one of them used since (AVAIL=USED=1).
    for slot, flags in enumerate((avail | used, avail, avail)):
        struct.pack_into("<QIHH", split_ring.view, DESC + 16 * slot, PHYS_BASE + DATA, 16, slot, flags)
    struct.pack_into("<HH", split_ring.view, AVAIL, 0, 1)         # driver event: off_wrap 0, flags DISABLE
    [sample] = watch.sample_running()
    assert (sample.layout.name, sample.in_flight, sample.mapped, sample.avail_flags) == ("PACKED", 2, True, 1)
    assert unpack_sample(sample.pack()) == sample
    watch.close()


def _stuck_capture(path, seconds: int = 4):
    """Ring 0 with two requests in flight and its used index still, sampled each second for `seconds` seconds."""
    from vhusniff.capture.pcapng import write_capture
    records = []
    for second in range(seconds + 1):
        sample = RingSample(0, Reason.PERIODIC, SampleFlag.MAPPED, 12, 10, num=128, in_flight=2, kicks=second)
        records.append(Record(1_000_000_000 * (second + 1), 1, data=sample.pack(), kind=RecordKind.EVENT,
                              note=sample.note(), event=EventKind.RING))
    write_capture(path, records)


def test_stuck_after_sets_the_stuck_ring_threshold_everywhere(tmp_path):
    capture = tmp_path / "stuck.pcapng"
    _stuck_capture(capture, seconds=4)          # still for 4 s: stuck by the default 2 s, not by 6 s
    for command in ("expert", "report"):
        default, patient = vhusniff(command, str(capture), "-q"), vhusniff(command, str(capture), "-q",
                                                                           "--stuck-after", "6")
        assert default.returncode == 0 and "stuck-ring" in default.stdout, default.stdout + default.stderr
        assert patient.returncode == 0 and "stuck-ring" not in patient.stdout, patient.stdout
    samples = json.loads(vhusniff("rings", str(capture), "-T", "json", "-q", "--stuck-after", "3").stdout)
    # Stuck since the first sample (1 s): the sample at 4 s is the first 3 s on.
    assert [s["time"] for s in samples if any(f.startswith("stuck-ring: ") for f in s["findings"])] == [3.0]
    text = vhusniff("rings", str(capture), "-q", "--stuck-after", "1.5").stdout
    assert "finding stuck-ring: ring 0: 2 request(s) in flight, used index stuck at 10 for 2.0 s" in text, text
    for bad in ("0", "-1", "soon"):
        refused = vhusniff("expert", str(capture), "--stuck-after", bad)
        assert refused.returncode == 2 and "--stuck-after" in refused.stderr and "Traceback" not in refused.stderr


def test_bucketed_timeline_keeps_the_ring_lane(tmp_path):
    from vhusniff.analysis.analyzer import Analyzer
    from vhusniff.views.timeline import Timeline
    analyzer, timeline = Analyzer(), Timeline(detail_limit=50, columns=40)
    # 300 samples over 300 s (the bucket width doubles as they come): ring 0 moves 1000 a second through the
    # 16-bit wrap, ring 1 stops moving with requests in flight for its last 100 s (a stuck ring).
    for number in range(1, 301):
        for ring in (0, 1):
            used = (number * 1000) & 0xFFFF if ring == 0 else min(number, 200)
            sample = RingSample(ring, Reason.PERIODIC, SampleFlag.MAPPED, (used + 2) & 0xFFFF, used, num=256,
                                in_flight=2, kicks=number, calls=number)
            record = Record(number * 1_000_000_000, 1, data=sample.pack(), kind=RecordKind.EVENT,
                            note=sample.note(), event=EventKind.RING)
            timeline.add(2 * number + ring, record, None, analyzer.feed(record, None, 2 * number + ring))
    assert not timeline.detailed
    svg = timeline.render(analyzer)
    assert "rings (used, avail)" in svg and '<g class="event"' not in svg
    assert svg.count('class="ring" data-ring="0"') == 2 and svg.count('class="ring" data-ring="1"') == 2
    assert "ring 0: 299000 used, 299000 made available, 300 kicks, 300 calls" in svg   # unwrapped past 65535
    # Ring 1's stuck-ring and kicks-without-progress, raised by one sample: one red dot saying two.
    assert svg.count('fill="#d62728"><title>') == 1 and ": ring 1, 2 finding(s)</title>" in svg
    buckets = timeline.rings[(1, 0)]
    assert len(buckets) <= 40 and [entry[0] for _i, entry in sorted(buckets.items())] == \
        sorted(entry[0] for entry in buckets.values())


def _tshark_fields(capture, display_filter: str, names: list[str]) -> list[list[str]]:
    from vhusniff.views.lua import DISSECTOR_PATH
    done = subprocess.run(["tshark", "-X", f"lua_script:{DISSECTOR_PATH}", "-r", str(capture), "-Y", display_filter,
                           "-T", "fields", "-E", "occurrence=a", "-E", "aggregator=|",
                           *[arg for name in names for arg in ("-e", f"vhost_user.{name}")]],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [line.split("\t") for line in done.stdout.splitlines()]


RING_FIELD_NAMES = ["ring.index", "ring.layout", "ring.reason", "ring.avail_idx", "ring.used_idx", "ring.avail_flags",
                    "ring.used_flags", "ring.used_event", "ring.avail_event", "ring.num", "ring.in_flight",
                    "ring.base", "ring.kicks", "ring.calls", "ring.pending"]


def test_ring_samples_read_field_by_field_in_tshark_and_scapy(tmp_path):
    require("tshark")
    from vhusniff.capture.pcapng import write_capture
    from vhusniff.dataplane.sample import Layout
    from vhusniff.layers.packets import VhusniffRingSample
    from vhusniff.layers.pcap import read_packets
    stopped = RingSample(2, Reason.STOPPED, SampleFlag.MAPPED | SampleFlag.STOPPED, 70, 65, num=256, in_flight=5,
                         base=70, kicks=9, calls=8, layout=Layout.PACKED, avail_flags=1,
                         pending=("head 0: 3 desc, 16 B out, 513 B in blk.type=IN", "head 3: 1 desc, 0 B out, 0 B in"))
    periodic = RingSample(0, Reason.PERIODIC, SampleFlag.MAPPED | SampleFlag.EVENT_IDX, 7, 5, used_flags=1,
                          used_event=6, avail_event=7, num=128, in_flight=2, kicks=70000, calls=2**32 - 1)
    capture = tmp_path / "samples.pcapng"
    write_capture(capture, [Record(1000 * n, 1, data=s.pack(), kind=RecordKind.EVENT, note=s.note(),
                                   event=EventKind.RING) for n, s in enumerate((stopped, periodic), 1)])
    rows = _tshark_fields(capture, "vhost_user.ring.index", RING_FIELD_NAMES)
    assert rows == [
        ["2", "PACKED", "STOPPED", "70", "65", "1", "0", "0", "0", "256", "5", "70", "9", "8",
         "head 0: 3 desc, 16 B out, 513 B in blk.type=IN|head 3: 1 desc, 0 B out, 0 B in"],
        ["0", "SPLIT", "PERIODIC", "7", "5", "0", "1", "6", "7", "128", "2", "", "70000", "4294967295", ""]]
    # The same names filter in both tools.
    assert _tshark_fields(capture, 'vhost_user.ring.layout == "PACKED" && vhost_user.ring.base == 70',
                          ["ring.index"]) == [["2"]]
    read = vhusniff("read", str(capture), "-q", "-Y", "ring.layout == PACKED && ring.base == 70", "-T", "fields",
                    "-e", "ring.index", "-e", "ring.pending")
    assert read.stdout.splitlines() == ["2\t" + ",".join(stopped.pending)], read.stdout + read.stderr
    # scapy: the record layer carries the sample as a layer of its own.
    layers = [packet[VhusniffRingSample] for packet in read_packets(str(capture))]
    assert [(s.ring, s.layout, s.reason, s.avail_idx, s.used_idx, s.in_flight, s.base, s.kicks, s.calls)
            for s in layers] == [(2, 1, 2, 70, 65, 5, 70, 9, 8), (0, 0, 0, 7, 5, 2, 0xFFFFFFFF, 70000, 2**32 - 1)]
    assert layers[0].pending.decode().split("\n") == list(stopped.pending)
    assert layers[1].sprintf("%layout% %reason% %flags%") == "SPLIT PERIODIC EVENT_IDX+MAPPED"
    assert bytes(layers[0]) == stopped.pack()


def test_tshark_reads_a_real_guests_ring_samples_as_vhusniff_does(blk_rings_capture):
    require("tshark")
    names = ["ring.index", "ring.reason", "ring.avail_idx", "ring.used_idx", "ring.in_flight", "ring.kicks",
             "ring.calls", "ring.num"]
    tshark = _tshark_fields(blk_rings_capture, "vhost_user.ring.used_idx > 0", names)
    read = vhusniff("read", str(blk_rings_capture), "-q", "-Y", "ring.used_idx > 0", "-T", "fields",
                    *[arg for name in names for arg in ("-e", name)])
    assert read.returncode == 0, read.stderr
    assert len(tshark) > 10 and tshark == [line.split("\t") for line in read.stdout.splitlines()]


def test_packed_ring_positions_count_through_the_wrap_counters(split_ring):
    watch = packed_watch(split_ring)
    avail, used = 1 << 7, 1 << 15

    def lay(*slots: tuple[int, int]):
        """Each slot's (AVAIL, USED) bits, slot 0 first; the rest of the ring stays as it was."""
        for slot, (a, u) in enumerate(slots):
            struct.pack_into("<QIHH", split_ring.view, DESC + 16 * slot, PHYS_BASE + DATA, 16, slot,
                             avail * a | used * u)

    def sampled() -> tuple[int, int, int]:
        [sample] = watch.sample_running()
        assert sample.layout.name == "PACKED" and sample.mapped
        return sample.avail_idx, sample.used_idx, sample.in_flight

    assert sampled() == (0, 0, 0)                                 # all zero: the first lap, nothing written
    lay((1, 0), (1, 0), (1, 0))                                   # the driver makes 3 available (wrap 1)
    assert sampled() == (3, 0, 3)
    lay((1, 1), (1, 1))                                           # the device uses 2
    assert sampled() == (3, 2, 1)
    lay((0, 1), (0, 1), (1, 0), (1, 0), (1, 0), (1, 0), (1, 0), (1, 0))   # 7 more: past the end, wrap 0
    assert sampled() == (10, 2, 8)
    lay((0, 0), (0, 0), (1, 1), (1, 1), (1, 1), (1, 1), (1, 1), (1, 1))   # the device catches up, over the end
    assert sampled() == (10, 10, 0)
    lay((1, 0), (1, 0), (0, 1), (0, 1), (0, 1), (0, 1), (0, 1), (0, 1))   # a whole lap more: the third, wrap 1
    assert sampled() == (18, 10, 8)
    watch.close()


@pytest.mark.parametrize("in_order", ["1", "0"])
def test_packed_rings_of_dpdk_virtio_user_advance_through_their_wrap_counters(tmp_path, in_order):
    """testpmd's virtio-user with packed_vq=1 sends a first burst (--tx-first) through the proxy to testpmd's vhost
    PMD; each side forwards what it receives back out (io), so both packed rings go round many times. A packed ring
    keeps no indexes, so the counts come from the descriptors' AVAIL/USED bits; when the port stops, where the
    device's count says it is must be where the back-end says it is (GET_VRING_BASE: bits 0-14 the position, bit 15
    the wrap counter). With IN_ORDER (virtio-user's default) the device writes one used descriptor per batch;
    without it, one per buffer."""
    require("dpdk-testpmd")
    backend_socket, proxy_socket = tmp_path / "backend.sock", tmp_path / "proxy.sock"
    capture = tmp_path / "packed.pcapng"

    def samples(records) -> list[RingSample]:
        return [unpack_sample(r.data) for r in list(records) if r.kind == RecordKind.EVENT
                and r.event == EventKind.RING]

    def gone_round(proxy, laps: int = 3) -> bool:
        moved: dict[int, int] = {}
        for ring in (0, 1):
            counts = [s.used_idx for s in samples(proxy.records) if s.ring == ring and s.mapped]
            moved[ring] = sum((b - a) & 0xFFFF for a, b in zip(counts, counts[1:], strict=False))
        num = max((s.num for s in samples(proxy.records)), default=0)
        return num > 0 and min(moved.values()) > laps * num

    with lab.start_testpmd(tmp_path, backend_socket) as backend, \
            Proxy([Route.forward(proxy_socket, backend_socket, "net")], capture=capture, report=None, rings=True,
                  rings_interval=0.05) as proxy:
        with lab.start_testpmd_frontend(tmp_path, proxy_socket, vdev_options=f",packed_vq=1,in_order={in_order}",
                                        testpmd_args=("--tx-first",)) as frontend:
            assert proxy.wait_until(gone_round, 60), ([s.note() for s in samples(proxy.records)][-6:],
                                                      frontend.log_text()[-2000:], backend.log_text()[-2000:])
        assert proxy.wait_until(lambda p: p.active_connections == 0, 30)
    recorded = samples(read_capture(capture))
    assert recorded and {s.layout.name for s in recorded} == {"PACKED"}
    acked = [r for r in read_capture(capture) if r.kind == RecordKind.MESSAGE and r.data[:4] == b"\x02\0\0\0"
             and r.direction == Direction.FRONTEND_TO_BACKEND]
    assert [bool(struct.unpack_from("<Q", r.data, 12)[0] >> 35 & 1) for r in acked] == [in_order == "1"]
    stopped = {s.ring: s for s in recorded if s.reason == Reason.STOPPED}
    assert set(stopped) == {0, 1}, [s.note() for s in recorded if s.reason != Reason.PERIODIC]
    for ring, sample in stopped.items():
        slot, wrap = sample.base & 0x7FFF, sample.base >> 15 & 1
        # Positions run over two laps (one per wrap counter value); the count is kept modulo 2**16, a multiple.
        assert sample.used_idx % (2 * sample.num) == (0 if wrap else sample.num) + slot, (ring, sample.note())
        assert sample.avail_idx != sample.used_idx or sample.in_flight == 0


def test_packed_ring_requests_in_flight_are_decoded_chains_and_indirect_tables(split_ring):
    watch = packed_watch(split_ring, "blk")
    available, next_, write, indirect = 1 << 7, 1, 2, 4

    def blk_chain(header_at: int, kind: int, sector: int, length: int) -> list[tuple[int, int, int]]:
        """(guest-physical address, length, flags) of a virtio-blk request: header, data, status byte."""
        struct.pack_into("<IIQ", split_ring.view, header_at, kind, 0, sector)
        return [(PHYS_BASE + header_at, 16, 0), (PHYS_BASE + header_at + 16, length, write),
                (PHYS_BASE + header_at + 0xF0, 1, write)]

    def put(at: int, slot: int, addr: int, length: int, buffer_id: int, flags: int) -> None:
        struct.pack_into("<QIHH", split_ring.view, at + 16 * slot, addr, length, buffer_id, flags)

    # Slots 0-2: a chain (NEXT on all but the last, the buffer id in the last); slots 3-5 another.
    for first, (buffer_id, request) in ((0, (5, blk_chain(DATA, 1, 2048, 4096))),
                                        (3, (9, blk_chain(DATA + 0x100, 0, 8, 512)))):
        for position, (addr, length, flags) in enumerate(request):
            last = position == len(request) - 1
            put(DESC, first + position, addr, length, buffer_id if last else 0,
                available | flags | (0 if last else next_))
    # Slot 6: one descriptor pointing to an indirect table of three.
    table = DATA + 0x800
    for position, (addr, length, flags) in enumerate(blk_chain(DATA + 0x200, 4, 0, 0)):
        put(table, position, addr, length, 0, flags)
    put(DESC, 6, PHYS_BASE + table, 48, 11, available | indirect)
    [sample] = watch.sample_running()
    assert (sample.avail_idx, sample.used_idx, sample.in_flight) == (7, 0, 7)
    assert sample.pending == (
        "head 5: 3 desc, 16 B out, 4097 B in blk.type=OUT blk.sector=2048 blk.length=4096",
        "head 9: 3 desc, 16 B out, 513 B in blk.type=IN blk.sector=8 blk.length=512",
        "head 11: 3 desc, 16 B out, 1 B in blk.type=FLUSH blk.sector=0 blk.length=0")
    assert [request.head for request in watch.in_flight(0)] == [5, 9, 11]
    watch.close()
