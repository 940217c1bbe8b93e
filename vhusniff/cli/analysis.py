"""`vhusniff state | stats | report | expert | timeline CAPTURE`: the analysis views of a capture.

They stream: one pass, memory bounded by connections and outstanding requests, not by messages (the analyzer
keeps aggregates and a bounded number of example findings, stats counts as it reads, the timeline buckets by time
once a capture is too long to draw message by message)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from itertools import islice

from ..analysis.analyzer import IDLE_SECONDS, REPLY_SECONDS, Analyzer, connection_report, end_summary
from ..analysis.expert import CHECKS, Severity
from ..analysis.rings import STUCK_SECONDS
from ..capture.pcapng import ReadOutcome, reading
from ..capture.progress import capture_progress
from ..capture.scan import scan_records
from ..model import Channel, Direction, Record, RecordKind
from ..protocol import catalogue as cat
from ..protocol.grammar import Message, request_name
from ..protocol.shapes import LazyMessage, ShapeDecoder
from ..views.timeline import Timeline, render_html

EXIT_BAD_INPUT = 2


@dataclass
class Counter:
    count: int = 0
    bytes: int = 0
    fds: int = 0


MessageKey = tuple[int, Channel, Direction, int, bool]    # connection, channel, direction, request, reply?


@dataclass
class Loaded:
    analyzer: Analyzer
    outcome: ReadOutcome
    seen: list[tuple[int, Record, Message | None]] = field(default_factory=list)   # only with load(keep=True)
    counts: dict[MessageKey, Counter] = field(default_factory=dict)    # messages, bytes and fds per kind
    sources: dict[int, str] = field(default_factory=dict)    # connection -> where it was captured (Record.source)

    @property
    def error(self) -> str:
        """Why the capture was not read to its end ("" when it was): capture.reading's words."""
        return self.outcome.error


def load(path: str, device: str | None = None, profile: str = "qemu-spec", at: int | None = None,
         keep: bool = False, idle_seconds: float = IDLE_SECONDS, reply_seconds: float = REPLY_SECONDS,
         progress: bool = False, streaming: bool = False, timeline: Timeline | None = None,
         stuck_seconds: float = STUCK_SECONDS, checks: bool = True) -> Loaded:
    """Analyse a capture (up to record number `at`). A damaged capture is analysed as far as it reads.

    `streaming`: memory bounded by connections, not messages (Analyzer(keep=False)); else every transaction and
    finding is kept, and with `keep` every record too. `timeline`: fed every record (it may switch the analyzer
    to streaming once the capture is too long to draw message by message).
    `progress`: a bar on stderr while it is read, if stderr is a terminal (capture.progress).
    `checks`: False follows the state alone (`state` shows nothing else): no request/reply matching, no checks."""
    analyzer = Analyzer(device, cat.PROFILES[profile], keep=not streaming, idle_seconds=idle_seconds,
                        reply_seconds=reply_seconds, stuck_seconds=stuck_seconds)
    analyzer.tracker.decoder = ShapeDecoder().decode
    analyzer.checks = checks
    decode, feed = analyzer.tracker.decode_message, analyzer.feed
    message_kind = RecordKind.MESSAGE
    with reading(path) as outcome, capture_progress(path, progress) as bar:
        loaded = Loaded(analyzer, outcome)
        counts, sources = loaded.counts, loaded.sources
        shaped: dict[tuple[int, Direction, type[LazyMessage]], int] = {}     # counts of messages of a shape
        records = enumerate(scan_records(bar.source), 1)
        for number, record in records if at is None else islice(records, max(at, 0)):
            if record.source and record.connection not in sources:
                sources[record.connection] = record.source
            if record.kind is message_kind:
                message = decode(record)
                if isinstance(message, LazyMessage) and not record.fds:
                    # a message of a shape: its class says its channel, request, reply bit and length
                    shaped_key = (record.connection, record.direction, message.__class__)
                    shaped[shaped_key] = shaped.get(shaped_key, 0) + 1
                else:
                    key = (record.connection, record.channel, record.direction, message.request, message.is_reply)
                    counter = counts.get(key)
                    if counter is None:
                        counter = counts[key] = Counter()
                    counter.count += 1
                    counter.bytes += len(record.data)
                    counter.fds += len(record.fds)
                found = feed(record, message, number)
            else:
                message = None
                found = feed(record, None, number)
            if keep:
                loaded.seen.append((number, record, message))
            if timeline is not None and not timeline.add(number, record, message, found) and analyzer.keep:
                analyzer.stream()           # too long to draw message by message: from now on, aggregates
        _count_shaped(shaped, counts)
    if at is None:
        analyzer.finish()
    return loaded


def _count_shaped(shaped: dict[tuple[int, Direction, type[LazyMessage]], int],
                  counts: dict[MessageKey, Counter]) -> None:
    """Add the counts of messages of a shape (protocol.shapes) to `counts`: each was as long as its shape says."""
    for (connection, direction, message_class), count in shaped.items():
        assert message_class.shape is not None          # load counts here the messages of a shape only
        channel, request, is_reply, length = message_class.shape
        key = (connection, channel, direction, request, is_reply)
        counter = counts.get(key)
        if counter is None:
            counter = counts[key] = Counter()
        counter.count += count
        counter.bytes += count * length


