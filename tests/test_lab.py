"""The lab against real peers: guests booted on qemu-storage-daemon and dpdk-testpmd, the kit, cpio.

Outside CI a test skips when its program is not installed; in CI (CI=true) it fails instead,
so that a broken install cannot pass as a green run.
"""
import gzip
import lzma
import shutil
import stat
import subprocess
import time

import pytest

from peers import kit, require  # noqa: F401  (kit is a fixture)
from vhusniff.lab import peers as lab


def test_cpio_writer_output_is_read_by_cpio():
    require("cpio")
    archive = lab.CpioWriter()
    archive.add_directory("dev")
    archive.add_device("dev/console", stat.S_IFCHR | 0o600, major=5, minor=1)
    archive.add_file("init", b"#!/bin/sh\n", mode=0o755)
    archive.add_symlink("sh", "busybox")
    listing = subprocess.run(["cpio", "-itv"], input=archive.finish(), capture_output=True, check=True).stdout.decode()
    lines = listing.splitlines()
    assert [line.split()[-1] for line in lines] == ["dev", "dev/console", "init", "busybox"]
    assert lines[1].startswith("crw-------") and "5,   1" in lines[1]
    assert lines[2].startswith("-rwxr-xr-x")
    assert lines[3].startswith("lrwxrwxrwx") and "sh -> busybox" in lines[3]


@pytest.mark.parametrize("suffix, compress", [("", bytes), (".xz", lzma.compress), (".gz", gzip.compress)])
def test_modules_are_stored_uncompressed(tmp_path, suffix, compress):
    module_dir = tmp_path / "lib/modules/6.1.0-test/kernel/drivers/virtio"
    module_dir.mkdir(parents=True)
    (module_dir / f"virtio_pci_legacy_dev.ko{suffix}").write_bytes(compress(b"\x7fELF legacy"))
    (module_dir / f"virtio_pci.ko{suffix}").write_bytes(compress(b"\x7fELF pci"))
    assert lab._read_module(tmp_path, "virtio_pci") == b"\x7fELF pci"


def test_kit_initramfs_holds_init_busybox_and_modules(kit):
    assert kit.kernel.is_file() and kit.kernel_package.startswith("linux-image-")
    listing = subprocess.run(["cpio", "-it"], input=gzip.decompress(kit.initrd.read_bytes()),
                             capture_output=True, check=True).stdout.decode().split()
    assert {"init", "bin/busybox", "dev/console"} <= set(listing)
    assert kit.modules[:len(lab.GUEST_MODULES)] == lab.GUEST_MODULES, "the cloud kit's modules need no others"
    assert [f"lib/modules/{module}.ko" for module in kit.modules] == \
        [name for name in listing if name.startswith("lib/modules/")]


def test_initramfs_is_rebuilt_when_the_init_script_changes(kit, tmp_path, monkeypatch):
    # A cache of its own: rebuilding prunes the other initramfs, which a concurrent run may be booting.
    cache = tmp_path / "cache"
    shutil.copytree(kit.kernel.parent, cache / kit.kernel.parent.name)
    same = lab.prepare(cache)
    assert same.initrd.name == kit.initrd.name
    monkeypatch.setattr(lab, "guest_init_script", lambda modules: "#!/bin/sh\necho changed\npoweroff -f\n")
    changed = lab.prepare(cache)
    assert changed.initrd.name != kit.initrd.name
    assert [path.name for path in cache.glob("initramfs-*")] == [changed.initrd.name]


def test_direct_boot_against_qemu_storage_daemon(kit, tmp_path):
    require("qemu-storage-daemon")
    socket_path = tmp_path / "backend.sock"
    streamed = []
    with lab.start_storage_daemon(tmp_path, socket_path) as backend, \
            lab.start_qemu(tmp_path, kit, socket_path, on_console_line=streamed.append) as guest:
        live = [line for line in guest.console_lines() if line.startswith(lab.GUEST_MARK)]
        result = guest.wait(timeout=90)
        assert backend.running, "the back-end outlives the guest's disconnect"
    assert result.blk_io_ok, result.console
    assert result.clean_exit, result.console
    assert result.guest_lines == [lab.BLK_IO_OK, lab.GUEST_DONE]
    assert live == result.guest_lines
    assert "\n".join(streamed) == result.console
    assert not backend.running and not guest.running
    written = (tmp_path / "storage-daemon.img").read_bytes()
    offset = lab.PATTERN_OFFSET_MIB << 20
    assert written[offset:offset + 16] == b"VHUSNIFF-PATTERN", "the pattern reached the back-end's disk"


def test_storage_daemon_failure_reports_its_log(tmp_path):
    require("qemu-storage-daemon")
    with pytest.raises(lab.LabError, match="(?s)exited with 1.*Failed to bind socket"):
        lab.start_storage_daemon(tmp_path, tmp_path / "missing-dir" / "backend.sock")


def test_stop_ends_a_guest_still_booting(kit, tmp_path):
    guest = lab.start_qemu(tmp_path, kit, tmp_path / "qemu.sock", server=True)
    assert (tmp_path / "qemu.sock").exists(), "start_qemu(server=True) returns once QEMU listens"
    started = time.monotonic()
    assert guest.stop() == -15
    assert time.monotonic() - started < 5 and not guest.running
    assert list(guest.console_lines()) == guest.console_text().splitlines()


def test_testpmd_creates_its_socket_and_quits_when_stdin_closes(tmp_path):
    require("dpdk-testpmd")
    socket_path = tmp_path / "testpmd.sock"
    with lab.start_testpmd(tmp_path, socket_path) as testpmd:
        assert socket_path.exists() and testpmd.running
    assert testpmd.proc.returncode == 0, testpmd.log_tail()
    assert "Bye..." in testpmd.log_text()
    assert not lab._dpdk_runtime_dir(testpmd.prefix).exists(), "DPDK's runtime files are cleaned up"


def test_net_guest_exchanges_packets_with_testpmd(kit, tmp_path):
    require("dpdk-testpmd")
    socket_path = tmp_path / "testpmd.sock"
    with lab.start_testpmd(tmp_path, socket_path) as testpmd, \
            lab.start_qemu(tmp_path, kit, socket_path, device="net") as guest:
        result = guest.wait(timeout=90)
    assert result.net_io_ok, result.console
    assert result.clean_exit and not result.blk_io_ok, result.console
    assert "read message VHOST_USER_SET_MEM_TABLE" in testpmd.log_text()
