"""`vhusniff proxy`: the command line of the live proxy."""
from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import replace

from ..dataplane.options import add_data_plane_arguments, data_plane_options
from ..engine.hooks import HookError
from ..engine.rewrites import add_hook_arguments, hooks_from_arguments
from ..protocol import catalogue as cat
from ..proxy.driver import MAX_BUFFERED_DEFAULT, Proxy
from ..proxy.routes import ProxyError, Route
from ..views.present import line_printer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vhusniff proxy",
        description="Sit between a vhost-user front-end (QEMU) and back-end; show, record and change what they "
                    "say. Forward: --listen FRONTEND.sock --backend BACKEND.sock (repeat the pair for more "
                    "devices). Reverse (QEMU server=on, back-end connects): --connect-frontend QEMU.sock "
                    "--listen-backend PROXY.sock.")
    parser.add_argument("--listen", action="append", default=[], metavar="FRONTEND.sock",
                        help="where the front-end (QEMU) connects; pairs with the --backend in the same position")
    parser.add_argument("--backend", action="append", default=[], metavar="BACKEND.sock",
                        help="the listening back-end's socket")
    parser.add_argument("--listen-backend", action="append", default=[], metavar="PROXY.sock",
                        help="reverse: where the back-end connects; pairs with --connect-frontend")
    parser.add_argument("--connect-frontend", action="append", default=[], metavar="QEMU.sock",
                        help="reverse: QEMU's listening socket (server=on)")
    parser.add_argument("-w", dest="write", metavar="CAPTURE", help="write a capture (pcapng), flushed per message")
    parser.add_argument("-q", "--quiet", action="store_true", help="no live output")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    parser.add_argument("--socket-mode", type=lambda text: int(text, 8), default=0o600, metavar="OCTAL",
                        help="mode of the listening sockets (default 0600)")
    parser.add_argument("--interpose-device-state", action="store_true",
                        help="interpose on SET_DEVICE_STATE_FD's pipe: relay the migration stream through a pipe of "
                             "the proxy's and record it (channel device_state, opaque bytes)")
    parser.add_argument("--max-buffered", type=int, default=MAX_BUFFERED_DEFAULT, metavar="BYTES",
                        help="bytes that may wait in the proxy for a peer that does not read; past it the proxy "
                             f"stops reading from the other side until the peer catches up (default "
                             f"{MAX_BUFFERED_DEFAULT})")
    parser.add_argument("--device", action="append", default=[], choices=cat.DEVICE_TYPES, metavar="TYPE",
                        help="the virtio device type behind the routes, so that feature bits and rewrites use its "
                             f"names ({', '.join(cat.DEVICE_TYPES)}): once for every route, or once per route in the "
                             "order the routes are given (forward ones first); recorded in the capture")
    add_data_plane_arguments(parser)
    add_hook_arguments(parser)
    return parser


def routes_from_arguments(parser, args) -> list[Route]:
    if len(args.listen) != len(args.backend):
        parser.error("each --listen needs a --backend (and the other way round)")
    if len(args.listen_backend) != len(args.connect_frontend):
        parser.error("each --listen-backend needs a --connect-frontend (and the other way round)")
    routes = [Route.forward(a, b) for a, b in zip(args.listen, args.backend, strict=True)]
    routes += [Route.reverse(a, b) for a, b in zip(args.listen_backend, args.connect_frontend, strict=True)]
    if not routes:
        parser.error("nothing to do: give --listen/--backend or --listen-backend/--connect-frontend")
    devices = args.device
    if len(devices) == 1:
        devices = devices * len(routes)
    if devices and len(devices) != len(routes):
        parser.error(f"give --device once, or once per route ({len(routes)} routes, {len(devices)} --device)")
    return [replace(route, device=device) for route, device in zip(routes, devices, strict=True)] if devices \
        else routes


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    routes = routes_from_arguments(parser, args)
    data_plane = data_plane_options(parser, args)
    try:
        hooks = hooks_from_arguments(args)
    except HookError as error:
        print(f"vhusniff proxy: {error}", file=sys.stderr)
        return 2
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    proxy = Proxy(routes, capture=args.write, hooks=hooks, on_hook_error=args.on_hook_error,
                  display=None if args.quiet else line_printer(), colour=colour, keep_records=False,
                  socket_mode=args.socket_mode, interpose_device_state=args.interpose_device_state,
                  max_buffered=args.max_buffered, **data_plane)
    try:
        proxy.open()
    except (ProxyError, OSError) as error:
        print(f"vhusniff proxy: {error}", file=sys.stderr)
        return 1
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signal_number, lambda *_: proxy.request_stop())
    for route in routes:
        print(f"vhusniff proxy: {route.listener_role} connects to {route.listen}, the proxy connects to "
              f"{route.target}" + (f"; capture {args.write}" if args.write else ""), file=sys.stderr, flush=True)
    proxy.run()
    if args.write:
        print(f"vhusniff proxy: capture written to {args.write} ({proxy.connections_total} connection(s))",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
