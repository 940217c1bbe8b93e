"""The vhost-user catalogue as data: request numbers and names, feature bits, reply and fd rules, spec profiles.

Names follow the current QEMU spec (front-end/back-end); the old master/slave names are kept as aliases for
filters. Number-to-name tables are data so that a profile can override them (rust-vmm vhost 0.16 put SHMEM at
protocol bit 21, where the spec has GPA_ADDRESSES).
"""
from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..model import Channel


class FrontendRequest(enum.IntEnum):
    """Requests on the main socket, front-end to back-end (spec numbering)."""
    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44
    GET_VRING_BASE_SKIP_DRAIN = 45    # proposed on the mailing list only


class BackendRequest(enum.IntEnum):
    """Requests on the back-end channel (the SET_BACKEND_REQ_FD socket), back-end to front-end."""
    NONE = 0
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10
    MEM_READ = 11                     # proposed only
    MEM_WRITE = 12                    # proposed only


class GpuRequest(enum.IntEnum):
    """Requests on the vhost-user-gpu socket (GPU_SET_SOCKET), back-end to front-end; same 12-byte header."""
    NONE = 0
    GET_PROTOCOL_FEATURES = 1
    SET_PROTOCOL_FEATURES = 2
    GET_DISPLAY_INFO = 3
    CURSOR_POS = 4
    CURSOR_POS_HIDE = 5
    CURSOR_UPDATE = 6
    SCANOUT = 7
    UPDATE = 8
    DMABUF_SCANOUT = 9
    DMABUF_UPDATE = 10
    GET_EDID = 11
    DMABUF_SCANOUT2 = 12


# Old names still in use by peers, logs and people; filters accept them.
REQUEST_ALIASES = MappingProxyType({
    "SET_SLAVE_REQ_FD": FrontendRequest.SET_BACKEND_REQ_FD,
    "SLAVE_IOTLB_MSG": BackendRequest.IOTLB_MSG,
    "SLAVE_CONFIG_CHANGE_MSG": BackendRequest.CONFIG_CHANGE_MSG,
    "SLAVE_VRING_HOST_NOTIFIER_MSG": BackendRequest.VRING_HOST_NOTIFIER_MSG,
    "BACKEND_IOTLB_MSG": BackendRequest.IOTLB_MSG,
    "BACKEND_CONFIG_CHANGE_MSG": BackendRequest.CONFIG_CHANGE_MSG,
    "BACKEND_VRING_HOST_NOTIFIER_MSG": BackendRequest.VRING_HOST_NOTIFIER_MSG,
    "BACKEND_VRING_CALL": BackendRequest.VRING_CALL,
    "BACKEND_VRING_ERR": BackendRequest.VRING_ERR,
    "BACKEND_SHARED_OBJECT_ADD": BackendRequest.SHARED_OBJECT_ADD,
    "BACKEND_SHARED_OBJECT_REMOVE": BackendRequest.SHARED_OBJECT_REMOVE,
    "BACKEND_SHARED_OBJECT_LOOKUP": BackendRequest.SHARED_OBJECT_LOOKUP,
    "BACKEND_SHMEM_MAP": BackendRequest.SHMEM_MAP,
    "BACKEND_SHMEM_UNMAP": BackendRequest.SHMEM_UNMAP,
})

PROTOCOL_FEATURES = MappingProxyType({
    0: "MQ",
    1: "LOG_SHMFD",
    2: "RARP",
    3: "REPLY_ACK",
    4: "MTU",
    5: "BACKEND_REQ",
    6: "CROSS_ENDIAN",
    7: "CRYPTO_SESSION",
    8: "PAGEFAULT",
    9: "CONFIG",
    10: "BACKEND_SEND_FD",
    11: "HOST_NOTIFIER",
    12: "INFLIGHT_SHMFD",
    13: "RESET_DEVICE",
    14: "INBAND_NOTIFICATIONS",
    15: "CONFIGURE_MEM_SLOTS",
    16: "STATUS",
    17: "XEN_MMAP",
    18: "SHARED_OBJECT",
    19: "DEVICE_STATE",
    20: "GET_VRING_BASE_INFLIGHT",
    21: "GPA_ADDRESSES",
    22: "SHMEM",
    23: "GET_VRING_BASE_SKIP_DRAIN",  # proposed only
})
PROTOCOL_FEATURE_ALIASES = MappingProxyType({"SLAVE_REQ": 5, "SLAVE_SEND_FD": 10, "NET_MTU": 4})

