"""The Wireshark dissector: generated from the grammar, and field-for-field equal to vhusniff's own decoding
when real tshark runs it on our captures."""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest

from peers import kit  # noqa: F401  (the real-QEMU guest kit fixture)
from vhusniff.analysis.analyzer import Analyzer
from vhusniff.analysis.expert import CHECKS, PROBLEM_CHECKS
from vhusniff.capture.pcapng import CaptureWriter, read_capture, write_capture
from vhusniff.model import Channel, Direction, EventKind, FdInfo, Record, RecordKind
from vhusniff.protocol import catalogue as cat
from vhusniff.protocol import config as config_space
from vhusniff.protocol.context import ContextTracker
from vhusniff.protocol.grammar import PAYLOADS, DecodeContext, build_message, iter_fields, payload_candidates
from vhusniff.views.filters import RECORD_FIELDS, grammar_fields, walk_layout
from vhusniff.views.lua import DISSECTOR_PATH, grammar_tables, render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TSHARK = shutil.which("tshark")
# Outside CI a missing tshark skips; in CI (CI=true) it must be there, so the tests run and fail without it.
needs_tshark = pytest.mark.skipif(TSHARK is None and os.environ.get("CI", "").lower() != "true",
                                  reason="tshark is not installed")
# Fields the dissector adds beside the grammar's; they are compared too where vhusniff has the same notion.
COMPARED_RECORD_FIELDS = ("name", "kind", "problem", "connection", "source_tag", "channel", "direction", "fds",
                          "fd.kind")


def run_tshark(path: str, *arguments: str, timeout: int = 120, sources: bool | None = None,
               errors: str = "strict") -> subprocess.CompletedProcess:
    """Real tshark reading `path` with the checked-in dissector; `sources`: VHUSNIFF_SOURCES set to 1 or cleared
    (None: as the environment has it)."""
    environment = None if sources is None else dict(os.environ, VHUSNIFF_SOURCES="1" if sources else "")
    return subprocess.run([TSHARK, "-X", f"lua_script:{DISSECTOR_PATH}", "-r", path, *arguments],
                          capture_output=True, text=True, errors=errors, timeout=timeout, env=environment)


def test_checked_in_dissector_is_the_generator_output():
    with open(DISSECTOR_PATH) as checked_in:
        assert checked_in.read() == render(), "stale: run `python3 -m vhusniff.views.lua > dissectors/vhost_user.lua`"


def test_every_grammar_field_is_a_lua_field():
    text = render()
    for name in [*grammar_fields(), *config_space.FIELD_BY_NAME]:
        assert f'["{name}"] = {{\n' in text, name


def test_every_field_has_a_human_label_from_the_catalogue():
    """Wireshark shows labels ("Guest physical address"); a field whose label is still its raw name (a word the
    catalogue does not spell out, a missing FIELD_LABELS entry) fails here."""
    tables = grammar_tables()
    for table in ("FIELDS", "BYTE_FIELDS", "RECORD_FIELDS"):
        for name, spec in tables[table].items():
            label = spec["label"]
            assert label == cat.field_label(name), name
            assert label[:1].isupper() and "_" not in label and label != name, (name, label)
    assert cat.field_label("mem.region.guest_phys_addr") == "Guest physical address"


