"""Zero-page detection: masks, splitting range tables, GuestMemory's wrappers, the GIL."""

from __future__ import annotations

import numpy as np
import pytest
from gil_check import spinner_pause_during

import vmig.zeropages as zp
from vmig.errors import GuestMemoryError
from vmig.memory import GuestMemory
from vmig.ranges import RangeTable
from vmig.units import PAGE_SIZE, MiB
from vmig.zeropages import split_zero_pages, zero_page_mask


def reference_mask(data: bytes) -> list[bool]:
    return [not any(data[i:i + PAGE_SIZE]) for i in range(0, len(data), PAGE_SIZE)]


def pages_with(rng: np.random.Generator, npages: int) -> bytearray:
    """Pages of every kind: zero, random, one non-zero byte at the start, the end, inside."""
    data = bytearray(npages * PAGE_SIZE)
    for page, kind in enumerate(rng.integers(0, 5, npages)):
        at = page * PAGE_SIZE
        if kind == 1:
            data[at:at + PAGE_SIZE] = rng.bytes(PAGE_SIZE)
        elif kind == 2:
            data[at] = 1
        elif kind == 3:
            data[at + PAGE_SIZE - 1] = 0x80
        elif kind == 4:
            data[at + int(rng.integers(8, PAGE_SIZE - 8))] = 7
    return data


@pytest.fixture(params=["blocks", "tiny_blocks", "always_gather", "never_gather"])
def tuning(request, monkeypatch):
    """Run each test with the block size and the gather threshold at their edges too."""
    if request.param == "tiny_blocks":
        monkeypatch.setattr(zp, "BLOCK_PAGES", 3)
    elif request.param == "always_gather":
        monkeypatch.setattr(zp, "_GATHER_SHARE", 1.0)
    elif request.param == "never_gather":
        monkeypatch.setattr(zp, "_GATHER_SHARE", 0.0)
    return request.param


@pytest.mark.parametrize("seed", range(4))
def test_mask_matches_reference(seed, tuning):
    rng = np.random.default_rng(seed)
    data = pages_with(rng, int(rng.integers(1, 80)))
    assert zero_page_mask(memoryview(data)).tolist() == reference_mask(bytes(data))


def test_first_and_last_byte_of_a_page(tuning):
    data = bytearray(4 * PAGE_SIZE)
    data[PAGE_SIZE] = 1  # first byte of page 1
    data[3 * PAGE_SIZE - 1] = 1  # last byte of page 2
    assert zero_page_mask(data).tolist() == [True, False, False, True]


def test_partial_last_page_and_empty_input():
    data = bytearray(2 * PAGE_SIZE + 100)
    assert zero_page_mask(data).tolist() == [True, True, True]
    data[-1] = 9
    assert zero_page_mask(data).tolist() == [True, True, False]
    assert zero_page_mask(bytes(10)).tolist() == [True]
    assert zero_page_mask(b"\x00" * 9 + b"\x01").tolist() == [False]
    assert zero_page_mask(b"").tolist() == []
    assert zero_page_mask(memoryview(b"")).dtype == np.bool_


