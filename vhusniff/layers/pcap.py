"""scapy reads vhusniff captures: the pseudo-header as a layer on LINKTYPE_USER0 (147), then VhostUser,
VhostUserBackend or VhostUserGpu by channel.

`import vhusniff` keeps the CLI cheap and does not import scapy. It registers this layer at once when scapy is
already imported, and otherwise installs an import hook that registers it as soon as the script imports scapy
(`scapy.utils` or `scapy.all`, once that import has finished: registering in the middle of
`scapy.all` would import scapy modules that are still half-initialised). Then `rdpcap` / `PcapNgReader` yield
packets with VhostUser layers. `register()` does it by hand.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_TRIGGERS = ("scapy.utils", "scapy.all", "scapy.packet", "scapy.fields")
# What the layer is built from: none of them may be half-initialised when it is built.
_NEEDED = ("scapy.config", "scapy.fields", "scapy.packet", "scapy.all", "vhusniff.layers.packets")
_registered = False


def register() -> None:
    """Bind the pseudo-header layer to link type 147 in scapy (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    from scapy.config import conf
    from ..capture.pcapng import LINKTYPE_USER0
    conf.l2types.register(LINKTYPE_USER0, pseudo_header_layer())


_layer = None


def pseudo_header_layer() -> type:
    """The scapy class of the vhusniff pseudo-header (docs/capture-format.md), made on first use."""
    global _layer
    if _layer is not None:
        return _layer
    from scapy.fields import (ByteEnumField, ByteField, ConditionalField, FieldLenField, LEIntField, LELongField,
                              LEShortField, LESignedLongField, PacketListField, StrFixedLenField, StrLenField)
    from scapy.packet import Packet, Raw

    from ..capture.pcapng import FD_KINDS, PSEUDO_MAGIC, PSEUDO_VERSION
    from .packets import header_class_for
    from ..model import Channel, Direction, EventKind, RecordKind
    from ..protocol.grammar import HEADER_SIZE

    _HEADERED_CHANNELS = (Channel.MAIN, Channel.BACKEND, Channel.GPU)
    _VERSIONS = (1, PSEUDO_VERSION)         # the layouts these fields describe

    class VhusniffFd(Packet):
        name = "vhusniff fd description"
        fields_desc = [
            ByteEnumField("kind", 0, dict(enumerate(FD_KINDS))),
            FieldLenField("name_length", None, length_of="fd_name", fmt="B"),
            LEShortField("seals", 0),
            LEIntField("reserved", 0),
            LELongField("inode", 0),
            LESignedLongField("size", -1),
            StrLenField("fd_name", b"", length_from=lambda pkt: pkt.name_length),
        ]

        def extract_padding(self, s):
            return b"", s

    class VhusniffRecord(Packet):
        name = "vhusniff record"
        fields_desc = [
            StrFixedLenField("magic", PSEUDO_MAGIC, 4),
            LEShortField("version", PSEUDO_VERSION),
            LEShortField("header_length", None),
            LEIntField("connection", 1),
            ByteEnumField("kind", 0, {int(k): k.name.lower() for k in RecordKind}),
            ByteEnumField("channel", 0, {int(c): c.name.lower() for c in Channel}),
            ByteEnumField("direction", 0, {int(d): d.arrow for d in Direction}),
            ByteField("flags", 0),
            FieldLenField("fd_count", None, count_of="fds", fmt="<H"),
            FieldLenField("note_length", None, length_of="note", fmt="<H"),
            # Version 2 adds the event kind (version 1 said it only in the note).
            ConditionalField(ByteEnumField("event", 0, {int(k): k.name for k in EventKind}),
                             lambda pkt: pkt.version >= 2),
            ConditionalField(StrFixedLenField("reserved", b"\0\0\0", 3), lambda pkt: pkt.version >= 2),
            PacketListField("fds", [], VhusniffFd, count_from=lambda pkt: pkt.fd_count),
            StrLenField("note", b"", length_from=lambda pkt: pkt.note_length),
        ]

        def post_build(self, pkt, pay):
            if self.header_length is None:
                pkt = pkt[:6] + len(pkt).to_bytes(2, "little") + pkt[8:]
            return pkt + pay

        def guess_payload_class(self, payload):
            if self.kind != RecordKind.MESSAGE or self.version not in _VERSIONS or len(payload) < HEADER_SIZE \
                    or self.channel not in _HEADERED_CHANNELS:
                return Raw             # events, and the device-state pipe's opaque stream, have no vhost-user header
            return header_class_for(Channel(self.channel))

        def mysummary(self):
            return self.sprintf("vhusniff c%connection% %direction%")

    _layer = VhusniffRecord
    return _layer


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Registers the layer once the first scapy trigger module has finished executing."""

    def find_spec(self, name, path, target=None):
        if name not in _TRIGGERS or _registered:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        original = spec.loader.exec_module

        def exec_module(module):
            original(module)
            if _mid_import(finished=name):
                return               # inside a larger scapy import (scapy.packet imports scapy.utils): wait
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            register()
        spec.loader.exec_module = exec_module
        return spec


def _mid_import(finished: str = "") -> bool:
    """Is any module the layer needs still executing its import (other than `finished`, whose code has just
    run to its end)? Building the layer then would fail."""
    for name in _NEEDED:
        if name == finished:
            continue
        module = sys.modules.get(name)
        if module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False):
            return True
    return False


def install() -> None:
    """What `import vhusniff` calls: register now if scapy is loaded, else when it is."""
    if any(name in sys.modules for name in _TRIGGERS):
        register()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
