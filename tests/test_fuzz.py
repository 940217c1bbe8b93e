"""`vhusniff fuzz --as frontend`: mutations made with the grammar, delta debugging, and campaigns against a
back-end with three planted bugs (tests/planted_backend.py: a Python back-end, since no real peer has bugs
at known places) and against a real qemu-storage-daemon 7.2. Every reproducer is replayed with
`vhusniff replay --as frontend` against a fresh target and must die the same way.

Outside CI a test skips when its program is missing; in CI (CI=true) it fails instead.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peers import open_fds, require
from vhusniff.analysis.diff import load_or_report
from vhusniff.cli.fuzz import main as fuzz_main
from vhusniff.fuzz.campaign import Status
from vhusniff.fuzz.mutate import (
    BARRIER,
    Mutation,
    Mutator,
    apply_all,
    case_records,
    edge_values,
    integer_fields,
    load_seed,
)
from vhusniff.fuzz.reverse import BackendMutator, ConnectingTarget, load_backend_seed, mutated_recording
from vhusniff.fuzz.reverse import serve as serve_as_backend
from vhusniff.fuzz.target import EXIT_WAIT, Target, execute
from vhusniff.fuzz.triage import ddmin, report_head
from vhusniff.model import Channel, Direction, FdInfo, Record, RecordKind
from vhusniff.protocol import catalogue as cat
from vhusniff.protocol.grammar import HEADER_SIZE, HEADER_STRUCT, build_message, decode
from vhusniff.replay.fresh import DEAD_EVENTFD, PAGE, SHORT_MEMFD, FreshFds

REPO = Path(__file__).resolve().parent.parent
SEED = REPO / "captures" / "qemu-blk-boot.pcapng"
PLANTED = f"{sys.executable} {REPO / 'tests' / 'planted_backend.py'} {{socket}}"
PLANTED_BUGS = ("SET_VRING_NUM ring size", "GET_VRING_BASE stopped ring", "memory region of")
F = cat.FrontendRequest


@pytest.fixture(scope="module")
def seed():
    return load_seed(str(SEED), load_or_report(str(SEED), "test"))


def replay_reproducer(reproducer: str, template: str, workdir: Path):
    """Play a reproducer with `vhusniff replay --as frontend` against a fresh target; how the target ended."""
    target = Target(template, workdir)
    target.start()
    try:
        done = subprocess.run([sys.executable, "-m", "vhusniff.cli.main", "replay", "--as", "frontend", reproducer,
                               "--backend", str(target.socket_path)], capture_output=True, text=True, cwd=REPO,
                              timeout=60)
        return target.death(EXIT_WAIT), done
    finally:
        target.stop()


def processes_naming(text: str) -> list[int]:
    """Pids of processes whose command line holds `text` (a target left running would)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


# ---- mutations, by the grammar ----

def test_integer_fields_come_from_the_grammar_layouts_with_their_offsets(seed):
    add_mem_reg = seed.messages[seed.names.index("ADD_MEM_REG")]
    fields = {field.name: field for field in integer_fields(add_mem_reg)}
    size = fields["mem.region.memory_size"]
    assert (size.offset, size.width, size.value) == (16, 8, 0x10000000)
    raw = seed.requests[seed.names.index("ADD_MEM_REG")].data
    assert int.from_bytes(raw[HEADER_SIZE + size.offset:][:8], "little") == size.value
    vring_fd = {field.name: field for field in integer_fields(seed.messages[seed.names.index("SET_VRING_KICK")])}
    assert vring_fd["vring.index"].width == 1 and vring_fd["vring.flags"].offset == 1


def test_edge_values_cover_the_type_and_the_meaning_of_a_size(seed):
    add_mem_reg = seed.messages[seed.names.index("ADD_MEM_REG")]
    size = next(field for field in integer_fields(add_mem_reg) if field.name.endswith("memory_size"))
    values = edge_values(size)
    assert {0, 1, 2 ** 64 - 1, 2 ** 63, size.value + 1, size.value - 1, size.value * 2} <= set(values)
    assert size.value not in values and len(values) == len(set(values))


