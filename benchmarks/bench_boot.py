"""A real QEMU boot (blk guest on qemu-storage-daemon) direct against through the proxy, in pairs, same run.

Each pair boots once straight against the back-end and once through an in-process proxy writing a capture;
the order alternates between pairs so that drift does not favour one side. Prints each pair and the ratio of
the medians (target: at most 1.05x).

    python3 benchmarks/bench_boot.py [--pairs 3]
"""
import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vhusniff import lab  # noqa: E402
from vhusniff.lab.command import run_lab  # noqa: E402


def boot_direct(workdir: Path) -> float:
    result = lab.run_direct(workdir)
    if not result.blk_io_ok:
        raise SystemExit(f"direct boot failed:\n{result.console}")
    return result.elapsed


def boot_through_proxy(workdir: Path) -> float:
    run = run_lab(workdir, "blk", capture_path=workdir / "boot.pcapng", report=lambda text: None)
    if not run.ok:
        raise SystemExit(f"boot through the proxy failed:\n{run.result.console}")
    return run.result.elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    lab.prepare()
    direct, proxied = [], []
    for pair in range(args.pairs):
        order = [("direct", boot_direct, direct), ("proxy", boot_through_proxy, proxied)]
        if pair % 2:
            order.reverse()
        for _name, boot, results in order:
            with tempfile.TemporaryDirectory(prefix="bench-boot-") as scratch:
                results.append(boot(Path(scratch)))
        print(f"pair {pair + 1}: direct {direct[-1]:.2f} s, through the proxy {proxied[-1]:.2f} s", flush=True)
    d, p = statistics.median(direct), statistics.median(proxied)
    print(f"median: direct {d:.2f} s, through the proxy {p:.2f} s, ratio {p / d:.3f}x (target at most 1.05x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
