"""Multiboot v1 kernels: header and ELF32 parsing, the information structure, the trampoline.

Pure: bytes in, bytes and plans out. The VMM places, in low guest memory that no
kernel may load into (RESERVED_START..RESERVED_END):

- TRAMPOLINE_GPA: 16-bit code that the vCPU starts at in real mode (this KVM, PVM,
  cannot be handed protected-mode segment state directly). It loads a flat GDT, sets
  CR0.PE, far-jumps to its own 32-bit part, loads flat data segments and enters the
  kernel with EAX = 0x2BADB002 and EBX = MBI_GPA, as the Multiboot spec says.
- MBI_GPA: the Multiboot information (mem_lower/mem_upper, memory map, command line,
  boot loader name).
"""

from __future__ import annotations

import struct

from vmig.config import BootFormat
from vmig.errors import ConfigError
from vmig.units import MiB
from vmig.vmm.images import CONVENTIONAL_END, BootPlan, Segment

__all__ = [
    "BOOTLOADER_MAGIC",
    "HEADER_MAGIC",
    "MBI_GPA",
    "RESERVED_END",
    "RESERVED_START",
    "TRAMPOLINE_GPA",
    "information",
    "parse_multiboot",
    "trampoline",
]

HEADER_MAGIC = 0x1BADB002  #: in the kernel's header
BOOTLOADER_MAGIC = 0x2BADB002  #: in EAX at the kernel's entry
HEADER_SEARCH = 8192  #: the header lies 4-aligned within the file's first 8 KiB
TRAMPOLINE_GPA = 0x6000
GDT_GPA = TRAMPOLINE_GPA + 0x80
GDTR_GPA = TRAMPOLINE_GPA + 0xA0
MBI_GPA = 0x7000
MMAP_GPA = MBI_GPA + 0x100
LOADER_NAME_GPA = MBI_GPA + 0x180
CMDLINE_GPA = MBI_GPA + 0x200
RESERVED_START = TRAMPOLINE_GPA
RESERVED_END = 0x8000
MAX_CMDLINE = RESERVED_END - CMDLINE_GPA - 1  #: bytes, without the terminating NUL
LOADER_NAME = b"vmig\0"

# Header flags. Bits 0-15 are requirements: a loader must refuse one it cannot meet.
FLAG_PAGE_ALIGN = 1 << 0  #: align modules on 4 KiB: met trivially (there are no modules)
FLAG_MEMORY_INFO = 1 << 1  #: mem_* and the memory map: given
FLAG_ADDRESS_FIELDS = 1 << 16  #: load by the header's address fields, not by ELF
SUPPORTED_REQUIRED = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO
REQUIRED_NAMES = {2: "video mode information"}

# Information flags: which MBI fields are valid.
INFO_MEMORY = 1 << 0
INFO_CMDLINE = 1 << 2
INFO_MMAP = 1 << 6
INFO_LOADER_NAME = 1 << 9
MMAP_AVAILABLE = 1
MMAP_RESERVED = 2
HIGH_MEMORY = 1 * MiB

ELF_MAGIC = b"\x7fELF"
ELFCLASS32 = 1
ELFDATA2LSB = 1
EM_386 = 3
PT_LOAD = 1


def parse_multiboot(data: bytes, memory_bytes: int, digest: str) -> BootPlan | None:
    """A plan for the Multiboot kernel in `data`, or None if it has no Multiboot header."""
    offset = _find_header(data)
    if offset is None:
        return None
    magic, flags, checksum = struct.unpack_from("<III", data, offset)
    if (magic + flags + checksum) & 0xFFFFFFFF:
        raise ConfigError(f"Multiboot header at offset {offset:#x} has a bad checksum "
                          f"{checksum:#010x} (magic + flags + checksum must be 0 mod 2^32)")
    unsupported = flags & 0xFFFF & ~SUPPORTED_REQUIRED
    if unsupported:
        bits = [i for i in range(16) if unsupported >> i & 1]
        names = ", ".join(f"bit {i} ({REQUIRED_NAMES.get(i, 'unknown')})" for i in bits)
        raise ConfigError(f"Multiboot kernel requires what the VMM does not offer: {names}")
    if flags & FLAG_ADDRESS_FIELDS:
        segments, entry = _by_address_fields(data, offset)
    else:
        segments, entry = _by_elf(data)
    _check_placement(segments, memory_bytes)
    return BootPlan(BootFormat.MULTIBOOT, tuple(segments), entry, digest)


