"""Captures: pcapng files holding vhusniff Records (docs/capture-format.md).

Written by hand with `struct` (scapy's writer costs ~50 µs a message; this ~1 µs), read streaming in constant
memory. A damaged file never loses what came before the damage: `read_capture` yields every readable record,
then raises CaptureError naming the file and the byte offset of the first bad block.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import heapq
import io
import os
import socket
import stat
import struct
import sys
import time
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from ..model import Channel, Direction, EventKind, FdInfo, Record, RecordKind
from ..version import __version__
from .compat import migrate_v1_event

LINKTYPE_USER0 = 147
PSEUDO_MAGIC = b"VHUS"
PSEUDO_VERSION = 2

BLOCK_SHB = 0x0A0D0D0A
BLOCK_IDB = 0x00000001
BLOCK_EPB = 0x00000006
BYTE_ORDER_MAGIC = 0x1A2B3C4D
PCAPNG_MAJOR_VERSION = 1
# The least length of each block type this reader interprets: its fixed fields and both length fields.
MIN_BLOCK_LENGTH = {BLOCK_SHB: 28, BLOCK_IDB: 20, BLOCK_EPB: 32}
_BLOCK_NAMES = {BLOCK_SHB: "section header block", BLOCK_IDB: "interface description block",
                BLOCK_EPB: "enhanced packet block"}
# Blocks are read at most this much at a time: a damaged length field never allocates more than the file holds.
READ_CHUNK = 1 << 20

# epb_flags bits 0-1: inbound 1, outbound 2. The front-end is "this side": its requests go out.
EPB_FLAGS_BY_DIRECTION = {Direction.FRONTEND_TO_BACKEND: 2, Direction.BACKEND_TO_FRONTEND: 1}
DIRECTION_BY_EPB_FLAGS = {2: Direction.FRONTEND_TO_BACKEND, 1: Direction.BACKEND_TO_FRONTEND}

# Pseudo-header v2: magic, version, header_length, connection, kind, channel, direction, flags, fd_count,
# note_length (all as in v1), then event (the EventKind of an event record, 0 for a message) and the source tag:
# 3 bytes, little-endian, source_tag() of the capture's source, the same in every record of a capture. A reader
# that sees packets but not their interface (Wireshark's Lua without a field extractor, scapy) keeps a merged
# capture's sources apart by it. 0 means "not told": every capture written before the tag (these bytes were
# reserved and zero; older readers ignore them, so the version stays 2), and one that names no source. Event and
# tag are unpacked as one little-endian u32: event | tag << 8.
PSEUDO_HEADER = struct.Struct("<4sHHIBBBBHHI")
PSEUDO_HEADER_V1 = struct.Struct("<4sHHIBBBBHH")
# One fd description: kind, name_length, seals, reserved, inode, size.
FD_DESCRIPTION = struct.Struct("<BBHIQq")
FD_KINDS = ("unknown", "memfd", "eventfd", "socket", "pipe", "userfaultfd", "file", "anon")
_FD_KIND_CODES = {kind: code for code, kind in enumerate(FD_KINDS)}
PSEUDO_FLAG_UNFRAMED = 0x1

_BLOCK_HEAD = struct.Struct("<II")
_OPTION = struct.Struct("<HH")


class CaptureError(Exception):
    """A capture that cannot be read further: names the file and the byte offset where it went wrong."""

    def __init__(self, path: str, offset: int, reason: str):
        self.path, self.offset, self.reason = path, offset, reason
        super().__init__(f"{path}: offset {offset}: {reason}")


def block_length_problem(block_type: int, total: int) -> str:
    """Why a block of this type cannot have this length ("" when it can): the one check of every reader."""
    if total % 4 == 0 and total >= MIN_BLOCK_LENGTH.get(block_type, 12):
        return ""
    if block_type == BLOCK_SHB:
        return f"bad section header block length {total}"
    if total % 4 == 0 and total >= 12:
        return (f"bad block length {total} (block type {block_type:#x}): an {_BLOCK_NAMES[block_type]} needs "
                f"at least {MIN_BLOCK_LENGTH[block_type]} bytes")
    return f"bad block length {total} (block type {block_type:#x})"


def section_version_problem(major: int) -> str:
    """Why a section of this pcapng major version cannot be read ("" when it can): the one check of every reader."""
    return "" if major == PCAPNG_MAJOR_VERSION else f"unsupported pcapng version {major}"


def _pad4(length: int) -> int:
    return -length & 3


def _option(code: int, value: bytes) -> bytes:
    return _OPTION.pack(code, len(value)) + value + b"\0" * _pad4(len(value))


def _block(block_type: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return _BLOCK_HEAD.pack(block_type, total) + body + struct.pack("<I", total)


# Where a capture was made, in its interface's if_description (and its section's shb_hardware): mergecap keeps
# interfaces whose descriptions differ apart, so a merged capture still says which source each packet came from.
OPTION_SHB_HARDWARE = 2
OPTION_IF_NAME = 2
OPTION_IF_DESCRIPTION = 3
OPTION_IF_TSRESOL = 9
SOURCE_PREFIX = "vhusniff source: "
_INSTANCE_START = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())     # this process's start, near enough


def capture_source(route: str = "") -> str:
    """This process as a capture's source: `host=NAME pid=N start=UTC-TIME`, then `route=...` when the writer
    serves one route (a proxy route's listening path and target, a replay's peer). Host, pid and start tell
    proxy instances apart: a pid alone is reused."""
    text = f"host={socket.gethostname()} pid={os.getpid()} start={_INSTANCE_START}"
    return f"{text} route={route}" if route else text


def source_tag(source: str) -> int:
    """The 24-bit tag every record of a capture from `source` carries in its pseudo-header: the first three bytes
    of the source's BLAKE2b digest, little-endian, never 0 (0 means a record that names no source)."""
    if not source:
        return 0
    digest = hashlib.blake2b(source.encode("utf-8", "replace"), digest_size=3).digest()
    return int.from_bytes(digest, "little") or 1


