"""The Wireshark dissector, generated from the grammar: `python3 -m vhusniff.views.lua > dissectors/vhost_user.lua`.

The output is data tables (request names, payload candidates, layouts, bit fields, feature names, record
fields, expert items), all derived from protocol.py, catalogue.py, capture.py, expert.py (the expert items'
severities) and filters.RECORD_FIELDS, followed by the fixed Lua body below (LUA_BODY). Nothing in the Lua
declares a field by hand: each ProtoField is made from the FIELDS table. tests/test_dissector.py fails when the
checked-in file differs from this output, cross-checks every field against `protocol.iter_fields` with real
tshark, and checks the expert items' severities against the expert checks.
"""
from __future__ import annotations

import itertools
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
)
from ..model import Channel, Direction, EventKind, RecordKind
from ..protocol import catalogue as cat
from ..protocol import config as config_space
from ..protocol.grammar import (
    FIXED_SIZE,
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    PAYLOADS,
    REGION,
    REGION_XEN,
    DecodeContext,
    payload_candidates,
    request_name,
    request_names,
)
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


def expert_items() -> dict[str, tuple[str, str]]:
    """code -> (Wireshark group, Wireshark severity) for every expert item of the dissector."""
    items = {code: (EXPERT_GROUPS[code], CHECKS[check].severity.name) for code, check in PROBLEM_CHECKS.items()}
    items["capture"] = CAPTURE_EXPERT_ITEM
    return items


def _lua_layout(entries: list[dict]) -> list[dict]:
    """Layout entries as the Lua body walks them (nested element fields live in ELEMENTS, docs in FIELDS)."""
    return [{key: value for key, value in entry.items() if key not in ("fields", "doc")} for entry in entries]


