"""Field catalogue and Wireshark-style display filters for `vhusniff read -Y`.

The field names are those of `protocol.iter_fields` (derived from the grammar; see `grammar_fields`) plus the
record fields below (connection, channel, fds, ...). The Lua dissector registers the same names under
`vhost_user.`, so a filter reads the same in both tools:

    request == SET_MEM_TABLE && flags.need_reply
    vring.index == 1 || !(channel == main)
    protocol_features & REPLY_ACK
    request in {GET_FEATURES SET_FEATURES 20..22}
    fd.kind contains "mem" and mem.region.memory_size >= 0x100000
"""
from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

from construct import Array, Bytes, BytesInteger, FormatField, GreedyBytes, Renamed, Struct

from ..dataplane.sample import NO_BASE, RingSample, SampleError, unpack_sample
from ..model import Channel, EventKind, RecordKind
from ..protocol import catalogue as cat
from ..protocol import config as config_space
from ..protocol.grammar import HEADER, PAYLOADS, REGION_XEN, iter_fields, request_names

_FORMAT_WIDTH = {"<B": 1, "B": 1, "<H": 2, "<L": 4, "<Q": 8}


# --- the field catalogue ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecordField:
    """A field of the record around a message (pseudo-header, fds) or of the reading (number, links)."""
    doc: str
    lua_type: str | None                             # ProtoField type in the dissector; None: Wireshark has it
    value: Callable[[Any, Any, int], list] | None    # (message, record, number) -> values; None: Lua only


def _ring_sample(record) -> RingSample | None:
    if record.kind != RecordKind.EVENT or record.event != EventKind.RING:
        return None
    try:
        return unpack_sample(record.data)
    except SampleError:
        return None


def _ring_getter(filter_name: str) -> Callable[[Any, Any, int], list]:
    """The values of a ring.* field: the sample's attribute (enums by name, no base before the ring stopped)."""
    attribute = {"ring.index": "ring"}.get(filter_name, filter_name.removeprefix("ring."))

    def values(message, record, number) -> list:
        sample = _ring_sample(record)
        if sample is None:
            return []
        value = getattr(sample, attribute)
        if attribute == "pending":
            return list(value)
        if attribute == "base" and value == NO_BASE:
            return []
        return [value.name] if isinstance(value, enum.Enum) else [value]
    return values


