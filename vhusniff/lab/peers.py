"""The lab: real vhost-user peers and a tiny guest, started as plain child processes.

Used by `vhusniff lab` (which puts the proxy between QEMU and the back-end) and as the
integration-test fixture. Three parts:

* the guest kit: a Debian cloud kernel fetched with `apt-get download` and unpacked with
  `dpkg -x`, and a busybox initramfs whose /init loads the virtio modules, writes a known
  pattern to /dev/vda, drops the page cache and reads it back, sends packets on eth0 if there
  is one, writes and reads back a file on a virtio-fs mount if there is one, and powers off,
  printing `VHUSNIFF-GUEST: ...` lines on the serial console (`prepare()`, cached in
  ``$VHUSNIFF_CACHE`` or ``~/.cache/vhusniff/guest``); the GPU guest's kit (`prepare_gpu()`) boots
  the generic kernel instead (the cloud one has no DRM) and draws GPU_PATTERN on its framebuffer;
* back-ends: `start_storage_daemon()` (qemu-storage-daemon, vhost-user-blk),
  `start_testpmd()` (dpdk-testpmd's net_vhost, vhost-user-net), `start_virtiofsd()` (C virtiofsd,
  vhost-user-fs) and `start_vhost_user_gpu()` (vhost-user-gpu);
* the front-end: `start_qemu()`, which boots the kit under TCG and streams its console (and, for
  the GPU guest, answers QMP: `Guest.screendump()`, `wait_for_pattern()`).

Every process object stops and reaps its process in `stop()` and works as a context manager;
each logs to a file in the work directory given to its start function.

QEMU: the system's (7.2) by default, or QEMU 10 from bookworm-backports unpacked into the cache (`qemu10()`,
`qemu_program("10")`), passed to `start_qemu(qemu=...)`.

Command line: ``python3 -m vhusniff.lab.peers prepare`` fetches and builds the kit (``--qemu10``: QEMU 10 too;
``--gpu-kit``: the GPU guest's kit too);
``python3 -m vhusniff.lab.peers direct`` boots a blk guest straight against qemu-storage-daemon
(no proxy) and prints the result and how long the boot took.

Standard library only.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import fcntl
import functools
import gzip
import hashlib
import io
import itertools
import json
import logging
import lzma
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Literal

from ..proxy.routes import listening_in_table

log = logging.getLogger("vhusniff.lab.peers")

#: Printed by the guest's /init; everything a caller needs to judge a run starts with it.
GUEST_MARK = "VHUSNIFF-GUEST:"
BLK_IO_OK = f"{GUEST_MARK} blk-io ok"
NET_IO_OK_PREFIX = f"{GUEST_MARK} net-io ok"
GUEST_DONE = f"{GUEST_MARK} done"
#: Kernel parameters that make /init loop write-and-readback rounds on /dev/vda (see `loop_kernel_args`).
LOOP_MODE_PARAMETER = "vhusniff.mode=loop"
LOOP_SECONDS_PARAMETER = "vhusniff.seconds"
#: Each round of the loop mode prints `VHUSNIFF-GUEST: round N ok` or `... round N FAILED reason`.
_ROUND_REPORT = re.compile(re.escape(GUEST_MARK) + r" round (\d+) (ok|FAILED.*)$")

#: Kernel metapackage whose dependency names the current cloud kernel (the ABI version moves).
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
#: Loaded by /init in this order: each needs the ones before it (fuse and virtiofs: the virtio-fs guest).
GUEST_MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
                 "virtio_blk", "failover", "net_failover", "virtio_net", "fuse", "virtiofs")
#: The cloud kernel has no DRM; the GPU guest boots the generic kernel, named by this metapackage.
GPU_KERNEL_METAPACKAGE = "linux-image-amd64"
#: What the GPU guest loads; the modules these depend on (drm, drm_kms_helper, ...) are added before them, in
#: the order each module's own `depends=` (its .modinfo section) asks for.
GPU_GUEST_MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
                     "virtio_gpu")
#: The virtio-fs guest mounts this tag, writes FS_FILE_NAME with a fresh pattern, remounts and reads it back.
FS_TAG = "vhusniff"
FS_FILE_NAME = "vhusniff-guest-file"
#: The GPU guest fills its framebuffer with horizontal bands of these colours (RGB), top to bottom.
GPU_PATTERN = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255))
FS_IO_OK = f"{GUEST_MARK} fs-io ok"
#: `VHUSNIFF-GUEST: gpu-drawn WIDTHxHEIGHT`: the pattern is in the framebuffer; the guest then waits for a line
#: on its console (`Guest.send_console`) before it goes on, so that the host can look at the screen.
GPU_DRAWN_PREFIX = f"{GUEST_MARK} gpu-drawn"
#: Where in /dev/vda the guest writes its test pattern; non-zero so that requests carry a real offset.
PATTERN_OFFSET_MIB = 4
GUEST_MEMORY_MB = 256
#: SeaBIOS resets and clears the serial terminal; those sequences would glue onto the guest's first line.
_TERMINAL_ESCAPE = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|[@-Z\\-_]|[a-z])")

Cpus = str | int | Sequence[int] | None
ConsoleCallback = Callable[[str], None]


class LabError(RuntimeError):
    """A lab step failed; the message says which and, for a process, ends with its log tail."""


class LabTimeout(LabError, TimeoutError):
    """A lab process did not reach the expected state in time."""


# --------------------------------------------------------------------------------------------
# The guest kit
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GuestKit:
    """A bootable guest: a kernel image and the initramfs built for it."""
    kernel: Path
    initrd: Path
    kernel_package: str
    #: The modules /init loads, in order.
    modules: tuple[str, ...] = GUEST_MODULES


@dataclasses.dataclass(frozen=True)
class KernelFlavour:
    """Which Debian kernel a kit boots and which of its modules /init loads."""
    name: str
    metapackage: str
    #: Loaded in this order, after any module they depend on that is not listed (see `module_load_order`).
    modules: tuple[str, ...]
    #: Below the cache folder; the cloud kit sits at its top.
    subdirectory: str


CLOUD = KernelFlavour("cloud", KERNEL_METAPACKAGE, GUEST_MODULES, "")
GENERIC = KernelFlavour("generic", GPU_KERNEL_METAPACKAGE, GPU_GUEST_MODULES, "generic")


def cache_dir() -> Path:
    """Where the guest kit lives: ``$VHUSNIFF_CACHE`` if set, else ``~/.cache/vhusniff/guest``."""
    configured = os.environ.get("VHUSNIFF_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "vhusniff" / "guest"


def loop_kernel_args(seconds: int) -> list[str]:
    """Kernel parameters for `start_qemu(kernel_args=...)`: instead of one check, /init writes a fresh pattern to
    /dev/vda and reads it back over and over for `seconds`, reporting each round (a back-end restart test)."""
    return [LOOP_MODE_PARAMETER, f"{LOOP_SECONDS_PARAMETER}={int(seconds)}"]


# The initramfs's /init, a shell script; `guest_init_script` fills in the names in braces.
_GUEST_INIT = """#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The firmware leaves its last console line open; start the guest's report on a line of its own.
echo
for module in {modules}; do
    insmod /lib/modules/$module.ko || echo "{GUEST_MARK} insmod $module failed"
done

# Write a fresh pattern to /dev/vda and read it back; on failure print "$1 FAILED reason" and return 1.
blk_write_readback() {{
    # Random data, so that a device returning zeros or stale blocks cannot pass; a marker in front.
    dd if=/dev/urandom of=/tmp/pattern bs=1024 count=1024 2>/dev/null || return 1
    echo "VHUSNIFF-PATTERN $(cat /proc/sys/kernel/random/uuid)" | dd of=/tmp/pattern conv=notrunc 2>/dev/null
    if ! dd if=/tmp/pattern of=/dev/vda bs=1024 seek={pattern_offset_kib} conv=fsync 2>/tmp/dd.err; then
        echo "$1 FAILED write: $(head -n 1 /tmp/dd.err)"; return 1
    fi
    sync
    # Without this the read-back would come from the page cache, not from the back-end.
    echo 3 > /proc/sys/vm/drop_caches
    if ! dd if=/dev/vda of=/tmp/readback bs=1024 skip={pattern_offset_kib} count=1024 2>/tmp/dd.err; then
        echo "$1 FAILED read: $(head -n 1 /tmp/dd.err)"; return 1
    fi
    if [ "$(head -c 16 /tmp/readback)" != "VHUSNIFF-PATTERN" ]; then
        echo "$1 FAILED marker missing in read-back"; return 1
    fi
    if ! cmp -s /tmp/pattern /tmp/readback; then
        echo "$1 FAILED read-back differs from what was written"; return 1
    fi
}}

