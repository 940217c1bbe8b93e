"""The `vhusniff` command: read, proxy, lab, rings."""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from collections.abc import Iterator
from typing import TextIO

from ..analysis.analyzer import Analyzer
from ..capture.pcapng import reading
from ..capture.progress import capture_progress
from ..model import RecordKind
from ..protocol import catalogue as cat
from ..protocol.context import ContextTracker
from ..protocol.grammar import iter_fields
from ..views.fast import fast_lines, general_messages
from ..views.filters import RECORD_FIELDS, FilterError, compile_filter
from ..views.present import record_detail, record_line
from .analysis import add_threshold_arguments

EXIT_BAD_INPUT = 2


def _add_decode_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=cat.DEVICE_TYPES,
                        help="virtio device type, for feature bit names (default: from the capture)")
    parser.add_argument("--profile", choices=sorted(cat.PROFILES), default="qemu-spec",
                        help="spec profile: which names the numbers mean (default: %(default)s)")


def _json_value(value):
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value


def message_fields(number: int, relative: float, record, message) -> dict[str, list]:
    """Every field of a message by dotted name (multi-valued where an array repeats it), plus frame fields."""
    fields: dict[str, list] = {
        "frame.number": [number], "frame.time_relative": [round(relative, 9)],
        "connection": [record.connection], "source": [record.source] if record.source else [],
        "source_tag": [record.source_tag] if record.source_tag else [],
        "channel": [record.channel.name.lower()],
        "direction": [record.direction.arrow], "name": [message.name],
        "fds": [len(record.fds)], "fd.kind": [fd.kind for fd in record.fds],
        "problem": [p.code for p in message.problems], "kind": [message.kind or ""],
    }
    for name, value in iter_fields(message):
        fields.setdefault(name, []).append(_json_value(value))
    return fields


def event_fields(number: int, relative: float, record) -> dict[str, list]:
    """An event record's fields, the record fields a filter sees on it (frame.number, event, note, ...)."""
    fields: dict[str, list] = {"frame.number": [number], "frame.time_relative": [round(relative, 9)]}
    for name, spec in RECORD_FIELDS.items():
        if spec.value is not None and name not in fields:
            values = spec.value(None, record, number)
            if values:
                fields[name] = values
    return fields


class _ExpertLines:
    """`read --expert` in one pass: the analyzer is fed as the records are read, and each shown record's text is
    held until no finding can still attach to it. A finding names an earlier record only while a request of that
    record waits for its reply (missing-reply, disconnect- and capture-ended-with-request-outstanding), so a
    record's text is written once no request at or before it is outstanding, and the rest at the end."""

    def __init__(self, analyzer: Analyzer, out: TextIO) -> None:
        self.analyzer, self.out = analyzer, out
        self.held: collections.deque[tuple[int, str, str]] = collections.deque()   # number, line, rest
        self.findings: dict[int, list] = {}       # record number -> findings attached to it, in raised order

    def feed(self, number: int, record, message) -> None:
        self._note(self.analyzer.feed(record, message, number))

    def hold(self, number: int, line: str, rest: str) -> None:
        self.held.append((number, line, rest))

    def release(self, final: bool = False) -> None:
        if final:
            self._note(self.analyzer.finish())
        if not self.held:
            return
        oldest = None if final else min((t.request_number for conn in self.analyzer.connections.values()
                                         for t in conn.outstanding()), default=None)
        while self.held and (oldest is None or self.held[0][0] < oldest):
            number, line, rest = self.held.popleft()
            self.out.write(line)
            for finding in self.findings.pop(number, ()):
                self.out.write(f"        [expert {finding.severity}: {finding.check}] {finding.text}\n")
            self.out.write(rest)

    def _note(self, findings) -> None:
        for finding in findings:
            self.findings.setdefault(finding.number, []).append(finding)