# Virtio transport bits (VIRTIO 1.2 §6) and the vhost bits that ride in the same word.
TRANSPORT_FEATURES = MappingProxyType({
    24: "NOTIFY_ON_EMPTY",
    26: "LOG_ALL",              # VHOST_F_LOG_ALL
    27: "ANY_LAYOUT",
    28: "RING_INDIRECT_DESC",
    29: "RING_EVENT_IDX",
    30: "PROTOCOL_FEATURES",    # VHOST_USER_F_PROTOCOL_FEATURES
    32: "VERSION_1",
    33: "ACCESS_PLATFORM",
    34: "RING_PACKED",
    35: "IN_ORDER",
    36: "ORDER_PLATFORM",
    37: "SR_IOV",
    38: "NOTIFICATION_DATA",
    39: "NOTIF_CONFIG_DATA",
    40: "RING_RESET",
    41: "ADMIN_VQ",
})

# Device-specific bits (0-23, and a few high ones for net), per virtio device type.
DEVICE_FEATURES = MappingProxyType({
    "net": MappingProxyType({
        0: "CSUM", 1: "GUEST_CSUM", 2: "CTRL_GUEST_OFFLOADS", 3: "MTU", 5: "MAC", 6: "GSO",
        7: "GUEST_TSO4", 8: "GUEST_TSO6", 9: "GUEST_ECN", 10: "GUEST_UFO", 11: "HOST_TSO4", 12: "HOST_TSO6",
        13: "HOST_ECN", 14: "HOST_UFO", 15: "MRG_RXBUF", 16: "STATUS", 17: "CTRL_VQ", 18: "CTRL_RX",
        19: "CTRL_VLAN", 20: "CTRL_RX_EXTRA", 21: "GUEST_ANNOUNCE", 22: "MQ", 23: "CTRL_MAC_ADDR",
        52: "VQ_NOTF_COAL", 53: "NOTF_COAL", 54: "GUEST_USO4", 55: "GUEST_USO6", 56: "HOST_USO",
        57: "HASH_REPORT", 59: "GUEST_HDRLEN", 60: "RSS", 61: "RSC_EXT", 62: "STANDBY", 63: "SPEED_DUPLEX",
    }),
    "blk": MappingProxyType({
        0: "BARRIER", 1: "SIZE_MAX", 2: "SEG_MAX", 4: "GEOMETRY", 5: "RO", 6: "BLK_SIZE", 7: "SCSI",
        9: "FLUSH", 10: "TOPOLOGY", 11: "CONFIG_WCE", 12: "MQ", 13: "DISCARD", 14: "WRITE_ZEROES",
        15: "LIFETIME", 16: "SECURE_ERASE", 17: "ZONED",
    }),
    "scsi": MappingProxyType({0: "INOUT", 1: "HOTPLUG", 2: "CHANGE", 3: "T10_PI"}),
    "fs": MappingProxyType({0: "NOTIFICATION"}),
    "gpu": MappingProxyType({0: "VIRGL", 1: "EDID", 2: "RESOURCE_UUID", 3: "RESOURCE_BLOB", 4: "CONTEXT_INIT"}),
    "vsock": MappingProxyType({0: "STREAM", 1: "SEQPACKET"}),
    "input": MappingProxyType({}),
    "crypto": MappingProxyType({
        0: "REVISION_1", 1: "CIPHER_STATELESS_MODE", 2: "HASH_STATELESS_MODE", 3: "MAC_STATELESS_MODE",
        4: "AEAD_STATELESS_MODE",
    }),
})
DEVICE_TYPES = tuple(DEVICE_FEATURES)
# The device-specific bits of the 64-bit features word (VIRTIO 1.2 §6: bits 0-23 and 50-127).
DEVICE_SPECIFIC_FEATURES_MASK = (1 << 24) - 1 | ((1 << 64) - 1) ^ ((1 << 50) - 1)
# The device-specific bits each device type defines, as a mask of DEVICE_FEATURES' bits: a back-end offering a bit
# outside a type's mask is not of that type (protocol.context infers the type from a GET_FEATURES reply so).
DEVICE_DEFINED_FEATURES: Mapping[str, int] = MappingProxyType({
    device: sum(1 << bit for bit in names) for device, names in DEVICE_FEATURES.items()})

# Transport bits a front-end's own virtio transport offers the guest whatever the back-end offered, and may pass
# on in SET_FEATURES: QEMU's virtio-pci offers RING_RESET (its queue_reset property) and resets a ring itself
# (stopping it with GET_VRING_BASE, starting it again), so QEMU 10's vhost-user-gpu front-end acks bit 40 to a
# back-end that never offered it, and the session works. A device bit acked unoffered stays an error.
FRONTEND_TRANSPORT_FEATURES = frozenset(bit for bit, name in TRANSPORT_FEATURES.items() if name in ("RING_RESET",))

DEVICE_STATUS = MappingProxyType({
    0: "ACKNOWLEDGE", 1: "DRIVER", 2: "DRIVER_OK", 3: "FEATURES_OK", 6: "DEVICE_NEEDS_RESET", 7: "FAILED",
})

