"""The vhost-user wire grammar (construct) and the decoder/encoder built on it.

Every payload layout is declared once, below, as a construct Struct; the scapy layers, the field names, the
filters and the Lua dissector are derived from these declarations. All fields are in the peers' native byte
order, which is little-endian on every host QEMU runs vhost-user on in practice (x86, arm64, riscv64).

Decoding never raises on bad input: a malformed or unknown message becomes a Message whose payload is kept as
raw bytes, with Problems saying what is wrong. `encode(decode(b)) == b` for every input.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from construct import (
    Array,
    Bytes,
    BytesInteger,
    Container,
    GreedyBytes,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    ListContainer,
    Struct,
    this,
)

from ..model import Channel
from . import catalogue as cat
from . import config as config_space

HEADER_SIZE = 12
# The main channel's framing limit (catalogue.max_payload has every channel's and request's).
MAX_PAYLOAD_SIZE = cat.MAIN_MAX_PAYLOAD
LARGEST_SPEC_PAYLOAD = 8 + 256 * 8

# The header, as construct (the declaration) and as struct (the fast path; a test asserts they agree).
HEADER = Struct(
    "request" / Int32ul,         # request number, per channel
    "flags" / Int32ul,           # bits 0-1 version (1), bit 2 REPLY, bit 3 NEED_REPLY, bits 4-31 reserved
    "size" / Int32ul,            # payload length in bytes
)
HEADER_STRUCT = struct.Struct("<III")


def _u64(name: str, doc: str) -> Struct:
    return Struct(name / Int64ul * doc)


REGION = Struct(
    "guest_phys_addr" / Int64ul * "guest physical address of the region",
    "memory_size" / Int64ul * "size in bytes",
    "userspace_addr" / Int64ul * "front-end virtual address (equals the GPA with GPA_ADDRESSES)",
    "mmap_offset" / Int64ul * "offset of the region in the fd's mapping",
)
REGION_XEN = Struct(
    *REGION.subcons,
    "xen_mmap_flags" / Int32ul * "bit 0 foreign, bit 1 grant, bit 8 map on demand",
    "domid" / Int32ul * "Xen domain id",
)

_GPU_DMABUF_SCANOUT = (
    "scanout_id" / Int32ul * "scanout to set",
    "x" / Int32ul * "scanout x in the DMABUF",
    "y" / Int32ul * "scanout y in the DMABUF",
    "width" / Int32ul * "scanout width, 0 disables it (no fd)",
    "height" / Int32ul * "scanout height",
    "fd_width" / Int32ul * "DMABUF width",
    "fd_height" / Int32ul * "DMABUF height",
    "fd_stride" / Int32ul * "DMABUF stride",
    "fd_flags" / Int32ul * "DMABUF flags (bit 0 Y_0_TOP)",
    "fd_drm_fourcc" / Int32ul * "DMABUF DRM fourcc",
)
_GPU_CTRL_HEADER = (      # struct virtio_gpu_ctrl_hdr
    "type" / Int32ul * "virtio-gpu response type (0x1101 OK_DISPLAY_INFO, 0x1104 OK_EDID)",
    "flags" / Int32ul * "virtio-gpu header flags",
    "fence_id" / Int64ul * "fence id",
    "ctx_id" / Int32ul * "3D context id",
    "ring_idx" / Int8ul * "ring index",
    "padding" / Bytes(3) * "zero",
)
GPU_PMODE = struct.Struct("<6I")     # one scanout of a display info: x, y, width, height, enabled, flags

# Payload kinds: name -> (construct Struct, dotted-name prefix, one-line description).
# A kind's fields are named `<prefix>.<field>` in the field tree, the filters and the Lua dissector.
PAYLOADS: dict[str, tuple[Struct, str, str]] = {
    "empty": (Struct(), "", "no payload"),
    "u64": (_u64("value", "a u64 whose meaning the spec leaves open"), "u64", "u64"),
    "ack": (_u64("ack", "REPLY_ACK status: 0 success, anything else failure"), "", "REPLY_ACK u64"),
    "features": (_u64("features", "virtio feature bits"), "", "virtio features"),
    "protocol_features": (_u64("protocol_features", "VHOST_USER_PROTOCOL_F_* bits"), "", "protocol features"),
    "queue_num": (_u64("queue_num", "number of queues the back-end supports"), "", "queue count"),
    "mem_slots": (_u64("mem_slots", "memory slots the back-end supports"), "", "memory slot count"),
    "status": (_u64("status", "virtio device status bits"), "", "device status"),
    "mtu": (_u64("mtu", "MTU in bytes"), "", "MTU"),
    "session_id": (_u64("session_id", "crypto session id"), "crypto", "crypto session id"),
    "vring_state": (Struct(
        "index" / Int32ul * "vring index",
        "num" / Int32ul * "ring size, enable flag, endianness or GET_VRING_BASE mode, per request",
    ), "vring", "vring state"),
    "vring_base": (Struct(
        "index" / Int32ul * "vring index",
        "num" / Int32ul * "split ring: next avail index in bits 0-15",
    ), "vring", "vring base (split ring)"),
    "vring_base_packed": (Struct(
        "index" / Int32ul * "vring index",
        "num" / Int32ul * "bits 0-14 avail idx, 15 avail wrap, 16-30 used idx, 31 used wrap",
    ), "vring", "vring base (packed ring)"),
    "vring_addr": (Struct(
        "index" / Int32ul * "vring index",
        "flags" / Int32ul * "bit 0 VHOST_VRING_F_LOG",
        "desc" / Int64ul * "descriptor table address",
        "used" / Int64ul * "used ring address",
        "avail" / Int64ul * "available ring address",
        "log" / Int64ul * "used ring log address (guest physical)",
    ), "vring", "vring address"),
    "vring_fd": (Struct(
        "index" / Int8ul * "vring index (bits 0-7 of the u64)",
        "flags" / Int8ul * "bit 0 NOFD (bit 8 of the u64): no fd, poll instead",
        "reserved" / BytesInteger(6, swapped=True) * "bits 16-63, zero",
    ), "vring", "vring index and NOFD"),
    "mem_table": (Struct(
        "nregions" / Int32ul * "number of regions that follow",
        "padding" / Int32ul * "zero",
        "region" / Array(this.nregions, REGION) * "one per fd, in fd order",
    ), "mem", "memory table"),
    "mem_table_xen": (Struct(
        "nregions" / Int32ul * "number of regions that follow",
        "padding" / Int32ul * "zero",
        "region" / Array(this.nregions, REGION_XEN) * "one per fd, in fd order",
    ), "mem", "memory table (XEN_MMAP regions)"),
    "mem_region": (Struct(
        "padding" / Int64ul * "zero",
        "region" / REGION,
    ), "mem", "single memory region"),
    "mem_region_xen": (Struct(
        "padding" / Int64ul * "zero",
        "region" / REGION_XEN,
    ), "mem", "single memory region (XEN_MMAP)"),
    "log": (Struct(
        "mmap_size" / Int64ul * "size of the log area",
        "mmap_offset" / Int64ul * "offset of the log in the fd",
    ), "log", "dirty log area"),
    "iotlb": (Struct(
        "iova" / Int64ul * "I/O virtual address",
        "size" / Int64ul * "length in bytes",
        "uaddr" / Int64ul * "user address (a GPA with GPA_ADDRESSES, except in back-end messages)",
        "perm" / Int8ul * "0 none, 1 RO, 2 WO, 3 RW",
        "type" / Int8ul * "1 miss, 2 update, 3 invalidate, 4 access fail",
        "padding" / Bytes(6) * "natural padding of struct vhost_iotlb_msg",
    ), "iotlb", "IOTLB message"),
    "config": (Struct(
        "offset" / Int32ul * "offset in the device config space",
        "size" / Int32ul * "length of data",
        "flags" / Int32ul * "0 front-end write, 1 live migration",
        "data" / Bytes(this.size) * "config space bytes",
    ), "config", "device config space"),
    "vring_area": (Struct(
        "index" / Int8ul * "vring index (bits 0-7 of the u64)",
        "flags" / Int8ul * "bit 0 NOFD: no fd, de-register",
        "reserved" / BytesInteger(6, swapped=True) * "bits 16-63, zero",
        "size" / Int64ul * "size of the area",
        "offset" / Int64ul * "offset in the fd",
    ), "vring_area", "vring host-notifier area"),
    "inflight": (Struct(
        "mmap_size" / Int64ul * "size of the inflight area",
        "mmap_offset" / Int64ul * "offset in the fd",
        "num_queues" / Int16ul * "queues covered",
        "queue_size" / Int16ul * "descriptors per queue",
        "padding" / Bytes(4) * "natural padding",
    ), "inflight", "inflight area"),
    "object": (Struct(
        "uuid" / Bytes(16) * "shared object UUID (first three fields big-endian)",
    ), "object", "shared object"),
    "device_state": (Struct(
        "direction" / Int32ul * "0 save (back-end to front-end), 1 load",
        "phase" / Int32ul * "0 stopped",
    ), "device_state", "device-state transfer"),
    "device_state_result": (Struct(
        "error" / Int8ul * "0 ok",
        "flags" / Int8ul * "bit 0: no fd returned",
        "reserved" / BytesInteger(6, swapped=True) * "zero",
    ), "device_state", "device-state transfer result"),
    "mmap": (Struct(
        "shmid" / Int8ul * "shared memory region id",
        "padding" / Bytes(7) * "zero",
        "fd_offset" / Int64ul * "offset in the fd",
        "shm_offset" / Int64ul * "offset in the shared memory region",
        "len" / Int64ul * "length",
        "flags" / Int64ul * "bit 0: 1 read-write, 0 read-only",
    ), "shmem", "shared memory map request"),
    "shmem_config": (Struct(
        "nregions" / Int32ul * "regions in use",
        "padding" / Int32ul * "zero",
        "memory_sizes" / Array(256, Int64ul) * "size per shmid, 0 unused",
    ), "shmem", "shared memory configuration"),
    "rarp": (Struct(
        "mac" / Bytes(6) * "guest MAC address",
        "padding" / Bytes(2) * "rest of the u64",
    ), "rarp", "RARP MAC"),
    # Not defined in the spec: QEMU's internal struct, whose layout changed between versions.
    "crypto_session": (Struct("session" / GreedyBytes * "QEMU-internal crypto session struct"), "crypto",
                       "crypto session (opaque, QEMU-version dependent)"),
    # ---- the vhost-user-gpu socket (catalogue.GPU_REQUESTS) ----
    "gpu_protocol_features": (_u64("gpu_protocol_features", "VHOST_USER_GPU_PROTOCOL_F_* bits (EDID, DMABUF2)"),
                              "", "GPU protocol features"),
    "gpu_cursor_pos": (Struct(
        "scanout_id" / Int32ul * "scanout the cursor is on",
        "x" / Int32ul * "cursor x",
        "y" / Int32ul * "cursor y",
    ), "gpu.cursor", "GPU cursor position"),
    "gpu_cursor_update": (Struct(
        "scanout_id" / Int32ul * "scanout the cursor is on",
        "x" / Int32ul * "cursor x",
        "y" / Int32ul * "cursor y",
        "hot_x" / Int32ul * "hot spot x",
        "hot_y" / Int32ul * "hot spot y",
        "image" / Bytes(64 * 64 * 4) * "64x64 cursor, a8r8g8b8",
    ), "gpu.cursor", "GPU cursor shape and position"),
    "gpu_scanout": (Struct(
        "scanout_id" / Int32ul * "scanout to set",
        "width" / Int32ul * "width, 0 disables the scanout",
        "height" / Int32ul * "height",
    ), "gpu.scanout", "GPU scanout size"),
    "gpu_update": (Struct(
        "scanout_id" / Int32ul * "scanout to update",
        "x" / Int32ul * "rectangle x",
        "y" / Int32ul * "rectangle y",
        "width" / Int32ul * "rectangle width",
        "height" / Int32ul * "rectangle height",
        "data" / GreedyBytes * "the rectangle's pixels, x8r8g8b8 (none in DMABUF_UPDATE)",
    ), "gpu.update", "GPU display update"),
    "gpu_dmabuf_scanout": (Struct(*_GPU_DMABUF_SCANOUT), "gpu.dmabuf", "GPU DMABUF scanout"),
    "gpu_dmabuf_scanout2": (Struct(
        *_GPU_DMABUF_SCANOUT,
        "modifier" / Int64ul * "DMABUF format modifier",
    ), "gpu.dmabuf", "GPU DMABUF scanout with modifier"),
    "gpu_edid_request": (Struct(
        "scanout_id" / Int32ul * "scanout whose EDID is asked",
    ), "gpu.edid", "GPU EDID request"),
    # virtio-gpu responses (struct virtio_gpu_resp_display_info, virtio_gpu_resp_edid), header first.
    "gpu_display_info": (Struct(
        *_GPU_CTRL_HEADER,
        "pmodes" / Bytes(16 * 24) * "16 scanouts: x, y, width, height, enabled, flags (u32 each)",
    ), "gpu.display", "GPU display info"),
    "gpu_edid": (Struct(
        *_GPU_CTRL_HEADER,
        "size" / Int32ul * "EDID bytes used",
        "reserved" / Int32ul * "padding, zero",
        "edid" / Bytes(1024) * "EDID blob",
    ), "gpu.edid", "GPU EDID"),
    "opaque": (Struct("payload" / GreedyBytes * "payload of a proposed request"), "", "opaque payload"),
}

# Fixed wire size per kind (None when it varies): a size mismatch is known before parsing.
FIXED_SIZE = MappingProxyType({
    kind: (structure.sizeof() if not _variable else None)
    for kind, (structure, _prefix, _doc) in PAYLOADS.items()
    for _variable in [kind in ("mem_table", "mem_table_xen", "config", "crypto_session", "gpu_update", "opaque")]
})


def _compile_all() -> dict:
    """A parse function per kind: construct's compiled code (several times faster), called without the
    per-call stream and context set-up of Compiled.parse. A test checks parity with the interpreted grammar."""
    parsers = {}
    for kind, (structure, _prefix, _doc) in PAYLOADS.items():
        try:
            parse_function = structure.compile().parsefunc
            parsers[kind] = lambda data, _f=parse_function: _f(io.BytesIO(data), {"_params": {}})
        except Exception:  # construct cannot compile every construct; the interpreted one is equivalent
            parsers[kind] = structure.parse
    return parsers


PARSERS = _compile_all()


@dataclass(frozen=True, slots=True)
class Problem:
    """What is wrong with a message: a stable code (for filters and tests) and a sentence for people."""
    code: str
    text: str

    def __str__(self) -> str:
        return f"{self.code}: {self.text}"


@dataclass(frozen=True, slots=True)
class DecodeContext:
    """What the session has negotiated so far; it changes how some payloads read."""
    device_type: str | None = None         # net, blk, scsi, fs, gpu, vsock, input, crypto
    features: int = 0                      # acked virtio features
    protocol_features: int = 0             # acked protocol features
    profile: cat.Profile = cat.SPEC_PROFILE
    # how the device type was decided ("stated by the capture", "inferred from NET_SET_MTU", ...), for people
    device_source: str = field(default="", compare=False)

    @property
    def xen_mmap(self) -> bool:
        return bool(self.protocol_features >> 17 & 1)

    @property
    def packed_ring(self) -> bool:
        return bool(self.features >> 34 & 1)


DEFAULT_CONTEXT = DecodeContext()

_REQUEST_TABLES = MappingProxyType({
    Channel.MAIN: cat.FRONTEND_REQUESTS,
    Channel.BACKEND: cat.BACKEND_REQUESTS,
    Channel.GPU: cat.GPU_REQUESTS,
})


def request_table(channel: Channel):
    return _REQUEST_TABLES.get(channel, {})


# channel -> the only requests that can be replies on it (HEADER_RULES' replied); on another channel, any request
_REPLIED = {channel: rule.replied for channel, rule in cat.HEADER_RULES.items() if rule.replied is not None}


def is_reply_flag(channel: Channel, request: int, flags: int) -> bool:
    """Whether a message with these header fields is a reply: its REPLY bit, on a channel where only some requests
    are answered (the GPU socket) only for those."""
    return bool(flags & cat.FLAG_REPLY) and (channel not in _REPLIED or request in _REPLIED[channel])


# SET_DEVICE_STATE_FD's pipe carries the back-end's opaque migration stream, not vhost-user messages.
STREAM_NAME = "DEVICE_STATE_STREAM"
STREAM_REQUEST = -2


def request_names(channel: Channel, profile: cat.Profile = cat.SPEC_PROFILE):
    """The profile's number-to-name table for the requests of one channel (empty for the device-state pipe)."""
    return {Channel.MAIN: profile.frontend_names, Channel.BACKEND: profile.backend_names,
            Channel.GPU: profile.gpu_names}.get(channel, {})