blk_io_check() {{
    blk_write_readback "{GUEST_MARK} blk-io" && echo "{BLK_IO_OK}"
}}

uptime_seconds() {{
    cut -d. -f1 /proc/uptime
}}

blk_io_rounds() {{
    end=$(( $(uptime_seconds) + $1 ))
    round=0; passed=0; failed=0
    while [ "$(uptime_seconds)" -lt "$end" ]; do
        round=$((round + 1))
        if blk_write_readback "{GUEST_MARK} round $round"; then
            passed=$((passed + 1)); echo "{GUEST_MARK} round $round ok"
        else
            failed=$((failed + 1))
        fi
    done
    echo "{GUEST_MARK} rounds $passed ok $failed failed"
}}

virtio_device_present() {{
    grep -qx "$1" /sys/bus/virtio/devices/*/device 2>/dev/null
}}

fs_io_check() {{
    mkdir -p /mnt
    if ! mount -t virtiofs {FS_TAG} /mnt 2>/tmp/mount.err; then
        echo "{GUEST_MARK} fs-io FAILED mount: $(head -n 1 /tmp/mount.err)"; return 1
    fi
    dd if=/dev/urandom of=/tmp/fs-pattern bs=1024 count=1024 2>/dev/null
    echo "VHUSNIFF-PATTERN $(cat /proc/sys/kernel/random/uuid)" | dd of=/tmp/fs-pattern conv=notrunc 2>/dev/null
    if ! cp /tmp/fs-pattern /mnt/{FS_FILE_NAME} || ! sync; then
        echo "{GUEST_MARK} fs-io FAILED write"; umount /mnt; return 1
    fi
    # A fresh mount has nothing cached: the read-back comes from the back-end.
    umount /mnt && mount -t virtiofs {FS_TAG} /mnt
    if ! cmp -s /tmp/fs-pattern /mnt/{FS_FILE_NAME}; then
        echo "{GUEST_MARK} fs-io FAILED read-back differs from what was written"; umount /mnt; return 1
    fi
    umount /mnt
    echo "{FS_IO_OK}"
}}

# Fill file $1 with $2 bytes of one pixel ($3, a printf format of its 4 bytes), doubling it up from one pixel.
repeat_pixel() {{
    printf "$3" > "$1"
    while [ "$(wc -c < "$1")" -lt "$2" ]; do
        cat "$1" "$1" > "$1.twice" && mv "$1.twice" "$1"
    done
    head -c "$2" "$1" > "$1.cut" && mv "$1.cut" "$1"
}}

gpu_draw() {{
    waited=0
    while [ ! -e /dev/fb0 ] && [ "$waited" -lt 100 ]; do usleep 100000; waited=$((waited + 1)); done
    if [ ! -e /dev/fb0 ]; then echo "{GUEST_MARK} gpu-draw FAILED no /dev/fb0"; return 1; fi
    # The text console would draw its cursor over the pattern.
    for console in /sys/class/vtconsole/vtcon*/bind; do echo 0 > "$console"; done 2>/dev/null
    size=$(cat /sys/class/graphics/fb0/virtual_size); width=${{size%,*}}; height=${{size#*,}}
    stride=$(cat /sys/class/graphics/fb0/stride)
    band_bytes=$(( stride * (height / {band_count}) ))
    band=0
    for pixel in {band_pixels}; do
        repeat_pixel /tmp/band$band "$band_bytes" "$pixel"; band=$((band + 1))
    done
    if ! cat /tmp/band* > /dev/fb0; then echo "{GUEST_MARK} gpu-draw FAILED write"; return 1; fi
    echo "{GPU_DRAWN_PREFIX} ${{width}}x${{height}}"
    read -t 120 reply
}}

net_io_check() {{
    if ! ip link set eth0 up || ! ip addr add 192.0.2.1/24 dev eth0; then
        echo "{GUEST_MARK} net-io FAILED link up"; return 1
    fi
    # The ARP requests this sends come back from a back-end that echoes (testpmd's io forwarding).
    ping -c 1 -W 1 192.0.2.2 >/dev/null 2>&1
    tx=$(cat /sys/class/net/eth0/statistics/tx_packets)
    rx=$(cat /sys/class/net/eth0/statistics/rx_packets)
    if [ "$tx" -gt 0 ] && [ "$rx" -gt 0 ]; then
        echo "{NET_IO_OK_PREFIX} (tx $tx, rx $rx)"
    else
        echo "{GUEST_MARK} net-io FAILED (tx $tx, rx $rx)"
    fi
}}

loop_seconds=
for parameter in $(cat /proc/cmdline); do
    case "$parameter" in
        {LOOP_SECONDS_PARAMETER}=*) loop_seconds="${{parameter#*=}}" ;;
    esac
done
if [ -b /dev/vda ] && grep -qw "{LOOP_MODE_PARAMETER}" /proc/cmdline; then
    blk_io_rounds "${{loop_seconds:-10}}"
elif [ -b /dev/vda ]; then
    blk_io_check
else
    echo "{GUEST_MARK} no vda"
fi
if [ -e /sys/class/net/eth0 ]; then
    net_io_check
fi
if virtio_device_present 0x001a; then
    fs_io_check
fi
if virtio_device_present 0x0010; then
    gpu_draw
fi
echo "{GUEST_DONE}"
poweroff -f
"""


def guest_init_script(modules: Sequence[str] = GUEST_MODULES) -> str:
    """The initramfs's /init: load `modules`, check I/O on each device there is (/dev/vda, eth0, a virtio-fs
    mount, a framebuffer to draw GPU_PATTERN on), say how it went, power off.

    With `loop_kernel_args(N)` on the kernel command line the disk check is repeated for N seconds instead,
    one `round K ok` or `round K FAILED ...` line each, then `rounds OK ok FAILED failed`."""
    # XRGB8888 in memory, little-endian: blue, green, red, unused.
    band_pixels = " ".join("'" + "".join(f"\\{byte:03o}" for byte in (blue, green, red, 0)) + "'"
                           for red, green, blue in GPU_PATTERN)
    return _GUEST_INIT.format(modules=" ".join(modules), pattern_offset_kib=PATTERN_OFFSET_MIB * 1024,
                              GUEST_MARK=GUEST_MARK, BLK_IO_OK=BLK_IO_OK, NET_IO_OK_PREFIX=NET_IO_OK_PREFIX,
                              GUEST_DONE=GUEST_DONE, LOOP_MODE_PARAMETER=LOOP_MODE_PARAMETER,
                              LOOP_SECONDS_PARAMETER=LOOP_SECONDS_PARAMETER, FS_TAG=FS_TAG,
                              FS_FILE_NAME=FS_FILE_NAME, FS_IO_OK=FS_IO_OK, GPU_DRAWN_PREFIX=GPU_DRAWN_PREFIX,
                              band_count=len(GPU_PATTERN), band_pixels=band_pixels)


def prepare(cache: Path | None = None, refresh: bool = False, flavour: KernelFlavour = CLOUD) -> GuestKit:
    """Return the guest kit, fetching the kernel and building the initramfs if the cache lacks them.

    `flavour` is CLOUD (blk, net, fs) or GENERIC (the GPU guest: the cloud kernel has no DRM).
    A cached kernel is used as it is unless `refresh`, which asks apt for the current kernel
    (its version moves) and fetches it if it is new. Fetching needs `apt-cache`, `apt-get download`
    and `dpkg -x`, not root; when it fails, a cached kernel is used if there is one. The initramfs
    is rebuilt whenever its content (init script, busybox, modules) changes.
    """
    cache = (Path(cache) if cache else cache_dir()) / flavour.subdirectory
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / ".lock"):
        cached = None if refresh else _newest_cached_kernel(cache, flavour)
        kernel_dir = cached or _fetch_kernel(cache, flavour)
        modules = _cached_load_order(kernel_dir)
        initrd = _build_initramfs(cache, kernel_dir, modules)
    return GuestKit(kernel=kernel_dir / "vmlinuz", initrd=initrd, kernel_package=kernel_dir.name[len("kernel-"):],
                    modules=modules)


def prepare_gpu(cache: Path | None = None, refresh: bool = False) -> GuestKit:
    """The GPU guest's kit: the generic kernel, with virtio_gpu and the DRM modules it needs."""
    return prepare(cache, refresh, GENERIC)


