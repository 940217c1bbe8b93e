"""`vhusniff read`'s loops: the general one (any option) and a fast summary path for plain one-line output.

The fast path scans Enhanced Packet Blocks with `struct` straight from large file chunks and caches each distinct
record's line (keyed by the exact packet bytes and the connection's negotiated context), so a long capture of
repeating control traffic costs a dict lookup and one format per message. Anything it does not expect (another
timestamp resolution, a damaged block, an unknown pseudo-header version) hands over to capture.read_capture at the
same record, so errors and their offsets have one source.
"""
from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any

from ..capture.pcapng import parse_pseudo_header, read_capture, read_captures, source_tag_text
from ..capture.scan import Source, Unusual, scan
from ..model import Channel, Direction, RecordKind
from ..protocol import catalogue as cat
from ..protocol import config as config_space
from ..protocol.context import DEVICE_TELLING_REPLIES
from ..protocol.grammar import (
    FIXED_SIZE,
    MAX_PAYLOAD_SIZE,
    PAYLOADS,
    QUIET_FIELDS,
    REGION_XEN,
    SHORT_NAMES,
    carries_config_space,
    decode,
    flag_text,
    payload_candidates,
    request_name,
    value_text,
)
from .filters import DEVICE_TYPE_FIELD, RECORD_FIELDS, DisplayFilter, field_values
from .present import field_tree, hexdump, record_detail, record_line

_CACHE_LIMIT = 1 << 16                 # distinct records remembered; cleared when full, so memory stays flat
_CONNECTION = struct.Struct("<I")
_PREFIX = f"{0:>5} {0.0:10.6f} "


def general_messages(path: str | list[str], tracker, skip: int = 0, source: Source | None = None) -> Iterator[tuple]:
    """(number, relative seconds, record, message or None) for every record, from read_capture (of several
    captures: read_captures, merged by time)."""
    first_time = None
    if isinstance(path, list) and len(path) > 1:
        records = read_captures(path)
    else:
        records = read_capture(source() if source else path if isinstance(path, str) else path[0])
    for number, record in enumerate(records, start=1):
        if first_time is None:
            first_time = record.timestamp_ns
        if number <= skip:
            continue
        yield number, (record.timestamp_ns - first_time) / 1e9, record, tracker.decode(record)


# --- per-request line formatters -------------------------------------------------------------------------------
#
# A distinct message misses every cache, so its line must be cheap to make from its bytes: for each (context,
# channel, direction, request, flags, size) seen, one function that unpacks the payload with one struct and formats
# it with one f-string, made from the grammar's layout on first use. It writes what present.record_line writes;
# the first message of each shape is formatted both ways and a shape whose lines differ keeps the general path.

# Payload kinds whose summary is the grammar's general rule (grammar.payload_summary): these compile.
COMPILED_KINDS = frozenset({
    "empty", "u64", "ack", "features", "protocol_features", "queue_num", "mem_slots", "status", "mtu", "session_id",
    "vring_state", "vring_base", "vring_base_packed", "vring_addr", "vring_fd", "mem_region", "mem_region_xen", "log",
    "iotlb", "inflight", "object", "device_state", "device_state_result", "mmap", "rarp",
})
# Fields a summary shows as their set bits by name (grammar.value_text); the dissector shows the same ones.
NAMED_BIT_FIELDS = frozenset({"features", "protocol_features", "gpu_protocol_features", "status"})
_PLAIN = struct.Struct("<4sHHIBBBBHHB3xIII")          # pseudo-header v2 without fds or note, then the header
_PLAIN_SIZE = _PLAIN.size


class _Shown:
    """What value_text reads of a message: its context."""
    __slots__ = ("context",)

    def __init__(self, context) -> None:
        self.context = context


def _leaves(structure, names: list[str], layout: list[str]) -> bool:
    """Append each field's struct code (and its variable name) in wire order; False when one has none."""
    from construct import BytesInteger, FormatField, Renamed, Struct
    for sub in structure.subcons:
        inner = sub
        while isinstance(inner, Renamed):
            inner = inner.subcon
        if isinstance(inner, Struct):
            if not _leaves(inner, names, layout):
                return False
            continue
        if isinstance(inner, FormatField) and inner.fmtstr[0] == "<":
            layout.append(inner.fmtstr[1:])
        elif isinstance(inner, BytesInteger) and isinstance(inner.length, int) and sub.name in QUIET_FIELDS:
            layout.append(f"{inner.length}s")       # never shown: its bytes are skipped
        elif type(inner).__name__ == "Bytes" and isinstance(getattr(inner, "length", None), int):
            layout.append(f"{inner.length}s")
        else:
            return False
        names.append(sub.name or "_")
    return True


