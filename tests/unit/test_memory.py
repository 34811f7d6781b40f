"""The guest-memory backing's host-side calls: populate, allocate and discard (no KVM needed)."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest
from gil_check import spinner_pause_during

import vmig.memory.backing as memory_module
from vmig.errors import GuestMemoryError
from vmig.memory import GuestMemory
from vmig.memory.backing import MADV_POPULATE_WRITE
from vmig.ranges import RangeTable
from vmig.units import PAGE_SIZE, MiB

GIL_TEST_BYTES = 256 * MiB  # a populate of this size takes 50-600 ms here


def backed_bytes(memory: GuestMemory) -> int:
    """Memory the backing file holds (shmem counts allocated pages in st_blocks)."""
    return os.fstat(memory.fd).st_blocks * 512


@pytest.fixture
def memory():
    with GuestMemory.create(64 * MiB) as mem:
        yield mem


def test_populate_releases_the_gil():
    with GuestMemory.create(GIL_TEST_BYTES) as mem:
        seconds, pause = spinner_pause_during(mem.backing.populate)
        assert backed_bytes(mem) == GIL_TEST_BYTES
    assert pause < max(seconds / 2, 0.02), (
        f"a spinning thread stopped for {pause * 1000:.0f} ms of a {seconds * 1000:.0f} ms "
        "populate: the call held the GIL")


def test_mmap_madvise_would_fail_the_same_check():
    """The check above catches a populate that holds the GIL: CPython's mmap.madvise does."""
    with GuestMemory.create(GIL_TEST_BYTES) as mem:
        seconds, pause = spinner_pause_during(
            lambda: mem.backing._map.madvise(MADV_POPULATE_WRITE, 0, GIL_TEST_BYTES))
    assert pause > seconds * 0.8


def test_allocate_and_discard_release_the_gil():
    with GuestMemory.create(GIL_TEST_BYTES) as mem:
        seconds, pause = spinner_pause_during(mem.backing.allocate)
        assert pause < max(seconds / 2, 0.02)
        assert backed_bytes(mem) == GIL_TEST_BYTES
        seconds, pause = spinner_pause_during(lambda: mem.backing.discard(0, GIL_TEST_BYTES))
        assert pause < max(seconds / 2, 0.02)
        assert backed_bytes(mem) == 0


def test_populate_widens_to_whole_pages_and_checks_the_range(memory):
    memory.backing.populate(PAGE_SIZE + 100, 10)  # inside one page
    assert backed_bytes(memory) == PAGE_SIZE
    memory.backing.populate(3 * PAGE_SIZE - 1, 2)  # straddles two pages
    assert backed_bytes(memory) == 3 * PAGE_SIZE
    memory.backing.populate(0, 0)
    with pytest.raises(GuestMemoryError, match="outside guest memory"):
        memory.backing.populate(memory.size - PAGE_SIZE, 2 * PAGE_SIZE)
    memory.backing.populate()  # all of it
    assert backed_bytes(memory) == memory.size
    assert memory.read(0, 16) == bytes(16)


def test_populate_without_kernel_support_or_memory(memory, monkeypatch):
    def failing(code):
        def madvise(*args):
            ctypes.set_errno(code)
            return -1
        return madvise

    monkeypatch.setattr(memory_module, "_madvise", failing(errno.ENOMEM))
    with pytest.raises(GuestMemoryError, match="cannot populate"):
        memory.backing.populate(0, MiB)
    monkeypatch.setattr(memory_module, "_madvise", failing(errno.EINVAL))  # before Linux 5.14
    memory.backing.populate(0, MiB)  # pages will fault in on first touch instead
    memory.backing.populate(0, MiB)  # and it is not asked again
    assert backed_bytes(memory) == 0


def test_allocate_reserves_pages_without_data(memory):
    memory.backing.allocate(8 * MiB, 4 * MiB)
    assert backed_bytes(memory) == 4 * MiB
    assert memory.read(8 * MiB, 4 * MiB) == bytes(4 * MiB)


def test_discard_frees_pages_and_they_read_as_zeros(memory):
    memory.write(0, b"\xab" * (4 * PAGE_SIZE))
    memory.write(10 * PAGE_SIZE, b"\xcd" * PAGE_SIZE)
    assert backed_bytes(memory) == 5 * PAGE_SIZE
    memory.backing.discard(PAGE_SIZE, 2 * PAGE_SIZE)
    assert backed_bytes(memory) == 3 * PAGE_SIZE
    assert memory.backing.data_extents() == [(0, PAGE_SIZE), (3 * PAGE_SIZE, PAGE_SIZE),
                                     (10 * PAGE_SIZE, PAGE_SIZE)]
    assert memory.read(0, 4 * PAGE_SIZE) == (b"\xab" * PAGE_SIZE + bytes(2 * PAGE_SIZE)
                                             + b"\xab" * PAGE_SIZE)
    # Reading a hole of a memfd through a shared mapping allocates the page again (shmem
    # has no shared zero page): scanning memory for zeros must skip the holes.
    assert backed_bytes(memory) == 5 * PAGE_SIZE
    view = memory.view(10 * PAGE_SIZE, PAGE_SIZE)  # a live view sees the zeros too
    memory.backing.discard(10 * PAGE_SIZE, PAGE_SIZE)
    assert bytes(view) == bytes(PAGE_SIZE)
    view.release()
    memory.backing.discard(0, 0)


def test_discard_takes_whole_pages_inside_memory(memory):
    with pytest.raises(GuestMemoryError, match="not whole pages"):
        memory.backing.discard(100, PAGE_SIZE)
    with pytest.raises(GuestMemoryError, match="not whole pages"):
        memory.backing.discard(0, 100)
    with pytest.raises(GuestMemoryError, match="outside guest memory"):
        memory.backing.discard(memory.size, PAGE_SIZE)


def test_closed_memory_refuses():
    mem = GuestMemory.create(MiB)
    mem.close()
    backing = mem.backing
    for call in (backing.populate, backing.allocate, lambda: backing.discard(0, PAGE_SIZE)):
        with pytest.raises(GuestMemoryError, match="closed"):
            call()


def test_data_extents_of_full_memory_is_one_extent_and_a_late_hole_is_found(memory):
    """Fully allocated memory answers from its allocated size; one hole anywhere, even
    in the last page, still shows."""
    memory.write(0, b"\x01" * memory.size)
    assert memory.backing.data_extents() == [(0, memory.size)]
    memory.backing.discard(memory.size - PAGE_SIZE, PAGE_SIZE)
    assert memory.backing.data_extents() == [(0, memory.size - PAGE_SIZE)]


def test_views_of_a_range_table_are_checked_against_the_memory(memory):
    table = RangeTable([(0, PAGE_SIZE), (memory.size - PAGE_SIZE, 2 * PAGE_SIZE)])
    with pytest.raises(GuestMemoryError, match="outside guest memory"):
        memory.views(table)
    views = memory.views(RangeTable([(PAGE_SIZE, PAGE_SIZE), (memory.size - PAGE_SIZE,
                                                              PAGE_SIZE)]))
    assert [len(v) for v in views] == [PAGE_SIZE, PAGE_SIZE]
    for view in views:
        view.release()
