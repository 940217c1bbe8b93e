"""The device type: stated (a DEVICE event, --device) or inferred from what the session shows, never an inference
over a stated type; and how it was decided, where a person reads it."""
from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from peers import FakeFrontend, kit, require  # noqa: F401  (kit: a pytest fixture)
from vhusniff.analysis.state import ConnectionState
from vhusniff.capture.pcapng import read_capture
from vhusniff.lab import peers as lab
from vhusniff.model import Channel, Direction, EventKind, Record, RecordKind
from vhusniff.protocol import catalogue as cat
from vhusniff.protocol.context import ContextTracker, device_from_offered_features, infer_device_type
from vhusniff.protocol.grammar import build_message
from vhusniff.proxy import Proxy, Route
from vhusniff.replay.recording import device_type as replay_device_type
from vhusniff.replay.recording import request_number

REPO = Path(__file__).resolve().parent.parent
BLK = REPO / "captures" / "qemu-blk-boot.pcapng"
DPDK = REPO / "captures" / "dpdk-virtio-user.pcapng"
F = cat.FrontendRequest
B2F = Direction.BACKEND_TO_FRONTEND


def _message(data: bytes, direction: Direction = Direction.FRONTEND_TO_BACKEND) -> Record:
    return Record(0, 1, Channel.MAIN, direction, data)


def _device_event(name: str) -> Record:
    return Record(0, 1, kind=RecordKind.EVENT, event=EventKind.DEVICE, note=name)


def _config_reply(size: int) -> Record:
    payload = {"offset": 0, "size": size, "flags": 0, "data": bytes(size)}
    return _message(build_message(Channel.MAIN, F.GET_CONFIG, payload, reply=True), B2F)


def _fed(records: list[Record], device: str | None = None) -> tuple[ContextTracker, ConnectionState]:
    tracker, state = ContextTracker(device), ConnectionState(1)
    for number, record in enumerate(records, 1):
        state.feed(number, record, tracker.decode(record))
    return tracker, state


def test_the_blk_capture_without_its_device_event_infers_blk_from_the_whole_config_window():
    tracker, state = _fed(_without_device(BLK))
    assert tracker.context_for(1).device_type == "blk"
    assert state.negotiation_lines()[0] == "device: blk (inferred from GET_CONFIG size 57)"
    assert "SEG_MAX" in state.negotiation_lines()[2]        # acked features named as blk's


def test_the_reply_that_tells_the_type_reads_as_that_device_s_config():
    tracker = ContextTracker()
    message = tracker.decode(_config_reply(60))
    assert message is not None and message.context.device_type == "blk"
    assert "capacity=" in message.summary()


def test_a_stated_device_event_is_never_overridden_by_an_inference():
    records = [_device_event("net"), _config_reply(60), _device_event("blk"),
               _message(build_message(Channel.MAIN, F.NET_SET_MTU, {"mtu": 1500}))]
    tracker, state = _fed(records)
    assert tracker.context_for(1).device_type == "blk"
    assert state.negotiation_lines()[0] == "device: blk (stated by the capture)"


def test_device_option_wins_over_events_and_inferences():
    records = [_device_event("blk"), _config_reply(57)]
    tracker, state = _fed(records, "net")
    assert tracker.context_for(1).device_type == "net"
    assert state.negotiation_lines()[0] == "device: net (stated by --device)"


def test_requests_only_one_device_type_sends_infer_it():
    payloads = {F.NET_SET_MTU: {"mtu": 1500}, F.SEND_RARP: {"mac": bytes(6), "padding": bytes(2)},
                F.GPU_SET_SOCKET: None}
    for request, device in ((F.NET_SET_MTU, "net"), (F.SEND_RARP, "net"), (F.GPU_SET_SOCKET, "gpu")):
        tracker, state = _fed([_message(build_message(Channel.MAIN, request, payloads[request]))])
        assert tracker.context_for(1).device_type == device, request
        assert state.negotiation_lines()[0] == f"device: {device} (inferred from {request.name})"
    assert {int(r): rule.value for r, rule in cat.CONTEXT_RULES.items() if rule.context_field == "device_type"} == {
        F.NET_SET_MTU: "net", F.SEND_RARP: "net", F.GPU_SET_SOCKET: "gpu", F.CREATE_CRYPTO_SESSION: "crypto",
        F.CLOSE_CRYPTO_SESSION: "crypto"}


