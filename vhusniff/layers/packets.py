"""Scapy layers derived from the construct grammar: one header layer per channel, one payload layer per kind.

Nothing here declares a wire field: every payload layer's fields_desc is generated from `protocol.PAYLOADS`,
so a field added to the grammar appears in the layer with no second edit. The payload class of a message is
chosen by the same decoder the rest of vhusniff uses, so the scapy view and the grammar always agree; a payload
that fits no layout stays Raw (exact bytes), and `problems()` says what is wrong.
"""
from __future__ import annotations

import re
import struct

from construct import Array, Bytes, BytesInteger, FormatField, GreedyBytes, Renamed, Struct
from scapy.config import conf
from scapy.fields import (
    ByteEnumField,
    ByteField,
    ConditionalField,
    Field,
    FieldLenField,
    FieldListField,
    FlagsField,
    LEIntField,
    LELongField,
    LEShortField,
    LESignedLongField,
    PacketField,
    PacketListField,
    StrField,
    StrFixedLenField,
    StrLenField,
    XLE3BytesField,
)
from scapy.packet import Packet, Raw

from ..capture.pcapng import FD_KINDS, LINKTYPE_USER0, PSEUDO_MAGIC, PSEUDO_VERSION
from ..dataplane.sample import SAMPLE_FIELDS, SAMPLE_VERSION, Layout, Reason, SampleFlag
from ..model import Channel, Direction, EventKind, RecordKind
from ..protocol import catalogue as cat
from ..protocol import config as config_space
from ..protocol.grammar import DEFAULT_CONTEXT, HEADER_SIZE, PAYLOADS, DecodeContext, decode, flag_text

__all__ = ["VhostUser", "VhostUserBackend", "VhostUserGpu", "VhusniffRecord", "VhusniffRingSample", "PAYLOAD_LAYERS",
           "header_class_for"]


class LEUnsignedField(Field):
    """An unsigned little-endian integer of any byte width (construct's BytesInteger(n, swapped=True))."""
    __slots__ = ["width"]

    def __init__(self, name, default, width):
        self.width = width
        Field.__init__(self, name, default, f"{width}s")

    def addfield(self, pkt, s, val):
        return s + int(self.i2m(pkt, val) or 0).to_bytes(self.width, "little")

    def getfield(self, pkt, s):
        return s[self.width:], int.from_bytes(s[:self.width], "little")

    def randval(self):
        from scapy.volatile import RandNum
        return RandNum(0, (1 << (8 * self.width)) - 1)


class BitNamesField(LELongField):
    """A u64 of feature or status bits, shown by bit name (unknown bits by number)."""
    __slots__ = ["names_for"]

    def __init__(self, name, default, names_for):
        self.names_for = names_for
        LELongField.__init__(self, name, default)

    def i2repr(self, pkt, x):
        if x is None:
            return "None"
        return f"{x:#x} ({cat.bit_names(x, self.names_for(pkt))})"


def _context_of(pkt) -> DecodeContext:
    while pkt is not None:
        ctx = getattr(pkt, "vhost_context", None)
        if ctx is not None:
            return ctx
        pkt = pkt.underlayer
    return DEFAULT_CONTEXT


def _bit_names_for(name: str):
    """The bit names of a field as the catalogue gives them for the packet's session (device type, profile)."""
    def names(pkt):
        ctx = _context_of(pkt)
        return cat.bit_table(name, ctx.device_type, ctx.profile)
    return names


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


_element_classes: dict[int, type] = {}


def _element_class(structure: Struct, name: str) -> type:
    """A scapy class for a nested struct (a memory region), made once per construct Struct."""
    cls = _element_classes.get(id(structure))
    if cls is None:
        cls = type(f"VhostUser{_camel(name)}", (Packet,), {
            "name": f"vhost-user {name.replace('_', ' ')}",
            "fields_desc": _fields_of(structure),
            # Without this the first element of a list swallows the rest of the bytes.
            "extract_padding": lambda self, s: (b"", s),
        })
        _element_classes[id(structure)] = cls
    return cls


def _sibling_name(expression) -> str:
    """`this.nregions` (construct renders it `this['nregions']`) -> `nregions`."""
    return re.findall(r"[A-Za-z_]\w*", str(expression))[-1]


