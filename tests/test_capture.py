"""The capture format: byte-exact round trips, streaming reads, and damage that loses nothing before it."""
import os
import signal
import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhusniff.capture import pcapng as capture
from vhusniff.capture.pcapng import CaptureError, CaptureWriter, read_capture, write_capture
from vhusniff.model import Channel, Direction, FdInfo, Record, RecordKind
from vhusniff.protocol.grammar import build_message

fd_infos = st.builds(FdInfo, kind=st.sampled_from(capture.FD_KINDS), inode=st.integers(0, 2**64 - 1),
                     size=st.integers(-1, 2**40), name=st.text(max_size=40).filter(lambda s: len(s.encode()) < 256),
                     seals=st.integers(0, 0xFFFF))
records = st.builds(Record, timestamp_ns=st.integers(0, 2**63 - 1), connection=st.integers(0, 2**32 - 1),
                    channel=st.sampled_from(Channel), direction=st.sampled_from(Direction),
                    data=st.binary(max_size=300), fds=st.lists(fd_infos, max_size=4),
                    kind=st.just(RecordKind.MESSAGE), note=st.text(max_size=30))


def sample_records(count=5):
    out = []
    for number in range(count):
        out.append(Record(1_700_000_000_000_000_000 + number * 1234567, 1 + number % 2, Channel.MAIN,
                          Direction(number % 2),
                          build_message(Channel.MAIN, 1 + number, bytes(8 * (number % 2)), reply=bool(number % 2)),
                          [FdInfo("eventfd", 100 + number, -1, "[eventfd]")] if number % 3 == 0 else []))
    out.append(Record(1_700_000_000_100_000_000, 1, kind=RecordKind.EVENT, note="back-end closed the connection"))
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(records, max_size=6))
def test_records_round_trip_exactly(tmp_path_factory, items):
    path = tmp_path_factory.mktemp("cap") / "c.pcapng"
    write_capture(path, items)
    assert list(read_capture(path)) == items


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**63 - 1), st.binary(max_size=300)), max_size=5),
       st.integers(0, 2**32 - 1), st.sampled_from(Channel), st.sampled_from(Direction), st.booleans())
def test_a_stream_writer_writes_the_same_bytes_as_a_record(tmp_path_factory, messages, connection, channel,
                                                            direction, flush_each):
    folder = tmp_path_factory.mktemp("cap")
    records = [Record(timestamp, connection, channel, direction, data) for timestamp, data in messages]
    write_capture(folder / "records.pcapng", records)
    with CaptureWriter(folder / "stream.pcapng", flush_each=flush_each) as writer:
        write_message = writer.stream_writer(connection, channel, direction)
        for timestamp, data in messages:
            write_message(timestamp, data)
        assert writer.records == len(messages)
    assert (folder / "stream.pcapng").read_bytes() == (folder / "records.pcapng").read_bytes()
    assert list(read_capture(folder / "stream.pcapng")) == records


def block_offsets(path):
    """(offset, type) of every block, for damaging a chosen one."""
    return block_offsets_of(path.read_bytes())


def read_until_error(path):
    got = []
    with pytest.raises(CaptureError) as error:
        for record in read_capture(path):
            got.append(record)
    return got, error.value


def test_every_truncation_keeps_the_whole_records_before_it(tmp_path):
    path = tmp_path / "good.pcapng"
    items = sample_records()
    write_capture(path, items)
    data = path.read_bytes()
    epbs = [offset for offset, kind in block_offsets(path) if kind == capture.BLOCK_EPB]
    for cut in range(epbs[0] + 1, len(data)):
        if cut in epbs:
            continue          # a cut on a block boundary is a shorter, valid capture
        damaged = tmp_path / "cut.pcapng"
        damaged.write_bytes(data[:cut])
        got, error = read_until_error(damaged)
        whole = sum(1 for offset in epbs if offset < cut) - 1
        assert got == items[:whole]
        assert error.offset == epbs[whole] and str(damaged) in str(error)


def test_bad_block_length_names_its_offset(tmp_path):
    path = tmp_path / "c.pcapng"
    write_capture(path, sample_records())
    data = bytearray(path.read_bytes())
    third = [offset for offset, kind in block_offsets(path) if kind == capture.BLOCK_EPB][2]
    struct.pack_into("<I", data, third + 4, 7)
    path.write_bytes(data)
    got, error = read_until_error(path)
    assert len(got) == 2 and error.offset == third and "bad block length 7" in str(error)


def test_unknown_pseudo_header_version_is_named(tmp_path):
    path = tmp_path / "c.pcapng"
    write_capture(path, sample_records())
    data = bytearray(path.read_bytes())
    second = [offset for offset, kind in block_offsets(path) if kind == capture.BLOCK_EPB][1]
    struct.pack_into("<H", data, second + 28 + 4, 99)
    path.write_bytes(data)
    got, error = read_until_error(path)
    assert len(got) == 1 and error.offset == second and "unknown pseudo-header version 99" in str(error)


