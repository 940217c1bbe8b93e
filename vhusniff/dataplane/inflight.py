"""What is in flight on a ring: the descriptor chains posted (avail) and not yet used, decoded read-only.

Split rings: the avail ring's entries from the used index to the avail index. Packed rings: the descriptors from
the device's position on whose AVAIL and USED bits differ.
For each pending head the chain is walked (indirect tables too, at most `num` descriptors) and the request
header the device type puts in its first device-readable bytes is decoded: virtio-blk's request header (type,
sector, data length), virtio-net's header, or FUSE's opcode and unique id (virtio-fs).
"""
from __future__ import annotations

import struct
from types import MappingProxyType
from typing import NamedTuple

from .memory import GuestMemory

_DESC = struct.Struct("<QIHH")            # addr (guest-physical), len, flags, next
PACKED_DESC = struct.Struct("<QIHH")      # addr (guest-physical), len, buffer id, flags
PACKED_AVAIL, PACKED_USED = 1 << 7, 1 << 15
NEXT, WRITE, INDIRECT = 1, 2, 4
_U16 = struct.Struct("<H")
_BLK_HEADER = struct.Struct("<IIQ")       # type, reserved (ioprio), sector
_NET_HEADER = struct.Struct("<BBHHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
_FUSE_IN_HEADER = struct.Struct("<IIQQ")  # len, opcode, unique, nodeid

# virtio-blk request types (VIRTIO 1.2 §5.2.6).
BLK_REQUEST_TYPES = MappingProxyType({0: "IN", 1: "OUT", 4: "FLUSH", 8: "GET_ID", 9: "GET_LIFETIME",
                                      11: "DISCARD", 13: "WRITE_ZEROES", 14: "SECURE_ERASE"})
# FUSE opcodes (include/uapi/linux/fuse.h), the ones a virtio-fs guest sends.
FUSE_OPCODES = MappingProxyType({
    1: "LOOKUP", 2: "FORGET", 3: "GETATTR", 4: "SETATTR", 5: "READLINK", 6: "SYMLINK", 8: "MKNOD", 9: "MKDIR",
    10: "UNLINK", 11: "RMDIR", 12: "RENAME", 13: "LINK", 14: "OPEN", 15: "READ", 16: "WRITE", 17: "STATFS",
    18: "RELEASE", 20: "FSYNC", 21: "SETXATTR", 22: "GETXATTR", 23: "LISTXATTR", 24: "REMOVEXATTR", 25: "FLUSH",
    26: "INIT", 27: "OPENDIR", 28: "READDIR", 29: "RELEASEDIR", 30: "FSYNCDIR", 31: "GETLK", 32: "SETLK",
    33: "SETLKW", 34: "ACCESS", 35: "CREATE", 36: "INTERRUPT", 37: "BMAP", 38: "DESTROY", 39: "IOCTL",
    40: "POLL", 41: "NOTIFY_REPLY", 42: "BATCH_FORGET", 43: "FALLOCATE", 44: "READDIRPLUS", 45: "RENAME2",
    46: "LSEEK", 47: "COPY_FILE_RANGE", 48: "SETUPMAPPING", 49: "REMOVEMAPPING", 50: "SYNCFS", 51: "TMPFILE",
})
SECTOR_SIZE = 512


class Pending(NamedTuple):
    """One posted chain not yet used."""
    head: int
    descriptors: int
    readable: int          # bytes the device reads
    writable: int          # bytes the device writes
    fields: dict           # decoded header: {"blk.type": "OUT", "blk.sector": 2048, ...}
    problem: str = ""      # the chain could not be walked whole (unmapped, a loop, a bad index)

    def summary(self) -> str:
        decoded = " ".join(f"{name}={value}" for name, value in self.fields.items())
        text = f"head {self.head}: {self.descriptors} desc, {self.readable} B out, {self.writable} B in"
        return text + (f" {decoded}" if decoded else "") + (f" ({self.problem})" if self.problem else "")


def walk_chain(memory: GuestMemory, desc: int, num: int, head: int):
    """(segments [(addr, len, writable)], problem) of the chain at `head`."""
    segments: list[tuple[int, int, bool]] = []
    table, size, index = desc, num, head
    seen = 0
    while True:
        if index >= size:
            return segments, f"descriptor index {index} beyond the table of {size}"
        entry = memory.unpack(_DESC, table + 16 * index, physical=table != desc)
        if entry is None:
            return segments, f"descriptor {index} not in mapped memory"
        addr, length, flags, following = entry
        seen += 1
        if seen > num + size:
            return segments, "descriptor chain loops"
        if flags & INDIRECT:
            table, size, index = addr, length // 16, 0
            continue
        segments.append((addr, length, bool(flags & WRITE)))
        if not flags & NEXT:
            return segments, ""
        index = following


def decode_header(memory: GuestMemory, segments, device: str | None) -> dict:
    readable = [(addr, length) for addr, length, writable in segments if not writable]
    if not readable:
        return {}
    addr, length = readable[0]
    if device == "blk" and length >= _BLK_HEADER.size:
        header = memory.unpack(_BLK_HEADER, addr, physical=True)
        if header is None:
            return {}
        kind, _ioprio, sector = header
        data = sum(seg_length for _a, seg_length, _w in segments[1:-1])
        return {"blk.type": BLK_REQUEST_TYPES.get(kind, str(kind)), "blk.sector": sector, "blk.length": data}
    if device == "net" and length >= _NET_HEADER.size:
        header = memory.unpack(_NET_HEADER, addr, physical=True)
        if header is None:
            return {}
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, _buffers = header
        return {"net.flags": flags, "net.gso_type": gso_type, "net.hdr_len": hdr_len, "net.gso_size": gso_size,
                "net.csum_start": csum_start, "net.csum_offset": csum_offset}
    if device == "fs" and length >= _FUSE_IN_HEADER.size:
        header = memory.unpack(_FUSE_IN_HEADER, addr, physical=True)
        if header is None:
            return {}
        _length, opcode, unique, nodeid = header
        return {"fuse.opcode": FUSE_OPCODES.get(opcode, str(opcode)), "fuse.unique": unique, "fuse.nodeid": nodeid}
    return {}


def pending_requests(memory: GuestMemory, num: int, desc: int, avail: int, used: int,
                     device: str | None, limit: int | None = None) -> list[Pending]:
    """The chains posted and not yet used on a split ring (avail ring entries from used idx to avail idx), the
    oldest first; at most `limit` of them."""
    heads = memory.unpack(struct.Struct("<HH"), avail)
    used_head = memory.unpack(struct.Struct("<HH"), used)
    if heads is None or used_head is None:
        return []
    avail_idx, used_idx = heads[1], used_head[1]
    pending = []
    count = min(((avail_idx - used_idx) & 0xFFFF), num if limit is None else min(limit, num))
    for position in range(used_idx, used_idx + count):
        entry = memory.unpack(_U16, avail + 4 + 2 * (position % num))
        if entry is None:
            break
        segments, problem = walk_chain(memory, desc, num, entry[0])
        pending.append(Pending(entry[0], len(segments), sum(s[1] for s in segments if not s[2]),
                               sum(s[1] for s in segments if s[2]), decode_header(memory, segments, device),
                               problem))
    return pending


def packed_in_flight(flags: int) -> bool:
    """A packed ring's descriptor made available and not yet used (its AVAIL and USED bits differ)."""
    return bool(flags & PACKED_AVAIL) != bool(flags & PACKED_USED)


def pending_packed(memory: GuestMemory, num: int, desc: int, start: int, device: str | None,
                   limit: int | None = None, slots: int | None = None) -> list[Pending]:
    """The buffers made available and not yet used on a packed ring, from slot `start` (the device's position:
    the oldest first) over `slots` slots (what lies up to the driver's position; default: once round the ring);
    at most `limit` of them. A buffer is a chain of descriptors (NEXT) or one indirect table; its id is in its
    last descriptor."""
    pending: list[Pending] = []
    slot, walked = start % num if num else 0, 0
    span = num if slots is None else min(slots, num)
    while walked < span and (limit is None or len(pending) < limit):
        entry = memory.unpack(PACKED_DESC, desc + 16 * slot)
        if entry is None:
            break
        if not packed_in_flight(entry[3]):
            slot, walked = (slot + 1) % num, walked + 1
            continue
        segments: list[tuple[int, int, bool]] = []
        problem = ""
        while True:
            addr, length, buffer_id, flags = entry
            if flags & INDIRECT:
                for position in range(length // 16):
                    inner = memory.unpack(PACKED_DESC, addr + 16 * position, physical=True)
                    if inner is None:
                        problem = f"indirect descriptor {position} not in mapped memory"
                        break
                    segments.append((inner[0], inner[1], bool(inner[3] & WRITE)))
            else:
                segments.append((addr, length, bool(flags & WRITE)))
            slot, walked = (slot + 1) % num, walked + 1
            if not flags & NEXT or flags & INDIRECT or problem:
                break
            if walked >= num:
                problem = "descriptor chain runs round the ring"
                break
            following = memory.unpack(PACKED_DESC, desc + 16 * slot)
            if following is None:
                problem = f"descriptor {slot} not in mapped memory"
                break
            entry = following
        pending.append(Pending(buffer_id, len(segments), sum(s[1] for s in segments if not s[2]),
                               sum(s[1] for s in segments if s[2]), decode_header(memory, segments, device), problem))
    return pending
