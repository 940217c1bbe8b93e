"""`vhusniff state | stats | report | expert | timeline CAPTURE`: the analysis views of a capture."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from ..analysis.analyzer import IDLE_SECONDS, REPLY_SECONDS, Analyzer, Transaction, connection_report, end_summary
from ..analysis.expert import CHECKS, Severity
from ..capture.pcapng import ReadOutcome, read_capture, reading
from ..capture.progress import capture_progress
from ..model import Channel, Record, RecordKind
from ..protocol import catalogue as cat
from ..protocol.grammar import Message
from ..protocol.replies import Expect
from ..views.timeline import render_html, render_svg

EXIT_BAD_INPUT = 2


@dataclass
class Loaded:
    analyzer: Analyzer
    outcome: ReadOutcome
    seen: list[tuple[int, Record, Message | None]] = field(default_factory=list)

    @property
    def error(self) -> str:
        """Why the capture was not read to its end ("" when it was): capture.reading's words."""
        return self.outcome.error


def load(path: str, device: str | None = None, profile: str = "qemu-spec", at: int | None = None,
         keep: bool = False, idle_seconds: float = IDLE_SECONDS, reply_seconds: float = REPLY_SECONDS,
         progress: bool = False) -> Loaded:
    """Analyse a capture (up to record number `at`). A damaged capture is analysed as far as it reads.
    `progress`: a bar on stderr while it is read, if stderr is a terminal (capture.progress)."""
    analyzer = Analyzer(device, cat.PROFILES[profile], idle_seconds=idle_seconds, reply_seconds=reply_seconds)
    with reading(path) as outcome, capture_progress(path, progress) as bar:
        loaded = Loaded(analyzer, outcome)
        for number, record in enumerate(read_capture(bar.source()), 1):
            if at is not None and number > at:
                break
            message = analyzer.tracker.decode(record) if record.kind == RecordKind.MESSAGE else None
            analyzer.feed(record, message, number)
            if keep:
                loaded.seen.append((number, record, message))
    if at is None:
        analyzer.finish()
    return loaded


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


def _load(args, at: int | None = None, keep: bool = False) -> Loaded:
    return load(args.file, args.device, args.profile, at, keep, args.idle_seconds, args.reply_seconds,
                progress=not args.quiet)


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
    loaded = _load(args, args.at)
    if _nothing_read(loaded):
        return _finish(loaded)
    if args.at is not None:
        print(f"as of record #{min(args.at, loaded.analyzer.records)}")
    for connection in _connections(loaded, args.connection):
        print(loaded.analyzer.format_state(connection))
    return _finish(loaded)


# --- stats ----------------------------------------------------------------------------------------------------------
@dataclass
class Counter:
    count: int = 0
    bytes: int = 0
    fds: int = 0


@dataclass
class ResponseTimes:
    times: list[float] = field(default_factory=list)
    unanswered: int = 0


MessageKey = tuple[Channel, str, int, bool, str]       # channel, direction arrow, request, reply?, name


def message_counts(seen: list[tuple[int, Record, Message | None]]) -> dict[MessageKey, Counter]:
    """(channel, direction, request, reply?, name) -> count, bytes, fds."""
    counts: dict[MessageKey, Counter] = {}
    for _number, record, message in seen:
        if message is None:
            continue
        key = (record.channel, record.direction.arrow, message.request, message.is_reply,
               message.name + (" reply" if message.is_reply else ""))
        counter = counts.setdefault(key, Counter())
        counter.count += 1
        counter.bytes += len(record.data)
        counter.fds += len(record.fds)
    return dict(sorted(counts.items(), key=lambda item: (item[0][0], item[0][2], item[0][3], item[0][1])))


def response_times(transactions: list[Transaction]) -> dict[tuple[Channel, int, str], ResponseTimes]:
    """Service response time per request, like Wireshark's SRT: only requests that expected a reply."""
    table: dict[tuple, ResponseTimes] = {}
    for transaction in transactions:
        if transaction.expect == Expect.NOTHING:
            continue
        entry = table.setdefault((transaction.channel, transaction.request, transaction.name), ResponseTimes())
        if transaction.response_seconds is not None:
            entry.times.append(transaction.response_seconds)
        elif transaction.expect != Expect.MAYBE:
            entry.unanswered += 1
    return dict(sorted(table.items(), key=lambda item: item[0][:2]))


