"""The lab's further real peers: QEMU 10 beside the system's QEMU 7.2, virtiofsd, vhost-user-gpu, DPDK multiqueue.

The guests boot through the proxy in parallel (one module fixture, a few at a time), each test then judges its own
run. Outside CI a test skips when its program is not installed; in CI (CI=true) it fails instead.
"""
import shutil
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from peers import IN_CI, kit, qemu10, require  # noqa: F401  (kit and qemu10 are fixtures)
from vhusniff.capture.pcapng import read_capture
from vhusniff.lab import peers as lab
from vhusniff.lab.command import LabRun, build_parser, run_lab
from vhusniff.lab.command import main as lab_main
from vhusniff.model import Channel, Direction, RecordKind
from vhusniff.protocol import catalogue as cat
from vhusniff.proxy import Proxy, Route

#: name -> (device, QEMU, queues, programs it needs, MSI-X for net)
RUNS = {
    "blk-4-queues-qemu10": ("blk", "10", 4, ("qemu-storage-daemon",), False),
    "net-qemu10": ("net", "10", 1, ("dpdk-testpmd",), False),
    "net-msix-qemu10": ("net", "10", 1, ("dpdk-testpmd",), True),
    "net-2-queues": ("net", None, 2, ("dpdk-testpmd",), False),
    "fs": ("fs", None, 1, (lab.VIRTIOFSD,), False),
    "gpu": ("gpu", "10", 1, (str(lab.vhost_user_gpu_program()),), False),
}
#: Requests that always have a reply on the main channel (the others reply only when asked, with NEED_REPLY).
ALWAYS_REPLY = {number for number, spec in cat.FRONTEND_REQUESTS.items() if spec.reply_rule == cat.ReplyRule.ALWAYS}


def _missing(programs) -> list[str]:
    return [program for program in programs if shutil.which(program) is None]


@pytest.fixture(scope="module")
def lab_runs(kit, qemu10, tmp_path_factory) -> dict[str, Future]:
    """Every run of RUNS, started at once on a small pool; each test waits for the one it judges."""
    lab.prepare_gpu()                      # fetched once, before the threads would race for it
    pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="lab-run")
    runs: dict[str, Future] = {}
    for name, (device, qemu, queues, programs, msix) in RUNS.items():
        if _missing(programs) and not IN_CI:
            continue
        workdir = tmp_path_factory.mktemp(name)
        runs[name] = pool.submit(run_lab, workdir, device, capture_path=workdir / f"{name}.pcapng",
                                 report=lambda text: None, qemu=qemu, queues=queues, msix=msix, timeout=240)
    yield runs
    pool.shutdown(wait=True)


def finished(lab_runs, name: str) -> LabRun:
    if name not in lab_runs:
        require(*RUNS[name][3])
    run = lab_runs[name].result(timeout=600)
    assert run.ok, f"{name}: {run.result.console[-3000:]}"
    return run


def main_channel(run: LabRun, direction: Direction) -> list:
    return [record for record in read_capture(run.capture) if record.kind == RecordKind.MESSAGE
            and record.channel == Channel.MAIN and record.direction == direction]


def requests_by_name(run: LabRun) -> list[str]:
    """The front-end's requests in the capture, in order, by name (ValueError if one has no name)."""
    return [cat.FrontendRequest(struct.unpack_from("<I", record.data)[0]).name
            for record in main_channel(run, Direction.FRONTEND_TO_BACKEND)]


def assert_every_reply_answers_a_request(run: LabRun) -> None:
    requests = main_channel(run, Direction.FRONTEND_TO_BACKEND)
    replies = main_channel(run, Direction.BACKEND_TO_FRONTEND)
    expected = [request for request, flags, _size in (struct.unpack_from("<III", r.data) for r in requests)
                if request in ALWAYS_REPLY or flags & cat.FLAG_NEED_REPLY]
    assert [struct.unpack_from("<I", reply.data)[0] for reply in replies] == expected


def dpdk_names_in_catalogue_spelling(log: str) -> list[str]:
    return [cat.REQUEST_ALIASES[name].name if name in cat.REQUEST_ALIASES else name
            for name in lab.testpmd_messages_read(log)]


# ---------------------------------------------------------------- QEMU 10 beside 7.2

def test_qemu10_is_unpacked_into_the_cache_not_installed(qemu10):
    assert qemu10.version.startswith("10."), qemu10.version
    assert Path(qemu10.executable).is_relative_to(lab.cache_dir())
    assert lab.system_qemu().version.startswith("7."), "the system QEMU is left as it was"
    assert lab.qemu_program("10") == qemu10 and lab.qemu_program(None) == lab.system_qemu()
    with pytest.raises(lab.LabError, match="expected 7, 10 or the path"):
        lab.qemu_program("/nonexistent/qemu")


