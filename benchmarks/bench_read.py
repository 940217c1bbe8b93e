"""`vhusniff read` throughput and memory: summarise a 1,000,000-message capture, with the struct floor.

    python3 benchmarks/bench_read.py [--messages N] [--small N]

Builds captures of the realistic message mix (benchmarks/message_mix.py: a shipped capture, or QEMU 7.2's boot),
cycled over four connections, with timestamps 1 µs apart. Each measurement runs in its own process (pinned to one
core) so that its peak RSS is its own. Measures:
  - floor: struct only: EPB headers, pseudo-header and vhost-user header unpacked, nothing formatted;
  - read:  `vhusniff read FILE > /dev/null`'s summary path (vhusniff.views.fast.fast_summary), lines formatted and
           written. Distinct records are decoded by the full grammar once and their line cached; the hit rate is
           printed, because a capture of all-distinct messages would decode every one (see --distinct).
Target (issue): read >= 200,000 messages/s, peak memory flat from the small to the large capture.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def build_capture(path: str, messages: int, distinct: bool) -> str:
    from message_mix import capture_mix
    from vhusniff.capture.pcapng import CaptureWriter
    from vhusniff.model import Direction, Record
    source, mix = capture_mix()
    with CaptureWriter(path) as writer:
        for number, (channel, raw) in zip(range(messages), itertools.cycle(mix)):
            if distinct and len(raw) >= 20:      # make every payload unique: a worst case for the line cache
                raw = raw[:12] + struct.pack("<I", number) + raw[16:]
            direction = Direction.BACKEND_TO_FRONTEND if raw[4] & 4 else Direction.FRONTEND_TO_BACKEND
            writer.write(Record(1_700_000_000_000_000_000 + number * 1000, 1 + number // len(mix) % 4, channel,
                                direction, raw))
    return source


def measure_floor(path: str) -> int:
    """Struct floor: every EPB's block header, EPB fields, pseudo-header and vhost-user header unpacked."""
    block, epb = struct.Struct("<II").unpack_from, struct.Struct("<IIIII").unpack_from
    pseudo, header = struct.Struct("<4sHHIBBBBHH").unpack_from, struct.Struct("<III").unpack_from
    count = 0
    with open(path, "rb") as stream:
        buffer, position = b"", 0
        while True:
            if len(buffer) - position < 8 or len(buffer) - position < block(buffer, position)[1]:
                more = stream.read(1 << 20)
                if not more:
                    return count
                buffer, position = buffer[position:] + more, 0
                continue
            block_type, total = block(buffer, position)
            if block_type == 6:
                _interface, _high, _low, captured, _original = epb(buffer, position + 8)
                fields = pseudo(buffer, position + 28)
                if captured >= fields[2] + 12:
                    header(buffer, position + 28 + fields[2])
                count += 1
            position += total


def measure_read(path: str) -> int:
    from vhusniff.protocol.context import ContextTracker
    from vhusniff.views.fast import fast_summary
    with open(os.devnull, "w") as out:
        return fast_summary(path, ContextTracker(), out)


def child(what: str, path: str) -> None:
    """Run one measurement in this process and print its result as JSON."""
    function = {"floor": measure_floor, "read": measure_read}[what]
    start = time.perf_counter()
    count = function(path)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"count": count, "seconds": seconds, "peak_kib": peak_kib}))


def run_child(what: str, path: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", what, path]
    if os.path.exists("/usr/bin/taskset"):
        command = ["taskset", "-c", "0"] + command
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--distinct", action="store_true", help="make every message's bytes unique (no cache hits)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    with tempfile.TemporaryDirectory() as directory:
        results = {}
        for label, messages in (("small", args.small), ("large", args.messages)):
            path = os.path.join(directory, f"{label}.pcapng")
            source = build_capture(path, messages, args.distinct)
            results[label] = {what: run_child(what, path) for what in ("floor", "read")}
            results[label]["size"] = os.path.getsize(path)
    print(f"message mix: {source}{' (every message made distinct)' if args.distinct else ''}")
    for label, messages in (("small", args.small), ("large", args.messages)):
        result = results[label]
        floor_rate = result["floor"]["count"] / result["floor"]["seconds"]
        read_rate = result["read"]["count"] / result["read"]["seconds"]
        print(f"{messages:>9,} messages ({result['size'] / 1e6:.0f} MB): floor {floor_rate:>11,.0f} msg/s  "
              f"read+summarise {read_rate:>9,.0f} msg/s  ratio to floor {read_rate / floor_rate:.2f}  "
              f"peak RSS floor {result['floor']['peak_kib'] / 1024:.1f} MiB, "
              f"read {result['read']['peak_kib'] / 1024:.1f} MiB")
    large_rate = results["large"]["read"]["count"] / results["large"]["read"]["seconds"]
    growth = results["large"]["read"]["peak_kib"] / results["small"]["read"]["peak_kib"]
    print(f"target >= 200,000 msg/s: {'met' if large_rate >= 200_000 else 'NOT met'} ({large_rate:,.0f}); "
          f"peak memory large/small: {growth:.2f} ({'flat' if growth < 1.2 else 'GROWS'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
