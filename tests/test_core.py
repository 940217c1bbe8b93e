"""Playbooks for the sans-io session core: events in, commands asserted. No sockets, no clock, no sleeps.

fds here are plain numbers: the core never touches them, it only passes them on or says to close them.
"""
import itertools
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from vhusniff.engine import (
    HALF_CLOSE_GRACE_SECONDS,
    Capture,
    CloseChannel,
    CloseConnection,
    CloseFds,
    Fate,
    Inject,
    Note,
    Send,
    Session,
    ShutWrite,
    Side,
    StopReading,
    Wake,
)
from vhusniff.engine.hooks import HookChain
from vhusniff.model import Channel, Direction
from vhusniff.protocol import catalogue as cat
from vhusniff.protocol.context import ContextTracker
from vhusniff.protocol.grammar import MAX_PAYLOAD_SIZE, build_message

F, B = Side.FRONTEND, Side.BACKEND
MAIN = Channel.MAIN
GET_FEATURES = build_message(MAIN, cat.FrontendRequest.GET_FEATURES)
FEATURES_REPLY = build_message(MAIN, cat.FrontendRequest.GET_FEATURES, {"features": 1 << 32}, reply=True)
SET_OWNER = build_message(MAIN, cat.FrontendRequest.SET_OWNER)
SET_VRING_KICK = build_message(MAIN, cat.FrontendRequest.SET_VRING_KICK, {"index": 0, "flags": 0, "reserved": 0})
SET_BACKEND_REQ_FD = build_message(MAIN, cat.FrontendRequest.SET_BACKEND_REQ_FD)
CONFIG_CHANGE = build_message(Channel.BACKEND, cat.BackendRequest.CONFIG_CHANGE_MSG)
SECOND = 1_000_000_000


def kinds(commands):
    return [type(command).__name__ for command in commands]


def of(commands, kind):
    return [command for command in commands if isinstance(command, kind)]


class Hook:
    """A hook whose verdict for each message is a function of the flow."""

    def __init__(self, verdict):
        self.verdict = verdict
        self.seen = []

    def message(self, flow):
        self.seen.append(flow.number)
        self.verdict(flow)


def hooked(verdict, **options):
    reports = []
    hook = Hook(verdict)
    session = Session(1, HookChain([hook], report=reports.append, **options), ContextTracker())
    return session, hook, reports


# ---- forwarding and framing ----

def test_a_whole_message_is_recorded_then_sent_unchanged():
    session = Session(1)
    out = session.received(MAIN, F, GET_FEATURES, [], 10)
    assert out == [Capture(10, MAIN, Direction.FRONTEND_TO_BACKEND, GET_FEATURES, [], ""),
                   Send(MAIN, B, GET_FEATURES, [])]
    assert session.messages == 1


def test_messages_are_reframed_whatever_the_chunking():
    session = Session(1)
    stream = GET_FEATURES + SET_OWNER + GET_FEATURES
    sent = []
    for position in range(0, len(stream), 5):
        sent += [command.data for command in of(session.received(MAIN, F, stream[position:position + 5], [], 1), Send)]
    assert sent == [GET_FEATURES, SET_OWNER, GET_FEATURES]
    assert session.messages == 3


def test_fds_ride_with_the_message_whose_first_byte_they_came_with():
    session = Session(1)
    out = session.received(MAIN, F, SET_VRING_KICK[:4], [7], 1)
    assert of(out, Send) == []
    out = session.received(MAIN, F, SET_VRING_KICK[4:], [], 2)
    assert of(out, Send) == [Send(MAIN, B, SET_VRING_KICK, [7])]
    assert of(out, Capture)[0].fds == [7]


def test_an_impossible_size_makes_the_rest_of_the_stream_pass_unframed_and_unchanged():
    session = Session(1)
    bad = struct.pack("<III", 1, 1, MAX_PAYLOAD_SIZE + 1) + b"junk"
    out = session.received(MAIN, F, GET_FEATURES + bad, [5], 1)
    assert [c.data for c in of(out, Send)] == [GET_FEATURES, bad]
    assert [c.unframed for c in of(out, Capture)] == [False, True]
    assert of(out, Send)[1].fds == [5]
    problem = of(out, Note)[0]
    assert problem.problem and "cannot be framed at message #2" in problem.text
    out = session.received(MAIN, F, b"more", [], 2)
    assert of(out, Send) == [Send(MAIN, B, b"more", [])]
    assert of(out, Capture)[0].note.startswith("unframed") and of(out, Capture)[0].unframed


