"""Round trip through the proxy (capture on, quiet) against direct, in the same run, all on one core.

A 20-byte request and its 20-byte reply; 1 in 10 requests carries an eventfd (as in a VM start). The echo
back-end and the proxy are separate processes; everything is pinned to one core (a cross-core wake-up costs
~35 µs here and would swamp the difference). Prints medians in µs and the ratio. Targets: proxy at most
+20 µs and at most 3.5x direct.

    python3 benchmarks/bench_proxy.py [--rounds 5] [--trips 2000] [--cpu 0]
"""
import argparse
import os
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy_pair import direct_and_through  # noqa: E402

from vhusniff.engine.sockio import receive_chunk, send_message  # noqa: E402

ECHO_BACKEND = r"""
import os, socket, struct, sys
from vhusniff.engine.sockio import receive_chunk, send_message
server = socket.socket(socket.AF_UNIX); server.bind(sys.argv[1]); server.listen(8)
print("ready", flush=True)
while True:
    client, _ = server.accept()
    while True:
        data, fds, _ = receive_chunk(client)
        if not data:
            break
        for fd in fds:
            os.close(fd)
        request = struct.unpack_from("<I", data)[0]
        send_message(client, struct.pack("<III", request, 5, 8) + struct.pack("<Q", 42))
    client.close()
"""


def round_trips(path: str, trips: int) -> float:
    """Median-free mean µs per round trip over `trips` (after a short warm-up)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    request = struct.pack("<III", 1, 1, 8) + struct.pack("<Q", 0)
    eventfd = os.eventfd(0)
    for _ in range(50):
        send_message(sock, request)
        receive_chunk(sock)
    started = time.perf_counter()
    for trip in range(trips):
        send_message(sock, request, [eventfd] if trip % 10 == 0 else ())
        data, _fds, _ = receive_chunk(sock)
        if len(data) < 20:   # a reply split in two reads: finish it
            data += receive_chunk(sock)[0]
    elapsed = time.perf_counter() - started
    sock.close()
    os.close(eventfd)
    return elapsed / trips * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--trips", type=int, default=2000)
    parser.add_argument("--cpu", type=int, default=0)
    parser.add_argument("--no-capture", action="store_true", help="measure the proxy without -w")
    args = parser.parse_args()
    direct, through = direct_and_through(ECHO_BACKEND, args.cpu, args.rounds,
                                         lambda path: round_trips(path, args.trips), capture=not args.no_capture)
    d, p = statistics.median(direct), statistics.median(through)
    print(f"direct            {d:7.1f} µs per round trip   (rounds: {', '.join(f'{x:.1f}' for x in direct)})")
    print(f"through the proxy {p:7.1f} µs per round trip   (rounds: {', '.join(f'{x:.1f}' for x in through)})"
          f"{'' if args.no_capture else ', capture on'}")
    print(f"proxy adds {p - d:.1f} µs, {p / d:.2f}x direct   (targets: at most +20 µs and 3.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