def test_a_field_mutation_patches_only_its_bytes_and_leaves_the_seed_alone(seed):
    index = seed.names.index("SET_VRING_NUM")
    before = seed.requests[index].data
    mutation = Mutation("field", index, "num", offset=HEADER_SIZE + 4, width=4, value=0xFFFFFFFF)
    after = apply_all(seed.requests, [mutation])
    assert decode(after[index].data).payload.num == 0xFFFFFFFF
    assert after[index].data[:HEADER_SIZE + 4] == before[:HEADER_SIZE + 4]
    assert seed.requests[index].data == before


def test_every_family_is_drawn_and_every_case_ends_with_a_request_that_must_be_answered(seed):
    mutator = Mutator(seed, random.Random(7))
    mutations = mutator.draw(400)
    assert {mutation.family for mutation in mutations} == {"field", "header", "length", "drop", "duplicate",
                                                           "swap", "insert", "fd"}
    assert any(mutation.fd is not None and mutation.fd.name == SHORT_MEMFD for mutation in mutations)
    assert any(mutation.fd is not None and mutation.fd.name == DEAD_EVENTFD for mutation in mutations)
    assert all(mutation.index >= 1 for mutation in mutations), "the first request is the prefix, never mutated"
    records = case_records(seed, mutations[:3])
    messages = [record for record in records if record.kind == RecordKind.MESSAGE]
    assert messages[-2].data == BARRIER and decode(messages[-2].data).request == F.GET_FEATURES
    assert decode(messages[-1].data).is_reply, "the closing GET_FEATURES keeps the seed's reply to compare"


def test_header_lies_include_a_size_beyond_the_payload_and_the_reply_bit_on_a_request(seed):
    mutations = [mutation for mutation in Mutator(seed, random.Random(3)).draw(600) if mutation.family == "header"]
    sizes = [(mutation.value, len(seed.requests[mutation.index].data) - HEADER_SIZE) for mutation in mutations
             if mutation.offset == 8]
    assert any(size > payload for size, payload in sizes) and any(size < payload for size, payload in sizes)
    reply_bit = [mutation for mutation in mutations if mutation.offset == 4 and mutation.value & cat.FLAG_REPLY]
    assert reply_bit and all(mutation.lies_about_size for mutation in mutations if mutation.offset == 8)
    assert "the REPLY bit on a request" in reply_bit[0].text


def played_on_the_wire(seed, mutations: list[Mutation], keep: int, workdir: Path, reply_timeout: float = 5.0):
    """Play a case against the planted back-end, which writes down every byte it receives: (the execution, the
    bytes it received)."""
    received = workdir / "received.bin"
    target = Target(f"{PLANTED} {received}", workdir)
    target.start()
    try:
        execution = execute(case_records(seed, mutations, keep), target, seed.device, reply_timeout)
    finally:
        target.stop()
    return execution, received.read_bytes()


def test_a_request_whose_flags_claim_a_reply_is_still_sent_as_it_is(seed, tmp_path):
    index = seed.names.index("SET_VRING_NUM")
    flags = HEADER_STRUCT.unpack_from(seed.requests[index].data)[1]
    lie = Mutation("header", index, "REPLY bit", offset=4, value=flags | cat.FLAG_REPLY)
    lied = apply_all(seed.requests, [lie])[index].data
    execution, received = played_on_the_wire(seed, [lie], index + 1, tmp_path)
    assert lied in received and HEADER_STRUCT.unpack_from(lied)[1] & cat.FLAG_REPLY
    assert execution.sent == index + 2 and execution.outcome not in ("stuck", "hang"), execution


def test_a_size_beyond_the_payload_takes_the_next_request_as_its_rest(seed, tmp_path):
    """The header claims the next request as the rest of its payload: both go out back to back, the closing
    GET_FEATURES is a message of its own again, and its reply ends the case."""
    index = seed.names.index("SET_VRING_NUM")
    request, following = seed.requests[index].data, seed.requests[index + 1].data
    lie = Mutation("header", index, "size", offset=8, value=len(request) - HEADER_SIZE + len(following))
    lied = apply_all(seed.requests, [lie])[index].data
    execution, received = played_on_the_wire(seed, [lie], index + 2, tmp_path)
    assert lied + following + BARRIER in received, received[-64:].hex()
    assert execution.outcome == "ok" and execution.sent == index + 3, execution


