"""A spinning Python thread that shows whether other code lets go of the GIL.

    with GilProbe() as probe:
        result = probe.run(lambda: memory.backing.populate(0, size))

`result["spinner_share"]` is the spinner's loop rate during the call over its rate
while the main thread sleeps: near 1 when the call releases the GIL (and a core is
free), near 0 when it holds it. `max_gap_ms` is the longest the spinner waited between
two turns of its loop: about the whole call when the call holds the GIL throughout.
The spinner is also the worst neighbour a GIL-releasing call can have: each time the
call wants the GIL back, it may wait for the spinner's switch interval (5 ms by
default), so `seconds` here is the call's time under that contention.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class GilProbe:
    def __init__(self, calibrate_s: float = 0.2) -> None:
        self._calibrate_s = calibrate_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, name="gil-probe", daemon=True)
        self.turns = 0
        self.max_gap = 0.0
        self.idle_rate = 0.0

    def _spin(self) -> None:
        last = time.perf_counter()
        stop = self._stop
        while not stop.is_set():
            now = time.perf_counter()
            if now - last > self.max_gap:
                self.max_gap = now - last
            last = now
            self.turns += 1

    def __enter__(self) -> GilProbe:
        self._thread.start()
        time.sleep(0.05)
        start = self.turns
        time.sleep(self._calibrate_s)
        self.idle_rate = (self.turns - start) / self._calibrate_s
        return self

    def run(self, fn: Callable[[], Any]) -> dict[str, float]:
        """Call `fn` once with the spinner running; its time, the spinner's share, max gap."""
        time.sleep(0.01)
        self.max_gap = 0.0
        turns = self.turns
        began = time.perf_counter()
        fn()
        seconds = time.perf_counter() - began
        turns = self.turns - turns
        return {
            "seconds": seconds,
            "spinner_share": turns / seconds / self.idle_rate if self.idle_rate else 0.0,
            "max_gap_ms": self.max_gap * 1000,
        }

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
