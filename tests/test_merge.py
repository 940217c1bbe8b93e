"""Captures from many hosts: each capture names its source, and a merged capture (mergecap, or several files given
to `vhusniff read`) reads as the separate connections it holds."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from peers import kit, require  # noqa: F401  (kit is a fixture)
from vhusniff.capture.pcapng import (
    CaptureWriter,
    capture_source,
    distinct_connections,
    read_capture,
    read_captures,
    source_tag,
)
from vhusniff.cli.main import main
from vhusniff.model import Channel, Direction, EventKind, FdInfo, Record, RecordKind
from vhusniff.protocol.grammar import build_message


def _session(writer: CaptureWriter, start_ns: int, connections=(1,)) -> None:
    """A short real-looking session per connection: connect, GET_FEATURES and its reply, close."""
    for connection in connections:
        start_ns += 10_000
        writer.write(Record(start_ns, connection, kind=RecordKind.EVENT, event=EventKind.CONNECTED, note="connected"))
        writer.write(Record(start_ns + 1000, connection, data=build_message(Channel.MAIN, 1)))
        writer.write(Record(start_ns + 2000, connection, direction=Direction.BACKEND_TO_FRONTEND,
                            data=build_message(Channel.MAIN, 1, dict(features=1 << 32), reply=True)))
        writer.write(Record(start_ns + 3000, connection, kind=RecordKind.EVENT, event=EventKind.CLOSED, note="closed"))


SOURCE_A = "host=host-a pid=7 start=2026-01-01T00:00:00Z"
REPO = Path(__file__).resolve().parent.parent


def _two_hosts(tmp_path, named: bool = True):
    paths = []
    for index, host in enumerate(("host-a", "host-b")):
        path = tmp_path / f"{host}.pcapng"
        with CaptureWriter(path, source=f"host={host} pid=7 start=2026-01-01T00:00:00Z" if named else "") as writer:
            _session(writer, 1_000_000 + 500 * index, connections=(1, 2))
        paths.append(path)
    return paths


def _mergecap(tmp_path, paths, *options: str):
    require("mergecap")
    merged = tmp_path / "merged.pcapng"
    subprocess.run(["mergecap", *options, "-w", str(merged), *map(str, paths)], check=True, capture_output=True)
    return merged


def test_a_capture_names_its_source_and_a_reader_gives_it_to_every_record(tmp_path):
    path = tmp_path / "c.pcapng"
    source = capture_source("/run/proxy.sock->/run/backend.sock")
    assert re.fullmatch(r"host=\S+ pid=\d+ start=\S+Z route=/run/proxy.sock->/run/backend.sock", source)
    with CaptureWriter(path, source=source) as writer:
        _session(writer, 1000, connections=(3, 5))
    records = list(read_capture(path))
    assert {record.source for record in records} == {source}
    assert [record.connection for record in records] == [3] * 4 + [5] * 4      # one source: numbers kept


def test_tshark_sees_the_source_as_the_interface_description(tmp_path):
    require("tshark")
    path = tmp_path / "c.pcapng"
    with CaptureWriter(path, source="host=h pid=1 start=s") as writer:
        _session(writer, 1000)
    shown = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.interface_description"],
                           capture_output=True, text=True, check=True).stdout.split("\n")
    assert shown[0] == "vhusniff source: host=h pid=1 start=s"


def test_connection_numbers_stay_unique_across_sources():
    def record(source, connection):
        return Record(0, connection, source=source)
    records = [record("a", 1), record("b", 1), record("a", 2), record("b", 2), record("a", 1), record("c", 9)]
    assert [r.connection for r in distinct_connections(records)] == [1, 2, 3, 4, 1, 9]


def test_a_mergecap_of_two_hosts_reads_as_their_four_connections(tmp_path, capsys):
    merged = _mergecap(tmp_path, _two_hosts(tmp_path))
    records = list(read_capture(merged))
    pairs = {(record.source.split()[0], record.connection) for record in records}
    # numbered as they appear, as tshark numbers tcp.stream: host-a's 1, host-b's 1, host-a's 2, host-b's 2
    assert pairs == {("host=host-a", 1), ("host=host-b", 2), ("host=host-a", 3), ("host=host-b", 4)}
    assert main(["read", str(merged), "-Y", 'source contains "host-b" && request == GET_FEATURES']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines] == ["c2", "c2", "c4", "c4"]
    report = _run(["report", str(merged)], capsys)
    named = re.findall(r"^Connection (\d+) .*\n  Source:  host=(\S+)", report, re.MULTILINE)
    assert named == [("1", "host-a"), ("2", "host-b"), ("3", "host-a"), ("4", "host-b")], report


def test_scapy_keys_a_merged_capture_by_source_and_number(tmp_path):
    from vhusniff.layers.packets import VhostUser, VhusniffRecord
    from vhusniff.layers.pcap import read_packets
    merged = _mergecap(tmp_path, _two_hosts(tmp_path))
    packets = read_packets(merged)
    keyed = [(packet.sniffed_on.split()[0], packet[VhusniffRecord].connection) for packet in packets]
    assert keyed == [(f"host={record.source.split()[0][5:]}", record.connection) for record in read_capture(merged)]
    assert sorted(set(keyed)) == [("host=host-a", 1), ("host=host-a", 3), ("host=host-b", 2), ("host=host-b", 4)]
    assert sum(VhostUser in packet for packet in packets) == 8


def test_several_files_read_as_mergecap_merges_them(tmp_path, capsys):
    paths = _two_hosts(tmp_path)
    merged = _mergecap(tmp_path, paths)
    for options in ([], ["-V"], ["-T", "json"]):
        assert main(["read", str(merged), *options]) == 0
        from_merged = capsys.readouterr().out
        assert main(["read", *map(str, paths), *options]) == 0
        assert capsys.readouterr().out == from_merged
    json_records = json.loads(from_merged)
    assert [entry["time"] for entry in json_records] == sorted(entry["time"] for entry in json_records)
    assert {entry["source"].split()[0] for entry in json_records} == {"host=host-a", "host=host-b"}


def test_captures_that_name_no_source_are_told_apart_by_file_or_interface(tmp_path):
    paths = _two_hosts(tmp_path, named=False)
    by_file = {(record.source, record.connection) for record in read_captures(paths)}
    assert len(by_file) == 4 and all(source.startswith("file=") for source, _number in by_file)
    kept_apart = _mergecap(tmp_path, paths, "-I", "none")       # one interface per file, both unnamed
    assert len({record.connection for record in read_capture(kept_apart)}) == 4


@pytest.fixture(scope="module")
def two_lab_captures(kit, tmp_path_factory):  # noqa: F811  (kit is a fixture)
    """Two real boots (QEMU 7.2, qemu-storage-daemon) through two proxies: two blk lab captures."""
    require("qemu-storage-daemon")
    from vhusniff.lab.command import record_boot
    captures = []
    for name in ("first", "second"):
        result, capture = record_boot(tmp_path_factory.mktemp(name), "blk")
        assert result.blk_io_ok, result.console
        captures.append(capture)
    return captures


def _run(argv: list[str], capsys) -> str:
    from vhusniff.cli.main import _dispatch
    _dispatch(argv)
    return capsys.readouterr().out


def _findings(text: str) -> int:
    return int(re.search(r"^(\d+) finding\(s\)", text, re.MULTILINE).group(1))


def test_a_mergecap_of_two_real_lab_captures_reads_as_their_connections(two_lab_captures, tmp_path, capsys):
    merged = _mergecap(tmp_path, two_lab_captures)
    singles = [list(read_capture(path)) for path in two_lab_captures]
    alone = [{record.connection for record in records} for records in singles]
    assert alone[0] == alone[1] == {1}, "each lab capture holds connection 1"
    records = list(read_capture(merged))
    assert len(records) == sum(len(records) for records in singles)
    sources = {record.connection: record.source for record in records}
    assert sorted(sources) == [1, 2] and len(set(sources.values())) == 2
    assert all(" route=" in source for source in sources.values())
    for source, single in zip(sorted(set(sources.values()), key=lambda s: [r.source for r in records].index(s)),
                              singles, strict=True):
        assert [r.data for r in records if r.source == source] == [r.data for r in single]
    # the analysis: two connections, each as it reads alone, and exactly the findings the captures have alone
    report = _run(["report", str(merged)], capsys)
    assert re.findall(r"^Connection (\d+)", report, re.MULTILINE) == ["1", "2"], report
    assert [source for source in re.findall(r"^  Source:  (.*)$", report, re.MULTILINE)] == \
        [sources[1], sources[2]]
    alone_reports = [_run(["report", str(path)], capsys) for path in two_lab_captures]
    assert all("Findings: none" in text for text in alone_reports) == (report.count("Findings: none") == 2)
    assert _findings(_run(["expert", str(merged)], capsys)) == \
        sum(_findings(_run(["expert", str(path)], capsys)) for path in two_lab_captures)
    # the same through `vhusniff read A B`
    from_merged = _run(["read", str(merged)], capsys)
    assert _run(["read", *map(str, two_lab_captures)], capsys) == from_merged and " c2 " in from_merged


@pytest.mark.parametrize("text", ['source contains "host-a"', '!(source contains "host-a")', "source && size == 8",
                                  f"source_tag == {source_tag(SOURCE_A):#x}", "source_tag != 5"])
def test_a_single_source_capture_reads_its_source_alike_on_the_fast_and_the_general_path(tmp_path, text):
    import io

    from vhusniff.protocol.context import ContextTracker
    from vhusniff.views.fast import fast_lines, general_messages
    from vhusniff.views.filters import compile_filter
    from vhusniff.views.present import record_detail, record_line
    path = _two_hosts(tmp_path)[0]
    display_filter = compile_filter(text)
    fast = io.StringIO()
    fast_lines(str(path), ContextTracker(), fast, display_filter=display_filter, verbose=True)
    general = "".join(record_line(number, relative, record, message) + "\n" +
                      record_detail(record, message, True, False)
                      for number, relative, record, message in general_messages(str(path), ContextTracker())
                      if display_filter.matches(message, record, number))
    assert fast.getvalue() == general
    assert ("  source: host=host-a" in general) == (not text.startswith("!"))


# --- the source tag: every pseudo-header says its capture's source, for readers that see no interface ------------

def _packets(path) -> list[bytes]:
    """Each EPB's packet data, as a reader that sees only packets has it."""
    from scapy.utils import RawPcapNgReader
    return [packet for packet, _metadata in RawPcapNgReader(str(path))]


