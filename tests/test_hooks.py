"""Hooks change messages through the grammar, and a failing hook cannot corrupt or stop the flow."""
from __future__ import annotations

import struct

import pytest

from vhusniff import catalogue as cat
from vhusniff.hooks import (
    DisconnectAt, DropRequest, Flow, HookChain, HookError, MaskProtocolFeatures, CapReply, load_hook_file,
)
from vhusniff.model import Channel, Direction
from vhusniff.protocol import DEFAULT_CONTEXT, build_message, decode

F, B = Direction.FRONTEND_TO_BACKEND, Direction.BACKEND_TO_FRONTEND


def flow_of(data, direction=F, number=1):
    return Flow(data, [], 1, Channel.MAIN, direction, number, DEFAULT_CONTEXT)


def test_untouched_flow_forwards_the_exact_bytes():
    raw = build_message(Channel.MAIN, 8, dict(index=0, num=256))
    flow = flow_of(raw)
    flow.layer  # looking is not changing
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

    from vhusniff.hooks import add_hook_arguments, hooks_from_arguments
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