class _Output:
    """Writes records as -T asks: text lines (with -V and -x), tab-separated fields, or one JSON array."""

    def __init__(self, args, out: TextIO, colour: bool, expert: _ExpertLines | None):
        self.args, self.out, self.colour, self.expert = args, out, colour, expert
        self.json_started = False

    def write(self, number: int, relative: float, record, message) -> None:
        if self.args.T == "text":
            self._text(number, relative, record, message)
        elif message is not None:
            self._structured(number, relative, record, message.name, None, message.summary(),
                             [str(p) for p in message.problems], message_fields(number, relative, record, message))
        elif record.kind == RecordKind.EVENT:       # events are records too: shown in every format
            self._structured(number, relative, record, None, record.event.name, record.note, [],
                             event_fields(number, relative, record))

    def _text(self, number: int, relative: float, record, message) -> None:
        args = self.args
        line = record_line(number, relative, record, message, self.colour) + "\n"
        rest = record_detail(record, message, args.verbose, args.hex)
        if self.expert:
            self.expert.hold(number, line, rest)
        else:
            self.out.write(line + rest)

    def _structured(self, number: int, relative: float, record, request: str | None, event: str | None,
                    summary: str, problems: list[str], fields: dict) -> None:
        if self.args.T != "json":
            self.out.write("\t".join(",".join(str(v) for v in fields.get(name, ())) for name in self.args.e) + "\n")
            return
        entry: dict[str, object] = {"number": number, "time": relative, "connection": record.connection,
                                    "source": record.source, "source_tag": record.source_tag,
                                    "channel": record.channel.name.lower(),
                                    "direction": record.direction.arrow, "request": request}
        if event is not None:
            entry["event"] = event
        entry.update({"summary": summary, "fds": [fd._asdict() for fd in record.fds], "problems": problems,
                      "fields": fields})
        self.out.write(("[\n" if not self.json_started else ",\n") + json.dumps(entry))
        self.json_started = True

    def finish(self) -> None:
        if self.args.T == "json":
            self.out.write("\n]\n" if self.json_started else "[]\n")


