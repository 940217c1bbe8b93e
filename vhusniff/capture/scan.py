"""The fast block scanner: a capture as vhusniff writes it (one section of one source, nanosecond timestamps,
little-endian), read with `struct` straight from large file chunks, for `read`'s fast path and the analysis
commands alike. Anything it does not expect (another timestamp resolution, a damaged block, an unknown
pseudo-header version, several sources) raises Unusual, and the caller hands over to pcapng.read_capture at the
same record, so that errors and their offsets have one source.
"""
from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Iterator
from typing import BinaryIO

from ..model import Record
from .pcapng import (
    BLOCK_EPB,
    BLOCK_IDB,
    BLOCK_SHB,
    BYTE_ORDER_MAGIC,
    LINKTYPE_USER0,
    MIN_BLOCK_LENGTH,
    OPTION_IF_DESCRIPTION,
    READ_CHUNK,
    _option_value,
    _ts_resolution,
    interface_source,
    parse_pseudo_header,
    read_capture,
    section_version_problem,
)

_CHUNK = READ_CHUNK                  # a block longer than this (or a damaged length) goes to the full reader
# Read this much at a time (more for a longer block): small enough that the buffer is a small part of what an
# analysis keeps (memory stays flat from the smallest capture up), large enough that reads cost nothing.
_READ = 1 << 17
_BLOCK = struct.Struct("<II")
_EPB = struct.Struct("<IIIII")
_PACKET_BLOCK = struct.Struct("<7I")     # an EPB's head: type, length, interface, time high and low, lengths
_LENGTH = struct.Struct("<I")
_NANOSECONDS = (10 ** 9, 10 ** 9)    # capture._ts_resolution's (multiplier, divisor) for if_tsresol 9
_LITTLE_ENDIAN_MAGIC = struct.pack("<I", BYTE_ORDER_MAGIC)
_SHORTEST_EPB = MIN_BLOCK_LENGTH[BLOCK_EPB]

Source = Callable[[], "str | BinaryIO"]     # where to read the capture from, from its start (capture.progress)


class Unusual(Exception):
    """The fast scanner met something only the full reader handles."""


def scan(source: str | BinaryIO, sources: list[str] | None = None) -> Iterator[tuple[int, bytes]]:
    """(timestamp ns, packet bytes) of each vhost-user EPB, for files as vhusniff writes them: of one source,
    which is put in `sources` (a capture of several goes to the full reader, which numbers their connections)."""
    sources = [] if sources is None else sources
    opened = open(source, "rb") if isinstance(source, str) else contextlib.nullcontext(source)
    with opened as stream:
        buffer = b""
        position = 0
        user0: dict[int, bool] = {}
        interfaces = 0
        any_user0 = in_section = False
        sections = 0
        unpack_block, unpack_epb, unpack_length = _BLOCK.unpack_from, _EPB.unpack_from, _LENGTH.unpack_from
        unpack_packet_block = _PACKET_BLOCK.unpack_from
        end = 0
        while True:
            if end - position >= 28:      # the common block, checked and yielded in one step
                block_type, total, interface, high, low, captured, _original = unpack_packet_block(buffer, position)
                if block_type == BLOCK_EPB and position + total <= end:
                    if total % 4 or total < _SHORTEST_EPB or captured > total - 32 or not user0.get(interface) \
                            or unpack_length(buffer, position + total - 4)[0] != total:
                        raise Unusual
                    yield (high << 32) | low, buffer[position + 28:position + 28 + captured]
                    position += total
                    continue
            if len(buffer) - position < 8 or len(buffer) - position < unpack_block(buffer, position)[1]:
                needed = unpack_block(buffer, position)[1] if len(buffer) - position >= 8 else 8
                if needed > _CHUNK:
                    raise Unusual
                more = stream.read(max(_READ, needed - (len(buffer) - position)))
                if not more:
                    if position != len(buffer) or not any_user0:
                        raise Unusual
                    return
                buffer = buffer[position:] + more
                position = 0
                end = len(buffer)
                continue
            block_type, total = unpack_block(buffer, position)
            if total % 4 or total < _SHORTEST_EPB and total < MIN_BLOCK_LENGTH.get(block_type, 12) \
                    or (not user0 and block_type not in (BLOCK_SHB, BLOCK_IDB)) \
                    or unpack_length(buffer, position + total - 4)[0] != total:
                raise Unusual
            if block_type == BLOCK_EPB:
                interface, high, low, captured, _original = unpack_epb(buffer, position + 8)
                if not user0.get(interface) or captured > total - 32:
                    raise Unusual
                yield (high << 32) | low, buffer[position + 28:position + 28 + captured]
            elif block_type == BLOCK_SHB:
                if buffer[position + 8:position + 12] != _LITTLE_ENDIAN_MAGIC \
                        or section_version_problem(struct.unpack_from("<H", buffer, position + 12)[0]):
                    raise Unusual
                user0, interfaces, in_section = {}, 0, True
                sections += 1
            elif block_type == BLOCK_IDB:
                if not in_section:
                    raise Unusual
                link_type = struct.unpack_from("<H", buffer, position + 8)[0]
                if _ts_resolution(buffer, position + 16, position + total - 4, "<") != _NANOSECONDS:
                    raise Unusual
                if link_type == LINKTYPE_USER0:
                    described = _option_value(buffer, position + 16, position + total - 4, "<", OPTION_IF_DESCRIPTION)
                    named = interface_source(described) if described is not None else ""
                    if sources and sources[0] != named or not named and (interfaces or sections > 1):
                        raise Unusual
                    sources[:] = [named]
                user0[interfaces] = link_type == LINKTYPE_USER0
                any_user0 = any_user0 or link_type == LINKTYPE_USER0
                interfaces += 1
            position += total


def scan_records(source: Source) -> Iterator[Record]:
    """The records of a capture, as read_capture yields them: scanned fast while the file is as vhusniff writes
    it, then (from the record where the scanner stopped) read_capture's, which reads what is unusual or raises
    CaptureError where the damage is. `source` gives what to read, each time from its start."""
    sources: list[str] = []
    done = 0
    try:
        for timestamp, packet in scan(source(), sources):
            try:
                record = parse_pseudo_header(packet, timestamp, 0)
            except ValueError:
                raise Unusual from None
            if sources and sources[0]:
                record.source = sources[0]
            done += 1
            yield record
    except Unusual:
        for number, record in enumerate(read_capture(source()), 1):
            if number > done:
                yield record


__all__ = ["Source", "Unusual", "scan", "scan_records"]
