"""Replay and rewrites against real peers: a boot recorded through the proxy from real QEMU and
qemu-storage-daemon is played against a fresh qemu-storage-daemon (front-end role) and to a real QEMU (back-end
role, with a recorded back-end-channel request and with hook injections); REPLY_ACK masking and disconnect-at-N
go through the live proxy. The front-end role's back-end channel is exercised through the live proxy too: its
hook sends the config change a newer qemu-storage-daemon sends on a resize, and the replay's hooks react.

Outside CI a test skips when its program is missing; in CI (CI=true) it fails instead (as in test_lab.py).
A fake Python peer appears only where a test injects a fault no real peer makes (an unknown request).
"""
from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from peers import IN_CI, FakeFrontend, kit, open_fds, require  # noqa: F401  (kit is a fixture)
from vhusniff.capture.pcapng import read_capture
from vhusniff.engine.rewrites import DisconnectAt, MaskProtocolFeatures
from vhusniff.lab import peers as lab
from vhusniff.model import Channel, Direction, Record, RecordKind
from vhusniff.protocol import catalogue as cat
from vhusniff.protocol.context import ContextTracker
from vhusniff.protocol.grammar import build_message, decode
from vhusniff.replay import load_exchanges

REPO = Path(__file__).resolve().parent.parent
SHIPPED_BOOT = REPO / "captures" / "qemu-blk-boot.pcapng"
F = cat.FrontendRequest
B = cat.BackendRequest


