"""The framer re-frames by size whatever the chunking, and keeps fds with the message they began with."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhusniff.model import Channel
from vhusniff.protocol.framing import Frame, Framer, FramingError, StrayFds
from vhusniff.protocol.grammar import build_message

MESSAGES = [
    build_message(Channel.MAIN, 1),
    build_message(Channel.MAIN, 8, dict(index=0, num=256)),
    build_message(Channel.MAIN, 13, dict(index=0, flags=0, reserved=0)),
    build_message(Channel.MAIN, 9, dict(index=0, flags=0, desc=1, used=2, avail=3, log=0)),
]


def frames_of(events):
    return [e for e in events if isinstance(e, Frame)]


def test_header_and_payload_in_separate_writes_like_libvhost_user():
    framer = Framer("back-end")
    message = MESSAGES[2]
    assert framer.feed(message[:12], [7]) == []
    (frame,) = framer.feed(message[12:])
    assert frame.data == message and frame.fds == [7] and frame.offset == 0


def test_many_messages_in_one_read():
    framer = Framer("front-end")
    stream = b"".join(MESSAGES)
    frames = frames_of(framer.feed(stream))
    assert [f.data for f in frames] == MESSAGES
    assert [f.offset for f in frames] == [0, 12, 32, 52]


def test_fds_belong_to_the_last_message_that_begins_in_the_chunk():
    # QEMU's SET_FEATURES (no fd) then ADD_MEM_REG (memfd) arrive glued in one recvmsg with the memfd.
    framer = Framer("front-end")
    frames = frames_of(framer.feed(MESSAGES[1] + MESSAGES[2], [5]))
    assert frames[0].fds == [] and frames[1].fds == [5]
    # A chunk that ends inside the fd-carrying message: the fds wait for it.
    framer = Framer("front-end")
    assert frames_of(framer.feed(MESSAGES[1] + MESSAGES[2][:14], [6]))[0].fds == []
    assert frames_of(framer.feed(MESSAGES[2][14:]))[0].fds == [6]


@settings(max_examples=300, deadline=None)
@given(cuts=st.lists(st.integers(1, 200), max_size=20))
def test_any_chunking_gives_the_same_messages(cuts):
    stream = b"".join(MESSAGES * 3)
    framer = Framer("peer")
    out, position = [], 0
    for cut in cuts + [len(stream)]:
        out += frames_of(framer.feed(stream[position:position + cut]))
        position += cut
        if position >= len(stream):
            break
    assert b"".join(f.data for f in out) == stream
    assert [f.data for f in out] == MESSAGES * 3


def test_oversize_names_peer_offset_and_message_number():
    framer = Framer("connection 3 front-end")
    framer.feed(MESSAGES[0])
    with pytest.raises(FramingError) as error:
        framer.feed(MESSAGES[1] + struct.pack("<III", 5, 1, 1 << 20))
    assert [f.data for f in error.value.frames] == [MESSAGES[1]]  # nothing before the fault is lost
    assert "connection 3 front-end" in str(error.value)
    assert "stream offset 32" in str(error.value) and "#3" in str(error.value)
    rest, fds = framer.take_rest()
    assert rest == struct.pack("<III", 5, 1, 1 << 20)


def test_fds_that_arrive_where_no_message_begins_are_kept_as_stray():
    framer = Framer("peer")
    message = MESSAGES[3]
    framer.feed(message[:20])
    events = framer.feed(message[20:], [9])
    stray = [e for e in events if isinstance(e, StrayFds)]
    assert stray and stray[0].fds == [9] and stray[0].offset == 20
    assert frames_of(events)[0].data == message


def test_take_whole_takes_only_exactly_one_message_on_a_boundary():
    framer = Framer("connection 1 front-end")
    assert framer.take_whole(MESSAGES[1])                        # one whole message: taken and counted
    assert not framer.take_whole(MESSAGES[0] + MESSAGES[1])      # two messages: feed's job
    assert not framer.take_whole(MESSAGES[3][:20])               # a part
    assert not framer.take_whole(b"")
    framer.feed(MESSAGES[3][:20])
    assert not framer.take_whole(MESSAGES[0])                    # something is buffered: not on a boundary
    (frame,) = frames_of(framer.feed(MESSAGES[3][20:]))
    assert frame.offset == len(MESSAGES[1])                      # the taken message still counts in offsets
    assert not Framer("p", max_payload=4).take_whole(MESSAGES[1])   # oversize: feed reports it
    # ...and in message numbers: the fault is message #3 at the offset after the two before it.
    with pytest.raises(FramingError) as error:
        framer.feed(struct.pack("<III", 5, 1, 1 << 20))
    assert "#3" in str(error.value) and f"stream offset {len(MESSAGES[1]) + len(MESSAGES[3])}" in str(error.value)