def compile_payload_summary(kind: str, context) -> Callable[[bytes, int], str] | None:
    """A function (packet, payload offset) -> the payload summary of a `kind` payload read in `context`, as
    grammar.payload_summary words it; None when the kind keeps the general path."""
    if kind not in COMPILED_KINDS:
        return None
    structure = PAYLOADS[kind][0]
    names: list[str] = []
    layout: list[str] = []
    if not _leaves(structure, names, layout):
        return None
    if not names:
        return _NO_SUMMARY
    variables = [f"v{index}" for index in range(len(names))]
    position = {name: index for index, name in enumerate(names)}
    parts: list[str] = []
    conditional = ""
    helpers: dict = {"_unpack": struct.Struct("<" + "".join(layout)).unpack_from, "_text": value_text,
                     "_shown": _Shown(context), "_from_bytes": int.from_bytes}
    for sub in structure.subcons:
        name = sub.name
        if name is None or name in QUIET_FIELDS:
            continue
        if name == "region":
            first = position["guest_phys_addr"]
            parts.append(f"{{{{gpa={{v{first}:#x}} size={{v{first + 1}:#x}} uaddr={{v{first + 2}:#x}} "
                         f"off={{v{first + 3}:#x}}}}}}")
            continue
        variable = f"v{position[name]}"
        if name == "flags" and kind in ("vring_fd", "vring_area"):
            if parts:
                conditional = variable
                break
            return None
        short = SHORT_NAMES.get(name, name)
        if layout[position[name]].endswith("s"):
            parts.append(f"{short}={{_text(_shown, {name!r}, {variable})}}")
        elif name in NAMED_BIT_FIELDS:
            parts.append(f"{short}={{_text(_shown, {name!r}, {variable})}}")
        else:
            parts.append(f"{short}={{hex({variable}) if {variable} > 65535 else {variable}}}")
    if conditional and len(parts) != sum(1 for sub in structure.subcons if sub.name not in (None, *QUIET_FIELDS)) - 1:
        return None                  # fields after the NOFD flag: keep the general rule's order
    text = 'f"' + " ".join(parts) + '"'
    if conditional:
        text += f' + (" NOFD" if {conditional} & 1 else "")'
    source = (f"def summary(packet, offset):\n"
              f"    {', '.join(variables)}{',' if len(variables) == 1 else ''} = _unpack(packet, offset)\n"
              f"    return {text}\n")
    exec(compile(source, f"<summary of {kind}>", "exec"), helpers)      # noqa: S102 -- made from the grammar
    return helpers["summary"]


def _config_summary(context, carries_space: bool) -> Callable[[bytes, int], str | None]:
    """A GET_CONFIG/SET_CONFIG payload's summary (its layout is variable: None when the bytes do not fit it)."""
    unpack = _CONFIG_HEAD.unpack_from
    device = context.device_type

    def summary(packet: bytes, offset: int) -> str | None:
        window, size, flags = unpack(packet, offset)
        if offset + 12 + size != len(packet):
            return None
        text = f"offset={hex(window) if window > 65535 else window} size={hex(size) if size > 65535 else size} " \
               f"flags={hex(flags) if flags > 65535 else flags} data={size}B"
        if carries_space:
            fields = config_space.summary(device, window, packet[offset + 12:])
            if fields:
                return f"{text} {fields}"
        return text
    return summary


_CONFIG_HEAD = struct.Struct("<III")


def _config_tree(context, carries_space: bool) -> Callable[[bytes, int], str | None]:
    """A GET_CONFIG/SET_CONFIG payload's lines of present.field_tree (None when the bytes do not fit it)."""
    unpack = _CONFIG_HEAD.unpack_from
    device = context.device_type
    shown: Any = _Shown(context)       # what value_text reads of a Message

    def tree(packet: bytes, offset: int) -> str | None:
        window, size, flags = unpack(packet, offset)
        if offset + 12 + size != len(packet):
            return None
        data = packet[offset + 12:]
        text = f"    config.offset: {hex(window) if window > 65535 else window}\n" \
               f"    config.size: {hex(size) if size > 65535 else size}\n" \
               f"    config.flags: {hex(flags) if flags > 65535 else flags}\n" \
               f"    config.data: {value_text(shown, 'data', data)}\n"
        if carries_space:
            text += "".join(f"{'  ' + '  ' * name.count('.')}{name}: {config_space.value_text(name, value)}\n"
                            for name, value in config_space.decode_space(device, window, data))
        return text
    return tree