def source_tag_text(tag: int, source: str) -> str:
    """A record's tag as -V shows it, with what is wrong when it is not the tag of the source its interface names
    (a record moved between captures by another tool, or a damaged one): said as data, never raised."""
    text = f"{tag:#08x}"
    expected = source_tag(source)
    if tag == expected:
        return text
    if not source:
        return f"{text} (its interface names no source)"
    return f"{text} (not its interface's source, whose tag is {expected:#08x})"


def file_header(application: str = "vhusniff", source: str = "") -> bytes:
    """The Section Header Block and the one Interface Description Block every capture starts with; `source`
    (capture_source) goes into the interface's description and the section's hardware option."""
    described = (SOURCE_PREFIX + source).encode("utf-8", "replace") if source else b""
    shb_options = (_option(OPTION_SHB_HARDWARE, described) if described else b"") + \
        _option(4, f"{application} {__version__}".encode()) + _option(0, b"")
    shb = _block(BLOCK_SHB, struct.pack("<IHHq", BYTE_ORDER_MAGIC, 1, 0, -1) + shb_options)
    idb_options = _option(OPTION_IF_NAME, b"vhusniff") + \
        (_option(OPTION_IF_DESCRIPTION, described) if described else b"") + \
        _option(OPTION_IF_TSRESOL, bytes([9])) + _option(0, b"")
    idb = _block(BLOCK_IDB, struct.pack("<HHI", LINKTYPE_USER0, 0, 0) + idb_options)
    return shb + idb


def interface_source(body: bytes, start: int, end: int, endian: str) -> str:
    """The source an Interface Description Block's options (body[start:end]) name in its description ("" when it
    has none, or it is not a vhusniff source)."""
    described = option_value(body, start, end, endian, OPTION_IF_DESCRIPTION)
    if described is None:
        return ""
    text = described.decode("utf-8", "replace")
    return text[len(SOURCE_PREFIX):] if text.startswith(SOURCE_PREFIX) else ""


