"""A fuzzing campaign: draw a case, play it against the target, note what the target did, triage crashes.

Every execution is one line of DIR/executions.jsonl (its mutations and outcome); each distinct crash is
minimised and written as DIR/crashes/NNN-REASON-REQUEST.pcapng; DIR/summary.json holds the figures. On a
terminal, a progress bar (tqdm) with the campaign's figures is redrawn as it goes; nothing is drawn when the
output is not a terminal.
"""
from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from ..model import Record
from .mutate import Mutation, Mutator, Seed, apply_all, case_records
from .target import Execution, Target, execute
from .triage import Crash, Crashes, crash_key, last_request, minimise, report_head, write_reproducer

STATUS_INTERVAL = 0.25        # seconds between redraws of the status line
TAILS = (0, 0, 1, 2, 4, None)  # requests played after the last mutated one (None: the rest of the seed)
# A header that says less than its payload shifts every later header: the back-end then waits for bytes that never
# come, and a long wait for its reply would only slow the campaign.
SIZE_LIE_TIMEOUT = 0.2
REPRODUCE_ATTEMPTS = 3        # plays of a new crash's case before it is called not reproducible


@dataclass
class Options:
    duration: float = 60.0
    max_executions: int | None = None
    rng_seed: int = 0
    reply_timeout: float = 1.0
    max_mutations: int = 3
    prefix: int = 1               # requests of the seed never mutated
    minimise: bool = True
    max_crashes: int | None = None   # stop once this many distinct crashes are found


