"""The set-up the proxy round-trip benchmarks share: a back-end script and `vhusniff proxy` in front of it, all on
one core, measured straight and through the proxy in alternate rounds."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def direct_and_through(backend_script: str, cpu: int, rounds: int, measure: Callable[[str], float],
                       proxy_options: Sequence[str] = (), capture: bool = True) -> tuple[list[float], list[float]]:
    """Run `backend_script` (Python source that prints "ready" once it listens on the socket path given as its
    argument) and the proxy in front of it (`proxy_options`; `capture`: -w), both pinned to `cpu` as this process
    is while they run; `measure(socket path)` `rounds` times against each, alternately. (direct, through)."""
    os.sched_setaffinity(0, {cpu})
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    pin = ["taskset", "-c", str(cpu)]
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as scratch:
        backend_path, proxy_path = f"{scratch}/backend.sock", f"{scratch}/proxy.sock"
        backend = subprocess.Popen(pin + [sys.executable, "-c", backend_script, backend_path], env=env,
                                   stdout=subprocess.PIPE, text=True)
        assert backend.stdout is not None
        backend.stdout.readline()
        command = pin + [sys.executable, "-m", "vhusniff.cli.main", "proxy", "-q", *proxy_options,
                         "--listen", proxy_path, "--backend", backend_path]
        if capture:
            command += ["-w", f"{scratch}/bench.pcapng"]
        proxy = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists(proxy_path):
                if time.monotonic() > deadline:
                    raise SystemExit("the proxy did not start")
                time.sleep(0.02)
            direct, through = [], []
            for _ in range(rounds):
                direct.append(measure(backend_path))
                through.append(measure(proxy_path))
        finally:
            proxy.terminate()
            proxy.wait()
            backend.kill()
            backend.wait()
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return direct, through
