"""Guest-physical memory ranges and the range tables the migration sends.

A `RangeTable` is an ordered list of `MemoryRange(gpa, length)`; it is what a
MEMORY request carries (CH's `MemoryRangeTable`). It is built from a KVM dirty
bitmap (`from_bitmap`), from page numbers (`from_pages`) or for all of RAM
(`full`), cut into per-request chunks (`partition`) and serialised as
little-endian ``(u64 gpa, u64 length)`` pairs (`encode` / `decode`).

The table keeps two read-only numpy ``uint64`` arrays, so building one from a
bitmap of millions of pages and cutting it up never loops in Python per page
or per range. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple, SupportsIndex, overload

import numpy as np
import numpy.typing as npt

from vmig.units import PAGE_SIZE

__all__ = ["RANGE_ENTRY_SIZE", "MemoryRange", "RangeTable"]

#: Bytes per range on the wire: u64 gpa + u64 length.
RANGE_ENTRY_SIZE = 16

_U64 = np.uint64
_U64_MAX = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
_WIRE_DTYPE = np.dtype("<u8")

U64Array = npt.NDArray[np.uint64]


class MemoryRange(NamedTuple):
    """One contiguous run of guest-physical memory: ``[gpa, gpa + length)``."""

    gpa: int
    length: int

    @property
    def end(self) -> int:
        """First guest-physical address after the range."""
        return self.gpa + self.length


def _frozen(array: npt.ArrayLike) -> U64Array:
    """A contiguous, read-only uint64 view of `array` (the base array stays writeable)."""
    out = np.ascontiguousarray(array, dtype=_U64).view()
    out.flags.writeable = False
    return out


def _bitmap_runs(words: U64Array) -> tuple[U64Array, U64Array]:
    """First page and page count of every run of set bits in a u64 word bitmap.

    Only the non-zero words are unpacked, so a sparse bitmap of a large guest
    costs in proportion to its dirty words. A run continues from one word into
    the next only when the two words are adjacent in the bitmap.
    """
    index = np.flatnonzero(words)
    if index.size == 0:
        empty = np.zeros(0, dtype=_U64)
        return empty, empty
    raw = words[index].astype(_WIRE_DTYPE, copy=False).view(np.uint8)
    bits = np.unpackbits(raw, bitorder="little").view(np.bool_).reshape(-1, 64)
    gap_before = np.ones(index.size, dtype=np.bool_)
    gap_before[1:] = np.diff(index) != 1
    gap_after = np.ones(index.size, dtype=np.bool_)
    gap_after[:-1] = gap_before[1:]
    # A set bit starts a run when the bit before it (in page order) is clear; the
    # bit before bit 0 of a word is bit 63 of the previous word only if adjacent.
    before = np.empty_like(bits)
    before[:, 1:] = bits[:, :-1]
    before[1:, 0] = bits[:-1, 63]
    before[gap_before, 0] = False
    after = np.empty_like(bits)
    after[:, :-1] = bits[:, 1:]
    after[:-1, 63] = bits[1:, 0]
    after[gap_after, 63] = False
    firsts = np.flatnonzero(bits & ~before)
    lasts = np.flatnonzero(bits & ~after)
    # Map positions in the compressed bit array back to page numbers.
    first_pages = index[firsts // 64].astype(_U64) * _U64(64) + (firsts % 64).astype(_U64)
    last_pages = index[lasts // 64].astype(_U64) * _U64(64) + (lasts % 64).astype(_U64)
    return first_pages, last_pages - first_pages + _U64(1)


class RangeTable:
    """An ordered, immutable list of `MemoryRange`s (every length > 0).

    Iterating yields `MemoryRange`s; `len()` is the number of ranges;
    `total_bytes` is the sum of the lengths, i.e. the page bytes a MEMORY
    request with this table carries. Tables compare equal when they hold the
    same ranges in the same order.
    """

    __slots__ = ("_gpas", "_lengths", "_total")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        """Build a table from ``(gpa, length)`` pairs, kept in the given order.

        Raises ValueError if a length is zero or a range runs past 2**64.
        """
        pairs = [(int(gpa), int(length)) for gpa, length in ranges]
        for gpa, length in pairs:
            if gpa < 0 or length <= 0 or gpa + length > 1 << 64:
                raise ValueError(f"bad memory range gpa={gpa:#x} length={length:#x}")
        array = np.array(pairs, dtype=_U64).reshape(-1, 2)
        self._set(array[:, 0], array[:, 1])

    def _set(self, gpas: npt.ArrayLike, lengths: npt.ArrayLike) -> None:
        self._gpas = _frozen(gpas)
        self._lengths = _frozen(lengths)
        self._total = int(self._lengths.sum(dtype=_U64)) if self._lengths.size else 0

    @classmethod
    def _make(cls, gpas: npt.ArrayLike, lengths: npt.ArrayLike) -> RangeTable:
        """Wrap arrays already known to be valid (no checks)."""
        table = cls.__new__(cls)
        table._set(gpas, lengths)
        return table

    # -- constructors ------------------------------------------------------------

    @classmethod
    def from_arrays(cls, gpas: npt.ArrayLike, lengths: npt.ArrayLike) -> RangeTable:
        """Build a table from parallel arrays of addresses and lengths.

        Raises ValueError if the shapes differ, a length is zero, or a range
        runs past 2**64.
        """
        g = np.array(gpas, dtype=_U64).reshape(-1)  # copies: the caller keeps its arrays
        n = np.array(lengths, dtype=_U64).reshape(-1)
        if g.shape != n.shape:
            raise ValueError(f"{g.size} addresses but {n.size} lengths")
        empty = np.flatnonzero(n == 0)
        if empty.size:
            raise ValueError(f"range {int(empty[0])} has length 0")
        wraps = np.flatnonzero(g > _U64_MAX - (n - _U64(1)))
        if wraps.size:
            raise ValueError(f"range {int(wraps[0])} runs past the end of the 64-bit address "
                             "space")
        return cls._make(g, n)

    @classmethod
    def from_bitmap(
        cls, words: npt.ArrayLike, base_gpa: int = 0, page_size: int = PAGE_SIZE
    ) -> RangeTable:
        """Turn a dirty bitmap into ranges: bit i of word w is page ``w * 64 + i``.

        `words` is a sequence of u64 words as KVM_GET_DIRTY_LOG returns them
        (numpy array, ``array('Q')``, list). Runs of set bits, also across word
        boundaries, become one range each, starting at
        ``base_gpa + page * page_size``. Vectorised: unpack the bits, then find
        the run edges by comparing each bit with its neighbours; clean words are
        skipped.
        """
        w = np.ascontiguousarray(words, dtype=_U64).reshape(-1)
        starts, counts = _bitmap_runs(w)
        return cls._make(_U64(base_gpa) + starts * _U64(page_size), counts * _U64(page_size))

    @classmethod
    def from_pages(
        cls, page_indices: npt.ArrayLike, base_gpa: int = 0, page_size: int = PAGE_SIZE
    ) -> RangeTable:
        """Turn page numbers (any order, duplicates allowed) into sorted, merged ranges."""
        pages = np.unique(np.asarray(page_indices, dtype=_U64).reshape(-1))
        if pages.size == 0:
            return cls()
        breaks = np.flatnonzero(np.diff(pages) != _U64(1)) + 1
        run_starts = np.concatenate(([0], breaks))
        run_ends = np.concatenate((breaks, [pages.size]))
        counts = (run_ends - run_starts).astype(_U64)
        return cls._make(
            _U64(base_gpa) + pages[run_starts] * _U64(page_size), counts * _U64(page_size)
        )

    @classmethod
    def full(cls, size: int, base_gpa: int = 0) -> RangeTable:
        """One range covering ``[base_gpa, base_gpa + size)``; empty when size is 0."""
        if size < 0:
            raise ValueError(f"negative size {size}")
        return cls([(base_gpa, size)]) if size else cls()

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> RangeTable:
        """Parse ``count x (u64 gpa, u64 length)`` little-endian; inverse of `encode`.

        Raises ValueError if the size is not a multiple of 16 or a range is
        invalid (see `from_arrays`).
        """
        if len(data) % RANGE_ENTRY_SIZE:
            raise ValueError(f"range table of {len(data)} bytes is not a multiple of 16")
        pairs = np.frombuffer(data, dtype=_WIRE_DTYPE).reshape(-1, 2)
        return cls.from_arrays(pairs[:, 0], pairs[:, 1])

    # -- queries -----------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        """Sum of all lengths: the page bytes a MEMORY request with this table carries."""
        return self._total

    def as_arrays(self) -> tuple[U64Array, U64Array]:
        """The read-only ``(gpas, lengths)`` uint64 arrays (no copy)."""
        return self._gpas, self._lengths

    def encode(self) -> bytes:
        """Serialise as ``len(self) x (u64 gpa, u64 length)``, little-endian."""
        out = np.empty((len(self), 2), dtype=_WIRE_DTYPE)
        out[:, 0] = self._gpas
        out[:, 1] = self._lengths
        return out.tobytes()

    def coalesce(self) -> RangeTable:
        """Merge each range with the next one when they touch (``end == next.gpa``)."""
        if len(self) < 2:
            return self
        g, n = self._gpas, self._lengths
        touching = (g[:-1] + n[:-1]) == g[1:]
        if not touching.any():
            return self
        heads = np.flatnonzero(np.concatenate(([True], ~touching)))
        sums = np.add.reduceat(n, heads)
        return RangeTable._make(g[heads], sums)

    def partition(self, chunk_bytes: int, page_size: int = PAGE_SIZE) -> list[RangeTable]:
        """Cut the table into consecutive tables of at most `chunk_bytes` each.

        Walks the ranges in order as one stream of page bytes and cuts it every
        `chunk_bytes` (which must be a positive multiple of `page_size`), splitting
        a range across two chunks where a cut falls inside it. Every chunk but the
        last holds exactly `chunk_bytes`; together they cover the table exactly, in
        order. An empty table gives an empty list.
        """
        if chunk_bytes <= 0 or chunk_bytes % page_size:
            raise ValueError(
                f"chunk size {chunk_bytes} is not a positive multiple of the page size"
            )
        if not self._total:
            return []
        if self._total <= chunk_bytes:
            return [self]
        cuts = np.arange(chunk_bytes, self._total, chunk_bytes, dtype=_U64)
        gpas, lengths, offsets = self._split_at(cuts)
        chunk_of = offsets // _U64(chunk_bytes)
        heads = np.flatnonzero(np.diff(chunk_of)) + 1
        return [
            RangeTable._make(g, n)
            for g, n in zip(np.split(gpas, heads), np.split(lengths, heads), strict=True)
        ]

    def slice_bytes(self, start: int, stop: int) -> RangeTable:
        """The ranges that hold bytes ``[start, stop)`` of the table's page-byte stream.

        Byte 0 is the first byte of the first range. Lets a receiver find where
        `PayloadData` at a given offset goes in guest memory.
        """
        start, stop = max(start, 0), min(stop, self._total)
        if start >= stop:
            return RangeTable()
        gpas, lengths, offsets = self._split_at(np.array([start, stop], dtype=_U64))
        keep = (offsets >= _U64(start)) & (offsets < _U64(stop))
        return RangeTable._make(gpas[keep], lengths[keep])

    def _split_at(self, cuts: U64Array) -> tuple[U64Array, U64Array, U64Array]:
        """Split ranges at stream offsets `cuts`; return the pieces and their stream offsets."""
        ends = np.cumsum(self._lengths, dtype=_U64)
        starts = ends - self._lengths
        total = ends[-1]
        cuts = cuts[(cuts > 0) & (cuts < total)]
        offsets = np.union1d(starts, cuts)
        piece_ends = np.append(offsets[1:], total)
        owner = np.searchsorted(ends, offsets, side="right")
        gpas = self._gpas[owner] + (offsets - starts[owner])
        return gpas, piece_ends - offsets, offsets

    # -- container protocol ------------------------------------------------------

    def __len__(self) -> int:
        return int(self._gpas.size)

    def __iter__(self) -> Iterator[MemoryRange]:
        for gpa, length in zip(self._gpas.tolist(), self._lengths.tolist(), strict=True):
            yield MemoryRange(gpa, length)

    @overload
    def __getitem__(self, index: SupportsIndex) -> MemoryRange: ...
    @overload
    def __getitem__(self, index: slice) -> RangeTable: ...
    def __getitem__(self, index: SupportsIndex | slice) -> MemoryRange | RangeTable:
        if isinstance(index, slice):
            return RangeTable._make(self._gpas[index], self._lengths[index])
        return MemoryRange(int(self._gpas[index]), int(self._lengths[index]))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RangeTable):
            return NotImplemented
        return bool(
            np.array_equal(self._gpas, other._gpas)
            and np.array_equal(self._lengths, other._lengths)
        )

    def __hash__(self) -> int:
        return hash((self._gpas.tobytes(), self._lengths.tobytes()))

    def __repr__(self) -> str:
        shown = ", ".join(f"({r.gpa:#x}, {r.length:#x})" for r in self[:4])
        more = f", ... {len(self) - 4} more" if len(self) > 4 else ""
        return f"RangeTable([{shown}{more}], total_bytes={self._total})"
