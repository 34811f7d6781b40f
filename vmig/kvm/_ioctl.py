"""ioctl numbers derived from struct sizes, and the one place errno becomes KvmError."""

from __future__ import annotations

import ctypes
import fcntl
from typing import Any

from vmig.errors import KvmError

KVMIO = 0xAE

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, nr: int, size: int) -> int:
    """Linux _IOC(): direction in bits 30-31, size in 16-29, type in 8-15, number in 0-7."""
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def io(nr: int) -> int:
    """_IO(KVMIO, nr): no argument struct."""
    return _ioc(_IOC_NONE, nr, 0)


def ior(nr: int, struct: type[ctypes._CData]) -> int:
    """_IOR(KVMIO, nr, struct): the kernel writes `struct`."""
    return _ioc(_IOC_READ, nr, ctypes.sizeof(struct))


def iow(nr: int, struct: type[ctypes._CData]) -> int:
    """_IOW(KVMIO, nr, struct): the kernel reads `struct`."""
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(struct))


def iowr(nr: int, struct: type[ctypes._CData]) -> int:
    """_IOWR(KVMIO, nr, struct): the kernel reads and writes `struct`."""
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(struct))


def ioctl(fd: int, request: int, arg: Any = 0, *, name: str, restart: bool = True) -> int:
    """Issue one ioctl; raise KvmError(name, errno) on failure.

    `arg` is an int or a mutable buffer (a ctypes object or bytearray), which the
    kernel may read and write in place. Python does not retry an ioctl that a signal
    interrupted (EINTR: nothing was done), so this does, unless `restart` is False:
    KVM_RUN's EINTR is a vCPU kick, passed through as InterruptedError for the vCPU
    loop to treat as an ordinary exit. (A debugger attaching, py-spy's sampling,
    once failed a migration at the destination with a bare InterruptedError.)
    """
    while True:
        try:
            if isinstance(arg, int):
                return fcntl.ioctl(fd, request, arg)
            return fcntl.ioctl(fd, request, arg, True)
        except InterruptedError:
            if not restart:
                raise
        except OSError as exc:
            raise KvmError(name, exc.errno or 0) from exc
