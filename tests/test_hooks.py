"""Hooks change messages through the grammar, and a failing hook cannot corrupt or stop the flow."""
from __future__ import annotations

import struct

import pytest

from peers import require
from vhusniff.capture.pcapng import read_capture
from vhusniff.engine.hooks import Flow, HookChain, HookError, load_hook_file
from vhusniff.engine.rewrites import CapReply, DisconnectAt, DropRequest, MaskFeatures, MaskProtocolFeatures
from vhusniff.model import Channel, Direction
from vhusniff.protocol import catalogue as cat
from vhusniff.protocol.context import ContextTracker
from vhusniff.protocol.grammar import DEFAULT_CONTEXT, DecodeContext, build_message, decode

F, B = Direction.FRONTEND_TO_BACKEND, Direction.BACKEND_TO_FRONTEND


def flow_of(data, direction=F, number=1):
    return Flow(data, [], 1, Channel.MAIN, direction, number, DEFAULT_CONTEXT)


def test_untouched_flow_forwards_the_exact_bytes():
    raw = build_message(Channel.MAIN, 8, dict(index=0, num=256))
    flow = flow_of(raw)
    assert flow.layer is not None  # looking is not changing
    assert flow.final_bytes() is raw or flow.final_bytes() == raw
    assert not flow.modified


def test_mask_reply_ack_rewrites_the_protocol_features_reply():
    reply = struct.pack("<IIIQ", 15, 5, 8, 0x8F2B)
    flow = HookChain([MaskProtocolFeatures(["REPLY_ACK"])]).run(flow_of(reply, B))
    assert decode(flow.final_bytes()).payload.protocol_features == 0x8F2B & ~(1 << 3)
    assert struct.unpack_from("<III", flow.final_bytes()) == (15, 5, 8)


def test_cap_queue_num_and_drop_request():
    reply = struct.pack("<IIIQ", 17, 5, 8, 8)
    flow = HookChain([CapReply(cat.FrontendRequest.GET_QUEUE_NUM, "queue_num", 2)]).run(flow_of(reply, B))
    assert decode(flow.final_bytes()).payload.queue_num == 2
    flow = HookChain([DropRequest("SET_VRING_ENABLE")]).run(flow_of(build_message(Channel.MAIN, 18, dict(index=0,
                                                                                                         num=1))))
    assert flow.dropped


def test_edit_that_changes_length_fixes_the_size_unless_told_not_to():
    raw = build_message(Channel.MAIN, 24, dict(offset=0, size=4, flags=0, data=b"abcd"))
    flow = flow_of(raw)
    flow.layer.size = None  # header size recomputed by scapy, and by the size fix-up
    flow.layer.payload.size = 2
    flow.layer.payload.data = b"ab"
    out = flow.final_bytes()
    assert struct.unpack_from("<I", out, 8)[0] == len(out) - 12 == 14
    assert decode(out).payload.data == b"ab"


def test_hook_that_raises_is_reported_and_the_message_forwarded_unchanged():
    reports = []

    class Broken:
        def message(self, flow):
            flow.layer.num = 7
            raise RuntimeError("boom")

    raw = build_message(Channel.MAIN, 8, dict(index=0, num=256))
    flow = HookChain([Broken()], report=reports.append).run(flow_of(raw, number=5))
    assert flow.final_bytes() == raw and not flow.disconnect_reason
    assert "message #5" in reports[0] and "RuntimeError: boom" in reports[0] and "SET_VRING_NUM" in reports[0]
    flow = HookChain([Broken()], on_error="disconnect", report=reports.append).run(flow_of(raw))
    assert flow.disconnect_reason


def test_disconnect_at_n_after_forwarding():
    flow = HookChain([DisconnectAt(3)]).run(flow_of(build_message(Channel.MAIN, 3), number=3))
    assert flow.disconnect_reason and flow.disconnect_after_forward and not flow.dropped


def test_hook_file_loading(tmp_path):
    script = tmp_path / "hook.py"
    script.write_text("def message(flow):\n    flow.inject(flow.original)\n")
    (hook,) = load_hook_file(str(script))
    raw = build_message(Channel.MAIN, 3)
    flow = HookChain([hook]).run(flow_of(raw))
    assert flow.injected[0].data == raw and flow.injected[0].direction == F
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(HookError, match="bad.py"):
        load_hook_file(str(bad))