def request_name(channel: Channel, request: int, profile: cat.Profile = cat.SPEC_PROFILE) -> str:
    if channel == Channel.DEVICE_STATE:
        return STREAM_NAME
    if request < 0:
        return "(truncated header)"
    return request_names(channel, profile).get(request) or f"UNKNOWN_{request}"


def payload_candidates(channel: Channel, request: int, is_reply: bool, ctx: DecodeContext) -> tuple[str, ...]:
    """The payload kinds a message may carry, most likely first."""
    if request not in request_table(channel):
        return ()      # not cached: a peer sending every u32 would otherwise grow the cache without end
    key = (channel, request, is_reply, ctx.xen_mmap, ctx.packed_ring)
    kinds = _CANDIDATES.get(key)
    if kinds is None:
        kinds = _CANDIDATES[key] = _candidates(*key)
    return kinds


# Keyed by known requests only: at most channels x requests x 8 entries.
_CANDIDATES: dict[tuple, tuple[str, ...]] = {}


def _candidates(channel: Channel, request: int, is_reply: bool, xen_mmap: bool, packed_ring: bool):
    spec = request_table(channel).get(request)
    if spec is None:
        return ()
    kinds = spec.reply_kinds if is_reply else spec.request_kinds
    if xen_mmap:
        kinds = tuple(k + "_xen" if k in ("mem_table", "mem_region") else k for k in kinds)
    else:
        # Without the negotiated context, a Xen table is still recognised by its size.
        kinds = kinds + tuple(k + "_xen" for k in kinds if k in ("mem_table", "mem_region"))
    if packed_ring:
        kinds = tuple("vring_base_packed" if k == "vring_base" else k for k in kinds)
    if is_reply and "ack" not in kinds and channel != Channel.GPU:
        # REPLY_ACK: any request may be answered with a u64 when NEED_REPLY was set (the GPU socket has no acks).
        kinds = kinds + ("ack",)
    return kinds


