"""The guest's status page and self-check, over any way of reading guest memory.

vmig reads guest memory through its own mapping; a benchmark running the guest
under QEMU reads the same addresses in QEMU's memory-backend-file. Both go through
these functions, given a ``read_u64(gpa)`` (and, to ask for a check, a
``write_u64(gpa, value)``), so both judge the guest the same way. Waiting is left
to the caller, who knows how to sleep (vmig waits on its guest-event condition).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vmig.guest import layout

__all__ = ["NO_BAD_PAGE", "check_done", "check_result", "counters", "cpu_states",
           "request_check"]

ReadU64 = Callable[[int], int]
WriteU64 = Callable[[int, int], None]

NO_BAD_PAGE = (1 << 64) - 1  # ST_FIRST_BAD of a vCPU that found no bad page


def _field(read_u64: ReadU64, cpu: int, field: int) -> int:
    return read_u64(layout.status_gpa(cpu) + field)


def cpu_states(read_u64: ReadU64, cpus: int) -> list[int]:
    """Each vCPU's ST_STATE (layout.CPU_STATE_*); all RUNNING once the guest has booted."""
    return [_field(read_u64, cpu, layout.ST_STATE) for cpu in range(cpus)]


def counters(read_u64: ReadU64, cpus: int) -> dict[str, int]:
    """Heartbeat and pages written, summed over vCPUs."""
    return {
        "heartbeat": sum(_field(read_u64, c, layout.ST_HEARTBEAT) for c in range(cpus)),
        "pages_written": sum(_field(read_u64, c, layout.ST_PAGES_WRITTEN) for c in range(cpus)),
    }


def request_check(read_u64: ReadU64, write_u64: WriteU64) -> int:
    """Ask the guest for a self-check (bump CFG_CHECK_REQUEST); return the request number."""
    gpa = layout.CONFIG_GPA + layout.CFG_CHECK_REQUEST
    request = read_u64(gpa) + 1
    write_u64(gpa, request)
    return request


def check_done(read_u64: ReadU64, cpus: int, request: int) -> bool:
    """True once every vCPU has answered self-check `request` (or a later one)."""
    return all(_field(read_u64, c, layout.ST_CHECK_DONE) >= request for c in range(cpus))


def check_result(read_u64: ReadU64, cpus: int, working_set_pages: int) -> dict[str, Any]:
    """The finished self-check: ok only when no page is bad and every page was checked."""
    pages = sum(_field(read_u64, c, layout.ST_CHECK_PAGES) for c in range(cpus))
    bad = sum(_field(read_u64, c, layout.ST_CHECK_BAD) for c in range(cpus))
    first_bad = [_field(read_u64, c, layout.ST_FIRST_BAD) for c in range(cpus)]
    first_bad = [index for index in first_bad if index != NO_BAD_PAGE]
    return {
        "ok": bad == 0 and pages == working_set_pages,
        "pages_checked": pages,
        "bad_pages": bad,
        "first_bad_page": min(first_bad) if first_bad else None,
    }
