"""Device config spaces (GET_CONFIG replies, SET_CONFIG requests), one layout per virtio device type.

Each layout is declared once, below, as a construct Struct at the spec's offsets (VIRTIO 1.3 §5, `struct
virtio_<device>_config`, little-endian); unnamed Padding is the spec's unused bytes. Everything else derives from
these declarations: the flat field list (`CONFIG_FIELDS`, names `config.<device>.<field>`), the decoder's field
tree and summary, the filters' names, the scapy view and the Lua dissector.

A config message carries a window {offset, size} of the space: only the fields the window covers whole are
decoded. The message's bytes are never rebuilt from these fields, so a round trip stays exact.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from construct import Bytes, FormatField, Int8ul, Int16ul, Int32ul, Int64ul, Padding, Renamed, Struct

from . import catalogue as cat

PREFIX = "config"

CONFIG_SPACES: Mapping[str, Struct] = MappingProxyType({
    "net": Struct(                                                          # struct virtio_net_config
        "mac" / Bytes(6) * "MAC address (VIRTIO_NET_F_MAC)",
        "status" / Int16ul * "bit 0 LINK_UP, bit 1 ANNOUNCE (VIRTIO_NET_F_STATUS)",
        "max_virtqueue_pairs" / Int16ul * "receive/transmit queue pairs (VIRTIO_NET_F_MQ or RSS)",
        "mtu" / Int16ul * "maximum MTU (VIRTIO_NET_F_MTU)",
        "speed" / Int32ul * "link speed in Mbit/s, 0xffffffff unknown (VIRTIO_NET_F_SPEED_DUPLEX)",
        "duplex" / Int8ul * "0x00 half, 0x01 full, 0xff unknown",
        "rss_max_key_size" / Int8ul * "RSS hash key bytes (VIRTIO_NET_F_RSS)",
        "rss_max_indirection_table_length" / Int16ul * "RSS indirection table entries",
        "supported_hash_types" / Int32ul * "VIRTIO_NET_HASH_TYPE_* bits",
    ),
    "blk": Struct(                                                          # struct virtio_blk_config
        "capacity" / Int64ul * "size in 512-byte sectors",
        "size_max" / Int32ul * "largest segment in bytes (VIRTIO_BLK_F_SIZE_MAX)",
        "seg_max" / Int32ul * "segments per request (VIRTIO_BLK_F_SEG_MAX)",
        "geometry" / Struct(                                                # VIRTIO_BLK_F_GEOMETRY
            "cylinders" / Int16ul * "cylinders",
            "heads" / Int8ul * "heads",
            "sectors" / Int8ul * "sectors per track",
        ),
        "blk_size" / Int32ul * "logical block size in bytes (VIRTIO_BLK_F_BLK_SIZE)",
        "topology" / Struct(                                                # VIRTIO_BLK_F_TOPOLOGY
            "physical_block_exp" / Int8ul * "log2 of logical blocks per physical block",
            "alignment_offset" / Int8ul * "offset of the first aligned logical block",
            "min_io_size" / Int16ul * "suggested minimum I/O size in blocks",
            "opt_io_size" / Int32ul * "optimal (suggested maximum) I/O size in blocks",
        ),
        "writeback" / Int8ul * "0 writethrough, 1 writeback (VIRTIO_BLK_F_CONFIG_WCE)",
        Padding(1),                                                         # unused0
        "num_queues" / Int16ul * "request queues (VIRTIO_BLK_F_MQ)",
        "max_discard_sectors" / Int32ul * "largest discard in sectors (VIRTIO_BLK_F_DISCARD)",
        "max_discard_seg" / Int32ul * "discard segments per request",
        "discard_sector_alignment" / Int32ul * "discard alignment in sectors",
        "max_write_zeroes_sectors" / Int32ul * "largest write-zeroes in sectors (VIRTIO_BLK_F_WRITE_ZEROES)",
        "max_write_zeroes_seg" / Int32ul * "write-zeroes segments per request",
        "write_zeroes_may_unmap" / Int8ul * "1: write-zeroes may deallocate",
        Padding(3),                                                         # unused1
        "max_secure_erase_sectors" / Int32ul * "largest secure erase in sectors (VIRTIO_BLK_F_SECURE_ERASE)",
        "max_secure_erase_seg" / Int32ul * "secure erase segments per request",
        "secure_erase_sector_alignment" / Int32ul * "secure erase alignment in sectors",
        "zoned" / Struct(                                                   # VIRTIO_BLK_F_ZONED
            "zone_sectors" / Int32ul * "zone size in sectors",
            "max_open_zones" / Int32ul * "open zones limit",
            "max_active_zones" / Int32ul * "active zones limit",
            "max_append_sectors" / Int32ul * "largest zone append in sectors",
            "write_granularity" / Int32ul * "write granularity in bytes",
            "model" / Int8ul * "0 none, 1 host-managed, 2 host-aware",
            Padding(3),                                                     # unused2
        ),
    ),
    "scsi": Struct(                                                         # struct virtio_scsi_config
        "num_queues" / Int32ul * "request queues",
        "seg_max" / Int32ul * "segments per command",
        "max_sectors" / Int32ul * "largest transfer in sectors",
        "cmd_per_lun" / Int32ul * "linked commands per LUN",
        "event_info_size" / Int32ul * "event buffer size in bytes",
        "sense_size" / Int32ul * "sense data size in bytes",
        "cdb_size" / Int32ul * "CDB size in bytes",
        "max_channel" / Int16ul * "largest channel number",
        "max_target" / Int16ul * "largest target number",
        "max_lun" / Int32ul * "largest LUN",
    ),
    "fs": Struct(                                                           # struct virtio_fs_config
        "tag" / Bytes(36) * "file system name, UTF-8, padded with NULs",
        "num_request_queues" / Int32ul * "request queues",
        "notify_buf_size" / Int32ul * "notification buffer size in bytes (VIRTIO_FS_F_NOTIFICATION)",
    ),
    "gpu": Struct(                                                          # struct virtio_gpu_config
        "events_read" / Int32ul * "pending events, bit 0 DISPLAY",
        "events_clear" / Int32ul * "events the driver clears, bit 0 DISPLAY",
        "num_scanouts" / Int32ul * "scanouts (1 to 16)",
        "num_capsets" / Int32ul * "capability sets",
    ),
    "vsock": Struct(                                                        # struct virtio_vsock_config
        "guest_cid" / Int64ul * "the guest's context id",
    ),
    "input": Struct(                                                        # struct virtio_input_config
        "select" / Int8ul * "VIRTIO_INPUT_CFG_*: 1 id name, 2 serial, 3 devids, 0x10 prop bits, 0x11 ev bits, "
                            "0x12 abs info",
        "subsel" / Int8ul * "event type or axis, per select",
        "size" / Int8ul * "bytes of u that are valid",
        Padding(5),                                                         # reserved
        "u" / Bytes(128) * "string, bitmap, absinfo or devids, per select",
    ),
    "crypto": Struct(                                                       # struct virtio_crypto_config
        "status" / Int32ul * "bit 0 HW_READY",
        "max_dataqueues" / Int32ul * "data queues",
        "crypto_services" / Int32ul * "VIRTIO_CRYPTO_SERVICE_* bits",
        "cipher_algo_l" / Int32ul * "cipher algorithms, bits 0-31",
        "cipher_algo_h" / Int32ul * "cipher algorithms, bits 32-63",
        "hash_algo" / Int32ul * "hash algorithms",
        "mac_algo_l" / Int32ul * "MAC algorithms, bits 0-31",
        "mac_algo_h" / Int32ul * "MAC algorithms, bits 32-63",
        "aead_algo" / Int32ul * "AEAD algorithms",
        "max_cipher_key_len" / Int32ul * "longest cipher key in bytes",
        "max_auth_key_len" / Int32ul * "longest authentication key in bytes",
        "akcipher_algo" / Int32ul * "asymmetric cipher algorithms",
        "max_size" / Int64ul * "largest request in bytes",
    ),
})

# The fields a one-line summary shows, per device (the rest are in the field tree).
SUMMARY_FIELDS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "net": ("mac", "status", "max_virtqueue_pairs", "mtu"),
    "blk": ("capacity", "blk_size", "num_queues"),
    "scsi": ("num_queues", "max_target", "max_lun"),
    "fs": ("tag", "num_request_queues"),
    "gpu": ("num_scanouts", "num_capsets"),
    "vsock": ("guest_cid",),
    "input": ("select", "subsel", "size"),
    "crypto": ("status", "max_dataqueues"),
})

_FORMAT_WIDTH = {"<B": 1, "<H": 2, "<L": 4, "<Q": 8}


@dataclass(frozen=True)
class ConfigField:
    """One leaf of a device's config space: where it lies and how wide it is."""
    name: str            # config.blk.geometry.heads
    short: str           # geometry.heads (what the summary shows)
    offset: int          # from the start of the config space
    length: int          # bytes
    is_bytes: bool       # a byte string (mac, tag), not a little-endian integer
    doc: str
    bits: tuple[tuple[str, int], ...] = ()    # bit fields (dotted name, mask), from catalogue.BITFIELDS


