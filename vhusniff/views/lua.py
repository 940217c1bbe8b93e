"""The Wireshark dissector, generated from the grammar: `python3 -m vhusniff.views.lua > dissectors/vhost_user.lua`.

The output is data tables (request names, payload candidates, layouts with how `read` summarises each field, bit
fields, feature names, record fields, expert items), all derived from the grammar, the catalogue (with each
field's human label, catalogue.field_label), capture.pcapng, expert.py (the expert items' severities) and
filters.RECORD_FIELDS, followed by the fixed Lua body below (LUA_BODY). Nothing in the Lua declares a field by
hand: each ProtoField is made once from the FIELDS table, labelled for the tree and named for filters.

Per packet the body reads integers from one raw string, builds the tree only when Wireshark passes one, keeps
the per-capture state in flat maps (a connection's context as a short change history) and gathers the Info
column (`vhusniff read`'s line) in a reused buffer: no table or string is built per field. benchmarks/bench_lua.py
measures it. tests/test_dissector.py fails when the checked-in file differs from this output, cross-checks every
field against `protocol.iter_fields` and the Info column against `vhusniff read` with real tshark, and checks the
expert items' severities against the expert checks; tests/test_wireshark_gui.py opens it in the Wireshark GUI.
"""
from __future__ import annotations

import os
import sys

from ..analysis.expert import CHECKS, PROBLEM_CHECKS
from ..capture.compat import V1_DEVICE_MARK, V1_EVENT_RULES
from ..capture.pcapng import (
    FD_KINDS,
    LINKTYPE_USER0,
    PSEUDO_FLAG_UNFRAMED,
    PSEUDO_HEADER,
    PSEUDO_HEADER_V1,
    PSEUDO_MAGIC,
    PSEUDO_VERSION,
    SOURCE_PREFIX,
)
from ..dataplane.sample import NO_BASE, RING_SAMPLE, SAMPLE_VERSION, Layout, Reason, sample_offsets
from ..model import Channel, Direction, EventKind, RecordKind
from ..protocol import catalogue as cat
from ..protocol import config as config_space
from ..protocol.grammar import (
    FIXED_SIZE,
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    PAYLOADS,
    QUIET_FIELDS,
    REGION,
    REGION_XEN,
    SHORT_NAMES,
    DecodeContext,
    payload_candidates,
    request_name,
    request_names,
)
from .fast import NAMED_BIT_FIELDS
from .filters import RECORD_FIELDS, grammar_fields, walk_layout

XEN_MMAP_BIT = cat.bit_number("protocol_features", "XEN_MMAP")
RING_PACKED_BIT = next(bit for bit, name in cat.TRANSPORT_FEATURES.items() if name == "RING_PACKED")

_REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DISSECTOR_PATH = os.path.join(_REPOSITORY, "dissectors", "vhost_user.lua")

_FT_BY_WIDTH = {0: "bytes", 1: "uint8", 2: "uint16", 4: "uint32", 6: "uint64", 8: "uint64"}
# Problems of protocol.decode, as Wireshark expert items: code -> Wireshark expert group. Each item's severity
# is the one of the expert check the problem raises (expert.PROBLEM_CHECKS -> expert.CHECKS), see expert_items().
EXPERT_GROUPS = {
    "truncated-header": "MALFORMED",
    "reserved-flags": "PROTOCOL",
    "bad-version": "PROTOCOL",
    "oversize": "PROTOCOL",
    "size-mismatch": "MALFORMED",
    "unknown-request": "UNDECODED",
    "payload-layout": "MALFORMED",
}
# Not a decoder problem: a record whose pseudo-header vhusniff cannot read (read_capture stops there).
CAPTURE_EXPERT_ITEM = ("MALFORMED", "ERROR")
# Not a decoder problem either: a connection that connects while open, in tshark not told about capture sources
# (a merged capture, whose connection numbers restart in each source).
MERGED_EXPERT_ITEM = ("SEQUENCE", "WARN")


def expert_items() -> dict[str, tuple[str, str]]:
    """code -> (Wireshark group, Wireshark severity) for every expert item of the dissector."""
    items = {code: (EXPERT_GROUPS[code], CHECKS[check].severity.name) for code, check in PROBLEM_CHECKS.items()}
    items["capture"] = CAPTURE_EXPERT_ITEM
    items["merged-capture"] = MERGED_EXPERT_ITEM
    return items


def _lua_layout(entries: list[dict], kind: str = "") -> list[dict]:
    """Layout entries as the Lua body walks them (nested element fields live in ELEMENTS, docs in FIELDS).

    A top-level entry of a payload kind also says how `vhusniff read`'s summary shows it (grammar.payload_summary):
    `prefix` (" idx="), or nothing for a quiet field, and `style` where the value is not a plain number."""
    layout = []
    for entry in entries:
        lua_entry = {key: value for key, value in entry.items() if key not in ("fields", "doc")}
        short = entry["short"]
        if "element" in entry:
            lua_entry["label"] = cat.field_label(entry["name"])
        if kind and short not in QUIET_FIELDS:
            lua_entry["prefix"] = f" {SHORT_NAMES.get(short, short)}="
            if short in NAMED_BIT_FIELDS:      # its set bits by name (FEATURE_NAMES is per device type)
                lua_entry["style"] = short
            elif short == "flags" and kind in ("vring_fd", "vring_area"):
                lua_entry["style"] = "nofd"
            elif short == "memory_sizes":
                lua_entry["style"] = "sizes"
            elif short == "data" and kind == "config":
                lua_entry["style"] = "config_data"
            elif short == "region":
                lua_entry["style"] = "region"
            elif short == "mac":
                lua_entry["style"] = "mac"
        layout.append(lua_entry)
    return layout


def _candidates() -> dict[int, dict[int, list[list[list[str]]]]]:
    """channel -> request -> [request, reply] -> [context 0..3] -> payload kinds, most likely first. The context
    index is 1 * (Xen mmap negotiated) + 2 * (packed rings negotiated), as the Lua keeps it per connection."""
    table: dict[int, dict[int, list[list[list[str]]]]] = {}
    for channel in (Channel.MAIN, Channel.BACKEND, Channel.GPU):
        for request in request_names(channel):
            table.setdefault(int(channel), {})[request] = [
                [list(payload_candidates(channel, request, is_reply, DecodeContext(
                    protocol_features=(context & 1) << XEN_MMAP_BIT, features=(context >> 1) << RING_PACKED_BIT)))
                 for context in range(4)]
                for is_reply in (False, True)]
    return table


def _context_rules() -> dict[int, dict]:
    """CONTEXT_RULES for the Lua: a rule that reads a payload field says where the field lies in the request's
    payload and which negotiated bit (and context flag) it decides."""
    watched = {"protocol_features": (XEN_MMAP_BIT, 1), "features": (RING_PACKED_BIT, 2)}
    rules = {}
    for request, rule in cat.CONTEXT_RULES.items():
        lua_rule = {key: value for key, value in vars(rule).items() if value}
        if rule.payload_field:
            kind = cat.FRONTEND_REQUESTS[request].request_kinds[0]
            offset = 0
            for entry in walk_layout(PAYLOADS[kind][0], PAYLOADS[kind][1], kind):
                if entry["short"] == rule.payload_field:
                    break
                offset += entry["width"]
            bit, flag = watched[rule.context_field]
            lua_rule.update(offset=offset, bit=bit, flag=flag)
        rules[int(request)] = lua_rule
    return rules


def _feature_names() -> dict[str, dict[int, str]]:
    """Feature bit names per device type ("" while the type is unknown): transport bits, then the device's."""
    names = {"": dict(cat.TRANSPORT_FEATURES)}
    for device, device_names in cat.DEVICE_FEATURES.items():
        names[device] = {**cat.TRANSPORT_FEATURES, **device_names}
    return names


def _labelled(fields: dict[str, dict]) -> dict[str, dict]:
    """Each field with its human label (catalogue.field_label): the tree shows it, filters use the dotted name."""
    return {name: {**spec, "label": cat.field_label(name)} for name, spec in fields.items()}