def _parser(name: str, text: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"vhusniff {name}", description=text)
    parser.add_argument("file", help="capture (pcapng)")
    parser.add_argument("--connection", "-C", type=int, metavar="C", help="only this connection")
    parser.add_argument("--device", choices=cat.DEVICE_TYPES, help="virtio device type (default: from the capture)")
    parser.add_argument("--profile", choices=sorted(cat.PROFILES), default="qemu-spec")
    add_threshold_arguments(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar on stderr")
    return parser


def seconds_value(text: str) -> float:
    """A threshold in seconds: a positive number (argparse's type; a bad one is a usage error, no traceback)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"seconds must be a positive number: {text!r}")
    return value


def add_threshold_arguments(parser: argparse.ArgumentParser) -> None:
    """The time thresholds of the expert checks, read from the capture's timestamps."""
    parser.add_argument("--idle-seconds", type=seconds_value, default=IDLE_SECONDS, metavar="S",
                        help="idle-connection: a connection open this long without a message (default: %(default)s)")
    parser.add_argument("--reply-seconds", type=seconds_value, default=REPLY_SECONDS, metavar="S",
                        help="reply-overdue: a required reply this late, or still missing this long after its "
                             "request (default: %(default)s)")
    add_stuck_argument(parser)


def add_stuck_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stuck-after", type=seconds_value, default=STUCK_SECONDS, metavar="S",
                        help="stuck-ring: requests in flight and the used index still this long "
                             "(default: %(default)s)")


def _load(args, at: int | None = None, timeline: Timeline | None = None, checks: bool = True) -> Loaded:
    """Stream the capture; the timeline keeps what it draws message by message until it buckets by time."""
    return load(args.file, args.device, args.profile, at, False, args.idle_seconds, args.reply_seconds,
                progress=not args.quiet, streaming=timeline is None, timeline=timeline, stuck_seconds=args.stuck_after,
                checks=checks)


def _connections(loaded: Loaded, only: int | None) -> list[int]:
    return [c for c in sorted(loaded.analyzer.connections) if only is None or c == only]


def _finish(loaded: Loaded) -> int:
    return EXIT_BAD_INPUT if loaded.outcome.report() else 0


def _nothing_read(loaded: Loaded) -> bool:
    """A missing file, or not a capture: there is nothing to show but the error."""
    return bool(loaded.error) and loaded.analyzer.records == 0


# --- state ----------------------------------------------------------------------------------------------------------
def main_state(argv: list[str]) -> int:
    parser = _parser("state", "negotiated session state as of any message")
    parser.add_argument("--at", type=int, metavar="N", help="as of record number N (from 1; default: the end)")
    args = parser.parse_args(argv)
    loaded = _load(args, args.at, checks=False)
    if _nothing_read(loaded):
        return _finish(loaded)
    if args.at is not None:
        print(f"as of record #{min(args.at, loaded.analyzer.records)}")
    for connection in _connections(loaded, args.connection):
        print(loaded.analyzer.format_state(connection))
    return _finish(loaded)


# --- stats ----------------------------------------------------------------------------------------------------------
def message_counts(loaded: Loaded, only: int | None = None) -> dict[tuple[Channel, str, int, bool, str], Counter]:
    """(channel, direction arrow, request, reply?, name) -> count, bytes, fds; all connections or one."""
    profile = loaded.analyzer.profile
    merged: dict[tuple[Channel, str, int, bool, str], Counter] = {}
    for (connection, channel, direction, request, reply), counter in loaded.counts.items():
        if only is not None and connection != only:
            continue
        name = request_name(channel, request, profile) + (" reply" if reply else "")
        total = merged.setdefault((channel, direction.arrow, request, reply, name), Counter())
        total.count += counter.count
        total.bytes += counter.bytes
        total.fds += counter.fds
    return dict(sorted(merged.items(), key=lambda item: (item[0][0], item[0][2], item[0][3], item[0][1])))


