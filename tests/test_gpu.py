"""The vhost-user-gpu socket as its own protocol: its header (no version bits: requests carry flags 0, replies
exactly REPLY), every request of docs/interop/vhost-user-gpu.rst decoded field by field, its framing limits (an
UPDATE carries a whole screen of pixels), its reply rules and its expert checks."""
from __future__ import annotations

import io
import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from peers import qemu10, require  # noqa: F401  (qemu10: a pytest fixture)
from vhusniff.analysis.analyzer import Analyzer, direction_for
from vhusniff.capture.pcapng import read_capture
from vhusniff.engine.sockio import receive_chunk, send_message
from vhusniff.lab import peers as lab
from vhusniff.layers.packets import PAYLOAD_LAYERS, VhostUserGpu
from vhusniff.model import Channel, Direction, FdInfo, Record, RecordKind
from vhusniff.protocol import catalogue as cat
from vhusniff.protocol.context import ContextTracker
from vhusniff.protocol.framing import Framer, FramingError
from vhusniff.protocol.grammar import DEFAULT_CONTEXT, build_message, decode, encode
from vhusniff.protocol.replies import Expect, expectation
from vhusniff.replay.backend import replay_as_backend
from vhusniff.replay.frontend import replay_as_frontend

G = cat.GpuRequest
HEADER = struct.Struct("<III")
REPLY = cat.FLAG_REPLY


