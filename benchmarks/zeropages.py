"""Ways to find the all-zero 4 KiB pages of guest memory, timed, with their GIL behaviour.

    .venv/bin/python benchmarks/zeropages.py [--size 1G] [--repeat 5] [--output FILE]

Memory: a memfd (GuestMemory) of --size bytes per data set, written in full first (no
holes: a hole would read as zeros without costing memory bandwidth). Data sets:

  random    every page random bytes (a scan can decide on a page's first bytes)
  zero      every page zeros (every byte must be read)
  half      half the pages zero, at random
  late      every page zero but its last byte (worst case for looking at the start)

Options, each over the whole memory, one bool per page:

  hybrid    vmig.zeropages.zero_page_mask: the first u64 of every page, then a numpy
            bitwise-OR reduction over the pages whose first u64 is zero (what vmig uses)
  max       numpy max over (pages, 512) u64 words, in blocks of 64 Ki pages
  any       numpy any() over the same
  or        numpy bitwise_or.reduce over the same
  memcmp    ctypes libc.memcmp of every page against a static zero page (one foreign
            call per page; timed on the first --small bytes only)
  bytes     a Python loop comparing memoryview slices with a zero page (--small only)

Each option is timed --repeat times per data set (median, GB/s of memory scanned),
then run once more next to a spinning Python thread (benchmarks/gil_probe.py): its
time then, the spinner's share of its idle speed, and its longest pause (a call much
shorter than the 5 ms GIL switch interval says little there: see the zero data set). Splitting a
range table (1% of the pages, scattered, and the whole memory as one range) is timed
too. Writes docs/results/zeropages.json and prints a table.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from gil_probe import GilProbe

from vmig.memory import GuestMemory
from vmig.ranges import RangeTable
from vmig.units import PAGE_SIZE, MiB, format_size, parse_size
from vmig.zeropages import BLOCK_PAGES, zero_page_mask

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "results" / "zeropages.json"

_libc = ctypes.CDLL(None)
_memcmp = _libc.memcmp
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_memcmp.restype = ctypes.c_int
ZERO_PAGE = bytes(PAGE_SIZE)
_ZERO_ADDRESS = ctypes.cast(ctypes.c_char_p(ZERO_PAGE), ctypes.c_void_p).value


def fill(memory: GuestMemory, kind: str, rng: np.random.Generator) -> None:
    """Write every page of `memory` as data set `kind` says."""
    step = 64 * MiB
    for gpa in range(0, memory.size, step):
        length = min(step, memory.size - gpa)
        view = memory.view(gpa, length)
        words = np.frombuffer(view, dtype=np.uint64).reshape(-1, PAGE_SIZE // 8)
        if kind == "zero":
            words.fill(0)
        elif kind == "late":
            words.fill(0)
            words[:, -1] = np.uint64(1 << 63)  # the last byte of every page
        else:
            words[:] = rng.integers(0, 2**63, words.shape, dtype=np.uint64) | np.uint64(1)
            if kind == "half":
                words[rng.random(len(words)) < 0.5] = 0
        del words
        view.release()


def blocked(reduce: Callable[[np.ndarray], np.ndarray]) -> Callable[[memoryview], np.ndarray]:
    def scan(view: memoryview) -> np.ndarray:
        words = np.frombuffer(view, dtype=np.uint64).reshape(-1, PAGE_SIZE // 8)
        out = np.empty(len(words), dtype=np.bool_)
        for first in range(0, len(words), BLOCK_PAGES):
            out[first:first + BLOCK_PAGES] = reduce(words[first:first + BLOCK_PAGES])
        return out
    return scan


def memcmp_scan(address: int, size: int) -> np.ndarray:
    return np.array([_memcmp(address + at, _ZERO_ADDRESS, PAGE_SIZE) == 0
                     for at in range(0, size, PAGE_SIZE)])


def bytes_scan(view: memoryview) -> np.ndarray:
    return np.array([view[at:at + PAGE_SIZE] == ZERO_PAGE
                     for at in range(0, len(view), PAGE_SIZE)])


def measure_kind(kind: str, size: int, small: int, repeat: int, rng: np.random.Generator,
                 split: dict[str, dict[str, float]]) -> dict[str, dict[str, object]]:
    """Every option on one data set: timings alone and next to a spinning thread."""
    out: dict[str, dict[str, object]] = {}
    with GuestMemory.create(size) as memory:
        fill(memory, kind, rng)
        view = memory.view(0, size)
        head = memory.view(0, small)
        expected = zero_page_mask(view)
        options: dict[str, tuple[Callable[[], np.ndarray], int]] = {
            "hybrid": (lambda: zero_page_mask(view), size),
            "max": (lambda: blocked(lambda w: w.max(axis=1) == 0)(view), size),
            "any": (lambda: blocked(lambda w: ~w.any(axis=1))(view), size),
            "or": (lambda: blocked(lambda w: np.bitwise_or.reduce(w, axis=1) == 0)(view), size),
            "memcmp": (lambda: memcmp_scan(memory.host_addr, small), small),
            "bytes": (lambda: bytes_scan(head), small),
        }
        for name, (scan, scanned) in options.items():
            got = scan()
            assert np.array_equal(got, expected[:len(got)]), (kind, name)
            seconds = []
            for _ in range(repeat):
                began = time.perf_counter()
                scan()
                seconds.append(time.perf_counter() - began)
            median = statistics.median(seconds)
            out[name] = {"scanned_bytes": scanned, "median_s": median, "best_s": min(seconds),
                         "gb_per_s": scanned / median / 1e9}
            print(f"{kind:6s} {name:7s} {scanned / median / 1e9:7.2f} GB/s "
                  f"({median * 1000:8.1f} ms for {format_size(scanned)})", flush=True)
        with GilProbe() as probe:
            for name, (scan, scanned) in options.items():
                probed = probe.run(scan)
                probed["gb_per_s"] = scanned / probed["seconds"] / 1e9
                probed["scanned_bytes"] = scanned
                out[name]["with_spinning_thread"] = probed
        if kind in ("random", "half"):
            npages = size // PAGE_SIZE
            scattered = RangeTable.from_pages(rng.choice(npages, npages // 100, replace=False))
            for label, table in (("scattered_1pct", scattered), ("whole", RangeTable.full(size))):
                seconds = []
                for _ in range(repeat):
                    began = time.perf_counter()
                    memory.split_zero_pages(table)
                    seconds.append(time.perf_counter() - began)
                median = statistics.median(seconds)
                split[f"{kind}_{label}"] = {
                    "pages": table.total_bytes // PAGE_SIZE, "ranges": len(table),
                    "median_s": median, "gb_per_s": table.total_bytes / median / 1e9}
        del expected
        for held in (view, head):
            held.release()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--small", default="64M",
                        help="bytes the per-page foreign-call and Python options scan")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--output", default=str(OUTPUT))
    args = parser.parse_args()
    size = parse_size(args.size, "size")
    small = parse_size(args.small, "small")
    rng = np.random.default_rng(0)
    kinds = ("random", "zero", "half", "late")
    results: dict[str, dict[str, dict[str, object]]] = {}
    split: dict[str, dict[str, float]] = {}
    for kind in kinds:
        results[kind] = measure_kind(kind, size, small, args.repeat, rng, split)
    result = {
        "machine": {"python": platform.python_version(), "numpy": np.__version__,
                    "kernel": platform.release(), "cpus": os.cpu_count()},
        "size_bytes": size,
        "small_bytes": small,
        "repeat": args.repeat,
        "scan": results,
        "split": split,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{format_size(size)} per data set; GB/s of memory scanned, median of "
          f"{args.repeat} (memcmp, bytes: first {format_size(small)})")
    print(f"{'option':8s}" + "".join(f"{kind:>10s}" for kind in kinds)
          + "   zero data next to a spinning thread: GB/s, spinner share, longest pause")
    for name in results[kinds[0]]:
        probed = results["zero"][name]["with_spinning_thread"]
        print(f"{name:8s}" + "".join(f"{results[kind][name]['gb_per_s']:10.2f}" for kind in kinds)
              + f"   {probed['gb_per_s']:7.2f} {probed['spinner_share']:5.0%}"
                f" {probed['max_gap_ms']:7.1f} ms")
    for label, entry in split.items():
        print(f"split {label:22s} {entry['ranges']:8d} ranges  {entry['median_s'] * 1000:8.1f} ms"
              f"  {entry['gb_per_s']:6.2f} GB/s")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
