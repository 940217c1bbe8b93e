"""`vhusniff read`: damaged captures lose nothing before the damage and say where it is, in one line."""
from __future__ import annotations

import glob
import json
import os
import re
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhusniff.capture.pcapng import enhanced_packet_block, file_header
from vhusniff.cli.main import main
from vhusniff.model import Channel, Direction, Record, RecordKind
from vhusniff.protocol.context import ContextTracker
from vhusniff.protocol.grammar import build_message
from vhusniff.views.fast import COMPILED_KINDS, compile_payload_summary, fast_lines, general_messages
from vhusniff.views.filters import compile_filter
from vhusniff.views.present import record_detail, record_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = 6


def _records(count: int = GOOD) -> list[Record]:
    messages = [build_message(Channel.MAIN, 1), struct.pack("<IIIQ", 1, 5, 8, 0x1_0000_0000),
                build_message(Channel.MAIN, 18, dict(index=1, num=1))]
    return [Record(1_000_000 + i * 1000, 1, Channel.MAIN,
                   Direction.BACKEND_TO_FRONTEND if i % 3 == 1 else Direction.FRONTEND_TO_BACKEND,
                   messages[i % 3]) for i in range(count)]


def _good_part() -> tuple[bytes, int]:
    data = file_header() + b"".join(enhanced_packet_block(r) for r in _records())
    return data, len(data)


def truncated_file() -> tuple[bytes, int]:
    data, offset = _good_part()
    return data + enhanced_packet_block(_records(1)[0])[:30], offset


def bad_block() -> tuple[bytes, int]:
    data, offset = _good_part()
    block = bytearray(enhanced_packet_block(_records(1)[0]))
    block[4:8] = struct.pack("<I", 13)            # a block length that is not a multiple of 4
    return data + bytes(block) + enhanced_packet_block(_records(1)[0]), offset


def disagreeing_lengths() -> tuple[bytes, int]:
    data, offset = _good_part()
    block = bytearray(enhanced_packet_block(_records(1)[0]))
    block[-4:] = struct.pack("<I", 999)           # the trailing copy of the block length disagrees
    return data + bytes(block) + enhanced_packet_block(_records(1)[0]), offset


def unknown_version() -> tuple[bytes, int]:
    data, offset = _good_part()
    block = bytearray(enhanced_packet_block(_records(1)[0]))
    block[28 + 4:28 + 6] = struct.pack("<H", 9)   # pseudo-header version 9 (packet data starts at byte 28)
    return data + bytes(block), offset


def other_link_type() -> tuple[bytes, int]:
    data = bytearray(file_header())
    link_type_at = data.index(struct.pack("<IH", 1, 147)[:4], 28) + 8     # the IDB after the SHB
    data[link_type_at:link_type_at + 2] = struct.pack("<H", 1)            # Ethernet
    ethernet = struct.pack("<IIIII", 0, 0, 0, 14, 14) + bytes(14) + b"\0\0" + struct.pack("<HH", 0, 0)
    block = struct.pack("<II", 6, 12 + len(ethernet)) + ethernet + struct.pack("<I", 12 + len(ethernet))
    data += block
    return bytes(data), len(data)


def short_epb(total: int):
    """An Enhanced Packet Block whose length (a multiple of 4, at least 12) leaves no room for its fields."""
    def make() -> tuple[bytes, int]:
        data, offset = _good_part()
        block = struct.pack("<II", 6, total) + bytes(total - 12) + struct.pack("<I", total)
        return data + block + enhanced_packet_block(_records(1)[0]), offset
    return make


def huge_block() -> tuple[bytes, int]:
    data, offset = _good_part()
    return data + struct.pack("<II", 6, 0xFFFFFFF0) + bytes(64), offset


def future_pcapng_version() -> tuple[bytes, int]:
    data, _offset = _good_part()
    return data[:12] + struct.pack("<H", 2) + data[14:], 0     # the section header's major version: 2


def classic_pcap() -> tuple[bytes, int]:
    return struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1), 0


DAMAGE = {"truncated": (truncated_file, GOOD), "bad-block": (bad_block, GOOD),
          "disagreeing-lengths": (disagreeing_lengths, GOOD),
          "unknown-version": (unknown_version, GOOD), "other-link-type": (other_link_type, 0),
          "classic-pcap": (classic_pcap, 0), "huge-block": (huge_block, GOOD),
          "future-pcapng-version": (future_pcapng_version, 0),
          **{f"short-epb-{total}": (short_epb(total), GOOD) for total in (12, 16, 20, 24)}}