RECORD_FIELDS = {
    "frame.number": RecordField("position of the record in the capture, from 1", None,
                                lambda m, r, n: [n]),
    "connection": RecordField("connection number, one per front-end connection (unique across the sources of a "
                              "merged capture)", "uint32", lambda m, r, n: [r.connection]),
    # Not in the dissector yet (lua_type None): it reads the source from the interface's description.
    "source": RecordField("where the record was captured: host=NAME pid=N start=TIME [route=...]", None,
                          lambda m, r, n: [r.source] if r.source else []),
    "source_tag": RecordField("the 24-bit tag of the record's source in its pseudo-header (what plain tshark keys "
                              "connections by); absent when the capture does not tag its source", "uint24",
                              lambda m, r, n: [r.source_tag] if r.source_tag else []),
    "channel": RecordField("main, backend, gpu or device_state", "string",
                           lambda m, r, n: [r.channel.name.lower()]),
    "direction": RecordField("F>B (front-end to back-end) or B>F", "string", lambda m, r, n: [r.direction.arrow]),
    "record_kind": RecordField("message or event", "string", lambda m, r, n: [r.kind.name.lower()]),
    "unframed": RecordField("1 when the bytes are not one well-framed message", "uint8",
                            lambda m, r, n: [int(r.unframed)]),
    "event": RecordField("what an event record says happened: CONNECTED, CLOSED, HALF_CLOSED, CHANNEL_OPENED, "
                         "CHANNEL_CLOSED, PROTOCOL_ERROR, TARGET_DOWN, TARGET_UP, RESOURCE, HOOK, DEVICE, PEER "
                         "or NOTE", "string",
                         lambda m, r, n: [r.event.name] if r.kind == RecordKind.EVENT else []),
    "fds": RecordField("number of fds passed with the message", "uint16", lambda m, r, n: [len(r.fds)]),
    "fd.kind": RecordField("what an fd was: memfd, eventfd, socket, ...", "string",
                           lambda m, r, n: [fd.kind for fd in r.fds]),
    "fd.inode": RecordField("inode of an fd", "uint64", lambda m, r, n: [fd.inode for fd in r.fds]),
    "fd.size": RecordField("memfd or file size, -1 unknown", "int64", lambda m, r, n: [fd.size for fd in r.fds]),
    "fd.name": RecordField("memfd name, path, socket type or anon-inode name", "string",
                           lambda m, r, n: [fd.name for fd in r.fds if fd.name]),
    "fd.seals": RecordField("F_GET_SEALS bits of a memfd", "uint16", lambda m, r, n: [fd.seals for fd in r.fds]),
    "note": RecordField("why a record is not a well-framed message, or event text", "string",
                        lambda m, r, n: [r.note] if r.note else []),
    "name": RecordField("request name on its channel", "string", lambda m, r, n: [m.name] if m else []),
    "kind": RecordField("payload kind chosen by the decoder", "string",
                        lambda m, r, n: [m.kind] if m and m.kind else []),
    "problem": RecordField("code of something wrong with the message", "string",
                           lambda m, r, n: [p.code for p in m.problems] if m else []),
    # Ring samples (--rings, --notifications): the fields of a RING event's sample (dataplane.sample), in the
    # dissector too (a "Ring sample" subtree).
    **{name: RecordField(doc, lua_type, _ring_getter(name)) for name, (doc, lua_type) in {
        "ring.index": ("the ring a RING event samples", "uint16"),
        "ring.layout": ("the ring's layout: SPLIT or PACKED", "string"),
        "ring.reason": ("why the sample was taken: PERIODIC, STARTED, STOPPED, KICK, FINAL, UNMAPPED", "string"),
        "ring.avail_idx": ("the avail index the driver had published (split rings)", "uint16"),
        "ring.used_idx": ("the used index the device had published (split rings)", "uint16"),
        "ring.avail_flags": ("the avail ring's flags (packed: the driver event area's flags)", "uint16"),
        "ring.used_flags": ("the used ring's flags (packed: the device event area's flags)", "uint16"),
        "ring.used_event": ("used_event, when RING_EVENT_IDX is negotiated", "uint16"),
        "ring.avail_event": ("avail_event, when RING_EVENT_IDX is negotiated", "uint16"),
        "ring.num": ("the ring's size (SET_VRING_NUM)", "uint16"),
        "ring.in_flight": ("requests made available and not yet used", "uint16"),
        "ring.base": ("GET_VRING_BASE's answer, once the ring is stopped", "uint32"),
        "ring.kicks": ("kicks counted on the ring so far (--notifications)", "uint32"),
        "ring.calls": ("calls counted on the ring so far (--notifications)", "uint32"),
        "ring.pending": ("a request in flight, decoded from guest memory (one per request shown)", "string"),
    }.items()},
    "pseudo.version": RecordField("pseudo-header version", "uint16", None),
    "pseudo.header_length": RecordField("pseudo-header length in bytes", "uint16", None),
    "response_in": RecordField("frame of the reply to this request", "response_link", None),
    "response_to": RecordField("frame of the request this reply answers", "request_link", None),
    "response_time": RecordField("time from request to reply", "relative_time", None),
}


def _strip(subcon):
    while isinstance(subcon, Renamed):
        subcon = subcon.subcon
    return subcon


def _element_key(structure: Struct) -> str:
    return "region_xen" if structure is REGION_XEN else "region"


def _expression_name(expression) -> str:
    """`this.nregions` (construct renders it `this['nregions']`) -> `nregions`."""
    return re.findall(r"[A-Za-z_]\w*", str(expression))[-1]


