"""Session state, request/reply matching, stats and report, on sessions shaped like the real QEMU 7.2 ones
(vhost-user-facts.md §2), built message by message with the grammar."""
from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest

from vhusniff.analysis.analyzer import Analyzer, classify_event, direction_for, end_summary
from vhusniff.analysis.state import NOFD
from vhusniff.model import Channel, EventKind, FdInfo, Record, RecordKind
from vhusniff.protocol import catalogue as cat
from vhusniff.protocol.grammar import build_message
from vhusniff.protocol.replies import Expect, expectation

F = cat.FrontendRequest
B = cat.BackendRequest
MiB = 1 << 20
BLK_OFFERED = 0x175007E46        # qemu-storage-daemon's GET_FEATURES reply (§2)
BLK_ACKED = BLK_OFFERED & ~(1 << 26 | 1 << 24)
QEMU_PROTOCOL = 0x8F2B           # MQ LOG_SHMFD REPLY_ACK BACKEND_REQ PAGEFAULT CONFIG BACKEND_SEND_FD
                                 # HOST_NOTIFIER CONFIGURE_MEM_SLOTS
UADDR = 0x7F0000000000
DESC, AVAIL, USED = 0x7F00, 0x8000, 0x9000


def eventfd(inode: int = 0) -> FdInfo:
    return FdInfo("eventfd", inode=inode, name="[eventfd]")


def memfd(size: int = 256 * MiB) -> FdInfo:
    return FdInfo("memfd", inode=77, size=size, name="memfd:mem")


