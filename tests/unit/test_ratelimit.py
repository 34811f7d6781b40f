"""The bandwidth cap: a token bucket shared by threads, on a fake clock and a real one."""

from __future__ import annotations

import threading
import time

import pytest

from vmig.transport.ratelimit import RateLimitStopped, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_waits_pay_for_every_byte_at_the_rate():
    clock = FakeClock()
    bucket = TokenBucket(1000, burst=100, clock=clock)
    assert bucket.reserve(500) == pytest.approx(0.5)  # starts empty
    assert bucket.reserve(500) == pytest.approx(1.0)  # queued behind the first
    clock.now = 1.0
    assert bucket.reserve(250) == pytest.approx(0.25)
    clock.now = 100.0  # idle: saves up no more than the burst
    assert bucket.reserve(1100) == pytest.approx(1.0)


def test_threads_share_the_cap():
    bucket = TokenBucket(4_000_000)  # 4 MB/s over 4 threads, 1 MB each
    began = time.monotonic()
    threads = [threading.Thread(target=lambda: [bucket.take(100_000) for _ in range(10)])
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took = time.monotonic() - began
    assert 0.9 <= took <= 1.3, took  # 4 MB at 4 MB/s


def test_stop_wakes_a_waiter():
    bucket = TokenBucket(1.0)
    errors = []

    def wait() -> None:
        try:
            bucket.take(1000)  # would wait 1000 s
        except RateLimitStopped as exc:
            errors.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.1)
    bucket.stop()
    thread.join(5)
    assert not thread.is_alive() and errors
    with pytest.raises(ValueError):
        TokenBucket(0)