@needs_tshark
def test_tshark_shows_the_blk_boot_disk_as_vhusniff_does():
    """The lab disk is 64 MiB: 131072 sectors, one queue, in the GET_CONFIG reply of the shipped boot capture."""
    capture = os.path.join(ROOT, "captures", "qemu-blk-boot.pcapng")
    result = run_tshark(capture, "-Y", "vhost_user.config.blk.capacity", "-T", "fields",
                        "-e", "vhost_user.config.blk.capacity",
                        "-e", "vhost_user.config.blk.num_queues", "-e", "vhost_user.config.blk.blk_size", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["131072", "1", "512"]


# --- captures built from the grammar ---------------------------------------------------------------------------

def sample_value(entries: list[dict], seed: int) -> dict:
    """A distinctive value for a payload layout: every integer different, sizes and counts consistent."""
    value: dict = {}
    for position, entry in enumerate(entries):
        salt = seed * 31 + position * 7 + 3
        if "fields" in entry:
            count = value.get(entry.get("count_from"), None)
            elements = [sample_value(entry["fields"], salt + i) for i in range(count or 1)]
            value[entry["short"]] = elements if count is not None else elements[0]
        elif "width" in entry:
            mask = (1 << (8 * entry["width"])) - 1
            if entry["short"] == "nregions":
                number = 2
            elif entry["short"] == "size" and any(e.get("bytes_from") == "size" for e in entries):
                number = 5
            else:
                number = (0x0123456789ABCDEF * salt) & mask
            value[entry["short"]] = [number + i for i in range(entry["count"])] if "count" in entry else number
        elif "bytes" in entry:
            value[entry["short"]] = bytes((salt + i) & 0xFF for i in range(entry["bytes"]))
        elif "bytes_from" in entry:
            value[entry["short"]] = bytes(range(value[entry["bytes_from"]]))
        else:
            value[entry["short"]] = b"opaque" * (seed % 3)
    return value


def grammar_records() -> list[Record]:
    """Every request and reply kind of every channel, plus malformed messages and context-dependent kinds."""
    records: list[Record] = []
    time = [1_700_000_000_000_000_000]

    def add(data, channel=Channel.MAIN, direction=Direction.FRONTEND_TO_BACKEND, fds=(), connection=1, note=""):
        time[0] += 1500
        records.append(Record(time[0], connection, channel, direction, data, list(fds), RecordKind.MESSAGE, note))

    seed = 0
    tables = {Channel.MAIN: cat.FRONTEND_REQUESTS, Channel.BACKEND: cat.BACKEND_REQUESTS, Channel.GPU: cat.GPU_REQUESTS}
    for channel, table in tables.items():
        for request in table:
            for is_reply in (False, True):
                sender = Direction.FRONTEND_TO_BACKEND if (channel == Channel.MAIN) != is_reply \
                    else Direction.BACKEND_TO_FRONTEND
                for kind in payload_candidates(channel, request, is_reply, DecodeContext()):
                    seed += 1
                    structure, prefix, _doc = PAYLOADS[kind]
                    payload = sample_value(walk_layout(structure, prefix, kind), seed)
                    fds = [FdInfo("memfd", 100 + seed, 4096, f"mem{seed}", 3)] if seed % 5 == 0 else []
                    add(build_message(channel, request, payload, reply=is_reply, need_reply=seed % 4 == 0,
                                      kind=kind), channel, sender, fds, connection=1 + seed % 3)
    header = struct.Struct("<III")
    # Malformed: each problem code of protocol.decode at least once.
    add(header.pack(1, 0x11, 0))                                   # reserved flag bit
    add(header.pack(1, 0x2, 0))                                    # bad version
    add(header.pack(2, 0x1, 0x2000) + bytes(8))                    # oversize and size mismatch
    add(header.pack(9, 0x1, 12) + bytes(12))                       # payload fits no layout
    add(header.pack(99, 0x1, 3) + b"abc")                          # unknown request
    add(header.pack(5, 0x1, 0))                                    # SET_MEM_TABLE with no table
    add(b"\x01\x00\x00")                                           # truncated header
    add(header.pack(7, 0x1, 0), channel=Channel.DEVICE_STATE)      # a channel with no request table
    # Negotiated context: Xen regions and packed-ring bases (connection 9).
    region_xen = sample_value(walk_layout(PAYLOADS["mem_table_xen"][0], "mem", "mem_table_xen"), 77)
    add(build_message(Channel.MAIN, 16, dict(protocol_features=1 << 17 | 1 << 3)), connection=9)
    add(build_message(Channel.MAIN, 5, region_xen, kind="mem_table_xen"), connection=9)
    add(build_message(Channel.MAIN, 2, dict(features=1 << 34 | 1 << 32)), connection=9)
    add(build_message(Channel.MAIN, 11, dict(index=1, num=0x8001_8002), reply=True, kind="vring_base_packed"),
        Direction.BACKEND_TO_FRONTEND, connection=9)
    # Device config space, per device type (connections 20 on): a whole GET_CONFIG reply, a SET_CONFIG of a few
    # fields, and a partial read that covers only some fields whole.
    for connection, (device, size) in enumerate(sorted(config_space.CONFIG_SIZE.items()), start=20):
        time[0] += 1500
        records.append(Record(time[0], connection, kind=RecordKind.EVENT, note=device, event=EventKind.DEVICE))
        space = bytes((7 * i + 1) & 0xFF for i in range(size + 16))      # windows may run past the layout
        for request, offset, length, reply in ((24, 0, size, True), (25, 4, 12, False), (24, 3, 7, True)):
            add(build_message(Channel.MAIN, request, dict(offset=offset, size=length, flags=0,
                                                          data=space[offset:offset + length]),
                              reply=reply, kind="config"),
                direction=Direction.BACKEND_TO_FRONTEND if reply else Direction.FRONTEND_TO_BACKEND,
                connection=connection)
    records.append(Record(time[0] + 1, 9, kind=RecordKind.EVENT, note="disconnected"))
    return records


@pytest.fixture(scope="module")
def grammar_capture(tmp_path_factory):
    path = tmp_path_factory.mktemp("dissector") / "grammar.pcapng"
    write_capture(path, grammar_records())
    return str(path)


# --- running tshark and comparing ------------------------------------------------------------------------------

def _pairs_hook(pairs):
    return pairs          # keep duplicate keys (a repeated field) in order


def tshark_frames(path: str, two_pass: bool = False) -> list[list[tuple[str, object]]]:
    """Per frame, the vhost_user layer flattened to (name without prefix, value) pairs in tree order."""
    result = run_tshark(path, "-T", "json", *(["-2"] if two_pass else []))
    assert result.returncode == 0, result.stderr
    assert "Lua: Error" not in result.stderr and "Lua Error" not in result.stdout, result.stderr
    packets = json.loads(result.stdout, object_pairs_hook=_pairs_hook)
    frames = []
    for packet in packets:
        layers = dict(dict(packet)["_source"])["layers"]
        layer = dict(layers).get("vhost_user", [])
        flat: list[tuple[str, object]] = []
        _flatten(layer, flat)
        frames.append(flat)
    return frames


def _flatten(pairs, out):
    for key, value in pairs:
        if isinstance(value, list):           # a subtree (`x_tree`, or a text-only item with children)
            _flatten(value, out)
        elif key.startswith("vhost_user."):
            out.append((key[len("vhost_user."):], value))


def _as_python(name: str, text: str):
    config_field = config_space.FIELD_BY_NAME.get(name)
    if config_field is not None and config_field.is_bytes:
        return bytes.fromhex(text.replace(":", ""))
    spec = grammar_fields().get(name)
    # tshark shows bytes as aa:bb:cc; a name that is bytes in one kind and an integer in another has no
    # one-byte bytes form in the grammar, so the colon decides.
    if spec is not None and spec.is_bytes and (not spec.width or ":" in text or text == ""):
        return bytes.fromhex(text.replace(":", ""))
    try:
        return int(text, 0)
    except ValueError:
        return text


def vhusniff_fields(record: Record, message) -> list[tuple[str, object]]:
    fields = []
    for name, value in iter_fields(message):
        for item in value if isinstance(value, list) else [value]:
            fields.append((name, item))
    fields += [("name", message.name)] + ([("kind", message.kind)] if message.kind else [])
    fields += [("problem", p.code) for p in message.problems]
    for name in ("connection", "source_tag", "channel", "direction", "fds", "fd.kind"):
        fields += [(name, v) for v in RECORD_FIELDS[name].value(message, record, 0)]
    return fields


def compare_capture(path: str) -> int:
    """Assert tshark and vhusniff agree on every message of a capture; returns how many were compared."""
    frames = tshark_frames(path)
    tracker = ContextTracker()
    compared = 0
    records = list(read_capture(path))
    assert len(frames) == len(records)
    for number, (record, flat) in enumerate(zip(records, frames, strict=False), start=1):
        message = tracker.decode(record)
        if message is None:
            continue
        expected = vhusniff_fields(record, message)
        if message.request < 0:     # a truncated header: vhusniff says request -1; compare what both say
            expected = [(n, v) for n, v in expected if n in COMPARED_RECORD_FIELDS]
        wanted = {name for name, _ in expected} | set(COMPARED_RECORD_FIELDS) | set(grammar_fields())
        got = [(name, _as_python(name, value)) for name, value in flat if name in wanted]
        if message.request < 0:
            got = [(n, v) for n, v in got if n in COMPARED_RECORD_FIELDS]
        assert sorted(got, key=repr) == sorted(expected, key=repr), \
            f"{path} frame {number} ({message.summary()}):\n tshark   {got}\n vhusniff {expected}"
        compared += 1
    return compared


@needs_tshark
def test_tshark_agrees_with_vhusniff_on_every_grammar_message(grammar_capture):
    compared = compare_capture(grammar_capture)
    assert compared == len([r for r in grammar_records() if r.kind == RecordKind.MESSAGE])


@needs_tshark
def test_every_payload_kind_and_problem_appears_in_the_grammar_capture(grammar_capture):
    frames = tshark_frames(grammar_capture)
    kinds = {value for flat in frames for name, value in flat if name == "kind"}
    problems = {value for flat in frames for name, value in flat if name == "problem"}
    assert kinds >= set(PAYLOADS) - {"empty"}
    assert problems == {"truncated-header", "reserved-flags", "bad-version", "oversize", "size-mismatch",
                        "unknown-request", "payload-layout"}


# Wireshark's expert severities (epan/proto.h PI_CHAT .. PI_ERROR), as tshark writes _ws.expert.severity.
WIRESHARK_SEVERITY = {0x00200000: "chat", 0x00400000: "note", 0x00600000: "warn", 0x00800000: "error"}


def tshark_expert_items(path: str) -> list[list[tuple[str, str]]]:
    """Per frame, the dissector's expert items as (code, severity), from real tshark."""
    result = run_tshark(path, "-T", "json")
    assert result.returncode == 0, result.stderr

    def walk(pairs, out):
        for key, value in pairs:
            if key == "_ws.expert":
                item = dict(value)
                code = next(k for k in item if k.startswith("vhost_user.expert."))[len("vhost_user.expert."):]
                out.append((code, WIRESHARK_SEVERITY[int(item["_ws.expert.severity"])]))
            elif isinstance(value, list):
                walk(value, out)
        return out

    return [walk(packet, []) for packet in json.loads(result.stdout, object_pairs_hook=_pairs_hook)]


@needs_tshark
def test_tshark_expert_severities_are_the_expert_checks(grammar_capture):
    """Each decoder problem has one severity: its expert check's, in vhusniff and in Wireshark alike."""
    frames = tshark_expert_items(grammar_capture)
    analyzer = Analyzer()
    for number, record in enumerate(read_capture(grammar_capture), start=1):
        analyzer.feed(record, number=number)
    from_problems = {}
    for finding in analyzer.findings:
        if finding.check in PROBLEM_CHECKS.values():
            from_problems.setdefault(finding.number, []).append(str(finding.severity))
    for number, items in enumerate(frames, start=1):
        for code, severity in items:
            assert severity == str(CHECKS[PROBLEM_CHECKS[code]].severity), (number, code)
        assert sorted(severity for _code, severity in items) == sorted(from_problems.get(number, [])), number
    seen = {code: severity for items in frames for code, severity in items}
    assert set(seen) == set(PROBLEM_CHECKS)
    assert seen["unknown-request"] == "warn" and seen["payload-layout"] == "error"


@needs_tshark
def test_requests_and_replies_link_both_ways_with_the_response_time(tmp_path):
    F, B = Direction.FRONTEND_TO_BACKEND, Direction.BACKEND_TO_FRONTEND
    u64_reply = lambda request: struct.pack("<IIIQ", request, 5, 8, 0)
    session = [  # (connection, channel, direction, bytes, microseconds): two connections interleaved
        (1, Channel.MAIN, F, build_message(Channel.MAIN, 1), 0),                 # 1 -> 4
        (2, Channel.MAIN, F, build_message(Channel.MAIN, 1), 10),                # 2 -> 3
        (2, Channel.MAIN, B, u64_reply(1), 25),
        (1, Channel.MAIN, B, u64_reply(1), 100),
        (1, Channel.MAIN, F, build_message(Channel.MAIN, 3), 110),               # 5: no reply asked
        (1, Channel.MAIN, F, build_message(Channel.MAIN, 15), 120),              # 6 -> 8
        (1, Channel.BACKEND, B, build_message(Channel.BACKEND, 2, need_reply=True), 130),  # 7 -> 9
        (1, Channel.MAIN, B, u64_reply(15), 140),
        (1, Channel.BACKEND, F, u64_reply(2), 150),
    ]
    write_capture(tmp_path / "links.pcapng", [Record(1_000_000_000 + us * 1000, c, ch, d, data)
                                              for c, ch, d, data, us in session])
    frames = [dict(flat) for flat in tshark_frames(str(tmp_path / "links.pcapng"), two_pass=True)]
    links = {n: int(f["response_in"]) for n, f in enumerate(frames, start=1) if "response_in" in f}
    assert links == {1: 4, 2: 3, 6: 8, 7: 9}
    for request_frame, reply_frame in links.items():
        assert int(frames[reply_frame - 1]["response_to"]) == request_frame
    assert float(frames[3]["response_time"]) == pytest.approx(100e-6)
    assert float(frames[2]["response_time"]) == pytest.approx(15e-6)


@needs_tshark
@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "captures", "*.pcapng"))) or
                         [pytest.param(None, marks=pytest.mark.skip(reason="no shipped captures yet"))])