def test_fds_with_bytes_where_no_message_begins_are_named_and_closed():
    session = Session(1)
    session.received(MAIN, F, GET_FEATURES[:6], [], 1)
    out = session.received(MAIN, F, GET_FEATURES[6:], [3, 4], 2)
    note = of(out, Note)[0]
    assert note.problem and note.describe == (3, 4) and "where no message begins" in note.text
    assert CloseFds([3, 4]) in out
    assert of(out, Send)[0].fds == []


def test_a_flood_of_fds_is_forwarded_and_reported():
    session = Session(1)
    fds = list(range(100, 117))
    out = session.received(MAIN, F, SET_VRING_KICK, fds, 1)
    assert of(out, Send)[0].fds == fds
    assert any(n.problem and "carries 17 fds" in n.text for n in of(out, Note))


def test_truncated_control_data_is_reported():
    out = Session(1).received(MAIN, F, SET_VRING_KICK, [3], 1, truncated=True)
    assert "MSG_CTRUNC" in of(out, Note)[0].text and of(out, Send)


# ---- closing ----

def test_half_close_is_passed_on_and_the_pair_closes_after_the_grace_period():
    session = Session(1)
    out = session.received(MAIN, F, b"", [], 1)
    assert StopReading(MAIN, F) in out and ShutWrite(MAIN, B) in out
    assert Wake(HALF_CLOSE_GRACE_SECONDS, "half-close") in out
    # The back-end may still answer; a message toward the closed front-end is kept as not delivered.
    out = session.received(MAIN, B, FEATURES_REPLY, [], 2)
    assert of(out, Send) == [Send(MAIN, F, FEATURES_REPLY, [])]
    # Toward the back-end, whose writing half was shut, nothing is sent: it is recorded as not delivered.
    out = session.received(MAIN, F, GET_FEATURES, [], 2)
    assert not of(out, Send) and of(out, Capture)[0].note == "not delivered: the back-end side is closed"
    assert of(out, Capture)[0].fate is Fate.NOT_DELIVERED
    out = session.timer("half-close", 5 * SECOND)
    assert of(out, CloseConnection) and "kept it open 5 s" in of(out, CloseConnection)[0].reason


def test_both_sides_closing_closes_the_connection_at_once():
    session = Session(1)
    session.received(MAIN, F, b"", [], 1)
    out = session.received(MAIN, B, b"", [], 2)
    assert of(out, CloseConnection)[0].reason.startswith("back-end closed too")
    assert session.timer("half-close", 10 * SECOND) == []


def test_closing_mid_message_forwards_the_partial_bytes_unframed():
    session = Session(1)
    session.received(MAIN, F, GET_FEATURES[:7], [9], 1)
    out = session.received(MAIN, F, b"", [], 2)
    assert of(out, Send) == [Send(MAIN, B, GET_FEATURES[:7], [9])]
    assert "closed mid-message" in of(out, Note)[0].text


def test_a_failed_send_ends_the_connection_and_names_the_message():
    session = Session(1)
    session.received(MAIN, F, GET_FEATURES, [], 1)
    out = session.send_failed(MAIN, B, "Broken pipe", 2)
    assert "message #1 not delivered: sending to the back-end failed: Broken pipe" in of(out, Note)[0].text
    reason = of(out, CloseConnection)[0].reason
    assert reason == "back-end disconnected (Broken pipe) after message #1"
    assert of(out, Note)[-1].problem


# ---- side channels ----

def test_the_backend_request_channel_is_interposed_and_relayed():
    session = Session(1)
    out = session.received(MAIN, F, SET_BACKEND_REQ_FD, [8], 1)
    assert of(out, Send) == [Send(MAIN, B, SET_BACKEND_REQ_FD, [8], Channel.BACKEND)]
    out = session.interposed(Channel.BACKEND, False, 2)
    assert "backend channel interposed" in out[0].text
    out = session.received(Channel.BACKEND, B, CONFIG_CHANGE, [], 3)
    assert of(out, Send) == [Send(Channel.BACKEND, F, CONFIG_CHANGE, [])]
    assert session.messages == 2
    out = session.received(Channel.BACKEND, B, b"", [], 4)
    assert CloseChannel(Channel.BACKEND) in out and not of(out, CloseConnection)
    assert Channel.BACKEND not in session.channels
    # The main channel goes on.
    assert of(session.received(MAIN, F, GET_FEATURES, [], 5), Send)


def test_a_side_channel_failure_closes_only_that_channel():
    session = Session(1)
    session.received(MAIN, F, SET_BACKEND_REQ_FD, [8], 1)
    session.interposed(Channel.BACKEND, False, 2)
    out = session.failed(Channel.BACKEND, F, "Connection reset by peer", 3)
    assert out[-1] == CloseChannel(Channel.BACKEND) and not session.closed