def _find_header(data: bytes) -> int | None:
    limit = min(len(data), HEADER_SEARCH) - 12
    for offset in range(0, limit + 1, 4):
        if struct.unpack_from("<I", data, offset)[0] == HEADER_MAGIC:
            return offset
    return None


def _by_address_fields(data: bytes, offset: int) -> tuple[list[Segment], int]:
    if offset + 32 > len(data):
        raise ConfigError("Multiboot header is cut short: flag bit 16 needs its address fields")
    header_addr, load_addr, load_end, bss_end, entry = struct.unpack_from("<5I", data,
                                                                          offset + 12)
    start = offset - (header_addr - load_addr)
    if load_addr > header_addr or start < 0:
        raise ConfigError(f"Multiboot address fields are inconsistent: load_addr "
                          f"{load_addr:#x}, header_addr {header_addr:#x} at offset {offset:#x}")
    length = len(data) - start if load_end == 0 else load_end - load_addr
    if not 0 < length <= len(data) - start:
        raise ConfigError(f"Multiboot load_end_addr {load_end:#x} lies outside the file")
    zero = 0 if bss_end == 0 else bss_end - (load_addr + length)
    if zero < 0:
        raise ConfigError(f"Multiboot bss_end_addr {bss_end:#x} is below load_end_addr")
    return [Segment(load_addr, data[start:start + length], zero)], entry


def _by_elf(data: bytes) -> tuple[list[Segment], int]:
    if data[:4] != ELF_MAGIC:
        raise ConfigError("Multiboot kernel is not ELF and its header has no address fields "
                          "(flag bit 16): nothing says where to load it")
    if data[4] != ELFCLASS32 or data[5] != ELFDATA2LSB:
        raise ConfigError("Multiboot kernel is not a little-endian ELF32 file (Multiboot v1 "
                          "loads 32-bit kernels)")
    machine, = struct.unpack_from("<H", data, 18)
    if machine != EM_386:
        raise ConfigError(f"Multiboot kernel is ELF for machine {machine}, not i386 (3)")
    entry, phoff = struct.unpack_from("<II", data, 24)
    phentsize, phnum = struct.unpack_from("<HH", data, 42)
    segments: list[Segment] = []
    for index in range(phnum):
        at = phoff + index * phentsize
        if at + 32 > len(data):
            raise ConfigError(f"Multiboot kernel's program header {index} lies outside the file")
        p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from("<6I", data, at)
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_offset + p_filesz > len(data) or p_filesz > p_memsz:
            raise ConfigError(f"Multiboot kernel's segment {index} lies outside the file")
        segments.append(Segment(p_paddr, data[p_offset:p_offset + p_filesz], p_memsz - p_filesz))
        if p_vaddr <= entry < p_vaddr + p_memsz:  # entry is virtual: where is it loaded?
            entry = entry - p_vaddr + p_paddr
    if not segments:
        raise ConfigError("Multiboot kernel has no loadable (PT_LOAD) segment")
    return segments, entry


def _check_placement(segments: list[Segment], memory_bytes: int) -> None:
    for segment in segments:
        where = f"Multiboot segment {segment.gpa:#x}-{segment.end:#x}"
        if segment.end > memory_bytes:
            raise ConfigError(f"{where} does not fit in {memory_bytes >> 20} MiB of guest memory")
        if segment.gpa < RESERVED_END and segment.end > RESERVED_START:
            raise ConfigError(f"{where} overlaps the VMM's trampoline and Multiboot information "
                              f"at {RESERVED_START:#x}-{RESERVED_END:#x}")


