"""AllocateAhead: allocates the data's extents in order, and never behind the data."""

from __future__ import annotations

import pytest

from vmig.memory import GuestMemory, MemoryBacking
from vmig.migration.memory_writer import ALLOCATE_STEP_BYTES, AllocateAhead
from vmig.ranges import RangeTable
from vmig.units import MiB

STEP = ALLOCATE_STEP_BYTES


@pytest.fixture
def memory():
    with GuestMemory.create(8 * STEP) as guest_memory:
        yield guest_memory


def _allocations(memory: GuestMemory, monkeypatch: pytest.MonkeyPatch,
                 extents: list[tuple[int, int]], received: RangeTable | None = None
                 ) -> list[tuple[int, int]]:
    allocated: list[tuple[int, int]] = []
    monkeypatch.setattr(MemoryBacking, "allocate",
                        lambda self, gpa=0, length=None: allocated.append((gpa, length)))
    allocator = AllocateAhead(memory, extents, on_failure=pytest.fail)
    if received is not None:  # the data got there before the allocator started
        allocator.received(received)
    allocator.start()
    allocator._thread.join(5)
    allocator.close()
    return allocated


def test_it_allocates_every_extent_in_steps(memory, monkeypatch):
    allocated = _allocations(memory, monkeypatch, [(0, 2 * STEP + MiB), (5 * STEP, STEP)])
    assert allocated == [(0, STEP), (STEP, STEP), (2 * STEP, MiB), (5 * STEP, STEP)]


def test_it_skips_what_the_data_has_passed(memory, monkeypatch):
    """Where the data outruns it (zero pages skipped at the source), allocating behind
    it would be wasted: it goes on from the highest address received."""
    received = RangeTable([(0, 4096), (3 * STEP, 4096)])
    allocated = _allocations(memory, monkeypatch, [(0, 2 * STEP), (2 * STEP, 4 * STEP)],
                             received)
    frontier = 3 * STEP + 4096
    assert allocated[0] == (frontier, STEP)
    assert all(gpa >= frontier for gpa, _ in allocated)
    assert sum(length for _, length in allocated) == 6 * STEP - frontier