def vhusniff(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhusniff.cli.main", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


def messages(capture: Path, connection: int | None = None):
    """(record, decoded message) for every message of a capture, decoded in its session's context."""
    tracker = ContextTracker()
    out = []
    for record in read_capture(capture):
        message = tracker.decode(record)
        if record.kind == RecordKind.MESSAGE and connection in (None, record.connection):
            out.append((record, message))
    return out


@pytest.fixture(scope="module")
def fresh_boot(tmp_path_factory) -> Path:
    """A blk boot recorded just now through the proxy, from real QEMU and qemu-storage-daemon."""
    require("qemu-system-x86_64")
    require("qemu-storage-daemon")
    from vhusniff.lab.command import record_boot
    result, capture = record_boot(tmp_path_factory.mktemp("boot"), timeout=60)
    assert result.blk_io_ok and result.clean_exit, result.console
    return capture


@pytest.fixture(params=["fresh", "shipped"])
def boot_capture(request, fresh_boot) -> Path:
    if request.param == "fresh":
        return fresh_boot
    if not SHIPPED_BOOT.exists() and not IN_CI:
        pytest.skip(f"{SHIPPED_BOOT.relative_to(REPO)} not shipped yet")
    return SHIPPED_BOOT


def test_frontend_replay_of_a_real_boot_against_a_fresh_backend_is_identical(boot_capture, tmp_path):
    replayed = tmp_path / "replayed.pcapng"
    with lab.start_storage_daemon(tmp_path, tmp_path / "backend.sock"):
        started = time.monotonic()
        run = vhusniff("replay", "--as", "frontend", str(boot_capture), "--backend", str(tmp_path / "backend.sock"),
                       "-w", str(replayed))
        elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stdout + run.stderr
    assert "identical to the recording" in run.stdout
    _connection, exchanges = load_exchanges(list(read_capture(boot_capture)), None)
    recorded_replies = sum(1 for exchange in exchanges if exchange.reply is not None)
    assert f"compared {recorded_replies} replies" in run.stdout and recorded_replies >= 10
    assert elapsed < 10, f"replay took {elapsed:.1f} s"
    # The replay's own capture holds the same conversation; only the ring bases it placed differ.
    diff = vhusniff("diff", str(boot_capture), str(replayed))
    lines = diff.stdout.splitlines()[:-1]
    assert lines and all("SET_VRING_BASE: vring.num" in line for line in lines), diff.stdout
    sent = [message.name for record, message in messages(replayed) if record.direction == Direction.FRONTEND_TO_BACKEND]
    assert sent == [decode(exchange.request.data).name for exchange in exchanges]
    fd_kinds = {fd.kind for record, _message in messages(replayed) for fd in record.fds}
    assert {"memfd", "eventfd", "socket"} <= fd_kinds
    # The replay's capture carries the recording's device type: virtio-blk bits by name, as in the recording.
    recorded_lines = _features_reply_lines(boot_capture)
    assert "|SEG_MAX|BLK_SIZE|" in recorded_lines[0], recorded_lines
    assert _features_reply_lines(replayed) == recorded_lines


def _features_reply_lines(capture: Path) -> list[str]:
    """`vhusniff read`'s GET_FEATURES reply lines, without frame number and time."""
    run = vhusniff("read", str(capture), "-Y", "request == GET_FEATURES && flags.reply")
    assert run.returncode == 0, run.stderr
    lines = [line.split(None, 2)[2] for line in run.stdout.splitlines()]
    assert lines and all("features=0x" in line for line in lines), run.stdout
    return lines


def test_backend_replay_capture_names_the_device_features_like_the_recording(kit, tmp_path):
    """The shipped recording notes device=blk; a real QEMU served from it gets the recorded GET_FEATURES reply,
    and `vhusniff read` of the replay's capture names its virtio-blk bits (SEG_MAX, BLK_SIZE...) the same way."""
    if not SHIPPED_BOOT.exists() and not IN_CI:
        pytest.skip(f"{SHIPPED_BOOT.relative_to(REPO)} not shipped yet")
    run = _serve_qemu(SHIPPED_BOOT, kit, tmp_path, lambda record, m: m is not None and m.request == F.GET_FEATURES
                      and m.is_reply and record.channel == Channel.MAIN)
    assert run.reached, run.output
    recorded, replayed = _features_reply_lines(SHIPPED_BOOT), _features_reply_lines(run.capture)
    assert "|SEG_MAX|BLK_SIZE|" in recorded[0], recorded
    assert replayed[0] == recorded[0]


def test_frontend_replay_against_a_different_backend_names_the_first_divergence(fresh_boot, tmp_path):
    # A twice larger disk: virtio-blk's capacity (config bytes 0-7) is the only thing that changes.
    with lab.start_storage_daemon(tmp_path, tmp_path / "backend.sock", size_mb=128):
        run = vhusniff("replay", "--as", "frontend", str(fresh_boot), "--backend", str(tmp_path / "backend.sock"))
    assert run.returncode == 1, run.stdout + run.stderr
    first = run.stdout.splitlines()[-1]
    assert "first divergence: message #" in first and "GET_CONFIG reply: config.data: bytes" in first, first
    # Capacity in 512-byte sectors, little-endian: 64 MiB = 0x20000, 128 MiB = 0x40000.
    assert first.endswith("config.data: bytes 2-2: recorded 02, replayed 04"), first
    assert run.stdout.count("reply DIFFERS") == 1, run.stdout


def test_frontend_replay_holds_delayed_replies_on_timers_not_counted_as_the_backend_s_slowness(fresh_boot,
                                                                                                 tmp_path):
    """--delay-replies holds each of the real back-end's replies 0.2 s before the scripted front-end sees it; the
    reply timeout (0.1 s) counts only the back-end's own time, so the replay is still identical."""
    replayed = tmp_path / "replayed.pcapng"
    with lab.start_storage_daemon(tmp_path, tmp_path / "backend.sock"):
        run = vhusniff("replay", "--as", "frontend", str(fresh_boot), "--backend", str(tmp_path / "backend.sock"),
                       "--delay-replies", "0.2", "--timeout", "0.1", "-w", str(replayed))
    assert run.returncode == 0 and "identical to the recording" in run.stdout, run.stdout + run.stderr
    sent = messages(replayed)
    replies = [index for index, (record, m) in enumerate(sent) if record.direction == Direction.BACKEND_TO_FRONTEND]
    assert len(replies) >= 10
    for index in replies:
        request, reply = sent[index - 1][0], sent[index][0]
        assert reply.note == "delayed by hook" and reply.timestamp_ns - request.timestamp_ns >= 0.2e9


def test_frontend_replay_cut_short_by_disconnect_at_names_the_first_request_not_sent(fresh_boot, tmp_path):
    with lab.start_storage_daemon(tmp_path, tmp_path / "backend.sock"):
        run = vhusniff("replay", "--as", "frontend", str(fresh_boot), "--backend", str(tmp_path / "backend.sock"),
                       "--disconnect-at", "3")
    assert run.returncode == 1, run.stdout + run.stderr
    first = run.stdout.splitlines()[-1]
    # Messages 1-3: GET_FEATURES, its reply, GET_PROTOCOL_FEATURES, after which the hook closes the connection.
    assert re.search(r"replayed 2 of .* first divergence: message #\d+ GET_PROTOCOL_FEATURES: no reply \(hook "
                     r"disconnected after message #3: disconnect-at 3: closing after message #3; recorded reply "
                     r"#\d+\)$", first), first


def test_frontend_replay_when_the_backend_is_gone(fresh_boot, tmp_path):
    run = vhusniff("replay", "--as", "frontend", str(fresh_boot), "--backend", str(tmp_path / "nobody.sock"))
    assert run.returncode == 1 and "cannot connect to the back-end" in run.stdout


def test_backend_replay_lets_a_real_qemu_start_the_device(fresh_boot, kit, tmp_path):
    """No back-end runs: the replay answers from the recording. Device start = SET_VRING_KICK with an eventfd,
    then SET_VRING_ENABLE num=1, every reply QEMU waits for sent, and a kick of the ring after it was enabled
    (the guest submitted I/O, which nothing serves)."""
    listen, served = tmp_path / "replay.sock", tmp_path / "served.pcapng"
    replay = _serve(fresh_boot, listen, "-w", str(served))
    try:
        assert listen.exists(), "replay did not listen"
        with lab.start_qemu(tmp_path, kit, listen) as guest:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not _started(served):
                time.sleep(0.1)
            assert guest.running, guest.console_text()
            console = guest.console_text()
    finally:
        output = replay.communicate(timeout=10)[0]
    assert _started(served), output
    assert "qemu-system-x86_64:" not in console, console      # QEMU reports every vhost-user error so
    records = list(read_capture(served))
    requests = [decode(r.data) for r in records if r.kind == RecordKind.MESSAGE and
                r.direction == Direction.FRONTEND_TO_BACKEND]
    replies = [decode(r.data) for r in records if r.kind == RecordKind.MESSAGE and
               r.direction == Direction.BACKEND_TO_FRONTEND]
    waited = [m for m in requests if m.need_reply or m.spec.reply_rule is cat.ReplyRule.ALWAYS]
    assert [m.request for m in replies] == [m.request for m in waited[:len(replies)]]
    assert len(replies) >= len(waited) - 1, "at most the request in flight when QEMU was stopped is unanswered"
    # QEMU was stopped once the device started: the recorded stop never came, which the replay says (exit 1)
    assert "0 not in the recording" in output and "recorded requests never came: " in output, output
    assert replay.returncode == 1, output


def _started(capture: Path) -> bool:
    """SET_VRING_KICK (with an fd), then SET_VRING_ENABLE num=1, then a kick of that ring, in this order."""
    if not capture.exists():
        return False
    stage = 0
    try:
        for record in read_capture(capture):
            if record.kind == RecordKind.EVENT:
                stage = 3 if stage == 2 and record.note.startswith("ring 0 kicked") else stage
                continue
            message = decode(record.data)
            if message.request == F.SET_VRING_KICK and not message.is_reply and len(record.fds) == 1:
                stage = 1
            elif stage == 1 and message.request == F.SET_VRING_ENABLE and message.payload.num == 1:
                stage = 2
    except Exception:  # a record still being written
        return False
    return stage == 3


def _fake_frontend(listen: Path, requests: list[bytes]) -> list[bytes | None]:
    """Fault injection: a front-end that sends what no real QEMU would, and collects what comes back (None when
    nothing came in 3 s or the replay closed the connection)."""
    frontend = FakeFrontend(listen, timeout=3)
    answers = []
    try:
        for request in requests:
            frontend.send(request)
            try:
                answers.append(frontend.receive().data)
            except (TimeoutError, EOFError):
                answers.append(None)
    finally:
        frontend.close()
    return answers


def _serve(capture: Path, listen: Path, *options: str) -> subprocess.Popen:
    """`vhusniff replay --as backend` on a capture, started and (within 10 s, unless it exits) listening."""
    replay = subprocess.Popen([sys.executable, "-m", "vhusniff.cli.main", "replay", "--as", "backend", str(capture),
                               "--listen", str(listen), *options], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 10
    while not listen.exists() and time.monotonic() < deadline and replay.poll() is None:
        time.sleep(0.02)
    return replay


def _serve_qemu(capture: Path, kit, tmp_path: Path, until, *options: str) -> Served:
    """`replay --as backend` on `capture` (its own capture with -w) and a real QEMU connected to it, until
    `until(record, message)` holds in the replay's capture (at most 30 s); then QEMU stops and the replay ends."""
    listen, served = tmp_path / "replay.sock", tmp_path / "served.pcapng"
    replay = _serve(capture, listen, "-w", str(served), *options)
    console, reached = "", False
    try:
        assert listen.exists(), "replay did not listen"
        with lab.start_qemu(tmp_path, kit, listen) as guest:
            reached = _wait_for(served, until, 30)
            console = guest.console_text()
    finally:
        output = replay.communicate(timeout=10)[0]
    return Served(served, output, replay.returncode, console, reached)


@dataclass
class Served:
    capture: Path
    output: str
    returncode: int
    console: str
    reached: bool         # did `until` hold before the 30 s ran out


@pytest.mark.parametrize("policy", ["default", "fail"])
def test_backend_replay_policy_for_a_request_the_recording_lacks(fresh_boot, tmp_path, policy):
    listen = tmp_path / "replay.sock"
    replay = _serve(fresh_boot, listen, "--unknown", policy, "--default-reply", "7")
    get_features = build_message(Channel.MAIN, F.GET_FEATURES)
    get_status = build_message(Channel.MAIN, F.GET_STATUS)     # QEMU 7.2 never sends it to this back-end
    answers = _fake_frontend(listen, [get_features, get_status])
    output = replay.communicate(timeout=10)[0]
    recorded_features = next(decode(e.reply.data).payload.features
                             for e in load_exchanges(list(read_capture(fresh_boot)), None)[1]
                             if e.reply is not None and decode(e.request.data).request == F.GET_FEATURES)
    assert decode(answers[0]).payload.features == recorded_features
    if policy == "default":
        assert struct.unpack("<IIIQ", answers[1]) == (F.GET_STATUS, 0x5, 8, 7)
        assert "1 not in the recording" in output, output
        # the front-end left after two requests: the rest of the recording never came (exit 1)
        assert replay.returncode == 1 and "recorded requests never came: " in output, output
    else:
        assert answers[1] is None, "the session ends instead of an answer"
        assert replay.returncode == 1 and "GET_STATUS is not in the recording (policy: fail)" in output, output


def test_hook_that_raises_during_replay_is_reported_then_the_policy_applies(fresh_boot, tmp_path):
    hook = tmp_path / "broken_hook.py"
    hook.write_text("def message(flow):\n"
                    "    if flow.message.name == 'GET_CONFIG' and not flow.message.is_reply:\n"
                    "        raise ValueError('hook bug')\n")
    with lab.start_storage_daemon(tmp_path, tmp_path / "backend.sock"):
        forward = vhusniff("replay", "--as", "frontend", str(fresh_boot), "--backend", str(tmp_path / "backend.sock"),
                           "--hook", str(hook))
        disconnect = vhusniff("replay", "--as", "frontend", str(fresh_boot), "--backend",
                              str(tmp_path / "backend.sock"), "--hook", str(hook), "--on-hook-error", "disconnect")
    for run in (forward, disconnect):
        assert "raised on connection 1 message #" in run.stdout and "(GET_CONFIG" in run.stdout, run.stdout
        assert "Traceback" in run.stdout and "ValueError: hook bug" in run.stdout
    assert forward.returncode == 0 and "identical to the recording" in forward.stdout
    assert disconnect.returncode == 1
    assert "first divergence: message #" in disconnect.stdout and "GET_CONFIG: not sent" in disconnect.stdout


def test_masking_reply_ack_through_the_proxy_stops_need_reply_and_the_guest_still_does_io(fresh_boot, tmp_path):
    require("qemu-storage-daemon")
    from vhusniff.lab.command import record_boot
    result, capture = record_boot(tmp_path, hooks=[MaskProtocolFeatures(["REPLY_ACK"])], timeout=60)
    assert result.blk_io_ok and result.clean_exit, result.console
    sent = messages(capture)
    requests = [m for record, m in sent if record.direction == Direction.FRONTEND_TO_BACKEND and not m.is_reply]
    acked = next(m for m in requests if m.request == F.SET_PROTOCOL_FEATURES).payload.protocol_features
    assert not acked & 1 << 3 and acked & 1 << 15, hex(acked)     # REPLY_ACK gone, CONFIGURE_MEM_SLOTS kept
    assert [m.name for m in requests if m.need_reply] == []
    assert any(m.request == F.ADD_MEM_REG for m in requests)        # which QEMU sets NEED_REPLY on otherwise
    # `vhusniff diff` against an unmasked boot names the change where it starts.
    diff = vhusniff("diff", str(fresh_boot), str(capture))
    assert diff.returncode == 1
    assert "SET_PROTOCOL_FEATURES: protocol_features: A 0x8f2b, B 0x8f23 (only A: REPLY_ACK)" in diff.stdout, \
        diff.stdout
    assert "SET_BACKEND_REQ_FD: flags.need_reply: A 1, B 0" in diff.stdout


def test_disconnect_at_n_makes_qemu_report_the_backend_lost(tmp_path):
    require("qemu-storage-daemon")
    from vhusniff.lab.command import record_boot
    result, capture = record_boot(tmp_path, hooks=[DisconnectAt(5)], timeout=30)
    assert result.exit_code != 0 and not result.blk_io_ok
    # QEMU 7.2 finds the back-end gone when it sends GET_QUEUE_NUM or waits for its reply (which, depends on
    # timing: "Failed to write msg" on a loaded machine, "Failed to read msg header" otherwise), retries the
    # realize, then gives up.
    assert re.search(r"Failed to (read msg header|read msg payload|write msg)|Unexpected end-of-file",
                     result.console), result.console
    assert "vhost_backend_init failed" in result.console
    by_connection: dict[int, list] = {}
    for record, message in messages(capture):
        by_connection.setdefault(record.connection, []).append(message)
    assert by_connection, "the capture holds the sessions"
    for connection, sent in by_connection.items():
        assert len(sent) == 5, (connection, [m.summary() for m in sent])
    events = [r.note for r in read_capture(capture) if r.kind == RecordKind.EVENT]
    assert sum("disconnect-at 5" in note for note in events) == len(by_connection)
    for connection in by_connection:        # each connection's disconnect comes right after its 5th message
        records = [r for r in read_capture(capture) if r.connection == connection]
        at = next(i for i, r in enumerate(records) if "disconnect-at 5" in r.note)
        assert sum(r.kind == RecordKind.MESSAGE for r in records[:at]) == 5


# ---- back-end role: the back-end channel (recorded requests, injected ones) ----
#
# qemu-storage-daemon 7.2 sends nothing on the back-end channel: on QMP block_resize it grows the disk but
# neither notifies the front-end nor updates the capacity its GET_CONFIG reports (both came with QEMU 8.0's
# vu_blk_exp_resize). So the recording below has a proxy hook do what a newer daemon does: send
# BACKEND_CONFIG_CHANGE_MSG on the back-end channel and report the grown capacity in the next GET_CONFIG reply.
# QEMU's part is its own: it asks GET_CONFIG again and acks the request. QEMU 7.2 ignores the message until the
# device has started (vhost_user_blk_handle_config_change), hence the moment chosen.

RESIZED_SECTORS = (128 << 20) // 512


class ResizeNotice:
    """When the device first starts (SET_VRING_ENABLE num=1): inject BACKEND_CONFIG_CHANGE_MSG (NEED_REPLY) toward
    QEMU on the back-end channel, then report RESIZED_SECTORS in the next GET_CONFIG reply."""

    def __init__(self):
        self.notified = self.reported = False

    def message(self, flow) -> None:
        m = flow.message
        if m.channel != Channel.MAIN:
            return
        if not self.notified and not m.is_reply and m.request == F.SET_VRING_ENABLE and m.payload.num == 1:
            self.notified = True
            flow.inject(build_message(Channel.BACKEND, B.CONFIG_CHANGE_MSG, need_reply=True), to_backend=False,
                        channel=Channel.BACKEND)
        elif self.notified and not self.reported and m.is_reply and m.request == F.GET_CONFIG:
            self.reported = True
            data = bytearray(flow.original)
            struct.pack_into("<Q", data, 12 + 12, RESIZED_SECTORS)    # header, offset/size/flags, capacity
            flow.replace(bytes(data))


@pytest.fixture(scope="module")
def resize_boot(tmp_path_factory) -> Path:
    """A blk boot through the proxy in which the disk is announced to grow from 64 to 128 MiB as it starts."""
    require("qemu-system-x86_64", "qemu-storage-daemon")
    from vhusniff.lab.command import record_boot
    result, capture = record_boot(tmp_path_factory.mktemp("resize"), hooks=[ResizeNotice()], timeout=60)
    assert result.blk_io_ok and result.clean_exit, result.console
    return capture


def _capacity(message) -> int:
    """virtio-blk capacity (512-byte sectors) in a GET_CONFIG reply."""
    return struct.unpack_from("<Q", message.payload.data)[0]


def _config_change_reaction(sent: list) -> tuple[int, object]:
    """The position of the BACKEND_CONFIG_CHANGE_MSG and the reply to the GET_CONFIG QEMU sent after it; asserts
    QEMU's reaction: a GET_CONFIG on the main channel, then its ack (0) of the back-end request, in that order."""
    at = next(i for i, (record, m) in enumerate(sent)
              if record.channel == Channel.BACKEND and m.request == B.CONFIG_CHANGE_MSG and not m.is_reply)
    after = [(record.channel, m) for record, m in sent[at + 1:]]
    asked = next((i for i, (channel, m) in enumerate(after)
                  if channel == Channel.MAIN and m.request == F.GET_CONFIG and not m.is_reply), None)
    assert asked is not None, [m.summary() for _channel, m in after]
    reply = after[asked + 1][1]
    assert (reply.request, reply.is_reply) == (F.GET_CONFIG, True)
    acks = [m for channel, m in after if channel == Channel.BACKEND]
    assert [(m.request, m.is_reply, m.payload.ack) for m in acks] == [(B.CONFIG_CHANGE_MSG, True, 0)], \
        [m.summary() for m in acks]
    assert after.index((Channel.BACKEND, acks[0])) > asked + 1, "QEMU acks after it has the new config"
    return at, reply


def _wait_for(capture: Path, predicate, seconds: float) -> bool:
    """Poll a capture being written until some (record, message or None for an event) satisfies predicate."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            tracker = ContextTracker()
            if capture.exists() and any(predicate(record, tracker.decode(record)) for record in read_capture(capture)):
                return True
        except Exception:  # a record still being written
            pass
        time.sleep(0.1)
    return False


def _is_backend_channel_reply(record, _message) -> bool:
    return record.kind == RecordKind.MESSAGE and record.channel == Channel.BACKEND and \
        record.direction == Direction.FRONTEND_TO_BACKEND


def test_recording_holds_a_real_qemu_reaction_to_a_config_change(resize_boot):
    sent = messages(resize_boot)
    at, reply = _config_change_reaction(sent)
    first = next(m for record, m in sent[:at] if m.request == F.GET_CONFIG and m.is_reply)
    assert (_capacity(first), _capacity(reply)) == (64 << 11, RESIZED_SECTORS)
    assert sent[at - 1][1].request == F.SET_VRING_ENABLE and sent[at][0].note == "injected by hook"


def test_backend_replay_plays_the_recorded_config_change_to_a_real_qemu(resize_boot, kit, tmp_path):
    """The recorded BACKEND_CONFIG_CHANGE_MSG goes out on the socket QEMU passed in SET_BACKEND_REQ_FD, right
    after the SET_VRING_ENABLE recorded before it; QEMU asks GET_CONFIG, gets the recorded 128 MiB and acks."""
    run = _serve_qemu(resize_boot, kit, tmp_path, _is_backend_channel_reply)
    output = run.output
    assert "qemu-system-x86_64:" not in run.console, run.console
    recorded = next(record for record, m in messages(resize_boot) if record.channel == Channel.BACKEND)
    sent = messages(run.capture)
    at, reply = _config_change_reaction(sent)
    assert sent[at][0].data == recorded.data and sent[at][0].direction == Direction.BACKEND_TO_FRONTEND
    before = sent[at - 1][1]
    assert (before.request, before.is_reply, before.payload.num) == (F.SET_VRING_ENABLE, False, 1)
    assert _capacity(reply) == RESIZED_SECTORS, "the recorded reply to the second GET_CONFIG"
    assert "CONFIG_CHANGE_MSG reply CONFIG_CHANGE_MSG reply ack=0: same" in output, output
    assert "back-end channel: 1 requests sent, 1 replies, 0 differences, 0 recorded requests not played" in output
    assert "0 not in the recording" in output, output
    assert run.returncode == 1 and "recorded requests never came: " in output, "QEMU was stopped early: " + output


def test_backend_replay_without_a_backend_channel_reports_the_request_it_could_not_send(resize_boot, kit,
                                                                                        tmp_path):
    """With BACKEND_REQ masked out of the replayed GET_PROTOCOL_FEATURES reply, QEMU passes no back-end channel
    socket: the recorded request is reported as not sent, and the session goes on."""
    run = _serve_qemu(resize_boot, kit, tmp_path,
                      lambda record, m: record.kind == RecordKind.EVENT and "not sent" in record.note,
                      "--mask-protocol-features", "BACKEND_REQ")
    output, served = run.output, run.capture
    sent = [m for _record, m in messages(served)]
    assert F.SET_BACKEND_REQ_FD not in [m.request for m in sent] and F.SET_VRING_ENABLE in [m.request for m in sent]
    assert all(record.channel == Channel.MAIN for record, _m in messages(served))
    assert "CONFIG_CHANGE_MSG (recorded #" in output and "not sent: no back-end channel" in output, output
    assert "back-end channel: 0 requests sent, 0 replies, 0 differences, 1 recorded requests not played" in output


def test_backend_replay_hook_injects_on_the_backend_channel_and_delays_a_reply(fresh_boot, kit, tmp_path):
    """A hook file, with a real QEMU: holds the first ADD_MEM_REG ack 0.5 s, injects BACKEND_CONFIG_CHANGE_MSG
    after it (the device has started by then) and a front-end request, which makes no sense from a back-end."""
    hook = tmp_path / "inject_hook.py"
    hook.write_text(
        "from vhusniff.model import Channel\n"
        "from vhusniff.protocol.grammar import build_message\n"
        "done = False\n"
        "def message(flow):\n"
        "    global done\n"
        "    if not done and flow.message.name == 'ADD_MEM_REG' and flow.message.is_reply:\n"
        "        done = True\n"
        "        flow.delay(0.5)\n"
        "        flow.inject(build_message(Channel.BACKEND, 2, need_reply=True), channel=Channel.BACKEND)\n"
        "        flow.inject(build_message(Channel.MAIN, 3), to_backend=True)\n")
    run = _serve_qemu(fresh_boot, kit, tmp_path, _is_backend_channel_reply, "--hook", str(hook))
    output = run.output
    assert "qemu-system-x86_64:" not in run.console, run.console
    recorded_configs = [m for record, m in messages(fresh_boot) if m.request == F.GET_CONFIG and not m.is_reply]
    assert len(recorded_configs) == 1, "without a config change QEMU asks GET_CONFIG once, at realize"
    sent = messages(run.capture)
    at, _reply = _config_change_reaction(sent)
    (request_record, request), (reply_record, reply) = sent[at - 2], sent[at - 1]
    assert (request.request, reply.request, reply.is_reply) == (F.ADD_MEM_REG, F.ADD_MEM_REG, True)
    assert reply_record.timestamp_ns - request_record.timestamp_ns >= 0.5e9, "the delay was not honoured"
    assert ("a hook injected SET_OWNER on the main channel F>B: back-end replay sends only what a back-end sends "
            "(B>F: replies on the main channel, requests on the back-end channel); skipped") in output, output
    assert [m.request for _r, m in sent].count(F.SET_OWNER) == 1, "only QEMU's own SET_OWNER"
    assert "injected CONFIG_CHANGE_MSG reply CONFIG_CHANGE_MSG reply ack=0: (none recorded)" in output, output
    assert run.returncode == 1 and "recorded requests never came: " in output, "QEMU was stopped early: " + output


def test_backend_replay_hook_that_drops_a_request_still_sends_its_injections(fresh_boot, kit, tmp_path):
    """As in the proxy: a dropped message's injections go anyway. The hook drops QEMU's SET_VRING_ENABLE num=1
    (it wants no reply) and injects a config change in its place; QEMU reacts to the change."""
    hook = tmp_path / "drop_hook.py"
    hook.write_text(
        "from vhusniff.model import Channel\n"
        "from vhusniff.protocol.grammar import build_message\n"
        "def message(flow):\n"
        "    if flow.message.name == 'SET_VRING_ENABLE' and not flow.message.is_reply and flow.message.payload.num:\n"
        "        flow.drop()\n"
        "        flow.inject(build_message(Channel.BACKEND, 2, need_reply=True), channel=Channel.BACKEND,\n"
        "                    to_backend=False)\n")
    run = _serve_qemu(fresh_boot, kit, tmp_path, _is_backend_channel_reply, "--hook", str(hook))
    output, served = run.output, run.capture
    sent = messages(served)
    enables = [r.note for r, m in sent if m.request == F.SET_VRING_ENABLE and m.payload.num]
    assert enables and set(enables) == {"dropped by hook (not forwarded)"}, enables
    assert any("hook dropped front-end request SET_VRING_ENABLE" in r.note for r in read_capture(served))
    assert "skipped" not in output, output
    _config_change_reaction(sent)


def test_backend_replay_keeps_answering_while_a_backend_channel_reply_is_missing(fresh_boot, tmp_path):
    """Fault injection: a front-end that never answers a back-end request with NEED_REPLY (QEMU always does)
    and later sends a reply nothing asked for. The main channel is served meanwhile; both are reported."""
    hook = tmp_path / "notify_hook.py"
    hook.write_text(
        "from vhusniff.model import Channel\n"
        "from vhusniff.protocol.grammar import build_message\n"
        "def message(flow):\n"
        "    if flow.message.name == 'SET_BACKEND_REQ_FD' and flow.message.is_reply:\n"
        "        flow.inject(build_message(Channel.BACKEND, 2, need_reply=True), channel=Channel.BACKEND)\n")
    listen, served = tmp_path / "replay.sock", tmp_path / "served.pcapng"
    replay = _serve(fresh_boot, listen, "--hook", str(hook), "--timeout", "0.5", "-w", str(served))
    frontend = FakeFrontend(listen, timeout=3)
    ours, theirs = socket.socketpair()
    try:
        frontend.send(build_message(Channel.MAIN, F.SET_PROTOCOL_FEATURES, {"protocol_features": 0x8F2B}))
        frontend.send(build_message(Channel.MAIN, F.SET_BACKEND_REQ_FD, need_reply=True), [theirs.fileno()])
        theirs.close()
        assert decode(frontend.receive().data).request == F.SET_BACKEND_REQ_FD
        ours.settimeout(3)
        assert struct.unpack("<III", ours.recv(64)) == (B.CONFIG_CHANGE_MSG, 0x9, 0)
        frontend.send(build_message(Channel.MAIN, F.GET_FEATURES))       # answered while the ack is due
        assert decode(frontend.receive().data).request == F.GET_FEATURES
        assert _wait_for(served, lambda record, _m: "no reply from the front-end" in record.note, 5)
        ours.sendall(build_message(Channel.BACKEND, B.CONFIG_CHANGE_MSG, {"ack": 0}, reply=True, kind="ack"))
        assert _wait_for(served, _is_backend_channel_reply, 5)
    finally:
        frontend.close()
        ours.close()
    output = replay.communicate(timeout=10)[0]
    assert "injected CONFIG_CHANGE_MSG: no reply from the front-end within 0.5 s" in output, output
    assert "the front-end sent CONFIG_CHANGE_MSG reply ack=0, which nothing asked for" in output, output
    assert replay.returncode == 1 and "recorded requests never came: " in output, "a front-end of 3 requests"


# ---- front-end role: hooks on the back-end channel, injected fds ----

def _replay_in_process(capture: Path, backend: Path, written: Path, hooks) -> tuple[object, str]:
    """replay --as frontend in this process (so that its fds can be counted): (result, what it printed)."""
    import io

    from vhusniff.capture.pcapng import CaptureWriter
    from vhusniff.replay import replay_as_frontend
    out, writer = io.StringIO(), CaptureWriter(written, flush_each=True)
    try:
        result = replay_as_frontend(list(read_capture(capture)), str(backend), writer=writer, out=out, hooks=hooks)
    finally:
        writer.close()
    return result, out.getvalue()


class CallCopies:
    """After each SET_VRING_CALL: the same request again with an eventfd of its own (sent), and a GET_FEATURES
    reply with an eventfd, which a front-end cannot send (skipped). Every fd is the replay's to close."""

    def __init__(self):
        self.made: list[int] = []

    def message(self, flow) -> None:
        m = flow.message
        if m.channel == Channel.MAIN and m.request == F.SET_VRING_CALL and not m.is_reply and flow.fds:
            sent, skipped = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
            self.made += [sent, skipped]
            flow.inject(flow.original, fds=[sent])
            flow.inject(build_message(Channel.MAIN, F.GET_FEATURES, {"features": 0}, reply=True), to_backend=False,
                        fds=[skipped])


def test_frontend_replay_closes_the_fds_a_hook_injects(fresh_boot, tmp_path):
    written, hook = tmp_path / "replayed.pcapng", CallCopies()
    with lab.start_storage_daemon(tmp_path, tmp_path / "backend.sock"):
        before = open_fds()
        result, output = _replay_in_process(fresh_boot, tmp_path / "backend.sock", written, [hook])
        after = open_fds()
    assert after == before, f"fds left open: {sorted(after - before)} (the hook made {hook.made})"
    assert result.identical, output
    calls = [(record, m) for record, m in messages(written) if m.request == F.SET_VRING_CALL]
    injected = [record for record, _m in calls if record.note == "injected by hook"]
    assert len(hook.made) >= 2 and len(injected) == len(hook.made) // 2 == len(calls) // 2, output
    assert all([fd.kind for fd in record.fds] == ["eventfd"] for record in injected)
    assert output.count("a hook injected GET_FEATURES reply features=0x0(0) on the main channel B>F: front-end "
                        "replay sends only what a front-end sends") == len(hook.made) // 2, output


CONFIG_REQUEST = build_message(Channel.MAIN, F.GET_CONFIG, {"offset": 0, "size": 8, "flags": 0, "data": bytes(8)})
NOT_FROM_A_FRONTEND = {
    "answer": build_message(Channel.BACKEND, B.CONFIG_CHANGE_MSG, need_reply=True),   # a back-end request
    "drop": build_message(Channel.MAIN, F.GET_FEATURES, {"features": 0}, reply=True),  # a back-end reply
}


class ConfigChangeReaction:
    """The replay's hook, in the front-end role, on the back-end's BACKEND_CONFIG_CHANGE_MSG: asks GET_CONFIG on
    the main channel as QEMU does, and injects something a front-end cannot send (with an eventfd).
    "answer": the replay's own ack is held 0.5 s. "drop": the request is held 0.5 s and dropped (so the
    replay does not answer it) and the hook injects the ack itself. "disconnect": the session ends there."""

    def __init__(self, variant: str):
        self.variant = variant

    def message(self, flow) -> None:
        m = flow.message
        if m.channel != Channel.BACKEND or m.request != B.CONFIG_CHANGE_MSG:
            return
        if m.is_reply:
            if self.variant == "answer":
                flow.delay(0.5)
            return
        if self.variant == "disconnect":
            flow.disconnect("the hook ends the session at the config change")
            return
        flow.inject(CONFIG_REQUEST, to_backend=True, channel=Channel.MAIN)
        senseless = NOT_FROM_A_FRONTEND[self.variant]
        flow.inject(senseless, to_backend=False, channel=Channel.BACKEND if self.variant == "answer" else Channel.MAIN,
                    fds=[os.eventfd(0, os.EFD_CLOEXEC)])
        if self.variant == "drop":
            flow.delay(0.5)
            flow.drop()
            flow.inject(build_message(Channel.BACKEND, B.CONFIG_CHANGE_MSG, {"ack": 0}, reply=True, kind="ack"),
                        to_backend=True)


@pytest.mark.parametrize("variant", ["answer", "drop", "disconnect"])
def test_frontend_replay_hooks_act_on_the_backend_channel(fresh_boot, tmp_path, variant):
    """Replay against a real qemu-storage-daemon through the proxy, whose hook (ResizeNotice) sends
    BACKEND_CONFIG_CHANGE_MSG when the device starts, as a newer daemon would on a resize, and reports
    128 MiB in the next GET_CONFIG reply. The replay's hook reacts on the back-end channel (see
    ConfigChangeReaction); the replay's own requests and replies stay as recorded."""
    from vhusniff.proxy import Proxy, Route
    backend, proxy_socket, written = tmp_path / "backend.sock", tmp_path / "proxy.sock", tmp_path / "replayed.pcapng"
    with lab.start_storage_daemon(tmp_path, backend):
        proxy = Proxy([Route.forward(proxy_socket, backend, "blk")], hooks=[ResizeNotice()], report=None).start()
        try:
            before = open_fds()
            result, output = _replay_in_process(fresh_boot, proxy_socket, written, [ConfigChangeReaction(variant)])
            assert proxy.wait_until(lambda p: p.connections_total == 1 and p.active_connections == 0, 10)
            after = open_fds()
        finally:
            proxy.stop()
    sent = messages(written)
    at = next(i for i, (record, m) in enumerate(sent) if record.channel == Channel.BACKEND and not m.is_reply)
    notice = sent[at][0]
    acks = [(record, m) for record, m in sent[at:] if record.channel == Channel.BACKEND and m.is_reply]
    assert after == before, f"fds left open: {sorted(after - before)}"
    if variant == "disconnect":
        assert not result.identical and "the hook ends the session at the config change" in result.divergences[0]
        assert "hook disconnected at message #" in output and "the hook ends the session at the config" in output
        assert acks == [] and all(m.request != F.GET_CONFIG for _record, m in sent[at:])
        return
    assert result.identical, output          # the reply to the injected GET_CONFIG was not taken for another's
    # Like a real front-end, the replay never has two requests waiting on the main channel.
    expert = vhusniff("expert", str(written)).stdout
    assert not {"reply-mismatch", "unexpected-reply", "missing-reply"} & set(expert.split()), expert
    asked = next(i for i, (record, m) in enumerate(sent) if i > at and m.request == F.GET_CONFIG)
    request_record = sent[asked][0]
    reply = next(m for record, m in sent[asked:] if m.request == F.GET_CONFIG and m.is_reply)
    assert (request_record.data, request_record.note) == (CONFIG_REQUEST, "injected by hook")
    assert _capacity(reply) == RESIZED_SECTORS, "the proxy's answer to the injected request"
    assert f"injected GET_CONFIG offset=0 size=8 flags=0 data=8B: reply {reply.summary()}" in output, output
    assert [(m.request, m.payload.ack) for _record, m in acks] == [(B.CONFIG_CHANGE_MSG, 0)]
    ack_record = acks[0][0]
    assert ack_record.timestamp_ns > request_record.timestamp_ns, "the ack comes after the injected request"
    # The proxy passed the ack on to the daemon's back-end channel.
    assert [r.direction for r in proxy.records if r.channel == Channel.BACKEND and r.kind == RecordKind.MESSAGE] \
        == [Direction.BACKEND_TO_FRONTEND, Direction.FRONTEND_TO_BACKEND]
    if variant == "answer":
        assert ack_record.note == "delayed by hook", ack_record.note
        assert ack_record.timestamp_ns - notice.timestamp_ns >= 0.5e9, "answer not held"
        assert ("a hook injected CONFIG_CHANGE_MSG on the back-end channel B>F: front-end replay sends only what a "
                "front-end sends (F>B: requests on the main channel, replies on the back-end channel); skipped") \
            in output, output
    else:
        assert ack_record.note == "injected by hook" and "hook dropped back-end request CONFIG_CHANGE_MSG" in output
        proxy_notice = next(r for r in proxy.records if r.channel == Channel.BACKEND and r.kind == RecordKind.MESSAGE)
        assert request_record.timestamp_ns - proxy_notice.timestamp_ns >= 0.5e9, "the request was not held"
        assert "a hook injected GET_FEATURES reply features=0x0(0) on the main channel B>F: front-end replay" in output


def test_backend_replay_names_the_recorded_requests_that_never_came_and_exits_1(tmp_path):
    """The front-end sends the recording's first requests, as recorded, and leaves: each of the rest is a recorded
    request that never came; every one that came is not. Exit 1 (the session did not go as recorded)."""
    listen = tmp_path / "replay.sock"
    records = list(read_capture(SHIPPED_BOOT))
    _connection, exchanges = load_exchanges(records, None)
    first = [exchange.request.data for exchange in exchanges[:3] if not exchange.request.fds]
    replay = _serve(SHIPPED_BOOT, listen)
    _fake_frontend(listen, first)
    output = replay.communicate(timeout=10)[0]
    missing = len(exchanges) - len(first)
    assert f"{missing} of {len(exchanges)} recorded requests never came: #{exchanges[len(first)].number} " in output, \
        output
    assert replay.returncode == 1, output


def test_a_front_end_request_whose_flags_claim_a_reply_is_a_request_with_no_recorded_reply():
    """The main channel's front-end sends only requests: one with the REPLY bit (a fuzzer's header lie) is played as
    it is, and the recorded reply pairs with the real request after it."""
    lie = build_message(Channel.MAIN, cat.FrontendRequest.GET_FEATURES)
    lie = lie[:4] + struct.pack("<I", cat.VERSION | cat.FLAG_REPLY) + lie[8:]
    request = build_message(Channel.MAIN, cat.FrontendRequest.GET_FEATURES)
    reply = build_message(Channel.MAIN, cat.FrontendRequest.GET_FEATURES, struct.pack("<Q", 1), reply=True)
    records = [Record(n, 1, Channel.MAIN, direction, data) for n, (direction, data) in enumerate(
        [(Direction.FRONTEND_TO_BACKEND, lie), (Direction.FRONTEND_TO_BACKEND, request),
         (Direction.BACKEND_TO_FRONTEND, reply)], 1)]
    _connection, exchanges = load_exchanges(records, None)
    assert [exchange.request.data for exchange in exchanges] == [lie, request]
    assert exchanges[0].reply is None and exchanges[1].reply is not None and exchanges[1].reply.data == reply
