"""`vhusniff diff A B`: compare two captures message by message (a recording and its replay, a session with and
without a hook). Messages are paired in order within each channel; connection numbers and times are ignored."""
from __future__ import annotations

import argparse
import sys

from .model import Channel, Record, RecordKind
from .protocol import Message, iter_fields
from .session import ContextTracker


def _messages(records) -> dict[Channel, list[tuple[int, Record, Message]]]:
    tracker = ContextTracker()
    by_channel: dict[Channel, list[tuple[int, Record, Message]]] = {}
    for number, record in enumerate(records, 1):
        message = tracker.decode(record)
        if record.kind == RecordKind.MESSAGE:
            by_channel.setdefault(record.channel, []).append((number, record, message))
    return by_channel


def diff_records(left: list[Record], right: list[Record], ignore: frozenset[str] = frozenset()) -> list[str]:
    """Human-readable differences; empty when the two sessions said the same things in the same order."""
    lines: list[str] = []
    left_by, right_by = _messages(left), _messages(right)
    for channel in sorted(set(left_by) | set(right_by)):
        a, b = left_by.get(channel, []), right_by.get(channel, [])
        for (na, ra, ma), (nb, rb, mb) in zip(a, b):
            where = f"{channel.name.lower()} A#{na} B#{nb}"
            if ra.direction != rb.direction or ma.request != mb.request or ma.is_reply != mb.is_reply:
                lines.append(f"{where}: A {ra.direction.arrow} {ma.summary()}  |  B {rb.direction.arrow} "
                             f"{mb.summary()}")
                continue
            fields_a, fields_b = list(iter_fields(ma)), list(iter_fields(mb))
            for (name, value_a), (_name, value_b) in zip(fields_a, fields_b):
                if name not in ignore and value_a != value_b:
                    lines.append(f"{where} {ma.name}{' reply' if ma.is_reply else ''}: {name}: A {value_a!r}, "
                                 f"B {value_b!r}")
            if len(fields_a) != len(fields_b):
                lines.append(f"{where} {ma.name}: A has {len(fields_a)} fields, B {len(fields_b)}")
            if [fd.kind for fd in ra.fds] != [fd.kind for fd in rb.fds]:
                lines.append(f"{where} {ma.name}: fds A {[fd.kind for fd in ra.fds]}, B {[fd.kind for fd in rb.fds]}")
        for number, record, message in a[len(b):]:
            lines.append(f"{channel.name.lower()} A#{number}: only in A: {record.direction.arrow} {message.summary()}")
        for number, record, message in b[len(a):]:
            lines.append(f"{channel.name.lower()} B#{number}: only in B: {record.direction.arrow} {message.summary()}")
    return lines


def main(argv: list[str] | None = None) -> int:
    from .capture import CaptureError, read_capture
    parser = argparse.ArgumentParser(prog="vhusniff diff", description=__doc__)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--ignore", action="append", default=[], metavar="FIELD",
                        help="a field that may differ (e.g. vring.desc for addresses); repeatable")
    args = parser.parse_args(argv)
    try:
        left, right = list(read_capture(args.a)), list(read_capture(args.b))
    except CaptureError as error:
        print(f"vhusniff diff: {error}", file=sys.stderr)
        return 2
    lines = diff_records(left, right, frozenset(args.ignore))
    for line in lines:
        print(line)
    count = lambda records: sum(1 for r in records if r.kind == RecordKind.MESSAGE)
    print(f"{count(left)} messages in A, {count(right)} in B: " +
          ("the same" if not lines else f"{len(lines)} differences"))
    return 0 if not lines else 1
