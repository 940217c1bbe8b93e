"""Decoding by message shape: what grammar.decode finds out from a message's header alone, found out once.

A shape is (context, channel, request, flags, size). For a shape whose payload kind the header settles (every
candidate before it has another fixed size, and its layout is plain struct fields, which read any bytes of that
size), the kind and the problems are the shape's, and the payload is parsed only when something reads it. A
config window (GET_CONFIG, SET_CONFIG) is settled by its own size field: 12 + size bytes read and build back
exactly. Every other message is decoded by grammar.decode. The first message of each shape is decoded both ways
and a shape whose messages differ keeps grammar.decode. A settled shape makes its messages of a class of its own
(its header fields are the class's), made when its second message comes: a shape seen once, as in a fuzzed
session, costs no class.

    decoder = ShapeDecoder()
    message = decoder.decode(raw, channel, context)      # as grammar.decode(raw, channel, context)
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, ClassVar

from construct import BytesInteger, Container, FormatField, Renamed, Struct

from ..model import Channel
from .grammar import (
    FIXED_SIZE,
    HEADER_SIZE,
    PARSERS,  # the parsers grammar.decode itself uses, so payloads are the same objects
    PAYLOADS,
    DecodeContext,
    Message,
    decode,
    payload_candidates,
)

_HEADER = struct.Struct("<III")
_CONFIG_SIZE = struct.Struct("<I")          # a config window's size field, after its offset
_CONFIG_HEAD = 12                           # offset, size, flags
_PAYLOAD_SLOT: Any = Message.__dict__["payload"]     # Message's own slot, under LazyMessage's property


def _plain_struct(structure) -> bool:
    """Whether every field of a construct Struct is a fixed struct field (any bytes of its size parse)."""
    for sub in structure.subcons:
        inner = sub
        while isinstance(inner, Renamed):
            inner = inner.subcon
        if isinstance(inner, Struct):
            if not _plain_struct(inner):
                return False
        elif not (isinstance(inner, FormatField) or isinstance(inner, BytesInteger) and isinstance(inner.length, int)
                  or type(inner).__name__ == "Bytes" and isinstance(getattr(inner, "length", None), int)):
            return False
    return True


# Fixed payload kinds whose every field is a struct field: the header's size settles them.
PLAIN_KINDS = frozenset(kind for kind, (structure, _prefix, _doc) in PAYLOADS.items()
                        if FIXED_SIZE[kind] is not None and _plain_struct(structure))


def _fields(structure, layout: list[str], variables: list[str]) -> str | None:
    """The Container(...) expression of a Struct read as one struct `layout` (appended to), or None when a
    field reads otherwise (a signed or big-endian byte integer)."""
    parts = []
    for sub in structure.subcons:
        inner = sub
        while isinstance(inner, Renamed):
            inner = inner.subcon
        if isinstance(inner, Struct):
            nested = _fields(inner, layout, variables)
            if nested is None:
                return None
            value = nested
        else:
            variable = f"v{len(layout)}"
            if isinstance(inner, FormatField) and inner.fmtstr[0] == "<":
                layout.append(inner.fmtstr[1:])
                value = variable
            elif isinstance(inner, BytesInteger) and inner.swapped and not inner.signed:
                layout.append(f"{inner.length}s")
                value = f"_from_bytes({variable}, 'little')"
            elif type(inner).__name__ == "Bytes":
                layout.append(f"{inner.length}s")
                value = variable
            else:
                return None
            variables.append(variable)
        if sub.name is not None:
            parts.append(f"{sub.name}={value}")
    return f"_Container({', '.join(parts)})"


def compile_parser(kind: str) -> Callable[[bytes], Any] | None:
    """A function body -> the Container of a plain `kind` (as its construct parser makes it, with one struct
    unpack instead of one read per field); None when the kind is not plain."""
    if kind not in PLAIN_KINDS:
        return None
    layout: list[str] = []
    variables: list[str] = []
    expression = _fields(PAYLOADS[kind][0], layout, variables)
    if expression is None:
        return None
    if not variables:
        return lambda body: Container()
    helpers: dict = {"_unpack": struct.Struct("<" + "".join(layout)).unpack_from, "_Container": Container,
                     "_from_bytes": int.from_bytes}
    source = (f"def parse(body):\n"
              f"    {', '.join(variables)}{',' if len(variables) == 1 else ''} = _unpack(body)\n"
              f"    return {expression}\n")
    exec(compile(source, f"<parser of {kind}>", "exec"), helpers)      # noqa: S102 -- made from the grammar
    return helpers["parse"]


# kind -> the fastest parser that makes grammar.decode's payload: compiled here, else grammar's own.
_FAST_PARSERS = {kind: compile_parser(kind) or PARSERS[kind] for kind in PAYLOADS}


class LazyMessage(Message):
    """A Message whose payload is parsed when first read (by the same parser grammar.decode uses)."""

    __slots__ = ("_parse",)
    # In the class of one shape (ShapeDecoder makes one per shape): the channel, request, reply bit and length of
    # every message of the class.
    shape: ClassVar[tuple[Channel, int, bool, int] | None] = None

    def __init__(self, raw: bytes, channel: Channel, request: int, flags: int, size: int, kind: str,
                 parse: Callable[[bytes], Any], problems: tuple, context: DecodeContext, is_reply: bool) -> None:
        self.raw = raw
        self.channel = channel
        self.request = request
        self.flags = flags
        self.size = size
        self.kind = kind
        self._parse = parse
        self.problems = problems
        self.context = context
        self.is_reply = is_reply

    def _payload(self) -> Any:
        try:
            return _PAYLOAD_SLOT.__get__(self, Message)
        except AttributeError:
            value = self._parse(self.raw[HEADER_SIZE:])
            _PAYLOAD_SLOT.__set__(self, value)
            return value

    def _set_payload(self, value: Any) -> None:
        _PAYLOAD_SLOT.__set__(self, value)

    payload = property(_payload, _set_payload)     # Message's slot, read lazily


_new: Callable[[type[LazyMessage]], LazyMessage] = object.__new__


class _Shape:
    """What the header settles for the messages of one shape; its messages are of a Message subclass of its own
    (message_class, made when the second comes) whose header fields, kind, problems and context are class
    attributes, so that a message of the shape is made with its bytes alone."""

    __slots__ = ("context", "channel", "request", "flags", "size", "kind", "parse", "problems", "is_reply", "config",
                 "length", "message_class")

    def __init__(self, context: DecodeContext, message: Message, config: bool) -> None:
        self.context = context              # held, so that the context's tables stay its own
        assert message.kind is not None         # _settle makes shapes of decoded payloads only
        self.channel, self.request, self.flags, self.size = message.channel, message.request, message.flags, \
            message.size
        self.kind: str = message.kind
        self.parse: Callable[[bytes], Any] = _FAST_PARSERS[message.kind]
        self.problems = message.problems
        self.is_reply = message.is_reply
        self.config = config                # a config window: settled per message by its size field
        self.length = HEADER_SIZE + message.size        # a message of another length is not of this shape
        self.message_class: type[LazyMessage] | None = None

    def made_class(self) -> type[LazyMessage]:
        """The class of this shape's messages (made with object.__new__ and their `raw` set: no __init__ runs)."""
        self.message_class = type("LazyMessage", (LazyMessage,), {
            "__slots__": (), "__module__": __name__, "channel": self.channel, "request": self.request,
            "flags": self.flags, "size": self.size, "kind": self.kind, "_parse": staticmethod(self.parse),
            "problems": self.problems, "context": self.context, "is_reply": self.is_reply,
            "shape": (self.channel, self.request, self.is_reply, self.length)})
        return self.message_class