def _constants() -> dict[str, object]:
    """The numbers and names the dissector's fixed body uses (C.NAME in the Lua)."""
    return {
        "HEADER_SIZE": HEADER_SIZE, "TRUNCATED_NAME": request_name(Channel.MAIN, -1),
        # offset, size and flags come before a config message's data
        "GET_CONFIG": int(cat.FrontendRequest.GET_CONFIG),
        "CONFIG_HEADER_SIZE": sum(sub.sizeof() for sub in PAYLOADS["config"][0].subcons[:3]),
        "MAX_PAYLOAD_SIZE": MAX_PAYLOAD_SIZE, "LINKTYPE": LINKTYPE_USER0,
        "FLAG_REPLY": cat.FLAG_REPLY, "FLAG_NEED_REPLY": cat.FLAG_NEED_REPLY,
        "FLAGS_RESERVED": cat.FLAGS_RESERVED, "VERSION_MASK": cat.VERSION_MASK, "VERSION": cat.VERSION,
        "PSEUDO_MAGIC": PSEUDO_MAGIC.decode(), "PSEUDO_FLAG_UNFRAMED": PSEUDO_FLAG_UNFRAMED,
        "PSEUDO_VERSION": PSEUDO_VERSION, "PSEUDO_SIZE_V1": PSEUDO_HEADER_V1.size,
        "PSEUDO_SIZE_V2": PSEUDO_HEADER.size, "V1_DEVICE_MARK": V1_DEVICE_MARK,
        "EVENT_NOTE": int(EventKind.NOTE), "EVENT_CLOSED": int(EventKind.CLOSED),
        "EVENT_CHANNEL_CLOSED": int(EventKind.CHANNEL_CLOSED), "EVENT_DEVICE": int(EventKind.DEVICE),
        "CHANNEL_MAIN": int(Channel.MAIN), "CHANNEL_DEVICE_STATE": int(Channel.DEVICE_STATE),
        "STREAM_NAME": request_name(Channel.DEVICE_STATE, 0), "XEN_MMAP_BIT": XEN_MMAP_BIT,
        "RING_PACKED_BIT": RING_PACKED_BIT,
    }


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
                               "bits": [list(bit) for bit in f.bits]} for f in fields_of_device]
                     for device, fields_of_device in config_space.CONFIG_FIELDS.items()}
    header_bits = [[f"flags.{bit}", mask] for bit, mask in cat.BITFIELDS["flags"].items()]
    layouts = {kind: _lua_layout(walk_layout(structure, prefix, kind))
               for kind, (structure, prefix, _doc) in PAYLOADS.items()}
    elements = {"region": _lua_layout(walk_layout(REGION, "mem.region", "region")),
                "region_xen": _lua_layout(walk_layout(REGION_XEN, "mem.region", "region_xen"))}
    channels = {channel: request_names(channel) for channel in (Channel.MAIN, Channel.BACKEND, Channel.GPU)}
    candidates = {}
    for channel, names in channels.items():
        for request, is_reply, xen, packed in itertools.product(names, (False, True), (False, True), (False, True)):
            ctx = DecodeContext(protocol_features=int(xen) << XEN_MMAP_BIT, features=int(packed) << RING_PACKED_BIT)
            kinds = payload_candidates(channel, request, is_reply, ctx)
            if kinds:
                candidates[f"{int(channel)}:{request}:{int(is_reply)}:{int(xen)}:{int(packed)}"] = list(kinds)
    return {
        "FIELDS": fields,
        "BYTE_FIELDS": byte_fields,
        "HEADER_BITS": header_bits,
        "LAYOUTS": layouts,
        "ELEMENTS": elements,
        "FIXED_SIZE": {kind: size for kind, size in FIXED_SIZE.items() if size is not None},
        "KIND_DOC": {kind: doc for kind, (_s, _p, doc) in PAYLOADS.items()},
        "CANDIDATES": candidates,
        # Device config space (protocol/config.py): each device's fields, and the messages that carry the space
        # ("request:is_reply" on the main channel).
        "CONFIG_FIELDS": config_fields,
        "CONFIG_MESSAGES": {f"{request}:{int(is_reply)}": True for request, is_reply in cat.CONFIG_SPACE_MESSAGES},
        "REQUEST_NAMES": {int(channel): dict(names) for channel, names in channels.items()},
        # Each channel's header rules and framing limits (the GPU socket: no version bits, large UPDATEs).
        "HEADER_RULES": {int(channel): {"version_mask": rule.version_mask, "version": rule.version,
                                        "reserved": rule.reserved, "max_payload": cat.max_payload(channel),
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
        "RECORD_FIELDS": {name: {"type": spec.lua_type, "doc": spec.doc} for name, spec in RECORD_FIELDS.items()
                          if spec.lua_type},
        "PROTOCOL_FEATURES": dict(cat.SPEC_PROFILE.protocol_features),
        "TRANSPORT_FEATURES": dict(cat.TRANSPORT_FEATURES),
        "DEVICE_FEATURES": {device: dict(names) for device, names in cat.DEVICE_FEATURES.items()},
        "DEVICE_STATUS": dict(cat.DEVICE_STATUS),
        # Lua keeps each connection's context in a table keyed by the DecodeContext field names.
        "CONTEXT_RULES": {int(request): {key: value for key, value in vars(rule).items() if value}
                          for request, rule in cat.CONTEXT_RULES.items()},
        # A GET_CONFIG reply whose whole window has one of these sizes tells the device type (context.py).
        "CONFIG_SIZE_DEVICES": {int(size): device for size, device in cat.CONFIG_SIZE_DEVICES.items()},
        "EXPERT_ITEMS": {code: list(levels) for code, levels in expert_items().items()},
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

-- ProtoFields, all made from the generated tables.
local pf = {}      -- name -> ProtoField
local pf_bytes = {}  -- name -> ProtoField of the bytes variant of a name
local field_list = {}
local function make_field(name, spec, pf)
  local abbr = "vhost_user." .. name
  local t = spec.type
  if t == "uint64" then
    pf[name] = ProtoField.uint64(abbr, name, base.HEX, nil, nil, spec.doc)
  elseif t == "uint64_dec" then
    pf[name] = ProtoField.uint64(abbr, name, base.DEC, nil, nil, spec.doc)
  elseif t == "uint32" or t == "uint16" or t == "uint8" then
    pf[name] = ProtoField[t](abbr, name, base.DEC, nil, nil, spec.doc)
  elseif t == "string" then
    pf[name] = ProtoField.string(abbr, name, base.UNICODE, spec.doc)
  elseif t == "bytes" then
    pf[name] = ProtoField.bytes(abbr, name, base.NONE, spec.doc)
  elseif t == "int64" then
    pf[name] = ProtoField.int64(abbr, name, base.DEC, nil, nil, spec.doc)
  elseif t == "request_link" then
    pf[name] = ProtoField.framenum(abbr, name, base.NONE, frametype.REQUEST, nil, spec.doc)
  elseif t == "response_link" then
    pf[name] = ProtoField.framenum(abbr, name, base.NONE, frametype.RESPONSE, nil, spec.doc)
  elseif t == "relative_time" then
    pf[name] = ProtoField.relative_time(abbr, name, spec.doc)
  else
    error("unknown field type " .. t .. " for " .. name)
  end
  field_list[#field_list + 1] = pf[name]
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

-- Per-capture state, filled on the first pass and read on every pass (Wireshark may revisit in any order).
local state = {}
function vhost_user.init()
  state = {
    contexts = {},        -- connection -> {features = UInt64, protocol_features = UInt64, device_type = name}
    frame_context = {},   -- frame -> {xen = bool, packed = bool, device = name}
    pending = {},         -- "connection:channel" -> {frame, request, time}
    response_in = {},     -- request frame -> reply frame
    response_to = {},     -- reply frame -> request frame
    response_time = {},   -- reply frame -> NSTime
  }
end

local function u64_bit(value, bit)
  if value == nil then return false end
  return value:rshift(bit):band(UInt64(1)):tonumber() == 1
end

local function bit_names(value, names)
  local parts = {}
  for bit = 0, 63 do
    if u64_bit(value, bit) then parts[#parts + 1] = names[bit] or ("bit" .. bit) end
  end
  if #parts == 0 then return "0" end
  return table.concat(parts, "|")
end

local function masked(value, mask)
  -- value and mask are Lua numbers below 2^32 (header flags, u8/u32 bit fields)
  local shift = 0
  while bit32.band(mask, bit32.lshift(1, shift)) == 0 do shift = shift + 1 end
  return bit32.rshift(bit32.band(value, mask), shift)
end

local function read_uint(range, width)
  if width <= 4 then return range:le_uint() end
  return range:le_uint64()
end

-- Does `layout` account for exactly `size` bytes at `offset`? Mirrors protocol.decode's "variable kinds must
-- consume every byte" rule. Returns the end offset or nil.
local function measure(layout, tvb, offset, limit)
  local values = {}
  for _, entry in ipairs(layout) do
    if entry.width then
      local count = entry.count or 1
      if offset + entry.width * count > limit then return nil end
      if count == 1 and entry.width <= 4 then values[entry.short] = tvb(offset, entry.width):le_uint() end
      offset = offset + entry.width * count
    elseif entry.bytes then
      if offset + entry.bytes > limit then return nil end
      offset = offset + entry.bytes
    elseif entry.bytes_from then
      local length = values[entry.bytes_from]
      if length == nil or offset + length > limit then return nil end
      offset = offset + length
    elseif entry.rest then
      offset = limit
    elseif entry.element then
      local count = entry.count_from and values[entry.count_from] or 1
      for _ = 1, count do
        offset = measure(ELEMENTS[entry.element], tvb, offset, limit)
        if offset == nil then return nil end
      end
    end
  end
  return offset
end

local function describe_value(name, value)
  local short = name:match("([^.]+)$")
  if short == "features" then
    return bit_names(value, TRANSPORT_FEATURES)
  elseif short == "protocol_features" then
    return bit_names(value, PROTOCOL_FEATURES)
  elseif short == "status" then
    return bit_names(value, DEVICE_STATUS)
  end
  return nil
end

-- Adds the fields of `layout` at `offset`; returns the end offset, or nil when a field would run past the packet
-- (every length is checked before a range is made: a range out of bounds is a Lua error in Wireshark).
local function add_layout(tree, layout, tvb, offset, feature_names)
  local values = {}
  local limit = tvb:len()
  for _, entry in ipairs(layout) do
    if entry.width then
      for _ = 1, entry.count or 1 do
        if offset + entry.width > limit then return nil end
        local range = tvb(offset, entry.width)
        local item = tree:add_le(pf[entry.name], range)
        local value = read_uint(range, entry.width)
        values[entry.short] = value
        local names = entry.short == "features" and feature_names or nil
        local text = names and bit_names(value, names) or describe_value(entry.name, value)
        if text then item:append_text(" (" .. text .. ")") end
        for _, bit in ipairs(entry.bits) do
          -- every bit-field mask of the grammar lies in the low 32 bits
          item:add(pf[bit[1]], range, masked(tvb(offset, math.min(entry.width, 4)):le_uint(), bit[2]))
        end
        offset = offset + entry.width
      end
    elseif entry.bytes or entry.bytes_from or entry.rest then
      local length = entry.bytes or (entry.bytes_from and values[entry.bytes_from]) or (limit - offset)
      if type(length) ~= "number" or length < 0 or offset + length > limit then return nil end
      tree:add(pf_bytes[entry.name], tvb(offset, length))
      offset = offset + length
    elseif entry.element then
      local count = entry.count_from and values[entry.count_from] or 1
      for index = 1, count do
        local start = offset
        local subtree = tree:add(vhost_user, tvb(offset, 0), entry.name .. "[" .. (index - 1) .. "]")
        offset = add_layout(subtree, ELEMENTS[entry.element], tvb, offset, feature_names)
        if offset == nil then return nil end
        subtree:set_len(offset - start)
      end
    end
  end
  return offset
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

-- The pseudo-header: returns record info, or nil plus a reason.
local function dissect_pseudo_header(tvb, tree)
  if tvb:len() < 8 or tvb(0, 4):string() ~= C.PSEUDO_MAGIC then
    return nil, "packet does not start with the vhusniff pseudo-header (magic VHUS)"
  end
  local version = tvb(4, 2):le_uint()
  local header_length = tvb(6, 2):le_uint()
  local header_tree = tree:add(vhost_user, tvb(0, math.min(header_length, tvb:len())), "vhusniff pseudo-header")
  header_tree:add_le(pf["pseudo.version"], tvb(4, 2))
  header_tree:add_le(pf["pseudo.header_length"], tvb(6, 2))
  if version ~= 1 and version ~= C.PSEUDO_VERSION then
    return nil, "unknown pseudo-header version " .. version .. " (this dissector reads 1, " .. C.PSEUDO_VERSION .. ")"
  end
  local fixed = version == 1 and C.PSEUDO_SIZE_V1 or C.PSEUDO_SIZE_V2
  if tvb:len() < fixed or header_length > tvb:len() then
    return nil, "pseudo-header of " .. header_length .. " bytes in a " .. tvb:len() .. "-byte packet"
  end
  if header_length < fixed then
    return nil, "pseudo-header length " .. header_length .. " is shorter than its fixed part (" .. fixed .. " bytes)"
  end
  local record = {
    header_length = header_length,
    connection = tvb(8, 4):le_uint(),
    kind = tvb(12, 1):uint(),
    channel = tvb(13, 1):uint(),
    direction = tvb(14, 1):uint(),
    flags = tvb(15, 1):uint(),
    fd_count = tvb(16, 2):le_uint(),
    note_length = tvb(18, 2):le_uint(),
    fd_kinds = {},
  }
  header_tree:add_le(pf["connection"], tvb(8, 4))
  header_tree:add(pf["record_kind"], tvb(12, 1), RECORD_KIND_NAMES[record.kind] or tostring(record.kind))
  header_tree:add(pf["channel"], tvb(13, 1), CHANNEL_NAMES[record.channel] or tostring(record.channel))
  header_tree:add(pf["direction"], tvb(14, 1), DIRECTION_NAMES[record.direction] or tostring(record.direction))
  header_tree:add(pf["unframed"], tvb(15, 1), bit32.band(record.flags, C.PSEUDO_FLAG_UNFRAMED))
  header_tree:add_le(pf["fds"], tvb(16, 2))
  if version ~= 1 and record.kind ~= 0 then
    record.event = tvb(20, 1):uint()
    header_tree:add(pf["event"], tvb(20, 1), EVENT_KIND_NAMES[record.event] or tostring(record.event))
  end
  local position = fixed
  for index = 1, record.fd_count do
    if position + 24 > header_length then return nil, "fd descriptions run past the pseudo-header" end
    local name_length = tvb(position + 1, 1):uint()
    if position + 24 + name_length > header_length then
      return nil, "fd name of " .. name_length .. " bytes runs past the pseudo-header"
    end
    local fd_tree = header_tree:add(vhost_user, tvb(position, 24 + name_length), "fd[" .. (index - 1) .. "]")
    local kind = FD_KIND_NAMES[tvb(position, 1):uint()] or "unknown"
    record.fd_kinds[#record.fd_kinds + 1] = kind
    fd_tree:add(pf["fd.kind"], tvb(position, 1), kind)
    fd_tree:add_le(pf["fd.seals"], tvb(position + 2, 2))
    fd_tree:add_le(pf["fd.inode"], tvb(position + 8, 8))
    fd_tree:add_le(pf["fd.size"], tvb(position + 16, 8))
    local text = kind
    if name_length > 0 then
      local name = tvb(position + 24, name_length):string(ENC_UTF_8)
      fd_tree:add(pf["fd.name"], tvb(position + 24, name_length), name)
      text = text .. ":" .. name
    end
    fd_tree:append_text(": " .. text)
    position = position + 24 + name_length
  end
  if position + record.note_length > header_length then return nil, "note runs past the pseudo-header" end
  if record.note_length > 0 then
    record.note = tvb(position, record.note_length):string(ENC_UTF_8)
    header_tree:add(pf["note"], tvb(position, record.note_length), record.note)
  end
  if version == 1 and record.kind ~= 0 then
    record.event, record.device = migrate_v1_event(record.note or "", record.channel)
    header_tree:add(pf["event"], EVENT_KIND_NAMES[record.event]):set_generated()
  elseif record.event == C.EVENT_DEVICE then
    record.device = record.note
  end
  if CHANNEL_NAMES[record.channel] == nil or DIRECTION_NAMES[record.direction] == nil
      or RECORD_KIND_NAMES[record.kind] == nil then
    return nil, "bad pseudo-header field"
  end
  return record
end

local function problem(tree, item, code, text)
  tree:add(pf["problem"], code)
  tree:add_proto_expert_info(expert[code], code .. ": " .. text)
  return code
end

-- The negotiated context this frame decodes in (first pass: the connection's state so far).
local function frame_context(pinfo, record)
  local context = state.frame_context[pinfo.number]
  if context == nil then
    local connection = state.contexts[record.connection] or {}
    context = {
      xen = u64_bit(connection.protocol_features, C.XEN_MMAP_BIT),
      packed = u64_bit(connection.features, C.RING_PACKED_BIT),
      device = connection.device_type,
    }
    state.frame_context[pinfo.number] = context
  end
  return context
end

-- A fixed-width payload field's value (UInt64), found by walking the payload kind's layout; nil if absent.
local function payload_value(layout, tvb, offset, short)
  for _, entry in ipairs(layout) do
    if not entry.width or entry.count then return nil end
    if entry.short == short then
      if offset + entry.width > tvb:len() then return nil end
      return tvb(offset, entry.width):le_uint64()
    end
    offset = offset + entry.width
  end
  return nil
end

local function observe_config_window(record, request, kind, tvb, start)
  -- A GET_CONFIG reply whose window is a whole config space only one device type has tells the type.
  if request ~= C.GET_CONFIG or kind ~= "config" then return end
  local connection = state.contexts[record.connection] or {}
  state.contexts[record.connection] = connection
  if connection.device_type ~= nil then return end
  local offset = payload_value(LAYOUTS[kind], tvb, start, "offset")
  local size = payload_value(LAYOUTS[kind], tvb, start, "size")
  if offset == nil or size == nil or offset ~= UInt64(0) then return end
  local device = CONFIG_SIZE_DEVICES[size:tonumber()]
  if device ~= nil and tvb:len() - start - C.CONFIG_HEADER_SIZE == size:tonumber() then
    connection.device_type = device
  end
end

local function observe(pinfo, record, request, is_reply, kind, tvb, start)
  -- After the frame: the requests of CONTEXT_RULES change how later frames of the connection decode.
  if pinfo.visited or record.channel ~= C.CHANNEL_MAIN or kind == nil then return end
  if is_reply then
    observe_config_window(record, request, kind, tvb, start)
    return
  end
  local rule = CONTEXT_RULES[request]
  if rule == nil then return end
  local connection = state.contexts[record.connection] or {}
  state.contexts[record.connection] = connection
  if rule.payload_field then
    connection[rule.context_field] = payload_value(LAYOUTS[kind], tvb, start, rule.payload_field)
  elseif connection[rule.context_field] == nil then
    connection[rule.context_field] = rule.value
  end
end

local function link(pinfo, tree, record, request, is_reply)
  local key = record.connection .. ":" .. record.channel
  if not pinfo.visited then
    if not is_reply then
      state.pending[key] = {frame = pinfo.number, request = request, time = pinfo.abs_ts}
    else
      local pending = state.pending[key]
      if pending and pending.request == request then
        state.response_in[pending.frame] = pinfo.number
        state.response_to[pinfo.number] = pending.frame
        state.response_time[pinfo.number] = pinfo.abs_ts - pending.time
        state.pending[key] = nil
      end
    end
  end
  if state.response_in[pinfo.number] then
    tree:add(pf["response_in"], state.response_in[pinfo.number])
  end
  if state.response_to[pinfo.number] then
    tree:add(pf["response_to"], state.response_to[pinfo.number])
    local seconds = state.response_time[pinfo.number]
    tree:add(pf["response_time"], NSTime(math.floor(seconds), math.floor((seconds % 1) * 1e9 + 0.5)))
  end
end

-- The device config space fields a config payload's window {offset, size, flags, data} covers whole.
local function add_config_space(tree, tvb, body, device)
  local fields = CONFIG_FIELDS[device]
  if fields == nil then return end
  local window = tvb(body, 4):le_uint()
  local size = tvb(body + 4, 4):le_uint()
  local data = body + 12
  for _, field in ipairs(fields) do
    if window <= field.offset and field.offset + field.length <= window + size then
      local range = tvb(data + field.offset - window, field.length)
      if field.is_bytes then
        tree:add(pf_bytes[field.name], range)
      else
        local item = tree:add_le(pf[field.name], range)
        for _, bit in ipairs(field.bits) do
          item:add(pf[bit[1]], range, masked(tvb(data + field.offset - window, math.min(field.length, 4)):le_uint(),
                                             bit[2]))
        end
      end
    end
  end
end

local function choose_kind(tvb, start, size, kinds)
  for _, kind in ipairs(kinds) do
    local fixed = FIXED_SIZE[kind]
    if fixed ~= nil then
      if fixed == size then return kind end
    elseif measure(LAYOUTS[kind], tvb, start, start + size) == start + size then
      return kind
    end
  end
  return nil
end

local function dissect_message(tvb, pinfo, tree, record, start)
  local length = tvb:len() - start
  local channel_names = REQUEST_NAMES[record.channel] or {}
  if record.channel == C.CHANNEL_DEVICE_STATE then
    -- SET_DEVICE_STATE_FD's pipe: the back-end's opaque migration stream, no vhost-user header.
    tree:add(pf["name"], C.STREAM_NAME)
    if length > 0 then tree:add(pf_bytes["payload"], tvb(start, length)) end
    pinfo.cols.info:append(C.STREAM_NAME .. " " .. length .. " bytes (opaque)")
    return
  end
  if length < C.HEADER_SIZE then
    tree:add(pf["name"], C.TRUNCATED_NAME)
    problem(tree, nil, "truncated-header", length .. " bytes, a header needs " .. C.HEADER_SIZE)
    pinfo.cols.info:append(C.TRUNCATED_NAME)
    return
  end
  local request = tvb(start, 4):le_uint()
  local flags = tvb(start + 4, 4):le_uint()
  local size = tvb(start + 8, 4):le_uint()
  local name = channel_names[request] or ("UNKNOWN_" .. request)
  local is_reply = bit32.band(flags, C.FLAG_REPLY) ~= 0
  tree:add(pf["name"], tvb(start, 4), name)
  tree:add_le(pf["request"], tvb(start, 4)):append_text(" (" .. name .. ")")
  local flags_item = tree:add_le(pf["flags"], tvb(start + 4, 4))
  for _, bit in ipairs(HEADER_BITS) do
    flags_item:add(pf[bit[1]], tvb(start + 4, 4), masked(flags, bit[2]))
  end
  tree:add_le(pf["size"], tvb(start + 8, 4))
  local info = name .. (is_reply and " reply" or "")
  local problems = {}
  local rule = HEADER_RULES[record.channel] or HEADER_RULES[C.CHANNEL_MAIN]
  if bit32.band(flags, rule.reserved) ~= 0 then
    problems[#problems + 1] = problem(tree, flags_item, "reserved-flags",
      string.format("reserved flag bits set: 0x%x", bit32.band(flags, rule.reserved)))
  end
  if bit32.band(flags, rule.version_mask) ~= rule.version then
    problems[#problems + 1] = problem(tree, flags_item, "bad-version",
      "version " .. bit32.band(flags, rule.version_mask) .. ", expected " .. rule.version)
  end
  local limit = rule.request_max[request] or rule.max_payload
  if size > limit then
    problems[#problems + 1] = problem(tree, nil, "oversize", "size " .. size .. " exceeds the maximum " .. limit)
  end
  local body = start + C.HEADER_SIZE
  local body_length = length - C.HEADER_SIZE
  local kind = nil
  if body_length ~= size then
    problems[#problems + 1] = problem(tree, nil, "size-mismatch",
      "header says " .. size .. " payload bytes, " .. body_length .. " present")
  else
    local context = frame_context(pinfo, record)
    local key = record.channel .. ":" .. request .. ":" .. (is_reply and 1 or 0) .. ":" ..
                (context.xen and 1 or 0) .. ":" .. (context.packed and 1 or 0)
    local kinds = CANDIDATES[key]
    if kinds == nil then
      problems[#problems + 1] = problem(tree, nil, "unknown-request",
        "request " .. request .. " is not known on the " .. (CHANNEL_NAMES[record.channel] or "?") .. " channel")
    else
      kind = choose_kind(tvb, body, size, kinds)
      if kind == nil then
        problems[#problems + 1] = problem(tree, nil, "payload-layout",
          size .. "-byte payload fits no layout of this message (expected " .. table.concat(kinds, " or ") .. ")")
      end
    end
  end
  if kind ~= nil then
    tree:add(pf["kind"], kind)
    local context = frame_context(pinfo, record)
    local feature_names = TRANSPORT_FEATURES
    if context.device and DEVICE_FEATURES[context.device] then
      feature_names = {}
      for bit, bit_name in pairs(TRANSPORT_FEATURES) do feature_names[bit] = bit_name end
      for bit, bit_name in pairs(DEVICE_FEATURES[context.device]) do feature_names[bit] = bit_name end
    end
    local layout_end
    local payload_tree = tree
    if size > 0 then
      payload_tree = tree:add(vhost_user, tvb(body, size), "payload: " .. KIND_DOC[kind])
    end
    layout_end = add_layout(payload_tree, LAYOUTS[kind], tvb, body, feature_names)
    if layout_end == nil then
      problems[#problems + 1] = problem(tree, nil, "payload-layout", "a field runs past the packet")
      kind = nil
    elseif kind == "config" and record.channel == C.CHANNEL_MAIN and context.device
        and CONFIG_MESSAGES[request .. ":" .. (is_reply and 1 or 0)] then
      add_config_space(payload_tree, tvb, body, context.device)
    end
  elseif body_length > 0 or (body_length == 0 and size == 0) then
    tree:add(pf_bytes["payload"], tvb(body, body_length))
  end
  for _, code in ipairs(problems) do info = info .. " [" .. code .. "]" end
  pinfo.cols.info:append(info)
  link(pinfo, tree, record, request, is_reply)
  observe(pinfo, record, request, is_reply, kind, tvb, body)
end

function vhost_user.dissector(tvb, pinfo, tree)
  pinfo.cols.protocol = "vhost-user"
  pinfo.cols.info:clear()
  local root = tree:add(vhost_user, tvb())
  local record, reason = dissect_pseudo_header(tvb, root)
  if record == nil then
    root:add(pf["problem"], "capture")
    root:add_proto_expert_info(expert["capture"], reason)
    pinfo.cols.info:set("[" .. reason .. "]")
    return
  end
  local where = "c" .. record.connection
  if record.channel ~= C.CHANNEL_MAIN then where = where .. "/" .. CHANNEL_NAMES[record.channel] end
  pinfo.cols.src = record.direction == 0 and "front-end" or "back-end"
  pinfo.cols.dst = record.direction == 0 and "back-end" or "front-end"
  pinfo.cols.info:set(where .. " " .. DIRECTION_NAMES[record.direction] .. " ")
  if record.kind ~= 0 then
    local note = record.note or ""
    pinfo.cols.info:append("--- " .. note)
    local device = record.device
    if device and DEVICE_FEATURES[device] and not pinfo.visited then
      local connection = state.contexts[record.connection] or {}
      connection.device_type = device
      state.contexts[record.connection] = connection
    end
    return
  end
  dissect_message(tvb, pinfo, root, record, record.header_length)
  if record.fd_count > 0 then
    pinfo.cols.info:append("  fds=" .. table.concat(record.fd_kinds, ","))
  end
  if record.note then pinfo.cols.info:append("  (" .. record.note .. ")") end
end

DissectorTable.get("wtap_encap"):add(wtap.USER0, vhost_user)
'''


def main(argv: list[str] | None = None) -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
