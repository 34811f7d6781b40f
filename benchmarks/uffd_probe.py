"""Probe userfaultfd for post-copy on this host, with vmig's own VMM: one line per check.

1. A host thread (C memset, GIL released) touches N missing pages of a memfd mapping
   one by one; a Python handler thread serves each with UFFDIO_COPY. Prints the round
   trip the toucher sees and the UFFDIO_COPY time, p50/p99.
2. Does a present page become missing again (and fault) after fallocate(PUNCH_HOLE) on
   the memfd? After MADV_DONTNEED on the shared mapping?
3. A dirty guest is booted, paused, saved, copied out and shut down; its state is
   restored onto fresh memory whose working set is missing and registered. Do the vCPUs
   block (heartbeat stands still), does UFFDIO_COPY wake them, and does the guest's own
   self-check pass with every working-set page served through a fault?

    .venv/bin/python benchmarks/uffd_probe.py [--memory 128M --cpus 2 --working-set 32M]

Needs root (or CAP_SYS_PTRACE) and /dev/kvm for part 3. Exit status 0 when all pass.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import sys
import threading
import time

from vmig.config import VmConfig
from vmig.memory import GuestMemory
from vmig.uffd import Userfaultfd
from vmig.units import PAGE_SIZE, format_size
from vmig.vmm.machine import Machine, VmState, install_kick_handler

STALL_S = 0.3
WAIT_S = 10.0
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
CLK_TCK = os.sysconf("SC_CLK_TCK")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
failures: list[str] = []


def check(ok: bool, text: str) -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {text}", flush=True)
    if not ok:
        failures.append(text)
    return ok


def percentiles(seconds: list[float]) -> str:
    if not seconds:
        return "p50 - p99 -"
    ordered = sorted(seconds)
    p50 = ordered[len(ordered) // 2]
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {p50 * 1e6:.0f} us, p99 {p99 * 1e6:.0f} us"


class Server:
    """Serves faults from an image on its own thread; records how long each took."""

    def __init__(self, uffd: Userfaultfd, base: int, image_addr: int) -> None:
        self.uffd, self.base, self.image_addr = uffd, base, image_addr
        self.faults = self.copied = self.already_there = 0
        self.service: list[float] = []  # fault read -> its page copied (queueing included)
        self.copy_time: list[float] = []  # the UFFDIO_COPY ioctl alone
        self.first_fault = self.last_fault = 0.0
        self.error: BaseException | None = None
        self.serving = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="uffd-server", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.serving.wait()
            while not self._stop.is_set():
                if not self.uffd.wait(0.05):
                    continue
                addrs = self.uffd.read_faults()
                seen = time.perf_counter()
                if addrs and not self.first_fault:
                    self.first_fault = seen
                for addr in addrs:
                    began = time.perf_counter()
                    n = self.uffd.copy(addr, self.image_addr + addr - self.base, PAGE_SIZE)
                    done = time.perf_counter()
                    self.copy_time.append(done - began)
                    self.service.append(done - seen)
                    self.copied += n
                    self.already_there += n == 0
                    self.faults += 1
                    self.last_fault = done
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        self.serving.set()
        self._thread.join(WAIT_S)


def vcpu_cpu_ticks() -> dict[str, int]:
    """utime + stime (clock ticks) of each vCPU thread (named vcpuN by vmig.vmm)."""
    ticks = {}
    for thread in threading.enumerate():
        if thread.name.startswith("vcpu") and thread.native_id is not None:
            try:
                with open(f"/proc/self/task/{thread.native_id}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks[thread.name] = int(fields[11]) + int(fields[12])
    return ticks


def memfd_map(size: int) -> tuple[int, mmap.mmap, int]:
    fd = os.memfd_create("vmig-uffd-probe", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    mapping = mmap.mmap(fd, size, mmap.MAP_SHARED)
    anchor = ctypes.c_char.from_buffer(mapping)
    addr = ctypes.addressof(anchor)
    del anchor
    return fd, mapping, addr


def probe_host_thread(pages: int) -> None:
    size = pages * PAGE_SIZE
    fd, mapping, base = memfd_map(size)
    image = (ctypes.c_char * size)()
    ctypes.memset(image, 0xA5, size)
    with Userfaultfd() as uffd:
        print(f"     userfaultfd API: features {uffd.features:#x}, ioctls {uffd.ioctls:#x}")
        uffd.register(base, size)
        server = Server(uffd, base, ctypes.addressof(image))
        server.serving.set()
        round_trip: list[float] = []
        began = time.perf_counter()
        for index in range(pages):
            t0 = time.perf_counter()
            ctypes.memset(base + index * PAGE_SIZE, 1, 1)  # GIL released while it faults
            round_trip.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - began
        server.stop()
        intact = mapping[PAGE_SIZE:PAGE_SIZE + 2] == b"\x01\xa5"
        check(server.error is None and server.faults == pages and intact,
              f"host thread: {server.faults} of {pages} faults served in {elapsed:.2f} s "
              f"({pages / elapsed:,.0f}/s); round trip {percentiles(round_trip)}; "
              f"UFFDIO_COPY {percentiles(server.copy_time)}")
    mapping.close()
    os.close(fd)


def _faults_after(uffd: Userfaultfd, addr: int) -> list[int]:
    """Touch `addr` from a thread (GIL released); serve the fault if one comes."""
    source = ctypes.create_string_buffer(PAGE_SIZE)
    toucher = threading.Thread(target=lambda: ctypes.memset(addr, 2, 1), daemon=True)
    toucher.start()
    faults: list[int] = []
    if uffd.wait(0.5):
        faults = uffd.read_faults()
        for fault in faults:
            uffd.copy(fault, ctypes.addressof(source), PAGE_SIZE)
    toucher.join(WAIT_S)
    return faults


def probe_missing_again() -> None:
    fd, mapping, base = memfd_map(4 * PAGE_SIZE)
    source = ctypes.create_string_buffer(PAGE_SIZE)
    with Userfaultfd() as uffd:
        uffd.register(base, 4 * PAGE_SIZE)
        for page in range(2):
            uffd.copy(base + page * PAGE_SIZE, ctypes.addressof(source), PAGE_SIZE)
        again = uffd.copy(base, ctypes.addressof(source), PAGE_SIZE)
        check(again == 0, f"UFFDIO_COPY onto a present page: EEXIST, {again} bytes copied")
        rc = _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, PAGE_SIZE)
        faults = _faults_after(uffd, base)
        check(rc == 0 and faults == [base],
              f"memfd fallocate(PUNCH_HOLE) on a present page: it faults again "
              f"({len(faults)} fault)")
        mapping.madvise(mmap.MADV_DONTNEED, PAGE_SIZE, PAGE_SIZE)
        faults = _faults_after(uffd, base + PAGE_SIZE)
        check(faults == [], f"MADV_DONTNEED on the shared mapping: the page stays present "
              f"({len(faults)} faults; the page cache keeps it)")
    mapping.close()
    os.close(fd)


def probe_vm(args: argparse.Namespace) -> None:
    config = VmConfig.build(memory=args.memory, cpus=args.cpus, workload="dirty",
                            working_set=args.working_set, dirty_rate=args.dirty_rate)
    size, ws_gpa, ws_bytes = config.memory_bytes, config.working_set_gpa, config.working_set_bytes
    ws_end = ws_gpa + ws_bytes
    with Machine.boot(config) as source:
        time.sleep(0.5)
        source.pause()
        state = source.save_state()
        image = (ctypes.c_char * size)()
        ctypes.memmove(image, source.memory.host_addr, size)
    image_addr = ctypes.addressof(image)
    print(f"     guest booted, ran, paused, saved: {format_size(size)}, {config.cpus} vCPUs, "
          f"working set {format_size(ws_bytes)} at {ws_gpa:#x} left missing")

    memory = GuestMemory.create(size)
    ctypes.memmove(memory.host_addr, image_addr, ws_gpa)
    ctypes.memmove(memory.host_addr + ws_end, image_addr + ws_end, size - ws_end)
    uffd = Userfaultfd()
    server: Server | None = None
    machine: Machine | None = None
    try:
        uffd.register(memory.host_addr + ws_gpa, ws_bytes)
        server = Server(uffd, memory.host_addr, image_addr)
        machine = Machine.restore(state, memory, resume=True)
        pending = uffd.wait(WAIT_S)
        time.sleep(0.05)
        frozen = machine.guest_counters()["heartbeat"]
        time.sleep(STALL_S)
        still = machine.guest_counters()["heartbeat"] == frozen
        check(pending and still and machine.state is VmState.RUNNING,
              f"vCPUs block on a missing page: fault queued {pending}, heartbeat still for "
              f"{STALL_S} s {still}, VM {machine.state.value}")
        # Ask for a pause while the vCPUs sit in their faults, then serve.
        paused = threading.Event()
        pauser = threading.Thread(target=lambda: (machine.pause(), paused.set()), daemon=True)
        ticks_before = vcpu_cpu_ticks()
        pauser.start()
        time.sleep(STALL_S)
        ticks = {name: t - ticks_before.get(name, 0) for name, t in vcpu_cpu_ticks().items()}
        busy = ", ".join(f"{name} {100 * t / CLK_TCK / STALL_S:.0f}%"
                         for name, t in sorted(ticks.items()))
        print(f"     pause asked while the vCPUs wait for pages: parked before any page came: "
              f"{paused.is_set()}; vCPU threads' CPU meanwhile: {busy}")
        serve_began = time.perf_counter()
        server.serving.set()
        pauser.join(WAIT_S + 5)
        check(paused.is_set() and machine.state is VmState.PAUSED,
              f"that pause completes once the pages are served "
              f"({(time.perf_counter() - serve_began) * 1000:.0f} ms after serving began)")
        frozen = machine.guest_counters()["heartbeat"]
        machine.resume()
        deadline = time.monotonic() + WAIT_S
        while machine.guest_counters()["heartbeat"] == frozen and time.monotonic() < deadline:
            time.sleep(0.01)
        grown = machine.guest_counters()["heartbeat"]
        check(grown > frozen, f"UFFDIO_COPY wakes them: heartbeat {frozen} -> {grown}, "
              f"{server.faults} faults served so far")
        faults_before = server.faults
        began = time.perf_counter()
        result = machine.check_guest()
        check_s = time.perf_counter() - began
        during = server.faults - faults_before  # at most one short: see server.stop() below
        check(result["ok"] and result["pages_checked"] == config.working_set_pages,
              f"guest self-check: {result['pages_checked']} pages checked, "
              f"{result['bad_pages']} bad, in {check_s:.2f} s, faulting in {during} pages "
              f"({during / check_s:,.0f}/s: one every {check_s / max(during, 1) * 1e6:.0f} us "
              f"with {config.cpus} vCPUs faulting)")
        server.stop()  # the last copy wakes the vCPU before the server counts it
        span = server.last_fault - server.first_fault
        check(server.error is None and server.copied == ws_bytes,
              f"faults served {server.faults} ({format_size(server.copied)} copied, "
              f"{server.already_there} already there) in {span:.2f} s "
              f"({server.faults / max(span, 1e-9):,.0f}/s); service {percentiles(server.service)};"
              f" UFFDIO_COPY {percentiles(server.copy_time)}")
        uffd.unregister(memory.host_addr + ws_gpa, ws_bytes)
    finally:
        if server is not None:
            server.stop()
        uffd.close()
        if machine is not None:
            machine.shutdown()
        memory.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=4096, help="faults for part 1")
    parser.add_argument("--memory", default="128M")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--working-set", default="32M")
    parser.add_argument("--dirty-rate", type=int, default=20_000)
    parser.add_argument("--no-vm", action="store_true", help="skip part 3 (no /dev/kvm)")
    args = parser.parse_args()
    install_kick_handler()
    probe_host_thread(args.pages)
    probe_missing_again()
    if not args.no_vm:
        probe_vm(args)
    print("VERDICT:", "post-copy with userfaultfd works here with vmig's VMM" if not failures
          else f"FAIL ({len(failures)} checks)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
