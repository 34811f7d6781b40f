"""Dirty tracking at scale: KVM's dirty ring against KVM_GET_DIRTY_LOG, per pass.

    .venv/bin/python benchmarks/dirty_tracking.py [--guest-gib 64] [--rates 1000,10000,...]
        [--repeat 5] [--ring-bytes 1048576] [--output docs/results/dirty-tracking.json]
        [--chart docs/images/dirty-tracking.png]

A large, sparsely dirtied guest: a memfd of --guest-gib (mostly holes) as one KVM memory
slot with KVM_MEM_LOG_DIRTY_PAGES, in two VMs that map the same memfd, one vCPU each:

- "bitmap": the VM vmig uses today. A pass is KVM_GET_DIRTY_LOG (which also
  write-protects the pages again) and `RangeTable.from_bitmap`.
- "ring": a VM with KVM_CAP_DIRTY_LOG_RING(_ACQ_REL) enabled before its vCPU was created,
  the vCPU's ring (--ring-bytes, 16 bytes an entry) mapped at KVM_DIRTY_LOG_PAGE_OFFSET.
  A harvest reads the entries KVM marked DIRTY from where the last one stopped, marks
  them RESET, and calls KVM_RESET_DIRTY_RINGS (which write-protects those pages again);
  the pass's gfns become ranges with `RangeTable.from_pages` (sorted, merged).

The dirtying is done by the guest: a 64-bit stub (identity-mapped with 2 MiB pages whose
accessed and dirty bits are preset, so the walk writes nothing) writes one byte to each
page of a list of random distinct pages, then HLTs. With the ring the guest stops every
half ring of pages for a harvest (see `Tracker.dirty`: on this kernel a vCPU that fills
the ring in one go overruns it); a KVM_EXIT_DIRTY_RING_FULL would be harvested too
(timed as part of the pass) and is counted. Every rate gets two untimed warm-up passes
(the first write to a hole allocates its page), then --repeat passes of each method in
turn; after a rate its pages are punched out of the memfd again. Writes JSON (medians,
min and max of the repeats), a chart and prints a markdown table.

Cost on these machines: a guest write to a write-protected page takes ~5 us, so the
default run (up to 1,000,000 pages, 5 repeats) takes about 2 minutes and allocates 4 GiB
of the memfd at its largest rate.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vmig.kvm import bindings as b
from vmig.kvm._ioctl import ioctl
from vmig.kvm.system import Kvm
from vmig.kvm.vcpu import Vcpu
from vmig.kvm.vm import Vm
from vmig.ranges import RangeTable
from vmig.units import PAGE_SIZE, GiB, MiB

ROOT = Path(__file__).resolve().parent.parent
SLOT = 0
# Guest layout (identity-mapped): code, page tables, the page list, then the pages.
CODE_GPA = 0x1000
PML4_GPA = 0x2000
PDPT_GPA = 0x3000
PD_GPA = 0x4000
LIST_GPA = 4 * MiB  # after the page directories of up to 512 GiB (2 MiB)
FIRST_TARGET_PAGE = 24 * MiB // PAGE_SIZE  # after a list of up to 2.6 M pages
# mov rax,[rsi]; mov byte [rax],1; add rsi,8; dec rcx; jnz -15; hlt
GUEST_CODE = bytes.fromhex("488b06" "c60001" "4883c608" "48ffc9" "75f1" "f4")
PTE_PRESENT_RW_ACCESSED = 0x23
PDE_2M = 0x80 | 0x40 | PTE_PRESENT_RW_ACCESSED  # PS, dirty, accessed, RW, present
CR0_PE, CR0_ET, CR0_NE, CR0_PG = 1, 0x10, 0x20, 1 << 31
CR4_PAE = 0x20
EFER_LME, EFER_LMA = 0x100, 0x400
DIRTY_GFN = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])


# --- the guest ---------------------------------------------------------------------------


class GuestRam:
    """A memfd of `size` bytes mapped shared, with the stub and its page tables written."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("vmig-dirty-tracking", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.map[CODE_GPA:CODE_GPA + len(GUEST_CODE)] = GUEST_CODE
        gib = (size + GiB - 1) // GiB
        if gib > 512:
            raise ValueError("one PDPT maps at most 512 GiB")
        self._u64(PML4_GPA, 1)[0] = PDPT_GPA | PTE_PRESENT_RW_ACCESSED
        pd_pages = np.arange(gib, dtype=np.uint64) * np.uint64(PAGE_SIZE) + np.uint64(PD_GPA)
        self._u64(PDPT_GPA, gib)[:] = pd_pages | np.uint64(PTE_PRESENT_RW_ACCESSED)
        large = np.arange(gib * 512, dtype=np.uint64) * np.uint64(2 * MiB)
        self._u64(PD_GPA, gib * 512)[:] = large | np.uint64(PDE_2M)
        if PD_GPA + gib * PAGE_SIZE > LIST_GPA:
            raise ValueError("page tables run into the page list")

    def _u64(self, gpa: int, count: int) -> np.ndarray:
        return np.frombuffer(self.map, dtype="<u8", count=count, offset=gpa)

    def write_list(self, pages: np.ndarray) -> None:
        """The guest-physical addresses the stub writes to, in this order."""
        self._u64(LIST_GPA, pages.size)[:] = pages.astype(np.uint64) * np.uint64(PAGE_SIZE)

    def punch(self) -> None:
        """Give the target pages back (MADV_REMOVE punches them out of the memfd)."""
        start = FIRST_TARGET_PAGE * PAGE_SIZE
        self.map.madvise(mmap.MADV_REMOVE, start, self.size - start)

    @property
    def target_pages(self) -> int:
        return self.size // PAGE_SIZE - FIRST_TARGET_PAGE