def module_depends(module: bytes) -> list[str]:
    """The modules a kernel module needs loaded first: the `depends=` entry of its .modinfo strings."""
    found = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", module)
    return [name for name in found[1].decode().split(",") if name] if found else []


def module_load_order(modules: Mapping[str, bytes], wanted: Sequence[str]) -> list[str]:
    """`wanted` in order, each preceded by what it depends on (transitively) that is not loaded yet.

    `modules` maps names to module bytes (a name may be spelled with - or _)."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        canonical = name.replace("-", "_")
        if canonical in order:
            return
        if canonical in path:
            raise LabError(f"module dependency cycle: {' -> '.join((*path, canonical))}")
        if canonical not in modules:
            raise LabError(f"module {canonical} (needed by {path[-1] if path else 'the guest'}) not found")
        for dependency in module_depends(modules[canonical]):
            visit(dependency, (*path, canonical))
        order.append(canonical)

    for name in wanted:
        visit(name, ())
    return order


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    # Concurrent test sessions or CI steps must not unpack into the same cache at once.
    with open(lock_path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _fetch_kernel(cache: Path, flavour: KernelFlavour) -> Path:
    try:
        package = _resolve_kernel_package(flavour.metapackage)
    except LabError as error:
        return _cached_kernel_or_raise(cache, flavour, error)
    kernel_dir = cache / f"kernel-{package}"
    if _kernel_dir_serves(kernel_dir, flavour):
        return kernel_dir
    try:
        _download_kernel(package, kernel_dir, flavour)
    except LabError as error:
        return _cached_kernel_or_raise(cache, flavour, error)
    for stale in cache.glob("kernel-*"):
        if stale != kernel_dir:
            shutil.rmtree(stale, ignore_errors=True)
    return kernel_dir


_LOAD_ORDER_FILE = "load-order"


def _cached_load_order(kernel_dir: Path) -> tuple[str, ...]:
    return tuple((kernel_dir / "modules" / _LOAD_ORDER_FILE).read_text().split())


def _kernel_dir_serves(kernel_dir: Path, flavour: KernelFlavour) -> bool:
    """The unpacked kernel is there with every module the flavour loads (a kit from before a module was added
    to the list is fetched again)."""
    try:
        return (kernel_dir / "vmlinuz").is_file() and set(flavour.modules) <= set(_cached_load_order(kernel_dir))
    except OSError:
        return False


def _newest_cached_kernel(cache: Path, flavour: KernelFlavour) -> Path | None:
    cached = sorted((d for d in cache.glob("kernel-*") if _kernel_dir_serves(d, flavour)),
                    key=lambda d: d.stat().st_mtime)
    return cached[-1] if cached else None


def _cached_kernel_or_raise(cache: Path, flavour: KernelFlavour, error: LabError) -> Path:
    cached = _newest_cached_kernel(cache, flavour)
    if cached is None:
        raise error
    log.warning("%s; using the cached %s", error, cached.name)
    return cached


def _resolve_kernel_package(metapackage: str) -> str:
    package = _kernel_package_from_apt_cache(metapackage)
    if package is None and os.geteuid() == 0:
        # A fresh machine (or container) may have no package lists yet.
        _run(["apt-get", "update"], "apt-get update")
        package = _kernel_package_from_apt_cache(metapackage)
    if package is None:
        raise LabError(f"apt-cache does not know {metapackage}; run `apt-get update` (as root) first")
    return package


def _kernel_package_from_apt_cache(metapackage: str) -> str | None:
    if shutil.which("apt-cache") is None:
        raise LabError("apt-cache not found: the guest kernel comes from Debian's archive")
    result = subprocess.run(["apt-cache", "depends", metapackage], capture_output=True, text=True)
    for line in result.stdout.splitlines():
        kind, _, name = line.strip().lstrip("|").partition(":")
        if kind == "Depends" and name.strip().startswith("linux-image-"):
            return name.strip()
    return None


def _download_kernel(package: str, kernel_dir: Path, flavour: KernelFlavour) -> None:
    """Keep only what the guest needs: the image and the modules /init loads (15 of 106 MB)."""
    with tempfile.TemporaryDirectory(dir=kernel_dir.parent, prefix=".download-") as scratch:
        scratch_dir = Path(scratch)
        _run(["apt-get", "download", package], f"apt-get download {package}", cwd=scratch_dir)
        debs = list(scratch_dir.glob("*.deb"))
        if len(debs) != 1:
            raise LabError(f"apt-get download {package} left {len(debs)} .deb files, expected 1")
        unpacked = scratch_dir / "root"
        _run(["dpkg", "-x", str(debs[0]), str(unpacked)], f"dpkg -x {debs[0].name}")
        staged = scratch_dir / "kernel"
        (staged / "modules").mkdir(parents=True)
        images = sorted(unpacked.glob("boot/vmlinuz-*"))
        if not images:
            raise LabError(f"{package} has no boot/vmlinuz-*")
        shutil.copyfile(images[0], staged / "vmlinuz")
        loaded: dict[str, bytes] = {}
        pending = list(flavour.modules)
        while pending:
            module = pending.pop().replace("-", "_")
            if module not in loaded:
                loaded[module] = _read_module(unpacked, module)
                pending.extend(module_depends(loaded[module]))
        order = module_load_order(loaded, flavour.modules)
        for module in order:
            (staged / "modules" / f"{module}.ko").write_bytes(loaded[module])
        (staged / "modules" / _LOAD_ORDER_FILE).write_text("\n".join(order) + "\n")
        shutil.rmtree(kernel_dir, ignore_errors=True)
        staged.rename(kernel_dir)


def _read_module(root: Path, module: str) -> bytes:
    """A module's bytes, uncompressed: busybox insmod is not counted on to decompress."""
    spellings = {module, module.replace("_", "-")}
    for path in root.glob("lib/modules/*/kernel/**/*.ko*"):
        name, _, compression = path.name.partition(".ko")
        if name not in spellings:
            continue
        data = path.read_bytes()
        if compression == "":
            return data
        if compression == ".xz":
            return lzma.decompress(data)
        if compression == ".gz":
            return gzip.decompress(data)
        if compression == ".zst":
            if shutil.which("zstd") is None:
                raise LabError(f"{path.name} is zstd-compressed and the zstd command is missing")
            return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
        raise LabError(f"{path.name}: unknown module compression {compression!r}")
    raise LabError(f"module {module} not found in the kernel package")