def test_lab_command_line_takes_a_qemu_a_device_and_queues():
    args = build_parser().parse_args(["--device", "fs", "--qemu", "10", "--queues", "2"])
    assert (args.device, args.qemu, args.queues) == ("fs", "10", 2)
    assert set(lab.DEVICES) == {"blk", "net", "fs", "gpu"}


def test_lab_command_line_refuses_what_cannot_run_with_a_clear_error(capsys, tmp_path):
    capture = str(tmp_path / "never.pcapng")
    assert lab_main(["--device", "fs", "--reverse", "-q", "-w", capture]) == 1
    assert "the fs back-end only listens" in capsys.readouterr().err
    assert lab_main(["--device", "blk", "--screen", "64x48", "-q", "-w", capture]) == 1
    assert "--screen is for --device gpu" in capsys.readouterr().err
    assert lab_main(["--device", "gpu", "--queues", "2", "-q", "-w", capture]) == 1
    assert "1 for gpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--screen", "64"])
    assert "expected WIDTHxHEIGHT" in capsys.readouterr().err
    assert not Path(capture).exists()


def test_qemu10_blk_guest_with_four_queues_through_the_proxy(lab_runs):
    run = finished(lab_runs, "blk-4-queues-qemu10")
    assert run.qemu_version.startswith("10.")
    assert "failed to open module" not in run.result.console, "QEMU 10 loads its own modules, quietly"
    names = requests_by_name(run)
    assert {"GET_FEATURES", "SET_VRING_KICK", "GET_CONFIG"} <= set(names), names
    assert {"SET_MEM_TABLE", "ADD_MEM_REG"} & set(names), "guest memory was given to the back-end"
    assert_every_reply_answers_a_request(run)
    replies = main_channel(run, Direction.BACKEND_TO_FRONTEND)
    queue_num = [struct.unpack_from("<Q", reply.data, 12)[0] for reply in replies
                 if struct.unpack_from("<I", reply.data)[0] == cat.FrontendRequest.GET_QUEUE_NUM]
    assert queue_num == [4], "qemu-storage-daemon exports the four queues QEMU's device has"
    disk = (run.capture.parent / "storage-daemon.img").read_bytes()
    offset = lab.PATTERN_OFFSET_MIB << 20
    assert disk[offset:offset + 16] == b"VHUSNIFF-PATTERN", "the guest's write reached the back-end's disk"


def test_qemu10_net_guest_through_the_proxy_matches_dpdks_own_log(lab_runs):
    run = finished(lab_runs, "net-qemu10")
    assert run.qemu_version.startswith("10.")
    assert requests_by_name(run) == dpdk_names_in_catalogue_spelling(run.backend_log)
    assert_every_reply_answers_a_request(run)


def test_qemu10_net_with_msix_does_not_crash_where_qemu_7_2_does(lab_runs):
    """QEMU 7.2 segfaults as the guest driver starts an MSI-X vhost-user-net device (test_proxy keeps that
    case); QEMU 10 runs it, and the guest's packets come back."""
    run = finished(lab_runs, "net-msix-qemu10")
    assert run.result.exit_code == 0 and run.result.net_io_ok
    assert "vectors=0" not in (run.capture.parent / "qemu.log").read_text().splitlines()[0]
    assert requests_by_name(run) == dpdk_names_in_catalogue_spelling(run.backend_log)


# ---------------------------------------------------------------- DPDK multiqueue

def test_net_with_two_queue_pairs_matches_dpdks_own_log_in_order(lab_runs):
    run = finished(lab_runs, "net-2-queues")
    dpdk_read = dpdk_names_in_catalogue_spelling(run.backend_log)
    assert len(dpdk_read) > 40, run.backend_log[-2000:]
    assert requests_by_name(run) == dpdk_read
    # Four rings (two pairs) were set up: SET_VRING_NUM names each ring index once at least.
    rings = {struct.unpack_from("<I", record.data, 12)[0] for record in main_channel(run, Direction.FRONTEND_TO_BACKEND)
             if struct.unpack_from("<I", record.data)[0] == cat.FrontendRequest.SET_VRING_NUM}
    assert rings == {0, 1, 2, 3}


def test_dpdk_virtio_user_with_two_queue_pairs_through_the_proxy_matches_dpdks_own_log(tmp_path):
    """DPDK on both sides (virtio-user front-end, vhost back-end), no guest: another front-end's message mix."""
    require("dpdk-testpmd")
    backend_socket, proxy_socket, capture = tmp_path / "backend.sock", tmp_path / "proxy.sock", tmp_path / "s.pcapng"
    with lab.start_testpmd(tmp_path, backend_socket, queues=2) as backend:
        proxy = Proxy([Route.forward(proxy_socket, backend_socket, "net")], capture=capture, report=lambda text: None)
        proxy.start()
        try:
            frontend = lab.start_testpmd_frontend(tmp_path, proxy_socket, queues=2)
            assert frontend.stop() == 0, frontend.log_tail()
            assert proxy.wait_until(lambda p: p.connections_total == 1 and p.active_connections == 0, 30)
        finally:
            proxy.stop()
        backend_log = backend.log_text()
    run = LabRun(lab.GuestResult(0, False, False, True, "", 0.0), capture)
    dpdk_read = dpdk_names_in_catalogue_spelling(backend_log)
    assert len(dpdk_read) > 30 and "SET_STATUS" in dpdk_read, backend_log[-2000:]
    assert requests_by_name(run) == dpdk_read
    assert_every_reply_answers_a_request(run)