def test_a_partial_or_ambiguous_config_window_infers_nothing():
    for size in (8, 16, 36):
        tracker, state = _fed([_config_reply(size)])
        assert tracker.context_for(1).device_type is None, size
        assert state.negotiation_lines()[0].startswith("device: unknown")


# ---- inference from the device-specific feature bits a back-end offers --------------------------------------

NET_BY_BITS = "offered feature bits 8,18,21,22, which only net defines"      # testpmd's GUEST_TSO6, CTRL_RX, ...


def _without_device(path: Path) -> list[Record]:
    """A capture's records as if nobody had stated the device type (no DEVICE event, no version-1 device note)."""
    return [replace(r, device="") for r in read_capture(path) if r.event != EventKind.DEVICE]


def _features_reply(features: int) -> Record:
    return _message(build_message(Channel.MAIN, F.GET_FEATURES, {"features": features}, reply=True), B2F)


@pytest.mark.parametrize("name", ["dpdk-virtio-user.pcapng", "dpdk-virtio-user-2-queues.pcapng",
                                  "qemu-testpmd-2-queues.pcapng", "qemu-testpmd-crash.pcapng",
                                  "qemu10-testpmd-net.pcapng"])
def test_real_net_sessions_without_their_device_event_infer_net_from_the_offered_feature_bits(name):
    """DPDK's vhost back-end offers net bits no other device type defines: read and replay both say net."""
    records = _without_device(REPO / "captures" / name)
    assert not any(r.event == EventKind.DEVICE for r in records)
    tracker, state = _fed(records)
    connection = next(r.connection for r in records if r.kind == RecordKind.MESSAGE)
    assert tracker.context_for(connection).device_type == "net"
    assert state.negotiation_lines()[0] == f"device: net (inferred from {NET_BY_BITS})"
    assert "MRG_RXBUF" in state.negotiation_lines()[1]        # offered features named as net's
    assert replay_device_type(records, connection) == "net"


@pytest.mark.parametrize("name", ["qemu-blk-boot.pcapng", "qemu-virtiofsd.pcapng"])
def test_real_sessions_whose_offered_bits_two_types_define_infer_nothing_from_them(name):
    """qemu-storage-daemon offers only blk bits net defines too (the blk type comes from GET_CONFIG's size, later);
    C virtiofsd offers no device bit at all: no guess from the features."""
    records = _without_device(REPO / "captures" / name)
    offers = [r for r in records if r.kind == RecordKind.MESSAGE and r.direction == B2F and
              request_number(r.data) == F.GET_FEATURES]
    assert offers
    assert all(infer_device_type(Channel.MAIN, r.data) is None for r in offers)
    tracker, state = _fed(records)
    assert "feature bits" not in state.negotiation_lines()[0]


def test_offered_bits_tell_the_one_type_that_defines_them_all_and_never_guess_between_two():
    net_only, blk_only = 1 << 22, 1 << 4 | 1 << 16       # MQ at 22 is net's; GEOMETRY+SECURE_ERASE only blk has both
    assert device_from_offered_features(net_only | 1 << 32) == ("net",
                                                                "offered feature bits 22, which only net defines")
    assert device_from_offered_features(blk_only) == ("blk",
                                                      "offered feature bits 4,16, which together only blk defines")
    assert device_from_offered_features(1 << 60) == ("net", "offered feature bits 60, which only net defines")   # RSS
    for ambiguous in (0x175007E46,      # qemu-storage-daemon's blk offer: every bit is net's too
                      1 << 0 | 1 << 1,  # net, blk, scsi, gpu, vsock, crypto all define bits 0 and 1
                      1 << 32 | 1 << 30,  # transport bits only
                      1 << 4 | 1 << 18):  # no type defines both (GEOMETRY is blk's, CTRL_RX net's)
        assert device_from_offered_features(ambiguous) is None, hex(ambiguous)
    tracker, state = _fed([_features_reply(blk_only)])
    assert state.negotiation_lines()[0] == "device: blk (inferred from offered feature bits 4,16, which together " \
                                           "only blk defines)"