# Bit fields inside integer fields: (field key) -> {sub-field name: mask}. Declared once; the decoder's field
# tree, the filters, the scapy view and the Lua dissector all expand them from here.
BITFIELDS = MappingProxyType({
    "flags": MappingProxyType({"version": 0x3, "reply": 0x4, "need_reply": 0x8, "reserved": 0xFFFFFFF0}),
    "vring_fd.flags": MappingProxyType({"nofd": 0x1}),
    "vring_addr.flags": MappingProxyType({"log": 0x1}),
    "vring_area.flags": MappingProxyType({"nofd": 0x1}),
    "device_state_result.flags": MappingProxyType({"nofd": 0x1}),
    "mmap.flags": MappingProxyType({"rw": 0x1}),
    "region_xen.xen_mmap_flags": MappingProxyType({"foreign": 0x1, "grant": 0x2, "map_on_demand": 0x100}),
    # Device config space fields (protocol/config.py), keyed by their dotted name.
    "config.net.status": MappingProxyType({"link_up": 0x1, "announce": 0x2}),      # VIRTIO_NET_S_*
    "config.gpu.events_read": MappingProxyType({"display": 0x1}),                  # VIRTIO_GPU_EVENT_DISPLAY
    "config.gpu.events_clear": MappingProxyType({"display": 0x1}),
    "config.crypto.status": MappingProxyType({"hw_ready": 0x1}),                    # VIRTIO_CRYPTO_S_HW_READY
})

VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
FLAGS_RESERVED = 0xFFFFFFF0
VERSION_MASK = 0x3


class ReplyRule(enum.Enum):
    """When a request gets a reply (spec per-message entries; the spec's 'Communication' list is incomplete)."""
    ACK_IF_ASKED = "ack?"        # a u64 ack only when NEED_REPLY is set and REPLY_ACK was negotiated
    ALWAYS = "always"            # an explicit reply whatever the flags
    IF_LOG_SHMFD = "log_shmfd"   # SET_LOG_BASE: a reply when LOG_SHMFD was negotiated


class FdRule(enum.Enum):
    """How many fds a message carries."""
    NONE = "none"
    ONE = "one"
    OPTIONAL = "optional"        # zero or one
    PER_REGION = "per_region"    # one per memory region in the table
    UNLESS_NOFD = "unless_nofd"  # one, unless the payload's NOFD bit says none


@dataclass(frozen=True)
class RequestSpec:
    """One request: its payload kinds, its reply, its fds, the feature that gates it."""
    number: int
    request_kinds: tuple[str, ...]   # payload kinds tried in order; the first that fits exactly wins
    reply_kinds: tuple[str, ...]
    reply_rule: ReplyRule = ReplyRule.ACK_IF_ASKED
    request_fds: FdRule = FdRule.NONE
    reply_fds: FdRule = FdRule.NONE
    gate: str = ""                   # protocol feature name (or "PROTOCOL_FEATURES", "IOMMU") that must be negotiated


_ACK = ("ack",)
_F = FrontendRequest
_B = BackendRequest
A, ALWAYS, LOG = ReplyRule.ACK_IF_ASKED, ReplyRule.ALWAYS, ReplyRule.IF_LOG_SHMFD
NO, ONE, OPT, PER, NOFD = FdRule.NONE, FdRule.ONE, FdRule.OPTIONAL, FdRule.PER_REGION, FdRule.UNLESS_NOFD

