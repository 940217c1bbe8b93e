"""Display filters: Wireshark syntax over the grammar's field names and the record fields."""
from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhusniff.capture.pcapng import read_capture
from vhusniff.model import Channel, Direction, FdInfo, Record
from vhusniff.protocol.context import ContextTracker
from vhusniff.protocol.grammar import build_message, decode, iter_fields
from vhusniff.views.filters import FilterError, compile_filter, grammar_fields

REGION = dict(guest_phys_addr=0x1000, memory_size=0x200000, userspace_addr=0x7F0000000000, mmap_offset=0)


def _message(channel, raw, direction=Direction.FRONTEND_TO_BACKEND, fds=(), connection=1):
    record = Record(0, connection, channel, direction, raw, list(fds))
    return decode(raw, channel), record


SESSION = [
    _message(Channel.MAIN, build_message(Channel.MAIN, 1)),                                               # 1
    _message(Channel.MAIN, struct.pack("<IIIQ", 15, 5, 8, 0x8F2B), Direction.BACKEND_TO_FRONTEND),       # 2
    _message(Channel.MAIN, build_message(Channel.MAIN, 5, dict(nregions=2, padding=0, region=[REGION, REGION]),
                                         need_reply=True), fds=[FdInfo("memfd", 1, 4096, "memfd:pc.ram")] * 2),  # 3
    _message(Channel.MAIN, build_message(Channel.MAIN, 18, dict(index=1, num=1)), connection=2),       # 4
    _message(Channel.MAIN, build_message(Channel.MAIN, 21, need_reply=True), fds=[FdInfo("socket")]),   # 5
    _message(Channel.BACKEND, build_message(Channel.BACKEND, 1, dict(iova=1, size=2, uaddr=3, perm=3, type=1,
                                                                      padding=bytes(6))),
             Direction.BACKEND_TO_FRONTEND),                                                              # 6
    _message(Channel.MAIN, struct.pack("<III", 2, 0x11, 3) + b"abc"),                                    # 7
    _message(Channel.MAIN, build_message(Channel.MAIN, 19, dict(mac=bytes.fromhex("525400123456"),
                                                                padding=bytes(2)))),                      # 8
    _message(Channel.MAIN, build_message(Channel.MAIN, 22, dict(iova=1, size=2, uaddr=3, perm=3, type=2,
                                                                padding=bytes(6)))),                      # 9
]


def matching(text: str) -> list[int]:
    display_filter = compile_filter(text)
    return [n for n, (message, record) in enumerate(SESSION, start=1) if display_filter.matches(message, record, n)]


@pytest.mark.parametrize("text, expected", [
    ("request == SET_MEM_TABLE && flags.need_reply", [3]),
    ("request == 5", [3]),
    ("vhost_user.request eq SET_MEM_TABLE", [3]),
    ("vring.index == 1", [4]),
    ("request == SET_SLAVE_REQ_FD", [5]),                       # the old name
    ("request == SET_BACKEND_REQ_FD", [5]),
    ("name == SET_SLAVE_REQ_FD", [5]),
    ("request == IOTLB_MSG", [6, 9]),                           # 1 on the back-end channel, 22 on main
    ("request == SLAVE_IOTLB_MSG", [6]),
    ("request in {GET_FEATURES SET_VRING_ENABLE}", [1, 4]),
    ("request in {1, 18..19}", [1, 4, 6, 8]),                   # 1 is IOTLB_MSG on the back-end channel
    ("flags.need_reply && !(request == SET_MEM_TABLE)", [5]),
    ("not flags.need_reply and flags.reply == 0 and channel == main and request < 5", [1, 7]),
    ("request >= 19 or request <= 1", [1, 5, 6, 8, 9]),
    ("protocol_features & REPLY_ACK", [2]),
    ("protocol_features & 0x8 == 8", [2]),
    ("protocol_features & MQ", [2]),
    ("mem.region.memory_size >= 0x200000", [3]),
    ("mem.region", [3]),
    ("fd.kind == memfd", [3]),
    ("fds == 1", [5]),
    ("fd.name contains \"pc.ram\"", [3]),
    ("name matches \"^SET_(MEM|VRING)_\"", [3, 4]),
    ("rarp.mac == 52:54:00:12:34:56", [8]),
    ("rarp.mac contains 12:34", [8]),
    ("problem == reserved-flags", [7]),
    ("problem", [7]),
    ("direction == B>F", [2, 6]),
    ("channel == backend || channel == 1", [6]),
    ("connection == 2", [4]),
    ("frame.number > 7", [8, 9]),
    ("request != GET_FEATURES && channel == main && connection == 1 && !problem", [2, 3, 5, 8, 9]),
    ("mem.region.guest_phys_addr != 0x1000", [1, 2, 4, 5, 6, 7, 8, 9]),   # Wireshark 4: no value equals
    ("iotlb.type in {1 3}", [6]),
])
def test_filter_selects(text, expected):
    assert matching(text) == expected


