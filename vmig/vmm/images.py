"""Boot images: detect a file's format and turn it into a plan of what goes where.

Pure parsing (bytes in, `BootPlan` out): nothing here touches guest memory or a
vCPU; `vmm.image_guest` writes a plan into a VM. Two formats, tried in this order:

- Multiboot v1: the magic 0x1BADB002 in the first 8192 bytes (`vmm.multiboot`).
- raw: the first 512 bytes end 0x55 0xAA (a boot sector); the whole file is loaded
  at 0x7c00 and may run up to the end of conventional memory (0xa0000).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

from vmig.config import BootFormat, VmConfig
from vmig.errors import ConfigError

__all__ = [
    "CONVENTIONAL_END",
    "RAW_LOAD_GPA",
    "BootPlan",
    "Segment",
    "parse_image",
    "plan_boot",
    "read_image",
]

RAW_LOAD_GPA = 0x7C00  #: where a PC BIOS puts a boot sector
RAW_BOOT_DRIVE = 0x80  #: DL at entry: the first hard disk
BOOT_SIGNATURE = b"\x55\xaa"  #: the last two bytes of a boot sector
SECTOR = 512
CONVENTIONAL_END = 0xA0000  #: end of conventional memory (640 KiB)
MAX_RAW_BYTES = CONVENTIONAL_END - RAW_LOAD_GPA
MAX_IMAGE_BYTES = 256 * 1024 * 1024  #: refuse to even read a bigger file


@dataclass(frozen=True)
class Segment:
    """`data` goes at `gpa`, followed by `zero_bytes` of zeros (an ELF segment's bss)."""

    gpa: int
    data: bytes
    zero_bytes: int = 0

    @property
    def end(self) -> int:
        return self.gpa + len(self.data) + self.zero_bytes


@dataclass(frozen=True)
class BootPlan:
    """What to load where, and where the vCPU starts (a real-mode address for raw
    images, the 32-bit entry point for Multiboot kernels)."""

    format: BootFormat
    segments: tuple[Segment, ...]
    entry: int
    sha256: str


def read_image(path: str) -> bytes:
    """The file's bytes; a ConfigError (the caller's path: a 4xx) if it cannot be read."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_IMAGE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"boot_image: cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise ConfigError(f"boot_image: {path} is larger than {MAX_IMAGE_BYTES >> 20} MiB")
    return data


def parse_image(data: bytes, memory_bytes: int) -> BootPlan:
    """Detect the format of `data` and plan its loading into `memory_bytes` of RAM."""
    from vmig.vmm.multiboot import parse_multiboot  # multiboot imports this module

    digest = hashlib.sha256(data).hexdigest()
    plan = parse_multiboot(data, memory_bytes, digest)
    if plan is not None:
        return plan
    if len(data) >= SECTOR and data[SECTOR - 2:SECTOR] == BOOT_SIGNATURE:
        return _raw_plan(data, digest)
    raise ConfigError("boot_image is neither a Multiboot kernel (no magic 0x1BADB002 in its "
                      "first 8192 bytes) nor a raw boot image (its first 512 bytes do not end "
                      "0x55 0xAA)")


def plan_boot(config: VmConfig) -> tuple[VmConfig, BootPlan]:
    """Read and parse the config's boot image (checking the command line too); the
    config gains the detected format and the file's sha256."""
    from vmig.vmm import multiboot

    assert config.boot_image is not None
    plan = parse_image(read_image(config.boot_image), config.memory_bytes)
    if plan.format is BootFormat.MULTIBOOT:
        multiboot.information(config.memory_bytes, config.boot_cmdline or "")
    return dataclasses.replace(config, boot_format=plan.format, boot_sha256=plan.sha256), plan


def _raw_plan(data: bytes, digest: str) -> BootPlan:
    if len(data) > MAX_RAW_BYTES:
        raise ConfigError(f"raw boot image is {len(data)} bytes: at most {MAX_RAW_BYTES} fit "
                          f"between {RAW_LOAD_GPA:#x} and the end of conventional memory at "
                          f"{CONVENTIONAL_END:#x}")
    return BootPlan(BootFormat.RAW, (Segment(RAW_LOAD_GPA, data),), RAW_LOAD_GPA, digest)
