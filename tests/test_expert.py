"""Every expert check: one hand-made session that triggers it, and a near miss that must give no finding at all."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest
from test_analysis import (
    BLK_ACKED,
    QEMU_PROTOCOL,
    UADDR,
    B,
    F,
    MiB,
    Script,
    eventfd,
    memfd,
    opened,
    qemu_blk_boot,
    running,
)

from vhusniff.analysis.analyzer import Analyzer
from vhusniff.analysis.expert import CHECKS, Severity
from vhusniff.cli.main import main
from vhusniff.dataplane.sample import Reason, RingSample, SampleFlag
from vhusniff.model import Channel, EventKind, Record, RecordKind
from vhusniff.protocol import catalogue as cat
from vhusniff.protocol.grammar import HEADER_STRUCT

STATUS = 1 << 16
INBAND = 1 << 14
REPLY_ACK = 1 << 3
BACKEND_REQ = 1 << 5


def with_status() -> Script:
    return opened(protocol=QEMU_PROTOCOL | STATUS)


def get_status(s: Script) -> Script:
    s.request(F.GET_STATUS)
    s.reply(F.GET_STATUS, {"status": 0xF})
    return s


def set_features(features: int) -> Script:
    s = opened()
    s.request(F.SET_FEATURES, {"features": features})
    return s


def set_owner(fds=(), flags=None, need_reply=False, ack=None, **negotiation) -> Script:
    s = opened(**negotiation)
    s.request(F.SET_OWNER, fds=list(fds), flags=flags, need_reply=need_reply)
    if ack is not None:
        s.ack(F.SET_OWNER, ack)
    return s


def vring_request(request: int, payload: dict, start: bool = False) -> Script:
    s = running() if start else opened()
    s.request(request, payload)
    return s


def addr(**overrides) -> dict:
    value = {"index": 0, "flags": 0, "desc": UADDR + 0x1000, "used": UADDR + 0x3000, "avail": UADDR + 0x2000, "log": 0}
    value.update(overrides)
    return value


def regions(*spans, mem_slots: int = 32) -> Script:
    s = opened(mem_slots=mem_slots)
    for gpa, size in spans:
        s.add_region(gpa, size, gpa)
    return s


def mem_table(count: int) -> Script:
    s = opened()
    table = {"nregions": count, "padding": 0, "region": [
        {"guest_phys_addr": i * MiB, "memory_size": MiB, "userspace_addr": UADDR + i * MiB, "mmap_offset": 0}
        for i in range(count)]}
    s.request(F.SET_MEM_TABLE, table, fds=[memfd(MiB)] * count, need_reply=True)
    s.ack(F.SET_MEM_TABLE)
    return s


def rem_region(gpa: int) -> Script:
    s = regions((0, MiB))
    region = {"guest_phys_addr": gpa, "memory_size": MiB, "userspace_addr": UADDR + gpa, "mmap_offset": gpa}
    s.request(F.REM_MEM_REG, {"padding": 0, "region": region}, need_reply=True)
    s.ack(F.REM_MEM_REG)
    return s


def set_config(data_size: int) -> Script:
    s = opened()
    s.request(F.SET_CONFIG, {"offset": 0, "size": data_size, "flags": 0, "data": bytes(data_size)})
    return s


def raw_request(request: int, flags: int, payload: bytes) -> Script:
    s = opened()
    s.request(request, raw=HEADER_STRUCT.pack(request, flags, len(payload)) + payload)
    return s


def get_features_answered(reply_request: int = F.GET_FEATURES, flags: int | None = None) -> Script:
    s = opened()
    s.request(F.GET_FEATURES)
    s.reply(reply_request, {"features": BLK_ACKED}, kind="features", flags=flags)
    return s


def add_region_acked(status: int) -> Script:
    s = opened()
    s.request(F.ADD_MEM_REG, {"padding": 0, "region": {"guest_phys_addr": 0, "memory_size": MiB,
                                                       "userspace_addr": UADDR, "mmap_offset": 0}},
              need_reply=True, fds=[memfd()])
    s.ack(F.ADD_MEM_REG, status)
    return s


def get_config(reply_size: int) -> Script:
    s = opened()
    s.request(F.GET_CONFIG, {"offset": 0, "size": 57, "flags": 0, "data": bytes(57)})
    s.reply(F.GET_CONFIG, {"offset": 0, "size": reply_size, "flags": 0, "data": bytes(reply_size)})
    return s


def backend_request(s: Script) -> Script:
    s.request(B.CONFIG_CHANGE_MSG, channel=Channel.BACKEND, need_reply=True)
    s.ack(B.CONFIG_CHANGE_MSG, channel=Channel.BACKEND)
    return s


def gpu_update(width: int, height: int, pixels: int, scanout: int = 0) -> Script:
    """A GPU socket's SCANOUT then UPDATE (the vhost-user-gpu protocol: requests from the back-end, flags 0)."""
    s = running()
    s.request(cat.GpuRequest.SCANOUT, {"scanout_id": scanout, "width": width, "height": height}, channel=Channel.GPU)
    s.request(cat.GpuRequest.UPDATE, {"scanout_id": scanout, "x": 0, "y": 0, "width": width, "height": height,
                                      "data": bytes(pixels)}, channel=Channel.GPU)
    return s


