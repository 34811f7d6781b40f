"""`TokenBucket`: one bandwidth cap shared by every connection of a migration.

Each write takes as many tokens as it puts on the wire; tokens flow in at `rate`
bytes per second, and an idle bucket keeps at most `burst` of them. A write waits
until its own bytes are paid for: the bucket may go into debt (a write bigger than
what is there), and the wait is that debt at `rate`. Writers reserve their bytes
under a lock before they wait, so any number of connections share the cap, and the
bytes written stay at `rate` whatever the size of the writes. The bucket starts
empty, so even a short transfer keeps to the cap. `stop()` wakes every waiter (a
cancel must not wait for the cap).
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
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(rate * BURST_SECONDS,
                                                                MIN_BURST_BYTES)
        self._clock = clock
        self._tokens = 0.0
        self._stamp = clock()
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def reserve(self, nbytes: int) -> float:
        """Take `nbytes` of tokens now; return how long the caller must wait for them."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= nbytes  # reserved now: later writers queue behind this one
            return max(-self._tokens, 0.0) / self.rate

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
