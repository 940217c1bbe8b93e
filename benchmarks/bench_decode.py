"""Decoding and framing throughput, with the struct floor measured in the same run.

    python3 benchmarks/bench_decode.py [--seconds S]

Pinned to one core. Targets (issue 2): decode >= 150,000 messages/s, framing >= 1,000,000 messages/s.
"""
from __future__ import annotations

import argparse
import os
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from message_mix import capture_mix  # noqa: E402
from vhusniff.protocol.framing import Framer  # noqa: E402
from vhusniff.protocol.grammar import PAYLOADS, decode  # noqa: E402


def _struct_format(kind):
    """A flat struct format for a fixed-size payload kind (nested/variable kinds: the bytes as one field)."""
    from construct import Bytes, BytesInteger, FormatField, Renamed
    structure = PAYLOADS[kind][0]
    parts = []
    for sub in structure.subcons:
        inner = sub
        while isinstance(inner, Renamed):
            inner = inner.subcon
        if isinstance(inner, FormatField):
            parts.append(inner.fmtstr.lstrip("<"))
        elif isinstance(inner, (Bytes, BytesInteger)) and isinstance(inner.length, int):
            parts.append(f"{inner.length}s")
        else:
            return None
    return struct.Struct("<" + "".join(parts))


def struct_floor_decoder(mix):
    """The practical floor: struct header + one precompiled struct per payload kind, dict dispatch, tuples out."""
    header = struct.Struct("<III").unpack_from
    formats = {}
    for channel, raw in mix:
        request, flags, size = header(raw)
        is_reply = bool(flags & 4)
        kind = decode(raw, channel).kind
        formats[(channel, request, is_reply)] = (kind and _struct_format(kind)) or struct.Struct(f"<{size}s")

    def decode_floor(channel, raw):
        request, flags, size = header(raw)
        return request, flags, size, formats[(channel, request, bool(flags & 4))].unpack_from(raw, 12)
    return decode_floor


def rate(function, items, seconds):
    count, start = 0, time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for channel, raw in items:
            function(channel, raw)
        count += len(items)
    return count / (time.perf_counter() - start)


def framing_rate(stream, messages_per_stream, seconds):
    count, start = 0, time.perf_counter()
    deadline = start + seconds
    chunk = 65536
    while time.perf_counter() < deadline:
        framer = Framer("bench")
        for position in range(0, len(stream), chunk):
            framer.feed(stream[position:position + chunk])
        count += messages_per_stream
    return count / (time.perf_counter() - start)


def framing_floor_rate(stream, messages_per_stream, seconds):
    size_at = struct.Struct("<I").unpack_from
    count, start = 0, time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        position, end, out = 0, len(stream), []
        while position < end:
            total = 12 + size_at(stream, position + 8)[0]
            out.append(stream[position:position + total])
            position += total
        count += messages_per_stream
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    os.sched_setaffinity(0, {0})
    source, mix = capture_mix()
    floor = struct_floor_decoder(mix)
    decoded = rate(lambda channel, raw: decode(raw, channel), mix, args.seconds)
    floor_rate = rate(floor, mix, args.seconds)
    print(f"message mix: {len(mix)} messages from {source}")
    print(f"decode (grammar, structured value): {decoded:>12,.0f} msg/s  {1e6 / decoded:6.2f} µs/msg")
    print(f"decode floor (struct, dict dispatch): {floor_rate:>10,.0f} msg/s  {1e6 / floor_rate:6.2f} µs/msg")
    print(f"ratio floor/grammar: {floor_rate / decoded:.1f}x   target >= 150,000 msg/s: "
          f"{'met' if decoded >= 150_000 else 'NOT met'}")
    stream = b"".join(raw for _channel, raw in mix) * 200
    framed = framing_rate(stream, len(mix) * 200, args.seconds)
    framed_floor = framing_floor_rate(stream, len(mix) * 200, args.seconds)
    print(f"framing (Framer, 64 KiB chunks): {framed:>15,.0f} msg/s")
    print(f"framing floor (bare size walk): {framed_floor:>16,.0f} msg/s")
    print(f"ratio floor/framer: {framed_floor / framed:.1f}x   target >= 1,000,000 msg/s: "
          f"{'met' if framed >= 1_000_000 else 'NOT met'}")


if __name__ == "__main__":
    main()
