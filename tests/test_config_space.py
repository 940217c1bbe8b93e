"""Device config space: GET_CONFIG replies and SET_CONFIG requests decode per device at the virtio spec's offsets,
a partial window decodes only the fields it covers whole, and the message's bytes still round-trip exactly."""
from __future__ import annotations

from pathlib import Path

import pytest

from vhusniff.capture.pcapng import read_capture
from vhusniff.layers import packets as layers
from vhusniff.model import Channel
from vhusniff.protocol import catalogue as cat
from vhusniff.protocol import config as config_space
from vhusniff.protocol.context import ContextTracker
from vhusniff.protocol.grammar import DecodeContext, build_message, decode, encode, iter_fields
from vhusniff.views.present import field_tree

GET_CONFIG, SET_CONFIG = cat.FrontendRequest.GET_CONFIG, cat.FrontendRequest.SET_CONFIG
CAPTURES = Path(__file__).resolve().parent.parent / "captures"

# The oracle: (field, byte offset, width) per device, from the spec's struct virtio_<device>_config (and the
# sizes of the Linux uapi structs), written out here independently of the declarations.
SPEC_OFFSETS = {
    "blk": [("capacity", 0, 8), ("size_max", 8, 4), ("seg_max", 12, 4), ("geometry.cylinders", 16, 2),
            ("geometry.heads", 18, 1), ("geometry.sectors", 19, 1), ("blk_size", 20, 4),
            ("topology.physical_block_exp", 24, 1), ("topology.alignment_offset", 25, 1),
            ("topology.min_io_size", 26, 2), ("topology.opt_io_size", 28, 4), ("writeback", 32, 1),
            ("num_queues", 34, 2), ("max_discard_sectors", 36, 4), ("max_discard_seg", 40, 4),
            ("discard_sector_alignment", 44, 4), ("max_write_zeroes_sectors", 48, 4),
            ("max_write_zeroes_seg", 52, 4), ("write_zeroes_may_unmap", 56, 1),
            ("max_secure_erase_sectors", 60, 4), ("max_secure_erase_seg", 64, 4),
            ("secure_erase_sector_alignment", 68, 4), ("zoned.zone_sectors", 72, 4), ("zoned.max_open_zones", 76, 4),
            ("zoned.max_active_zones", 80, 4), ("zoned.max_append_sectors", 84, 4),
            ("zoned.write_granularity", 88, 4), ("zoned.model", 92, 1)],
    "net": [("mac", 0, 6), ("status", 6, 2), ("max_virtqueue_pairs", 8, 2), ("mtu", 10, 2), ("speed", 12, 4),
            ("duplex", 16, 1), ("rss_max_key_size", 17, 1), ("rss_max_indirection_table_length", 18, 2),
            ("supported_hash_types", 20, 4)],
    "gpu": [("events_read", 0, 4), ("events_clear", 4, 4), ("num_scanouts", 8, 4), ("num_capsets", 12, 4)],
    "fs": [("tag", 0, 36), ("num_request_queues", 36, 4), ("notify_buf_size", 40, 4)],
    "scsi": [("num_queues", 0, 4), ("seg_max", 4, 4), ("max_sectors", 8, 4), ("cmd_per_lun", 12, 4),
             ("event_info_size", 16, 4), ("sense_size", 20, 4), ("cdb_size", 24, 4), ("max_channel", 28, 2),
             ("max_target", 30, 2), ("max_lun", 32, 4)],
    "input": [("select", 0, 1), ("subsel", 1, 1), ("size", 2, 1), ("u", 8, 128)],
    "vsock": [("guest_cid", 0, 8)],
    "crypto": [("status", 0, 4), ("max_dataqueues", 4, 4), ("crypto_services", 8, 4), ("cipher_algo_l", 12, 4),
               ("cipher_algo_h", 16, 4), ("hash_algo", 20, 4), ("mac_algo_l", 24, 4), ("mac_algo_h", 28, 4),
               ("aead_algo", 32, 4), ("max_cipher_key_len", 36, 4), ("max_auth_key_len", 40, 4),
               ("akcipher_algo", 44, 4), ("max_size", 48, 8)],
}
SPEC_SIZES = {"blk": 96, "net": 24, "gpu": 16, "fs": 44, "scsi": 36, "input": 136, "vsock": 8, "crypto": 56}


def space_bytes(size: int) -> bytes:
    """A config space whose every byte differs from its neighbours, so a field at a wrong offset reads wrong."""
    return bytes((7 * i + 1) & 0xFF for i in range(size))


def config_message(request: int, offset: int, data: bytes, reply: bool) -> bytes:
    return build_message(Channel.MAIN, request, dict(offset=offset, size=len(data), flags=0, data=data), reply=reply,
                         kind="config")


def config_fields(message) -> dict:
    return {name: value for name, value in iter_fields(message) if name.startswith("config.")
            and name not in ("config.offset", "config.size", "config.flags", "config.data")}


def test_every_device_type_of_the_catalogue_has_a_layout_of_the_spec_size():
    assert set(config_space.CONFIG_SPACES) == set(cat.DEVICE_TYPES)
    assert dict(config_space.CONFIG_SIZE) == SPEC_SIZES


@pytest.mark.parametrize("device", sorted(SPEC_OFFSETS))
@pytest.mark.parametrize("number, reply", [(GET_CONFIG, True), (SET_CONFIG, False)])
def test_each_device_layout_reads_its_fields_at_the_spec_offsets(device, number, reply):
    data = space_bytes(SPEC_SIZES[device])
    raw = config_message(number, 0, data, reply)
    message = decode(raw, Channel.MAIN, DecodeContext(device_type=device))
    assert encode(message) == raw
    fields = config_fields(message)
    expected = {}
    for short, offset, width in SPEC_OFFSETS[device]:
        chunk = data[offset:offset + width]
        value = chunk if short in ("mac", "tag", "u") else int.from_bytes(chunk, "little")
        expected[f"config.{device}.{short}"] = value
        for bit, mask in cat.BITFIELDS.get(f"config.{device}.{short}", {}).items():
            expected[f"config.{device}.{short}.{bit}"] = int(bool(int.from_bytes(chunk, "little") & mask))
    assert fields == expected


