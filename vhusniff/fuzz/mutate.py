"""Mutations of a seed session's front-end requests, made with the grammar.

A case is the seed connection's main-channel requests (each a Record: exact bytes and recorded fd kinds), a list
of mutations applied to them in order, and a closing GET_FEATURES. The requests before the first mutated one
are the seed's valid prefix; replay's scripted front-end plays the case as it plays any recording, so a case
written as a capture replays to the same behaviour.

Families (the issue's): a field set to an edge value of its type (the grammar's payload layouts give each
integer field its offset and width), header lies (a size below or above the payload's, the version bits, the
REPLY bit on a request, reserved and NEED_REPLY flag bits, a payload cut short or grown with the size fixed
up), sequences (drop, duplicate, swap, insert a request of another kind or from another state), and fds
(missing, extra, of the wrong kind, a memfd smaller than the region it is said to map).
"""
from __future__ import annotations

import dataclasses
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from construct import Array, BytesInteger, FormatField, Struct

from ..model import Channel, Direction, FdInfo, Record, RecordKind
from ..protocol import catalogue as cat
from ..protocol.context import ContextTracker
from ..protocol.grammar import (
    FIXED_SIZE,
    HEADER_SIZE,
    HEADER_STRUCT,
    MAX_PAYLOAD_SIZE,
    PAYLOADS,
    DecodeContext,
    Message,
    build_message,
    decode,
)
from ..replay.fresh import DEAD_EVENTFD, PAGE, SHORT_MEMFD
from ..replay.recording import first_connection, load_exchanges

F = cat.FrontendRequest
# Sent last in every case: it always gets a reply, and a back-end answers in order, so its reply says that every
# mutated request before it was taken without the back-end dying.
BARRIER = build_message(Channel.MAIN, F.GET_FEATURES)
MEMORY_REQUESTS = frozenset({int(F.SET_MEM_TABLE), int(F.ADD_MEM_REG)})
# Words in a field's name that make it a size, a count, an index or an address: edge values of its meaning too.
_MEANINGFUL = ("size", "num", "index", "offset", "addr", "nregions", "desc", "used", "avail", "log", "iova")
FD_KINDS = ("memfd", "eventfd", "socket", "pipe")


@dataclass(frozen=True)
class IntegerField:
    """An integer field of a payload: its dotted name, byte offset in the payload, width in bytes, value."""
    name: str
    offset: int
    width: int
    value: int


@dataclass(frozen=True)
class Mutation:
    """One change to the request list; `apply` is deterministic, so a case is its seed plus its mutations."""
    family: str              # field | header | length | drop | duplicate | swap | insert | fd
    index: int               # the request it changes (clamped away when the list got shorter)
    text: str                # what it did, for a person
    offset: int = 0          # field: byte offset in the message; header: which header word (4 size, 8 flags)
    width: int = 0
    value: int = 0           # the new value, length, position or fd index
    record: Record | None = None   # insert: the request inserted
    fd: FdInfo | None = None       # fd: the replacement (None: the fd is removed)

    @property
    def lies_about_size(self) -> bool:
        """The header's size is not the payload's: the stream is out of step from here on."""
        return self.family == "header" and self.offset == 8

    def apply(self, requests: list[Record]) -> list[Record]:
        if not 0 <= self.index < len(requests):
            return requests
        out = list(requests)
        target = out[self.index]
        if self.family == "field":
            data = bytearray(target.data)
            if self.offset + self.width <= len(data):
                data[self.offset:self.offset + self.width] = self.value.to_bytes(self.width, "little")
            out[self.index] = dataclasses.replace(target, data=bytes(data))
        elif self.family == "header":
            data = bytearray(target.data)
            struct.pack_into("<I", data, self.offset, self.value)
            out[self.index] = dataclasses.replace(target, data=bytes(data))
        elif self.family == "length":
            payload = target.data[HEADER_SIZE:HEADER_SIZE + self.value]
            payload += bytes(self.value - len(payload))
            request, flags, _size = HEADER_STRUCT.unpack_from(target.data)
            out[self.index] = dataclasses.replace(
                target, data=HEADER_STRUCT.pack(request, flags, len(payload)) + payload)
        elif self.family == "drop":
            del out[self.index]
        elif self.family == "duplicate":
            out.insert(min(self.value, len(out)), target)
        elif self.family == "swap":
            other = min(self.value, len(out) - 1)
            out[self.index], out[other] = out[other], out[self.index]
        elif self.family == "insert" and self.record is not None:
            out.insert(self.index, self.record)
        elif self.family == "fd":
            fds = list(target.fds)
            if self.fd is None:
                if self.value < len(fds):
                    del fds[self.value]
            elif self.value < len(fds):
                fds[self.value] = self.fd
            else:
                fds.append(self.fd)
            out[self.index] = dataclasses.replace(target, fds=fds)
        return out


