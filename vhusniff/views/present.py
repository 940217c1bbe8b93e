"""How messages read to a person: one-line summaries, the field tree (-V) and hex (-x)."""
from __future__ import annotations

import sys

from ..capture.pcapng import source_tag_text
from ..model import Channel, RecordKind
from ..protocol import config as config_space
from ..protocol.grammar import (
    PAYLOADS,
    STREAM_REQUEST,
    Message,
    decode,
    flag_text,
    iter_fields,
    payload_summary,
    value_text,
)


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
        if name in config_space.FIELD_BY_NAME:
            shown = config_space.value_text(name, value)
        elif name == "request":
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


def record_detail(record, message: Message | None, verbose: bool, hex_dump: bool) -> str:
    """What -V and -x add under a record's line: the field tree and the fds, the hex dump ("" for neither)."""
    rest = ""
    if message is not None and verbose:
        rest += "\n".join(field_tree(message)) + "\n"
        rest += "".join(f"  fd[{index}]: {fd.summary()}\n" for index, fd in enumerate(record.fds))
        if record.source:
            rest += f"  source: {record.source}\n"
        if record.source_tag:
            rest += f"  source_tag: {source_tag_text(record.source_tag, record.source)}\n"
    if hex_dump:
        rest += "\n".join(hexdump(record.data)) + "\n\n"
    return rest


__all__ = ["field_tree", "hexdump", "line_printer", "record_detail", "record_line"]


_COLOURS = {"F>B": "\033[36m", "B>F": "\033[33m", "problem": "\033[31;1m", "event": "\033[35m", "reset": "\033[0m"}


def record_line(number: int, relative_seconds: float, record, message: Message | None, colour: bool = False) -> str:
    """The one-line view shared by `vhusniff read` and the live proxy, in the manner of tshark:

    `  12   0.004512 c1      F>B SET_VRING_ADDR  0x1  idx=0 desc=0x… used=… avail=…`
    """
    where = f"c{record.connection}" + ("" if record.channel == Channel.MAIN else f"/{record.channel.name.lower()}")
    if record.kind == RecordKind.EVENT:
        line = f"{number:>5} {relative_seconds:10.6f} {where:<10} --- {record.note}"
        return f"{_COLOURS['event']}{line}{_COLOURS['reset']}" if colour else line
    if message is None:
        message = decode(record.data, record.channel)     # a caller without a session context
    arrow = record.direction.arrow
    name = message.name + (" reply" if message.is_reply else "")
    fds = ""
    if record.fds:
        fds = "  fds=" + ",".join(fd.name if fd.kind == "eventfd" and fd.name.startswith("eventfd-id:") else fd.kind
                               for fd in record.fds)
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


def line_printer(stream=None):
    """A display callable writing each line to `stream` (stdout), flushed so a pipe reader sees it live."""
    stream = stream or sys.stdout

    def show(line: str) -> None:
        try:
            stream.write(line + "\n")
            stream.flush()
        except (BrokenPipeError, ValueError):
            pass
    return show
