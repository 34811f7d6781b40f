"""Preparing a destination's guest RAM: fallocate vs MADV_POPULATE_WRITE vs first-touch faults.

    .venv/bin/python benchmarks/populate.py [--size 1G,2G] [--fill recv,copy] [--repeat 3]

Every run takes a fresh memfd of --size bytes (GuestMemory.create), optionally prepares
it, then fills it the way a receiver does, 16 MiB at a time: with --fill copy, copied
in from a buffer (ctypes.memmove, the GIL released); with --fill recv, received from an
AF_UNIX socket pair that a sender thread writes into (recv_into on a view of guest
memory, so the page faults happen inside the kernel's copy, as for recvmsg_into).
Methods:

  touch            no preparation: the copy takes every page fault
  populate         one MADV_POPULATE_WRITE for the whole memfd, then the copy
  populate_16m     one MADV_POPULATE_WRITE per 16 MiB chunk, all before the copy
  inline_16m       per chunk: MADV_POPULATE_WRITE, then copy it (what the receiver does)
  ahead_thread     a second thread populates chunk after chunk; the copy of a chunk
                   waits until that chunk is populated
  from_the_end     a second thread populates chunks from the last one backwards while
                   the copy goes forwards, taking its own faults, until they meet
  fallocate        fallocate(fd, 0, ...) for the whole memfd (MemoryBacking.allocate)
  posix_fallocate  os.posix_fallocate (glibc: the same fallocate system call)
  fallocate_ahead  a second thread fallocates chunk after chunk ahead of the copy

Controls (see /work/shared/notes/baselines.md, "host-cold RAM"): a fresh memfd per run,
2x --size touched and freed right before each run (so every run starts from warm free
RAM), the order of the methods rotated on every repetition, medians of --repeat runs.
The warm-up's own time is recorded too: its first run shows what cold RAM costs.

Then one run of each system call next to a spinning Python thread
(benchmarks/gil_probe.py) shows which of them hold the GIL.

Writes docs/results/populate.json and prints a table per size and fill.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import socket
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gil_probe import GilProbe

from vmig.memory import GuestMemory
from vmig.memory.backing import MADV_POPULATE_WRITE
from vmig.units import MiB, format_size, parse_size

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "results" / "populate.json"
CHUNK = 16 * MiB


def warm_up(size: int) -> float:
    """Touch and free `size` bytes of shmem: later allocations get warm pages. Seconds."""
    began = time.perf_counter()
    with GuestMemory.create(size) as scratch:
        scratch.backing.populate()
    return time.perf_counter() - began


class Copier:
    """Fills guest memory chunk by chunk from one source buffer, like a receiver."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.source = bytearray(os.urandom(CHUNK))
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.source))

    def fill(self, memory: GuestMemory, before_chunk: Callable[[int], None] | None = None) -> None:
        chunks = [(gpa, min(CHUNK, memory.size - gpa)) for gpa in range(0, memory.size, CHUNK)]
        if self.mode == "copy":
            for gpa, length in chunks:
                if before_chunk is not None:
                    before_chunk(gpa)
                ctypes.memmove(memory.host_addr + gpa, self.address, length)
            return
        receiver, sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        source = memoryview(self.source)

        def send() -> None:
            for _, length in chunks:
                sender.sendall(source[:length])

        thread = threading.Thread(target=send, name="sender")
        thread.start()
        try:
            for gpa, length in chunks:
                if before_chunk is not None:
                    before_chunk(gpa)
                view = memory.view(gpa, length)
                got = 0
                while got < length:
                    got += receiver.recv_into(view[got:], length - got)
                view.release()
        finally:
            thread.join()
            receiver.close()
            sender.close()


