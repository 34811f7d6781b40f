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


def test_a_new_rate_applies_from_the_next_write():
    clock = FakeClock()
    bucket = TokenBucket(1000, burst=100, clock=clock)
    assert bucket.reserve(1000) == pytest.approx(1.0)  # a 1 s debt at 1000 B/s
    bucket.set_rate(500)  # halved: the debt is still 1 s, the next write pays at 500 B/s
    assert bucket.reserve(500) == pytest.approx(2.0)
    clock.now = 2.0  # the queue has drained
    assert bucket.reserve(250) == pytest.approx(0.5)
    bucket.set_rate(4000)  # raised: the 0.5 s still owed stays 0.5 s
    assert bucket.reserve(4000) == pytest.approx(1.5)


def test_no_rate_lifts_the_cap_and_a_cap_can_come_back():
    clock = FakeClock()
    bucket = TokenBucket(1000, burst=100, clock=clock)
    assert bucket.reserve(2000) == pytest.approx(2.0)
    bucket.set_rate(None)
    assert bucket.rate is None
    assert bucket.reserve(10**9) == 0.0 and bucket.take(10**9) == 0.0
    bucket.set_rate(0)  # 0 is no cap too
    assert bucket.reserve(10**9) == 0.0
    clock.now = 5.0
    bucket.set_rate(2000)  # a cap again: from an empty bucket, nothing owed or saved
    assert bucket.reserve(1000) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        bucket.set_rate(-1)


def test_a_lowered_cap_holds_for_threads_already_writing():
    bucket = TokenBucket(10_000_000)  # 10 MB/s, then lowered to 2 MB/s
    sent = []

    def write() -> None:
        for _ in range(40):
            bucket.take(20_000)
            sent.append((time.monotonic(), 20_000))

    threads = [threading.Thread(target=write) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.01)
    bucket.set_rate(2_000_000)
    changed = time.monotonic()
    for thread in threads:
        thread.join()
    later = sum(n for at, n in sent if at > changed + 0.05)
    took = time.monotonic() - changed - 0.05
    assert later / took <= 1.2 * 2_000_000, later / took
