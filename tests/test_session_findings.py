"""Findings on correct sessions and on hung ones (issue 13): an orderly net stop and a multiqueue boot give no
finding; a connection that never speaks and a request that waits too long do; the report speaks in record
numbers; `read -Y` keeps the events that match in every format and says how many it hid."""
from __future__ import annotations

import json
import os

import pytest
from test_analysis import QEMU_PROTOCOL, F, Script, running
from test_expert import findings

from vhusniff.analysis.analyzer import Analyzer, end_summary
from vhusniff.cli.main import main
from vhusniff.model import EventKind

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Recorded through the proxy from real QEMU 7.2 and dpdk-testpmd (`vhusniff lab --device net`): the guest
# exchanges packets, powers off, and QEMU stops the device (SET_STATUS 0, GET_VRING_BASE for both rings) and
# enables both rings again (its reset of the queue pairs) before it closes the connection.
NET_STOP = os.path.join(ROOT, "tests", "data", "qemu-testpmd-net-stop.pcapng")
CRASH = os.path.join(ROOT, "captures", "qemu-testpmd-crash.pcapng")
SECOND = 1_000_000_000


def test_real_orderly_net_stop_gives_no_finding(capsys):
    assert main(["read", NET_STOP, "--expert", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "SET_STATUS" in out and out.rstrip().endswith("Expert findings: 0"), out


def test_rings_stopped_by_get_vring_base_and_enabled_again_are_not_running():
    s = Script()
    s.connected("net")
    s.negotiate(offered=1 << 30 | 1 << 32, protocol=QEMU_PROTOCOL | 1 << 16)      # STATUS
    s.request(F.SET_FEATURES, {"features": 1 << 30 | 1 << 32})
    for index in (0, 1):
        s.start_ring(index)
    s.request(F.SET_STATUS, {"status": 0})
    for index in (0, 1):
        s.request(F.GET_VRING_BASE, {"index": index, "num": 0})
        s.reply(F.GET_VRING_BASE, {"index": index, "num": 3})
    for index in (0, 1):
        s.request(F.SET_VRING_ENABLE, {"index": index, "num": 1})
    s.event("front-end closed: connection closed", EventKind.CLOSED)
    assert [f.line() for f in findings(s)] == []


def test_a_ring_enabled_before_it_is_set_up_is_no_finding():
    """QEMU net enables its rings when the guest sets the queue pairs, before the device starts (spec: enabling
    is independent of starting)."""
    s = Script()
    s.connected("net")
    s.negotiate(offered=1 << 30 | 1 << 32)
    s.vring_fd(F.SET_VRING_CALL, 0)
    s.request(F.SET_VRING_ENABLE, {"index": 0, "num": 1})
    s.request(F.SET_VRING_ENABLE, {"index": 1, "num": 1})
    assert findings(s) == []


def _hung(seconds: float) -> list:
    """Connection 1 never speaks; connection 2 (a working one) goes on `seconds` after it connected."""
    quiet, busy = Script(1), Script(2)
    quiet.connected("blk")
    busy.now = quiet.now
    busy.connected("blk")
    busy.request(F.GET_FEATURES, step_ns=int(seconds * SECOND))
    busy.reply(F.GET_FEATURES, {"features": 1 << 30})
    return sorted(quiet.records + busy.records, key=lambda r: r.timestamp_ns)


def test_a_connection_that_never_speaks_is_a_finding_at_the_capture_end():
    found = Analyzer().run(_hung(52)).findings
    assert [(f.check, f.connection, str(f.severity)) for f in found] == [("idle-connection", 1, "warn")]
    assert "open 52.0 s without a single message when the capture ended" in found[0].text
    assert Analyzer(idle_seconds=60).run(_hung(52)).findings == []
    assert Analyzer().run(_hung(9)).findings == []


def test_report_names_the_hung_connection_and_the_threshold_is_an_option(tmp_path, capsys):
    from vhusniff.capture.pcapng import write_capture
    path = str(tmp_path / "hung.pcapng")
    write_capture(path, _hung(52))
    assert main(["report", path, "-C", "1"]) == 0
    report = capsys.readouterr().out
    assert "Findings: 1 warn" in report and "idle-connection" in report, report
    assert main(["report", path, "-C", "1", "--idle-seconds", "60"]) == 0
    assert "Findings: none" in capsys.readouterr().out
    assert main(["read", path, "--expert", "--idle-seconds", "60"]) == 0
    assert "Expert findings: 0" in capsys.readouterr().out


def test_a_bad_threshold_is_a_usage_error_not_a_traceback(capsys):
    for value in ("soon", "-1", "0", "nan"):
        with pytest.raises(SystemExit) as leaving:
            main(["expert", CRASH, "--reply-seconds", value])
        assert leaving.value.code == 2
        assert "seconds" in capsys.readouterr().err


def test_a_request_waiting_too_long_for_its_reply_is_a_finding():
    s = running()
    s.request(F.GET_VRING_BASE, {"index": 0, "num": 0})
    s.event("the proxy still runs", step_ns=30 * SECOND)
    records = s.records
    checks = {f.check: f for f in Analyzer().run(records).findings}
    assert set(checks) == {"capture-ended-with-request-outstanding", "reply-overdue"}
    assert "GET_VRING_BASE had waited 30.0 s for its reply when the capture ended" in checks["reply-overdue"].text
    assert {f.check for f in Analyzer(reply_seconds=60).run(records).findings} == \
        {"capture-ended-with-request-outstanding"}


def test_a_request_waiting_when_the_connection_ends_says_how_long():
    s = running()
    s.request(F.GET_VRING_BASE, {"index": 0, "num": 0})
    s.event("back-end closed: connection closed", EventKind.CLOSED, step_ns=20 * SECOND)
    checks = [f.check for f in findings(s)]
    assert checks == ["disconnect-with-request-outstanding", "reply-overdue"]


def test_report_uses_record_numbers_only():
    """The proxy's notes count a connection's messages; the report says record numbers, as `read` shows them."""
    from vhusniff.cli.analysis import load
    loaded = load(CRASH)
    summary = end_summary(loaded.analyzer, 1)
    assert "after message #26" in summary and "(#28)" in summary and "(#26)" in summary
    assert "#24" not in summary
    state = Analyzer().run(running().records).state(1)
    assert state.in_record_numbers("closed after message #3") == "closed after message #5"
    assert state.in_record_numbers("closed after message #999") == "closed after the connection's message 999"


def test_read_keeps_matching_events_in_every_format_and_counts_the_hidden(capsys):
    assert main(["read", CRASH, "-Y", "frame.number > 26", "-T", "fields", "-e", "frame.number",
                 "-e", "event"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["27\tCHANNEL_CLOSED", "28\tCLOSED", "29\tCLOSED"]
    assert "hid 2 event record(s)" in captured.err
    assert main(["read", CRASH, "-Y", "frame.number > 27", "-T", "json"]) == 0
    frames = json.loads(capsys.readouterr().out)
    assert [(f["number"], f["event"]) for f in frames] == [(28, "CLOSED"), (29, "CLOSED")]
    assert main(["read", CRASH, "-Y", "request == SET_VRING_ENABLE"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 8
    assert "the display filter hid 5 event record(s)" in captured.err