def test_hook_arguments_build_the_built_in_rewrites(tmp_path):
    import argparse

    from vhusniff.engine.rewrites import add_hook_arguments, hooks_from_arguments
    script = tmp_path / "mine.py"
    script.write_text("def message(flow):\n    pass\n")
    parser = argparse.ArgumentParser()
    add_hook_arguments(parser)
    args = parser.parse_args(["--mask-protocol-features", "REPLY_ACK,SLAVE_REQ", "--max-queues", "2",
                              "--drop-request", "SET_VRING_ERR", "--disconnect-at", "5", "--hook", str(script),
                              "--on-hook-error", "disconnect"])
    hooks = hooks_from_arguments(args)
    kinds = [type(hook).__name__ for hook in hooks]
    assert kinds == ["MaskProtocolFeatures", "CapReply", "DropRequest", "DisconnectAt", "module"]
    assert hooks[0].mask == 1 << 3 | 1 << 5                 # the old name SLAVE_REQ is BACKEND_REQ
    assert args.on_hook_error == "disconnect"
    with pytest.raises(HookError, match="NO_SUCH_BIT"):
        hooks_from_arguments(parser.parse_args(["--mask-protocol-features", "NO_SUCH_BIT"]))


def test_a_raising_hook_does_not_stop_the_hooks_before_it_and_its_report_names_the_message():
    reports = []

    class Cap:
        def message(self, flow):
            if flow.message.is_reply:
                flow.layer.queue_num = 1

    class Broken:
        def message(self, flow):
            raise KeyError("missing")

    reply = struct.pack("<IIIQ", 17, 5, 8, 8)
    chain = HookChain([Cap(), Broken()], report=reports.append)
    flow = chain.run(flow_of(reply, B, number=9))
    # The policy is "forward unchanged": even the earlier hook's edit is undone, so the bytes are the original.
    assert flow.final_bytes() == reply and chain.errors == 1
    assert "hook Broken raised on connection 1 message #9 (GET_QUEUE_NUM reply" in reports[0]
    assert "KeyError: 'missing'" in reports[0] and "policy: forward the message unchanged" in reports[0]


# ---- feature names mean the bits of the connection's device type ----

def features_reply_flow(features: int, device_type: str | None):
    reply = struct.pack("<IIIQ", 1, 5, 8, features)
    return Flow(reply, [], 1, Channel.MAIN, B, 2, DecodeContext(device_type=device_type))


def test_mask_features_reads_device_names_for_the_connections_device():
    everything = (1 << 64) - 1
    for device, names, cleared in [("blk", ["FLUSH"], 1 << 9), ("blk", ["MQ"], 1 << 12), ("net", ["MQ"], 1 << 22),
                                   ("net", ["MRG_RXBUF", "RING_EVENT_IDX"], 1 << 15 | 1 << 29),
                                   (None, ["FLUSH", "33"], 1 << 9 | 1 << 33)]:
        flow = HookChain([MaskFeatures(names)]).run(features_reply_flow(everything, device))
        assert decode(flow.final_bytes()).payload.features == everything & ~cleared, (device, names)


def test_a_feature_name_the_device_does_not_have_or_an_ambiguous_one_is_reported_by_name():
    reports = []
    for device, names, words in [(None, ["MQ"], "'MQ' means a different bit per device (net bit 22, blk bit 12)"),
                                 ("net", ["FLUSH"], "'FLUSH' is not a feature bit of a net device (it is blk bit 9)")]:
        flow = HookChain([MaskFeatures(names)], report=reports.append).run(features_reply_flow(0xFFFF, device))
        assert flow.final_bytes() == flow.original and words in reports[-1]
    with pytest.raises(HookError, match="unknown feature bit name 'NO_SUCH_BIT'"):
        MaskFeatures(["FLUSH", "NO_SUCH_BIT"])


def test_mask_features_flush_on_a_real_qemu_storage_daemon_session(tmp_path):
    """--mask-features FLUSH through the proxy between real QEMU and qemu-storage-daemon: the daemon offers bit 9,
    the hook takes it out of the reply as blk's FLUSH, and QEMU then does not negotiate it."""
    require("qemu-storage-daemon")
    from vhusniff.lab.command import record_boot
    result, capture = record_boot(tmp_path, hooks=[MaskFeatures(["FLUSH"])], timeout=30)
    assert result.blk_io_ok, result.console
    tracker = ContextTracker()
    offered, acked = [], []
    for record in read_capture(capture):
        message = tracker.decode(record)
        if message is None or message.kind != "features":
            continue
        assert message.context.device_type == "blk"
        (offered if message.is_reply else acked).append(message.payload.features)
    assert offered and acked
    assert all(not features & 1 << 9 for features in offered), [hex(f) for f in offered]
    assert all(not features & 1 << 9 for features in acked), [hex(f) for f in acked]
    assert all(features & 1 << 12 for features in offered), "the daemon's other bits (blk's MQ) are left alone"
    assert any(features & 1 << 32 for features in acked), "QEMU negotiated the rest (VERSION_1)"