def test_a_partial_read_decodes_only_the_fields_it_covers_whole():
    space = space_bytes(96)
    ctx = DecodeContext(device_type="blk")

    def covered(offset, size):
        message = decode(config_message(GET_CONFIG, offset, space[offset:offset + size], True), Channel.MAIN, ctx)
        assert encode(message) == message.raw
        return config_fields(message)

    # geometry and blk_size: bytes 16-23
    assert covered(16, 8) == {"config.blk.geometry.cylinders": int.from_bytes(space[16:18], "little"),
                              "config.blk.geometry.heads": space[18], "config.blk.geometry.sectors": space[19],
                              "config.blk.blk_size": int.from_bytes(space[20:24], "little")}
    assert list(covered(2, 8)) == []                      # half of capacity, half of size_max: nothing whole
    assert list(covered(34, 2)) == ["config.blk.num_queues"]
    assert list(covered(33, 4)) == ["config.blk.num_queues"]  # the unused byte and half a field around it
    assert len(covered(0, 57)) == 19                      # what QEMU 7.2 asks for: up to write_zeroes_may_unmap
    assert len(covered(0, 200)) == 28                     # a window past the layout: every field, no more


def test_get_config_requests_unknown_devices_and_other_channels_stay_raw():
    data = space_bytes(24)
    blk, unknown = DecodeContext(device_type="blk"), DecodeContext()
    assert config_fields(decode(config_message(GET_CONFIG, 0, data, False), Channel.MAIN, blk)) == {}
    assert config_fields(decode(config_message(SET_CONFIG, 0, data, True), Channel.MAIN, blk)) == {}
    reply = decode(config_message(GET_CONFIG, 0, data, True), Channel.MAIN, unknown)
    assert config_fields(reply) == {} and reply.summary() == "GET_CONFIG reply offset=0 size=24 flags=0 data=24B"


def test_the_blk_boot_capture_shows_the_lab_disk_and_its_queues():
    tracker = ContextTracker()
    replies = [m for r in read_capture(CAPTURES / "qemu-blk-boot.pcapng") if (m := tracker.decode(r)) is not None
               and m.name == "GET_CONFIG" and m.is_reply]
    assert replies
    fields = config_fields(replies[0])
    assert fields["config.blk.capacity"] == 64 * 1024 * 1024 // 512 == 131072
    assert fields["config.blk.num_queues"] == 1 and fields["config.blk.blk_size"] == 512
    assert replies[0].summary().endswith("data=57B capacity=131072 blk_size=512 num_queues=1")
    assert "      config.blk.capacity: 131072" in field_tree(replies[0])
    assert "        config.blk.geometry.heads: 0" in field_tree(replies[0])


def test_net_and_fs_values_read_as_people_write_them():
    net = bytes.fromhex("525400123456") + (1).to_bytes(2, "little") + (4).to_bytes(2, "little") + \
        (1500).to_bytes(2, "little")
    message = decode(config_message(GET_CONFIG, 0, net, True), Channel.MAIN, DecodeContext(device_type="net"))
    assert message.summary().endswith("mac=52:54:00:12:34:56 status=1 max_virtqueue_pairs=4 mtu=1500")
    assert config_fields(message)["config.net.status.link_up"] == 1
    assert config_fields(message)["config.net.status.announce"] == 0
    fs = b"myfs".ljust(36, b"\0") + (2).to_bytes(4, "little")
    message = decode(config_message(GET_CONFIG, 0, fs, True), Channel.MAIN, DecodeContext(device_type="fs"))
    assert message.summary().endswith("tag='myfs' num_request_queues=2")
    assert "      config.fs.tag: 'myfs'" in field_tree(message)


def test_the_scapy_layer_reads_and_sets_the_window_fields_and_rebuilds_exactly():
    space = space_bytes(96)
    raw = config_message(GET_CONFIG, 16, space[16:60], True)
    layer = layers.VhostUser(raw)
    layer.vhost_context = DecodeContext(device_type="blk")
    config = layer[layers.PAYLOAD_LAYERS["config"]]
    assert bytes(layer) == raw
    assert config.device_config()["blk_size"] == int.from_bytes(space[20:24], "little")
    assert "capacity" not in config.device_config()
    config.set_device_config({"geometry.heads": 16}, num_queues=4)
    edited = bytes(layer)
    assert len(edited) == len(raw) and edited != raw
    fields = config_fields(decode(edited, Channel.MAIN, DecodeContext(device_type="blk")))
    assert fields["config.blk.geometry.heads"] == 16 and fields["config.blk.num_queues"] == 4
    assert fields["config.blk.blk_size"] == int.from_bytes(space[20:24], "little")
    with pytest.raises(ValueError, match="not inside the window"):
        config.set_device_config(capacity=1)
    with pytest.raises(ValueError, match="no field 'nope'"):
        config.set_device_config(nope=1)
    with pytest.raises(ValueError, match="u16"):
        config.set_device_config(num_queues=1 << 16)
    unknown = layers.VhostUser(raw)[layers.PAYLOAD_LAYERS["config"]]
    assert unknown.device_config() == {}
    with pytest.raises(ValueError, match="not known"):
        unknown.set_device_config(num_queues=1)
