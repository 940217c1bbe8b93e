"""The analyzer's feed settles per request header what it can (name, checks, reply rule): the public APIs it
serves (check_message, expectation, ConnectionState.feed) must agree with it, and every check must still fire
wherever its condition can hold."""
from __future__ import annotations

import itertools
from types import MappingProxyType

import pytest
from construct import Container
from test_analysis import QEMU_PROTOCOL, F, Script, opened, running
from test_expert import CASES

from vhusniff.analysis import expert
from vhusniff.analysis.analyzer import KINDS_KEPT, Analyzer
from vhusniff.analysis.expert import REQUEST_CHECKS_KEPT, check_message
from vhusniff.analysis.state import ConnectionState, VringState
from vhusniff.model import Channel, Direction, FdInfo, Record, RecordKind
from vhusniff.protocol import catalogue as cat
from vhusniff.protocol import replies
from vhusniff.protocol.context import ContextTracker
from vhusniff.protocol.grammar import HEADER_STRUCT, DecodeContext, Message, build_message, decode, request_table
from vhusniff.protocol.replies import REPLY_RULES_KEPT, Expect, ReplyExpectation, expectation, reply_rules

REPLY_ACK_BIT = cat.SPEC_PROFILE.protocol_feature_bit("REPLY_ACK")
LOG_SHMFD_BIT = cat.SPEC_PROFILE.protocol_feature_bit("LOG_SHMFD")
BACKEND_SOCKET = FdInfo("socket", name="unix")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("which", ["bad", "good"])
def test_check_message_gives_what_the_analyzer_raises_for_the_same_message(case, which):
    """check_message (the public API) judges each message against the state before it exactly as the analyzer's
    feed does: its findings come first among those the analyzer raises for that record."""
    script = CASES[case][0 if which == "bad" else 1]()
    analyzer = Analyzer()
    for number, record in enumerate(script.records, 1):
        if record.kind == RecordKind.MESSAGE:
            message = analyzer.tracker.decode_message(record)
            state = analyzer.state(record.connection)
            expected = check_message(state, number, record, message)
            after_end = 1 if state.ended else 0         # traffic-after-disconnect comes first
            raised = analyzer.feed(record, message, number)
            assert raised[after_end:after_end + len(expected)] == expected, (number, raised, expected)
        else:
            analyzer.feed(record, None, number)


def _reference_expectation(spec, channel, request, need_reply, protocol_features, postcopy) -> str:
    """The reply rules as the spec words them, one by one."""
    if spec is not None and spec.reply_rule == cat.ReplyRule.ALWAYS:
        return Expect.REPLY
    if spec is not None and spec.reply_rule == cat.ReplyRule.IF_LOG_SHMFD and protocol_features >> LOG_SHMFD_BIT & 1:
        return Expect.REPLY
    if postcopy and channel == Channel.MAIN and request in (F.SET_MEM_TABLE, F.ADD_MEM_REG):
        return Expect.REPLY
    if need_reply:
        return Expect.ACK if protocol_features >> REPLY_ACK_BIT & 1 else Expect.MAYBE
    return Expect.NOTHING


def test_reply_expectation_settled_per_header_follows_the_reply_rules_for_every_request():
    negotiated = [0, 1 << REPLY_ACK_BIT, 1 << LOG_SHMFD_BIT, 1 << REPLY_ACK_BIT | 1 << LOG_SHMFD_BIT]
    for channel in (Channel.MAIN, Channel.BACKEND, Channel.GPU):
        for request in [*request_table(channel), 99]:
            spec = request_table(channel).get(request)
            for need_reply in (False, True):
                rules = ReplyExpectation(spec, channel, request, need_reply)
                answers = {(features, postcopy): rules(features, postcopy)
                           for features, postcopy in itertools.product(negotiated, (False, True))}
                for (features, postcopy), answer in answers.items():
                    assert answer == _reference_expectation(spec, channel, request, need_reply, features, postcopy)
                # `fixed` is said only where nothing negotiated changes the answer, and then it is that answer
                if rules.fixed is not None:
                    assert set(answers.values()) == {rules.fixed}, (channel, request, need_reply)
                else:
                    assert len(set(answers.values())) > 1, (channel, request, need_reply)