def test_a_size_no_request_can_supply_ends_the_case_at_once_as_stuck(seed, tmp_path):
    """64 bytes more than the rest of the case holds: the back-end waits for bytes that never come, and the case
    ends as soon as everything is sent, not after the reply timeout; the target then serves a new connection."""
    index = seed.names.index("SET_VRING_NUM")
    request = seed.requests[index].data
    lie = Mutation("header", index, "size", offset=8, value=len(request) - HEADER_SIZE + len(BARRIER) + 64)
    lied = apply_all(seed.requests, [lie])[index].data
    execution, received = played_on_the_wire(seed, [lie], index + 1, tmp_path, reply_timeout=60.0)
    assert lied + BARRIER + BARRIER in received, "the case's closing GET_FEATURES, then the next connection's"
    assert execution.outcome == "stuck" and execution.death is None and execution.elapsed < 30, execution


def test_a_restart_takes_the_spare_that_is_already_up_and_stop_ends_both(tmp_path):
    target = Target(PLANTED, tmp_path, keep_spare=True)
    try:
        target.start()
        first, spare = target.proc, target.spare
        assert first is not None and spare is not None and target.answers(BARRIER, 5.0)
        os.kill(first.pid, signal.SIGKILL)
        target.start()
        assert target.proc is spare and target.spare is not None and target.spare is not spare
        assert target.answers(BARRIER, 5.0) and target.starts == 2
        pids = [spare.pid, target.spare.pid]
    finally:
        target.stop()
    assert not processes_naming(str(tmp_path)) and all(not Path(f"/proc/{pid}/cmdline").exists() for pid in pids)
    assert not list(tmp_path.glob("*.sock"))


def test_a_reproducer_memfd_smaller_than_its_region_stays_small_in_replay():
    fresh = FreshFds()
    try:
        short = fresh.make(FdInfo("memfd", 0, PAGE, SHORT_MEMFD), min_size=1 << 28)
        usual = fresh.make(FdInfo("memfd", 0, PAGE, "memory"), min_size=1 << 28)
        huge = fresh.make(FdInfo("memfd", 0, PAGE, "memory"), min_size=2 ** 64 + 5)   # a fuzzed size: no traceback
        assert (os.fstat(short).st_size, os.fstat(usual).st_size, os.fstat(huge).st_size) == (PAGE, 1 << 28, PAGE)
        for fd in (short, usual, huge):
            os.close(fd)
    finally:
        fresh.close()


def test_a_dead_eventfd_in_a_reproducer_cannot_be_signalled_by_the_back_end():
    fresh = FreshFds()
    try:
        dead = fresh.make(FdInfo("eventfd", 0, -1, DEAD_EVENTFD))
        usual = fresh.make(FdInfo("eventfd", 0, -1, ""))
        os.eventfd_write(usual, 1)
        with pytest.raises(BlockingIOError):
            os.eventfd_write(dead, 1)          # what a back-end's kick or call on it meets
        for fd in (dead, usual):
            os.close(fd)
    finally:
        fresh.close()


def test_delta_debugging_finds_the_one_minimal_set():
    tests = []
    result = ddmin(list(range(12)), lambda subset: tests.append(subset) or {3, 8} <= set(subset))
    assert result == [3, 8] and len(tests) < 40
    assert ddmin(["only"], lambda subset: True) == []


def test_report_heads_blank_numbers_so_the_same_bug_has_one_signature():
    first = report_head("qsd: libvhost-user.c:2093: vu_get_queue: Assertion `qidx < 1' failed.\nAborted")
    second = report_head("qsd: libvhost-user.c:2093: vu_get_queue: Assertion `qidx < 1' failed.\nAborted\n")
    assert first == second and "2093" not in first


