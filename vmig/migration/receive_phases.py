"""The phases of an incoming migration: what exists at each point of it.

Each phase is a small frozen dataclass holding exactly what exists then, so no step of
the receiver (vmig.migration.receiver) has to ask whether memory or a VM exists yet::

    Listening --START--> Started --MEMORY_FD--> FdReceived --CONFIG--> MemoryReady
                            \\--------------------CONFIG----------------/
    MemoryReady --MEMORY--> MemoryReady --STATE--> Built --COMPLETE--> Completed
    Built --POSTCOPY--> PostcopyActive --MEMORY--> PostcopyActive --COMPLETE--> Completed
    any phase but Completed --ABANDON, error, cancel--> Aborted

`discard(phase)` frees what a phase holds when the migration fails.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vmig.config import VmConfig
from vmig.memory import GuestMemory
from vmig.migration.digest import BackgroundDigest
from vmig.migration.memory_writer import AllocateAhead
from vmig.migration.postcopy import PostcopyService
from vmig.proto import Start
from vmig.vmm.machine import Machine

__all__ = ["Aborted", "Built", "Completed", "FdReceived", "Listening", "MemoryReady",
           "PostcopyActive", "ReceivePhase", "Started", "discard"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Listening:
    """Waiting for an authenticated source to send START."""


@dataclass(frozen=True)
class Started:
    """START accepted; every connection it announced is here; admission is closed."""

    start: Start


@dataclass(frozen=True)
class FdReceived:
    """Local mode: the guest memory came by file descriptor."""

    start: Start
    memory: GuestMemory


@dataclass(frozen=True)
class MemoryReady:
    """CONFIG applied: guest memory exists and MEMORY requests fill it."""

    start: Start
    config: VmConfig
    memory: GuestMemory
    #: Allocating the data's memory ahead of it (a fresh destination); None when the
    #: memory was preallocated or shared.
    allocator: AllocateAhead | None = None


@dataclass(frozen=True)
class Built:
    """STATE applied: the VM exists, paused, on the received memory."""

    start: Start
    machine: Machine
    digest: BackgroundDigest | None


@dataclass(frozen=True)
class PostcopyActive:
    """POSTCOPY accepted: the VM runs here while its last pages arrive."""

    start: Start
    machine: Machine
    service: PostcopyService


@dataclass(frozen=True)
class Completed:
    """COMPLETE accepted: the VM runs here and belongs to the caller."""

    machine: Machine


@dataclass(frozen=True)
class Aborted:
    """Abandoned, refused or failed; nothing is kept."""

    reason: str


ReceivePhase = (Listening | Started | FdReceived | MemoryReady | Built | PostcopyActive
                | Completed | Aborted)


def discard(phase: ReceivePhase) -> None:
    """Free what a phase holds (memory, a VM built but never run, a post-copy VM that
    cannot go on without the pages it lacks)."""
    if isinstance(phase, PostcopyActive):
        phase.service.close()  # releases vCPUs waiting for pages: the VM is stopped now
        phase.machine.close()
    elif isinstance(phase, Built):
        if phase.digest is not None:
            try:
                phase.digest.result()
            except Exception as exc:  # the digest only matters for a completed migration
                log.debug("digest of discarded memory: %s", exc)
        phase.machine.close()
    elif isinstance(phase, MemoryReady):
        if phase.allocator is not None:
            phase.allocator.close()
        phase.memory.close()
    elif isinstance(phase, FdReceived):
        phase.memory.close()