def test_expectation_of_a_profile_without_reply_ack_never_waits_for_an_ack():
    profile = cat.Profile("no-reply-ack", protocol_features=MappingProxyType(
        {bit: name for bit, name in cat.PROTOCOL_FEATURES.items() if name != "REPLY_ACK"}))
    if profile.protocol_feature_bit("REPLY_ACK") is not None:
        pytest.skip("REPLY_ACK has an alias the profile cannot drop")
    message = decode(build_message(Channel.MAIN, F.SET_OWNER, need_reply=True), Channel.MAIN)
    assert expectation(message, (1 << 64) - 1, profile) == Expect.MAYBE
    assert expectation(message, (1 << 64) - 1) == Expect.ACK


def _ack_answer(status: int, request: int = F.SET_BACKEND_REQ_FD) -> list[str]:
    s = opened()
    s.request(request, need_reply=True, fds=[BACKEND_SOCKET] if request == F.SET_BACKEND_REQ_FD else [])
    s.ack(request, status)
    return [f.check for f in Analyzer().run(s.records).findings]


@pytest.mark.parametrize("status", [1, 1 << 8, 1 << 56, (1 << 64) - 1])
def test_a_nonzero_ack_in_any_byte_is_a_failure(status):
    assert _ack_answer(status) == ["ack-nonzero"]


def test_a_zero_ack_is_success():
    assert _ack_answer(0) == []


def test_a_get_config_answered_by_an_ack_is_a_config_error():
    """An 8-byte reply to GET_CONFIG reads as an ack; it still answers with another size than the window asked
    (GET_CONFIG always waits for its reply, so the ack's value is not judged)."""
    s = opened()
    s.request(F.GET_CONFIG, {"offset": 0, "size": 57, "flags": 0, "data": bytes(57)}, need_reply=True)
    s.ack(F.GET_CONFIG, 3)
    checks = [f.check for f in Analyzer().run(s.records).findings]
    assert checks == ["config-reply-error"]


def test_names_come_from_the_message_profile_and_features_from_the_analyzer_profile():
    """A message decoded under another profile than the analyzer's is named by its own (not from a cache)."""
    renamed = cat.SPEC_PROFILE.with_overrides("renamed", frontend_names={int(F.SET_OWNER): "TAKE_OWNERSHIP"})
    s = opened()
    s.request(F.SET_OWNER, fds=[BACKEND_SOCKET])
    analyzer = Analyzer(profile=renamed)
    plain = ContextTracker()
    texts = []
    for number, record in enumerate(s.records, 1):
        message = plain.decode(record) if number == len(s.records) else None
        texts += [f.text for f in analyzer.feed(record, message, number)]
    assert texts == ["SET_OWNER with 1 fd(s), expected 0"]
    texts = [f.text for f in Analyzer(profile=renamed).run(s.records).findings]
    assert texts == ["TAKE_OWNERSHIP with 1 fd(s), expected 0"]


def test_the_per_header_tables_stay_bounded_however_many_request_numbers_a_capture_holds():
    analyzer = Analyzer(keep=False)
    s = opened()
    for request in range(1000, 1000 + max(KINDS_KEPT, REQUEST_CHECKS_KEPT) + 50):
        s.request(request, raw=HEADER_STRUCT.pack(request, 1, 0))
    for record in s.records:
        analyzer.feed(record)
    assert len(analyzer._headers) <= KINDS_KEPT
    assert len(expert._request_checks) <= REQUEST_CHECKS_KEPT
    assert analyzer.finding_count(1) == max(KINDS_KEPT, REQUEST_CHECKS_KEPT) + 50    # each unknown-request