FRONTEND_REQUESTS = MappingProxyType({spec.number: spec for spec in (
    # number, request payload(s), reply payload(s), reply rule, request fds, reply fds, gate
    RequestSpec(_F.GET_FEATURES, ("empty",), ("features",), ALWAYS),
    RequestSpec(_F.SET_FEATURES, ("features",), _ACK),
    RequestSpec(_F.SET_OWNER, ("empty",), _ACK),
    RequestSpec(_F.RESET_OWNER, ("empty",), _ACK),
    # In postcopy the back-end answers with its own table (no NEED_REPLY); otherwise an ack.
    RequestSpec(_F.SET_MEM_TABLE, ("mem_table",), ("ack", "mem_table"), A, PER),
    # The spec says u64; QEMU sends the 16-byte log struct and libvhost-user insists on 16.
    RequestSpec(_F.SET_LOG_BASE, ("log", "u64"), ("ack", "empty"), LOG, OPT),
    RequestSpec(_F.SET_LOG_FD, ("empty",), _ACK, A, ONE),
    RequestSpec(_F.SET_VRING_NUM, ("vring_state",), _ACK),
    RequestSpec(_F.SET_VRING_ADDR, ("vring_addr",), _ACK),
    RequestSpec(_F.SET_VRING_BASE, ("vring_base",), _ACK),
    RequestSpec(_F.GET_VRING_BASE, ("vring_state",), ("vring_base",), ALWAYS),
    RequestSpec(_F.SET_VRING_KICK, ("vring_fd",), _ACK, A, NOFD),
    RequestSpec(_F.SET_VRING_CALL, ("vring_fd",), _ACK, A, NOFD),
    RequestSpec(_F.SET_VRING_ERR, ("vring_fd",), _ACK, A, NOFD),
    RequestSpec(_F.GET_PROTOCOL_FEATURES, ("empty",), ("protocol_features",), ALWAYS, gate="PROTOCOL_FEATURES"),
    RequestSpec(_F.SET_PROTOCOL_FEATURES, ("protocol_features",), _ACK, gate="PROTOCOL_FEATURES"),
    RequestSpec(_F.GET_QUEUE_NUM, ("empty",), ("queue_num",), ALWAYS, gate="MQ"),
    RequestSpec(_F.SET_VRING_ENABLE, ("vring_state",), _ACK, gate="PROTOCOL_FEATURES"),
    RequestSpec(_F.SEND_RARP, ("rarp",), _ACK, gate="RARP"),
    RequestSpec(_F.NET_SET_MTU, ("mtu",), _ACK, gate="MTU"),
    RequestSpec(_F.SET_BACKEND_REQ_FD, ("empty",), _ACK, A, ONE, gate="BACKEND_REQ"),
    RequestSpec(_F.IOTLB_MSG, ("iotlb",), _ACK, ALWAYS, gate="IOMMU"),
    RequestSpec(_F.SET_VRING_ENDIAN, ("vring_state",), _ACK, gate="CROSS_ENDIAN"),
    RequestSpec(_F.GET_CONFIG, ("config",), ("config",), ALWAYS, gate="CONFIG"),
    RequestSpec(_F.SET_CONFIG, ("config",), _ACK, gate="CONFIG"),
    RequestSpec(_F.CREATE_CRYPTO_SESSION, ("crypto_session",), ("crypto_session",), ALWAYS, gate="CRYPTO_SESSION"),
    RequestSpec(_F.CLOSE_CRYPTO_SESSION, ("session_id",), _ACK, gate="CRYPTO_SESSION"),
    # libvhost-user answers with an empty payload and the userfaultfd.
    RequestSpec(_F.POSTCOPY_ADVISE, ("empty",), ("empty", "ack"), ALWAYS, NO, ONE, gate="PAGEFAULT"),
    RequestSpec(_F.POSTCOPY_LISTEN, ("empty",), _ACK, gate="PAGEFAULT"),
    RequestSpec(_F.POSTCOPY_END, ("empty",), _ACK, ALWAYS, gate="PAGEFAULT"),
    RequestSpec(_F.GET_INFLIGHT_FD, ("inflight",), ("inflight",), ALWAYS, NO, ONE, gate="INFLIGHT_SHMFD"),
    RequestSpec(_F.SET_INFLIGHT_FD, ("inflight",), _ACK, A, ONE, gate="INFLIGHT_SHMFD"),
    RequestSpec(_F.GPU_SET_SOCKET, ("empty",), _ACK, A, ONE),
    RequestSpec(_F.RESET_DEVICE, ("empty",), _ACK, gate="RESET_DEVICE"),
    RequestSpec(_F.VRING_KICK, ("vring_state",), _ACK, gate="INBAND_NOTIFICATIONS"),
    RequestSpec(_F.GET_MAX_MEM_SLOTS, ("empty",), ("mem_slots",), ALWAYS, gate="CONFIGURE_MEM_SLOTS"),
    # In postcopy the back-end answers ADD_MEM_REG with the region as it mapped it.
    RequestSpec(_F.ADD_MEM_REG, ("mem_region",), ("ack", "mem_region"), A, ONE, gate="CONFIGURE_MEM_SLOTS"),
    RequestSpec(_F.REM_MEM_REG, ("mem_region",), _ACK, A, OPT, gate="CONFIGURE_MEM_SLOTS"),
    RequestSpec(_F.SET_STATUS, ("status",), _ACK, gate="STATUS"),
    RequestSpec(_F.GET_STATUS, ("empty",), ("status",), ALWAYS, gate="STATUS"),
    RequestSpec(_F.GET_SHARED_OBJECT, ("object",), _ACK, ALWAYS, NO, OPT, gate="SHARED_OBJECT"),
    RequestSpec(_F.SET_DEVICE_STATE_FD, ("device_state",), ("device_state_result",), ALWAYS, ONE, OPT,
                gate="DEVICE_STATE"),
    RequestSpec(_F.CHECK_DEVICE_STATE, ("empty",), _ACK, ALWAYS, gate="DEVICE_STATE"),
    RequestSpec(_F.GET_SHMEM_CONFIG, ("empty",), ("shmem_config",), ALWAYS, gate="SHMEM"),
    RequestSpec(_F.GET_VRING_BASE_SKIP_DRAIN, ("vring_state",), ("vring_base",), ALWAYS,
                gate="GET_VRING_BASE_SKIP_DRAIN"),
)})