def apply_all(requests: list[Record], mutations: list[Mutation]) -> list[Record]:
    for mutation in mutations:
        requests = mutation.apply(requests)
    return requests


def case_records(seed: Seed, mutations: list[Mutation], keep: int | None = None, stamped: bool = True) -> list[Record]:
    """The records a case plays (the seed's connection events first, the barrier last): what a reproducer
    holds. `keep`: how many requests of the mutated list are played (all by default). `stamped`: each record
    copied with a time in the case's order, as a capture needs; playing needs only the order, so a campaign
    plays the seed's own records, not copies."""
    requests = apply_all(seed.requests, mutations)
    if keep is not None:
        requests = requests[:keep]
    played: list[Record] = []
    for record in [*requests, seed.barrier]:
        played.append(record)
        reply = seed.replies.get(id(record))       # an unchanged request keeps its recorded reply to compare
        if reply is not None:
            played.append(reply)
    if not stamped:
        return [*seed.events, *played]
    return [*seed.events, *(dataclasses.replace(record, timestamp_ns=seed.start_ns + number * 1000)
                            for number, record in enumerate(played, 1))]


# ---- the seed ----

@dataclass
class Seed:
    """A seed capture's one connection: its requests, its device, the context it ends in."""
    path: str
    connection: int
    requests: list[Record]
    events: list[Record]          # CONNECTED and DEVICE events, so that a reproducer names the device
    device: str | None
    context: DecodeContext
    start_ns: int
    messages: list[Message]       # each request decoded in the context it was recorded in
    replies: dict[int, Record]    # id() of a request record -> its recorded reply
    barrier: Record               # the closing GET_FEATURES (its reply: the seed's first GET_FEATURES reply)

    @property
    def names(self) -> list[str]:
        return [message.name for message in self.messages]


def load_seed(path: str, records: list[Record], connection: int | None = None) -> Seed:
    """The front-end requests of one connection of a capture (the first by default). Raises ValueError, naming
    what is missing, for a capture with no front-end request."""
    connection = first_connection(records) if connection is None else connection
    tracker = ContextTracker()
    requests: list[Record] = []
    messages: list[Message] = []
    events: list[Record] = []
    for record in records:
        if record.connection != connection:
            continue
        message = tracker.decode(record)
        if record.kind == RecordKind.EVENT:
            if record.event.name in ("CONNECTED", "DEVICE"):
                events.append(record)
            continue
        if message is None or record.channel != Channel.MAIN or record.direction != Direction.FRONTEND_TO_BACKEND:
            continue
        if message.is_reply:
            continue
        requests.append(record)
        messages.append(message)
    if not requests:
        raise ValueError(f"connection {connection} holds no front-end request")
    context = tracker.context_for(connection)
    start = events[0].timestamp_ns if events else requests[0].timestamp_ns
    _connection, exchanges = load_exchanges(records, connection)
    replies = {id(exchange.request): exchange.reply for exchange in exchanges if exchange.reply is not None}
    barrier = Record(0, connection, Channel.MAIN, Direction.FRONTEND_TO_BACKEND, BARRIER)
    features = next((exchange.reply for exchange in exchanges if exchange.reply is not None and
                     exchange.request.data[:4] == BARRIER[:4]), None)
    if features is not None:
        replies[id(barrier)] = features
    return Seed(path, connection, requests, events, context.device_type, context, start, messages, replies,
                barrier)


# ---- fields, by the grammar ----

def integer_fields(message: Message) -> list[IntegerField]:
    """Every integer field of a message's payload with its place, from the grammar's layout of its kind."""
    if message.kind is None or message.kind not in PAYLOADS:
        return []
    return list(_fields(PAYLOADS[message.kind][0], message.payload, PAYLOADS[message.kind][1], 0))