class Ahead:
    """A thread that prepares chunk after chunk; `wait(gpa)` blocks until gpa is done."""

    def __init__(self, memory: GuestMemory, prepare: Callable[[int, int], None]) -> None:
        self._memory = memory
        self._prepare = prepare
        self._done = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="ahead")

    def _run(self) -> None:
        for gpa in range(0, self._memory.size, CHUNK):
            self._prepare(gpa, min(CHUNK, self._memory.size - gpa))
            with self._cond:
                self._done = gpa + CHUNK
                self._cond.notify_all()

    def start(self) -> None:
        self._thread.start()

    def wait(self, gpa: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._done > gpa)

    def join(self) -> None:
        self._thread.join()


class FromTheEnd:
    """A thread that populates chunks from the end until it meets the receiver."""

    def __init__(self, memory: GuestMemory) -> None:
        self._memory = memory
        self.receiving = 0  # the receiver's next chunk; a plain int, set by one thread
        self._thread = threading.Thread(target=self._run, name="from-the-end")

    def _run(self) -> None:
        last = (self._memory.size - 1) // CHUNK * CHUNK
        for gpa in range(last, -1, -CHUNK):
            if gpa <= self.receiving:
                return
            self._memory.backing.populate(gpa, min(CHUNK, self._memory.size - gpa))

    def start(self) -> None:
        self._thread.start()

    def claim(self, gpa: int) -> None:
        self.receiving = gpa

    def join(self) -> None:
        self._thread.join()


def run_method(name: str, size: int, copier: Copier) -> dict[str, float]:
    """One run: prepare a fresh memfd as `name` says, then fill it. Seconds per phase."""
    memory = GuestMemory.create(size)
    try:
        began = time.perf_counter()
        ahead: Ahead | FromTheEnd | None = None
        before_chunk: Callable[[int], None] | None = None
        if name == "populate":
            memory.backing.populate()
        elif name == "populate_16m":
            for gpa in range(0, size, CHUNK):
                memory.backing.populate(gpa, min(CHUNK, size - gpa))
        elif name == "inline_16m":
            def before_chunk(gpa: int) -> None:
                memory.backing.populate(gpa, min(CHUNK, size - gpa))
        elif name in ("ahead_thread", "fallocate_ahead"):
            prepare = memory.backing.populate if name == "ahead_thread" else memory.backing.allocate
            ahead = Ahead(memory, prepare)
            ahead.start()
            before_chunk = ahead.wait
        elif name == "from_the_end":
            ahead = FromTheEnd(memory)
            ahead.start()
            before_chunk = ahead.claim
        elif name == "fallocate":
            memory.backing.allocate()
        elif name == "posix_fallocate":
            os.posix_fallocate(memory.fd, 0, size)
        elif name != "touch":
            raise ValueError(name)
        prepared = time.perf_counter()
        copier.fill(memory, before_chunk)
        filled = time.perf_counter()
        if ahead is not None:
            ahead.join()
        return {"prepare_s": prepared - began, "fill_s": filled - prepared,
                "total_s": filled - began}
    finally:
        memory.close()


METHODS = ("touch", "populate", "populate_16m", "inline_16m", "ahead_thread", "from_the_end",
           "fallocate", "posix_fallocate", "fallocate_ahead")


def gil_checks(size: int) -> dict[str, dict[str, float]]:
    """Each preparing call once, next to a spinning thread, on a fresh warm memfd."""
    calls: dict[str, Callable[[GuestMemory], object]] = {
        "madvise_ctypes (populate)": lambda m: m.backing.populate(),
        "mmap.madvise": lambda m: m._map.madvise(MADV_POPULATE_WRITE, 0, m.size),
        "fallocate_ctypes (allocate)": lambda m: m.backing.allocate(),
        "os.posix_fallocate": lambda m: os.posix_fallocate(m.fd, 0, m.size),
        "punch_hole_ctypes (discard)": lambda m: m.backing.discard(0, m.size),
    }
    out = {}
    with GilProbe() as probe:
        for name, call in calls.items():
            warm_up(2 * size)
            with GuestMemory.create(size) as memory:
                if name.startswith("punch_hole"):
                    memory.backing.populate()
                out[name] = probe.run(lambda call=call, memory=memory: call(memory))
    return out