# The main-channel messages (request, is_reply) whose config payload carries device config space bytes: a
# GET_CONFIG reply and a SET_CONFIG request (a GET_CONFIG request's data is only a buffer of the size asked).
CONFIG_SPACE_MESSAGES = frozenset({(int(FrontendRequest.GET_CONFIG), True), (int(FrontendRequest.SET_CONFIG), False)})

# Requests whose one fd is a socket that opens a side channel, and the channel it carries.
SIDE_CHANNEL_REQUESTS: Mapping[int, Channel] = MappingProxyType({
    FrontendRequest.SET_BACKEND_REQ_FD: Channel.BACKEND,    # back-end requests, front-end replies
    FrontendRequest.GPU_SET_SOCKET: Channel.GPU,            # the vhost-user-gpu protocol
})
# The request whose fd is a pipe end carrying the opaque device-state (migration) stream.
DEVICE_STATE_REQUEST = FrontendRequest.SET_DEVICE_STATE_FD


@dataclass(frozen=True)
class ContextRule:
    """How a front-end request (main channel) changes the way later messages of its connection decode."""
    context_field: str          # the DecodeContext field it sets
    payload_field: str = ""     # set from this field of the request's payload, or
    value: str = ""             # set to this value while the field is still unknown


# Requests that change the decoding context, and how: the session tracker and the Lua dissector both follow it.
CONTEXT_RULES: Mapping[int, ContextRule] = MappingProxyType({
    _F.SET_FEATURES: ContextRule("features", payload_field="features"),            # device bit names, packed rings
    _F.SET_PROTOCOL_FEATURES: ContextRule("protocol_features", payload_field="protocol_features"),   # XEN_MMAP
    _F.NET_SET_MTU: ContextRule("device_type", value="net"),                        # only a net device has an MTU
    _F.SEND_RARP: ContextRule("device_type", value="net"),                          # QEMU's net migration only
    _F.GPU_SET_SOCKET: ContextRule("device_type", value="gpu"),                     # the vhost-user-gpu socket
    _F.CREATE_CRYPTO_SESSION: ContextRule("device_type", value="crypto"),           # crypto sessions
    _F.CLOSE_CRYPTO_SESSION: ContextRule("device_type", value="crypto"),
})

# The device type a GET_CONFIG reply's window tells when it is a whole config space (offset 0, this size) that
# only one device type's front-end reads. QEMU 7.2 reads a vhost-user-blk's whole config: 57 bytes (up to
# write_zeroes_may_unmap, per the features) or 60 (struct virtio_blk_config). It reads no vhost-user net or fs
# config from the back-end; the gpu (16 bytes) and vsock (8) windows are left out, being as long as a partial read
# of another device's config. Like the value rules of CONTEXT_RULES, it sets a device type still unknown only.
CONFIG_SIZE_DEVICES: Mapping[int, str] = MappingProxyType({57: "blk", 60: "blk"})

BACKEND_REQUESTS = MappingProxyType({spec.number: spec for spec in (
    RequestSpec(_B.IOTLB_MSG, ("iotlb",), _ACK, gate="IOMMU"),
    RequestSpec(_B.CONFIG_CHANGE_MSG, ("empty",), _ACK, gate="CONFIG"),
    RequestSpec(_B.VRING_HOST_NOTIFIER_MSG, ("vring_area",), _ACK, A, OPT, gate="HOST_NOTIFIER"),
    RequestSpec(_B.VRING_CALL, ("vring_state",), _ACK, gate="INBAND_NOTIFICATIONS"),
    RequestSpec(_B.VRING_ERR, ("vring_state",), _ACK, gate="INBAND_NOTIFICATIONS"),
    RequestSpec(_B.SHARED_OBJECT_ADD, ("object",), _ACK, gate="SHARED_OBJECT"),
    RequestSpec(_B.SHARED_OBJECT_REMOVE, ("object",), _ACK, gate="SHARED_OBJECT"),
    RequestSpec(_B.SHARED_OBJECT_LOOKUP, ("object",), _ACK, ALWAYS, NO, OPT, gate="SHARED_OBJECT"),
    RequestSpec(_B.SHMEM_MAP, ("mmap",), _ACK, A, ONE, gate="SHMEM"),
    RequestSpec(_B.SHMEM_UNMAP, ("mmap",), _ACK, gate="SHMEM"),
    RequestSpec(_B.MEM_READ, ("opaque",), ("opaque",), gate="SHMEM"),
    RequestSpec(_B.MEM_WRITE, ("opaque",), ("opaque",), gate="SHMEM"),
)})

