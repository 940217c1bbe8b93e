"""Expert findings in the manner of Wireshark's expert info: a table of checks (data), and the checks that look
at one message against the session state as it was before that message.

Checks that need request/reply matching or the connection's lifecycle are raised by `analysis.Analyzer`, with
ids from the same table. Every check is calibrated against real QEMU 7.2 sessions with qemu-storage-daemon
(vhost-user-blk) and dpdk-testpmd (vhost-user-net, an orderly stop included), which must give no finding at all.
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

from ..model import Channel, Direction, Record
from ..protocol import catalogue as cat
from ..protocol.grammar import Message, request_name, request_table
from .state import ConnectionState, F, gate_closed_test

# Compared for every message: looked up once (an enum member's lookup costs several times a global's). Payload
# fields are read by key (payload["index"]): a construct Container's attribute read costs some twenty times as much.
_MAIN, _BACKEND, _GPU, _BACKEND_SENDS = Channel.MAIN, Channel.BACKEND, Channel.GPU, Direction.BACKEND_TO_FRONTEND
_NO_FDS, _ALWAYS = cat.FdRule.NONE, cat.ReplyRule.ALWAYS
# Status bits that say the device failed: DEVICE_NEEDS_RESET and FAILED, by their names in the status table.
FAILED_STATUS_MASK = sum(1 << bit for bit, name in cat.DEVICE_STATUS.items()
                         if name in ("DEVICE_NEEDS_RESET", "FAILED"))


class Severity(enum.IntEnum):
    CHAT = 0          # worth knowing, nothing wrong
    NOTE = 1          # unusual, probably fine
    WARN = 2          # a peer may well refuse or misbehave
    ERROR = 3         # against the spec, or a peer failed

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Check:
    id: str
    severity: Severity
    group: str        # protocol | sequence | reply | memory | vring | malformed | lifecycle | gpu
    summary: str


C, N, W, E = Severity.CHAT, Severity.NOTE, Severity.WARN, Severity.ERROR
CHECKS = MappingProxyType({check.id: check for check in (
    # id, severity, group, one-line explanation
    Check("gate-not-negotiated", W, "sequence", "request sent before the feature that gates it was negotiated"),
    Check("features-not-offered", E, "protocol", "SET_FEATURES acks virtio feature bits the back-end did not offer"),
    # QEMU's virtio-pci offers the guest RING_RESET itself and passes the guest's ack on (QEMU 10 to vhost-user-gpu).
    Check("transport-feature-not-offered", N, "protocol",
          "SET_FEATURES acks a transport bit the back-end did not offer, which the front-end's own transport "
          "offers (QEMU's virtio-pci offers RING_RESET itself)"),
    Check("protocol-features-not-offered", E, "protocol",
          "SET_PROTOCOL_FEATURES acks protocol feature bits the back-end did not offer"),
    Check("fd-count", E, "protocol", "the number of fds does not fit the message (catalogue fd rule)"),
    Check("vring-fd-missing", E, "vring", "SET_VRING_KICK/CALL/ERR without an fd and without the NOFD bit"),
    Check("add-mem-reg-fds", E, "memory", "ADD_MEM_REG without exactly one fd"),
    Check("vring-index-out-of-range", E, "vring", "vring index beyond the queue count the back-end reported"),
    Check("vring-addr-misaligned", E, "vring",
          "vring address misaligned (split: desc 16, avail 2, used 4; packed: desc 16, events 4)"),
    Check("vring-num-invalid", W, "vring", "ring size 0, above 32768, or not a power of two for a split ring"),
    Check("vring-base-high-bits", W, "vring", "split-ring SET_VRING_BASE with bits 16-31 set"),
    Check("get-vring-base-not-started", W, "vring", "GET_VRING_BASE on a ring that never started"),
    Check("memory-regions-overlap", E, "memory", "memory regions overlap in guest-physical space"),
    Check("mem-table-too-many-regions", E, "memory", "SET_MEM_TABLE with more than 8 regions"),
    Check("mem-slots-exceeded", E, "memory", "more memory slots in use than GET_MAX_MEM_SLOTS allowed"),
    Check("rem-mem-reg-unknown", W, "memory", "REM_MEM_REG for a region that was never added"),
    Check("size-over-maximum", E, "malformed", "payload size beyond the maximum a receiver accepts"),
    Check("reserved-flags", W, "malformed", "reserved header flag bits set (rust-vmm rejects the message)"),
    Check("bad-version", E, "malformed", "header version is not 1"),
    Check("payload-layout", E, "malformed", "payload fits no layout of its request, or the message is cut short"),
    Check("unknown-request", W, "malformed", "request number unknown on its channel"),
    Check("need-reply-without-reply-ack", W, "reply", "NEED_REPLY set but REPLY_ACK was not negotiated"),
    Check("missing-reply", E, "reply", "a reply or ack the request called for never came"),
    Check("unexpected-reply", E, "reply", "a reply nobody asked for"),
    Check("reply-mismatch", E, "reply", "reply to a different request than the one outstanding"),
    Check("ack-nonzero", E, "reply", "REPLY_ACK carries a non-zero status (the request failed)"),
    Check("reply-flags", E, "reply", "reply flags not exactly version|REPLY (0x5); QEMU rejects them"),
    Check("config-reply-error", W, "reply", "GET_CONFIG answered with another size (size 0 means failure)"),
    Check("backend-channel-unset", E, "sequence", "back-end channel traffic before SET_BACKEND_REQ_FD"),
    Check("backend-message-while-suspended", W, "sequence", "back-end request while every ring is stopped"),
    Check("inband-without-prerequisites", W, "protocol",
          "INBAND_NOTIFICATIONS acked without BACKEND_REQ and REPLY_ACK"),
    Check("device-status-failed", W, "sequence", "SET_STATUS with FAILED or DEVICE_NEEDS_RESET"),
    Check("traffic-after-disconnect", E, "lifecycle", "message on a connection after it ended"),
    # Started, not enabled: a ring runs from SET_VRING_KICK until GET_VRING_BASE stops it, whatever
    # SET_VRING_ENABLE says (real QEMU net re-enables its stopped rings when it resets the device).
    Check("ended-while-running", W, "lifecycle",
          "the connection ended with rings started (no GET_VRING_BASE): no orderly stop (a crash or kill looks so)"),
    Check("idle-connection", W, "lifecycle",
          "a connection open a long time without a single message (a peer that hung or never spoke)"),
    Check("reply-overdue", W, "reply",
          "a request waited a long time for the reply it requires (the front-end blocks while it waits)"),
    # The GPU socket (vhost-user-gpu protocol): its header has no version bits and its own payload limits.
    Check("gpu-update-size", E, "gpu", "UPDATE's pixel bytes are not width x height x 4 (QEMU reads that many)"),
    Check("gpu-scanout-out-of-range", W, "gpu", "scanout id beyond virtio-gpu's 16 scanouts (QEMU ignores it)"),
    Check("disconnect-with-request-outstanding", E, "lifecycle",
          "the connection ended while a request waited for its reply"),
    Check("capture-ended-with-request-outstanding", N, "lifecycle",
          "the capture ends while a request waits for its reply"),
    # From the ring samples of --rings/--notifications (analysis.rings).
    Check("stuck-ring", E, "dataplane", "requests in flight and the used index still: the back-end stopped serving"),
    Check("kicks-without-progress", W, "dataplane", "the guest kicked a stuck ring and the back-end did not act"),
    Check("calls-without-used-movement", N, "dataplane", "calls while the used index did not move (spurious calls)"),
)})

# Decoder problem codes -> check ids.
PROBLEM_CHECKS = MappingProxyType({
    "truncated-header": "payload-layout", "size-mismatch": "payload-layout", "payload-layout": "payload-layout",
    "unknown-request": "unknown-request", "reserved-flags": "reserved-flags", "bad-version": "bad-version",
    "oversize": "size-over-maximum",
})

# Transport bits the front-end's transport provides whatever the back-end offers (catalogue).
FRONTEND_TRANSPORT_MASK = sum(1 << bit for bit in cat.FRONTEND_TRANSPORT_FEATURES)
GPU_MAX_SCANOUTS = 16               # VIRTIO_GPU_MAX_SCANOUTS
GPU_BYTES_PER_PIXEL = 4             # UPDATE's pixels are x8r8g8b8
MAX_MEM_TABLE_REGIONS = 8            # VHOST_MEMORY_BASELINE_NREGIONS in libvhost-user and DPDK
MAX_RING_SIZE = 32768                # virtio: queue size at most 32768
# Vrings per reported queue: vhost-user-net reports queue pairs (rx+tx), and may add a control ring.
RINGS_PER_QUEUE = MappingProxyType({"net": 2})
EXTRA_RINGS = MappingProxyType({"net": 1})
SPLIT_ALIGNMENT = MappingProxyType({"desc": 16, "avail": 2, "used": 4})
PACKED_ALIGNMENT = MappingProxyType({"desc": 16, "avail": 4, "used": 4})   # driver/device event areas


@dataclass(frozen=True)
class Finding:
    check: str
    connection: int
    numbers: tuple[int, ...]        # the records involved, first the one it is attached to
    text: str

    @property
    def severity(self) -> Severity:
        return CHECKS[self.check].severity

    @property
    def number(self) -> int:
        return self.numbers[0]

    def line(self) -> str:
        refs = ",".join(f"#{n}" for n in self.numbers)
        return f"{str(self.severity):<5} {self.check:<36} {refs:<12} {self.text}"


def check_message(state: ConnectionState, number: int, record: Record, message: Message) -> list[Finding]:
    """Findings for one message, judged against the state before the message is applied."""
    found: list[Finding] = []
    if message.problems:
        check_problems(number, record, message, found)
    if message.is_reply or message.request < 0:
        return found
    checks = request_checks(message.channel, message.request, message.flags, state.profile, message.context.profile)
    check_request(checks, state, number, record, message, found)
    return found


def check_problems(number: int, record: Record, message: Message, found: list[Finding]) -> None:
    """The decoder's problems with a message, as findings appended to `found`."""
    for problem in message.problems:
        found.append(Finding(PROBLEM_CHECKS.get(problem.code, "payload-layout"), record.connection, (number,),
                             f"{message.name}: {problem.text}"))