def measure(size: int, fill: str, methods: list[str], repeat: int) -> dict[str, object]:
    """Every method `repeat` times on `size` bytes, order rotated; medians and every run."""
    copier = Copier(fill)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in methods}
    warmups: list[float] = []
    for rep in range(repeat):
        order = methods[rep % len(methods):] + methods[:rep % len(methods)]
        for name in order:
            warmups.append(warm_up(2 * size))
            result = run_method(name, size, copier)
            result["warmup_s"] = warmups[-1]
            runs[name].append(result)
            print(f"{format_size(size)} {fill} rep {rep} {name:16s} prepare "
                  f"{result['prepare_s']:6.3f} s  fill {result['fill_s']:6.3f} s  "
                  f"total {result['total_s']:6.3f} s", flush=True)
    summary = {}
    for name, results in runs.items():
        med = {key: statistics.median(r[key] for r in results)
               for key in ("prepare_s", "fill_s", "total_s")}
        med["total_min_s"] = min(r["total_s"] for r in results)
        med["total_max_s"] = max(r["total_s"] for r in results)
        med["gb_per_s"] = size / med["total_s"] / 1e9
        summary[name] = med
    return {"size_bytes": size, "fill": fill, "repeat": repeat, "summary_median": summary,
            "runs": runs, "warmup_seconds_in_order": warmups}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G,2G", help="guest memory per run, comma-separated")
    parser.add_argument("--fill", default="recv,copy",
                        help="how data arrives, comma-separated: recv (recv_into from a "
                             "socket pair) and/or copy (memmove)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--output", default=str(OUTPUT))
    parser.add_argument("--no-gil", action="store_true", help="skip the spinning-thread checks")
    args = parser.parse_args()
    sizes = [parse_size(text, "size") for text in args.size.split(",")]
    methods = args.methods.split(",")
    configs = {}
    for fill in args.fill.split(","):
        if fill not in ("recv", "copy"):
            parser.error(f"unknown fill {fill!r}")
        for size in sizes:
            configs[f"{fill}-{format_size(size).replace(' ', '')}"] = measure(
                size, fill, methods, args.repeat)
    gil = {} if args.no_gil else gil_checks(sizes[0])
    result = {
        "machine": {"python": platform.python_version(), "kernel": platform.release(),
                    "cpus": os.cpu_count(), "page_size": mmap.PAGESIZE},
        "chunk_bytes": CHUNK,
        "controls": "fresh memfd per run; 2x size touched and freed before each run; "
                    "order rotated per repetition; medians",
        "configs": configs,
        "gil": gil,
        "gil_size_bytes": sizes[0],
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    for name, config in configs.items():
        print(f"\n{name}: medians of {config['repeat']} ({format_size(CHUNK)} chunks)")
        print(f"{'method':16s} {'prepare':>9s} {'fill':>9s} {'total':>9s} {'GB/s':>6s}"
              f" {'range':>15s}")
        for method, med in config["summary_median"].items():
            print(f"{method:16s} {med['prepare_s']:8.3f}s {med['fill_s']:8.3f}s "
                  f"{med['total_s']:8.3f}s {med['gb_per_s']:6.2f} "
                  f"{med['total_min_s']:6.3f}-{med['total_max_s']:.3f}s")
        warmups = config["warmup_seconds_in_order"]
        print(f"warm-up of 2x: first {warmups[0]:.3f} s, median {statistics.median(warmups):.3f} s")
    for name, probe in gil.items():
        print(f"GIL {name:30s} {probe['seconds'] * 1000:7.1f} ms  spinner "
              f"{probe['spinner_share']:4.0%}  longest pause {probe['max_gap_ms']:6.1f} ms")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