class Script:
    """Builds the records of a session: requests and replies with flags, fds and times as QEMU sends them."""

    def __init__(self, connection: int = 1):
        self.connection = connection
        self.records: list[Record] = []
        self.now = 1_700_000_000_000_000_000

    def _add(self, record: Record, step_ns: int) -> int:
        self.now += step_ns
        record.timestamp_ns = self.now
        self.records.append(record)
        return len(self.records)

    def event(self, note: str, kind: EventKind = EventKind.NOTE, step_ns: int = 1000) -> int:
        return self._add(Record(0, self.connection, kind=RecordKind.EVENT, note=note, event=kind), step_ns)

    def connected(self, device: str) -> int:
        """The proxy's two events for a route that knows its device: connected, then the device type."""
        self.event("connected", EventKind.CONNECTED)
        return self.event(device, EventKind.DEVICE)

    def send(self, request: int, payload=None, *, channel: Channel = Channel.MAIN, reply: bool = False,
             need_reply: bool = False, fds=(), kind: str | None = None, flags: int | None = None,
             raw: bytes | None = None, step_ns: int = 20_000) -> int:
        """Adds one message; returns its record number (from 1)."""
        data = raw if raw is not None else build_message(channel, request, payload, reply=reply,
                                                         need_reply=need_reply, kind=kind, flags=flags)
        return self._add(Record(0, self.connection, channel, direction_for(channel, reply), data, list(fds)),
                         step_ns)

    def request(self, request: int, payload=None, **options) -> int:
        return self.send(request, payload, **options)

    def reply(self, request: int, payload=None, **options) -> int:
        return self.send(request, payload, reply=True, step_ns=options.pop("step_ns", 50_000), **options)

    def ack(self, request: int, status: int = 0, **options) -> int:
        return self.reply(request, {"ack": status}, kind="ack", **options)

    # --- QEMU 7.2 building blocks (§2) ------------------------------------------------------------------------
    def negotiate(self, offered: int = BLK_OFFERED, protocol: int = QEMU_PROTOCOL, acked: int | None = None,
                  mem_slots: int = 32, backend_channel: bool = True) -> None:
        """QEMU's opening (§2); `acked` protocol features default to all offered."""
        self.request(F.GET_FEATURES)
        self.reply(F.GET_FEATURES, {"features": offered})
        self.request(F.GET_PROTOCOL_FEATURES)
        self.reply(F.GET_PROTOCOL_FEATURES, {"protocol_features": protocol})
        self.request(F.SET_PROTOCOL_FEATURES, {"protocol_features": protocol if acked is None else acked})
        self.request(F.GET_QUEUE_NUM)
        self.reply(F.GET_QUEUE_NUM, {"queue_num": 1})
        self.request(F.GET_MAX_MEM_SLOTS)
        self.reply(F.GET_MAX_MEM_SLOTS, {"mem_slots": mem_slots})
        if backend_channel:
            self.request(F.SET_BACKEND_REQ_FD, need_reply=True, fds=[FdInfo("socket", name="unix")])
            self.ack(F.SET_BACKEND_REQ_FD)
        self.request(F.SET_OWNER)
        self.request(F.GET_FEATURES)
        self.reply(F.GET_FEATURES, {"features": offered})

    def vring_fd(self, request: int, index: int = 0, fds=None, nofd: bool = False) -> int:
        return self.request(request, {"index": index, "flags": int(nofd), "reserved": 0},
                            fds=[] if nofd else (fds if fds is not None else [eventfd(10 + request)]))

    def get_config(self, size: int = 57) -> None:
        config = {"offset": 0, "size": size, "flags": 0, "data": bytes(size)}
        self.request(F.GET_CONFIG, config)
        self.reply(F.GET_CONFIG, config)

    def add_region(self, gpa: int, size: int, offset: int) -> tuple[int, int]:
        region = {"padding": 0, "region": {"guest_phys_addr": gpa, "memory_size": size,
                                           "userspace_addr": UADDR + offset, "mmap_offset": offset}}
        sent = self.request(F.ADD_MEM_REG, region, need_reply=True, fds=[memfd()])
        return sent, self.ack(F.ADD_MEM_REG)

    def start_ring(self, index: int = 0, num: int = 256, base: int = 0) -> int:
        self.request(F.SET_VRING_NUM, {"index": index, "num": num})
        self.request(F.SET_VRING_BASE, {"index": index, "num": base})
        self.request(F.SET_VRING_ADDR, {"index": index, "flags": 0, "desc": UADDR + DESC, "used": UADDR + USED,
                                        "avail": UADDR + AVAIL, "log": 0})
        kick = self.vring_fd(F.SET_VRING_KICK, index)
        self.request(F.SET_VRING_ENABLE, {"index": index, "num": 1})
        return kick

    def stop_ring(self, index: int = 0, base: int = 37) -> tuple[int, int]:
        self.request(F.SET_VRING_ENABLE, {"index": index, "num": 0})
        sent = self.request(F.GET_VRING_BASE, {"index": index, "num": 0})
        return sent, self.reply(F.GET_VRING_BASE, {"index": index, "num": base})


def opened(**negotiation) -> Script:
    """A blk connection after QEMU's opening negotiation, before the device starts."""
    s = Script()
    s.connected("blk")
    s.negotiate(**negotiation)
    return s


def running(**negotiation) -> Script:
    """A blk connection with memory and ring 0 running."""
    s = opened(**negotiation)
    s.request(F.SET_FEATURES, {"features": BLK_ACKED})
    s.add_region(0, 0xA0000, 0)
    s.add_region(0xC0000, 256 * MiB - 0xC0000, 0xC0000)
    s.start_ring()
    return s


def qemu_blk_boot(end: bool = True) -> Script:
    """The real QEMU 7.2 + qemu-storage-daemon boot (§2): SeaBIOS starts the device, the kernel restarts it."""
    s = Script()
    s.connected("blk")
    s.negotiate()
    s.vring_fd(F.SET_VRING_CALL)
    s.vring_fd(F.SET_VRING_ERR)
    s.get_config()
    s.request(F.SET_FEATURES, {"features": BLK_ACKED})
    s.vring_fd(F.SET_VRING_CALL)
    s.request(F.SET_FEATURES, {"features": BLK_ACKED})
    s.add_region(0, 0xA0000, 0)
    s.add_region(0xC0000, 256 * MiB - 0xC0000, 0xC0000)
    s.start_ring()
    s.stop_ring()
    s.request(F.SET_FEATURES, {"features": BLK_ACKED})
    s.vring_fd(F.SET_VRING_CALL)
    s.start_ring(base=37)
    s.stop_ring(base=120)
    if end:
        s.event("front-end closed the connection", EventKind.CLOSED, step_ns=300_000_000)
    return s