def _NO_SUMMARY(packet: bytes, offset: int) -> str:      # noqa: N802 -- a constant, compared by identity
    """The summary of a payload with no fields: nothing (the line's head is stripped instead)."""
    return ""


class _Shapes:
    """Line heads and payload formatters per message shape, and each connection's context as a small number."""

    def __init__(self, tracker, with_fields: bool = False, with_tree: bool = False) -> None:
        self.tracker = tracker
        self.with_fields = with_fields         # a display filter reads the shapes' fields
        self.with_tree = with_tree             # -V shows their field trees
        self.sources: list[str] = []           # the capture's one source, once its interface is read
        self.source_lines: dict[int, str] = {}     # a pseudo-header's source tag -> what -V says of the source
        self.display_filter: DisplayFilter | None = None
        self.context_ids: dict[tuple, int] = {}     # what of a DecodeContext decoding reads -> id
        self.contexts: list = []               # id -> DecodeContext
        self.by_connection: dict[int, int] = {}
        self.base = self.context_id(tracker.base)
        self.formats: dict[tuple, tuple] = {}
        self.summaries: dict[tuple[str, int], Callable | None] = {}
        self.wheres: dict[tuple[int, int], str] = {}

    def source(self) -> str:
        return self.sources[0] if self.sources else ""

    def source_line(self, packet: bytes) -> str:
        """What -V says of a message's source and the tag its pseudo-header carries (as present.record_detail)."""
        tag = int.from_bytes(packet[21:24], "little")
        line = self.source_lines.get(tag)
        if line is None:
            line = f"  source: {self.sources[0]}\n" if self.sources and self.sources[0] else ""
            if tag:
                line += f"  source_tag: {source_tag_text(tag, self.source())}\n"
            self.source_lines[tag] = line
        return line

    def context_id(self, context) -> int:
        identity = (context.device_type, context.features, context.protocol_features, id(context.profile))
        known = self.context_ids.get(identity)
        if known is None:
            known = self.context_ids[identity] = len(self.contexts)
            self.contexts.append(context)
        return known

    def follow(self, connection: int) -> None:
        """After the tracker decoded a record of `connection`: its context may have changed."""
        self.by_connection[connection] = self.context_id(self.tracker.context_for(connection))

    def where(self, connection: int, channel: int) -> str:
        text = self.wheres.get((connection, channel))
        if text is None:
            where = f"c{connection}" + ("" if channel == Channel.MAIN else f"/{Channel(channel).name.lower()}")
            text = self.wheres[connection, channel] = f"{where:<10}"
        return text

    def shape(self, key: tuple) -> tuple | None:
        """(head, summary function) of a shape, or None: a shape the general path words (or the tracker must see)."""
        context_id, channel, direction, request, flags, size = key
        context = self.contexts[context_id]
        is_reply = bool(flags & cat.FLAG_REPLY)
        if channel == Channel.DEVICE_STATE or flags & cat.FLAGS_RESERVED or flags & cat.VERSION_MASK != cat.VERSION \
                or size > MAX_PAYLOAD_SIZE or direction not in (0, 1):
            return None
        if channel == Channel.MAIN and (is_reply and request in DEVICE_TELLING_REPLIES and context.device_type is None
                                        or not is_reply and request in cat.CONTEXT_RULES):
            return None                        # the tracker follows what these negotiate
        if channel > Channel.DEVICE_STATE:
            return None
        kind = None
        candidates = payload_candidates(Channel(channel), request, is_reply, context)
        if size < _CONFIG_HEAD.size:
            # A config window needs its 12-byte head: an 8-byte GET_CONFIG/SET_CONFIG reply is a REPLY_ACK.
            candidates = tuple(candidate for candidate in candidates if candidate != "config")
        if candidates[:1] == ("config",):
            config = _config_summary(context, channel == Channel.MAIN and
                                     config_space.carries_config_space(request, is_reply))
            return self._head(context, channel, direction, request, flags), config
        for candidate in candidates:
            fixed = FIXED_SIZE[candidate]
            if fixed is None:
                return None                    # a variable layout might fit: only the decoder knows
            if fixed == size:
                kind = candidate
                break
        if kind is None:
            return None
        if (kind, context_id) not in self.summaries:
            self.summaries[kind, context_id] = compile_payload_summary(kind, context)
        summary = self.summaries[kind, context_id]
        if summary is None:
            return None
        head = self._head(context, channel, direction, request, flags)
        return (head.rstrip(), summary) if summary is _NO_SUMMARY else (head, summary)

    @staticmethod
    def _head(context, channel: int, direction: int, request: int, flags: int) -> str:
        """What a line says before the payload: direction, name, flags."""
        name = request_name(Channel(channel), request, context.profile) + (" reply" if flags & cat.FLAG_REPLY else "")
        return f"{Direction(direction).arrow} {name:<28} {flag_text(flags):<16} "


