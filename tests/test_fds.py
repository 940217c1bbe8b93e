"""Fd descriptions: every eventfd shares one anonymous inode, so each is told apart by the kernel's eventfd id,
in the capture, `vhusniff read`, `vhusniff state` and the dissector."""
from __future__ import annotations

import os
import re
import socket

from test_dissector import needs_tshark, tshark_frames

from peers import kit, require  # noqa: F401  (kit is the real-QEMU guest kit fixture)
from vhusniff.capture.pcapng import read_capture, write_capture
from vhusniff.cli.main import main
from vhusniff.engine import fds
from vhusniff.engine.fds import describe_fd
from vhusniff.lab.command import record_boot
from vhusniff.model import Channel, Direction, FdInfo, Record, RecordKind
from vhusniff.protocol.grammar import build_message
from vhusniff.replay.fresh import FreshFds
from vhusniff.views.present import record_line

SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
ID = re.compile(r"eventfd-id:\d+")


def _fdinfo_id(fd: int) -> str:
    with open(f"/proc/self/fdinfo/{fd}") as info:
        line = next(line for line in info if line.startswith("eventfd-id:"))
    return "eventfd-id:" + line.split(":", 1)[1].strip()


def test_fresh_eventfds_share_an_inode_and_differ_by_the_kernels_id():
    first, second = os.eventfd(0), os.eventfd(0)
    again = os.dup(first)
    try:
        one, two, same = describe_fd(first), describe_fd(second), describe_fd(again)
        assert one.kind == two.kind == "eventfd" and one.inode == two.inode     # the shared anonymous inode
        assert ID.fullmatch(one.name) and ID.fullmatch(two.name)
        assert one.name == _fdinfo_id(first) and two.name == _fdinfo_id(second)
        assert one != two and one.summary() != two.summary()
        assert same == one, "a dup is the same eventfd, so the same description"
        assert one.summary() == f"{one.name} ino={one.inode}"
    finally:
        for fd in (first, second, again):
            os.close(fd)


def test_only_eventfds_read_fdinfo(monkeypatch):
    opened: list[str] = []
    real_open = os.open

    def watching_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(fds.os, "open", watching_open)
    memory = os.memfd_create("m")
    left, right = socket.socketpair()
    read_end, write_end = os.pipe()
    event = os.eventfd(0)
    try:
        kinds = [describe_fd(fd).kind for fd in (memory, left.fileno(), read_end)]
        assert kinds == ["memfd", "socket", "pipe"] and opened == []
        assert describe_fd(event).kind == "eventfd" and opened == [f"/proc/self/fdinfo/{event}"]
    finally:
        for fd in (memory, read_end, write_end, event):
            os.close(fd)
        left.close()
        right.close()


def test_eventfd_ids_survive_the_capture_and_old_eventfds_read_as_before(tmp_path, capsys):
    kick, call = FdInfo("eventfd", 26, name="eventfd-id:5"), FdInfo("eventfd", 26, name="eventfd-id:6")
    old = FdInfo("eventfd", 26)                # a capture written before the id was recorded
    records = [Record(1000 * i, 1, Channel.MAIN, Direction.FRONTEND_TO_BACKEND,
                      build_message(Channel.MAIN, request, dict(index=0, flags=0, reserved=0)), [fd])
               for i, (request, fd) in enumerate(((SET_VRING_KICK, kick), (SET_VRING_CALL, call),
                                                  (SET_VRING_ERR, old)))]
    path = tmp_path / "ids.pcapng"
    write_capture(path, records)
    assert [r.fds for r in read_capture(path)] == [[kick], [call], [old]]
    assert [fd.summary() for fd in (kick, call, old)] == \
        ["eventfd-id:5 ino=26", "eventfd-id:6 ino=26", "eventfd ino=26"]
    assert [record_line(1, 0.0, r, None).split("fds=")[1] for r in records] == \
        ["eventfd-id:5", "eventfd-id:6", "eventfd"]
    assert main(["state", str(path)]) == 0
    assert "kick=eventfd-id:5 call=eventfd-id:6 err=eventfd:26 " in capsys.readouterr().out