@functools.lru_cache(maxsize=1024)     # the same fds pass again and again (every eventfd shares one inode)
def _fd_description(fd: FdInfo) -> bytes:
    name = fd.name.encode("utf-8", "surrogateescape")[:255]
    return FD_DESCRIPTION.pack(_FD_KIND_CODES.get(fd.kind, 0), len(name), fd.seals & 0xFFFF, 0,
                               fd.inode & 0xFFFFFFFFFFFFFFFF, fd.size) + name


def pseudo_header(record: Record, tag: int = 0) -> bytes:
    """The versioned pseudo-header that precedes a record's exact bytes; `tag` is the writer's source_tag."""
    parts = [_fd_description(fd) for fd in record.fds]
    note = record.note.encode("utf-8", "replace")[:0xFFFF]
    parts.append(note)
    tail = b"".join(parts)
    flags = PSEUDO_FLAG_UNFRAMED if record.unframed and record.kind == RecordKind.MESSAGE else 0
    event = record.event if record.kind == RecordKind.EVENT else EventKind.NOTE
    return PSEUDO_HEADER.pack(PSEUDO_MAGIC, PSEUDO_VERSION, PSEUDO_HEADER.size + len(tail), record.connection,
                              record.kind, record.channel, record.direction, flags, len(record.fds),
                              len(note), event | tag << 8) + tail


# epb_flags and the end of options, per record kind and direction: every EPB ends with one of these.
_OPTIONS_TAIL = {(kind, direction): _option(2, struct.pack(
    "<I", EPB_FLAGS_BY_DIRECTION[direction] if kind == RecordKind.MESSAGE else 0)) + _option(0, b"")
    for kind in RecordKind for direction in Direction}


def enhanced_packet_block(record: Record, tag: int = 0) -> bytes:
    """A record as an Enhanced Packet Block; `tag` is the writer's source_tag (0: the writer names no source)."""
    if not record.fds and not record.note and not record.unframed and record.event == EventKind.NOTE:
        pseudo = _plain_pseudo_header(record.connection, record.kind, record.channel, record.direction, tag)
    else:
        pseudo = pseudo_header(record, tag)
    return _assemble_epb(record.timestamp_ns, pseudo, record.data, _OPTIONS_TAIL[record.kind, record.direction])


def _plain_pseudo_header(connection: int, kind: RecordKind, channel: Channel, direction: Direction,
                         tag: int = 0) -> bytes:
    """The pseudo-header of a record without fds or note: the same for every such record of a stream."""
    return PSEUDO_HEADER.pack(PSEUDO_MAGIC, PSEUDO_VERSION, PSEUDO_HEADER.size, connection, kind, channel,
                              direction, 0, 0, 0, EventKind.NOTE | tag << 8)


@functools.lru_cache(maxsize=512)     # control messages come in few sizes: one struct per size
def _epb_packer(pseudo_size: int, data_size: int, tail_size: int) -> tuple:
    """(pack, captured length, block length) for an EPB of these sizes. The block: type, length, interface,
    timestamp high and low, captured and original length; pseudo-header, the exact bytes, padding to 4,
    options (`tail`: epb_flags and end), the length again. The one description of an EPB's layout."""
    length = pseudo_size + data_size
    pad = -length & 3
    total = 28 + length + pad + tail_size + 4
    return struct.Struct(f"<7I{pseudo_size}s{data_size}s{pad}x{tail_size}sI").pack, length, total


def _assemble_epb(timestamp: int, pseudo: bytes, data: bytes, tail: bytes) -> bytes:
    pack, length, total = _epb_packer(len(pseudo), len(data), len(tail))
    return pack(BLOCK_EPB, total, 0, timestamp >> 32, timestamp & 0xFFFFFFFF, length, length, pseudo, data, tail,
                total)