def fast_lines(path: str, tracker, out, colour: bool = False, follow: int | None = None, count: int = 0,
               source: Source | None = None, display_filter: DisplayFilter | None = None, verbose: bool = False,
               hex_dump: bool = False) -> tuple[int, int]:
    """One summary line per record the display filter lets through, with its field tree (-V) and hex dump (-x)
    when asked; returns (records shown, event records the filter hid). Raises CaptureError like read_capture.
    `source` (capture.progress) gives what to read instead of the path, each time from the start."""
    detail = verbose or hex_dump
    cache: dict = {}
    # connection -> what of its negotiated context changes decoding; only decoding (on a miss) changes it.
    context_keys: dict[int, tuple] = {}
    shapes = _Shapes(tracker, with_fields=display_filter is not None, with_tree=verbose)
    shapes.display_filter = display_filter
    formats, by_connection, base, where = shapes.formats, shapes.by_connection, shapes.base, shapes.where
    matches = display_filter.matches_fields if display_filter is not None else None
    unpack_connection = _CONNECTION.unpack_from
    unpack_plain = _PLAIN.unpack_from
    number = shown = done = hidden = 0     # done: records fully handled here, should the full reader take over
    first_time = None
    lines: list[str] = []
    try:
        for timestamp, packet in scan(source() if source else path, shapes.sources):
            number += 1
            if first_time is None:
                first_time = timestamp
            if not colour and len(packet) >= _PLAIN_SIZE:
                (magic, version, header_length, connection, kind, channel, direction, pseudo_flags, fd_count,
                 note_length, _event, request, flags, size) = unpack_plain(packet)
                if magic == b"VHUS" and version == 2 and header_length == 24 and not (
                        kind or pseudo_flags or fd_count or note_length) and len(packet) == _PLAIN_SIZE + size:
                    shape_key = (by_connection.get(connection, base), channel, direction, request, flags, size)
                    shape = formats.get(shape_key)
                    if shape is None:
                        shape = formats[shape_key] = _checked(shapes, shape_key, packet, timestamp) or _GENERAL
                    summary = shape[1](packet, _PLAIN_SIZE) if shape else None
                    tree = shape[3][1](packet, _PLAIN_SIZE) if verbose and summary is not None else ""
                    if summary is not None and tree is not None:
                        done = number
                        if follow is not None and connection != follow:
                            continue
                        if matches is not None:
                            verdict = shape[2].constant
                            if verdict is None:
                                verdict = matches(shape[2].getter(packet, number, connection))
                            if not verdict:
                                continue
                        # a summary never ends in blanks, and a shape without one has its head stripped
                        lines.append(f"{number:>5} {(timestamp - first_time) / 1e9:10.6f} {where(connection, channel)} "
                                     f"{shape[0]}{summary}\n")
                        if detail:
                            if verbose:
                                lines.append(shape[3][0] + tree + shapes.source_line(packet))
                            if hex_dump:
                                lines.append("\n".join(hexdump(packet[_PLAIN_SIZE - 12:])) + "\n\n")
                        shown += 1
                        if len(lines) >= 4096:
                            out.writelines(lines)
                            lines.clear()
                        if count and shown >= count:
                            break
                        continue
            connection = unpack_connection(packet, 8)[0] if len(packet) >= 12 else 0
            key = (packet, context_keys.get(connection))
            entry = cache.get(key) if display_filter is None and not detail else None
            if entry is None:
                try:
                    record = parse_pseudo_header(packet, timestamp, 0)
                except ValueError:
                    raise Unusual from None
                record.source = shapes.source()
                message = tracker.decode(record)
                shapes.follow(record.connection)
                context = tracker.context_for(record.connection)
                context_keys[record.connection] = (context.features, context.protocol_features,
                                                   context.device_type)
                if display_filter is not None or detail:
                    done = number
                    if follow is not None and connection != follow:
                        continue
                    if display_filter is not None and not display_filter.matches(message, record, number):
                        hidden += record.kind == RecordKind.EVENT
                        continue
                    lines.append(f"{record_line(number, (timestamp - first_time) / 1e9, record, message, colour)}\n"
                                 f"{record_detail(record, message, verbose, hex_dump)}")
                    shown += 1
                    if len(lines) >= 4096:
                        out.writelines(lines)
                        lines.clear()
                    if count and shown >= count:
                        break
                    continue
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
    except Unusual:
        out.writelines(lines)
        lines.clear()
        # Hand over at the same record: the full reader shows the rest, or says exactly what is wrong where.
        for number, relative, record, message in general_messages(path, tracker, skip=done, source=source):
            if follow is not None and record.connection != follow:
                continue
            if display_filter is not None and not display_filter.matches(message, record, number):
                hidden += record.kind == RecordKind.EVENT
                continue
            lines.append(record_line(number, relative, record, message, colour) + "\n" +
                         record_detail(record, message, verbose, hex_dump))
            shown += 1
            if count and shown >= count:
                break
    finally:
        out.writelines(lines)
    return shown, hidden


