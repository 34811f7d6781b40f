"""`Throttle`: keep a VM's vCPUs out of KVM_RUN for a share of every period.

Auto-converge slows a guest that dirties memory faster than a migration can carry
it, as QEMU's cpu-throttle does: every period each vCPU runs for `PERIOD_S`, then
naps for ``PERIOD_S * p / (100 - p)``, so it runs (100 - p)% of the time. The
naps go through each vCPU thread's own loop (`VcpuHandle.nap`: a kick, then a wait
outside KVM_RUN that a pause or a stop cuts short). One thread, ``vcpu-throttle``,
runs while the throttle is above 0.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from vmig.vmm.vcpu_thread import VcpuHandle

__all__ = ["MAX_THROTTLE_PERCENT", "PERIOD_S", "Throttle"]

#: How long a throttled vCPU runs between naps (QEMU's throttle timeslice: 10 ms).
PERIOD_S = 0.01
MAX_THROTTLE_PERCENT = 99


class Throttle:
    """Naps for the vCPUs `handles()` returns; `set(0)` (or `close()`) lifts it."""

    def __init__(self, handles: Callable[[], Sequence[VcpuHandle]]) -> None:
        self._handles = handles
        self._percent = 0
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def percent(self) -> int:
        return self._percent

    def set(self, percent: int) -> None:
        """Throttle to `percent` (0 lifts it); starts or stops the thread as needed."""
        if not 0 <= percent <= MAX_THROTTLE_PERCENT:
            raise ValueError(f"a throttle is 0 to {MAX_THROTTLE_PERCENT}%, not {percent}")
        with self._changed:
            self._percent = percent
            self._changed.notify_all()
            thread = self._thread
            if percent and (thread is None or not thread.is_alive()):
                thread = self._thread = threading.Thread(target=self._run, name="vcpu-throttle",
                                                         daemon=True)
                thread.start()
                return
        if not percent and thread is not None:
            thread.join()
            self._thread = None

    def _run(self) -> None:
        with self._changed:
            while self._percent:
                percent = self._percent
                nap = PERIOD_S * percent / (100 - percent)
                for handle in self._handles():
                    handle.nap(nap)
                self._changed.wait(nap + PERIOD_S)

    def close(self) -> None:
        self.set(0)