def stats_lines(loaded: Loaded, only: int | None = None, expert: bool = False) -> list[str]:
    analyzer = loaded.analyzer
    seen = [item for item in loaded.seen if only is None or item[1].connection == only]
    lines = ["Messages per channel, direction and request",
             f"  {'channel':<9}{'dir':<5}{'request':<34}{'count':>7}{'bytes':>9}{'fds':>6}"]
    for (channel, arrow, _request, _reply, name), counter in message_counts(seen).items():
        lines.append(f"  {channel.name.lower():<9}{arrow:<5}{name:<34}{counter.count:>7}{counter.bytes:>9}"
                     f"{counter.fds:>6}")
    transactions = [t for t in analyzer.transactions if only is None or t.connection == only]
    lines += ["", "Service response time (request to reply)",
              f"  {'channel':<9}{'request':<30}{'replies':>8}{'min ms':>10}{'avg ms':>10}{'max ms':>10}"
              f"{'unanswered':>12}"]
    for (channel, _request, name), entry in response_times(transactions).items():
        times = entry.times
        figures = (f"{min(times) * 1e3:>10.3f}{sum(times) / len(times) * 1e3:>10.3f}{max(times) * 1e3:>10.3f}"
                   if times else f"{'-':>10}{'-':>10}{'-':>10}")
        lines.append(f"  {channel.name.lower():<9}{name:<30}{len(times):>8}{figures}{entry.unanswered:>12}")
    lines += ["", "Connections", f"  {'conn':<6}{'device':<8}{'records':<12}{'messages':>9}{'duration s':>12}  ended"]
    for connection in _connections(loaded, only):
        state = analyzer.state(connection)
        duration = ((state.last_ns or 0) - (state.first_ns or 0)) / 1e9
        span = f"#{state.first_number}-#{state.last_number}"
        lines.append(f"  {connection:<6}{state.device_type or '?':<8}{span:<12}{state.messages:>9}{duration:>12.3f}"
                     f"  {end_summary(analyzer, connection)}")
    findings = [f for f in analyzer.findings if only is None or f.connection == only]
    lines += ["", f"Findings: {len(findings)}" + ("" if expert or not findings else " (--expert lists them)")]
    if expert:
        lines += ["  " + finding.line() for finding in findings]
    return lines


def main_stats(argv: list[str]) -> int:
    parser = _parser("stats", "per-request counts, bytes, fds and response times; connections")
    parser.add_argument("--expert", action="store_true", help="list the expert findings too")
    args = parser.parse_args(argv)
    loaded = _load(args, keep=True)
    if _nothing_read(loaded):
        return _finish(loaded)
    print("\n".join(stats_lines(loaded, args.connection, args.expert)))
    return _finish(loaded)


# --- expert ---------------------------------------------------------------------------------------------------------
def expert_lines(loaded: Loaded, only: int | None = None, minimum: Severity = Severity.CHAT) -> list[str]:
    findings = [f for f in loaded.analyzer.findings
                if (only is None or f.connection == only) and f.severity >= minimum]
    lines = [f"{len(findings)} finding(s)"]
    lines += [f"  c{f.connection} {f.line()}" for f in sorted(findings, key=lambda f: f.number)]
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
    print("\n\n".join(connection_report(loaded.analyzer, c) for c in connections))
    return _finish(loaded)


# --- timeline -------------------------------------------------------------------------------------------------------
def main_timeline(argv: list[str]) -> int:
    parser = _parser("timeline", "a picture of the session: lanes per channel and direction over time")
    parser.add_argument("-o", "--output", required=True, help="FILE.svg or FILE.html")
    args = parser.parse_args(argv)
    loaded = _load(args, keep=True)
    if _nothing_read(loaded):
        return _finish(loaded)
    seen = [item for item in loaded.seen if args.connection is None or item[1].connection == args.connection]
    svg = render_svg(seen, loaded.analyzer, title=args.file)
    text = render_html(svg, args.file) if args.output.endswith((".html", ".htm")) else svg
    with open(args.output, "w", encoding="utf-8") as out:
        out.write(text)
    print(f"{args.output}: {sum(1 for _n, r, _m in seen if r.kind == RecordKind.MESSAGE)} messages")
    return _finish(loaded)
