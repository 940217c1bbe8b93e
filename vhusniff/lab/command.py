"""`vhusniff lab`: boot a throwaway real QEMU and a real back-end through the proxy, show and record the session.

    vhusniff lab                      # QEMU + qemu-storage-daemon (vhost-user-blk); guest writes, reads back
    vhusniff lab --device net         # QEMU + dpdk-testpmd (vhost-user-net); guest sends packets
    vhusniff lab --device net --queues 2  # the same with two queue pairs (multiqueue)
    vhusniff lab --device net --msix  # the same with MSI-X: QEMU 7.2 segfaults; the capture keeps it all
    vhusniff lab --device net --reverse   # QEMU listens (server=on), testpmd connects (client=1)
    vhusniff lab --device fs          # QEMU + virtiofsd; guest mounts the tag, writes a file, reads it back
    vhusniff lab --device gpu         # QEMU 10 + vhost-user-gpu; guest draws bands, a screendump must show them
    vhusniff lab --qemu 10            # any of these with QEMU 10.0.2 (unpacked into the cache) instead of 7.2

For other modules and tests: `record_boot(workdir, ...) -> (GuestResult, capture path)`, or `run_lab(...)`
for the proxy's records and findings too.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..dataplane.options import add_data_plane_arguments, data_plane_options
from ..engine.hooks import HookError
from ..engine.rewrites import add_hook_arguments, hooks_from_arguments
from ..model import RecordKind
from ..proxy import Proxy, ProxyError, Route
from ..views.present import line_printer
from . import peers as lab


@dataclass
class LabRun:
    """What a lab boot through the proxy gave."""
    result: lab.GuestResult
    capture: Path | None
    records: list = field(default_factory=list)        # every Record the proxy made, in order
    problems: list = field(default_factory=list)       # the proxy's findings, as reported
    connections: int = 0
    backend_log: str = ""
    device: str = "blk"
    qemu_version: str = ""
    #: gpu: the last screendump taken and the share of its pixels that show lab.GPU_PATTERN (1.0: all).
    screen: lab.Screen | None = None
    pattern_match: float = 0.0
    #: fs: the folder virtiofsd shared (the guest's file is in it).
    shared_dir: Path | None = None

    @property
    def io_ok(self) -> bool:
        """The guest did its device's work: disk or file read back, packets echoed, pattern on the screen."""
        if self.device == "gpu":
            return self.result.gpu_drawn is not None and self.pattern_match == 1.0
        return {"blk": self.result.blk_io_ok, "net": self.result.net_io_ok, "fs": self.result.fs_io_ok}[self.device]

    @property
    def ok(self) -> bool:
        """The guest did its I/O and QEMU exited cleanly."""
        return self.result.clean_exit and self.io_ok