def test_status_line_is_drawn_on_a_terminal_only():
    terminal, piped = io.StringIO(), io.StringIO()
    shown = Status(terminal, enabled=True)
    shown.show("12 executions", force=True)
    shown.clear()
    Status(piped).show("12 executions", force=True)
    assert "12 executions" in terminal.getvalue() and terminal.getvalue().endswith("\r")
    assert piped.getvalue() == ""
    timed = io.StringIO()
    bar = Status(timed, enabled=True, seconds=60)
    bar.show("3 executions", force=True)
    bar.clear()
    assert "3 executions" in timed.getvalue() and timed.getvalue().endswith("\r")


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    broken = tmp_path / "broken.pcapng"
    broken.write_bytes(b"not a capture")
    assert fuzz_main(["--as", "frontend", str(broken), "--target", "x {socket}", "--out", str(tmp_path / "o"),
                      "-q"]) == 2
    assert str(broken) in capsys.readouterr().err
    assert fuzz_main(["--as", "frontend", str(SEED), "--target", "qemu-storage-daemon", "--out",
                      str(tmp_path / "o"), "-q"]) == 2
    assert "{socket}" in capsys.readouterr().err
    assert fuzz_main(["--as", "frontend", str(SEED), "--target", "/no/such/back-end {socket}", "--out",
                      str(tmp_path / "o"), "-q", "--duration", "5"]) == 2
    assert "cannot start the target /no/such/back-end" in capsys.readouterr().err


# ---- the planted bugs ----

@pytest.fixture(scope="module")
def planted_campaign(tmp_path_factory):
    out = tmp_path_factory.mktemp("planted")
    before = open_fds()
    started = time.monotonic()
    code = fuzz_main(["--as", "frontend", str(SEED), "--target", PLANTED, "--duration", "60", "--crashes", "3",
                      "--seed", "1", "--out", str(out), "-q"])
    elapsed = time.monotonic() - started
    return out, code, elapsed, before, open_fds()


def test_the_fuzzer_finds_all_three_planted_bugs_in_bounded_time(planted_campaign):
    out, code, elapsed, before, after = planted_campaign
    summary = json.loads((out / "summary.json").read_text())
    reports = [crash["report"] for crash in summary["crashes"]]
    assert code == 1 and elapsed < 90, (elapsed, summary["outcomes"])
    assert all(any(bug in report for report in reports) for bug in PLANTED_BUGS), reports
    for crash in summary["crashes"]:
        assert crash["reason"] == "SIGABRT" and crash["reproduced"]
        assert crash["minimised_from"]["mutations"] >= len(crash["mutations"]) >= 1
    assert summary["executions"] == len((out / "executions.jsonl").read_text().splitlines())
    assert summary["distinct_behaviours"] >= 2 and summary["executions_per_second"] > 0
    assert after == before, "no fd of the campaign is left open"
    assert not processes_naming(str(out)) and not (out / "target.sock").exists()
    launches = sum(line.startswith("$ ") for log in out.glob("target*.log") for line in log.read_text().splitlines())
    assert summary["target_starts"] > 1 and launches <= summary["target_starts"] + 1, "a restart takes the spare"


def test_each_planted_reproducer_replays_to_its_bug(planted_campaign, tmp_path):
    out, _code, _elapsed, _before, _after = planted_campaign
    summary = json.loads((out / "summary.json").read_text())
    for number, crash in enumerate(summary["crashes"]):
        death, done = replay_reproducer(crash["reproducer"], PLANTED, tmp_path / str(number))
        assert death is not None and death.reason == "SIGABRT", (crash["signature"], done.stdout, done.stderr)
        assert report_head(death.report) == report_head(crash["report"]), death.report
        assert done.returncode == 1 and "Traceback" not in done.stderr


