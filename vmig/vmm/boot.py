"""Guest bring-up: what the VMM writes into guest memory and vCPUs before the first KVM_RUN.

Page tables (identity map with 2 MiB pages), the config page with the guest's command
line (`vmig.guest.cmdline`, the same text a Multiboot loader would pass), and the guest
image; each vCPU starts in 16-bit real mode at its own entry stub (on PVM-based KVM
the guest must switch to long mode itself).
"""

from __future__ import annotations

import struct

import numpy as np

from vmig.config import VmConfig
from vmig.errors import GuestError
from vmig.guest import cmdline, layout
from vmig.kvm import Vcpu
from vmig.memory import GuestMemory
from vmig.units import GiB

__all__ = ["enter_real_mode", "write_boot_memory"]


def write_boot_memory(memory: GuestMemory, config: VmConfig, image: bytes, tsc_khz: int) -> None:
    """Page tables, config page (magic, command line) and guest code, before the first KVM_RUN."""
    gibs = (config.memory_bytes + GiB - 1) // GiB
    q = struct.Struct("<Q")
    memory.write(layout.PML4_GPA, q.pack(layout.PDPT_GPA | 0x3))  # present | writable
    pdpt = b"".join(q.pack((layout.PD_GPA + i * 4096) | 0x3) for i in range(gibs))
    memory.write(layout.PDPT_GPA, pdpt)
    large = 0x83  # present | writable | page size (2 MiB)
    directory = np.arange(gibs * 512, dtype=np.uint64) * np.uint64(layout.LARGE_PAGE)
    memory.write(layout.PD_GPA, (directory | np.uint64(large)).tobytes())
    fields = {
        layout.CFG_MAGIC: layout.CONFIG_MAGIC,
        layout.CFG_CHECK_REQUEST: 0,
        layout.CFG_MULTIBOOT_INFO: 0,  # booted by vmig, not by a Multiboot loader
    }
    for offset, value in fields.items():
        memory.write_u64(layout.CONFIG_GPA + offset, value)
    text = cmdline.render(config, tsc_khz).encode()
    memory.write(layout.CONFIG_GPA + layout.CFG_CMDLINE,
                 text.ljust(layout.CMDLINE_SIZE, b"\0"))
    if len(image) > layout.CODE_LIMIT - layout.ENTRY_BASE:
        raise GuestError(f"guest image is {len(image)} bytes, too big for its code area")
    memory.write(layout.ENTRY_BASE, image)


def enter_real_mode(vcpu: Vcpu, entry: int) -> None:
    """Point a fresh vCPU at `entry` in 16-bit real mode (CS base 0); the guest does the rest."""
    sregs = vcpu.get_sregs()
    sregs.cs.base = 0
    sregs.cs.selector = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = entry
    regs.rflags = 0x2  # bit 1 is reserved and always set
    vcpu.set_regs(regs)