class Message:
    """One decoded vhost-user message: the exact bytes, the header, the payload (or raw bytes) and problems."""

    __slots__ = ("raw", "channel", "request", "flags", "size", "kind", "payload", "problems", "context", "is_reply")

    def __init__(self, raw: bytes, channel: Channel, request: int, flags: int, size: int, kind: str | None,
                 payload: Container | None, problems: tuple[Problem, ...], context: DecodeContext):
        self.raw = raw
        self.channel = channel
        self.request = request
        self.flags = flags
        self.size = size
        self.kind = kind             # payload kind name, or None when the payload is kept raw
        # The construct Container of `kind`, or None when `kind` is None: readers test `kind` first, so the
        # attribute is typed as the Container's dynamic fields (Any) rather than an Optional to unwrap.
        self.payload: Any = payload
        self.problems = problems
        self.context = context
        # the REPLY bit, except on the GPU socket for a request nothing answers (there it is uninitialised memory):
        # is_reply_flag, inline
        self.is_reply = bool(flags & cat.FLAG_REPLY) and (channel not in _REPLIED or request in _REPLIED[channel])

    @property
    def need_reply(self) -> bool:
        rule = cat.HEADER_RULES.get(self.channel)
        return bool(rule and self.flags & rule.need_reply)

    @property
    def name(self) -> str:
        return request_name(self.channel, self.request, self.context.profile)

    @property
    def payload_bytes(self) -> bytes:
        return self.raw[HEADER_SIZE:]

    @property
    def spec(self) -> cat.RequestSpec | None:
        return request_table(self.channel).get(self.request)

    def summary(self) -> str:
        return summarize(self)

    def __repr__(self) -> str:
        return f"<Message {self.summary()}>"


