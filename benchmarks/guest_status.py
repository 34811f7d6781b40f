"""The dirtying guest's own progress, read from its status page through the RAM files.

vmig's guest writes a status block per vCPU at ``layout.STATUS_GPA`` (heartbeat,
working-set pages written, state). Whichever VMM runs it, the benchmark reads that
page through a file that backs guest RAM: vmig's ``--memory-file``, QEMU's
``memory-backend-file,share=on``, or the anonymous memfd of a vmig destination,
opened through ``/proc/PID/fd``. Every read is a ``pread``: on a shmem file a hole
reads as zeros without being allocated, so reading a post-copy destination's page
before it arrived cannot fill it in behind the VMM's back (a mapping would).

During a migration both sides hold a copy of the page; the side that does not run
the guest holds an older one (the destination's copy lags, the paused source's copy
stops). So the guest's progress at any moment is the larger of the two counters,
and the side it runs on is the one that holds it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmig.guest import layout, status

SAMPLE_S = 0.1
MEMFD_NAME = "/memfd:vmig-guest-ram"  # vmig.memory.GuestMemory's memfd, as /proc shows it
KEYS = ("heartbeat", "pages_written")


def parse_status(block: bytes, cpus: int) -> dict[str, int]:
    """Heartbeat and pages written summed over vCPUs (vmig.guest.status, as vmig's vm.info
    counts them), and how many vCPUs run their workload, from a copy of the status page
    (all zeros: a page not there yet)."""

    def read_u64(gpa: int) -> int:
        offset = gpa - layout.STATUS_GPA
        return int.from_bytes(block[offset:offset + 8], "little")

    states = status.cpu_states(read_u64, cpus)
    return {**status.counters(read_u64, cpus),
            "running": sum(state == layout.CPU_STATE_RUNNING for state in states)}


def memfd_of(pid: int) -> Path | None:
    """/proc/PID/fd/N of vmig's guest-RAM memfd in process `pid`, or None (none yet)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(entry.path).startswith(MEMFD_NAME):
                    return Path(entry.path)
    return None


class StatusFile:
    """One side's copy of the status page; the file is opened once it exists."""

    def __init__(self, locate: Callable[[], Path | None], cpus: int) -> None:
        self._locate = locate
        self.cpus = cpus
        self._fd: int | None = None

    def read(self) -> dict[str, int] | None:
        """The counters, or None while there is no file (yet)."""
        if self._fd is None:
            path = self._locate()
            if path is None:
                return None
            try:
                self._fd = os.open(path, os.O_RDONLY)
            except OSError:
                return None
        block = os.pread(self._fd, self.cpus * layout.STATUS_STRIDE, layout.STATUS_GPA)
        if len(block) < self.cpus * layout.STATUS_STRIDE:
            return None
        return parse_status(block, self.cpus)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def merge(t: float, source: dict[str, int] | None, destination: dict[str, int] | None
          ) -> dict[str, Any] | None:
    """One sample from both sides' counters: the larger heartbeat is the live copy."""
    sides = [(name, counters) for name, counters in (("source", source),
                                                     ("destination", destination))
             if counters is not None and counters["heartbeat"] > 0]
    if not sides:
        return None
    side, counters = max(sides, key=lambda item: item[1]["heartbeat"])  # ties: the source
    return {"t": round(t, 3), "side": side,
            **{key: counters[key] for key in KEYS}}


def wait_running(status: StatusFile, timeout: float) -> None:
    """Until every vCPU of the guest has stamped its working set and runs its workload."""
    deadline = time.monotonic() + timeout
    while True:
        counters = status.read()
        if counters is not None and counters["running"] == status.cpus:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the guest did not start its workload within {timeout:g} s "
                               f"(status: {counters})")
        time.sleep(SAMPLE_S)


class Periodic:
    """Calls `sample()` every SAMPLE_S on a thread (`with` starts and stops it) and keeps
    what it returns (None: nothing this time) in `samples`."""

    def __init__(self) -> None:
        self.samples: list[dict[str, Any]] = []
        self._began = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=type(self).__name__,
                                        daemon=True)

    def __enter__(self) -> Any:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def elapsed(self) -> float:
        """Seconds since this sampler was made (the samples' `t`)."""
        return time.monotonic() - self._began

    def sample(self) -> dict[str, Any] | None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            point = self.sample()
            if point is not None:
                self.samples.append(point)


class Sampler(Periodic):
    """Both sides' status pages, merged (merge())."""

    def __init__(self, source: StatusFile, destination: StatusFile) -> None:
        super().__init__()
        self._files = (source, destination)

    def sample(self) -> dict[str, Any] | None:
        try:
            return merge(self.elapsed(), *(f.read() for f in self._files))
        except OSError:
            return None


def rate(samples: list[dict[str, Any]], begin: float, end: float, key: str) -> float | None:
    """Counter `key` per second between the first and last sample in [begin, end]."""
    window = [s for s in samples if begin <= s["t"] <= end]
    if len(window) < 2 or window[-1]["t"] <= window[0]["t"]:
        return None
    return (window[-1][key] - window[0][key]) / (window[-1]["t"] - window[0]["t"])


def write_rates(samples: list[dict[str, Any]], since: float) -> tuple[list[float], list[float]]:
    """The guest's write rate over time for a chart: (seconds after `since`, thousand
    pages per second between one sample and the next)."""
    xs, ys = [], []
    for a, b in itertools.pairwise(samples):
        if b["t"] > a["t"]:
            xs.append(b["t"] - since)
            ys.append((b["pages_written"] - a["pages_written"]) / (b["t"] - a["t"]) / 1000)
    return xs, ys