def _fields(structure: Struct, value, prefix: str, offset: int) -> Iterator[IntegerField]:
    for sub in structure.subcons:
        leaf = sub.subcon if hasattr(sub, "subcon") else sub
        name = f"{prefix}.{sub.name}" if prefix else str(sub.name)
        while hasattr(leaf, "subcon") and not isinstance(leaf, (Struct, Array)):
            leaf = leaf.subcon
        item = value[sub.name] if sub.name else None
        if isinstance(leaf, Array):
            element = leaf.subcon
            items = item if isinstance(item, list) else []
            size = element.sizeof()
            for number, element_value in enumerate(items):
                if isinstance(element, Struct):
                    yield from _fields(element, element_value, name, offset + number * size)
            offset += size * len(items)
            continue
        if isinstance(leaf, Struct):
            yield from _fields(leaf, item, name, offset)
            offset += leaf.sizeof()
            continue
        try:
            size = sub.sizeof()
        except Exception:      # a variable-length byte field (config data): nothing after it is an integer
            return
        if isinstance(leaf, (FormatField, BytesInteger)) and isinstance(item, int):
            yield IntegerField(name, offset, size, item)
        offset += size


def edge_values(field: IntegerField) -> list[int]:
    """Values at the edges of a field's type, and of its meaning for sizes, counts, indexes and addresses."""
    bits = field.width * 8
    top = (1 << bits) - 1
    values = [0, 1, top, top - 1, 1 << (bits - 1), (1 << (bits - 1)) - 1]
    last = field.name.rsplit(".", 1)[-1]
    if any(word in last for word in _MEANINGFUL):
        value = field.value
        values += [value + 1, value - 1, value * 2, value ^ (1 << (bits - 1)), 0x1000, 0x8000, 0x10000,
                   0xFFFF, 0x100, 2, 3, 7, 8, 64, 256, 1024, 32768, 65535 + 1]
    if last.endswith("features"):
        values += [field.value ^ (1 << bit) for bit in range(bits)]     # one feature bit more or less
    seen: list[int] = []
    for value in values:
        value &= top
        if value not in seen and value != field.value:
            seen.append(value)
    return seen


# ---- making mutations ----