def test_testpmd_message_log_reading():
    log = ("VHOST_CONFIG: (/s.sock) read message VHOST_USER_GET_FEATURES\nother line\n"
           "VHOST_CONFIG: (/s.sock) read message VHOST_USER_SET_SLAVE_REQ_FD\n")
    assert lab.testpmd_messages_read(log) == ["GET_FEATURES", "SET_SLAVE_REQ_FD"]
    assert dpdk_names_in_catalogue_spelling(log) == ["GET_FEATURES", "SET_BACKEND_REQ_FD"]


# ---------------------------------------------------------------- virtio-fs

def test_fs_guest_mounts_writes_and_reads_back_through_virtiofsd(lab_runs):
    run = finished(lab_runs, "fs")
    assert run.result.fs_io_ok and not run.result.blk_io_ok
    written = (run.shared_dir / lab.FS_FILE_NAME).read_bytes()
    assert written.startswith(b"VHUSNIFF-PATTERN") and len(written) == 1 << 20, "the file reached the host folder"
    names = requests_by_name(run)
    assert {"SET_VRING_KICK", "GET_VRING_BASE"} <= set(names), names
    assert {"SET_MEM_TABLE", "ADD_MEM_REG"} & set(names), "guest memory was given to the back-end"
    assert_every_reply_answers_a_request(run)


# ---------------------------------------------------------------- vhost-user-gpu

def test_gpu_guest_draws_its_pattern_and_the_screendump_shows_it(lab_runs):
    run = finished(lab_runs, "gpu")
    assert run.qemu_version.startswith("10.")
    assert run.pattern_match == 1.0
    assert run.screen is not None and (run.screen.width, run.screen.height) == run.result.gpu_drawn
    assert run.screen.pixel(0, 0) == lab.GPU_PATTERN[0] and run.screen.pixel(0, run.screen.height - 1) != (0, 0, 0)
    assert "GPU_SET_SOCKET" in requests_by_name(run)
    gpu = [record for record in read_capture(run.capture) if record.channel == Channel.GPU
           and record.kind == RecordKind.MESSAGE]
    pixels_sent = sum(len(record.data) for record in gpu if record.direction == Direction.BACKEND_TO_FRONTEND)
    width, height = run.result.gpu_drawn
    assert pixels_sent >= width * height * 4, "the framebuffer's pixels crossed the GPU socket through the proxy"
    assert any(record.direction == Direction.FRONTEND_TO_BACKEND for record in gpu), "QEMU answered on it too"
    # the GPU socket is framed with its own limits: a full-screen UPDATE (4 MB at 1280x800) is one whole message
    assert not [record for record in gpu if record.unframed]
    assert max(len(record.data) for record in gpu) == 12 + 20 + width * height * 4


def test_gpu_kit_loads_virtio_gpu_after_what_it_depends_on():
    gpu_kit = lab.prepare_gpu()
    assert gpu_kit.kernel_package.endswith("-amd64") and "cloud" not in gpu_kit.kernel_package
    order = list(gpu_kit.modules)
    modules = {name: (gpu_kit.kernel.parent / "modules" / f"{name}.ko").read_bytes() for name in order}
    for position, name in enumerate(order):
        assert set(lab.module_depends(modules[name])) <= set(order[:position]), name
    assert order[-1] == "virtio_gpu" and "drm" in order


def test_module_load_order_puts_dependencies_first_and_reports_a_missing_one():
    modules = {"a": b"\x00depends=b,c\x00", "b": b"\x00depends=\x00", "c": b"\x00depends=b\x00"}
    assert lab.module_load_order(modules, ["a"]) == ["b", "c", "a"]
    with pytest.raises(lab.LabError, match="module d .*needed by a"):
        lab.module_load_order({"a": b"\x00depends=d\x00"}, ["a"])


def test_screen_pattern_match_counts_pixels_off_the_pattern():
    width, height = 8, 4
    rgb = b"".join(bytes(colour) * width for colour in lab.GPU_PATTERN)
    screen = lab.Screen.from_ppm(b"P6\n%d %d\n255\n" % (width, height) + rgb)
    assert screen.pattern_match() == 1.0
    spoiled = lab.Screen(width, height, b"\x00\x00\x00" + rgb[3:])
    assert spoiled.pattern_match() == 1 - 1 / (width * height)
    with pytest.raises(lab.LabError, match="not a binary PPM"):
        lab.Screen.from_ppm(b"P3\n1 1\n255\n0 0 0\n")