# ---- one-line summaries: how a message reads to a person (scapy's mysummary) ----

# Fields never worth a place in a one-line summary.
QUIET_FIELDS = frozenset({"padding", "reserved"})
# Short names for the summary line, as people write them in bug reports.
SHORT_NAMES = {"index": "idx", "guest_phys_addr": "gpa", "memory_size": "size", "userspace_addr": "uaddr",
               "mmap_offset": "off"}


def flag_text(flags: int) -> str:
    """`0x9 NEED_REPLY`, `0x5 REPLY`, with reserved bits called out."""
    names = []
    if flags & cat.FLAG_REPLY:
        names.append("REPLY")
    if flags & cat.FLAG_NEED_REPLY:
        names.append("NEED_REPLY")
    if flags & cat.FLAGS_RESERVED:
        names.append(f"RESERVED({flags & cat.FLAGS_RESERVED:#x})")
    return f"{flags:#x}" + (" " + "|".join(names) if names else "")


def value_text(message: Message, name: str, value) -> str:
    """A field's value as a person wants it: feature words as bit names, addresses in hex."""
    ctx = message.context
    if name == "features":
        return bit_names_with_hex(value, cat.feature_names(ctx.device_type))
    if name == "protocol_features":
        return bit_names_with_hex(value, ctx.profile.protocol_features)
    if name == "gpu_protocol_features":
        return bit_names_with_hex(value, cat.GPU_PROTOCOL_FEATURES)
    if name == "status":
        return bit_names_with_hex(value, cat.DEVICE_STATUS)
    if isinstance(value, (bytes, bytearray)):
        if name == "mac" and len(value) == 6:
            return ":".join(f"{b:02x}" for b in value)
        return value[:16].hex() + ("…" if len(value) > 16 else "") if value else "''"
    if isinstance(value, int):
        return f"{value:#x}" if value > 0xFFFF else str(value)
    if isinstance(value, list):
        return "[" + ",".join(value_text(message, "", v) for v in value[:4]) + (",…]" if len(value) > 4 else "]")
    return str(value)


