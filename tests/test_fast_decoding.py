"""The analysis commands' front half on distinct messages (issue 16, item 1): the scanner that makes Records, the
decoder by shape, the context tracker's shortcut, diff's decoding of differing bytes only and the timeline's
inline count, each read against the slow path it stands in for."""
from __future__ import annotations

import struct

from test_capture import block_offsets_of
from test_dissector import grammar_records

from vhusniff.analysis.diff import DiffStream
from vhusniff.capture import scan
from vhusniff.capture.pcapng import BLOCK_EPB, CaptureWriter, read_capture
from vhusniff.model import Channel, Direction, EventKind, FdInfo, Record, RecordKind
from vhusniff.protocol import catalogue as cat
from vhusniff.protocol.context import ContextTracker
from vhusniff.protocol.grammar import build_message, decode
from vhusniff.protocol.shapes import LazyMessage, ShapeDecoder
from vhusniff.views.timeline import Timeline

HEADER = struct.Struct("<III")


def _every_kind_of_record() -> list[Record]:
    """Plain messages of every channel and direction, unframed bytes, messages with fds or a note, events of
    every kind, a message shorter than a header."""
    records = grammar_records()
    time = records[-1].timestamp_ns
    for kind in EventKind:
        time += 1000
        records.append(Record(time, 2, Channel.MAIN, Direction.FRONTEND_TO_BACKEND, b"", [], RecordKind.EVENT,
                              f"event {kind.name}", kind))
    records.append(Record(time + 1, 2, Channel.BACKEND, Direction.BACKEND_TO_FRONTEND, b"\x01\x02\x03", [],
                          RecordKind.MESSAGE, "", EventKind.NOTE, True))
    records.append(Record(time + 2, 3, Channel.GPU, Direction.BACKEND_TO_FRONTEND, HEADER.pack(1, 1, 0), [],
                          RecordKind.MESSAGE, "a note on a message"))
    records.append(Record(time + 3, 3, Channel.DEVICE_STATE, Direction.FRONTEND_TO_BACKEND, b"opaque", []))
    records.append(Record(time + 4, 3, Channel.MAIN, Direction.FRONTEND_TO_BACKEND, b"", []))
    return records


def _written(tmp_path, records: list[Record], source: str) -> str:
    path = str(tmp_path / f"every{'-' + source[:4] if source else ''}.pcapng")
    with open(path, "wb") as out:
        writer = CaptureWriter(out, source=source)
        for record in records:
            writer.write(record)
    return path


def _no_hand_over(monkeypatch) -> None:
    def handed_over(_source):
        raise AssertionError("the scanner handed over to read_capture")
    monkeypatch.setattr(scan, "read_capture", handed_over)


def test_scanner_makes_every_kind_of_record_as_read_capture_does(tmp_path, monkeypatch):
    """Made from one unpack (a plain message) or by parse_pseudo_header (anything else), in one pass with no
    hand-over to read_capture: the same records, sources and tags, with and without a source named."""
    records = _every_kind_of_record()
    for source in ("", "host=h1 pid=7 start=2026-01-01T00:00:00Z route=/a->/b"):
        path = _written(tmp_path, records, source)
        expected = list(read_capture(path))
        with monkeypatch.context() as patch:
            _no_hand_over(patch)
            scanned = list(scan.scan_records(lambda: path))     # noqa: B023
        assert scanned == expected and len(scanned) == len(records)
        assert {record.source for record in scanned} == {source}
        assert len({record.source_tag for record in scanned}) == 1
        assert [(r.connection, r.channel, r.direction, r.data, r.fds, r.kind, r.note, r.event, r.unframed)
                for r in scanned] == \
            [(r.connection, r.channel, r.direction, r.data, r.fds, r.kind, r.note, r.event, r.unframed)
             for r in records]


