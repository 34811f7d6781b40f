"""User-facing VM configuration: plain, validated, serialisable data (no live objects)."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

from vmig.errors import ConfigError
from vmig.guest import layout
from vmig.units import PAGE_SIZE, MiB, format_size, parse_size


class Workload(enum.StrEnum):
    """What the guest does after it has stamped its working set once."""

    IDLE = "idle"  #: halts; wakes every few milliseconds to beat and serve checks
    DIRTY = "dirty"  #: rewrites working-set pages at `dirty_rate` pages per second


class DirtyOrder(enum.StrEnum):
    """In which order the dirty workload walks its pages."""

    SEQUENTIAL = "sequential"
    RANDOM = "random"


DEFAULT_MEMORY = 256 * MiB
DEFAULT_WORKING_SET = 64 * MiB
DEFAULT_DIRTY_RATE = 10_000  # pages/s: 40 MB/s, well within one loopback connection
DEFAULT_ORDER = "random"
DEFAULT_SEED = 0x5EED

#: The fields of the configuration vmig wrote before boot images (CONFIG and state
#: version 1, as db2c624 reads them): a version-1 peer knows these and no others.
V1_FIELDS = ("memory_bytes", "cpus", "workload", "working_set_bytes", "dirty_rate", "order",
             "seed", "memory_file", "serial_log")

#: The fields that only vmig's own guest reads (from its config page); an image guest has
#: none of them, so giving one with a boot image is an error.
OWN_GUEST_FIELDS = ("workload", "working_set", "dirty_rate", "order", "seed")

# One description per boot field, used by the API model and the CLI's help.
BOOT_IMAGE_HELP = ("Boot this file instead of vmig's own guest: a raw image (its first 512 "
                   "bytes end 0x55 0xAA; loaded at 0x7c00, entered in real mode) or a "
                   "Multiboot v1 kernel. The VMM reads it once, at boot; snapshots and "
                   "migrations carry the guest's memory, not the file.")
BOOT_CMDLINE_HELP = "Command line handed to a Multiboot kernel (needs a boot image)."


class BootFormat(enum.StrEnum):
    """What kind of boot image a VM was started from (detected from the file)."""

    RAW = "raw"  #: a boot sector (and what follows it), real mode at 0000:7c00
    MULTIBOOT = "multiboot"  #: a Multiboot v1 kernel, 32-bit protected mode


@dataclass(frozen=True)
class VmConfig:
    """What to build: memory, vCPUs and the guest's workload."""

    memory_bytes: int = DEFAULT_MEMORY
    cpus: int = 1
    workload: Workload = Workload.IDLE
    working_set_bytes: int = DEFAULT_WORKING_SET
    dirty_rate: int = DEFAULT_DIRTY_RATE
    order: DirtyOrder = DirtyOrder.RANDOM
    seed: int = DEFAULT_SEED
    memory_file: str | None = None
    serial_log: str | None = None
    #: A guest vmig did not build: the image's path as given at boot (for the record: a
    #: restore or a migration never reads it), its detected format and its sha256 (hex).
    boot_image: str | None = None
    boot_format: BootFormat | None = None
    boot_sha256: str | None = None
    boot_cmdline: str | None = None

    @classmethod
    def build(cls, *, memory: str | int = DEFAULT_MEMORY, cpus: int = 1,
              workload: str | None = None, working_set: str | int | None = None,
              dirty_rate: int | None = None, order: str | None = None, seed: int | None = None,
              memory_file: str | None = None, serial_log: str | None = None,
              boot_image: str | None = None, boot_cmdline: str | None = None) -> VmConfig:
        """Parse user-given strings and validate; raise ConfigError naming the bad field.

        None means "not given" (the default). With `boot_image` the own-guest fields
        (OWN_GUEST_FIELDS) must not be given; the format and digest are filled in when
        the VMM loads the image.
        """
        given = {"workload": workload, "working_set": working_set, "dirty_rate": dirty_rate,
                 "order": order, "seed": seed}
        if boot_image is not None:
            named = [name for name, value in given.items() if value is not None]
            if named:
                raise ConfigError(f"{named[0]} does not apply to a boot image: only vmig's own "
                                  "guest has a workload, working set, dirty rate, order and seed")
        elif boot_cmdline is not None:
            raise ConfigError("boot_cmdline needs boot_image (vmig's own guest takes no "
                              "command line)")
        workload = "idle" if workload is None else workload
        order = DEFAULT_ORDER if order is None else order
        dirty_rate = DEFAULT_DIRTY_RATE if dirty_rate is None else dirty_rate
        seed = DEFAULT_SEED if seed is None else seed
        memory_bytes = parse_size(memory, "memory size")
        if working_set is None:
            ws_bytes = min(DEFAULT_WORKING_SET, layout.max_working_set_pages(memory_bytes)
                           * PAGE_SIZE)
        else:
            ws_bytes = parse_size(working_set, "working set size")
        try:
            workload_value = Workload(workload)
        except ValueError:
            raise ConfigError(f"bad workload {workload!r}: expected 'idle' or 'dirty'") from None
        try:
            order_value = DirtyOrder(order)
        except ValueError:
            raise ConfigError(f"bad order {order!r}: expected 'sequential' or 'random'") from None
        config = cls(memory_bytes=memory_bytes, cpus=cpus, workload=workload_value,
                     working_set_bytes=ws_bytes, dirty_rate=dirty_rate, order=order_value,
                     seed=seed, memory_file=memory_file, serial_log=serial_log,
                     boot_image=boot_image, boot_cmdline=boot_cmdline)
        config.validate()
        return config

    @property
    def is_image_guest(self) -> bool:
        """True for a guest booted from a boot image (not vmig's own)."""
        return self.boot_image is not None

    def validate(self) -> None:
        """Raise ConfigError if this configuration cannot be built."""
        if self.memory_bytes % (2 * MiB):
            raise ConfigError(f"bad memory size {self.memory_bytes}: must be a multiple of 2 MiB")
        if not layout.MIN_MEMORY <= self.memory_bytes <= layout.MAX_MEMORY:
            raise ConfigError(
                f"bad memory size {format_size(self.memory_bytes)}: must be between "
                f"{format_size(layout.MIN_MEMORY)} and {format_size(layout.MAX_MEMORY)}"
            )
        if not 1 <= self.cpus <= layout.MAX_CPUS:
            raise ConfigError(f"bad cpus {self.cpus}: must be between 1 and {layout.MAX_CPUS}")
        if self.is_image_guest:
            if self.cpus != 1:  # no INIT/SIPI or APIC: nothing would start the other vCPUs
                raise ConfigError(f"bad cpus {self.cpus}: a boot image runs on 1 vCPU (the VMM "
                                  "has no APIC to start application processors)")
            return  # the rest describes vmig's own guest
        if self.working_set_bytes % PAGE_SIZE or self.working_set_bytes <= 0:
            raise ConfigError(
                f"bad working set {self.working_set_bytes}: must be a positive multiple of 4 KiB"
            )
        max_ws = layout.max_working_set_pages(self.memory_bytes) * PAGE_SIZE
        if self.working_set_bytes > max_ws:
            raise ConfigError(
                f"working set {format_size(self.working_set_bytes)} does not fit in "
                f"{format_size(self.memory_bytes)} of guest memory (at most {format_size(max_ws)})"
            )
        if self.dirty_rate < 0:
            raise ConfigError(f"bad dirty rate {self.dirty_rate}: must be >= 0 pages per second")

    @property
    def working_set_pages(self) -> int:
        return self.working_set_bytes // PAGE_SIZE

    @property
    def working_set_gpa(self) -> int:
        return layout.working_set_gpa(self.working_set_pages)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (enums as their values)."""
        data = dataclasses.asdict(self)
        data["workload"] = self.workload.value
        data["order"] = self.order.value
        data["boot_format"] = None if self.boot_format is None else self.boot_format.value
        return data

    def to_v1_dict(self) -> dict[str, Any]:
        """The form version 1 (vmig before boot images) wrote: V1_FIELDS only.

        A field version 1 did not have is left out while it holds its default; one that
        does not (a boot image, say) is a ConfigError naming it, since a version-1 peer
        would drop it and build another guest.
        """
        data = self.to_dict()
        for item in dataclasses.fields(self):
            if item.name not in V1_FIELDS and getattr(self, item.name) != item.default:
                raise ConfigError(
                    f"{item.name} cannot be expressed in configuration version 1 (vmig before "
                    f"boot images, which runs only its own guest): it is "
                    f"{data[item.name]!r}")
        return {name: data[name] for name in V1_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VmConfig:
        """Inverse of `to_dict` (and of `to_v1_dict`); validates."""
        try:
            fields = {f.name for f in dataclasses.fields(cls)}
            config = cls(**{k: v for k, v in data.items() if k in fields})
            boot_format = None if config.boot_format is None else BootFormat(config.boot_format)
            config = dataclasses.replace(config, workload=Workload(config.workload),
                                         order=DirtyOrder(config.order), boot_format=boot_format)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad VM configuration: {exc}") from None
        config.validate()
        return config
