"""The built-in rewrites: hooks on the same API users write (engine.hooks), and their command-line switches,
shared by `vhusniff proxy`, `lab` and `replay`."""
from __future__ import annotations

from ..model import Channel
from ..protocol import catalogue as cat
from .hooks import Flow, HookError, load_hook_file


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