def _field_for(subcon) -> Field:
    """Translate one construct field into the scapy field with the same wire format."""
    name = subcon.name
    inner = subcon.subcon if isinstance(subcon, Renamed) else subcon
    while isinstance(inner, Renamed):
        inner = inner.subcon
    if isinstance(inner, FormatField):
        fmt = inner.fmtstr
        if fmt == "<Q" and cat.bit_table(name):
            return BitNamesField(name, 0, _bit_names_for(name))
        return {"<B": ByteField, "B": ByteField, "<H": LEShortField, "<L": LEIntField, "<Q": LELongField}[fmt](name, 0)
    if isinstance(inner, BytesInteger):
        return LEUnsignedField(name, 0, inner.length)
    if isinstance(inner, Bytes):
        if isinstance(inner.length, int):
            return StrFixedLenField(name, b"\0" * inner.length, length=inner.length)
        # Bytes(this.size): the length is a sibling field of the same name (config.size).
        length_field = _sibling_name(inner.length)
        return StrLenField(name, b"", length_from=lambda pkt: getattr(pkt, length_field))
    if inner is GreedyBytes:
        return StrField(name, b"")
    if isinstance(inner, Struct):
        element = _element_class(inner, name)
        return PacketField(name, element(), element)
    if isinstance(inner, Array):
        count = inner.count
        if isinstance(inner.subcon, Struct):
            element = _element_class(inner.subcon, name)
            count_field = _sibling_name(count)
            return PacketListField(name, [], element, count_from=lambda pkt: getattr(pkt, count_field))
        # scapy annotates the default as a list of fields; it is a list of values
        return FieldListField(name, [0] * count,  # type: ignore[list-item]
                              _field_for(Renamed(inner.subcon, newname="size")),
                              count_from=lambda pkt: count, max_count=count)
    raise TypeError(f"no scapy field for construct {inner!r} ({name})")


def _fields_of(structure: Struct) -> list[Field]:
    return [_field_for(sub) for sub in structure.subcons if sub.name is not None]


class _ConfigDataField(StrLenField):
    """config.data: the window's bytes, shown with the device config space fields it covers."""

    def i2repr(self, pkt, x):
        text = super().i2repr(pkt, x)
        fields = pkt.device_config() if isinstance(pkt, ConfigSpaceView) else {}
        if fields:
            text += " (" + " ".join(f"{name}={config_space.value_text(name, value)}"
                                    for name, value in fields.items()) + ")"
        return text


class ConfigSpaceView(Packet):
    """What the config payload layer adds: the device config space fields of its window (protocol/config.py), read
    and set by short name (`capacity`, `geometry.heads`) for the device type of the session (`vhost_context`)."""

    def _config_device(self) -> str | None:
        header = getattr(self, "underlayer", None)
        if not isinstance(header, _VhostUserHeader) or header.channel != Channel.MAIN or header.flags is None:
            return None
        if not config_space.carries_config_space(header.request, bool(header.flags & cat.FLAG_REPLY)):
            return None
        return _context_of(self).device_type

    def device_config(self) -> dict[str, int | bytes]:
        """The fields the window {offset, data} covers whole; empty for an unknown device or a GET_CONFIG request."""
        offset, data = self.offset, bytes(self.getfieldval("data") or b"")
        return {field.short: config_space.field_value(field, offset, data)
                for field in config_space.covered(self._config_device(), offset, len(data))}

    def set_device_config(self, values: dict[str, int | bytes] | None = None, **more: int | bytes) -> None:
        """Set fields inside the window (the data's length and the other bytes stay as they are)."""
        device = self._config_device()
        if device is None:
            raise ValueError("the device type of this session is not known, or this message carries no config space")
        data = config_space.patch_space(device, self.offset, bytes(self.getfieldval("data") or b""),
                                        {**(values or {}), **more})
        self.setfieldval("data", data)


def _payload_class(kind: str) -> type:
    structure, prefix, doc = PAYLOADS[kind]
    fields = _fields_of(structure)
    bases: tuple[type, ...] = (Packet,)
    if kind == "config":
        # config.data is Bytes(this.size): the same field, shown with the fields of the window
        fields = [_ConfigDataField("data", b"", length_from=lambda pkt: pkt.size) if f.name == "data" else f
                  for f in fields]
        bases = (ConfigSpaceView,)
    return type(f"VhostUser{_camel(kind)}", bases, {
        "name": f"vhost-user {doc}",
        "fields_desc": fields,
        "vhost_kind": kind,
        "extract_padding": lambda self, s: (b"", s),
    })