# ---- the vhost-user-gpu protocol (docs/interop/vhost-user-gpu.rst; QEMU hw/display/vhost-user-gpu.c and
# contrib/vhost-user-gpu as they really talk): the back-end sends requests on the GPU_SET_SOCKET socket, QEMU
# answers the few that want an answer. Same 12-byte header, but its flags have no version bits: requests carry 0,
# replies exactly REPLY (0x4), and nothing else is defined (QEMU reads only the REPLY bit).
_G = GpuRequest
NO_REPLY = ReplyRule.ACK_IF_ASKED      # the GPU header has no NEED_REPLY bit, so "if asked" never happens here
GPU_PROTOCOL_FEATURES = MappingProxyType({0: "EDID", 1: "DMABUF2"})   # VHOST_USER_GPU_PROTOCOL_F_*
GPU_REQUESTS = MappingProxyType({spec.number: spec for spec in (
    RequestSpec(_G.GET_PROTOCOL_FEATURES, ("empty",), ("gpu_protocol_features",), ALWAYS),
    RequestSpec(_G.SET_PROTOCOL_FEATURES, ("gpu_protocol_features",), (), NO_REPLY),
    RequestSpec(_G.GET_DISPLAY_INFO, ("empty",), ("gpu_display_info",), ALWAYS),
    RequestSpec(_G.CURSOR_POS, ("gpu_cursor_pos",), (), NO_REPLY),
    RequestSpec(_G.CURSOR_POS_HIDE, ("gpu_cursor_pos",), (), NO_REPLY),
    RequestSpec(_G.CURSOR_UPDATE, ("gpu_cursor_update",), (), NO_REPLY),
    RequestSpec(_G.SCANOUT, ("gpu_scanout",), (), NO_REPLY),
    RequestSpec(_G.UPDATE, ("gpu_update",), (), NO_REPLY),
    # The DMABUF fd rides with the message; a scanout being disabled (width 0) passes none.
    RequestSpec(_G.DMABUF_SCANOUT, ("gpu_dmabuf_scanout",), (), NO_REPLY, OPT),
    # QEMU answers (an empty DMABUF_UPDATE reply) once the display has drawn it; the back-end waits for it.
    RequestSpec(_G.DMABUF_UPDATE, ("gpu_update",), ("empty",), ALWAYS),
    RequestSpec(_G.GET_EDID, ("gpu_edid_request",), ("gpu_edid",), ALWAYS),
    RequestSpec(_G.DMABUF_SCANOUT2, ("gpu_dmabuf_scanout2",), (), NO_REPLY, OPT),
)})
GPU_UPDATE_HEADER_SIZE = 20        # scanout_id, x, y, width, height before UPDATE's pixels
GPU_CURSOR_UPDATE_SIZE = 12 + 8 + 64 * 64 * 4


@dataclass(frozen=True)
class HeaderRule:
    """How one channel's 12-byte header reads: its version bits, the flag bits it defines, a reply's exact flags."""
    version_mask: int        # 0: the header has no version bits
    version: int
    need_reply: int          # the NEED_REPLY bit, 0 when the channel has none
    reserved: int            # bits that must be zero (0: the channel does not say)
    reply_flags: int         # a reply's flags, exactly
    # The requests that get replies, when only those can be replies (the REPLY bit of another is not one); None:
    # any request may be answered (REPLY_ACK).
    replied: frozenset[int] | None = None


_VHOST_USER_HEADER = HeaderRule(VERSION_MASK, VERSION, FLAG_NEED_REPLY, FLAGS_RESERVED, VERSION | FLAG_REPLY)
HEADER_RULES: Mapping[Channel, HeaderRule] = MappingProxyType({
    Channel.MAIN: _VHOST_USER_HEADER,
    Channel.BACKEND: _VHOST_USER_HEADER,
    # contrib/vhost-user-gpu builds UPDATE in uninitialised memory and never sets its flags (a real session has
    # small UPDATEs with flags 0x5), and QEMU looks at no bit of a request's flags: so no bit is called reserved,
    # and only a request QEMU answers can be a reply.
    Channel.GPU: HeaderRule(0, 0, 0, 0, FLAG_REPLY,
                            frozenset(number for number, spec in GPU_REQUESTS.items() if spec.reply_kinds)),
})

# Framing limits: the largest payload a receiver accepts, per channel, and per request where one request is far
# larger than the rest. The main and back-end channels use rust-vmm's MAX_MSG_SIZE (the largest spec payload is
# the SHMEM config, 2,056 bytes). On the GPU socket CURSOR_UPDATE carries a 64x64 cursor (16,404 bytes) and
# UPDATE a rectangle's pixels (4 bytes each: a 1280x800 screen is 4,096,020 bytes); QEMU's reader takes any size,
# and a virtio-gpu resource is at most QEMU's default max_hostmem (256 MiB), so that bounds UPDATE.
MAIN_MAX_PAYLOAD = 0x1000
CHANNEL_MAX_PAYLOAD: Mapping[Channel, int] = MappingProxyType({
    Channel.MAIN: MAIN_MAX_PAYLOAD,
    Channel.BACKEND: MAIN_MAX_PAYLOAD,
    Channel.GPU: GPU_CURSOR_UPDATE_SIZE,
})
REQUEST_MAX_PAYLOAD: Mapping[Channel, Mapping[int, int]] = MappingProxyType({
    Channel.GPU: MappingProxyType({int(_G.UPDATE): GPU_UPDATE_HEADER_SIZE + (256 << 20)}),
})
# Requests travel front-end to back-end on the main channel; on these channels the back-end sends them.
BACKEND_REQUEST_CHANNELS = frozenset({Channel.BACKEND, Channel.GPU})