def _write(tmp_path, name):
    make, shown = DAMAGE[name]
    data, offset = make()
    path = tmp_path / f"{name}.pcapng"
    path.write_bytes(data)
    return str(path), offset, shown


def _check(path, offset, shown, status, stdout, stderr, json_output=False):
    assert status == 2
    error_lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1, stderr
    assert path in error_lines[0] and f"offset {offset}" in error_lines[0]
    if json_output:
        assert len(json.loads(stdout)) == shown
    else:
        lines = stdout.splitlines()
        assert len(lines) == shown and [int(line.split()[0]) for line in lines] == list(range(1, shown + 1))


@pytest.mark.parametrize("name", DAMAGE)
def test_damage_in_process_keeps_what_came_before(tmp_path, capsys, name):
    path, offset, shown = _write(tmp_path, name)
    status = main(["read", path])
    captured = capsys.readouterr()
    _check(path, offset, shown, status, captured.out, captured.err)


@pytest.mark.parametrize("name", DAMAGE)
@pytest.mark.parametrize("options", [[], ["-V"], ["-T", "json"], ["-Y", "request"]])
def test_damage_as_a_subprocess_every_output_mode(tmp_path, name, options):
    path, offset, shown = _write(tmp_path, name)
    result = subprocess.run([sys.executable, "-m", "vhusniff.cli.main", "read", path, *options], capture_output=True,
                            text=True, cwd=ROOT, timeout=60)
    if options == ["-V"]:
        summary = re.compile(r"^\s*\d+\s+\d+\.\d+ c\d")           # -V: keep the summary lines, not the trees
        result.stdout = "\n".join(line for line in result.stdout.splitlines() if summary.match(line))
    _check(path, offset, shown, result.returncode, result.stdout, result.stderr, json_output=options == ["-T", "json"])


