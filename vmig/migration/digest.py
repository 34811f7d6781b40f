"""Digest of all guest memory, for `verify_memory` (BLAKE3, on all cores)."""

from __future__ import annotations

import blake3

from vmig.memory import GuestMemory

DIGEST_ALGORITHM = "blake3"


def memory_digest(memory: GuestMemory) -> str:
    """Hex BLAKE3 of guest memory from GPA 0 to its end; call only while the VM is paused."""
    view = memory.view(0, memory.size)
    try:
        return blake3.blake3(view, max_threads=blake3.blake3.AUTO).hexdigest()
    finally:
        view.release()