def max_payload(channel: Channel, request: int | None = None) -> int:
    """The largest payload a receiver accepts on a channel (for a request, when it has its own limit)."""
    limit = CHANNEL_MAX_PAYLOAD.get(channel, MAIN_MAX_PAYLOAD)
    if request is not None:
        return REQUEST_MAX_PAYLOAD.get(channel, {}).get(request, limit)
    return limit


@dataclass(frozen=True)
class Profile:
    """A spec profile: the number-to-name tables a peer is taken to mean. Overridable data."""
    name: str
    frontend_names: MappingProxyType = field(
        default_factory=lambda: MappingProxyType({r.value: r.name for r in FrontendRequest}))
    backend_names: MappingProxyType = field(
        default_factory=lambda: MappingProxyType({r.value: r.name for r in BackendRequest}))
    gpu_names: MappingProxyType = field(default_factory=lambda: MappingProxyType({r.value: r.name for r in GpuRequest}))
    protocol_features: MappingProxyType = field(default_factory=lambda: PROTOCOL_FEATURES)

    def with_overrides(self, name: str, protocol_features: dict[int, str] | None = None,
                       frontend_names: dict[int, str] | None = None,
                       backend_names: dict[int, str] | None = None) -> Profile:
        """A new profile: this one with some numbers renamed (or added)."""
        def merged(base, extra):
            return MappingProxyType({**base, **(extra or {})})
        return Profile(name, merged(self.frontend_names, frontend_names), merged(self.backend_names, backend_names),
                       self.gpu_names, merged(self.protocol_features, protocol_features))

    def protocol_feature_bit(self, name: str) -> int | None:
        for bit, bit_name in self.protocol_features.items():
            if bit_name == name:
                return bit
        return PROTOCOL_FEATURE_ALIASES.get(name)


SPEC_PROFILE = Profile("qemu-spec")
PROFILES = MappingProxyType({
    "qemu-spec": SPEC_PROFILE,
    # rust-vmm vhost 0.16.0 put SHMEM at bit 21 (fixed in 0.17.0, rust-vmm/vhost#367).
    "rust-vmm-0.16": SPEC_PROFILE.with_overrides("rust-vmm-0.16", protocol_features={21: "SHMEM", 22: "BIT_22"}),
})


def feature_names(device_type: str | None) -> dict[int, str]:
    """Virtio feature bit names for a device type (transport bits only when the type is unknown)."""
    names = dict(TRANSPORT_FEATURES)
    if device_type:
        names.update(DEVICE_FEATURES.get(device_type, {}))
    return names


class BitNameError(ValueError):
    """A bit name that a field does not have, or (without a device type) one that means different bits."""


def bit_table(field: str, device_type: str | None = None, profile: Profile | None = None):
    """The names of a bit-set field's bits (`features`, `protocol_features`, `status`, by their last dotted part)
    for a device type and spec profile: the one place that says which table a field uses. Empty for other fields."""
    short = field.rsplit(".", 1)[-1]
    if short == "gpu_protocol_features":
        return GPU_PROTOCOL_FEATURES
    if short == "features":
        return feature_names(device_type)
    if short == "protocol_features":
        return (profile or SPEC_PROFILE).protocol_features
    if short == "status":
        return DEVICE_STATUS
    return {}


def bit_number(field: str, name: str, device_type: str | None = None, profile: Profile | None = None) -> int:
    """The bit a name means in a bit-set field, for a device type (old names too: SLAVE_REQ is BACKEND_REQ).

    Without a device type a device-specific feature name resolves when every device that has it puts it on the
    same bit (FLUSH: blk's 9); otherwise (MQ: net 22, blk 12) BitNameError lists the devices.
    """
    name = name.strip().upper()
    short = field.rsplit(".", 1)[-1]
    for bit, bit_name in bit_table(field, device_type, profile).items():
        if bit_name == name:
            return bit
    if short == "protocol_features" and name in PROTOCOL_FEATURE_ALIASES:
        return PROTOCOL_FEATURE_ALIASES[name]
    if short == "features":
        devices = {device: bit for device, names in DEVICE_FEATURES.items()
                   for bit, bit_name in names.items() if bit_name == name}
        if devices and device_type is None and len(set(devices.values())) == 1:
            return next(iter(devices.values()))
        listing = ", ".join(f"{device} bit {bit}" for device, bit in devices.items())
        if devices and device_type is None:
            raise BitNameError(f"feature bit name {name!r} means a different bit per device ({listing}) and the "
                               f"device type is not known")
        if devices:
            raise BitNameError(f"{name!r} is not a feature bit of a {device_type} device (it is {listing})")
    kind = {"features": "feature", "protocol_features": "protocol feature", "status": "device status"}.get(short, short)
    raise BitNameError(f"unknown {kind} bit name {name!r}")