def walk_layout(structure: Struct, prefix: str, kind_key: str) -> list[dict]:
    """A payload Struct as plain layout entries (what the Lua dissector walks), one per named field.

    Entry keys: name (dotted), short, and one of width [+count] (integers), bytes, bytes_from, rest, element
    [+count_from] (nested structs); integer entries carry `bits`: [[dotted bit-field name, mask], ...].
    """
    entries = []
    for sub in structure.subcons:
        if sub.name is None:
            continue
        inner = _strip(sub)
        entry: dict = {"name": f"{prefix}.{sub.name}" if prefix else sub.name, "short": sub.name,
                       "doc": (sub.docs or sub.name).split("\n")[0]}
        if isinstance(inner, FormatField):
            entry["width"] = _FORMAT_WIDTH[inner.fmtstr]
        elif isinstance(inner, BytesInteger):
            entry["width"] = inner.length
        elif isinstance(inner, Bytes):
            if isinstance(inner.length, int):
                entry["bytes"] = inner.length
            else:
                entry["bytes_from"] = _expression_name(inner.length)
        elif inner is GreedyBytes:
            entry["rest"] = True
        elif isinstance(inner, Struct):
            entry["element"] = _element_key(inner)
            entry["fields"] = walk_layout(inner, entry["name"], entry["element"])
        elif isinstance(inner, Array) and isinstance(_strip(inner.subcon), Struct):
            entry["element"] = _element_key(_strip(inner.subcon))
            entry["count_from"] = _expression_name(inner.count)
            entry["fields"] = walk_layout(_strip(inner.subcon), entry["name"], entry["element"])
        elif isinstance(inner, Array) and isinstance(_strip(inner.subcon), FormatField):
            entry["width"] = _FORMAT_WIDTH[_strip(inner.subcon).fmtstr]
            entry["count"] = inner.count
        else:
            raise TypeError(f"no layout entry for {inner!r} ({entry['name']})")
        if "width" in entry:
            bits: Mapping[str, int] = cat.BITFIELDS.get(f"{kind_key}.{sub.name}", {})
            entry["bits"] = [[f"{entry['name']}.{bit}", mask] for bit, mask in bits.items()]
        entries.append(entry)
    return entries


@dataclass(frozen=True)
class GrammarField:
    """A dotted name the decoder yields, with its widest integer width (0: never an integer) and whether some
    payload kind has it as bytes (`shmem.padding` is bytes in mmap, u32 in shmem_config)."""
    width: int
    doc: str
    is_bytes: bool = False
    is_bits: bool = False      # a bit field (flags.need_reply): a bare name in a filter means "set"


@lru_cache(maxsize=1)
def grammar_fields() -> dict[str, GrammarField]:
    """Every name `iter_fields` can yield, with its type: the header, then every payload kind."""
    fields: dict[str, GrammarField] = {}

    def register(name: str, width: int, doc: str, is_bits: bool = False) -> None:
        old = fields.get(name) or GrammarField(0, doc)
        fields[name] = GrammarField(max(width, old.width), old.doc, old.is_bytes or width == 0, is_bits)

    def register_entries(entries):
        for entry in entries:
            if "fields" in entry:
                register_entries(entry["fields"])
                continue
            register(entry["name"], entry.get("width", 0), entry["doc"])
            for bit_name, _mask in entry.get("bits", ()):
                register(bit_name, min(entry["width"], 4), f"bit field of {entry['short']}", True)  # masks < 2**32

    register_entries(walk_layout(HEADER, "", "header"))
    for bit, _mask in cat.BITFIELDS["flags"].items():
        register(f"flags.{bit}", 4, "header flag bits", True)
    register("payload", 0, "payload kept as raw bytes (no layout fits)")
    for kind, (structure, prefix, _doc) in PAYLOADS.items():
        register_entries(walk_layout(structure, prefix, kind))
    for name, field in config_space.FIELD_BY_NAME.items():     # device config space, per device type
        is_bit = name != field.name
        register(name, 0 if field.is_bytes else (min(field.length, 4) if is_bit else field.length), field.doc, is_bit)
    return fields


# --- display filters -------------------------------------------------------------------------------------------

class FilterError(ValueError):
    """A filter that does not compile; str() shows the filter with a caret under the fault."""

    def __init__(self, text: str, position: int, reason: str):
        self.text, self.position, self.reason = text, position, reason
        shown = re.sub(r"\s", " ", text)      # a newline or tab in the filter would put the caret off its place
        super().__init__(f"{reason}\n  {shown}\n  {' ' * position}^")