class CaptureWriter:
    """Writes records as pcapng. With flush_each every record reaches the kernel before write() returns, so a
    `kill -9` of the writer leaves a capture readable up to the last record written."""

    def __init__(self, target: str | os.PathLike | BinaryIO, flush_each: bool = False, source: str = ""):
        """`source` says where the capture is made (capture_source(route), what the proxy and replay write);
        a capture without one reads as one source."""
        if isinstance(target, (str, os.PathLike)):
            self.path = os.fspath(target)
            # Flushing each record: unbuffered, so one write() is one system call and nothing waits in user space.
            self._file: BinaryIO = open(target, "wb", buffering=0 if flush_each else -1)
            self._owned = True
        else:
            self.path = getattr(target, "name", "<stream>")
            self._file = target
            self._owned = False
        self.flush_each = flush_each
        # An unbuffered file (ours, when flushing each record) has nothing to flush: one write() is the flush.
        self._flush_buffer = flush_each and not isinstance(self._file, io.RawIOBase)
        self.records = 0
        self.source = source
        self.tag = source_tag(source)          # in every record's pseudo-header: computed once
        self._file.write(file_header(source=self.source))
        self._file.flush()

    def write(self, record: Record) -> None:
        self._write_block(enhanced_packet_block(record, self.tag))

    def stream_writer(self, connection: int, channel: Channel, direction: Direction):
        """`write_message(timestamp_ns, data)` for the common record of one stream: a message without fds or
        note. The same bytes as write(Record(...)) at about half the cost: the proxy calls it per message."""
        pseudo = _plain_pseudo_header(connection, RecordKind.MESSAGE, channel, direction, self.tag)
        tail = _OPTIONS_TAIL[RecordKind.MESSAGE, direction]
        write_block = self._write_block

        def write_message(timestamp_ns: int, data: bytes) -> None:
            write_block(_assemble_epb(timestamp_ns, pseudo, data, tail))
        return write_message

    def _write_block(self, block: bytes) -> None:
        written = self._file.write(block)
        if written != len(block):
            self._write_rest(block, written)
        self.records += 1
        if self._flush_buffer:
            self._file.flush()

    def _write_rest(self, block: bytes, written: int | None) -> None:
        """An unbuffered file may take part of a block (a full disk, a signal): never leave half a block."""
        view = memoryview(block)
        written = written or 0
        while written < len(block):
            written += self._file.write(view[written:]) or 0

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.flush()
        if self._owned:
            self._file.close()

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def write_capture(path: str | os.PathLike, records) -> int:
    """Write records to a new capture; returns how many."""
    with CaptureWriter(path) as writer:
        for record in records:
            writer.write(record)
        return writer.records


def parse_pseudo_header(packet: bytes, timestamp_ns: int, epb_flags: int) -> Record:
    """A Record from one EPB's packet data. Raises ValueError (with the reason) for a bad pseudo-header."""
    if len(packet) >= _PLAIN_SIZE:
        # Most records are messages without fds or a note: their header alone makes the record.
        magic, version, length, connection, kind, channel, direction, flags, fds, note, event_tag = _plain(packet)
        channel_value, direction_value = _CHANNELS.get(channel), _DIRECTIONS.get(direction)
        if length == _PLAIN_SIZE and version == 2 and not (kind or fds or note) and magic == PSEUDO_MAGIC \
                and channel_value is not None and direction_value is not None:
            return Record(timestamp_ns, connection, channel_value, direction_value, packet[_PLAIN_SIZE:], [],
                          _MESSAGE, "", _NOTE, bool(flags & PSEUDO_FLAG_UNFRAMED), "", "", event_tag >> 8)
    if len(packet) < 8 or packet[:4] != PSEUDO_MAGIC:
        raise ValueError("packet does not start with the vhusniff pseudo-header (magic VHUS)")
    version, header_length = struct.unpack_from("<HH", packet, 4)
    parser = PSEUDO_HEADER_PARSERS.get(version)
    if parser is None:
        raise ValueError(f"unknown pseudo-header version {version} (this vhusniff reads "
                         f"{', '.join(map(str, sorted(PSEUDO_HEADER_PARSERS)))})")
    return parser(packet, header_length, timestamp_ns, epb_flags)


