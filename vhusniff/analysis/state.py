"""What one vhost-user connection has negotiated and set up, followed message by message (sans-IO).

`ConnectionState.feed(number, record, message)` applies one decoded record; `format()` shows the state as a
person reads it. Replies are applied by the request number they carry (a reply repeats its request's number),
so the state needs no request/reply matching.
"""
from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

from ..model import Channel, Direction, EventKind, FdInfo, Record, RecordKind
from ..protocol import catalogue as cat
from ..protocol.grammar import Message
from ..protocol.replies import protocol_feature_set

# The front-end requests as plain ints: compared for every message, and an enum member's lookup costs several
# times a plain attribute's. For the same reason a payload's fields are read by key (payload["index"]): a construct
# Container's attribute read costs some twenty times its key read.
F = SimpleNamespace(**{request.name: int(request) for request in cat.FrontendRequest})
_EVENT, _MAIN, _DEVICE_STATE = RecordKind.EVENT, Channel.MAIN, Channel.DEVICE_STATE
_FRONTEND_SENDS = Direction.FRONTEND_TO_BACKEND
NOFD = "NOFD"               # a vring fd slot set explicitly to "no fd, poll instead"
# GET_FEATURES bit 30 offers protocol features; the same bit acked in SET_FEATURES negotiates them.
PROTOCOL_FEATURES_BIT = 30
ACCESS_PLATFORM_BIT = 33
RING_PACKED_BIT = 34
# Milestones kept for a connection's report (start/stop, memory, status); a session that toggles rings
# for days keeps the first ones and counts the rest.
HISTORY_KEPT = 1000
# The proxy's notes count a connection's messages ("after message #52"); the analysis speaks in record numbers,
# as `read` shows them. The last RECENT_KEPT messages' two numbers are kept to translate one into the other.
RECENT_KEPT = 64
_MESSAGE_ORDINAL = re.compile(r"message #(\d+)")


def _hex_and_bits(value: int, names) -> str:
    """`0x5 (A|C)`: a bit word in hex with its bits named (present.bit_names_with_hex, with a space)."""
    return f"{value:#x} ({cat.bit_names(value, names)})"


# What an event record means to a connection's session, by its kind; any other kind is 'other'.
_EVENT_ROLES = {EventKind.CONNECTED: "connect", EventKind.CLOSED: "end", EventKind.CHANNEL_CLOSED: "channel-end"}


def classify_event(record: Record) -> str:
    """'connect', 'end', 'channel-end' (a side channel closed, the connection goes on) or 'other'."""
    return _EVENT_ROLES.get(record.event, "other")


def gate_closed_test(gate: str, profile: cat.Profile) -> Callable[[ConnectionState], bool]:
    """The test of whether a connection has not negotiated a request's gate yet, with the profile's bit looked up
    once: "PROTOCOL_FEATURES" (bit 30 offered or acked), "IOMMU" (ACCESS_PLATFORM acked) or a protocol feature's
    name (acked; never, when the profile numbers no such feature)."""
    if gate == "PROTOCOL_FEATURES":
        return lambda state: not state.protocol_features_available
    if gate == "IOMMU":
        return lambda state: not (state.features_acked or 0) >> ACCESS_PLATFORM_BIT & 1
    bit = profile.protocol_feature_bit(gate)
    if bit is None:
        return lambda state: True
    return lambda state: not (state.protocol_features_acked or 0) >> bit & 1


@dataclass
class VringState:
    index: int
    num: int | None = None
    desc: int | None = None
    used: int | None = None
    avail: int | None = None
    log: int | None = None
    addr_flags: int = 0
    base: int | None = None              # last SET_VRING_BASE, or the base GET_VRING_BASE returned
    kick: FdInfo | str | None = None     # FdInfo, NOFD, or None when never set
    call: FdInfo | str | None = None
    err: FdInfo | str | None = None
    enabled: bool | None = None          # None: never set by SET_VRING_ENABLE
    started: bool = False
    ever_started: bool = False

    @property
    def has_address(self) -> bool:
        return self.desc is not None