def test_the_features_reply_that_tells_the_type_reads_with_that_device_s_bit_names():
    tracker = ContextTracker()
    message = tracker.decode(_features_reply(1 << 15 | 1 << 22))
    assert message is not None and "MRG_RXBUF|MQ" in message.summary()


def test_a_stated_type_is_never_overridden_by_offered_feature_bits():
    tracker, state = _fed([_device_event("blk"), _features_reply(1 << 22)])
    assert tracker.context_for(1).device_type == "blk"
    tracker, state = _fed([_features_reply(1 << 22)], "blk")
    assert state.negotiation_lines()[0] == "device: blk (stated by --device)"


def _through_a_proxy_without_device(tmp_path: Path, start_backend: Callable[[Path, Path], Any],
                                    frontend: Callable[[Path], Any], done: Callable[[Proxy], bool]) -> tuple[Path, Any]:
    """(capture, what `frontend` returned) of a proxy with no --device between a lab back-end, started by
    start_backend(tmp_path, its socket), and `frontend(the proxy's socket)`, run until `done(proxy)`."""
    backend_socket, proxy_socket, capture = tmp_path / "backend.sock", tmp_path / "proxy.sock", tmp_path / "c.pcapng"
    with start_backend(tmp_path, backend_socket):
        proxy = Proxy([Route.forward(proxy_socket, backend_socket, None)], capture=capture,
                      report=lambda text: None).start()
        try:
            result = frontend(proxy_socket)
            assert proxy.wait_until(done, 30)
        finally:
            proxy.stop()
    return capture, result


def _device_events(records: list[Record]) -> list[int]:
    """The indexes of the DEVICE events."""
    return [n for n, r in enumerate(records) if r.kind == RecordKind.EVENT and r.event == EventKind.DEVICE]


def _message_number(records: list[Record], index: int) -> int:
    """The number of the message at `index`, as a proxy counts messages (from 1)."""
    return sum(r.kind == RecordKind.MESSAGE for r in records[:index + 1])


def test_a_proxy_without_device_between_dpdk_virtio_user_and_testpmd_records_net_from_the_feature_bits(tmp_path):
    """No --device: the live proxy decides net from testpmd's GET_FEATURES reply, records how, and the capture
    reads with net's bit names; it is the same decision reading gives without the DEVICE event."""
    require("dpdk-testpmd")

    def frontend(proxy_socket: Path) -> None:
        run = lab.start_testpmd_frontend(tmp_path, proxy_socket)
        assert run.stop() == 0, run.log_tail()
    capture, _ = _through_a_proxy_without_device(tmp_path, lab.start_testpmd, frontend,
                                                 lambda p: p.connections_total == 1 and p.active_connections == 0)
    records = list(read_capture(capture))
    devices = _device_events(records)
    assert [records[n].note for n in devices] == ["net"]
    offer = next(n for n, r in enumerate(records) if r.kind == RecordKind.MESSAGE and r.direction == B2F and
                 request_number(r.data) == F.GET_FEATURES)
    number = _message_number(records, offer)
    assert records[devices[0] - 1].note == f"device type net inferred from {NET_BY_BITS} (message #{number})"
    assert devices[0] > offer and all(not (r.kind == RecordKind.MESSAGE and request_number(r.data) == F.SET_FEATURES)
                                      for r in records[:devices[0]])
    _, state = _fed(records)
    assert state.negotiation_lines()[0] == "device: net (stated by the capture)"
    assert "MRG_RXBUF" in state.negotiation_lines()[2]
    _, state = _fed(_without_device(capture))
    assert state.negotiation_lines()[0] == f"device: net (inferred from {NET_BY_BITS})"