def command_read(args) -> int:
    display_filter = None
    if args.filter:
        try:
            display_filter = compile_filter(args.filter)
        except FilterError as error:
            print(f"vhusniff: invalid display filter:\n{error}", file=sys.stderr)
            return EXIT_BAD_INPUT
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and args.T == "text")
    profile = cat.PROFILES[args.profile]
    expert = None
    if args.expert and args.T == "text":
        expert = _ExpertLines(Analyzer(args.device, profile, idle_seconds=args.idle_seconds,
                                       reply_seconds=args.reply_seconds, stuck_seconds=args.stuck_after), sys.stdout)
    tracker = expert.analyzer.tracker if expert else ContextTracker(args.device, profile)
    out = sys.stdout
    output = _Output(args, out, colour, expert)
    shown = 0
    hidden_events = 0            # event records the display filter did not let through
    # The messages stream to stdout as they are read: on the terminal itself they show the progress, and a bar on
    # the same screen would cut through them. Redirected or piped, the bar shows how far the file is read.
    show_bar = not (args.quiet or out.isatty()) and len(args.file) == 1
    path = args.file[0]
    with reading(path) as outcome, capture_progress(path, show_bar) as progress:
        records: Iterator[tuple] = iter(())
        if args.T == "text" and not expert and len(args.file) == 1:      # text without findings: the fast path
            _shown, hidden_events = fast_lines(path, tracker, out, colour, args.follow, args.count,
                                               progress.source, display_filter, args.verbose, args.hex)
        else:       # several captures are merged by time: the general path numbers connections
            records = general_messages(args.file, tracker, source=progress.source)
        for number, relative, record, message in records:
            if expert:
                expert.feed(number, record, message)
                expert.release()
            if args.count and shown >= args.count:
                continue          # only the expert findings' list still wants the rest of the capture
            if args.follow is not None and record.connection != args.follow:
                continue
            if display_filter is not None and (message is None and record.kind != RecordKind.EVENT or
                                               not display_filter.matches(message, record, number)):
                hidden_events += record.kind == RecordKind.EVENT
                continue
            output.write(number, relative, record, message)
            shown += 1
            if args.count and shown >= args.count and not expert:
                break
    if expert:
        expert.release(final=True)   # also after damage: the findings of everything read before it
    if outcome.error:
        out.flush()              # what was read comes first, then the one error line
        outcome.report()
    output.finish()
    if expert:
        findings = expert.analyzer.findings
        out.write(f"\nExpert findings: {len(findings)}\n")
        for finding in findings:
            out.write(f"  c{finding.connection} {finding.line()}\n")
    if hidden_events:
        out.flush()
        print(f"vhusniff: the display filter hid {hidden_events} event record(s) (connects, closes, notes); "
              f"add '|| event' to show them", file=sys.stderr)
    return EXIT_BAD_INPUT if outcome.error else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vhusniff", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    read = commands.add_parser("read", help="show a capture, one line per message, like tshark")
    read.add_argument("file", nargs="+", help="a capture; several are read merged by time, as mergecap merges them")
    read.add_argument("-V", dest="verbose", action="store_true", help="full field tree")
    read.add_argument("-x", dest="hex", action="store_true", help="hex dump of each message")
    read.add_argument("-c", dest="count", type=int, default=0, help="stop after N shown messages")
    read.add_argument("-Y", dest="filter", help="display filter, e.g. 'request == SET_MEM_TABLE && flags.need_reply'")
    read.add_argument("-T", choices=("text", "json", "fields"), default="text", help="output format")
    read.add_argument("-e", action="append", default=[], help="field for -T fields (repeatable)")
    read.add_argument("--follow", type=int, metavar="CONNECTION", help="only this connection")
    read.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    read.add_argument("--expert", action="store_true",
                      help="expert findings under the messages they concern, and their list at the end")
    read.add_argument("-q", "--quiet", action="store_true", help="no progress bar on stderr")
    _add_decode_options(read)
    add_threshold_arguments(read)
    read.set_defaults(run=command_read)

    for name, (_module, _function, text) in DELEGATED.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


# Subcommands that own their argument parsing: name -> (module, function, help).
DELEGATED = {
    "proxy": ("cli.proxy", "main", "intercept a live front-end/back-end pair"),
    "lab": ("lab.command", "main", "boot a throwaway real QEMU and back-end through the proxy"),
    "replay": ("replay", "main", "replay a capture against a real back-end or a real front-end"),
    "fuzz": ("cli.fuzz", "main", "fuzz a real back-end from a seed capture, with reproducers that replay"),
    "diff": ("analysis.diff", "main", "compare two captures message by message"),
    "state": ("cli.analysis", "main_state", "negotiated session state as of any message"),
    "stats": ("cli.analysis", "main_stats", "per-request counts and response times, connections"),
    "report": ("cli.analysis", "main_report", "what a person reads first when a VM did not start"),
    "timeline": ("cli.analysis", "main_timeline", "a picture of the session over time"),
    "rings": ("cli.rings", "main", "the rings over time: avail/used indexes, in flight, kicks and calls"),
    "expert": ("cli.analysis", "main_expert", "expert findings (Wireshark's expert info); --checks lists them"),
}


def main(argv: list[str] | None = None) -> int:
    # fd names are paths as the kernel gave them, not always UTF-8: show such bytes as escapes, never fail.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        return _dispatch(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `vhusniff stats ... | head`: the reader left; say nothing more (and not at interpreter exit either).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in DELEGATED:
        import importlib
        module_name, function, _text = DELEGATED[argv[0]]
        return getattr(importlib.import_module(f"vhusniff.{module_name}"), function)(argv[1:])
    args = build_parser().parse_args(argv)
    if args.T == "fields" and not args.e:
        print("vhusniff: -T fields needs at least one -e NAME", file=sys.stderr)
        return EXIT_BAD_INPUT
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
