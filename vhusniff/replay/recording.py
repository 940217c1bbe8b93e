"""What replay reads from a recording: request/reply pairs, back-end-channel requests and where they came, ring
positions, the device type, and the answer a scripted back-end gives to a live request."""
from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from ..analysis.diff import field_differences
from ..model import Channel, Direction, FdInfo, Record, RecordKind
from ..protocol import catalogue as cat
from ..protocol.context import ContextTracker
from ..protocol.grammar import HEADER_SIZE, PAYLOADS, DecodeContext, Message, build_message, decode, is_reply_flag
from ..protocol.replies import reply_required
from .fresh import FreshFds

F = cat.FrontendRequest


@dataclass
class Exchange:
    """A recorded front-end request and the back-end reply that answered it (if any)."""
    number: int                      # record number in the capture, from 1
    request: Record
    reply: Record | None = None
    reply_number: int = 0


def decode_recorded(tracker: ContextTracker, record: Record) -> Message:
    """A recorded message decoded in its connection's context. Exchanges hold message records only (the loaders
    keep RecordKind.MESSAGE), which the tracker always decodes to a Message."""
    message = tracker.decode(record)
    assert message is not None, "exchanges hold message records only"
    return message


def request_number(data: bytes) -> int:
    return struct.unpack_from("<I", data)[0] if len(data) >= 4 else -1


def _flags(data: bytes) -> int:
    return struct.unpack_from("<I", data, 4)[0] if len(data) >= 8 else 0


def first_connection(records: list[Record]) -> int:
    """The connection of a capture's first main-channel message: the one replay and the fuzzer take when none is
    named. Raises ValueError when the capture holds no main-channel message."""
    for record in records:
        if record.kind == RecordKind.MESSAGE and record.channel == Channel.MAIN:
            return record.connection
    raise ValueError("the capture holds no main-channel message")


def load_exchanges(records: list[Record], connection: int | None) -> tuple[int, list[Exchange]]:
    """The main-channel request/reply pairs of one connection (the first one with messages by default).

    Unlike analysis.Analyzer, which matches a reply to the request in flight and reports what went wrong, this
    pairs by request number, passing over requests that got no reply: replay only needs, for each recorded
    request, the reply to send or expect."""
    numbered = [(n, r) for n, r in enumerate(records, 1) if r.kind == RecordKind.MESSAGE and r.channel == Channel.MAIN]
    if connection is None:
        connection = first_connection(records)
    exchanges: list[Exchange] = []
    waiting: list[Exchange] = []
    for number, record in numbered:
        if record.connection != connection:
            continue
        flags = _flags(record.data)
        if record.direction == Direction.FRONTEND_TO_BACKEND:
            # On the main channel the front-end only sends requests: one whose flags claim a reply (a fuzzer's
            # header lie) is still a request, played as it is; no recorded reply is paired with it.
            exchange = Exchange(number, record)
            exchanges.append(exchange)
            if not flags & cat.FLAG_REPLY:
                waiting.append(exchange)
        else:
            # Likewise the back-end only replies on the main channel: a reply without the REPLY bit is a reply.
            _pair_reply(waiting, record, number)
    if not exchanges:
        raise ValueError(f"connection {connection} holds no front-end request")
    return connection, exchanges


def _pair_reply(waiting: list, record: Record, number: int) -> None:
    """One request is outstanding per channel, so a reply answers the oldest unanswered request with its
    number; requests before that one got no reply."""
    request = request_number(record.data)
    for index, candidate in enumerate(waiting):
        if request_number(candidate.request.data) == request:
            candidate.reply, candidate.reply_number = record, number
            del waiting[:index + 1]
            return


@dataclass
class BackendExchange:
    """A recorded back-end request (back-end channel, back-end to front-end), the front-end's reply if any, and
    where it came in the main channel's sequence: `after` = (index of an exchange, 0 = after its request,
    1 = after its reply), the last main-channel message recorded before it; (-1, 1) when there was none."""
    number: int
    request: Record
    reply: Record | None = None
    reply_number: int = 0
    after: tuple[int, int] = (-1, 1)


def load_backend_requests(records: list[Record], connection: int, exchanges: list[Exchange],
                          channel: Channel = Channel.BACKEND) -> list[BackendExchange]:
    """The back-end's requests on a side channel (the back-end channel, or the GPU socket) of one connection, in
    recorded order, each with the front-end's reply and its place after a main-channel message of `exchanges`
    (load_exchanges' pairs of the same connection)."""
    places: dict[int, tuple[int, int]] = {}
    for index, exchange in enumerate(exchanges):
        places[exchange.number] = (index, 0)
        if exchange.reply is not None:
            places[exchange.reply_number] = (index, 1)
    requests: list[BackendExchange] = []
    waiting: list[BackendExchange] = []
    after = (-1, 1)
    for number, record in enumerate(records, 1):
        if record.kind != RecordKind.MESSAGE or record.connection != connection:
            continue
        if record.channel == Channel.MAIN:
            after = places.get(number, after)
            continue
        if record.channel != channel:
            continue
        is_reply = is_reply_flag(channel, request_number(record.data), _flags(record.data))
        if record.direction == Direction.BACKEND_TO_FRONTEND:        # a request, by direction, whatever its flags
            request = BackendExchange(number, record, after=after)
            requests.append(request)
            waiting.append(request)
        elif record.direction == Direction.FRONTEND_TO_BACKEND and is_reply:
            _pair_reply(waiting, record, number)
    return requests