PAYLOAD_LAYERS: dict[str, type] = {kind: _payload_class(kind) for kind in PAYLOADS}


class _FlagsField(LEIntField):
    def i2repr(self, pkt, x):
        return "None" if x is None else flag_text(x)


class _VhostUserHeader(Packet):
    """The 12-byte header; subclasses fix the channel (which request numbering applies)."""
    channel = Channel.MAIN
    vhost_context: DecodeContext | None = None
    fields_desc = []  # set per subclass, with that channel's request names

    def __init__(self, _pkt=None, *args, **kwargs):
        # scapy's own default is b"", which would make VhostUser(b"") a fresh default header; the sentinel keeps
        # "no bytes given" (build one from fields) apart from "zero bytes given" (a truncated message).
        super().__init__(b"" if _pkt is None else _pkt, *args, **kwargs)
        if _pkt is not None and not _pkt:
            self._keep_truncated(b"")

    def do_dissect(self, s):
        if len(s) < HEADER_SIZE:
            self._keep_truncated(bytes(s))
            return b""
        return super().do_dissect(s)

    def _keep_truncated(self, data: bytes) -> None:
        """Fewer bytes than a header: no field has a value, and building gives back exactly these bytes
        (until a field is set, which builds a whole header from the fields)."""
        self.fields.update(request=None, flags=None, size=None)
        self.raw_packet_cache, self.raw_packet_cache_fields, self.explicit = data, {}, 1

    def post_build(self, pkt, pay):
        if self.size is None:
            pkt = pkt[:8] + struct.pack("<I", len(pay)) + pkt[12:]
        return pkt + pay

    def guess_payload_class(self, payload):
        message = decode(bytes(self.original[:HEADER_SIZE]) + payload if self.original else
                         struct.pack("<III", self.request, self.flags, len(payload)) + payload,
                         self.channel, self.vhost_context or DEFAULT_CONTEXT)
        if message.kind is None:
            return Raw
        return PAYLOAD_LAYERS[message.kind]

    def extract_padding(self, s):
        # The payload is exactly `size` bytes; anything after belongs to the next message.
        return s[:self.size], s[self.size:]

    def problems(self):
        """What the grammar finds wrong with this message (empty for a well-formed one)."""
        return decode(bytes(self), self.channel, self.vhost_context or DEFAULT_CONTEXT).problems

    def message(self):
        return decode(bytes(self), self.channel, self.vhost_context or DEFAULT_CONTEXT)

    def mysummary(self):
        return "vhost-user " + self.message().summary()


def _header_fields(names, channel: Channel = Channel.MAIN):
    """request, flags (by default what a request of the channel carries: version 1, or 0 on the GPU socket), size."""
    from scapy.fields import LEIntEnumField
    return [LEIntEnumField("request", 1, dict(names)), _FlagsField("flags", cat.HEADER_RULES[channel].version),
            LEIntField("size", None)]


class VhostUser(_VhostUserHeader):
    """A message on the main vhost-user socket (front-end requests, back-end replies)."""
    name = "vhost-user"
    channel = Channel.MAIN
    fields_desc = _header_fields(cat.SPEC_PROFILE.frontend_names)


class VhostUserBackend(_VhostUserHeader):
    """A message on the back-end request channel (back-end requests, front-end replies)."""
    name = "vhost-user back-end channel"
    channel = Channel.BACKEND
    fields_desc = _header_fields(cat.SPEC_PROFILE.backend_names)


class VhostUserGpu(_VhostUserHeader):
    """A message on the vhost-user-gpu socket."""
    name = "vhost-user-gpu"
    channel = Channel.GPU
    fields_desc = _header_fields(cat.SPEC_PROFILE.gpu_names, Channel.GPU)


_HEADER_CLASSES = {Channel.MAIN: VhostUser, Channel.BACKEND: VhostUserBackend, Channel.GPU: VhostUserGpu}


def header_class_for(channel: Channel) -> type:
    return _HEADER_CLASSES.get(channel, VhostUser)


# ---- the capture record: vhusniff's pseudo-header on LINKTYPE_USER0, then the message layer of its channel ----