_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<op>==|!=|<=|>=|&&|\|\||[<>!&(){},])
  | (?P<word>[FB]>[FB]|[A-Za-z0-9_.:\-/]+)
""", re.VERBOSE)
_WORD_OPERATORS = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">=", "and": "&&", "or": "||",
                   "not": "!"}
_COMPARISONS = ("==", "!=", "<", "<=", ">", ">=")
# Deeper parentheses are refused with a FilterError: each level costs Python stack when compiling and matching.
MAX_NESTING = 100


@dataclass
class _Token:
    kind: str        # op, word, string, end
    text: str
    position: int


def _tokenize(text: str) -> list[_Token]:
    tokens, position = [], 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise FilterError(text, position, f"unexpected character {text[position]!r}")
        kind = match.lastgroup
        assert kind is not None         # every alternative of _TOKEN is a named group
        value = match.group()
        if kind == "word" and value.lower() in _WORD_OPERATORS:
            kind, value = "op", _WORD_OPERATORS[value.lower()]
        elif kind == "word" and value in ("contains", "matches", "in"):
            kind = "op"
        if kind != "space":
            tokens.append(_Token(kind, value, position))
        position = match.end()
    tokens.append(_Token("end", "", len(text)))
    return tokens


class _Requests:
    """A request literal: the (channel, number) pairs a name means (IOTLB_MSG is 22 on main, 1 on backend)."""

    def __init__(self, pairs: set[tuple[int, int]]):
        self.pairs = pairs


def _request_pairs(word: str) -> set[tuple[int, int]]:
    word = word.upper()
    pairs: set[tuple[int, int]] = set()
    profile = cat.SPEC_PROFILE
    for channel in (Channel.MAIN, Channel.BACKEND, Channel.GPU):
        pairs.update((int(channel), number) for number, name in request_names(channel, profile).items()
                     if name == word)
    alias = cat.REQUEST_ALIASES.get(word)
    if alias is not None:
        channel = Channel.MAIN if isinstance(alias, cat.FrontendRequest) else Channel.BACKEND
        pairs.add((int(channel), int(alias)))
    return pairs


# The value `get` returns for this key is the message's device type (what device-specific bit names mean).
DEVICE_TYPE_FIELD: Final = "\0device_type"


class _Unresolved(enum.Enum):
    """The compiler's device before a comparison is known to depend on one (None is a device: type unknown)."""
    DEVICE = "unresolved"


_UNRESOLVED: Final = _Unresolved.DEVICE


class _NoMeaning(Exception):
    """A bit name that means nothing for the device type being compiled for."""


def _never(get) -> bool:
    return False


_BYTES_LITERAL = re.compile(r"^[0-9A-Fa-f]{2}([:\-.][0-9A-Fa-f]{2})*$")


