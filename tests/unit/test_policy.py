"""Pre-copy policy: stats bookkeeping and the convergence decision on synthetic numbers."""

from __future__ import annotations

import math

import pytest

from vmig.errors import ConfigError
from vmig.migration.policy import (
    Decision,
    MemoryMigrationStats,
    TimeoutStrategy,
    decide,
    decide_with_reason,
    next_throttle,
)
from vmig.units import MiB

CANCEL, IGNORE = TimeoutStrategy.CANCEL, TimeoutStrategy.IGNORE


def stats_after_first_copy(remaining: int, bandwidth: float = 100 * MiB) -> MemoryMigrationStats:
    """Stats as they are after the full copy of 1 GiB at `bandwidth` bytes/s."""
    stats = MemoryMigrationStats(started_at=1000.0)
    stats.record_iteration(1024 * MiB, 1024 * MiB / bandwidth)
    stats.record_dirty(remaining, 1024 * MiB / bandwidth)
    return stats


def test_enum_values():
    assert TimeoutStrategy("cancel") is CANCEL and TimeoutStrategy("ignore") is IGNORE
    assert {d.name for d in Decision} == {"CONTINUE", "CONVERGE", "POSTCOPY", "ABORT"}


def test_record_iteration_and_bandwidth_smoothing():
    stats = MemoryMigrationStats()
    assert stats.bandwidth_bytes_per_s == 0.0
    stats.record_iteration(100 * MiB, 1.0)
    assert stats.iteration == 1
    assert stats.bandwidth_bytes_per_s == 100 * MiB  # first sample taken as is
    stats.record_iteration(50 * MiB, 1.0)
    assert stats.bandwidth_bytes_per_s == pytest.approx(75 * MiB)  # 0.5 * 50 + 0.5 * 100
    assert stats.bytes_sent_total == 150 * MiB
    assert (stats.last_iteration_bytes, stats.last_iteration_seconds) == (50 * MiB, 1.0)
    stats.record_iteration(0, 0.0)  # an empty iteration counts, but measures nothing
    assert stats.iteration == 3
    assert stats.bandwidth_bytes_per_s == pytest.approx(75 * MiB)
    with pytest.raises(ValueError):
        stats.record_iteration(-1, 1.0)


def test_a_tiny_latency_bound_iteration_does_not_drag_the_bandwidth_down():
    """1 GiB in 0.5 s, then 64 KiB in one 1 ms round trip: still about 2 GiB/s, not the
    average of 2 GiB/s and 64 MiB/s."""
    stats = MemoryMigrationStats()
    stats.record_iteration(1024 * MiB, 0.5)
    stats.record_iteration(64 * 1024, 0.001)
    assert stats.bandwidth_bytes_per_s == pytest.approx(2048 * MiB, rel=0.01)


def test_record_dirty_and_dirty_rate():
    stats = MemoryMigrationStats(smoothing=1.0)
    stats.record_dirty(10 * MiB, 2.0)
    assert stats.remaining_bytes == 10 * MiB
    assert stats.dirty_rate_bytes_per_s == 5 * MiB
    stats.record_dirty(4 * MiB, 0.0)  # no interval: rate unchanged
    assert stats.remaining_bytes == 4 * MiB
    assert stats.dirty_rate_bytes_per_s == 5 * MiB
    with pytest.raises(ValueError):
        stats.record_dirty(-1, 1.0)
    with pytest.raises(ConfigError):
        MemoryMigrationStats(smoothing=0.0)


def test_expected_downtime():
    stats = MemoryMigrationStats()
    assert stats.expected_downtime_ms == 0.0  # nothing dirty
    stats.remaining_bytes = MiB
    assert stats.expected_downtime_ms == math.inf  # no bandwidth measured yet
    stats.bandwidth_bytes_per_s = 100 * MiB
    assert stats.expected_downtime_ms == pytest.approx(10.0)


def test_first_iteration_always_continues():
    stats = MemoryMigrationStats(started_at=0.0)
    assert decide(stats, 300, 60, CANCEL, now=0.0) is Decision.CONTINUE
    assert decide(stats, 300, 60, CANCEL, now=1e6) is Decision.CONTINUE


def test_nothing_dirty_converges():
    stats = stats_after_first_copy(remaining=0)
    decision, reason = decide_with_reason(stats, 0, 60, CANCEL, now=1000.0)
    assert decision is Decision.CONVERGE and "no dirty memory" in reason


def test_downtime_within_budget_converges():
    stats = stats_after_first_copy(remaining=20 * MiB)  # 200 ms at 100 MiB/s
    assert decide(stats, 300, 60, CANCEL, now=1001.0) is Decision.CONVERGE
    assert decide(stats, 200, 60, CANCEL, now=1001.0) is Decision.CONVERGE  # boundary
    assert decide(stats, 199, 60, CANCEL, now=1001.0) is Decision.CONTINUE


