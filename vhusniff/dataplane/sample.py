"""One ring sample as it is stored: the data of an EVENT record of kind RING (capture format 2).

The payload is fixed-size little-endian (RING_SAMPLE below); the record's note says the same in words, so a
reader that does not know the kind (an older vhusniff, tshark without our dissector) still shows it.
"""
from __future__ import annotations

import enum
import struct
from typing import NamedTuple

SAMPLE_VERSION = 1
# The fixed part, in order: (RingSample attribute or stored-only word, struct code, display-filter name or "" when
# no filter shows it). base is GET_VRING_BASE's answer (NO_BASE when none). 36 bytes; then, optionally, the
# requests in flight as UTF-8 text, one line each (vhusniff.dataplane.inflight.Pending.summary). The dissector
# and the scapy layer read the layout from here.
SAMPLE_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("version", "B", ""), ("layout", "B", "ring.layout"), ("ring", "H", "ring.index"), ("reason", "B", "ring.reason"),
    ("flags", "B", ""), ("avail_idx", "H", "ring.avail_idx"), ("used_idx", "H", "ring.used_idx"),
    ("avail_flags", "H", "ring.avail_flags"), ("used_flags", "H", "ring.used_flags"),
    ("used_event", "H", "ring.used_event"), ("avail_event", "H", "ring.avail_event"),
    ("num", "H", "ring.num"), ("in_flight", "H", "ring.in_flight"), ("reserved", "H", ""),
    ("base", "I", "ring.base"), ("kicks", "I", "ring.kicks"), ("calls", "I", "ring.calls"),
)
RING_SAMPLE = struct.Struct("<" + "".join(code for _name, code, _filter in SAMPLE_FIELDS))
NO_BASE = 0xFFFFFFFF
_U32 = 0xFFFFFFFF          # kicks and calls are stored modulo 2**32 (a peer may write any eventfd value)
# Requests in flight decoded into one sample, the oldest first; the count says how many there are in all.
PENDING_SHOWN = 8


class Layout(enum.IntEnum):
    SPLIT = 0
    PACKED = 1


class Reason(enum.IntEnum):
    """Why the sample was taken."""
    PERIODIC = 0       # the interval passed
    STARTED = 1        # SET_VRING_KICK: the ring runs (addresses, size and base are known)
    STOPPED = 2        # GET_VRING_BASE answered: the ring is stopped, `base` holds the answer
    KICK = 3           # a kick passed (with --notifications, at most once per interval)
    FINAL = 4          # the connection or the memory table ended: the last look before the mapping goes
    UNMAPPED = 5       # the ring's addresses are outside every mapped region: indexes unknown


class SampleFlag(enum.IntFlag):
    EVENT_IDX = 0x1    # RING_EVENT_IDX negotiated: used_event/avail_event are meaningful
    MAPPED = 0x2       # the indexes were read from guest memory (else they are 0 and unknown)
    STOPPED = 0x4      # the ring is stopped (GET_VRING_BASE answered)
    # What is in flight are buffers for the device to fill (every descriptor device-writable: a net receive ring,
    # an event queue): waiting there is normal, they are not requests.
    RECEIVE_BUFFERS = 0x8


class RingSample(NamedTuple):
    ring: int
    reason: Reason
    flags: SampleFlag
    avail_idx: int
    used_idx: int
    avail_flags: int = 0
    used_flags: int = 0
    used_event: int = 0
    avail_event: int = 0
    num: int = 0
    in_flight: int = 0
    base: int = NO_BASE
    kicks: int = 0
    calls: int = 0
    layout: Layout = Layout.SPLIT
    pending: tuple[str, ...] = ()      # the requests in flight, decoded, one line each (at most PENDING_SHOWN)

    def pack(self) -> bytes:
        fixed = RING_SAMPLE.pack(SAMPLE_VERSION, self.layout, self.ring, self.reason, self.flags, self.avail_idx,
                                 self.used_idx, self.avail_flags, self.used_flags, self.used_event,
                                 self.avail_event, self.num, self.in_flight, 0, self.base, self.kicks & _U32,
                                 self.calls & _U32)
        return fixed + "\n".join(self.pending).encode() if self.pending else fixed

    @property
    def mapped(self) -> bool:
        return bool(self.flags & SampleFlag.MAPPED)

    def note(self) -> str:
        """The sample in words: what the record's note says."""
        text = f"ring {self.ring} {self.reason.name.lower()}: "
        if self.mapped:
            text += f"avail {self.avail_idx} used {self.used_idx} in flight {self.in_flight}"
            if self.flags & SampleFlag.RECEIVE_BUFFERS:
                text += " (receive buffers)"
        else:
            text += "indexes not readable (ring outside the mapped memory)"
        text += f" kicks {self.kicks} calls {self.calls}"
        if self.base != NO_BASE:
            text += f" base {self.base}"
        if self.pending:
            text += "; in flight: " + " | ".join(self.pending)
        return text


def sample_offsets() -> list[tuple[str, int, int, str]]:
    """(attribute, offset, width, filter name) of each field of the fixed part."""
    out, offset = [], 0
    for name, code, filter_name in SAMPLE_FIELDS:
        width = struct.calcsize("<" + code)
        out.append((name, offset, width, filter_name))
        offset += width
    return out


class SampleError(ValueError):
    pass


def unpack_sample(data: bytes) -> RingSample:
    """The sample of a RING record's data; SampleError (with the reason) for data that is not one."""
    if len(data) < RING_SAMPLE.size:
        raise SampleError(f"ring sample of {len(data)} bytes, expected {RING_SAMPLE.size}")
    (version, layout, ring, reason, flags, avail_idx, used_idx, avail_flags, used_flags, used_event, avail_event,
     num, in_flight, _reserved, base, kicks, calls) = RING_SAMPLE.unpack_from(data)
    if version != SAMPLE_VERSION:
        raise SampleError(f"ring sample version {version}, this vhusniff reads {SAMPLE_VERSION}")
    try:
        layout_value, reason_value = Layout(layout), Reason(reason)
    except ValueError as error:
        raise SampleError(f"bad ring sample field: {error}") from None
    tail = data[RING_SAMPLE.size:]
    pending = tuple(tail.decode("utf-8", "replace").split("\n")) if tail else ()
    return RingSample(ring, reason_value, SampleFlag(flags), avail_idx, used_idx, avail_flags, used_flags,
                      used_event, avail_event, num, in_flight, base, kicks, calls, layout_value, pending)
