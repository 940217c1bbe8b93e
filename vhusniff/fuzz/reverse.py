"""`vhusniff fuzz --as backend`: fuzz a front-end (QEMU) as a malicious back-end.

The seed's recorded back-end messages (main-channel replies, back-end-channel requests) are what is mutated,
with the same grammar-driven families as the front-end role (field edge values, header lies: the size, the
version bits, the REPLY bit left off a reply or put on a back-end request; payloads cut short or grown); the
request number stays, so that a reply stays paired with its request. A case is the seed recording with those
messages changed; replay's scripted back-end (serve_front_end, on the core) answers the front-end from it,
so `vhusniff replay --as backend CRASH.pcapng --listen SOCKET` plays a reproducer to the same crash.

The front-end connects to us: the fuzzer listens at {socket}, starts the target for each execution (a
front-end connects once, at start), answers it until it leaves, and judges how it ended: a signal or a crash
report is a crash, an exit of 0 is ok, another exit is a refusal, no end within --timeout of its last message
a hang (the target is stopped). `--stdin` text is written to the target's input once it has started: for
QEMU, `{"execute":"qmp_capabilities"}{"execute":"quit"}` with `-qmp stdio` makes it quit once its devices are
set up, so that an execution is one device start.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import select
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from ..model import Channel, Direction, Record, RecordKind
from ..protocol import catalogue as cat
from ..protocol.context import ContextTracker
from ..replay.backend import serve_front_end
from ..replay.driver import Recorder
from ..replay.recording import first_connection, load_backend_requests, load_exchanges
from .campaign import Campaign
from .mutate import Mutation, Mutator, Seed, apply_all
from .target import EXIT_WAIT, Execution, Target, TargetError


def load_backend_seed(path: str, records: list[Record], connection: int | None = None) -> tuple[Seed, list[Record]]:
    """The back-end's messages of one connection, to mutate (as a Seed whose `requests` are those messages),
    and the connection's records, which a case is made from."""
    connection = first_connection(records) if connection is None else connection
    own = [record for record in records if record.connection == connection]
    tracker = ContextTracker()
    mutable, messages = [], []
    for record in own:
        message = tracker.decode(record)
        if record.kind != RecordKind.MESSAGE or message is None or record.direction != Direction.BACKEND_TO_FRONTEND:
            continue
        if record.channel not in (Channel.MAIN, Channel.BACKEND):
            continue
        mutable.append(record)
        messages.append(message)
    if not mutable:
        raise ValueError(f"connection {connection} holds no back-end message")
    context = tracker.context_for(connection)
    events = [record for record in own if record.kind == RecordKind.EVENT and record.event.name in
              ("CONNECTED", "DEVICE")]
    barrier = Record(0, connection)
    seed = Seed(path, connection, mutable, events, context.device_type, context, own[0].timestamp_ns, messages,
                {}, barrier)
    return seed, own


def mutated_recording(seed: Seed, recording: list[Record], mutations: list[Mutation]) -> list[Record]:
    """The seed's recording with its back-end messages (the seed's `requests`) changed by `mutations`."""
    mutated = apply_all(seed.requests, mutations)
    changed = {id(original): new for original, new in zip(seed.requests, mutated, strict=True) if new is not original}
    return [changed.get(id(record), record) for record in recording]


class BackendMutator(Mutator):
    """The back-end's messages keep their request numbers (a reply stays paired with its request); header lies
    include a reply without the REPLY bit, a back-end-channel request with it, and a size beyond the payload
    (replay's scripted back-end then sends the reply as it is and closes its side: the front-end reads what
    there is, then the end)."""

    FAMILIES = (("field", 10), ("header", 3), ("length", 2))

    def __init__(self, seed: Seed, rng, first: int = 0):
        super().__init__(seed, rng, first)
        self.first = 0

    def _header(self) -> Mutation:
        mutation = super()._header()
        index = mutation.index
        if mutation.offset == 4 and self.rng.random() < 0.4:
            flags = mutation.value
            if self.seed.messages[index].is_reply:
                value, what = flags & ~cat.FLAG_REPLY, " (a reply without the REPLY bit)"
            else:
                value, what = flags | cat.FLAG_REPLY, " (the REPLY bit on a back-end request)"
            mutation = dataclasses.replace(mutation, value=value,
                                           text=f"{self._label(index)}: flags {value:#x}{what}")
        return mutation


