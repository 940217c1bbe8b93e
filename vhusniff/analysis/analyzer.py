"""Session analysis (sans-IO): per-connection state, request/reply matching by order, and expert findings.

    analyzer = Analyzer()
    for record in records:
        analyzer.feed(record)            # or feed(record, message) when the caller already decoded it
    analyzer.finish()                    # end-of-capture checks (requests still waiting)
    analyzer.findings, analyzer.transactions, analyzer.state(1).format()

`Analyzer(keep=False)` streams, in memory bounded by connections and outstanding requests, not by messages: it
summarises each transaction (counts and response times per request, in `summary` and each connection's
`responses`) instead of keeping it, keeps the first EXAMPLES_KEPT findings of each check on each connection and
counts the rest, and `forget(c)` (the live proxy) drops an ended connection once its report is printed. The
analysis commands stream; `Analyzer()` keeps every transaction and finding (tests, `read --expert`).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from ..model import Channel, Direction, Record, RecordKind
from ..protocol import catalogue as cat
from ..protocol.context import ContextTracker
from ..protocol.grammar import HEADER_SIZE, Message, encode_payload, request_name
from ..protocol.replies import Expect, expectation, reply_rules
from .expert import CHECKS, Finding, check_problems, check_request, request_checks
from .rings import STUCK_SECONDS, RingChecks
from .state import ConnectionState, F, classify_event

# Streaming (keep=False): findings kept per connection and check (the rest are counted); connections remembered
# as forgotten.
EXAMPLES_KEPT = 100
FORGOTTEN_KEPT = 4096
# Per-request lookups remembered (reply rules), forgotten all at once beyond this: a fuzzed capture's every
# request number keeps it bounded.
KINDS_KEPT = 4096
# idle-connection: QEMU speaks within milliseconds of connecting; 10 s without a message is a hang.
IDLE_SECONDS = 10.0
# reply-overdue: real back-ends answer in milliseconds (dpdk-testpmd's first GET_FEATURES, while it starts its
# ports: about 1 s); QEMU waits for a required reply with its main loop blocked, so 5 s is a hung guest.
REPLY_SECONDS = 5.0


@dataclass(slots=True)
class Transaction:
    """One request and, if it came, its reply (Wireshark's response_in / response_to)."""
    connection: int
    channel: Channel
    request: int
    name: str
    request_number: int
    request_ns: int
    expect: str
    request_size: int = 0              # payload bytes
    reply_number: int | None = None
    reply_ns: int | None = None
    outcome: str = "outstanding"   # answered | missing | outstanding at disconnect | outstanding at end
    # Where its response time goes (its connection's entry for its request, and streaming's summary), found
    # when it is asked rather than again when it is answered.
    times: ResponseTimes | None = field(default=None, repr=False, compare=False)
    summary: ResponseSummary | None = field(default=None, repr=False, compare=False)

    @property
    def response_seconds(self) -> float | None:
        return None if self.reply_ns is None else (self.reply_ns - self.request_ns) / 1e9


@dataclass
class ResponseSummary:
    """What streaming analysis keeps of one request's transactions: counts and response-time aggregates."""
    count: int = 0
    answered: int = 0
    total_seconds: float = 0.0
    min_seconds: float | None = None
    max_seconds: float = 0.0

    def add_response(self, seconds: float) -> None:
        self.answered += 1
        self.total_seconds += seconds
        if seconds > self.max_seconds:
            self.max_seconds = seconds
        if self.min_seconds is None or seconds < self.min_seconds:
            self.min_seconds = seconds

    @property
    def mean_seconds(self) -> float | None:
        return self.total_seconds / self.answered if self.answered else None


@dataclass
class ResponseTimes:
    """Service response time of one request on one connection (Wireshark's SRT): its transactions that expected
    a reply, in integer nanoseconds so that sums are exact."""
    replies: int = 0
    total_ns: int = 0
    min_ns: int = 0
    max_ns: int = 0
    unanswered: int = 0          # required replies that never came (missing, at disconnect, at the end)

    def add_response(self, ns: int) -> None:
        if not self.replies or ns < self.min_ns:
            self.min_ns = ns
        if ns > self.max_ns:
            self.max_ns = ns
        self.replies += 1
        self.total_ns += ns

    def merge(self, other: ResponseTimes) -> None:
        if other.replies:
            self.min_ns = other.min_ns if not self.replies else min(self.min_ns, other.min_ns)
            self.max_ns = max(self.max_ns, other.max_ns)
        self.replies += other.replies
        self.total_ns += other.total_ns
        self.unanswered += other.unanswered


ResponseKey = tuple[Channel, int, str]          # channel, request, name


@dataclass
class ConnectionAnalysis:
    state: ConnectionState
    waiting: dict[Channel, list[Transaction]] = field(default_factory=dict)   # per channel, oldest first
    responses: dict[ResponseKey, ResponseTimes] = field(default_factory=dict)
    finding_counts: dict[str, int] = field(default_factory=dict)   # check -> findings raised, kept or not
    not_kept: dict[str, int] = field(default_factory=dict)         # streaming: check -> findings only counted

    def outstanding(self) -> list[Transaction]:
        return [t for queue in self.waiting.values() for t in queue if t.expect != Expect.MAYBE]


class Analyzer:
    """Feeds records in capture order; keeps state, transactions and findings for every connection.

    keep=False streams: transactions are summarised (`summary`, each connection's `responses`), `transactions`
    stays empty, `findings` keeps EXAMPLES_KEPT of each check per connection, and `forget` drops an ended
    connection (the live proxy)."""

    def __init__(self, device_type: str | None = None, profile: cat.Profile = cat.SPEC_PROFILE, keep: bool = True,
                 idle_seconds: float = IDLE_SECONDS, reply_seconds: float = REPLY_SECONDS,
                 stuck_seconds: float = STUCK_SECONDS):
        self.tracker = ContextTracker(device_type, profile)
        self.idle_ns = int(idle_seconds * 1e9)          # idle-connection: open this long without a message
        self.reply_ns = int(reply_seconds * 1e9)        # reply-overdue: a required reply this late or still missing
        self.profile = profile
        self.keep = keep
        self.connections: dict[int, ConnectionAnalysis] = {}
        self.transactions: list[Transaction] = []
        self.findings: list[Finding] = []
        self.summary: dict[tuple[Channel, str], ResponseSummary] = {}
        self.forgotten: OrderedDict[int, None] = OrderedDict()
        self.records = 0
        self.first_ns: int | None = None
        self.last_ns: int | None = None                 # the latest record's time: where the capture ends
        self.finished = False
        self.ring_checks = RingChecks(stuck_seconds)    # stuck-ring and friends, from the ring samples
        self._raised: list[Finding] = []                # the findings of the record being fed
        self.checks = True              # False: the state alone (`vhusniff state`), no matching, no findings
        self._headers: dict[tuple[Channel, int, int], _Header] = {}      # (channel, request, flags) -> _Header

    # --- the API ------------------------------------------------------------------------------------------------
    def state(self, connection: int) -> ConnectionState:
        return self._connection(connection).state

    def format_state(self, connection: int) -> str:
        return self.state(connection).format()

    def findings_for(self, connection: int) -> list[Finding]:
        """A connection's findings in the order they were raised (streaming: the examples kept)."""
        return [f for f in self.findings if f.connection == connection]

    def finding_count(self, connection: int | None = None, minimum: int = 0) -> int:
        """How many findings were raised (kept or not), on one connection or all, of at least `minimum` severity."""
        return sum(count for c, conn in self.connections.items() if connection is None or c == connection
                   for check, count in conn.finding_counts.items() if CHECKS[check].severity >= minimum)

    def findings_not_kept(self, connection: int | None = None, minimum: int = 0) -> list[tuple[int, str, int]]:
        """Streaming: (connection, check, how many) of the findings counted but not kept."""
        return [(c, check, count) for c, conn in sorted(self.connections.items())
                if connection is None or c == connection
                for check, count in conn.not_kept.items() if CHECKS[check].severity >= minimum]

    def responses(self, connection: int | None = None) -> dict[ResponseKey, ResponseTimes]:
        """Service response time per request, on one connection or all, ordered by channel and request."""
        table: dict[ResponseKey, ResponseTimes] = {}
        for c, conn in self.connections.items():
            if connection is not None and c != connection:
                continue
            for key, entry in conn.responses.items():
                table.setdefault(key, ResponseTimes()).merge(entry)
        return dict(sorted(table.items(), key=lambda item: item[0][:2]))

    def stream(self) -> None:
        """Keep everything no longer (the timeline, once a capture is too long to draw message by message): forget
        the transactions, keep EXAMPLES_KEPT findings of each check per connection and count the rest."""
        if not self.keep:
            return
        self.keep = False
        self.transactions = []
        # The findings raised so far, retained again as streaming retains them (counted anew).
        for conn in self.connections.values():
            conn.finding_counts.clear()
        self._raised, self.findings = self.findings, []
        self._retain()

    def forget(self, connection: int) -> None:
        """Streaming: drop what is known of a connection (its report was printed); its later records are
        ignored. Only the last FORGOTTEN_KEPT numbers are remembered."""
        self.connections.pop(connection, None)
        self.tracker.contexts.pop(connection, None)
        self.ring_checks.forget(connection)
        if any(f.connection == connection for f in self.findings):
            self.findings = [f for f in self.findings if f.connection != connection]
        self.forgotten[connection] = None
        if len(self.forgotten) > FORGOTTEN_KEPT:
            self.forgotten.popitem(last=False)

    def findings_by_number(self, every_number: bool = False) -> dict[int, list[Finding]]:
        """Findings by the record they are attached to (or, with every_number, by every record involved)."""
        by_number: dict[int, list[Finding]] = {}
        for finding in self.findings:
            for number in finding.numbers if every_number else finding.numbers[:1]:
                by_number.setdefault(number, []).append(finding)
        return by_number

    def feed(self, record: Record, message: Message | None = None, number: int | None = None) -> list[Finding]:
        """Apply one record (number: its place in the capture, from 1; counted here when not given).

        Returns the findings this record raised."""
        self.records += 1
        if self.forgotten and not self.keep and record.connection in self.forgotten:
            return []
        if number is None:
            number = self.records
        timestamp = record.timestamp_ns
        last_ns = self.last_ns
        if last_ns is None:
            self.first_ns = self.last_ns = timestamp
        elif timestamp > last_ns:
            self.last_ns = timestamp
        conn = self.connections.get(record.connection) or self._connection(record.connection)
        state = conn.state
        if record.kind == _EVENT:
            self._event(conn, number, record)
        else:
            if message is None:
                message = self.tracker.decode_message(record)
            if state.ended_number is not None:
                self._add("traffic-after-disconnect", record.connection, (number, state.ended_number),
                          f"{message.name} after the connection ended at #{state.ended_number} "
                          f"({state.ended_note})")
            if self.checks:
                if message.problems:
                    check_problems(number, record, message, self._raised)
                request = message.request
                if request >= 0:
                    header = self._headers.get((message.channel, request, message.flags))
                    if header is None or header.name_profile is not message.context.profile:
                        header = self._header(message)
                    if message.is_reply:
                        self._match_reply(conn, header, number, record, message)
                    else:
                        check_request(header.checks, state, number, record, message, self._raised)
                        self._match_request(conn, header, number, record, message)
            state.feed(number, record, message)
        return self._retain() if self._raised else []

    def _retain(self) -> list[Finding]:
        """The findings just raised: counted per connection and check, and kept (streaming: up to EXAMPLES_KEPT
        of each check per connection)."""
        new = self._raised
        if not new:
            return []
        self._raised = []
        for finding in new:
            conn = self._connection(finding.connection)
            count = conn.finding_counts.get(finding.check, 0) + 1
            conn.finding_counts[finding.check] = count
            if self.keep or count <= EXAMPLES_KEPT:
                self.findings.append(finding)
            else:
                conn.not_kept[finding.check] = conn.not_kept.get(finding.check, 0) + 1
        return new

    def _event(self, conn: ConnectionAnalysis, number: int, record: Record) -> None:
        state = conn.state
        self.tracker.decode(record)         # an event can set the context too (a DEVICE event)
        ending = classify_event(record) == "end" and not state.ended
        state.feed(number, record, None)
        if ending:
            self._connection_ended(conn, number, record)
        self._raised.extend(self.ring_checks.feed(record, number))

    def finish(self) -> list[Finding]:
        """End of the capture: requests still waiting become findings, and so do connections idle from their
        start, as of the capture's last record (offline: the capture's timestamps, no clock). Idempotent."""
        if not self.finished:
            self.finished = True
            end_ns = self.last_ns or 0
            for conn in self.connections.values():
                if conn.state.ended:
                    # Requests after the end (traffic-after-disconnect) that still wait were not answered either.
                    for transaction in conn.outstanding():
                        self._unanswered(transaction)
                    continue
                self._idle(conn, end_ns, None, "when the capture ended")
                for transaction in conn.outstanding():
                    transaction.outcome = "outstanding at end"
                    self._unanswered(transaction)
                    self._add("capture-ended-with-request-outstanding", transaction.connection,
                              (transaction.request_number,), f"{transaction.name} still waits for its "
                                                             f"{transaction.expect}")
                    self._overdue(transaction, end_ns, "when the capture ended")
        return self._retain()

    def run(self, records) -> Analyzer:
        for record in records:
            self.feed(record)
        self.finish()
        return self

    # --- matching -----------------------------------------------------------------------------------------------
    def _connection(self, connection: int) -> ConnectionAnalysis:
        conn = self.connections.get(connection)
        if conn is None:
            conn = self.connections[connection] = ConnectionAnalysis(ConnectionState(connection, self.profile))
        return conn

    def _header(self, message: Message) -> _Header:
        """What matching and the checks do with the header of `message`, settled once per analyzer (one not
        named by the analyzer's profile is settled for itself, not kept)."""
        header = _Header(message, self.profile)
        if message.context.profile is self.profile:
            if len(self._headers) >= KINDS_KEPT:
                self._headers.clear()
            self._headers[(message.channel, message.request, message.flags)] = header
        return header

    def _add(self, check: str, connection: int, numbers: tuple[int | None, ...], text: str) -> None:
        assert check in CHECKS, check
        self._raised.append(Finding(check, connection, tuple(n for n in numbers if n is not None), text))

    def _match_request(self, conn: ConnectionAnalysis, header: _Header, number: int, record: Record,
                       message: Message) -> None:
        channel = record.channel
        queue = conn.waiting.get(channel)
        if queue is None:
            queue = conn.waiting[channel] = []
        elif queue:
            # One request at a time per channel: a new request means the peer gave up on the old one's reply.
            self._drop_waiting(queue, number, "missing-reply")
        expect = header.expect
        if expect is None:
            state = conn.state
            expect = header.reply(state.protocol_features_acked or 0, state.postcopy_listening)
        summary = None
        if not self.keep:
            summary = header.summary
            if summary is None:
                key = (channel, header.name)
                summary = self.summary.get(key)
                if summary is None:
                    summary = self.summary[key] = ResponseSummary()
                header.summary = summary
            summary.count += 1
            if expect == _NOTHING:
                return              # streaming: nothing waits, nothing is kept
        transaction = Transaction(record.connection, channel, header.request, header.name, number,
                                  record.timestamp_ns, expect, message.size)
        transaction.summary = summary       # (set apart: a keyword argument costs more than the store)
        if self.keep:
            self.transactions.append(transaction)
        if expect != _NOTHING:
            queue.append(transaction)
            times = conn.responses.get(header.response_key)
            if times is None:
                times = conn.responses[header.response_key] = ResponseTimes()
            transaction.times = times
        else:
            transaction.outcome = "no reply expected"

    def _match_reply(self, conn: ConnectionAnalysis, header: _Header, number: int, record: Record,
                     message: Message) -> None:
        if header.reply_flags_wrong:
            self._add("reply-flags", record.connection, (number,), f"{header.name} reply flags {message.flags:#x}")
        queue = conn.waiting.get(record.channel)
        if queue is None:
            queue = conn.waiting[record.channel] = []       # the order channels are first seen in is kept
        if not queue:
            self._add("unexpected-reply", record.connection, (number,), f"{header.name} reply, nothing asked")
            return
        transaction = queue.pop(0)
        reply_ns = record.timestamp_ns
        transaction.reply_number, transaction.reply_ns = number, reply_ns
        transaction.outcome = "answered"
        waited = reply_ns - transaction.request_ns
        times = transaction.times
        assert times is not None            # every transaction that waits has its entry
        times.add_response(waited)
        if waited >= self.reply_ns and transaction.expect != _MAYBE:
            self._add("reply-overdue", record.connection, (number, transaction.request_number),
                      f"{header.name} reply came {_seconds(waited)} after its request "
                      f"(#{transaction.request_number})")
        if transaction.summary is not None:         # streaming
            transaction.summary.add_response(waited / 1e9)      # Transaction.response_seconds
        if transaction.request != header.request:
            self._add("reply-mismatch", record.connection, (number, transaction.request_number),
                      f"{header.name} reply while {transaction.name} (#{transaction.request_number}) waited")
            return
        # An ack's payload is read only when its bytes are not those of a zero ack.
        if message.kind == "ack" and (transaction.expect == _ACK or transaction.expect == _MAYBE) and \
                message.raw[HEADER_SIZE:] != _ZERO_ACK and message.payload.ack != 0:
            self._add("ack-nonzero", record.connection, (number, transaction.request_number),
                      f"{header.name} failed: ack {message.payload.ack:#x}")
        if header.get_config and message.size != transaction.request_size:
            self._add("config-reply-error", record.connection, (number, transaction.request_number),
                      f"GET_CONFIG reply size {message.size}, request size {transaction.request_size}")

    def _drop_waiting(self, queue: list[Transaction], number: int, check: str) -> None:
        for transaction in queue:
            if transaction.expect == Expect.MAYBE:
                transaction.outcome = "no reply"
                continue
            transaction.outcome = "missing"
            self._unanswered(transaction)
            self._add(check, transaction.connection, (transaction.request_number, number),
                      f"{transaction.name} got no {transaction.expect}; next request at #{number}")
        queue.clear()

    def _connection_ended(self, conn: ConnectionAnalysis, number: int, record: Record) -> None:
        state = conn.state
        # Running means started: GET_VRING_BASE stops a ring whatever SET_VRING_ENABLE said before or after.
        running = [v.index for v in state.vrings.values() if v.started]
        if running:
            self._add("ended-while-running", record.connection, (number,),
                      f"ring(s) {', '.join(map(str, running))} still started at the end (never stopped by "
                      f"GET_VRING_BASE)")
        self._idle(conn, record.timestamp_ns, number, "when it ended")
        for transaction in conn.outstanding():
            transaction.outcome = "outstanding at disconnect"
            self._unanswered(transaction)
            self._add("disconnect-with-request-outstanding", record.connection,
                      (transaction.request_number, number),
                      f"{state.ended_note.split(';')[0]} while {self._waiter(transaction)} waited for the "
                      f"{transaction.expect} to {transaction.name} (#{transaction.request_number})")
            self._overdue(transaction, record.timestamp_ns, "when the connection ended")
        for queue in conn.waiting.values():
            queue.clear()

    @staticmethod
    def _unanswered(transaction: Transaction) -> None:
        """A required reply that never came, counted in its entry of the service response time table."""
        assert transaction.times is not None            # every transaction that waits has its entry
        transaction.times.unanswered += 1

    def _idle(self, conn: ConnectionAnalysis, end_ns: int, end_number: int | None, when: str) -> None:
        """idle-connection: open at least idle_ns, from its first record to `end_ns`, without one message."""
        state = conn.state
        if state.messages or state.first_ns is None or end_ns - state.first_ns < self.idle_ns:
            return
        self._add("idle-connection", state.connection, (state.first_number, end_number),
                  f"open {_seconds(end_ns - state.first_ns)} without a single message {when}: neither peer "
                  f"spoke (the front-end speaks first: a hung front-end, or one that never started)")

    def _overdue(self, transaction: Transaction, end_ns: int, when: str) -> None:
        """reply-overdue: a required reply still missing reply_ns or more after its request, as of `end_ns`."""
        if end_ns - transaction.request_ns >= self.reply_ns:
            self._add("reply-overdue", transaction.connection, (transaction.request_number,),
                      f"{transaction.name} had waited {_seconds(end_ns - transaction.request_ns)} for its "
                      f"{transaction.expect} {when}")

    @staticmethod
    def _waiter(transaction: Transaction) -> str:
        return "the back-end" if transaction.channel in cat.BACKEND_REQUEST_CHANNELS else "the front-end"


_EVENT = RecordKind.EVENT
_NOTHING, _ACK, _MAYBE = Expect.NOTHING, Expect.ACK, Expect.MAYBE
_ZERO_ACK = encode_payload("ack", {"ack": 0})     # a REPLY_ACK payload saying success


class _Header:
    """What matching and the checks do with one request header (channel, request, flags), settled once: the
    request's name, the checks of a request, what it waits for (`expect`, or `reply` when the negotiation
    decides), its entry in the response-time tables; of a reply, whether its flags are wrong."""

    __slots__ = ("request", "name_profile", "name", "checks", "reply", "expect", "summary", "response_key",
                 "reply_flags_wrong", "get_config")

    def __init__(self, message: Message, profile: cat.Profile) -> None:
        channel, request = message.channel, message.request
        self.request = request
        self.name_profile = message.context.profile
        self.checks = request_checks(channel, request, message.flags, profile, self.name_profile)
        self.name = self.checks.name
        self.reply = reply_rules(channel, request, message.need_reply, profile)
        self.expect = self.reply.fixed
        self.summary: ResponseSummary | None = None       # streaming: the summary of (channel, name), once found
        self.response_key: ResponseKey = (channel, request, self.name)
        rule = cat.HEADER_RULES.get(channel)
        self.reply_flags_wrong = rule is not None and message.flags != rule.reply_flags
        self.get_config = request == F.GET_CONFIG and channel == Channel.MAIN


def _seconds(ns: int) -> str:
    return f"{ns / 1e9:.1f} s"


def end_summary(analyzer: Analyzer, connection: int) -> str:
    """How a connection ended, in one sentence, naming a request left unanswered."""
    state = analyzer.state(connection)
    if not state.ended:
        waiting = [f for f in analyzer.findings_for(connection) if f.check == "capture-ended-with-request-outstanding"]
        text = "still open when the capture ended"
        return text + (f" ({waiting[-1].text}, #{waiting[-1].number})" if waiting else "")
    outstanding = [f for f in analyzer.findings_for(connection)
                   if f.check == "disconnect-with-request-outstanding"]
    if outstanding:
        return outstanding[-1].text
    last = f"; the last request was {state.last_request[1]} (#{state.last_request[0]})" if state.last_request else ""
    running = [f for f in analyzer.findings_for(connection) if f.check == "ended-while-running"]
    return f"{state.ended_note} (#{state.ended_number}), no request outstanding{last}" + \
        (f"; {running[0].text}" if running else "")


def connection_report(analyzer: Analyzer, connection: int) -> str:
    """What a person reads first when a VM did not start: how it ended, the findings, the negotiation, the
    device's start and stop, and the state at the end."""
    state = analyzer.state(connection)
    findings = sorted(analyzer.findings_for(connection), key=lambda f: (-f.severity, f.number))
    seconds = ((state.last_ns or 0) - (state.first_ns or 0)) / 1e9
    lines = [f"Connection {connection} ({state.device_type or 'unknown device'}): {state.messages} messages over "
             f"{seconds:.3f} s (#{state.first_number}-#{state.last_number})"]
    if state.connected_note:
        lines.append(f"  Started: {state.connected_note}")
    lines.append(f"  Ended:   {end_summary(analyzer, connection)}")
    not_kept = analyzer.findings_not_kept(connection)
    counts: dict[str, int] = {}
    for finding in findings:            # severities in the order the report lists them
        counts[str(finding.severity)] = counts.get(str(finding.severity), 0) + 1
    for _c, check, count in not_kept:
        counts[str(CHECKS[check].severity)] = counts.get(str(CHECKS[check].severity), 0) + count
    lines.append("  Findings: " + (", ".join(f"{n} {severity}" for severity, n in counts.items()) or "none"))
    lines += ["    " + finding.line() for finding in findings]
    lines += [f"    ... and {count} more {check} finding(s), not kept" for _c, check, count in not_kept]
    lines.append("  Negotiation")
    lines += ["    " + line for line in state.negotiation_lines()]
    lines.append("  Device start and stop")
    lines += [f"    #{number:<5} {text}" for number, text in state.history] or ["    (the device never started)"]
    if state.history_not_kept:
        lines.append(f"    ... and {state.history_not_kept} more, not kept")
    lines.append("  State at the end")
    lines += ["  " + line for line in state.format(negotiation=False).splitlines()[1:]]
    return "\n".join(lines)


def direction_for(channel: Channel, is_reply: bool) -> Direction:
    """Who sends a message: requests go F>B on the main channel and B>F on the back-end channel."""
    frontend_sends = (channel not in cat.BACKEND_REQUEST_CHANNELS) != is_reply
    return Direction.FRONTEND_TO_BACKEND if frontend_sends else Direction.BACKEND_TO_FRONTEND


__all__ = ["Analyzer", "ResponseSummary", "connection_report", "Transaction", "Expect", "classify_event",
           "end_summary", "request_name", "direction_for", "expectation"]
