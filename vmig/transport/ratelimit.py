"""`TokenBucket`: one bandwidth cap shared by every connection of a migration.

Each write takes as many tokens as it puts on the wire; tokens flow in at `rate`
bytes per second, and an idle bucket keeps at most `burst` of them. A write waits
until its own bytes are paid for: the bucket may go into debt (a write bigger than
what is there), and the wait is that debt at `rate`. Writers reserve their bytes
under a lock before they wait, so any number of connections share the cap, and the
bytes written stay at `rate` whatever the size of the writes. The bucket starts
empty, so even a short transfer keeps to the cap. `stop()` wakes every waiter (a
cancel must not wait for the cap). `set_rate()` changes the cap while writers use it
(vm.migration-set-parameters): a write already waiting keeps its wait, the next one
pays at the new rate; None lifts the cap.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: What an idle bucket may save up: 50 ms at the cap (small, so the cap holds over short
#: stretches too), and at least 64 KiB.
BURST_SECONDS = 0.05
MIN_BURST_BYTES = 64 << 10


class RateLimitStopped(Exception):
    """The bucket was stopped while a writer waited."""


class TokenBucket:
    """`rate` bytes per second on average, shared by all threads that `take()`."""

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError(f"a rate must be positive, not {rate}")
        self.rate: float | None = float(rate)
        self._fixed_burst = burst
        self.burst = self._burst_for(float(rate))
        self._clock = clock
        self._tokens = 0.0
        self._stamp = clock()
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def _burst_for(self, rate: float) -> float:
        if self._fixed_burst is not None:
            return float(self._fixed_burst)
        return max(rate * BURST_SECONDS, MIN_BURST_BYTES)

    def set_rate(self, rate: float | None) -> None:
        """Change the cap from the next `reserve()` on; None or 0 lifts it.

        Writers already waiting keep their waits: a debt run up at the old rate is
        carried over as the same time, so that the next writer starts where the
        old rate's queue ends. A cap set again after none starts from an empty bucket.
        """
        if rate is not None and rate < 0:
            raise ValueError(f"a rate must not be negative, not {rate}")
        new = float(rate) if rate else None
        with self._lock:
            now = self._clock()
            old = self.rate
            if old is not None:
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * old)
            else:
                self._tokens = 0.0
            self._stamp = now
            if new is not None:
                if old is not None and self._tokens < 0:
                    self._tokens *= new / old  # the same wait, paid at the new rate
                self.burst = self._burst_for(new)
                self._tokens = min(self._tokens, self.burst)
            self.rate = new

    def reserve(self, nbytes: int) -> float:
        """Take `nbytes` of tokens now; return how long the caller must wait for them
        (0 while no cap is set)."""
        with self._lock:
            rate = self.rate
            if rate is None:
                return 0.0
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * rate)
            self._stamp = now
            self._tokens -= nbytes  # reserved now: later writers queue behind this one
            return max(-self._tokens, 0.0) / rate

    def take(self, nbytes: int) -> float:
        """Wait until `nbytes` may go; return the seconds waited.

        Raises RateLimitStopped if `stop()` is called meanwhile.
        """
        delay = self.reserve(nbytes)
        if delay > 0 and self._stopped.wait(delay):
            raise RateLimitStopped("the migration stopped while waiting for the cap")
        return delay

    def stop(self) -> None:
        self._stopped.set()
