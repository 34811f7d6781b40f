"""split_owed: which owed pages go before STATE (the VMM reads them) and which after."""

from __future__ import annotations

import numpy as np

from vmig.migration.postcopy import split_owed
from vmig.units import PAGE_SIZE


def _bitmap(pages: int, dirty: list[int]) -> np.ndarray:
    words = np.zeros((pages + 63) // 64, dtype=np.uint64)
    for page in dirty:
        words[page // 64] |= np.uint64(1 << (page % 64))
    return words


def test_vmm_pages_go_first_and_the_rest_after() -> None:
    dirty = _bitmap(256, [0, 1, 2, 10, 100, 101, 255])
    now, later = split_owed(dirty, 256 * PAGE_SIZE, [(0, 2 * PAGE_SIZE), (100 * PAGE_SIZE,
                                                                            PAGE_SIZE)])
    assert list(now) == [(0, 2 * PAGE_SIZE), (100 * PAGE_SIZE, PAGE_SIZE)]
    assert list(later) == [(2 * PAGE_SIZE, PAGE_SIZE), (10 * PAGE_SIZE, PAGE_SIZE),
                           (101 * PAGE_SIZE, PAGE_SIZE), (255 * PAGE_SIZE, PAGE_SIZE)]


def test_clean_vmm_pages_are_not_sent_and_bits_past_memory_are_ignored() -> None:
    dirty = _bitmap(128, [5, 127])
    now, later = split_owed(dirty, 100 * PAGE_SIZE, [(0, 4 * PAGE_SIZE)])
    assert list(now) == []
    assert list(later) == [(5 * PAGE_SIZE, PAGE_SIZE)]