def analyse(script: Script) -> Analyzer:
    return Analyzer().run(script.records)


def test_real_boot_shape_gives_no_findings():
    analyzer = analyse(qemu_blk_boot())
    assert [f.line() for f in analyzer.findings] == []


def test_state_after_boot():
    analyzer = analyse(qemu_blk_boot())
    state = analyzer.state(1)
    assert state.device_type == "blk"
    assert state.features_offered == BLK_OFFERED and state.features_acked == BLK_ACKED
    assert state.protocol_features_acked == QEMU_PROTOCOL
    assert state.queue_num == 1 and state.max_mem_slots == 32 and state.owner_set
    assert [r.guest_phys_addr for r in state.regions] == [0, 0xC0000]
    assert all(r.fd.kind == "memfd" for r in state.regions) and state.memory_mode == "slots"
    vring = state.vrings[0]
    assert (vring.num, vring.base, vring.started, vring.enabled) == (256, 120, False, False)
    assert vring.kick.kind == "eventfd" and vring.desc == UADDR + DESC
    assert state.suspended and state.backend_channel.kind == "socket"
    assert state.ended and state.ended_note == "front-end closed the connection"
    text = state.format()
    assert "RING_EVENT_IDX" in text and "CONFIGURE_MEM_SLOTS" in text and "started=no" in text
    assert "FLUSH" in text                       # blk feature names, from the device type in the event note


def test_state_as_of_a_message_number():
    script = qemu_blk_boot()
    kick = next(n for n, r in enumerate(script.records, 1) if r.data[:1] == bytes([F.SET_VRING_KICK]))
    analyzer = Analyzer()
    for record in script.records[:kick]:
        analyzer.feed(record)
    vring = analyzer.state(1).vrings[0]
    assert vring.started and vring.enabled is None and not analyzer.state(1).suspended


def test_nofd_slot_is_shown():
    s = qemu_blk_boot(end=False)
    s.vring_fd(F.SET_VRING_CALL, nofd=True)
    state = analyse(s).state(1)
    assert state.vrings[0].call == NOFD and "call=NOFD" in state.format()


def test_set_mem_table_replaces_regions_and_rem_mem_reg_removes():
    s = Script()
    s.negotiate()
    table = {"nregions": 2, "padding": 0, "region": [
        {"guest_phys_addr": 0, "memory_size": MiB, "userspace_addr": UADDR, "mmap_offset": 0},
        {"guest_phys_addr": 2 * MiB, "memory_size": MiB, "userspace_addr": UADDR + 2 * MiB, "mmap_offset": 0}]}
    s.request(F.SET_MEM_TABLE, table, fds=[memfd(MiB), memfd(MiB)], need_reply=True)
    s.ack(F.SET_MEM_TABLE)
    first = dict(table["region"][0])
    s.request(F.REM_MEM_REG, {"padding": 0, "region": first}, need_reply=True)
    s.ack(F.REM_MEM_REG)
    analyzer = analyse(s)
    assert analyzer.findings == []
    assert [r.guest_phys_addr for r in analyzer.state(1).regions] == [2 * MiB]
    assert analyzer.state(1).memory_mode == "table"


def test_transactions_match_by_order_with_response_times():
    analyzer = analyse(qemu_blk_boot())
    answered = [t for t in analyzer.transactions if t.outcome == "answered"]
    names = [t.name for t in answered]
    assert names.count("GET_FEATURES") == 2 and names.count("ADD_MEM_REG") == 2
    assert "SET_BACKEND_REQ_FD" in names and "GET_CONFIG" in names and names.count("GET_VRING_BASE") == 2
    assert all(t.response_seconds == 50e-6 for t in answered)
    assert all(t.reply_number > t.request_number for t in answered)
    unanswered = {t.name for t in analyzer.transactions if t.reply_number is None}
    assert "SET_FEATURES" in unanswered and "SET_VRING_KICK" in unanswered