def test_the_source_tag_is_stable_never_0_and_0_without_a_source():
    assert source_tag(SOURCE_A) == 0xE845B0      # the same bytes in every vhusniff, every process
    assert source_tag("") == 0
    assert all(0 < source_tag(f"host=h{index}") < 1 << 24 for index in range(2000))


def test_every_record_a_writer_writes_carries_its_source_tag(tmp_path):
    path = tmp_path / "tagged.pcapng"
    with CaptureWriter(path, source=SOURCE_A) as writer:
        _session(writer, 1000)
        writer.write(Record(9000, 1, data=build_message(Channel.MAIN, 13, dict(index=0, flags=0, reserved=0)),
                            fds=[FdInfo("eventfd", 9, 0, "eventfd-id:3")], note="with an fd and a note"))
        writer.stream_writer(1, Channel.MAIN, Direction.FRONTEND_TO_BACKEND)(9500, build_message(Channel.MAIN, 1))
    tag = source_tag(SOURCE_A).to_bytes(3, "little")
    packets = _packets(path)
    assert len(packets) == 6 and all(packet[21:24] == tag for packet in packets)
    assert packets[0][20] == EventKind.CONNECTED         # the event kind keeps its byte
    records = list(read_capture(path))
    assert [record.source_tag for record in records] == [source_tag(SOURCE_A)] * 6
    assert [record.event for record in records][:4:3] == [EventKind.CONNECTED, EventKind.CLOSED]
    unnamed = tmp_path / "unnamed.pcapng"
    with CaptureWriter(unnamed) as writer:
        _session(writer, 1000)
    assert all(packet[21:24] == bytes(3) for packet in _packets(unnamed))
    assert {record.source_tag for record in read_capture(unnamed)} == {0}