def test_capture_of_other_traffic_is_refused(tmp_path):
    path = tmp_path / "eth.pcapng"
    data = bytearray(capture.file_header())
    # Turn the interface into Ethernet (link type 1): a pcapng, but not of vhost-user.
    idb = [offset for offset, kind in block_offsets_of(bytes(data)) if kind == capture.BLOCK_IDB][0]
    struct.pack_into("<H", data, idb + 8, 1)
    path.write_bytes(bytes(data))
    got, error = read_until_error(path)
    assert got == [] and "no vhost-user traffic" in str(error)


def block_offsets_of(data):
    offsets, position = [], 0
    while position < len(data):
        block_type, total = struct.unpack_from("<II", data, position)
        offsets.append((position, block_type))
        position += total
    return offsets


@pytest.mark.parametrize("content, reason", [(b"", "empty file"),
                                              (b"\xd4\xc3\xb2\xa1" + bytes(20), "classic pcap"),
                                              (b"garbage!" * 4, "not a pcapng")])
def test_files_that_are_not_captures(tmp_path, content, reason):
    path = tmp_path / "x.pcapng"
    path.write_bytes(content)
    got, error = read_until_error(path)
    assert got == [] and reason in str(error) and error.offset == 0


def test_kill_9_of_a_flushing_writer_leaves_every_written_record(tmp_path):
    path = tmp_path / "live.pcapng"
    script = (
        "import sys, time\n"
        "from vhusniff.capture.pcapng import CaptureWriter\n"
        "from vhusniff.model import Record\n"
        "writer = CaptureWriter(sys.argv[1], flush_each=True)\n"
        "for n in range(40):\n"
        "    writer.write(Record(n, 1, data=bytes(12 + n)))\n"
        "print('written', flush=True)\n"
        "time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "written"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    got = list(read_capture(path))
    assert [len(record.data) for record in got] == [12 + n for n in range(40)]


def test_reading_is_streaming(tmp_path):
    """The reader yields the first record before it has read the whole file."""
    path = tmp_path / "c.pcapng"
    with CaptureWriter(path) as writer:
        for n in range(2000):
            writer.write(Record(n, 1, data=build_message(Channel.MAIN, 8, {"index": 0, "num": 256})))
    with open(path, "rb") as stream:
        first = next(read_capture(stream))
        assert first.timestamp_ns == 0
        assert stream.tell() < os.path.getsize(path) // 4


def test_tshark_opens_a_capture_with_nanosecond_times_and_directions(tmp_path):
    import shutil
    if shutil.which("tshark") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("tshark is not installed")
        pytest.skip("tshark not installed")
    path = tmp_path / "c.pcapng"
    items = sample_records()
    write_capture(path, items)
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.time_epoch",
                          "-e", "frame.packet_flags_direction"], capture_output=True, text=True, check=True).stdout
    rows = [line.split("\t") for line in out.splitlines()]
    assert len(rows) == len(items)
    for row, record in zip(rows, items, strict=False):
        seconds, fraction = row[0].split(".")
        assert int(seconds) * 10**9 + int(fraction.ljust(9, "0")[:9]) == record.timestamp_ns
        expected = 0 if record.kind == RecordKind.EVENT else (2 if record.direction == Direction.FRONTEND_TO_BACKEND
                                                              else 1)
        assert int(row[1], 16) & 3 == expected


@pytest.mark.parametrize("block_type, total", [(capture.BLOCK_EPB, n) for n in (12, 16, 20, 24, 28)] +
                         [(capture.BLOCK_IDB, n) for n in (12, 16)])
def test_a_block_too_short_for_its_type_is_named(tmp_path, block_type, total):
    path = tmp_path / "c.pcapng"
    write_capture(path, sample_records())
    data = bytearray(path.read_bytes())
    third = [offset for offset, kind in block_offsets(path) if kind == capture.BLOCK_EPB][2]
    data[third:third] = struct.pack("<II", block_type, total) + bytes(total - 12) + struct.pack("<I", total)
    path.write_bytes(data)
    got, error = read_until_error(path)
    assert got == sample_records()[:2] and error.offset == third
    assert f"bad block length {total} (block type {block_type:#x}): an " in str(error)
    assert f"needs at least {capture.MIN_BLOCK_LENGTH[block_type]} bytes" in str(error)


def fd_name_past_the_header(name_length: int) -> bytes:
    """A message record with one fd whose description's name length runs past the pseudo-header (and the packet)."""
    record = Record(1, 1, data=build_message(Channel.MAIN, 3), fds=[FdInfo("memfd", 7, 4096, "mem", 0)])
    block = bytearray(capture.enhanced_packet_block(record))
    name_length_at = 28 + capture.PSEUDO_HEADER.size + 1
    assert block[name_length_at] == 3
    block[name_length_at] = name_length
    return capture.file_header() + bytes(block)


