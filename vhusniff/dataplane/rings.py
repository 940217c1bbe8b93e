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
from .inflight import (
    NEXT,
    PACKED_AVAIL,
    PACKED_DESC,
    PACKED_USED,
    Pending,
    packed_in_flight,
    pending_packed,
    pending_requests,
)
from .memory import GuestMemory, map_region
from .sample import NO_BASE, PENDING_SHOWN, Layout, Reason, RingSample, SampleFlag

F = cat.FrontendRequest
_U16 = struct.Struct("<H")
_RING_HEAD = struct.Struct("<HH")           # a split ring's avail or used area begins flags, idx
EVENT_IDX_BIT = next(bit for bit, name in cat.TRANSPORT_FEATURES.items() if name == "RING_EVENT_IDX")
RING_PACKED_BIT = next(bit for bit, name in cat.TRANSPORT_FEATURES.items() if name == "RING_PACKED")
IN_ORDER_BIT = next(bit for bit, name in cat.TRANSPORT_FEATURES.items() if name == "IN_ORDER")
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
        """A packed ring keeps no indexes in memory. avail_idx and used_idx: the descriptors the driver made
        available and the device used so far, free-running like a split ring's indexes; in flight, the difference.
        The driver's position (and wrap counter) is where the descriptors' AVAIL bits change (_packed_position);
        the device's is followed from its last one over the used descriptors it wrote since (_walk_used: a chain's
        tail, and with IN_ORDER a batch's other buffers, get no used descriptor of their own). Exact while the ring
        moves less than a lap between two samples. The event areas' flags stand in for the split ring's."""
        table = self.memory.read(ring.desc, 16 * ring.num)
        if table is None:
            return unread._replace(reason=Reason.UNMAPPED if unread.reason == Reason.PERIODIC else unread.reason)
        entries = list(PACKED_DESC.iter_unpack(table))
        avail_bits = [bool(entry[3] & PACKED_AVAIL) for entry in entries]
        driver_at = _packed_position(avail_bits)
        device_at = None
        if ring.packed_used is not None:
            device_at = _walk_used(entries, ring.packed_used[0], driver_at, bool(self.features >> IN_ORDER_BIT & 1))
        if device_at is None or (driver_at - device_at) % (2 * ring.num) > ring.num:
            # The first look, or the device went round more than a lap since the last: where the USED bits change.
            device_at = _packed_position([bool(entry[3] & PACKED_USED) for entry in entries])
        ring.packed_avail = _advance(ring.packed_avail, driver_at, ring.num)
        ring.packed_used = _advance(ring.packed_used, device_at, ring.num)
        pending = (driver_at - device_at) % (2 * ring.num)
        if pending > ring.num:      # the two positions disagree (a lap passed between samples): count the bits
            pending = sum(packed_in_flight(entry[3]) for entry in entries)
        flags: SampleFlag = unread.flags
        shown: tuple[str, ...] = ()
        if pending:
            flags, shown = _listed(pending_packed(self.memory, ring.num, ring.desc, device_at, self.device,
                                                  PENDING_SHOWN, pending), flags)
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


def _walk_used(entries: list[tuple], start: int, driver_at: int, in_order: bool) -> int:
    """The device's position on a packed ring (lap parity * num + slot): after the last used descriptor (AVAIL ==
    USED == the wrap counter of its lap) it wrote between its last known position `start` and the driver's.

    A used descriptor sits where its buffer began and names it by its id; the slots after it that the driver wrote
    (AVAIL = wrap, USED != wrap) and the device did not overwrite belong to it up to the descriptor with that id
    and no NEXT: a chain's tail, and with IN_ORDER the other buffers of the batch it stands for. The last used
    descriptor, not a walk over them, so that a look taken while both sides write cannot leave it behind."""
    num = len(entries)
    laps = 2 * num
    room = (driver_at - start) % laps

    def bits(position: int) -> tuple[bool, bool, bool]:
        flags = entries[position % num][3]
        return bool(flags & PACKED_AVAIL), bool(flags & PACKED_USED), position < num

    last = None
    for offset in range(room):
        avail, used, wrap = bits((start + offset) % laps)
        if avail == used == wrap:
            last = offset
    if last is None:
        return start
    used_id = entries[(start + last) % num][2]
    step = 1
    for offset in range(last + 1, room):
        position = (start + offset) % laps
        avail, used, wrap = bits(position)
        if avail != wrap or used == wrap:
            break                   # not a descriptor the driver made available in this lap
        buffer_id, flags = entries[position % num][2], entries[position % num][3]
        if flags & NEXT:
            continue                # a chain goes on
        if buffer_id == used_id:
            step = offset - last + 1
            break
        if not in_order:
            break                   # another buffer: the used one was a single descriptor
    return (start + last + step) % laps