def long_mode(vcpu: Vcpu, kvm: Kvm) -> None:
    """CPUID as KVM offers it, then 64-bit mode on the identity map at PML4_GPA."""
    vcpu.set_cpuid2(kvm.supported_cpuid())
    sregs = vcpu.get_sregs()
    for name in ("ds", "es", "fs", "gs", "ss"):
        seg = getattr(sregs, name)
        seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, 0x10, 3
        seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g = 1, 0, 1, 1, 0, 1
    cs = sregs.cs
    cs.base, cs.limit, cs.selector, cs.type = 0, 0xFFFFFFFF, 0x8, 11
    cs.present, cs.dpl, cs.db, cs.s, cs.l, cs.g = 1, 0, 0, 1, 1, 1
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG
    sregs.cr3 = PML4_GPA
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)


def start_stub(vcpu: Vcpu, first: int, count: int) -> None:
    """Point the vCPU at the stub, to write listed pages ``first .. first + count - 1``."""
    regs = b.kvm_regs()
    regs.rip, regs.rsi, regs.rcx, regs.rflags = CODE_GPA, LIST_GPA + 8 * first, count, 0x2
    vcpu.set_regs(regs)


# --- the two methods -----------------------------------------------------------------------


class DirtyRing:
    """One vCPU's dirty ring: harvest the entries KVM published since the last harvest."""

    def __init__(self, vm: Vm, vcpu: Vcpu, ring_bytes: int) -> None:
        self._vm_fd = vm.fd
        self._map = mmap.mmap(vcpu.fd, ring_bytes, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE,
                              offset=b.KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE)
        self._ring = np.frombuffer(self._map, dtype=DIRTY_GFN)
        self.entries = self._ring.size
        self._fetch = 0  # index of the next entry to read, modulo entries
        self.reset_seconds = 0.0  # in KVM_RESET_DIRTY_RINGS, all harvests together

    def harvest(self) -> np.ndarray:
        """The gfns (slot offsets) dirtied since the last harvest, in ring order.

        KVM publishes entries in ring order from where the last harvest stopped, so
        normally the DIRTY flags are one run from the fetch index on. But a vCPU that
        runs past the ring's soft limit makes KVM wrap and overwrite unread entries (its
        "should never get full" warning): then the run starts later, and this takes every
        DIRTY entry, in ring order from the fetch index, and goes on after the last one.
        (x86 keeps loads in order: flags, then offsets; stores after loads.)
        """
        flags = self._ring["flags"]
        taken = np.flatnonzero(flags & b.KVM_DIRTY_GFN_F_DIRTY)
        if taken.size == 0:
            return np.zeros(0, dtype=np.uint64)
        split = int(np.searchsorted(taken, self._fetch))
        if split:
            taken = np.concatenate((taken[split:], taken[:split]))
        gfns = self._ring["offset"].take(taken)
        flags[taken] = b.KVM_DIRTY_GFN_F_RESET
        self._fetch = (int(taken[-1]) + 1) % self.entries
        began = time.perf_counter()
        ioctl(self._vm_fd, b.KVM_RESET_DIRTY_RINGS, 0, name="KVM_RESET_DIRTY_RINGS")
        self.reset_seconds += time.perf_counter() - began
        return gfns

    def close(self) -> None:
        self._ring = np.zeros(0, dtype=DIRTY_GFN)
        self._map.close()


