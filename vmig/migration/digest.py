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
import threading

import blake3

from vmig.memory import GuestMemory

DIGEST_ALGORITHM = "blake3-2m-blocks"
BLOCK_BYTES = 2 << 20


@functools.cache
def _zero_block_digest() -> bytes:
    return blake3.blake3(bytes(BLOCK_BYTES)).digest()


def memory_digest(memory: GuestMemory) -> str:
    """Hex digest of guest memory; call only while the VM is paused."""
    extents = memory.backing.data_extents()
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


class BackgroundDigest:
    """`memory_digest(memory)` on a thread of its own, so both sides hash at once."""

    def __init__(self, memory: GuestMemory) -> None:
        self._value: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(memory,), name="migrate-digest")
        self._thread.start()

    def _run(self, memory: GuestMemory) -> None:
        try:
            self._value = memory_digest(memory)
        except BaseException as exc:  # re-raised by result() on the caller's thread
            self._error = exc

    def result(self) -> str:
        """Join the thread; return the digest or raise what computing it raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value