def bit_names_with_hex(value: int, names) -> str:
    return f"{value:#x}({cat.bit_names(value, names)})"


def payload_summary(message: Message) -> str:
    if message.kind is None:
        if message.request == STREAM_REQUEST:
            return f"{len(message.raw)} bytes (opaque)"
        if message.request < 0:
            return message.raw.hex()
        return f"payload={len(message.payload_bytes)}B" if message.size else ""
    gpu = _GPU_SUMMARIES.get(message.kind)
    if gpu is not None:
        return gpu(message.payload)
    structure = PAYLOADS[message.kind][0]
    payload = message.payload
    parts = []
    for sub in structure.subcons:
        name = sub.name
        if name is None or name in QUIET_FIELDS:
            continue
        value = payload[name]
        if name == "region":
            regions = value if isinstance(value, list) else [value]
            for region in regions:
                parts.append(f"{{gpa={region.guest_phys_addr:#x} size={region.memory_size:#x} "
                             f"uaddr={region.userspace_addr:#x} off={region.mmap_offset:#x}}}")
            continue
        if name == "flags" and message.kind in ("vring_fd", "vring_area"):
            if value & 1:
                parts.append("NOFD")
            continue
        if name == "memory_sizes":
            used = [f"{i}:{size:#x}" for i, size in enumerate(value) if size]
            parts.append("sizes={" + ",".join(used) + "}")
            continue
        if name == "data" and message.kind == "config":
            parts.append(f"data={len(value)}B")
            device = config_space.summary(message.context.device_type, payload.offset, value) \
                if carries_config_space(message) else ""
            if device:
                parts.append(device)
            continue
        parts.append(f"{SHORT_NAMES.get(name, name)}={value_text(message, name, value)}")
    return " ".join(parts)