_GENERAL: tuple = ()       # a shape the general path words


def _checked(shapes: _Shapes, key: tuple, packet: bytes, timestamp: int) -> tuple | None:
    """A shape's (head, summary function, fields, field tree function) once its first message reads the same
    both ways; else None. Fields and tree are made only when the read wants them (a filter, -V)."""
    entry = shapes.shape(key)
    if entry is None:
        return None
    try:
        record = parse_pseudo_header(packet, timestamp, 0)
    except ValueError:
        return None
    record.source = shapes.source()
    context = shapes.contexts[key[0]]
    message = decode(record.data, record.channel, context)
    general = record_line(0, 0.0, record, message)
    summary = entry[1](packet, _PLAIN_SIZE)
    if summary is None:
        return None                  # this message's bytes do not fit the layout: the general path words it
    compiled = f"{0:>5} {0.0:10.6f} {shapes.where(record.connection, key[1])} {entry[0]}{summary}"
    if compiled != general:
        return None
    fields = tree = None
    if shapes.with_fields:
        fields = _ShapeFields(message, record, context)
        if not fields.agrees(packet, message, record):
            return None
        if shapes.display_filter is not None:
            fields.constant = fields.verdict(shapes.display_filter)
    if shapes.with_tree:
        lines = field_tree(message)
        head = 1 + (1 if message.kind else 0) + len(_HEADER_FIELDS)
        payload_tree: Callable[[bytes, int], str | None] | None
        if message.kind == "config":
            payload_tree = _config_tree(context, carries_config_space(message))
        else:
            payload_tree = compile_field_tree(message.kind, context) if message.kind else None
        if payload_tree is None:
            return None
        top = "\n".join(lines[:head]) + "\n"
        if top + (payload_tree(packet, _PLAIN_SIZE) or "") != "\n".join(lines) + "\n":
            return None
        tree = (top, payload_tree)
    return (*entry, fields, tree)


class _PerMessage(Exception):
    """A filter asked for a field that differs from message to message of a shape."""