def _constants() -> dict[str, object]:
    """The numbers and names the dissector's fixed body uses (C.NAME in the Lua)."""
    return {
        "HEADER_SIZE": HEADER_SIZE, "TRUNCATED_NAME": request_name(Channel.MAIN, -1),
        # offset, size and flags come before a config message's data
        "GET_CONFIG": int(cat.FrontendRequest.GET_CONFIG), "GET_FEATURES": int(cat.FrontendRequest.GET_FEATURES),
        "CONFIG_HEADER_SIZE": sum(sub.sizeof() for sub in PAYLOADS["config"][0].subcons[:3]),
        "MAX_PAYLOAD_SIZE": MAX_PAYLOAD_SIZE, "LINKTYPE": LINKTYPE_USER0,
        "FLAG_REPLY": cat.FLAG_REPLY, "FLAG_NEED_REPLY": cat.FLAG_NEED_REPLY,
        "FLAGS_RESERVED": cat.FLAGS_RESERVED, "VERSION_MASK": cat.VERSION_MASK, "VERSION": cat.VERSION,
        "PSEUDO_MAGIC": PSEUDO_MAGIC.decode(), "PSEUDO_FLAG_UNFRAMED": PSEUDO_FLAG_UNFRAMED,
        "PSEUDO_VERSION": PSEUDO_VERSION, "PSEUDO_SIZE_V1": PSEUDO_HEADER_V1.size,
        "PSEUDO_SIZE_V2": PSEUDO_HEADER.size, "V1_DEVICE_MARK": V1_DEVICE_MARK,
        "EVENT_NOTE": int(EventKind.NOTE), "EVENT_CLOSED": int(EventKind.CLOSED),
        "EVENT_CONNECTED": int(EventKind.CONNECTED),
        "EVENT_CHANNEL_CLOSED": int(EventKind.CHANNEL_CLOSED), "EVENT_DEVICE": int(EventKind.DEVICE),
        "CHANNEL_MAIN": int(Channel.MAIN), "CHANNEL_DEVICE_STATE": int(Channel.DEVICE_STATE),
        "STREAM_NAME": request_name(Channel.DEVICE_STATE, 0), "XEN_MMAP_BIT": XEN_MMAP_BIT,
        "RING_PACKED_BIT": RING_PACKED_BIT, "ELLIPSIS": "…", "SOURCE_PREFIX": SOURCE_PREFIX,
        "EVENT_RING": int(EventKind.RING), "RING_SAMPLE_VERSION": SAMPLE_VERSION,
        "RING_SAMPLE_SIZE": RING_SAMPLE.size, "NO_BASE": NO_BASE,
    }


def _ring_sample_fields() -> list[dict]:
    """The fixed part of a RING event's sample (dataplane.sample), the fields a filter names: where each lies, and
    the names of an enumerated one."""
    names = {"layout": {int(k): k.name for k in Layout}, "reason": {int(k): k.name for k in Reason}}
    return [{"name": filter_name, "offset": offset, "width": width,
             **({"names": names[attribute]} if attribute in names else {}),
             **({"absent": NO_BASE} if attribute == "base" else {})}
            for attribute, offset, width, filter_name in sample_offsets() if filter_name]


def grammar_tables() -> dict:
    """Every table the Lua body reads, as plain Python data."""
    # A name that is an integer in one kind and bytes in another gets two ProtoFields with the same abbreviation.
    fields = {name: {"type": _FT_BY_WIDTH[spec.width], "doc": spec.doc}
              for name, spec in grammar_fields().items() if spec.width}
    byte_fields = {name: {"type": "bytes", "doc": spec.doc} for name, spec in grammar_fields().items() if spec.is_bytes}
    for name, field in config_space.FIELD_BY_NAME.items():
        if field.is_bytes:
            byte_fields[name] = {"type": "bytes", "doc": field.doc}
        elif name == field.name:      # sizes and counts: a u64 (capacity) in decimal too
            fields[name] = {"type": "uint64_dec" if field.length == 8 else _FT_BY_WIDTH[field.length],
                            "doc": field.doc}
        else:           # a bit field: masks lie in the low 32 bits
            fields[name] = {"type": _FT_BY_WIDTH[min(field.length, 4)], "doc": f"bit field of {field.short}"}
    config_fields = {device: [{"name": f.name, "offset": f.offset, "length": f.length, "is_bytes": f.is_bytes,
                               "bits": [list(bit) for bit in f.bits],
                               # how `read` summarises the field, if it does (config.summary)
                               **({"prefix": f" {f.short}="} if f.short in config_space.SUMMARY_FIELDS.get(device, ())
                                  else {})}
                              for f in fields_of_device]
                     for device, fields_of_device in config_space.CONFIG_FIELDS.items()}
    header_bits = [[f"flags.{bit}", mask] for bit, mask in cat.BITFIELDS["flags"].items()]
    layouts = {kind: _lua_layout(walk_layout(structure, prefix, kind), kind)
               for kind, (structure, prefix, _doc) in PAYLOADS.items()}
    elements = {"region": _lua_layout(walk_layout(REGION, "mem.region", "region")),
                "region_xen": _lua_layout(walk_layout(REGION_XEN, "mem.region", "region_xen"))}
    channels = {channel: request_names(channel) for channel in (Channel.MAIN, Channel.BACKEND, Channel.GPU)}
    return {
        "FIELDS": _labelled(fields),
        "BYTE_FIELDS": _labelled(byte_fields),
        "HEADER_BITS": header_bits,
        "LAYOUTS": layouts,
        "ELEMENTS": elements,
        "FIXED_SIZE": {kind: size for kind, size in FIXED_SIZE.items() if size is not None},
        "KIND_DOC": {kind: doc for kind, (_s, _p, doc) in PAYLOADS.items()},
        "CANDIDATES": _candidates(),
        # Where an element's fields lie (for the summary of a memory region).
        "ELEMENT_SIZE": {key: sum(entry["width"] for entry in walk_layout(structure, "mem.region", key))
                         for key, structure in (("region", REGION), ("region_xen", REGION_XEN))},
        # How a payload-layout problem names each kind it expected ("config (variable)", "u64 (8 bytes)").
        "KIND_EXPECTED": {kind: f"{kind} ({size} bytes)" if size is not None else f"{kind} (variable)"
                          for kind, size in FIXED_SIZE.items()},
        # Device config space (protocol/config.py): each device's fields, and the messages that carry the space
        # ("request:is_reply" on the main channel).
        "CONFIG_FIELDS": config_fields,
        "CONFIG_MESSAGES": {f"{request}:{int(is_reply)}": True for request, is_reply in cat.CONFIG_SPACE_MESSAGES},
        "REQUEST_NAMES": {int(channel): dict(names) for channel, names in channels.items()},
        # Each channel's header rules and framing limits (the GPU socket: no version bits, large UPDATEs).
        "HEADER_RULES": {int(channel): {"version_mask": rule.version_mask, "version": rule.version,
                                        "reserved": rule.reserved, "max_payload": cat.max_payload(channel),
                                        # requests that can be replies; false: any (REPLY_ACK)
                                        "replied": {int(r): True for r in rule.replied}
                                        if rule.replied is not None else False,
                                        "request_max": {int(r): n for r, n in
                                                        cat.REQUEST_MAX_PAYLOAD.get(channel, {}).items()}}
                         for channel, rule in cat.HEADER_RULES.items()},
        "CHANNEL_NAMES": {int(c): c.name.lower() for c in Channel},
        "DIRECTION_NAMES": {int(d): d.arrow for d in Direction},
        "RECORD_KIND_NAMES": {int(k): k.name.lower() for k in RecordKind},
        "EVENT_KIND_NAMES": {int(k): k.name for k in EventKind},
        # How a version-1 event's note gives its kind (compat.V1_EVENT_RULES): {lower-case word, kind}, in order.
        "V1_EVENT_RULES": [[word, int(kind)] for word, kind in V1_EVENT_RULES],
        "FD_KIND_NAMES": dict(enumerate(FD_KINDS)),
        "RECORD_FIELDS": _labelled({name: {"type": spec.lua_type, "doc": spec.doc}
                                    for name, spec in RECORD_FIELDS.items() if spec.lua_type}),
        "PROTOCOL_FEATURES": dict(cat.SPEC_PROFILE.protocol_features),
        "GPU_PROTOCOL_FEATURES": dict(cat.GPU_PROTOCOL_FEATURES),
        "FEATURE_NAMES": _feature_names(),
        "DEVICE_STATUS": dict(cat.DEVICE_STATUS),
        # Lua keeps each connection's context in a table keyed by the DecodeContext field names.
        "CONTEXT_RULES": _context_rules(),
        # A GET_CONFIG reply whose whole window has one of these sizes tells the device type (context.py).
        "CONFIG_SIZE_DEVICES": {int(size): device for size, device in cat.CONFIG_SIZE_DEVICES.items()},
        # A GET_FEATURES reply whose device-specific bits one device type alone defines tells it (context.py):
        # per type, the device bits it does not define, as the features' low and high 32-bit words.
        "DEVICE_UNDEFINED_FEATURES": {device: [(cat.DEVICE_SPECIFIC_FEATURES_MASK & ~defined) >> shift & 0xFFFFFFFF
                                               for shift in (0, 32)]
                                      for device, defined in cat.DEVICE_DEFINED_FEATURES.items()},
        "DEVICE_SPECIFIC_FEATURES": [cat.DEVICE_SPECIFIC_FEATURES_MASK >> shift & 0xFFFFFFFF for shift in (0, 32)],
        "EXPERT_ITEMS": {code: list(levels) for code, levels in expert_items().items()},
        "RING_SAMPLE_FIELDS": _ring_sample_fields(),
        "CONSTANTS": _constants(),
    }