def test_a_reader_that_leaves_early_ends_the_read_quietly(tmp_path):
    path = tmp_path / "long.pcapng"
    path.write_bytes(file_header() + b"".join(enhanced_packet_block(r) for r in _records(30000)))
    for options in ([], ["-V"]):
        reader = subprocess.Popen([sys.executable, "-m", "vhusniff.cli.main", "read", str(path), *options],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        assert reader.stdout.readline().split()[0] == b"1"
        reader.stdout.close()                     # `| head -1`
        assert reader.wait(60) == 0, options
        assert reader.stderr.read() == b"", options


def test_the_fast_summary_and_the_general_path_print_the_same_lines(tmp_path, capsys):
    from vhusniff.capture.pcapng import write_capture
    records = _records(30)
    records[7].note = "unframed: rest of a stream"
    write_capture(tmp_path / "c.pcapng", records)
    main(["read", str(tmp_path / "c.pcapng")])
    fast = capsys.readouterr().out
    main(["read", str(tmp_path / "c.pcapng"), "-Y", "frame.number"])     # a filter forces the general path
    assert fast == capsys.readouterr().out and len(fast.splitlines()) == 30


def test_count_follow_and_fields(tmp_path, capsys):
    from vhusniff.capture.pcapng import write_capture
    records = _records(9)
    for index, record in enumerate(records):
        record.connection = 1 + index % 2
    write_capture(tmp_path / "c.pcapng", records)
    main(["read", str(tmp_path / "c.pcapng"), "-c", "2"])
    assert len(capsys.readouterr().out.splitlines()) == 2
    main(["read", str(tmp_path / "c.pcapng"), "--follow", "2"])
    assert all(" c2 " in line for line in capsys.readouterr().out.splitlines())
    main(["read", str(tmp_path / "c.pcapng"), "-T", "fields", "-e", "frame.number", "-e", "vring.index",
          "-Y", "request == SET_VRING_ENABLE"])
    assert capsys.readouterr().out.splitlines() == ["3\t1", "6\t1", "9\t1"]


def test_bad_filter_is_one_clear_error_with_a_caret(tmp_path, capsys):
    from vhusniff.capture.pcapng import write_capture
    write_capture(tmp_path / "c.pcapng", _records(3))
    assert main(["read", str(tmp_path / "c.pcapng"), "-Y", "request == NOPE"]) == 2
    error = capsys.readouterr().err
    assert "unknown request name" in error and error.rstrip().endswith("^")


def test_colour_only_when_asked_or_on_a_terminal(tmp_path, capsys):
    from vhusniff.capture.pcapng import write_capture
    write_capture(tmp_path / "c.pcapng", _records(3))
    main(["read", str(tmp_path / "c.pcapng")])
    assert "\033[" not in capsys.readouterr().out
    main(["read", str(tmp_path / "c.pcapng"), "--color", "always"])
    assert capsys.readouterr().out.count("\033[0m") == 3


@pytest.mark.parametrize("scapy_import", ["from scapy.utils import rdpcap, PcapNgReader",
                                          "from scapy.all import rdpcap, PcapNgReader",
                                          # scapy.packet imports scapy.utils half-way through scapy.fields
                                          "from scapy.packet import Packet; from scapy.utils import rdpcap, "
                                          "PcapNgReader",
                                          # vhusniff.layers.packets imports scapy while it is itself half-loaded
                                          "import vhusniff.layers.packets; "
                                          "from scapy.utils import rdpcap, PcapNgReader"])
@pytest.mark.parametrize("scapy_first", [False, True])
def test_scapy_reads_captures_after_import_vhusniff(tmp_path, scapy_import, scapy_first):
    from vhusniff.capture.pcapng import write_capture
    write_capture(tmp_path / "c.pcapng", _records(6))
    lines = [scapy_import, "import sys, vhusniff"] if scapy_first else \
        ["import sys, vhusniff", "assert 'scapy' not in sys.modules, 'import vhusniff must stay cheap'", scapy_import]
    script = "\n".join(lines + [
        "from vhusniff.layers.packets import VhostUser",
        f"packets = rdpcap({str(tmp_path / 'c.pcapng')!r})",
        "assert [p[VhostUser].request for p in packets] == [1, 1, 18] * 2, [p.summary() for p in packets]",
        "assert packets[5][VhostUser].payload.index == 1 and packets[1][VhostUser].payload.features == 1 << 32",
        f"assert sum(VhostUser in p for p in PcapNgReader({str(tmp_path / 'c.pcapng')!r})) == 6",
        "assert packets[0].connection == 1 and packets[1].direction == 1"])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr


def test_scapy_keeps_device_state_stream_chunks_raw(tmp_path):
    from scapy.packet import Raw
    from scapy.utils import rdpcap

    import vhusniff  # noqa: F401  (registers the capture layer with scapy)
    from vhusniff.capture.pcapng import write_capture
    from vhusniff.layers.packets import VhostUser
    from vhusniff.model import RecordKind
    chunk = b"\x01\x00\x00\x00" * 8                    # would read as a GET_FEATURES header
    path = tmp_path / "state.pcapng"
    write_capture(path, [Record(1, 1, Channel.DEVICE_STATE, Direction.BACKEND_TO_FRONTEND, chunk, [],
                                RecordKind.MESSAGE, "device-state stream"), _records(1)[0]])
    stream, message = rdpcap(str(path))
    assert not stream.haslayer(VhostUser) and bytes(stream[Raw]) == chunk
    assert message.haslayer(VhostUser)


@pytest.mark.parametrize("name", list(DAMAGE) + ["missing"])
def test_read_expert_and_diff_word_the_same_fault_the_same_way(tmp_path, capsys, name):
    from vhusniff.capture.pcapng import write_capture
    good = tmp_path / "good.pcapng"
    write_capture(good, _records())
    if name == "missing":
        path, expected = str(tmp_path / "missing.pcapng"), f"vhusniff: {tmp_path / 'missing.pcapng'}: " \
                                                           "No such file or directory\n"
    else:
        path, offset, shown = _write(tmp_path, name)
        expected = None
    errors, outputs = {}, {}
    for command in (["read", path], ["read", path, "--expert"], ["expert", path], ["report", path],
                    ["diff", path, str(good)], ["diff", str(good), path]):
        assert main(command) == 2, command
        outputs[" ".join(command)], errors[" ".join(command)] = capsys.readouterr()
    assert len(errors) == 6 and len(set(errors.values())) == 1, errors
    if name != "missing" and shown:              # what came before the damage is shown and analysed
        assert f"Connection 1 (unknown device): {shown} messages" in outputs["report " + path]
        assert "gate-not-negotiated" in outputs["expert " + path]
    if name == "missing":                        # nothing to show but the error: no "0 finding(s)" as if it were read
        assert outputs["expert " + path] == outputs["report " + path] == "", outputs
    error = errors["read " + path]
    if expected is not None:
        assert error == expected
    else:
        assert error.startswith(f"vhusniff: {path}: offset {offset}: ") and error.count("\n") == 1


COMMANDS = (["read"], ["read", "-V"], ["expert"], ["stats"], ["state"], ["report"])


@pytest.mark.parametrize("name", DAMAGE)
def test_every_command_words_the_damage_in_one_line(tmp_path, capsys, name):
    """read, read -V, expert, stats, state and report: exit 2, one line naming the file and the offset, and what
    came before the damage shown (read) or analysed (report)."""
    path, offset, shown = _write(tmp_path, name)
    errors = set()
    for command in COMMANDS:
        status = main([*command, path])
        out, error = capsys.readouterr()
        assert status == 2, (command, out, error)
        assert error.startswith(f"vhusniff: {path}: offset {offset}: ") and error.count("\n") == 1, (command, error)
        errors.add(error)
        if command == ["read"]:
            assert [int(line.split()[0]) for line in out.splitlines()] == list(range(1, shown + 1))
        if command == ["report"] and shown:
            assert f"Connection 1 (unknown device): {shown} messages" in out
    assert len(errors) == 1, errors


def _block_offsets(data: bytes) -> list[int]:
    offsets, position = [], 0
    while position + 8 <= len(data):
        offsets.append(position)
        position += struct.unpack_from("<I", data, position + 4)[0]
    return offsets


SHIPPED = sorted(glob.glob(os.path.join(ROOT, "captures", "*.pcapng")))


_LENGTHS = [struct.pack("<I", n) for n in (0, 12, 16, 20, 24, 28, 0xFFFFFFF0, 0x7FFFFFFC, 0x0A0D0D0A)]


@st.composite
def damaged_captures(draw):
    """A shipped capture with a few random overwrites (anywhere, or on a block length), self-consistent blocks
    inserted (perhaps too short for their type), and perhaps cut short."""
    original = open(draw(st.sampled_from(SHIPPED)), "rb").read()
    damaged = bytearray(original)
    offsets = _block_offsets(original)[2:]      # the packet blocks (damage to the file header stops at once)
    for _ in range(draw(st.integers(1, 3))):
        mutation = draw(st.sampled_from(["bytes", "length", "block"]))
        if mutation == "bytes":
            at = draw(st.integers(0, len(damaged) - 1))
            patch = draw(st.binary(min_size=1, max_size=8))
        elif mutation == "length":
            at, patch = draw(st.sampled_from(offsets)) + 4, draw(st.sampled_from(_LENGTHS))
        else:
            total = draw(st.integers(3, 12)) * 4
            block_type = draw(st.sampled_from([0x0A0D0D0A, 1, 6, 5]))
            at = draw(st.sampled_from(offsets))
            damaged[at:at] = struct.pack("<II", block_type, total) + draw(
                st.binary(min_size=total - 12, max_size=total - 12)) + struct.pack("<I", total)
            continue
        damaged[at:at + len(patch)] = patch
    if draw(st.booleans()):
        del damaged[draw(st.integers(0, len(damaged))):]
    return bytes(damaged)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damaged=damaged_captures())
