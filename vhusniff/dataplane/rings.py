"""The rings of one connection, followed from its messages and read (never written) from guest memory.

`RingWatch.observe` is given every message the proxy forwards on the main channel (with its fds, before the
proxy closes its copies): the memory table is mapped read-only, each ring's size, addresses and base are kept,
and a ring is sampled when it starts (SET_VRING_KICK) and stops (GET_VRING_BASE's answer). `sample_running`
samples every running ring (the proxy calls it at its interval). Kick and call counts come from the
notification relays (vhusniff.dataplane.notify) through `count`.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..model import Channel, Direction
from ..protocol import catalogue as cat
from ..protocol.grammar import HEADER_STRUCT, DecodeContext, decode
from .inflight import Pending, pending_packed, pending_requests
from .memory import GuestMemory, map_region
from .sample import NO_BASE, PENDING_SHOWN, Layout, Reason, RingSample, SampleFlag

F = cat.FrontendRequest
_U16 = struct.Struct("<H")
_RING_HEAD = struct.Struct("<HH")           # a split ring's avail or used area begins flags, idx
_PACKED_DESC = struct.Struct("<QIHH")       # addr, len, id, flags
_PACKED_AVAIL, _PACKED_USED = 1 << 7, 1 << 15
EVENT_IDX_BIT = next(bit for bit, name in cat.TRANSPORT_FEATURES.items() if name == "RING_EVENT_IDX")
RING_PACKED_BIT = next(bit for bit, name in cat.TRANSPORT_FEATURES.items() if name == "RING_PACKED")
# Seconds between two samples of the running rings, unless told.
SAMPLE_INTERVAL_DEFAULT = 0.2
# The requests this module follows: anything else passes without being decoded.
FOLLOWED = frozenset({F.SET_FEATURES, F.SET_MEM_TABLE, F.ADD_MEM_REG, F.REM_MEM_REG, F.SET_VRING_NUM,
                      F.SET_VRING_ADDR, F.SET_VRING_BASE, F.GET_VRING_BASE, F.SET_VRING_KICK, F.RESET_OWNER,
                      F.RESET_DEVICE})


@dataclass
class Ring:
    index: int
    num: int = 0
    desc: int = 0
    avail: int = 0
    used: int = 0
    base: int = 0                    # SET_VRING_BASE: where the back-end starts
    stopped_base: int = NO_BASE      # GET_VRING_BASE's answer
    running: bool = False
    kicks: int = 0
    calls: int = 0
    # A packed ring's driver and device positions as last sampled: (lap parity * num + slot, count so far).
    packed_avail: tuple[int, int] | None = None
    packed_used: tuple[int, int] | None = None


class RingWatch:
    """One connection's memory and rings. `map_memory` off: only notification counts (no mapping at all).
    `device` (blk, net, fs, ...) says how the requests in flight are decoded."""

    def __init__(self, map_memory: bool = True, device: str | None = None) -> None:
        self.map_memory = map_memory
        self.device = device
        self.memory = GuestMemory()
        self.rings: dict[int, Ring] = {}
        self.features = 0
        self.problems: list[str] = []      # regions that could not be mapped, as words
        self._shown: dict[int, tuple] = {}  # ring -> what its last sample said that news() was asked about

    # ---- following the messages ----

    def observe(self, channel: Channel, direction: Direction, data: bytes, fds: list[int]) -> list[RingSample]:
        """Follow one forwarded message; the samples it calls for (a ring started or stopped)."""
        if channel != Channel.MAIN or len(data) < HEADER_STRUCT.size:
            return []
        request, flags, _size = HEADER_STRUCT.unpack_from(data)
        if request not in FOLLOWED:
            return []
        is_reply = bool(flags & cat.FLAG_REPLY)
        if is_reply != (direction == Direction.BACKEND_TO_FRONTEND):
            return []
        message = decode(data, Channel.MAIN, DecodeContext(features=self.features))
        if message.problems or message.kind is None:
            return []
        payload = message.payload
        if is_reply:
            if request == F.GET_VRING_BASE and message.kind.startswith("vring_base"):
                return self._stopped(payload.index, payload.num)
            return []
        if request == F.SET_FEATURES:
            self.features = payload.features
        elif request == F.SET_MEM_TABLE and message.kind.startswith("mem_table"):
            self.memory.close()
            for region, fd in zip(payload.region, fds, strict=False):
                self._map(region, fd)
        elif request == F.ADD_MEM_REG and message.kind.startswith("mem_region") and len(fds) == 1:
            self.memory.remove(payload.region.guest_phys_addr, payload.region.memory_size)
            self._map(payload.region, fds[0])
        elif request == F.REM_MEM_REG and message.kind.startswith("mem_region"):
            self.memory.remove(payload.region.guest_phys_addr, payload.region.memory_size)
        elif request == F.SET_VRING_NUM:
            ring = self.ring(payload.index)
            ring.num, ring.packed_avail, ring.packed_used = payload.num, None, None
        elif request == F.SET_VRING_ADDR:
            ring = self.ring(payload.index)
            ring.desc, ring.avail, ring.used = payload.desc, payload.avail, payload.used
            ring.packed_avail = ring.packed_used = None        # a new ring: its counts start again
        elif request == F.SET_VRING_BASE:
            self.ring(payload.index).base = payload.num
        elif request == F.SET_VRING_KICK and not payload.flags & 1:     # flags bit 0: NOFD (u64 bit 8)
            ring = self.ring(payload.index)
            ring.running, ring.stopped_base = True, NO_BASE
            return [self.sample(ring, Reason.STARTED)]
        elif request in (F.RESET_OWNER, F.RESET_DEVICE):
            for ring in self.rings.values():
                ring.running = False
        return []

    def _map(self, region, fd: int) -> None:
        if not self.map_memory:
            return
        mapped = map_region(fd, region.guest_phys_addr, region.memory_size, region.userspace_addr,
                            region.mmap_offset)
        if mapped.problem:
            self.problems.append(f"region gpa={region.guest_phys_addr:#x}: {mapped.problem}")
        self.memory.add(mapped)

    def _stopped(self, index: int, num: int) -> list[RingSample]:
        ring = self.rings.get(index)
        if ring is None:
            return []
        was_running = ring.running
        ring.running, ring.stopped_base = False, num
        return [self.sample(ring, Reason.STOPPED)] if was_running else []

    def ring(self, index: int) -> Ring:
        ring = self.rings.get(index)
        if ring is None:
            ring = self.rings[index] = Ring(index)
        return ring

    def count(self, index: int, kicks: int = 0, calls: int = 0) -> None:
        """Notifications relayed for a ring (vhusniff.dataplane.notify)."""
        ring = self.ring(index)
        ring.kicks += kicks
        ring.calls += calls

    # ---- sampling ----

    @property
    def packed(self) -> bool:
        return bool(self.features >> RING_PACKED_BIT & 1)

    def sample_running(self, reason: Reason = Reason.PERIODIC) -> list[RingSample]:
        return [self.sample(ring, reason) for ring in self.rings.values() if ring.running]

    def sample(self, ring: Ring, reason: Reason) -> RingSample:
        """Read the ring's indexes (read-only) now; unmapped rings give a sample with MAPPED clear."""
        flags = SampleFlag(0)
        if self.features >> EVENT_IDX_BIT & 1:
            flags |= SampleFlag.EVENT_IDX
        if not ring.running:
            flags |= SampleFlag.STOPPED
        unread = RingSample(ring.index, reason, flags, 0, 0, num=ring.num, base=ring.stopped_base, kicks=ring.kicks,
                            calls=ring.calls, layout=Layout.PACKED if self.packed else Layout.SPLIT)
        if not self.map_memory or not ring.num:
            return unread
        if self.packed:
            return self._sample_packed(ring, unread)
        avail = self.memory.unpack(_RING_HEAD, ring.avail)
        used = self.memory.unpack(_RING_HEAD, ring.used)
        if avail is None or used is None:
            return unread._replace(reason=Reason.UNMAPPED if reason == Reason.PERIODIC else reason)
        avail_flags, avail_idx = avail
        used_flags, used_idx = used
        used_event = avail_event = 0
        if flags & SampleFlag.EVENT_IDX:
            used_event = (self.memory.unpack(_U16, ring.avail + 4 + 2 * ring.num) or (0,))[0]
            avail_event = (self.memory.unpack(_U16, ring.used + 4 + 8 * ring.num) or (0,))[0]
        in_flight = (avail_idx - used_idx) & 0xFFFF
        pending: tuple[str, ...] = ()
        if in_flight and in_flight <= ring.num:
            shown = pending_requests(self.memory, ring.num, ring.desc, ring.avail, ring.used, self.device,
                                     PENDING_SHOWN)
            flags, pending = _listed(shown, flags)
        return unread._replace(flags=flags | SampleFlag.MAPPED, avail_idx=avail_idx, used_idx=used_idx,
                               avail_flags=avail_flags, used_flags=used_flags, used_event=used_event,
                               avail_event=avail_event, in_flight=in_flight, pending=pending)

    def _sample_packed(self, ring: Ring, unread: RingSample) -> RingSample:
        """A packed ring keeps no indexes in memory. In flight: the descriptors made available and not yet used
        (AVAIL bit != USED bit). avail_idx and used_idx: the descriptors the driver made available and the device
        used so far, free-running like a split ring's indexes, from where the driver's and the device's positions
        (and wrap counters) lie in the descriptors' AVAIL and USED bits (_packed_position). Exact while a buffer
        is one descriptor (a device writes one used descriptor for a chain: its tail counts as in flight until
        the driver's next lap) and the ring moves less than a lap between two samples. The event areas' flags
        stand in for the split ring's."""
        table = self.memory.read(ring.desc, 16 * ring.num)
        if table is None:
            return unread._replace(reason=Reason.UNMAPPED if unread.reason == Reason.PERIODIC else unread.reason)
        descriptor_flags = [entry[3] for entry in _PACKED_DESC.iter_unpack(table)]
        avail_bits = [bool(f & _PACKED_AVAIL) for f in descriptor_flags]
        used_bits = [bool(f & _PACKED_USED) for f in descriptor_flags]
        pending = sum(a != u for a, u in zip(avail_bits, used_bits, strict=True))
        ring.packed_avail = _advance(ring.packed_avail, _packed_position(avail_bits), ring.num)
        ring.packed_used = _advance(ring.packed_used, _packed_position(used_bits), ring.num)
        flags: SampleFlag = unread.flags
        shown: tuple[str, ...] = ()
        if pending:
            flags, shown = _listed(pending_packed(self.memory, ring.num, ring.desc, ring.packed_used[0], self.device,
                                                  PENDING_SHOWN), flags)
        driver = self.memory.unpack(_RING_HEAD, ring.avail) or (0, 0)      # off_wrap, flags
        device = self.memory.unpack(_RING_HEAD, ring.used) or (0, 0)
        return unread._replace(flags=flags | SampleFlag.MAPPED, avail_flags=driver[1], used_flags=device[1],
                               used_event=driver[0], avail_event=device[0], in_flight=pending, pending=shown,
                               avail_idx=ring.packed_avail[1] & 0xFFFF, used_idx=ring.packed_used[1] & 0xFFFF)

    def in_flight(self, index: int) -> list[Pending]:
        """Every request posted on the ring and not yet used, decoded (read-only) for the device."""
        ring = self.rings.get(index)
        if ring is None or not ring.num:
            return []
        if self.packed:
            start = ring.packed_used[0] if ring.packed_used else 0
            return pending_packed(self.memory, ring.num, ring.desc, start, self.device)
        return pending_requests(self.memory, ring.num, ring.desc, ring.avail, ring.used, self.device)

    def news(self, sample: RingSample) -> bool:
        """Whether the sample says something the previous one asked about did not (indexes, counts)."""
        said = (sample.avail_idx, sample.used_idx, sample.in_flight, sample.kicks, sample.calls, sample.flags)
        new = self._shown.get(sample.ring) != said
        self._shown[sample.ring] = said
        return new

    def close(self) -> list[RingSample]:
        """The last look at every running ring, then every mapping dropped."""
        final = self.sample_running(Reason.FINAL)
        self.memory.close()
        return final