def run_lab(workdir: Path | str, device: str = "blk", reverse: bool = False, hooks=(), capture_path=None, *,
            msix: bool = False, display=None, on_console_line=None, on_hook_error: str = "forward",
            timeout: float = 90.0, report=None, data_plane: dict | None = None, kernel_args=(),
            qemu: lab.QemuProgram | str | None = None, queues: int = 1,
            screen: tuple[int, int] | None = None) -> LabRun:
    """Boot the guest kit with a vhost-user `device` (lab.DEVICES) whose messages pass through the proxy.

    blk: qemu-storage-daemon listens, the proxy connects to it, QEMU connects to the proxy.
    net: the same with dpdk-testpmd; with `reverse` QEMU listens and testpmd (client mode) connects to the
    proxy, which connects to QEMU. `msix` gives the net device MSI-X, which makes QEMU 7.2 segfault.
    fs: virtiofsd; the guest mounts its tag, writes a file and reads it back after a remount.
    gpu: vhost-user-gpu and QEMU 10 (unless `qemu` says otherwise: 7.2 refuses it under TCG) booting the generic
    kernel; the guest draws lab.GPU_PATTERN and waits while screendumps are taken until one shows it. `screen`:
    its display size (width, height), QEMU's 1280x800 when None.
    `qemu`: lab.qemu_program's choice (the system's 7.2 by default, "10", or a path). `queues`: blk queues,
    net queue pairs, fs request queues.
    The capture (if `capture_path`) is written as the session goes and complete when this returns.
    data_plane: the proxy's rings/rings_interval/notifications options; kernel_args go to the guest kernel
    (`lab.loop_kernel_args(N)`: disk I/O for N seconds).
    """
    if device not in lab.DEVICES:
        raise ValueError(f"device must be one of {', '.join(lab.DEVICES)}, not {device!r}")
    if reverse and device != "net":
        raise lab.LabError(f"--reverse needs a back-end that connects out: the {device} back-end only listens; "
                           "use --device net (dpdk-testpmd client mode)")
    if queues < 1 or (queues > 1 and device == "gpu"):
        raise lab.LabError(f"--queues {queues}: expected 1 or more, and 1 for gpu")
    if screen is not None and device != "gpu":
        raise lab.LabError("--screen is for --device gpu")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if device == "gpu":
        kit = lab.prepare_gpu()
        program = lab.qemu_program("10" if qemu is None else qemu)
    else:
        kit = lab.prepare()
        program = lab.qemu_program(qemu)
    backend_socket = workdir / "backend.sock"
    proxy_socket = workdir / "proxy.sock"
    qemu_socket = workdir / "qemu.sock"
    kwargs = {} if report is None else {"report": report}
    kwargs.update(data_plane or {})
    with contextlib.ExitStack() as stack:
        def start_proxy(route: Route) -> Proxy:
            proxy = Proxy([route], capture=capture_path, hooks=hooks, on_hook_error=on_hook_error, display=display,
                          **kwargs)
            proxy.start()
            stack.callback(proxy.stop)
            return proxy

        guest_options = {"device": device, "net_msix": msix, "on_console_line": on_console_line, "qemu": program,
                         "queues": queues, "screen": screen}
        if not reverse:
            backend = stack.enter_context(_start_backend(workdir, device, backend_socket, queues))
            proxy = start_proxy(Route.forward(proxy_socket, backend_socket, device))
            guest = stack.enter_context(lab.start_qemu(workdir, kit, proxy_socket, kernel_args=kernel_args,
                                                       **guest_options))
        else:
            guest = stack.enter_context(lab.start_qemu(workdir, kit, qemu_socket, server=True, **guest_options))
            proxy = start_proxy(Route.reverse(proxy_socket, qemu_socket, device))
            backend = stack.enter_context(lab.start_testpmd(workdir, proxy_socket, client_mode=True, queues=queues))
        shown, pattern_match = (_look_at_screen(guest, workdir, timeout) if device == "gpu" else (None, 0.0))
        result = guest.wait(timeout)
        # QEMU's exit closes its socket; the proxy passes the close on and records both sides going.
        proxy.wait_until(lambda p: p.connections_total > 0 and p.active_connections == 0, 10)
        backend.stop()
        proxy.stop()
    return LabRun(result, Path(capture_path) if capture_path else None, list(proxy.records), list(proxy.problems),
                  proxy.connections_total, backend.log_text(), device, program.version, shown, pattern_match,
                  backend.shared_dir)


def _start_backend(workdir: Path, device: str, socket_path: Path, queues: int) -> lab.Backend:
    if device == "blk":
        return lab.start_storage_daemon(workdir, socket_path, queues=queues)
    if device == "net":
        return lab.start_testpmd(workdir, socket_path, queues=queues)
    if device == "fs":
        return lab.start_virtiofsd(workdir, socket_path)
    return lab.start_vhost_user_gpu(workdir, socket_path)


def _look_at_screen(guest: lab.Guest, workdir: Path, timeout: float) -> tuple[lab.Screen | None, float]:
    """Once the guest says it drew its pattern, take screendumps until one shows it; then let the guest go on."""
    try:
        guest.wait_for_line(lambda line: line.startswith(lab.GPU_DRAWN_PREFIX) or "gpu-draw FAILED" in line
                            or line == lab.GUEST_DONE, timeout)
    except lab.LabError:
        return None, 0.0                  # QEMU ended or hung first; guest.wait() reports how
    if lab.gpu_drawn_size(lab.guest_reports(guest.console_text().splitlines())) is None:
        return None, 0.0
    try:
        return lab.wait_for_pattern(guest, workdir, timeout=max(60.0, timeout / 2))
    finally:
        guest.send_console("\n")          # the guest waits for a line before it powers off


