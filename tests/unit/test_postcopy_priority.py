"""Post-copy's fault threads run ahead of the push's when the cores are busy: a fault's
answer crosses three of them (benchmarks/postcopy_latency.py: p99 29 -> 18 ms)."""

from __future__ import annotations

import os
import threading

from vmig.migration.postcopy import FAULT_THREAD_NICE, _prefer_this_thread


def test_a_fault_thread_gets_the_fault_nice_value_and_no_other_thread_does() -> None:
    seen: dict[str, int] = {}

    def fault_thread() -> None:
        _prefer_this_thread()
        seen["fault"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def other_thread() -> None:
        seen["other"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    for target in (fault_thread, other_thread):
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
    assert seen == {"fault": FAULT_THREAD_NICE, "other": os.getpriority(os.PRIO_PROCESS, 0)}
    assert FAULT_THREAD_NICE < 0
