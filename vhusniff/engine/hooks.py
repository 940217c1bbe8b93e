"""Hooks: change messages in flight, in the live proxy and in replay (in the manner of mitmproxy addons).

A hook is any object (or a module) with an optional method `message(flow)`, called for every message before it
is forwarded. Through the flow it sees the message as a scapy layer (`flow.layer`, edits are re-encoded by the
grammar) and as decoded data (`flow.message`), and it can drop the message, delay it, inject new messages, or
disconnect. The built-in rewrites below are hooks on this same API.

    # my_hook.py  --  vhusniff proxy ... --hook my_hook.py
    def message(flow):
        if flow.message.name == "GET_QUEUE_NUM" and flow.message.is_reply:
            flow.layer.queue_num = 1
"""
from __future__ import annotations

import importlib.util
import struct
import sys
import traceback
from dataclasses import dataclass, field

from ..protocol import catalogue as cat
from ..model import Channel, Direction
from ..protocol.grammar import HEADER_SIZE, DecodeContext, Message, decode


@dataclass
class Injected:
    data: bytes
    direction: Direction               # who it appears to come from
    channel: Channel
    fds: list[int] = field(default_factory=list)


class Flow:
    """One message on its way through: what it is, where it goes, and what the hooks decided."""

    def __init__(self, data: bytes, fds: list[int], connection: int, channel: Channel, direction: Direction,
                 number: int, context: DecodeContext, message: Message | None = None):
        self.original = data
        self.fds = fds
        self.connection = connection
        self.channel = channel
        self.direction = direction
        self.number = number                 # message number on this connection, all channels, from 1
        self.context = context               # what the session negotiated so far
        self.message = message or decode(data, channel, context)
        self.fix_size = True                 # recompute the header's size after an edit
        self.dropped = False
        self.delay_seconds = 0.0
        self.disconnect_reason = ""
        self.disconnect_after_forward = False
        self.injected: list[Injected] = []
        self._layer = None
        self._replacement: bytes | None = None

    @property
    def layer(self):
        """The message as a scapy layer; assignments to its fields change what is forwarded."""
        if self._layer is None:
            from ..layers.packets import header_class_for
            self._layer = header_class_for(self.channel)(self.original)
            self._layer.vhost_context = self.context
        return self._layer

    def replace(self, data: bytes) -> None:
        """Forward these bytes instead (taken as they are: no size fix-up)."""
        self._replacement = bytes(data)

    def drop(self) -> None:
        self.dropped = True

    def delay(self, seconds: float) -> None:
        self.delay_seconds = max(self.delay_seconds, seconds)

    def disconnect(self, reason: str = "hook asked to disconnect", after_forward: bool = False) -> None:
        """Close both sides: instead of forwarding this message, or (after_forward) right after it."""
        self.disconnect_reason = reason
        self.disconnect_after_forward = after_forward

    def inject(self, data, *, to_backend: bool | None = None, channel: Channel | None = None,
               fds: list[int] | None = None) -> None:
        """Send another message right after this one; by default in this message's direction and channel."""
        data = bytes(data)
        if to_backend is None:
            direction = self.direction
        else:
            direction = Direction.FRONTEND_TO_BACKEND if to_backend else Direction.BACKEND_TO_FRONTEND
        self.injected.append(Injected(data, direction, channel if channel is not None else self.channel,
                                      list(fds or [])))

    def final_bytes(self) -> bytes:
        """What goes on the wire: the original bytes unless a hook changed the message."""
        if self._replacement is not None:
            return self._replacement
        if self._layer is None:
            return self.original
        built = bytes(self._layer)
        if built == self.original:
            return self.original
        if self.fix_size:
            built = built[:8] + struct.pack("<I", len(built) - HEADER_SIZE) + built[HEADER_SIZE:]
        return built

    @property
    def modified(self) -> bool:
        return self.final_bytes() != self.original


class HookError(Exception):
    pass