@dataclass
class MemoryRegion:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    fd: FdInfo | None
    number: int                          # the message that set it

    @property
    def gpa_end(self) -> int:
        return self.guest_phys_addr + self.memory_size

    def same_region(self, other) -> bool:
        """REM_MEM_REG matches on gpa, uaddr and size; mmap_offset is ignored (spec). `other`: a MemoryRegion
        or a decoded region payload (both have these fields)."""
        return (self.guest_phys_addr, self.userspace_addr, self.memory_size) == \
            (other.guest_phys_addr, other.userspace_addr, other.memory_size)

    def summary(self) -> str:
        fd = f" fd={self.fd.summary()}" if self.fd else ""
        return f"gpa={self.guest_phys_addr:#x}-{self.gpa_end:#x} size={self.memory_size:#x} " \
               f"uaddr={self.userspace_addr:#x} off={self.mmap_offset:#x}{fd} (#{self.number})"


@dataclass
class ConnectionState:
    """One connection's session as of the last record fed."""
    connection: int
    profile: cat.Profile = cat.SPEC_PROFILE
    device_type: str | None = None
    device_source: str = ""                 # how the device type was decided (stated, or inferred from what)
    features_offered: int | None = None
    features_acked: int | None = None
    protocol_features_offered: int | None = None
    protocol_features_acked: int | None = None
    queue_num: int | None = None
    max_mem_slots: int | None = None
    regions: list[MemoryRegion] = field(default_factory=list)
    memory_mode: str = ""                # "table" (SET_MEM_TABLE) or "slots" (ADD/REM_MEM_REG)
    vrings: dict[int, VringState] = field(default_factory=dict)
    backend_channel: FdInfo | None = None
    backend_channel_number: int | None = None
    log_fd: FdInfo | None = None
    status: int | None = None
    owner_set: bool = False
    postcopy_listening: bool = False
    first_number: int | None = None
    last_number: int | None = None
    first_ns: int | None = None
    last_ns: int | None = None
    messages: int = 0
    connected_note: str = ""
    ended_number: int | None = None
    ended_note: str = ""
    history: list[tuple[int, str]] = field(default_factory=list)   # milestones for the report
    last_request_message: tuple[int, Message] | None = None    # named only when asked (last_request)
    history_not_kept: int = 0
    recent: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=RECENT_KEPT))  # (ordinal, record)

    # --- what the negotiation allows -------------------------------------------------------------------------
    def protocol_feature(self, name: str) -> bool:
        return protocol_feature_set(self.profile, self.protocol_features_acked or 0, name)

    @property
    def protocol_features_available(self) -> bool:
        """Bit 30 offered or acked: GET/SET_PROTOCOL_FEATURES may come before SET_FEATURES (spec)."""
        word = (self.features_offered or 0) | (self.features_acked or 0)
        return bool(word >> PROTOCOL_FEATURES_BIT & 1)

    def gate_open(self, gate: str) -> bool:
        return not gate or not gate_closed_test(gate, self.profile)(self)

    @property
    def packed_ring(self) -> bool:
        return bool((self.features_acked or 0) >> RING_PACKED_BIT & 1)

    @property
    def suspended(self) -> bool:
        """All rings stopped (spec: the back-end then sends nothing on its channel), once any ring ever ran."""
        ever_started = False
        for vring in self.vrings.values():      # a plain loop: asked for every back-end request
            if vring.started:
                return False
            ever_started = ever_started or vring.ever_started
        return ever_started

    @property
    def last_request(self) -> tuple[int, str] | None:
        """(record number, name) of the connection's last request."""
        if self.last_request_message is None:
            return None
        number, message = self.last_request_message
        return number, message.name

    @property
    def ended(self) -> bool:
        return self.ended_number is not None

    def vring(self, index: int) -> VringState:
        if index not in self.vrings:
            self.vrings[index] = VringState(index)
        return self.vrings[index]

    def _milestone(self, milestone: tuple[int, str]) -> None:
        """(message number, text) for the report's start-and-stop history, up to HISTORY_KEPT."""
        if len(self.history) < HISTORY_KEPT:
            self.history.append(milestone)
        else:
            self.history_not_kept += 1

    # --- feeding -----------------------------------------------------------------------------------------------
    def feed(self, number: int, record: Record, message: Message | None) -> None:
        if self.first_number is None:
            self.first_number, self.first_ns = number, record.timestamp_ns
        self.last_number, self.last_ns = number, record.timestamp_ns
        if record.kind == _EVENT:
            self._event(number, record)
            return
        self.messages += 1
        self.recent.append((self.messages, number))
        if message is None:
            return
        channel = message.channel
        if message.is_reply:
            kind = message.kind
            if kind is None or channel != _MAIN:
                return
            context = message.context
            if context.device_type:
                self.device_type, self.device_source = context.device_type, context.device_source
            handler = _REPLY_HANDLERS.get(kind)
            if handler is not None:
                handler(self, message)
            return
        if channel == _MAIN:
            self.last_request_message = (number, message)
            if message.kind is None:
                return
            context = message.context
            if context.device_type:
                self.device_type, self.device_source = context.device_type, context.device_source
            if record.direction == _FRONTEND_SENDS:
                request_handler = _REQUEST_HANDLERS.get(message.request)
                if request_handler is not None:
                    request_handler(self, number, record, message)
        elif channel != _DEVICE_STATE:
            self.last_request_message = (number, message)       # a migration-stream chunk is not a request

    def in_record_numbers(self, text: str) -> str:
        """A note of the proxy's with its "message #N" (the connection's N-th message) as the record number that
        `read` shows; a message no longer known (or never recorded) is named as the connection's N-th."""
        known = dict(self.recent)

        def record_number(match: re.Match) -> str:
            ordinal = int(match.group(1))
            return f"message #{known[ordinal]}" if ordinal in known else f"the connection's message {ordinal}"
        return _MESSAGE_ORDINAL.sub(record_number, text)

    def _event(self, number: int, record: Record) -> None:
        note = self.in_record_numbers(record.note)
        kind = classify_event(record)
        if kind == "channel-end":
            self._milestone((number, note))
            if record.channel == Channel.BACKEND:
                self.backend_channel = None
        elif kind == "connect" and not self.connected_note:
            self.connected_note = note
        elif kind == "end" and not self.ended:
            self.ended_number, self.ended_note = number, note
            self._milestone((number, f"connection ended: {note}"))

    # Replies, by payload kind (each applies only to the request that asks for it).
    def _features_reply(self, message: Message) -> None:
        if message.request == F.GET_FEATURES:
            self.features_offered = message.payload["features"]

    def _protocol_features_reply(self, message: Message) -> None:
        if message.request == F.GET_PROTOCOL_FEATURES:
            self.protocol_features_offered = message.payload["protocol_features"]

    def _queue_num_reply(self, message: Message) -> None:
        self.queue_num = message.payload["queue_num"]

    def _mem_slots_reply(self, message: Message) -> None:
        self.max_mem_slots = message.payload["mem_slots"]

    def _vring_base_reply(self, message: Message) -> None:
        if message.request == F.GET_VRING_BASE:
            self.vring(message.payload["index"]).base = message.payload["num"]

    def _status_reply(self, message: Message) -> None:
        if message.request == F.GET_STATUS:
            self.status = message.payload["status"]

    # Front-end requests, by request (the payload is read only where a request needs it).
    def _set_features(self, number: int, record: Record, message: Message) -> None:
        features = message.payload["features"]
        if features != self.features_acked:
            self._milestone((number, f"features acked {features:#x}"))
        self.features_acked = features

    def _set_protocol_features(self, number: int, record: Record, message: Message) -> None:
        self.protocol_features_acked = message.payload["protocol_features"]

    def _set_owner(self, number: int, record: Record, message: Message) -> None:
        self.owner_set = True

    def _reset_owner(self, number: int, record: Record, message: Message) -> None:
        self.owner_set = False

    def _set_mem_table(self, number: int, record: Record, message: Message) -> None:
        if not (message.kind or "").startswith("mem_table"):
            return
        if message.payload["nregions"] == 0 and self.postcopy_listening:
            return          # QEMU's empty table acknowledging the back-end's postcopy bases
        self.memory_mode = "table"
        self.regions = [MemoryRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset,
                                     record.fds[i] if i < len(record.fds) else None, number)
                        for i, r in enumerate(message.payload["region"])]
        self._milestone((number, f"memory table: {len(self.regions)} region(s)"))

    def _add_mem_reg(self, number: int, record: Record, message: Message) -> None:
        if not (message.kind or "").startswith("mem_region"):
            return
        r = message.payload["region"]
        region = MemoryRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset,
                              record.fds[0] if record.fds else None, number)
        self.memory_mode = "slots"
        self.regions = [old for old in self.regions if not old.same_region(region)] + [region]
        self._milestone((number, f"memory region added gpa={region.guest_phys_addr:#x} "
                                 f"size={region.memory_size:#x}"))

    def _rem_mem_reg(self, number: int, record: Record, message: Message) -> None:
        if not (message.kind or "").startswith("mem_region"):
            return
        r = message.payload["region"]
        gone = MemoryRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset, None, number)
        self.regions = [old for old in self.regions if not old.same_region(gone)]
        self._milestone((number, f"memory region removed gpa={gone.guest_phys_addr:#x}"))

    def _set_log_fd(self, number: int, record: Record, message: Message) -> None:
        self.log_fd = record.fds[0] if record.fds else None

    def _set_vring_num(self, number: int, record: Record, message: Message) -> None:
        payload = message.payload
        self.vring(payload["index"]).num = payload["num"]

    def _set_vring_addr(self, number: int, record: Record, message: Message) -> None:
        payload = message.payload
        vring = self.vrings.get(payload["index"]) or self.vring(payload["index"])
        vring.desc, vring.used, vring.avail = payload["desc"], payload["used"], payload["avail"]
        vring.log, vring.addr_flags = payload["log"], payload["flags"]

    def _set_vring_base(self, number: int, record: Record, message: Message) -> None:
        payload = message.payload
        self.vring(payload["index"]).base = payload["num"]

    def _set_vring_fd(self, number: int, record: Record, message: Message) -> None:
        payload = message.payload
        vring = self.vring(payload["index"])
        slot = NOFD if payload["flags"] & 1 else record.fds[0] if record.fds else None
        request = message.request
        setattr(vring, _VRING_FD_SLOTS[request], slot)
        if request == F.SET_VRING_KICK:
            self._start(number, vring, "SET_VRING_KICK")

    def _vring_kick(self, number: int, record: Record, message: Message) -> None:
        self._start(number, self.vring(message.payload["index"]), "VRING_KICK")

    def _get_vring_base(self, number: int, record: Record, message: Message) -> None:
        vring = self.vring(message.payload["index"])
        if vring.started:
            vring.started = False
            self._milestone((number, f"ring {vring.index} stopped (GET_VRING_BASE)"
                                     + (", device suspended" if self.suspended else "")))

    def _set_vring_enable(self, number: int, record: Record, message: Message) -> None:
        index, enabled = message.payload["index"], message.payload["num"]
        self.vring(index).enabled = bool(enabled)
        self._milestone((number, f"ring {index} {'enabled' if enabled else 'disabled'}"))

    def _set_backend_req_fd(self, number: int, record: Record, message: Message) -> None:
        self.backend_channel, self.backend_channel_number = record.fds[0] if record.fds else None, number

    def _set_status(self, number: int, record: Record, message: Message) -> None:
        status = message.payload["status"]
        self.status = status
        self._milestone((number, f"status {cat.bit_names(status, cat.DEVICE_STATUS)}"))

    def _postcopy_listen(self, number: int, record: Record, message: Message) -> None:
        self.postcopy_listening = True

    def _postcopy_end(self, number: int, record: Record, message: Message) -> None:
        self.postcopy_listening = False

    def _start(self, number: int, vring: VringState, how: str) -> None:
        if not vring.started:
            vring.started = vring.ever_started = True
            self._milestone((number, f"ring {vring.index} started ({how})"))

    # --- showing -----------------------------------------------------------------------------------------------
    def _feature_text(self, value: int | None) -> str:
        return "(not seen)" if value is None else _hex_and_bits(value, cat.feature_names(self.device_type))

    def _protocol_text(self, value: int | None) -> str:
        return "(not seen)" if value is None else _hex_and_bits(value, self.profile.protocol_features)

    def negotiation_lines(self) -> list[str]:
        device = f"{self.device_type} ({self.device_source})" if self.device_source else \
            self.device_type or "unknown (nothing in the session tells it; --device TYPE names it)"
        return [
            f"device: {device}",
            f"features offered:          {self._feature_text(self.features_offered)}",
            f"features acked:            {self._feature_text(self.features_acked)}",
            f"protocol features offered: {self._protocol_text(self.protocol_features_offered)}",
            f"protocol features acked:   {self._protocol_text(self.protocol_features_acked)}",
            f"queues: {_maybe(self.queue_num)}   memory slots: {_maybe(self.max_mem_slots)}   "
            f"owner set: {_yes(self.owner_set)}",
        ]

    def format(self, negotiation: bool = True) -> str:
        """The whole state, several lines, for `vhusniff state` and for the proxy when a connection ends."""
        device = self.device_type or "unknown device"
        lines = [f"connection {self.connection} ({device}), {self.messages} messages"
                 + (f", #{self.first_number}-#{self.last_number}" if self.first_number else "")]
        if negotiation:
            lines += ["  " + line for line in self.negotiation_lines()]
        status = "(not set)" if self.status is None else _hex_and_bits(self.status, cat.DEVICE_STATUS)
        lines.append(f"  device status: {status}   suspended: {_yes(self.suspended)}")
        channel = f"{self.backend_channel.summary()} (#{self.backend_channel_number})" if self.backend_channel \
            else "(none)"
        lines.append(f"  back-end channel: {channel}")
        lines.append(f"  memory ({self.memory_mode or 'none'}): {len(self.regions)} region(s)")
        lines += ["    " + region.summary() for region in self.regions]
        for index in sorted(self.vrings):
            lines.append("  " + self._vring_line(self.vrings[index]))
        if self.ended:
            lines.append(f"  ended at #{self.ended_number}: {self.ended_note}")
        return "\n".join(lines)

    def _vring_line(self, v: VringState) -> str:
        if v.enabled is None:
            # Without protocol features a ring is enabled from the start; with them, disabled until enabled.
            enabled = "no" if self.protocol_feature_negotiated else "yes (no protocol features)"
        else:
            enabled = _yes(v.enabled)
        address = "addr (not set)" if not v.has_address else \
            f"desc={v.desc:#x} used={v.used:#x} avail={v.avail:#x} log={v.log:#x}"
        return f"vring {v.index}: num={_maybe(v.num)} base={_maybe(v.base)} {address} kick={_fd(v.kick)} " \
               f"call={_fd(v.call)} err={_fd(v.err)} enabled={enabled} started={_yes(v.started)}"

    @property
    def protocol_feature_negotiated(self) -> bool:
        return bool((self.features_acked or 0) >> PROTOCOL_FEATURES_BIT & 1)



