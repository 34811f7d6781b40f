"""RangeTable: bitmap and page conversion, partitioning, wire encoding."""

from __future__ import annotations

from array import array

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmig.ranges import MemoryRange, RangeTable
from vmig.units import PAGE_SIZE, GiB, MiB

ALL_ONES = 0xFFFF_FFFF_FFFF_FFFF


def naive_from_bitmap(words: list[int], base_gpa: int = 0, page_size: int = PAGE_SIZE):
    """Reference: walk every bit in Python."""
    out: list[tuple[int, int]] = []
    run_start = None
    npages = len(words) * 64
    for page in range(npages + 1):
        dirty = page < npages and (words[page // 64] >> (page % 64)) & 1
        if dirty and run_start is None:
            run_start = page
        elif not dirty and run_start is not None:
            out.append((base_gpa + run_start * page_size, (page - run_start) * page_size))
            run_start = None
    return out


def bitmap_of(pages: np.ndarray, npages: int) -> np.ndarray:
    words = np.zeros((npages + 63) // 64, dtype=np.uint64)
    pages = np.asarray(pages, dtype=np.uint64)
    np.bitwise_or.at(words, pages // 64, np.left_shift(np.uint64(1), pages % np.uint64(64)))
    return words


def pairs(table: RangeTable) -> list[tuple[int, int]]:
    return [(r.gpa, r.length) for r in table]


# -- construction ---------------------------------------------------------------------


def test_empty_bitmap_gives_empty_table():
    table = RangeTable.from_bitmap(np.zeros(16, dtype=np.uint64))
    assert len(table) == 0
    assert table.total_bytes == 0
    assert list(table) == []
    assert table == RangeTable()
    assert RangeTable.from_bitmap([]) == RangeTable()


def test_full_bitmap_is_one_range():
    words = np.full(4096, ALL_ONES, dtype=np.uint64)  # 1 GiB of 4 KiB pages
    table = RangeTable.from_bitmap(words, base_gpa=0x1000_0000)
    assert pairs(table) == [(0x1000_0000, GiB)]
    assert table.total_bytes == GiB


def test_alternating_bits():
    table = RangeTable.from_bitmap([0x5555_5555_5555_5555])
    assert len(table) == 32
    assert pairs(table) == [(2 * i * PAGE_SIZE, PAGE_SIZE) for i in range(32)]


def test_runs_cross_word_boundaries():
    # Bit 63 of word 0 and bits 0-1 of word 1 -> pages 63..65 are one range.
    table = RangeTable.from_bitmap([1 << 63, 0b11])
    assert pairs(table) == [(63 * PAGE_SIZE, 3 * PAGE_SIZE)]


def test_runs_do_not_merge_across_a_clean_word():
    table = RangeTable.from_bitmap([1 << 63, 0, 1])
    assert pairs(table) == [(63 * PAGE_SIZE, PAGE_SIZE), (128 * PAGE_SIZE, PAGE_SIZE)]


def test_word_edges_first_and_last_bit():
    table = RangeTable.from_bitmap([1, 1 << 63])
    assert pairs(table) == [(0, PAGE_SIZE), (127 * PAGE_SIZE, PAGE_SIZE)]


def test_bitmap_accepts_array_and_list_and_page_size():
    expected = [(0x4000_0000 + 2 * MiB, 2 * 2 * MiB)]
    assert pairs(RangeTable.from_bitmap(array("Q", [0b110]), 0x4000_0000, 2 * MiB)) == expected
    assert pairs(RangeTable.from_bitmap([0b110], 0x4000_0000, 2 * MiB)) == expected


@pytest.mark.parametrize("density", [0.001, 0.05, 0.5, 0.95])
@pytest.mark.parametrize("seed", range(4))
def test_bitmap_matches_naive_reference(density, seed):
    rng = np.random.default_rng(seed)
    nwords = int(rng.integers(1, 40))
    bits = rng.random(nwords * 64) < density
    words = np.packbits(bits, bitorder="little").view("<u8").astype(np.uint64)
    base = int(rng.integers(0, 1 << 20)) * PAGE_SIZE
    assert pairs(RangeTable.from_bitmap(words, base)) == naive_from_bitmap(words.tolist(), base)


def test_bitmap_with_full_and_empty_words_matches_reference():
    rng = np.random.default_rng(7)
    choices = np.array([0, ALL_ONES, 1, 1 << 63, 0x8000_0000_0000_0001], dtype=np.uint64)
    words = rng.choice(choices, size=300)
    assert pairs(RangeTable.from_bitmap(words)) == naive_from_bitmap(words.tolist())


def bits_reference(words: np.ndarray, base_gpa: int = 0, page_size: int = PAGE_SIZE):
    """Reference for large bitmaps: unpack every bit, runs start at 0->1 and end at 1->0."""
    bits = np.unpackbits(np.asarray(words, dtype="<u8").view(np.uint8), bitorder="little")
    edges = np.diff(np.concatenate(([0], bits.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return RangeTable.from_arrays(base_gpa + starts * page_size, (ends - starts) * page_size)


WORD_KINDS = np.array([0, 0, ALL_ONES, ALL_ONES, 1, 1 << 63, (1 << 63) | 1, ALL_ONES - 1,
                       ALL_ONES >> 1, 0x5555_5555_5555_5555, 0x0FF0_0000_0000_0001,
                       0xFFFF_0000_0000_FFFF], dtype=np.uint64)


def random_bitmap(rng: np.random.Generator, nwords: int) -> np.ndarray:
    """Words of every kind the conversion treats apart: clean, full, edge bits, sparse, dense."""
    kind = rng.integers(0, 4, nwords)
    special = rng.choice(WORD_KINDS, nwords)
    sparse = np.packbits(rng.random(nwords * 64) < 0.03, bitorder="little").view("<u8")
    dense = np.packbits(rng.random(nwords * 64) < 0.6, bitorder="little").view("<u8")
    words = np.where(kind == 0, special, np.where(kind == 1, sparse, dense)).astype(np.uint64)
    for start in rng.integers(0, nwords, 3):  # a few stretches of clean or full words
        words[start:start + int(rng.integers(1, 20))] = rng.choice(WORD_KINDS[:4])
    return words


@pytest.mark.parametrize("seed", range(12))
def test_bitmap_matches_reference_across_block_edges(seed, monkeypatch):
    """Tiny blocks put word and block edges everywhere; page sizes and bases vary."""
    import vmig.ranges as ranges_module

    rng = np.random.default_rng(100 + seed)
    monkeypatch.setattr(ranges_module, "_BLOCK_WORDS", int(rng.choice([1, 2, 3, 5, 64])))
    monkeypatch.setattr(ranges_module, "_UNPACK_WORDS", int(rng.choice([1, 3, 1000])))
    words = random_bitmap(rng, int(rng.integers(1, 120)))
    base = int(rng.integers(0, 1 << 30)) * PAGE_SIZE
    page_size = int(rng.choice([PAGE_SIZE, 2 * MiB, 1, 3, 12288]))
    table = RangeTable.from_bitmap(words, base, page_size)
    assert pairs(table) == naive_from_bitmap(words.tolist(), base, page_size)
    assert table.total_bytes == int(np.bitwise_count(words).sum()) * page_size


#: Words built from a few bits, edge bits and all-ones, so runs cross words and blocks.
EDGE_WORDS = st.one_of(
    st.sampled_from([0, ALL_ONES, 1, 1 << 63, (1 << 63) | 1, ALL_ONES >> 1, ALL_ONES - 1]),
    st.lists(st.integers(0, 63), max_size=5).map(lambda bits: sum({1 << b for b in bits})),
    st.integers(0, ALL_ONES),
)


@settings(max_examples=300, deadline=None)
@given(words=st.lists(EDGE_WORDS, max_size=40), block=st.sampled_from([1, 2, 3, 7, 1 << 17]),
       base_page=st.integers(0, 1 << 30), page_size=st.sampled_from([PAGE_SIZE, 1, 3, 2 * MiB]))
def test_bitmap_property_matches_naive_reference(words, block, base_page, page_size):
    """Any bitmap, any block size: the same runs as walking every bit."""
    import vmig.ranges as ranges_module

    saved = ranges_module._BLOCK_WORDS
    ranges_module._BLOCK_WORDS = block
    try:
        table = RangeTable.from_bitmap(np.array(words, dtype=np.uint64), base_page * page_size,
                                       page_size)
    finally:
        ranges_module._BLOCK_WORDS = saved
    assert pairs(table) == naive_from_bitmap(words, base_page * page_size, page_size)


@pytest.mark.parametrize("pattern", ["scattered", "clustered", "dense", "long_runs"])
def test_large_bitmaps_match_reference(pattern):
    """Default block sizes, several blocks, the shapes benchmarks/ranges.py times."""
    rng = np.random.default_rng(1)
    nwords = 3 * (1 << 17) + 12345  # over three blocks, the last one partial
    npages = nwords * 64
    if pattern == "scattered":
        bits = rng.random(npages, dtype=np.float32) < 0.01
    elif pattern == "dense":
        bits = rng.random(npages, dtype=np.float32) < 0.5
    else:
        bits = np.zeros(npages, dtype=bool)
        longest = 200 if pattern == "clustered" else 3 * 64 * (1 << 17)
        for start in rng.integers(0, npages, 300 if pattern == "clustered" else 3):
            bits[start:start + int(rng.integers(1, longest))] = True
    words = np.packbits(bits, bitorder="little").view("<u8").astype(np.uint64)
    assert RangeTable.from_bitmap(words, 1 << 40) == bits_reference(words, 1 << 40)


def test_full_blocks_and_a_run_through_all_of_them():
    nwords = 5 * (1 << 17)
    words = np.full(nwords, ALL_ONES, dtype=np.uint64)
    words[0] = ALL_ONES << np.uint64(5)  # the run starts at page 5 ...
    words[-1] = 0xFF  # ... and ends 8 pages into the last word
    assert pairs(RangeTable.from_bitmap(words)) == [
        (5 * PAGE_SIZE, ((nwords - 1) * 64 + 8 - 5) * PAGE_SIZE)]
    words[(1 << 17) + 7] = 0  # a clean word in the second block cuts it in two
    assert RangeTable.from_bitmap(words) == bits_reference(words)


def test_bitmap_base_and_page_size_out_of_range():
    with pytest.raises(OverflowError):
        RangeTable.from_bitmap([1], base_gpa=-4096)
    with pytest.raises(OverflowError):
        RangeTable.from_bitmap([1], base_gpa=1 << 64)


def test_from_pages_sorts_dedupes_and_merges():
    table = RangeTable.from_pages([5, 3, 4, 4, 10, 0], base_gpa=0x8000)
    assert pairs(table) == [
        (0x8000, PAGE_SIZE),
        (0x8000 + 3 * PAGE_SIZE, 3 * PAGE_SIZE),
        (0x8000 + 10 * PAGE_SIZE, PAGE_SIZE),
    ]
    assert RangeTable.from_pages([]) == RangeTable()


@settings(max_examples=200, deadline=None)
@given(pages=st.lists(st.integers(0, 300), max_size=120))
def test_from_pages_property_matches_naive_reference(pages):
    """Any page numbers, duplicates and all: the runs of the sorted set."""
    words = [0] * 5
    for page in pages:
        words[page // 64] |= 1 << (page % 64)
    assert pairs(RangeTable.from_pages(pages, 0x4000)) == naive_from_bitmap(words, 0x4000)


def test_from_pages_agrees_with_from_bitmap():
    rng = np.random.default_rng(3)
    pages = rng.choice(5000, 700, replace=False)
    assert RangeTable.from_pages(pages) == RangeTable.from_bitmap(bitmap_of(pages, 5000))


def test_full_and_constructor():
    assert pairs(RangeTable.full(64 * MiB, base_gpa=4096)) == [(4096, 64 * MiB)]
    assert RangeTable.full(0) == RangeTable()
    table = RangeTable([(0, 4096), MemoryRange(8192, 4096)])
    assert table[1] == MemoryRange(8192, 4096)
    assert table[1].end == 12288
    assert table[-1:] == RangeTable([(8192, 4096)])
    with pytest.raises(ValueError):
        RangeTable([(0, 0)])
    with pytest.raises(ValueError):
        RangeTable([((1 << 64) - 4096, 8192)])
    with pytest.raises(ValueError):
        RangeTable.full(-1)


def test_from_arrays_checks_and_copies():
    gpas = np.array([0, 8192], dtype=np.uint64)
    table = RangeTable.from_arrays(gpas, [4096, 4096])
    gpas[0] = 99  # the table does not alias the caller's array
    assert table[0] == MemoryRange(0, 4096)
    with pytest.raises(ValueError):
        RangeTable.from_arrays([0], [4096, 4096])
    with pytest.raises(ValueError):
        RangeTable.from_arrays([0], [0])
    g, _ = table.as_arrays()
    with pytest.raises(ValueError):
        g[0] = 1  # read-only


def test_coalesce_merges_touching_ranges():
    table = RangeTable([(0, 4096), (4096, 8192), (20480, 4096), (24576, 4096), (0, 4096)])
    assert pairs(table.coalesce()) == [(0, 12288), (20480, 8192), (0, 4096)]
    assert table.coalesce().total_bytes == table.total_bytes


# -- partition ------------------------------------------------------------------------


def _check_partition(table: RangeTable, chunk: int) -> list[RangeTable]:
    parts = table.partition(chunk)
    assert sum(p.total_bytes for p in parts) == table.total_bytes
    assert all(0 < p.total_bytes <= chunk for p in parts)
    assert all(p.total_bytes == chunk for p in parts[:-1])
    # Re-joining the parts gives back exactly the original ranges.
    joined = RangeTable([r for p in parts for r in p])
    assert joined.coalesce() == table.coalesce()
    for part in parts:
        for r in part:
            assert r.gpa % PAGE_SIZE == 0 and r.length % PAGE_SIZE == 0
    return parts


def test_partition_splits_one_big_range():
    parts = _check_partition(RangeTable.full(10 * MiB), 4 * MiB)
    assert [pairs(p) for p in parts] == [
        [(0, 4 * MiB)],
        [(4 * MiB, 4 * MiB)],
        [(8 * MiB, 2 * MiB)],
    ]


def test_partition_groups_small_ranges_and_splits_across_chunks():
    table = RangeTable([(0, 3 * PAGE_SIZE), (100 * PAGE_SIZE, 3 * PAGE_SIZE)])
    parts = _check_partition(table, 4 * PAGE_SIZE)
    assert [pairs(p) for p in parts] == [
        [(0, 3 * PAGE_SIZE), (100 * PAGE_SIZE, PAGE_SIZE)],
        [(101 * PAGE_SIZE, 2 * PAGE_SIZE)],
    ]


def test_partition_exact_fit_and_edge_cases():
    table = RangeTable([(0, 2 * PAGE_SIZE), (10 * PAGE_SIZE, 2 * PAGE_SIZE)])
    parts = _check_partition(table, 2 * PAGE_SIZE)
    assert [pairs(p) for p in parts] == [[(0, 2 * PAGE_SIZE)], [(10 * PAGE_SIZE, 2 * PAGE_SIZE)]]
    assert RangeTable().partition(PAGE_SIZE) == []
    assert table.partition(1 * GiB) == [table]
    with pytest.raises(ValueError):
        table.partition(100)
    with pytest.raises(ValueError):
        table.partition(0)


@pytest.mark.parametrize("seed", range(5))
def test_partition_random_tables(seed):
    rng = np.random.default_rng(seed)
    pages = rng.choice(20000, 3000, replace=False)
    table = RangeTable.from_pages(pages)
    for chunk_pages in (1, 3, 64, 1000, 5000):
        _check_partition(table, chunk_pages * PAGE_SIZE)


def test_slice_bytes():
    table = RangeTable([(0, 2 * PAGE_SIZE), (10 * PAGE_SIZE, 2 * PAGE_SIZE)])
    assert pairs(table.slice_bytes(PAGE_SIZE, 3 * PAGE_SIZE)) == [
        (PAGE_SIZE, PAGE_SIZE),
        (10 * PAGE_SIZE, PAGE_SIZE),
    ]
    assert pairs(table.slice_bytes(100, 200)) == [(100, 100)]
    assert pairs(table.slice_bytes(0, 10**9)) == pairs(table)
    assert len(table.slice_bytes(5, 5)) == 0


# -- encoding -------------------------------------------------------------------------


def test_encode_layout_is_little_endian_pairs():
    table = RangeTable([(0x1122_3344_5566_7000, 0x2000)])
    assert table.encode() == bytes.fromhex("00706655443322110020000000000000")


@pytest.mark.parametrize("seed", range(3))
def test_encode_decode_round_trip(seed):
    rng = np.random.default_rng(seed)
    table = RangeTable.from_pages(rng.choice(100000, 2000, replace=False), base_gpa=1 << 40)
    data = table.encode()
    assert len(data) == 16 * len(table)
    assert RangeTable.decode(data) == table
    assert RangeTable.decode(memoryview(bytearray(data))) == table
    assert RangeTable.decode(b"") == RangeTable()


def test_decode_rejects_bad_input():
    with pytest.raises(ValueError):
        RangeTable.decode(bytes(15))
    with pytest.raises(ValueError):
        RangeTable.decode(bytes(16))  # length 0


def test_equality_hash_repr():
    a = RangeTable([(0, 4096)])
    assert a == RangeTable.from_pages([0])
    assert hash(a) == hash(RangeTable.from_pages([0]))
    assert a != RangeTable([(4096, 4096)])
    assert "total_bytes=4096" in repr(a)


# -- large inputs (speed is measured in benchmarks/ranges.py) ------------------------------


def test_full_gib_bitmap_is_one_range():
    words = np.full(GiB // PAGE_SIZE // 64, ALL_ONES, dtype=np.uint64)
    assert list(RangeTable.from_bitmap(words)) == [(0, GiB)]


def test_sparse_4gib_bitmap_keeps_every_page():
    rng = np.random.default_rng(0)
    npages = 4 * GiB // PAGE_SIZE
    pages = rng.choice(npages, 50_000, replace=False)
    table = RangeTable.from_bitmap(bitmap_of(pages, npages))
    assert table.total_bytes == 50_000 * PAGE_SIZE
    assert table == RangeTable.from_pages(pages)


def test_coarsened_closes_the_smallest_gaps_and_covers_everything():
    table = RangeTable([(0, 4096), (8192, 4096), (10 * 4096, 4096), (11 * 4096 + 4096 * 100, 4096)])
    assert table.coarsened(4) is table
    assert list(table.coarsened(3)) == [(0, 3 * 4096), (10 * 4096, 4096),
                                        (111 * 4096, 4096)]
    assert list(table.coarsened(2)) == [(0, 11 * 4096), (111 * 4096, 4096)]
    assert list(table.coarsened(1)) == [(0, 112 * 4096)]
    with pytest.raises(ValueError):
        table.coarsened(0)
