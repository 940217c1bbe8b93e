"""`vhusniff read` throughput and memory on a 1,000,000-message capture, with the struct floor in the same run.

    python3 benchmarks/bench_read.py [--messages N] [--small N] [--only read,filter,verbose]

The capture (benchmarks/distinct_sessions.py) holds reconnecting vIOMMU sessions, every message distinct: no cache
keyed by bytes helps, so this is the per-message cost. The cycled mix (the same
session's messages repeated over four connections, what a line cache hits every time) is the second line.
Each measurement runs in its own process (pinned to one core) so that its peak RSS is its own; rates are per
CPU second of that process (a busy machine stretches wall time, not CPU time), wall time printed beside:
  - floor:   struct only: EPB headers, pseudo-header and vhost-user header unpacked, nothing formatted;
  - read:    `vhusniff read FILE > /dev/null`;
  - filter:  `vhusniff read FILE -Y 'request == SET_VRING_ADDR && vring.index == 1' > /dev/null`;
  - verbose: `vhusniff read FILE -V > /dev/null` (on the small capture: it writes ten times the bytes).
Targets (issue 16): read >= 200,000 msg/s, read -Y >= 150,000, read -V >= 50,000; peak memory flat.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from struct_floor import measure_floor  # noqa: E402

FILTER = "request == SET_VRING_ADDR && vring.index == 1"
TARGETS = {"read": 200_000, "filter": 150_000, "verbose": 50_000}


def build_capture(path: str, messages: int, distinct: bool) -> str:
    """The distinct capture (distinct_sessions.py), or the session's messages cycled over four connections."""
    if distinct:
        from distinct_sessions import build_distinct_capture
        return build_distinct_capture(path, messages)
    from message_mix import capture_mix
    from vhusniff.capture.pcapng import CaptureWriter
    from vhusniff.model import Direction, Record
    source, mix = capture_mix()
    with CaptureWriter(path) as writer:
        for number, (channel, raw) in zip(range(messages), itertools.cycle(mix)):
            direction = Direction.BACKEND_TO_FRONTEND if raw[4] & 4 else Direction.FRONTEND_TO_BACKEND
            writer.write(Record(1_700_000_000_000_000_000 + number * 1000, 1 + number // len(mix) % 4, channel,
                                direction, raw))
    return f"{source}, cycled over four connections"


def _command(arguments: list[str]) -> int:
    """Run `vhusniff read ARGUMENTS` in this process, its output to /dev/null; the number of records read."""
    from vhusniff.cli.main import main as vhusniff_main
    saved = sys.stdout
    with open(os.devnull, "w") as sys.stdout:
        try:
            status = vhusniff_main(["read", "-q", *arguments])
        finally:
            sys.stdout = saved
    if status:
        raise SystemExit(f"vhusniff read {' '.join(arguments)}: exit status {status}")
    return _records(arguments[0])


def _records(path: str) -> int:
    from vhusniff.capture.scan import scan
    return sum(1 for _ in scan(path))


MEASURES = {
    "floor": measure_floor,
    "read": lambda path: _command([path]),
    "filter": lambda path: _command([path, "-Y", FILTER]),
    "verbose": lambda path: _command([path, "-V"]),
}


def child(what: str, path: str) -> None:
    """Run one measurement in this process and print its result as JSON (counting records is not timed)."""
    count = _records(path) if what != "floor" else 0
    if what != "floor":
        import vhusniff.cli.main  # noqa: F401  (imported before the clock starts, as the floor imports nothing)
    function = MEASURES[what]
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    counted = function(path)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    print(json.dumps({"count": count or counted, "seconds": cpu, "wall": wall, "peak_kib": after.ru_maxrss}))


def run_child(what: str, path: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", what, path]
    if os.path.exists("/usr/bin/taskset"):
        command = ["taskset", "-c", "0"] + command
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _rate(result: dict) -> float:
    return result["count"] / result["seconds"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--only", default="read,filter,verbose", help="which commands to measure")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    commands = [what for what in args.only.split(",") if what in TARGETS]
    failed = []
    with tempfile.TemporaryDirectory() as directory:
        for distinct in (True, False):
            print("distinct messages" if distinct else "cycled mix (a line cache hits)")
            results = {}
            for label, messages in (("small", args.small), ("large", args.messages)):
                path = os.path.join(directory, f"{label}-{distinct}.pcapng")
                source = build_capture(path, messages, distinct)
                results[label] = {"floor": run_child("floor", path)}
                for what in commands:
                    if what == "verbose" and label == "large":
                        continue
                    results[label][what] = run_child(what, path)
                os.unlink(path)
            print(f"  capture: {source}")
            for label, messages in (("small", args.small), ("large", args.messages)):
                result = results[label]
                floor_rate = _rate(result["floor"])
                print(f"  {messages:>9,} records: floor {floor_rate:>11,.0f} msg/s")
                for what in commands:
                    if what not in result:
                        continue
                    rate = _rate(result[what])
                    met = rate >= TARGETS[what]
                    if distinct and not met and what not in failed:
                        failed.append(what)
                    print(f"    {what:<8} {rate:>9,.0f} msg/s  ratio to floor {rate / floor_rate:.3f}  "
                          f"wall {result[what]['wall']:6.2f} s  "
                          f"peak RSS {result[what]['peak_kib'] / 1024:6.1f} MiB (floor "
                          f"{result['floor']['peak_kib'] / 1024:.1f})  target {TARGETS[what]:,}: "
                          f"{'met' if met else 'NOT met'}")
            for what in commands:
                if what in results["large"]:
                    growth = results["large"][what]["peak_kib"] / results["small"][what]["peak_kib"]
                    print(f"  {what} peak memory large/small: {growth:.2f} ({'flat' if growth < 1.2 else 'GROWS'})")
    print("targets on distinct messages: " + ("all met" if not failed else "NOT met: " + ", ".join(failed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