class _Compiler:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.index = 0
        self.depth = 0                  # parentheses open around the current token
        self.device: str | None | _Unresolved = _UNRESOLVED  # the device type bit names are read for (see comparison)
        self.per_device = False         # the comparison being compiled named a device-specific bit
        self.fields = grammar_fields()

    # token helpers
    def peek(self) -> _Token:
        return self.tokens[self.index]

    def take(self) -> _Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def error(self, token: _Token, reason: str) -> FilterError:
        return FilterError(self.text, token.position, reason)

    def expect(self, text: str) -> _Token:
        token = self.take()
        if token.text != text or token.kind not in ("op",):
            raise self.error(token, f"expected {text!r}" + (f", found {token.text!r}" if token.text else ""))
        return token

    # grammar
    def compile(self):
        if self.peek().kind == "end":
            raise self.error(self.peek(), "empty filter")
        predicate = self.or_expression()
        if self.peek().kind != "end":
            raise self.error(self.peek(), f"unexpected {self.peek().text!r}")
        return predicate

    def or_expression(self):
        # n-ary, not nested: a 1,000-term chain is one list, at parse time and at match time
        operands = [self.and_expression()]
        while self.peek().text == "||" and self.peek().kind == "op":
            self.take()
            operands.append(self.and_expression())
        if len(operands) == 1:
            return operands[0]
        return lambda get: any(operand(get) for operand in operands)

    def and_expression(self):
        operands = [self.not_expression()]
        while self.peek().text == "&&" and self.peek().kind == "op":
            self.take()
            operands.append(self.not_expression())
        if len(operands) == 1:
            return operands[0]
        return lambda get: all(operand(get) for operand in operands)

    def not_expression(self):
        negations = 0                   # counted, not recursed: `!!!!x` is x
        while self.peek().text == "!" and self.peek().kind == "op":
            self.take()
            negations += 1
        inner = self.primary()
        if negations % 2:
            return lambda get: not inner(get)
        return inner

    def primary(self):
        token = self.peek()
        if token.kind == "op" and token.text == "(":
            if self.depth >= MAX_NESTING:
                raise self.error(token, f"parentheses nested deeper than {MAX_NESTING} levels")
            self.take()
            self.depth += 1
            inner = self.or_expression()
            self.expect(")")
            self.depth -= 1
            return inner
        start = self.index
        self.per_device = False
        predicate = self.comparison()
        if not self.per_device:
            return predicate
        # `features & MQ`: MQ is blk's bit 12 and net's bit 22. The comparison is compiled once per device type
        # (a handful, from the catalogue) and each message is matched by its own session's device type.
        end = self.index
        by_device = {}
        for device in (None, *cat.DEVICE_TYPES):
            self.index, self.device = start, device
            try:
                by_device[device] = self.comparison()
            except _NoMeaning:
                by_device[device] = _never
        self.index, self.device = end, _UNRESOLVED
        return lambda get: by_device.get(get(DEVICE_TYPE_FIELD), _never)(get)

    def comparison(self):
        field = self.field_name()
        operator = self.peek()
        if operator.kind != "op" or operator.text not in (*_COMPARISONS, "contains", "matches", "in", "&"):
            if field in self.fields and self.fields[field].is_bits:
                return lambda get: any(get(field))
            return lambda get: bool(get(field))
        self.take()
        if operator.text == "in":
            members = self.set_literal(field)
            return lambda get: any(any(_equal(v, m) for m in members) for v in get(field))
        if operator.text == "&":
            mask = self.literal(field)
            if not isinstance(mask, int):
                raise self.error(self.tokens[self.index - 1], "a bit mask must be a number or a bit name")
            after = self.peek()
            if after.kind == "op" and after.text in _COMPARISONS:
                self.take()
                compare = _COMPARE[after.text]
                target = self.literal(field)
                return lambda get: any(compare(v & mask, target) for v in get(field) if isinstance(v, int))
            return lambda get: any(v & mask for v in get(field) if isinstance(v, int))
        if operator.text == "contains":
            needle = self.literal(field, want_bytes=True)
            return lambda get: any(_contains(v, needle) for v in get(field))
        if operator.text == "matches":
            token = self.take()
            if token.kind != "string":
                raise self.error(token, "matches needs a quoted regular expression")
            expression = self.unquote(token)
            try:
                pattern = re.compile(expression)
            except re.error as error:
                raise self.error(token, f"bad regular expression: {error}") from None
            except (RecursionError, OverflowError, MemoryError):   # re's parser recurses once per group level
                raise self.error(token, "bad regular expression: nested too deeply or too large") from None
            return lambda get: any(pattern.search(_as_text(v)) for v in get(field))
        value = self.literal(field)
        compare = _COMPARE[operator.text]
        if operator.text == "!=":       # Wireshark 4: a != b is !(a == b): no value equals
            return lambda get: not any(_equal(v, value) for v in get(field))
        return lambda get: any(compare(v, value) for v in get(field))

    def field_name(self) -> str:
        token = self.take()
        if token.kind != "word":
            raise self.error(token, "expected a field name" + (f", found {token.text!r}" if token.text else ""))
        name = token.text[len("vhost_user."):] if token.text.startswith("vhost_user.") else token.text
        if name in self.fields:
            return name
        spec = RECORD_FIELDS.get(name)
        if spec is not None and spec.value is not None:
            return name
        if any(field.startswith(name + ".") for field in self.fields):     # a group: mem.region
            return name + "."
        raise self.error(token, f"unknown field {token.text!r}")

    def set_literal(self, field: str) -> list:
        self.expect("{")
        members = []
        while not (self.peek().kind == "op" and self.peek().text == "}"):
            token = self.peek()
            if token.kind == "end":
                raise self.error(token, "unclosed set: expected '}'")
            if token.kind == "op" and token.text == ",":
                self.take()
                continue
            if token.kind == "word" and ".." in token.text and not self._is_field_word(token.text):
                low_text, high_text = token.text.split("..", 1)
                self.take()
                low, high = self._number(token, low_text), self._number(token, high_text)
                members.append(range(low, high + 1))
                continue
            members.append(self.literal(field))
        self.take()
        return members

    def _is_field_word(self, word: str) -> bool:
        return word in self.fields or word in RECORD_FIELDS

    def _number(self, token: _Token, text: str) -> int:
        try:
            return int(text, 0)
        except ValueError:
            raise self.error(token, f"{text!r} is not a number") from None

    def literal(self, field: str, want_bytes: bool = False):
        token = self.take()
        if token.kind == "string":
            text = self.unquote(token)
            return text.encode() if want_bytes and self._is_bytes(field) else text
        if token.kind != "word":
            raise self.error(token, "expected a value" + (f", found {token.text!r}" if token.text else ""))
        word = token.text
        if self._is_bytes(field) and _BYTES_LITERAL.match(word):
            return bytes.fromhex(re.sub(r"[:\-.]", "", word))
        try:
            number = int(word, 0)
        except ValueError:
            number = None
        if field == "request":
            if number is not None:
                return number
            pairs = _request_pairs(word)
            if not pairs:
                raise self.error(token, f"unknown request name {word!r}")
            return _Requests(pairs)
        if field == "name":
            alias = cat.REQUEST_ALIASES.get(word.upper())
            return alias.name if alias is not None else word.upper()
        if field == "channel" and number is not None:
            return Channel(number).name.lower() if number in Channel._value2member_map_ else word
        if number is not None:
            return number
        bit = self.bit_value(field, word)
        if bit is not None:
            return bit
        if field in self.fields and self.fields[field].width:
            raise self.error(token, f"{word!r} is not a value of the integer field {field!r}")
        return word

    def bit_value(self, field: str, word: str) -> int | None:
        """A feature or status bit name as the mask of its bit; None when the field has no bit of that name."""
        if not cat.bit_table(field):
            return None
        if self.device is not _UNRESOLVED:
            try:
                return 1 << cat.bit_number(field, word, self.device)
            except cat.BitNameError:
                raise _NoMeaning from None
        meanings = cat.bit_number_by_device(field, word)
        bits = set(meanings.values())
        if len(bits) == 1:
            bit = bits.pop()
            if bit is None:              # no device has a bit of that name
                return None
            return 1 << bit              # the same bit whatever the device (VERSION_1, REPLY_ACK, DRIVER_OK)
        self.per_device = True
        return 0                         # a stand-in: the comparison is compiled again per device type

    def unquote(self, token: _Token) -> str:
        try:
            return _unquote(token.text)
        except _BadEscape as error:
            raise FilterError(self.text, token.position + error.offset, str(error)) from None

    def _is_bytes(self, field: str) -> bool:
        spec = self.fields.get(field)
        return spec is not None and spec.is_bytes