def stopped() -> Script:
    s = running()
    s.stop_ring()
    return s


def set_status(status: int) -> Script:
    s = with_status()
    s.request(F.SET_STATUS, {"status": status})
    return s


def after_end(extra: bool) -> Script:
    s = qemu_blk_boot()
    if extra:
        s.request(F.SET_OWNER)
    return s


def closed_while_waiting(waiting: bool) -> Script:
    s = running()
    s.request(F.SET_VRING_ENABLE, {"index": 0, "num": 0})
    s.request(F.GET_VRING_BASE, {"index": 0, "num": 0})
    if not waiting:
        s.reply(F.GET_VRING_BASE, {"index": 0, "num": 5})
    s.event("back-end closed: connection closed after message #40", EventKind.CLOSED)
    return s


def unanswered_at_end(answered: bool) -> Script:
    s = opened()
    s.request(F.GET_FEATURES)
    if answered:
        s.reply(F.GET_FEATURES, {"features": BLK_ACKED})
    return s


def missing_ack(acked: bool) -> Script:
    s = set_owner(need_reply=True, ack=0 if acked else None)
    s.request(F.GET_FEATURES)
    s.reply(F.GET_FEATURES, {"features": BLK_ACKED})
    return s


# check id -> (a session that triggers it, a near miss that must give no finding)
CASES = {
    "gate-not-negotiated": (lambda: get_status(opened()), lambda: get_status(with_status())),
    "features-not-offered": (lambda: set_features(BLK_ACKED | 1 << 35), lambda: set_features(BLK_ACKED)),
    "transport-feature-not-offered": (lambda: set_features(BLK_ACKED | 1 << 40), lambda: set_features(BLK_ACKED)),
    "protocol-features-not-offered": (lambda: opened(acked=QEMU_PROTOCOL | STATUS),
                                      lambda: opened(acked=QEMU_PROTOCOL & ~(1 << 1))),
    "fd-count": (lambda: set_owner(fds=[eventfd()]), lambda: set_owner()),
    "vring-fd-missing": (lambda: _vring_fd(fds=[], nofd=False), lambda: _vring_fd(fds=[], nofd=True)),
    "add-mem-reg-fds": (lambda: _add_mem_reg(fds=[]), lambda: _add_mem_reg(fds=[memfd()])),
    "vring-index-out-of-range": (lambda: vring_request(F.SET_VRING_NUM, {"index": 1, "num": 256}),
                                 lambda: vring_request(F.SET_VRING_NUM, {"index": 0, "num": 256})),
    "vring-addr-misaligned": (lambda: vring_request(F.SET_VRING_ADDR, addr(avail=UADDR + 0x2001, used=UADDR + 0x3002)),
                              lambda: vring_request(F.SET_VRING_ADDR, addr(avail=UADDR + 0x2002, used=UADDR + 0x3004))),
    "vring-num-invalid": (lambda: vring_request(F.SET_VRING_NUM, {"index": 0, "num": 100}),
                          lambda: vring_request(F.SET_VRING_NUM, {"index": 0, "num": 32768})),
    "vring-base-high-bits": (lambda: vring_request(F.SET_VRING_BASE, {"index": 0, "num": 0x10000}),
                             lambda: vring_request(F.SET_VRING_BASE, {"index": 0, "num": 0xFFFF})),
    "get-vring-base-not-started": (lambda: _get_vring_base(start=False), lambda: _get_vring_base(start=True)),
    "memory-regions-overlap": (lambda: regions((0, 2 * MiB), (MiB, 2 * MiB)),
                               lambda: regions((0, 2 * MiB), (2 * MiB, 2 * MiB))),
    "mem-table-too-many-regions": (lambda: mem_table(9), lambda: mem_table(8)),
    "mem-slots-exceeded": (lambda: regions((0, MiB), (MiB, MiB), mem_slots=1),
                           lambda: regions((0, MiB), (MiB, MiB), mem_slots=2)),
    "rem-mem-reg-unknown": (lambda: rem_region(4 * MiB), lambda: rem_region(0)),
    "size-over-maximum": (lambda: set_config(0x1000 - 11), lambda: set_config(0x1000 - 12)),
    "reserved-flags": (lambda: set_owner(flags=0x11), lambda: set_owner(flags=0x1)),
    "bad-version": (lambda: set_owner(flags=0x2), lambda: set_owner(flags=0x1)),
    "payload-layout": (lambda: raw_request(F.SET_VRING_NUM, 1, struct.pack("<I", 0)),
                       lambda: raw_request(F.SET_VRING_NUM, 1, struct.pack("<II", 0, 256))),
    "unknown-request": (lambda: raw_request(99, 1, b""), lambda: raw_request(F.SET_OWNER, 1, b"")),
    "need-reply-without-reply-ack": (
        lambda: set_owner(need_reply=True, acked=QEMU_PROTOCOL & ~REPLY_ACK, backend_channel=False),
        lambda: set_owner(need_reply=True, ack=0)),
    "missing-reply": (lambda: missing_ack(acked=False), lambda: missing_ack(acked=True)),
    "unexpected-reply": (lambda: set_owner(ack=0), lambda: set_owner(need_reply=True, ack=0)),
    "reply-mismatch": (lambda: get_features_answered(F.GET_PROTOCOL_FEATURES), lambda: get_features_answered()),
    "ack-nonzero": (lambda: add_region_acked(1), lambda: add_region_acked(0)),
    "reply-flags": (lambda: get_features_answered(flags=0xD), lambda: get_features_answered(flags=0x5)),
    "config-reply-error": (lambda: get_config(0), lambda: get_config(57)),
    "backend-channel-unset": (lambda: backend_request(_running_without_backend_channel()),
                              lambda: backend_request(running())),
    "backend-message-while-suspended": (lambda: backend_request(stopped()), lambda: backend_request(running())),
    "inband-without-prerequisites": (
        lambda: opened(protocol=(QEMU_PROTOCOL | INBAND) & ~BACKEND_REQ, backend_channel=False),
        lambda: opened(protocol=QEMU_PROTOCOL | INBAND)),
    "device-status-failed": (lambda: set_status(0x8F), lambda: set_status(0xF)),
    "traffic-after-disconnect": (lambda: after_end(True), lambda: after_end(False)),
    "ended-while-running": (lambda: _ended(running()), lambda: _ended(stopped())),
    "idle-connection": (lambda: _silent(seconds=11), lambda: _silent(seconds=9)),
    "reply-overdue": (lambda: _answered_after(seconds=6), lambda: _answered_after(seconds=4)),
    "gpu-update-size": (lambda: gpu_update(4, 2, 31), lambda: gpu_update(4, 2, 32)),
    "gpu-scanout-out-of-range": (lambda: gpu_update(4, 2, 32, scanout=16), lambda: gpu_update(4, 2, 32, scanout=15)),
    "disconnect-with-request-outstanding": (lambda: closed_while_waiting(True), lambda: closed_while_waiting(False)),
    "capture-ended-with-request-outstanding": (lambda: unanswered_at_end(False), lambda: unanswered_at_end(True)),
    # Ring samples (--rings/--notifications): (seconds after the previous, avail, used, kicks, calls).
    "stuck-ring": (lambda: _ring([(0, 12, 10, 5, 5), (1, 12, 10, 5, 5), (1.5, 12, 10, 5, 5)]),
                   lambda: _ring([(0, 12, 10, 5, 5), (1, 12, 10, 5, 5), (0.5, 12, 10, 5, 5)])),
    "kicks-without-progress": (lambda: _ring([(0, 10, 10, 5, 5), (1, 12, 10, 6, 5), (2.5, 12, 10, 6, 5)]),
                               lambda: _ring([(0, 10, 10, 5, 5), (1, 12, 10, 6, 5), (0.5, 12, 10, 6, 5)])),
    "calls-without-used-movement": (lambda: _ring([(0, 10, 10, 5, 5), (0.1, 10, 10, 5, 8)]),
                                    lambda: _ring([(0, 10, 10, 5, 5), (0.1, 10, 10, 5, 7)])),
}