def test_sigint_stops_the_campaign_and_its_target_and_writes_the_summary(tmp_path):
    out = tmp_path / "out"
    campaign = subprocess.Popen([sys.executable, "-m", "vhusniff.cli.main", "fuzz", "--as", "frontend", str(SEED),
                                 "--target", PLANTED, "--duration", "120", "--out", str(out), "--seed", "2"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, target = out / "executions.jsonl", str(out / "target.sock")
    deadline = time.monotonic() + 60
    try:
        # Polling conditions (the campaign's own log, a target process: it is restarted after each crash), with
        # a deadline.
        while not (log.exists() and len(log.read_text().splitlines()) >= 5 and processes_naming(target)):
            assert campaign.poll() is None and time.monotonic() < deadline, "the campaign runs, with its target"
            time.sleep(0.05)
        campaign.send_signal(signal.SIGINT)
        stdout, stderr = campaign.communicate(timeout=60)
    finally:
        if campaign.poll() is None:
            campaign.kill()
            campaign.communicate()
        for stream in (campaign.stdout, campaign.stderr):
            if stream is not None:
                stream.close()
    assert campaign.returncode in (0, 1) and "Traceback" not in stderr, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and summary["executions"] >= 5 and "executions in" in stdout
    assert not processes_naming(str(out / "target.sock")) and not (out / "target.sock").exists()


# ---- a real qemu-storage-daemon 7.2 ----

# glibc's words for a heap that an out-of-range vring index corrupted (SIGABRT, found only when the layout shows it)
HEAP_CORRUPTION_WORDS = ("double free", "corrupted", "malloc(", "free(")


def test_a_bounded_campaign_against_qemu_storage_daemon_has_no_false_crash(tmp_path):
    require("qemu-storage-daemon")
    disk = tmp_path / "disk.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "64M"], check=True)
    template = ("qemu-storage-daemon --blockdev driver=file,node-name=disk0,filename=" + str(disk) +
                " --export type=vhost-user-blk,id=export0,node-name=disk0,writable=on,addr.type=unix,"
                "addr.path={socket}")
    out = tmp_path / "out"
    before = open_fds()
    fuzz_main(["--as", "frontend", str(SEED), "--target", template, "--duration", "20", "--seed", "1",
               "--out", str(out), "-q"])
    assert open_fds() == before and not processes_naming(str(out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["executions"] > 50 and summary["distinct_behaviours"] >= 5, summary["outcomes"]
    assert summary["outcomes"].get("ok", 0) > 0, "most cases are taken: the handshake prefix works"
    # No false crash: the daemon died by a signal each time (a refusal is not a crash), and the crashes that came
    # again when their minimised cases were played again are replayed by `vhusniff replay` to the same death of a
    # fresh daemon. (qemu-storage-daemon 7.2 does crash: a vring index out of range may corrupt its heap, and
    # such a crash comes only sometimes: up to three replays, as the campaign tries three times.)
    replayed = []
    for number, crash in enumerate(summary["crashes"]):
        assert crash["reason"].startswith("SIG"), crash
        # glibc notices a corrupted heap only when the layout lets it: such a crash need not come on every replay.
        if crash["reproduced"] and not any(word in crash["reason"] for word in HEAP_CORRUPTION_WORDS):
            reasons = []
            for attempt in range(3):
                death, done = replay_reproducer(crash["reproducer"], template, tmp_path / f"replay{number}-{attempt}")
                reasons.append(death.reason if death is not None else done.stdout)
                if reasons[-1] == crash["reason"]:
                    break
            replayed.append((crash["signature"], crash["reason"] in reasons, reasons))
    # A small out-of-range index corrupts the heap too, and the death it causes later (a SIGSEGV, an abort) may not
    # name it: so most, not all, of the crashes that came again in the campaign must come again in replay.
    if replayed:
        assert sum(same for _signature, same, _reasons in replayed) * 2 >= len(replayed), replayed


# ---- a real QEMU 7.2, fuzzed as a malicious back-end ----

QEMU = ("qemu-system-x86_64 -S -display none -nodefaults -qmp stdio -machine q35,memory-backend=mem -m 256M "
        "-object memory-backend-memfd,id=mem,size=256M,share=on -chardev socket,id=c0,path={socket} "
        "-device vhost-user-blk-pci,chardev=c0")
QUIT = '{"execute":"qmp_capabilities"}{"execute":"quit"}'


def test_fuzzing_qemu_as_a_back_end_answers_each_device_start_from_mutated_replies(tmp_path):
    require("qemu-system-x86_64")
    out = tmp_path / "out"
    before = open_fds()
    fuzz_main(["--as", "backend", str(SEED), "--target", QEMU, "--stdin", QUIT, "--executions", "12",
               "--duration", "60", "--seed", "3", "--out", str(out), "-q"])
    assert open_fds() == before and not processes_naming(str(out)) and not (out / "target.sock").exists()
    summary = json.loads((out / "summary.json").read_text())
    executions = [json.loads(line) for line in (out / "executions.jsonl").read_text().splitlines()]
    assert summary["role"] == "backend" and summary["executions"] == len(executions) == 12
    # QEMU took some mutated handshakes whole (it quit by itself) and refused others (it said why, and
    # reconnected or exited): both are behaviours, neither a crash.
    assert summary["outcomes"].get("ok", 0) >= 1 and summary["outcomes"].get("refused", 0) >= 1, summary["outcomes"]
    assert all(crash["reason"].startswith("SIG") for crash in summary["crashes"])
    assert "vhost-user-blk-pci" in (out / "target.log").read_text()


# ---- a planted-bug front-end, fuzzed as a malicious back-end ----

PLANTED_FRONTEND = f"{sys.executable} {REPO / 'tests' / 'planted_frontend.py'} {{socket}}"
PLANTED_FRONTEND_BUGS = ("GET_FEATURES reply", "GET_QUEUE_NUM reply")


@pytest.fixture(scope="module")
def planted_frontend_campaign(tmp_path_factory):
    out = tmp_path_factory.mktemp("planted-frontend")
    before = open_fds()
    started = time.monotonic()
    code = fuzz_main(["--as", "backend", str(SEED), "--target", PLANTED_FRONTEND, "--duration", "25", "--crashes",
                      "2", "--timeout", "2", "--seed", "1", "--out", str(out), "-q"])
    return out, code, time.monotonic() - started, before, open_fds()


def test_fuzzing_as_a_back_end_finds_both_bugs_planted_in_a_front_end(planted_frontend_campaign):
    out, code, elapsed, before, after = planted_frontend_campaign
    summary = json.loads((out / "summary.json").read_text())
    reports = [crash["report"] for crash in summary["crashes"]]
    assert code == 1 and elapsed < 30, (elapsed, summary["outcomes"])
    assert all(any(bug in report for report in reports) for bug in PLANTED_FRONTEND_BUGS), reports
    for crash in summary["crashes"]:
        assert crash["reason"] == "SIGABRT" and crash["reproduced"]
        assert Path(crash["reproducer"]).parent == out / "crashes" and crash["reproducer"].endswith(".pcapng")
    assert summary["role"] == "backend" and summary["outcomes"].get("ok", 0) >= 1
    assert after == before and not processes_naming(str(out)) and not (out / "target.sock").exists()


def test_each_back_end_role_reproducer_replays_to_its_front_end_bug(planted_frontend_campaign, tmp_path):
    out, _code, _elapsed, _before, _after = planted_frontend_campaign
    summary = json.loads((out / "summary.json").read_text())
    assert summary["crashes"]
    for number, crash in enumerate(summary["crashes"]):
        listen = tmp_path / f"{number}.sock"
        replay = subprocess.Popen([sys.executable, "-m", "vhusniff.cli.main", "replay", "--as", "backend",
                                   crash["reproducer"], "--listen", str(listen)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=REPO)
        try:
            deadline = time.monotonic() + 30
            while not listen.exists() and replay.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)        # polling for the socket to appear, a condition with a deadline
            assert listen.exists(), replay.communicate(timeout=10)
            front_end = subprocess.run([sys.executable, str(REPO / "tests" / "planted_frontend.py"), str(listen)],
                                       capture_output=True, text=True, timeout=30)
            stdout, stderr = replay.communicate(timeout=30)
        finally:
            if replay.poll() is None:
                replay.kill()
                replay.wait()
        assert front_end.returncode == -signal.SIGABRT, (crash["signature"], front_end.stderr, stdout, stderr)
        assert report_head(front_end.stderr) == report_head(crash["report"]), front_end.stderr
        assert "Traceback" not in stderr


# ---- header lies of the back-end role, on the wire ----

@pytest.fixture(scope="module")
def backend_seed():
    return load_backend_seed(str(SEED), load_or_report(str(SEED), "test"))


def served_on_the_wire(backend_seed, lie: Mutation, workdir: Path, timeout: float = 60.0):
    """Answer the planted front-end from the seed with one back-end message changed; it writes down every byte
    it receives: (the execution, the bytes it received)."""
    seed, recording = backend_seed
    received = workdir / "received.bin"
    records = mutated_recording(seed, recording, [lie])
    target = ConnectingTarget(f"{PLANTED_FRONTEND} {received}", workdir)
    try:
        execution = serve_as_backend(records, target, seed.device, timeout)
    finally:
        target.stop()
    return execution, received.read_bytes(), apply_all(seed.requests, [lie])[lie.index].data


def reply_to(seed, name: str) -> int:
    return next(index for index, message in enumerate(seed.messages) if message.is_reply and message.name == name)


def test_back_end_header_lies_include_both_reply_bit_lies_and_a_size_beyond_the_payload(backend_seed):
    seed, _recording = backend_seed
    # The seed's connection has no back-end-channel request: one is added, as a capture of a device using it has.
    data = build_message(Channel.BACKEND, cat.BackendRequest.CONFIG_CHANGE_MSG)
    request = Record(0, seed.connection, Channel.BACKEND, Direction.BACKEND_TO_FRONTEND, data)
    seed = dataclasses.replace(seed, requests=[*seed.requests, request],
                               messages=[*seed.messages, decode(data, Channel.BACKEND)])
    mutations = [mutation for mutation in BackendMutator(seed, random.Random(3)).draw(600)
                 if mutation.family == "header"]
    flags = [(mutation, seed.messages[mutation.index].is_reply) for mutation in mutations if mutation.offset == 4]
    assert any(is_reply and not mutation.value & cat.FLAG_REPLY for mutation, is_reply in flags)
    assert any(not is_reply and mutation.value & cat.FLAG_REPLY for mutation, is_reply in flags)
    assert any(mutation.value > len(seed.requests[mutation.index].data) - HEADER_SIZE
               for mutation in mutations if mutation.offset == 8)


def test_a_reply_without_the_reply_bit_goes_to_the_front_end_as_it_is(backend_seed, tmp_path):
    seed, _recording = backend_seed
    index = reply_to(seed, "GET_PROTOCOL_FEATURES")
    flags = HEADER_STRUCT.unpack_from(seed.requests[index].data)[1]
    lie = Mutation("header", index, "no REPLY bit", offset=4, value=flags & ~cat.FLAG_REPLY)
    execution, received, lied = served_on_the_wire(backend_seed, lie, tmp_path)
    assert lied in received and not HEADER_STRUCT.unpack_from(lied)[1] & cat.FLAG_REPLY, received.hex()
    assert execution.outcome == "refused", execution          # the planted front-end refuses a reply without it


def test_a_reply_size_no_message_can_supply_ends_at_once_as_stuck(backend_seed, tmp_path):
    """The GET_FEATURES reply promises 64 bytes more than it carries: the front-end waits for the rest before its
    next request, so the reply goes as it is, our side closes, and the execution ends long before the timeout."""
    seed, _recording = backend_seed
    index = reply_to(seed, "GET_FEATURES")
    size = len(seed.requests[index].data) - HEADER_SIZE
    lie = Mutation("header", index, "size", offset=8, value=size + 64)
    started = time.monotonic()
    execution, received, lied = served_on_the_wire(backend_seed, lie, tmp_path, timeout=60.0)
    assert received == lied and HEADER_STRUCT.unpack_from(received)[2] == size + 64, received.hex()
    assert execution.outcome == "stuck" and execution.death is None, execution
    assert time.monotonic() - started < 30
