"""Expert findings in the manner of Wireshark's expert info: a table of checks (data), and the checks that look
at one message against the session state as it was before that message.

Checks that need request/reply matching or the connection's lifecycle are raised by `analysis.Analyzer`, with
ids from the same table. Every check is calibrated against real QEMU 7.2 sessions with qemu-storage-daemon
(vhost-user-blk) and dpdk-testpmd (vhost-user-net, an orderly stop included), which must give no finding at all.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from types import MappingProxyType

from ..model import Channel, Direction, Record
from ..protocol import catalogue as cat
from ..protocol.grammar import Message, request_table
from .state import ConnectionState, F

# Compared for every message: looked up once (an enum member's lookup costs several times a global's).
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

    def add(check: str, text: str, *others: int) -> None:
        found.append(Finding(check, record.connection, (number, *others), text))

    for problem in message.problems:
        add(PROBLEM_CHECKS.get(problem.code, "payload-layout"), f"{message.name}: {problem.text}")
    if message.is_reply or message.request < 0:
        return found
    spec = request_table(message.channel).get(message.request)
    if spec is not None:
        if record.fds or spec.request_fds != _NO_FDS or message.request == F.ADD_MEM_REG:
            _check_fds(add, spec, record, message)      # (no fd where none belongs is right, and common)
        if spec.gate and not state.gate_open(spec.gate):
            add("gate-not-negotiated", f"{message.name} needs {spec.gate}, not negotiated yet")
    if message.need_reply and not state.protocol_feature("REPLY_ACK") and (spec is None or
                                                                          spec.reply_rule != _ALWAYS):
        add("need-reply-without-reply-ack", f"{message.name} asks for an ack, REPLY_ACK not negotiated")
    if message.channel == _BACKEND and record.direction == _BACKEND_SENDS:
        if state.backend_channel is None:
            add("backend-channel-unset", f"{message.name} on a back-end channel never set up")
        if state.suspended:
            add("backend-message-while-suspended", f"{message.name} while every ring is stopped")
    if message.channel == _MAIN and message.kind is not None:
        _check_main_request(add, state, number, message)
    elif message.channel == _GPU and message.kind is not None:
        _check_gpu_request(add, message)
    return found


def _check_gpu_request(add, message: Message) -> None:
    payload = message.payload
    if "scanout_id" in payload and payload.scanout_id >= GPU_MAX_SCANOUTS:
        add("gpu-scanout-out-of-range", f"{message.name} scanout {payload.scanout_id}")
    if message.request == cat.GpuRequest.UPDATE and message.kind == "gpu_update":
        expected = payload.width * payload.height * GPU_BYTES_PER_PIXEL
        if len(payload.data) != expected:
            add("gpu-update-size", f"{payload.width}x{payload.height} needs {expected} pixel bytes, "
                                   f"{len(payload.data)} sent")


_FD_COUNTS: MappingProxyType[cat.FdRule, tuple[int, ...]] = MappingProxyType({
    cat.FdRule.NONE: (0,), cat.FdRule.ONE: (1,), cat.FdRule.OPTIONAL: (0, 1)})     # fds a fixed fd rule allows


def _check_fds(add, spec: cat.RequestSpec, record: Record, message: Message) -> None:
    count, rule = len(record.fds), spec.request_fds
    if message.request == F.ADD_MEM_REG and message.channel == Channel.MAIN:
        if count != 1:
            add("add-mem-reg-fds", f"ADD_MEM_REG with {count} fds")
        return
    if rule == cat.FdRule.UNLESS_NOFD and message.kind == "vring_fd":
        nofd = bool(message.payload.flags & 1)
        if count == 0 and not nofd:
            add("vring-fd-missing", f"{message.name} idx={message.payload.index} has no fd and no NOFD bit")
            return
        expected: tuple[int, ...] | None = (0,) if nofd else (1,)
    elif rule == cat.FdRule.PER_REGION and message.kind and message.kind.startswith("mem_table"):
        expected = (message.payload.nregions,)
    else:
        expected = _FD_COUNTS.get(rule)
    if expected is not None and count not in expected:
        add("fd-count", f"{message.name} with {count} fd(s), expected {' or '.join(map(str, expected))}")


def _check_main_request(add, state: ConnectionState, number: int, message: Message) -> None:
    request, kind = message.request, message.kind     # the payload is read only where a check needs it
    assert kind is not None         # check_message calls this only for a decoded payload
    if request == F.SET_FEATURES and state.features_offered is not None:
        extra = message.payload.features & ~state.features_offered
        transport = extra & FRONTEND_TRANSPORT_MASK
        if extra & ~transport:
            add("features-not-offered",
                f"bits {cat.bit_names(extra & ~transport, cat.feature_names(state.device_type))} acked, not offered")
        if transport:
            add("transport-feature-not-offered",
                f"bits {cat.bit_names(transport, cat.TRANSPORT_FEATURES)} acked, not offered: QEMU's transport offers "
                f"them to the guest itself")
    elif request == F.SET_PROTOCOL_FEATURES:
        acked = message.payload.protocol_features
        if state.protocol_features_offered is not None and acked & ~state.protocol_features_offered:
            extra = acked & ~state.protocol_features_offered
            add("protocol-features-not-offered", f"bits {cat.bit_names(extra, state.profile.protocol_features)} "
                                                 f"acked, not offered")
        bit = state.profile.protocol_feature_bit
        if acked >> bit("INBAND_NOTIFICATIONS") & 1 and \
                not (acked >> bit("BACKEND_REQ") & 1 and acked >> bit("REPLY_ACK") & 1):
            add("inband-without-prerequisites", "INBAND_NOTIFICATIONS needs BACKEND_REQ and REPLY_ACK")
    elif request == F.SET_STATUS and message.payload.status & FAILED_STATUS_MASK:
        add("device-status-failed", f"status {cat.bit_names(message.payload.status, cat.DEVICE_STATUS)}")
    elif request == F.SET_MEM_TABLE and kind.startswith("mem_table"):
        if message.payload.nregions > MAX_MEM_TABLE_REGIONS:
            add("mem-table-too-many-regions", f"{message.payload.nregions} regions")
        regions = list(message.payload.region)
        for i, a in enumerate(regions):
            for b in regions[i + 1:]:
                if _overlap(a.guest_phys_addr, a.memory_size, b.guest_phys_addr, b.memory_size):
                    add("memory-regions-overlap", f"gpa {a.guest_phys_addr:#x}+{a.memory_size:#x} overlaps "
                                                  f"{b.guest_phys_addr:#x}+{b.memory_size:#x}")
    elif request == F.ADD_MEM_REG and kind.startswith("mem_region"):
        r = message.payload.region
        others = [old for old in state.regions if not old.same_region(r)]
        for old in others:
            if _overlap(r.guest_phys_addr, r.memory_size, old.guest_phys_addr, old.memory_size):
                add("memory-regions-overlap", f"gpa {r.guest_phys_addr:#x}+{r.memory_size:#x} overlaps the "
                                              f"region added in #{old.number}", old.number)
        if state.max_mem_slots is not None and len(others) + 1 > state.max_mem_slots:
            add("mem-slots-exceeded", f"{len(others) + 1} slots in use, the back-end allows {state.max_mem_slots}")
    elif request == F.REM_MEM_REG and kind.startswith("mem_region"):
        r = message.payload.region
        if not any(old.same_region(r) for old in state.regions):
            add("rem-mem-reg-unknown", f"no region gpa={r.guest_phys_addr:#x} size={r.memory_size:#x}")
    index = _vring_index(message)
    if index is None:
        return
    limit = _ring_limit(state)
    if limit is not None and index >= limit:
        add("vring-index-out-of-range", f"{message.name} idx={index}, the back-end has {limit} ring(s)")
    vring = state.vrings.get(index)
    if request == F.SET_VRING_ADDR:
        alignment = PACKED_ALIGNMENT if state.packed_ring else SPLIT_ALIGNMENT
        payload = message.payload
        wrong = [f"{part}={payload[part]:#x}" for part, align in alignment.items() if payload[part] % align]
        if wrong:
            add("vring-addr-misaligned", f"idx={index} " + " ".join(wrong))
    elif request == F.SET_VRING_NUM:
        num = message.payload.num
        if num == 0 or num > MAX_RING_SIZE or (not state.packed_ring and num & (num - 1)):
            add("vring-num-invalid", f"idx={index} num={num}")
    elif request == F.SET_VRING_BASE and not state.packed_ring and message.payload.num >> 16:
        add("vring-base-high-bits", f"idx={index} num={message.payload.num:#x}")
    # SET_VRING_ENABLE before the ring is set up is no finding: the spec makes enabling independent of
    # starting (a ring runs once it is enabled AND started), and QEMU net enables its rings whenever the guest
    # driver sets the queue pairs, before the device starts, on every multiqueue boot.
    elif request == F.GET_VRING_BASE and (vring is None or not vring.ever_started):
        add("get-vring-base-not-started", f"idx={index} was never started (no SET_VRING_KICK)")


def _vring_index(message: Message) -> int | None:
    if message.kind in ("vring_state", "vring_base", "vring_base_packed", "vring_addr", "vring_fd"):
        return message.payload.index
    return None


def _ring_limit(state: ConnectionState) -> int | None:
    if state.queue_num is None:
        return None
    device = state.device_type
    if device is None:      # unknown device: allow the widest reading (net) so as not to cry wolf
        device = "net"
    return state.queue_num * RINGS_PER_QUEUE.get(device, 1) + EXTRA_RINGS.get(device, 0)


def _overlap(start_a: int, size_a: int, start_b: int, size_b: int) -> bool:
    return start_a < start_b + size_b and start_b < start_a + size_a