def test_an_fd_name_that_runs_past_the_pseudo_header_is_named(tmp_path):
    path = tmp_path / "c.pcapng"
    path.write_bytes(fd_name_past_the_header(200))
    got, error = read_until_error(path)
    assert got == [] and "fd name of 200 bytes runs past the pseudo-header" in str(error)


def test_a_huge_block_length_from_a_pipe_is_read_in_chunks(tmp_path):
    """Through a pipe the file's size is not known: the block is read a chunk at a time and found short."""
    path = tmp_path / "c.pcapng"
    write_capture(path, sample_records())
    good = path.read_bytes()
    read_end, write_end = os.pipe()
    writer = subprocess.Popen([sys.executable, "-c", "import os, sys; os.write(1, sys.stdin.buffer.read())"],
                              stdin=subprocess.PIPE, stdout=write_end)
    os.close(write_end)
    writer.stdin.write(good + struct.pack("<II", capture.BLOCK_EPB, 0xFFFFFFF0) + bytes(3 * capture.READ_CHUNK))
    writer.stdin.close()
    with os.fdopen(read_end, "rb", buffering=0) as stream:
        got = []
        with pytest.raises(CaptureError) as error:
            for record in read_capture(stream):
                got.append(record)
    writer.wait(30)
    assert got == sample_records() and error.value.offset == len(good)
    assert f"truncated block: {3 * capture.READ_CHUNK + 8} of {0xFFFFFFF0} bytes" in str(error.value)


# --- capture format 2: the event kind is a field; version-1 captures still read -------------------------------
DATA = os.path.join(os.path.dirname(__file__), "data")
V1_EVENTS = os.path.join(DATA, "v1-events.pcapng")            # written by the version-1 writer
V1_QEMU_BLK_BOOT = os.path.join(DATA, "v1-qemu-blk-boot.pcapng")


def test_version_1_events_read_with_the_kind_their_note_meant():
    from vhusniff.model import EventKind as K
    records = list(read_capture(V1_EVENTS))
    assert [(r.event.name if r.kind == RecordKind.EVENT else "-") for r in records] == [
        "CONNECTED", "-", "-", "CHANNEL_OPENED", "CHANNEL_CLOSED", "-", "CLOSED", "CONNECTED", "NOTE", "-", "CLOSED"]
    assert records[0].device == "net" and records[7].device == ""
    assert [r.unframed for r in records if r.kind == RecordKind.MESSAGE] == [False, False, True, False]
    boot = [r for r in read_capture(V1_QEMU_BLK_BOOT) if r.kind == RecordKind.EVENT]
    assert [r.event for r in boot] == [K.CONNECTED, K.CHANNEL_OPENED, K.CLOSED, K.CLOSED]
    assert boot[0].device == "blk"


def test_migrate_v1_event_is_the_one_reading_of_words():
    from vhusniff.capture.compat import migrate_v1_event
    from vhusniff.model import EventKind as K
    assert migrate_v1_event("front-end closed the backend channel", Channel.BACKEND) == (K.CHANNEL_CLOSED, "")
    assert migrate_v1_event("Connection reset by peer") == (K.CLOSED, "")
    assert migrate_v1_event("replay --as backend: front-end connected, device=blk") == (K.CONNECTED, "blk")
    assert migrate_v1_event("hook says hello") == (K.NOTE, "")


def test_every_event_kind_round_trips_in_format_2(tmp_path):
    from vhusniff.model import EventKind
    path = tmp_path / "v2.pcapng"
    # The words say the opposite of the kind: only the kind is read back.
    written = [Record(1000 + kind, 3, Channel.BACKEND if kind % 2 else Channel.MAIN, kind=RecordKind.EVENT,
                      note="connected" if kind == EventKind.CLOSED else "closed", event=kind) for kind in EventKind]
    written.append(Record(5000, 3, data=b"\x01" * 5, note="unframed: closed mid-message", unframed=True))
    written.append(Record(5001, 3, data=b"\x01" * 5, note="unframed, say the words; the flag says no"))
    write_capture(path, written)
    content = path.read_bytes()
    assert struct.unpack_from("<H", content, content.index(b"VHUS") + 4)[0] == capture.PSEUDO_VERSION == 2
    assert list(read_capture(path)) == written
    assert all(r.device == "" for r in read_capture(path))


def test_an_unknown_event_kind_reads_as_a_note(tmp_path):
    from vhusniff.model import EventKind
    block = bytearray(capture.enhanced_packet_block(Record(1, 1, kind=RecordKind.EVENT, note="x",
                                                           event=EventKind.PEER)))
    block[28 + 20] = 200                                      # the event byte of the v2 pseudo-header
    path = tmp_path / "future.pcapng"
    path.write_bytes(capture.file_header() + bytes(block))
    [record] = read_capture(path)
    assert record.event == EventKind.NOTE and record.note == "x"