class RequestChecks:
    """What check_request looks at for one request header (channel, request number, flags), settled once: the
    catalogue's spec, the gate, whether the fds need counting, whether NEED_REPLY asks for what REPLY_ACK gives,
    and the request's own checks. `profile` numbers the protocol features (the state's), `name_profile` names the
    request (the message's)."""

    __slots__ = ("profile", "name_profile", "name", "spec", "count_fds", "gate_closed", "need_reply_check",
                 "reply_ack_bit", "backend", "main", "gpu", "main_check")

    def __init__(self, channel: Channel, request: int, flags: int, profile: cat.Profile,
                 name_profile: cat.Profile) -> None:
        self.profile, self.name_profile = profile, name_profile
        self.name = request_name(channel, request, name_profile)
        self.spec = spec = request_table(channel).get(request)
        # No fd where none belongs is right, and common: the fds are counted when some came or some belong.
        self.count_fds = spec is not None and (spec.request_fds != _NO_FDS or request == F.ADD_MEM_REG)
        self.gate_closed = gate_closed_test(spec.gate, profile) if spec is not None and spec.gate else None
        rule = cat.HEADER_RULES.get(channel)
        need_reply = bool(rule and flags & rule.need_reply)
        self.need_reply_check = need_reply and (spec is None or spec.reply_rule != _ALWAYS)
        bit = profile.protocol_feature_bit("REPLY_ACK")
        self.reply_ack_bit = -1 if bit is None else bit
        self.backend = channel == _BACKEND
        self.main = channel == _MAIN
        self.gpu = channel == _GPU
        self.main_check = _MAIN_REQUEST_CHECKS.get(request) if self.main else None