def gpu(request: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """A GPU-socket message as the peers write it: flags 0 on a request, 0x4 on a reply."""
    return HEADER.pack(request, flags, len(payload)) + payload


def display_info(*modes: tuple[int, int, int, int]) -> bytes:
    """struct virtio_gpu_resp_display_info: the 24-byte virtio-gpu header, then 16 x {x, y, w, h, enabled, flags}."""
    pmodes = b"".join(struct.pack("<6I", x, y, w, h, 1, 0) for x, y, w, h in modes)
    return struct.pack("<IIQIB3x", 0x1101, 0, 0, 0, 0) + pmodes.ljust(16 * 24, b"\0")


def edid() -> bytes:
    blob = bytes(range(128)).ljust(1024, b"\0")
    return struct.pack("<IIQIB3x", 0x1104, 0, 0, 0, 0) + struct.pack("<II", 128, 0) + blob


def dmabuf_scanout(modifier: int | None = None) -> bytes:
    body = struct.pack("<10I", 0, 0, 0, 1280, 800, 1280, 800, 5120, 0, int.from_bytes(b"XR24", "little"))
    return body + (struct.pack("<Q", modifier) if modifier is not None else b"")


def update(width: int, height: int, pixels: int | None = None) -> bytes:
    count = width * height * 4 if pixels is None else pixels
    return struct.pack("<5I", 0, 0, 0, width, height) + bytes(count)


# Every request and reply of the spec, as vhost-user-gpu and QEMU send them, with the summary it reads as.
MESSAGES = [
    (gpu(G.GET_PROTOCOL_FEATURES), "GET_PROTOCOL_FEATURES"),
    (gpu(G.GET_PROTOCOL_FEATURES, struct.pack("<Q", 3), REPLY),
     "GET_PROTOCOL_FEATURES reply gpu_protocol_features=0x3(EDID|DMABUF2)"),
    (gpu(G.SET_PROTOCOL_FEATURES, struct.pack("<Q", 1)), "SET_PROTOCOL_FEATURES gpu_protocol_features=0x1(EDID)"),
    (gpu(G.GET_DISPLAY_INFO), "GET_DISPLAY_INFO"),
    (gpu(G.GET_DISPLAY_INFO, display_info((0, 0, 1280, 800)), REPLY),
     "GET_DISPLAY_INFO reply type=0x1101 scanout0=1280x800+0+0"),
    (gpu(G.CURSOR_POS, struct.pack("<3I", 0, 10, 20)), "CURSOR_POS scanout=0 x=10 y=20"),
    (gpu(G.CURSOR_POS_HIDE, struct.pack("<3I", 0, 10, 20)), "CURSOR_POS_HIDE scanout=0 x=10 y=20"),
    (gpu(G.CURSOR_UPDATE, struct.pack("<5I", 0, 1, 2, 3, 4) + bytes(64 * 64 * 4)),
     "CURSOR_UPDATE scanout=0 x=1 y=2 hot=3,4 image=16384B"),
    (gpu(G.SCANOUT, struct.pack("<3I", 0, 1280, 800)), "SCANOUT scanout=0 1280x800"),
    (gpu(G.SCANOUT, struct.pack("<3I", 0, 0, 0)), "SCANOUT scanout=0 0x0 (disable)"),
    (gpu(G.UPDATE, update(4, 2)), "UPDATE scanout=0 4x2+0+0 pixels=32B"),
    (gpu(G.DMABUF_SCANOUT, dmabuf_scanout()),
     "DMABUF_SCANOUT scanout=0 1280x800+0+0 fd=1280x800 stride=5120 fourcc=b'XR24' flags=0x0"),
    (gpu(G.DMABUF_UPDATE, update(16, 16, 0)), "DMABUF_UPDATE scanout=0 16x16+0+0"),
    (gpu(G.DMABUF_UPDATE, b"", REPLY), "DMABUF_UPDATE reply"),
    (gpu(G.GET_EDID, struct.pack("<I", 0)), "GET_EDID scanout=0"),
    (gpu(G.GET_EDID, edid(), REPLY), "GET_EDID reply type=0x1104 edid=128B"),
    (gpu(G.DMABUF_SCANOUT2, dmabuf_scanout(0x0100000000000001)),
     "DMABUF_SCANOUT2 scanout=0 1280x800+0+0 fd=1280x800 stride=5120 fourcc=b'XR24' flags=0x0 "
     "modifier=0x100000000000001"),
]


@pytest.mark.parametrize("raw,summary", MESSAGES, ids=[summary.split(" ")[0] + str(i) for i, (_, summary)
                                                       in enumerate(MESSAGES)])
def test_every_gpu_message_decodes_by_name_with_its_fields_and_round_trips(raw, summary):
    message = decode(raw, Channel.GPU)
    assert message.problems == ()            # no bad-version: the GPU header has no version bits
    assert message.kind is not None and message.kind.startswith(("gpu_", "empty"))
    assert message.summary() == summary
    assert encode(message) == raw
    view = VhostUserGpu(raw)
    assert bytes(view) == raw and view.mysummary() == "vhost-user " + summary


def test_the_spec_requests_are_all_known():
    assert {int(r) for r in G if r} == set(cat.GPU_REQUESTS) == set(range(1, 13))


def test_built_gpu_messages_carry_the_peers_flags():
    request = build_message(Channel.GPU, G.GET_DISPLAY_INFO)
    reply = build_message(Channel.GPU, G.GET_PROTOCOL_FEATURES, {"gpu_protocol_features": 3}, reply=True)
    assert HEADER.unpack_from(request)[1] == 0
    assert HEADER.unpack_from(reply)[1] == REPLY
    assert bytes(VhostUserGpu(request=G.GET_DISPLAY_INFO)) == request


def test_main_channel_header_rules_do_not_apply_to_the_gpu_socket():
    # what the main channel calls version 0 and a bad reply flag word is the GPU's normal header
    assert decode(gpu(G.SCANOUT, struct.pack("<3I", 0, 1, 1)), Channel.GPU).problems == ()
    assert [p.code for p in decode(gpu(G.GET_PROTOCOL_FEATURES), Channel.MAIN).problems] == ["bad-version"]
    analyzer = Analyzer()
    for number, (raw, is_reply) in enumerate([(gpu(G.GET_DISPLAY_INFO), False),
                                              (gpu(G.GET_DISPLAY_INFO, display_info((0, 0, 8, 8)), REPLY), True)]):
        analyzer.feed(Record(number * 1000, 1, Channel.GPU, direction_for(Channel.GPU, is_reply), raw))
    analyzer.finish()
    assert [f.check for f in analyzer.findings] == []
    assert analyzer.transactions[0].outcome == "answered"


def test_gpu_requests_come_from_the_back_end():
    assert direction_for(Channel.GPU, False) == Direction.BACKEND_TO_FRONTEND
    assert direction_for(Channel.GPU, True) == Direction.FRONTEND_TO_BACKEND


@pytest.mark.parametrize("gpu_request,expect", [
    (G.GET_PROTOCOL_FEATURES, Expect.REPLY), (G.GET_DISPLAY_INFO, Expect.REPLY), (G.GET_EDID, Expect.REPLY),
    (G.DMABUF_UPDATE, Expect.REPLY), (G.SET_PROTOCOL_FEATURES, Expect.NOTHING), (G.UPDATE, Expect.NOTHING),
    (G.SCANOUT, Expect.NOTHING), (G.CURSOR_UPDATE, Expect.NOTHING)])
def test_reply_rules_and_no_need_reply_bit(gpu_request, expect):
    # bit 3 (NEED_REPLY on the main channel) means nothing here: contrib/vhost-user-gpu leaves UPDATE's flags as
    # whatever the buffer held
    message = decode(HEADER.pack(gpu_request, 0x8, 0), Channel.GPU, DEFAULT_CONTEXT)
    assert not message.need_reply
    assert expectation(message, 0) == expect


def test_a_whole_screen_update_is_framed_on_the_gpu_socket_and_nowhere_else():
    screen = gpu(G.UPDATE, update(1280, 800))
    assert len(screen) == 12 + 4_096_020
    framer = Framer.for_channel("connection 1 gpu channel back-end", Channel.GPU)
    frames = []
    for offset in range(0, len(screen), 65536):           # as recvmsg hands it over
        frames += framer.feed(screen[offset:offset + 65536])
    frames += framer.feed(gpu(G.SCANOUT, struct.pack("<3I", 0, 0, 0)))
    assert [len(f.data) for f in frames] == [len(screen), 24]
    assert Framer.for_channel("gpu", Channel.GPU).take_whole(screen)
    message = decode(screen, Channel.GPU)
    assert message.problems == () and message.summary() == "UPDATE scanout=0 1280x800+0+0 pixels=4096000B"
    # a cursor is the largest other GPU payload; nothing else may be that large, on any channel
    with pytest.raises(FramingError, match="payload size 16405 exceeds the maximum 16404"):
        Framer.for_channel("gpu", Channel.GPU).feed(HEADER.pack(G.SCANOUT, 0, 16405))
    with pytest.raises(FramingError, match="exceeds the maximum 4096"):
        Framer.for_channel("main", Channel.MAIN).feed(HEADER.pack(G.UPDATE, 1, 4_096_020))
    assert [p.code for p in decode(screen, Channel.MAIN).problems][:2] == ["bad-version", "oversize"]


def test_expert_checks_of_the_gpu_protocol():
    analyzer = Analyzer()
    messages = [gpu(G.SCANOUT, struct.pack("<3I", 0, 4, 2)), gpu(G.UPDATE, update(4, 2, 31)),
                gpu(G.CURSOR_POS, struct.pack("<3I", 16, 0, 0))]
    for number, raw in enumerate(messages):
        analyzer.feed(Record(number * 1000, 1, Channel.GPU, Direction.BACKEND_TO_FRONTEND, raw))
    analyzer.finish()
    assert [(f.check, f.number) for f in analyzer.findings] == [("gpu-update-size", 2),
                                                                ("gpu-scanout-out-of-range", 3)]


def test_scapy_builds_a_gpu_update_with_its_size():
    packet = VhostUserGpu(request=G.UPDATE) / PAYLOAD_LAYERS["gpu_update"](width=2, height=1, data=bytes(8))
    assert bytes(packet) == gpu(G.UPDATE, update(2, 1))


# ---- replay plays and serves the GPU socket in both roles ----------------------------------------------------

def _reader(sock: socket.socket, channel: Channel):
    """Whole messages (bytes, fds) from a blocking socket, framed as a receiver on `channel` frames them."""
    framer, ready = Framer.for_channel("test peer", channel), []
    while True:
        while ready:
            frame = ready.pop(0)
            yield frame.data, frame.fds
        data, fds, _truncated = receive_chunk(sock)
        if not data:
            return
        ready += [frame for frame in framer.feed(data, fds) if hasattr(frame, "data")]


SCREEN = (64, 40)


def gpu_recording() -> list[Record]:
    """A recorded session with a GPU socket, as the proxy records QEMU and vhost-user-gpu: the main channel's
    negotiation and GPU_SET_SOCKET, then the back-end's GPU requests and QEMU's replies, then a last request."""
    records: list[Record] = []

    def add(channel, direction, data, fds=()):
        records.append(Record(1_000 * (len(records) + 1), 1, channel, direction, data, list(fds)))

    front, back = Direction.FRONTEND_TO_BACKEND, Direction.BACKEND_TO_FRONTEND
    main = cat.FrontendRequest
    add(Channel.MAIN, front, build_message(Channel.MAIN, main.GET_FEATURES))
    add(Channel.MAIN, back, build_message(Channel.MAIN, main.GET_FEATURES, {"features": 1 << 32}, reply=True))
    add(Channel.MAIN, front, build_message(Channel.MAIN, main.GPU_SET_SOCKET), [FdInfo("socket", 7, 0, "", 0)])
    add(Channel.GPU, back, gpu(G.GET_PROTOCOL_FEATURES))
    add(Channel.GPU, front, gpu(G.GET_PROTOCOL_FEATURES, struct.pack("<Q", 3), REPLY))
    add(Channel.GPU, back, gpu(G.SET_PROTOCOL_FEATURES, struct.pack("<Q", 1)))
    add(Channel.GPU, back, gpu(G.GET_DISPLAY_INFO))
    add(Channel.GPU, front, gpu(G.GET_DISPLAY_INFO, display_info((0, 0, *SCREEN)), REPLY))
    add(Channel.GPU, back, gpu(G.SCANOUT, struct.pack("<3I", 0, *SCREEN)))
    add(Channel.GPU, back, gpu(G.UPDATE, update(*SCREEN)))
    add(Channel.MAIN, front, build_message(Channel.MAIN, main.GET_FEATURES))
    add(Channel.MAIN, back, build_message(Channel.MAIN, main.GET_FEATURES, {"features": 1 << 32}, reply=True))
    return records


def test_replay_as_backend_plays_the_recorded_gpu_requests_on_the_socket_the_front_end_passes(tmp_path):
    """The front-end here stands in for QEMU 10 (the front-end of vhost-user-gpu): it passes a GPU socket and
    answers on it, as QEMU does, and checks what the replayed back-end draws."""
    path = str(tmp_path / "backend.sock")
    out = io.StringIO()
    status: list[int] = []
    server = threading.Thread(target=lambda: status.append(replay_as_backend(gpu_recording(), path, out=out)))
    server.start()
    main = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    for _attempt in range(500):
        if os.path.exists(path):
            break
        threading.Event().wait(0.01)
    main.connect(path)
    ours, theirs = socket.socketpair()
    drawn = []
    try:
        replies = _reader(main, Channel.MAIN)
        main.sendall(build_message(Channel.MAIN, cat.FrontendRequest.GET_FEATURES))
        assert decode(next(replies)[0]).name == "GET_FEATURES"
        send_message(main, build_message(Channel.MAIN, cat.FrontendRequest.GPU_SET_SOCKET), [theirs.fileno()])
        theirs.close()
        for data, _fds in _reader(ours, Channel.GPU):
            message = decode(data, Channel.GPU)
            drawn.append(message.name)
            if message.request == G.GET_PROTOCOL_FEATURES:
                ours.sendall(gpu(G.GET_PROTOCOL_FEATURES, struct.pack("<Q", 3), REPLY))
            elif message.request == G.GET_DISPLAY_INFO:
                ours.sendall(gpu(G.GET_DISPLAY_INFO, display_info((0, 0, *SCREEN)), REPLY))
            elif message.request == G.UPDATE:
                assert (message.payload.width, message.payload.height) == SCREEN
                assert len(message.payload.data) == SCREEN[0] * SCREEN[1] * 4
                break
        main.sendall(build_message(Channel.MAIN, cat.FrontendRequest.GET_FEATURES))
        assert decode(next(replies)[0]).name == "GET_FEATURES"
    finally:
        main.close()
        ours.close()
        server.join(timeout=60)
    assert drawn == ["GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_DISPLAY_INFO", "SCANOUT", "UPDATE"]
    assert status == [0], out.getvalue()
    assert "GPU channel: 5 requests sent, 2 replies, 0 differences, 0 recorded requests not played" in out.getvalue()


def test_replay_as_frontend_answers_the_gpu_socket_with_the_recorded_replies(tmp_path):
    """The back-end here stands in for vhost-user-gpu: it takes the GPU socket from GPU_SET_SOCKET and asks for
    the protocol features and the display info on it, as vhost-user-gpu does when it starts."""
    path = str(tmp_path / "gpu-backend.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    asked: list[str] = []

    def backend() -> None:
        conn, _ = listener.accept()
        with conn:
            messages = _reader(conn, Channel.MAIN)
            for data, fds in messages:
                message = decode(data)
                if message.name == "GET_FEATURES":
                    conn.sendall(build_message(Channel.MAIN, message.request, {"features": 1 << 32}, reply=True))
                elif message.name == "GPU_SET_SOCKET":
                    with socket.socket(fileno=fds[0]) as gpu_socket:
                        answers = _reader(gpu_socket, Channel.GPU)
                        for request in (G.GET_PROTOCOL_FEATURES, G.GET_DISPLAY_INFO, G.GET_EDID):
                            gpu_socket.sendall(gpu(request, struct.pack("<I", 0) if request == G.GET_EDID else b""))
                            asked.append(decode(next(answers)[0], Channel.GPU).summary())
                        gpu_socket.sendall(gpu(G.SCANOUT, struct.pack("<3I", 0, *SCREEN)))

    thread = threading.Thread(target=backend)
    thread.start()
    out = io.StringIO()
    try:
        result = replay_as_frontend(gpu_recording(), path, out=out)
    finally:
        thread.join(timeout=60)
        listener.close()
    assert asked == ["GET_PROTOCOL_FEATURES reply gpu_protocol_features=0x3(EDID|DMABUF2)",
                     f"GET_DISPLAY_INFO reply type=0x1101 scanout0={SCREEN[0]}x{SCREEN[1]}+0+0",
                     "GET_EDID reply type=0x0 edid=0B"]          # nothing recorded: the reply's size, zeroed
    assert result.identical, result.divergences
    assert (result.gpu_requests, result.gpu_replies) == (4, 3)


def test_a_request_nothing_answers_is_a_request_whatever_its_reply_bit():
    """contrib/vhost-user-gpu writes UPDATE into uninitialised memory and never sets its flags: a real session has
    small UPDATEs with flags 0x5. QEMU reads no bit of a request's flags, so neither does the decoder, the analysis
    or the dissector: only GET_PROTOCOL_FEATURES, GET_DISPLAY_INFO, DMABUF_UPDATE and GET_EDID have replies."""
    raw = gpu(G.UPDATE, update(8, 16), flags=0x5)
    message = decode(raw, Channel.GPU)
    assert not message.is_reply and message.problems == ()
    assert message.summary() == "UPDATE scanout=0 8x16+0+0 pixels=512B"
    analyzer = Analyzer()
    analyzer.feed(Record(1000, 1, Channel.GPU, Direction.BACKEND_TO_FRONTEND, raw))
    analyzer.finish()
    assert analyzer.findings == []
    assert decode(gpu(G.GET_DISPLAY_INFO, display_info((0, 0, 8, 8)), REPLY), Channel.GPU).is_reply


# ---- the real session: QEMU 10 and vhost-user-gpu ------------------------------------------------------------

REAL = Path(__file__).resolve().parent.parent / "captures" / "qemu10-vhost-user-gpu.pcapng"


def test_every_gpu_message_of_the_real_session_decodes_by_name_without_main_channel_findings():
    records = list(read_capture(REAL))
    tracker = ContextTracker()
    gpu_messages = []
    for record in records:
        message = tracker.decode(record)
        if message is not None and record.channel == Channel.GPU:
            gpu_messages.append(message)
            assert message.name in G.__members__ and message.kind is not None and message.problems == (), \
                message.summary()
            assert not record.unframed and encode(message) == record.data
    names = {m.name for m in gpu_messages}
    assert {"GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_DISPLAY_INFO", "SCANOUT", "UPDATE"} <= names
    # contrib/vhost-user-gpu's uninitialised UPDATE flags: a request all the same
    assert any(m.flags & REPLY and m.name == "UPDATE" and not m.is_reply for m in gpu_messages)
    analyzer = Analyzer()
    for record in records:
        analyzer.feed(record)
    analyzer.finish()
    gpu_numbers = {n for n, r in enumerate(records, 1) if r.channel == Channel.GPU}
    assert [f.line() for f in analyzer.findings if f.number in gpu_numbers] == []


def _recorded_scanout(records: list[Record]) -> tuple[int, int]:
    scanouts = [decode(r.data, Channel.GPU) for r in records if r.channel == Channel.GPU and r.data[:4] ==
                struct.pack("<I", G.SCANOUT)]
    return scanouts[-1].payload.width, scanouts[-1].payload.height


def test_replay_as_backend_draws_the_recorded_scanout_in_a_real_qemu_10(qemu10, tmp_path):
    """No vhost-user-gpu runs: replay answers QEMU 10 from the recording and plays the recorded GPU requests on
    the socket QEMU passes in GPU_SET_SOCKET. QEMU's display starts at its console's 640x480 and takes the
    recorded scanout's size once replay plays SCANOUT, as QMP screendumps show; QEMU's replies on the GPU socket
    are the recorded ones (its display mode is the recorded session's)."""
    records = list(read_capture(REAL))
    recorded = _recorded_scanout(records)
    path, out, status = tmp_path / "replay.sock", io.StringIO(), []
    server = threading.Thread(target=lambda: status.append(replay_as_backend(records, str(path), out=out)))
    server.start()
    sizes: list[tuple[int, int]] = []
    try:
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with lab.start_qemu(tmp_path, lab.prepare_gpu(), path, device="gpu", qemu=qemu10, screen=recorded) as guest:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and guest.running and recorded not in sizes:
                try:
                    screen = guest.screendump(tmp_path / "screen.ppm")
                    sizes.append((screen.width, screen.height))
                except lab.LabError:          # the QMP socket is not there yet
                    pass
                time.sleep(0.5)
    finally:
        if server.is_alive() and path.exists():      # QEMU never connected: let replay's accept return
            with socket.socket(socket.AF_UNIX) as unblock:
                unblock.connect(str(path))
        server.join(timeout=120)
    assert sizes and sizes[0] != recorded and sizes[-1] == recorded, (sizes, out.getvalue()[-3000:])
    requests = sum(1 for r in records if r.channel == Channel.GPU and r.kind == RecordKind.MESSAGE and
                   not decode(r.data, Channel.GPU).is_reply)
    played = f"GPU channel: {requests} requests sent, 2 replies, 0 differences, 0 recorded requests not played"
    assert played in out.getvalue(), out.getvalue()[-3000:]


def test_replay_as_frontend_drives_a_real_vhost_user_gpu(tmp_path):
    """replay plays QEMU's side of the recording to vhost-user-gpu, the GPU socket included: vhost-user-gpu asks
    for the protocol features on it and gets the recorded answer."""
    require(str(lab.vhost_user_gpu_program()))
    records = list(read_capture(REAL))
    socket_path, out = tmp_path / "gpu.sock", io.StringIO()
    with lab.start_vhost_user_gpu(tmp_path, socket_path):
        result = replay_as_frontend(records, str(socket_path), out=out)
    assert result.gpu_requests >= 2 and result.gpu_replies >= 1, out.getvalue()
    assert not [d for d in result.divergences if "gpu" in d.lower()], result.divergences
    assert result.requests_sent > 20, out.getvalue()