@pytest.mark.parametrize("rings", list(itertools.product([(False, False), (True, True), (False, True)],
                                                          repeat=2)) + [(), ((False, True),)])
def test_suspended_means_every_ring_stopped_once_any_ran(rings):
    state = ConnectionState(1)
    for index, (started, ever_started) in enumerate(rings):
        state.vrings[index] = VringState(index, started=started, ever_started=ever_started)
    expected = any(e for _s, e in rings) and not any(s for s, _e in rings)
    assert state.suspended == expected


def test_state_feed_applies_a_reply_only_to_the_request_that_asks_for_it():
    """The state dispatches replies by payload kind: a features payload answering another request (a message
    made by hand: the decoder gives each request its own kinds) changes nothing."""
    state = ConnectionState(1)
    context = DecodeContext()
    for request, features in ((F.GET_PROTOCOL_FEATURES, 0x1234), (F.GET_FEATURES, 0x40000000)):
        raw = build_message(Channel.MAIN, request, {"features": features}, reply=True, kind="features")
        message = Message(raw, Channel.MAIN, request, 0x5, 8, "features", Container(features=features), (), context)
        state.feed(1, Record(1, 1, Channel.MAIN, Direction.BACKEND_TO_FRONTEND, raw), message)
    assert state.features_offered == 0x40000000 and state.protocol_features_offered is None


def test_a_started_ring_stopped_by_get_vring_base_reports_the_device_suspended():
    s = running()
    s.stop_ring()
    history = [text for _n, text in Analyzer().run(s.records).state(1).history]
    assert "ring 0 stopped (GET_VRING_BASE), device suspended" in history


def test_gates_follow_the_negotiation_message_by_message():
    """A gated request before and after its feature is acked: the gate test settled per header reads the state
    as it is at each message."""
    s = Script()
    s.connected("blk")
    s.request(F.GET_FEATURES)
    s.reply(F.GET_FEATURES, {"features": 1 << 30})
    s.request(F.GET_PROTOCOL_FEATURES)
    s.reply(F.GET_PROTOCOL_FEATURES, {"protocol_features": QEMU_PROTOCOL | 1 << 16})
    before = s.request(F.GET_STATUS)
    s.reply(F.GET_STATUS, {"status": 0})
    s.request(F.SET_PROTOCOL_FEATURES, {"protocol_features": QEMU_PROTOCOL | 1 << 16})
    s.request(F.GET_STATUS)
    s.reply(F.GET_STATUS, {"status": 0})
    found = [(f.check, f.number) for f in Analyzer().run(s.records).findings]
    assert found == [("gate-not-negotiated", before)]


def test_reply_rules_are_made_once_per_header_and_profile_and_stay_bounded():
    rust = cat.PROFILES["rust-vmm-0.16"]
    first = reply_rules(Channel.MAIN, F.SET_OWNER, True)
    assert reply_rules(Channel.MAIN, F.SET_OWNER, True) is first
    assert reply_rules(Channel.MAIN, F.SET_OWNER, True, rust) is not first
    for request in range(2000, 2000 + REPLY_RULES_KEPT + 10):
        assert reply_rules(Channel.MAIN, request, False).fixed == Expect.NOTHING
    assert len(replies._reply_rules) <= REPLY_RULES_KEPT


def test_gate_open_reads_each_gate_from_its_own_word():
    state = ConnectionState(1)
    assert state.gate_open("") and not state.gate_open("PROTOCOL_FEATURES") and not state.gate_open("IOMMU")
    state.features_offered = 1 << 30            # offered is enough for protocol features (spec)
    state.protocol_features_acked = 1 << cat.SPEC_PROFILE.protocol_feature_bit("STATUS")
    assert state.gate_open("PROTOCOL_FEATURES") and state.gate_open("STATUS")
    assert not state.gate_open("IOMMU") and not state.gate_open("CONFIG") and not state.gate_open("NO_SUCH_FEATURE")
    state.features_acked = 1 << 33
    assert state.gate_open("IOMMU")