def test_tshark_agrees_with_vhusniff_on_shipped_captures(path):
    assert compare_capture(path) > 0


@needs_tshark
def test_unknown_pseudo_header_version_is_an_expert_item_not_a_crash(tmp_path):
    from vhusniff.capture.pcapng import enhanced_packet_block, file_header
    block = bytearray(enhanced_packet_block(Record(1, 1, data=build_message(Channel.MAIN, 1))))
    block[28 + 4] = 7                 # pseudo-header version 7 (EPB body starts at 8, packet data at 28)
    path = tmp_path / "v7.pcapng"
    path.write_bytes(file_header() + bytes(block))
    flat = tshark_frames(str(path))[0]
    assert ("problem", "capture") in flat and ("pseudo.version", "7") in flat


@needs_tshark
def test_tshark_agrees_with_vhusniff_on_a_freshly_recorded_qemu_boot(tmp_path, kit):
    from peers import require
    from vhusniff.lab.command import record_boot
    require("qemu-storage-daemon")
    _result, capture = record_boot(tmp_path, "blk")
    assert compare_capture(str(capture)) >= 40          # QEMU 7.2 + qemu-storage-daemon: 44 messages or more


@needs_tshark
@pytest.mark.parametrize("name_length", [4, 60, 252])
def test_an_fd_name_length_past_the_packet_is_an_expert_item_not_a_lua_error(tmp_path, name_length):
    """The name length of an fd description runs past the pseudo-header (4) and past the packet (60, 252):
    tshark shows the frame with the problem as expert info, as vhusniff names it, and no Lua error."""
    from vhusniff.capture.pcapng import PSEUDO_HEADER, enhanced_packet_block, file_header
    record = Record(1, 1, data=build_message(Channel.MAIN, 3), fds=[FdInfo("memfd", 7, 4096, "mem", 0)])
    block = bytearray(enhanced_packet_block(record))
    name_length_at = 28 + PSEUDO_HEADER.size + 1           # packet data starts at byte 28 of the EPB
    assert block[name_length_at] == len("mem")
    block[name_length_at] = len("mem") + name_length
    path = tmp_path / "fd-name.pcapng"
    path.write_bytes(file_header() + bytes(block) + enhanced_packet_block(Record(2, 1, data=build_message(
        Channel.MAIN, 1))))
    frames = tshark_frames(str(path))
    assert ("problem", "capture") in frames[0] and ("name", "GET_FEATURES") in frames[1]
    assert tshark_expert_items(str(path)) == [[("capture", "error")], []]
    result = run_tshark(str(path), "-V", timeout=60)
    reason = f"fd name of {len('mem') + name_length} bytes runs past the pseudo-header"
    assert reason in result.stdout and "Lua Error" not in result.stdout, result.stdout
    with pytest.raises(Exception, match=reason):      # vhusniff's reader says the same of the same record
        list(read_capture(path))