def bit_number_by_device(field: str, name: str, profile: Profile | None = None) -> dict[str | None, int | None]:
    """What a bit name means for each device type (None: type unknown); None where it means nothing."""
    meanings: dict[str | None, int | None] = {}
    for device in (None, *DEVICE_TYPES):
        try:
            meanings[device] = bit_number(field, name, device, profile)
        except BitNameError:
            meanings[device] = None
    return meanings


def bit_names(value: int, names: Mapping[int, str]) -> str:
    """`A|B|bit45` for the set bits of value; unnamed bits shown by number, never dropped."""
    parts = []
    bit = 0
    while value >> bit:
        if value >> bit & 1:
            parts.append(names.get(bit) or f"bit{bit}")
        bit += 1
    return "|".join(parts) if parts else "0"


# ---- human labels of fields: what Wireshark's tree shows ("Guest physical address"); the dotted names stay the
# filter fields. A label is the field's last name part in words, each abbreviation spelled out by LABEL_WORDS;
# FIELD_LABELS names the fields whose words alone would not say what they are.
LABEL_WORDS = MappingProxyType({
    "addr": "address", "phys": "physical", "uaddr": "user address", "iova": "I/O virtual address", "idx": "index",
    "num": "number of", "nregions": "number of regions", "max": "maximum", "min": "minimum", "opt": "optimal",
    "seg": "segments", "len": "length", "buf": "buffer", "blk": "block", "cmd": "command", "perm": "permissions",
    "exp": "exponent", "algo": "algorithms", "auth": "authentication", "aead": "AEAD", "akcipher": "asymmetric cipher",
    "dataqueues": "data queues", "capsets": "capability sets", "subsel": "subselect", "shmid": "shared memory id",
    "shm": "shared memory", "domid": "Xen domain id", "mmap": "mmap", "fd": "fd", "nofd": "no fd (NOFD)",
    "rw": "read-write", "ctx": "context", "hw": "hardware", "pmodes": "display modes", "drm": "DRM",
    "fourcc": "fourcc", "edid": "EDID", "mac": "MAC", "mtu": "MTU", "cid": "CID", "lun": "LUN", "cdb": "CDB",
    "rss": "RSS", "uuid": "UUID", "io": "I/O", "gpu": "GPU", "mem": "memory", "h": "(bits 32-63)",
    "l": "(bits 0-31)", "x": "x", "y": "y",
})
FIELD_LABELS = MappingProxyType({
    "ack": "Reply-ack status", "fds": "File descriptors", "fd.kind": "File descriptor kind",
    "fd.name": "File descriptor name", "fd.inode": "Inode", "fd.seals": "Memfd seals", "fd.size": "File size",
    "pseudo.version": "Pseudo-header version", "pseudo.header_length": "Pseudo-header length",
    "name": "Request name", "kind": "Payload kind", "size": "Payload size", "flags": "Header flags",
    "flags.version": "Protocol version", "flags.reserved": "Reserved flag bits", "unframed": "Unframed bytes",
    "payload": "Payload", "u64.value": "Value (u64)", "mem_slots": "Memory slots", "queue_num": "Number of queues",
    "vring.desc": "Descriptor table address", "vring.used": "Used ring address",
    "vring.avail": "Available ring address", "vring.log": "Used ring log address", "vring.flags.log": "Log (LOG)",
    "vring.num": "Number (ring size, enable flag, endianness or base mode)", "vring.index": "Vring index",
    "vring_area.index": "Vring index", "iotlb.type": "IOTLB message type", "iotlb.size": "Length",
    "config.input.u": "Data (u)", "config.fs.tag": "Mount tag", "config.blk.capacity": "Capacity (512-byte sectors)",
    "mem.region.userspace_addr": "Front-end virtual address", "mem.region.memory_size": "Memory size",
    "shmem.memory_sizes": "Memory size per shmid", "device_state.phase": "Migration phase",
    "device_state.direction": "Transfer direction", "crypto.session": "Session data", "mem.region": "Memory region",
    "ring.index": "Ring", "ring.layout": "Ring layout", "ring.reason": "Sampled because", "ring.num": "Ring size",
    "ring.base": "Base when stopped", "ring.pending": "Request in flight",
})


def field_label(name: str) -> str:
    """A field's human label, from its dotted name: `mem.region.guest_phys_addr` reads `Guest physical address`."""
    label = FIELD_LABELS.get(name)
    if label is None:
        label = " ".join(LABEL_WORDS.get(word, word) for word in name.rsplit(".", 1)[-1].split("_"))
    return label[:1].upper() + label[1:]