# Request headers seen, by (channel, request, flags, profiles); forgotten all at once beyond this (a fuzzed
# capture's every request number keeps it bounded).
REQUEST_CHECKS_KEPT = 4096
_request_checks: dict[tuple, RequestChecks] = {}


def request_checks(channel: Channel, request: int, flags: int, profile: cat.Profile,
                   name_profile: cat.Profile) -> RequestChecks:
    """The RequestChecks of a request header, made once per header and pair of profiles."""
    key = (channel, request, flags, id(profile), id(name_profile))
    checks = _request_checks.get(key)
    if checks is None or checks.profile is not profile or checks.name_profile is not name_profile:
        if len(_request_checks) >= REQUEST_CHECKS_KEPT:
            _request_checks.clear()
        checks = _request_checks[key] = RequestChecks(channel, request, flags, profile, name_profile)
    return checks


def check_request(checks: RequestChecks, state: ConnectionState, number: int, record: Record, message: Message,
                  found: list[Finding]) -> None:
    """The findings of one request (not a reply; request number >= 0) appended to `found`, judged against the
    state before the request is applied. `checks`: request_checks() of its header."""
    if checks.count_fds or (record.fds and checks.spec is not None):
        _check_fds(found, checks, number, record, message)
    if checks.gate_closed is not None and checks.gate_closed(state):
        found.append(Finding("gate-not-negotiated", record.connection, (number,),
                             f"{checks.name} needs {checks.spec.gate}, not negotiated yet"))
    if checks.need_reply_check and not (checks.reply_ack_bit >= 0 and
                                        (state.protocol_features_acked or 0) >> checks.reply_ack_bit & 1):
        found.append(Finding("need-reply-without-reply-ack", record.connection, (number,),
                             f"{checks.name} asks for an ack, REPLY_ACK not negotiated"))
    if checks.backend and record.direction == _BACKEND_SENDS:
        if state.backend_channel is None:
            found.append(Finding("backend-channel-unset", record.connection, (number,),
                                 f"{checks.name} on a back-end channel never set up"))
        if state.suspended:
            found.append(Finding("backend-message-while-suspended", record.connection, (number,),
                                 f"{checks.name} while every ring is stopped"))
    if checks.main:
        kind = message.kind
        if kind is None:
            return
        if checks.main_check is not None:
            checks.main_check(found, state, number, record, message)
        if kind in _VRING_KINDS:
            _check_vring(found, checks, state, number, record, message)
    elif checks.gpu and message.kind is not None:
        _check_gpu_request(found, number, record, message)


