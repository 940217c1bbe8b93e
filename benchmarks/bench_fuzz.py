"""Fuzzing executions per second against a real qemu-storage-daemon, with the floor measured in the same run.

One execution is a handshake prefix of the seed (captures/qemu-blk-boot.pcapng) and a mutated tail, then the
closing GET_FEATURES. Three figures, same daemon, same run:

- floor: the unmutated seed's bytes and fresh fds sent straight on a socket, waiting for each recorded reply:
  what the kernel and the daemon cost, with no vhusniff at all;
- replay: the unmutated seed played by the fuzzer's execution (replay's scripted front-end on the core);
- campaign: `vhusniff fuzz` itself for --seconds (mutations, restarts after crashes and hangs, triage).

Aim: campaign >= 100 executions/s on this 2-core machine.

    python3 benchmarks/bench_fuzz.py [--seconds 20] [--executions 100]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vhusniff.analysis.diff import load_or_report  # noqa: E402
from vhusniff.engine.sockio import receive_chunk, send_message  # noqa: E402
from vhusniff.fuzz.campaign import Campaign, Options  # noqa: E402
from vhusniff.fuzz.mutate import case_records, load_seed  # noqa: E402
from vhusniff.fuzz.target import Target, execute  # noqa: E402
from vhusniff.model import Direction, RecordKind  # noqa: E402
from vhusniff.replay.fresh import FreshFds  # noqa: E402
from vhusniff.replay.recording import load_exchanges  # noqa: E402

SEED = ROOT / "captures" / "qemu-blk-boot.pcapng"


def floor(records, target: Target, executions: int) -> float:
    """Executions/s sending the case's requests with plain sockets, waiting where the recording has a reply."""
    _connection, exchanges = load_exchanges(records, None)
    started = time.perf_counter()
    for _ in range(executions):
        fresh = FreshFds()
        with target.connect() as sock:
            for exchange in exchanges:
                fds = [fresh.make(info, 1 << 28 if info.kind == "memfd" else 0) for info in exchange.request.fds]
                send_message(sock, exchange.request.data, fds)
                for fd in fds:
                    os.close(fd)
                if exchange.reply is not None:
                    data, fds, _ = receive_chunk(sock)
                    for fd in fds:
                        os.close(fd)
        fresh.close()
    return executions / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="campaign length")
    parser.add_argument("--executions", type=int, default=100, help="executions for the floor and for replay")
    args = parser.parse_args()
    records = load_or_report(str(SEED), "bench_fuzz")
    seed = load_seed(str(SEED), records)
    with tempfile.TemporaryDirectory() as work:
        disk = Path(work) / "disk.img"
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "64M"], check=True)
        template = (f"qemu-storage-daemon --blockdev driver=file,node-name=disk0,filename={disk} --export "
                    "type=vhost-user-blk,id=export0,node-name=disk0,writable=on,addr.type=unix,addr.path={socket}")
        target = Target(template, Path(work) / "plain")
        target.start()
        try:
            case = case_records(seed, [])
            requests = sum(1 for record in case if record.kind == RecordKind.MESSAGE and
                           record.direction == Direction.FRONTEND_TO_BACKEND)
            floor_rate = floor(case, target, args.executions)
            started, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.executions):
                outcome = execute(case, target, seed.device, 1.0).outcome
                assert outcome == "ok", f"the unmutated seed must be taken whole, not {outcome}"
            replay_rate = args.executions / (time.perf_counter() - started)
            # the fuzzer's own CPU an execution: what a loaded machine's other work does not change
            replay_cpu = (time.process_time() - cpu) / args.executions
        finally:
            target.stop()
        campaign_target = Target(template, Path(work) / "campaign")
        summary = Campaign(seed, campaign_target, Path(work) / "campaign",
                           Options(duration=args.seconds, rng_seed=1)).run()
    rate = summary["executions_per_second"]
    print(f"unmutated seed: {requests} requests an execution")
    print(f"floor (plain sockets)    {floor_rate:8.1f} executions/s")
    print(f"replay engine            {replay_rate:8.1f} executions/s   {replay_rate / floor_rate:.2f}x the floor "
          f"({replay_cpu * 1000:.2f} ms of the fuzzer's CPU an execution)")
    print(f"campaign                 {rate:8.1f} executions/s   {rate / floor_rate:.2f}x the floor "
          f"({summary['executions']} executions + {summary['triage_executions']} for triage in "
          f"{summary['seconds']} s, target started {summary['target_starts']} times, "
          f"{len(summary['crashes'])} distinct crashes)")
    print(f"aim: campaign >= 100 executions/s: {'met' if rate >= 100 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
