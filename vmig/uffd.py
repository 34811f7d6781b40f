"""Typed ctypes binding of Linux userfaultfd: the groundwork for post-copy migration.

A range registered in MISSING mode makes every first touch of a page that is not
there (a hole of the memfd, a never-touched anonymous page) block the toucher, be
it a thread of ours or KVM faulting a guest page in for a vCPU, and queue a
PAGEFAULT message on the fd. A handler reads the faults (`read_faults`) and fills
each page atomically (`copy`, `zeropage`), which wakes the toucher.

ctypes, not fcntl: the kernel writes results (`copy`, `zeropage`, `ioctls`) into
the argument in place, also when the ioctl fails (a partial copy), and every
foreign call releases the GIL, so a handler can serve a thread that is blocked in
a fault. Caveat: a Python thread that touches a missing page *holding the GIL*
stalls the whole interpreter, its handler included. Touch registered memory only
from ctypes/C calls, or only pages known to be present.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import platform
import time

from vmig.errors import GuestMemoryError
from vmig.units import PAGE_SIZE

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
s64 = ctypes.c_int64

UFFD_API = 0xAA
UFFDIO = 0xAA  # the ioctl type byte

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
#: Each PAGEFAULT message carries the faulting thread's id (`read_fault_threads`).
UFFD_FEATURE_THREAD_ID = 1 << 8

#: userfaultfd(2) has no libc wrapper everywhere; its syscall number per architecture.
NR_USERFAULTFD = {"x86_64": 323, "aarch64": 282}

_IOC_WRITE = 1
_IOC_READ = 2
_MAX_RETRIES = 10_000  # EAGAIN without progress (the address space is changing) this often
_POLLIN = 0x001


# --- structs (linux/userfaultfd.h) -----------------------------------------------------


class uffdio_api(ctypes.Structure):
    _fields_ = [("api", u64), ("features", u64), ("ioctls", u64)]


class uffdio_range(ctypes.Structure):
    _fields_ = [("start", u64), ("len", u64)]


class uffdio_register(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", u64), ("ioctls", u64)]


class uffdio_copy(ctypes.Structure):
    _fields_ = [("dst", u64), ("src", u64), ("len", u64), ("mode", u64), ("copy", s64)]


class uffdio_zeropage(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", u64), ("zeropage", s64)]


class uffd_pagefault(ctypes.Structure):
    _fields_ = [("flags", u64), ("address", u64), ("ptid", u32)]
    _pack_ = 1


class uffd_msg_arg(ctypes.Union):
    _fields_ = [("pagefault", uffd_pagefault), ("reserved", u64 * 3)]
    _pack_ = 1


class uffd_msg(ctypes.Structure):
    """One event read from the fd; 32 bytes, packed."""

    _fields_ = [("event", u8), ("reserved1", u8), ("reserved2", u16), ("reserved3", u32),
                ("arg", uffd_msg_arg)]
    _pack_ = 1


class _pollfd(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short)]


#: sizeof() of each struct in the kernel ABI (x86_64), checked by tests/unit/test_uffd.py.
ABI_SIZES = {uffdio_api: 24, uffdio_range: 16, uffdio_register: 32, uffdio_copy: 40,
             uffdio_zeropage: 32, uffd_msg: 32}


def _ioc(direction: int, nr: int, struct: type[ctypes.Structure]) -> int:
    """Linux _IOC() with type UFFDIO: direction, argument size, type, number."""
    return (direction << 30) | (ctypes.sizeof(struct) << 16) | (UFFDIO << 8) | nr


UFFDIO_API = _ioc(_IOC_READ | _IOC_WRITE, 0x3F, uffdio_api)
UFFDIO_REGISTER = _ioc(_IOC_READ | _IOC_WRITE, 0x00, uffdio_register)
UFFDIO_UNREGISTER = _ioc(_IOC_READ, 0x01, uffdio_range)
UFFDIO_WAKE = _ioc(_IOC_READ, 0x02, uffdio_range)
UFFDIO_COPY = _ioc(_IOC_READ | _IOC_WRITE, 0x03, uffdio_copy)
UFFDIO_ZEROPAGE = _ioc(_IOC_READ | _IOC_WRITE, 0x04, uffdio_zeropage)


# --- libc ------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype, _syscall.argtypes = ctypes.c_long, [ctypes.c_long, ctypes.c_long]
_ioctl = _libc.ioctl
_ioctl.restype, _ioctl.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_read = _libc.read
_read.restype, _read.argtypes = ctypes.c_ssize_t, [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_poll = _libc.poll
_poll.restype, _poll.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int]


class UffdError(GuestMemoryError):
    """A userfaultfd operation failed; carries the operation's name and the errno."""

    def __init__(self, operation: str, errno: int, detail: str = "") -> None:
        self.operation = operation
        self.errno = errno
        name = _errno.errorcode.get(errno, str(errno))
        msg = f"{operation} failed: {name} ({os.strerror(errno)})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


