"""The fuzzed back-end: a process started from the user's command template, and one execution of a case
against it by replay's scripted front-end.

The target is started with `{socket}` replaced by a socket path of ours, in a session of its own (so that
stopping it stops everything it started), under the user's own limits, its output appended to a log. It is
reused while it survives and restarted after a crash or a hang.

An execution is replay's front-end (a core Session between the target's socket and a ScriptedFrontend, on
replay's one-thread driver) playing the case's requests; the case ends with a request that always gets a reply,
so the script closes as soon as that reply is in. How it ended says what the target did:

- ok: every reply the protocol requires came (the back-end took the case, whatever it answered);
- refused: the back-end closed the connection and still listens (a clean refusal);
- hang: a required reply did not come within the timeout;
- crash: the process died by a signal, or its output holds a sanitizer, assertion or abort report;
- exited: it exited of its own accord (some back-ends serve one connection and quit);
- stuck: a header size lie left part of a request in the session's framer (ours, not the target's doing), or
  promised more bytes than the rest of the case holds (the target waits for them; the case ends at once);
- unreachable: the next case could not connect (whatever ended the target came before it).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..engine import Session, Side
from ..model import Channel, FdInfo, Record
from ..protocol.context import ContextTracker
from ..protocol.grammar import HEADER_SIZE, DecodeContext, Message, decode
from ..proxy.routes import listening_in_table
from ..replay.driver import CONNECTION, Driver, Recorder
from ..replay.fresh import FreshFds
from ..replay.frontend import Outgoing, ReplayResult, ScriptedFrontend, play_frontend
from ..replay.recording import Exchange, decode_recorded, load_exchanges
from .mutate import BARRIER

# What a crashing process writes: sanitizers, glibc's and assert()'s aborts, Rust panics.
CRASH_REPORT = re.compile(r"ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:|ThreadSanitizer|"
                          r"Assertion .* failed|stack smashing detected|double free|corrupted|panicked at")
PF_EXITING = 0x4         # /proc/PID/stat flags: the process is exiting (include/linux/sched.h)
EXIT_WAIT = 5.0          # a target that stopped listening has this long to finish dying


class RememberingDecoder:
    """grammar.decode, remembering what it decoded: every case plays the seed's requests and gets the same replies,
    so most of a campaign's messages were decoded before, in the same context (the same negotiated values and
    profile). Messages are read, never changed, by replay and the core, so one decoded message serves every case."""

    KEPT = 1 << 14            # messages remembered; forgotten all at once when full (memory stays flat)
    LARGEST = 4096            # a longer message (a fuzzed size) is decoded each time, not kept

    def __init__(self) -> None:
        self.messages: dict[tuple, Message] = {}

    def decode(self, raw: bytes, channel: Channel, context: DecodeContext) -> Message:
        if len(raw) > self.LARGEST:
            return decode(raw, channel, context)
        key = (raw, channel, context.device_type, context.features, context.protocol_features, id(context.profile))
        message = self.messages.get(key)
        if message is None:
            if len(self.messages) >= self.KEPT:
                self.messages.clear()
            message = self.messages[key] = decode(raw, channel, context)
        return message


class TargetError(Exception):
    """The target could not be started or reached: the message names the command and the log."""


@dataclass
class Death:
    """How a target ended: `returncode` as subprocess reports it (negative: the signal)."""
    returncode: int | None
    report: str = ""           # the crash report lines of its output (sanitizer, assertion, abort), if any
    output: str = ""           # its last lines, for a person: a target's ordinary log lines vary too much to
                               # tell crashes apart by

    @property
    def reason(self) -> str:
        if self.returncode is None:
            return "crash report"
        if self.returncode < 0:
            try:
                return signal.Signals(-self.returncode).name
            except ValueError:
                return f"signal {-self.returncode}"
        return f"exit {self.returncode}"


class Target:
    """A back-end process from a command template holding `{socket}`.

    With `keep_spare`, a second process is started beside the one in use, on a socket of its own, so that a
    restart after a crash takes a process that has already come up (a campaign restarts its target after every
    crash and hang: the start-up, not the fuzzing, was most of a restart)."""

    SLOTS = (("target.sock", "target.log"), ("target-2.sock", "target-2.log"))   # the one in use, and the spare's

    def __init__(self, template: str, workdir: Path, start_timeout: float = 10.0, keep_spare: bool = False):
        if "{socket}" not in template:
            raise TargetError(f"the target command has no {{socket}} to put the socket path in: {template}")
        self.template = template
        self.workdir = Path(workdir)
        self.slot = 0
        self.socket_path = self.workdir / self.SLOTS[0][0]
        self.log_path = self.workdir / self.SLOTS[0][1]
        self.start_timeout = start_timeout
        self.keep_spare = keep_spare
        self.proc: subprocess.Popen | None = None
        self.spare: subprocess.Popen | None = None     # started in the other slot, not yet in use
        self.decoder = RememberingDecoder()       # shared by this target's executions
        self.starts = 0
        self._mark = 0

    def command(self, socket_path: Path | None = None) -> list[str]:
        path = str(socket_path or self.socket_path)
        return [word.replace("{socket}", path) for word in shlex.split(self.template)]

    def start(self) -> None:
        self.stop_process()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        if self.spare is not None and self.spare.poll() is not None:
            # The spare could not run beside the other (a lock, a port, a shared file): no spares from now on.
            self.keep_spare = False
            _end(self.spare)
            self.spare = None
        if self.spare is not None:
            self.proc, self.spare = self.spare, None
            self.slot = 1 - self.slot
        else:
            self.stop()
            self.proc = self._launch(self.slot)
        self.socket_path = self.workdir / self.SLOTS[self.slot][0]
        self.log_path = self.workdir / self.SLOTS[self.slot][1]
        self.starts += 1
        deadline = time.monotonic() + self.start_timeout
        while not self.listening():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                what = (f"exited with {self.proc.returncode}" if self.proc.returncode is not None else
                        f"did not listen at {self.socket_path} within {self.start_timeout:g} s")
                self.stop()
                raise TargetError(f"the target {what}: {shlex.join(self.command())}; its log {self.log_path}:\n"
                                  + "\n".join(self.log_text().splitlines()[-10:]))
            self._wait_for_exit(0.002)      # waits on the process: returns at once if it dies
        if self.keep_spare:
            self.spare = self._launch(1 - self.slot)
        self.mark()

    def _launch(self, slot: int) -> subprocess.Popen:
        """Start the command on the socket of `slot`, its output appended to that slot's log."""
        socket_path, log_path = self.workdir / self.SLOTS[slot][0], self.workdir / self.SLOTS[slot][1]
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        command = self.command(socket_path)
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"$ {shlex.join(command)}\n".encode())
            log.flush()
            try:
                # Its standard input stays open (a pipe we hold) until it is stopped: dpdk-testpmd quits when
                # its input ends.
                return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log, stderr=log,
                                        start_new_session=True)
            except OSError as error:
                raise TargetError(f"cannot start the target {command[0]}: {error.strerror}") from error

    def listening(self) -> bool:
        # The table names a socket by the path it was bound to, even once the file is gone: both must hold.
        listening = listening_in_table(self.socket_path, absent=False)
        return self.socket_path.exists() and listening is not False

    def dying(self) -> bool:
        """Whether the process has begun to exit (or is gone): a back-end that closed our connection while dying
        may still list its listening socket, but the kernel marks the exit (PF_EXITING) before it closes fds."""
        if self.proc is None or self.proc.poll() is not None:
            return True
        try:
            with open(f"/proc/{self.proc.pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            return not self.listening()
        return fields[0] in (b"Z", b"X") or bool(int(fields[6]) & PF_EXITING) or not self.listening()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(str(self.socket_path))
        except OSError:
            sock.close()
            raise
        return sock

    def answers(self, request: bytes, timeout: float) -> bool:
        """Whether the target answers `request` (one that always gets a reply) on a new connection: a back-end
        serves one connection after another, so the answer also says that the last one was taken whole."""
        try:
            with self.connect() as sock:
                sock.settimeout(timeout)
                sock.sendall(request)
                return len(sock.recv(HEADER_SIZE, socket.MSG_WAITALL)) == HEADER_SIZE
        except OSError:
            return False

    def death(self, wait: float) -> Death | None:
        """Whether the target died (waiting up to `wait` seconds for it to finish), or wrote a crash report."""
        if self.proc is None:
            return None
        if self.proc.poll() is None and wait:
            self._wait_for_exit(wait)
        output = self.output_since_mark()
        report = "\n".join(line for line in output.splitlines() if CRASH_REPORT.search(line))
        if report and self.proc.poll() is None:
            self._wait_for_exit(EXIT_WAIT)    # an assertion's abort follows its report (a core dump takes time)
        if self.proc.poll() is not None:
            return Death(self.proc.returncode, report, _last_lines(output))
        if report:
            return Death(None, report, _last_lines(output))
        return None

    def _wait_for_exit(self, seconds: float) -> None:
        assert self.proc is not None, "only a started target is waited for"
        try:
            pidfd = os.pidfd_open(self.proc.pid)
        except OSError:                       # already reaped, or no pidfd on this kernel
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(seconds)
            return
        try:
            select.select([pidfd], [], [], seconds)
        finally:
            os.close(pidfd)
        self.proc.poll()

    def mark(self) -> None:
        """An execution begins: what the target writes from now on is its output."""
        try:
            self._mark = self.log_path.stat().st_size
        except OSError:
            self._mark = 0

    def output_since_mark(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._mark)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the target and everything it started (its process group), the spare too, and remove their
        sockets."""
        self.stop_process()
        spare, self.spare = self.spare, None
        _end(spare)
        for socket_name, _log in self.SLOTS:
            with contextlib.suppress(FileNotFoundError):
                (self.workdir / socket_name).unlink()

    def stop_process(self) -> None:
        """Stop the target and everything it started (its process group)."""
        proc, self.proc = self.proc, None
        _end(proc)


def _end(proc: subprocess.Popen | None) -> None:
    """Stop a started process and its process group."""
    if proc is None:
        return
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(EXIT_WAIT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _wait_for_group(proc.pid)


def _wait_for_group(group: int) -> None:
    """Wait until nothing of the target's process group is left (the leader may be a shell whose children take
    their time over SIGTERM), killing what is still there after EXIT_WAIT."""
    deadline = time.monotonic() + EXIT_WAIT
    while _group_alive(group):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
            deadline = time.monotonic() + EXIT_WAIT
        time.sleep(0.01)    # polling for the group's end: there is no fd to wait on for processes not ours


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies count as gone: they are only waiting to be reaped.
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == group and fields[0] not in (b"Z", b"X"):
                return True
    return False


def _last_lines(output: str, count: int = 3) -> str:
    return "\n".join([line for line in output.splitlines() if line.strip()][-count:])


class FuzzFrontend(ScriptedFrontend):
    """Replay's scripted front-end, closing as soon as the last reply is in, and noting how the session ended."""

    quiet = 0.0

    def __init__(self, *args, case_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.case_timeout = case_timeout
        self.hung = False
        self.stuck = False
        self.backend_closed = False

    def start(self) -> None:
        self.driver.after(self.case_timeout, self.overdue)
        super().start()

    def step(self) -> None:
        before = self.next
        super().step()
        if self.next != before and self.outgoing is not None:
            # A timer of 0 runs once the loop has carried out what is queued: by then the request has left.
            pending = self.outgoing
            self.driver.after(0, lambda: self._check_left(pending))

    def _check_left(self, pending: Outgoing) -> None:
        if not self.over and self.outgoing is pending and pending.timer is None:
            self.stuck = True
            self.stop("part of the request never left: the session's framer waits for bytes a size lie promised")

    def overdue(self) -> None:
        """The whole case took too long without a reply timing out: part of a request never left (a framing
        lie the session cannot frame waits for bytes that never come)."""
        if not self.over:
            self.stuck = True
            self.stop(f"the case did not finish within {self.case_timeout:g} s")

    def timed_out(self) -> None:
        self.hung = True
        super().timed_out()

    def _settle(self) -> None:
        if not self.over and self.bytes_framed < self.bytes_sent:
            self.stuck = True              # a header promised bytes that no request of the case supplies
        super()._settle()

    def _compare(self, outgoing: Outgoing, exchange: Exchange, replayed: Message, infos: list[FdInfo]) -> None:
        # A reply of the recorded bytes and fd count has no differences: the field by field comparison, the
        # costliest step of a case, is only for replies that differ.
        recorded = exchange.reply
        if recorded is None or recorded.data != replayed.raw or len(recorded.fds) != len(infos):
            super()._compare(outgoing, exchange, replayed, infos)
            return
        decode_recorded(self.recorded_tracker, recorded)        # the recorded tracker follows every reply
        self.result.replies_compared += 1

    def peer_closed(self, channel: Channel) -> None:
        self.backend_closed = True
        super().peer_closed(channel)

    def ended(self, reason: str) -> None:
        if reason != "replay finished":
            self.backend_closed = True      # the back-end closed, or a send to it failed
        super().ended(reason)


@dataclass
class Execution:
    """What one case did to the target."""
    outcome: str                      # ok | refused | hang | crash | exited | unreachable | stuck (ours)
    sent: int                         # requests sent
    last: str                         # the last request sent (its name), "" when none
    replies: int
    death: Death | None = None
    divergence: str = ""              # the first reply that differed from the seed's, or how the case stopped
    elapsed: float = 0.0
    notes: list[str] = field(default_factory=list)


def execute(records: list[Record], target: Target, device: str | None, reply_timeout: float) -> Execution:
    """Play a case's records (a recording, as replay reads one) against the running target."""
    started = time.monotonic()
    target.mark()
    _connection, exchanges = load_exchanges(records, None)
    try:
        sock = target.connect()
    except OSError as error:
        # Whatever ended the target came before this case reached it (after the last case's closing reply, or a
        # back-end that serves one connection and exits): not this case's crash.
        death = target.death(EXIT_WAIT)
        how = f"; the target had ended ({death.reason})" if death is not None else ""
        return Execution("unreachable", 0, "", 0, None, f"cannot connect: {error.strerror}{how}")
    out = io.StringIO()
    result = ReplayResult()
    session = Session(CONNECTION, None, ContextTracker(device), scripted=Side.FRONTEND, follow=True, device=device)
    assert session.followed is not None, "a session built to follow has its tracker"
    session.followed.decoder = target.decoder.decode
    driver, fresh = Driver(session, Recorder(None, out), out, device), FreshFds()
    script = FuzzFrontend(driver, exchanges, fresh, result, out, reply_timeout, device, target.decoder.decode,
                          case_timeout=reply_timeout * 4)
    play_frontend(driver, sock, script, fresh)
    sent = result.requests_sent
    last = exchanges[sent - 1].request if sent else None
    last_name = decode_name(last) if last is not None else ""
    divergence = result.divergences[0] if result.divergences else ""
    if script.hung:
        outcome = "hang"
        death = target.death(0)
    elif script.stuck or (script.out_of_step and not script.backend_closed):
        # The case stopped before its closing request, or no reply tells that the target read the whole stream
        # (a header promised more than its message held): ask again on a new connection, which the target takes
        # once it has read the rest of this one.
        outcome = "stuck" if script.stuck else "ok"
        death = target.death(0 if target.answers(BARRIER, reply_timeout) else EXIT_WAIT)
    elif script.backend_closed:
        death = target.death(EXIT_WAIT if target.dying() else 0)
        outcome = "refused"
    else:
        death = target.death(0)
        outcome = "ok"
    if death is not None:
        # A death by a signal or a crash report is a crash; an exit of its own accord is the target's choice.
        outcome = "exited" if death.returncode is not None and death.returncode >= 0 and \
            not CRASH_REPORT.search(death.report) else "crash"
    return Execution(outcome, sent, last_name, result.replies_compared, death, divergence,
                     time.monotonic() - started)


def decode_name(record: Record) -> str:
    return decode(record.data, record.channel).name