def _gpu_rect(payload) -> str:
    return f"scanout={payload.scanout_id} {payload.width}x{payload.height}+{payload.x}+{payload.y}"


def _gpu_display_info(payload) -> str:
    modes = [GPU_PMODE.unpack_from(payload.pmodes, offset) for offset in range(0, len(payload.pmodes), 24)]
    shown = [f"scanout{index}={w}x{h}+{x}+{y}" for index, (x, y, w, h, enabled, _flags) in enumerate(modes)
             if enabled]
    return f"type={payload.type:#x} " + (" ".join(shown) if shown else "no scanout enabled")


def _gpu_dmabuf(payload) -> str:
    text = (f"{_gpu_rect(payload)} fd={payload.fd_width}x{payload.fd_height} stride={payload.fd_stride} "
            f"fourcc={payload.fd_drm_fourcc.to_bytes(4, 'little')!r} flags={payload.fd_flags:#x}")
    return text + (f" modifier={payload.modifier:#x}" if "modifier" in payload else "")


# One-line summaries of the GPU payloads: a rectangle as WxH+X+Y, pixels and images by their byte count.
_GPU_SUMMARIES = {
    "gpu_cursor_pos": lambda p: f"scanout={p.scanout_id} x={p.x} y={p.y}",
    "gpu_cursor_update": lambda p: f"scanout={p.scanout_id} x={p.x} y={p.y} hot={p.hot_x},{p.hot_y} "
                                   f"image={len(p.image)}B",
    "gpu_scanout": lambda p: f"scanout={p.scanout_id} {p.width}x{p.height}" + (" (disable)" if not p.width else ""),
    "gpu_update": lambda p: _gpu_rect(p) + (f" pixels={len(p.data)}B" if p.data else ""),
    "gpu_dmabuf_scanout": _gpu_dmabuf,
    "gpu_dmabuf_scanout2": _gpu_dmabuf,
    "gpu_edid_request": lambda p: f"scanout={p.scanout_id}",
    "gpu_display_info": _gpu_display_info,
    "gpu_edid": lambda p: f"type={p.type:#x} edid={p.size}B",
}