def _check(result: int, operation: str, allow: tuple[int, ...] = ()) -> int:
    """The one place a failed call's errno becomes UffdError.

    Returns `result` when it is >= 0, -errno for an errno in `allow`; raises otherwise.
    """
    if result >= 0:
        return result
    err = ctypes.get_errno()
    if err in allow:
        return -err
    raise UffdError(operation, err)


def _check_range(operation: str, addr: int, length: int) -> None:
    if addr % PAGE_SIZE or length % PAGE_SIZE or length <= 0 or addr < 0:
        raise UffdError(operation, _errno.EINVAL,
                        f"range {addr:#x}+{length:#x} is not whole pages")


class Userfaultfd:
    """Owns one userfaultfd (O_CLOEXEC | O_NONBLOCK), handshaken with UFFDIO_API.

    Faults from the kernel (KVM's) are reported too: UFFD_USER_MODE_ONLY is not set,
    which needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd = 1. Methods may be
    called from several threads at once; `close()` only once those are done.
    """

    def __init__(self, features: int = 0) -> None:
        """Open and handshake; `features` (UFFD_FEATURE_* bits) must be ones the kernel has."""
        nr = NR_USERFAULTFD.get(platform.machine())
        if nr is None:
            raise UffdError("userfaultfd", _errno.ENOSYS, f"no syscall number for "
                            f"{platform.machine()}")
        self._fd = _check(_syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK), "userfaultfd")
        try:
            api = uffdio_api(api=UFFD_API, features=features)
            self._ioctl(UFFDIO_API, api, "UFFDIO_API")
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise
        self.features: int = api.features  #: every feature the kernel offers
        self.ioctls: int = api.ioctls  #: bit n set: ioctl number n is available

    # --- plumbing --------------------------------------------------------------------

    def fileno(self) -> int:
        """The fd, for poll/select; raises UffdError (EBADF) once closed."""
        return self._checked_fd("fileno")

    def _checked_fd(self, operation: str) -> int:
        if self._fd < 0:
            raise UffdError(operation, _errno.EBADF, "userfaultfd is closed")
        return self._fd

    def _ioctl(self, request: int, arg: ctypes.Structure, operation: str,
               allow: tuple[int, ...] = ()) -> int:
        fd = self._checked_fd(operation)
        return _check(_ioctl(fd, request, ctypes.addressof(arg)), operation, allow)

    # --- ranges ----------------------------------------------------------------------

    def register(self, addr: int, length: int) -> int:
        """Register [addr, addr+length) in MISSING mode.

        Returns the ioctls the range supports: bit n set for UFFDIO ioctl number n
        (COPY is 3, ZEROPAGE 4).
        """
        _check_range("UFFDIO_REGISTER", addr, length)
        reg = uffdio_register(range=uffdio_range(addr, length),
                              mode=UFFDIO_REGISTER_MODE_MISSING)
        self._ioctl(UFFDIO_REGISTER, reg, "UFFDIO_REGISTER")
        return int(reg.ioctls)

    def unregister(self, addr: int, length: int) -> None:
        """Stop tracking [addr, addr+length); threads blocked in it are woken (and retry)."""
        _check_range("UFFDIO_UNREGISTER", addr, length)
        self._ioctl(UFFDIO_UNREGISTER, uffdio_range(addr, length), "UFFDIO_UNREGISTER")

    def wake(self, addr: int, length: int) -> None:
        """Wake the threads blocked on faults in [addr, addr+length)."""
        _check_range("UFFDIO_WAKE", addr, length)
        self._ioctl(UFFDIO_WAKE, uffdio_range(addr, length), "UFFDIO_WAKE")

    # --- filling pages -----------------------------------------------------------------

    def copy(self, dst_addr: int, src_addr: int, length: int, *, wake: bool = True) -> int:
        """Atomically fill the missing pages of [dst, dst+length) from `src_addr`.

        Returns the bytes copied. A page that is already there (EEXIST: another
        copy won the race, or the page came in some other way) is skipped, so
        copying a present page returns 0. Partial copies and EAGAIN (the address
        space was changing) are retried for the rest.
        """
        return self._fill("UFFDIO_COPY", dst_addr, length, wake, src_addr)

    def zeropage(self, addr: int, length: int, *, wake: bool = True) -> int:
        """Fill the missing pages of [addr, addr+length) with zeros; as `copy`."""
        return self._fill("UFFDIO_ZEROPAGE", addr, length, wake, None)

    def _fill(self, operation: str, dst: int, length: int, wake: bool,
              src: int | None) -> int:
        _check_range(operation, dst, length)
        done = filled = 0
        skipped = False
        retries = 0
        while done < length:
            if src is None:
                arg: ctypes.Structure = uffdio_zeropage(
                    range=uffdio_range(dst + done, length - done),
                    mode=0 if wake else UFFDIO_ZEROPAGE_MODE_DONTWAKE)
                request = UFFDIO_ZEROPAGE
            else:
                arg = uffdio_copy(dst=dst + done, src=src + done, len=length - done,
                                  mode=0 if wake else UFFDIO_COPY_MODE_DONTWAKE)
                request = UFFDIO_COPY
            err = -self._ioctl(request, arg, operation,
                               allow=(_errno.EEXIST, _errno.EAGAIN, _errno.EINTR))
            result = arg.zeropage if src is None else arg.copy
            if result > 0:  # these bytes are in, whatever the ioctl returned
                done += result
                filled += result
                retries = 0
            if err == 0:
                if result <= 0:  # cannot happen: success copies something
                    raise UffdError(operation, _errno.EIO, f"kernel reported {result}")
                continue
            if err == _errno.EEXIST and result <= 0:
                done += PAGE_SIZE  # the first page is there already: skip it
                skipped = True
            elif err in (_errno.EAGAIN, _errno.EINTR) and result <= 0:
                retries += 1
                if retries > _MAX_RETRIES:
                    raise UffdError(operation, err, f"no progress at {dst + done:#x}")
                time.sleep(0)
        if skipped and wake:
            # A page that arrived without a wake (through another mapping, or a copy
            # with wake=False) may still have a waiter; waking a range nobody waits on
            # costs nothing.
            self.wake(dst, length)
        return filled

    # --- events ------------------------------------------------------------------------

    def read_faults(self, max_events: int = 64) -> list[int]:
        """Drain the queued events without blocking: the page-aligned addresses of the
        PAGEFAULT ones, in order, each once; other events are dropped."""
        return list(dict.fromkeys(address for address, _ in
                                  self.read_fault_threads(max_events)))

    def read_fault_threads(self, max_events: int = 64) -> list[tuple[int, int]]:
        """As `read_faults`, but every PAGEFAULT event, as (page-aligned address, the
        faulting thread's kernel id); the id is 0 unless this fd was opened with
        UFFD_FEATURE_THREAD_ID."""
        fd = self._checked_fd("read")
        msgs = (uffd_msg * max_events)()
        faults: list[tuple[int, int]] = []
        while True:
            n = _check(_read(fd, msgs, ctypes.sizeof(msgs)), "read",
                       allow=(_errno.EAGAIN, _errno.EINTR))
            if n == -_errno.EINTR:
                continue
            if n <= 0:  # EAGAIN: nothing (more) queued
                break
            for msg in msgs[:n // ctypes.sizeof(uffd_msg)]:
                if msg.event == UFFD_EVENT_PAGEFAULT:
                    fault = msg.arg.pagefault
                    faults.append((fault.address & ~(PAGE_SIZE - 1), fault.ptid))
            if n < ctypes.sizeof(msgs):
                break
        return faults

    def wait(self, timeout: float | None = None) -> bool:
        """Block (GIL released) until an event is queued or `timeout` s pass; True if one is."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poll = _pollfd(fd=self._checked_fd("poll"), events=_POLLIN)
        while True:
            if deadline is None:
                millis = -1
            else:
                millis = max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
            ready = _check(_poll(ctypes.addressof(poll), 1, millis), "poll",
                           allow=(_errno.EINTR,))
            if ready >= 0:
                return ready > 0 and bool(poll.revents & _POLLIN)

    # --- lifetime --------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the fd; idempotent. The kernel drops every registration and wakes every
        blocked thread, whose faults then fill the pages as if never registered."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
