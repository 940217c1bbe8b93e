"""Soak: many request/reply pairs through the proxy with the live display on, beside 1,024 open connections.

The proxy runs as `vhusniff proxy` (live display to /dev/null, no capture) with the common soft open-file
limit of 1,024, in front of the echo back-end (benchmarks/echo_backend.py). First 1,024 connections each make
a round trip and stay open; then one connection makes --pairs round trips (a 20-byte request and reply),
timed one by one, and the same number goes to the back-end directly. Prints the proxy's RSS at the start,
with the connections open and at the end, p50 and p99 latency through the proxy and direct, and the ratios.
Pin to one core for latency (a cross-core wake-up costs ~35 µs here): everything runs on --cpu.

    python3 benchmarks/bench_soak.py                 # 1,000,000 pairs
    python3 benchmarks/bench_soak.py --pairs 100000  # quick
"""
import argparse
import array
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUEST = struct.pack("<III", 1, 1, 8) + struct.pack("<Q", 0)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


def round_trip(sock: socket.socket) -> None:
    sock.sendall(REQUEST)
    got = 0
    while got < 20:
        chunk = sock.recv(20 - got)
        if not chunk:
            raise SystemExit("the connection closed")
        got += len(chunk)


def latencies(path: str, pairs: int) -> array.array:
    """µs per round trip, each timed."""
    sock = connect(path)
    for _ in range(200):
        round_trip(sock)
    times = array.array("d", bytes(8 * pairs))
    clock = time.perf_counter
    for index in range(pairs):
        started = clock()
        round_trip(sock)
        times[index] = (clock() - started) * 1e6
    sock.close()
    return times


def percentile(sorted_values, fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * fraction))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--connections", type=int, default=1024)
    parser.add_argument("--cpu", type=int, default=0)
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.cpu})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))     # this process holds every client
    proxy_soft = min(1024, hard)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    pin = ["taskset", "-c", str(args.cpu)]
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as scratch:
        backend_path, proxy_path = f"{scratch}/backend.sock", f"{scratch}/proxy.sock"
        backend = subprocess.Popen(pin + [sys.executable, str(ROOT / "benchmarks" / "echo_backend.py"),
                                          backend_path], env=env, stdout=subprocess.PIPE, text=True)
        backend.stdout.readline()
        proxy = subprocess.Popen(
            pin + [sys.executable, "-m", "vhusniff.cli.main", "proxy", "--color", "never", "--listen", proxy_path,
                   "--backend", backend_path], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (proxy_soft, hard)))
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists(proxy_path):
                if time.monotonic() > deadline or proxy.poll() is not None:
                    raise SystemExit("the proxy did not start")
                time.sleep(0.02)
            rss_start = rss_mib(proxy.pid)
            started = time.perf_counter()
            clients = [connect(proxy_path) for _ in range(args.connections)]
            for client in clients:
                round_trip(client)
            connect_seconds = time.perf_counter() - started
            rss_connections = rss_mib(proxy.pid)
            direct = sorted(latencies(backend_path, args.pairs))
            started = time.perf_counter()
            through = sorted(latencies(proxy_path, args.pairs))
            through_seconds = time.perf_counter() - started
            rss_end = rss_mib(proxy.pid)
            for client in clients:
                client.close()
            alive = proxy.poll() is None
        finally:
            proxy.terminate()
            _out, errors = proxy.communicate(timeout=60)
            backend.kill()
            backend.wait()
    raised = [line for line in errors.splitlines() if "open-file limit" in line]
    print(f"{args.connections} concurrent connections, one round trip each: {connect_seconds:.2f} s"
          + (f"; {raised[0].split(': ', 1)[1]}" if raised else ""))
    print(f"{args.pairs} pairs through the proxy (live display on): {through_seconds:.1f} s")
    print(f"proxy RSS: start {rss_start:.1f} MiB, with {args.connections} connections {rss_connections:.1f} MiB, "
          f"end {rss_end:.1f} MiB")
    for name, fraction in (("p50", 0.5), ("p99", 0.99)):
        d, p = percentile(direct, fraction), percentile(through, fraction)
        print(f"{name}: direct {d:6.1f} µs, through the proxy {p:6.1f} µs   (+{p - d:.1f} µs, {p / d:.2f}x)")
    if not alive:
        print("the proxy died during the run", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