def test_backend_closing_while_frontend_waits_names_the_request():
    s = qemu_blk_boot(end=False)
    s.start_ring()
    s.request(F.SET_VRING_ENABLE, {"index": 0, "num": 0})
    waited = s.request(F.GET_VRING_BASE, {"index": 0, "num": 0})
    s.event("back-end closed the connection", EventKind.CLOSED)
    analyzer = analyse(s)
    assert [f.check for f in analyzer.findings] == ["disconnect-with-request-outstanding"]
    summary = end_summary(analyzer, 1)
    assert summary == f"back-end closed the connection while the front-end waited for the reply to " \
                      f"GET_VRING_BASE (#{waited})"


def test_disconnect_without_outstanding_request():
    analyzer = analyse(qemu_blk_boot())
    assert end_summary(analyzer, 1).startswith("front-end closed the connection (#")
    assert "no request outstanding" in end_summary(analyzer, 1)


def test_capture_ending_mid_request_is_a_note():
    s = qemu_blk_boot(end=False)
    s.request(F.GET_FEATURES)
    analyzer = analyse(s)
    assert [(f.check, str(f.severity)) for f in analyzer.findings] == \
        [("capture-ended-with-request-outstanding", "note")]
    assert "still open" in end_summary(analyzer, 1)


def test_backend_channel_requests_are_matched_in_reverse():
    s = qemu_blk_boot(end=False)
    s.start_ring()
    s.request(B.CONFIG_CHANGE_MSG, channel=Channel.BACKEND, need_reply=True)
    s.ack(B.CONFIG_CHANGE_MSG, channel=Channel.BACKEND)
    analyzer = analyse(s)
    backend = [t for t in analyzer.transactions if t.channel == Channel.BACKEND]
    assert analyzer.findings == [] and backend[0].outcome == "answered"
    assert s.records[-1].direction.arrow == "F>B"


def test_two_connections_are_kept_apart():
    one, two = qemu_blk_boot(), qemu_blk_boot()
    for record in two.records:
        record.connection = 2
    merged = sorted(one.records + two.records, key=lambda r: r.timestamp_ns)
    analyzer = Analyzer().run(merged)
    assert analyzer.findings == [] and set(analyzer.connections) == {1, 2}
    assert analyzer.state(2).queue_num == 1


def test_event_classification_follows_the_kind_not_the_words():
    def event(note: str, kind: EventKind, channel: Channel = Channel.MAIN) -> Record:
        return Record(0, 1, channel, kind=RecordKind.EVENT, note=note, event=kind)
    assert classify_event(event("whatever the words", EventKind.CONNECTED)) == "connect"
    assert classify_event(event("front-end hung up", EventKind.CLOSED)) == "end"
    assert classify_event(event("backend channel closed", EventKind.CHANNEL_CLOSED, Channel.BACKEND)) == "channel-end"
    # Words that version 1 read as an end mean nothing now: the kind says what happened.
    assert classify_event(event("front-end closed its side (EOF)", EventKind.HALF_CLOSED)) == "other"
    assert classify_event(event("back-end closed the connection", EventKind.NOTE)) == "other"
    assert classify_event(event("connected device=blk", EventKind.NOTE)) == "other"


# --- the command-line views, on a capture file ------------------------------------------------------------------
def _capture(tmp_path, script: Script) -> str:
    from vhusniff.capture.pcapng import write_capture
    path = str(tmp_path / "session.pcapng")
    write_capture(path, script.records)
    return path


