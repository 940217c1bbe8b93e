"""vhusniff: see, record, replay and change what a vhost-user front-end and back-end say to each other."""
from .model import Channel, Direction, FdInfo, Record, RecordKind
from .protocol.grammar import DecodeContext, Message, Problem, build_message, decode, encode
from .version import __version__

__all__ = ["__version__", "Channel", "Direction", "FdInfo", "Record", "RecordKind", "DecodeContext", "Message",
           "Problem", "build_message", "decode", "encode"]

# The scapy layers, loaded on first use (module __getattr__) so that `import vhusniff` does not import scapy.
_LAZY_LAYERS = ("VhostUser", "VhostUserBackend", "VhostUserGpu")


def __getattr__(name: str):
    if name in _LAZY_LAYERS:
        from .layers import packets as layers
        return getattr(layers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY_LAYERS])


# scapy's rdpcap reads our captures after `import vhusniff`, without the CLI paying for scapy (see scapy_capture).
from .layers.pcap import install as _install_scapy_layer  # noqa: E402  (after __getattr__, which it needs)

_install_scapy_layer()
