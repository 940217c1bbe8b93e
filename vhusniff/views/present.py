"""How messages read to a person: one-line summaries, the field tree (-V) and hex (-x)."""
from __future__ import annotations

from ..protocol import catalogue as cat
from ..protocol.grammar import HEADER_SIZE, PAYLOADS, STREAM_REQUEST, Message, decode, iter_fields

# Fields never worth a place in a one-line summary.
_QUIET_FIELDS = frozenset({"padding", "reserved"})
# Short names for the summary line, as people write them in bug reports.
_SHORT = {"index": "idx", "guest_phys_addr": "gpa", "memory_size": "size", "userspace_addr": "uaddr",
          "mmap_offset": "off"}


def flag_text(flags: int) -> str:
    """`0x9 NEED_REPLY`, `0x5 REPLY`, with reserved bits called out."""
    names = []
    if flags & cat.FLAG_REPLY:
        names.append("REPLY")
    if flags & cat.FLAG_NEED_REPLY:
        names.append("NEED_REPLY")
    if flags & cat.FLAGS_RESERVED:
        names.append(f"RESERVED({flags & cat.FLAGS_RESERVED:#x})")
    return f"{flags:#x}" + (" " + "|".join(names) if names else "")


def value_text(message: Message, name: str, value) -> str:
    """A field's value as a person wants it: feature words as bit names, addresses in hex."""
    ctx = message.context
    if name == "features":
        return bit_names_with_hex(value, cat.feature_names(ctx.device_type))
    if name == "protocol_features":
        return bit_names_with_hex(value, ctx.profile.protocol_features)
    if name == "status":
        return bit_names_with_hex(value, cat.DEVICE_STATUS)
    if isinstance(value, (bytes, bytearray)):
        if name == "mac" and len(value) == 6:
            return ":".join(f"{b:02x}" for b in value)
        return value[:16].hex() + ("…" if len(value) > 16 else "") if value else "''"
    if isinstance(value, int):
        return f"{value:#x}" if value > 0xFFFF else str(value)
    if isinstance(value, list):
        return "[" + ",".join(value_text(message, "", v) for v in value[:4]) + (",…]" if len(value) > 4 else "]")
    return str(value)


def bit_names_with_hex(value: int, names) -> str:
    return f"{value:#x}({cat.bit_names(value, names)})"


def payload_summary(message: Message) -> str:
    if message.kind is None:
        if message.request == STREAM_REQUEST:
            return f"{len(message.raw)} bytes (opaque)"
        if message.request < 0:
            return message.raw.hex()
        return f"payload={len(message.payload_bytes)}B" if message.size else ""
    structure = PAYLOADS[message.kind][0]
    payload = message.payload
    parts = []
    for sub in structure.subcons:
        name = sub.name
        if name is None or name in _QUIET_FIELDS:
            continue
        value = payload[name]
        if name == "region":
            regions = value if isinstance(value, list) else [value]
            for region in regions:
                parts.append("{gpa=%#x size=%#x uaddr=%#x off=%#x}" % (
                    region.guest_phys_addr, region.memory_size, region.userspace_addr, region.mmap_offset))
            continue
        if name == "flags" and message.kind in ("vring_fd", "vring_area"):
            if value & 1:
                parts.append("NOFD")
            continue
        if name == "memory_sizes":
            used = [f"{i}:{size:#x}" for i, size in enumerate(value) if size]
            parts.append("sizes={" + ",".join(used) + "}")
            continue
        if name == "data" and message.kind == "config":
            parts.append(f"data={len(value)}B")
            continue
        parts.append(f"{_SHORT.get(name, name)}={value_text(message, name, value)}")
    return " ".join(parts)


def summarize(message: Message) -> str:
    """`SET_VRING_ADDR idx=0 desc=0x… used=… avail=…`, with `[problem-code]` marks when something is wrong."""
    text = message.name
    if message.is_reply:
        text += " reply"
    payload = payload_summary(message)
    if payload:
        text += " " + payload
    for problem in message.problems:
        text += f" [{problem.code}]"
    return text


def field_tree(message: Message) -> list[str]:
    """The -V view: one line per field, indented by its dotted depth, problems first."""
    lines = [f"vhost-user {message.channel.name.lower()} channel, {len(message.raw)} bytes"]
    for problem in message.problems:
        lines.append(f"  [Expert: {problem.code}] {problem.text}")
    if message.kind:
        lines.append(f"  payload kind: {message.kind} ({PAYLOADS[message.kind][2]})")
    for name, value in iter_fields(message):
        depth = name.count(".")
        shown = value_text(message, name.rsplit(".", 1)[-1], value)
        if name == "request":
            shown = f"{message.name} ({value})"
        elif name == "flags":
            shown = flag_text(value)
        lines.append("  " + "  " * depth + f"{name}: {shown}")
    return lines


def hexdump(data: bytes, indent: str = "  ") -> list[str]:
    lines = []
    for offset in range(0, len(data), 16):
        chunk = data[offset:offset + 16]
        hex_part = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{indent}{offset:04x}  {hex_part:<47}  {text}")
    return lines


__all__ = ["summarize", "field_tree", "hexdump", "flag_text", "value_text", "HEADER_SIZE"]


_COLOURS = {"F>B": "\033[36m", "B>F": "\033[33m", "problem": "\033[31;1m", "event": "\033[35m", "reset": "\033[0m"}


def record_line(number: int, relative_seconds: float, record, message: Message | None, colour: bool = False) -> str:
    """The one-line view shared by `vhusniff read` and the live proxy, in the manner of tshark:

    `  12   0.004512 c1      F>B SET_VRING_ADDR  0x1  idx=0 desc=0x… used=… avail=…`
    """
    from ..model import Channel, RecordKind
    where = f"c{record.connection}" + ("" if record.channel == Channel.MAIN else f"/{record.channel.name.lower()}")
    if message is None and record.kind != RecordKind.EVENT:
        message = decode(record.data, record.channel)     # a caller without a session context
    if record.kind == RecordKind.EVENT:
        line = f"{number:>5} {relative_seconds:10.6f} {where:<10} --- {record.note}"
        return f"{_COLOURS['event']}{line}{_COLOURS['reset']}" if colour else line
    arrow = record.direction.arrow
    name = message.name + (" reply" if message.is_reply else "")
    fds = ""
    if record.fds:
        fds = "  fds=" + ",".join(fd.kind for fd in record.fds)
    # A device-state stream chunk has no header, so no flags.
    flags = "" if message.request == STREAM_REQUEST else flag_text(message.flags)
    line = f"{number:>5} {relative_seconds:10.6f} {where:<10} {arrow} {name:<28} {flags:<16} " \
           f"{payload_summary(message)}{fds}"
    if record.note:
        line += f"  ({record.note})"
    for problem in message.problems:
        line += f"  [{problem.code}: {problem.text}]"
    if colour:
        tint = _COLOURS["problem"] if message.problems else _COLOURS[arrow]
        line = f"{tint}{line}{_COLOURS['reset']}"
    return line.rstrip()
