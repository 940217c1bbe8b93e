"""`vhusniff diff A B`: compare two captures message by message (a recording and its replay, a session with and
without a hook). Messages are paired in order within each channel; connection numbers and times are ignored.

The two captures are read side by side in one pass: a message waits only until its partner on the other side is
read, and each channel's differences are spooled (to a temporary file once large) to be printed channel by channel,
so memory is bounded by how far the two sides drift apart, not by their length."""
from __future__ import annotations

import argparse
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator, Mapping

from ..capture.pcapng import ReadOutcome, read_capture, reading
from ..capture.progress import capture_progress
from ..capture.scan import scan_records
from ..model import Channel, Record, RecordKind
from ..protocol import catalogue as cat
from ..protocol.context import ContextTracker
from ..protocol.grammar import DecodeContext, Message, iter_fields
from ..protocol.shapes import ShapeDecoder


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


# (record number, record, its message, or the context to decode it in when it is needed: see _messages)
Numbered = tuple[int, Record, "Message | DecodeContext"]


def _messages(records: Iterable[Record]) -> Iterator[Numbered]:
    """(record number, record, message) of every message, decoded in its connection's context; a message that
    tells its connection's context nothing comes with that context instead, and is decoded only if its bytes
    differ from its partner's (most of two similar sessions is the same bytes)."""
    tracker = ContextTracker()
    tracker.decoder = ShapeDecoder().decode
    decode_message, unobserved_context = tracker.decode_message, tracker.unobserved_context
    message_kind = RecordKind.MESSAGE
    for number, record in enumerate(records, 1):
        if record.kind is message_kind:
            context = unobserved_context(record)
            yield number, record, decode_message(record) if context is None else context
        else:
            tracker.decode(record)          # an event still counts: a DEVICE event names the device type


def _context(message: Message | DecodeContext) -> DecodeContext:
    return message if isinstance(message, DecodeContext) else message.context


def _pair_lines(channel: Channel, a: tuple[int, Record, Message], b: tuple[int, Record, Message],
                ignore: frozenset[str]) -> list[str]:
    """The differences of two paired messages (none for the same bytes read in the same context)."""
    (na, ra, ma), (nb, rb, mb) = a, b
    if ra.data == rb.data and ra.direction == rb.direction and ma.context == mb.context and \
            [fd.kind for fd in ra.fds] == [fd.kind for fd in rb.fds]:
        return []           # every field alike, nothing to compare
    where = f"{channel.name.lower()} A#{na} B#{nb}"
    if ra.direction != rb.direction or ma.request != mb.request or ma.is_reply != mb.is_reply:
        return [f"{where}: A {ra.direction.arrow} {ma.summary()}  |  B {rb.direction.arrow} {mb.summary()}"]
    name = f"{ma.name}{' reply' if ma.is_reply else ''}"
    lines = [f"{where} {name}: {difference}" for difference in field_differences(ma, mb, ignore)]
    if "fd.kind" not in ignore and [fd.kind for fd in ra.fds] != [fd.kind for fd in rb.fds]:
        lines.append(f"{where} {name}: fds A {[fd.kind for fd in ra.fds]}, B {[fd.kind for fd in rb.fds]}")
    return lines


