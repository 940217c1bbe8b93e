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
                            f"policy: "
                            f"{'forward the message unchanged' if self.on_error == 'forward' else 'disconnect'}")
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