# --- feature names: the dissector and `vhusniff read` follow the same context rules ---------------------------

_READ_FEATURES = re.compile(r"(?<![\w.])(features|protocol_features)=0x([0-9a-f]+)(?:\(([^)]*)\))?")
_BIT_SET_FIELDS = ("features", "protocol_features")


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(text.split("|")) if text and text != "0" else ()


def read_feature_names(path: str) -> dict[int, list[tuple[str, int, tuple[str, ...]]]]:
    """Frame number -> (field, value, bit names in bit order) for each bit-set field `vhusniff read` prints."""
    result = subprocess.run([sys.executable, "-m", "vhusniff.cli.main", "read", path], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    frames = {}
    for line in result.stdout.splitlines():
        found = [(field, int(value, 16), _names(names)) for field, value, names in _READ_FEATURES.findall(line)]
        if found:
            frames[int(line.split()[0])] = found
    return frames


def tshark_feature_names(path: str, two_pass: bool = False) -> dict[int, list[tuple[str, int, tuple[str, ...], bool]]]:
    """The same, from the names the dissector appends to each item in real tshark, and whether Wireshark cut the
    item's label short (it keeps 240 characters): then the last name shown may be partial."""
    import xml.etree.ElementTree as ElementTree
    result = run_tshark(path, "-T", "pdml", *(["-2"] if two_pass else []))
    assert result.returncode == 0 and "Lua Error" not in result.stdout, result.stderr
    frames = {}
    for number, packet in enumerate(ElementTree.fromstring(result.stdout).iter("packet"), start=1):
        found = []
        for item in packet.iter("field"):
            field = item.get("name", "").removeprefix("vhost_user.")
            if field in _BIT_SET_FIELDS and item.get("name").startswith("vhost_user."):
                label = re.fullmatch(r"[^:]+: 0x[0-9a-f]+ \(([^)]*)(\)?)", item.get("showname"))
                assert label, item.get("showname")
                found.append((field, int(item.get("show"), 16), _names(label.group(1)), not label.group(2)))
        if found:
            frames[number] = found
    return frames


def net_set_mtu_session(path: str) -> None:
    """Connection 1 names no device until NET_SET_MTU says net; connection 2 is noted blk, and its NET_SET_MTU
    must not change that. The feature bits mean different things for net, blk and an unknown device (and both
    net and blk define them, so the offer alone tells neither)."""
    features = 1 << 0 | 1 << 5 | 1 << 12 | 1 << 30 | 1 << 32
    F, B = Direction.FRONTEND_TO_BACKEND, Direction.BACKEND_TO_FRONTEND
    main = Channel.MAIN
    with CaptureWriter(path) as writer:
        time = iter(range(1_000_000, 10**9, 1000))
        writer.write(Record(next(time), 2, kind=RecordKind.EVENT, note="connected", event=EventKind.CONNECTED))
        writer.write(Record(next(time), 2, kind=RecordKind.EVENT, note="blk", event=EventKind.DEVICE))
        for connection in (1, 2):
            for direction, data in (
                    (F, build_message(main, 1)),
                    (B, build_message(main, 1, dict(features=features), reply=True)),
                    (F, build_message(main, 20, dict(mtu=1500))),
                    (F, build_message(main, 2, dict(features=features))),
                    (F, build_message(main, 1)),
                    (B, build_message(main, 1, dict(features=features), reply=True))):
                writer.write(Record(next(time), connection, main, direction, data))


def blk_without_device_session(path: str) -> None:
    """The shipped blk boot with nothing that states the device: only its GET_CONFIG reply's size tells blk."""
    with CaptureWriter(path) as writer:
        for record in read_capture(os.path.join(ROOT, "captures", "qemu-blk-boot.pcapng")):
            if record.kind == RecordKind.EVENT:
                record.note, record.device = record.note.replace(", device=blk", ""), ""
            writer.write(record)


SHIPPED_CAPTURES = sorted(glob.glob(os.path.join(ROOT, "captures", "*.pcapng")))


@needs_tshark
@pytest.mark.parametrize("path", SHIPPED_CAPTURES + ["net-set-mtu", "blk-inferred"])
def test_tshark_and_read_name_every_feature_bit_alike(tmp_path, path):
    if path == "net-set-mtu":
        path = str(tmp_path / "net-set-mtu.pcapng")
        net_set_mtu_session(path)
    elif path == "blk-inferred":
        path = str(tmp_path / "blk-inferred.pcapng")
        blk_without_device_session(path)
    from_read, from_tshark = read_feature_names(path), tshark_feature_names(path)
    assert from_read.keys() == from_tshark.keys()
    for number, items in from_tshark.items():
        assert len(items) == len(from_read[number]), number
        for (field, value, names, cut), (read_field, read_value, read_names) in zip(items, from_read[number],
                                                                                  strict=True):
            assert (field, value) == (read_field, read_value), number
            if cut:         # the names Wireshark shows whole are the first ones vhusniff names, in the same order
                assert names[:-1] == read_names[:len(names) - 1] and read_names[len(names) - 1].startswith(
                    names[-1]), (number, names, read_names)
            else:
                assert names == read_names, (number, field, names, read_names)
    assert any(field == "features" for items in from_read.values() for field, _value, _names in items)
    if path.endswith("net-set-mtu.pcapng"):      # the session does tell the three namings apart
        names = {number: found[0][2] for number, found in from_read.items()}
        # (after connection 2's two events: connected, and its DEVICE event that says blk)
        assert "bit5" in names[4] and "MAC" in names[6] and "MAC" in names[8], names     # unknown, then net
        assert "RO" in names[10] and "RO" in names[12] and "RO" in names[14], names      # blk throughout
    if path.endswith("blk-inferred.pcapng"):     # unknown until GET_CONFIG's size says blk, then blk's names
        acked = [found[0][2] for number, found in sorted(from_read.items()) if found[0][0] == "features"][-1]
        assert "SEG_MAX" in acked, acked


@needs_tshark
def test_a_second_pass_decodes_each_frame_in_the_context_it_had_on_the_first(tmp_path):
    """tshark -2 dissects every frame again after the whole file: the device type and negotiated bits then known
    must not leak back into frames that came before them (the dissector keeps each connection's changes by frame)."""
    path = str(tmp_path / "net-set-mtu.pcapng")
    net_set_mtu_session(path)
    once = tshark_feature_names(path)
    assert tshark_feature_names(path, two_pass=True) == once
    assert "bit5" in once[4][0][2] and "MAC" in once[8][0][2]     # unknown before NET_SET_MTU, net after it


@needs_tshark
def test_tshark_shows_the_event_kind_of_version_1_and_version_2_captures(tmp_path):
    data = os.path.join(os.path.dirname(__file__), "data")
    v1 = [dict(frame).get("event") for frame in tshark_frames(os.path.join(data, "v1-events.pcapng"))]
    assert v1 == ["CONNECTED", None, None, "CHANNEL_OPENED", "CHANNEL_CLOSED", None, "CLOSED", "CONNECTED", "NOTE",
                  None, "CLOSED"]
    path = str(tmp_path / "v2.pcapng")
    write_capture(path, [Record(1 + kind, 1, kind=RecordKind.EVENT, note="closed", event=kind) for kind in EventKind])
    assert [dict(frame).get("event") for frame in tshark_frames(path)] == [kind.name for kind in EventKind]


# --- the Info column and the tree's labels ---------------------------------------------------------------------

def read_lines(path: str) -> dict[int, str]:
    """Frame number -> `vhusniff read`'s line without its number and time, blanks collapsed (read pads columns)."""
    result = subprocess.run([sys.executable, "-m", "vhusniff.cli.main", "read", path], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    return {int(line.split()[0]): " ".join(line.split()[2:]) for line in result.stdout.splitlines()}


def tshark_info(path: str, tree: bool, sources: bool = False) -> dict[int, str]:
    """Frame number -> the Info column, blanks collapsed: without a tree (the packet list, as plain `tshark -r`
    reads) or with one (-T fields builds it)."""
    if tree:
        command = ["-T", "fields", "-e", "frame.number", "-e", "_ws.col.Info"]
    else:
        command = ["-o", 'gui.column.format:"No.","%m","Info","%i"']
    result = run_tshark(path, *command, sources=sources, errors="replace")
    assert result.returncode == 0 and "Lua Error" not in result.stdout, result.stderr
    return {int(line.split()[0]): " ".join(line.split()[1:]) for line in result.stdout.splitlines() if line.strip()}


# Wireshark keeps 4,096 bytes of a column: a longer line (a SHMEM config of 256 sizes) is compared up to there.
INFO_COLUMN_KEPT = 4000


@needs_tshark
@pytest.mark.parametrize("path", SHIPPED_CAPTURES + ["grammar"])
def test_info_column_is_the_line_vhusniff_read_prints(path, grammar_capture):
    """Info matches `read`'s line field for field (payload summaries of every kind, GPU ones too, fds as
    eventfd-id:N, problems with their text), with a tree and without one (the fast path)."""
    if path == "grammar":
        path = grammar_capture
    expected = read_lines(path)
    without_tree, with_tree = tshark_info(path, tree=False), tshark_info(path, tree=True)
    assert without_tree.keys() == with_tree.keys() == expected.keys()
    for number, line in expected.items():
        assert without_tree[number] == with_tree[number], number
        shown = without_tree[number]
        if len(shown) >= INFO_COLUMN_KEPT:
            assert line.startswith(shown[:INFO_COLUMN_KEPT - 100]), number
        else:
            assert shown == line, f"frame {number}:\n tshark {shown}\n read   {line}"


@needs_tshark
def test_info_column_names_each_eventfd_by_its_kernel_id(tmp_path):
    path = str(tmp_path / "eventfds.pcapng")
    vring = dict(index=0, flags=0, reserved=0)
    write_capture(path, [Record(1000, 1, data=build_message(Channel.MAIN, 13, vring),       # SET_VRING_CALL
                                fds=[FdInfo("eventfd", 9, 0, "eventfd-id:17", 0)]),
                         Record(2000, 1, data=build_message(Channel.MAIN, 12, vring),       # SET_VRING_KICK
                                fds=[FdInfo("eventfd", 9, 0, "", 0)])])       # an older kernel says no id
    info = tshark_info(path, tree=False)
    assert info[1].endswith("fds=eventfd-id:17") and info[2].endswith("fds=eventfd"), info
    assert info == read_lines(path)


@needs_tshark
def test_the_tree_shows_human_labels_and_filters_keep_the_dotted_names():
    capture = os.path.join(ROOT, "captures", "qemu-blk-boot.pcapng")
    result = run_tshark(capture, "-V",
                        "-Y", "vhost_user.mem.region.guest_phys_addr == 0 && vhost_user.name == \"ADD_MEM_REG\"",
                        timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Guest physical address: 0x0000000000000000" in result.stdout
    assert "Front-end virtual address: 0x00007fa0dffff000" in result.stdout
    assert "Need reply: 1" in result.stdout and "Memory region 0" in result.stdout
    assert "guest_phys_addr" not in result.stdout


def merged_capture(tmp_path, tagged: bool = True) -> str:
    """mergecap of two hosts' captures, each with connections 1 and 2, interleaved in time. Untagged: as an older
    vhusniff wrote them, the source in the interface description only (every pseudo-header's tag 0)."""
    paths = []
    for index, host in enumerate(("host-a", "host-b")):
        path = str(tmp_path / f"{host}.pcapng")
        with CaptureWriter(path, source=f"host={host} pid=7 start=2026-01-01T00:00:00Z") as writer:
            if not tagged:
                writer.tag = 0
            for connection in (1, 2):
                start = 1_000_000 + 500 * index + 10_000 * connection
                writer.write(Record(start, connection, kind=RecordKind.EVENT, event=EventKind.CONNECTED,
                                    note="connected"))
                writer.write(Record(start + 1000, connection, data=build_message(Channel.MAIN, 1)))
                writer.write(Record(start + 2000, connection, direction=Direction.BACKEND_TO_FRONTEND,
                                    data=build_message(Channel.MAIN, 1, dict(features=1 << 32), reply=True)))
        paths.append(path)
    merged = str(tmp_path / "merged.pcapng")
    subprocess.run(["mergecap", "-w", merged, *paths], check=True, capture_output=True, timeout=60)
    return merged


def assert_two_passes_number_and_link_as_read(merged: str, expected: dict[int, str], sources: bool) -> None:
    """tshark -2 numbers the merged capture's connections as `vhusniff read` (`expected`: its lines) and links each
    reply to its request two frames before. Its first pass has no fields, so the second one does that pass's work."""
    result = run_tshark(merged, "-2", "-T", "fields", "-e", "vhost_user.connection", "-e", "vhost_user.response_to",
                        timeout=60, sources=sources)
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert [int(connection) for connection, _request in rows] == [int(expected[number].split()[0][1:])
                                                                  for number in sorted(expected)]
    linked = {number: int(request) for number, (_connection, request) in enumerate(rows, start=1) if request}
    assert linked == {number: number - 2 for number, line in expected.items() if " reply " in line}


@needs_tshark
@pytest.mark.parametrize("tagged", [True, False], ids=["tagged", "untagged"])
def test_a_merged_capture_reads_in_tshark_as_the_connections_read_shows(tmp_path, tagged):
    """Told about capture sources (as the Wireshark GUI always is), the dissector keys connections by source and
    number and numbers them as `vhusniff read` does: host-a's 1, host-b's 1 (shown 2), host-a's 2 (3), ...
    Tagged or not, the interface's source decides."""
    merged = merged_capture(tmp_path, tagged)
    expected = read_lines(merged)
    assert sorted({line.split()[0] for line in expected.values()}) == ["c1", "c2", "c3", "c4"]
    assert tshark_info(merged, tree=False, sources=True) == expected
    assert tshark_info(merged, tree=True, sources=True) == expected
    assert_two_passes_number_and_link_as_read(merged, expected, sources=True)


@needs_tshark
def test_tshark_not_told_about_sources_warns_when_an_untagged_connection_connects_while_open(tmp_path):
    info = tshark_info(merged_capture(tmp_path, tagged=False), tree=False)
    warned = [number for number, line in info.items() if "connects while open: a merged capture?" in line]
    assert warned == [2, 8], info       # host-b's connections 1 and 2, while host-a's are open
    assert {line.split()[0] for line in info.values()} == {"c1", "c2"}     # conflated, as before the tag


@needs_tshark
def test_plain_tshark_keys_a_tagged_merged_capture_by_source_tag_as_read_numbers_it(tmp_path):
    """No VHUSNIFF_SOURCES, no field extractor: the tag in every pseudo-header keeps the sources apart, in the
    packet list and in the tree, with replies linked within their own connection, and every field agrees."""
    merged = merged_capture(tmp_path)
    expected = read_lines(merged)
    assert sorted({line.split()[0] for line in expected.values()}) == ["c1", "c2", "c3", "c4"]
    assert tshark_info(merged, tree=False) == expected
    assert tshark_info(merged, tree=True) == expected
    assert not any("connects while open" in line for line in expected.values())
    assert compare_capture(merged) == 8
    assert_two_passes_number_and_link_as_read(merged, expected, sources=False)


@needs_tshark
def test_the_source_tag_is_a_labelled_filter_field_of_the_pseudo_header(tmp_path):
    from vhusniff.capture.pcapng import source_tag
    merged = merged_capture(tmp_path)
    tag = source_tag("host=host-b pid=7 start=2026-01-01T00:00:00Z")
    result = run_tshark(merged, "-V", "-Y", f"vhost_user.source_tag == {tag:#x} && vhost_user.name == \"GET_FEATURES\"",
                        timeout=60, sources=True)
    assert result.returncode == 0, result.stderr
    # host-b's two GET_FEATURES and their replies; the tree names the source when tshark is told it
    assert result.stdout.count(f"Source tag: {tag:#08x} (host=host-b pid=7 ") == 4, result.stdout
    untagged = os.path.join(ROOT, "captures", "qemu-blk-boot.pcapng")
    result = run_tshark(untagged, "-Y", "vhost_user.source_tag", timeout=60)
    assert result.returncode == 0 and result.stdout == "", result.stderr     # a shipped capture: untagged
