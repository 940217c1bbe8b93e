"""A capture in which every message is distinct, as long-lived real hosts write them.

    python3 benchmarks/distinct_sessions.py OUT.pcapng [--messages N]

Sessions follow one another (a reconnect every SESSION_MESSAGES messages): each connects, negotiates as QEMU 7.2
does with a vIOMMU (ACCESS_PLATFORM, REPLY_ACK, BACKEND_REQ), sets up two rings, then runs vIOMMU traffic until it
stops its rings and closes: front-end IOTLB_MSG updates and invalidations with their acks, back-end IOTLB misses
on the back-end channel with theirs, SET_VRING_ADDR with changing addresses, GET_CONFIG windows. Addresses,
sizes and config bytes change with every message, so no two messages have the same bytes. One SET_VRING_ADDR in
FAULT_EVERY is misaligned: findings of one kind that grow with the capture (the analysis keeps a bounded number of
examples of each).
"""
from __future__ import annotations

import os
import struct
import sys
from collections.abc import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from vhusniff.capture.pcapng import CaptureWriter  # noqa: E402
from vhusniff.model import Channel, Direction, EventKind, FdInfo, Record, RecordKind  # noqa: E402
from vhusniff.protocol.grammar import build_message  # noqa: E402

SESSION_MESSAGES = 25_000          # a reconnect this often: 40 connections in a million messages
FAULT_EVERY = 31                   # one misaligned SET_VRING_ADDR in about 124 traffic messages
START_NS = 1_700_000_000_000_000_000
STEP_NS = 2_000                    # 2 µs between messages; a reply 1 µs after its request
FEATURES = (1 << 28) | (1 << 30) | (1 << 32) | (1 << 33)     # INDIRECT_DESC, PROTOCOL_FEATURES, VERSION_1, IOMMU
PROTOCOL_FEATURES = 0x8F2B         # QEMU 7.2 with qemu-storage-daemon: MQ, LOG_SHMFD, REPLY_ACK, BACKEND_REQ, ...
RING_ADDRESS = 0x7F00_0000_0000
F2B, B2F = Direction.FRONTEND_TO_BACKEND, Direction.BACKEND_TO_FRONTEND


def _u64_reply(request: int, value: int, channel: Channel = Channel.MAIN) -> bytes:
    del channel
    return struct.pack("<IIIQ", request, 5, 8, value)


def _setup(serial: int) -> list[tuple[Channel, Direction, bytes, list[FdInfo]]]:
    """The negotiation and ring set-up of one session (QEMU 7.2 order), with its fds."""
    region = dict(guest_phys_addr=0, memory_size=0x4000_0000, userspace_addr=RING_ADDRESS + (serial << 32),
                  mmap_offset=0)
    memfd = FdInfo("memfd", 1000 + serial, 0x4000_0000, f"memory-{serial}")
    backend_socket = FdInfo("socket", 2000 + serial, -1, "unix")
    main = Channel.MAIN
    messages = [
        (main, F2B, build_message(main, 1), []), (main, B2F, _u64_reply(1, FEATURES | 0x7E46), []),
        (main, F2B, build_message(main, 15), []), (main, B2F, _u64_reply(15, PROTOCOL_FEATURES), []),
        (main, F2B, build_message(main, 16, dict(protocol_features=PROTOCOL_FEATURES)), []),
        (main, F2B, build_message(main, 17), []), (main, B2F, _u64_reply(17, 2), []),
        (main, F2B, build_message(main, 21, need_reply=True), [backend_socket]), (main, B2F, _u64_reply(21, 0), []),
        (main, F2B, build_message(main, 3), []),
        (main, F2B, build_message(main, 2, dict(features=FEATURES)), []),
        (main, F2B, build_message(main, 5, dict(nregions=1, padding=0, region=[region])), [memfd]),
    ]
    for index in (0, 1):
        kick = FdInfo("eventfd", 0, -1, f"eventfd-id:{serial * 10 + index}")
        call = FdInfo("eventfd", 0, -1, f"eventfd-id:{serial * 10 + index + 5}")
        base = RING_ADDRESS + (serial << 24) + (index << 16)
        messages += [
            (main, F2B, build_message(main, 8, dict(index=index, num=256)), []),
            (main, F2B, build_message(main, 10, dict(index=index, num=0)), []),
            (main, F2B, build_message(main, 9, dict(index=index, flags=0, desc=base, used=base + 0x3000,
                                                    avail=base + 0x2000, log=0)), []),
            (main, F2B, build_message(main, 13, dict(index=index, flags=0, reserved=0)), [call]),
            (main, F2B, build_message(main, 12, dict(index=index, flags=0, reserved=0)), [kick]),
            (main, F2B, build_message(main, 18, dict(index=index, num=1)), []),
        ]
    return messages


