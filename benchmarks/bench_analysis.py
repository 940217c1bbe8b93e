"""The analysis commands on 100,000 and 1,000,000 distinct messages: wall time, msg/s and peak RSS, with the floor.

    python3 benchmarks/bench_analysis.py [--messages N] [--small N] [--only stats,expert,...]

The captures (benchmarks/distinct_sessions.py) hold reconnecting vIOMMU sessions in which every request is distinct
(IOTLB updates and misses, SET_VRING_ADDR with moving rings, config windows), with a misaligned ring address now and
then: findings that grow with the capture. Each measurement runs in its own process (pinned to one core), so that
its peak RSS and CPU time are its own (msg/s is printed by wall time and, for a machine shared with other work, by
CPU time). The parent imports nothing of vhusniff and builds the captures in a child too, so that the ru_maxrss a
child inherits from its parent at fork stays below what the child itself uses; VmHWM (the child's own high-water
mark after exec) is printed beside it:
  - floor:    a plain scan of the file with struct (block, packet and vhost-user headers), in the same run;
  - stats, expert, report, `state --at` (the middle record), timeline (an SVG), diff (the capture against itself:
    two files read, its msg/s counts the messages of one).
Targets (issue 16): at most 150 MiB peak, flat from the small to the large capture, at least 200,000 msg/s.
"""
from __future__ import annotations

import argparse
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

COMMANDS = ("stats", "expert", "report", "state", "timeline", "diff")
PEAK_TARGET_MIB = 150
RATE_TARGET = 200_000


def _arguments(what: str, path: str, records: int, directory: str) -> list[str]:
    if what == "state":
        return ["state", path, "--at", str(records // 2)]
    if what == "timeline":
        return ["timeline", path, "-o", os.path.join(directory, "timeline.svg")]
    if what == "diff":
        return ["diff", path, path]
    return [what, path]


def child(what: str, path: str, records: int) -> None:
    """Run one measurement in this process and print its result as JSON."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_start = usage.ru_utime + usage.ru_stime
    start = time.perf_counter()
    if what == "build":
        from distinct_sessions import build_distinct_capture
        description = build_distinct_capture(path, records)
        print(json.dumps({"description": description, **_records(path)}))
        return
    if what == "floor":
        measure_floor(path)
        extra = {}
    else:
        from vhusniff.cli.main import main as vhusniff_main
        with tempfile.TemporaryDirectory() as directory:
            saved = sys.stdout
            with open(os.devnull, "w") as sys.stdout:
                try:
                    status = vhusniff_main([*_arguments(what, path, records, directory), "-q"])
                finally:
                    sys.stdout = saved
            svg = os.path.join(directory, "timeline.svg")
            extra = {"svg_bytes": os.path.getsize(svg)} if os.path.exists(svg) else {}
        if status not in (0, 1):            # diff says 1 when there are differences, expert never fails
            raise SystemExit(f"vhusniff {what}: exit status {status}")
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - cpu_start
    print(json.dumps({"seconds": seconds, "cpu": cpu, "peak_kib": usage.ru_maxrss, "hwm_kib": _high_water_kib(),
                      **extra}))


def _high_water_kib() -> int:
    """This process's own peak RSS since exec (VmHWM), in KiB; 0 where /proc does not say."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_child(what: str, path: str, records: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", what, path, str(records)]
    if os.path.exists("/usr/bin/taskset"):
        command = ["taskset", "-c", "0"] + command
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _records(path: str) -> dict[str, int]:
    """How many records and messages the capture holds."""
    from vhusniff.capture.pcapng import read_capture
    from vhusniff.model import RecordKind
    records = messages = 0
    for record in read_capture(path):
        records += 1
        messages += record.kind == RecordKind.MESSAGE
    return {"records": records, "messages": messages}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--only", default=",".join(COMMANDS), help="which commands to measure")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return 0
    commands = [what for what in args.only.split(",") if what in COMMANDS]
    sizes = (("small", args.small), ("large", args.messages))
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as directory:
        for label, messages in sizes:
            path = os.path.join(directory, f"{label}.pcapng")
            built = run_child("build", path, messages)
            print(f"{label}: {built['description']}, {os.path.getsize(path) / 1e6:.0f} MB", flush=True)
            records, counted = built["records"], built["messages"]
            results[label] = {"messages": counted, "floor": run_child("floor", path, records)}
            for what in commands:
                results[label][what] = run_child(what, path, records)
                result = results[label][what]
                print(f"  {what:<9}{result['seconds']:>8.1f} s {counted / result['seconds']:>10,.0f} msg/s "
                      f"({counted / result['cpu']:,.0f} by CPU time)  peak {result['peak_kib'] / 1024:>6.1f} MiB "
                      f"(VmHWM {result['hwm_kib'] / 1024:.1f})",
                      flush=True)
    failed = []
    print(f"\n{'':<10}{'':>10}{'wall s':>9}{'msg/s':>10}{'x floor':>9}{'CPU s':>8}{'msg/s':>10}{'x floor':>9}"
          f"{'peak MiB':>10}{'VmHWM':>8}")
    for label, messages in sizes:
        floor = results[label]["floor"]
        counted = results[label]["messages"]
        floor_rate, floor_cpu_rate = counted / floor["seconds"], counted / floor["cpu"]
        print(f"{'floor':<10}{messages:>10,}{floor['seconds']:>9.2f}{floor_rate:>10,.0f}{1:>9.2f}"
              f"{floor['cpu']:>8.2f}{floor_cpu_rate:>10,.0f}{1:>9.2f}{floor['peak_kib'] / 1024:>10.1f}"
              f"{floor['hwm_kib'] / 1024:>8.1f}")
        for what in commands:
            result = results[label][what]
            rate, cpu_rate = counted / result["seconds"], counted / result["cpu"]
            svg = f"  SVG {result['svg_bytes'] / 1e6:.1f} MB" if "svg_bytes" in result else ""
            print(f"{what:<10}{messages:>10,}{result['seconds']:>9.2f}{rate:>10,.0f}{rate / floor_rate:>9.3f}"
                  f"{result['cpu']:>8.2f}{cpu_rate:>10,.0f}{cpu_rate / floor_cpu_rate:>9.3f}"
                  f"{result['peak_kib'] / 1024:>10.1f}{result['hwm_kib'] / 1024:>8.1f}{svg}")
    for what in commands:
        small, large = results["small"][what], results["large"][what]
        growth = large["peak_kib"] / small["peak_kib"]
        rate = results["large"]["messages"] / min(large["seconds"], large["cpu"])
        peak = large["peak_kib"] / 1024
        verdict = [f"peak {peak:.1f} MiB {'<=' if peak <= PEAK_TARGET_MIB else '>'} {PEAK_TARGET_MIB}",
                   f"large/small {growth:.2f} ({'flat' if growth < 1.2 else 'GROWS'})",
                   f"{rate:,.0f} msg/s ({'met' if rate >= RATE_TARGET else 'NOT met'}: {RATE_TARGET:,})"]
        if peak > PEAK_TARGET_MIB or growth >= 1.2 or rate < RATE_TARGET:
            failed.append(what)
        print(f"{what:<10}" + "; ".join(verdict))
    print("targets: " + ("all met" if not failed else "not met by " + ", ".join(failed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