_plain = PSEUDO_HEADER.unpack_from
_PLAIN_SIZE = PSEUDO_HEADER.size
_CHANNELS = {int(channel): channel for channel in Channel}
_DIRECTIONS = {int(direction): direction for direction in Direction}
_MESSAGE, _NOTE = RecordKind.MESSAGE, EventKind.NOTE


def _parse_v1(packet: bytes, header_length: int, timestamp_ns: int, epb_flags: int) -> Record:
    """Version 1: an event's kind was only words; compat.migrate_v1_event says what they meant."""
    record = _parse_fields(packet, header_length, timestamp_ns, PSEUDO_HEADER_V1)
    if record.kind == RecordKind.EVENT:
        record.event, record.device = migrate_v1_event(record.note, record.channel)
    return record


def _parse_v2(packet: bytes, header_length: int, timestamp_ns: int, epb_flags: int) -> Record:
    return _parse_fields(packet, header_length, timestamp_ns, PSEUDO_HEADER)


def _parse_fields(packet: bytes, header_length: int, timestamp_ns: int, layout: struct.Struct) -> Record:
    """The record of a pseudo-header laid out as `layout` (v1's 20 bytes, or v2's 24 that add the event kind)."""
    if len(packet) < layout.size or header_length > len(packet):
        raise ValueError(f"pseudo-header of {header_length} bytes in a {len(packet)}-byte packet")
    if header_length < layout.size:
        raise ValueError(f"pseudo-header length {header_length} is shorter than its fixed part ({layout.size} bytes)")
    (_magic, _version, _length, connection, kind, channel, direction, flags, fd_count,
     note_length, *event_tag) = layout.unpack_from(packet)
    position = layout.size
    fds = []
    for _ in range(fd_count):
        if position + FD_DESCRIPTION.size > header_length:
            raise ValueError("fd descriptions run past the pseudo-header")
        code, name_length, seals, _reserved, inode, size = FD_DESCRIPTION.unpack_from(packet, position)
        position += FD_DESCRIPTION.size
        if position + name_length > header_length:
            raise ValueError(f"fd name of {name_length} bytes runs past the pseudo-header")
        name = packet[position:position + name_length].decode("utf-8", "surrogateescape")
        position += name_length
        fds.append(FdInfo(FD_KINDS[code] if code < len(FD_KINDS) else "unknown", inode, size, name, seals))
    if position + note_length > header_length:
        raise ValueError("note runs past the pseudo-header")
    note = packet[position:position + note_length].decode("utf-8", "replace")
    try:
        channel_value = Channel(channel)
        direction_value = Direction(direction)
        kind_value = RecordKind(kind)
    except ValueError as error:
        raise ValueError(f"bad pseudo-header field: {error}") from None
    # A kind this reader does not know (a later writer's) reads as a plain NOTE: its note still says it.
    event_value = _EVENT_KINDS.get(event_tag[0] & 0xFF, EventKind.NOTE) \
        if event_tag and kind_value == RecordKind.EVENT else EventKind.NOTE
    return Record(timestamp_ns, connection, channel_value, direction_value, packet[header_length:], fds,
                  kind_value, note, event_value, bool(flags & PSEUDO_FLAG_UNFRAMED), "", "",
                  event_tag[0] >> 8 if event_tag else 0)


_EVENT_KINDS = {int(kind): kind for kind in EventKind}
# Every pseudo-header version this vhusniff ever wrote, forever.
PSEUDO_HEADER_PARSERS = {1: _parse_v1, 2: _parse_v2}


