"""vmig.uffd without KVM: a thread that touches a missing page blocks until a handler fills it.

The touching is always done by ctypes.memset / ctypes.memmove, which release the GIL:
a Python thread that faults on a missing page while holding the GIL would stall the
whole interpreter, the handler thread included. Python code here only reads pages
that are known to be present.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from vmig.errors import GuestMemoryError
from vmig.uffd import (
    ABI_SIZES,
    UFFD_FEATURE_THREAD_ID,
    UFFDIO_API,
    UFFDIO_COPY,
    UFFDIO_REGISTER,
    UFFDIO_UNREGISTER,
    UFFDIO_WAKE,
    UFFDIO_ZEROPAGE,
    UffdError,
    Userfaultfd,
)
from vmig.units import PAGE_SIZE

PAGES = 16
SIZE = PAGES * PAGE_SIZE
SETTLE_S = 0.2  # how long a thread must stay blocked to count as blocked
JOIN_S = 5.0
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


class Region:
    """A mapping of SIZE bytes: memfd (MAP_SHARED, like GuestMemory), anonymous shared or
    anonymous private."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.fd = -1
        if kind == "memfd":
            self.fd = os.memfd_create("vmig-test-uffd", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, SIZE)
            self.map = mmap.mmap(self.fd, SIZE, mmap.MAP_SHARED)
        elif kind == "anon_shared":
            self.map = mmap.mmap(-1, SIZE, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        else:
            self.map = mmap.mmap(-1, SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        anchor = ctypes.c_char.from_buffer(self.map)
        self.addr = ctypes.addressof(anchor)
        del anchor

    def page(self, index: int) -> int:
        return self.addr + index * PAGE_SIZE

    def read(self, index: int, length: int = PAGE_SIZE) -> bytes:
        """Only for pages that are present (see the module docstring)."""
        return self.map[index * PAGE_SIZE:index * PAGE_SIZE + length]

    def close(self) -> None:
        self.map.close()
        if self.fd >= 0:
            os.close(self.fd)


class Source:
    """PAGES pages of recognisable content: page i is filled with byte 0x40 + i."""

    def __init__(self) -> None:
        self.buf = ctypes.create_string_buffer(b"".join(bytes([0x40 + i]) * PAGE_SIZE
                                                       for i in range(PAGES)), SIZE)
        self.addr = ctypes.addressof(self.buf)

    @staticmethod
    def content(index: int) -> bytes:
        return bytes([0x40 + index]) * PAGE_SIZE


class Handler:
    """Serves every fault in `region` by copying the page from `source`, on its own thread."""

    def __init__(self, uffd: Userfaultfd, region: Region, source: Source) -> None:
        self.uffd, self.region, self.source = uffd, region, source
        self.faults: list[int] = []
        self.copied = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="uffd-handler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.uffd.wait(0.05):
                    continue
                for addr in self.uffd.read_faults():
                    self.faults.append(addr)
                    offset = addr - self.region.addr
                    self.copied += self.uffd.copy(addr, self.source.addr + offset, PAGE_SIZE)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(JOIN_S)
        assert not self._thread.is_alive()
        assert self.error is None, self.error


def in_thread(fn: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=fn, name="toucher", daemon=True)
    thread.start()
    return thread


def write_byte(addr: int, value: int) -> Callable[[], object]:
    """A toucher that writes 8 bytes at `addr` in C, GIL released."""
    return lambda: ctypes.memset(addr, value, 8)


def open_uffd() -> Userfaultfd:
    """A Userfaultfd, or a skip where the kernel or its settings do not allow one."""
    try:
        return Userfaultfd()
    except UffdError as exc:
        if exc.errno in (errno.EPERM, errno.ENOSYS):
            pytest.skip(f"userfaultfd is not available here: {exc}")
        raise


@pytest.fixture
def uffd() -> Iterator[Userfaultfd]:
    fd = open_uffd()
    yield fd
    fd.close()  # also wakes any toucher a failed test left blocked


@pytest.fixture(params=["memfd", "anon_shared", "anon_private"])
def region(request: pytest.FixtureRequest) -> Iterator[Region]:
    mapping = Region(request.param)
    yield mapping
    mapping.close()


@pytest.fixture
def memfd_region() -> Iterator[Region]:
    mapping = Region("memfd")
    yield mapping
    mapping.close()


# --- ABI ---------------------------------------------------------------------------------

@pytest.mark.parametrize("struct", list(ABI_SIZES), ids=lambda s: s.__name__)
def test_struct_size_matches_kernel_abi(struct: type[ctypes.Structure]) -> None:
    assert ctypes.sizeof(struct) == ABI_SIZES[struct]


def test_ioctl_numbers_known_values() -> None:
    # linux/userfaultfd.h's _IOWR/_IOR(0xAA, ...) as the kernel headers print them on x86_64.
    assert UFFDIO_API == 0xC018AA3F
    assert UFFDIO_REGISTER == 0xC020AA00
    assert UFFDIO_UNREGISTER == 0x8010AA01
    assert UFFDIO_WAKE == 0x8010AA02
    assert UFFDIO_COPY == 0xC028AA03
    assert UFFDIO_ZEROPAGE == 0xC020AA04


def test_api_handshake_reports_features_and_ioctls(uffd: Userfaultfd) -> None:
    assert uffd.fileno() >= 0
    assert uffd.ioctls & (1 << 0x3F)  # UFFDIO_API itself
    assert uffd.features  # missing-mode shmem and hugetlbfs at least, on any kernel since 4.11


def test_fd_is_nonblocking_and_cloexec(uffd: Userfaultfd) -> None:
    assert fcntl.fcntl(uffd.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
    assert fcntl.fcntl(uffd.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC


# --- faults ------------------------------------------------------------------------------

def test_thread_id_names_the_faulting_thread(memfd_region: Region) -> None:
    open_uffd().close()  # skips where there is no userfaultfd at all
    uffd = Userfaultfd(UFFD_FEATURE_THREAD_ID)
    try:
        uffd.register(memfd_region.addr, SIZE)
        toucher = in_thread(write_byte(memfd_region.page(5), 0x07))
        assert uffd.wait(JOIN_S)
        events = uffd.read_fault_threads()
        assert events == [(memfd_region.page(5), toucher.native_id)]
        uffd.zeropage(memfd_region.page(5), PAGE_SIZE)
        toucher.join(JOIN_S)
        assert not toucher.is_alive()
    finally:
        uffd.close()


def test_missing_page_blocks_a_thread_until_copy_fills_it(uffd: Userfaultfd,
                                                           region: Region) -> None:
    source = Source()
    uffd.register(region.addr, SIZE)
    handler = Handler(uffd, region, source)
    try:
        # A write fault (memset) and a read fault (memmove out of the mapping).
        got = ctypes.create_string_buffer(PAGE_SIZE)
        writer = in_thread(write_byte(region.page(3), 0x01))
        reader = in_thread(lambda: ctypes.memmove(got, region.page(9), PAGE_SIZE))
        writer.join(JOIN_S)
        reader.join(JOIN_S)
        assert not writer.is_alive() and not reader.is_alive()
    finally:
        handler.stop()
    assert sorted(handler.faults) == [region.page(3), region.page(9)]
    assert handler.copied == 2 * PAGE_SIZE
    assert got.raw == Source.content(9)
    assert region.read(3) == b"\x01" * 8 + Source.content(3)[8:]  # copy first, then the write
    assert uffd.read_faults() == []


def test_thread_stays_blocked_until_its_page_arrives(uffd: Userfaultfd,
                                                      region: Region) -> None:
    source = Source()
    uffd.register(region.addr, SIZE)
    toucher = in_thread(write_byte(region.page(5), 0x02))
    assert uffd.wait(JOIN_S)
    assert uffd.read_faults() == [region.page(5)]
    time.sleep(SETTLE_S)
    assert toucher.is_alive()  # nobody has filled the page: still in the fault
    assert uffd.copy(region.page(5), source.addr, PAGE_SIZE) == PAGE_SIZE
    toucher.join(JOIN_S)
    assert not toucher.is_alive()


def test_copy_without_wake_needs_an_explicit_wake(uffd: Userfaultfd, region: Region) -> None:
    source = Source()
    uffd.register(region.addr, SIZE)
    toucher = in_thread(write_byte(region.page(0), 0x03))
    assert uffd.wait(JOIN_S)
    [addr] = uffd.read_faults()
    assert uffd.copy(addr, source.addr, PAGE_SIZE, wake=False) == PAGE_SIZE
    time.sleep(SETTLE_S)
    assert toucher.is_alive()
    uffd.wake(addr, PAGE_SIZE)
    toucher.join(JOIN_S)
    assert not toucher.is_alive()
    assert region.read(0, 16) == b"\x03" * 8 + Source.content(0)[:8]


def test_copy_onto_a_present_page_copies_nothing(uffd: Userfaultfd, region: Region) -> None:
    """EEXIST is success with 0 bytes; a range with present pages in it copies the others."""
    source = Source()
    uffd.register(region.addr, SIZE)
    assert uffd.copy(region.page(2), source.addr + 2 * PAGE_SIZE, PAGE_SIZE) == PAGE_SIZE
    zeros = ctypes.create_string_buffer(SIZE)
    assert uffd.copy(region.page(2), ctypes.addressof(zeros), PAGE_SIZE) == 0
    assert region.read(2) == Source.content(2)  # the present page was left alone
    # Pages 0-7, of which 2 is present: the kernel copies 0-1 and stops (EAGAIN with a
    # partial count), then reports EEXIST for 2; the rest is copied on retry.
    assert uffd.copy(region.addr, ctypes.addressof(zeros), 8 * PAGE_SIZE) == 7 * PAGE_SIZE
    assert region.read(2) == Source.content(2)
    assert region.read(7) == bytes(PAGE_SIZE)


def test_zeropage_fills_zeros_and_skips_present_pages(uffd: Userfaultfd, region: Region) -> None:
    source = Source()
    uffd.register(region.addr, SIZE)
    assert uffd.copy(region.page(1), source.addr + PAGE_SIZE, PAGE_SIZE) == PAGE_SIZE
    assert uffd.zeropage(region.addr, 4 * PAGE_SIZE) == 3 * PAGE_SIZE
    assert region.read(0) == bytes(PAGE_SIZE)
    assert region.read(1) == Source.content(1)
    assert uffd.zeropage(region.addr, PAGE_SIZE) == 0
    toucher = in_thread(write_byte(region.page(3), 0x04))  # present now: no fault
    toucher.join(JOIN_S)
    assert not toucher.is_alive()
    assert uffd.read_faults() == []


def test_nothing_pending(uffd: Userfaultfd, region: Region) -> None:
    uffd.register(region.addr, SIZE)
    began = time.monotonic()
    assert uffd.wait(0.05) is False
    assert time.monotonic() - began >= 0.04
    assert uffd.read_faults() == []


def test_unregistered_range_no_longer_faults(uffd: Userfaultfd, region: Region) -> None:
    uffd.register(region.addr, SIZE)
    uffd.unregister(region.addr, SIZE)
    toucher = in_thread(write_byte(region.page(4), 0x05))
    toucher.join(JOIN_S)
    assert not toucher.is_alive()
    assert uffd.read_faults() == []
    assert region.read(4, 9) == b"\x05" * 8 + b"\x00"
    with pytest.raises(UffdError, match="UFFDIO_COPY failed: ENOENT") as info:
        uffd.copy(region.page(5), Source().addr, PAGE_SIZE)
    assert info.value.operation == "UFFDIO_COPY" and info.value.errno == errno.ENOENT


def test_closing_releases_a_blocked_thread(uffd: Userfaultfd, region: Region) -> None:
    uffd.register(region.addr, SIZE)
    toucher = in_thread(write_byte(region.page(6), 0x06))
    assert uffd.wait(JOIN_S)
    uffd.close()  # registrations go; the fault is retried and fills the page as usual
    toucher.join(JOIN_S)
    assert not toucher.is_alive()
    assert region.read(6, 9) == b"\x06" * 8 + b"\x00"


# --- what makes a present page missing again (post-copy's concern) ---------------------

def test_punching_a_hole_in_the_memfd_makes_a_page_missing_again(
        uffd: Userfaultfd, memfd_region: Region) -> None:
    region, source = memfd_region, Source()
    uffd.register(region.addr, SIZE)
    assert uffd.copy(region.page(7), source.addr, PAGE_SIZE) == PAGE_SIZE
    assert _libc.fallocate(region.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           7 * PAGE_SIZE, PAGE_SIZE) == 0
    toucher = in_thread(write_byte(region.page(7), 0x07))
    assert uffd.wait(JOIN_S)
    assert uffd.read_faults() == [region.page(7)]
    assert uffd.copy(region.page(7), source.addr + PAGE_SIZE, PAGE_SIZE) == PAGE_SIZE
    toucher.join(JOIN_S)
    assert not toucher.is_alive()
    assert region.read(7, 16) == b"\x07" * 8 + Source.content(1)[:8]


@pytest.mark.parametrize("kind, faults", [("memfd", False), ("anon_shared", False),
                                          ("anon_private", True)])
def test_madv_dontneed_makes_a_page_missing_only_in_private_memory(
        uffd: Userfaultfd, kind: str, faults: bool) -> None:
    """Shared memory keeps the page in the page cache, so only the PTE goes: no fault."""
    region, source = Region(kind), Source()
    try:
        uffd.register(region.addr, SIZE)
        assert uffd.copy(region.page(8), source.addr, PAGE_SIZE) == PAGE_SIZE
        region.map.madvise(mmap.MADV_DONTNEED, 8 * PAGE_SIZE, PAGE_SIZE)
        handler = Handler(uffd, region, source)
        try:
            in_thread(write_byte(region.page(8), 0x08)).join(JOIN_S)
        finally:
            handler.stop()
        assert handler.faults == ([region.page(8)] if faults else [])
        assert region.read(8, 9) == b"\x08" * 8 + Source.content(8 if faults else 0)[:1]
    finally:
        region.close()


def test_madv_remove_makes_a_shared_page_missing_again(uffd: Userfaultfd,
                                                       memfd_region: Region) -> None:
    region, source = memfd_region, Source()
    uffd.register(region.addr, SIZE)
    assert uffd.copy(region.page(9), source.addr, PAGE_SIZE) == PAGE_SIZE
    region.map.madvise(mmap.MADV_REMOVE, 9 * PAGE_SIZE, PAGE_SIZE)
    handler = Handler(uffd, region, source)
    try:
        in_thread(write_byte(region.page(9), 0x09)).join(JOIN_S)
    finally:
        handler.stop()
    assert handler.faults == [region.page(9)]


# --- errors and lifetime -----------------------------------------------------------------

def test_errors_name_the_operation_and_errno(uffd: Userfaultfd, region: Region) -> None:
    with pytest.raises(UffdError, match=r"^UFFDIO_REGISTER failed: EINVAL .*not whole pages"):
        uffd.register(region.addr + 1, SIZE)
    with pytest.raises(UffdError, match=r"^UFFDIO_ZEROPAGE failed: ENOENT") as info:
        uffd.zeropage(region.addr, PAGE_SIZE)  # not registered
    assert isinstance(info.value, GuestMemoryError)
    assert (info.value.operation, info.value.errno) == ("UFFDIO_ZEROPAGE", errno.ENOENT)
    region.map.close()  # nothing is mapped there any more
    with pytest.raises(UffdError, match=r"^UFFDIO_REGISTER failed: ") as info:
        uffd.register(region.addr, SIZE)
    assert info.value.errno in (errno.EINVAL, errno.ENOMEM)


def test_close_is_idempotent_and_later_calls_fail_clearly(region: Region) -> None:
    with open_uffd() as uffd:
        uffd.register(region.addr, SIZE)
    assert uffd.closed
    uffd.close()
    for call, operation in [(lambda: uffd.fileno(), "fileno"),
                            (lambda: uffd.register(region.addr, SIZE), "UFFDIO_REGISTER"),
                            (lambda: uffd.copy(region.addr, region.addr, PAGE_SIZE),
                             "UFFDIO_COPY"),
                            (lambda: uffd.read_faults(), "read"),
                            (lambda: uffd.wait(0), "poll")]:
        with pytest.raises(UffdError, match=f"^{operation} failed: EBADF") as info:
            call()
        assert info.value.errno == errno.EBADF