def stats_lines(loaded: Loaded, only: int | None = None, expert: bool = False) -> list[str]:
    analyzer = loaded.analyzer
    lines = ["Messages per channel, direction and request",
             f"  {'channel':<9}{'dir':<5}{'request':<34}{'count':>7}{'bytes':>9}{'fds':>6}"]
    for (channel, arrow, _request, _reply, name), counter in message_counts(loaded, only).items():
        lines.append(f"  {channel.name.lower():<9}{arrow:<5}{name:<34}{counter.count:>7}{counter.bytes:>9}"
                     f"{counter.fds:>6}")
    lines += ["", "Service response time (request to reply)",
              f"  {'channel':<9}{'request':<30}{'replies':>8}{'min ms':>10}{'avg ms':>10}{'max ms':>10}"
              f"{'unanswered':>12}"]
    for (channel, _request, name), entry in analyzer.responses(only).items():
        figures = (f"{entry.min_ns / 1e9 * 1e3:>10.3f}{entry.total_ns / 1e9 / entry.replies * 1e3:>10.3f}"
                   f"{entry.max_ns / 1e9 * 1e3:>10.3f}" if entry.replies else f"{'-':>10}{'-':>10}{'-':>10}")
        lines.append(f"  {channel.name.lower():<9}{name:<30}{entry.replies:>8}{figures}{entry.unanswered:>12}")
    lines += ["", "Connections", f"  {'conn':<6}{'device':<8}{'records':<12}{'messages':>9}{'duration s':>12}  ended"]
    for connection in _connections(loaded, only):
        state = analyzer.state(connection)
        duration = ((state.last_ns or 0) - (state.first_ns or 0)) / 1e9
        span = f"#{state.first_number}-#{state.last_number}"
        lines.append(f"  {connection:<6}{state.device_type or '?':<8}{span:<12}{state.messages:>9}{duration:>12.3f}"
                     f"  {end_summary(analyzer, connection)}")
    count = analyzer.finding_count(only)
    lines += ["", f"Findings: {count}" + ("" if expert or not count else " (--expert lists them)")]
    if expert:
        lines += ["  " + finding.line() for finding in analyzer.findings
                  if only is None or finding.connection == only]
        lines += [f"  ... and {n} more {check} finding(s) on connection {c}, not kept"
                  for c, check, n in analyzer.findings_not_kept(only)]
    return lines


def main_stats(argv: list[str]) -> int:
    parser = _parser("stats", "per-request counts, bytes, fds and response times; connections")
    parser.add_argument("--expert", action="store_true", help="list the expert findings too")
    args = parser.parse_args(argv)
    loaded = _load(args)
    if _nothing_read(loaded):
        return _finish(loaded)
    print("\n".join(stats_lines(loaded, args.connection, args.expert)))
    return _finish(loaded)


# --- expert ---------------------------------------------------------------------------------------------------------
def expert_lines(loaded: Loaded, only: int | None = None, minimum: Severity = Severity.CHAT) -> list[str]:
    analyzer = loaded.analyzer
    findings = [f for f in analyzer.findings if (only is None or f.connection == only) and f.severity >= minimum]
    lines = [f"{analyzer.finding_count(only, minimum)} finding(s)"]
    lines += [f"  c{f.connection} {f.line()}" for f in sorted(findings, key=lambda f: f.number)]
    lines += [f"  c{c} ... and {n} more {check} finding(s), not kept"
              for c, check, n in analyzer.findings_not_kept(only, minimum)]
    return lines


def main_expert(argv: list[str]) -> int:
    parser = _parser("expert", "expert findings (Wireshark's expert info), or the table of checks with --checks")
    parser.add_argument("--min", choices=[str(s) for s in Severity], default="chat", help="lowest severity shown")
    parser.add_argument("--checks", action="store_true", help="list every check and exit")
    if "--checks" in argv:
        for check in CHECKS.values():
            print(f"{str(check.severity):<6}{check.group:<10}{check.id:<40}{check.summary}")
        return 0
    args = parser.parse_args(argv)
    loaded = _load(args)
    if _nothing_read(loaded):
        return _finish(loaded)
    print("\n".join(expert_lines(loaded, args.connection, Severity[args.min.upper()])))
    return _finish(loaded)


# --- report ---------------------------------------------------------------------------------------------------------
def main_report(argv: list[str]) -> int:
    parser = _parser("report", "a report per connection: what a person reads first when a VM did not start")
    args = parser.parse_args(argv)
    loaded = _load(args)
    if _nothing_read(loaded):
        return _finish(loaded)
    connections = _connections(loaded, args.connection)
    if not connections:
        print("no connections in the capture")
    print("\n\n".join(_with_source(connection_report(loaded.analyzer, c), loaded.sources.get(c))
                      for c in connections))
    return _finish(loaded)


def _with_source(report: str, source: str | None) -> str:
    """A connection's report with where it was captured under its first line (a merged capture holds several)."""
    if not source:
        return report
    first, _newline, rest = report.partition("\n")
    return f"{first}\n  Source:  {source}\n{rest}" if rest else f"{first}\n  Source:  {source}"


# --- timeline -------------------------------------------------------------------------------------------------------
def main_timeline(argv: list[str]) -> int:
    parser = _parser("timeline", "a picture of the session: lanes per channel and direction over time")
    parser.add_argument("-o", "--output", required=True, help="FILE.svg or FILE.html")
    args = parser.parse_args(argv)
    timeline = Timeline(args.connection)
    loaded = _load(args, timeline=timeline)
    if _nothing_read(loaded):
        return _finish(loaded)
    svg = timeline.render(loaded.analyzer, title=args.file)
    text = render_html(svg, args.file) if args.output.endswith((".html", ".htm")) else svg
    with open(args.output, "w", encoding="utf-8") as out:
        out.write(text)
    print(f"{args.output}: {timeline.messages} messages")
    return _finish(loaded)
