"""Guest-physical memory map and the VMM <-> guest ABI.

This module is the single source of truth: `build.py` generates the guest's C
header `layout.h` from the constants below, so the VMM and the guest cannot
disagree about where things live.

Memory map (guest-physical, identity-mapped with 2 MiB pages)::

    0x0000_0000  real-mode IVT (unused)
    0x0000_1000  PML4                       written by the VMM (or the guest, booted by Multiboot)
    0x0000_2000  PDPT                       likewise
    0x0000_3000  config page                VMM -> guest: command line, check requests
    0x0000_4000  status page                guest -> VMM, 64 bytes per vCPU
    0x0000_9000  QEMU's Multiboot memory map and info structure (MULTIBOOT_INFO_AREA)
    0x0000_a000  guest code; vCPU i enters at ENTRY_BASE + i * ENTRY_STRIDE; Multiboot
                 header and 32-bit entry right after the stubs
    0x0001_0000  page directories, one per GiB (up to MAX_MEMORY)
    0x0006_0000  stacks, STACK_SIZE per vCPU, growing down from STACK_TOP
    0x0010_0000  generation table: u32 per working-set page
    ws_gpa       working set (2 MiB aligned, after the table)

The same flat image is vmig's guest and a Multiboot (v1) kernel: the header's address
fields (flag bit 16) load it at ENTRY_BASE, the one place it runs from. QEMU's
Multiboot loader puts its e820 map and info structure at 0x9000-0x9558 and the
command line right after the image (page aligned), so the code starts above them.
The guest's parameters are a command line (`vmig/guest/cmdline.py`): QEMU passes it
in the Multiboot information, vmig writes it at CFG_CMDLINE.

Every working-set page the guest writes carries a stamp in its first 16 bytes:
``u64 STAMP_MAGIC | page_index`` then ``u64 generation``; the table holds the
generation the guest last wrote to each page (0 = never written, page must be
zero). vCPU i owns pages ``[i*n//ncpus, (i+1)*n//ncpus)`` of the working set.
"""

from __future__ import annotations

from vmig.units import GiB, MiB, align_up

PML4_GPA = 0x1000
PDPT_GPA = 0x2000
CONFIG_GPA = 0x3000
STATUS_GPA = 0x4000
MULTIBOOT_INFO_AREA = 0x9000  # QEMU's e820 map + MBI (hw/i386/multiboot.c), below ENTRY_BASE
ENTRY_BASE = 0xA000
ENTRY_STRIDE = 16
CODE_LIMIT = 0x10000
PD_GPA = 0x10000
STACK_TOP = 0x80000
STACK_SIZE = 0x2000
TABLE_GPA = 0x100000

MAX_CPUS = 16
MAX_MEMORY = 64 * GiB  # one page directory per GiB between PD_GPA and the stacks
MIN_MEMORY = 4 * MiB
LARGE_PAGE = 2 * MiB

STAMP_MAGIC = 0x564D_4947 << 32  # "VMIG" in the high half, page index in the low half
CONFIG_MAGIC = 0x3247_4643_474D_4956  # b"VMIGCFG2" little-endian (2: a command line)

# Config page: u64 fields at these offsets, then the command line (VMM writes, guest reads;
# booted by Multiboot, the guest fills it in itself from the Multiboot information).
CFG_MAGIC = 0x00
CFG_CHECK_REQUEST = 0x48  # the VMM bumps it to ask for a self-check
CFG_MULTIBOOT_INFO = 0x58  # address of the Multiboot information; 0 when vmig booted it
CFG_CMDLINE = 0x800  # NUL-terminated command line, at most CMDLINE_SIZE - 1 bytes
CMDLINE_SIZE = 0x800

# Multiboot (version 1).
MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_HEADER_FLAGS = 0x0001_0002  # memory information; address fields (a flat image)
MULTIBOOT_BOOT_MAGIC = 0x2BADB002  # in EAX at the Multiboot entry
MULTIBOOT_INFO_MEMORY = 0x1  # flags bit: mem_lower/mem_upper are valid
MULTIBOOT_INFO_CMDLINE = 0x4  # flags bit: cmdline is valid
MBI_FLAGS = 0x00
MBI_MEM_UPPER = 0x08  # KiB of RAM from 1 MiB up to the first hole
MBI_CMDLINE = 0x10
MULTIBOOT_MAP_GIBS = 4  # booted by Multiboot, the guest identity-maps the first 4 GiB

# Status page: per vCPU block of STATUS_STRIDE bytes, u64 fields (guest writes).
STATUS_STRIDE = 64
ST_STATE = 0x00
ST_HEARTBEAT = 0x08
ST_PAGES_WRITTEN = 0x10
ST_CHECK_DONE = 0x18  # equals CFG_CHECK_REQUEST once this vCPU's check is done
ST_CHECK_PAGES = 0x20
ST_CHECK_BAD = 0x28
ST_FIRST_BAD = 0x30  # working-set index of the first bad page, or all ones

# Values of ST_STATE.
CPU_STATE_OFF = 0
CPU_STATE_LONG_MODE = 1
CPU_STATE_FILLING = 2
CPU_STATE_RUNNING = 3

WORKLOAD_IDLE = 0
WORKLOAD_DIRTY = 1
ORDER_SEQUENTIAL = 0
ORDER_RANDOM = 1

# Port I/O.
SERIAL_PORT = 0x3F8  # 8250 UART, 8 registers
STATUS_PORT = 0x510  # u32 writes: (event << 8) | cpu
EVENT_BOOTED = 1
EVENT_CHECK_DONE = 2
EVENT_PANIC = 3


def entry_gpa(cpu: int) -> int:
    """Real-mode entry address of vCPU `cpu` (CS=0, IP=this)."""
    return ENTRY_BASE + cpu * ENTRY_STRIDE


def working_set_gpa(ws_pages: int) -> int:
    """Where the working set starts: after the generation table, 2 MiB aligned."""
    return align_up(TABLE_GPA + 4 * ws_pages, LARGE_PAGE)


def max_working_set_pages(memory_bytes: int) -> int:
    """The largest working set (in pages) that fits in `memory_bytes` of guest RAM."""
    pages = (memory_bytes - TABLE_GPA) // (4096 + 4)
    while pages > 0 and working_set_gpa(pages) + pages * 4096 > memory_bytes:
        pages -= 1
    return max(pages, 0)


def status_gpa(cpu: int) -> int:
    """Guest-physical address of vCPU `cpu`'s status block."""
    return STATUS_GPA + cpu * STATUS_STRIDE


def c_header() -> str:
    """The guest's `layout.h`, generated from the constants in this module."""
    lines = ["/* Generated from vmig/guest/layout.py by vmig/guest/build.py. Do not edit. */",
             "#pragma once"]
    for name, value in sorted(globals().items()):
        if name.isupper() and isinstance(value, int):
            lines.append(f"#define {name} 0x{value:x}")
    return "\n".join(lines) + "\n"