def _leaves(structure: Struct, prefix: str, short: str, offset: int) -> Iterator[ConfigField]:
    for sub in structure.subcons:
        inner = sub
        while isinstance(inner, Renamed):
            inner = inner.subcon
        size = sub.sizeof()
        if sub.name is not None:
            name, shortname = f"{prefix}.{sub.name}", f"{short}.{sub.name}" if short else sub.name
            if isinstance(inner, Struct):
                yield from _leaves(inner, name, shortname, offset)
            elif isinstance(inner, FormatField):
                bits = tuple((f"{name}.{bit}", mask) for bit, mask in cat.BITFIELDS.get(name, {}).items())
                yield ConfigField(name, shortname, offset, _FORMAT_WIDTH[inner.fmtstr], False,
                                  (sub.docs or sub.name).split("\n")[0], bits)
            elif isinstance(inner, Bytes):
                yield ConfigField(name, shortname, offset, size, True, (sub.docs or sub.name).split("\n")[0])
            else:
                raise TypeError(f"no config field for {inner!r} ({name})")
        offset += size


CONFIG_FIELDS: Mapping[str, tuple[ConfigField, ...]] = MappingProxyType({
    device: tuple(_leaves(structure, f"{PREFIX}.{device}", "", 0)) for device, structure in CONFIG_SPACES.items()
})
CONFIG_SIZE: Mapping[str, int] = MappingProxyType({device: s.sizeof() for device, s in CONFIG_SPACES.items()})
# Every dotted name the config spaces yield (bit fields included) -> its field.
FIELD_BY_NAME: Mapping[str, ConfigField] = MappingProxyType({
    name: field for fields in CONFIG_FIELDS.values() for field in fields
    for name in (field.name, *(bit for bit, _mask in field.bits))
})