def test_any_contiguous_buffer():
    data = np.zeros(3 * PAGE_SIZE // 8, dtype=np.uint64)
    data[PAGE_SIZE // 8] = 1 << 63
    assert zero_page_mask(data).tolist() == [True, False, True]
    assert zero_page_mask(memoryview(data)).tolist() == [True, False, True]  # format 'Q'
    assert zero_page_mask(data.tobytes()).tolist() == [True, False, True]


def reference_split(data: bytes, table: RangeTable) -> tuple[RangeTable, RangeTable]:
    mask = reference_mask(data)
    out: tuple[list[tuple[int, int]], list[tuple[int, int]]] = ([], [])
    for gpa, length in table:
        for page in range(gpa // PAGE_SIZE, (gpa + length) // PAGE_SIZE):
            out[mask[page]].append((page * PAGE_SIZE, PAGE_SIZE))
    return RangeTable(out[0]).coalesce(), RangeTable(out[1]).coalesce()


@pytest.mark.parametrize("seed", range(6))
def test_split_matches_reference(seed, tuning):
    rng = np.random.default_rng(10 + seed)
    npages = int(rng.integers(1, 200))
    data = pages_with(rng, npages)
    ranges = []
    for _ in range(int(rng.integers(1, 12))):  # in any order, some single pages, some long
        start = int(rng.integers(0, npages))
        count = int(rng.integers(1, npages - start + 1))
        ranges.append((start * PAGE_SIZE, count * PAGE_SIZE))
    table = RangeTable(ranges)
    assert split_zero_pages(memoryview(data), table) == reference_split(bytes(data), table)


def test_split_one_long_range_and_many_single_pages(tuning):
    rng = np.random.default_rng(3)
    data = pages_with(rng, 300)
    whole = RangeTable.full(len(data))
    assert split_zero_pages(data, whole) == reference_split(bytes(data), whole)
    singles = RangeTable.from_pages(rng.choice(300, 120, replace=False))
    assert split_zero_pages(data, singles) == reference_split(bytes(data), singles)
    assert split_zero_pages(data, RangeTable()) == (RangeTable(), RangeTable())


def test_split_refuses_partial_pages_and_ranges_past_the_end():
    data = bytes(4 * PAGE_SIZE)
    with pytest.raises(ValueError, match="whole pages"):
        split_zero_pages(data, RangeTable([(0, 100)]))
    with pytest.raises(ValueError, match="whole pages"):
        split_zero_pages(data, RangeTable([(100, PAGE_SIZE)]))
    with pytest.raises(ValueError, match="past the memory"):
        split_zero_pages(data, RangeTable([(3 * PAGE_SIZE, 2 * PAGE_SIZE)]))


def test_guest_memory_zero_pages_and_split():
    with GuestMemory.create(16 * MiB) as mem:
        mem.write(5 * PAGE_SIZE, b"\x01")
        mem.write(9 * PAGE_SIZE - 1, b"\x02")  # last byte of page 8
        mem.write(12 * PAGE_SIZE, bytes(PAGE_SIZE))  # written, but zeros
        data, zero = mem.split_zero_pages(RangeTable(mem.backing.data_extents()))
        assert data == RangeTable([(5 * PAGE_SIZE, PAGE_SIZE), (8 * PAGE_SIZE, PAGE_SIZE)])
        assert zero == RangeTable([(12 * PAGE_SIZE, PAGE_SIZE)])
        assert mem.zero_pages(4 * PAGE_SIZE, 6 * PAGE_SIZE) == RangeTable(
            [(4 * PAGE_SIZE, PAGE_SIZE), (6 * PAGE_SIZE, 2 * PAGE_SIZE),
             (9 * PAGE_SIZE, PAGE_SIZE)])
        # reading the holes allocated them: they are extents now (scan extents only)
        assert (4 * PAGE_SIZE, 6 * PAGE_SIZE) in mem.backing.data_extents()
        assert mem.zero_pages(0, 0) == RangeTable()
        with pytest.raises(GuestMemoryError, match="outside guest memory"):
            mem.zero_pages(mem.size - PAGE_SIZE, 2 * PAGE_SIZE)
        with pytest.raises(GuestMemoryError, match="whole pages"):
            mem.zero_pages(0, 100)
    # no memoryview is left behind: close() unmapped


def test_zero_scan_releases_the_gil():
    zeros = np.empty(512 * MiB, dtype=np.uint8)
    zeros.fill(0)  # real pages (np.zeros would map the shared zero page)
    seconds, pause = spinner_pause_during(lambda: zero_page_mask(zeros))
    assert pause < max(seconds / 2, 0.02), (
        f"a spinning thread stopped for {pause * 1000:.0f} ms of a {seconds * 1000:.0f} ms scan")
