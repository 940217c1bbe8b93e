"""`vhusniff read`'s loops: the general one (any option) and a fast summary path for plain one-line output.

The fast path scans Enhanced Packet Blocks with `struct` straight from large file chunks and caches each distinct
record's line (keyed by the exact packet bytes and the connection's negotiated context), so a long capture of
repeating control traffic costs a dict lookup and one format per message. Anything it does not expect (another
timestamp resolution, a damaged block, an unknown pseudo-header version) hands over to capture.read_capture at the
same record, so errors and their offsets have one source.
"""
from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Iterator
from typing import BinaryIO

from ..capture.pcapng import (
    BLOCK_EPB,
    BLOCK_IDB,
    BLOCK_SHB,
    BYTE_ORDER_MAGIC,
    LINKTYPE_USER0,
    MIN_BLOCK_LENGTH,
    READ_CHUNK,
    _ts_resolution,
    parse_pseudo_header,
    read_capture,
    section_version_problem,
)
from ..model import RecordKind
from .present import record_line

_CHUNK = READ_CHUNK                  # a block longer than this (or a damaged length) goes to the full reader
_CACHE_LIMIT = 1 << 16                 # distinct records remembered; cleared when full, so memory stays flat
_BLOCK = struct.Struct("<II")
_EPB = struct.Struct("<IIIII")
_CONNECTION = _LENGTH = struct.Struct("<I")
_NANOSECONDS = (10 ** 9, 10 ** 9)    # capture._ts_resolution's (multiplier, divisor) for if_tsresol 9
_PREFIX = f"{0:>5} {0.0:10.6f} "
_LITTLE_ENDIAN_MAGIC = struct.pack("<I", BYTE_ORDER_MAGIC)
_SHORTEST_EPB = MIN_BLOCK_LENGTH[BLOCK_EPB]


class _Unusual(Exception):
    """The fast scanner met something only the full reader handles."""


Source = Callable[[], "str | BinaryIO"]     # where to read the capture from, from its start (capture.progress)


def general_messages(path: str, tracker, skip: int = 0, source: Source | None = None) -> Iterator[tuple]:
    """(number, relative seconds, record, message or None) for every record, from read_capture."""
    first_time = None
    for number, record in enumerate(read_capture(source() if source else path), start=1):
        if first_time is None:
            first_time = record.timestamp_ns
        if number <= skip:
            continue
        yield number, (record.timestamp_ns - first_time) / 1e9, record, tracker.decode(record)


def _scan(source: str | BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(timestamp ns, packet bytes) of each vhost-user EPB, for files as vhusniff writes them."""
    opened = open(source, "rb") if isinstance(source, str) else contextlib.nullcontext(source)
    with opened as stream:
        buffer = b""
        position = 0
        user0: dict[int, bool] = {}
        interfaces = 0
        any_user0 = in_section = False
        unpack_block, unpack_epb, unpack_length = _BLOCK.unpack_from, _EPB.unpack_from, _LENGTH.unpack_from
        while True:
            if len(buffer) - position < 8 or len(buffer) - position < unpack_block(buffer, position)[1]:
                if len(buffer) - position >= 8 and unpack_block(buffer, position)[1] > _CHUNK:
                    raise _Unusual
                more = stream.read(_CHUNK)
                if not more:
                    if position != len(buffer) or not any_user0:
                        raise _Unusual
                    return
                buffer = buffer[position:] + more
                position = 0
                continue
            block_type, total = unpack_block(buffer, position)
            if total % 4 or total < _SHORTEST_EPB and total < MIN_BLOCK_LENGTH.get(block_type, 12) \
                    or (not user0 and block_type not in (BLOCK_SHB, BLOCK_IDB)) \
                    or unpack_length(buffer, position + total - 4)[0] != total:
                raise _Unusual
            if block_type == BLOCK_EPB:
                interface, high, low, captured, _original = unpack_epb(buffer, position + 8)
                if not user0.get(interface) or captured > total - 32:
                    raise _Unusual
                yield (high << 32) | low, buffer[position + 28:position + 28 + captured]
            elif block_type == BLOCK_SHB:
                if buffer[position + 8:position + 12] != _LITTLE_ENDIAN_MAGIC \
                        or section_version_problem(struct.unpack_from("<H", buffer, position + 12)[0]):
                    raise _Unusual
                user0, interfaces, in_section = {}, 0, True
            elif block_type == BLOCK_IDB:
                if not in_section:
                    raise _Unusual
                link_type = struct.unpack_from("<H", buffer, position + 8)[0]
                if _ts_resolution(buffer, position + 16, position + total - 4, "<") != _NANOSECONDS:
                    raise _Unusual
                user0[interfaces] = link_type == LINKTYPE_USER0
                any_user0 = any_user0 or link_type == LINKTYPE_USER0
                interfaces += 1
            position += total


def fast_summary(path: str, tracker, out, colour: bool = False, follow: int | None = None, count: int = 0,
                 source: Source | None = None) -> int:
    """Write one summary line per record; returns how many were shown. Raises CaptureError like read_capture.
    `source` (capture.progress) gives what to read instead of the path, each time from the start."""
    cache: dict = {}
    # connection -> what of its negotiated context changes decoding; only decoding (on a miss) changes it.
    context_keys: dict[int, tuple] = {}
    unpack_connection = _CONNECTION.unpack_from
    number = shown = done = 0          # done: records fully handled here, should the full reader take over
    first_time = None
    lines: list[str] = []
    try:
        for timestamp, packet in _scan(source() if source else path):
            number += 1
            if first_time is None:
                first_time = timestamp
            connection = unpack_connection(packet, 8)[0] if len(packet) >= 12 else 0
            key = (packet, context_keys.get(connection))
            entry = cache.get(key)
            if entry is None:
                try:
                    record = parse_pseudo_header(packet, timestamp, 0)
                except ValueError:
                    raise _Unusual from None
                message = tracker.decode(record)
                context = tracker.context_for(record.connection)
                context_keys[record.connection] = (context.features, context.protocol_features,
                                                   context.device_type)
                line = record_line(0, 0.0, record, message, colour)
                split = line.index(_PREFIX)
                entry = (line[:split], line[split + len(_PREFIX):])
                # Records that change the session's context are decoded every time (the tracker must see them).
                if record.kind == RecordKind.MESSAGE and key[1] == context_keys[record.connection]:
                    if len(cache) >= _CACHE_LIMIT:
                        cache.clear()
                    cache[key] = entry
            done = number
            if follow is not None and connection != follow:
                continue
            lines.append(f"{entry[0]}{number:>5} {(timestamp - first_time) / 1e9:10.6f} {entry[1]}\n")
            shown += 1
            if len(lines) >= 4096:
                out.writelines(lines)
                lines.clear()
            if count and shown >= count:
                break
    except _Unusual:
        out.writelines(lines)
        lines.clear()
        # Hand over at the same record: the full reader shows the rest, or says exactly what is wrong where.
        for number, relative, record, message in general_messages(path, tracker, skip=done, source=source):
            if follow is not None and record.connection != follow:
                continue
            lines.append(record_line(number, relative, record, message, colour) + "\n")
            shown += 1
            if count and shown >= count:
                break
    finally:
        out.writelines(lines)
    return shown
