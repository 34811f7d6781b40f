"""Post-copy fault service time at the destination, as QEMU 10.1 reports it.

A remote fault is timed from the moment the ``migrate-fault`` thread read the
userfaultfd event of a vCPU touching an owed page, to the moment that page was
installed (UFFDIO_COPY or UFFDIO_ZEROPAGE done, which wakes the vCPU), whichever copy
came first (the fault's answer or the background push). `FaultStats` keeps, per fault,
a constant amount of work and no growing list:

- the histogram ``fault_latency_dist``, QEMU's ``postcopy-latency-dist``: bucket i
  counts the faults served in [2^i, 2^(i+1)) µs; bucket 0 also takes those under 1 µs
  and the last bucket (i = `BUCKETS` - 1) all from 2^32 µs on;
- the count, the sum and the exact maximum;
- p50 and p99 by the nearest-rank method over a uniform random sample of at most
  `RESERVOIR` latencies (Vitter's algorithm R): exact while there were no more faults
  than that, an estimate after;
- the blocktime: the union of the intervals in which at least one remote fault was
  waiting, i.e. the wall time during which some thread (a vCPU, mostly) was blocked for
  a page (QEMU's ``postcopy-blocktime`` counts only the time *all* vCPUs were blocked);
- per vCPU (QEMU's ``postcopy-vcpu-blocktime``), where userfaultfd names the faulting
  thread (UFFD_FEATURE_THREAD_ID) and the owner maps threads to vCPUs: the time each
  vCPU waited for remote pages, from its fault read to its page installed.

Faults the destination fills itself (never-owed pages, zeros) are not counted.

Not thread-safe: the owner (`PostcopyService`) calls it under its own lock.
"""

from __future__ import annotations

import math
import random
from typing import Any

__all__ = ["BUCKETS", "RESERVOIR", "FaultStats", "bucket"]

#: Buckets of the histogram: [2^i, 2^(i+1)) µs for i = 0 .. 32 (as QEMU's 33).
BUCKETS = 33
#: The most latencies kept for the percentiles.
RESERVOIR = 8192


def bucket(latency_us: float) -> int:
    """The histogram bucket of a latency in µs: floor(log2), clamped to [0, BUCKETS)."""
    if latency_us < 2:
        return 0
    return min(int(latency_us).bit_length() - 1, BUCKETS - 1)


def nearest_rank(ordered: list[float], fraction: float) -> float:
    """The nearest-rank percentile of sorted `ordered` (not empty): the smallest value with
    at least `fraction` of them at or below it."""
    return ordered[max(math.ceil(fraction * len(ordered)), 1) - 1]


class FaultStats:
    """Histogram, percentiles and blocktime of the remote faults (see the module doc).
    Times are seconds of one monotonic clock, given by the caller."""

    def __init__(self, reservoir: int = RESERVOIR, seed: int = 0, vcpus: int = 0) -> None:
        """`vcpus`: how many vCPUs `vcpu_waiting` may name (0: the faulting threads are not
        known, no per-vCPU blocktime)."""
        self.histogram = [0] * BUCKETS
        self.count = 0
        self.total_s = 0.0
        self.max_s = 0.0
        self._samples: list[float] = []
        self._reservoir = reservoir
        self._random = random.Random(seed)
        self._waiting = 0
        self._blocked_since = 0.0
        self._blocked_s = 0.0
        self._vcpu_blocked_s = [0.0] * vcpus
        self._vcpu_waits: dict[int, list[tuple[int, float]]] = {}  # page -> (vCPU, since)

    def asked(self, at: float) -> None:
        """A remote fault began waiting at `at`."""
        if self._waiting == 0:
            self._blocked_since = at
        self._waiting += 1

    def served(self, asked_at: float, at: float) -> None:
        """The fault that began waiting at `asked_at` had its page installed at `at`."""
        latency = max(at - asked_at, 0.0)
        self.histogram[bucket(latency * 1e6)] += 1
        self.count += 1
        self.total_s += latency
        self.max_s = max(self.max_s, latency)
        if len(self._samples) < self._reservoir:
            self._samples.append(latency)
        else:
            slot = self._random.randrange(self.count)
            if slot < self._reservoir:
                self._samples[slot] = latency
        self._waiting -= 1
        if self._waiting == 0:
            self._blocked_s += at - self._blocked_since

    def vcpu_waiting(self, vcpu: int, page: int, at: float) -> None:
        """vCPU `vcpu` (its thread's fault read at `at`) waits for remote `page`."""
        self._vcpu_waits.setdefault(page, []).append((vcpu, at))

    def installed(self, page: int, at: float) -> None:
        """`page` was installed at `at`: the vCPUs waiting for it run again."""
        for vcpu, since in self._vcpu_waits.pop(page, ()):
            self._vcpu_blocked_s[vcpu] += max(at - since, 0.0)

    def vcpu_blocktime_s(self, now: float) -> list[float]:
        """Per vCPU, the time it waited for remote pages, up to `now`."""
        blocked = list(self._vcpu_blocked_s)
        for waits in self._vcpu_waits.values():
            for vcpu, since in waits:
                blocked[vcpu] += max(now - since, 0.0)
        return blocked

    def snapshot(self) -> FaultStats:
        """A copy to compute the figures from outside the owner's lock (the sort of the
        sample then holds up no fault)."""
        copy = FaultStats.__new__(FaultStats)
        copy.__dict__.update(self.__dict__)
        copy.histogram, copy._samples = list(self.histogram), list(self._samples)
        copy._vcpu_blocked_s = list(self._vcpu_blocked_s)
        copy._vcpu_waits = {page: list(waits) for page, waits in self._vcpu_waits.items()}
        return copy

    def blocktime_s(self, now: float) -> float:
        """The time at least one fault waited, up to `now` (a wait going on counts)."""
        return self._blocked_s + (now - self._blocked_since if self._waiting else 0.0)

    def figures(self, now: float) -> dict[str, Any]:
        """The `postcopy` object's fault-latency figures (vmig.migration.figures), in ms."""
        ordered = sorted(self._samples)
        p50 = nearest_rank(ordered, 0.50) if ordered else None
        p99 = nearest_rank(ordered, 0.99) if ordered else None
        return {
            "fault_latency_count": self.count,
            "fault_latency_dist": list(self.histogram),
            "fault_latency_p50_ms": _ms(p50),
            "fault_latency_p99_ms": _ms(p99),
            "fault_latency_max_ms": _ms(self.max_s) if self.count else None,
            "fault_latency_sum_ms": _ms(self.total_s),
            "blocktime_ms": _ms(self.blocktime_s(now)),
            "vcpu_blocktime_ms": [_ms(s) for s in self.vcpu_blocktime_s(now)],
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
