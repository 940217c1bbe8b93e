"""Guest memory as the front-end shares it: read-only MAP_SHARED mappings of the region fds, and address
translation through them (front-end virtual addresses for rings, guest-physical ones for descriptors).

Nothing here can write guest memory: every mapping is PROT_READ. A mapping lives exactly as long as its region
(dropped on REM_MEM_REG, a new table, or the connection's end: `close`), so fds and mappings never pile up.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

_PAGE = mmap.ALLOCATIONGRANULARITY


@dataclass
class MappedRegion:
    guest_phys_addr: int
    size: int
    user_addr: int
    mmap_offset: int
    view: mmap.mmap | None       # None: the fd could not be mapped (say why in `problem`)
    skip: int = 0                # bytes of the mapping before the region's first byte (page alignment)
    problem: str = ""

    def close(self) -> None:
        if self.view is not None:
            self.view.close()
            self.view = None


def map_region(fd: int, guest_phys_addr: int, size: int, user_addr: int, mmap_offset: int) -> MappedRegion:
    """Map one region read-only from the fd that carried it (the caller keeps ownership of `fd`)."""
    region = MappedRegion(guest_phys_addr, size, user_addr, mmap_offset, None)
    start = mmap_offset - mmap_offset % _PAGE
    region.skip = mmap_offset - start
    try:
        file_size = os.fstat(fd).st_size
        if file_size and mmap_offset + size > file_size:
            # Reading past a shared file's end would raise SIGBUS: map nothing rather than crash the proxy.
            region.problem = f"region ends at {mmap_offset + size:#x}, past its fd's size {file_size:#x}"
            return region
        region.view = mmap.mmap(fd, region.skip + size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=start)
    except (OSError, ValueError, OverflowError) as error:
        region.problem = f"cannot map the region's fd: {getattr(error, 'strerror', None) or error}"
    return region


class GuestMemory:
    """The regions of one connection's memory table, mapped read-only."""

    def __init__(self) -> None:
        self.regions: list[MappedRegion] = []

    def add(self, region: MappedRegion) -> None:
        self.regions.append(region)

    def remove(self, guest_phys_addr: int, size: int) -> bool:
        """Drop (and unmap) the region at this guest-physical address and size; False when there is none."""
        for region in self.regions:
            if region.guest_phys_addr == guest_phys_addr and region.size == size:
                region.close()
                self.regions.remove(region)
                return True
        return False

    def close(self) -> None:
        """Unmap every region (a new table, the connection's end)."""
        for region in self.regions:
            region.close()
        self.regions.clear()

    @property
    def mapped(self) -> int:
        return sum(1 for region in self.regions if region.view is not None)

    def _locate(self, address: int, length: int, physical: bool) -> tuple[mmap.mmap, int] | None:
        for region in self.regions:
            start = region.guest_phys_addr if physical else region.user_addr
            if start <= address and address + length <= start + region.size and region.view is not None:
                return region.view, region.skip + address - start
        return None

    def read(self, address: int, length: int, physical: bool = False) -> bytes | None:
        """`length` bytes at a front-end virtual address (or a guest-physical one); None when unmapped."""
        found = self._locate(address, length, physical)
        if found is None:
            return None
        view, offset = found
        return view[offset:offset + length]

    def unpack(self, layout: struct.Struct, address: int, physical: bool = False) -> tuple | None:
        found = self._locate(address, layout.size, physical)
        if found is None:
            return None
        view, offset = found
        return layout.unpack_from(view, offset)
