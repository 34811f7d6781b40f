"""Where a received MEMORY request's pages go: straight into guest memory.

`write_memory` is pre-copy's path (MAIN and every MEMORY connection, between CONFIG
and STATE): plain pages are read with `recv_into` into views of guest memory, a
zstd frame is read once and decompressed into those views, ZERO ranges are
discarded (holes read as zeros). `install_memory` is post-copy's: the pages may be
missing and registered with userfaultfd, so they go in through UFFDIO_COPY
(`PostcopyService.install`) rather than through the mapping.

`AllocateAhead` prepares a fresh destination: from CONFIG on, one thread allocates
the parts of guest memory that hold data at the source (CONFIG's ``data_extents``)
in the order they will come, so that the receiving threads find the pages there
instead of allocating each in a fault (docs/performance.md, "Preparing a fresh
destination"). It stays ahead of the data or skips to it: where the data outruns it
(the source skipped zero pages there), allocating behind it would only spend CPU and
memory on pages that never come. It also makes a destination short of memory fail at
once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import zstandard

from vmig.errors import GuestMemoryError, MigrationError
from vmig.memory import GuestMemory
from vmig.migration.postcopy import PostcopyService
from vmig.proto import MemoryFlags, MemoryRequest
from vmig.ranges import RangeTable
from vmig.transport.channel import ReceiverChannel

__all__ = ["ALLOCATE_STEP_BYTES", "AllocateAhead", "install_memory",
           "write_memory"]

log = logging.getLogger(__name__)

#: AllocateAhead's unit: small enough to stop promptly, large enough that the calls
#: cost nothing next to the allocation (64 calls per GiB).
ALLOCATE_STEP_BYTES = 16 << 20


def _check_bounds(ranges: RangeTable, memory: GuestMemory) -> None:
    gpas, lengths = ranges.as_arrays()
    if len(gpas) and int((gpas + lengths).max()) > memory.size:
        raise GuestMemoryError(f"MEMORY range ends past guest memory "
                               f"({int((gpas + lengths).max()):#x} > {memory.size:#x})")


def write_memory(channel: ReceiverChannel, memory: GuestMemory, request: MemoryRequest, *,
                 compress: bool) -> None:
    """Read one MEMORY request's payload into `memory` (pre-copy)."""
    _check_bounds(request.ranges, memory)
    if request.flags & MemoryFlags.ZERO:  # the pages became zero at the source
        channel.receive_payload([])
        for gpa, length in request.ranges:
            memory.backing.discard(gpa, length)
        return
    if request.flags & MemoryFlags.ZSTD and not compress:
        raise MigrationError("a compressed MEMORY arrived although START did not set COMPRESS")
    views = memory.views(request.ranges)
    try:
        if request.flags & MemoryFlags.ZSTD:
            _decompress(channel, request, views)
        else:
            channel.receive_payload(views)
    finally:
        for view in views:
            view.release()


def install_memory(channel: ReceiverChannel, service: PostcopyService,
                   request: MemoryRequest) -> None:
    """Post-copy's background push: through UFFDIO_COPY (the pages may be missing and
    registered: writing them through the mapping would fault on ourselves). Waits for
    one of the service's push slots first (`PUSH_INSTALLERS`: the fault threads' share
    of the GIL and the cores)."""
    _check_bounds(request.ranges, service.memory)
    with service.push_slots:
        _install(channel, service, request)


def _install(channel: ReceiverChannel, service: PostcopyService,
             request: MemoryRequest) -> None:
    if request.flags & MemoryFlags.ZERO:
        channel.receive_payload([])
        for gpa, length in request.ranges:
            service.zero(gpa, length)
        return
    if request.flags & MemoryFlags.ZSTD:
        raise MigrationError("compressed MEMORY during post-copy is not supported")
    buffer = channel.scratch(request.payload_bytes)
    view = memoryview(buffer)[:request.payload_bytes]
    try:
        channel.receive_payload([view])
        offset = 0
        for gpa, length in request.ranges:
            with view[offset:offset + length] as pages:
                service.install(gpa, pages)
            offset += length
    finally:
        view.release()


def _decompress(channel: ReceiverChannel, request: MemoryRequest,
                views: list[memoryview]) -> None:
    """Read a zstd frame, then decompress it straight into guest memory (`views`)."""
    frame = channel.scratch(request.payload_bytes)
    compressed = memoryview(frame)[:request.payload_bytes]
    channel.receive_payload([compressed])
    # `compressed` is not released explicitly: the reader holds it. scratch() makes a
    # new buffer when it needs a bigger one, so this one is never resized under it.
    reader = _decompressor().stream_reader(compressed)
    try:
        for view in views:
            done = 0
            while done < len(view):
                with view[done:] as rest:
                    got = reader.readinto(rest)
                if not got:
                    raise MigrationError("a compressed MEMORY frame ended early")
                done += got
        if reader.read(1):
            raise MigrationError("a compressed MEMORY frame holds more than its ranges")
    except zstandard.ZstdError as exc:
        raise MigrationError(f"a compressed MEMORY frame is corrupt: {exc}") from None
    finally:
        reader.close()


_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor (one per connection thread: they are not shared)."""
    decompressor = getattr(_local, "zstd", None)
    if decompressor is None:
        decompressor = _local.zstd = zstandard.ZstdDecompressor()
    return decompressor


class AllocateAhead:
    """One thread (``migrate-alloc``) that allocates `extents` of `memory` in order.

    Its calls release the GIL. A failure (ENOMEM, ENOSPC) goes to `on_failure` with a
    reason, once. `close()` stops it between steps and joins it; idempotent.
    """

    def __init__(self, memory: GuestMemory, extents: Sequence[tuple[int, int]],
                 on_failure: Callable[[str], None]) -> None:
        self._memory = memory
        self._extents = list(extents)
        self._on_failure = on_failure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="migrate-alloc", daemon=True)
        self.allocated = 0
        #: About the highest guest address received so far; the allocator does not
        #: work below it. Set without a lock: a lost update costs one step at most.
        self._frontier = 0

    def received(self, ranges: RangeTable) -> None:
        """The receiving threads got `ranges`: move the frontier past them."""
        if len(ranges):
            end = ranges[-1].end
            if end > self._frontier:
                self._frontier = end

    def start(self) -> AllocateAhead:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            for gpa, length in self._extents:
                end = gpa + length
                while gpa < end:
                    if self._stop.is_set():
                        return
                    gpa = max(gpa, self._frontier)  # the data is past here: skip ahead
                    if gpa >= end:
                        break
                    step = min(ALLOCATE_STEP_BYTES, end - gpa)
                    self._memory.backing.allocate(gpa, step)
                    self.allocated += step
                    gpa += step
        except GuestMemoryError as exc:
            self._on_failure(f"the destination cannot hold the guest's memory: {exc}")
        except Exception as exc:  # never silently: the migration must not go on blind
            log.exception("allocating guest memory ahead failed")
            self._on_failure(f"allocating guest memory failed: {exc}")

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