def _until_error(records) -> tuple[list[Record], Exception | None]:
    """What a reader yields, and the error that ended it (None when it read to the end)."""
    got: list[Record] = []
    try:
        for record in records:
            got.append(record)
    except Exception as caught:      # noqa: BLE001 -- the one read_capture raises, compared by the caller
        return got, caught
    return got, None


def test_scanner_hands_a_damaged_plain_block_to_read_capture(tmp_path):
    """A plain message block whose trailing length is wrong: the records before it, then read_capture's error."""
    records = grammar_records()[:20]
    path = _written(tmp_path, records, "")
    data = bytearray(open(path, "rb").read())
    start = [offset for offset, block_type in block_offsets_of(data) if block_type == BLOCK_EPB][10]
    total = struct.unpack_from("<I", data, start + 4)[0]
    struct.pack_into("<I", data, start + total - 4, total + 4)
    damaged = tmp_path / "damaged.pcapng"
    damaged.write_bytes(bytes(data))
    got, error = _until_error(scan.scan_records(lambda: str(damaged)))
    expected, expected_error = _until_error(read_capture(str(damaged)))
    assert got == expected == records[:10]
    assert error is not None and str(error) == str(expected_error)


def test_shape_decoder_forgets_its_shapes_when_full_and_still_decodes_as_the_grammar():
    """Memory stays flat: past SHAPES_KEPT shapes, all are forgotten at once; messages stay the grammar's."""
    decoder = ShapeDecoder()
    decoder.SHAPES_KEPT = 8
    tracker, general = ContextTracker(), ContextTracker()
    tracker.decoder = decoder.decode
    records = [record for record in grammar_records() for _twice in (1, 2)]      # a shape settles at its second
    lazy = 0
    for _round in range(3):
        for record in records:
            got, expected = tracker.decode(record), general.decode(record)
            assert decoder.kept <= decoder.SHAPES_KEPT
            if got is None or expected is None:
                assert got is expected is None
                continue
            lazy += isinstance(got, LazyMessage)
            assert (got.raw, got.channel, got.request, got.flags, got.size, got.kind, got.payload, got.problems,
                    got.context, got.is_reply, got.summary()) == \
                (expected.raw, expected.channel, expected.request, expected.flags, expected.size, expected.kind,
                 expected.payload, expected.problems, expected.context, expected.is_reply, expected.summary())
    assert lazy and sum(len(table) for _context, tables in decoder.contexts.values() for table in tables) <= 8


def test_a_message_of_a_shape_is_made_of_its_bytes_and_the_shape_it_settled():
    decoder = ShapeDecoder()
    first = build_message(Channel.MAIN, cat.FrontendRequest.SET_VRING_NUM, {"index": 1, "num": 256})
    second = build_message(Channel.MAIN, cat.FrontendRequest.SET_VRING_NUM, {"index": 2, "num": 512})
    context = ContextTracker().base
    decoder.decode(first, Channel.MAIN, context)
    message = decoder.decode(second, Channel.MAIN, context)
    assert isinstance(message, LazyMessage) and message.raw == second
    assert (message.payload.index, message.payload.num, message.name) == (2, 512, "SET_VRING_NUM")
    assert message.payload == decode(second, Channel.MAIN, context).payload
    # A message with the same header but other length is not of the shape: the grammar says what is wrong.
    cut = decoder.decode(second[:-4], Channel.MAIN, context)
    assert not isinstance(cut, LazyMessage) and [p.code for p in cut.problems] == ["size-mismatch"]


def test_context_tracker_gives_the_context_only_of_messages_that_tell_it_nothing():
    """unobserved_context: a message decoded later in the context it returns reads as decode_message read it
    then, and decode_message of it changes no context; every context-telling request goes through now."""
    tracker = ContextTracker()
    told = 0
    for record in grammar_records():
        before = dict(tracker.contexts)
        context = tracker.unobserved_context(record)
        message = tracker.decode_message(record)
        if context is None:
            told += tracker.contexts != before
            continue
        assert tracker.contexts == before
        assert context is message.context
        later = decode(record.data, record.channel, context)
        assert (later.kind, later.payload, later.problems) == (message.kind, message.payload, message.problems)
    assert told >= 3          # SET_FEATURES, SET_PROTOCOL_FEATURES, a device-telling request at least