class _ShapeFields:
    """What a display filter reads of a plain message of one shape: the record's fields and the header's are the
    shape's own; the payload is unpacked when the filter first names a field of it, and only the fields named
    are made (compiled from the grammar's layout; a layout without one is decoded whole)."""

    def __init__(self, message, record, context) -> None:
        self.context = context
        self.channel = record.channel
        self.records = {name: spec.value(message, record, 0) for name, spec in RECORD_FIELDS.items()
                        if spec.value is not None and name not in _PER_RECORD}
        header = field_values(message)
        self.header = {name: header[name] for name in _HEADER_FIELDS if name in header}
        self.layout = PayloadLayout.of(message.kind) if message.kind in COMPILED_KINDS else None
        self.constant: bool | None = None      # the filter's verdict for the whole shape, when it has one
        # Without a layout the payload is decoded whole, but only for a name it may have (config.*, gpu.*, ...).
        prefix = PAYLOADS[message.kind][1] if message.kind else ""
        self.namespace = prefix + "." if prefix else ""

    def payload_fields(self, packet: bytes) -> dict[str, list]:
        """Every payload field of one message (for a group name, and to check a shape's first message)."""
        if self.layout is not None:
            return self.layout.fields(packet, _PLAIN_SIZE)
        fields = field_values(decode(packet[24:], self.channel, self.context))
        return {name: values for name, values in fields.items() if name not in self.header}

    def agrees(self, packet: bytes, message, record) -> bool:
        """Whether this message's fields read here as the general path reads them (the shape's first one)."""
        general = field_values(message)
        mine = {**self.header, **self.payload_fields(packet)}
        return mine == general and all(spec.value is not None and spec.value(message, record, 0) == self.records[name]
                                       for name, spec in RECORD_FIELDS.items() if name in self.records)

    def verdict(self, display_filter: DisplayFilter) -> bool | None:
        """The filter's verdict on every message of this shape when it reads only the shape's own fields
        (`request == SET_VRING_ADDR && ...` on any other request); None when it depends on the message."""
        records, header = self.records, self.header

        def get(name: str):
            found = records.get(name)
            if found is None:
                found = header.get(name)
            if found is not None:
                return found
            if name is DEVICE_TYPE_FIELD:
                return self.context.device_type
            raise _PerMessage
        try:
            return display_filter.matches_fields(get)
        except _PerMessage:
            return None

    def getter(self, packet: bytes, number: int, connection: int) -> Callable[[str], Any]:
        records, header, layout = self.records, self.header, self.layout
        values: tuple | None = None
        everything: dict[str, list] | None = None

        def get(name: str):
            nonlocal values, everything
            found = records.get(name)
            if found is not None:
                return found
            if name == "connection":
                return [connection]
            if name == "frame.number":
                return [number]
            if name == "source_tag":
                tag = int.from_bytes(packet[21:24], "little")
                return [tag] if tag else []
            if name is DEVICE_TYPE_FIELD:
                return self.context.device_type
            found = header.get(name)
            if found is not None:
                return found
            if layout is not None and not name.endswith("."):
                if values is None:
                    values = layout.unpack(packet, _PLAIN_SIZE)
                return layout.field(values, name)
            if everything is None:
                if not name.endswith(".") and not name.startswith(self.namespace):
                    return []
                everything = {**header, **self.payload_fields(packet)}
            if name.endswith("."):
                return [v for field, found in everything.items() if field.startswith(name) for v in found]
            return everything.get(name, [])
        return get


_PER_RECORD = frozenset({"connection", "frame.number", "source_tag"})
_HEADER_FIELDS = ("request", "flags", *(f"flags.{bit}" for bit in cat.BITFIELDS["flags"]), "size")


class PayloadLayout:
    """A fixed payload kind's fields by dotted name (as filters.field_values has them) straight from its bytes:
    one struct for the whole payload, and per name where its value is (and, for a bit field, its mask)."""

    _known: dict[str, PayloadLayout | None] = {}

    def __init__(self, kind: str, entries: list, layout: list[str]) -> None:
        self.kind = kind
        self.entries, self.codes = entries, layout     # as _field_leaves gives them (compile_field_tree reads them)
        self.unpack = struct.Struct("<" + "".join(layout)).unpack_from
        # name -> (index in the unpacked tuple, bytes read as a little-endian integer, mask, shift)
        self.places: dict[str, tuple[int, bool, int, int]] = {}
        for name, index, integer_bytes, bits in entries:
            self.places[name] = (index, integer_bytes, -1, 0)
            for bit_name, mask, shift in bits:
                self.places[bit_name] = (index, integer_bytes, mask, shift)

    @classmethod
    def of(cls, kind: str) -> PayloadLayout | None:
        """The layout of a kind (None when it has no struct layout), made once."""
        if kind not in cls._known:
            structure, prefix, _doc = PAYLOADS[kind]
            entries: list[tuple[str, int, bool, tuple]] = []
            layout: list[str] = []
            cls._known[kind] = cls(kind, entries, layout) if _field_leaves(structure, prefix, kind, entries,
                                                                           layout) else None
        return cls._known[kind]

    def field(self, values: tuple, name: str) -> list:
        place = self.places.get(name)
        if place is None:
            return []
        index, integer_bytes, mask, shift = place
        value = values[index]
        if integer_bytes:
            value = int.from_bytes(value, "little")
        return [value if mask == -1 else (value & mask) >> shift]

    def fields(self, packet: bytes, offset: int) -> dict[str, list]:
        values = self.unpack(packet, offset)
        return {name: self.field(values, name) for name in self.places}