def _ended(s: Script) -> Script:
    s.event("front-end closed: connection closed", EventKind.CLOSED)
    return s


def _ring(samples: list[tuple[float, int, int, int, int]]) -> Script:
    """A blk connection whose ring 0 is sampled as listed: (seconds after the previous, avail, used, kicks, calls)."""
    s = Script()
    s.connected("blk")
    for seconds, avail, used, kicks, calls in samples:
        sample = RingSample(0, Reason.PERIODIC, SampleFlag.MAPPED, avail, used, num=128,
                            in_flight=(avail - used) & 0xFFFF, kicks=kicks, calls=calls)
        s._add(Record(0, s.connection, data=sample.pack(), kind=RecordKind.EVENT, note=sample.note(),
                      event=EventKind.RING), int(seconds * 1e9))
    return s


def _silent(seconds: float, end: bool = True) -> Script:
    """A connection that never carries a message: connected, then (with `end`) closed `seconds` later."""
    s = Script()
    s.connected("net")
    if end:
        s.event("front-end closed: connection closed after message #0", EventKind.CLOSED,
                step_ns=int(seconds * 1e9))
    return s


def _answered_after(seconds: float) -> Script:
    s = opened()
    s.request(F.GET_FEATURES)
    s.reply(F.GET_FEATURES, {"features": BLK_ACKED}, step_ns=int(seconds * 1e9))
    return s