SHIPPED_MERGED = "merged-blk-and-net.pcapng"     # two lab runs at once, through two proxies, merged by mergecap


def test_each_shipped_capture_carries_the_tags_of_its_sources():
    """The captures recorded before the tag carry 0 and read as before; the shipped mergecap holds two sources,
    each record tagged with its own source's tag."""
    paths = [str(path) for path in (REPO / "captures").glob("*.pcapng")]
    assert any(path.endswith(SHIPPED_MERGED) for path in paths)
    for path in paths:
        records = list(read_capture(path))
        if path.endswith(SHIPPED_MERGED):
            assert len({record.source for record in records}) == 2, path
            assert all(record.source_tag == source_tag(record.source) != 0 for record in records), path
        else:
            assert {record.source_tag for record in records} == {0}, path


def test_plain_tshark_reads_the_shipped_mergecap_as_read_does(capsys):
    """A real blk boot (QEMU 7.2) and a real net boot (QEMU 10, dpdk-testpmd) captured at the same time by two
    proxies and merged: their interleaved connections 1 read as c1 and c2 in plain tshark, as in `vhusniff read`,
    and neither finds a clash or any other finding."""
    require("tshark")
    merged = str(REPO / "captures" / SHIPPED_MERGED)
    shown = _tshark_lines(merged)
    assert shown == _read_lines(merged, capsys)
    order = [line.split()[0].split("/")[0] for _number, line in sorted(shown.items())]
    assert set(order) == {"c1", "c2"}
    assert sum(a != b for a, b in zip(order, order[1:], strict=False)) > 1, "the two sessions interleave"
    assert not any("connects while open" in line for line in shown.values())
    assert _findings(_run(["expert", merged], capsys)) == 0


