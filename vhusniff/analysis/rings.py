"""Expert findings from the ring samples (`--rings`, `--notifications`): a ring stuck with requests in flight,
kicks the back-end does not act on, and calls with nothing new in the used ring.

Judged from the samples' own timestamps, so a capture gives the same findings offline as live. Real QEMU 7.2
sessions with qemu-storage-daemon and dpdk-testpmd give none (a net receive ring full of empty buffers is not
stuck); `kill -STOP` of the daemon during guest I/O gives stuck-ring.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..dataplane.sample import SampleError, SampleFlag, unpack_sample
from ..model import EventKind, Record, RecordKind
from .expert import Finding

# stuck-ring: requests in flight and the used index still for this long.
STUCK_SECONDS = 2.0
# calls-without-used-movement: more calls than this between two samples with the used index unchanged (one call
# may be counted in the sample after the used index it signals, when the sample falls between the two).
SPURIOUS_CALLS = 2


@dataclass
class _RingTrack:
    used_idx: int = -1
    calls: int = -1
    stuck_since_ns: int | None = None     # first sample of the current episode: in flight, used not moving
    stuck_number: int = 0
    kicks_when_idle: int = 0              # kicks counted when the ring last had nothing in flight
    reported: bool = False                # this episode's findings are out
    spurious_reported: bool = False


class RingChecks:
    """Feed it every record; it answers the findings each RING sample raises."""

    def __init__(self, stuck_seconds: float = STUCK_SECONDS) -> None:
        self.stuck_ns = int(stuck_seconds * 1e9)
        self.rings: dict[tuple[int, int], _RingTrack] = {}

    def forget(self, connection: int) -> None:
        for key in [key for key in self.rings if key[0] == connection]:
            del self.rings[key]

    def feed(self, record: Record, number: int) -> list[Finding]:
        if record.kind != RecordKind.EVENT or record.event != EventKind.RING:
            return []
        try:
            sample = unpack_sample(record.data)
        except SampleError:
            return []
        if not sample.mapped:
            return []
        track = self.rings.setdefault((record.connection, sample.ring), _RingTrack())
        found: list[Finding] = []
        moved = sample.used_idx != track.used_idx
        if (not moved and track.calls >= 0 and sample.calls - track.calls > SPURIOUS_CALLS
                and not track.spurious_reported):
            track.spurious_reported = True
            found.append(Finding("calls-without-used-movement", record.connection, (number,),
                                 f"ring {sample.ring}: {sample.calls - track.calls} calls while the used index "
                                 f"stayed at {sample.used_idx}"))
        track.used_idx, track.calls = sample.used_idx, sample.calls
        if sample.in_flight == 0:
            # Any later kick announces work that was not there yet: a kick the back-end should act on.
            track.kicks_when_idle = sample.kicks
        # Buffers waiting to be filled (a net receive ring) wait as long as nothing arrives: not a stuck ring.
        waiting = sample.in_flight and not sample.flags & (SampleFlag.STOPPED | SampleFlag.RECEIVE_BUFFERS)
        if moved or not waiting:
            track.stuck_since_ns = None
            track.reported = False
            if not waiting:
                return found
        if track.stuck_since_ns is None:
            track.stuck_since_ns, track.stuck_number = record.timestamp_ns, number
            return found
        stuck_for = record.timestamp_ns - track.stuck_since_ns
        if track.reported or stuck_for < self.stuck_ns:
            return found
        track.reported = True
        found.append(Finding("stuck-ring", record.connection, (number, track.stuck_number),
                             f"ring {sample.ring}: {sample.in_flight} request(s) in flight, used index stuck at "
                             f"{sample.used_idx} for {stuck_for / 1e9:.1f} s (avail {sample.avail_idx})"))
        kicks = sample.kicks - track.kicks_when_idle
        if kicks > 0:
            # The back-end was told (the kicks passed through the proxy) and did not act: not a lost kick.
            found.append(Finding("kicks-without-progress", record.connection, (number, track.stuck_number),
                                 f"ring {sample.ring}: {kicks} kick(s) since it last had nothing in flight, and "
                                 f"the used index has not moved for {stuck_for / 1e9:.1f} s"))
        return found