_HEADERED_CHANNELS = (Channel.MAIN, Channel.BACKEND, Channel.GPU)
_VERSIONS = (1, PSEUDO_VERSION)         # the layouts these fields describe

class VhusniffFd(Packet):
    name = "vhusniff fd description"
    fields_desc = [
        ByteEnumField("kind", 0, dict(enumerate(FD_KINDS))),
        FieldLenField("name_length", None, length_of="fd_name", fmt="B"),
        LEShortField("seals", 0),
        LEIntField("reserved", 0),
        LELongField("inode", 0),
        LESignedLongField("size", -1),
        StrLenField("fd_name", b"", length_from=lambda pkt: pkt.name_length),
    ]

    def extract_padding(self, s):
        return b"", s

def _ring_sample_field(name: str, code: str) -> Field:
    enums = {"layout": {int(k): k.name for k in Layout}, "reason": {int(k): k.name for k in Reason}}
    if name in enums:
        return ByteEnumField(name, 0, enums[name])
    if name == "flags":
        return FlagsField(name, 0, 8, [flag.name or "" for flag in SampleFlag])
    if name == "version":
        return ByteField(name, SAMPLE_VERSION)
    return {"B": ByteField, "H": LEShortField, "I": LEIntField}[code](name, 0)


class VhusniffRingSample(Packet):
    """A RING event's data (`--rings`): one ring sample, its fields those of dataplane.sample (the layout declared
    there), then the requests in flight as text, one line each."""
    name = "vhusniff ring sample"
    fields_desc = [*(_ring_sample_field(name, code) for name, code, _filter in SAMPLE_FIELDS),
                   StrField("pending", b"")]

    def mysummary(self):
        return self.sprintf("ring %ring% %reason%: avail %avail_idx% used %used_idx% in flight %in_flight%")


class VhusniffRecord(Packet):
    name = "vhusniff record"
    fields_desc = [
        StrFixedLenField("magic", PSEUDO_MAGIC, 4),
        LEShortField("version", PSEUDO_VERSION),
        LEShortField("header_length", None),
        LEIntField("connection", 1),
        ByteEnumField("kind", 0, {int(k): k.name.lower() for k in RecordKind}),
        ByteEnumField("channel", 0, {int(c): c.name.lower() for c in Channel}),
        ByteEnumField("direction", 0, {int(d): d.arrow for d in Direction}),
        ByteField("flags", 0),
        FieldLenField("fd_count", None, count_of="fds", fmt="<H"),
        FieldLenField("note_length", None, length_of="note", fmt="<H"),
        # Version 2 adds the event kind (version 1 said it only in the note), then the capture's source tag
        # (capture.pcapng.source_tag; 0 in captures that do not tag their source): with `connection`, what keys a
        # merged capture's connections when the interface's source is not at hand (scapy's rdpcap keeps none).
        ConditionalField(ByteEnumField("event", 0, {int(k): k.name for k in EventKind}),
                         lambda pkt: pkt.version >= 2),
        ConditionalField(XLE3BytesField("source_tag", 0), lambda pkt: pkt.version >= 2),
        PacketListField("fds", [], VhusniffFd, count_from=lambda pkt: pkt.fd_count),
        StrLenField("note", b"", length_from=lambda pkt: pkt.note_length),
    ]

    def post_build(self, pkt, pay):
        if self.header_length is None:
            pkt = pkt[:6] + len(pkt).to_bytes(2, "little") + pkt[8:]
        return pkt + pay

    def guess_payload_class(self, payload):
        if self.kind == RecordKind.EVENT and self.version >= 2 and self.event == EventKind.RING:
            return VhusniffRingSample
        if self.kind != RecordKind.MESSAGE or self.version not in _VERSIONS or len(payload) < HEADER_SIZE \
                or self.channel not in _HEADERED_CHANNELS:
            return Raw             # events, and the device-state pipe's opaque stream, have no vhost-user header
        return header_class_for(Channel(self.channel))

    def mysummary(self):
        return self.sprintf("vhusniff c%connection% %direction%")



def register() -> None:
    """Bind the capture record layer to link type 147 in scapy (idempotent: rebinding the same class)."""
    conf.l2types.register(LINKTYPE_USER0, VhusniffRecord)


register()