class HookChain:
    """Runs the hooks in order for each flow; a hook that raises is reported and a policy applies."""

    def __init__(self, hooks: list, on_error: str = "forward", report=None):
        if on_error not in ("forward", "disconnect"):
            raise ValueError("on_error is 'forward' or 'disconnect'")
        self.hooks = [h for h in hooks if callable(getattr(h, "message", None))]
        self.on_error = on_error
        self.report = report or (lambda text: print(text, file=sys.stderr))
        self.errors = 0

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def run(self, flow: Flow) -> Flow:
        for hook in self.hooks:
            try:
                hook.message(flow)
            except Exception:
                self.errors += 1
                name = getattr(hook, "__name__", type(hook).__name__)
                self.report(f"hook {name} raised on connection {flow.connection} message #{flow.number} "
                            f"({flow.message.summary()}):\n{traceback.format_exc().rstrip()}\n"
                            f"policy: {'forward the message unchanged' if self.on_error == 'forward' else 'disconnect'}")
                # Whatever the hook half-did is undone: the policy decides, not a partial edit.
                flow._layer, flow._replacement, flow.dropped, flow.injected = None, None, False, []
                flow.delay_seconds = 0.0
                if self.on_error == "disconnect":
                    flow.disconnect(f"hook {name} raised")
                break
        return flow


