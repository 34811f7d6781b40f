"""Assemble test guests at test time with GNU as/ld (through gcc, for the C preprocessor).

Sources live in tests/guests/ (`*.S`, GNU as syntax, preprocessed: `#define` and
`-D` work). Two builders, each returning the path of the image it wrote into
`tmp_path`:

- `build_raw(source, tmp_path)`: a raw boot image, linked at 0x7c00 as a flat binary.
  The source starts in `.code16` at its `_start` and puts the signature itself
  (`.org 510` then `.byte 0x55, 0xaa`); code after the first sector is allowed.
- `build_multiboot(source, tmp_path)`: an ELF32 Multiboot kernel, linked at 1 MiB.
  The source carries its Multiboot header (magic, flags, checksum) in its first
  8 KiB, in a section named `.multiboot` that the link puts first. `flat=True` writes
  a flat binary for the header's address fields instead.

`defines` become `-DNAME=VALUE`, so one source can build variants::

    image = build_raw("counter_boot.S", tmp_path, {"SWEEP_PAGES": 1024})
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

__all__ = ["GUESTS_DIR", "build_multiboot", "build_raw"]

GUESTS_DIR = Path(__file__).resolve().parent / "guests"
RAW_LOAD_ADDRESS = 0x7C00
MULTIBOOT_LOAD_ADDRESS = 0x100000
TOOL_TIMEOUT_S = 60

Defines = Mapping[str, int | str] | None


def build_raw(source: str | Path, tmp_path: Path, defines: Defines = None) -> Path:
    """Assemble `source` (a name in tests/guests, or a path) into a raw boot image."""
    obj = _assemble(source, tmp_path, defines)
    image = obj.with_suffix(".img")
    _run("ld", "-m", "elf_i386", f"-Ttext={RAW_LOAD_ADDRESS:#x}", "-e", "_start",
         "--oformat=binary", "-o", str(image), str(obj))
    return image


def build_multiboot(source: str | Path, tmp_path: Path, defines: Defines = None, *,
                    flat: bool = False) -> Path:
    """Assemble `source` into an ELF32 Multiboot kernel loaded at 1 MiB; with `flat`, a
    flat binary instead, which the loader places by the header's address fields (the
    source then sets flag bit 16 and fills them in from `image_start` / `image_end`)."""
    obj = _assemble(source, tmp_path, defines)
    kernel = obj.with_suffix(".bin" if flat else ".elf")
    script = tmp_path / "multiboot.ld"
    script.write_text(
        "ENTRY(_start)\nSECTIONS {\n"
        f"  . = {MULTIBOOT_LOAD_ADDRESS:#x};\n"
        "  image_start = .;\n"
        "  .text : { *(.multiboot) *(.text*) *(.rodata*) }\n"
        "  .data : { *(.data*) }\n"
        "  .bss : { *(.bss*) *(COMMON) }\n"
        "  image_end = .;\n"
        "}\n")
    output = ["--oformat=binary"] if flat else []
    _run("ld", "-m", "elf_i386", "-n", "-T", str(script), *output, "-o", str(kernel),
         str(obj))
    return kernel


def _assemble(source: str | Path, tmp_path: Path, defines: Defines) -> Path:
    path = Path(source)
    if not path.is_absolute():
        path = GUESTS_DIR / path
    flags = [f"-D{name}={value}" for name, value in (defines or {}).items()]
    obj = tmp_path / (path.stem + ".o")
    _run("gcc", "-m32", "-c", "-nostdlib", "-ffreestanding", *flags, "-o", str(obj), str(path))
    return obj


def _run(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr}")
