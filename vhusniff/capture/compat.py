"""Reading captures of older formats: what a version-1 record meant, said as version 2 says it.

Capture format 1 wrote a lifecycle event as text only, and its readers classified that text. Format 2 writes the
event's kind (model.EventKind) in the pseudo-header and nothing reads prose. `migrate_v1_event` is the one place
where text is still read back: it gives a version-1 event record the kind its own readers gave it, so an old
capture reads (and analyses) as it always did. The generated Lua dissector follows the same table
(V1_EVENT_RULES) when it reads a version-1 capture.
"""
from __future__ import annotations

from typing import NamedTuple

from ..model import Channel, EventKind

# How version-1 readers classified an event's note, first match wins: (lower-case substring, kind). An "end"
# was any close, disconnect, hang-up, EOF, crash... of the connection (a half-close too: version 1 told them
# apart only in words); the same words on a side channel ended only that channel.
V1_EVENT_RULES: tuple[tuple[str, EventKind], ...] = tuple(
    [(word, EventKind.CLOSED) for word in ("clos", "disconnect", "hung up", "hang-up", "hangup", "eof",
                                           "reset by", "ended", "crash", "died", "killed", "gone")]
    + [(word, EventKind.CONNECTED) for word in ("connect", "accept")]
    + [("interposed", EventKind.CHANNEL_OPENED), ("cannot be framed", EventKind.PROTOCOL_ERROR),
       ("where no message begins", EventKind.PROTOCOL_ERROR)])
# A version-1 event named the connection's device type as `device=NAME` (format 2 writes a DEVICE event).
V1_DEVICE_MARK = "device="


class V1Event(NamedTuple):
    kind: EventKind
    device: str          # the device type the note named, "" when none


def migrate_v1_event(note: str, channel: Channel = Channel.MAIN) -> V1Event:
    """The kind of a version-1 event record from its note (the only reading of prose in vhusniff), and the
    device type it named. A close on a side channel is CHANNEL_CLOSED: the connection went on."""
    text = note.lower()
    kind = EventKind.NOTE
    for word, rule_kind in V1_EVENT_RULES:
        if word in text:
            kind = rule_kind
            break
    if kind == EventKind.CLOSED and channel != Channel.MAIN:
        kind = EventKind.CHANNEL_CLOSED
    device = ""
    at = text.find(V1_DEVICE_MARK)
    if at >= 0:
        rest = note[at + len(V1_DEVICE_MARK):]
        end = 0
        while end < len(rest) and (rest[end].isalnum() or rest[end] == "_"):
            end += 1
        device = rest[:end]
    return V1Event(kind, device)
