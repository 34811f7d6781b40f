"""Guest RAM by guest-physical address: bounds-checked access over a `MemoryBacking`.

`GuestMemory` reads and writes guest memory by GPA and hands out views for zero-copy
I/O. Writes the VMM makes through `write()` are recorded in a VMM-side dirty bitmap,
because KVM's dirty log only sees the guest's own writes; migration ORs the two. The
host side (the fd, the mapping, prefaulting, freeing, holes) is the backing's:
`memory.backing`.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable

import numpy as np

from vmig.errors import GuestMemoryError
from vmig.memory.backing import MemoryBacking
from vmig.ranges import RangeTable
from vmig.units import PAGE_SHIFT, PAGE_SIZE
from vmig.zeropages import split_zero_pages

__all__ = ["GuestMemory"]

_U64 = struct.Struct("<Q")


class GuestMemory:
    """Guest RAM from guest-physical 0 to `size`, in one KVM slot.

    Owns its backing (`close()` closes it). Hand out memoryviews with `view()`; they must
    be released before `close()`.
    """

    SLOT = 0

    def __init__(self, backing: MemoryBacking) -> None:
        self.backing = backing
        self.size = backing.size
        self._view = backing.buffer
        self._vmm_dirty = np.zeros((self.size // PAGE_SIZE + 63) // 64, dtype=np.uint64)
        self._dirty_lock = threading.Lock()

    @classmethod
    def create(cls, size: int, path: str | None = None) -> GuestMemory:
        """New guest RAM of `size` bytes: an anonymous memfd, or the file at `path`."""
        return cls(MemoryBacking.create(size, path))

    @classmethod
    def from_fd(cls, fd: int, size: int) -> GuestMemory:
        """Adopt an fd (e.g. a memfd received over SCM_RIGHTS); this object then owns it."""
        return cls(MemoryBacking.from_fd(fd, size))

    # --- what the backing is --------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.backing.is_open

    @property
    def fd(self) -> int:
        """The backing's fd (KVM maps it; a local migration hands it over)."""
        return self.backing.fd

    @property
    def path(self) -> str | None:
        return self.backing.path

    @property
    def host_addr(self) -> int:
        """Where the mapping starts in this process (KVM's and userfaultfd's address)."""
        return self.backing.host_addr

    def _check_open(self) -> None:
        if not self.backing.is_open:
            raise GuestMemoryError("guest memory is closed")

    def check_range(self, gpa: int, length: int) -> None:
        """Raise GuestMemoryError unless [gpa, gpa+length) lies inside guest memory."""
        self.backing.check_range(gpa, length)

    # --- access ------------------------------------------------------------------

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable memoryview of [gpa, gpa+length); not tracked as a VMM write."""
        self._check_open()
        self.check_range(gpa, length)
        return self._view[gpa:gpa + length]

    def views(self, ranges: Iterable[tuple[int, int]]) -> list[memoryview]:
        """Writable views of several (gpa, length) ranges, in order, for scatter/gather I/O.

        A RangeTable is checked in one step and sliced from plain ints: scattered pages
        make thousands of views per chunk, and each costs the GIL (3x less this way).
        """
        if not isinstance(ranges, RangeTable):
            return [self.view(gpa, length) for gpa, length in ranges]
        self._check_open()
        gpas, lengths = ranges.as_arrays()
        if not len(gpas):
            return []
        ends = gpas + lengths  # a RangeTable's ranges never wrap past 2**64
        if int(ends.max()) > self.size:
            last = int(np.argmax(ends))
            self.check_range(int(gpas[last]), int(lengths[last]))  # raises, naming it
        view = self._view
        return [view[start:end] for start, end in zip(gpas.tolist(), ends.tolist(),
                                                      strict=True)]

    def read(self, gpa: int, length: int) -> bytes:
        """Copy `length` bytes out of guest memory."""
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy `data` into guest memory and record the pages as VMM-dirtied."""
        self.view(gpa, len(data))[:] = data
        self.mark_dirty(gpa, len(data))

    def read_u64(self, gpa: int) -> int:
        self.check_range(gpa, 8)
        return _U64.unpack_from(self._view, gpa)[0]

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, _U64.pack(value))

    # --- VMM-side dirty tracking -------------------------------------------------

    def mark_dirty(self, gpa: int, length: int) -> None:
        """Record that the VMM wrote [gpa, gpa+length)."""
        if length <= 0:
            return
        first, last = gpa >> PAGE_SHIFT, (gpa + length - 1) >> PAGE_SHIFT
        with self._dirty_lock:
            for page in range(first, last + 1):
                self._vmm_dirty[page >> 6] |= np.uint64(1 << (page & 63))

    def take_vmm_dirty(self) -> np.ndarray:
        """The VMM-dirtied pages since the last call (u64 words, one bit per page); clears."""
        with self._dirty_lock:
            words = self._vmm_dirty.copy()
            self._vmm_dirty[:] = 0
        return words

    # --- contents -----------------------------------------------------------------

    def zero_pages(self, gpa: int, length: int) -> RangeTable:
        """The pages of [gpa, gpa+length) (whole pages) whose 4096 bytes are all zero.

        Reads the memory (numpy, the GIL released for most of it): a hole of a memfd
        reads as zeros but gets allocated by the read, so mind `data_extents`.
        """
        return self.split_zero_pages(RangeTable.full(length, gpa))[1]

    def split_zero_pages(self, table: RangeTable) -> tuple[RangeTable, RangeTable]:
        """Split ranges of whole pages into (data ranges, all-zero ranges), both in the
        table's order (see `vmig.zeropages.split_zero_pages`)."""
        self._check_open()
        gpas, lengths = table.as_arrays()
        if len(gpas):
            self.check_range(int(gpas.min()), int((gpas + lengths).max()) - int(gpas.min()))
        try:
            return split_zero_pages(self._view, table)
        except ValueError as exc:
            raise GuestMemoryError(str(exc)) from None

    def close(self) -> None:
        """Close the backing; idempotent."""
        self.backing.close()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
