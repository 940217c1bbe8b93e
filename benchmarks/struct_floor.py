"""The struct floor the read and analysis benchmarks measure against, in the same run: every Enhanced Packet
Block's block header, packet fields, pseudo-header and vhost-user header unpacked with `struct`, nothing else."""
from __future__ import annotations

import struct


def measure_floor(path: str) -> int:
    """The number of packet blocks in PATH, each unpacked as far as a vhost-user header; nothing else."""
    block, epb = struct.Struct("<II").unpack_from, struct.Struct("<IIIII").unpack_from
    pseudo, header = struct.Struct("<4sHHIBBBBHH").unpack_from, struct.Struct("<III").unpack_from
    count = 0
    with open(path, "rb") as stream:
        buffer, position = b"", 0
        while True:
            if len(buffer) - position < 8 or len(buffer) - position < block(buffer, position)[1]:
                more = stream.read(1 << 20)
                if not more:
                    return count
                buffer, position = buffer[position:] + more, 0
                continue
            block_type, total = block(buffer, position)
            if block_type == 6:
                _interface, _high, _low, captured, _original = epb(buffer, position + 8)
                fields = pseudo(buffer, position + 28)
                if captured >= fields[2] + 12:
                    header(buffer, position + 28 + fields[2])
                count += 1
            position += total