@pytest.mark.parametrize("text, position, words", [
    ("request == NOPE", 11, "unknown request name"),
    ("reqest == 1", 0, "unknown field"),
    ("request == 1 &&", 15, "expected a field name"),
    ("(request == 1", 13, "expected ')'"),
    ("vring.index == banana", 15, "not a value of the integer field"),
    ("request in {1 2", 15, "unclosed set"),
    ("name matches \"(\"", 13, "bad regular expression"),
    ("request == 1 junk", 13, "unexpected"),
    ("", 0, "empty filter"),
    ("request == $", 11, "unexpected character"),
])
def test_filter_errors_point_at_the_fault(text, position, words):
    with pytest.raises(FilterError) as caught:
        compile_filter(text)
    error = caught.value
    assert error.position == position and words in error.reason
    lines = str(error).splitlines()
    assert lines[0] == error.reason and lines[1] == "  " + text and lines[2] == "  " + " " * position + "^"


def test_every_name_iter_fields_yields_is_a_filter_field():
    for message, _record in SESSION:
        for name, _value in iter_fields(message):
            assert name in grammar_fields(), name
            compile_filter(name)


def test_device_config_fields_are_filter_fields_matched_per_device():
    """The blk GET_CONFIG reply of a real boot: its decoded capacity is a filter field like any other."""
    path = Path(__file__).resolve().parent.parent / "captures" / "qemu-blk-boot.pcapng"
    tracker = ContextTracker()
    decoded = [(tracker.decode(record), record) for record in read_capture(path)]
    config_replies = [m for m, _r in decoded if m is not None and m.name == "GET_CONFIG" and m.is_reply]
    capacity = dict(iter_fields(config_replies[0]))["config.blk.capacity"]
    for name in ("config.blk.capacity", "config.blk.num_queues", "config.net.mac", "config.fs.tag"):
        assert name in grammar_fields(), name
    def selected(text):
        display_filter = compile_filter(text)
        return [m for n, (m, r) in enumerate(decoded, start=1) if m is not None and display_filter.matches(m, r, n)]
    assert selected(f"config.blk.capacity == {capacity}") == config_replies
    assert selected("config.blk.capacity == 1") == []


# ---- hostile filters: every one is a FilterError with a caret, never another exception ----

DEEP = 1000


@pytest.mark.parametrize("text", [
    " && ".join(["request == 1"] * DEEP),
    " || ".join(["flags.need_reply"] * DEEP),
    " and ".join(["!problem"] * DEEP),
    "!" * DEEP + "problem",
    "!" * (DEEP + 1) + "problem",
    "(" * 100 + "request == 5" + ")" * 100,
    "!(" * 100 + "request == 5" + ")" * 100,
], ids=["and-chain", "or-chain", "and-not-chain", "even-nots", "odd-nots", "100-parens", "100-not-parens"])
def test_long_chains_and_negations_compile_and_match_without_recursion(text):
    display_filter = compile_filter(text)
    for number, (message, record) in enumerate(SESSION, start=1):
        display_filter.matches(message, record, number)


def test_long_chains_and_negations_mean_what_they_say():
    assert matching(" || ".join(["request == 5"] * DEEP + ["connection == 2"])) == [3, 4]
    assert matching(" && ".join(["channel == main"] * DEEP + ["request == 5"])) == [3]
    assert matching("!" * DEEP + "problem") == [7]
    assert matching("!" * (DEEP + 1) + "problem") == [1, 2, 3, 4, 5, 6, 8, 9]


@pytest.mark.parametrize("text, position, words", [
    ("(" * 250 + "request" + ")" * 250, 100, "nested deeper than 100"),
    ("!(" * 250 + "request" + ")" * 250, 201, "nested deeper than 100"),
    ("name matches \"" + "(" * DEEP + ")" * DEEP + "\"", 13, "bad regular expression"),
    (r'name == "\x"', 9, "bad escape \\x"),
    (r'name == "ab\x4"', 11, "bad escape \\x"),
    (r'name == "\N{NOPE}"', 9, "no such character"),
    (r'name == "\u12"', 9, "bad escape \\u"),
    (r'name == "\U00110000"', 9, "no such character"),
], ids=["250-parens", "250-not-parens", "deep-regex", "x", "x4", "N-name", "u12", "U-beyond"])
def test_deep_nesting_bad_regexes_and_bad_escapes_are_filter_errors(text, position, words):
    with pytest.raises(FilterError) as caught:
        compile_filter(text)
    error = caught.value
    assert error.position == position and words in error.reason, error
    assert str(error).splitlines()[2] == "  " + " " * position + "^"