def information(memory_bytes: int, cmdline: str) -> list[tuple[int, bytes]]:
    """The Multiboot information and what it points to, as (gpa, bytes) pieces."""
    command = cmdline.encode()
    if len(command) > MAX_CMDLINE or b"\0" in command:
        raise ConfigError(f"boot_cmdline is {len(command)} bytes; at most {MAX_CMDLINE}, "
                          "without NUL bytes")
    regions = [(0, CONVENTIONAL_END, MMAP_AVAILABLE),
               # RAM too, but where a PC has its video memory and ROMs: kernels expect a hole.
               (CONVENTIONAL_END, HIGH_MEMORY - CONVENTIONAL_END, MMAP_RESERVED),
               (HIGH_MEMORY, memory_bytes - HIGH_MEMORY, MMAP_AVAILABLE)]
    mmap = b"".join(struct.pack("<IQQI", 20, base, length, kind)
                    for base, length, kind in regions)
    info = bytearray(128)
    struct.pack_into("<III", info, 0, INFO_MEMORY | INFO_CMDLINE | INFO_MMAP | INFO_LOADER_NAME,
                     CONVENTIONAL_END // 1024, (memory_bytes - HIGH_MEMORY) // 1024)
    struct.pack_into("<I", info, 16, CMDLINE_GPA)
    struct.pack_into("<II", info, 44, len(mmap), MMAP_GPA)
    struct.pack_into("<I", info, 64, LOADER_NAME_GPA)
    return [(MBI_GPA, bytes(info)), (MMAP_GPA, mmap), (LOADER_NAME_GPA, LOADER_NAME),
            (CMDLINE_GPA, command + b"\0")]


def trampoline(entry: int) -> list[tuple[int, bytes]]:
    """Real-mode code + GDT that enter `entry` in 32-bit protected mode, as (gpa, bytes)."""
    pm32 = TRAMPOLINE_GPA + 0x20  # the 32-bit part starts here
    code16 = b"".join((
        b"\xfa",                                    # cli
        b"\x31\xc0",                                # xor ax, ax
        b"\x8e\xd8",                                # mov ds, ax      (lgdt reads DS:disp16)
        b"\x0f\x01\x16" + struct.pack("<H", GDTR_GPA),  # lgdt [GDTR_GPA]
        b"\x0f\x20\xc0",                            # mov eax, cr0
        b"\x0c\x01",                                # or al, 1        (CR0.PE)
        b"\x0f\x22\xc0",                            # mov cr0, eax
        b"\x66\xea" + struct.pack("<IH", pm32, 0x08),  # jmp dword 0x08:pm32
    ))
    code32 = b"".join((
        b"\xb8\x10\x00\x00\x00",                    # mov eax, 0x10   (flat data selector)
        b"\x8e\xd8\x8e\xc0\x8e\xe0\x8e\xe8\x8e\xd0",  # mov ds/es/fs/gs/ss, ax
        b"\xbc" + struct.pack("<I", TRAMPOLINE_GPA),  # mov esp, TRAMPOLINE_GPA (grows down)
        b"\xb8" + struct.pack("<I", BOOTLOADER_MAGIC),  # mov eax, 0x2BADB002
        b"\xbb" + struct.pack("<I", MBI_GPA),       # mov ebx, MBI_GPA
        b"\xea" + struct.pack("<IH", entry, 0x08),  # jmp 0x08:entry
    ))
    assert len(code16) <= pm32 - TRAMPOLINE_GPA and len(code32) <= GDT_GPA - pm32
    gdt = struct.pack("<QQQ", 0,
                      0x00CF9A000000FFFF,   # 0x08: code, base 0, limit 4 GiB, 32-bit, r/x
                      0x00CF92000000FFFF)   # 0x10: data, base 0, limit 4 GiB, r/w
    gdtr = struct.pack("<HI", len(gdt) - 1, GDT_GPA)
    return [(TRAMPOLINE_GPA, code16), (pm32, code32), (GDT_GPA, gdt), (GDTR_GPA, gdtr)]