class ConnectingTarget(Target):
    """A front-end started from a template: it connects to our socket, so it is not waited for to listen."""

    def __init__(self, template: str, workdir: Path, start_timeout: float = 10.0, stdin_text: str = ""):
        super().__init__(template, workdir, start_timeout)
        self.stdin_text = stdin_text
        self.listener: socket.socket | None = None
        self.terminated = False         # the watchdog ended the current front-end

    def listen(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.bind(str(self.socket_path))
        self.listener.listen(1)

    def start(self) -> None:
        command = self.command()
        self.stop_process()
        # A fresh socket each time: a connection the last front-end left in the backlog is not the next one's.
        if self.listener is not None:
            self.listener.close()
        self.listen()
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            self.mark()
            try:
                self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log, stderr=log,
                                             start_new_session=True)
            except OSError as error:
                raise TargetError(f"cannot start the target {command[0]}: {error.strerror}") from error
        self.starts += 1
        self.terminated = False
        if self.stdin_text and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(self.stdin_text.encode())
                self.proc.stdin.flush()

    def accept(self, timeout: float) -> socket.socket | None:
        """The front-end's next connection, or None when it exits (or does not connect) first."""
        assert self.listener is not None and self.proc is not None, "accept after start"
        try:
            pidfd = os.pidfd_open(self.proc.pid)
        except OSError:                      # it is gone already
            return None
        try:
            ready, _, _ = select.select([self.listener.fileno(), pidfd], [], [], timeout)
        finally:
            os.close(pidfd)
        if self.listener.fileno() not in ready:
            return None
        peer, _address = self.listener.accept()
        return peer

    def stop(self) -> None:
        self.stop_process()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def terminate(self) -> None:
        """From the watchdog thread: end a front-end that is taking too long (the serving loop then ends)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            self.terminated = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)


def serve(records: list[Record], target: ConnectingTarget, device: str | None, timeout: float) -> Execution:
    """One execution: start the front-end, answer it from `records` until it leaves, see how it ended."""
    started = time.monotonic()
    connection, exchanges = load_exchanges(records, None)
    backend_requests = load_backend_requests(records, connection, exchanges)
    target.start()
    peer = target.accept(target.start_timeout)
    if peer is None:
        death = target.death(EXIT_WAIT)
        outcome = "crash" if death is not None and death.reason.startswith(("SIG", "crash")) else "exited"
        return Execution(outcome, 0, "", 0, death, "the front-end never connected", time.monotonic() - started)
    watchdog = threading.Timer(timeout, target.terminate)
    watchdog.start()
    try:
        out = io.StringIO()
        result = serve_front_end(peer, exchanges, "default", Recorder(None, out), out, reply_timeout=timeout,
                                 device=device, backend_requests=backend_requests)
    finally:
        watchdog.cancel()
    # A front-end that refused what it was told may connect again (QEMU's vhost-user-blk retries): that is its
    # answer, a refusal. Otherwise it ends (by itself, or killed by a crash), or it hangs.
    again = None if target.terminated else target.accept(timeout)
    if again is not None:
        again.close()
        death = target.death(0)
        outcome = "crash" if death is not None else "refused"
    else:
        death = target.death(EXIT_WAIT)
        if target.terminated or death is None:
            outcome, death = "hang", None
        elif death.returncode is None or death.returncode < 0:
            outcome = "crash"
        elif result.stuck:
            outcome, death = "stuck", None      # our lie left it nothing to read: ours, not the front-end's doing
        else:
            outcome = "ok" if death.returncode == 0 else "refused"
            death = None
    # What the front-end said (QEMU names what it refused) tells its behaviours apart better than our side can.
    said = [line for line in target.output_since_mark().splitlines() if line.strip() and not line.startswith("{")]
    return Execution(outcome, result.replies, f"{result.requests} requests", result.requests, death,
                     said[-1] if said else result.ended or result.failed, time.monotonic() - started)


class BackendCampaign(Campaign):
    """Fuzz the front-end `target` (a ConnectingTarget) from a seed's back-end messages."""

    role = "backend"

    def __init__(self, seed: Seed, recording: list[Record], target: ConnectingTarget, *args, **kwargs):
        super().__init__(seed, target, *args, **kwargs)
        self.recording = recording
        self.mutator = BackendMutator(seed, self.rng)
        self.front_end: ConnectingTarget = target

    def _keep(self, mutations: list[Mutation]) -> int:
        return len(self.seed.requests)

    def records_for(self, mutations: list[Mutation], keep: int) -> list[Record]:
        """The seed recording with its back-end messages changed (`keep` of them changed at most)."""
        changed = [mutation for mutation in mutations if mutation.index < keep]
        return mutated_recording(self.seed, self.recording, changed)

    def last_of(self, mutations: list[Mutation], keep: int) -> str:
        indexes = [mutation.index for mutation in mutations if mutation.index < keep]
        if not indexes:
            return "none"
        message = self.seed.messages[max(indexes)]
        return message.name + (" reply" if message.is_reply else "")

    def play(self, mutations: list[Mutation], keep: int) -> Execution:
        execution = serve(self.records_for(mutations, keep), self.front_end, self.seed.device,
                          self.options.reply_timeout)
        self.front_end.stop_process()
        return execution
