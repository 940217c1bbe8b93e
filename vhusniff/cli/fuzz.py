"""`vhusniff fuzz`: structure-aware fuzzing of a vhost-user back-end, from a seed capture.

    vhusniff fuzz --as frontend SEED.pcapng --target 'COMMAND ... {socket} ...' --duration S --out DIR

The target command is started with `{socket}` replaced by a socket path of the fuzzer's (in DIR), reused while
it survives and restarted after a crash or a hang. Each execution plays the seed's requests up to a point with
a few mutations (field edge values, header lies, dropped/duplicated/swapped/inserted requests, missing, extra or
wrong fds, a memfd smaller than its region), then a GET_FEATURES that must be answered. A crash is a death
by a signal or an exit, or a sanitizer/assertion report in the target's output; each distinct one is minimised
by delta debugging and written as DIR/crashes/NNN-REASON-REQUEST.pcapng, which
`vhusniff replay --as frontend FILE --backend SOCKET` plays to the same crash. DIR/executions.jsonl holds every
execution, DIR/summary.json the figures, DIR/target.log the target's output.

    vhusniff fuzz --as backend SEED.pcapng --target 'qemu-system-x86_64 ... -chardev socket,path={socket},...'

As a back-end, the fuzzer listens at {socket}, starts the front-end for each execution and answers it from the
seed's recorded replies and back-end-channel requests, a few of them mutated; `vhusniff replay --as backend
FILE --listen SOCKET` plays a reproducer.

Exit status: 0 when no crash was found, 1 when one was, 2 on bad input or a target that cannot start.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from ..analysis.diff import load_or_report
from ..fuzz.campaign import Campaign, Options, Status
from ..fuzz.mutate import load_seed
from ..fuzz.reverse import BackendCampaign, ConnectingTarget, load_backend_seed
from ..fuzz.target import Target, TargetError
from ..model import Record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vhusniff fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("seed", metavar="SEED.pcapng", help="a capture of a valid session to start from")
    parser.add_argument("--as", dest="role", choices=("frontend", "backend"), required=True,
                        help="the role the fuzzer plays: frontend fuzzes a back-end, backend fuzzes a front-end")
    parser.add_argument("--target", required=True, metavar="COMMAND",
                        help="the target's command line, with {socket} where its socket path goes (a back-end "
                             "listens there; a front-end connects there to the fuzzer)")
    parser.add_argument("--duration", type=float, default=60.0, metavar="S", help="seconds (default: %(default)s)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where crashes, logs and the summary go")
    parser.add_argument("--executions", type=int, metavar="N", help="stop after N executions")
    parser.add_argument("--crashes", type=int, metavar="N", help="stop once N distinct crashes are found")
    parser.add_argument("--seed", dest="rng_seed", type=int, default=0, metavar="N",
                        help="random seed: the same seed, target and capture draw the same cases (default: 0)")
    parser.add_argument("--timeout", type=float, metavar="S",
                        help="--as frontend: seconds to wait for a reply the protocol requires before calling it a "
                             "hang (default: 1); --as backend: seconds the front-end has to end by itself (default: "
                             "10)")
    parser.add_argument("--stdin", default="", metavar="TEXT",
                        help="--as backend: text written to the front-end's input once started (QEMU with -qmp "
                             "stdio: '{\"execute\":\"qmp_capabilities\"}{\"execute\":\"quit\"}' quits once its devices "
                             "are set up)")
    parser.add_argument("--mutations", type=int, default=3, metavar="N",
                        help="at most N mutations per execution (default: %(default)s)")
    parser.add_argument("--prefix", type=int, default=1, metavar="N",
                        help="the seed's first N requests are never mutated (default: %(default)s)")
    parser.add_argument("--connection", type=int, help="which connection of the seed (default: the first)")
    parser.add_argument("--no-minimise", dest="minimise", action="store_false",
                        help="write each crash as found, without delta debugging")
    parser.add_argument("--start-timeout", type=float, default=10.0, metavar="S",
                        help="seconds the target has to start listening (default: %(default)s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no status line and no crash lines")
    args = parser.parse_args(argv)
    if args.timeout is None:
        args.timeout = 1.0 if args.role == "frontend" else 10.0
    if args.mutations < 1 or args.duration <= 0 or args.timeout <= 0:
        parser.error("--mutations, --duration and --timeout must be positive")
    records = load_or_report(args.seed, "vhusniff fuzz", progress=not args.quiet)
    if records is None:
        return 2
    recording: list[Record] = []
    try:
        if args.role == "frontend":
            seed = load_seed(args.seed, records, args.connection)
        else:
            seed, recording = load_backend_seed(args.seed, records, args.connection)
    except ValueError as error:
        print(f"vhusniff fuzz: {args.seed}: {error}", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        target = Target(args.target, out_dir, args.start_timeout) if args.role == "frontend" else \
            ConnectingTarget(args.target, out_dir, args.start_timeout, args.stdin)
    except TargetError as error:
        print(f"vhusniff fuzz: {error}", file=sys.stderr)
        return 2
    options = Options(duration=args.duration, max_executions=args.executions, rng_seed=args.rng_seed,
                      reply_timeout=args.timeout, max_mutations=args.mutations, prefix=args.prefix,
                      minimise=args.minimise, max_crashes=args.crashes)
    status = Status(sys.stderr, enabled=False if args.quiet else None, seconds=args.duration)

    def say(text: str) -> None:
        if not args.quiet:
            status.clear()
            print(text, flush=True)

    # SIGTERM stops the campaign as SIGINT does: the target is stopped and the summary written.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if isinstance(target, ConnectingTarget):
            campaign: Campaign = BackendCampaign(seed, recording, target, out_dir, options, status, say)
        else:
            campaign = Campaign(seed, target, out_dir, options, status, say)
        try:
            summary = campaign.run()
        except TargetError as error:
            print(f"vhusniff fuzz: {error}", file=sys.stderr)
            return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"{summary['executions']} executions in {summary['seconds']:.1f} s ({summary['executions_per_second']}/s), "
          f"{summary['distinct_behaviours']} distinct behaviours, {len(summary['crashes'])} distinct crashes, "
          f"target started {summary['target_starts']} times{'; interrupted' if summary['interrupted'] else ''}")
    for crash in summary["crashes"]:
        print(f"  {crash['signature']}\n    {crash['reproducer']}")
    print(f"summary: {out_dir / 'summary.json'}")
    return 1 if summary["crashes"] else 0


def _interrupt(_signal_number, _frame) -> None:
    raise KeyboardInterrupt
