"""Guest RAM's backing: one shared mapping of a memfd or file, and its housekeeping.

`MemoryBacking` owns the fd and the MAP_SHARED mapping (another process can map the
same pages: the memfd is what a local migration hands over with SCM_RIGHTS, and
`--memory-file` behaves like QEMU's memory-backend-file with share=on). It manages the
host side of guest RAM: prefaulting (`populate`), reserving (`allocate`), freeing
(`discard`) and finding the parts that hold data (`data_extents`). Access by guest
address is `GuestMemory`'s (vmig.memory.guest).

These call libc through ctypes, which lets go of the GIL for the length of the call:
CPython's own ``mmap.madvise`` keeps it, and a half-second MADV_POPULATE_WRITE would
stall every other thread of the process (see /work/shared/notes/baselines.md).
"""

from __future__ import annotations

import ctypes
import errno
import gc
import logging
import mmap
import os
from collections.abc import Callable

from vmig.errors import GuestMemoryError
from vmig.units import PAGE_SIZE, format_size

log = logging.getLogger(__name__)

MADV_POPULATE_WRITE = 23  # linux/mman.h, 5.14+: prefault writable pages in one call
FALLOC_FL_KEEP_SIZE = 0x01  # linux/falloc.h
FALLOC_FL_PUNCH_HOLE = 0x02

# Foreign calls through a CDLL release the GIL while they run (a PyDLL would not).
_libc = ctypes.CDLL(None, use_errno=True)
_madvise = _libc.madvise
_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_madvise.restype = ctypes.c_int
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def _retrying(call: str, fn: Callable[..., int], *args: object) -> int:
    """Call a libc function that returns -1 with errno set; retry on EINTR; 0 or the errno."""
    while True:
        if fn(*args) == 0:
            return 0
        err = ctypes.get_errno()
        if err != errno.EINTR:
            log.debug("%s failed: %s", call, os.strerror(err))
            return err


def host_available_memory() -> int:
    """MemAvailable + SwapFree from /proc/meminfo, in bytes."""
    fields: dict[str, int] = {}
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            name, _, rest = line.partition(":")
            fields[name] = int(rest.split()[0]) * 1024
    return fields.get("MemAvailable", 0) + fields.get("SwapFree", 0)


