"""Sizes: parsing user-given sizes and page arithmetic. Pure helpers."""

from __future__ import annotations

import re

from vmig.errors import ConfigError

PAGE_SIZE = 4096
PAGE_SHIFT = 12
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_SUFFIXES = {"": 1, "B": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int, what: str = "size") -> int:
    """Parse '256M', '1G', '4096', '1.5GiB' into bytes; raise ConfigError naming `what`."""
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"bad {what} {text}: must not be negative")
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ConfigError(
            f"bad {what} {text!r}: expected a number with an optional K, M, G or T suffix"
        )
    number, suffix = match.groups()
    return int(float(number) * _SUFFIXES[suffix.upper()])


def format_size(nbytes: int | float) -> str:
    """Render a byte count for humans: 268435456 -> '256 MiB'."""
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(nbytes) >= scale:
            value = nbytes / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{int(nbytes)} B"


def format_rate(bytes_per_s: float | None) -> str:
    """Decimal units, as network rates and the QEMU baselines are given: '2.41 GB/s'."""
    if not bytes_per_s:
        return "-"
    if bytes_per_s >= 1e9:
        return f"{bytes_per_s / 1e9:.2f} GB/s"
    return f"{bytes_per_s / 1e6:.0f} MB/s"


def align_up(value: int, alignment: int) -> int:
    """Round `value` up to a multiple of `alignment` (a power of two)."""
    return (value + alignment - 1) & ~(alignment - 1)


def align_down(value: int, alignment: int) -> int:
    """Round `value` down to a multiple of `alignment` (a power of two)."""
    return value & ~(alignment - 1)


def page_count(nbytes: int) -> int:
    """Number of 4 KiB pages needed to hold `nbytes`."""
    return (nbytes + PAGE_SIZE - 1) >> PAGE_SHIFT