def test_diff_compares_the_fields_of_the_same_bytes_read_in_other_contexts():
    """Two sessions send the same SET_VRING_BASE bytes, one after negotiating packed rings: the bytes are alike
    but read differently, so diff decodes them and says how."""
    def session(features: int) -> list[Record]:
        messages = [build_message(Channel.MAIN, cat.FrontendRequest.SET_FEATURES, {"features": features}),
                    build_message(Channel.MAIN, cat.FrontendRequest.SET_VRING_BASE, {"index": 0, "num": 0x8005}),
                    build_message(Channel.MAIN, cat.FrontendRequest.SET_VRING_NUM, {"index": 0, "num": 256})]
        return [Record(1000 + n, 1, Channel.MAIN, Direction.FRONTEND_TO_BACKEND, data) for n, data in
                enumerate(messages)]
    split, packed = session(1 << 32), session(1 << 32 | 1 << 34)
    lines = list(DiffStream(split, packed).run().lines())
    assert lines[0].startswith("main A#1 B#1 SET_FEATURES: features: A 0x100000000, B 0x500000000")
    assert any(line.startswith("main A#2 B#2 SET_VRING_BASE:") for line in lines), lines
    assert not any("A#3" in line for line in lines), lines
    assert list(DiffStream(split, session(1 << 32)).run().lines()) == []


def test_timeline_counts_a_message_inline_as_its_general_count_does():
    """Bucketed, the timeline counts messages (with their findings and problems) inline; events, ring samples
    and the first record past the last column go through _count: the lanes come out as _count alone makes them."""
    records = [r for r in grammar_records()]
    inline, general = Timeline(detail_limit=5, columns=16), Timeline(detail_limit=5, columns=16)
    tracker = ContextTracker()
    found = object()
    for number, record in enumerate(records, 1):
        message = tracker.decode(record)
        findings = [found] * (number % 3 == 0)
        inline.add(number, record, message, findings)           # type: ignore[list-item]
        if number <= 6:
            general.add(number, record, message, findings)      # type: ignore[list-item]
        else:
            general._count(record, message, len(findings))
    assert not inline.detailed
    assert inline.messages == general.messages == sum(r.kind == RecordKind.MESSAGE for r in records)
    assert (inline.lanes, inline.events, inline.width_ns) == (general.lanes, general.events, general.width_ns)
    assert sum(entry[1] for lane in inline.lanes.values() for entry in lane.values()) > 0


def test_an_fd_passing_record_is_not_made_plain(monkeypatch):
    """A message with fds is made by parse_pseudo_header: its fd descriptions are kept."""
    fds = [FdInfo("memfd", 12, 4096, "guest-ram", 3), FdInfo("eventfd", 13, -1, "eventfd-id:4")]
    record = Record(5, 1, Channel.MAIN, Direction.FRONTEND_TO_BACKEND, HEADER.pack(12, 1, 8) + bytes(8), fds)
    import io
    stream = io.BytesIO()
    writer = CaptureWriter(stream)
    writer.write(record)
    stream.seek(0)
    _no_hand_over(monkeypatch)
    assert list(scan.scan_records(lambda: stream)) == [record]


def test_decode_message_follows_every_context_change_observe_follows():
    """decode_message calls observe only for the messages that can tell something: the contexts it keeps are
    those of observing every message."""
    gated, every = ContextTracker(), ContextTracker()
    records = grammar_records()
    changes = 0
    for record in records + records:
        gated.decode_message(record)
        context = every.context_for(record.connection)
        every.observe(record.connection, decode(record.data, record.channel, context), context)
        changes += every.contexts.get(record.connection) is not context
        assert gated.contexts == every.contexts
    assert changes >= 3