def _vring_fd(fds, nofd) -> Script:
    s = opened()
    s.vring_fd(F.SET_VRING_KICK, fds=fds, nofd=nofd)
    return s


def _add_mem_reg(fds) -> Script:
    s = opened()
    s.request(F.ADD_MEM_REG, {"padding": 0, "region": {"guest_phys_addr": 0, "memory_size": MiB,
                                                       "userspace_addr": UADDR, "mmap_offset": 0}},
              need_reply=True, fds=fds)
    s.ack(F.ADD_MEM_REG)
    return s


def _get_vring_base(start: bool) -> Script:
    s = running() if start else opened()
    s.request(F.GET_VRING_BASE, {"index": 0, "num": 0})
    s.reply(F.GET_VRING_BASE, {"index": 0, "num": 0})
    return s


def _running_without_backend_channel() -> Script:
    s = opened(backend_channel=False)
    s.start_ring()
    return s


def findings(script: Script):
    return Analyzer().run(script.records).findings


def test_the_table_has_enough_checks_and_every_check_a_case():
    assert len(CHECKS) >= 20
    assert set(CASES) == set(CHECKS)
    assert {check.severity for check in CHECKS.values()} >= {Severity.NOTE, Severity.WARN, Severity.ERROR}
    assert all(check.summary and "\n" not in check.summary for check in CHECKS.values())


@pytest.mark.parametrize("check", sorted(CASES))
def test_check_fires(check):
    bad, _good = CASES[check]
    found = findings(bad())
    assert check in {f.check for f in found}
    finding = next(f for f in found if f.check == check)
    assert finding.numbers and all(n >= 1 for n in finding.numbers) and finding.text


@pytest.mark.parametrize("check", sorted(CASES))
def test_near_miss_is_silent(check):
    _bad, good = CASES[check]
    assert [f.line() for f in findings(good())] == []