def summarize(message: Message) -> str:
    """`SET_VRING_ADDR idx=0 desc=0x… used=… avail=…`, with `[problem-code]` marks when something is wrong."""
    text = message.name
    if message.is_reply:
        text += " reply"
    payload = payload_summary(message)
    if payload:
        text += " " + payload
    for problem in message.problems:
        text += f" [{problem.code}]"
    return text


_unpack_header = HEADER_STRUCT.unpack_from
_MAIN_HEADER = cat.HEADER_RULES[Channel.MAIN]


def decode(raw: bytes, channel: Channel = Channel.MAIN, ctx: DecodeContext = DEFAULT_CONTEXT) -> Message:
    """Decode one framed message. Never raises: what is wrong becomes a Problem and the bytes are kept."""
    if channel == Channel.DEVICE_STATE:
        return Message(raw, channel, STREAM_REQUEST, 0, len(raw), None, None, (), ctx)
    if len(raw) < HEADER_SIZE:
        return Message(raw, channel, -1, 0, 0, None, None,
                       (Problem("truncated-header", f"{len(raw)} bytes, a header needs {HEADER_SIZE}"),), ctx)
    request, flags, size = _unpack_header(raw)
    problems: list[Problem] = []
    rule = cat.HEADER_RULES.get(channel, _MAIN_HEADER)
    if flags & rule.reserved:
        problems.append(Problem("reserved-flags", f"reserved flag bits set: {flags & rule.reserved:#x}"))
    if flags & rule.version_mask != rule.version:
        problems.append(Problem("bad-version", f"version {flags & rule.version_mask}, expected {rule.version}"))
    payload_length = len(raw) - HEADER_SIZE
    limit = MAX_PAYLOAD_SIZE if channel == Channel.MAIN else cat.max_payload(channel, request)
    if size > limit:
        problems.append(Problem("oversize", f"size {size} exceeds the maximum {limit}"))
    if payload_length != size:
        problems.append(Problem("size-mismatch", f"header says {size} payload bytes, {payload_length} present"))
        return Message(raw, channel, request, flags, size, None, None, tuple(problems), ctx)
    is_reply = bool(flags & cat.FLAG_REPLY) and is_reply_flag(channel, request, flags)
    kinds = payload_candidates(channel, request, is_reply, ctx)
    if not kinds:
        problems.append(Problem("unknown-request", f"request {request} is not known on the {channel.name.lower()}"
                                                   f" channel"))
        return Message(raw, channel, request, flags, size, None, None, tuple(problems), ctx)
    body = raw[HEADER_SIZE:]
    for kind in kinds:
        fixed = FIXED_SIZE[kind]
        if fixed is not None and fixed != size:
            continue
        if size == 0 and fixed == 0:
            return Message(raw, channel, request, flags, size, kind, Container(), tuple(problems), ctx)
        try:
            payload = PARSERS[kind](body)
            # A variable layout must account for every byte, no more, no less (compiled construct reads short
            # fields without complaint, and ignores trailing bytes).
            if fixed is None and PAYLOADS[kind][0].build(payload) != body:
                continue
        except Exception:  # construct's errors all mean "does not fit"; the next kind may
            continue
        return Message(raw, channel, request, flags, size, kind, payload, tuple(problems), ctx)
    expected = " or ".join(_describe_size(kind) for kind in kinds)
    problems.append(Problem("payload-layout",
                            f"{size}-byte payload fits no layout of this message (expected {expected})"))
    return Message(raw, channel, request, flags, size, None, None, tuple(problems), ctx)