def read_capture(source: str | os.PathLike | BinaryIO) -> Iterator[Record]:
    """Yield the records of a capture, streaming; raise CaptureError at the first damage, after the good part.
    Each record carries its source; connection numbers are unique across sources (distinct_connections)."""
    yield from distinct_connections(_records_of(source))


def read_captures(paths: Iterable[str | os.PathLike]) -> Iterator[Record]:
    """The records of several captures merged by time (as mergecap merges them), connection numbers unique
    across sources. A capture that does not name its source (an older vhusniff's) is known by its file name."""
    streams = [_named_by_file(_records_of(path), os.fspath(path)) for path in paths]
    yield from distinct_connections(heapq.merge(*streams, key=lambda record: record.timestamp_ns))


def _records_of(source: str | os.PathLike | BinaryIO) -> Iterator[Record]:
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        with open(path, "rb") as stream:
            yield from _read_stream(stream, path)
    else:
        yield from _read_stream(source, getattr(source, "name", "<stream>"))


def _named_by_file(records: Iterator[Record], path: str) -> Iterator[Record]:
    for record in records:
        if not record.source:
            record.source = f"file={path}"
        yield record


def distinct_connections(records: Iterable[Record]) -> Iterator[Record]:
    """Records with connection numbers unique across sources, as tshark numbers tcp.stream: a (source, number)
    pair keeps its number unless it is given already, and then takes the next number above all those given.
    A capture of one source keeps every number it has."""
    given: dict[tuple[str, int], int] = {}
    holder: dict[int, str] = {}          # number -> the source it was given to
    highest = 0
    for record in records:
        key = (record.source, record.connection)
        number = given.get(key)
        if number is None:
            number = record.connection
            if number in holder:          # another source's, or this source's given to a renumbered one
                number = highest + 1
            holder[number] = record.source
            given[key] = number
            highest = max(highest, number)
        record.connection = number
        yield record


class ReadOutcome:
    """How reading a capture ended: `error` is "" when it was read to its end, else the one line that says why
    not, naming the file (and, for damage, the byte offset): `PATH: offset N: REASON`, `PATH: STRERROR`."""

    def __init__(self, path: str):
        self.path = path
        self.error = ""

    def report(self, program: str = "vhusniff") -> bool:
        """Say the error on stderr as `PROGRAM: ERROR`; True when there was one."""
        if self.error:
            print(f"{program}: {self.error}", file=sys.stderr)
        return bool(self.error)


@contextlib.contextmanager
def reading(path: str | os.PathLike) -> Iterator[ReadOutcome]:
    """The one way a command reads a capture and words what stops it: read (and use what is read) in the block.

        with reading(path) as outcome:
            for record in read_capture(path): ...
        outcome.report()

    Damage (CaptureError) or a file that cannot be opened or read ends the block, not the command: everything
    used before it stays used, and outcome.error says what went wrong where, worded the same for every
    command. A reader that left (BrokenPipeError) is not the file's fault and passes through."""
    outcome = ReadOutcome(os.fspath(path))
    try:
        yield outcome
    except CaptureError as error:
        outcome.error = str(error)
    except BrokenPipeError:
        raise
    except OSError as error:
        outcome.error = f"{error.filename or outcome.path}: {error.strerror or error}"


class _ShortRead(Exception):
    def __init__(self, available: int):
        self.available = available


def _bytes_left(stream: BinaryIO) -> int | None:
    """How many bytes the file holds after the stream's position; None when that is not known (not a regular
    file: a pipe, a device)."""
    try:
        status = os.fstat(stream.fileno())
        return status.st_size - stream.tell() if stat.S_ISREG(status.st_mode) else None
    except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
        return None


def _read_exactly(stream: BinaryIO, count: int) -> bytes:
    """The next `count` bytes; raises _ShortRead(how many there were) when the file ends first. A length larger
    than a chunk is checked against what the file holds before anything is allocated, and read in chunks."""
    if count <= READ_CHUNK:
        data = stream.read(count)
        if len(data) < count:
            raise _ShortRead(len(data))
        return data
    left = _bytes_left(stream)
    if left is not None and left < count:
        raise _ShortRead(left)
    parts, got = [], 0
    while got < count:
        part = stream.read(min(count - got, READ_CHUNK))
        if not part:
            raise _ShortRead(got)
        parts.append(part)
        got += len(part)
    return b"".join(parts)


