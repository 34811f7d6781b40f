"""The memory digest compares contents, whatever the layout of holes and data."""

from vmig.memory import GuestMemory
from vmig.migration.digest import BLOCK_BYTES, memory_digest
from vmig.units import MiB


def test_sparse_and_populated_memory_with_equal_bytes_agree():
    with GuestMemory.create(16 * MiB) as sparse, GuestMemory.create(16 * MiB) as full:
        full.backing.populate()
        for memory in (sparse, full):
            memory.write(4096 * 5 + 7, b"xy")
            memory.write(BLOCK_BYTES * 3 - 1, b"edge")  # straddles two blocks
        assert sparse.backing.data_extents() != full.backing.data_extents()
        assert memory_digest(sparse) == memory_digest(full)


def test_one_changed_byte_changes_the_digest():
    with GuestMemory.create(8 * MiB) as a, GuestMemory.create(8 * MiB) as b:
        a.write(123, b"same")
        b.write(123, b"same")
        before = memory_digest(b)
        assert memory_digest(a) == before
        b.write(8 * MiB - 1, b"\x01")  # the very last byte
        assert memory_digest(b) != before


def test_data_extents_report_written_pages_only():
    with GuestMemory.create(8 * MiB) as memory:
        assert memory.backing.data_extents() == []
        memory.write(3 * 4096 + 100, b"x")
        assert memory.backing.data_extents() == [(3 * 4096, 4096)]