def test_downtime_over_budget_continues_until_timeout():
    stats = stats_after_first_copy(remaining=500 * MiB)  # 5 s at 100 MiB/s
    decision, reason = decide_with_reason(stats, 300, 60, CANCEL, now=1059.9)
    assert decision is Decision.CONTINUE and "exceeds" in reason


@pytest.mark.parametrize(
    ("strategy", "expected"), [(CANCEL, Decision.ABORT), (IGNORE, Decision.CONVERGE)]
)
def test_timeout_applies_the_strategy(strategy, expected):
    stats = stats_after_first_copy(remaining=500 * MiB)
    assert decide(stats, 300, 60, strategy, now=1060.0) is expected
    _, reason = decide_with_reason(stats, 300, 60, strategy, now=1075.0)
    assert "timeout" in reason and strategy.value in reason


def test_convergence_beats_timeout():
    stats = stats_after_first_copy(remaining=0)
    assert decide(stats, 300, 60, CANCEL, now=5000.0) is Decision.CONVERGE


@pytest.mark.parametrize(
    ("strategy", "expected"), [(CANCEL, Decision.ABORT), (IGNORE, Decision.CONVERGE)]
)
def test_max_iterations_acts_like_the_timeout(strategy, expected):
    stats = stats_after_first_copy(remaining=500 * MiB)
    for _ in range(4):
        stats.record_iteration(500 * MiB, 5.0)
    assert stats.iteration == 5
    assert decide(stats, 300, 60, strategy, 1001.0, max_iterations=6) is Decision.CONTINUE
    assert decide(stats, 300, 60, strategy, 1001.0, max_iterations=5) is expected


def test_no_bandwidth_yet_means_infinite_downtime():
    stats = MemoryMigrationStats(started_at=0.0)
    stats.record_iteration(4096, 0.0)
    stats.record_dirty(4096, 0.0)
    assert decide(stats, 1e9, 60, CANCEL, now=1.0) is Decision.CONTINUE


def test_bad_parameters():
    stats = stats_after_first_copy(remaining=0)
    with pytest.raises(ConfigError):
        decide(stats, -1, 60, CANCEL, now=0.0)
    with pytest.raises(ConfigError):
        decide(stats, 300, 0, CANCEL, now=0.0)
    with pytest.raises(ConfigError):
        decide(stats, 300, 60, CANCEL, now=0.0, max_iterations=0)


def test_a_converging_workload_simulated():
    """Dirty set shrinks each round (dirty rate < bandwidth): converges, no timeout."""
    now = 0.0
    stats = MemoryMigrationStats(started_at=now)
    bandwidth, dirty_rate = 100 * MiB, 20 * MiB
    to_send = 1024 * MiB
    decisions = []
    for _ in range(50):
        seconds = to_send / bandwidth
        now += seconds
        stats.record_iteration(to_send, seconds)
        to_send = int(dirty_rate * seconds)
        stats.record_dirty(to_send, seconds)
        decision = decide(stats, 300, 60, CANCEL, now)
        decisions.append(decision)
        if decision is not Decision.CONTINUE:
            break
    else:
        pytest.fail("no decision but CONTINUE in 50 iterations")
    assert decisions[-1] is Decision.CONVERGE
    assert stats.expected_downtime_ms <= 300
    assert 2 <= stats.iteration <= 5


FAST_GUEST = (300.0, 100.0)  # dirty rate and send rate: the guest outruns pre-copy


def _steps(iterations: int, **steps: int) -> list[int]:
    """The throttle after each of `iterations` iterations of a guest that outruns us."""
    percent, streak, seen = 0, 0, []
    for _ in range(iterations):
        percent, streak = next_throttle(percent, streak, *FAST_GUEST, **steps)
        seen.append(percent)
    return seen


def test_auto_converge_steps_by_default_as_qemu():
    assert _steps(8) == [0, 20, 20, 30, 30, 40, 40, 50]
    assert _steps(40)[-1] == 99  # and stays there


def test_auto_converge_steps_are_parameters():
    assert _steps(8, initial=50, step=25, maximum=90) == [0, 50, 50, 75, 75, 90, 90, 90]
    assert _steps(4, initial=60, maximum=40) == [0, 40, 40, 40]  # never above the maximum


def test_a_slow_guest_resets_the_streak_and_keeps_the_throttle():
    assert next_throttle(30, 1, 10.0, 100.0) == (30, 0)
    assert next_throttle(0, 1, 300.0, 0.0) == (0, 0)  # no bandwidth measured yet


def test_a_maximum_lowered_below_the_throttle_brings_it_down():
    assert next_throttle(70, 1, *FAST_GUEST, maximum=50) == (50, 1)
    assert next_throttle(70, 0, 10.0, 100.0, maximum=50) == (50, 0)  # slow guest too
