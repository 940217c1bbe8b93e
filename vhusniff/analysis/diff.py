"""`vhusniff diff A B`: compare two captures message by message (a recording and its replay, a session with and
without a hook). Messages are paired in order within each channel; connection numbers and times are ignored."""
from __future__ import annotations

import argparse
from collections.abc import Mapping

from ..capture.pcapng import read_capture, reading
from ..capture.progress import capture_progress
from ..model import Channel, Record, RecordKind
from ..protocol import catalogue as cat
from ..protocol.context import ContextTracker
from ..protocol.grammar import Message, iter_fields


def describe_difference(value_a, value_b, labels: tuple[str, str] = ("A", "B")) -> str:
    """`A x, B y`; for byte strings only the differing ranges, with their offsets (a config space is 60 bytes)."""
    la, lb = labels
    if not (isinstance(value_a, (bytes, bytearray)) and isinstance(value_b, (bytes, bytearray))):
        return f"{la} {_show(value_a)}, {lb} {_show(value_b)}"
    ranges, start = [], None
    for offset in range(max(len(value_a), len(value_b)) + 1):
        differs = offset < max(len(value_a), len(value_b)) and value_a[offset:offset + 1] != value_b[offset:offset + 1]
        if differs and start is None:
            start = offset
        elif not differs and start is not None:
            ranges.append((start, offset))
            start = None
    parts = [f"bytes {lo}-{hi - 1}: {la} {bytes(value_a[lo:hi]).hex() or '(none)'}, "
             f"{lb} {bytes(value_b[lo:hi]).hex() or '(none)'}" for lo, hi in ranges[:4]]
    more = f" (+{len(ranges) - 4} more ranges)" if len(ranges) > 4 else ""
    return "; ".join(parts) + more


def _bits_difference(name: str, value_a, value_b, message: Message, labels: tuple[str, str]) -> str:
    """For feature words, which named bits only one side has."""
    names: Mapping[int, str]
    if name == "features":
        names = cat.feature_names(message.context.device_type)
    elif name == "protocol_features":
        names = message.context.profile.protocol_features
    else:
        return ""
    parts = [f"only {label}: {cat.bit_names(only, names)}"
             for label, only in ((labels[0], value_a & ~value_b), (labels[1], value_b & ~value_a)) if only]
    return f" ({'; '.join(parts)})"


def _show(value) -> str:
    return hex(value) if isinstance(value, int) and not isinstance(value, bool) and value > 9 else repr(value)


def field_differences(a: Message, b: Message, ignore: frozenset[str] = frozenset(),
                      labels: tuple[str, str] = ("A", "B")) -> list[str]:
    """`name: A x, B y` for every field that differs; fields are paired by name (arrays by position within it)."""
    la, lb = labels
    lines = []
    if a.kind != b.kind:
        lines.append(f"payload kind: {la} {a.kind or 'raw'}, {lb} {b.kind or 'raw'}")
    fields_a, fields_b = _by_name(a), _by_name(b)
    for name in list(fields_a) + [name for name in fields_b if name not in fields_a]:
        if name in ignore:
            continue
        values_a, values_b = fields_a.get(name, []), fields_b.get(name, [])
        for index in range(max(len(values_a), len(values_b))):
            label = name if max(len(values_a), len(values_b)) == 1 else f"{name}[{index}]"
            if index >= len(values_a):
                lines.append(f"{label}: {la} absent, {lb} {_show(values_b[index])}")
            elif index >= len(values_b):
                lines.append(f"{label}: {la} {_show(values_a[index])}, {lb} absent")
            elif values_a[index] != values_b[index]:
                lines.append(f"{label}: {describe_difference(values_a[index], values_b[index], labels)}"
                             f"{_bits_difference(name, values_a[index], values_b[index], a, labels)}")
    return lines


def _by_name(message: Message) -> dict[str, list]:
    fields: dict[str, list] = {}
    for name, value in iter_fields(message):
        fields.setdefault(name, []).append(value)
    return fields


def _messages(records) -> dict[Channel, list[tuple[int, Record, Message]]]:
    tracker = ContextTracker()
    by_channel: dict[Channel, list[tuple[int, Record, Message]]] = {}
    for number, record in enumerate(records, 1):
        if record.kind == RecordKind.MESSAGE:
            by_channel.setdefault(record.channel, []).append((number, record, tracker.decode_message(record)))
        else:
            tracker.decode(record)          # an event still counts: a DEVICE event names the device type
    return by_channel


def diff_records(left: list[Record], right: list[Record], ignore: frozenset[str] = frozenset()) -> list[str]:
    """Human-readable differences; empty when the two sessions said the same things in the same order."""
    lines: list[str] = []
    left_by, right_by = _messages(left), _messages(right)
    for channel in sorted(set(left_by) | set(right_by)):
        a, b = left_by.get(channel, []), right_by.get(channel, [])
        for (na, ra, ma), (nb, rb, mb) in zip(a, b, strict=False):
            where = f"{channel.name.lower()} A#{na} B#{nb}"
            if ra.direction != rb.direction or ma.request != mb.request or ma.is_reply != mb.is_reply:
                lines.append(f"{where}: A {ra.direction.arrow} {ma.summary()}  |  B {rb.direction.arrow} "
                             f"{mb.summary()}")
                continue
            name = f"{ma.name}{' reply' if ma.is_reply else ''}"
            for difference in field_differences(ma, mb, ignore):
                lines.append(f"{where} {name}: {difference}")
            if "fd.kind" not in ignore and [fd.kind for fd in ra.fds] != [fd.kind for fd in rb.fds]:
                lines.append(f"{where} {name}: fds A {[fd.kind for fd in ra.fds]}, B {[fd.kind for fd in rb.fds]}")
        for number, record, message in a[len(b):]:
            lines.append(f"{channel.name.lower()} A#{number}: only in A: {record.direction.arrow} {message.summary()}")
        for number, record, message in b[len(a):]:
            lines.append(f"{channel.name.lower()} B#{number}: only in B: {record.direction.arrow} {message.summary()}")
    return lines


def load_or_report(path: str, program: str = "vhusniff", progress: bool = False) -> list[Record] | None:
    """All records of a capture, or None after saying on stderr why it cannot be read (capture.reading's words).
    `progress`: a bar on stderr while it is read, if stderr is a terminal (capture.progress)."""
    records: list[Record] = []
    with reading(path) as outcome, capture_progress(path, progress) as bar:
        records = list(read_capture(bar.source()))
    return None if outcome.report(program) else records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vhusniff diff", description=__doc__)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--ignore", action="append", default=[], metavar="FIELD",
                        help="a field that may differ (e.g. vring.desc for addresses, fd.kind); repeatable")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    left, right = load_or_report(args.a, progress=not args.quiet), load_or_report(args.b, progress=not args.quiet)
    if left is None or right is None:
        return 2
    lines = diff_records(left, right, frozenset(args.ignore))
    for line in lines:
        print(line)
    count = lambda records: sum(1 for r in records if r.kind == RecordKind.MESSAGE)
    print(f"{count(left)} messages in A, {count(right)} in B: " +
          ("the same" if not lines else f"{len(lines)} differences"))
    return 0 if not lines else 1