def test_findings_name_the_messages_involved():
    s = opened()
    sent = s.request(F.GET_FEATURES)
    answer = s.reply(F.GET_PROTOCOL_FEATURES, {"protocol_features": 1})
    mismatch = next(f for f in findings(s) if f.check == "reply-mismatch")
    assert mismatch.numbers == (answer, sent)


def test_disconnect_finding_names_the_request():
    found = findings(closed_while_waiting(True))
    assert [f.check for f in found] == ["disconnect-with-request-outstanding"]
    assert "waited for the reply to GET_VRING_BASE (#" in found[0].text


def test_net_rings_allow_rx_and_tx_per_reported_queue_pair():
    s = Script()
    s.connected("net")
    s.negotiate(offered=1 << 30 | 1 << 32)
    s.request(F.SET_VRING_NUM, {"index": 1, "num": 256})        # tx of pair 0: within one queue pair
    assert findings(s) == []
    s.request(F.SET_VRING_NUM, {"index": 3, "num": 256})
    assert [f.check for f in findings(s)] == ["vring-index-out-of-range"]


def test_packed_ring_alignment_and_sizes():
    s = opened(offered=(1 << 30 | 1 << 32 | 1 << 34))
    s.request(F.SET_FEATURES, {"features": 1 << 30 | 1 << 32 | 1 << 34})
    s.request(F.SET_VRING_NUM, {"index": 0, "num": 100})                 # packed rings need no power of two
    s.request(F.SET_VRING_ADDR, addr(avail=UADDR + 0x2004, used=UADDR + 0x3004))
    assert findings(s) == []
    s.request(F.SET_VRING_ADDR, addr(avail=UADDR + 0x2002))
    assert [f.check for f in findings(s)] == ["vring-addr-misaligned"]


def test_log_base_replies_only_with_log_shmfd():
    s = opened(acked=QEMU_PROTOCOL & ~(1 << 1))
    s.request(F.SET_LOG_BASE, {"mmap_size": 4096, "mmap_offset": 0}, fds=[memfd(4096)])
    s.request(F.GET_FEATURES)
    s.reply(F.GET_FEATURES, {"features": BLK_ACKED})
    assert findings(s) == []
    s = opened()
    s.request(F.SET_LOG_BASE, {"mmap_size": 4096, "mmap_offset": 0}, fds=[memfd(4096)])
    s.request(F.GET_FEATURES)
    assert "missing-reply" in {f.check for f in findings(s)}


def test_decoder_problems_are_findings_and_catalogue_names_every_gate():
    gates = {spec.gate for table in (cat.FRONTEND_REQUESTS, cat.BACKEND_REQUESTS) for spec in table.values()}
    assert all(g in ("", "PROTOCOL_FEATURES", "IOMMU") or cat.SPEC_PROFILE.protocol_feature_bit(g) is not None
               for g in gates)


def test_an_unoffered_device_bit_stays_an_error_beside_a_transport_bit_the_front_end_provides():
    """RING_RESET (40) acked unoffered is QEMU's transport's own (a note); IN_ORDER (35) or a device bit is not."""
    found = {f.check: f for f in findings(set_features(BLK_ACKED | 1 << 40 | 1 << 35 | 1 << 4))}
    assert set(found) == {"features-not-offered", "transport-feature-not-offered"}
    assert found["features-not-offered"].severity == Severity.ERROR
    assert "GEOMETRY|IN_ORDER acked" in found["features-not-offered"].text
    assert found["transport-feature-not-offered"].severity == Severity.NOTE
    assert "RING_RESET acked" in found["transport-feature-not-offered"].text
    assert "QEMU's transport" in found["transport-feature-not-offered"].text


SHIPPED_CAPTURES = sorted((Path(__file__).resolve().parent.parent / "captures").glob("*.pcapng"))


@pytest.mark.parametrize("path", SHIPPED_CAPTURES, ids=lambda path: path.name)
def test_every_shipped_real_capture_gives_no_warn_or_error(path, capsys):
    """Real sessions of real peers, all of which worked: `vhusniff expert` finds nothing at warn or above."""
    assert main(["expert", str(path), "--min", "warn"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("0 finding(s)"), out
