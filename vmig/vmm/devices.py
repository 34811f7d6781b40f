"""The machine's port-I/O devices: an 8250 UART subset, fast A20 and the guest's status port.

Any other port reads all ones and drops writes, as on a PC bus with nothing there;
`IoBus` counts such accesses per port (`vm.info` "unknown_ports") and warns once per port.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol

from vmig.guest import layout

log = logging.getLogger(__name__)


class PortDevice(Protocol):
    """A device on the I/O port bus; `offset` is relative to its base port."""

    def io_read(self, offset: int, size: int) -> int: ...
    def io_write(self, offset: int, size: int, value: int) -> None: ...


# 8250 register offsets and bits (only what the guest and Linux-style probing use).
UART_THR_RBR_DLL = 0
UART_IER_DLM = 1
UART_IIR_FCR = 2
UART_LCR = 3
UART_MCR = 4
UART_LSR = 5
UART_MSR = 6
UART_SCR = 7
LCR_DLAB = 0x80
LSR_THRE_TEMT = 0x60  # transmitter always empty: output is never held back
IIR_NO_INTERRUPT = 0x01


class Serial8250:
    """Console UART: bytes the guest transmits go to a log file; no input, no interrupts."""

    TAIL_LINES = 50

    def __init__(self, log: BinaryIO | None = None) -> None:
        self._log = log
        self._lock = threading.Lock()
        self.regs = {"ier": 0, "lcr": 0x03, "mcr": 0, "scr": 0, "dll": 0x0C, "dlm": 0}
        self._line = bytearray()
        self.tail: deque[str] = deque(maxlen=self.TAIL_LINES)

    def io_read(self, offset: int, size: int) -> int:
        dlab = self.regs["lcr"] & LCR_DLAB
        if offset == UART_THR_RBR_DLL:
            return self.regs["dll"] if dlab else 0
        if offset == UART_IER_DLM:
            return self.regs["dlm"] if dlab else self.regs["ier"]
        if offset == UART_IIR_FCR:
            return IIR_NO_INTERRUPT
        if offset == UART_LCR:
            return self.regs["lcr"]
        if offset == UART_MCR:
            return self.regs["mcr"]
        if offset == UART_LSR:
            return LSR_THRE_TEMT
        if offset == UART_SCR:
            return self.regs["scr"]
        return 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        dlab = self.regs["lcr"] & LCR_DLAB
        if offset == UART_THR_RBR_DLL:
            if dlab:
                self.regs["dll"] = value
            else:
                self._transmit(value)
        elif offset == UART_IER_DLM:
            self.regs["dlm" if dlab else "ier"] = value
        elif offset == UART_LCR:
            self.regs["lcr"] = value
        elif offset == UART_MCR:
            self.regs["mcr"] = value
        elif offset == UART_SCR:
            self.regs["scr"] = value

    def _transmit(self, byte: int) -> None:
        with self._lock:
            if self._log is not None:
                self._log.write(bytes((byte,)))
            if byte == 0x0A:
                if self._log is not None:
                    self._log.flush()
                self.tail.append(self._line.decode("utf-8", "replace"))
                self._line.clear()
            else:
                self._line.append(byte)

    def save_state(self) -> dict[str, Any]:
        return {"regs": dict(self.regs), "partial_line": self._line.hex()}

    def restore_state(self, state: dict[str, Any]) -> None:
        self.regs.update({k: int(v) for k, v in state["regs"].items() if k in self.regs})
        self._line = bytearray.fromhex(state.get("partial_line", ""))


class StatusPort:
    """The guest's event port: 32-bit writes of (event << 8) | cpu."""

    def __init__(self, on_event: Callable[[int, int], None]) -> None:
        self._on_event = on_event

    def io_read(self, offset: int, size: int) -> int:
        return 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        self._on_event(value >> 8, value & 0xFF)


class FastA20:
    """Port 0x92, "system control port A": reads back what was written, with the A20 gate
    (bit 1) always set, because guest memory has no 1 MiB wrap-around to switch on."""

    A20_ENABLED = 0x02

    def __init__(self) -> None:
        self.value = self.A20_ENABLED

    def io_read(self, offset: int, size: int) -> int:
        return self.value

    def io_write(self, offset: int, size: int, value: int) -> None:
        # Bit 0 would reset a PC; nothing here resets, so it reads back as written.
        self.value = (value & 0xFF) | self.A20_ENABLED

    def save_state(self) -> dict[str, Any]:
        return {"value": self.value}

    def restore_state(self, state: dict[str, Any]) -> None:
        self.value = int(state.get("value", self.A20_ENABLED)) | self.A20_ENABLED


class IoBus:
    """Routes port I/O exits to the device that owns the port; unknown ports read as ~0,
    drop writes and are counted (warned about once per port)."""

    def __init__(self) -> None:
        self._devices: list[tuple[int, int, PortDevice]] = []
        self._unknown: dict[int, list[int]] = {}  # port -> [reads, writes]
        self._unknown_lock = threading.Lock()

    def register(self, base: int, length: int, device: PortDevice) -> None:
        self._devices.append((base, length, device))

    def _find(self, port: int) -> tuple[int, PortDevice] | None:
        for base, length, device in self._devices:
            if base <= port < base + length:
                return port - base, device
        return None

    def read(self, port: int, size: int) -> int:
        found = self._find(port)
        if found is None:
            self._count_unknown(port, 0)
            return (1 << (8 * size)) - 1
        offset, device = found
        return device.io_read(offset, size)

    def write(self, port: int, size: int, value: int) -> None:
        found = self._find(port)
        if found is None:
            self._count_unknown(port, 1)
            return
        offset, device = found
        device.io_write(offset, size, value)

    def _count_unknown(self, port: int, which: int) -> None:
        with self._unknown_lock:
            counts = self._unknown.get(port)
            first = counts is None
            if counts is None:
                counts = self._unknown[port] = [0, 0]
            counts[which] += 1
        if first:
            log.warning("guest %s port %#x, where there is no device (it reads all ones and "
                        "drops writes; counted in vm.info unknown_ports)",
                        "wrote" if which else "read", port)

    def unknown_ports(self) -> dict[str, dict[str, int]]:
        """Accesses to ports without a device: {"0x80": {"reads": n, "writes": m}, ...}."""
        with self._unknown_lock:
            return {f"{port:#x}": {"reads": reads, "writes": writes}
                    for port, (reads, writes) in sorted(self._unknown.items())}


_SIZES = {1: "<B", 2: "<H", 4: "<I"}


def pack_io(size: int, value: int) -> bytes:
    """Encode a port read's value as the `size` bytes KVM expects."""
    return struct.pack(_SIZES[size], value & ((1 << (8 * size)) - 1))


def unpack_io(size: int, data: bytes) -> int:
    """Decode the `size` bytes of a port write."""
    return struct.unpack(_SIZES[size], data)[0]


SERIAL_PORTS = (layout.SERIAL_PORT, 8)
STATUS_PORTS = (layout.STATUS_PORT, 4)
A20_PORTS = (0x92, 1)