def test_stats_lists_every_request_with_response_times(tmp_path, capsys):
    from vhusniff.cli.analysis import main_stats
    assert main_stats([_capture(tmp_path, qemu_blk_boot())]) == 0
    out = capsys.readouterr().out
    counts, times = out.split("Service response time")
    for name in ("GET_FEATURES", "SET_FEATURES", "SET_OWNER", "ADD_MEM_REG", "SET_VRING_KICK", "GET_CONFIG reply"):
        assert f" {name} " in counts
    assert "SET_VRING_CALL                          3       60     3" in counts
    srt = {line.split()[1]: line.split() for line in times.splitlines() if line.startswith("  main")}
    assert set(srt) == {"GET_FEATURES", "GET_PROTOCOL_FEATURES", "GET_QUEUE_NUM", "GET_MAX_MEM_SLOTS",
                        "SET_BACKEND_REQ_FD", "GET_CONFIG", "ADD_MEM_REG", "GET_VRING_BASE"}
    assert srt["ADD_MEM_REG"][2:6] == ["2", "0.050", "0.050", "0.050"]
    assert "front-end closed the connection (#" in out and "Findings: 0" in out


def test_report_and_expert_on_a_broken_session(tmp_path, capsys):
    from vhusniff.cli.analysis import main_expert, main_report
    s = qemu_blk_boot(end=False)
    s.start_ring()
    s.request(F.GET_VRING_BASE, {"index": 0, "num": 0})
    s.event("back-end closed the connection", EventKind.CLOSED)
    path = _capture(tmp_path, s)
    assert main_report([path]) == 0
    report = capsys.readouterr().out
    ended = next(line for line in report.splitlines() if line.strip().startswith("Ended:"))
    assert "back-end closed the connection while the front-end waited for the reply to GET_VRING_BASE" in ended
    assert "ring 0 started (SET_VRING_KICK)" in report and "1 error" in report
    assert main_expert([path]) == 0
    assert "disconnect-with-request-outstanding" in capsys.readouterr().out


def test_state_at_a_message_number(tmp_path, capsys):
    from vhusniff.cli.analysis import main_state
    path = _capture(tmp_path, qemu_blk_boot())
    assert main_state([path, "--at", "5"]) == 0
    early = capsys.readouterr().out
    assert "as of record #5" in early and "protocol features acked:   (not seen)" in early
    assert main_state([path]) == 0
    assert "ended at #" in capsys.readouterr().out


def test_timeline_svg_has_one_mark_per_message(tmp_path, capsys):
    import xml.etree.ElementTree as ET

    from vhusniff.cli.analysis import main_timeline
    s = qemu_blk_boot()
    output = tmp_path / "t.svg"
    assert main_timeline([_capture(tmp_path, s), "-o", str(output)]) == 0
    root = ET.parse(output).getroot()
    groups = root.iter("{http://www.w3.org/2000/svg}g")
    classes = [g.get("class") for g in groups]
    assert classes.count("msg") == sum(1 for r in s.records if r.kind == RecordKind.MESSAGE)
    assert classes.count("event") == sum(1 for r in s.records if r.kind == RecordKind.EVENT) == 3
    html = tmp_path / "t.html"
    assert main_timeline([_capture(tmp_path, s), "-o", str(html)]) == 0
    assert html.read_text().startswith("<!DOCTYPE html>")


def test_read_expert_puts_findings_under_their_messages(tmp_path, capsys):
    from vhusniff.cli.main import main
    s = qemu_blk_boot(end=False)
    s.start_ring()
    waited = s.request(F.GET_VRING_BASE, {"index": 0, "num": 0})
    s.event("back-end closed the connection", EventKind.CLOSED)
    assert main(["read", _capture(tmp_path, s), "--expert", "--color", "never"]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.split()[:1] == [str(waited)])
    assert lines[at + 1].strip().startswith("[expert error: disconnect-with-request-outstanding]")
    # GET_VRING_BASE stopped the ring (the stop was under way): the only finding is the reply it never got
    assert "Expert findings: 1" in lines and not any("ended-while-running" in line for line in lines)


