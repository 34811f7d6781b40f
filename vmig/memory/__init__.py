"""Guest RAM: the host-side backing (`MemoryBacking`) and access by guest address
(`GuestMemory`)."""

from vmig.memory.backing import MemoryBacking, host_available_memory
from vmig.memory.guest import GuestMemory

__all__ = ["GuestMemory", "MemoryBacking", "host_available_memory"]