def test_device_state_pipes_are_interposed_only_when_asked():
    request = build_message(MAIN, cat.FrontendRequest.SET_DEVICE_STATE_FD, {"direction": 0, "phase": 0})
    assert of(Session(1).received(MAIN, F, request, [4], 1), Send)[0].interpose is None
    asked = Session(1, interpose_device_state=True)
    assert of(asked.received(MAIN, F, request, [4], 1), Send)[0].interpose == Channel.DEVICE_STATE


# ---- hooks: every verdict ----

def test_hook_drop_records_and_closes_the_fds():
    session, _hook, _ = hooked(lambda flow: flow.drop())
    out = session.received(MAIN, F, SET_VRING_KICK, [6], 1)
    assert of(out, Send) == [] and CloseFds([6]) in out
    assert of(out, Capture)[0].note == "dropped by hook (not forwarded)"
    assert of(out, Capture)[0].fate is Fate.DROPPED


def test_hook_edit_is_re_encoded_and_noted():
    def edit(flow):
        if flow.message.is_reply:
            flow.layer.features = 0
    session, _hook, _ = hooked(edit)
    out = session.received(MAIN, B, FEATURES_REPLY, [], 1)
    sent = of(out, Send)[0].data
    assert sent != FEATURES_REPLY and sent[:12] == FEATURES_REPLY[:12] and sent[12:] == bytes(8)
    assert of(out, Capture)[0].note == "modified by hook"