def load_hook_file(path: str):
    """A hook script as a module: its `message(flow)` function, or every object in its `addons` list."""
    spec = importlib.util.spec_from_file_location(f"vhusniff_hook_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise HookError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise HookError(f"{path}: failed to load: {error!r}") from error
    addons = getattr(module, "addons", None)
    if addons is not None:
        return list(addons)
    if not callable(getattr(module, "message", None)):
        raise HookError(f"{path}: defines neither message(flow) nor addons")
    return [module]


# ---- built-in rewrites, on the same API ----

def _feature_mask(field: str, names: list[str], device_type: str | None = None) -> int:
    """The mask of bit names (or numbers) in a bit-set field, as the catalogue reads them for a device type."""
    mask = 0
    for name in names:
        name = name.strip().upper()
        try:
            mask |= 1 << (int(name) if name.isdigit() else cat.bit_number(field, name, device_type))
        except cat.BitNameError as error:
            raise HookError(str(error)) from None
    return mask


class MaskProtocolFeatures:
    """Clear protocol feature bits in the back-end's GET_PROTOCOL_FEATURES reply (the front-end never sees them)."""

    def __init__(self, names: list[str]):
        self.mask = _feature_mask("protocol_features", names)

    def message(self, flow: Flow) -> None:
        m = flow.message
        if m.channel == Channel.MAIN and m.is_reply and m.request == cat.FrontendRequest.GET_PROTOCOL_FEATURES \
                and m.kind == "protocol_features":
            flow.layer.protocol_features = m.payload.protocol_features & ~self.mask


class MaskFeatures:
    """Clear virtio feature bits in the back-end's GET_FEATURES reply.

    Device-specific names mean the bits of the connection's device type (`flow.context.device_type`): MQ is bit
    12 on blk, 22 on net. A name is checked at once against every device type; on a connection it must be a bit
    of that connection's device (or, when the type is unknown, mean one bit on every device that has it), else
    the hook raises and the chain reports it.
    """

    def __init__(self, names: list[str]):
        self.names = [name.strip().upper() for name in names]
        for name in self.names:
            if not name.isdigit() and not any(bit is not None for bit in
                                               cat.bit_number_by_device("features", name).values()):
                raise HookError(f"unknown feature bit name {name!r}")
        self._masks: dict[str | None, int] = {}       # per device type: bounded by the catalogue's types

    def mask_for(self, device_type: str | None) -> int:
        mask = self._masks.get(device_type)
        if mask is None:
            mask = self._masks[device_type] = _feature_mask("features", self.names, device_type)
        return mask

    def message(self, flow: Flow) -> None:
        m = flow.message
        if m.channel == Channel.MAIN and m.is_reply and m.request == cat.FrontendRequest.GET_FEATURES \
                and m.kind == "features":
            flow.layer.features = m.payload.features & ~self.mask_for(flow.context.device_type)


class CapReply:
    """Cap a u64 reply (GET_QUEUE_NUM's queue count, GET_MAX_MEM_SLOTS's slot count) at a maximum."""

    def __init__(self, request: int, field_name: str, maximum: int):
        self.request, self.field_name, self.maximum = request, field_name, maximum

    def message(self, flow: Flow) -> None:
        m = flow.message
        if m.channel == Channel.MAIN and m.is_reply and m.request == self.request and m.kind == self.field_name:
            value = m.payload[self.field_name]
            if value > self.maximum:
                setattr(flow.layer, self.field_name, self.maximum)


class DropRequest:
    """Drop every front-end request of one kind (by name or number)."""

    def __init__(self, request: str):
        self.request = _request_number(request)

    def message(self, flow: Flow) -> None:
        m = flow.message
        if m.channel == Channel.MAIN and not m.is_reply and m.request == self.request:
            flow.drop()


class DelayReplies:
    """Hold every back-end reply on the main channel for some seconds."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def message(self, flow: Flow) -> None:
        if flow.channel == Channel.MAIN and flow.message.is_reply:
            flow.delay(self.seconds)


class DisconnectAt:
    """Close both sides right after the Nth message of a connection has been forwarded."""

    def __init__(self, number: int):
        self.number = number

    def message(self, flow: Flow) -> None:
        if flow.number == self.number:
            flow.disconnect(f"disconnect-at {self.number}: closing after message #{self.number}", after_forward=True)


def _request_number(text: str) -> int:
    text = text.strip().upper()
    if text.isdigit():
        return int(text)
    if text in cat.FrontendRequest.__members__:
        return cat.FrontendRequest[text]
    if text in cat.REQUEST_ALIASES:
        return int(cat.REQUEST_ALIASES[text])
    raise HookError(f"unknown request name {text!r}")


def add_hook_arguments(parser) -> None:
    """The command-line switches for hooks and built-in rewrites (proxy and replay share them)."""
    group = parser.add_argument_group("hooks and rewrites")
    group.add_argument("--hook", action="append", default=[], metavar="FILE.py",
                       help="a Python hook script with message(flow) (repeatable)")
    group.add_argument("--on-hook-error", choices=("forward", "disconnect"), default="forward",
                       help="when a hook raises: forward the message unchanged (default) or drop the connection")
    group.add_argument("--mask-protocol-features", metavar="NAMES", help="e.g. REPLY_ACK,CONFIG")
    group.add_argument("--mask-features", metavar="NAMES", help="virtio feature bits, e.g. RING_EVENT_IDX")
    group.add_argument("--max-queues", type=int, metavar="N", help="cap GET_QUEUE_NUM's reply")
    group.add_argument("--max-mem-slots", type=int, metavar="N", help="cap GET_MAX_MEM_SLOTS's reply")
    group.add_argument("--drop-request", action="append", default=[], metavar="NAME", help="drop this request")
    group.add_argument("--delay-replies", type=float, metavar="SECONDS", help="hold each reply this long")
    group.add_argument("--disconnect-at", type=int, metavar="N", help="close both sides after message N")


def hooks_from_arguments(args) -> list:
    hooks: list = []
    if args.mask_protocol_features:
        hooks.append(MaskProtocolFeatures(args.mask_protocol_features.split(",")))
    if args.mask_features:
        hooks.append(MaskFeatures(args.mask_features.split(",")))
    if args.max_queues is not None:
        hooks.append(CapReply(cat.FrontendRequest.GET_QUEUE_NUM, "queue_num", args.max_queues))
    if args.max_mem_slots is not None:
        hooks.append(CapReply(cat.FrontendRequest.GET_MAX_MEM_SLOTS, "mem_slots", args.max_mem_slots))
    hooks.extend(DropRequest(name) for name in args.drop_request)
    if args.delay_replies:
        hooks.append(DelayReplies(args.delay_replies))
    if args.disconnect_at:
        hooks.append(DisconnectAt(args.disconnect_at))
    for path in args.hook:
        hooks.extend(load_hook_file(path))
    return hooks