def test_string_escapes_and_non_ascii_text():
    assert matching(r'name == "SET_MEM\x5fTABLE"') == [3]
    assert matching(r'name == "SET_MEM\u005fTABLE"') == [3]
    assert matching(r'name matches "^SET_\w+_TABLE$"') == [3]    # an unknown escape stays for the regex
    assert matching('fd.name contains "pc.ram" || fd.name contains "é"') == [3]


_FILTER_ALPHABET = st.sampled_from(list("()!&|=<>{}\",.\\ ~$é\n") +
                                   ["request", "name", "flags.need_reply", "protocol_features", "fd.kind", "in",
                                    "matches", "contains", "and", "or", "not", "SET_MEM_TABLE", "MQ", "1", "0x8",
                                    "1..3", "\\x", "\\N{", "\\u1", "eq", "&&", "||", "mem.region", "ab:cd"])


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(st.text(max_size=60), st.lists(_FILTER_ALPHABET, max_size=40).map(" ".join),
                      st.lists(_FILTER_ALPHABET, max_size=40).map("".join)))
def test_any_text_compiles_or_is_a_filter_error_and_matching_never_raises(text):
    try:
        display_filter = compile_filter(text)
    except FilterError as error:
        shown = str(error).split("\n")
        assert 0 <= error.position <= len(text) and len(shown) == 3 and shown[1] == "  " + re.sub(r"\s", " ", text)
        return
    for number, (message, record) in enumerate(SESSION, start=1):
        display_filter.matches(message, record, number)


# ---- feature bit names mean the bits of each message's device type ----

CAPTURES = Path(__file__).parent.parent / "captures"


def capture_matches(name: str, text: str, device_type: str | None = None) -> tuple[list[int], list[int]]:
    """Frames the filter selects, and frames whose features have any bit set (to compare with)."""
    display_filter = compile_filter(text)
    tracker = ContextTracker(device_type)
    selected, with_features = [], []
    for number, record in enumerate(read_capture(CAPTURES / name), start=1):
        message = tracker.decode(record)
        if message is None:
            continue
        if display_filter.matches(message, record, number):
            selected.append(number)
        if message.kind == "features":
            with_features.append((number, message.payload.features))
    return selected, with_features


def unknown_device_offer_matches(text: str) -> bool:
    """Whether the filter selects a GET_FEATURES reply of qemu-storage-daemon's bits, which net defines as well as
    blk: the device type stays unknown."""
    data = build_message(Channel.MAIN, 1, {"features": 0x175007E46}, reply=True)
    record = Record(0, 1, Channel.MAIN, Direction.BACKEND_TO_FRONTEND, data)
    message = ContextTracker().decode(record)
    assert message is not None and message.context.device_type is None
    return compile_filter(text).matches(message, record, 1)


@pytest.mark.parametrize("name, device_type, bit_name, bit", [
    ("qemu-blk-boot.pcapng", None, "MQ", 12),           # the capture notes device=blk
    ("qemu-blk-boot.pcapng", None, "FLUSH", 9),
    ("dpdk-virtio-user.pcapng", "net", "MQ", 22),       # as `read --device net`
    ("dpdk-virtio-user.pcapng", None, "MQ", 22),        # no DEVICE event: net, from the bits testpmd offers
    ("dpdk-virtio-user.pcapng", None, "VERSION_1", 32),
])
def test_a_feature_name_means_the_bit_of_the_messages_device(name, device_type, bit_name, bit):
    selected, with_features = capture_matches(name, f"features & {bit_name}", device_type)
    assert selected == [number for number, features in with_features if features >> bit & 1]
    assert selected or bit_name == "FLUSH", "the capture has the bit somewhere"


def test_a_device_specific_name_matches_nothing_on_other_devices_or_where_it_is_ambiguous():
    assert capture_matches("qemu-blk-boot.pcapng", "features & MRG_RXBUF")[0] == []         # net only
    assert capture_matches("dpdk-virtio-user.pcapng", "features & FLUSH", "net")[0] == []    # blk only
    # MQ is net's 22 and blk's 12: with no device type known it means nothing rather than a guess; FLUSH is only
    # blk's 9, one meaning with no device type.
    assert not unknown_device_offer_matches("features & MQ")
    assert unknown_device_offer_matches("features & MQ || request == GET_FEATURES")
    assert unknown_device_offer_matches("features & FLUSH")
    assert capture_matches("qemu-blk-boot.pcapng", "features in {0x175007e46} && !(features & MQ == 0)")[0] == \
        capture_matches("qemu-blk-boot.pcapng", "features & 0x1000")[0]
    with pytest.raises(FilterError, match="not a value of the integer field"):
        compile_filter("features & NO_SUCH_BIT")
