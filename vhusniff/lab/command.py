"""`vhusniff lab`: boot a throwaway real QEMU and a real back-end through the proxy, show and record the session.

    vhusniff lab                      # QEMU + qemu-storage-daemon (vhost-user-blk); guest writes, reads back
    vhusniff lab --device net         # QEMU + dpdk-testpmd (vhost-user-net); guest sends packets
    vhusniff lab --device net --msix  # the same with MSI-X: QEMU 7.2 segfaults; the capture keeps it all
    vhusniff lab --device net --reverse   # QEMU listens (server=on), testpmd connects (client=1)

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

    @property
    def ok(self) -> bool:
        """The guest did its I/O and QEMU exited cleanly."""
        return self.result.clean_exit and (self.result.blk_io_ok or self.result.net_io_ok)


def run_lab(workdir: Path | str, device: str = "blk", reverse: bool = False, hooks=(), capture_path=None, *,
            msix: bool = False, display=None, on_console_line=None, on_hook_error: str = "forward",
            timeout: float = 90.0, report=None, data_plane: dict | None = None, kernel_args=()) -> LabRun:
    """Boot the guest kit with a vhost-user `device` ("blk" or "net") whose messages pass through the proxy.

    blk: qemu-storage-daemon listens, the proxy connects to it, QEMU connects to the proxy.
    net: the same with dpdk-testpmd; with `reverse` QEMU listens and testpmd (client mode) connects to the
    proxy, which connects to QEMU. `msix` gives the net device MSI-X, which makes QEMU 7.2 segfault.
    The capture (if `capture_path`) is written as the session goes and complete when this returns.
    data_plane: the proxy's rings/rings_interval/notifications options; kernel_args go to the guest kernel
    (`lab.loop_kernel_args(N)`: disk I/O for N seconds).
    """
    if device not in ("blk", "net"):
        raise ValueError(f"device must be 'blk' or 'net', not {device!r}")
    if reverse and device != "net":
        raise lab.LabError("--reverse needs a back-end that connects out: qemu-storage-daemon only listens; "
                           "use --device net (dpdk-testpmd client mode)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    kit = lab.prepare()
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

        if not reverse:
            if device == "blk":
                backend = stack.enter_context(lab.start_storage_daemon(workdir, backend_socket))
            else:
                backend = stack.enter_context(lab.start_testpmd(workdir, backend_socket))
            proxy = start_proxy(Route.forward(proxy_socket, backend_socket, device))
            guest = stack.enter_context(lab.start_qemu(workdir, kit, proxy_socket, device=device, net_msix=msix,
                                                       on_console_line=on_console_line, kernel_args=kernel_args))
        else:
            guest = stack.enter_context(lab.start_qemu(workdir, kit, qemu_socket, device=device, server=True,
                                                       net_msix=msix, on_console_line=on_console_line))
            proxy = start_proxy(Route.reverse(proxy_socket, qemu_socket, device))
            backend = stack.enter_context(lab.start_testpmd(workdir, proxy_socket, client_mode=True))
        result = guest.wait(timeout)
        # QEMU's exit closes its socket; the proxy passes the close on and records both sides going.
        proxy.wait_until(lambda p: p.connections_total > 0 and p.active_connections == 0, 10)
        backend.stop()
        proxy.stop()
    return LabRun(result, Path(capture_path) if capture_path else None, list(proxy.records), list(proxy.problems),
                  proxy.connections_total, backend.log_text())


def record_boot(workdir: Path | str, device: str = "blk", reverse: bool = False, hooks=(), capture_path=None,
                **options) -> tuple[lab.GuestResult, Path]:
    """Boot through the proxy and return (guest result, capture path); the capture defaults to workdir's."""
    capture = Path(capture_path) if capture_path else Path(workdir) / f"lab-{device}.pcapng"
    run = run_lab(workdir, device, reverse, hooks, capture, report=options.pop("report", lambda text: None),
                  **options)
    return run.result, capture


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vhusniff lab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("blk", "net"), default="blk",
                        help="blk: qemu-storage-daemon (default); net: dpdk-testpmd")
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
                          data_plane=data_plane)
    except (lab.LabError, ProxyError) as error:
        print(f"vhusniff lab: error: {error}", file=sys.stderr)
        return 1
    result = run.result
    if args.device == "blk":
        verdict = "blk-io ok" if result.blk_io_ok else "blk-io NOT ok"
    else:
        verdict = "net-io ok" if result.net_io_ok else "net-io NOT ok"
    exit_text = f"QEMU exit {result.exit_code}" + (" (killed by a signal: crashed)" if result.exit_code < 0 else "")
    messages = sum(1 for record in run.records if record.kind == RecordKind.MESSAGE)
    print(f"vhusniff lab: guest {verdict}; {exit_text}; {result.elapsed:.1f} s; "
          f"{messages} messages on {run.connections} connection(s) in {capture}", file=sys.stderr)
    if not run.ok:
        print("vhusniff lab: the guest did not finish its I/O; the capture holds the session up to the end. "
              "Last console lines:\n  " + "\n  ".join(result.console.splitlines()[-8:]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
