"""The analysis commands stream: memory bounded by connections and outstanding requests, not by messages, and the
same answers as keeping everything (issue 16, item 1)."""
from __future__ import annotations

import glob
import importlib.util
import os
import struct
import tracemalloc
import xml.etree.ElementTree as ET

import pytest

from vhusniff.analysis.analyzer import EXAMPLES_KEPT, connection_report
from vhusniff.analysis.diff import DiffStream
from vhusniff.capture.pcapng import read_capture, write_capture
from vhusniff.cli.analysis import expert_lines, load, message_counts, stats_lines
from vhusniff.model import Channel, Direction, EventKind, Record, RecordKind
from vhusniff.protocol.grammar import build_message
from vhusniff.protocol.replies import Expect
from vhusniff.views.timeline import Timeline, render_svg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTURES = sorted(glob.glob(os.path.join(ROOT, "captures", "*.pcapng")))
SVG = "{http://www.w3.org/2000/svg}"


def _generator():
    """benchmarks/distinct_sessions.py: reconnecting vIOMMU sessions, every message distinct."""
    spec = importlib.util.spec_from_file_location("distinct_sessions",
                                                  os.path.join(ROOT, "benchmarks", "distinct_sessions.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _distinct(tmp_path, messages: int, session_messages: int = 5_000) -> str:
    path = str(tmp_path / f"distinct-{messages}.pcapng")
    write_capture(path, _generator().distinct_records(messages, session_messages))
    return path


def _peak_bytes(function) -> int:
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_analysis_memory_does_not_grow_with_messages(tmp_path):
    """Four times the messages over the same four connections, about the same peak: what is kept is per
    connection (state, response aggregates, a bounded number of example findings), never per message."""
    small, large = _distinct(tmp_path, 6_000, 1_500), _distinct(tmp_path, 24_000, 6_000)

    def analyse(path: str) -> None:
        loaded = load(path, streaming=True)
        stats_lines(loaded, expert=True)
        expert_lines(loaded)
        for connection in loaded.analyzer.connections:
            connection_report(loaded.analyzer, connection)

    analyse(small)                  # imports, grammar caches: not part of what is measured
    peaks = [_peak_bytes(lambda path=path: analyse(path)) for path in (small, large)]
    assert peaks[1] < 1.5 * peaks[0], peaks


def test_timeline_memory_and_picture_stay_bounded(tmp_path):
    """Beyond its detail limit the timeline buckets by time: the same bounded memory and the same number of
    shapes for four times the messages."""
    small, large = _distinct(tmp_path, 6_000, 1_500), _distinct(tmp_path, 24_000, 6_000)
    shapes = []

    def draw(path: str) -> None:
        timeline = Timeline(detail_limit=2_000)
        loaded = load(path, timeline=timeline)
        assert not timeline.detailed and not loaded.analyzer.keep and loaded.analyzer.transactions == []
        root = ET.fromstring(timeline.render(loaded.analyzer, title=path))
        buckets = [g for g in root.iter(f"{SVG}g") if g.get("class") == "bucket"]
        assert buckets and len(buckets) <= 2 * timeline.columns * 2 * len(loaded.analyzer.connections)
        assert sum(int(g.findtext(f"{SVG}title").split(": ")[1].split()[0]) for g in buckets) == timeline.messages
        shapes.append(len(buckets))

    draw(small)
    peaks = [_peak_bytes(lambda path=path: draw(path)) for path in (small, large)]
    assert peaks[1] < 1.5 * peaks[0], peaks
    assert shapes[-1] < 1.5 * shapes[-2], shapes


def _misaligned_flood(count: int) -> list[Record]:
    records = [Record(0, 1, kind=RecordKind.EVENT, event=EventKind.CONNECTED, note="connected")]
    for step in range(count):
        raw = build_message(Channel.MAIN, 9, dict(index=0, flags=0, desc=0x1008 + (step << 12), used=0x3000,
                                                  avail=0x2000, log=0))
        records.append(Record(1000 * (step + 1), 1, Channel.MAIN, Direction.FRONTEND_TO_BACKEND, raw))
    return records


def test_findings_beyond_the_examples_kept_are_counted(tmp_path, capsys):
    from vhusniff.cli.analysis import main_expert, main_report, main_stats
    path = str(tmp_path / "flood.pcapng")
    flood = EXAMPLES_KEPT + 37
    write_capture(path, _misaligned_flood(flood))
    loaded = load(path, streaming=True)
    assert len(loaded.analyzer.findings) == EXAMPLES_KEPT
    assert loaded.analyzer.finding_count() == flood
    assert main_expert([path, "-q"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{flood} finding(s)"
    assert out[-1] == "  c1 ... and 37 more vring-addr-misaligned finding(s), not kept"
    assert main_report([path, "-q"]) == 0
    report = capsys.readouterr().out
    assert f"Findings: {flood} error" in report and "    ... and 37 more vring-addr-misaligned finding(s)" in report
    assert main_stats([path, "-q"]) == 0
    assert f"Findings: {flood} (--expert lists them)" in capsys.readouterr().out


def _old_response_rows(loaded) -> list[tuple]:
    """The response-time table as stats computed it from every kept transaction, before it streamed."""
    table: dict[tuple, list] = {}
    for t in loaded.analyzer.transactions:
        if t.expect == Expect.NOTHING:
            continue
        entry = table.setdefault((t.channel, t.request, t.name), [[], 0])
        if t.response_seconds is not None:
            entry[0].append(t.response_seconds)
        elif t.expect != Expect.MAYBE:
            entry[1] += 1
    return [(key[0], key[2], len(times), f"{min(times) * 1e3:.3f}" if times else "-",
             f"{sum(times) / len(times) * 1e3:.3f}" if times else "-", unanswered)
            for key, (times, unanswered) in sorted(table.items(), key=lambda item: item[0][:2])]


def _old_message_rows(loaded) -> list[tuple]:
    """The message table as stats counted it from every kept record, before it counted as it read."""
    counts: dict[tuple, list[int]] = {}
    for _number, record, message in loaded.seen:
        if message is None:
            continue
        key = (record.channel, record.direction.arrow, message.request, message.is_reply,
               message.name + (" reply" if message.is_reply else ""))
        entry = counts.setdefault(key, [0, 0, 0])
        entry[0], entry[1], entry[2] = entry[0] + 1, entry[1] + len(record.data), entry[2] + len(record.fds)
    return [(*key, *entry) for key, entry in sorted(counts.items(), key=lambda i: (i[0][0], i[0][2], i[0][3],
                                                                                  i[0][1]))]


@pytest.mark.parametrize("path", CAPTURES, ids=os.path.basename)
def test_streaming_gives_what_keeping_everything_gave_on_real_captures(path):
    kept, streamed = load(path, keep=True), load(path, streaming=True)
    assert kept.analyzer.keep and not streamed.analyzer.keep and streamed.analyzer.transactions == []
    assert stats_lines(streamed, expert=True) == stats_lines(kept, expert=True)
    assert expert_lines(streamed) == expert_lines(kept)
    for connection in kept.analyzer.connections:
        assert connection_report(streamed.analyzer, connection) == connection_report(kept.analyzer, connection)
        assert stats_lines(streamed, connection) == stats_lines(kept, connection)
    rows = [(channel, name, entry.replies, f"{entry.min_ns / 1e9 * 1e3:.3f}" if entry.replies else "-",
             f"{entry.total_ns / 1e9 / entry.replies * 1e3:.3f}" if entry.replies else "-", entry.unanswered)
            for (channel, _request, name), entry in streamed.analyzer.responses().items()]
    assert rows == _old_response_rows(kept)
    assert [(*key, c.count, c.bytes, c.fds) for key, c in message_counts(streamed).items()] == _old_message_rows(kept)
    # The timeline of a capture it can draw message by message is the picture drawn from every record.
    timeline = Timeline()
    drawn = load(path, timeline=timeline)
    assert timeline.detailed and timeline.render(drawn.analyzer, "t") == render_svg(kept.seen, kept.analyzer, "t")


def _naive_diff(left: list[Record], right: list[Record]) -> list[str]:
    """Pairing by channel over whole lists, as diff did when it loaded both captures."""
    def by_channel(records):
        from vhusniff.protocol.context import ContextTracker
        tracker, channels = ContextTracker(), {}
        for number, record in enumerate(records, 1):
            if record.kind == RecordKind.MESSAGE:
                channels.setdefault(record.channel, []).append((number, record, tracker.decode_message(record)))
            else:
                tracker.decode(record)
        return channels
    from vhusniff.analysis.diff import _pair_lines
    lines = []
    a_by, b_by = by_channel(left), by_channel(right)
    for channel in sorted(set(a_by) | set(b_by)):
        a, b = a_by.get(channel, []), b_by.get(channel, [])
        for x, y in zip(a, b, strict=False):
            lines += _pair_lines(channel, x, y, frozenset())
        name = channel.name.lower()
        lines += [f"{name} A#{n}: only in A: {r.direction.arrow} {m.summary()}" for n, r, m in a[len(b):]]
        lines += [f"{name} B#{n}: only in B: {r.direction.arrow} {m.summary()}" for n, r, m in b[len(a):]]
    return lines


def test_diff_reads_both_sides_at_once_and_says_what_whole_lists_said(tmp_path):
    records = list(_generator().distinct_records(3_000, 1_000))
    changed = [Record(r.timestamp_ns, r.connection, r.channel, r.direction, r.data, r.fds, r.kind, r.note, r.event)
               for r in records]
    # One address changed, back-end messages dropped from the second session, a tail cut off.
    at = next(i for i, r in enumerate(changed) if r.kind == RecordKind.MESSAGE and r.data[:4] == struct.pack("<I", 9)
              and i > 500)
    changed[at].data = changed[at].data[:20] + struct.pack("<Q", 0x4000) + changed[at].data[28:]
    changed = [r for r in changed if not (r.connection == 2 and r.channel == Channel.BACKEND)][:-200]
    diff = DiffStream(records, changed).run()
    lines = list(diff.lines())
    assert lines == _naive_diff(records, changed)
    assert any("vring.desc" in line or "desc:" in line for line in lines)
    assert any("only in A" in line for line in lines)
    assert diff.counts == [sum(r.kind == RecordKind.MESSAGE for r in side) for side in (records, changed)]
    same = DiffStream(read_capture(_distinct(tmp_path, 3_000, 1_000)), records).run()
    assert list(same.lines()) == [] and same.differences == 0


def _message_fields(message) -> tuple:
    from vhusniff.views.filters import field_values
    payload = message.payload
    return (message.raw, message.channel, message.request, message.flags, message.size, message.kind,
            payload, [k for k in payload or () if not k.startswith("_")], message.problems, message.context,
            message.is_reply, message.name, message.summary(), field_values(message))


def _with_payload_bytes_turned(record: Record) -> Record:
    """The same header with the payload's bytes reversed: other values in the same shape."""
    data = record.data[:8] + record.data[8:][::-1] if len(record.data) > 8 else record.data
    return Record(record.timestamp_ns, record.connection, record.channel, record.direction, data, record.fds,
                  record.kind, record.note, record.event)


@pytest.mark.parametrize("which", ["grammar", "distinct", *CAPTURES], ids=os.path.basename)
def test_shape_decoder_decodes_every_message_as_the_grammar_does(which, tmp_path):
    """The analysis decodes by shape (protocol.shapes): every message of every kind, malformed ones, config
    windows of every device, the same shapes with other payload bytes, read the same as grammar.decode reads them."""
    from test_dissector import grammar_records

    from vhusniff.protocol.context import ContextTracker
    from vhusniff.protocol.shapes import LazyMessage, ShapeDecoder
    if which == "grammar":
        records = grammar_records()
    elif which == "distinct":
        records = list(_generator().distinct_records(3_000, 1_000))
    else:
        records = list(read_capture(which))
    records = records + [_with_payload_bytes_turned(r) for r in records] + records
    general, shaped = ContextTracker(), ContextTracker()
    shaped.decoder = ShapeDecoder().decode
    lazy = 0
    for number, record in enumerate(records, 1):
        expected, got = general.decode(record), shaped.decode(record)
        if expected is None or got is None:
            assert expected is got is None
            continue
        lazy += isinstance(got, LazyMessage)
        assert _message_fields(got) == _message_fields(expected), number
    # Settled shapes are per context object: a capture's every negotiation step starts its shapes over.
    assert lazy > (len(records) // 2 if which == "distinct" else 0), lazy


@pytest.mark.parametrize("path", CAPTURES, ids=os.path.basename)
def test_scanner_reads_the_records_read_capture_reads(path, tmp_path):
    """capture.scan: the same records (sources too), and at damage the same error after the same records."""
    from vhusniff.capture.pcapng import CaptureError
    from vhusniff.capture.scan import scan_records
    assert list(scan_records(lambda: path)) == list(read_capture(path))
    with open(path, "rb") as whole:
        data = whole.read()
    cut = str(tmp_path / "cut.pcapng")
    with open(cut, "wb") as out:
        out.write(data[:len(data) * 2 // 3])
    outcomes = []
    for reader in (lambda: scan_records(lambda: cut), lambda: read_capture(cut)):
        records: list[Record] = []
        try:
            for record in reader():
                records.append(record)
        except CaptureError as error:
            outcomes.append((records, str(error)))
        else:
            outcomes.append((records, ""))
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("path", CAPTURES[:3] + ["distinct"], ids=os.path.basename)
def test_analysis_by_shape_says_what_the_grammar_decoder_says(path, tmp_path, monkeypatch):
    """The analysis commands' words are the same with every message decoded by grammar.decode."""
    import vhusniff.cli.analysis as analysis
    from vhusniff.protocol.grammar import decode as grammar_decode
    if path == "distinct":
        path = _distinct(tmp_path, 4_000, 1_000)

    def words() -> list[str]:
        loaded = load(path, streaming=True)
        lines = stats_lines(loaded, expert=True) + expert_lines(loaded)
        # `state` follows the state alone (no matching, no checks): the same state
        state_only = load(path, streaming=True, checks=False).analyzer
        assert [state_only.format_state(c) for c in state_only.connections] == \
            [loaded.analyzer.format_state(c) for c in loaded.analyzer.connections]
        return lines + [connection_report(loaded.analyzer, c) for c in loaded.analyzer.connections]

    shaped = words()

    class GrammarDecoder:
        decode = staticmethod(grammar_decode)
    monkeypatch.setattr(analysis, "ShapeDecoder", GrammarDecoder)
    assert words() == shaped