class Mutator:
    """Draws mutations for a seed; `rng` makes a campaign repeatable from its --seed."""

    FAMILIES: tuple[tuple[str, int], ...] = (("field", 10), ("header", 2), ("length", 2), ("drop", 2),
                                             ("duplicate", 3), ("swap", 2), ("insert", 3), ("fd", 5))

    def __init__(self, seed: Seed, rng: random.Random, first: int = 1):
        self.seed, self.rng = seed, rng
        self.first = max(1, min(first, len(seed.requests) - 1))       # the prefix is never mutated
        self.fields = [integer_fields(message) for message in seed.messages]
        self._families = [name for name, weight in self.FAMILIES for _ in range(weight)]

    def draw(self, count: int) -> list[Mutation]:
        mutations: list[Mutation] = []
        while len(mutations) < count:
            mutation = getattr(self, "_" + self.rng.choice(self._families))()
            if mutation is not None:
                mutations.append(mutation)
        return mutations

    def _index(self) -> int:
        return self.rng.randrange(self.first, len(self.seed.requests))

    def _label(self, index: int) -> str:
        return f"request {index + 1} ({self.seed.names[index]})"

    def _field(self) -> Mutation | None:
        candidates = [index for index in range(self.first, len(self.seed.requests)) if self.fields[index]]
        if not candidates:
            return None
        index = self.rng.choice(candidates)
        field = self.rng.choice(self.fields[index])
        value = self.rng.choice(edge_values(field))
        return Mutation("field", index, f"{self._label(index)}: {field.name} = {value:#x}",
                        offset=HEADER_SIZE + field.offset, width=field.width, value=value)

    def _header(self) -> Mutation:
        index = self._index()
        request, flags, size = HEADER_STRUCT.unpack_from(self.seed.requests[index].data)
        if self.rng.random() < 0.5:
            # Longer than the payload too: the back-end then reads the next requests (or the closing GET_FEATURES)
            # as the rest of this one.
            value = self.rng.choice([0, max(size - 1, 0), size // 2, size + 1, size + 8, size + HEADER_SIZE,
                                     size + 4096])
            return Mutation("header", index, f"{self._label(index)}: header size {value} (payload {size})",
                            offset=8, value=value)
        value = self.rng.choice([flags & ~cat.VERSION_MASK, (flags & ~cat.VERSION_MASK) | 2,
                                 flags | cat.VERSION_MASK, flags ^ cat.FLAG_NEED_REPLY, flags | cat.FLAG_REPLY,
                                 flags | 0x10, flags | 0x80000000])
        what = " (the REPLY bit on a request)" if value & ~flags & cat.FLAG_REPLY else ""
        return Mutation("header", index, f"{self._label(index)}: flags {value:#x}{what}", offset=4, value=value)

    def _length(self) -> Mutation:
        index = self._index()
        size = len(self.seed.requests[index].data) - HEADER_SIZE
        value = self.rng.choice([0, max(size - 1, 0), size // 2, size + 1, size + 8, MAX_PAYLOAD_SIZE])
        return Mutation("length", index, f"{self._label(index)}: payload of {value} bytes (was {size}), size "
                        f"fixed up", value=value)

    def _drop(self) -> Mutation:
        index = self._index()
        return Mutation("drop", index, f"{self._label(index)}: dropped")

    def _duplicate(self) -> Mutation:
        index = self._index()
        to = self.rng.randrange(index, len(self.seed.requests) + 1)
        return Mutation("duplicate", index, f"{self._label(index)}: sent again at position {to + 1}", value=to)

    def _swap(self) -> Mutation:
        index = self._index()
        other = self._index()
        return Mutation("swap", index, f"{self._label(index)} swapped with request {other + 1}", value=other)

    def _insert(self) -> Mutation:
        index = self._index()
        if self.rng.random() < 0.5:
            # A request of this seed, out of its state (with its fds).
            source = self.rng.randrange(len(self.seed.requests))
            record = self.seed.requests[source]
            what = f"request {source + 1} ({self.seed.names[source]})"
        else:
            number = self.rng.choice([*cat.FRONTEND_REQUESTS, 0, len(cat.FRONTEND_REQUESTS) + 1, 0x7FFFFFFF])
            spec = cat.FRONTEND_REQUESTS.get(number)
            kind = spec.request_kinds[0] if spec and spec.request_kinds else "empty"
            size = FIXED_SIZE.get(kind)         # a variable layout (config, memory table): an 8-byte payload
            data = build_message(Channel.MAIN, number, bytes(8 if size is None else size))
            fds = [FdInfo("eventfd")] if spec is not None and spec.request_fds in (
                cat.FdRule.ONE, cat.FdRule.UNLESS_NOFD) else []
            record = Record(0, self.seed.connection, Channel.MAIN, Direction.FRONTEND_TO_BACKEND, data, fds)
            what = f"a zeroed request {decode(data).name}"
        return Mutation("insert", index, f"{what} inserted before {self._label(index)}", record=record)

    def _fd(self) -> Mutation:
        carrying = [index for index in range(self.first, len(self.seed.requests)) if self.seed.requests[index].fds]
        index = self.rng.choice(carrying) if carrying and self.rng.random() < 0.6 else self._index()
        fds = self.seed.requests[index].fds
        choice = self.rng.random()
        if fds and self.seed.messages[index].request in MEMORY_REQUESTS and choice < 0.5:
            which = self.rng.randrange(len(fds))
            info = FdInfo("memfd", 0, PAGE, SHORT_MEMFD)
            return Mutation("fd", index, f"{self._label(index)}: fd {which} a memfd of {PAGE} bytes, smaller than "
                            f"its region", value=which, fd=info)
        if fds and fds[0].kind == "eventfd" and choice < 0.3:
            return Mutation("fd", index, f"{self._label(index)}: fd 0 an eventfd no one can signal (its counter at "
                            f"the maximum)", value=0, fd=FdInfo("eventfd", 0, -1, DEAD_EVENTFD))
        if fds and choice < 0.6:
            which = self.rng.randrange(len(fds))
            return Mutation("fd", index, f"{self._label(index)}: fd {which} missing", value=which)
        if fds and choice < 0.85:
            which = self.rng.randrange(len(fds))
            kind = self.rng.choice([kind for kind in FD_KINDS if kind != fds[which].kind])
            return Mutation("fd", index, f"{self._label(index)}: fd {which} a {kind} instead of a "
                            f"{fds[which].kind}", value=which, fd=FdInfo(kind, 0, PAGE))
        kind = self.rng.choice(FD_KINDS)
        return Mutation("fd", index, f"{self._label(index)}: an extra {kind}", value=len(fds),
                        fd=FdInfo(kind, 0, PAGE))
