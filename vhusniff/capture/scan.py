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

from ..model import Channel, Direction, EventKind, Record, RecordKind
from .pcapng import (
    BLOCK_EPB,
    BLOCK_IDB,
    BLOCK_SHB,
    BYTE_ORDER_MAGIC,
    LINKTYPE_USER0,
    MIN_BLOCK_LENGTH,
    PSEUDO_FLAG_UNFRAMED,
    PSEUDO_HEADER,
    PSEUDO_MAGIC,
    READ_CHUNK,
    interface_source,
    parse_pseudo_header,
    read_capture,
    section_version_problem,
    ts_resolution,
)

_CHUNK = READ_CHUNK                  # a block longer than this (or a damaged length) goes to the full reader
# Read this much at a time (more for a longer block): small enough that the buffer is a small part of what an
# analysis keeps (memory stays flat from the smallest capture up), large enough that reads cost nothing.
_READ = 1 << 17
_BLOCK = struct.Struct("<II")
_EPB = struct.Struct("<IIIII")
_PACKET_BLOCK = struct.Struct("<7I")     # an EPB's head: type, length, interface, time high and low, lengths
_LENGTH = struct.Struct("<I")
_NANOSECONDS = (10 ** 9, 10 ** 9)    # capture.ts_resolution's (multiplier, divisor) for if_tsresol 9
_LITTLE_ENDIAN_MAGIC = struct.pack("<I", BYTE_ORDER_MAGIC)
_SHORTEST_EPB = MIN_BLOCK_LENGTH[BLOCK_EPB]

# An EPB's head and the pseudo-header (v2) after it: magic with version and header length (as one u64),
# connection, (kind, channel, direction, flags) with (fd count, note length) (as one u64), (event, source tag). A
# message without fds or a note whose words read as below is made into its Record here; any other packet goes to
# pcapng.parse_pseudo_header.
_PLAIN_PACKET = struct.Struct("<7IQIQI")
_PLAIN_HEAD = _PACKET_BLOCK.size + PSEUDO_HEADER.size
_PLAIN_MAGIC_VERSION = struct.unpack("<Q", PSEUDO_MAGIC + struct.pack("<HH", 2, PSEUDO_HEADER.size))[0]
# (kind, channel, direction, flags, fd count, note length) of a message without fds or a note -> its channel,
# direction and unframed flag
_PLAIN_FIELDS = {int(RecordKind.MESSAGE) | channel << 8 | direction << 16 | flags << 24:
                 (channel, direction, bool(flags & PSEUDO_FLAG_UNFRAMED))
                 for channel in Channel for direction in Direction for flags in range(256)}

Source = Callable[[], "str | BinaryIO"]     # where to read the capture from, from its start (capture.progress)


class Unusual(Exception):
    """The fast scanner met something only the full reader handles."""


class _Blocks:
    """What the scanner knows of the section it reads: which interfaces carry vhost-user packets, its source."""

    __slots__ = ("user0", "interfaces", "any_user0", "in_section", "sections", "sources")

    def __init__(self, sources: list[str]) -> None:
        self.user0: dict[int, bool] = {}
        self.interfaces = 0
        self.any_user0 = self.in_section = False
        self.sections = 0
        self.sources = sources

    def other(self, buffer: bytes, position: int, block_type: int, total: int) -> None:
        """Check a block that is not a fast-path EPB (whole in `buffer`); raise Unusual where it is not plain."""
        if total % 4 or total < _SHORTEST_EPB and total < MIN_BLOCK_LENGTH.get(block_type, 12) \
                or (not self.user0 and block_type not in (BLOCK_SHB, BLOCK_IDB)) \
                or _LENGTH.unpack_from(buffer, position + total - 4)[0] != total:
            raise Unusual
        if block_type == BLOCK_SHB:
            if buffer[position + 8:position + 12] != _LITTLE_ENDIAN_MAGIC \
                    or section_version_problem(struct.unpack_from("<H", buffer, position + 12)[0]):
                raise Unusual
            self.user0, self.interfaces, self.in_section = {}, 0, True
            self.sections += 1
        elif block_type == BLOCK_IDB:
            if not self.in_section:
                raise Unusual
            link_type = struct.unpack_from("<H", buffer, position + 8)[0]
            if ts_resolution(buffer, position + 16, position + total - 4, "<") != _NANOSECONDS:
                raise Unusual
            sources = self.sources
            if link_type == LINKTYPE_USER0:
                named = interface_source(buffer, position + 16, position + total - 4, "<")
                if sources and sources[0] != named or not named and (self.interfaces or self.sections > 1):
                    raise Unusual
                sources[:] = [named]
            self.user0[self.interfaces] = link_type == LINKTYPE_USER0
            self.any_user0 = self.any_user0 or link_type == LINKTYPE_USER0
            self.interfaces += 1

    def packet(self, buffer: bytes, position: int, total: int) -> tuple[int, bytes]:
        """(timestamp ns, packet bytes) of an EPB whole in `buffer`, checked as `other` checks a block."""
        interface, high, low, captured, _original = _EPB.unpack_from(buffer, position + 8)
        if not self.user0.get(interface) or captured > total - 32:
            raise Unusual
        return (high << 32) | low, buffer[position + 28:position + 28 + captured]


