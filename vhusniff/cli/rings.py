"""`vhusniff rings CAPTURE`: the rings of each connection over time, from the ring samples `--rings` recorded.

Text: one table per connection and ring (time, why sampled, avail and used indexes, in flight, kicks, calls).
`-T json`: a list of samples, each with connection, ring, time, avail_idx, used_idx, in_flight, kicks and calls
(that option and those keys are the interface), plus frame, reason, mapped, stopped, base, num, pending and
findings (the ring checks a sample raised: stuck-ring after `--stuck-after` seconds, ...).
"""
from __future__ import annotations

import argparse
import json
import sys

from ..analysis.rings import STUCK_SECONDS, RingChecks
from ..capture.pcapng import read_capture, reading
from ..capture.progress import capture_progress
from ..dataplane.sample import NO_BASE, SampleError, SampleFlag, unpack_sample
from ..model import EventKind, RecordKind
from .analysis import add_stuck_argument

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vhusniff rings", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="capture (pcapng) recorded with --rings and/or --notifications")
    parser.add_argument("-T", choices=("text", "json"), default="text", help="output format")
    parser.add_argument("--connection", "-C", type=int, metavar="C", help="only this connection")
    parser.add_argument("--ring", type=int, metavar="N", help="only this ring")
    add_stuck_argument(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar on stderr")
    return parser


def load_samples(path: str, connection: int | None, ring: int | None, progress: bool,
                 stuck_seconds: float = STUCK_SECONDS):
    """(samples as dicts, problems, the reading outcome)."""
    checks = RingChecks(stuck_seconds)
    samples: list[dict] = []
    problems: list[str] = []
    first_ns = None
    with reading(path) as outcome, capture_progress(path, progress) as bar:
        for number, record in enumerate(read_capture(bar.source()), 1):
            if first_ns is None:
                first_ns = record.timestamp_ns
            if record.kind != RecordKind.EVENT or record.event != EventKind.RING:
                continue
            if connection is not None and record.connection != connection:
                continue
            try:
                sample = unpack_sample(record.data)
            except SampleError as error:
                problems.append(f"{path}: record {number}: {error}")
                continue
            findings = checks.feed(record, number)
            if ring is not None and sample.ring != ring:
                continue
            samples.append({
                "frame": number, "connection": record.connection, "ring": sample.ring,
                "time": round((record.timestamp_ns - first_ns) / 1e9, 9), "avail_idx": sample.avail_idx,
                "used_idx": sample.used_idx, "in_flight": sample.in_flight, "kicks": sample.kicks,
                "calls": sample.calls, "reason": sample.reason.name.lower(), "mapped": sample.mapped,
                "stopped": bool(sample.flags & SampleFlag.STOPPED), "layout": sample.layout.name.lower(),
                "num": sample.num, "base": None if sample.base == NO_BASE else sample.base,
                "pending": list(sample.pending), "findings": [f"{f.check}: {f.text}" for f in findings],
            })
    return samples, problems, outcome


def text_lines(samples: list[dict]) -> list[str]:
    lines: list[str] = []
    for key in sorted({(s["connection"], s["ring"]) for s in samples}):
        rows = [s for s in samples if (s["connection"], s["ring"]) == key]
        lines.append(f"connection {key[0]} ring {key[1]} ({rows[0]['layout']}, size {rows[-1]['num']}): "
                     f"{len(rows)} samples")
        lines.append(f"  {'time':>11} {'frame':>7} {'why':<9} {'avail':>6} {'used':>6} {'flight':>6} "
                     f"{'kicks':>8} {'calls':>8}")
        for s in rows:
            avail, used = (s["avail_idx"], s["used_idx"]) if s["mapped"] else ("?", "?")
            flight = s["in_flight"] if s["mapped"] else "?"
            base = f"  base {s['base']}" if s["base"] is not None else ""
            lines.append(f"  {s['time']:11.6f} {s['frame']:>7} {s['reason']:<9} {avail:>6} {used:>6} {flight:>6} "
                         f"{s['kicks']:>8} {s['calls']:>8}{base}")
            lines.extend(f"{'':>30}in flight: {request}" for request in s["pending"])
            lines.extend(f"{'':>30}finding {finding}" for finding in s["findings"])
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    samples, problems, outcome = load_samples(args.file, args.connection, args.ring, not args.quiet,
                                              args.stuck_after)
    if args.T == "json":
        json.dump(samples, sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif samples:
        print("\n".join(text_lines(samples)))
    elif not outcome.error:
        print(f"{args.file}: no ring samples (record with `vhusniff proxy --rings` or `--notifications`)",
              file=sys.stderr)
    for problem in problems:
        print(f"vhusniff rings: {problem}", file=sys.stderr)
    if outcome.report("vhusniff rings") or problems:
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