_ESCAPE = re.compile(r"""\\(?:
    (?P<simple>[\\"'abfnrtv]) | (?P<octal>[0-7]{1,3}) | x(?P<x>[0-9A-Fa-f]{2}) | u(?P<u>[0-9A-Fa-f]{4})
  | U(?P<U>[0-9A-Fa-f]{8}) | N\{(?P<N>[^}]*)\} | (?P<incomplete>[xuUN]) | (?P<other>.))""", re.VERBOSE | re.DOTALL)


_ESCAPE_NEEDS = {"x": "2 hex digits", "u": "4 hex digits", "U": "8 hex digits", "N": "a character name in {}"}


class _BadEscape(ValueError):
    def __init__(self, offset: int, reason: str):
        super().__init__(reason)
        self.offset = offset          # of the backslash, in the quoted token


def _unquote(text: str) -> str:
    """A quoted string token's value, with Python/Wireshark escapes; an unknown escape (`\\d` in a regex) stays as
    written, and so does any non-ASCII character."""
    def replace(match: re.Match) -> str:
        if match.group("other") is not None:
            return match.group()
        letter = match.group("incomplete")
        if letter is not None:
            raise _BadEscape(1 + match.start(), f"bad escape \\{letter} in a string: needs {_ESCAPE_NEEDS[letter]}")
        try:
            return match.group().encode("ascii").decode("unicode_escape")
        except (UnicodeError, ValueError):      # \N{NO_SUCH_NAME}, \U beyond 0x10FFFF
            raise _BadEscape(1 + match.start(), f"bad escape {match.group()} in a string: no such character") \
                from None
    return _ESCAPE.sub(replace, text[1:-1])


