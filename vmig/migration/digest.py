"""Digest of all guest memory, for `verify_memory`.

BLAKE3 over the list of per-block digests (2 MiB blocks, each hashed with
BLAKE3 on all cores). A block that lies entirely in a hole of the backing file
(never-written pages, which read as zeros) gets the precomputed digest of a zero
block without being read, so verifying a sparse guest costs time in proportion
to the memory it uses, and faults none of its untouched pages in. Both sides
compute the same function, so the digests compare bytes, not layouts.
"""

from __future__ import annotations

import bisect
import functools

import blake3

from vmig.memory import GuestMemory

DIGEST_ALGORITHM = "blake3-2m-blocks"
BLOCK_BYTES = 2 << 20


@functools.cache
def _zero_block_digest() -> bytes:
    return blake3.blake3(bytes(BLOCK_BYTES)).digest()


def memory_digest(memory: GuestMemory) -> str:
    """Hex digest of guest memory; call only while the VM is paused."""
    extents = memory.data_extents()
    starts = [gpa for gpa, _ in extents]
    outer = blake3.blake3()
    for block in range(0, memory.size, BLOCK_BYTES):
        length = min(BLOCK_BYTES, memory.size - block)
        if length == BLOCK_BYTES and not _overlaps_data(extents, starts, block, length):
            outer.update(_zero_block_digest())
            continue
        view = memory.view(block, length)
        try:
            outer.update(blake3.blake3(view, max_threads=blake3.blake3.AUTO).digest())
        finally:
            view.release()
    return outer.hexdigest()


def _overlaps_data(extents: list[tuple[int, int]], starts: list[int], gpa: int,
                   length: int) -> bool:
    """Whether [gpa, gpa+length) meets any data extent (extents sorted, disjoint)."""
    index = bisect.bisect_right(starts, gpa + length - 1) - 1
    if index < 0:
        return False
    start, size = extents[index]
    return start + size > gpa
