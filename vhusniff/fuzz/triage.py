"""What a crash is, once: its signature, its minimisation by delta debugging, its reproducer capture."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..capture.pcapng import CaptureWriter
from ..model import EventKind, Record, RecordKind
from .mutate import Mutation, Seed, apply_all
from .target import Death, decode_name

_NUMBERS = re.compile(r"0x[0-9a-fA-F]+|\d+")
REPORT_LINES = 3         # how many lines of the target's crash output a signature keeps


def report_head(report: str) -> str:
    """The top lines of a crash report with numbers and addresses blanked: the same bug gives the same text."""
    lines = [line.strip() for line in report.splitlines() if line.strip()][:REPORT_LINES]
    return " / ".join(_NUMBERS.sub("N", line) for line in lines)


def crash_key(death: Death) -> tuple[str, str]:
    """How crashes are told apart before minimisation: the way the target died and what it said."""
    return death.reason, report_head(death.report)


@dataclass
class Crash:
    """One distinct crash: how to make it, and what it looked like."""
    number: int
    death: Death                     # how the target died, and the top lines of its output
    mutations: list[Mutation]        # minimised
    keep: int                        # requests of the mutated list played (then the closing GET_FEATURES)
    found_at: int                    # execution number
    found_after: float               # seconds into the campaign
    original_mutations: int
    original_keep: int
    reproduced: bool                 # the crash came again when its case was played again
    last_request: str = ""
    reproducer: str = ""
    hits: int = 1                    # executions that ended in this crash

    @property
    def reason(self) -> str:
        return self.death.reason

    @property
    def report(self) -> str:
        return self.death.report

    @property
    def signature(self) -> str:
        head = report_head(self.report)
        return f"{self.reason} after {self.last_request}" + (f": {head}" if head else "")

    def to_json(self) -> dict:
        return {"number": self.number, "signature": self.signature, "reason": self.reason,
                "last_request": self.last_request, "report": self.report, "output": self.death.output,
                "reproducer": self.reproducer,
                "mutations": [mutation.text for mutation in self.mutations], "requests_played": self.keep,
                "minimised_from": {"mutations": self.original_mutations, "requests": self.original_keep},
                "reproduced": self.reproduced, "found_at_execution": self.found_at,
                "found_after_seconds": round(self.found_after, 2), "hits": self.hits}


def last_request(seed: Seed, mutations: list[Mutation], keep: int) -> str:
    """The name of the last request a case plays before its closing GET_FEATURES."""
    requests = apply_all(seed.requests, mutations)[:keep]
    return decode_name(requests[-1]) if requests else "GET_FEATURES"


def ddmin(items: list, test: Callable[[list], bool]) -> list:
    """Zeller's delta debugging: a 1-minimal sublist of `items` for which `test` still holds (it holds for all)."""
    chunks = 2
    while len(items) >= 2:
        size = -(-len(items) // chunks)
        parts = [items[start:start + size] for start in range(0, len(items), size)]
        reduced = next((part for part in parts if test(part)), None)
        if reduced is not None:
            items, chunks = reduced, 2
            continue
        if len(parts) > 2:
            complements = ([item for other, rest in enumerate(parts) if other != number for item in rest]
                           for number in range(len(parts)))
            reduced = next((complement for complement in complements if test(complement)), None)
            if reduced is not None:
                items, chunks = reduced, max(chunks - 1, 2)
                continue
        if chunks >= len(items):
            break
        chunks = min(chunks * 2, len(items))
    if len(items) == 1 and test([]):
        return []
    return items


def minimise(mutations: list[Mutation], keep: int,
             crashes: Callable[[list[Mutation], int], bool]) -> tuple[list[Mutation], int]:
    """The fewest mutations, and the fewest requests played, that still give the same crash."""
    keep = _shortest(mutations, keep, crashes)
    mutations = ddmin(list(mutations), lambda subset: crashes(subset, keep))
    return mutations, _shortest(mutations, keep, crashes)


def _shortest(mutations: list[Mutation], keep: int, crashes: Callable[[list[Mutation], int], bool]) -> int:
    """Binary search for the fewest requests: a crash at request k comes whatever follows k, not before it."""
    low, high = 0, keep            # crashes(high) holds (it is the case as found, or a minimised one)
    while high - low > 1:
        middle = (low + high) // 2
        if crashes(mutations, middle):
            high = middle
        else:
            low = middle
    return high


def write_reproducer(path: Path, records: list[Record], crash: Crash) -> None:
    """A case's records as a capture, with notes saying what crashed and how the seed was changed: `vhusniff
    replay --as frontend|backend PATH ...` plays it to the crash."""
    lead = next((number for number, record in enumerate(records) if record.kind != RecordKind.EVENT), len(records))
    first = records[lead] if lead < len(records) else records[-1]
    notes = [f"fuzz crash {crash.number}: {crash.signature}"] + [f"mutation: {m.text}" for m in crash.mutations]
    note_records = [Record(first.timestamp_ns - 1, first.connection, kind=RecordKind.EVENT, event=EventKind.NOTE,
                           note=text) for text in notes]
    writer = CaptureWriter(path)
    try:
        for record in [*records[:lead], *note_records, *records[lead:]]:
            writer.write(record)
    finally:
        writer.close()


@dataclass
class Crashes:
    """The distinct crashes of a campaign, by key before minimisation and by signature after."""
    found: list[Crash] = field(default_factory=list)
    by_key: dict[tuple[str, str, str], Crash] = field(default_factory=dict)   # crash_key + a request name
