"""Post-copy: the destination runs the guest while its last pages arrive.

Receiver side, `PostcopyService`: the pages the source still owes are punched out of
guest memory and the whole mapping is registered with userfaultfd (missing mode),
so a vCPU that touches one of them blocks in the kernel. The ``migrate-fault``
thread reads those faults: an owed page is asked for on the FAULT connection (one
page, at once), any other missing page never held data and is filled with zeros
locally. The ``migrate-fault-rx`` thread reads the answers and installs them with
UFFDIO_COPY, which wakes the vCPU. Pages pushed in the background (MEMORY on the
data connections) are installed the same way (`install`); whichever copy comes
first wins, the other finds the page present (EEXIST) and is dropped. At most `PUSH_INSTALLERS`
push requests are received and installed at once, so that the fault threads do not
queue for the GIL and the cores behind one thread per data connection.

Sender side, `FaultResponder`: the ``migrate-fault-srv`` thread answers each page
request from the paused source's memory and asks the push to send the chunks near
it next.

The destination times each remote fault, from reading it to the page installed
(`latency_figures`, vmig.migration.faultstats: QEMU's latency histogram and blocktime,
per vCPU where userfaultfd names the faulting thread).

Neither side holds the whole VM while this runs: the destination has the newest
vCPU state and the pages that arrived, the source the rest. A lost FAULT connection
(protocol version 3) is resumed: the source re-dials it (`redial`), the destination
waits for it (`resume`) and then asks again for every page it asked for and still
lacks; vCPUs that need one of them wait meanwhile, the others run on. Only if the
migration fails does the destination stop its VM (it cannot run without the pages),
and the source keeps its VM paused, exactly as it was at the switch-over; resuming it
rolls the guest back to that moment (docs/protocol.md, "Post-copy").
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from vmig.errors import MigrationError, TransportError, VmigError, describe
from vmig.memory import GuestMemory
from vmig.migration.faultstats import FaultStats
from vmig.ranges import RangeTable
from vmig.transport.channel import DestinationFaultChannel, SourceFaultChannel
from vmig.uffd import UFFD_FEATURE_THREAD_ID, Userfaultfd
from vmig.units import PAGE_SHIFT, PAGE_SIZE

log = logging.getLogger(__name__)

FAULT_POLL_S = 0.05  # how often the fault thread looks at its stop flag
#: The push sends the queued chunks this close to a fault first.
PRIORITY_WINDOW_BYTES = 4 << 20
#: Push requests the destination receives and installs at once (the other data
#: connections wait their turn). Each one in flight is a thread the fault threads share
#: the GIL and the cores with; on 2 cores, 8 at once doubled the faults' wait and made
#: the push no faster than 2 (docs/performance.md, "Post-copy fault latency").
PUSH_INSTALLERS = 2

OnServed = Callable[[RangeTable], None]
#: Source: (the lost FAULT channel, why) -> the resumed one (raises when it cannot be).
Redial = Callable[[SourceFaultChannel, str], "SourceFaultChannel"]
#: Destination: (the lost FAULT channel, why) -> the resumed one, or None (ending).
Resume = Callable[[DestinationFaultChannel, str], "DestinationFaultChannel | None"]


#: The fault threads' scheduling: real time (SCHED_FIFO at its lowest priority), so a
#: fault's answer, which crosses three threads (migrate-fault, migrate-fault-srv at the
#: source, migrate-fault-rx), never waits for a time slice behind the push's threads and
#: the vCPUs. They sleep until a fault comes and then hold a core for the few system
#: calls of one answer (the kernel's real-time throttling keeps 5% for the rest even
#: so). With a normal nice value alone (-10), p50 and p99 were twice as long
#: (docs/performance.md, "Post-copy fault latency"). SCHED_RESET_ON_FORK: a thread they
#: start is an ordinary one. Both need CAP_SYS_NICE; without it the threads try the nice
#: value, then run at the default priority.
FAULT_THREAD_FIFO_PRIORITY = 1
FAULT_THREAD_NICE = -10


def _prefer_this_thread() -> None:
    thread = threading.get_native_id()
    try:
        os.sched_setscheduler(thread, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK,
                              os.sched_param(FAULT_THREAD_FIFO_PRIORITY))
    except OSError:  # not allowed: the nice value, where even that is
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, thread, FAULT_THREAD_NICE)


def check_userfaultfd() -> str | None:
    """None if this host can run post-copy, or why not."""
    try:
        Userfaultfd().close()
    except VmigError as exc:
        return f"userfaultfd is not available here: {exc}"
    return None


class PostcopyService:
    """The destination's side of post-copy for one guest memory (see the module doc)."""

    def __init__(self, memory: GuestMemory, owed: RangeTable, channel: DestinationFaultChannel,
                 on_failure: Callable[[str], None], resume: Resume | None = None,
                 vcpu_threads: dict[int, int] | None = None) -> None:
        """`vcpu_threads`: the vCPU threads' kernel ids -> vCPU index, for the per-vCPU
        blocktime (when userfaultfd can name the faulting thread)."""
        self.memory = memory
        self._vcpu_threads = dict(vcpu_threads or {})
        self._channel = channel
        self._on_failure = on_failure
        self._resume = resume
        self._send_lock = threading.Lock()  # the fault thread asks, the rx thread re-asks
        pages = memory.size >> PAGE_SHIFT
        self._owed = np.zeros(pages, dtype=bool)
        for gpa, length in owed:
            self._owed[gpa >> PAGE_SHIFT:(gpa + length) >> PAGE_SHIFT] = True
        self.owed_pages = int(self._owed.sum())
        self._present = np.zeros(pages, dtype=bool)
        self._requested = np.zeros(pages, dtype=bool)
        self._lock = threading.Lock()
        #: Held by each push request while it is received and installed (`install_memory`).
        self.push_slots = threading.BoundedSemaphore(PUSH_INSTALLERS)
        self._left = self.owed_pages
        self._latency = FaultStats()  # the remote faults' service times (under _lock)
        self._asked_at: dict[int, float] = {}
        self._stopping = threading.Event()
        self._uffd: Userfaultfd | None = None
        self._threads: list[threading.Thread] = []
        self.faults = 0
        self.local_zero_pages = 0

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Punch the owed pages out, register the mapping, start the threads (the VM is
        resumed by the caller after this)."""
        for gpa, length in self._owed_ranges():
            self.memory.backing.discard(gpa, length)
        self._uffd = self._open_userfaultfd()
        self._uffd.register(self.memory.host_addr, self.memory.size)
        for name, target in (("migrate-fault", self._serve_faults),
                             ("migrate-fault-rx", self._read_pages)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()

    def _open_userfaultfd(self) -> Userfaultfd:
        """A userfaultfd that names the faulting thread, if the kernel can and the vCPU
        threads are known (then the blocktime is per vCPU too); a plain one otherwise."""
        if self._vcpu_threads:
            with contextlib.suppress(VmigError):
                uffd = Userfaultfd(UFFD_FEATURE_THREAD_ID)
                self._latency = FaultStats(vcpus=max(self._vcpu_threads.values()) + 1)
                return uffd
        self._vcpu_threads = {}
        return Userfaultfd()

    def _owed_ranges(self) -> RangeTable:
        pages = self._owed
        edges = np.flatnonzero(np.diff(np.concatenate(([0], pages.view(np.int8), [0]))))
        starts, ends = edges[0::2], edges[1::2]
        return RangeTable.from_arrays((starts << PAGE_SHIFT).astype(np.uint64),
                                      ((ends - starts) << PAGE_SHIFT).astype(np.uint64))

    def close(self) -> None:
        """Stop the threads and let go of userfaultfd (a vCPU still waiting for a page is
        released: call this only when the guest no longer needs the pages, or is being
        stopped anyway). Idempotent."""
        self._stopping.set()
        self._channel.shutdown()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(10)
        uffd, self._uffd = self._uffd, None
        if uffd is not None:
            with contextlib.suppress(VmigError):
                uffd.unregister(self.memory.host_addr, self.memory.size)
            uffd.close()

    # --- figures -------------------------------------------------------------------------

    @property
    def pages_left(self) -> int:
        return self._left

    def latency_figures(self) -> dict[str, Any]:
        """The remote faults' service times so far (fault read -> page installed): the
        histogram, count, p50, p99, max and blocktime (vmig.migration.faultstats)."""
        with self._lock:
            latency, now = self._latency.snapshot(), time.monotonic()
        return latency.figures(now)

    # --- installing pages ----------------------------------------------------------------

    def install(self, gpa: int, data: memoryview) -> None:
        """Put pages that arrived (push or fault answer) in place with UFFDIO_COPY; pages
        already there are left alone."""
        uffd = self._uffd
        if uffd is None:
            raise MigrationError("post-copy has ended")
        address = ctypes.addressof(ctypes.c_char.from_buffer(data))
        uffd.copy(self.memory.host_addr + gpa, address, len(data))
        self._mark(gpa, len(data))

    def zero(self, gpa: int, length: int) -> None:
        """Pages that are all zeros now (a ZERO range pushed by the source)."""
        uffd = self._uffd
        if uffd is None:
            raise MigrationError("post-copy has ended")
        uffd.zeropage(self.memory.host_addr + gpa, length)
        self._mark(gpa, length)

    def _mark(self, gpa: int, length: int) -> None:
        first, last = gpa >> PAGE_SHIFT, (gpa + length) >> PAGE_SHIFT
        with self._lock:
            now = time.monotonic()  # installed (and woken); under the lock: after any ask
            fresh = self._owed[first:last] & ~self._present[first:last]
            self._left -= int(fresh.sum())
            self._present[first:last] = True
            # the pages asked for are few (about one per vCPU), a pushed range has
            # thousands: look the asked ones up, not every page of the range
            for page in [page for page in self._asked_at if first <= page < last]:
                self._latency.served(self._asked_at.pop(page), now)
                self._latency.installed(page, now)

    # --- the threads -------------------------------------------------------------------------

    def _serve_faults(self) -> None:
        """migrate-fault: a missing page touched -> ask for it, or fill it with zeros."""
        _prefer_this_thread()
        uffd = self._uffd
        assert uffd is not None
        try:
            while not self._stopping.is_set():
                if not uffd.wait(FAULT_POLL_S):
                    continue
                events = uffd.read_fault_threads()
                read_at = time.monotonic()  # the faults' clock starts when they are read
                threads: dict[int, list[int]] = {}  # page address -> the threads faulting
                for address, thread in events:
                    threads.setdefault(address, []).append(thread)
                for address, faulting in threads.items():
                    self._fault(uffd, address - self.memory.host_addr, read_at, faulting)
        except BaseException as exc:
            if not self._stopping.is_set():
                self._on_failure(f"post-copy fault service failed: {describe(exc)}")

    def _fault(self, uffd: Userfaultfd, gpa: int, read_at: float, threads: list[int]
               ) -> None:
        page = gpa >> PAGE_SHIFT
        if not 0 <= page < len(self._owed):
            return
        self.faults += 1
        with self._lock:
            owed, present, asked = self._owed[page], self._present[page], self._requested[page]
            if owed and not present and not asked:
                self._requested[page] = True
                self._asked_at[page] = read_at
                self._latency.asked(read_at)
            if owed and not present:
                for thread in threads:
                    vcpu = self._vcpu_threads.get(thread)
                    if vcpu is not None:
                        self._latency.vcpu_waiting(vcpu, page, read_at)
        if present:
            uffd.wake(gpa & ~(PAGE_SIZE - 1), PAGE_SIZE)  # installed meanwhile
        elif not owed:  # never held data here or at the source: zeros
            uffd.zeropage(self.memory.host_addr + (page << PAGE_SHIFT), PAGE_SIZE)
            self.local_zero_pages += 1
        elif not asked:
            # a lost connection: the page is asked for again once it is resumed
            with self._send_lock, contextlib.suppress(TransportError):
                self._channel.request(RangeTable([(page << PAGE_SHIFT, PAGE_SIZE)]))

    def _read_pages(self) -> None:
        """migrate-fault-rx: the source's answers, installed as they come; a lost
        connection is waited for (resumed), and what is still missing asked for again."""
        _prefer_this_thread()
        buffer = bytearray(PAGE_SIZE * 16)
        try:
            while not self._stopping.is_set():
                try:
                    pages = self._channel.next_pages()
                    if pages is None:
                        raise TransportError("the source closed the FAULT connection")
                    if len(buffer) < pages.payload_bytes:
                        buffer = bytearray(pages.payload_bytes)
                    view = memoryview(buffer)[:pages.payload_bytes]
                    self._channel.receive_pages(view)
                except TransportError as exc:
                    if self._stopping.is_set() or not self._resumed(describe(exc)):
                        return
                    continue
                offset = 0
                for gpa, length in pages.ranges:
                    self.install(gpa, view[offset:offset + length])
                    offset += length
        except BaseException as exc:
            if not self._stopping.is_set():
                self._on_failure(f"post-copy failed: the FAULT connection was lost "
                                 f"({describe(exc)})")

    def _resumed(self, cause: str) -> bool:
        """Wait for the lost FAULT connection to be resumed, then ask again for what was
        asked and has not come. False when it will not be (the migration is ending)."""
        if self._resume is None:
            raise TransportError(cause)
        lost = self._channel
        channel = self._resume(lost, cause)
        if channel is None:
            return False
        with self._send_lock:
            self._channel = channel
            with self._lock:
                missing = np.flatnonzero(self._requested & ~self._present)
            for page in missing:
                with contextlib.suppress(TransportError):  # lost again: the next resume asks
                    channel.request(RangeTable([(int(page) << PAGE_SHIFT, PAGE_SIZE)]))
        log.info("post-copy: the FAULT connection is back; %d pages asked for again",
                 len(missing))
        return True


class FaultResponder:
    """The source's side of the FAULT connection: one thread (``migrate-fault-srv``)
    answers each page request from guest memory and tells `on_served` which pages went.
    It owns the channel from construction on (and the resumed ones `redial` gives);
    `close()` ends the thread and closes it."""

    def __init__(self, channel: SourceFaultChannel, memory: GuestMemory, on_served: OnServed,
                 redial: Redial | None = None) -> None:
        self.channel = channel
        self._memory = memory
        self._on_served = on_served
        self._redial = redial
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="migrate-fault-srv",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        _prefer_this_thread()
        try:
            while not self._stopping.is_set():
                try:
                    self._answer_requests()
                    return  # the destination closed it: the end
                except TransportError as exc:
                    if self._stopping.is_set() or self._redial is None:
                        raise
                    self.channel = self._redial(self.channel, describe(exc))
        except (VmigError, OSError) as exc:
            if not self._stopping.is_set():
                log.warning("post-copy: the FAULT connection failed: %s", describe(exc))

    def _answer_requests(self) -> None:
        channel = self.channel
        while (ranges := channel.next_request()) is not None:
            views = self._memory.views(ranges)
            try:
                channel.answer(ranges, views)
            finally:
                for view in views:
                    view.release()
            self._on_served(ranges)

    def shutdown(self) -> None:
        """Wake the thread (from any thread): a cancel."""
        self._stopping.set()
        self.channel.shutdown()

    def close(self) -> None:
        """Stop answering (the connection is shut down under the thread), join, close."""
        self.shutdown()
        if self._thread.is_alive():
            self._thread.join(10)
        self.channel.close()


def split_owed(dirty: np.ndarray, memory_size: int,
               vmm_pages: Iterable[tuple[int, int]]) -> tuple[RangeTable, RangeTable]:
    """The sender's pages still owed at the switch to post-copy (`dirty`, a bitmap of u64
    words), split in two: those the destination's VMM itself reads (sent before STATE,
    so that restoring never faults) and the rest (listed in POSTCOPY, pushed after)."""
    pages = memory_size // PAGE_SIZE
    owed = np.unpackbits(dirty.view(np.uint8), bitorder="little")[:pages].astype(bool)
    eager = np.zeros(pages, dtype=bool)
    for gpa, length in vmm_pages:
        eager[gpa // PAGE_SIZE:(gpa + length) // PAGE_SIZE] = True
    return (RangeTable.from_bitmap(_words(owed & eager), 0, PAGE_SIZE),
            RangeTable.from_bitmap(_words(owed & ~eager), 0, PAGE_SIZE))


def _words(pages: np.ndarray) -> np.ndarray:
    """A bool-per-page array as the u64 bitmap words `RangeTable.from_bitmap` takes."""
    bits = np.packbits(pages, bitorder="little")
    padded = np.zeros((len(bits) + 7) // 8 * 8, dtype=np.uint8)
    padded[:len(bits)] = bits
    return padded.view(np.uint64)