def _describe_size(kind: str) -> str:
    fixed = FIXED_SIZE[kind]
    return f"{kind} ({fixed} bytes)" if fixed is not None else f"{kind} (variable)"


def encode_payload(kind: str, payload) -> bytes:
    """Build one payload kind from a construct Container (or dict)."""
    return PAYLOADS[kind][0].build(payload)


def encode(message: Message, fix_size: bool = False) -> bytes:
    """Bytes of a message. Untouched messages give back their exact input; edited payloads are rebuilt.

    With fix_size the header's size is set to the built payload's length (what a hook edit wants); otherwise the
    header is written as it is, so a malformed size survives a round trip.
    """
    if message.kind is None:
        body = message.raw[HEADER_SIZE:]
    else:
        body = encode_payload(message.kind, message.payload)
    if message.request < 0:
        return message.raw
    size = len(body) if fix_size else message.size
    return HEADER_STRUCT.pack(message.request, message.flags, size) + body


def build_message(channel: Channel, request: int, payload=None, *, reply: bool = False, need_reply: bool = False,
                  kind: str | None = None, flags: int | None = None,
                  ctx: DecodeContext = DEFAULT_CONTEXT) -> bytes:
    """Bytes of a new message; the payload kind is the request's first (or given) kind, the size is computed."""
    if kind is None:
        kinds = payload_candidates(channel, request, reply, ctx)
        kind = kinds[0] if kinds else "opaque"
    if isinstance(payload, (bytes, bytearray)):
        body = bytes(payload)
    else:
        body = encode_payload(kind, payload or {})
    if flags is None:
        rule = cat.HEADER_RULES.get(channel, _MAIN_HEADER)
        flags = rule.version | (cat.FLAG_REPLY if reply else 0) | (rule.need_reply if need_reply else 0)
    return HEADER_STRUCT.pack(request, flags, len(body)) + body


def iter_fields(message: Message):
    """(dotted name, value) for every field, header first; bit fields expanded; arrays repeat their names.

    These names are the ones the filters, `-T fields` and the Lua dissector use (prefix `vhost_user.` in Lua).
    """
    if message.channel == Channel.DEVICE_STATE:
        yield "payload", message.raw          # an opaque chunk of the migration stream: no header
        return
    yield "request", message.request
    yield "flags", message.flags
    for sub, mask in cat.BITFIELDS["flags"].items():
        yield "flags." + sub, _masked(message.flags, mask)
    yield "size", message.size
    if message.kind is None:
        if message.request >= 0:
            yield "payload", message.raw[HEADER_SIZE:]
        return
    structure, prefix, _doc = PAYLOADS[message.kind]
    yield from _walk(structure, message.payload, prefix, message.kind)
    if carries_config_space(message):
        yield from config_space.decode_space(message.context.device_type, message.payload.offset,
                                             message.payload.data)


def carries_config_space(message: Message) -> bool:
    """Whether a message's payload is a window of device config space (GET_CONFIG reply, SET_CONFIG request)."""
    return message.kind == "config" and message.channel == Channel.MAIN and \
        config_space.carries_config_space(message.request, message.is_reply)


def _masked(value: int, mask: int) -> int:
    shift = (mask & -mask).bit_length() - 1
    return (value & mask) >> shift


def _walk(structure: Struct, value, prefix: str, kind_key: str):
    for sub in structure.subcons:
        name = sub.name
        if name is None:
            continue
        dotted = f"{prefix}.{name}" if prefix else name
        item = value[name]
        inner = _struct_of(sub)
        if inner is not None:
            element_key = "region_xen" if inner is REGION_XEN else "region"
            items = item if isinstance(item, ListContainer) else [item]
            for element in items:
                yield from _walk(inner, element, dotted, element_key)
            continue
        yield dotted, item
        bits = cat.BITFIELDS.get(f"{kind_key}.{name}")
        if bits:
            for sub_name, mask in bits.items():
                yield f"{dotted}.{sub_name}", _masked(item, mask)


def _struct_of(subcon):
    """The element Struct of a nested struct or array field, or None for a leaf."""
    inner = getattr(subcon, "subcon", None)
    while inner is not None and not isinstance(inner, Struct):
        inner = getattr(inner, "subcon", None)
    return inner
