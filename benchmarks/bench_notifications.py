"""What --notifications (and --rings) cost: a kick and its call through the proxy, and a real guest's I/O.

1. Notification round trip, all on one core: a front-end writes a kick eventfd and waits on a call eventfd that
a back-end process writes as soon as it reads the kick, straight and through `vhusniff proxy --notifications`
(the proxy relays both eventfds through its own), interleaved in rounds. Prints µs per kick+call and the ratio.

2. Guest I/O: the guest (QEMU 7.2, TCG) writes 1 MiB to its vhost-user-blk disk with fsync, drops its caches and
reads it back, over and over for --seconds; the host notes when each `round K ok` line arrives, and a round's time
is the gap between two such lines. Variants, interleaved round by round so that drift does not favour one:
  proxy          through the proxy, capture written (the baseline)
  notifications  the same with --notifications (every kick and call relayed through the proxy's eventfds)
  rings          the same with --rings --notifications (samples every 0.2 s, guest memory mapped read-only)
  direct         QEMU straight against qemu-storage-daemon (no proxy at all), for scale
Prints the median round time of each and its ratio to the baseline.

    python3 benchmarks/bench_notifications.py [--rounds 3] [--seconds 12] [--trips 5000] [--no-guest]
"""
import argparse
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy_pair import direct_and_through  # noqa: E402

from vhusniff.engine.sockio import send_message  # noqa: E402
from vhusniff.lab import peers as lab  # noqa: E402
from vhusniff.lab.command import run_lab  # noqa: E402

# A back-end that answers each kick with a call: SET_VRING_CALL (13) and SET_VRING_KICK (12) give it the fds.
NOTIFY_BACKEND = r"""
import os, select, socket, struct, sys
from vhusniff.engine.sockio import receive_chunk
server = socket.socket(socket.AF_UNIX); server.bind(sys.argv[1]); server.listen(8)
print("ready", flush=True)
while True:
    client, _ = server.accept()
    fds = {}
    while len(fds) < 2:
        data, passed, _ = receive_chunk(client)
        if not data:        # the proxy looking whether the back-end still listens: a connect, then a close
            break
        fds[struct.unpack_from("<I", data)[0]] = passed[0]
    if len(fds) < 2:
        client.close(); [os.close(fd) for fd in fds.values()]
        continue
    kick, call = fds[12], fds[13]
    while True:
        select.select([kick], [], [])       # the proxy's eventfds are non-blocking, as QEMU's are
        count = os.eventfd_read(kick)
        if count >= 1 << 20:
            break
        os.eventfd_write(call, count)
    client.close(); os.close(kick); os.close(call)
"""
_STOP = 1 << 30          # a kick value that tells the back-end the round is over


def notification_trips(path: str, trips: int) -> float:
    """µs per kick and the call that answers it, over `trips` (after a warm-up)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    kick, call = os.eventfd(0), os.eventfd(0)
    for request, fd in ((13, call), (12, kick)):
        send_message(sock, struct.pack("<IIIQ", request, 1, 8, 0), [fd])
    for trip in range(trips + 100):
        if trip == 100:
            started = time.perf_counter()
        os.eventfd_write(kick, 1)
        os.eventfd_read(call)
    elapsed = time.perf_counter() - started
    os.eventfd_write(kick, _STOP)
    sock.close()
    os.close(kick)
    os.close(call)
    return elapsed / trips * 1e6


def relay_benchmark(rounds: int, trips: int, cpu: int) -> None:
    direct, through = direct_and_through(NOTIFY_BACKEND, cpu, rounds, lambda path: notification_trips(path, trips),
                                         ["--notifications"])
    d, p = statistics.median(direct), statistics.median(through)
    print(f"kick+call direct                 {d:7.1f} µs   (rounds: {', '.join(f'{x:.1f}' for x in direct)})")
    print(f"kick+call through --notifications {p:6.1f} µs   (rounds: {', '.join(f'{x:.1f}' for x in through)})")
    print(f"the relay adds {p - d:.1f} µs per kick and call, {p / d:.2f}x direct\n", flush=True)

VARIANTS = {
    "proxy": {},
    "notifications": {"notifications": True},
    "rings": {"rings": True, "notifications": True},
}


class RoundClock:
    """Host times of the guest's `round K ok` lines."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def line(self, text: str) -> None:
        if text.startswith(f"{lab.GUEST_MARK} round ") and text.endswith(" ok"):
            self.times.append(time.monotonic())

    def round_seconds(self) -> list[float]:
        # The first round also waits for the page cache and the device to warm up: leave it out.
        return [b - a for a, b in zip(self.times[1:], self.times[2:], strict=False)]


def through_proxy(workdir: Path, seconds: int, options: dict) -> list[float]:
    clock = RoundClock()
    run = run_lab(workdir, "blk", capture_path=workdir / "bench.pcapng", report=lambda text: None,
                  on_console_line=clock.line, data_plane=options, kernel_args=lab.loop_kernel_args(seconds),
                  timeout=seconds + 90)
    if not run.result.clean_exit or " 0 failed" not in run.result.console:
        raise SystemExit(f"guest through the proxy ({options}) failed:\n{run.result.console}")
    return clock.round_seconds()


def direct(workdir: Path, seconds: int) -> list[float]:
    clock = RoundClock()
    result = lab.run_direct(workdir, timeout=seconds + 90, on_console_line=clock.line,
                            kernel_args=lab.loop_kernel_args(seconds))
    if not result.clean_exit or " 0 failed" not in result.console:
        raise SystemExit(f"direct guest failed:\n{result.console}")
    return clock.round_seconds()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="boots of each variant (default 3)")
    parser.add_argument("--seconds", type=int, default=12, help="seconds of guest I/O per boot (default 12)")
    parser.add_argument("--trips", type=int, default=5000, help="kick+call round trips per round (default 5000)")
    parser.add_argument("--cpu", type=int, default=0, help="the core of the round-trip part (default 0)")
    parser.add_argument("--no-guest", action="store_true", help="only the round-trip part")
    args = parser.parse_args()
    relay_benchmark(max(args.rounds, 5), args.trips, args.cpu)
    if args.no_guest:
        return 0
    lab.prepare()
    names = [*VARIANTS, "direct"]
    rounds: dict[str, list[float]] = {name: [] for name in names}
    for turn in range(args.rounds):
        order = names[turn % len(names):] + names[:turn % len(names)]
        for name in order:
            with tempfile.TemporaryDirectory(prefix="bench-notify-") as scratch:
                workdir = Path(scratch)
                got = direct(workdir, args.seconds) if name == "direct" else \
                    through_proxy(workdir, args.seconds, VARIANTS[name])
            rounds[name] += got
            print(f"boot {turn + 1} {name:<13} {len(got):3d} rounds, median {statistics.median(got) * 1e3:7.1f} ms",
                  flush=True)
    baseline = statistics.median(rounds["proxy"])
    print(f"\nmedian time per 1 MiB write+fsync+readback round (guest I/O), {args.rounds} boot(s) each:")
    for name in names:
        median = statistics.median(rounds[name])
        print(f"  {name:<13} {median * 1e3:7.1f} ms  ({len(rounds[name])} rounds)  {median / baseline:.3f}x the proxy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