def test_a_real_sessions_kick_and_call_eventfds_are_told_apart(kit, tmp_path, capsys):
    require("qemu-storage-daemon")
    result, capture = record_boot(tmp_path, "blk")
    assert result.blk_io_ok, result.console
    records = list(read_capture(capture))
    vring_fds: dict[tuple[int, int], FdInfo] = {}          # (request, ring) -> the last fd it passed
    for record in records:
        if record.kind != RecordKind.MESSAGE or record.channel != Channel.MAIN or not record.fds:
            continue
        request, _flags, _size = (int.from_bytes(record.data[i:i + 4], "little") for i in (0, 4, 8))
        if request in (SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR):
            assert record.fds[0].kind == "eventfd" and ID.fullmatch(record.fds[0].name), record.fds
            vring_fds[(request, record.data[12])] = record.fds[0]
    rings = sorted({ring for request, ring in vring_fds if request == SET_VRING_KICK})
    assert rings
    for ring in rings:
        kick, call = vring_fds[(SET_VRING_KICK, ring)], vring_fds[(SET_VRING_CALL, ring)]
        assert kick.inode == call.inode, "eventfds share one inode: only the id tells them apart"
        assert kick.name != call.name and kick.summary() != call.summary()

    assert main(["state", str(capture)]) == 0
    state = capsys.readouterr().out
    shown = re.findall(r"vring (\d+):.* kick=(\S+) call=(\S+) err=(\S+)", state)
    assert shown, state
    for ring, kick_text, call_text, _err in shown:
        if int(ring) in rings:
            assert kick_text == vring_fds[(SET_VRING_KICK, int(ring))].name
            assert call_text == vring_fds[(SET_VRING_CALL, int(ring))].name
            assert kick_text != call_text

    assert main(["read", str(capture), "-Y", "request == SET_VRING_KICK || request == SET_VRING_CALL"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(ID.search(line.split("fds=")[1]) for line in lines), lines
    assert main(["read", str(capture), "-V", "-Y", "request == SET_VRING_CALL"]) == 0
    assert re.search(r"fd\[0\]: eventfd-id:\d+ ino=\d+", capsys.readouterr().out)


@needs_tshark
def test_the_dissector_shows_each_eventfds_id(tmp_path):
    first, second = os.eventfd(0), os.eventfd(0)
    try:
        kick, call = describe_fd(first), describe_fd(second)
    finally:
        os.close(first)
        os.close(second)
    records = [Record(1000 * i, 1, Channel.MAIN, Direction.FRONTEND_TO_BACKEND,
                      build_message(Channel.MAIN, request, dict(index=0, flags=0, reserved=0)), [fd])
               for i, (request, fd) in enumerate(((SET_VRING_KICK, kick), (SET_VRING_CALL, call)))]
    path = tmp_path / "ids.pcapng"
    write_capture(path, records)
    names = [[value for field, value in frame if field == "fd.name"] for frame in tshark_frames(str(path))]
    assert names == [[kick.name], [call.name]] and kick.name != call.name


def test_replay_gives_each_recorded_eventfd_its_own_fresh_eventfd():
    """Kick, call and err eventfds share one inode; their recorded ids keep them apart in replay too."""
    fresh = FreshFds()
    kick, call = FdInfo("eventfd", 26, name="eventfd-id:5"), FdInfo("eventfd", 26, name="eventfd-id:6")
    made = [fresh.make(kick), fresh.make(call), fresh.make(kick)]
    try:
        names = [describe_fd(fd).name for fd in made]
        assert names[0] != names[1] and names[0] == names[2]
    finally:
        for fd in made:
            os.close(fd)
        fresh.close()