class _Section:
    """What a section header and its interface blocks said: byte order, link types, time resolutions."""

    def __init__(self, endian: str, number: int = 0) -> None:
        self.endian = endian
        self.number = number                                 # sections before this one in the file
        self.link_types: dict[int, int] = {}
        self.resolution: dict[int, tuple[int, int]] = {}     # interface -> (multiplier to ns, divisor)
        self.sources: dict[int, str] = {}                    # interface -> its source ("" unnamed)

    def add_interface(self, body: bytes, total: int) -> int:
        link_type = struct.unpack_from(self.endian + "H", body)[0]
        interface = len(self.link_types)
        self.link_types[interface] = link_type
        self.resolution[interface] = ts_resolution(body, 8, total - 12, self.endian)
        source = interface_source(body, 8, total - 12, self.endian)
        if not source and (self.number or interface):
            # several unnamed interfaces (mergecap -I none, concatenated files): told apart by position
            source = f"section={self.number} interface={interface}"
        self.sources[interface] = source
        return link_type


def _read_stream(stream: BinaryIO, path: str) -> Iterator[Record]:
    if isinstance(stream, io.RawIOBase):
        stream = io.BufferedReader(stream)
    offset = 0
    section: _Section | None = None
    vhost_interfaces = 0
    while True:
        head = stream.read(8)
        if not head:
            break
        if len(head) < 8:
            raise CaptureError(path, offset, f"truncated block header ({len(head)} of 8 bytes)")
        block_type = struct.unpack("<I", head[:4])[0]
        if block_type == BLOCK_SHB:
            endian, total = _read_section_header(stream, head, path, offset)
            section = _Section(endian, 0 if section is None else section.number + 1)
            offset += total
            continue
        if section is None:
            if head[:4] in (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d"):
                raise CaptureError(path, 0, "a classic pcap file, not pcapng: it holds no vhusniff capture")
            raise CaptureError(path, 0, "not a pcapng file (no section header block)")
        block_type, total = struct.unpack(section.endian + "II", head)
        body = _read_block_body(stream, block_type, total, section.endian, path, offset)
        if block_type == BLOCK_EPB:
            record = _packet_record(body, total, section, path, offset)
            if record is not None:
                yield record
        elif block_type == BLOCK_IDB and section.add_interface(body, total) == LINKTYPE_USER0:
            vhost_interfaces += 1
        offset += total
    if section is None:
        raise CaptureError(path, 0, "empty file: not a pcapng capture")
    if vhost_interfaces == 0:
        raise CaptureError(path, offset, "the capture holds no vhost-user traffic (no interface of link type "
                                         f"{LINKTYPE_USER0}, USER0)")


def _read_section_header(stream: BinaryIO, head: bytes, path: str, offset: int) -> tuple[str, int]:
    """The byte order and length of the section header block that `head` begins; the rest of it is read."""
    magic_bytes = stream.read(4)
    if len(magic_bytes) < 4:
        raise CaptureError(path, offset, "truncated section header block")
    if struct.unpack("<I", magic_bytes)[0] == BYTE_ORDER_MAGIC:
        endian = "<"
    elif struct.unpack(">I", magic_bytes)[0] == BYTE_ORDER_MAGIC:
        endian = ">"
    else:
        raise CaptureError(path, offset, "bad byte-order magic in section header block")
    total = struct.unpack(endian + "I", head[4:])[0]
    problem = block_length_problem(BLOCK_SHB, total)
    if problem:
        raise CaptureError(path, offset, problem)
    try:
        rest = _read_exactly(stream, total - 12)
    except _ShortRead:
        raise CaptureError(path, offset, "truncated section header block") from None
    problem = section_version_problem(struct.unpack_from(endian + "H", rest)[0])
    if problem:
        raise CaptureError(path, offset, problem)
    return endian, total


def _read_block_body(stream: BinaryIO, block_type: int, total: int, endian: str, path: str, offset: int) -> bytes:
    """A block's body after its 8-byte head, checked whole: its length is sane, present, and said twice alike."""
    if total % 4 or total < 32 and total < MIN_BLOCK_LENGTH.get(block_type, 12):
        raise CaptureError(path, offset, block_length_problem(block_type, total))
    if total <= READ_CHUNK:
        body = stream.read(total - 8)
        available = len(body)
    else:
        try:
            body = _read_exactly(stream, total - 8)
            available = len(body)
        except _ShortRead as short:
            available = short.available
    if available < total - 8:
        raise CaptureError(path, offset, f"truncated block: {available + 8} of {total} bytes "
                                         f"(block type {block_type:#x})")
    if struct.unpack_from(endian + "I", body, total - 12)[0] != total:
        raise CaptureError(path, offset, f"block length fields disagree (block type {block_type:#x})")
    return body


def _packet_record(body: bytes, total: int, section: _Section, path: str, offset: int) -> Record | None:
    """The record an Enhanced Packet Block holds; None for a packet of another link type."""
    endian = section.endian
    interface, ts_high, ts_low, captured, _original = struct.unpack_from(endian + "IIIII", body)
    if interface not in section.link_types:
        raise CaptureError(path, offset, f"packet on undeclared interface {interface}")
    if captured > total - 32:
        raise CaptureError(path, offset, f"captured length {captured} runs past the block")
    if section.link_types[interface] != LINKTYPE_USER0:
        return None
    packet = body[20:20 + captured]
    epb_flags = _epb_flags(body, 20 + captured + _pad4(captured), total - 12, endian)
    multiplier, divisor = section.resolution[interface]
    timestamp = ((ts_high << 32) | ts_low) * multiplier // divisor
    try:
        record = parse_pseudo_header(packet, timestamp, epb_flags)
    except ValueError as error:
        raise CaptureError(path, offset, str(error)) from None
    record.source = section.sources[interface]
    return record



def _options(body: bytes, start: int, end: int, endian: str):
    position = start
    while position + 4 <= end:
        code, length = struct.unpack_from(endian + "HH", body, position)
        if code == 0:
            return
        yield code, body[position + 4:position + 4 + length]
        position += 4 + length + _pad4(length)


def option_value(body: bytes, start: int, end: int, endian: str, wanted: int) -> bytes | None:
    for code, value in _options(body, start, end, endian):
        if code == wanted:
            return value
    return None


def _epb_flags(body: bytes, start: int, end: int, endian: str) -> int:
    for code, value in _options(body, start, end, endian):
        if code == 2 and len(value) == 4:
            return struct.unpack(endian + "I", value)[0]
    return 0


def ts_resolution(body: bytes, start: int, end: int, endian: str) -> tuple[int, int]:
    """(multiplier, divisor) that turn the interface's timestamp units into nanoseconds."""
    for code, value in _options(body, start, end, endian):
        if code == 9 and value:
            exponent = value[0] & 0x7F
            if value[0] & 0x80:
                return (10 ** 9, 2 ** exponent)
            return (10 ** 9, 10 ** exponent) if exponent <= 9 else (1, 10 ** (exponent - 9))
    return (1000, 1)   # pcapng's default: microseconds


__all__ = ["CaptureError", "CaptureWriter", "ReadOutcome", "read_capture", "read_captures", "reading", "write_capture",
           "file_header", "capture_source", "source_tag", "source_tag_text", "distinct_connections", "interface_source",
           "enhanced_packet_block", "parse_pseudo_header", "LINKTYPE_USER0", "FD_KINDS", "PSEUDO_VERSION"]
