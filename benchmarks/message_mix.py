"""The message mix the benchmarks decode: a real shipped capture when there is one, else QEMU 7.2's boot mix."""
from __future__ import annotations

import glob
import os
import struct

from vhusniff.model import Channel
from vhusniff.protocol.grammar import build_message

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def qemu_boot_mix() -> list[tuple[Channel, bytes]]:
    """The 44-message QEMU 7.2 + qemu-storage-daemon boot of the notes, rebuilt message by message."""
    region = dict(guest_phys_addr=0, memory_size=0xA0000, userspace_addr=0x7F0000000000, mmap_offset=0)
    u64_reply = lambda request, value: struct.pack("<IIIQ", request, 5, 8, value)
    main = [
        build_message(Channel.MAIN, 1), u64_reply(1, 0x175007E46),
        build_message(Channel.MAIN, 15), u64_reply(15, 0x8F2B),
        build_message(Channel.MAIN, 16, dict(protocol_features=0x8F2B)),
        build_message(Channel.MAIN, 17), u64_reply(17, 1),
        build_message(Channel.MAIN, 36), u64_reply(36, 32),
        build_message(Channel.MAIN, 21, need_reply=True), u64_reply(21, 0),
        build_message(Channel.MAIN, 3),
        build_message(Channel.MAIN, 1), u64_reply(1, 0x175007E46),
        build_message(Channel.MAIN, 13, dict(index=0, flags=0, reserved=0)),
        build_message(Channel.MAIN, 14, dict(index=0, flags=0, reserved=0)),
        build_message(Channel.MAIN, 24, dict(offset=0, size=57, flags=0, data=bytes(57))),
        build_message(Channel.MAIN, 24, dict(offset=0, size=57, flags=0, data=bytes(57)), reply=True),
        build_message(Channel.MAIN, 2, dict(features=0x150000000)),
        build_message(Channel.MAIN, 37, dict(padding=0, region=region), need_reply=True), u64_reply(37, 0),
        build_message(Channel.MAIN, 37, dict(padding=0, region=region), need_reply=True), u64_reply(37, 0),
        build_message(Channel.MAIN, 8, dict(index=0, num=256)),
        build_message(Channel.MAIN, 10, dict(index=0, num=0)),
        build_message(Channel.MAIN, 9, dict(index=0, flags=0, desc=0x7F0000001000, used=0x7F0000003000,
                                            avail=0x7F0000002000, log=0)),
        build_message(Channel.MAIN, 12, dict(index=0, flags=0, reserved=0)),
        build_message(Channel.MAIN, 18, dict(index=0, num=1)),
        build_message(Channel.MAIN, 18, dict(index=0, num=0)),
        build_message(Channel.MAIN, 11, dict(index=0, num=0)),
        build_message(Channel.MAIN, 11, dict(index=0, num=17), reply=True),
    ]
    return [(Channel.MAIN, raw) for raw in main]


def capture_mix() -> tuple[str, list[tuple[Channel, bytes]]]:
    """(where it came from, [(channel, bytes)]) from the first shipped capture, or the rebuilt boot mix."""
    try:
        from vhusniff.capture.pcapng import read_capture
        from vhusniff.model import RecordKind
    except ImportError:
        return "rebuilt QEMU 7.2 boot mix", qemu_boot_mix()
    for path in sorted(glob.glob(os.path.join(ROOT, "captures", "*.pcapng"))):
        mix = [(r.channel, r.data) for r in read_capture(path) if r.kind == RecordKind.MESSAGE]
        if mix:
            return os.path.relpath(path, ROOT), mix
    return "rebuilt QEMU 7.2 boot mix", qemu_boot_mix()