def side_channel_replies(records: list[Record], connection: int, channel: Channel) -> dict[int, deque[Record]]:
    """The front-end's recorded replies on a side channel, per request number, in recorded order: what a scripted
    front-end answers the back-end's live requests with (the GPU socket's display info, EDID, features)."""
    replies: dict[int, deque[Record]] = {}
    for record in records:
        if record.kind == RecordKind.MESSAGE and record.connection == connection and record.channel == channel \
                and record.direction == Direction.FRONTEND_TO_BACKEND \
                and is_reply_flag(channel, request_number(record.data), _flags(record.data)):
            replies.setdefault(request_number(record.data), deque()).append(record)
    return replies


def regions(message: Message) -> list:
    """The memory regions a SET_MEM_TABLE or ADD_MEM_REG describes."""
    # A request whose flags claim a reply (a fuzzer's header lie) decodes as a reply: no region in it.
    if message.kind is None or message.is_reply or message.request not in (F.ADD_MEM_REG, F.SET_MEM_TABLE):
        return []
    regions = message.payload.region
    return list(regions) if isinstance(regions, list) else [regions]


def ring_positions(exchanges: list[Exchange], decoder=decode) -> dict[int, int]:
    """For each SET_VRING_BASE (by record number), the base its ring's next GET_VRING_BASE reported (`decoder`:
    grammar.decode, or one that remembers, for a caller that reads the same requests many times)."""
    positions: dict[int, int] = {}
    open_start: dict[int, int] = {}
    tracker = ContextTracker()
    tracker.decoder = decoder
    for exchange in exchanges:
        message = decode_recorded(tracker, exchange.request)
        if message.kind is None or message.is_reply:        # a header lie: no ring in it
            continue
        if message.request == F.SET_VRING_BASE:
            open_start[message.payload.index] = exchange.number
        elif message.request == F.GET_VRING_BASE and exchange.reply is not None:
            reply = decoder(exchange.reply.data, Channel.MAIN, message.context)
            start = open_start.pop(message.payload.index, None)
            if start is not None and reply.kind and reply.kind.startswith("vring_base"):
                positions[start] = reply.payload.num
    return positions


def device_type(records: list[Record], connection: int) -> str | None:
    """The virtio device type of a recorded connection, as reading a capture finds it (the proxy's and lab's
    DEVICE event (a version-1 capture's `device=...` note), or what the messages imply)."""
    tracker = ContextTracker()
    for record in records:
        if record.connection == connection:
            tracker.decode(record)
    return tracker.context_for(connection).device_type


def reply_differences(recorded: Message, replayed: Message, recorded_fds: list[FdInfo],
                       replayed_fds: list[FdInfo]) -> list[str]:
    if recorded.request != replayed.request or recorded.is_reply != replayed.is_reply:
        return [f"recorded {recorded.summary()}, replayed {replayed.summary()}"]
    differences = field_differences(recorded, replayed, labels=("recorded", "replayed"))
    recorded_kinds, replayed_kinds = [fd.kind for fd in recorded_fds], [fd.kind for fd in replayed_fds]
    if len(recorded_kinds) != len(replayed_kinds):
        differences.append(f"fds: recorded {recorded_kinds}, replayed {replayed_kinds}")
    return differences


def find_recorded(exchanges: list[Exchange], cursor: int, request: bytes) -> tuple[Exchange | None, int]:
    """The next recorded exchange for a live request, searching forward: the same bytes first (a GET_CONFIG or a
    GET_VRING_BASE of the same ring), else the same request number. The cursor moves past the match."""
    number = request_number(request)
    fallback = None
    for index in range(cursor, len(exchanges)):
        recorded = exchanges[index].request.data
        if request_number(recorded) != number:
            continue
        if recorded[HEADER_SIZE:] == request[HEADER_SIZE:]:
            return exchanges[index], index + 1
        if fallback is None:
            fallback = index
    if fallback is None:
        return None, cursor
    return exchanges[fallback], fallback + 1


def answer(message: Message, match: Exchange | None, context: DecodeContext, fresh: FreshFds,
           default_reply: int = 0) -> tuple[bytes | None, list[int]]:
    """The reply for a live request: the recorded one when the live request still calls for it, else a
    default when the protocol requires a reply (an ack or u64 of `default_reply`, other kinds zeroed)."""
    required = reply_required(message, context)
    if match is not None and match.reply is not None:
        # A recorded ack for a request that now did not ask for one must not be sent: QEMU would take it as
        # the reply to its next request.
        if required or message.spec is None or message.spec.reply_rule is not cat.ReplyRule.ACK_IF_ASKED:
            return match.reply.data, [fresh.make(info) for info in match.reply.fds]
    if not required:
        return None, []
    return default_answer(message, context, default_reply), []


def default_answer(message: Message, context: DecodeContext, value: int = 0) -> bytes:
    """A reply of the request's first reply kind: u64 kinds carry `value`, a config echoes the requested
    offset and size with zeroed data, anything else is zero-filled."""
    spec = message.spec
    kind = spec.reply_kinds[0] if spec and spec.reply_kinds else "ack"
    if kind == "empty" or (message.need_reply and spec and spec.reply_rule is cat.ReplyRule.ACK_IF_ASKED):
        kind = "ack"
    structure = PAYLOADS[kind][0]
    names = [sub.name for sub in structure.subcons if sub.name]
    if kind == "config" and message.kind == "config":
        payload = dict(offset=message.payload.offset, size=message.payload.size, flags=message.payload.flags,
                       data=bytes(message.payload.size))
    elif len(names) == 1 and structure.sizeof() == 8:
        payload = {names[0]: value}
    else:
        try:
            return build_message(Channel.MAIN, message.request, bytes(structure.sizeof()), reply=True, ctx=context)
        except Exception:  # a variable layout without a size of its own: answer with an ack instead
            kind, payload = "ack", {"ack": value}
    return build_message(Channel.MAIN, message.request, payload, reply=True, kind=kind, ctx=context)