class DiffStream:
    """Pairs the messages of two record streams read side by side; `lines()` then gives the differences channel
    by channel, in each channel's order, as diff_records does."""

    SPOOL_BYTES = 1 << 20           # a channel's differences stay in memory up to this, then go to a file

    def __init__(self, left: Iterable[Record], right: Iterable[Record], ignore: frozenset[str] = frozenset()):
        self.ignore = ignore
        self.sides = (_messages(left), _messages(right))
        self.counts = [0, 0]                                # messages read from A and B
        self.pending: dict[Channel, tuple[deque[Numbered], deque[Numbered]]] = {}
        self.spools: dict[Channel, tempfile.SpooledTemporaryFile] = {}
        self.differences = 0
        self.waiting = [0, 0]                               # messages of A and B waiting for a partner
        self._decode = ShapeDecoder().decode                # a message _messages left undecoded, when it is needed
        self._alike: tuple[DecodeContext, DecodeContext] | None = None     # the last two contexts found equal

    def run(self) -> DiffStream:
        done = [False, False]
        sides, counts, waiting, pending = self.sides, self.counts, self.waiting, self.pending
        while not all(done):
            # Read from the side with fewer messages waiting for a partner (either, while neither waits).
            side = 0 if (waiting[0] <= waiting[1] and not done[0]) or done[1] else 1
            item = next(sides[side], None)
            if item is None:
                done[side] = True
                continue
            counts[side] += 1
            channel = item[1].channel
            queues = pending.get(channel)
            if queues is None:
                queues = pending[channel] = (deque(), deque())
            other = queues[1 - side]
            if not other:
                queues[side].append(item)
                waiting[side] += 1
                continue
            partner = other.popleft()
            waiting[1 - side] -= 1
            a, b = (item, partner) if side == 0 else (partner, item)
            if not self._same(a, b):
                self._write(channel, _pair_lines(channel, self._decoded(a), self._decoded(b), self.ignore))
        for channel, queues in self.pending.items():
            for side_name, queue in zip("AB", queues, strict=True):
                self._write(channel, [f"{channel.name.lower()} {side_name}#{number}: only in {side_name}: "
                                      f"{record.direction.arrow} {message.summary()}"
                                      for number, record, message in map(self._decoded, queue)])
                queue.clear()
        return self

    def _same(self, a: Numbered, b: Numbered) -> bool:
        """The same bytes, direction and fd kinds, read in the same context: every field alike."""
        ra, rb = a[1], b[1]
        if ra.data != rb.data or ra.direction is not rb.direction:
            return False
        if (ra.fds or rb.fds) and [fd.kind for fd in ra.fds] != [fd.kind for fd in rb.fds]:
            return False
        context_a, context_b = _context(a[2]), _context(b[2])
        alike = self._alike
        if context_a is context_b or alike is not None and alike[0] is context_a and alike[1] is context_b:
            return True
        if context_a != context_b:
            return False
        self._alike = (context_a, context_b)    # held: a session's context changes a few times, its messages many
        return True

    def _decoded(self, item: Numbered) -> tuple[int, Record, Message]:
        number, record, message = item
        if isinstance(message, DecodeContext):
            message = self._decode(record.data, record.channel, message)
        return number, record, message

    def _write(self, channel: Channel, lines: list[str]) -> None:
        if not lines:
            return
        spool = self.spools.get(channel)
        if spool is None:
            spool = self.spools[channel] = tempfile.SpooledTemporaryFile(self.SPOOL_BYTES, "w+", encoding="utf-8")
        spool.writelines(line + "\n" for line in lines)
        self.differences += len(lines)

    def lines(self) -> Iterator[str]:
        """The differences, channel by channel (each read back once)."""
        for channel in sorted(self.spools):
            spool = self.spools.pop(channel)
            spool.seek(0)
            with spool:
                for line in spool:
                    yield line.rstrip("\n")


def diff_records(left: Iterable[Record], right: Iterable[Record], ignore: frozenset[str] = frozenset()) -> list[str]:
    """Human-readable differences; empty when the two sessions said the same things in the same order."""
    return list(DiffStream(left, right, ignore).run().lines())


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
    outcomes: list[ReadOutcome] = []
    # One bar (A's) while both are read side by side: B keeps pace with it.
    left = _read_reporting(args.a, outcomes, progress=not args.quiet)
    right = _read_reporting(args.b, outcomes, progress=False)
    diff = DiffStream(left, right, frozenset(args.ignore)).run()
    # Each file's error, A's first; nothing else is printed then.
    if [outcome.report() for outcome in outcomes].count(True):
        return 2
    for line in diff.lines():
        print(line)
    print(f"{diff.counts[0]} messages in A, {diff.counts[1]} in B: " +
          ("the same" if not diff.differences else f"{diff.differences} differences"))
    return 0 if not diff.differences else 1


def _read_reporting(path: str, outcomes: list[ReadOutcome], progress: bool) -> Iterator[Record]:
    """A capture's records as they are read; a damaged or missing file ends them, its error kept in `outcomes`."""
    with reading(path) as outcome, capture_progress(path, progress) as bar:
        outcomes.append(outcome)
        yield from scan_records(bar.source)
