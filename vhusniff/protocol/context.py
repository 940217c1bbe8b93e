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
            self.contexts[connection] = replace(ctx, **{rule.context_field: getattr(message.payload,
                                                                                   rule.payload_field)})
        elif getattr(ctx, rule.context_field) is None:
            self.contexts[connection] = replace(ctx, **{rule.context_field: rule.value})