def _teardown(serial: int) -> list[tuple[Channel, Direction, bytes, list[FdInfo]]]:
    main = Channel.MAIN
    messages = []
    for index in (0, 1):
        messages += [(main, F2B, build_message(main, 11, dict(index=index, num=0)), []),
                     (main, B2F, build_message(main, 11, dict(index=index, num=serial & 0xFFFF), reply=True), [])]
    return messages


def _traffic(serial: int, count: int) -> Iterator[tuple[Channel, Direction, bytes, list[FdInfo]]]:
    """vIOMMU traffic, every message distinct: `count` messages (requests with their replies)."""
    main, backend = Channel.MAIN, Channel.BACKEND
    sent = step = 0
    while sent < count:
        step += 1
        iova = (serial << 40) + (step << 12)
        kind = step % 8
        if kind in (0, 1, 2):           # the front-end maps or unmaps a page for the device: acked
            payload = dict(iova=iova, size=0x1000 * (1 + step % 64), uaddr=(serial << 36) + (step << 12),
                           perm=3, type=2 if kind else 3, padding=bytes(6))
            pair = [(main, F2B, build_message(main, 22, payload), []), (main, B2F, _u64_reply(22, 0), [])]
        elif kind in (3, 4):            # the back-end misses a translation and says so on its channel
            payload = dict(iova=iova, size=0, uaddr=0, perm=1 + step % 3, type=1, padding=bytes(6))
            pair = [(backend, B2F, build_message(backend, 1, payload, need_reply=True), []),
                    (backend, F2B, _u64_reply(1, 0), [])]
        elif kind in (5, 6):            # the front-end moves a ring (a guest driver re-initialising its queue)
            base = RING_ADDRESS + (serial << 32) + (step << 14)
            misaligned = step % FAULT_EVERY == 0
            pair = [(main, F2B, build_message(main, 9, dict(index=step & 1, flags=0, desc=base + 8 * misaligned,
                                                            used=base + 0x3000, avail=base + 0x2000, log=0)), [])]
        else:                           # the guest reads a config window: its bytes change
            data = struct.pack("<QQ", step, serial) + bytes(8)
            pair = [(main, F2B, build_message(main, 24, dict(offset=0, size=24, flags=0, data=bytes(24)))
                     , []),
                    (main, B2F, build_message(main, 24, dict(offset=0, size=24, flags=0, data=data), reply=True),
                     [])]
        for item in pair[:count - sent]:
            yield item
            sent += 1


def distinct_records(messages: int, session_messages: int = SESSION_MESSAGES) -> Iterator[Record]:
    """`messages` message records (events besides: connects, device, closes), every message distinct, in sessions
    of `session_messages`."""
    time_ns = START_NS
    written = 0
    serial = 0
    while written < messages:
        serial += 1
        connection = serial
        yield Record(time_ns, connection, kind=RecordKind.EVENT, event=EventKind.CONNECTED,
                     note=f"front-end connected, back-end reached (session {serial})")
        yield Record(time_ns, connection, kind=RecordKind.EVENT, event=EventKind.DEVICE, note="blk")
        setup, teardown = _setup(serial), _teardown(serial)
        budget = min(session_messages, messages - written)
        middle = max(0, budget - len(setup) - len(teardown))
        session = setup[:budget] + list(_traffic(serial, middle)) + teardown[:max(0, budget - len(setup) - middle)]
        for channel, direction, raw, fds in session:
            time_ns += STEP_NS // 2 if raw[4] & 4 else STEP_NS
            yield Record(time_ns, connection, channel, direction, raw, fds)
            written += 1
        time_ns += STEP_NS
        yield Record(time_ns, connection, kind=RecordKind.EVENT, event=EventKind.CLOSED,
                     note="front-end closed the connection")


def build_distinct_capture(path: str, messages: int) -> str:
    """Write the capture; returns a one-line description of it."""
    with CaptureWriter(path) as writer:
        for record in distinct_records(messages):
            writer.write(record)
    sessions = -(-messages // SESSION_MESSAGES)
    return f"{messages:,} distinct messages, {sessions} sessions of vIOMMU traffic"


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--messages", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    print(build_distinct_capture(args.output, args.messages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