def _check_gpu_request(found: list[Finding], number: int, record: Record, message: Message) -> None:
    payload = message.payload
    if "scanout_id" in payload and payload["scanout_id"] >= GPU_MAX_SCANOUTS:
        found.append(Finding("gpu-scanout-out-of-range", record.connection, (number,),
                             f"{message.name} scanout {payload['scanout_id']}"))
    if message.request == cat.GpuRequest.UPDATE and message.kind == "gpu_update":
        expected = payload["width"] * payload["height"] * GPU_BYTES_PER_PIXEL
        if len(payload["data"]) != expected:
            found.append(Finding("gpu-update-size", record.connection, (number,),
                                 f"{payload['width']}x{payload['height']} needs {expected} pixel bytes, "
                                 f"{len(payload['data'])} sent"))


_FD_COUNTS: MappingProxyType[cat.FdRule, tuple[int, ...]] = MappingProxyType({
    cat.FdRule.NONE: (0,), cat.FdRule.ONE: (1,), cat.FdRule.OPTIONAL: (0, 1)})     # fds a fixed fd rule allows


def _check_fds(found: list[Finding], checks: RequestChecks, number: int, record: Record, message: Message) -> None:
    spec = checks.spec
    assert spec is not None             # check_request counts fds only for a request the catalogue knows
    count, rule = len(record.fds), spec.request_fds
    if message.request == F.ADD_MEM_REG and message.channel == _MAIN:
        if count != 1:
            found.append(Finding("add-mem-reg-fds", record.connection, (number,), f"ADD_MEM_REG with {count} fds"))
        return
    if rule == cat.FdRule.UNLESS_NOFD and message.kind == "vring_fd":
        nofd = bool(message.payload["flags"] & 1)
        if count == 0 and not nofd:
            found.append(Finding("vring-fd-missing", record.connection, (number,),
                                 f"{checks.name} idx={message.payload['index']} has no fd and no NOFD bit"))
            return
        expected: tuple[int, ...] | None = (0,) if nofd else (1,)
    elif rule == cat.FdRule.PER_REGION and message.kind and message.kind.startswith("mem_table"):
        expected = (message.payload["nregions"],)
    else:
        expected = _FD_COUNTS.get(rule)
    if expected is not None and count not in expected:
        found.append(Finding("fd-count", record.connection, (number,),
                             f"{checks.name} with {count} fd(s), expected {' or '.join(map(str, expected))}"))


