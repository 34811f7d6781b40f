"""Time dirty-bitmap -> range-table conversion (vectorised) and write JSON.

    .venv/bin/python benchmarks/ranges.py [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from vmig.ranges import RangeTable
from vmig.units import PAGE_SIZE, GiB

RESULTS = Path(__file__).resolve().parent / "results"  # gitignored


def best_of(fn, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - began)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(RESULTS / f"ranges-{int(time.time())}.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    cases = {}
    full = np.full(GiB // PAGE_SIZE // 64, np.uint64(2**64 - 1), dtype=np.uint64)
    cases["full_1gib"] = best_of(lambda: RangeTable.from_bitmap(full))
    npages = 4 * GiB // PAGE_SIZE
    sparse = np.zeros(npages // 64, dtype=np.uint64)
    for page in rng.choice(npages, 50_000, replace=False):
        sparse[page // 64] |= np.uint64(1 << (int(page) % 64))
    cases["sparse_50k_of_4gib"] = best_of(lambda: RangeTable.from_bitmap(sparse))
    table = RangeTable.from_bitmap(sparse)
    cases["partition_50k_ranges_16mib"] = best_of(lambda: table.partition(16 << 20))
    result = {"seconds_best_of_5": cases}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    for name, seconds in cases.items():
        print(f"{name:32s} {seconds * 1000:8.2f} ms")


if __name__ == "__main__":
    main()