def enable_ring(kvm: Kvm, vm: Vm, ring_bytes: int) -> str:
    """Switch on the dirty ring (before any vCPU exists); the capability's name."""
    for cap in (b.Cap.DIRTY_LOG_RING_ACQ_REL, b.Cap.DIRTY_LOG_RING):
        limit = kvm.check_extension(cap)
        if limit:
            if ring_bytes > limit:
                raise SystemExit(f"--ring-bytes {ring_bytes} is over KVM's {limit}")
            enable = b.kvm_enable_cap(cap=cap)
            enable.args[0] = ring_bytes
            ioctl(vm.fd, b.KVM_ENABLE_CAP, enable, name="KVM_ENABLE_CAP")
            return cap.name
    raise SystemExit("this KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING)")


class Tracker:
    """A VM with one vCPU over the shared memfd, and one way to collect its dirty pages."""

    def __init__(self, kvm: Kvm, ram: GuestRam, method: str, ring_bytes: int) -> None:
        self.method = method
        self.vm = kvm.create_vm()
        self.capability = enable_ring(kvm, self.vm, ring_bytes) if method == "ring" else None
        self.vm.set_user_memory_region(SLOT, 0, ram.size, ram.addr, log_dirty=True)
        self.vcpu = self.vm.create_vcpu(0)
        long_mode(self.vcpu, kvm)
        self.ring = DirtyRing(self.vm, self.vcpu, ring_bytes) if method == "ring" else None

    def dirty(self, count: int) -> dict[str, float]:
        """One pass: the guest writes the first `count` listed pages; collect them.

        With the ring, the guest stops every `burst` pages (half the ring) for a harvest,
        as a harvesting thread would keep up with it: on this kernel a vCPU that fills
        the ring in one go runs past the soft limit (see `DirtyRing.harvest`), and the
        ring is then broken for good. Returns the pass's guest time, the time spent
        collecting (ring: every harvest; bitmap: KVM_GET_DIRTY_LOG), the time to make
        ranges, how many ranges and pages, and harvests and ring-full exits.
        """
        burst = count if self.ring is None else max(1, self.ring.entries // 2)
        reset_before = self.ring.reset_seconds if self.ring is not None else 0.0
        collect_s = guest_s = 0.0
        full_exits = harvests = 0
        parts: list[np.ndarray] = []
        for first in range(0, count, burst):
            start_stub(self.vcpu, first, min(burst, count - first))
            began = time.perf_counter()
            while True:
                reason = self.vcpu.run().reason
                if reason == b.ExitReason.HLT:
                    break
                if reason == b.ExitReason.DIRTY_RING_FULL and self.ring is not None:
                    full_exits += 1
                    t = time.perf_counter()
                    parts.append(self.ring.harvest())
                    harvests += 1
                    collect_s += time.perf_counter() - t
                    began += time.perf_counter() - t
                    continue
                if reason != b.ExitReason.INTR:
                    raise RuntimeError(f"guest stub exited with {reason!r}")
            guest_s += time.perf_counter() - began
            if self.ring is not None:
                t = time.perf_counter()
                parts.append(self.ring.harvest())
                harvests += 1
                collect_s += time.perf_counter() - t
        t = time.perf_counter()
        if self.ring is not None:
            gfns = parts[0] if len(parts) == 1 else np.concatenate(parts)
            table = RangeTable.from_pages(gfns)
        else:
            words = self.vm.get_dirty_log(SLOT)
            collect_s += time.perf_counter() - t
            t = time.perf_counter()
            table = RangeTable.from_bitmap(words)
            harvests = 1
        ranges_s = time.perf_counter() - t
        reset_s = self.ring.reset_seconds - reset_before if self.ring is not None else 0.0
        return {"guest_ms": guest_s * 1e3, "collect_ms": collect_s * 1e3,
                "reset_ms": reset_s * 1e3, "ranges_ms": ranges_s * 1e3,
                "harvest_ms": (collect_s + ranges_s) * 1e3,
                "harvests": harvests, "ring_full_exits": full_exits, "ranges": len(table),
                "pages": table.total_bytes // PAGE_SIZE}

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
        self.vcpu.close()
        self.vm.close()


# --- the measurement ---------------------------------------------------------------------


def summary(samples: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def measure(trackers: list[Tracker], ram: GuestRam, rates: list[int], repeat: int,
            rng: np.random.Generator, say: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    for rate in rates:
        pages = rng.choice(ram.target_pages, rate, replace=False) + FIRST_TARGET_PAGE
        ram.write_list(pages)
        samples: dict[str, list[dict[str, float]]] = {t.method: [] for t in trackers}
        for tracker in trackers:
            tracker.dirty(rate)  # warm-up: allocates the pages, clears the log
            tracker.dirty(rate)
        for _ in range(repeat):
            for tracker in trackers:
                sample = tracker.dirty(rate)
                sample["lost_pages"] = rate - sample["pages"]
                if tracker.method == "bitmap" and sample["lost_pages"]:
                    raise RuntimeError(f"the bitmap saw {sample['pages']} of {rate} pages")
                samples[tracker.method].append(sample)
        ram.punch()
        row = {"dirty_pages": rate, **{m: summary(s) for m, s in samples.items()}}
        rows.append(row)
        say(" ".join(f"{m} {row[m]['harvest_ms']['median']:.2f} ms"
                     f" (guest {row[m]['guest_ms']['median']:.1f} ms)" for m in samples)
            + f" at {rate} pages")
    return rows


def table_markdown(rows: list[dict[str, Any]]) -> str:
    def cell(stat: dict[str, float]) -> str:
        return f"{stat['median']:.2f} ({stat['min']:.2f}-{stat['max']:.2f})"

    def split(stats: dict[str, Any]) -> str:
        return f"{stats['collect_ms']['median']:.2f} + {stats['ranges_ms']['median']:.2f}"

    lines = ["| dirty pages per pass | bitmap: GET_DIRTY_LOG + from_bitmap, ms | "
             "(log + ranges) | ring: harvest + reset + from_pages, ms | (harvest + ranges) | "
             "of which KVM_RESET_DIRTY_RINGS | harvests / ring-full exits | "
             "guest pass, bitmap / ring, ms |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        bitmap, ring = row["bitmap"], row["ring"]
        lines.append(f"| {row['dirty_pages']:,} | {cell(bitmap['harvest_ms'])} | "
                     f"{split(bitmap)} | {cell(ring['harvest_ms'])} | {split(ring)} | "
                     f"{ring['reset_ms']['median']:.2f} | "
                     f"{ring['harvests']['median']:.0f} / "
                     f"{ring['ring_full_exits']['median']:.0f} | "
                     f"{bitmap['guest_ms']['median']:.1f} / {ring['guest_ms']['median']:.1f} |")
    return "\n".join(lines)


def chart(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [row["dirty_pages"] for row in rows]
    for method, label in (("bitmap", "KVM_GET_DIRTY_LOG + from_bitmap"),
                          ("ring", "dirty ring harvest + reset + from_pages")):
        med = np.array([row[method]["harvest_ms"]["median"] for row in rows])
        lo = np.array([row[method]["harvest_ms"]["min"] for row in rows])
        hi = np.array([row[method]["harvest_ms"]["max"] for row in rows])
        ax.errorbar(x, med, yerr=[med - lo, hi - med], marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("pages dirtied per pass (random, distinct)")
    ax.set_ylabel("ms per pass to collect the dirty pages as ranges")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guest-gib", type=int, default=64)
    parser.add_argument("--rates", default="1000,10000,100000,1000000")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--ring-bytes", type=int, default=1 * MiB)
    parser.add_argument("--output", default=str(ROOT / "docs/results/dirty-tracking.json"))
    parser.add_argument("--chart", default=str(ROOT / "docs/images/dirty-tracking.png"))
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    ram = GuestRam(args.guest_gib * GiB)
    if max(rates) > ram.target_pages or LIST_GPA + 8 * max(rates) > FIRST_TARGET_PAGE * PAGE_SIZE:
        raise SystemExit("a rate is larger than the guest or its page list")
    kvm = Kvm()
    trackers = [Tracker(kvm, ram, "bitmap", args.ring_bytes),
                Tracker(kvm, ram, "ring", args.ring_bytes)]
    try:
        rows = measure(trackers, ram, rates, args.repeat, np.random.default_rng(0), print)
    finally:
        for tracker in trackers:
            tracker.close()
        kvm.close()
    result = {
        "benchmark": "benchmarks/dirty_tracking.py",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"kernel": platform.release(), "python": platform.python_version(),
                    "numpy": np.__version__, "cpus": os.cpu_count(),
                    "load_average": os.getloadavg()},
        "guest_bytes": ram.size,
        "vcpus": 1,
        "ring_bytes": args.ring_bytes,
        "ring_entries": args.ring_bytes // DIRTY_GFN.itemsize,
        "ring_capability": trackers[1].capability,
        "repeat": args.repeat,
        "times": "ms; median, min and max of the repeats; harvest_ms = collect_ms + ranges_ms",
        "rows": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    title = (f"{args.guest_gib} GiB guest, 1 vCPU, ring of "
             f"{args.ring_bytes // DIRTY_GFN.itemsize:,} entries")
    chart(rows, Path(args.chart), title)
    print(table_markdown(rows))
    print(f"wrote {args.output} and {args.chart}")


if __name__ == "__main__":
    main()