def _build_initramfs(cache: Path, kernel_dir: Path, load_order: Sequence[str]) -> Path:
    busybox = _static_busybox()
    init = guest_init_script(load_order).encode()
    modules = [(m, (kernel_dir / "modules" / f"{m}.ko").read_bytes()) for m in load_order]
    digest = hashlib.sha256()
    for part in (init, busybox.read_bytes(), kernel_dir.name.encode(), *(data for _, data in modules)):
        digest.update(hashlib.sha256(part).digest())
    initrd = cache / f"initramfs-{digest.hexdigest()[:16]}.cpio.gz"
    if initrd.is_file():
        return initrd

    archive = CpioWriter()
    for directory in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"):
        archive.add_directory(directory)
    # The kernel opens /dev/console for /init's stdio before /init can mount devtmpfs.
    archive.add_device("dev/console", stat.S_IFCHR | 0o600, major=5, minor=1)
    archive.add_file("bin/busybox", busybox.read_bytes(), mode=0o755)
    archive.add_symlink("bin/sh", "busybox")
    archive.add_file("init", init, mode=0o755)
    for module, data in modules:
        archive.add_file(f"lib/modules/{module}.ko", data, mode=0o644)

    partial = initrd.with_name(initrd.name + ".partial")
    with open(partial, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as compressed:
        compressed.write(archive.finish())
    partial.rename(initrd)
    for stale in cache.glob("initramfs-*.cpio.gz"):
        if stale != initrd:
            stale.unlink(missing_ok=True)
    return initrd


def _static_busybox() -> Path:
    for candidate in ("/bin/busybox", "/usr/bin/busybox", shutil.which("busybox")):
        if candidate and Path(candidate).is_file():
            path = Path(candidate)
            if _is_dynamically_linked(path):
                raise LabError(f"{path} is dynamically linked; the initramfs needs busybox-static")
            return path
    raise LabError("busybox not found; install busybox-static")


def _is_dynamically_linked(elf: Path) -> bool:
    """True if the ELF executable names a program interpreter (PT_INTERP), i.e. needs shared libraries."""
    with open(elf, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:  # only 64-bit binaries are expected here
            return True
        byteorder: Literal["little", "big"] = "little" if header[5] == 1 else "big"
        table_offset = int.from_bytes(header[0x20:0x28], byteorder)
        entry_size = int.from_bytes(header[0x36:0x38], byteorder)
        entry_count = int.from_bytes(header[0x38:0x3A], byteorder)
        f.seek(table_offset)
        table = f.read(entry_size * entry_count)
    pt_interp = 3
    return any(int.from_bytes(table[i:i + 4], byteorder) == pt_interp for i in range(0, len(table), entry_size))


class CpioWriter:
    """Builds a cpio archive in the kernel's "newc" format, device nodes included, without root."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._inodes = itertools.count(1)

    def add_directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, b"", nlink=2)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_device(self, name: str, mode: int, major: int, minor: int) -> None:
        self._entry(name, mode, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        """Append the trailer and return the archive."""
        self._entry("TRAILER!!!", 0, b"", inode=0, nlink=1)
        return self._out.getvalue()

    def _entry(self, name: str, mode: int, data: bytes, nlink: int = 1, rdev: tuple[int, int] = (0, 0),
               inode: int | None = None) -> None:
        encoded_name = name.encode() + b"\0"
        fields = (next(self._inodes) if inode is None else inode, mode, 0, 0, nlink, 0, len(data),
                  0, 0, rdev[0], rdev[1], len(encoded_name), 0)
        self._out.write(b"070701" + b"".join(b"%08X" % value for value in fields) + encoded_name)
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))


def _run(command: list[str], what: str, cwd: Path | None = None) -> None:
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as error:
        raise LabError(f"{what}: {command[0]} not found") from error
    if result.returncode != 0:
        raise LabError(f"{what} failed (exit {result.returncode}): {(result.stderr or result.stdout).strip()}")


# --------------------------------------------------------------------------------------------
# QEMU programs: the system's (7.2 on Debian 12) and QEMU 10 unpacked from bookworm-backports
# --------------------------------------------------------------------------------------------

#: The suite that carries QEMU 10 for Debian 12; its packages are unpacked into the cache, never installed.
QEMU10_SUITE = "bookworm-backports"
QEMU10_PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data", "qemu-system-gui",
                   "qemu-system-modules-opengl")
#: The Debian archive QEMU 10 comes from; ``$VHUSNIFF_DEBIAN_MIRROR`` overrides it.
DEFAULT_DEBIAN_MIRROR = "http://deb.debian.org/debian"


@dataclasses.dataclass(frozen=True)
class QemuProgram:
    """A qemu-system-x86_64 to run: the executable, the options it needs first, and what it adds to the
    environment (an unpacked QEMU finds its firmware through -L and its modules through QEMU_MODULE_DIR)."""
    executable: str
    leading_args: tuple[str, ...] = ()
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def command(self, *args: str) -> list[str]:
        return [self.executable, *self.leading_args, *args]

    def environ(self) -> dict[str, str]:
        """The whole environment for the child process."""
        return {**os.environ, **self.env}

    @property
    def version(self) -> str:
        """The version QEMU reports, such as "10.0.2"."""
        return _qemu_version(self.executable, tuple(sorted(self.env.items())))


@functools.cache
def _qemu_version(executable: str, env: tuple[tuple[str, str], ...]) -> str:
    try:
        result = subprocess.run([executable, "--version"], capture_output=True, text=True,
                                env={**os.environ, **dict(env)}, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise LabError(f"{executable} --version: {error}") from error
    match = re.search(r"version (\d+\.\d+(?:\.\d+)?)", result.stdout)
    if match is None:
        raise LabError(f"{executable} --version printed no version: {(result.stdout or result.stderr).strip()!r}")
    return match[1]


def system_qemu() -> QemuProgram:
    """The installed qemu-system-x86_64 (7.2 from Debian 12's qemu-system-x86)."""
    return QemuProgram("qemu-system-x86_64")


def qemu10_dir(cache: Path | None = None) -> Path:
    """Where QEMU 10 is unpacked: a `qemu10` folder in the guest kit's cache."""
    return (Path(cache) if cache else cache_dir()) / "qemu10"


def qemu10(cache: Path | None = None) -> QemuProgram:
    """QEMU 10.0.2 from bookworm-backports, unpacked (not installed) into the cache on first use.

    Fetching runs `apt-get update` on a private package list holding only that suite (the system's apt
    sources are left alone), `apt-get download` of QEMU10_PACKAGES and `dpkg -x` of each; it needs root
    or a writable apt cache, so .ci/install-deps.sh does it ahead of the tests. The program returned runs
    with `-L` and QEMU_MODULE_DIR pointing into the unpacked tree; with `-audio none`, else it probes audio
    back-ends this machine lacks and says so on every start; and with `-nodefaults` (the serial console added
    back), else SeaBIOS spends about 30 s under TCG on q35's default CD-ROM before it boots the kernel."""
    root = qemu10_dir(cache) / "root"
    executable = root / "usr/bin/qemu-system-x86_64"
    if not executable.is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        with _locked(root.parent / ".lock"):
            if not executable.is_file():
                _unpack_qemu10(root)
    return QemuProgram(str(executable), ("-L", str(root / "usr/share/qemu"), "-audio", "none", "-nodefaults",
                                         "-serial", "mon:stdio"),
                       {"QEMU_MODULE_DIR": str(root / "usr/lib/x86_64-linux-gnu/qemu")})


def vhost_user_gpu_program() -> Path:
    """The vhost-user-gpu back-end (qemu-system-gui 7.2; QEMU 10 drives it, QEMU 7.2 refuses it under TCG)."""
    return Path("/usr/lib/qemu/vhost-user-gpu")


def qemu_program(choice: str | QemuProgram | None) -> QemuProgram:
    """A QEMU by name: None, "system" or "7" (also "7.2") for the installed one, "10" for `qemu10()`,
    else the path of a qemu-system-x86_64."""
    if isinstance(choice, QemuProgram):
        return choice
    if choice in (None, "", "system", "7", "7.2"):
        return system_qemu()
    if choice in ("10", "10.0", "10.0.2"):
        return qemu10()
    path = Path(str(choice)).expanduser()
    if not path.is_file() or not os.access(path, os.X_OK):
        raise LabError(f"--qemu {choice}: expected 7, 10 or the path of a qemu-system-x86_64 executable")
    return QemuProgram(str(path))


def _unpack_qemu10(root: Path) -> None:
    mirror = os.environ.get("VHUSNIFF_DEBIAN_MIRROR") or DEFAULT_DEBIAN_MIRROR
    state = root.parent / "apt"
    (state / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    sources = state / "backports.sources"
    sources.write_text(f"Types: deb\nURIs: {mirror}\nSuites: {QEMU10_SUITE}\nComponents: main\n"
                       "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    # A package list of our own: the system's sources and lists stay as they are.
    apt_options = ["-o", f"Dir::Etc::SourceList={sources}", "-o", "Dir::Etc::SourceParts=/nonexistent",
                   "-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::Cache={state / 'cache'}"]
    _run(["apt-get", *apt_options, "update"], f"apt-get update of {QEMU10_SUITE} (needs root)")
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".download-") as scratch:
        scratch_dir = Path(scratch)
        wanted = [f"{package}/{QEMU10_SUITE}" for package in QEMU10_PACKAGES]
        _run(["apt-get", *apt_options, "download", *wanted], "apt-get download of QEMU 10", cwd=scratch_dir)
        staged = scratch_dir / "root"
        for deb in sorted(scratch_dir.glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(staged)], f"dpkg -x {deb.name}")
        if not (staged / "usr/bin/qemu-system-x86_64").is_file():
            raise LabError(f"the {QEMU10_SUITE} packages held no usr/bin/qemu-system-x86_64")
        shutil.rmtree(root, ignore_errors=True)
        staged.rename(root)


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------

_running: weakref.WeakSet[LabProcess] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    # Children run in their own sessions (so Ctrl-C reaches only us); never leave them behind.
    for process in list(_running):
        process.stop(timeout=2)


class LabProcess:
    """A child process writing to a log file. `stop()` ends and reaps it; also a context manager."""

    def __init__(self, name: str, proc: subprocess.Popen, log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        _running.add(self)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        """Everything the process has logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = 5.0) -> int | None:
        """Ask the process to exit, kill it if it does not within `timeout`, reap it; return its exit code."""
        if self.proc.poll() is None:
            self._ask_to_exit()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._release()
        _running.discard(self)
        return self.proc.returncode

    def _ask_to_exit(self) -> None:
        self.proc.terminate()

    def _release(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} pid={self.proc.pid} log={self.log_path}>"


class Backend(LabProcess):
    """A vhost-user back-end (qemu-storage-daemon or dpdk-testpmd) serving `socket_path`."""

    def __init__(self, name: str, proc: subprocess.Popen, log_path: Path, socket_path: Path,
                 disk_path: Path | None = None, shared_dir: Path | None = None) -> None:
        super().__init__(name, proc, log_path)
        self.socket_path = socket_path
        self.disk_path = disk_path
        self.shared_dir = shared_dir

    def wait_for_socket(self, timeout: float = 10.0) -> None:
        """Return once someone listens at `socket_path` (a stale socket file there does not count); stop the
        process and raise with its log tail if that does not happen."""
        _wait_until(lambda: _is_listening(self.socket_path), timeout, self, f"a listener on {self.socket_path}")

    def wait_for_log(self, text: str, timeout: float = 10.0) -> None:
        """Return once `text` appears in the log."""
        _wait_until(lambda: text in self.log_text(), timeout, self, f"{text!r} in its log")


class Testpmd(Backend):
    """dpdk-testpmd; it quits when its standard input ends, which is how `stop()` asks it to."""

    def __init__(self, name: str, proc: subprocess.Popen, log_path: Path, socket_path: Path, prefix: str) -> None:
        super().__init__(name, proc, log_path, socket_path)
        self.prefix = prefix
        assert proc.stdin is not None, "start_testpmd spawns testpmd with a piped stdin (closing it stops testpmd)"
        self._stdin: IO[bytes] = proc.stdin

    def _ask_to_exit(self) -> None:
        with contextlib.suppress(OSError):
            self._stdin.close()

    def _release(self) -> None:
        super()._release()
        # DPDK leaves a runtime directory per --file-prefix behind; unique prefixes would pile up.
        shutil.rmtree(_dpdk_runtime_dir(self.prefix), ignore_errors=True)


def _dpdk_runtime_dir(prefix: str) -> Path:
    """Where DPDK's EAL keeps a file prefix's runtime files (eal_common_options.c)."""
    if os.geteuid() == 0:
        return Path("/var/run/dpdk") / prefix
    return Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / "dpdk" / prefix


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except FileNotFoundError:
        return False


def _is_listening(path: Path) -> bool:
    """A socket is listening at `path`, by the kernel's table of Unix sockets: no connection is made (a back-end
    would take a probe connection as a client). Where that table cannot be read, a socket file will do."""
    listening = listening_in_table(path, absent=False)
    return _is_socket(path) if listening is None else listening


def _wait_until(condition: Callable[[], bool], timeout: float, process: LabProcess, awaited: str) -> None:
    """Poll `condition`; if the process dies or `timeout` passes first, stop it and raise with its log tail."""
    deadline = time.monotonic() + timeout
    while not condition():
        if not process.running:
            error_type, what = LabError, f"exited with {process.proc.returncode} while waiting for {awaited}"
        elif time.monotonic() > deadline:
            error_type, what = LabTimeout, f"still no {awaited} after {timeout:g} s"
        else:
            time.sleep(0.02)
            continue
        process.stop()
        raise error_type(f"{process.name} {what}; log {process.log_path}:\n{process.log_tail()}")


def _remove_stale_socket(path: Path) -> None:
    # A server that finds its socket path taken fails (DPDK) or would be "ready" before it listens.
    if _is_socket(path):
        path.unlink()


def _pinned(command: list[str], cpu: Cpus) -> list[str]:
    if cpu is None:
        return command
    cpu_list = str(cpu) if isinstance(cpu, (str, int)) else ",".join(str(c) for c in cpu)
    return ["taskset", "-c", cpu_list, *command]


def _qemu_option_value(value: object) -> str:
    """QEMU's -opt a=b,c=d syntax: a comma inside a value is written twice."""
    return str(value).replace(",", ",,")


def _spawn(command: list[str], workdir: Path, log_name: str, cpu: Cpus, *, stdin=subprocess.DEVNULL,
           capture_stdout: bool = False, env: Mapping[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{log_name}.log"
    command = _pinned(command, cpu)
    with open(log_path, "wb") as log_file:
        log_file.write(f"$ {subprocess.list2cmdline(command)}\n".encode())
        log_file.flush()
        try:
            proc = subprocess.Popen(command, stdin=stdin,
                                    stdout=subprocess.PIPE if capture_stdout else log_file,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env=None if env is None else dict(env))
        except FileNotFoundError as error:
            raise LabError(f"{command[0]} not found: run .ci/install-deps.sh") from error
    return proc, log_path


def start_storage_daemon(workdir: Path | str, socket_path: Path | str, size_mb: int = 64, *,
                         cpu: Cpus = None, name: str = "storage-daemon", timeout: float = 10.0,
                         disk_path: Path | str | None = None, remove_stale_socket: bool = True,
                         queues: int = 1) -> Backend:
    """Start qemu-storage-daemon exporting a raw disk as a writable vhost-user-blk device with `queues` queues.

    The daemon listens on `socket_path`; this returns once it listens there. The disk is `disk_path` as it
    is (a restarted daemon serving the same disk), else a fresh `workdir/<name>.img` of `size_mb` MiB (at
    least 5 for the guest's test pattern); the log is `workdir/<name>.log`. With `remove_stale_socket`
    off, a dead daemon's socket file is left for the new one to replace, as after a real `kill -9`.
    """
    workdir, socket_path = Path(workdir), Path(socket_path)
    workdir.mkdir(parents=True, exist_ok=True)
    if disk_path is None:
        disk_path = workdir / f"{name}.img"
        _run(["qemu-img", "create", "-q", "-f", "raw", str(disk_path), f"{size_mb}M"], "qemu-img create")
    disk_path = Path(disk_path)
    if remove_stale_socket:
        _remove_stale_socket(socket_path)
    command = [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=disk0,filename={_qemu_option_value(disk_path)}",
        "--export", f"type=vhost-user-blk,id=export0,node-name=disk0,writable=on,num-queues={int(queues)},"
                    f"addr.type=unix,addr.path={_qemu_option_value(socket_path)}",
    ]
    proc, log_path = _spawn(command, workdir, name, cpu)
    backend = Backend(name, proc, log_path, socket_path, disk_path)
    backend.wait_for_socket(timeout)
    return backend


_testpmd_instances = itertools.count()


#: DPDK's vhost library logs "read message VHOST_USER_<NAME>" for each front-end message at this level.
TESTPMD_MESSAGE_LOG = "--log-level=lib.vhost.config:debug"
_TESTPMD_READ_MESSAGE = re.compile(r"read message (VHOST_USER_\w+)")


def testpmd_messages_read(log: str) -> list[str]:
    """The front-end requests dpdk-testpmd says it read, in order, by DPDK's names without VHOST_USER_
    (DPDK 22.11 still says SET_SLAVE_REQ_FD for SET_BACKEND_REQ_FD)."""
    return [match[1][len("VHOST_USER_"):] for match in _TESTPMD_READ_MESSAGE.finditer(log)]


def start_testpmd(workdir: Path | str, socket_path: Path | str, client_mode: bool = False,
                  prefix: str | None = None, *, cpu: Cpus = None, name: str | None = None,
                  timeout: float = 15.0, queues: int = 1) -> Testpmd:
    """Start dpdk-testpmd as a vhost-user-net back-end (net_vhost PMD) on `socket_path`.

    `queues` queue pairs (testpmd's --rxq and --txq too). It logs every front-end message it reads
    (`testpmd_messages_read`: an independent record to check a capture against).

    By default it listens, and this returns once the socket exists. With `client_mode` it
    connects to a socket someone else listens on (retrying until it can) and this returns once
    testpmd is up. `prefix` is DPDK's --file-prefix, which must differ between concurrent
    instances; a unique one is made up when omitted.
    """
    workdir, socket_path = Path(workdir), Path(socket_path)
    if not client_mode:
        _remove_stale_socket(socket_path)
    vdev = f"net_vhost0,iface={socket_path},queues={int(queues)}" + (",client=1" if client_mode else "")
    testpmd = _spawn_testpmd(workdir, socket_path, vdev, queues, prefix, name, "testpmd", cpu,
                             eal_args=(TESTPMD_MESSAGE_LOG,))
    if client_mode:
        testpmd.wait_for_log("Press enter to exit", timeout)
    else:
        testpmd.wait_for_socket(timeout)
    return testpmd


def start_testpmd_frontend(workdir: Path | str, socket_path: Path | str, queues: int = 1,
                           prefix: str | None = None, *, cpu: Cpus = None, name: str | None = None,
                           timeout: float = 30.0, vdev_options: str = "",
                           testpmd_args: tuple[str, ...] = ()) -> Testpmd:
    """Start dpdk-testpmd as a vhost-user front-end (virtio-user PMD) on the listening `socket_path`, with
    `queues` queue pairs; return once its port is started (a whole session's set-up has been sent). `stop()`
    (closing its input) makes it stop the port, which ends the session, and exit. No guest is needed.
    `vdev_options`: more virtio-user options (",packed_vq=1" for packed rings); `testpmd_args`: more of testpmd's
    own (a forwarding mode, --tx-first)."""
    workdir, socket_path = Path(workdir), Path(socket_path)
    vdev = f"net_virtio_user0,path={socket_path},queues={int(queues)}{vdev_options}"
    frontend = _spawn_testpmd(workdir, socket_path, vdev, queues, prefix, name, "testpmd-frontend", cpu,
                              eal_args=("--single-file-segments",), testpmd_args=testpmd_args)
    frontend.wait_for_log("Press enter to exit", timeout)
    return frontend


def _spawn_testpmd(workdir: Path, socket_path: Path, vdev: str, queues: int, prefix: str | None, name: str | None,
                   stem: str, cpu: Cpus, eal_args: tuple[str, ...] = (), testpmd_args: tuple[str, ...] = ()) -> Testpmd:
    """dpdk-testpmd with `vdev` and `queues` queue pairs, its input piped; not waited for. Without `prefix` a
    unique one is made up; without `name` it is `stem`-prefix."""
    prefix = prefix or f"vhusniff-{os.getpid()}-{next(_testpmd_instances)}"
    name = name or f"{stem}-{prefix}"
    # Line-buffered: "Press enter to exit" would otherwise wait in testpmd's stdio buffer until it exits.
    command = ["stdbuf", "-oL", "dpdk-testpmd", "--no-huge", "-m", "1024", "--no-pci", "--file-prefix", prefix,
               *eal_args, "--vdev", vdev, "--", "--total-num-mbufs=4096",
               f"--rxq={int(queues)}", f"--txq={int(queues)}", *testpmd_args]
    proc, log_path = _spawn(command, workdir, name, cpu, stdin=subprocess.PIPE)
    return Testpmd(name, proc, log_path, socket_path, prefix)


VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


def start_virtiofsd(workdir: Path | str, socket_path: Path | str, shared_dir: Path | str | None = None, *,
                    cpu: Cpus = None, name: str = "virtiofsd", timeout: float = 10.0) -> Backend:
    """Start C virtiofsd (qemu-system-common 7.2) sharing `shared_dir` (default: a fresh `workdir/shared`) as
    a vhost-user-fs back-end on `socket_path`; return once it listens. It serves one connection and exits when
    that ends. `Backend.shared_dir` is the shared folder."""
    workdir, socket_path = Path(workdir), Path(socket_path)
    shared = (Path(shared_dir) if shared_dir else workdir / "shared").resolve()   # it chroots there: no relative path
    shared.mkdir(parents=True, exist_ok=True)
    _remove_stale_socket(socket_path)
    # chroot, not namespaces: namespace sandboxing needs privileges a container may not give.
    command = [VIRTIOFSD, f"--socket-path={socket_path}", "-o", f"source={shared}", "-o", "sandbox=chroot",
               "-o", "cache=auto"]
    proc, log_path = _spawn(command, workdir, name, cpu)
    backend = Backend(name, proc, log_path, socket_path, shared_dir=shared)
    backend.wait_for_socket(timeout)
    return backend


def start_vhost_user_gpu(workdir: Path | str, socket_path: Path | str, *, cpu: Cpus = None,
                         name: str = "vhost-user-gpu", timeout: float = 10.0) -> Backend:
    """Start vhost-user-gpu (qemu-system-gui 7.2, 2D: no virgl) on `socket_path`; return once it listens."""
    workdir, socket_path = Path(workdir), Path(socket_path)
    _remove_stale_socket(socket_path)
    proc, log_path = _spawn([str(vhost_user_gpu_program()), f"--socket-path={socket_path}"], workdir, name, cpu)
    backend = Backend(name, proc, log_path, socket_path)
    backend.wait_for_socket(timeout)
    return backend


@dataclasses.dataclass(frozen=True)
class GuestResult:
    """How a guest run ended."""
    exit_code: int
    #: The guest wrote its pattern to /dev/vda and read the same bytes back after dropping caches.
    blk_io_ok: bool
    #: The guest's eth0 sent packets and received some (an echoing back-end such as testpmd sends them back).
    net_io_ok: bool
    #: The guest's /init ran to its end (`VHUSNIFF-GUEST: done`).
    done: bool
    #: Everything QEMU printed: the serial console and QEMU's own messages, in order.
    console: str
    #: Seconds from starting QEMU to the end of its output, i.e. its exit.
    elapsed: float

    @property
    def guest_lines(self) -> list[str]:
        """The guest's own report lines (`VHUSNIFF-GUEST: ...`)."""
        return guest_reports(self.console.splitlines())

    @property
    def fs_io_ok(self) -> bool:
        """The guest mounted the virtio-fs tag, wrote a file, remounted and read the same bytes back."""
        return FS_IO_OK in self.guest_lines

    @property
    def gpu_drawn(self) -> tuple[int, int] | None:
        """The framebuffer size the guest drew GPU_PATTERN on, if it did."""
        return gpu_drawn_size(self.guest_lines)

    @property
    def rounds(self) -> list[tuple[int, bool]]:
        """The loop mode's rounds (`loop_kernel_args`): (round number, passed), in order."""
        found = (_ROUND_REPORT.match(line) for line in self.guest_lines)
        return [(int(match[1]), match[2] == "ok") for match in found if match]

    @property
    def clean_exit(self) -> bool:
        """QEMU exited with 0 after /init finished (not after a panic or a kill)."""
        return self.exit_code == 0 and self.done


def gpu_drawn_size(guest_lines: Iterable[str]) -> tuple[int, int] | None:
    """(width, height) from the guest's `gpu-drawn WxH` line, or None."""
    for line in guest_lines:
        if line.startswith(GPU_DRAWN_PREFIX):
            width, _, height = line[len(GPU_DRAWN_PREFIX):].strip().partition("x")
            return int(width), int(height)
    return None


def guest_reports(console_lines: Iterable[str]) -> list[str]:
    """The `VHUSNIFF-GUEST: ...` lines, cut loose from any console output glued in front of them."""
    return [line[line.index(GUEST_MARK):].rstrip() for line in console_lines if GUEST_MARK in line]


class Guest(LabProcess):
    """A running QEMU guest whose console (QEMU's stdout and stderr) is read line by line."""

    def __init__(self, name: str, proc: subprocess.Popen, log_path: Path, chardev_path: Path,
                 on_console_line: ConsoleCallback | None, qmp_path: Path | None = None) -> None:
        super().__init__(name, proc, log_path)
        self.chardev_path = chardev_path
        #: QEMU's QMP socket, if it was started with one (the GPU guest: `screendump`).
        self.qmp_path = qmp_path
        assert proc.stdout is not None, "start_qemu spawns QEMU with its stdout piped: the console is read there"
        self._console: IO[bytes] = proc.stdout
        self.started_at = time.monotonic()
        self._lines: list[str] = []
        self._console_ended = False
        self._ended_at: float | None = None
        self._new_line = threading.Condition()
        self._on_console_line = on_console_line
        self._reader = threading.Thread(target=self._read_console, name=f"{name}-console", daemon=True)
        self._reader.start()

    def _read_console(self) -> None:
        with open(self.log_path, "ab") as log_file:
            for raw in self._console:
                log_file.write(raw)
                log_file.flush()
                line = _TERMINAL_ESCAPE.sub("", raw.decode(errors="replace")).rstrip("\r\n").replace("\r", "")
                with self._new_line:
                    self._lines.append(line)
                    self._new_line.notify_all()
                if self._on_console_line is not None:
                    try:
                        self._on_console_line(line)
                    except Exception:  # a broken callback must not stop the console from being recorded
                        log.exception("console callback failed")
        with self._new_line:
            self._ended_at = time.monotonic()  # QEMU's output ends when it exits
            self._console_ended = True
            self._new_line.notify_all()

    def console_lines(self) -> Iterator[str]:
        """Every console line from the first, blocking for new ones until QEMU closes its output."""
        for index in itertools.count():
            with self._new_line:
                while index >= len(self._lines) and not self._console_ended:
                    self._new_line.wait()
                if index >= len(self._lines):
                    return
                line = self._lines[index]
            yield line

    def wait_for_line(self, predicate: Callable[[str], bool], timeout: float) -> str:
        """The first console line (from the start) for which `predicate` holds; raise LabTimeout (leaving QEMU
        running) if none comes within `timeout` seconds, LabError if QEMU's output ends first."""
        deadline = time.monotonic() + timeout
        index = 0
        with self._new_line:
            while True:
                for line in self._lines[index:]:
                    if predicate(line):
                        return line
                index = len(self._lines)
                if self._console_ended:
                    raise LabError(f"{self.name} ended without the awaited console line; log {self.log_path}:\n"
                                   f"{self.log_tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LabTimeout(f"{self.name}: no awaited console line after {timeout:g} s; log "
                                     f"{self.log_path}:\n{self.log_tail()}")
                self._new_line.wait(left)

    def send_console(self, text: str) -> None:
        """Type `text` on the guest's serial console (QEMU started with console input: the GPU guest)."""
        if self.proc.stdin is None:
            raise LabError(f"{self.name} was started without console input")
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def qmp(self, command: str, timeout: float = 30.0, **arguments: object) -> object:
        """Run one QMP command on this QEMU and return its "return" value; LabError if QEMU answers an error."""
        if self.qmp_path is None:
            raise LabError(f"{self.name} was started without a QMP socket")
        return qmp_command(self.qmp_path, command, timeout, **arguments)

    def screendump(self, path: Path | str) -> Screen:
        """The guest's screen now, through QMP `screendump` (PPM), read back as a `Screen`."""
        self.qmp("screendump", filename=str(path))
        return Screen.from_ppm(Path(path).read_bytes())

    def console_text(self) -> str:
        """The console so far."""
        with self._new_line:
            return "\n".join(self._lines)

    def wait(self, timeout: float | None = None) -> GuestResult:
        """Wait for QEMU to exit and return the result; raise LabTimeout (leaving it running) if it does not."""
        try:
            exit_code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise LabTimeout(f"{self.name} still running after {timeout:g} s; log {self.log_path}:\n"
                             f"{self.log_tail()}") from None
        self._reader.join()
        self.stop()
        elapsed = (self._ended_at or time.monotonic()) - self.started_at
        reports = guest_reports(self._lines)
        return GuestResult(exit_code=exit_code, blk_io_ok=BLK_IO_OK in reports,
                           net_io_ok=any(report.startswith(NET_IO_OK_PREFIX) for report in reports),
                           done=GUEST_DONE in reports, console="\n".join(self._lines), elapsed=elapsed)

    def _release(self) -> None:
        self._reader.join(timeout=5)
        super()._release()


#: The vhost-user devices the lab boots.
DEVICES = ("blk", "net", "fs", "gpu")


def default_accel() -> str:
    """``$VHUSNIFF_ACCEL`` or TCG: /dev/kvm can exist where nested KVM still fails, so KVM is opt-in."""
    return os.environ.get("VHUSNIFF_ACCEL") or "tcg"


def qemu_command(kit: GuestKit, chardev_path: Path | str, device: str = "blk", server: bool = False,
                 reconnect: int | None = None, extra_args: Iterable[str] = (), accel: str | None = None,
                 net_msix: bool = False, kernel_args: Iterable[str] = (),
                 qemu: QemuProgram | str | None = None, queues: int = 1,
                 qmp_path: Path | str | None = None, screen: tuple[int, int] | None = None) -> list[str]:
    """The qemu-system-x86_64 command line `start_qemu()` runs (`qemu`: see `qemu_program`)."""
    chardev = f"socket,id=c0,path={_qemu_option_value(chardev_path)}"
    if server:
        chardev += ",server=on,wait=off"
    if reconnect is not None:
        chardev += f",reconnect={int(reconnect)}"
    queues = int(queues)
    if device == "blk":
        device_args = ["-device", f"vhost-user-blk-pci,chardev=c0,num-queues={queues}"]
    elif device == "net":
        # QEMU 7.2 segfaults in vhost_net_start (msix_set_vector_notifiers) when the guest driver starts
        # a vhost-user-net device with MSI-X; with legacy interrupts (vectors=0) the guest runs fine.
        # romfile= drops the iPXE option ROM, which only costs boot time here.
        net_device = "virtio-net-pci,netdev=n0,romfile=" + ("" if net_msix else ",vectors=0")
        if queues > 1:
            net_device += ",mq=on"
        device_args = ["-netdev", f"vhost-user,id=n0,chardev=c0,queues={queues}", "-device", net_device]
    elif device == "fs":
        device_args = ["-device", f"vhost-user-fs-pci,chardev=c0,tag={FS_TAG},num-request-queues={queues}"]
    elif device == "gpu":
        # No EDID: the guest then takes the device's default mode. Only QEMU 8 and later run it under TCG.
        gpu_device = "vhost-user-gpu-pci,chardev=c0,edid=off"
        if screen is not None:
            gpu_device += f",xres={int(screen[0])},yres={int(screen[1])}"
        device_args = ["-device", gpu_device]
    else:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    if qmp_path is not None:
        device_args += ["-qmp", f"unix:{_qemu_option_value(qmp_path)},server=on,wait=off"]
    return qemu_program(qemu).command(
        "-accel", accel or default_accel(), "-cpu", "max", "-m", str(GUEST_MEMORY_MB),
        "-nographic", "-no-reboot",
        # No default NIC and no VGA: their option ROMs cost about 0.4 s of a 3 s TCG boot.
        "-nic", "none", "-vga", "none",
        # vhost-user back-ends map guest memory through the fds QEMU sends: it must be shareable.
        "-object", f"memory-backend-memfd,id=mem,size={GUEST_MEMORY_MB}M,share=on",
        "-machine", "q35,memory-backend=mem",
        "-kernel", str(kit.kernel), "-initrd", str(kit.initrd),
        "-append", " ".join(["console=ttyS0 quiet panic=-1", *kernel_args]),
        "-chardev", chardev, *device_args, *extra_args,
    )


def start_qemu(workdir: Path | str, kit: GuestKit, chardev_path: Path | str, device: str = "blk",
               server: bool = False, reconnect: int | None = None, extra_args: Iterable[str] = (), *,
               cpu: Cpus = None, accel: str | None = None, name: str = "qemu", net_msix: bool = False,
               on_console_line: ConsoleCallback | None = None, socket_timeout: float = 10.0,
               kernel_args: Iterable[str] = (), qemu: QemuProgram | str | None = None, queues: int = 1,
               qmp_path: Path | str | None = None, screen: tuple[int, int] | None = None) -> Guest:
    """Boot the guest kit in QEMU with a vhost-user `device` ("blk" or "net") on `chardev_path`.

    QEMU connects to `chardev_path` (the back-end or the proxy must already listen, unless
    `reconnect` seconds is given) or, with `server`, listens there itself; this then returns once
    the socket exists. The accelerator is `accel`, else ``$VHUSNIFF_ACCEL``, else TCG. A net
    device uses legacy interrupts unless `net_msix`, which reproduces QEMU 7.2's segfault as the
    guest driver starts the device (a real crash case). The console is logged to
    `workdir/<name>.log`, passed line by line to `on_console_line` (from a reader thread) and
    available from `Guest.console_lines()`. `kernel_args` go on the guest kernel's command line
    (`loop_kernel_args(N)`: the disk check repeated for N seconds). `qemu` picks the QEMU (`qemu_program`:
    the system's by default, "10" for QEMU 10, or a path). `queues`: the device's queues (net: queue pairs;
    fs: request queues). A "gpu" guest (`prepare_gpu()`'s kit, QEMU 10) gets a QMP socket at `qmp_path`
    (default `workdir/<name>-qmp.sock`; this returns once QEMU listens there) and console input: it draws, then
    waits for a line (`send_console`); `screen` (width, height) is its display mode, QEMU's default (1280x800)
    when None.
    """
    workdir, chardev_path = Path(workdir), Path(chardev_path)
    program = qemu_program(qemu)
    if device == "gpu" and qmp_path is None:
        qmp_path = workdir / f"{name}-qmp.sock"
    command = qemu_command(kit, chardev_path, device, server, reconnect, extra_args, accel, net_msix,
                           kernel_args, program, queues, qmp_path, screen)
    if server:
        _remove_stale_socket(chardev_path)
    if qmp_path is not None:
        _remove_stale_socket(Path(qmp_path))
    stdin = subprocess.PIPE if device == "gpu" else subprocess.DEVNULL
    proc, log_path = _spawn(command, workdir, name, cpu, capture_stdout=True, env=program.environ(), stdin=stdin)
    guest = Guest(name, proc, log_path, chardev_path, on_console_line, Path(qmp_path) if qmp_path else None)
    if server:
        _wait_until(lambda: _is_socket(chardev_path), socket_timeout, guest, f"socket {chardev_path}")
    if qmp_path is not None:
        # So that QMP commands (screendump) work as soon as this returns.
        qmp_socket = Path(qmp_path)
        _wait_until(lambda: _is_listening(qmp_socket), socket_timeout, guest, f"QMP socket {qmp_socket}")
    return guest


# --------------------------------------------------------------------------------------------
# The GPU guest's screen: QMP and the pattern check
# --------------------------------------------------------------------------------------------

def qmp_command(qmp_path: Path | str, command: str, timeout: float = 30.0, **arguments: object) -> object:
    """Connect to QEMU's QMP socket, run one command and return its "return" value (events are skipped)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(timeout)
            connection.connect(str(qmp_path))
            stream = connection.makefile("rwb")
            replies = (json.loads(line) for line in stream)
            next(replies)                                    # the greeting
            for execute, args in (("qmp_capabilities", {}), (command, arguments)):
                stream.write(json.dumps({"execute": execute, "arguments": args}).encode() + b"\n")
                stream.flush()
                reply = next(reply for reply in replies if "event" not in reply)
                if "error" in reply:
                    raise LabError(f"QMP {execute} on {qmp_path}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")
    except (OSError, StopIteration, ValueError) as error:
        raise LabError(f"QMP {command} on {qmp_path}: {error or 'connection closed'}") from error


@dataclasses.dataclass(frozen=True)
class Screen:
    """A screen image: width, height and RGB bytes, row by row."""
    width: int
    height: int
    rgb: bytes

    @classmethod
    def from_ppm(cls, data: bytes) -> Screen:
        """Read a binary PPM (P6, maxval 255), as QEMU's screendump writes it."""
        fields = re.match(rb"P6\s+(\d+)\s+(\d+)\s+255\s", data)
        if fields is None:
            raise LabError(f"not a binary PPM with 8-bit samples: {data[:16]!r}")
        width, height = int(fields[1]), int(fields[2])
        rgb = data[fields.end():fields.end() + width * height * 3]
        if len(rgb) != width * height * 3:
            raise LabError(f"PPM {width}x{height} holds {len(rgb)} of {width * height * 3} pixel bytes")
        return cls(width, height, rgb)

    def pixel(self, x: int, y: int) -> tuple[int, int, int]:
        offset = (y * self.width + x) * 3
        return self.rgb[offset], self.rgb[offset + 1], self.rgb[offset + 2]

    def pattern_match(self, pattern: Sequence[tuple[int, int, int]] = GPU_PATTERN) -> float:
        """The share of pixels in the pattern's bands (the screen's height split in len(pattern) bands, top to
        bottom) that have their band's colour: 1.0 is the whole pattern, exactly."""
        band_height = self.height // len(pattern)
        if band_height == 0:
            return 0.0
        matching = 0
        row_bytes = self.width * 3
        for band, colour in enumerate(pattern):
            expected_row = bytes(colour) * self.width
            for y in range(band * band_height, (band + 1) * band_height):
                row = self.rgb[y * row_bytes:(y + 1) * row_bytes]
                if row == expected_row:
                    matching += self.width
                else:
                    matching += sum(1 for x in range(0, row_bytes, 3) if row[x:x + 3] == expected_row[x:x + 3])
        return matching / (band_height * len(pattern) * self.width)


def wait_for_pattern(guest: Guest, workdir: Path | str, timeout: float = 30.0,
                     pattern: Sequence[tuple[int, int, int]] = GPU_PATTERN) -> tuple[Screen, float]:
    """Take screendumps until the screen shows `pattern` exactly (the guest's framebuffer writes reach the
    screen through the GPU back-end a little later) or `timeout` passes; return the last screen and its match."""
    deadline = time.monotonic() + timeout
    path = Path(workdir) / f"{guest.name}-screen.ppm"
    while True:
        screen = guest.screendump(path)
        match = screen.pattern_match(pattern)
        if match == 1.0 or time.monotonic() > deadline or not guest.running:
            return screen, match
        time.sleep(0.2)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def run_direct(workdir: Path, cpu_backend: Cpus = None, cpu_guest: Cpus = None, timeout: float = 60.0,
               on_console_line: ConsoleCallback | None = None, kernel_args: Iterable[str] = ()) -> GuestResult:
    """Boot a blk guest straight against qemu-storage-daemon (no proxy) and return the result (`kernel_args`:
    see `start_qemu`)."""
    kit = prepare()
    socket_path = workdir / "backend.sock"
    with start_storage_daemon(workdir, socket_path, cpu=cpu_backend), \
            start_qemu(workdir, kit, socket_path, cpu=cpu_guest, on_console_line=on_console_line,
                       kernel_args=kernel_args) as guest:
        return guest.wait(timeout)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m vhusniff.lab.peers", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_command = commands.add_parser("prepare", help="fetch the current guest kernel and build the "
                                                          "initramfs (cached)")
    prepare_command.add_argument("--qemu10", action="store_true",
                                 help=f"also unpack QEMU 10 from {QEMU10_SUITE} into the cache")
    prepare_command.add_argument("--gpu-kit", action="store_true",
                                 help="also build the GPU guest's kit (the generic kernel, with virtio_gpu)")
    direct = commands.add_parser("direct", help="boot a blk guest against qemu-storage-daemon, no proxy")
    direct.add_argument("--workdir", type=Path, help="keep sockets, disk and logs here (default: a temporary dir)")
    direct.add_argument("--cpu-backend", help="taskset core list for qemu-storage-daemon")
    direct.add_argument("--cpu-guest", help="taskset core list for QEMU")
    direct.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the guest (default: 60)")
    direct.add_argument("-q", "--quiet", action="store_true", help="do not echo the guest console")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        if args.command == "prepare":
            started = time.monotonic()
            kit = prepare(refresh=True)
            print(f"kernel  {kit.kernel}  ({kit.kernel_package})\ninitrd  {kit.initrd}")
            if args.gpu_kit:
                gpu_kit = prepare_gpu(refresh=True)
                print(f"gpu     {gpu_kit.kernel}  ({gpu_kit.kernel_package})\n        {gpu_kit.initrd}")
            if args.qemu10:
                program = qemu10()
                print(f"qemu    {program.executable}  ({program.version})")
            print(f"ready in {time.monotonic() - started:.1f} s")
            return 0
        echo = None if args.quiet else (lambda line: print(f"  | {line}", flush=True))
        with contextlib.ExitStack() as stack:
            workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vhusniff-lab-")))
            result = run_direct(workdir, args.cpu_backend, args.cpu_guest, args.timeout, echo)
    except LabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    verdict = "blk-io ok" if result.blk_io_ok else "blk-io NOT ok"
    print(f"direct boot: {verdict}, QEMU exit {result.exit_code}, "
          f"{'clean' if result.clean_exit else 'NOT clean'}, {result.elapsed:.2f} s from QEMU start to exit")
    return 0 if result.blk_io_ok and result.clean_exit else 1


if __name__ == "__main__":
    sys.exit(main())
