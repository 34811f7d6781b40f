"""The guest's command line: how vmig and a Multiboot loader hand the guest its parameters.

Syntax: words separated by spaces, each ``key=value``::

    cpus=1 workload=dirty order=random dirty_rate=20000 working_set=64M seed=24301 tsc_khz=2100000

- ``cpus``: vCPUs sharing the working set (booted by Multiboot: must be 1);
- ``workload``: ``idle`` or ``dirty``; ``order``: ``sequential`` or ``random``;
- ``dirty_rate``: pages per second over all vCPUs, 0 = as fast as it can;
- ``working_set``: bytes, a multiple of 4 KiB, with an optional K, M or G suffix (KiB, MiB,
  GiB); the generation table and the working set go where `layout.working_set_gpa` says;
- ``seed``: the random order's seed; ``tsc_khz``: the TSC frequency the pacing assumes
  (needed when ``dirty_rate`` is not 0);
- numbers are decimal or ``0x`` hexadecimal.

A key left out takes VmConfig's default (`c_defaults`, written into the guest's
layout.h). Words without ``=``, and words whose part before ``=`` contains ``/``, are
skipped: QEMU and GRUB put the kernel's path first. Any other key stops the guest with
a panic naming it, as does a bad value. The guest parses this in guest.c; `render` is
the one place that writes it.
"""

from __future__ import annotations

from vmig.config import DirtyOrder, VmConfig, Workload
from vmig.errors import GuestError
from vmig.guest import layout
from vmig.units import GiB, KiB, MiB

__all__ = ["c_defaults", "render"]

_SUFFIXES = (("G", GiB), ("M", MiB), ("K", KiB))


def _size(value: int) -> str:
    """`value` bytes with the largest suffix that divides it exactly (64M, not 67108864)."""
    for suffix, unit in _SUFFIXES:
        if value and value % unit == 0:
            return f"{value // unit}{suffix}"
    return str(value)


def render(config: VmConfig, tsc_khz: int) -> str:
    """The command line that makes the guest run `config`'s workload (TSC at `tsc_khz`)."""
    words = {
        "cpus": str(config.cpus),
        "workload": config.workload.value,
        "order": config.order.value,
        "dirty_rate": str(config.dirty_rate),
        "working_set": _size(config.working_set_bytes),
        "seed": str(config.seed),
        "tsc_khz": str(tsc_khz),
    }
    text = " ".join(f"{key}={value}" for key, value in words.items())
    if len(text) >= layout.CMDLINE_SIZE:
        raise GuestError(f"guest command line is {len(text)} bytes; at most "
                         f"{layout.CMDLINE_SIZE - 1} fit")
    return text


def c_defaults() -> str:
    """C #defines of the value each key takes when the command line leaves it out."""
    default = VmConfig()
    values = {
        "CPUS": default.cpus,
        "WORKLOAD": (layout.WORKLOAD_DIRTY if default.workload is Workload.DIRTY
                     else layout.WORKLOAD_IDLE),
        "ORDER": (layout.ORDER_RANDOM if default.order is DirtyOrder.RANDOM
                  else layout.ORDER_SEQUENTIAL),
        "DIRTY_RATE": default.dirty_rate,
        "WORKING_SET": default.working_set_bytes,
        "SEED": default.seed,
        "TSC_KHZ": 0,
    }
    return "".join(f"#define DEFAULT_{name} 0x{value:x}ULL\n" for name, value in values.items())
