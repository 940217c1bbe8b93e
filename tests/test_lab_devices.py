"""The lab's further real peers: QEMU 10 beside the system's QEMU 7.2, virtiofsd, vhost-user-gpu, DPDK multiqueue.

Outside CI a test skips when its program is not installed; in CI (CI=true) it fails instead.
"""
from pathlib import Path

from peers import kit, qemu10, require  # noqa: F401  (kit and qemu10 are fixtures)
from vhusniff.lab import peers as lab


def test_qemu10_is_unpacked_into_the_cache_not_installed(qemu10):
    assert qemu10.version.startswith("10."), qemu10.version
    assert Path(qemu10.executable).is_relative_to(lab.cache_dir())
    assert lab.system_qemu().version.startswith("7."), "the system QEMU is left as it was"
    assert lab.qemu_program("10") == qemu10 and lab.qemu_program(None) == lab.system_qemu()


def test_qemu10_boots_a_blk_guest_on_qemu_storage_daemon(kit, qemu10, tmp_path):
    require("qemu-storage-daemon")
    socket_path = tmp_path / "backend.sock"
    with lab.start_storage_daemon(tmp_path, socket_path), \
            lab.start_qemu(tmp_path, kit, socket_path, qemu=qemu10) as guest:
        result = guest.wait(timeout=90)
    assert result.guest_lines == [lab.BLK_IO_OK, lab.GUEST_DONE], result.console
    assert result.clean_exit, result.console
    assert "failed to open module" not in result.console, "QEMU 10 loads its own modules, quietly"