def test_read_shows_the_source_tag_in_the_tree_json_and_filters(tmp_path, capsys):
    merged = _mergecap(tmp_path, _two_hosts(tmp_path))
    tag_a, tag_b = source_tag(SOURCE_A), source_tag(SOURCE_A.replace("host-a", "host-b"))
    assert main(["read", str(merged), "-V", "-Y", "request == GET_FEATURES"]) == 0
    tree = capsys.readouterr().out
    assert tree.count(f"  source_tag: {tag_a:#08x}\n") == tree.count(f"  source_tag: {tag_b:#08x}\n") == 4
    assert main(["read", str(merged), "-T", "json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert {(entry["source"].split()[0], entry["source_tag"]) for entry in entries} == \
        {("host=host-a", tag_a), ("host=host-b", tag_b)}
    assert main(["read", str(merged), "-Y", f"source_tag == {tag_b:#x}", "-T", "fields", "-e", "connection",
                 "-e", "source_tag"]) == 0
    assert sorted(set(capsys.readouterr().out.split("\n"))) == ["", f"2\t{tag_b}", f"4\t{tag_b}"]


def test_a_tag_that_is_not_its_interfaces_source_reads_as_data(tmp_path, capsys):
    """A record whose tag is not its interface's (moved between captures by another tool, or damaged): read on,
    and -V says so on the fast path and the general path alike."""
    path = tmp_path / "moved.pcapng"
    with CaptureWriter(path, source=SOURCE_A) as writer:
        _session(writer, 1000)
    data = bytearray(path.read_bytes())
    tag = source_tag(SOURCE_A).to_bytes(3, "little")
    first_message = data.index(b"VHUS" + bytes([2, 0, 24, 0]))       # the first plain message's pseudo-header
    data[first_message + 21:first_message + 24] = b"\x01\x02\x03"
    assert data.count(tag) == 3
    path.write_bytes(bytes(data))
    assert [record.source_tag for record in read_capture(path)][:3] == [source_tag(SOURCE_A), 0x030201,
                                                                        source_tag(SOURCE_A)]
    wording = f"  source_tag: 0x030201 (not its interface's source, whose tag is {source_tag(SOURCE_A):#08x})\n"
    for options in (["-V"], ["-V", "--expert"], ["-T", "json"]):
        assert main(["read", str(path), *options]) == 0
        out = capsys.readouterr().out
        assert (out.count(wording) == 1) == (options[0] == "-V"), (options, out)
    assert main(["read", str(path), "-Y", "source_tag == 0x030201"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["2"]


def test_scapy_alone_keys_a_merged_capture_by_source_tag_and_number(tmp_path):
    from scapy.utils import rdpcap

    from vhusniff.layers.packets import VhusniffRecord
    merged = _mergecap(tmp_path, _two_hosts(tmp_path))
    keys = [(packet[VhusniffRecord].source_tag, packet[VhusniffRecord].connection) for packet in rdpcap(str(merged))]
    numbers = [record.connection for record in read_capture(merged)]
    assert len(set(keys)) == 4
    assert len(set(zip(keys, numbers, strict=True))) == 4      # one key, one number `vhusniff read` shows
    rebuilt = VhusniffRecord(bytes(rdpcap(str(merged))[0][VhusniffRecord]))
    assert rebuilt.source_tag == source_tag(SOURCE_A)


def _read_lines(path, capsys) -> dict[int, str]:
    """Record number -> `vhusniff read`'s line after its number and time, as _tshark_lines has it."""
    return {int(line.split()[0]): " ".join(line.split()[2:]) for line in _run(["read", str(path)], capsys).splitlines()}


def _tshark_lines(path, sources: bool = False) -> dict[int, str]:
    """Frame number -> plain tshark's Info column with the dissector (no tree, no field extractor)."""
    dissector = REPO / "dissectors" / "vhost_user.lua"
    result = subprocess.run(["tshark", "-X", f"lua_script:{dissector}", "-r", str(path),
                             "-o", 'gui.column.format:"No.","%m","Info","%i"'], capture_output=True, text=True,
                            errors="replace", timeout=120,
                            env=dict(os.environ, VHUSNIFF_SOURCES="1" if sources else ""))
    assert result.returncode == 0 and "Lua Error" not in result.stdout, result.stderr
    return {int(line.split()[0]): " ".join(line.split()[1:]) for line in result.stdout.splitlines() if line.strip()}


def test_plain_tshark_reads_a_mergecap_of_two_real_lab_captures_as_read_does(two_lab_captures, tmp_path, capsys):
    """Two real blk boots through two proxies, merged: plain `tshark -r` keeps their connections 1 apart by the
    tag, numbered as `vhusniff read` numbers them, and finds no clash; each capture alone keeps its number."""
    require("tshark")
    merged = _mergecap(tmp_path, two_lab_captures)
    shown = _tshark_lines(merged)
    assert shown == _read_lines(merged, capsys)
    assert {line.split()[0].split("/")[0] for line in shown.values()} == {"c1", "c2"}     # main and back-end channel
    assert not any("connects while open" in line for line in shown.values())
    assert _tshark_lines(merged, sources=True) == shown      # as the Wireshark GUI keys them, by the interface
    tags = {record.connection: record.source_tag for record in read_capture(merged)}
    assert tags[1] != tags[2] and {source_tag(record.source) for record in read_capture(merged)} == set(tags.values())
    for path in two_lab_captures:
        assert {line.split()[0].split("/")[0] for line in _tshark_lines(path).values()} == {"c1"}