def test_hook_delay_holds_in_order_and_a_timer_releases():
    session, _hook, _ = hooked(lambda flow: flow.delay(0.5) if flow.number == 1 else None)
    out = session.received(MAIN, F, GET_FEATURES, [], 0)
    assert of(out, Send) == [] and Wake(0.5, (MAIN, B)) in out
    assert not session.plain(MAIN, F)
    out = session.received(MAIN, F, SET_OWNER, [], SECOND // 10)
    assert of(out, Send) == []          # never overtakes the held message
    assert session.timer((MAIN, B), SECOND // 4) == [Wake(0.25, (MAIN, B))]     # too early: wake me later
    out = session.timer((MAIN, B), SECOND)
    assert [c.data for c in of(out, Send)] == [GET_FEATURES, SET_OWNER]
    assert of(out, Capture)[0].note == "delayed by hook"


def test_hook_inject_sends_after_the_message_on_the_asked_channel():
    def inject(flow):
        if flow.number == 1:
            flow.inject(SET_OWNER)
            flow.inject(CONFIG_CHANGE, channel=Channel.BACKEND, to_backend=False)
    session, _hook, _ = hooked(inject)
    out = session.received(MAIN, F, GET_FEATURES, [], 1)
    assert [c.data for c in of(out, Send)] == [GET_FEATURES, SET_OWNER]
    assert of(out, Capture)[1].note == "injected by hook"
    note = of(out, Note)[0]
    assert note.problem and "no backend channel to travel on" in note.text


def test_hook_disconnect_before_forward():
    session, _hook, _ = hooked(lambda flow: flow.disconnect("enough"))
    out = session.received(MAIN, F, SET_VRING_KICK, [3], 1)
    assert of(out, Send) == []
    assert kinds(out) == ["Capture", "CloseFds", "CloseConnection", "Note"]
    assert of(out, CloseConnection)[0].reason == "hook disconnected at message #1: enough"


def test_hook_disconnect_after_forward_follows_delayed_messages():
    session, _hook, _ = hooked(lambda flow: (flow.delay(1), flow.disconnect("bye", after_forward=True)))
    out = session.received(MAIN, F, GET_FEATURES, [], 0)
    assert not of(out, CloseConnection)
    out = session.timer((MAIN, B), 2 * SECOND)
    assert kinds(out) == ["Capture", "Send", "CloseConnection", "Note"]


def test_a_hook_that_raises_forwards_unchanged_by_default_or_disconnects():
    def boom(flow):
        flow.drop()
        raise RuntimeError("bug")
    session, _hook, reports = hooked(boom)
    out = session.received(MAIN, F, GET_FEATURES, [], 1)
    assert of(out, Send) == [Send(MAIN, B, GET_FEATURES, [])] and "raised" in reports[0]
    session, _hook, reports = hooked(boom, on_error="disconnect")
    out = session.received(MAIN, F, GET_FEATURES, [], 1)
    assert of(out, CloseConnection) and not of(out, Send)


def test_messages_after_a_hook_disconnect_in_the_same_chunk_go_nowhere():
    session, hook, _ = hooked(lambda flow: flow.disconnect("stop"))
    out = session.received(MAIN, F, GET_FEATURES + SET_VRING_KICK, [5], 1)
    assert hook.seen == [1]
    assert CloseFds([5]) in out and not of(out, Send)


# ---- a scripted side (replay): injections go to its script ----

def scripted(side, verdict):
    hook = Hook(verdict)
    return Session(1, HookChain([hook], report=lambda text: None), ContextTracker(), scripted=side), hook


def test_a_scripted_side_is_handed_what_a_hook_injects_for_it_and_sends_it_when_it_may():
    def inject(flow):
        if flow.number == 1:
            flow.inject(SET_OWNER, to_backend=True, fds=[9])
    session, hook = scripted(F, inject)
    out = session.received(MAIN, B, FEATURES_REPLY, [], 1)
    assert of(out, Send) == [Send(MAIN, F, FEATURES_REPLY, [])] and of(out, Inject) == [Inject(MAIN, F, SET_OWNER, [9])]
    out = session.send_injected(MAIN, F, SET_OWNER, [9], 2)
    assert of(out, Send) == [Send(MAIN, B, SET_OWNER, [9])] and of(out, Capture)[0].note == "injected by hook"
    assert hook.seen == [1], "an injection does not run through the hooks"


def test_a_scripted_side_sends_only_what_its_role_sends():
    def inject(flow):
        flow.inject(FEATURES_REPLY, to_backend=False, fds=[4])                     # a back-end reply
        flow.inject(CONFIG_CHANGE, to_backend=False, channel=Channel.BACKEND)      # a back-end request
    session, _hook = scripted(F, inject)
    out = session.received(MAIN, F, GET_FEATURES, [], 1)
    assert of(out, Inject) == [] and CloseFds([4]) in out
    texts = [note.text for note in of(out, Note) if note.problem]
    assert texts[0] == ("a hook injected GET_FEATURES reply features=0x100000000(VERSION_1) on the main channel "
                        "B>F: front-end replay sends only what a front-end sends (F>B: requests on the main channel, "
                        "replies on the back-end channel); skipped"), texts
    assert "injected CONFIG_CHANGE_MSG on the back-end channel B>F" in texts[1]
    session, _hook = scripted(B, lambda flow: flow.inject(FEATURES_REPLY, to_backend=False))
    assert of(session.received(MAIN, F, GET_FEATURES, [], 1), Inject) == [Inject(MAIN, B, FEATURES_REPLY, [])]


def test_a_scripted_injection_rides_its_message_s_delay():
    session, _hook = scripted(B, lambda flow: (flow.delay(0.5), flow.inject(CONFIG_CHANGE, channel=Channel.BACKEND))
                              if flow.message.is_reply else None)
    session.open_channel(Channel.BACKEND)
    out = session.received(MAIN, B, FEATURES_REPLY, [], 0)
    assert of(out, Inject) == [] and of(out, Send) == []
    out = session.timer((MAIN, F), SECOND) + session.timer((Channel.BACKEND, F), SECOND)
    assert of(out, Send) == [Send(MAIN, F, FEATURES_REPLY, [])]
    assert of(out, Inject) == [Inject(Channel.BACKEND, B, CONFIG_CHANGE, [])]


# ---- the fd ledger ----

@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["front", "back", "eof", "timer", "fail"]),
                          st.integers(0, 60), st.integers(0, 3)), max_size=30),
       st.sampled_from(["none", "drop", "delay", "disconnect"]))
def test_every_fd_handed_in_leaves_exactly_once(steps, verdict):
    """Whatever happens, each fd given to the core comes out in exactly one Send or CloseFds."""
    actions = {"none": lambda flow: None, "drop": lambda flow: flow.drop() if flow.number % 2 else None,
               "delay": lambda flow: flow.delay(0.2), "disconnect": lambda flow: flow.disconnect("x")
               if flow.number == 3 else None}
    session = Session(1, HookChain([Hook(actions[verdict])], report=lambda text: None), ContextTracker())
    stream = {F: GET_FEATURES + SET_VRING_KICK + SET_BACKEND_REQ_FD, B: FEATURES_REPLY * 3}
    position = {F: 0, B: 0}
    numbers = itertools.count(100)
    given_fds, out = [], []
    now = 0
    for action, length, fd_count in steps:
        now += SECOND // 10
        if action in ("front", "back"):
            side = F if action == "front" else B
            chunk = stream[side][position[side]:position[side] + length + 1]
            position[side] += len(chunk)
            fds = [next(numbers) for _ in range(fd_count)] if chunk else []
            given_fds += fds
            out += session.received(MAIN, side, chunk, fds, now)
        elif action == "eof":
            out += session.received(MAIN, F if length % 2 else B, b"", [], now)
        elif action == "timer":
            out += session.timer((MAIN, B), now) + session.timer((MAIN, F), now)
        else:
            out += session.failed(MAIN, B, "reset", now)
    out += session.close("end", now + 100 * SECOND)
    leaving = [fd for command in out if isinstance(command, (Send, CloseFds)) for fd in command.fds]
    assert sorted(leaving) == sorted(given_fds)