# The checks of one front-end request on the main channel with a decoded payload, by request (each reads the
# payload only where it needs it; its kind, message.kind, is tested where the payload has more than one layout).
def _check_set_features(found: list[Finding], state: ConnectionState, number: int, record: Record,
                        message: Message) -> None:
    if state.features_offered is None:
        return
    extra = message.payload["features"] & ~state.features_offered
    transport = extra & FRONTEND_TRANSPORT_MASK
    if extra & ~transport:
        found.append(Finding("features-not-offered", record.connection, (number,),
                             f"bits {cat.bit_names(extra & ~transport, cat.feature_names(state.device_type))} "
                             f"acked, not offered"))
    if transport:
        found.append(Finding("transport-feature-not-offered", record.connection, (number,),
                             f"bits {cat.bit_names(transport, cat.TRANSPORT_FEATURES)} acked, not offered: QEMU's "
                             f"transport offers them to the guest itself"))


def _check_set_protocol_features(found: list[Finding], state: ConnectionState, number: int, record: Record,
                                 message: Message) -> None:
    acked = message.payload["protocol_features"]
    if state.protocol_features_offered is not None and acked & ~state.protocol_features_offered:
        extra = acked & ~state.protocol_features_offered
        found.append(Finding("protocol-features-not-offered", record.connection, (number,),
                             f"bits {cat.bit_names(extra, state.profile.protocol_features)} acked, not offered"))
    bit = state.profile.protocol_feature_bit
    if acked >> bit("INBAND_NOTIFICATIONS") & 1 and \
            not (acked >> bit("BACKEND_REQ") & 1 and acked >> bit("REPLY_ACK") & 1):
        found.append(Finding("inband-without-prerequisites", record.connection, (number,),
                             "INBAND_NOTIFICATIONS needs BACKEND_REQ and REPLY_ACK"))


def _check_set_status(found: list[Finding], state: ConnectionState, number: int, record: Record,
                      message: Message) -> None:
    if message.payload["status"] & FAILED_STATUS_MASK:
        found.append(Finding("device-status-failed", record.connection, (number,),
                             f"status {cat.bit_names(message.payload['status'], cat.DEVICE_STATUS)}"))


def _check_set_mem_table(found: list[Finding], state: ConnectionState, number: int, record: Record,
                         message: Message) -> None:
    if not (message.kind or "").startswith("mem_table"):
        return
    if message.payload["nregions"] > MAX_MEM_TABLE_REGIONS:
        found.append(Finding("mem-table-too-many-regions", record.connection, (number,),
                             f"{message.payload['nregions']} regions"))
    regions = list(message.payload["region"])
    for i, a in enumerate(regions):
        for b in regions[i + 1:]:
            if _overlap(a.guest_phys_addr, a.memory_size, b.guest_phys_addr, b.memory_size):
                found.append(Finding("memory-regions-overlap", record.connection, (number,),
                                     f"gpa {a.guest_phys_addr:#x}+{a.memory_size:#x} overlaps "
                                     f"{b.guest_phys_addr:#x}+{b.memory_size:#x}"))


def _check_add_mem_reg(found: list[Finding], state: ConnectionState, number: int, record: Record,
                       message: Message) -> None:
    if not (message.kind or "").startswith("mem_region"):
        return
    r = message.payload["region"]
    others = [old for old in state.regions if not old.same_region(r)]
    for old in others:
        if _overlap(r.guest_phys_addr, r.memory_size, old.guest_phys_addr, old.memory_size):
            found.append(Finding("memory-regions-overlap", record.connection, (number, old.number),
                                 f"gpa {r.guest_phys_addr:#x}+{r.memory_size:#x} overlaps the region added in "
                                 f"#{old.number}"))
    if state.max_mem_slots is not None and len(others) + 1 > state.max_mem_slots:
        found.append(Finding("mem-slots-exceeded", record.connection, (number,),
                             f"{len(others) + 1} slots in use, the back-end allows {state.max_mem_slots}"))