def late_findings() -> list[Record]:
    """Two connections interleaved, with findings raised after the record they attach to: a missing ack (raised
    at the next request), a disconnect while a request waits, and a request still waiting when the capture ends."""
    one, two = running(), opened(mem_slots=8)
    one.request(F.SET_VRING_ENABLE, {"index": 0, "num": 1}, need_reply=True)       # its ack never comes
    one.request(F.SET_VRING_ENABLE, {"index": 0, "num": 0})
    one.request(F.GET_VRING_BASE, {"index": 0, "num": 0})
    one.event("back-end closed the connection", EventKind.CLOSED)
    two.request(F.GET_CONFIG, {"offset": 0, "size": 57, "flags": 0, "data": bytes(57)})
    for record in two.records:
        record.connection = 2
        record.timestamp_ns += 7
    return sorted(one.records + two.records, key=lambda r: r.timestamp_ns)


def _read_expert_as_two_passes_did(path: str, options: list[str], capsys) -> str:
    """What `read --expert` printed when it analysed the whole capture first and then read it again to print:
    the plain lines, each followed by the findings attached to it, then the list of every finding."""
    from vhusniff.cli.analysis import load
    from vhusniff.cli.main import main
    analyzer = load(path).analyzer
    by_number = analyzer.findings_by_number()
    main(["read", path, "--color", "never", *options])
    lines = []
    for line in capsys.readouterr().out.splitlines(keepends=True):
        lines.append(line)
        found = by_number.get(int(line.split()[0]), ())
        lines += [f"        [expert {f.severity}: {f.check}] {f.text}\n" for f in found]
    lines.append(f"\nExpert findings: {len(analyzer.findings)}\n")
    lines += [f"  c{f.connection} {f.line()}\n" for f in analyzer.findings]
    return "".join(lines)


@pytest.mark.parametrize("capture", ["late-findings", "qemu-testpmd-crash.pcapng", "dpdk-virtio-user.pcapng"])
@pytest.mark.parametrize("options", [[], ["--follow", "2"], ["-c", "12"], ["-Y", "request == SET_VRING_ENABLE"]])
def test_read_expert_in_one_pass_prints_what_two_passes_did(tmp_path, capsys, capture, options):
    from vhusniff.capture.pcapng import write_capture
    from vhusniff.cli.main import main
    if capture == "late-findings":
        path = str(tmp_path / "late.pcapng")
        write_capture(path, late_findings())
    else:
        path = _real(capture)
    expected = _read_expert_as_two_passes_did(path, options, capsys)
    assert main(["read", path, "--expert", "--color", "never", *options]) == 0
    assert capsys.readouterr().out == expected
    if capture == "late-findings" and not options:     # each finding raised after its record, under that record
        under = {line.split("]")[0].split(": ")[1] for line in expected.splitlines() if line.startswith("        [")}
        assert under == {"missing-reply", "disconnect-with-request-outstanding",
                         "capture-ended-with-request-outstanding"}


def test_read_expert_opens_the_capture_once(tmp_path):
    """Counted with an audit hook on every open(); `strace -e openat` shows the same."""
    path = _real("qemu-testpmd-crash.pcapng")
    script = "\n".join([
        "import sys",
        "opened = []",
        "sys.addaudithook(lambda event, args: event == 'open' and opened.append(args[0]))",
        "from vhusniff.cli.main import main",
        "main(['read', sys.argv[1], '--expert'])",
        "sys.stderr.write(repr(opened.count(sys.argv[1])))"])
    result = subprocess.run([sys.executable, "-c", script, path], capture_output=True, text=True, timeout=60,
                            cwd=os.path.dirname(CAPTURES))
    assert result.stderr == "1" and "Expert findings: 0" in result.stdout, result.stderr


