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

from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple, SupportsIndex, TypeVar, overload

import numpy as np
import numpy.typing as npt

from vmig.units import PAGE_SIZE

__all__ = ["RANGE_ENTRY_SIZE", "MemoryRange", "RangeTable"]

#: Bytes per range on the wire: u64 gpa + u64 length.
RANGE_ENTRY_SIZE = 16

_U64 = np.uint64
_ALL_ONES = 0xFFFF_FFFF_FFFF_FFFF
_U64_MAX = np.uint64(_ALL_ONES)
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


# -- dirty bitmap -> runs --------------------------------------------------------------
#
# A KVM dirty bitmap of a 1 TiB guest is 2**22 u64 words (32 MiB). Unpacking every bit
# to a byte would touch 256 MiB, so `_bitmap_runs` works on whole words instead:
#
# - a word that is 0 holds nothing; a block of words that are all 0, or all ones, is
#   skipped (or taken as one run) after one reduction;
# - for every non-zero word w, with p the bit before its bit 0 (bit 63 of the word
#   before), the run *starts* are ``x = w & ~((w << 1) | p)``; popcount(x) starts
#   give each word its slots in the output, so the output is written in page order
#   without a sort;
# - the lowest start of a word is ``x & -x``, its highest is the exponent of
#   ``float64(x)`` (exact: x has at most 32 bits set); the starts in between (words
#   with three runs or more) are found afterwards, for all such words at once;
# - a run is one page long when every set bit of the word is a start (``x == w``); only
#   the other words get their run lengths computed, as ``popcount(w & ~(w + low))``;
#   a run that reaches bit 63 goes on through the next words: over full words (found
#   with one comparison of the bitmap against all-ones) and into the trailing ones of
#   the first word that is not full.
#
# Every step is a numpy loop over a block's words (or over the few words that need
# more), so the cost follows the number of non-zero words and of runs, not of pages.

#: Bitmap words per step: 1 MiB of bitmap, so that a step's temporaries stay in cache.
_BLOCK_WORDS = 1 << 17
#: Words unpacked to bits at once by `_set_bits` (one byte per bit: 2 MiB of bools).
_UNPACK_WORDS = 1 << 15
_ONE = _U64(1)
_TOP_BIT = _U64(1 << 63)
_EXPONENT = _U64(52)  # a float64's exponent field starts at bit 52, biased by 1023
_EXPONENT_BIAS = 1023

IntpArray = npt.NDArray[np.intp]
_T = TypeVar("_T", bound=np.generic)


def _set_bits(x: U64Array) -> Iterator[tuple[IntpArray, U64Array, IntpArray | int]]:
    """Every set bit of every word of `x`: (index of the word, bit number, rank in the word).

    Lowest bit first within a word. Few bits per word are peeled off one round each
    (``x & -x``); many are unpacked, a chunk of words at a time so that the bools stay
    small.
    """
    if int(np.bitwise_count(x).sum(dtype=np.int64)) <= 2 * x.size:
        word = np.arange(x.size, dtype=np.intp)
        x = x.copy()
        rank = 0
        while x.size:
            low = np.negative(x)
            low &= x
            bit = _single_bit_floats(low)  # 2**b is exact: exponent b + 1023
            bit >>= _EXPONENT
            bit -= _U64(_EXPONENT_BIAS)
            yield word, bit, rank
            x ^= low
            more = np.flatnonzero(x != 0)
            if more.size < x.size:
                x, word = x.take(more), word.take(more)
            rank += 1
        return
    for lo in range(0, x.size, _UNPACK_WORDS):
        chunk = x[lo:lo + _UNPACK_WORDS]
        raw = chunk.astype(_WIRE_DTYPE, copy=False).view(np.uint8)
        position = np.flatnonzero(np.unpackbits(raw, bitorder="little").view(np.bool_))
        word = position >> 6
        counts = np.bitwise_count(chunk)
        first = np.cumsum(counts, dtype=np.intp)
        first -= counts
        ranks = np.arange(position.size, dtype=np.intp)
        ranks -= first.take(word)
        word += lo
        yield word, (position & 63).astype(_U64), ranks


def _single_bit_floats(words: U64Array) -> U64Array:
    """The float64 bits of words with one bit set, 2**b: exponent field b + 1023; a new array.

    Converted as int64 (numpy's uint64 -> float64 is twice as slow); 2**63 becomes
    -2**63, whose sign bit `abs` clears.
    """
    floats = words.view(np.int64).astype(np.float64)
    np.abs(floats, out=floats)
    return floats.view(_U64)