class _General:
    """A shape grammar.decode decodes: no message is of its length."""
    __slots__ = ()
    length = -1
    config = False

    message_class = LazyMessage         # never made: no message is of its length

    def made_class(self) -> type[LazyMessage]:
        raise AssertionError("no message is of a general shape's length")


_GENERAL = _General()


class ShapeDecoder:
    """grammar.decode, settled once per shape where the header settles it (see the module's words)."""

    # Distinct shapes remembered (a settled one holds a class, ~2 KB); forgotten all at once when full, so that
    # memory stays flat.
    SHAPES_KEPT = 1 << 12

    def __init__(self) -> None:
        # context id -> (the context, held so that its id is not reused; per channel: header bytes -> shape)
        self.contexts: dict[int, tuple[DecodeContext, list[dict[bytes, _Shape | _General]]]] = {}
        self.kept = 0
        self._context: DecodeContext | None = None     # the context of the last message, and its tables
        self._tables: list[dict[bytes, _Shape | _General]] = []

    def decode(self, raw: bytes, channel: Channel, context: DecodeContext) -> Message:
        if context is not self._context:
            self._use(context)
        table = self._tables[channel]
        shape = table.get(raw[:HEADER_SIZE])
        if shape is None:
            return self._first(raw, channel, context, table)
        if len(raw) != shape.length:
            return decode(raw, channel, context)        # a shape grammar.decode decodes, or not a whole message
        if shape.config and _CONFIG_HEAD + _CONFIG_SIZE.unpack_from(raw, HEADER_SIZE + 4)[0] != len(raw) - HEADER_SIZE:
            return decode(raw, channel, context)        # not a whole window: the grammar words what it is
        message = _new(shape.message_class or shape.made_class())
        message.raw = raw
        return message

    def _use(self, context: DecodeContext) -> None:
        entry = self.contexts.get(id(context))
        if entry is None or entry[0] is not context:
            entry = self.contexts[id(context)] = (context, [{} for _channel in Channel])
        self._context, self._tables = context, entry[1]

    def _first(self, raw: bytes, channel: Channel, context: DecodeContext,
               table: dict[bytes, _Shape | _General]) -> Message:
        """The first message of its shape: decoded by the grammar, and its shape settled when it is whole."""
        message = decode(raw, channel, context)
        if len(raw) < HEADER_SIZE or len(raw) - HEADER_SIZE != _HEADER.unpack_from(raw)[2]:
            return message
        if self.kept >= self.SHAPES_KEPT:
            self.contexts.clear()
            self.kept = 0
            self._use(context)
            table = self._tables[channel]
        table[raw[:HEADER_SIZE]] = self._settle(raw, channel, context, message)
        self.kept += 1
        return message

    @staticmethod
    def _settle(raw: bytes, channel: Channel, context: DecodeContext, message: Message) -> _Shape | _General:
        """The shape of a message grammar.decode decoded, or _GENERAL when its header does not settle its kind."""
        kind = message.kind
        if kind is None or channel == Channel.DEVICE_STATE:
            return _GENERAL
        candidates = payload_candidates(channel, message.request, message.is_reply, context)
        if kind not in candidates:
            return _GENERAL
        config = kind == "config"
        if config:
            if candidates[0] != "config" or message.size < _CONFIG_HEAD or \
                    _CONFIG_HEAD + message.payload.size != message.size:
                return _GENERAL
        else:
            if kind not in PLAIN_KINDS:
                return _GENERAL
            for before in candidates[:candidates.index(kind)]:
                if before == "config" and message.size < _CONFIG_HEAD:
                    continue            # a window needs its head: an 8-byte GET_CONFIG reply is a REPLY_ACK
                if FIXED_SIZE[before] is None or FIXED_SIZE[before] == message.size:
                    return _GENERAL     # a variable layout (or another of this size) might fit other bytes
        shape = _Shape(context, message, config)
        again = LazyMessage(raw, channel, message.request, message.flags, message.size, kind, shape.parse,
                            shape.problems, context, shape.is_reply)
        if again.payload != message.payload:
            return _GENERAL
        return shape


__all__ = ["LazyMessage", "PLAIN_KINDS", "ShapeDecoder", "compile_parser"]
