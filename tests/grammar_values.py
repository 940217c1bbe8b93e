"""Hypothesis strategies derived from the grammar itself: a valid value for any payload kind."""
from __future__ import annotations

from construct import Array, Bytes, BytesInteger, FormatField, GreedyBytes, Renamed, Struct
from hypothesis import strategies as st

from vhusniff.protocol.grammar import PAYLOADS

_INT_BITS = {"<B": 8, "B": 8, "<H": 16, "<L": 32, "<Q": 64}


def _strip(subcon):
    while isinstance(subcon, Renamed):
        subcon = subcon.subcon
    return subcon


def _leaf(subcon):
    inner = _strip(subcon)
    if isinstance(inner, FormatField):
        return st.integers(0, (1 << _INT_BITS[inner.fmtstr]) - 1)
    if isinstance(inner, BytesInteger):
        return st.integers(0, (1 << (8 * inner.length)) - 1)
    if isinstance(inner, Bytes) and isinstance(inner.length, int) and inner.length > 1024:
        # a large blob (the GPU's 16 KiB cursor image): a short drawn start, zero-filled, keeps examples small
        return st.binary(max_size=64).map(lambda start, n=inner.length: start.ljust(n, b"\0"))
    if isinstance(inner, Bytes) and isinstance(inner.length, int):
        return st.binary(min_size=inner.length, max_size=inner.length)
    if inner is GreedyBytes:
        return st.binary(max_size=64)
    if isinstance(inner, Struct):
        return struct_values(inner)
    raise TypeError(inner)


@st.composite
def struct_values(draw, structure: Struct):
    """A dict that builds with `structure`, sizes and counts kept consistent."""
    value = {}
    for sub in structure.subcons:
        inner = _strip(sub)
        if sub.name in ("size",) and any(_strip(s).__class__ is Bytes and not isinstance(_strip(s).length, int)
                                         for s in structure.subcons):
            value["size"] = draw(st.integers(0, 256))
        elif sub.name == "nregions" and isinstance(_strip(structure.subcons[-1]), Array) and \
                not isinstance(_strip(structure.subcons[-1]).count, int):
            value["nregions"] = draw(st.integers(0, 8))
        elif isinstance(inner, Bytes) and not isinstance(inner.length, int):
            value[sub.name] = draw(st.binary(min_size=value["size"], max_size=value["size"]))
        elif isinstance(inner, Array):
            count = inner.count if isinstance(inner.count, int) else value["nregions"]
            value[sub.name] = draw(st.lists(_leaf(inner.subcon), min_size=count, max_size=count))
        else:
            value[sub.name] = draw(_leaf(inner))
    return value


def payload_values(kind: str):
    return struct_values(PAYLOADS[kind][0])
