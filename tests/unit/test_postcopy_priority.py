"""Post-copy's fault threads run ahead of the push's and the vCPUs' when the cores are
busy: a fault's answer crosses three of them (benchmarks/postcopy_latency.py: real time
halved p50 and p99 against nice -10, which had brought p99 from 29 to 18 ms)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import pytest

from vmig.migration import postcopy
from vmig.migration.postcopy import (
    FAULT_THREAD_FIFO_PRIORITY,
    FAULT_THREAD_NICE,
    _prefer_this_thread,
)


def _in_a_thread(target: Callable[[], Any]) -> Any:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(target()))
    thread.start()
    thread.join()
    return result[0]


def _scheduling() -> tuple[int, int, int]:
    """(policy without the reset flag, real-time priority, nice) of the calling thread."""
    thread = threading.get_native_id()
    policy = os.sched_getscheduler(thread) & ~os.SCHED_RESET_ON_FORK
    return (policy, os.sched_getparam(thread).sched_priority,
            os.getpriority(os.PRIO_PROCESS, thread))


def _can_use_real_time() -> bool:
    def probe() -> bool:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        except OSError:
            return False
        return True
    return _in_a_thread(probe)


def test_a_fault_thread_runs_in_real_time_and_no_other_thread_does() -> None:
    if not _can_use_real_time():
        pytest.skip("this process may not use SCHED_FIFO (no CAP_SYS_NICE)")

    def fault_thread() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        _prefer_this_thread()
        own = _scheduling()
        started = _in_a_thread(_scheduling)  # SCHED_RESET_ON_FORK: an ordinary thread
        return own, started

    own, started = _in_a_thread(fault_thread)
    ordinary = (os.SCHED_OTHER, 0, os.getpriority(os.PRIO_PROCESS, 0))
    assert own[:2] == (os.SCHED_FIFO, FAULT_THREAD_FIFO_PRIORITY)
    assert started == ordinary
    assert _in_a_thread(_scheduling) == ordinary


def test_without_real_time_a_fault_thread_gets_the_fault_nice_value(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(postcopy.os, "sched_setscheduler", refuse)

    def fault_thread() -> tuple[int, int, int]:
        _prefer_this_thread()
        return _scheduling()

    assert _in_a_thread(fault_thread) == (os.SCHED_OTHER, 0, FAULT_THREAD_NICE)
    assert _in_a_thread(_scheduling)[2] == os.getpriority(os.PRIO_PROCESS, 0)
    assert FAULT_THREAD_NICE < 0