class _Scale:
    """Page numbers -> bytes for one `page_size`, with a shift when it is a power of two.

    Bit numbers come from float64 exponents, which are biased: `exponent` returns
    ``page_size * (b + 1023)``, and callers take ``1023 * page_size`` off their base
    address once instead of off every element.
    """

    def __init__(self, page_size: int) -> None:
        self.page_size = _U64(page_size)
        power_of_two = page_size > 0 and not page_size & (page_size - 1)
        self.shift = page_size.bit_length() - 1 if power_of_two else None

    def scale(self, pages: U64Array) -> U64Array:
        """``pages * page_size``, in place."""
        if self.shift is None:
            pages *= self.page_size
        else:
            pages <<= _U64(self.shift)
        return pages

    def exponent(self, words: U64Array, *, single_bit: bool) -> U64Array:
        """``page_size * (b + 1023)``, b the highest set bit of each word; a new array.

        Exact for words with at most 53 bits set (rounding to 53 bits then never
        carries into the next power of two); other words must have two bits or more
        (``w >> 1`` is converted, to stay in int64). Words with a single bit set have a
        zero mantissa, so their exponent field is shifted straight into place.
        """
        if single_bit:
            bits = _single_bit_floats(words)
            if self.shift is not None and self.shift <= 52:
                bits >>= _U64(52 - self.shift)
                return bits
        else:  # the top bit of w >> 1, one lower: a signed conversion, twice as fast
            bits = (words >> _ONE).view(np.int64).astype(np.float64).view(_U64)
            bits += _ONE << _EXPONENT
        bits >>= _EXPONENT
        return self.scale(bits)


class _Output:
    """The (gpa, length) arrays `_bitmap_runs` fills block by block, in page order.

    Capacity is estimated from the blocks seen so far; a block that does not fit starts
    a new pair of arrays, which `finish` joins. Each pair has one spare element after
    its capacity, where a block sends the writes of its words that start no run.
    """

    def __init__(self, nblocks: int) -> None:
        self._nblocks = nblocks
        self._done: list[tuple[U64Array, U64Array]] = []
        self._gpas = self._lengths = np.zeros(1, dtype=_U64)
        self._capacity = 0
        self._fill = 0
        self.total = 0

    def reserve(self, count: int, block: int) -> tuple[U64Array, U64Array, int]:
        """Room for `count` runs of block number `block`: (gpas, lengths, offset in them)."""
        if self._fill + count > self._capacity:
            self._retire()
            seen = self.total + count
            estimate = int(seen * self._nblocks / (block + 1) * 1.1) - self.total + 64
            self._capacity = max(count, estimate, 2 * self._capacity)
            self._gpas = np.empty(self._capacity + 1, dtype=_U64)
            self._lengths = np.empty(self._capacity + 1, dtype=_U64)
        offset = self._fill
        self._fill += count
        self.total += count
        return self._gpas, self._lengths, offset

    def _retire(self) -> None:
        if self._fill:
            self._done.append((self._gpas[:self._fill], self._lengths[:self._fill]))
        self._fill = 0

    def finish(self) -> tuple[U64Array, U64Array]:
        self._retire()
        if not self._done:
            empty = np.zeros(0, dtype=_U64)
            return empty, empty
        if len(self._done) == 1:
            gpas, lengths = self._done[0]
            if gpas.size < self._capacity // 2:  # do not keep a mostly unused allocation
                gpas, lengths = gpas.copy(), lengths.copy()
            return gpas, lengths
        return (np.concatenate([g for g, _ in self._done]),
                np.concatenate([n for _, n in self._done]))