def _refill(stream: BinaryIO, buffer: bytes, position: int, blocks: _Blocks) -> bytes | None:
    """The buffer from `position` on with at least the next whole block in it; None at the end of a plain file."""
    have = len(buffer) - position
    needed = _BLOCK.unpack_from(buffer, position)[1] if have >= 8 else 8
    if needed > _CHUNK:
        raise Unusual
    more = stream.read(max(_READ, needed - have))
    if not more:
        if have or not blocks.any_user0:
            raise Unusual
        return None
    return buffer[position:] + more


def _whole(buffer: bytes, position: int) -> bool:
    """Whether the next block is whole in the buffer."""
    return len(buffer) - position >= 8 and len(buffer) - position >= _BLOCK.unpack_from(buffer, position)[1]


def scan(source: str | BinaryIO, sources: list[str] | None = None) -> Iterator[tuple[int, bytes]]:
    """(timestamp ns, packet bytes) of each vhost-user EPB, for files as vhusniff writes them: of one source,
    which is put in `sources` (a capture of several goes to the full reader, which numbers their connections)."""
    blocks = _Blocks([] if sources is None else sources)
    user0 = blocks.user0
    opened = open(source, "rb") if isinstance(source, str) else contextlib.nullcontext(source)
    with opened as stream:
        buffer = b""
        position = end = 0
        unpack_length, unpack_packet_block = _LENGTH.unpack_from, _PACKET_BLOCK.unpack_from
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
            if not _whole(buffer, position):
                refilled = _refill(stream, buffer, position, blocks)
                if refilled is None:
                    return
                buffer, position, end = refilled, 0, len(refilled)
                continue
            block_type, total = _BLOCK.unpack_from(buffer, position)
            blocks.other(buffer, position, block_type, total)
            if block_type == BLOCK_EPB:
                yield blocks.packet(buffer, position, total)
            user0 = blocks.user0
            position += total


def scan_records(source: Source) -> Iterator[Record]:
    """The records of a capture, as read_capture yields them: scanned fast while the file is as vhusniff writes
    it, then (from the record where the scanner stopped) read_capture's, which reads what is unusual or raises
    CaptureError where the damage is. `source` gives what to read, each time from its start.

    scan's loop, making the Records too: a message without fds or a note is made from one unpack of its block's
    head and pseudo-header; any other packet by pcapng.parse_pseudo_header."""
    done = 0            # records yielded
    try:
        blocks = _Blocks([])
        user0 = blocks.user0
        source_name = ""
        message, note = RecordKind.MESSAGE, EventKind.NOTE
        plain_fields = _PLAIN_FIELDS.get
        head, magic_version, pseudo_size, epb = _PLAIN_HEAD, _PLAIN_MAGIC_VERSION, PSEUDO_HEADER.size, BLOCK_EPB
        unpack_length, unpack_plain = _LENGTH.unpack_from, _PLAIN_PACKET.unpack_from
        opened = source()
        with open(opened, "rb") if isinstance(opened, str) else contextlib.nullcontext(opened) as stream:
            buffer = b""
            position = end = 0
            while True:
                if end - position >= head:      # the common block, checked and made in one step
                    block_type, total, interface, high, low, captured, _original, magic, connection, fields, \
                        event_tag = unpack_plain(buffer, position)
                    if block_type == epb and position + total <= end:
                        plain = plain_fields(fields)
                        # a plain message in a sound block (the checks of the else branch, as they then stand)
                        if plain is not None and magic == magic_version and not event_tag & 0xFF \
                                and pseudo_size <= captured <= total - 32 and not total & 3 and user0.get(interface) \
                                and unpack_length(buffer, position + total - 4)[0] == total:
                            channel, direction, unframed = plain
                            record = Record((high << 32) | low, connection, channel, direction,
                                            buffer[position + head:position + 28 + captured], [], message,
                                            "", note, unframed, "", source_name, event_tag >> 8)
                        else:
                            if total % 4 or total < _SHORTEST_EPB or captured > total - 32 \
                                    or not user0.get(interface) \
                                    or unpack_length(buffer, position + total - 4)[0] != total:
                                raise Unusual
                            record = _record(buffer[position + 28:position + 28 + captured], (high << 32) | low,
                                             source_name)
                        position += total
                        done += 1
                        yield record
                        continue
                if not _whole(buffer, position):
                    refilled = _refill(stream, buffer, position, blocks)
                    if refilled is None:
                        return
                    buffer, position, end = refilled, 0, len(refilled)
                    continue
                block_type, total = _BLOCK.unpack_from(buffer, position)
                blocks.other(buffer, position, block_type, total)
                position += total
                if block_type == epb:
                    timestamp, packet = blocks.packet(buffer, position - total, total)
                    record = _record(packet, timestamp, source_name)
                    done += 1
                    yield record
                user0 = blocks.user0
                source_name = blocks.sources[0] if blocks.sources else ""
    except Unusual:
        for number, record in enumerate(read_capture(source()), 1):
            if number > done:
                yield record


def _record(packet: bytes, timestamp: int, source_name: str) -> Record:
    try:
        record = parse_pseudo_header(packet, timestamp, 0)
    except ValueError:
        raise Unusual from None
    if source_name:
        record.source = source_name
    return record


__all__ = ["Source", "Unusual", "scan", "scan_records"]