# What a front-end request or a reply (by payload kind) changes in the state: one lookup per message.
_REQUEST_HANDLERS: dict[int, Callable[[ConnectionState, int, Record, Message], None]] = {
    F.SET_FEATURES: ConnectionState._set_features,
    F.SET_PROTOCOL_FEATURES: ConnectionState._set_protocol_features,
    F.SET_OWNER: ConnectionState._set_owner,
    F.RESET_OWNER: ConnectionState._reset_owner,
    F.SET_MEM_TABLE: ConnectionState._set_mem_table,
    F.ADD_MEM_REG: ConnectionState._add_mem_reg,
    F.REM_MEM_REG: ConnectionState._rem_mem_reg,
    F.SET_LOG_FD: ConnectionState._set_log_fd,
    F.SET_VRING_NUM: ConnectionState._set_vring_num,
    F.SET_VRING_ADDR: ConnectionState._set_vring_addr,
    F.SET_VRING_BASE: ConnectionState._set_vring_base,
    F.SET_VRING_KICK: ConnectionState._set_vring_fd,
    F.SET_VRING_CALL: ConnectionState._set_vring_fd,
    F.SET_VRING_ERR: ConnectionState._set_vring_fd,
    F.VRING_KICK: ConnectionState._vring_kick,
    F.GET_VRING_BASE: ConnectionState._get_vring_base,
    F.SET_VRING_ENABLE: ConnectionState._set_vring_enable,
    F.SET_BACKEND_REQ_FD: ConnectionState._set_backend_req_fd,
    F.SET_STATUS: ConnectionState._set_status,
    F.POSTCOPY_LISTEN: ConnectionState._postcopy_listen,
    F.POSTCOPY_END: ConnectionState._postcopy_end,
}
_VRING_FD_SLOTS = {F.SET_VRING_KICK: "kick", F.SET_VRING_CALL: "call", F.SET_VRING_ERR: "err"}
_REPLY_HANDLERS: dict[str, Callable[[ConnectionState, Message], None]] = {
    "features": ConnectionState._features_reply,
    "protocol_features": ConnectionState._protocol_features_reply,
    "queue_num": ConnectionState._queue_num_reply,
    "mem_slots": ConnectionState._mem_slots_reply,
    "vring_base": ConnectionState._vring_base_reply,
    "vring_base_packed": ConnectionState._vring_base_reply,
    "status": ConnectionState._status_reply,
}

def _maybe(value) -> str:
    return "?" if value is None else str(value)


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _fd(slot) -> str:
    if slot is None:
        return "-"
    if slot == NOFD:
        return NOFD
    if slot.kind == "eventfd" and slot.name.startswith("eventfd-id:"):
        return slot.name        # eventfd-id:N; every eventfd has the same inode
    return slot.kind + (f":{slot.inode}" if slot.inode else "")