def test_one_reply_rule_for_analysis_and_replay():
    """analysis.expectation states the reply rules; replay's reply_required is true exactly for REPLY and ACK."""
    from vhusniff.protocol.grammar import DecodeContext, decode
    from vhusniff.replay import reply_required
    reply_ack, log_shmfd = 1 << 3, 1 << 1
    unknown_asking = decode(struct.pack("<III", 99, 0x1 | cat.FLAG_NEED_REPLY, 0))
    cases = [
        (build_message(Channel.MAIN, F.GET_FEATURES), 0, Expect.REPLY),
        (build_message(Channel.MAIN, F.SET_OWNER), reply_ack, Expect.NOTHING),
        (build_message(Channel.MAIN, F.SET_OWNER, need_reply=True), reply_ack, Expect.ACK),
        (build_message(Channel.MAIN, F.SET_OWNER, need_reply=True), 0, Expect.MAYBE),
        (build_message(Channel.MAIN, F.SET_LOG_BASE, {"mmap_size": 0, "mmap_offset": 0}), log_shmfd, Expect.REPLY),
    ]
    for data, features, expected in cases:
        message = decode(data)
        assert expectation(message, features) == expected, message.name
        assert reply_required(message, DecodeContext(protocol_features=features)) == \
            (expected in (Expect.REPLY, Expect.ACK)), message.name
    assert expectation(unknown_asking, reply_ack) == Expect.ACK
    assert reply_required(unknown_asking, DecodeContext(protocol_features=reply_ack))


# --- real captures (recorded by the lab into captures/; skipped until they are there) ---------------------------
CAPTURES = os.path.join(os.path.dirname(__file__), os.pardir, "captures")


def _real(name: str) -> str:
    path = os.path.join(CAPTURES, name)
    if not os.path.exists(path):
        pytest.skip(f"captures/{name} not recorded yet")
    return path


def test_real_qemu_blk_boot_gives_no_findings_and_full_stats():
    from vhusniff.cli.analysis import load, stats_lines
    loaded = load(_real("qemu-blk-boot.pcapng"), keep=True)
    assert loaded.error == "" and [f.line() for f in loaded.analyzer.findings] == []
    state = loaded.analyzer.state(1)
    assert state.device_type == "blk" and state.ended and not state.vrings[0].started
    text = "\n".join(stats_lines(loaded))
    for transaction in loaded.analyzer.transactions:
        assert f" {transaction.name} " in text
    answered = {t.name for t in loaded.analyzer.transactions if t.response_seconds is not None}
    assert {"GET_FEATURES", "GET_CONFIG", "ADD_MEM_REG", "GET_VRING_BASE"} <= answered


def test_real_testpmd_crash_is_a_disconnect_naming_the_last_request():
    """QEMU died before the device ever started: nothing in the protocol was wrong (the rings were enabled, never
    started, which QEMU net does on every boot), so the report tells it by how and where the connection ended."""
    from vhusniff.cli.analysis import load
    loaded = load(_real("qemu-testpmd-crash.pcapng"))
    connection = min(loaded.analyzer.connections)
    summary = end_summary(loaded.analyzer, connection)
    assert loaded.analyzer.state(connection).ended
    assert summary == ("front-end closed its side (EOF) after message #26; passing the close on to the back-end "
                       "(#28), no request outstanding; the last request was SET_VRING_ENABLE (#26)")
    assert loaded.analyzer.findings == []


def test_device_state_stream_chunks_are_opaque_data_not_requests():
    from vhusniff.analysis.analyzer import Analyzer, end_summary
    from vhusniff.model import Channel, Direction, Record, RecordKind
    from vhusniff.protocol.grammar import build_message
    analyzer = Analyzer()
    records = [Record(1, 1, kind=RecordKind.EVENT, note="connected", event=EventKind.CONNECTED),
               Record(2, 1, Channel.MAIN, Direction.FRONTEND_TO_BACKEND, build_message(Channel.MAIN, 1)),
               Record(3, 1, Channel.MAIN, Direction.BACKEND_TO_FRONTEND,
                      build_message(Channel.MAIN, 1, bytes(8), reply=True)),
               Record(4, 1, Channel.DEVICE_STATE, Direction.BACKEND_TO_FRONTEND, b"\x01\x02\x03", [],
                      RecordKind.MESSAGE, "device-state stream"),
               Record(5, 1, kind=RecordKind.EVENT, note="front-end closed: connection closed",
                      event=EventKind.CLOSED)]
    for record in records:
        analyzer.feed(record)
    analyzer.finish()
    assert analyzer.findings == []
    assert "GET_FEATURES (#2)" in end_summary(analyzer, 1)
