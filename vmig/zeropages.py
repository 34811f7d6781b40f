"""Which 4 KiB pages of guest memory are all zeros, cheaply, with the GIL mostly released.

A page is tested in two steps, both numpy loops over u64 words (numpy lets go of the
GIL inside them):

1. its first u64: any page whose first 8 bytes are not all zero is data. On pages of
   data this decides almost every page after reading one cache line of it;
2. the pages left (first word zero) are reduced whole, a bitwise OR of their 512
   words in one call per block (numpy's OR reduction is faster on zeros than its
   ``any``, and about twice as fast as its ``max``, on this machine).

So pages of data cost a strided gather, zero pages a full read at memory speed.
Blocks are large (64 Ki pages, 256 MiB) to keep the number of numpy calls, that is of
GIL hand-overs, low: each call that released the GIL has to take it back, and with a
busy Python thread next to it that can take a switch interval (5 ms).
`benchmarks/zeropages.py` measures this against the alternatives.

Pure functions of a buffer; `GuestMemory.zero_pages` and `GuestMemory.split_zero_pages`
apply them to guest memory. Mind that reading a hole of a memfd through its mapping
allocates the page: scan only the parts that hold data (`MemoryBacking.data_extents`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from vmig.ranges import RangeTable
from vmig.units import PAGE_SIZE

__all__ = ["BLOCK_PAGES", "split_zero_pages", "zero_page_mask"]

WORDS_PER_PAGE = PAGE_SIZE // 8
#: Pages tested per numpy call (256 MiB): few GIL hand-overs, bounded temporaries.
BLOCK_PAGES = 1 << 16
#: Above this share of candidate pages (first word zero), reduce a block whole rather
#: than gather the candidates (a gather copies them).
_GATHER_SHARE = 0.25

BoolArray = npt.NDArray[np.bool_]
U64Array = npt.NDArray[np.uint64]
#: Any contiguous buffer (collections.abc.Buffer is Python 3.12+).
Buffer = bytes | bytearray | memoryview | npt.NDArray[Any]


def _zero_rows(rows: U64Array) -> BoolArray:
    """For a (pages, 512) u64 array: True where a row is all zeros."""
    zero = rows[:, 0] == 0
    candidates = np.flatnonzero(zero)
    if candidates.size == 0:
        return zero
    if candidates.size > _GATHER_SHARE * len(rows):
        return _or_rows(rows) == 0  # most pages need reading whole anyway
    zero[candidates] = _or_rows(rows.take(candidates, axis=0)) == 0
    return zero


def _or_rows(rows: U64Array) -> U64Array:
    """The bitwise OR of each row's words: 0 exactly for all-zero rows."""
    return np.bitwise_or.reduce(rows, axis=1)


def _page_words(buffer: Buffer) -> tuple[U64Array, npt.NDArray[np.uint8]]:
    """The whole pages of `buffer` as (pages, 512) u64 words, and the bytes after them."""
    raw = np.frombuffer(buffer, dtype=np.uint8)
    whole = raw.size - raw.size % PAGE_SIZE
    words = raw[:whole].view(np.uint64).reshape(-1, WORDS_PER_PAGE)
    return words, raw[whole:]


def zero_page_mask(view: Buffer) -> BoolArray:
    """One bool per 4 KiB page of `view`, True where the page is all zeros.

    A last page shorter than 4 KiB counts as a page (zero if its bytes are). `view`
    is any contiguous buffer (memoryview, bytes, numpy array); it is only read.
    """
    words, tail = _page_words(view)
    mask = np.empty(len(words) + (1 if tail.size else 0), dtype=np.bool_)
    whole = mask[:len(words)]
    for first in range(0, len(words), BLOCK_PAGES):
        whole[first:first + BLOCK_PAGES] = _zero_rows(words[first:first + BLOCK_PAGES])
    if tail.size:
        mask[-1] = not tail.any()
    del words, tail
    return mask


def _page_indices(gpas: U64Array, lengths: U64Array) -> npt.NDArray[np.intp]:
    """Page numbers of every page of the ranges, in table order."""
    first = (gpas // PAGE_SIZE).astype(np.intp)
    counts = (lengths // PAGE_SIZE).astype(np.intp)
    starts = np.cumsum(counts) - counts
    pages = np.arange(int(counts.sum()), dtype=np.intp)
    pages += np.repeat(first - starts, counts)
    return pages


def _runs_in_order(pages: npt.NDArray[np.intp]) -> tuple[U64Array, U64Array]:
    """(gpa, length) of the runs of consecutive page numbers, keeping the given order."""
    if pages.size == 0:
        empty = np.zeros(0, dtype=np.uint64)
        return empty, empty
    heads = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], heads))
    counts = np.diff(np.concatenate((starts, [pages.size])))
    return (pages[starts].astype(np.uint64) * np.uint64(PAGE_SIZE),
            counts.astype(np.uint64) * np.uint64(PAGE_SIZE))


def split_zero_pages(memory: Buffer, table: RangeTable) -> tuple[RangeTable, RangeTable]:
    """Split `table` into (data ranges, zero ranges), by the contents of `memory`.

    `memory` holds guest memory from guest-physical 0 (gpa g is byte g of it); every
    range of `table` must lie inside it and be whole pages (ValueError otherwise).
    Both results keep the table's order; ranges that touch are merged (`coalesce`).
    A page is zero when all its 4096 bytes are.
    """
    words, _ = _page_words(memory)
    gpas, lengths = table.as_arrays()
    if np.any((gpas % PAGE_SIZE) | (lengths % PAGE_SIZE)):
        raise ValueError("zero-page split needs ranges of whole pages")
    if len(gpas) and int((gpas + lengths).max()) > len(words) * PAGE_SIZE:
        raise ValueError("a range ends past the memory given")
    parts: tuple[list[U64Array], list[U64Array], list[U64Array], list[U64Array]] = (
        [], [], [], [])
    for chunk in table.partition(BLOCK_PAGES * PAGE_SIZE):
        cg, cl = chunk.as_arrays()
        if len(cg) == 1:  # one stretch of memory: test it in place
            first = int(cg[0]) // PAGE_SIZE
            pages = np.arange(first, first + int(cl[0]) // PAGE_SIZE, dtype=np.intp)
            zero = _zero_rows(words[pages[0]:pages[-1] + 1])
        else:  # pages from many ranges: test the first words, then gather the rest
            pages = _page_indices(cg, cl)
            zero = words[pages, 0] == 0
            candidates = pages[zero]
            if candidates.size:
                zero[zero] = _or_rows(words.take(candidates, axis=0)) == 0
        for out, chosen in ((0, pages[~zero]), (2, pages[zero])):
            g, n = _runs_in_order(chosen)
            parts[out].append(g)
            parts[out + 1].append(n)
    del words
    data_g, data_n, zero_g, zero_n = (np.concatenate(p) if p else np.zeros(0, np.uint64)
                                      for p in parts)
    return (RangeTable.from_arrays(data_g, data_n).coalesce(),
            RangeTable.from_arrays(zero_g, zero_n).coalesce())
