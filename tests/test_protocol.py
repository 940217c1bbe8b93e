"""The grammar's contract: every request and reply kind round-trips exactly, through construct and scapy alike,
and bad input decodes to problems plus the exact bytes, never to an exception."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest
from construct import Container, ListContainer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.packet import Packet, Raw

from grammar_values import payload_values
from vhusniff.capture.pcapng import read_capture
from vhusniff.layers import packets as layers
from vhusniff.layers.packets import header_class_for
from vhusniff.model import Channel, RecordKind
from vhusniff.protocol import catalogue as cat
from vhusniff.protocol import grammar as protocol
from vhusniff.protocol.context import ContextTracker
from vhusniff.protocol.grammar import (
    HEADER,
    HEADER_STRUCT,
    PAYLOADS,
    DecodeContext,
    build_message,
    decode,
    encode,
    payload_candidates,
)

# Every (channel, request, reply?, kind) the catalogue allows.
CASES = [
    (channel, number, is_reply, kind)
    for channel in (Channel.MAIN, Channel.BACKEND, Channel.GPU)
    for number in protocol.request_table(channel)
    for is_reply in (False, True)
    for kind in payload_candidates(channel, number, is_reply, protocol.DEFAULT_CONTEXT)
]


def plain(value):
    """construct Containers and scapy packets as plain dicts/lists, for field-by-field comparison."""
    if isinstance(value, Packet):
        return {f.name: plain(value.getfieldval(f.name)) for f in value.fields_desc}
    if isinstance(value, (Container, dict)):
        return {k: plain(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, (list, ListContainer)):
        return [plain(v) for v in value]
    return value


def test_every_spec_request_has_a_case():
    frontend = {number for channel, number, _, _ in CASES if channel is Channel.MAIN}
    backend = {number for channel, number, _, _ in CASES if channel is Channel.BACKEND}
    assert set(range(1, 46)) <= frontend
    assert set(range(1, 11)) <= backend


@pytest.mark.parametrize("channel,request_number,is_reply,kind", CASES,
                         ids=[f"{c.name}-{r}-{'reply' if p else 'req'}-{k}" for c, r, p, k in CASES])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip_every_kind(channel, request_number, is_reply, kind, data):
    value = data.draw(payload_values(kind))
    raw = build_message(channel, request_number, value, reply=is_reply, kind=kind)
    message = decode(raw, channel)
    assert message.problems == ()
    assert message.kind in payload_candidates(channel, request_number, is_reply, protocol.DEFAULT_CONTEXT)
    assert encode(message) == raw
    header = layers.header_class_for(channel)
    view = header(raw)
    assert bytes(view) == raw
    if message.size == 0:  # scapy has no payload layer for zero bytes
        assert len(view.payload) == 0
        return
    # The scapy view and the grammar agree field by field.
    assert type(view.payload).__name__ == type(layers.PAYLOAD_LAYERS[message.kind]()).__name__
    assert plain(view.payload) == plain(message.payload)


def test_header_struct_and_construct_agree():
    raw = struct.pack("<III", 37, 9, 40)
    parsed = HEADER.parse(raw)
    assert (parsed.request, parsed.flags, parsed.size) == HEADER_STRUCT.unpack(raw)
    assert HEADER.build(parsed) == raw
    assert HEADER.sizeof() == HEADER_STRUCT.size == protocol.HEADER_SIZE


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_compiled_parser_matches_interpreted_grammar(kind, data):
    value = data.draw(payload_values(kind))
    raw = PAYLOADS[kind][0].build(value)
    assert plain(protocol.PARSERS[kind](raw)) == plain(PAYLOADS[kind][0].parse(raw))


@pytest.mark.parametrize("raw,code", [
    (b"\x01\x00", "truncated-header"),
    (struct.pack("<III", 1, 1, 5000) + b"\0" * 5000, "oversize"),
    (struct.pack("<III", 99, 1, 3) + b"abc", "unknown-request"),
    (struct.pack("<III", 2, 0x101, 8) + b"\0" * 8, "reserved-flags"),
    (struct.pack("<III", 2, 2, 8) + b"\0" * 8, "bad-version"),
    (struct.pack("<III", 9, 1, 16) + b"\0" * 16, "payload-layout"),      # SET_VRING_ADDR is 40 bytes
    (struct.pack("<III", 8, 1, 12) + b"\0" * 12, "payload-layout"),      # vring state with 4 bytes extra
    (struct.pack("<III", 8, 1, 8) + b"\0" * 4, "size-mismatch"),         # header promises more than is there
    (struct.pack("<III", 5, 1, 40) + struct.pack("<II", 3, 0) + b"\0" * 32, "payload-layout"),  # 3 regions, 1 sent
    (struct.pack("<III", 24, 1, 20) + struct.pack("<III", 0, 57, 0) + b"\0" * 8, "payload-layout"),  # short config
])
def test_malformed_messages_are_data(raw, code):
    message = decode(raw)
    assert code in [p.code for p in message.problems], message.problems
    assert encode(message) == raw
    assert message.summary()  # shows, does not raise
    if len(raw) >= 12:
        assert bytes(layers.VhostUser(raw)) == raw


@settings(max_examples=2000, deadline=None)
@given(raw=st.binary(max_size=120), channel=st.sampled_from(list(Channel)))
def test_random_bytes_never_raise(raw, channel):
    message = decode(raw, channel)
    assert encode(message) == raw
    message.summary()
    list(protocol.iter_fields(message))


@settings(max_examples=500, deadline=None)
@given(request=st.integers(0, 50), flags=st.integers(0, 2**32 - 1), body=st.binary(max_size=80))
def test_random_messages_with_consistent_size_round_trip(request, flags, body):
    raw = struct.pack("<III", request, flags, len(body)) + body
    message = decode(raw)
    assert encode(message) == raw
    assert bytes(layers.VhostUser(raw)) == raw


def test_summary_names_request_and_key_values():
    raw = build_message(Channel.MAIN, cat.FrontendRequest.SET_VRING_ADDR,
                        dict(index=0, flags=0, desc=0x7F1700000000, used=0x7F1700001000, avail=0x7F1700002000,
                             log=0))
    summary = decode(raw).summary()
    assert summary.startswith("SET_VRING_ADDR idx=0 ")
    assert "desc=0x7f1700000000" in summary and "used=0x7f1700001000" in summary and "avail=0x7f1700002000" in summary


def test_feature_words_read_as_bit_names_for_the_device_type():
    raw = struct.pack("<IIIQ", 1, 5, 8, (1 << 32) | (1 << 30) | (1 << 9))
    assert "VERSION_1" in decode(raw).summary() and "PROTOCOL_FEATURES" in decode(raw).summary()
    assert "FLUSH" in decode(raw, ctx=DecodeContext(device_type="blk")).summary()
    assert "GUEST_ECN" in decode(raw, ctx=DecodeContext(device_type="net")).summary()


def test_profiles_override_names():
    raw = struct.pack("<IIIQ", 15, 5, 8, 1 << 21)
    assert "GPA_ADDRESSES" in decode(raw).summary()
    rust = DecodeContext(profile=cat.PROFILES["rust-vmm-0.16"])
    assert "SHMEM" in decode(raw, ctx=rust).summary()


def test_context_selects_xen_regions_and_packed_ring_base():
    region = dict(guest_phys_addr=0, memory_size=4096, userspace_addr=0, mmap_offset=0)
    xen = build_message(Channel.MAIN, 37, dict(padding=0, region=dict(region, xen_mmap_flags=1, domid=7)),
                        kind="mem_region_xen")
    assert len(xen) == 12 + 48
    assert decode(xen).kind == "mem_region_xen"
    assert decode(xen, ctx=DecodeContext(protocol_features=1 << 17)).payload.region.domid == 7
    base = struct.pack("<IIIII", 10, 1, 8, 0, 0x80008005)
    assert decode(base).kind == "vring_base"
    assert decode(base, ctx=DecodeContext(features=1 << 34)).kind == "vring_base_packed"


def test_set_log_base_as_qemu_sends_it():
    raw = struct.pack("<IIIQQ", 6, 1, 16, 0x1000, 0)
    message = decode(raw)
    assert message.kind == "log" and message.payload.mmap_size == 0x1000


def test_reply_ack_is_a_u64_whatever_the_request():
    raw = struct.pack("<IIIQ", 37, 5, 8, 0)
    assert decode(raw).kind == "ack"
    assert decode(struct.pack("<IIIQ", 9, 5, 8, 1)).payload.ack == 1


def test_adding_a_field_to_the_grammar_adds_it_to_the_layer(monkeypatch):
    from construct import Int32ul, Struct
    structure, prefix, doc = PAYLOADS["device_state"]
    extended = Struct(*structure.subcons, "extra" / Int32ul)
    monkeypatch.setitem(PAYLOADS, "device_state", (extended, prefix, doc))
    layer = layers._payload_class("device_state")
    assert [f.name for f in layer.fields_desc] == ["direction", "phase", "extra"]


def test_every_layer_has_the_grammar_fields():
    for kind, (structure, _prefix, _doc) in PAYLOADS.items():
        names = [sub.name for sub in structure.subcons if sub.name]
        assert [f.name for f in layers.PAYLOAD_LAYERS[kind].fields_desc] == names


def test_field_assignment_and_fuzz_rebuild():
    raw = build_message(Channel.MAIN, 8, dict(index=1, num=256))
    view = layers.VhostUser(raw)
    view.num = 512
    assert decode(bytes(view)).payload.num == 512
    from scapy.packet import fuzz
    fuzzed = bytes(fuzz(layers.VhostUser(request=9) / layers.PAYLOAD_LAYERS["vring_addr"]()))
    assert len(fuzzed) == 52 and struct.unpack_from("<I", fuzzed, 8)[0] == 40


def test_unknown_request_shows_raw_bytes():
    raw = struct.pack("<III", 77, 1, 4) + b"\xde\xad\xbe\xef"
    view = layers.VhostUser(raw)
    assert isinstance(view.payload, Raw) and view.payload.load == b"\xde\xad\xbe\xef"
    assert [p.code for p in view.problems()] == ["unknown-request"]


# ---- every message of the real shipped captures ----

SHIPPED_CAPTURES = sorted((Path(__file__).parent.parent / "captures").glob("*.pcapng"))


def test_real_captures_are_shipped():
    assert any("qemu-blk-boot" in path.name for path in SHIPPED_CAPTURES)


@pytest.mark.parametrize("path", SHIPPED_CAPTURES, ids=lambda path: path.name)
def test_every_message_of_a_real_capture_decodes_by_spec_name_and_round_trips(path):
    tracker = ContextTracker()
    messages = 0
    for number, record in enumerate(read_capture(path), 1):
        message = tracker.decode(record)
        if record.kind != RecordKind.MESSAGE or "unframed" in record.note:
            continue
        messages += 1
        where = f"{path.name} #{number}"
        assert message.problems == (), f"{where}: {message.summary()}"
        assert message.kind is not None, f"{where}: fell back to a raw payload"
        assert not message.name.startswith("UNKNOWN"), where
        assert encode(message) == record.data, where
        layer = header_class_for(record.channel)(record.data)
        layer.vhost_context = message.context
        assert bytes(layer) == record.data, where
        assert not isinstance(layer.payload, Raw) or message.size == 0, where
    assert messages > 0


def test_device_state_stream_chunks_decode_as_opaque_bytes():
    chunk = b"\x00\x01garbage that is no header"
    message = decode(chunk, Channel.DEVICE_STATE)
    assert message.problems == () and message.name == "DEVICE_STATE_STREAM"
    assert list(protocol.iter_fields(message)) == [("payload", chunk)]
    assert encode(message) == chunk


# ---- the scapy layer keeps any bytes: fewer than a header, no bytes at all, garbage ----

@pytest.mark.parametrize("channel", [Channel.MAIN, Channel.BACKEND, Channel.GPU], ids=lambda c: c.name)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=11), st.binary(max_size=80),
                      st.builds(lambda request, flags, size, body: struct.pack("<III", request, flags, size) + body,
                                st.integers(0, 50), st.sampled_from([1, 5, 9, 0x11, 0]), st.integers(0, 64),
                                st.binary(max_size=64))))
def test_any_bytes_make_a_scapy_layer_that_shows_its_problems_and_rebuilds_them_exactly(channel, data):
    view = header_class_for(channel)(data)
    assert bytes(view) == data
    codes = [problem.code for problem in view.problems()]
    assert codes == [problem.code for problem in decode(data, channel).problems]
    if len(data) < protocol.HEADER_SIZE:
        assert codes == ["truncated-header"] and view.request is None
    view.summary(), repr(view), view.show(dump=True)
    assert bytes(view.copy()) == data


def test_a_fresh_layer_still_builds_a_whole_header_from_its_fields():
    assert bytes(layers.VhostUser()) == struct.pack("<III", 1, 1, 0)
    assert bytes(layers.VhostUser(request=3, flags=9)) == struct.pack("<III", 3, 9, 0)
    assert bytes(layers.VhostUser(request=8) / layers.PAYLOAD_LAYERS["vring_state"](index=1, num=256)) == \
        build_message(Channel.MAIN, 8, dict(index=1, num=256))
    truncated = layers.VhostUser(b"\x0c")
    truncated.request, truncated.flags = 3, 1          # setting fields makes a whole header again
    assert bytes(truncated) == struct.pack("<III", 3, 1, 0)


def test_unknown_requests_do_not_grow_the_decoders_cache():
    known_keys = sum(len(protocol.request_table(channel)) for channel in Channel) * 2 * 2 * 2
    for request in range(1000, 201_000):
        for channel in (Channel.MAIN, Channel.BACKEND):
            message = decode(struct.pack("<III", request, 5, 0), channel, DecodeContext(features=request << 34))
            assert message.problems[-1].code == "unknown-request"
    assert len(protocol._CANDIDATES) <= known_keys