class MemoryBacking:
    """The host side of guest RAM: `size` bytes of a memfd or file, mapped shared.

    Owns the fd and the mapping. `buffer` is a writable memoryview of the whole
    mapping; views sliced from it must be released before `close()` (Python refuses to
    unmap exported buffers).
    """

    def __init__(self, fd: int, size: int, path: str | None = None) -> None:
        self._fd = fd
        self.size = size
        self.path = path
        try:
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            raise GuestMemoryError(f"cannot map {format_size(size)} of guest memory: "
                                   f"{exc.strerror}") from None
        anchor = ctypes.c_char.from_buffer(self._map)
        self.host_addr = ctypes.addressof(anchor)
        del anchor  # keep no exported pointer, so that close() can unmap
        self.buffer = memoryview(self._map)
        self._populate_unsupported = False

    @classmethod
    def create(cls, size: int, path: str | None = None) -> MemoryBacking:
        """`size` bytes of new backing: an anonymous memfd, or the file at `path`."""
        if size <= 0 or size % PAGE_SIZE:
            raise GuestMemoryError(f"bad guest memory size {size}: must be a multiple of 4 KiB")
        if path is None:
            available = host_available_memory()
            if size > available:
                raise GuestMemoryError(
                    f"guest memory {format_size(size)} is more than the host can give "
                    f"({format_size(available)} available)"
                )
            fd = os.memfd_create("vmig-guest-ram", os.MFD_CLOEXEC)
        else:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise GuestMemoryError(f"cannot open memory file {path}: {exc.strerror}") from None
        try:
            if path is not None:
                current = os.fstat(fd).st_size
                if current not in (0, size):
                    raise GuestMemoryError(
                        f"memory file {path} holds {format_size(current)}, "
                        f"not the {format_size(size)} asked for"
                    )
                stat = os.fstatvfs(fd)
                if current == 0 and size > stat.f_bavail * stat.f_frsize:
                    raise GuestMemoryError(f"not enough space for {format_size(size)} at {path}")
            os.ftruncate(fd, size)
        except GuestMemoryError:
            os.close(fd)
            raise
        except OSError as exc:
            os.close(fd)
            raise GuestMemoryError(f"cannot size guest memory: {exc.strerror}") from None
        return cls(fd, size, path)

    @classmethod
    def from_fd(cls, fd: int, size: int) -> MemoryBacking:
        """Adopt an fd (e.g. a memfd received over SCM_RIGHTS); this object then owns it."""
        actual = os.fstat(fd).st_size
        if actual < size:
            os.close(fd)
            raise GuestMemoryError(f"memory fd holds {actual} bytes, expected {size}")
        return cls(fd, size)

    @property
    def is_open(self) -> bool:
        return self._fd >= 0

    @property
    def fd(self) -> int:
        self._check_open()
        return self._fd

    def _check_open(self) -> None:
        if self._fd < 0:
            raise GuestMemoryError("guest memory is closed")

    def check_range(self, gpa: int, length: int) -> None:
        """Raise GuestMemoryError unless [gpa, gpa+length) lies inside guest memory."""
        if gpa < 0 or length < 0 or gpa + length > self.size:
            raise GuestMemoryError(
                f"guest range {gpa:#x}+{length:#x} is outside guest memory (size {self.size:#x})"
            )

    def populate(self, gpa: int = 0, length: int | None = None) -> None:
        """Prefault [gpa, gpa+length) writable in one call (MADV_POPULATE_WRITE).

        Faulting page by page while bytes stream in costs several times more on
        these nested hosts; one madvise per received range does the same work in
        the kernel without a round trip per page. The range is widened to whole
        pages. The GIL is released during the call. On a kernel without
        MADV_POPULATE_WRITE (before 5.14) this does nothing: pages fault in on first
        touch. Raises GuestMemoryError if the kernel cannot provide the pages.
        """
        start, end = self._page_span(gpa, length)
        if end == start or self._populate_unsupported:
            return
        err = _retrying("madvise(MADV_POPULATE_WRITE)", _madvise, self.host_addr + start,
                        end - start, MADV_POPULATE_WRITE)
        if err == errno.EINVAL:  # an older kernel
            self._populate_unsupported = True
            log.info("this kernel has no MADV_POPULATE_WRITE: guest pages fault in on first use")
        elif err:
            raise GuestMemoryError(f"cannot populate guest memory {start:#x}+{end - start:#x}: "
                                   f"{os.strerror(err)}")

    def allocate(self, gpa: int = 0, length: int | None = None) -> None:
        """Allocate the backing pages of [gpa, gpa+length) (fallocate, mode 0).

        Reserves the memory (or file blocks) ahead of use, so that running out shows
        here as a GuestMemoryError instead of a SIGBUS or an OOM kill later. The pages
        keep reading as zeros. On a memfd (shmem) this does *not* map them or clear
        them: the first touch still faults, and clears the page then (see
        docs/performance.md); use `populate` to prefault. The GIL is released during
        the call.
        """
        start, end = self._page_span(gpa, length)
        if end == start:
            return
        err = _retrying("fallocate", _fallocate, self._fd, 0, start, end - start)
        if err:
            raise GuestMemoryError(f"cannot allocate guest memory {start:#x}+{end - start:#x}: "
                                   f"{os.strerror(err)}")

    def discard(self, gpa: int, length: int) -> None:
        """Free the pages of [gpa, gpa+length): they read as zeros again and hold no memory.

        fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) on the backing fd, which
        also drops the pages from every mapping of it (KVM's included: the guest sees
        zeros). For ranges that became all zeros, and for post-copy. `gpa` and `length`
        must be multiples of the page size. Not recorded as a VMM write (like `view`):
        a source that discards must send the range itself. The GIL is released during
        the call.
        """
        self._check_open()
        self.check_range(gpa, length)
        if gpa % PAGE_SIZE or length % PAGE_SIZE:
            raise GuestMemoryError(f"discard {gpa:#x}+{length:#x}: not whole pages")
        if length == 0:
            return
        err = _retrying("fallocate(PUNCH_HOLE)", _fallocate, self._fd,
                        FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, gpa, length)
        if err:
            raise GuestMemoryError(f"cannot discard guest memory {gpa:#x}+{length:#x}: "
                                   f"{os.strerror(err)}")

    def _page_span(self, gpa: int, length: int | None) -> tuple[int, int]:
        """[start, end) of the whole pages covering [gpa, gpa+length), checked."""
        self._check_open()
        length = self.size - gpa if length is None else length
        self.check_range(gpa, length)
        if length == 0:
            return gpa, gpa
        start = gpa - gpa % PAGE_SIZE
        end = gpa + length + (-(gpa + length)) % PAGE_SIZE  # size is whole pages
        return start, end

    def data_extents(self) -> list[tuple[int, int]]:
        """(gpa, length) of every part of the backing file that holds data.

        Holes (never-written pages of a memfd or sparse file) read as zeros, and a
        fresh destination is all zeros, so a first copy can skip them. Uses
        SEEK_DATA/SEEK_HOLE: no page is read or faulted in.
        """
        self._check_open()
        # The kernel's SEEK_HOLE walks page by page (about 12 ms per GiB of data on
        # tmpfs here); the allocated size answers the two common cases at once.
        allocated = os.fstat(self._fd).st_blocks * 512
        if allocated == 0:
            return []
        if allocated >= self.size and os.lseek(self._fd, 0, os.SEEK_END) <= self.size:
            return [(0, self.size)]
        extents: list[tuple[int, int]] = []
        offset = 0
        while offset < self.size:
            try:
                start = os.lseek(self._fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after offset
                break
            if start >= self.size:
                break
            end = min(os.lseek(self._fd, start, os.SEEK_HOLE), self.size)
            start_page = start - start % PAGE_SIZE
            end_page = min(end + (-end) % PAGE_SIZE, self.size)
            extents.append((start_page, end_page - start_page))
            offset = end_page
        return extents

    def close(self) -> None:
        """Unmap and close; idempotent. Views still handed out delay the unmapping."""
        if self._fd >= 0:
            self.buffer.release()
            try:
                self._map.close()
            except BufferError:
                gc.collect()  # a view only a reference cycle (a traceback) still holds
                try:
                    self._map.close()
                except BufferError:
                    log.warning("guest memory is still exported; it is unmapped when the "
                                "last view goes away")
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> MemoryBacking:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
