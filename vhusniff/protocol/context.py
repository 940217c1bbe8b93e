"""Per-connection negotiated context, followed message by message, so that each message decodes as its session
meant it (Xen regions, packed-ring bases, feature names for the device type)."""
from __future__ import annotations

from dataclasses import replace

from ..model import Channel, EventKind, Record, RecordKind
from . import catalogue as cat
from .grammar import DEFAULT_CONTEXT, DecodeContext, Message, decode


class ContextTracker:
    """Decodes records in order, keeping each connection's DecodeContext up to date."""

    def __init__(self, device_type: str | None = None, profile: cat.Profile = cat.SPEC_PROFILE):
        self.base = replace(DEFAULT_CONTEXT, device_type=device_type, profile=profile)
        self.forced_device = device_type
        self.contexts: dict[int, DecodeContext] = {}

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
        ctx = self.context_for(record.connection)
        message = decode(record.data, record.channel, ctx)
        self.observe(record.connection, message, ctx)
        return message

    def _observe_event(self, record: Record) -> None:
        # The proxy (a route that knows its device) and replay say the device type with a DEVICE event; a
        # version-1 capture said it in a note, which the reader migrated to `record.device`.
        device = record.note if record.event == EventKind.DEVICE else record.device
        if device in cat.DEVICE_TYPES and not self.forced_device:
            ctx = self.context_for(record.connection)
            self.contexts[record.connection] = replace(ctx, device_type=device)

    def observe(self, connection: int, message: Message, ctx: DecodeContext) -> None:
        """Follow what a message already decoded in `ctx` (the connection's current context) negotiates."""
        if message.channel != Channel.MAIN or message.is_reply or message.kind is None:
            return
        rule = cat.CONTEXT_RULES.get(message.request)
        if rule is None:
            return
        if rule.payload_field:
            self.contexts[connection] = _with_field(ctx, rule.context_field, getattr(message.payload,
                                                                                     rule.payload_field))
        elif getattr(ctx, rule.context_field) is None:
            self.contexts[connection] = _with_field(ctx, rule.context_field, rule.value)


def _with_field(ctx: DecodeContext, name: str, value: object) -> DecodeContext:
    """ctx with the field a context rule names set to value (the rules are data, shared with the Lua dissector)."""
    if name == "device_type" and isinstance(value, str):
        return replace(ctx, device_type=value)
    if name == "features" and isinstance(value, int):
        return replace(ctx, features=value)
    if name == "protocol_features" and isinstance(value, int):
        return replace(ctx, protocol_features=value)
    raise ValueError(f"no context rule sets DecodeContext.{name} to {value!r}")