def test_backend_replay_device_option_names_the_device_in_its_capture(tmp_path):
    """`replay --as backend --device net` of the DPDK recording (no DEVICE event) writes DEVICE net, so its
    GET_FEATURES reply reads with net bit names."""
    listen, out = tmp_path / "b.sock", tmp_path / "out.pcapng"
    replay = subprocess.Popen([sys.executable, "-m", "vhusniff.cli.main", "replay", "--as", "backend", str(DPDK),
                               "--listen", str(listen), "--device", "net", "-w", str(out)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 10
        while not listen.exists() and time.monotonic() < deadline and replay.poll() is None:
            time.sleep(0.02)
        frontend = FakeFrontend(listen, timeout=5)
        frontend.send(build_message(Channel.MAIN, F.GET_FEATURES))
        assert frontend.receive().data
        frontend.close()
        output, _ = replay.communicate(timeout=30)
    finally:
        if replay.poll() is None:
            replay.kill()
            replay.wait()
    records = list(read_capture(out))
    assert any(r.event == EventKind.DEVICE and r.note == "net" for r in records), output
    _, state = _fed(records)
    assert state.negotiation_lines()[0] == "device: net (stated by the capture)"
    assert "CSUM|GUEST_CSUM" in state.negotiation_lines()[1]


def test_replay_rejects_an_unknown_device_type():
    run = subprocess.run([sys.executable, "-m", "vhusniff.cli.main", "replay", "--as", "backend", str(DPDK),
                          "--listen", "/nonexistent/x.sock", "--device", "floppy"], cwd=REPO, capture_output=True,
                         text=True, timeout=30)
    assert run.returncode == 2 and "invalid choice" in run.stderr and "Traceback" not in run.stderr


# ---- the live proxy records the type it infers, and how ------------------------------------------------------

def test_one_message_inference_agrees_with_the_context_tracker():
    """The proxy looks at single messages (infer_device_type); reading a capture follows the ContextTracker:
    both use the catalogue's rules, and say the same."""
    cases = [build_message(Channel.MAIN, request) if request != F.NET_SET_MTU else
             build_message(Channel.MAIN, request, {"mtu": 1500}) for request in (F.NET_SET_MTU, F.GPU_SET_SOCKET)]
    cases += [_config_reply(size).data for size in (57, 60, 16, 8)]
    cases += [_features_reply(features).data for features in (0xD7C66E7CB, 0x175007E46, 1 << 4 | 1 << 16, 1 << 30)]
    cases += [build_message(Channel.MAIN, F.GET_CONFIG, {"offset": 4, "size": 57, "flags": 0, "data": bytes(57)},
                            reply=True), build_message(Channel.MAIN, F.GET_FEATURES)]
    for data in cases:
        direction = B2F if data[4] & cat.FLAG_REPLY else Direction.FRONTEND_TO_BACKEND
        tracker, _state = _fed([_message(data, direction)])
        found = infer_device_type(Channel.MAIN, data)
        assert (found[0] if found else None) == tracker.context_for(1).device_type, data[:12].hex()
        assert infer_device_type(Channel.BACKEND, data) is None


def test_a_proxy_without_device_records_the_type_a_real_qemu_boot_tells_and_how(kit, tmp_path):
    require("qemu-storage-daemon")

    def frontend(proxy_socket: Path):
        with lab.start_qemu(tmp_path, kit, proxy_socket, device="blk") as guest:
            return guest.wait(180)
    capture, result = _through_a_proxy_without_device(
        tmp_path, lab.start_storage_daemon, frontend, lambda p: p.connections_total > 0 and p.active_connections == 0)
    assert result.blk_io_ok, result.console
    records = list(read_capture(capture))
    devices = _device_events(records)
    assert [records[n].note for n in devices] == ["blk"]
    how = records[devices[0] - 1].note
    config = [n for n, r in enumerate(records[:devices[0]]) if r.kind == RecordKind.MESSAGE and
              request_number(r.data) == F.GET_CONFIG and r.direction == B2F]
    assert config
    number = _message_number(records, config[-1])
    assert how == f"device type blk inferred from GET_CONFIG size 57 (message #{number})"   # QEMU 7.2 reads 57
    # every SET_FEATURES comes after the DEVICE event, and reads with blk's bit names
    features = [n for n, r in enumerate(records) if r.kind == RecordKind.MESSAGE and
                request_number(r.data) == F.SET_FEATURES]
    assert features and min(features) > devices[0]
    tracker = ContextTracker()
    summaries = [m.summary() for m in map(tracker.decode, records) if m is not None and m.request == F.SET_FEATURES]
    assert summaries and all("SEG_MAX" in summary for summary in summaries), summaries   # blk bit 2, not bit2
    assert tracker.context_for(records[0].connection).device_source == "stated by the capture"