def compile_field_tree(kind: str, context) -> Callable[[bytes, int], str] | None:
    """A function (packet, payload offset) -> the payload's lines of present.field_tree (-V), each ending in a
    newline, for a fixed `kind` read in `context`; None when the kind has no struct layout."""
    payload = PayloadLayout.of(kind) if kind in COMPILED_KINDS else None
    if payload is None:
        return None
    entries, layout = payload.entries, payload.codes
    if not entries:
        return lambda packet, offset: ""
    helpers: dict = {"_unpack": payload.unpack, "_text": value_text, "_shown": _Shown(context),
                     "_from_bytes": int.from_bytes}
    variables = [f"v{index}" for index in range(len(layout))]
    body = [f"    {', '.join(variables)}{',' if len(variables) == 1 else ''} = _unpack(packet, offset)"]
    lines = []
    for dotted, index, integer_bytes, bits in entries:
        variable = f"v{index}"
        if integer_bytes:
            body.append(f"    {variable} = _from_bytes({variable}, 'little')")
        short = dotted.rsplit(".", 1)[-1]
        indent = "  " + "  " * dotted.count(".")
        if layout[index].endswith("s") and not integer_bytes or short in NAMED_BIT_FIELDS:
            lines.append(f"{indent}{dotted}: {{_text(_shown, {short!r}, {variable})}}")
        else:
            lines.append(f"{indent}{dotted}: {{hex({variable}) if {variable} > 65535 else {variable}}}")
        for bit_name, mask, shift in bits:
            bit = f"(({variable} & {mask}) >> {shift})"
            lines.append(f"{'  ' + '  ' * bit_name.count('.')}{bit_name}: {{hex({bit}) if {bit} > 65535 else {bit}}}")
    body.append("    return f" + repr("\n".join(lines) + "\n"))
    source = "def tree(packet, offset):\n" + "\n".join(body) + "\n"
    exec(compile(source, f"<field tree of {kind}>", "exec"), helpers)      # noqa: S102 -- made from the grammar
    return helpers["tree"]


def _field_leaves(structure, prefix: str, kind_key: str, entries: list, layout: list[str]) -> bool:
    """(dotted name, index, bytes read as an integer, bit fields) of each field in wire order, and its struct code."""
    from construct import BytesInteger, FormatField, Renamed, Struct
    for sub in structure.subcons:
        inner = sub
        while isinstance(inner, Renamed):
            inner = inner.subcon
        dotted = f"{prefix}.{sub.name}" if prefix else str(sub.name)
        if isinstance(inner, Struct):
            if not _field_leaves(inner, dotted, "region_xen" if inner is REGION_XEN else "region", entries,
                                 layout):
                return False
            continue
        if isinstance(inner, FormatField) and inner.fmtstr[0] == "<":
            layout.append(inner.fmtstr[1:])
            integer_bytes = False
        elif isinstance(inner, BytesInteger) and isinstance(inner.length, int) and inner.swapped \
                and not inner.signed:
            layout.append(f"{inner.length}s")
            integer_bytes = True
        elif type(inner).__name__ == "Bytes" and isinstance(getattr(inner, "length", None), int):
            layout.append(f"{inner.length}s")
            integer_bytes = False
        else:
            return False
        if sub.name is None:
            continue
        bits = tuple((f"{dotted}.{bit}", mask, (mask & -mask).bit_length() - 1)
                     for bit, mask in cat.BITFIELDS.get(f"{kind_key}.{sub.name}", {}).items())
        entries.append((dotted, len(layout) - 1, integer_bytes, bits))
    return True
