"""Replay a recorded session against a real peer, with fresh fds of the recorded kinds.

- `--as frontend CAPTURE --backend SOCK`: play the front-end's requests against a real back-end, wait for each
  reply the recording has (or the protocol requires), compare the replies with the recording field by field.
  Exit 0 when the reply stream is identical to the recording, 1 at a divergence (the first is named).
- `--as backend CAPTURE --listen SOCK`: answer a real front-end (QEMU) from the recorded back-end replies; a
  request the recording lacks gets a default answer (`--unknown default`, `--default-reply N`) or ends the
  session (`--unknown fail`, exit 1). The recorded back-end-channel requests (CONFIG_CHANGE_MSG, IOTLB_MSG,
  VRING_HOST_NOTIFIER_MSG, ...) go out on the socket the front-end passed in SET_BACKEND_REQ_FD, each right
  after the main-channel message recorded before it; the front-end's replies are awaited (without holding up
  the main channel), recorded and compared with the recorded ones.

Each recorded fd becomes a fresh one of its kind (memfd of the recorded size, eventfd, socket pair, pipe); fds
that were one object in the recording (same inode) are one object in the replay. Memory addresses stay as
recorded: a back-end only uses them as keys into the region table it is sent, and that table now describes
memory the replay owns.

Guest I/O is not in a capture (it lives in guest memory), so a replayed ring would not reach the positions the
recorded guest drove it to. The front-end replay therefore places each ring where the recorded session left it:
SET_VRING_BASE carries the base the recorded GET_VRING_BASE later reported, and the ring's avail and used
indexes in the replay's own memory are set to it, so the back-end sees a ring with nothing pending.

Each role is a scripted peer in this process, the other side of one core Session (vhusniff.engine) whose real
side is the peer's sockets; one single-threaded event loop (driver.py) runs both, with the session's timers.
The real peer's messages and the script's go through the same session, so hooks (`--hook`,
`--mask-protocol-features`, ...: the proxy's options) act on every message in both roles as in the proxy:
change, drop, delay (a timer, never a sleep), inject, disconnect. A hook's injection goes where it makes sense
for the role: the script sends it when its protocol lets it (as the front-end, a main-channel request once no
other request waits for its reply, whose reply is reported, not compared; a back-end-channel reply at once; as
the back-end, a main-channel reply at once, a back-end-channel request in its turn). What the role cannot
send is reported, naming message and channel, and skipped; its fds are closed. The replayed session, hooks
applied, is written with `-w` as a capture that `vhusniff diff` compares and that notes the recording's
device type (a DEVICE event), so that readers name the device's feature bits as they do in the recording.
"""
from __future__ import annotations

import argparse
import sys

from ..analysis.diff import load_or_report
from ..capture.pcapng import CaptureWriter, capture_source
from ..engine.hooks import HookError
from ..engine.rewrites import add_hook_arguments, hooks_from_arguments
from ..protocol import catalogue as cat
from .backend import ServeResult, replay_as_backend, serve_front_end
from .driver import REPLY_TIMEOUT
from .frontend import ReplayResult, replay_as_frontend
from .recording import (
    BackendExchange,
    Exchange,
    answer,
    default_answer,
    device_type,
    load_backend_requests,
    load_exchanges,
    reply_required,
    ring_positions,
)

__all__ = ["BackendExchange", "Exchange", "ReplayResult", "ServeResult", "answer", "default_answer", "device_type",
           "load_backend_requests", "load_exchanges", "main", "replay_as_backend", "replay_as_frontend",
           "reply_required", "ring_positions", "serve_front_end"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vhusniff replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("capture")
    parser.add_argument("--as", dest="role", choices=("frontend", "backend"), required=True)
    parser.add_argument("--backend", metavar="SOCKET", help="back-end socket to connect to (--as frontend)")
    parser.add_argument("--listen", metavar="SOCKET", help="socket to listen on for the front-end (--as backend)")
    parser.add_argument("--connection", type=int, help="which recorded connection (default: the first)")
    parser.add_argument("--timeout", type=float, default=REPLY_TIMEOUT,
                        help="seconds to wait for each reply: the back-end's (--as frontend), the front-end's on "
                             "the back-end channel (--as backend) (default: %(default)s)")
    parser.add_argument("--unknown", choices=("default", "fail"), default="default",
                        help="--as backend: a request the recording lacks gets a default answer, or ends the "
                             "session with exit status 1")
    parser.add_argument("--default-reply", type=lambda text: int(text, 0), default=0, metavar="N",
                        help="--as backend: the u64 (ack status or value) of a default answer (default: 0)")
    parser.add_argument("--keep-listening", action="store_true",
                        help="--as backend: serve one front-end connection after another")
    parser.add_argument("--device", choices=cat.DEVICE_TYPES, metavar="TYPE",
                        help="the virtio device type (" + ", ".join(cat.DEVICE_TYPES) + "), over the recording's "
                             "(its DEVICE event, or what its messages imply): it names feature bits and config "
                             "fields, and the DEVICE event of the -w capture")
    parser.add_argument("-w", dest="write", metavar="FILE", help="capture the replayed session to this file")
    add_hook_arguments(parser)
    args = parser.parse_args(argv)
    if args.role == "frontend" and not args.backend:
        parser.error("--as frontend needs --backend SOCKET")
    if args.role == "backend" and not args.listen:
        parser.error("--as backend needs --listen SOCKET")
    records = load_or_report(args.capture, "vhusniff replay", progress=True)   # a bar only on a terminal
    if records is None:
        return 2
    try:
        hooks = hooks_from_arguments(args)
    except HookError as error:
        print(f"vhusniff replay: {error}", file=sys.stderr)
        return 2
    # Every record reaches the file at once: a replay stopped by a signal leaves a readable capture.
    peer = args.backend if args.role == "frontend" else args.listen
    writer = CaptureWriter(args.write, flush_each=True, source=capture_source(f"replay-as-{args.role}->{peer}")) \
        if args.write else None
    try:
        if args.role == "frontend":
            result = replay_as_frontend(records, args.backend, args.connection, writer, reply_timeout=args.timeout,
                                        hooks=hooks, on_hook_error=args.on_hook_error, device=args.device)
            return 0 if result.identical else 1
        return replay_as_backend(records, args.listen, args.connection, args.unknown, writer,
                                 once=not args.keep_listening, default_reply=args.default_reply, hooks=hooks,
                                 on_hook_error=args.on_hook_error, reply_timeout=args.timeout, device=args.device)
    except ValueError as error:
        print(f"vhusniff replay: {args.capture}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if writer is not None:
            writer.close()
