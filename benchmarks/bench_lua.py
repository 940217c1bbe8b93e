"""The Lua dissector's speed in tshark, against tshark without it, on a capture of distinct messages.

    python3 benchmarks/bench_lua.py [--messages N] [--rounds N] [--capture FILE]

Builds the distinct-message capture the read benchmarks use (benchmarks/distinct_sessions.py: reconnecting vIOMMU
sessions, every message different), then times whole tshark processes reading it, variants interleaved, best of
--rounds:
  - floor:     tshark with the dissector loaded but the protocol disabled (`--disable-protocol vhost_user`): the
               same start-up, frames read and listed, nothing dissected;
  - dissector: `tshark -X lua_script:dissectors/vhost_user.lua -r FILE` (the packet list: columns, no tree);
  - tagged:    the same on the same records written as two tagged captures (two sources, each numbering its
               connections from 1) merged by mergecap: connections keyed by the pseudo-header's source tag;
  - tree:      the same as dissector with -V (every field in the tree, printed).
Each line gives messages per second of wall time and of CPU time (user + system of the tshark process: on a busy
machine the wall clock also counts other processes' turns), and the ratio to the floor.
Target (issue #16): the dissector at least 30,000 messages/s.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
DISSECTOR = os.path.join(ROOT, "dissectors", "vhost_user.lua")
BOOT_CAPTURE = os.path.join(ROOT, "captures", "qemu-blk-boot.pcapng")
TARGET = 30_000

# variant -> (which capture, tshark options)
VARIANTS = {
    "floor": ("plain", ["--disable-protocol", "vhost_user"]),
    "dissector": ("plain", []),
    "tagged": ("tagged", []),
    "tree": ("plain", ["-V"]),
}


def run_tshark(dissector: str, path: str, extra: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one tshark process reading the whole file, its output discarded."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(os.devnull, "w") as sink:
        result = subprocess.run(["tshark", "-X", f"lua_script:{dissector}", "-r", path, *extra], stdout=sink,
                                stderr=subprocess.PIPE, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0 or "Lua Error" in result.stderr:
        sys.exit(f"tshark failed on {path}: {result.stderr.strip()}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def tagged_merge(path: str, scratch: str) -> str:
    """The capture's records as two hosts would write them (alternate connections, each host numbering its own
    from 1, every record tagged with its host's source), merged by mergecap."""
    from vhusniff.capture.pcapng import CaptureWriter, read_capture
    halves = [os.path.join(scratch, f"host-{name}.pcapng") for name in "ab"]
    writers = [CaptureWriter(half, source=f"host=host-{name} pid=1 start=2026-01-01T00:00:00Z")
               for half, name in zip(halves, "ab", strict=True)]
    with writers[0], writers[1]:
        for record in read_capture(path):
            writer = writers[(record.connection - 1) % 2]
            record.connection = (record.connection - 1) // 2 + 1
            writer.write(record)
    merged = os.path.join(scratch, "tagged.pcapng")
    subprocess.run(["mergecap", "-w", merged, *halves], check=True)
    return merged


def frames_in(path: str) -> int:
    from vhusniff.capture.pcapng import read_capture
    return sum(1 for _record in read_capture(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--capture", help="an existing capture to read instead of building one")
    args = parser.parse_args(argv)
    if shutil.which("tshark") is None or shutil.which("mergecap") is None:
        sys.exit("tshark and mergecap must be installed")
    with tempfile.TemporaryDirectory() as scratch:
        # a copy, so that regenerating the checked-in dissector meanwhile cannot change what is measured
        dissector = shutil.copy(DISSECTOR, os.path.join(scratch, "vhost_user.lua"))
        check = subprocess.run(["tshark", "-X", f"lua_script:{dissector}", "-r", BOOT_CAPTURE, "-c", "3"],
                               capture_output=True, text=True, check=False)
        if "vhost-user" not in check.stdout:
            sys.exit(f"the dissector did not load: {check.stderr.strip()}")
        path = args.capture
        if path is None:
            from distinct_sessions import build_distinct_capture
            path = os.path.join(scratch, "distinct.pcapng")
            print("capture:", build_distinct_capture(path, args.messages))
        frames = frames_in(path)
        captures = {"plain": path, "tagged": tagged_merge(path, scratch)}
        if frames_in(captures["tagged"]) != frames:
            sys.exit("the tagged capture does not hold the same records")
        best: dict[str, tuple[float, float]] = {}
        for _round in range(args.rounds):
            for name, (capture, extra) in VARIANTS.items():
                wall, cpu = run_tshark(dissector, captures[capture], extra)
                old_wall, old_cpu = best.get(name, (wall, cpu))
                best[name] = (min(wall, old_wall), min(cpu, old_cpu))
    floor_wall, floor_cpu = best["floor"]
    print(f"{frames:,} frames, best of {args.rounds} rounds, variants interleaved")
    for name, (wall, cpu) in best.items():
        print(f"  {name:<10} {frames / wall:>10,.0f} frames/s wall ({wall:6.2f} s, x{wall / floor_wall:5.1f} floor)"
              f"   {frames / cpu:>10,.0f} frames/s CPU ({cpu:6.2f} s, x{cpu / floor_cpu:5.1f} floor)")
    wall, cpu = best["dissector"]
    verdicts = [f"{'met' if frames / seconds >= TARGET else 'missed'} on {clock}"
                for clock, seconds in (("the wall clock", wall), ("CPU time", cpu))]
    load = os.getloadavg()[0]
    print(f"target {TARGET:,} messages/s for the dissector: {', '.join(verdicts)} (load average {load:.1f} on "
          f"{os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
