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
    """Bind the capture record layer (layers.packets) to link type 147 in scapy (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    from .packets import register as bind
    bind()


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


def read_packets(path):
    """scapy's packets of a capture (rdpcap) with connections keyed as every vhusniff reader keys them: by source
    and number. Each vhusniff record's `connection` field is the number `vhusniff read` shows (unique across the
    sources of a merged capture; a capture of one source keeps its numbers) and `packet.sniffed_on` is its
    source (capture.pcapng.capture_source), which scapy alone cannot see: it sits in the interface description."""
    from scapy.utils import rdpcap

    from ..capture.pcapng import read_capture
    from .packets import VhusniffRecord
    register()
    packets = rdpcap(str(path))
    records = read_capture(path)
    for packet in packets:
        if VhusniffRecord not in packet:
            continue
        record = next(records)
        packet[VhusniffRecord].connection = record.connection
        if record.source:
            packet.sniffed_on = record.source
    return packets