def to_lua(value, indent: str = "") -> str:
    """A Python value as a Lua constructor (dict keys sorted, so the output is stable)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    inner = indent + "  "
    if isinstance(value, (list, tuple)):
        if all(not isinstance(item, (dict, list, tuple)) for item in value):
            return "{" + ", ".join(to_lua(item) for item in value) + "}"
        return "{\n" + "".join(f"{inner}{to_lua(item, inner)},\n" for item in value) + indent + "}"
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: (isinstance(kv[0], str), kv[0]))
        lines = []
        for key, item in items:
            lua_key = f"[{key}]" if isinstance(key, int) else f"[{to_lua(key)}]"
            lines.append(f"{inner}{lua_key} = {to_lua(item, inner)},\n")
        return "{\n" + "".join(lines) + indent + "}"
    raise TypeError(value)


def render() -> str:
    tables = grammar_tables()
    parts = ["-- vhost-user dissector for Wireshark/tshark, GENERATED by `python3 -m vhusniff.views.lua`: "
             "do not edit.\n"
             "-- Install: copy to ~/.local/lib/wireshark/plugins/ (or run tshark -X lua_script:vhost_user.lua).\n"
             "-- Reads vhusniff captures (pcapng, link type 147 USER0, pseudo-header v1; docs/capture-format.md).\n"]
    for name, value in tables.items():
        parts.append(f"local {name} = {to_lua(value)}\n")
    parts.append(LUA_BODY)
    return "\n".join(parts)


LUA_BODY = r'''
local C = CONSTANTS
local vhost_user = Proto("vhost_user", "vhost-user")
local byte, format, concat = string.byte, string.format, table.concat
local band, bor, btest = bit32.band, bit32.bor, bit32.btest

-- ProtoFields, made once from the generated tables: the tree shows each field's label, filters use its name.
local pf = {}        -- name -> ProtoField
local pf_bytes = {}  -- name -> ProtoField of the bytes variant of a name
local field_list = {}
local function make_field(name, spec, into)
  local abbr, label, t, doc = "vhost_user." .. name, spec.label, spec.type, spec.doc
  local field
  if t == "uint64" then
    field = ProtoField.uint64(abbr, label, base.HEX, nil, nil, doc)
  elseif t == "uint64_dec" then
    field = ProtoField.uint64(abbr, label, base.DEC, nil, nil, doc)
  elseif t == "uint24" then
    field = ProtoField.uint24(abbr, label, base.HEX, nil, nil, doc)
  elseif t == "uint32" or t == "uint16" or t == "uint8" then
    field = ProtoField[t](abbr, label, base.DEC, nil, nil, doc)
  elseif t == "string" then
    field = ProtoField.string(abbr, label, base.UNICODE, doc)
  elseif t == "bytes" then
    field = ProtoField.bytes(abbr, label, base.NONE, doc)
  elseif t == "int64" then
    field = ProtoField.int64(abbr, label, base.DEC, nil, nil, doc)
  elseif t == "request_link" then
    field = ProtoField.framenum(abbr, label, base.NONE, frametype.REQUEST, nil, doc)
  elseif t == "response_link" then
    field = ProtoField.framenum(abbr, label, base.NONE, frametype.RESPONSE, nil, doc)
  elseif t == "relative_time" then
    field = ProtoField.relative_time(abbr, label, doc)
  else
    error("unknown field type " .. t .. " for " .. name)
  end
  into[name] = field
  field_list[#field_list + 1] = field
end
for name, spec in pairs(FIELDS) do make_field(name, spec, pf) end
for name, spec in pairs(BYTE_FIELDS) do make_field(name, spec, pf_bytes) end
for name, spec in pairs(RECORD_FIELDS) do make_field(name, spec, pf) end
vhost_user.fields = field_list

local expert = {}
local expert_list = {}
for code, levels in pairs(EXPERT_ITEMS) do
  expert[code] = ProtoExpert.new("vhost_user.expert." .. code, code,
                                 _G["PI_" .. levels[1]], _G["PI_" .. levels[2]])
  expert_list[#expert_list + 1] = expert[code]
end
vhost_user.experts = expert_list

-- Lookup tables made once, so that a packet needs no string building for what is always the same.
local POW2, BIT_TEXT, HEX_BYTE = {}, {}, {}
for bit = 0, 63 do BIT_TEXT[bit] = "bit" .. bit end
for bit = 0, 31 do POW2[bit] = 2 ^ bit end
for value = 0, 255 do HEX_BYTE[value] = format("%02x", value) end
local BIT_SET_NAMES = {protocol_features = PROTOCOL_FEATURES, status = DEVICE_STATUS,
                       gpu_protocol_features = GPU_PROTOCOL_FEATURES}
local WHERE = {}       -- connection -> channel -> "c1", "c1/backend"
local function where_text(connection, channel)
  local by_channel = WHERE[connection]
  if by_channel == nil then
    by_channel = {}
    for number, name in pairs(CHANNEL_NAMES) do
      by_channel[number] = number == C.CHANNEL_MAIN and "c" .. connection or "c" .. connection .. "/" .. name
    end
    WHERE[connection] = by_channel
  end
  return by_channel[channel]
end
local FLAG_TEXT = {}   -- header flags -> "0x5 REPLY" (grammar.flag_text); only flags without reserved bits are kept
local function flag_text(flags)
  local text = FLAG_TEXT[flags]
  if text then return text end
  local names = {}
  if btest(flags, C.FLAG_REPLY) then names[#names + 1] = "REPLY" end
  if btest(flags, C.FLAG_NEED_REPLY) then names[#names + 1] = "NEED_REPLY" end
  local reserved = band(flags, C.FLAGS_RESERVED)
  if reserved ~= 0 then names[#names + 1] = format("RESERVED(0x%x)", reserved) end
  text = format("0x%x", flags) .. (#names > 0 and " " .. concat(names, "|") or "")
  if reserved == 0 then FLAG_TEXT[flags] = text end
  return text
end

-- The Info column: `read`'s line for the record, gathered in a reused buffer and set once per packet.
local line, line_length = {}, 0
local function emit(text)
  line_length = line_length + 1
  line[line_length] = text
end

-- Little-endian integers of the packet's bytes (`raw`, a Lua string; `at` is a 0-based offset).
local function u16(raw, at)
  local a, b = byte(raw, at + 1, at + 2)
  return a + b * 256
end
local function u32(raw, at)
  local a, b, c, d = byte(raw, at + 1, at + 4)
  return a + b * 256 + c * 65536 + d * 16777216
end
-- An integer of 1 to 8 bytes as its low and high 32 bits (Lua numbers hold 2^53 exactly, not 2^64).
local function uint(raw, at, width)
  if width == 4 then return u32(raw, at), 0 end
  if width == 8 then return u32(raw, at), u32(raw, at + 4) end
  if width == 1 then return byte(raw, at + 1), 0 end
  if width == 2 then return u16(raw, at), 0 end
  if width == 6 then return u32(raw, at), u16(raw, at + 4) end
  local value = 0
  for index = width, 1, -1 do value = value * 256 + byte(raw, at + index) end
  return value, 0
end
local function hex(lo, hi)
  if hi == 0 then return format("0x%x", lo) end
  return format("0x%x%08x", hi, lo)
end
-- grammar.value_text of an integer: hex above 0xffff
local function number_text(lo, hi)
  if hi == 0 and lo <= 0xFFFF then return format("%d", lo) end
  return hex(lo, hi)
end

local names_buffer = {}   -- reused: bit_names builds no table per packet
local function bit_names(lo, hi, names)
  local count = 0
  if lo ~= 0 then
    for bit = 0, 31 do
      if btest(lo, POW2[bit]) then
        count = count + 1
        names_buffer[count] = names[bit] or BIT_TEXT[bit]
      end
    end
  end
  if hi ~= 0 then
    for bit = 0, 31 do
      if btest(hi, POW2[bit]) then
        count = count + 1
        names_buffer[count] = names[bit + 32] or BIT_TEXT[bit + 32]
      end
    end
  end
  if count == 0 then return "0" end
  return concat(names_buffer, "|", 1, count)
end

local function masked(value, mask)
  -- value and mask are Lua numbers below 2^32 (header flags, u8/u32 bit fields)
  local shift = 0
  while band(mask, POW2[shift]) == 0 do shift = shift + 1 end
  return band(value, mask) / POW2[shift]
end

-- grammar.value_text of bytes: a MAC with colons, else the first 16 bytes in hex
local function bytes_text(raw, at, length, style)
  if length == 0 then return "''" end
  if style == "mac" and length == 6 then
    local a, b, c, d, e, f = byte(raw, at + 1, at + 6)
    return format("%02x:%02x:%02x:%02x:%02x:%02x", a, b, c, d, e, f)
  end
  local shown = length > 16 and 16 or length
  local parts = {byte(raw, at + 1, at + shown)}
  for index = 1, shown do parts[index] = HEX_BYTE[parts[index]] end
  return concat(parts) .. (length > 16 and C.ELLIPSIS or "")
end

-- Python's repr() of bytes (b'XR24', as `read` shows a DRM fourcc), or with `decoded` of a tag decoded with
-- errors="replace": quoted, escapes for control bytes, and for bytes above 127 \xNN (bytes) or U+FFFD (decoded).
local REPR_ESCAPES = {[9] = "\\t", [10] = "\\n", [13] = "\\r", [92] = "\\\\"}
local function python_repr(text, decoded)
  local quote = (text:find("'", 1, true) and not text:find('"', 1, true)) and '"' or "'"
  local parts = {byte(text, 1, -1)}
  for index, value in ipairs(parts) do
    if REPR_ESCAPES[value] then
      parts[index] = REPR_ESCAPES[value]
    elseif value == byte(quote) then
      parts[index] = "\\" .. quote
    elseif decoded and value >= 128 then
      parts[index] = "\239\191\189"
    elseif value < 32 or value >= 127 then
      parts[index] = format("\\x%02x", value)
    else
      parts[index] = string.char(value)
    end
  end
  return (decoded and "" or "b") .. quote .. concat(parts) .. quote
end

-- Per-capture state, filled on the first pass and read on every pass (Wireshark may revisit in any order).
-- Everything is a flat map keyed by numbers: no table per packet.
local state = {}
local function reset_state()
  state = {
    context = {},         -- connection -> 1 + (1 Xen mmap) + (2 packed rings) negotiated so far
    device = {},          -- connection -> device type
    history = {},         -- connection -> {{frame, context, device}, ...}: each change, and the frame that made it
    open = {},            -- connection -> true between its CONNECTED and CLOSED events
    reconnected = {},     -- frame -> true: a CONNECTED event of a connection already open
    given = {},           -- source (or its tag) -> connection number in the capture -> connection number shown
    holder = {},          -- connection number shown -> its source
    highest = 0,
    pending_frame = {},   -- connection * 8 + channel -> the frame of the request awaiting its reply
    pending_request = {},
    pending_time = {},
    response_in = {},     -- request frame -> reply frame
    response_to = {},     -- reply frame -> request frame
    response_time = {},   -- reply frame -> seconds
  }
end
vhost_user.init = reset_state

-- The frame being dissected (pinfo.number, pinfo.visited), read once per packet.
local frame_number, frame_visited = 0, false

-- Merged captures (mergecap of captures from several hosts or proxies): each capture's interface description
-- names its source, and connection numbers restart at 1 in each. Connections are then keyed by source and number
-- and numbered as `vhusniff read` numbers them (capture.pcapng.distinct_connections). Every record a vhusniff that
-- tags its captures writes carries its source's tag in the pseudo-header (capture.pcapng.source_tag, 0 in older
-- captures): plain tshark keys connections by (tag, number), read from the packet itself. Wireshark's Lua sees a
-- frame's interface only through a field extractor, and any field extractor makes Wireshark build a tree for every
-- packet (about five times the CPU when tshark only lists packets), so the interface's source is read only in the
-- Wireshark GUI (which builds those trees anyway, for its colouring rules) and in tshark when VHUSNIFF_SOURCES=1 is
-- set: what keeps untagged captures' sources apart.
local interface_field, description_field
if gui_enabled() or os.getenv("VHUSNIFF_SOURCES") == "1" then
  interface_field = Field.new("frame.interface_id")
  description_field = Field.new("frame.interface_description")
end
local SOURCE_BY_INTERFACE = {}   -- interface id -> source ("" when the interface names none)

local function frame_source()
  local interface = interface_field()
  if interface == nil then return nil end      -- a pass without fields (tshark -2's first pass)
  local id = interface.value
  local source = SOURCE_BY_INTERFACE[id]
  if source == nil then
    local description = description_field()
    local text = description and description.value or ""
    if text:sub(1, #C.SOURCE_PREFIX) == C.SOURCE_PREFIX then
      source = text:sub(#C.SOURCE_PREFIX + 1)
    elseif id ~= 0 then        -- several unnamed interfaces (mergecap -I none): told apart by position
      source = "section=0 interface=" .. id
    else
      source = ""
    end
    SOURCE_BY_INTERFACE[id] = source
  end
  return source
end

-- A (source, number) pair keeps its number unless that number is given already; then it takes the next number
-- above all those given. A capture of one source keeps every number it has.
local function distinct_connection(source, number)
  local given = state.given[source]
  if given == nil then
    given = {}
    state.given[source] = given
  end
  local distinct = given[number]
  if distinct == nil then
    distinct = number
    if state.holder[distinct] ~= nil then distinct = state.highest + 1 end
    state.holder[distinct] = source
    given[number] = distinct
    if distinct > state.highest then state.highest = distinct end
  end
  return distinct
end

-- A connection's context changes a few times per session (the first pass records each change with the frame that
-- made it), so a frame Wireshark dissects again, in any order, decodes in the context it had the first time.
local function set_context(connection, context, device)
  local history = state.history[connection]
  if history == nil then
    history = {}
    state.history[connection] = history
  end
  history[#history + 1] = {frame_number, context, device}
  state.context[connection], state.device[connection] = context, device
end

local function context_at(connection)
  if not frame_visited then return state.context[connection] or 1, state.device[connection] end
  local context, device = 1, nil
  local history = state.history[connection]
  if history then
    for index = 1, #history do
      local change = history[index]
      if change[1] >= frame_number then break end
      context, device = change[2], change[3]
    end
  end
  return context, device
end

-- Does `layout` account for exactly the bytes up to `limit`? Mirrors protocol.decode's "variable kinds must
-- consume every byte" rule. Returns the end offset or nil.
local measured = {}       -- reused: short name -> value of the counts and sizes a layout refers to
local function measure(layout, raw, offset, limit)
  for index = 1, #layout do
    local entry = layout[index]
    local width = entry.width
    if width then
      local count = entry.count or 1
      if offset + width * count > limit then return nil end
      if count == 1 and width <= 4 then measured[entry.short] = uint(raw, offset, width) end
      offset = offset + width * count
    elseif entry.bytes then
      if offset + entry.bytes > limit then return nil end
      offset = offset + entry.bytes
    elseif entry.bytes_from then
      local length = measured[entry.bytes_from]
      if length == nil or offset + length > limit then return nil end
      offset = offset + length
    elseif entry.rest then
      offset = limit
    elseif entry.element then
      local count = entry.count_from and measured[entry.count_from] or 1
      for _ = 1, count do
        offset = measure(ELEMENTS[entry.element], raw, offset, limit)
        if offset == nil then return nil end
      end
    end
  end
  return offset
end

local function choose_kind(raw, start, size, kinds)
  for _, kind in ipairs(kinds) do
    local fixed = FIXED_SIZE[kind]
    if fixed ~= nil then
      if fixed == size then return kind end
    elseif measure(LAYOUTS[kind], raw, start, start + size) == start + size then
      return kind
    end
  end
  return nil
end

-- The device config space fields a config window {offset, size, flags, data} covers whole, in `read`'s summary.
local function summarize_config_space(raw, body, device)
  local fields = CONFIG_FIELDS[device]
  if fields == nil then return end
  local window, size = u32(raw, body), u32(raw, body + 4)
  local data = body + 12
  for _, field in ipairs(fields) do
    if field.prefix and window <= field.offset and field.offset + field.length <= window + size then
      local at, length = data + field.offset - window, field.length
      local text
      if not field.is_bytes then
        local lo, hi = uint(raw, at, length)
        text = hi == 0 and format("%d", lo) or tostring(UInt64(lo, hi))
      elseif field.name:match("%.mac$") and length == 6 then
        text = bytes_text(raw, at, length, "mac")
      elseif field.name:match("%.tag$") then
        text = python_repr((raw:sub(at + 1, at + length):gsub("%z+$", "")), true)
      elseif raw:sub(at + 1, at + length):match("^%z*$") then
        text = "0"
      else
        text = bytes_text(raw, at, length)
      end
      emit(field.prefix)
      emit(text)
    end
  end
end

-- Where each field of a payload kind lies, up to its first field of variable size: kind -> short name -> offset.
local FIELD_OFFSETS = {}
for kind, layout in pairs(LAYOUTS) do
  local offsets, offset = {}, 0
  for _, entry in ipairs(layout) do
    if offsets[entry.short] == nil then offsets[entry.short] = offset end
    local length = entry.width and entry.width * (entry.count or 1) or entry.bytes
    if length == nil then break end
    offset = offset + length
  end
  FIELD_OFFSETS[kind] = offsets
end

-- The GPU payloads' summaries (grammar._GPU_SUMMARIES): a rectangle as WxH+X+Y, pixels and images by size.
local function gpu_rect(raw, base, at)
  return format("scanout=%d %dx%d+%d+%d", u32(raw, base + at.scanout_id), u32(raw, base + at.width),
                u32(raw, base + at.height), u32(raw, base + at.x), u32(raw, base + at.y))
end
local function gpu_dmabuf(raw, base, at)
  emit(" " .. gpu_rect(raw, base, at))
  local fourcc = base + at.fd_drm_fourcc
  emit(format(" fd=%dx%d stride=%d fourcc=%s flags=0x%x", u32(raw, base + at.fd_width),
              u32(raw, base + at.fd_height), u32(raw, base + at.fd_stride),
              python_repr(raw:sub(fourcc + 1, fourcc + 4)), u32(raw, base + at.fd_flags)))
  if at.modifier then emit(" modifier=" .. hex(uint(raw, base + at.modifier, 8))) end
end
local GPU_SUMMARIES = {
  gpu_cursor_pos = function(raw, base, at)
    emit(format(" scanout=%d x=%d y=%d", u32(raw, base + at.scanout_id), u32(raw, base + at.x), u32(raw, base + at.y)))
  end,
  gpu_cursor_update = function(raw, base, at, limit)
    emit(format(" scanout=%d x=%d y=%d hot=%d,%d image=%dB", u32(raw, base + at.scanout_id), u32(raw, base + at.x),
                u32(raw, base + at.y), u32(raw, base + at.hot_x), u32(raw, base + at.hot_y), limit - base - at.image))
  end,
  gpu_scanout = function(raw, base, at)
    local width = u32(raw, base + at.width)
    emit(format(" scanout=%d %dx%d", u32(raw, base + at.scanout_id), width, u32(raw, base + at.height)))
    if width == 0 then emit(" (disable)") end
  end,
  gpu_update = function(raw, base, at, limit)
    emit(" " .. gpu_rect(raw, base, at))
    if limit > base + at.data then emit(format(" pixels=%dB", limit - base - at.data)) end
  end,
  gpu_dmabuf_scanout = gpu_dmabuf,
  gpu_dmabuf_scanout2 = gpu_dmabuf,
  gpu_edid_request = function(raw, base, at) emit(format(" scanout=%d", u32(raw, base + at.scanout_id))) end,
  gpu_display_info = function(raw, base, at, limit)
    emit(format(" type=0x%x", u32(raw, base + at.type)))
    local shown = false
    local index = 0
    for mode = base + at.pmodes, limit - 24, 24 do
      if u32(raw, mode + 16) ~= 0 then     -- x, y, width, height, enabled, flags
        emit(format(" scanout%d=%dx%d+%d+%d", index, u32(raw, mode + 8), u32(raw, mode + 12), u32(raw, mode),
                    u32(raw, mode + 4)))
        shown = true
      end
      index = index + 1
    end
    if not shown then emit(" no scanout enabled") end
  end,
  gpu_edid = function(raw, base, at)
    emit(format(" type=0x%x edid=%dB", u32(raw, base + at.type), u32(raw, base + at.size)))
  end,
}

-- `read`'s one-line summary of a payload (grammar.payload_summary), appended to the Info column piece by piece.
local function summarize(layout, raw, offset, limit, feature_names, config_device, kind)
  local gpu = GPU_SUMMARIES[kind]
  if gpu then return gpu(raw, offset, FIELD_OFFSETS[kind], limit) end
  for index = 1, #layout do
    local entry = layout[index]
    local width, prefix, style = entry.width, entry.prefix, entry.style
    if width and entry.count then
      if style == "sizes" then
        emit(" sizes={")
        local first = true
        for element = 0, entry.count - 1 do
          local lo, hi = uint(raw, offset + element * width, width)
          if lo ~= 0 or hi ~= 0 then
            emit(format(first and "%d:%s" or ",%d:%s", element, hex(lo, hi)))
            first = false
          end
        end
        emit("}")
      end
      offset = offset + width * entry.count
    elseif width then
      local lo, hi = uint(raw, offset, width)
      measured[entry.short] = lo
      if prefix then
        if style == "nofd" then
          if btest(lo, 1) then emit(" NOFD") end
        elseif style then
          emit(prefix)
          emit(hex(lo, hi) .. "(" .. bit_names(lo, hi, style == "features" and feature_names
                                                      or BIT_SET_NAMES[style]) .. ")")
        else
          emit(prefix)
          emit(number_text(lo, hi))
        end
      end
      offset = offset + width
    elseif entry.element then
      local count = entry.count_from and measured[entry.count_from] or 1
      local size = ELEMENT_SIZE[entry.element]
      for _ = 1, count do
        local gpa_lo, gpa_hi = uint(raw, offset, 8)
        local size_lo, size_hi = uint(raw, offset + 8, 8)
        local uaddr_lo, uaddr_hi = uint(raw, offset + 16, 8)
        local off_lo, off_hi = uint(raw, offset + 24, 8)
        emit(format(" {gpa=%s size=%s uaddr=%s off=%s}", hex(gpa_lo, gpa_hi), hex(size_lo, size_hi),
                           hex(uaddr_lo, uaddr_hi), hex(off_lo, off_hi)))
        offset = offset + size
      end
    else
      local length = entry.bytes or (entry.bytes_from and measured[entry.bytes_from]) or (limit - offset)
      if style == "config_data" then
        emit(format(" data=%dB", length))
        if config_device then summarize_config_space(raw, offset - 12, config_device) end
      elseif prefix then
        emit(prefix)
        emit(bytes_text(raw, offset, length, style))
      end
      offset = offset + length
    end
  end
end

-- Adds the fields of `layout` at `offset` to the tree; returns the end offset, or nil when a field would run past
-- the packet (every length is checked before a range is made: a range out of bounds is a Lua error in Wireshark).
local tree_values = {}    -- reused: short name -> value of the counts and sizes a layout refers to
local function add_layout(tree, layout, tvb, raw, offset, feature_names)
  local limit = #raw
  for _, entry in ipairs(layout) do
    local width = entry.width
    if width then
      local names = entry.short == "features" and feature_names or BIT_SET_NAMES[entry.short]
      for _ = 1, entry.count or 1 do
        if offset + width > limit then return nil end
        local range = tvb(offset, width)
        local item = tree:add_le(pf[entry.name], range)
        local lo, hi = uint(raw, offset, width)
        tree_values[entry.short] = lo
        if names then item:append_text(" (" .. bit_names(lo, hi, names) .. ")") end
        for _, bit in ipairs(entry.bits) do
          -- every bit-field mask of the grammar lies in the low 32 bits
          item:add(pf[bit[1]], range, masked(lo, bit[2]))
        end
        offset = offset + width
      end
    elseif entry.bytes or entry.bytes_from or entry.rest then
      local length = entry.bytes or (entry.bytes_from and tree_values[entry.bytes_from]) or (limit - offset)
      if type(length) ~= "number" or length < 0 or offset + length > limit then return nil end
      tree:add(pf_bytes[entry.name], tvb(offset, length))
      offset = offset + length
    elseif entry.element then
      local count = entry.count_from and tree_values[entry.count_from] or 1
      for index = 1, count do
        local start = offset
        local subtree = tree:add(vhost_user, tvb(offset, 0), entry.label .. " " .. (index - 1))
        offset = add_layout(subtree, ELEMENTS[entry.element], tvb, raw, offset, feature_names)
        if offset == nil then return nil end
        subtree:set_len(offset - start)
      end
    end
  end
  return offset
end

-- The device config space fields a config payload's window {offset, size, flags, data} covers whole.
local function add_config_space(tree, tvb, raw, body, device)
  local fields = CONFIG_FIELDS[device]
  if fields == nil then return end
  local window, size = u32(raw, body), u32(raw, body + 4)
  local data = body + 12
  for _, field in ipairs(fields) do
    if window <= field.offset and field.offset + field.length <= window + size then
      local range = tvb(data + field.offset - window, field.length)
      if field.is_bytes then
        tree:add(pf_bytes[field.name], range)
      else
        local item = tree:add_le(pf[field.name], range)
        for _, bit in ipairs(field.bits) do
          item:add(pf[bit[1]], range, masked(uint(raw, data + field.offset - window, math.min(field.length, 4)),
                                             bit[2]))
        end
      end
    end
  end
end

-- A version-1 event's kind (and the device it named) from its note: compat.migrate_v1_event, from the same table.
local function migrate_v1_event(note, channel)
  local text = string.lower(note)
  local kind = C.EVENT_NOTE
  for _, rule in ipairs(V1_EVENT_RULES) do
    if string.find(text, rule[1], 1, true) then
      kind = rule[2]
      break
    end
  end
  if kind == C.EVENT_CLOSED and channel ~= C.CHANNEL_MAIN then kind = C.EVENT_CHANNEL_CLOSED end
  local device = ""
  local at = string.find(text, C.V1_DEVICE_MARK, 1, true)
  if at then device = note:sub(at + #C.V1_DEVICE_MARK):match("^[%w_]*") end
  return kind, device
end

-- The pseudo-header, into `record` (reused for every packet); returns nil plus a reason when it cannot be read.
local record = {}
local function dissect_pseudo_header(tvb, raw, tree)
  local length = #raw
  if length < 8 or raw:sub(1, 4) ~= C.PSEUDO_MAGIC then
    return nil, "packet does not start with the vhusniff pseudo-header (magic VHUS)"
  end
  local version, header_length = u16(raw, 4), u16(raw, 6)
  local header_tree
  if tree then
    header_tree = tree:add(vhost_user, tvb(0, math.min(header_length, length)), "vhusniff pseudo-header")
    header_tree:add_le(pf["pseudo.version"], tvb(4, 2))
    header_tree:add_le(pf["pseudo.header_length"], tvb(6, 2))
  end
  if version ~= 1 and version ~= C.PSEUDO_VERSION then
    return nil, "unknown pseudo-header version " .. version .. " (this dissector reads 1, " .. C.PSEUDO_VERSION .. ")"
  end
  local fixed = version == 1 and C.PSEUDO_SIZE_V1 or C.PSEUDO_SIZE_V2
  if length < fixed or header_length > length then
    return nil, "pseudo-header of " .. header_length .. " bytes in a " .. length .. "-byte packet"
  end
  if header_length < fixed then
    return nil, "pseudo-header length " .. header_length .. " is shorter than its fixed part (" .. fixed .. " bytes)"
  end
  local kind, channel, direction = byte(raw, 13, 15)
  record.header_length, record.fixed = header_length, fixed
  record.connection, record.kind, record.channel, record.direction = u32(raw, 8), kind, channel, direction
  local tag = 0
  if version ~= 1 then
    local low, middle, high = byte(raw, 22, 24)
    tag = low + middle * 256 + high * 65536
  end
  local source
  if interface_field then
    source = frame_source()
    if source == nil then
      state.sourceless = true      -- the next pass, which has the sources, does this pass's work again
    else
      if state.sourceless then
        reset_state()
        state.redone = true
      end
      if state.redone then frame_visited = false end
      record.connection = distinct_connection(source, record.connection)
    end
  else
    -- keyed by the source's tag (0, one key, for untagged records: their numbers stay as they are)
    record.connection = distinct_connection(tag, record.connection)
  end
  record.flags, record.fd_count, record.note_length = byte(raw, 16), u16(raw, 16), u16(raw, 18)
  record.event, record.device, record.note = nil, nil, nil
  if CHANNEL_NAMES[channel] == nil or DIRECTION_NAMES[direction] == nil or RECORD_KIND_NAMES[kind] == nil then
    return nil, "bad pseudo-header field"
  end
  if header_tree then
    header_tree:add(pf["connection"], tvb(8, 4), record.connection)
    header_tree:add(pf["record_kind"], tvb(12, 1), RECORD_KIND_NAMES[kind])
    header_tree:add(pf["channel"], tvb(13, 1), CHANNEL_NAMES[channel])
    header_tree:add(pf["direction"], tvb(14, 1), DIRECTION_NAMES[direction])
    header_tree:add(pf["unframed"], tvb(15, 1), band(record.flags, C.PSEUDO_FLAG_UNFRAMED))
    header_tree:add_le(pf["fds"], tvb(16, 2))
    if tag ~= 0 then      -- 0: the capture does not tag its source (no field, as `vhusniff read` has none)
      local tag_item = header_tree:add_le(pf["source_tag"], tvb(21, 3))
      if source and source ~= "" then tag_item:append_text(" (" .. source .. ")") end
    end
  end
  if version ~= 1 and kind ~= 0 then
    record.event = byte(raw, 21)
    if header_tree then
      header_tree:add(pf["event"], tvb(20, 1), EVENT_KIND_NAMES[record.event] or tostring(record.event))
    end
  end
  local position = fixed
  for index = 1, record.fd_count do
    if position + 24 > header_length then return nil, "fd descriptions run past the pseudo-header" end
    local name_length = byte(raw, position + 2)
    if position + 24 + name_length > header_length then
      return nil, "fd name of " .. name_length .. " bytes runs past the pseudo-header"
    end
    if header_tree then
      local fd_tree = header_tree:add(vhost_user, tvb(position, 24 + name_length), "File descriptor " .. (index - 1))
      local fd_kind = FD_KIND_NAMES[byte(raw, position + 1)] or "unknown"
      fd_tree:add(pf["fd.kind"], tvb(position, 1), fd_kind)
      fd_tree:add_le(pf["fd.seals"], tvb(position + 2, 2))
      fd_tree:add_le(pf["fd.inode"], tvb(position + 8, 8))
      fd_tree:add_le(pf["fd.size"], tvb(position + 16, 8))
      local text = fd_kind
      if name_length > 0 then
        local name = tvb(position + 24, name_length):string(ENC_UTF_8)
        fd_tree:add(pf["fd.name"], tvb(position + 24, name_length), name)
        text = text .. ":" .. name
      end
      fd_tree:append_text(": " .. text)
    end
    position = position + 24 + name_length
  end
  if position + record.note_length > header_length then return nil, "note runs past the pseudo-header" end
  if record.note_length > 0 then
    record.note = raw:sub(position + 1, position + record.note_length)
    if header_tree then header_tree:add(pf["note"], tvb(position, record.note_length), record.note) end
  end
  if version == 1 and kind ~= 0 then
    record.event, record.device = migrate_v1_event(record.note or "", channel)
    if header_tree then header_tree:add(pf["event"], EVENT_KIND_NAMES[record.event]):set_generated() end
  elseif record.event == C.EVENT_DEVICE then
    record.device = record.note
  end
  return record
end

-- `read`'s fds: each fd's kind, an eventfd by the kernel's id (`eventfd-id:N`) when the capture has it.
local function append_fds(raw, position, count)
  emit("  fds=")
  for index = 1, count do
    local name_length = byte(raw, position + 2)
    local fd_kind = FD_KIND_NAMES[byte(raw, position + 1)] or "unknown"
    if fd_kind == "eventfd" and name_length > 11 and raw:sub(position + 25, position + 35) == "eventfd-id:" then
      fd_kind = raw:sub(position + 25, position + 24 + name_length)
    end
    if index > 1 then emit(",") end
    emit(fd_kind)
    position = position + 24 + name_length
  end
end

local problem_codes, problem_texts, problem_count = {}, {}, 0   -- this packet's problems, for the Info column
local function problem(tree, code, text)
  problem_count = problem_count + 1
  problem_codes[problem_count], problem_texts[problem_count] = code, text
  if tree then
    tree:add(pf["problem"], code)
    tree:add_proto_expert_info(expert[code], code .. ": " .. text)
  end
end

-- The device type a main-channel reply's bytes tell (protocol.context.infer_device_type), or nil: a GET_FEATURES
-- reply whose device-specific bits one device type alone defines (two types fitting tell nothing), a GET_CONFIG
-- reply whose window is a whole config space only one device type has. Read again whenever the frame is: the
-- reply that tells the type reads as that device's, as in `read`.
local function reply_tells_device(request, kind, raw, body)
  if request == C.GET_FEATURES and kind == "features" then
    local low, high = u32(raw, body), u32(raw, body + 4)
    if band(low, DEVICE_SPECIFIC_FEATURES[1]) == 0 and band(high, DEVICE_SPECIFIC_FEATURES[2]) == 0 then return nil end
    local fitting, count = nil, 0
    for device, undefined in pairs(DEVICE_UNDEFINED_FEATURES) do
      if band(low, undefined[1]) == 0 and band(high, undefined[2]) == 0 then fitting, count = device, count + 1 end
    end
    return count == 1 and fitting or nil
  end
  if request ~= C.GET_CONFIG or kind ~= "config" then return nil end
  local window, size = u32(raw, body), u32(raw, body + 4)
  local device = CONFIG_SIZE_DEVICES[size]
  if window == 0 and device ~= nil and #raw - body - C.CONFIG_HEADER_SIZE == size then return device end
  return nil
end

local function observe(request, is_reply, kind, raw, body, told)
  -- After the frame: the requests of CONTEXT_RULES change how later frames of the connection decode, and so does
  -- the device type a reply told (`told`, from reply_tells_device while the connection's type was unknown).
  if frame_visited or record.channel ~= C.CHANNEL_MAIN or kind == nil then return end
  local connection = record.connection
  if is_reply then
    if told then set_context(connection, state.context[connection] or 1, told) end
    return
  end
  local rule = CONTEXT_RULES[request]
  if rule == nil then return end
  if rule.bit then
    local at = body + rule.offset + (rule.bit >= 32 and 4 or 0)
    if at + 4 > #raw then return end
    local context = (state.context[connection] or 1) - 1
    if btest(u32(raw, at), POW2[rule.bit % 32]) then
      context = bor(context, rule.flag)
    else
      context = band(context, 3 - rule.flag)
    end
    if context + 1 ~= (state.context[connection] or 1) then
      set_context(connection, context + 1, state.device[connection])
    end
  elseif state.device[connection] == nil then
    set_context(connection, state.context[connection] or 1, rule.value)
  end
end

local function link(pinfo, tree, request, is_reply)
  local number = frame_number
  if not frame_visited then
    local key = record.connection * 8 + record.channel
    if not is_reply then
      state.pending_frame[key], state.pending_request[key], state.pending_time[key] = number, request, pinfo.abs_ts
    elseif state.pending_frame[key] and state.pending_request[key] == request then
      state.response_in[state.pending_frame[key]] = number
      state.response_to[number] = state.pending_frame[key]
      state.response_time[number] = pinfo.abs_ts - state.pending_time[key]
      state.pending_frame[key] = nil
    end
  end
  if tree == nil then return end
  if state.response_in[number] then
    tree:add(pf["response_in"], state.response_in[number])
  end
  if state.response_to[number] then
    tree:add(pf["response_to"], state.response_to[number])
    local seconds = state.response_time[number]
    tree:add(pf["response_time"], NSTime(math.floor(seconds), math.floor((seconds % 1) * 1e9 + 0.5)))
  end
end

local function dissect_message(tvb, raw, pinfo, tree, start)
  local length = #raw - start
  local channel = record.channel
  if channel == C.CHANNEL_DEVICE_STATE then
    -- SET_DEVICE_STATE_FD's pipe: the back-end's opaque migration stream, no vhost-user header.
    if tree then
      tree:add(pf["name"], C.STREAM_NAME)
      if length > 0 then tree:add(pf_bytes["payload"], tvb(start, length)) end
    end
    emit(C.STREAM_NAME)
    emit(format("  %d bytes (opaque)", length))
    return
  end
  if length < C.HEADER_SIZE then
    if tree then tree:add(pf["name"], C.TRUNCATED_NAME) end
    problem(tree, "truncated-header", length .. " bytes, a header needs " .. C.HEADER_SIZE)
    emit(C.TRUNCATED_NAME .. " 0x0 " .. bytes_text(raw, start, length):gsub(C.ELLIPSIS, ""))
    return
  end
  local request, flags, size = u32(raw, start), u32(raw, start + 4), u32(raw, start + 8)
  local name = REQUEST_NAMES[channel] and REQUEST_NAMES[channel][request] or ("UNKNOWN_" .. request)
  local is_reply = btest(flags, C.FLAG_REPLY)
  local replied = HEADER_RULES[channel] and HEADER_RULES[channel].replied
  if is_reply and replied and not replied[request] then is_reply = false end   -- GPU: only answered requests
  local flags_item
  if tree then
    tree:add(pf["name"], tvb(start, 4), name)
    tree:add_le(pf["request"], tvb(start, 4)):append_text(" (" .. name .. ")")
    flags_item = tree:add_le(pf["flags"], tvb(start + 4, 4))
    for _, bit in ipairs(HEADER_BITS) do
      flags_item:add(pf[bit[1]], tvb(start + 4, 4), masked(flags, bit[2]))
    end
    tree:add_le(pf["size"], tvb(start + 8, 4))
  end
  emit(name)
  if is_reply then emit(" reply") end
  emit(" ")
  emit(flag_text(flags))
  local rule = HEADER_RULES[channel] or HEADER_RULES[C.CHANNEL_MAIN]
  if band(flags, rule.reserved) ~= 0 then
    problem(tree, "reserved-flags", format("reserved flag bits set: 0x%x", band(flags, rule.reserved)))
  end
  if band(flags, rule.version_mask) ~= rule.version then
    problem(tree, "bad-version", "version " .. band(flags, rule.version_mask) .. ", expected " .. rule.version)
  end
  local limit = rule.request_max[request] or rule.max_payload
  if size > limit then
    problem(tree, "oversize", "size " .. size .. " exceeds the maximum " .. limit)
  end
  local body = start + C.HEADER_SIZE
  local body_length = length - C.HEADER_SIZE
  local kind = nil
  local context, device = context_at(record.connection)
  if body_length ~= size then
    problem(tree, "size-mismatch", "header says " .. size .. " payload bytes, " .. body_length .. " present")
  else
    local by_request = CANDIDATES[channel] and CANDIDATES[channel][request]
    local kinds = by_request and by_request[is_reply and 2 or 1][context]
    if kinds == nil or kinds[1] == nil then
      problem(tree, "unknown-request", "request " .. request .. " is not known on the "
                                       .. (CHANNEL_NAMES[channel] or "?") .. " channel")
    else
      kind = choose_kind(raw, body, size, kinds)
      if kind == nil then
        local expected = {}
        for index, candidate in ipairs(kinds) do expected[index] = KIND_EXPECTED[candidate] end
        problem(tree, "payload-layout", size .. "-byte payload fits no layout of this message (expected "
                                        .. concat(expected, " or ") .. ")")
      end
    end
  end
  local told = nil
  if is_reply and device == nil and kind ~= nil and channel == C.CHANNEL_MAIN then
    told = reply_tells_device(request, kind, raw, body)
    device = told
  end
  local feature_names = FEATURE_NAMES[device or ""] or FEATURE_NAMES[""]
  local config_device = kind == "config" and channel == C.CHANNEL_MAIN and device
                        and CONFIG_MESSAGES[request .. ":" .. (is_reply and 1 or 0)] and device or nil
  if kind ~= nil then
    if tree then
      tree:add(pf["kind"], kind)
      local payload_tree = tree
      if size > 0 then payload_tree = tree:add(vhost_user, tvb(body, size), "Payload: " .. KIND_DOC[kind]) end
      add_layout(payload_tree, LAYOUTS[kind], tvb, raw, body, feature_names)
      if config_device then add_config_space(payload_tree, tvb, raw, body, config_device) end
    end
    summarize(LAYOUTS[kind], raw, body, #raw, feature_names, config_device, kind)
  else
    if tree and body_length >= 0 then tree:add(pf_bytes["payload"], tvb(body, body_length)) end
    if size ~= 0 then emit(format(" payload=%dB", body_length)) end
  end
  link(pinfo, tree, request, is_reply)
  observe(request, is_reply, kind, raw, body, told)
end

-- A RING event's data (`--rings`): the sample's fields under a subtree, the requests in flight one line each.
local function add_ring_sample(tree, tvb, raw, at)
  local length = #raw - at
  if length < C.RING_SAMPLE_SIZE or byte(raw, at + 1) ~= C.RING_SAMPLE_VERSION then return end
  local sample_tree = tree:add(vhost_user, tvb(at, length), "Ring sample")
  for _, field in ipairs(RING_SAMPLE_FIELDS) do
    local offset = at + field.offset
    if field.names then
      local value = byte(raw, offset + 1)
      sample_tree:add(pf[field.name], tvb(offset, field.width), field.names[value] or tostring(value))
    elseif not (field.absent and u32(raw, offset) == field.absent) then
      sample_tree:add_le(pf[field.name], tvb(offset, field.width))
    end
  end
  local position = at + C.RING_SAMPLE_SIZE
  while position < #raw do
    local stop = string.find(raw, "\n", position + 1, true) or (#raw + 1)
    sample_tree:add(pf["ring.pending"], tvb(position, stop - 1 - position), raw:sub(position + 1, stop - 1))
    position = stop
  end
end

function vhost_user.dissector(tvb, pinfo, tree)
  local cols = pinfo.cols
  cols.protocol = "vhost-user"
  frame_number, frame_visited = pinfo.number, pinfo.visited
  line_length = 0
  -- Without a tree (tshark reading for the packet list) only the columns and the per-capture state are built.
  local root = nil
  if tree.text ~= nil then root = tree:add(vhost_user, tvb()) end
  local raw = tvb:raw()
  problem_count = 0
  local parsed, reason = dissect_pseudo_header(tvb, raw, root)
  if parsed == nil then
    if root then
      root:add(pf["problem"], "capture")
      root:add_proto_expert_info(expert["capture"], reason)
    end
    cols.info = "[" .. reason .. "]"
    return
  end
  local direction = record.direction
  cols.src = direction == 0 and "front-end" or "back-end"
  cols.dst = direction == 0 and "back-end" or "front-end"
  emit(where_text(record.connection, record.channel))
  if record.kind ~= 0 then
    emit(" --- ")
    if record.note then emit(record.note) end
    local connection = record.connection
    if not frame_visited and not interface_field then
      -- Connected while open: numbers restarting in a merged capture of untagged captures, which tshark reads
      -- apart when told to (a tagged capture's connections are keyed by tag and number above: none clash).
      if record.event == C.EVENT_CONNECTED then
        if state.open[connection] then state.reconnected[frame_number] = true end
        state.open[connection] = true
      elseif record.event == C.EVENT_CLOSED then
        state.open[connection] = nil
      end
    end
    if state.reconnected[frame_number] then
      local text = "connection " .. connection .. " connects while open: a merged capture? "
                   .. "VHUSNIFF_SOURCES=1 keys connections by capture source"
      emit("  [" .. text .. "]")
      if root then root:add_proto_expert_info(expert["merged-capture"], text) end
    end
    cols.info = concat(line, "", 1, line_length)
    if root and record.event == C.EVENT_RING then add_ring_sample(root, tvb, raw, record.header_length) end
    local device = record.device
    if device and device ~= "" and FEATURE_NAMES[device] and not frame_visited then
      set_context(record.connection, state.context[record.connection] or 1, device)
    end
    return
  end
  emit(" ")
  emit(DIRECTION_NAMES[direction])
  emit(" ")
  dissect_message(tvb, raw, pinfo, root, record.header_length)
  if record.fd_count > 0 then append_fds(raw, record.fixed, record.fd_count) end
  if record.note then
    emit("  (")
    emit(record.note)
    emit(")")
  end
  for index = 1, problem_count do
    emit(format("  [%s: %s]", problem_codes[index], problem_texts[index]))
  end
  cols.info = concat(line, "", 1, line_length)
end

DissectorTable.get("wtap_encap"):add(wtap.USER0, vhost_user)
'''


def main(argv: list[str] | None = None) -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