def _as_text(value) -> str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1")
    return str(value)


def _contains(value, needle) -> bool:
    if isinstance(value, (bytes, bytearray)):
        return (needle if isinstance(needle, bytes) else str(needle).encode()) in value
    return str(needle) in str(value)


def _equal(value, literal) -> bool:
    if isinstance(literal, _Requests):
        return False if not isinstance(value, tuple) else value in literal.pairs
    if isinstance(value, tuple):             # a request: (channel, number) against a number
        value = value[1]
    if isinstance(literal, range):
        return isinstance(value, int) and value in literal
    if isinstance(value, str) and isinstance(literal, str):
        return value.lower() == literal.lower()
    return value == literal


def _ordered(compare):
    def run(value, literal):
        if isinstance(value, tuple):
            value = value[1]
        if isinstance(literal, _Requests) or type(value) is not type(literal):
            if not (isinstance(value, int) and isinstance(literal, int)):
                return False
        return compare(value, literal)
    return run


_COMPARE = {
    "==": _equal, "!=": lambda value, literal: not _equal(value, literal),
    "<": _ordered(lambda a, b: a < b), "<=": _ordered(lambda a, b: a <= b),
    ">": _ordered(lambda a, b: a > b), ">=": _ordered(lambda a, b: a >= b),
}


class DisplayFilter:
    """A compiled filter: `.matches(message, record, number)`."""

    def __init__(self, text: str, predicate):
        self.text = text
        self._predicate = predicate

    def matches_fields(self, get: Callable[[str], Any]) -> bool:
        """Whether a record matches, its fields served by `get(name) -> values` (DEVICE_TYPE_FIELD: the message's
        device type): a reader that has the fields without a Message (views.fast) asks only for those named."""
        return bool(self._predicate(get))

    def matches(self, message, record, number: int) -> bool:
        grammar: dict[str, list] | None = None

        def get(name: str) -> list:
            nonlocal grammar
            spec = RECORD_FIELDS.get(name)
            if spec is not None and spec.value is not None:     # the compiler accepts no Lua-only field
                return spec.value(message, record, number)
            if message is None:              # an event record: only the record's own fields
                return []
            if name is DEVICE_TYPE_FIELD:
                return message.context.device_type
            if grammar is None:
                grammar = field_values(message)
            if name.endswith("."):           # a group of fields: the values of all of them
                return [v for field, values in grammar.items() if field.startswith(name) for v in values]
            return grammar.get(name, [])
        return bool(self._predicate(get))

    def __repr__(self) -> str:
        return f"DisplayFilter({self.text!r})"


def field_values(message) -> dict[str, list]:
    """iter_fields as name -> values (arrays flattened); the request as (channel, number) for name matching."""
    values: dict[str, list] = {}
    for name, value in iter_fields(message):
        if name == "request":
            value = (int(message.channel), value)
        if isinstance(value, list):
            values.setdefault(name, []).extend(value)
        else:
            values.setdefault(name, []).append(value)
    return values


def compile_filter(text: str) -> DisplayFilter:
    """Compile a display filter; raises FilterError (with a caret line) when it is not valid."""
    compiler = _Compiler(text)
    predicate = compiler.compile()
    return DisplayFilter(text, predicate)


__all__ = ["compile_filter", "FilterError", "DisplayFilter", "RECORD_FIELDS", "grammar_fields", "walk_layout",
           "field_values", "DEVICE_TYPE_FIELD"]