def _bitmap_runs(words: U64Array, base_gpa: int, page_size: int) -> tuple[U64Array, U64Array]:
    """(gpa, length) of every run of set bits of a u64 word bitmap, in page order.

    Bit i of word k is page ``64 * k + i`` at ``base_gpa + page * page_size``; a run
    continues from one word into the next. Arithmetic wraps modulo 2**64, like numpy's.
    """
    n = words.size
    scale = _Scale(page_size)
    modulus = 1 << 64
    word_bytes = _U64(64 * page_size % modulus)
    out = _Output((n + _BLOCK_WORDS - 1) // _BLOCK_WORDS)
    # Deferred work, in output slots: the middle starts of words with three runs or
    # more, and the lengths of runs that are not a single page.
    middle: list[tuple[U64Array, U64Array, IntpArray]] = []
    longer: list[tuple[U64Array, U64Array, IntpArray, IntpArray]] = []
    for block, lo in enumerate(range(0, n, _BLOCK_WORDS)):
        w = words[lo:lo + _BLOCK_WORDS]
        head = int(w[0])
        if head == 0 and not w.any():
            continue
        if head == _ALL_ONES and w.min() == _U64_MAX:  # one run through the whole block
            if lo and int(words[lo - 1]) >> 63:
                continue  # ... that started before it
            idx = np.zeros(1, dtype=np.intp)
            ww = w[:1]
            x = np.ones(1, dtype=_U64)
            top = np.ones(1, dtype=np.bool_)
        else:
            idx = np.flatnonzero(w != 0)
            ww = w.take(idx)
            x = ww << _ONE
            np.bitwise_not(x, out=x)
            x &= ww  # run starts: set bits whose previous bit is clear ...
            top = ww >= _TOP_BIT
            _clear_carried_starts(x, idx, top, lo > 0 and int(words[lo - 1]) >> 63 == 1)
        counts = np.bitwise_count(x)
        ends = np.cumsum(counts, dtype=np.intp)  # each word's slots end here
        count = int(ends[-1])
        if count == 0:
            continue
        slot = ends - counts
        gpas, lengths, offset = out.reserve(count, block)
        first_slot = out.total - count
        empty = np.flatnonzero(counts == 0)  # every bit continues a run from before
        if empty.size:
            slot[empty] = count  # their writes go to the spare element after this block
        g = gpas[offset:offset + count + 1]
        base = idx.view(_U64) * word_bytes  # of each word's bit 0, less the exponent bias
        base += _U64((base_gpa + lo * 64 * page_size - _EXPONENT_BIAS * page_size) % modulus)
        low = np.negative(x)
        low &= x
        first = scale.exponent(low, single_bit=True)
        first += base
        g[slot] = first
        several = np.flatnonzero(counts > 1)
        if several.size:
            last = scale.exponent(x.take(several), single_bit=False)
            last += base.take(several)
            last_slot = ends.take(several)
            last_slot -= 1
            g[last_slot] = last
            inner = np.flatnonzero(counts > 2)
            if inner.size:
                mx = x.take(inner)
                mx &= mx - _ONE  # clear the lowest start
                highest = ((mx >> _ONE).view(np.int64).astype(np.float64).view(_U64)
                           >> _EXPONENT) - _U64(_EXPONENT_BIAS - 1)
                mx ^= np.left_shift(_ONE, highest)  # and the highest
                middle.append((mx, base.take(inner), slot.take(inner) + (first_slot + 1)))
        lengths[offset:offset + count] = scale.page_size
        special = x != ww  # some run is longer than a page
        special |= top  # or may go on into the next word
        special = np.flatnonzero(special)
        if empty.size and special.size:
            special = special[counts.take(special) != 0]
        if special.size:
            longer.append((x.take(special), ww.take(special), slot.take(special) + first_slot,
                           idx.take(special) + lo))
    gpas, lengths = out.finish()
    if middle:
        mx, mbase, mslot = (_joined(part) for part in zip(*middle, strict=True))
        for word, bit, rank in _set_bits(mx):
            bit += _U64(_EXPONENT_BIAS)
            position = scale.scale(bit)
            position += mbase.take(word)
            gpas[mslot.take(word) + rank] = position
    if longer:
        lx, lw, lslot, lword = (_joined(part) for part in zip(*longer, strict=True))
        crossing_slots, crossing_words = [], []
        for at, bit, rank in _set_bits(lx):
            ww = lw.take(at)
            run = np.left_shift(_ONE, bit)
            run += ww
            np.bitwise_not(run, out=run)
            run &= ww  # the bits from the start up to the first clear bit
            target = lslot.take(at)
            target += rank
            lengths[target] = scale.scale(np.bitwise_count(run).astype(_U64))
            crossing = np.flatnonzero(run >= _TOP_BIT)  # goes on into the next word
            if crossing.size:
                crossing_slots.append(target.take(crossing))
                crossing_words.append(lword.take(at.take(crossing)))
        if crossing_slots:
            target = _joined(crossing_slots)
            lengths[target] += scale.scale(_pages_after(words, _joined(crossing_words)))
    return gpas, lengths


def _clear_carried_starts(x: U64Array, idx: IntpArray, top: npt.NDArray[np.bool_],
                          carry_in: bool) -> None:
    """... except bit 0 of a word whose previous word ends in a set bit 63 (in place).

    `x` holds the starts of the non-zero words ``idx`` of a block as if each word stood
    alone, `top` which of them have bit 63 set, `carry_in` whether the word before the
    block has. Few words end in a set bit, so this is cheaper than fetching every word's
    predecessor.
    """
    if carry_in and idx[0] == 0:
        x[0] &= ~_ONE
    ended = np.flatnonzero(top[:-1])  # positions whose successor may carry on
    if ended.size:
        following = ended + 1
        following = following[idx.take(following) == idx.take(ended) + 1]
        x[following] &= ~_ONE


def _joined(parts: Sequence[npt.NDArray[_T]]) -> npt.NDArray[_T]:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _pages_after(words: U64Array, word: IntpArray) -> U64Array:
    """For runs that reach bit 63 of ``words[word]``: how many pages they hold after it."""
    n = words.size
    nxt = word + 1
    following = words.take(np.minimum(nxt, n - 1))
    full = (following == _U64_MAX) & (nxt < n)
    if full.any():  # skip whole words of ones: find where each such stretch ends
        is_full = words == _U64_MAX
        edges = np.flatnonzero(is_full[1:] != is_full[:-1])  # last word of each stretch
        ends = np.append(edges, n - 1)
        nxt[full] = ends[np.searchsorted(edges, nxt[full])] + 1
        following = words.take(np.minimum(nxt, n - 1))
    inverted = ~following
    trailing = np.negative(inverted)
    trailing &= inverted
    trailing -= _ONE  # the trailing ones of the first word that is not full
    pages = np.bitwise_count(trailing).astype(_U64)
    pages[nxt >= n] = 0
    pages += (nxt - word - 1).astype(_U64) << _U64(6)
    return pages


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
        ``base_gpa + page * page_size``. Works on whole words (see `_bitmap_runs`):
        clean words and blocks of clean or full words cost next to nothing, and the
        rest costs in proportion to the non-zero words and the runs.
        """
        w = np.ascontiguousarray(words, dtype=_U64).reshape(-1)
        for value in (base_gpa, page_size):
            _U64(value)  # OverflowError outside 0 .. 2**64 - 1
        gpas, lengths = _bitmap_runs(w, int(base_gpa), int(page_size))
        return cls._make(gpas, lengths)

    @classmethod
    def from_pages(
        cls, page_indices: npt.ArrayLike, base_gpa: int = 0, page_size: int = PAGE_SIZE
    ) -> RangeTable:
        """Turn page numbers (any order, duplicates allowed) into sorted, merged ranges."""
        pages = np.sort(np.asarray(page_indices, dtype=_U64).reshape(-1))
        if pages.size == 0:
            return cls()
        step = np.diff(pages)
        if not step.all():  # duplicates (np.unique would do, but is 4x slower than a sort)
            pages = pages[np.concatenate(([True], step != 0))]
            step = np.diff(pages)
        breaks = np.flatnonzero(step != _U64(1)) + 1
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

    def coarsened(self, max_ranges: int) -> RangeTable:
        """At most `max_ranges` ranges covering these, by closing the smallest gaps.

        The table must be sorted and without overlaps (as `from_bitmap` and data extents
        are). The result covers every byte of this table and the closed gaps between.
        """
        if max_ranges < 1:
            raise ValueError(f"max_ranges must be at least 1, not {max_ranges}")
        count = len(self)
        if count <= max_ranges:
            return self
        gaps = self._gpas[1:] - (self._gpas[:-1] + self._lengths[:-1])
        kept = np.ones(count - 1, dtype=bool)  # gaps that stay open
        kept[np.argpartition(gaps, count - max_ranges - 1)[:count - max_ranges]] = False
        open_gaps = np.flatnonzero(kept)
        first = np.concatenate(([0], open_gaps + 1))
        last = np.concatenate((open_gaps, [count - 1]))
        gpas = self._gpas[first]
        return RangeTable._make(gpas, self._gpas[last] + self._lengths[last] - gpas)

    def _split_at(self, cuts: U64Array) -> tuple[U64Array, U64Array, U64Array]:
        """Split ranges at stream offsets `cuts`; return the pieces and their stream offsets."""
        ends = np.cumsum(self._lengths, dtype=_U64)
        starts = ends - self._lengths
        total = ends[-1]
        cuts = cuts[(cuts > 0) & (cuts < total)]
        # The sorted union of both (np.union1d would do, but its first call in a process
        # costs ~6 ms of lazy numpy imports: in the first chunk of every migration).
        offsets = np.sort(np.concatenate((starts, cuts)), kind="stable")
        if offsets.size > 1:
            offsets = offsets[np.concatenate(([True], offsets[1:] != offsets[:-1]))]
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