def carries_config_space(request: int, is_reply: bool) -> bool:
    """Whether a main-channel message's config data is device config space (a GET_CONFIG request's is not)."""
    return (request, is_reply) in cat.CONFIG_SPACE_MESSAGES


def covered(device_type: str | None, offset: int, size: int) -> tuple[ConfigField, ...]:
    """The fields of a device's space that the window [offset, offset + size) covers whole."""
    return tuple(f for f in CONFIG_FIELDS.get(device_type or "", ())
                 if offset <= f.offset and f.offset + f.length <= offset + size)


def field_value(field: ConfigField, offset: int, data: bytes) -> int | bytes:
    """A covered field's value from a window's data that starts at `offset` of the space."""
    raw = bytes(data[field.offset - offset:field.offset - offset + field.length])
    return raw if field.is_bytes else int.from_bytes(raw, "little")


def decode_space(device_type: str | None, offset: int, data: bytes) -> Iterator[tuple[str, int | bytes]]:
    """(dotted name, value) for every field the window covers whole, bit fields after their field."""
    for field in covered(device_type, offset, len(data)):
        value = field_value(field, offset, data)
        yield field.name, value
        for bit, mask in field.bits:
            assert isinstance(value, int)
            yield bit, (value & mask) >> ((mask & -mask).bit_length() - 1)


def patch_space(device_type: str, offset: int, data: bytes, values: Mapping[str, int | bytes]) -> bytes:
    """`data` (a window at `offset`) with some fields set, by short name (`capacity`, `geometry.heads`).

    Raises ValueError for a name the device lacks, a field outside the window or a value that does not fit."""
    by_short = {f.short: f for f in CONFIG_FIELDS.get(device_type, ())}
    out = bytearray(data)
    for short, value in values.items():
        field = by_short.get(short)
        if field is None:
            raise ValueError(f"{device_type} config space has no field {short!r} (it has {', '.join(by_short)})")
        if field not in covered(device_type, offset, len(data)):
            raise ValueError(f"{short} (bytes {field.offset}-{field.offset + field.length - 1}) is not inside the "
                             f"window {offset}-{offset + len(data) - 1}")
        if isinstance(value, int):
            if field.is_bytes or not 0 <= value < 1 << (8 * field.length):
                raise ValueError(f"{short} takes {'bytes' if field.is_bytes else f'a u{8 * field.length}'}, "
                                 f"not {value!r}")
            encoded = value.to_bytes(field.length, "little")
        else:
            encoded = bytes(value)
            if not field.is_bytes or len(encoded) > field.length:
                raise ValueError(f"{short} takes {field.length} bytes, not {value!r}")
            encoded = encoded.ljust(field.length, b"\0")
        start = field.offset - offset
        out[start:start + field.length] = encoded
    return bytes(out)


def value_text(name: str, value: int | bytes) -> str:
    """A config field's value as a person reads it: counts in decimal, a MAC with colons, a tag as text."""
    short = name.rsplit(".", 1)[-1]
    if isinstance(value, bytes):
        if short == "mac" and len(value) == 6:
            return ":".join(f"{b:02x}" for b in value)
        if short == "tag":
            return repr(value.rstrip(b"\0").decode("utf-8", "replace"))
        return value[:16].hex() + ("…" if len(value) > 16 else "") if value.strip(b"\0") else "0"
    return str(value)


def summary(device_type: str | None, offset: int, data: bytes) -> str:
    """`capacity=131072 blk_size=512 num_queues=1`: a device's summary fields the window covers."""
    wanted = SUMMARY_FIELDS.get(device_type or "", ())
    return " ".join(f"{f.short}={value_text(f.name, field_value(f, offset, data))}"
                    for f in covered(device_type, offset, len(data)) if f.short in wanted)
