"""Time dirty-bitmap -> range-table conversion (vectorised) and write JSON.

    .venv/bin/python benchmarks/ranges.py [--output FILE] [--repeat N] [--no-gil]

Bitmaps of a 1 TiB guest (2**28 pages of 4 KiB, 2**22 u64 words = 32 MiB): all clear,
all set, 1% of the pages dirty in runs (clustered), 1% dirty as scattered single
pages, and the dense worst case, 50% of the bits set at random. Each case is timed
alone (median and best of --repeat runs, in one process, in turn) and once more with
a Python thread spinning next to it (benchmarks/gil_probe.py): how much of its time
the conversion leaves the GIL to other threads, and what such a neighbour costs it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from gil_probe import GilProbe

from vmig.ranges import RangeTable
from vmig.units import PAGE_SIZE, GiB, TiB

RESULTS = Path(__file__).resolve().parent / "results"  # gitignored

GUEST = TiB
NPAGES = GUEST // PAGE_SIZE
NWORDS = NPAGES // 64


def times(fn: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        out.append(time.perf_counter() - began)
    return out


def packed(bits: np.ndarray) -> np.ndarray:
    return np.packbits(bits, bitorder="little").view("<u8").astype(np.uint64)


def clustered(rng: np.random.Generator, fraction: float, mean_run: int) -> np.ndarray:
    """About `fraction` of the pages dirty, in runs of 1 .. 2*mean_run pages."""
    bits = np.zeros(NPAGES, dtype=bool)
    nruns = int(NPAGES * fraction) // mean_run
    starts = rng.integers(0, NPAGES - 2 * mean_run, nruns)
    lengths = rng.integers(1, 2 * mean_run, nruns)
    offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    bits[np.repeat(starts, lengths) + offsets] = True
    return packed(bits)


def bitmaps(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "clear": np.zeros(NWORDS, dtype=np.uint64),
        "set": np.full(NWORDS, np.uint64(2**64 - 1), dtype=np.uint64),
        "clustered_1pct": clustered(rng, 0.01, 64),
        "scattered_1pct": packed(rng.random(NPAGES, dtype=np.float32) < 0.01),
        "random_50pct": packed(rng.random(NPAGES, dtype=np.float32) < 0.5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(RESULTS / f"ranges-{int(time.time())}.json"))
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--no-gil", action="store_true", help="skip the spinning-thread runs")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    cases: dict[str, dict[str, object]] = {}
    for name, words in bitmaps(rng).items():
        table = RangeTable.from_bitmap(words)  # warm-up, and the result's size
        repeat = max(3, args.repeat // 3) if name == "random_50pct" else args.repeat
        seconds = times(lambda words=words: RangeTable.from_bitmap(words), repeat)
        case: dict[str, object] = {
            "ms_median": statistics.median(seconds) * 1000,
            "ms_best": min(seconds) * 1000,
            "runs": repeat,
            "ranges": len(table),
            "dirty_pages": table.total_bytes // PAGE_SIZE,
        }
        del table
        if not args.no_gil:
            with GilProbe() as probe:
                probed = [probe.run(lambda words=words: RangeTable.from_bitmap(words))
                          for _ in range(3)]
            case["with_spinning_thread"] = {
                "ms_median": statistics.median(p["seconds"] for p in probed) * 1000,
                "spinner_share_median": statistics.median(p["spinner_share"] for p in probed),
                "spinner_max_gap_ms_max": max(p["max_gap_ms"] for p in probed),
            }
        cases[f"1tib_{name}"] = case
    # The first figures this benchmark reported, kept for comparison.
    small: dict[str, float] = {}
    full = np.full(GiB // PAGE_SIZE // 64, np.uint64(2**64 - 1), dtype=np.uint64)
    small["full_1gib"] = min(times(lambda: RangeTable.from_bitmap(full), 5))
    npages = 4 * GiB // PAGE_SIZE
    sparse = np.zeros(npages // 64, dtype=np.uint64)
    pages = rng.choice(npages, 50_000, replace=False).astype(np.uint64)
    np.bitwise_or.at(sparse, pages // np.uint64(64),
                     np.left_shift(np.uint64(1), pages % np.uint64(64)))
    small["sparse_50k_of_4gib"] = min(times(lambda: RangeTable.from_bitmap(sparse), 5))
    table = RangeTable.from_bitmap(sparse)
    small["partition_50k_ranges_16mib"] = min(times(lambda: table.partition(16 << 20), 5))
    result = {
        "machine": {"python": platform.python_version(), "numpy": np.__version__,
                    "processor": platform.processor() or platform.machine()},
        "guest_bytes": GUEST,
        "bitmap_words": NWORDS,
        "cases": cases,
        "seconds_best_of_5": small,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'1 TiB bitmap':22s} {'median':>9s} {'best':>9s} {'ranges':>10s}"
          f" {'+spinner':>10s} {'spin share':>10s} {'max gap':>8s}")
    for name, case in cases.items():
        line = (f"{name[5:]:22s} {case['ms_median']:7.1f}ms {case['ms_best']:7.1f}ms"
                f" {case['ranges']:10d}")
        probe_result = case.get("with_spinning_thread")
        if isinstance(probe_result, dict):
            share = probe_result['spinner_share_median']
            line += (f" {probe_result['ms_median']:8.1f}ms {share:10.0%}"
                     f" {probe_result['spinner_max_gap_ms_max']:6.1f}ms")
        print(line)
    for name, seconds in small.items():
        print(f"{name:32s} {seconds * 1000:8.2f} ms")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
