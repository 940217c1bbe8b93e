"""Per-connection negotiated context, followed message by message, so that each message decodes as its session
meant it (Xen regions, packed-ring bases, feature names for the device type)."""
from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import replace

from ..model import Channel, EventKind, Record, RecordKind
from . import catalogue as cat
from .grammar import DEFAULT_CONTEXT, HEADER_SIZE, HEADER_STRUCT, DecodeContext, Message, decode

# The front-end requests that tell the device type by being sent at all (CONTEXT_RULES' value rules).
_DEVICE_REQUESTS = {int(request): (rule.value, cat.FrontendRequest(request).name)
                    for request, rule in cat.CONTEXT_RULES.items()
                    if rule.context_field == "device_type" and rule.value}
_CONFIG_WINDOW = struct.Struct("<II")          # a config payload's offset and size
_FEATURES = struct.Struct("<Q")
_REQUEST_FLAGS = struct.Struct("<II")
# The replies that may tell it (infer_device_type), while it is still unknown.
DEVICE_TELLING_REPLIES = frozenset({int(cat.FrontendRequest.GET_CONFIG), int(cat.FrontendRequest.GET_FEATURES)})
# The low bytes of the requests that can tell it: a proxy tests a message's first byte against these before it
# calls infer_device_type, so that a session that never tells costs one set lookup per message.
DEVICE_HINTS = frozenset({*_DEVICE_REQUESTS, *DEVICE_TELLING_REPLIES})


def device_from_offered_features(features: int) -> tuple[str, str] | None:
    """(device type, what told it) when the device-specific bits a back-end offers are all defined by one device
    type only (DPDK's net offers GUEST_TSO6, CTRL_RX, GUEST_ANNOUNCE, MQ: bits no blk, fs or gpu defines); None
    while two types or more remain (qemu-storage-daemon's blk offers only bits net defines too), or none does."""
    offered = features & cat.DEVICE_SPECIFIC_FEATURES_MASK
    if not offered:
        return None
    fitting = [device for device, defined in cat.DEVICE_DEFINED_FEATURES.items() if not offered & ~defined]
    if len(fitting) != 1:
        return None
    device = fitting[0]
    others = 0
    for other, defined in cat.DEVICE_DEFINED_FEATURES.items():
        if other != device:
            others |= defined
    # name the bits that told it: those no other type defines, or all of them when only their combination does
    told, which = (offered & ~others, "which only") if offered & ~others else (offered, "which together only")
    bits = ",".join(str(bit) for bit in range(64) if told >> bit & 1)
    return device, f"offered feature bits {bits}, {which} {device} defines"


def device_from_config_window(offset: int, size: int, length: int) -> tuple[str, str] | None:
    """(device type, what told it) when a GET_CONFIG reply's window (offset, size, and the bytes it carries) is
    a whole config space only one device type's front-end reads."""
    device = cat.CONFIG_SIZE_DEVICES.get(size)
    if device is None or offset != 0 or length != size:
        return None
    return device, f"GET_CONFIG size {size}"


def infer_device_type(channel: Channel, data: bytes) -> tuple[str, str] | None:
    """(device type, what told it) when one message's bytes tell the device type by the rules the ContextTracker
    follows (NET_SET_MTU, GPU_SET_SOCKET, ..., a whole config space only one device type has, device feature bits
    only one device type defines); else None. Reads the header only, and a GET_CONFIG or GET_FEATURES reply's
    payload: cheap enough for a proxy's every message."""
    if channel != Channel.MAIN or len(data) < HEADER_SIZE:
        return None
    request, flags, size = HEADER_STRUCT.unpack_from(data)
    if not flags & cat.FLAG_REPLY:
        return _DEVICE_REQUESTS.get(request)
    if len(data) != HEADER_SIZE + size:
        return None
    if request == cat.FrontendRequest.GET_FEATURES and size == _FEATURES.size:
        return device_from_offered_features(_FEATURES.unpack_from(data, HEADER_SIZE)[0])
    if request != cat.FrontendRequest.GET_CONFIG or size < 12:
        return None
    offset, window = _CONFIG_WINDOW.unpack_from(data, HEADER_SIZE)
    return device_from_config_window(offset, window, size - 12)


# The requests whose context rule `observe` follows (a reply that may tell the device type is the other case).
_RULE_REQUESTS = frozenset(int(request) for request in cat.CONTEXT_RULES)
_MAIN = Channel.MAIN