def _check_rem_mem_reg(found: list[Finding], state: ConnectionState, number: int, record: Record,
                       message: Message) -> None:
    if not (message.kind or "").startswith("mem_region"):
        return
    r = message.payload["region"]
    if not any(old.same_region(r) for old in state.regions):
        found.append(Finding("rem-mem-reg-unknown", record.connection, (number,),
                             f"no region gpa={r.guest_phys_addr:#x} size={r.memory_size:#x}"))


_MAIN_REQUEST_CHECKS: dict[int, Callable[[list[Finding], ConnectionState, int, Record, Message], None]] = {
    F.SET_FEATURES: _check_set_features,
    F.SET_PROTOCOL_FEATURES: _check_set_protocol_features,
    F.SET_STATUS: _check_set_status,
    F.SET_MEM_TABLE: _check_set_mem_table,
    F.ADD_MEM_REG: _check_add_mem_reg,
    F.REM_MEM_REG: _check_rem_mem_reg,
}
# Payload kinds that name a vring (their `index`).
_VRING_KINDS = frozenset({"vring_state", "vring_base", "vring_base_packed", "vring_addr", "vring_fd"})
# Address fields and their alignments, split and packed, as tuples to walk.
_SPLIT_ALIGNMENT = tuple(SPLIT_ALIGNMENT.items())
_PACKED_ALIGNMENT = tuple(PACKED_ALIGNMENT.items())


def _check_vring(found: list[Finding], checks: RequestChecks, state: ConnectionState, number: int, record: Record,
                 message: Message) -> None:
    """The checks of a main-channel request that names a vring (a payload kind in _VRING_KINDS)."""
    request = message.request
    payload = message.payload
    index = payload["index"]
    limit = _ring_limit(state)
    if limit is not None and index >= limit:
        found.append(Finding("vring-index-out-of-range", record.connection, (number,),
                             f"{checks.name} idx={index}, the back-end has {limit} ring(s)"))
    if request == F.SET_VRING_ADDR:
        alignment = _PACKED_ALIGNMENT if state.packed_ring else _SPLIT_ALIGNMENT
        for part, align in alignment:
            if payload[part] % align:
                wrong = [f"{part}={payload[part]:#x}" for part, align in alignment if payload[part] % align]
                found.append(Finding("vring-addr-misaligned", record.connection, (number,),
                                     f"idx={index} " + " ".join(wrong)))
                break
    elif request == F.SET_VRING_NUM:
        num = payload["num"]
        if num == 0 or num > MAX_RING_SIZE or (not state.packed_ring and num & (num - 1)):
            found.append(Finding("vring-num-invalid", record.connection, (number,), f"idx={index} num={num}"))
    elif request == F.SET_VRING_BASE:
        if not state.packed_ring and payload["num"] >> 16:
            found.append(Finding("vring-base-high-bits", record.connection, (number,),
                                 f"idx={index} num={payload['num']:#x}"))
    # SET_VRING_ENABLE before the ring is set up is no finding: the spec makes enabling independent of
    # starting (a ring runs once it is enabled AND started), and QEMU net enables its rings whenever the guest
    # driver sets the queue pairs, before the device starts, on every multiqueue boot.
    elif request == F.GET_VRING_BASE:
        vring = state.vrings.get(index)
        if vring is None or not vring.ever_started:
            found.append(Finding("get-vring-base-not-started", record.connection, (number,),
                                 f"idx={index} was never started (no SET_VRING_KICK)"))


def _ring_limit(state: ConnectionState) -> int | None:
    if state.queue_num is None:
        return None
    device = state.device_type
    if device is None:      # unknown device: allow the widest reading (net) so as not to cry wolf
        device = "net"
    return state.queue_num * RINGS_PER_QUEUE.get(device, 1) + EXTRA_RINGS.get(device, 0)


def _overlap(start_a: int, size_a: int, start_b: int, size_b: int) -> bool:
    return start_a < start_b + size_b and start_b < start_a + size_a