def test_no_damage_reaches_a_traceback_in_any_command(tmp_path, capsys, damaged):
    """Every command ends with exit 0, or exit 2 and one line naming the file and an offset, never an exception."""
    path = tmp_path / "fuzzed.pcapng"
    path.write_bytes(damaged)
    for command in COMMANDS + (["read", "-T", "json"],):
        status = main([*command, str(path)])
        _out, error = capsys.readouterr()
        assert status in (0, 2), (command, error)
        if status == 2:
            assert re.fullmatch(rf"vhusniff: {re.escape(str(path))}: offset \d+: [^\n]+\n", error), (command, error)


def _limit_address_space():
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))       # 1 GiB: a 4 GiB block cannot be allocated


def huge_section_header() -> tuple[bytes, int]:
    data, offset = _good_part()
    return data + struct.pack("<II", 0x0A0D0D0A, 0xFFFFFFF0) + struct.pack("<IHH", 0x1A2B3C4D, 1, 0) + bytes(64), \
        offset


@pytest.mark.parametrize("make", [huge_block, huge_section_header])
def test_a_huge_block_length_is_checked_against_the_file_before_anything_is_allocated(tmp_path, make):
    data, offset = make()
    path = tmp_path / "huge.pcapng"
    path.write_bytes(data)
    for command in COMMANDS:
        result = subprocess.run([sys.executable, "-m", "vhusniff.cli.main", *command, str(path)], capture_output=True,
                                text=True, cwd=ROOT, timeout=60, preexec_fn=_limit_address_space)
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.startswith(f"vhusniff: {path}: offset {offset}: truncated ") and \
            result.stderr.count("\n") == 1, (command, result.stderr)