def record_boot(workdir: Path | str, device: str = "blk", reverse: bool = False, hooks=(), capture_path=None,
                **options) -> tuple[lab.GuestResult, Path]:
    """Boot through the proxy and return (guest result, capture path); the capture defaults to workdir's."""
    capture = Path(capture_path) if capture_path else Path(workdir) / f"lab-{device}.pcapng"
    run = run_lab(workdir, device, reverse, hooks, capture, report=options.pop("report", lambda text: None),
                  **options)
    return run.result, capture


def _screen_size(text: str) -> tuple[int, int]:
    width, separator, height = text.lower().partition("x")
    if not (separator and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 640x400, not {text!r}")
    return int(width), int(height)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vhusniff lab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=lab.DEVICES, default="blk",
                        help="blk: qemu-storage-daemon (default); net: dpdk-testpmd; fs: virtiofsd; "
                             "gpu: vhost-user-gpu (with QEMU 10)")
    parser.add_argument("--qemu", metavar="VERSION|PATH",
                        help="7 (the system's, default), 10 (10.0.2 unpacked into the cache; default for gpu) "
                             "or the path of a qemu-system-x86_64")
    parser.add_argument("--queues", type=int, default=1,
                        help="blk queues, net queue pairs, fs request queues (default 1)")
    parser.add_argument("--screen", type=_screen_size, metavar="WIDTHxHEIGHT",
                        help="gpu: the display size (default QEMU's, 1280x800)")
    parser.add_argument("--reverse", action="store_true",
                        help="QEMU listens (server=on) and the back-end connects (net only)")
    parser.add_argument("--msix", action="store_true", help="net: give the NIC MSI-X (QEMU 7.2 then segfaults)")
    parser.add_argument("-w", dest="write", metavar="CAPTURE",
                        help="capture file (default: vhusniff-lab-DEVICE-TIME.pcapng here)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no live session output")
    parser.add_argument("--console", action="store_true", help="also show the guest console")
    parser.add_argument("--workdir", type=Path, help="keep sockets, disk and logs here (default: temporary)")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the guest (default 90)")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    add_data_plane_arguments(parser)
    add_hook_arguments(parser)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    data_plane = data_plane_options(parser, args)
    try:
        hooks = hooks_from_arguments(args)
    except HookError as error:
        print(f"vhusniff lab: {error}", file=sys.stderr)
        return 2
    capture = Path(args.write or f"vhusniff-lab-{args.device}-{time.strftime('%Y%m%d-%H%M%S')}.pcapng")
    print(f"vhusniff lab: {args.device} guest through the proxy{' (reverse)' if args.reverse else ''}; "
          f"capture {capture}", file=sys.stderr, flush=True)
    display = None if args.quiet else line_printer()
    console = (lambda line: print(f"  | {line}", flush=True)) if args.console else None
    try:
        with contextlib.ExitStack() as stack:
            workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vhusniff-lab-")))
            run = run_lab(workdir, args.device, args.reverse, hooks, capture, msix=args.msix, display=display,
                          on_console_line=console, on_hook_error=args.on_hook_error, timeout=args.timeout,
                          data_plane=data_plane, qemu=args.qemu, queues=args.queues, screen=args.screen)
    except (lab.LabError, ProxyError) as error:
        print(f"vhusniff lab: error: {error}", file=sys.stderr)
        return 1
    result = run.result
    verdict = f"{args.device}-io {'ok' if run.io_ok else 'NOT ok'}"
    if args.device == "gpu":
        shown = f"{run.screen.width}x{run.screen.height}" if run.screen else "no screen"
        verdict = (f"gpu pattern {'on' if run.io_ok else 'NOT on'} the screen ({shown}, "
                   f"{run.pattern_match:.1%} of the pixels)")
    exit_text = f"QEMU exit {result.exit_code}" + (" (killed by a signal: crashed)" if result.exit_code < 0 else "")
    messages = sum(1 for record in run.records if record.kind == RecordKind.MESSAGE)
    print(f"vhusniff lab: QEMU {run.qemu_version}, guest {verdict}; {exit_text}; {result.elapsed:.1f} s; "
          f"{messages} messages on {run.connections} connection(s) in {capture}", file=sys.stderr)
    if not run.ok:
        print("vhusniff lab: the guest did not finish its I/O; the capture holds the session up to the end. "
              "Last console lines:\n  " + "\n  ".join(result.console.splitlines()[-8:]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