class Status:
    """A progress bar (tqdm) over the campaign's time with its figures beside it, redrawn in place on a
    terminal; nothing at all when `stream` is not a terminal."""

    def __init__(self, stream: TextIO, enabled: bool | None = None, seconds: float | None = None):
        self.stream = stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self.seconds = seconds                 # the campaign's duration: the bar's length
        self._started = time.monotonic()
        self._bar: tqdm | None = None
        self._drawn = 0.0

    def show(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            self._bar = tqdm(total=self.seconds, file=self.stream, leave=False, dynamic_ncols=True,
                             mininterval=STATUS_INTERVAL, bar_format="{bar:20} {desc}" if self.seconds
                             else "{desc}")
        elapsed = time.monotonic() - self._started
        self._bar.n = min(elapsed, self.seconds) if self.seconds else elapsed
        self._bar.set_description_str(text, refresh=False)
        if force or elapsed - self._drawn >= STATUS_INTERVAL:
            self._drawn = elapsed
            self._bar.refresh()

    def clear(self) -> None:
        """Take the bar off the screen (before a line of text, and at the end); the next show draws it again."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Campaign:
    """Fuzz the back-end `target` from `seed` as a front-end, writing into `out_dir`."""

    role = "frontend"                # the role the fuzzer plays

    def __init__(self, seed: Seed, target: Target, out_dir: Path, options: Options, status: Status | None = None,
                 say=None):
        self.seed, self.target, self.out_dir, self.options = seed, target, Path(out_dir), options
        target.keep_spare = True       # a restart after a crash takes a process that is already up
        self.status = status or Status(sys.stderr, enabled=False)
        self.say = say or (lambda text: None)
        self.rng = random.Random(options.rng_seed)
        self.mutator = Mutator(seed, self.rng, options.prefix)
        self.crashes = Crashes()
        self.outcomes: Counter[str] = Counter()
        self.behaviours: Counter[tuple[str, str, str]] = Counter()
        self.executions = 0
        self.triage_executions = 0
        self.started = 0.0
        self.elapsed = 0.0
        self.interrupted = False
        (self.out_dir / "crashes").mkdir(parents=True, exist_ok=True)
        self._log = open(self.out_dir / "executions.jsonl", "w")

    # ---- running ----

    def run(self) -> dict:
        self.started = time.monotonic()
        deadline = self.started + self.options.duration
        try:
            while time.monotonic() < deadline and not self.done():
                self.one()
                self.status.show(self.status_text())
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
            # Also when the target cannot be started again: what was found so far is written.
            self.elapsed = time.monotonic() - self.started
            self.status.clear()
            self.target.stop()
            self._log.close()
            summary = self.summary()
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def done(self) -> bool:
        options = self.options
        return (options.max_executions is not None and self.executions >= options.max_executions) or \
            (options.max_crashes is not None and len(self.crashes.found) >= options.max_crashes)

    def one(self) -> None:
        count = self.rng.randint(1, self.options.max_mutations)
        mutations = self.mutator.draw(count)
        keep = self._keep(mutations)
        execution = self.play(mutations, keep)
        self.executions += 1
        self.outcomes[execution.outcome] += 1
        self.behaviours[behaviour(execution)] += 1
        self._log.write(json.dumps({"execution": self.executions, "outcome": execution.outcome,
                                    "mutations": [mutation.text for mutation in mutations],
                                    "requests_played": keep, "requests_sent": execution.sent,
                                    "last_sent": execution.last, "first_divergence": execution.divergence,
                                    "crash": execution.death.reason if execution.death else None,
                                    "seconds": round(execution.elapsed, 4)}) + "\n")
        if execution.outcome == "crash":
            assert execution.death is not None, "a crash is an execution whose target died or reported"
            self.triage(mutations, keep, execution)

    def _keep(self, mutations: list[Mutation]) -> int:
        """How many requests of the mutated list to play: up to the last mutated one and a few after it."""
        length = len(apply_all(self.seed.requests, mutations))
        last = max(max(mutation.index, mutation.value if mutation.family in ("duplicate", "swap") else 0)
                   for mutation in mutations)
        tail = self.rng.choice(TAILS)
        return length if tail is None else min(length, last + 1 + tail)

    def records_for(self, mutations: list[Mutation], keep: int) -> list[Record]:
        """The recording a case plays, as a reproducer holds it."""
        return case_records(self.seed, mutations, keep)

    def last_of(self, mutations: list[Mutation], keep: int) -> str:
        """The name of the last message a case changes or plays, for its crash signature."""
        return last_request(self.seed, mutations, keep)

    def play(self, mutations: list[Mutation], keep: int) -> Execution:
        """One case against the target, started first if it is not running; stopped after a crash or hang so
        that the next case finds it fresh."""
        if not self.target.alive():
            self.target.start()
        timeout = self.options.reply_timeout
        if any(mutation.lies_about_size for mutation in mutations):
            timeout = min(timeout, SIZE_LIE_TIMEOUT)
        execution = execute(case_records(self.seed, mutations, keep, stamped=False), self.target, self.seed.device,
                            timeout)
        if execution.outcome in ("crash", "exited", "hang", "unreachable"):
            self.target.stop_process()        # its spare stays, to be taken by the next start
        return execution

    # ---- triage ----

    def triage(self, mutations: list[Mutation], keep: int, execution: Execution) -> None:
        assert execution.death is not None, "triage is for crashes"
        key = crash_key(execution.death)
        # Told apart before minimisation also by the last request a mutation touched: a crash with no output
        # (a plain SIGSEGV) may be several bugs.
        hint = (*key, self.last_of(mutations, max(mutation.index for mutation in mutations) + 1))
        known = self.crashes.by_key.get(hint)
        if known is None and key[1]:
            # What the target said tells this crash apart well enough: the same words are the same bug.
            known = next((crash for crash in self.crashes.found if crash_key(crash.death) == key), None)
        if known is not None:
            known.hits += 1
            return
        found_after = time.monotonic() - self.started
        self.say(f"crash at execution {self.executions}: {execution.death.reason}"
                 f"{': ' + report_head(execution.death.report) if execution.death.report else ''}")

        def crashes(subset: list[Mutation], count: int) -> bool:
            self.triage_executions += 1
            again = self.play(subset, count)
            return again.outcome == "crash" and again.death is not None and crash_key(again.death) == key

        # Memory corruption may need a few tries to crash again; a crash that never comes again is still
        # written (reproduced: false), not minimised.
        reproduced = any(crashes(mutations, keep) for _attempt in range(REPRODUCE_ATTEMPTS))
        small, small_keep = mutations, keep
        if reproduced and self.options.minimise:
            small, small_keep = minimise(mutations, keep, crashes)
            # A crash that comes only sometimes (heap corruption) may have been minimised on a lucky run: the
            # minimised case must crash again to count as reproduced.
            reproduced = any(crashes(small, small_keep) for _attempt in range(REPRODUCE_ATTEMPTS))
        crash = Crash(len(self.crashes.found) + 1, execution.death, small,
                      small_keep, self.executions, found_after, len(mutations), keep, reproduced)
        crash.last_request = self.last_of(small, small_keep)
        same = next((found for found in self.crashes.found if found.signature == crash.signature), None)
        if same is not None:
            same.hits += 1
            self.crashes.by_key[hint] = same
            self.say(f"  the same crash as {same.number}: {same.signature}")
            return
        name = f"{crash.number:03d}-{_slug(crash.reason)}-{_slug(crash.last_request)}.pcapng"
        path = (self.out_dir / "crashes" / name).resolve()
        write_reproducer(path, self.records_for(small, small_keep), crash)
        crash.reproducer = str(path)
        self.crashes.found.append(crash)
        self.crashes.by_key[hint] = crash
        self.say(f"  minimised to {len(small)} mutations, {small_keep} requests: {crash.signature}")
        for mutation in small:
            self.say(f"    {mutation.text}")
        self.say(f"  reproducer: {path}")

    # ---- figures ----

    def rate(self) -> float:
        elapsed = self.elapsed or (time.monotonic() - self.started)
        return self.executions / elapsed if elapsed else 0.0

    def status_text(self) -> str:
        elapsed = time.monotonic() - self.started
        outcomes = " ".join(f"{name} {count}" for name, count in sorted(self.outcomes.items()))
        return (f"{elapsed:6.1f} s  {self.executions} executions ({self.rate():.0f}/s)  {outcomes}  "
                f"behaviours {len(self.behaviours)}  crashes {len(self.crashes.found)}  "
                f"restarts {max(self.target.starts - 1, 0)}")

    def summary(self) -> dict:
        return {
            "role": self.role,
            "seed": self.seed.path,
            "target": self.target.template,
            "rng_seed": self.options.rng_seed,
            "seconds": round(self.elapsed, 2),
            "interrupted": self.interrupted,
            "executions": self.executions,
            "executions_per_second": round(self.rate(), 1),
            "triage_executions": self.triage_executions,
            "outcomes": dict(self.outcomes),
            "distinct_behaviours": len(self.behaviours),
            "behaviours": [{"outcome": outcome, "last_sent": last, "first_divergence": divergence, "count": count}
                           for (outcome, last, divergence), count in self.behaviours.most_common(50)],
            "target_starts": self.target.starts,
            "crashes": [crash.to_json() for crash in self.crashes.found],
        }


def behaviour(execution: Execution) -> tuple[str, str, str]:
    """What the target did, told apart by outcome, the last request it was sent and how its replies first
    differed from the seed's (numbers blanked)."""
    divergence = execution.divergence.split(": ", 1)[-1][:120]
    if execution.death is not None:
        divergence = execution.death.reason
    return execution.outcome, execution.last, report_head(divergence)


def _slug(text: str) -> str:
    return "".join(character if character.isalnum() else "-" for character in text).strip("-").lower() or "none"