class ContextTracker:
    """Decodes records in order, keeping each connection's DecodeContext up to date."""

    def __init__(self, device_type: str | None = None, profile: cat.Profile = cat.SPEC_PROFILE,
                 device_source: str = "stated by --device"):
        self.base = replace(DEFAULT_CONTEXT, device_type=device_type, profile=profile,
                            device_source=device_source if device_type else "")
        self.forced_device = device_type
        self.contexts: dict[int, DecodeContext] = {}
        # grammar.decode, or a ShapeDecoder's decode (protocol.shapes) for speed
        self.decoder: Callable[[bytes, Channel, DecodeContext], Message] = decode

    def context_for(self, connection: int) -> DecodeContext:
        return self.contexts.get(connection, self.base)

    def decode(self, record: Record) -> Message | None:
        """The record's message, decoded in its connection's context; None for events."""
        if record.kind != RecordKind.MESSAGE:
            self._observe_event(record)
            return None
        return self.decode_message(record)

    def decode_message(self, record: Record) -> Message:
        """A message record's message, decoded in its connection's context (for a caller that knows the kind)."""
        connection = record.connection
        ctx = self.contexts.get(connection, self.base)
        message = self.decoder(record.data, record.channel, ctx)
        # observe's own tests, first, so that a message that tells nothing costs no call
        if record.channel is _MAIN and (ctx.device_type is None and message.request in DEVICE_TELLING_REPLIES
                                        if message.is_reply else message.request in _RULE_REQUESTS):
            self.observe(connection, message, ctx)
            now = self.contexts.get(connection, self.base)
            if now is not ctx and now.device_type != ctx.device_type:
                # the message that told the device type reads as that device's (a GET_CONFIG window: its config)
                message = self.decoder(record.data, record.channel, now)
        return message

    def unobserved_context(self, record: Record) -> DecodeContext | None:
        """The context a message record decodes in, when decoding it would tell this tracker nothing (a caller
        may then decode it later, or never); None when it must go through decode_message now."""
        ctx = self.contexts.get(record.connection, self.base)
        if record.channel is not _MAIN:
            return ctx
        data = record.data
        if len(data) < HEADER_SIZE:
            return None
        request, flags = _REQUEST_FLAGS.unpack_from(data)
        if (ctx.device_type is None and request in DEVICE_TELLING_REPLIES if flags & cat.FLAG_REPLY
                else request in _RULE_REQUESTS):
            return None
        return ctx

    def _observe_event(self, record: Record) -> None:
        # The proxy (a route that knows its device) and replay say the device type with a DEVICE event; a
        # version-1 capture said it in a note, which the reader migrated to `record.device`.
        device = record.note if record.event == EventKind.DEVICE else record.device
        if device in cat.DEVICE_TYPES and not self.forced_device:
            ctx = self.context_for(record.connection)
            self.contexts[record.connection] = replace(ctx, device_type=device, device_source="stated by the capture")

    def observe(self, connection: int, message: Message, ctx: DecodeContext) -> None:
        """Follow what a message already decoded in `ctx` (the connection's current context) negotiates.

        A device type is inferred only while none is known: a DEVICE event or `--device` always wins."""
        if message.channel != Channel.MAIN or message.kind is None:
            return
        if message.is_reply:
            if ctx.device_type is None and message.request in DEVICE_TELLING_REPLIES:
                self._observe_telling_reply(connection, message, ctx)
            return
        rule = cat.CONTEXT_RULES.get(message.request)
        if rule is None:
            return
        if rule.payload_field:
            self.contexts[connection] = _with_field(ctx, rule.context_field, getattr(message.payload,
                                                                                     rule.payload_field))
        elif getattr(ctx, rule.context_field) is None:
            ctx = _with_field(ctx, rule.context_field, rule.value)
            if rule.context_field == "device_type":
                ctx = replace(ctx, device_source=f"inferred from {message.name}")
            self.contexts[connection] = ctx

    def _observe_telling_reply(self, connection: int, message: Message, ctx: DecodeContext) -> None:
        """A GET_CONFIG reply whose window is a whole config space only one device type has, or a GET_FEATURES
        reply whose device bits only one type defines, tells the type (by the proxy's own rule, on the bytes)."""
        found = infer_device_type(message.channel, message.raw)
        if found is not None:
            device, how = found
            self.contexts[connection] = replace(ctx, device_type=device, device_source=f"inferred from {how}")


def _with_field(ctx: DecodeContext, name: str, value: object) -> DecodeContext:
    """ctx with the field a context rule names set to value (the rules are data, shared with the Lua dissector)."""
    if name == "device_type" and isinstance(value, str):
        return replace(ctx, device_type=value)
    if name == "features" and isinstance(value, int):
        return replace(ctx, features=value)
    if name == "protocol_features" and isinstance(value, int):
        return replace(ctx, protocol_features=value)
    raise ValueError(f"no context rule sets DecodeContext.{name} to {value!r}")