def _packed_position(bits: list[bool]) -> int:
    """Where a packed ring's driver (AVAIL bits) or device (USED bits) is, as lap parity * len(bits) + slot.

    Each writes the descriptors in order, setting the bit to its wrap counter (1 on the first lap): the slots
    before its position hold this lap's value, the rest the last lap's. All alike: it is at slot 0 of the lap
    after the one that wrote them (all 0 at the start: the first lap, nothing written)."""
    first = bits[0]
    slot = next((position for position, bit in enumerate(bits) if bit != first), None)
    if slot is None:
        wrap, slot = not first, 0
    else:
        wrap = first
    return (0 if wrap else len(bits)) + slot


def _advance(last: tuple[int, int] | None, position: int, num: int) -> tuple[int, int]:
    """(position, count so far) after the ring's position moved to `position` (at most a lap ahead: two laps
    of positions, one per wrap counter value, tell how far)."""
    if last is None:
        return position, position
    return position, last[1] + (position - last[0]) % (2 * num)


def _listed(shown: list[Pending], flags: SampleFlag) -> tuple[SampleFlag, tuple[str, ...]]:
    """(flags, lines) of the requests in flight shown in a sample: buffers waiting to be filled (every one
    device-writable, none with a problem) are alike and uneventful: flagged and counted, not listed."""
    if shown and all(request.readable == 0 and not request.problem for request in shown):
        return flags | SampleFlag.RECEIVE_BUFFERS, ()
    return flags, tuple(request.summary() for request in shown)
