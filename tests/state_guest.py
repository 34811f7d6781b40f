"""The state-test guest (tests/guests/state_test.S): build it, and read its RESULT page.

The guest sets DR0-DR3/DR7, XMM0-XMM7 and MSRs outside vmig's version-1 state, registers
kvmclock, then keeps writing what it reads back, the TSC and the kvmclock structure into
RESULT. `StatePage.read()` decodes that page from guest memory bytes.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

SOURCE = "state_test.S"  # in tests/guests; build it with asm.build_raw
RESULT_GPA = 0x9000
MAGIC = 0x5354415445
#: (MSR index, the value the guest writes), in the order of the guest's msr_writes table.
GUEST_MSRS = ((0x3B, 0x100000), (0x176, 0x107C00), (0x1A0, 0x801),
              (0x4B564D05, 0), (0x4B564D00, 0x8040), (0x4B564D01, 0x8001))
DEBUG_REGISTERS = (0x11110000, 0x22220000, 0x33330000, 0x44440000)
DR7 = 0x4AA


def xmm_expected(n: int) -> bytes:
    low = int(f"{n + 1:x}" * 4 + "0123456789ab", 16)
    high = int("fedcba98765" + f"{n:x}" * 5, 16)
    return struct.pack("<QQ", low, high)


@dataclass(frozen=True)
class StatePage:
    counter: int
    tsc: int
    debug: tuple[int, ...]  # DR0-DR3, DR7
    xmm: tuple[bytes, ...]
    msrs: dict[int, int]
    clock: bytes  # pvclock_vcpu_time_info
    magic: int

    @classmethod
    def read(cls, page: bytes) -> StatePage:
        words = struct.unpack_from("<2Q5Q", page, 0)
        return cls(
            counter=words[0], tsc=words[1], debug=words[2:7],
            xmm=tuple(page[0x40 + 16 * n:0x50 + 16 * n] for n in range(8)),
            msrs={index: struct.unpack_from("<Q", page, 0xC0 + 8 * i)[0]
                  for i, (index, _) in enumerate(GUEST_MSRS)},
            clock=page[0x140:0x160],
            magic=struct.unpack_from("<Q", page, 0x180)[0],
        )

    def kvmclock_ns(self) -> int:
        """The guest's kvmclock at its TSC reading, as a guest kernel computes it."""
        (_, _, tsc_timestamp, system_time, mul, shift, _) = struct.unpack_from(
            "<IIQQIbB", self.clock)
        delta = self.tsc - tsc_timestamp
        delta = delta << shift if shift >= 0 else delta >> -shift
        return system_time + (delta * mul >> 32)

    def registers(self) -> tuple:
        """Everything that must come through a migration unchanged."""
        return self.debug, self.xmm, self.msrs


def memory_reader(memory) -> Callable[[], StatePage]:
    """Reads the RESULT page from a `GuestMemory` of this process."""
    return lambda: StatePage.read(bytes(memory.view(RESULT_GPA, 0x1000)))


def process_memory_reader(pid: int) -> Callable[[], StatePage]:
    """Reads the RESULT page from the guest memory (memfd or file) of VMM process `pid`."""
    for name in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{name}")
        if target.startswith("/memfd:vmig-guest-ram"):
            path = f"/proc/{pid}/fd/{name}"
            break
    else:
        raise AssertionError(f"VMM {pid} has no guest memory fd")

    def read() -> StatePage:
        with open(path, "rb") as memory:
            memory.seek(RESULT_GPA)
            return StatePage.read(memory.read(0x1000))

    return read


def fresh_page(read: Callable[[], StatePage], timeout: float = 10.0) -> tuple[StatePage, float]:
    """The RESULT page once the guest has written it again, and the wall time then."""
    first = read()
    deadline = time.monotonic() + timeout
    while True:
        page = read()
        if page.magic == MAGIC and page.counter != first.counter:
            return page, time.time()
        assert time.monotonic() < deadline, f"the state-test guest stopped at {page.counter}"
        time.sleep(0.005)


def check_carried(before: StatePage, after: StatePage, wall_s: float, tsc_khz: int) -> None:
    """Every register as the guest set it, and the guest's TSC and kvmclock moved on by
    about `wall_s` (not backwards, not by hours)."""
    assert after.debug == (*DEBUG_REGISTERS, DR7), [hex(value) for value in after.debug]
    assert after.xmm == tuple(xmm_expected(n) for n in range(8)), after.xmm
    assert after.msrs == dict(GUEST_MSRS), {hex(k): hex(v) for k, v in after.msrs.items()}
    assert after.registers() == before.registers()
    tsc_s = (after.tsc - before.tsc) / (tsc_khz * 1000)
    clock_s = (after.kvmclock_ns() - before.kvmclock_ns()) / 1e9
    for what, moved in (("TSC", tsc_s), ("kvmclock", clock_s)):
        # either page may have been written a little before it was read (a busy host can
        # hold the reader or the vCPU back): 0.3 s of slack each way
        assert wall_s - 0.3 <= moved <= wall_s + 0.3, (
            f"the guest's {what} moved {moved:.3f} s over {wall_s:.3f} s of wall time")