def test_json_output_describes_each_fd(capsys):
    """-T json on a real capture whose messages carry fds (FdInfo is a named tuple: it has no __dict__)."""
    assert main(["read", os.path.join(ROOT, "captures", "qemu-blk-boot.pcapng"), "-T", "json"]) == 0
    frames = json.loads(capsys.readouterr().out)
    fds = [fd for frame in frames for fd in frame["fds"]]
    assert fds and {fd["kind"] for fd in fds} >= {"eventfd", "memfd"}
    assert all(set(fd) == {"kind", "inode", "size", "name", "seals"} for fd in fds)


@pytest.mark.parametrize("kind", sorted(COMPILED_KINDS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_each_compiled_payload_summary_words_a_payload_as_the_grammar_does(kind, data):
    """read's per-request formatters against grammar.payload_summary, on values drawn from the grammar itself."""
    from grammar_values import struct_values
    from vhusniff.protocol import catalogue as cat
    from vhusniff.protocol.grammar import PAYLOADS, DecodeContext, Message, encode_payload, payload_summary
    structure = PAYLOADS[kind][0]
    payload = structure.parse(encode_payload(kind, data.draw(struct_values(structure))))
    context = DecodeContext(device_type=data.draw(st.sampled_from((None, "blk", "net"))))
    raw = struct.pack("<III", 1, cat.VERSION, structure.sizeof()) + encode_payload(kind, payload)
    message = Message(raw, Channel.MAIN, 1, cat.VERSION, structure.sizeof(), kind, payload, (), context)
    summary = compile_payload_summary(kind, context)
    assert summary is not None and summary(b"padding!" + raw, 8 + 12) == payload_summary(message)


@pytest.mark.parametrize("options", [[], ["-V"], ["-x"], ["-V", "-x"]])
def test_distinct_messages_read_the_same_through_the_compiled_lines_and_the_general_path(tmp_path, capsys,
                                                                                        options):
    """Every line (and field tree, and hex dump) of a distinct-message capture (vIOMMU traffic, config windows,
    fds, events), both ways."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from distinct_sessions import build_distinct_capture
    path = str(tmp_path / "distinct.pcapng")
    build_distinct_capture(path, 3000)
    main(["read", path, *options])
    fast = capsys.readouterr().out
    general = "".join(record_line(number, relative, record, message) + "\n" +
                      record_detail(record, message, "-V" in options, "-x" in options)
                      for number, relative, record, message in general_messages(path, ContextTracker()))
    assert fast == general and len(fast.splitlines()) > 3000
    assert "IOTLB_MSG" in fast and "GET_CONFIG reply" in fast and "capacity=" in fast
    assert ("iotlb.iova: 0x" in fast) == ("-V" in options)


@pytest.mark.parametrize("text", [
    "request == SET_VRING_ADDR && vring.index == 1", "iotlb.iova > 0x10000000000 && iotlb.type == 2",
    "flags.need_reply", "config.blk.capacity", "config.size == 24", "connection == 2 || event", "vring.flags.nofd == 0",
    "features & ACCESS_PLATFORM", 'name contains "CONFIG"', "frame.number in {1..100}", "!iotlb", "vring.reserved",
    "mem.region && mem.region.memory_size > 0", "fds > 0 || iotlb.perm == 2",
    "request in {22 24} && !(direction == B>F)",
])
def test_filtered_lines_of_distinct_messages_match_the_general_path(tmp_path, text):
    """read -Y's fast path (fields read straight from the bytes, only those the filter names) against the
    general path's decode and matching, line for line and in the count of hidden events."""
    import io
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from distinct_sessions import build_distinct_capture
    path = str(tmp_path / "distinct.pcapng")
    build_distinct_capture(path, 1500)
    display_filter = compile_filter(text)
    fast = io.StringIO()
    _shown, hidden = fast_lines(path, ContextTracker(), fast, display_filter=display_filter)
    general, general_hidden = [], 0
    for number, relative, record, message in general_messages(path, ContextTracker()):
        if display_filter.matches(message, record, number):
            general.append(record_line(number, relative, record, message) + "\n")
        else:
            general_hidden += record.kind == RecordKind.EVENT
    assert fast.getvalue() == "".join(general) and general and hidden == general_hidden