def test_a_whole_message_framed_by_the_driver_is_forwarded_like_any_other():
    session = Session(1)
    framer = session.framer(MAIN, F)
    assert framer.take_whole(SET_VRING_KICK)
    out = session.whole(MAIN, F, SET_VRING_KICK, [4], 1)
    assert of(out, Send) == [Send(MAIN, B, SET_VRING_KICK, [4])] and session.messages == 1
    session.close("end", 2)
    assert session.whole(MAIN, F, SET_VRING_KICK, [5], 3) == [CloseFds([5])]


def test_a_side_channel_passed_again_replaces_the_old_one_and_its_pending_fds_close():
    session = Session(1)
    session.received(MAIN, F, SET_BACKEND_REQ_FD, [8], 1)
    session.interposed(Channel.BACKEND, False, 2)
    session.received(Channel.BACKEND, B, CONFIG_CHANGE[:5], [9], 3)       # half a message, with an fd
    session.received(MAIN, F, SET_BACKEND_REQ_FD, [10], 4)
    out = session.interposed(Channel.BACKEND, True, 5)
    assert "replaced by message #2" in out[0].text and CloseFds([9]) in out
    assert of(session.received(Channel.BACKEND, B, CONFIG_CHANGE, [], 6), Send)


def test_a_side_that_hangs_up_after_closing_its_half_ends_the_connection():
    session = Session(1)
    session.received(MAIN, F, b"", [], 1)
    out = session.hung_up(MAIN, F, 2)
    assert of(out, CloseConnection)[0].reason == "front-end closed: connection closed after message #0"


# ---- following the negotiation and the replies it requires ----

def test_a_following_session_knows_which_requests_await_an_answer():
    session = Session(1, follow=True, device="blk")
    out = session.received(MAIN, F, GET_FEATURES, [], 1)
    capture = of(out, Capture)[0]
    assert capture.message.name == "GET_FEATURES" and capture.awaits_reply
    assert [(a.number, a.name, a.expect) for a in session.awaiting(MAIN)] == [(1, "GET_FEATURES", "reply")]
    out = session.received(MAIN, B, FEATURES_REPLY, [], 2)
    assert not of(out, Capture)[0].awaits_reply and session.awaiting(MAIN) == ()
    # NEED_REPLY before REPLY_ACK is negotiated: a reply is tolerated, not required.
    set_owner = build_message(MAIN, cat.FrontendRequest.SET_OWNER, need_reply=True)
    assert not of(session.received(MAIN, F, set_owner, [], 3), Capture)[0].awaits_reply
    reply_ack = cat.SPEC_PROFILE.protocol_feature_bit("REPLY_ACK")
    session.received(MAIN, F, build_message(MAIN, cat.FrontendRequest.SET_PROTOCOL_FEATURES,
                                            {"protocol_features": 1 << reply_ack}), [], 4)
    assert session.context().protocol_features == 1 << reply_ack
    out = session.received(MAIN, F, set_owner, [], 5)
    assert of(out, Capture)[0].awaits_reply and session.awaiting(MAIN)[-1].expect == "ack"


def test_a_session_that_does_not_follow_decodes_nothing():
    out = Session(1).received(MAIN, F, GET_FEATURES, [], 1)
    assert of(out, Capture)[0].message is None and not of(out, Capture)[0].awaits_reply


def test_the_device_state_stream_is_passed_on_as_opaque_chunks_never_framed():
    session = Session(1, interpose_device_state=True)
    session.open_channel(Channel.DEVICE_STATE)
    chunk = struct.pack("<III", 1, 0, 0xFFFFFFFF) + b"state"     # would be an impossible header on a socket
    out = session.received(Channel.DEVICE_STATE, B, chunk, [], 1)
    assert of(out, Send) == [Send(Channel.DEVICE_STATE, F, chunk, [])]
    assert of(out, Capture)[0].note == "device-state stream" and not of(out, Note)
    assert session.messages == 0, "chunks are not messages"
