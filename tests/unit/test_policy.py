"""Pre-copy policy: stats bookkeeping and the convergence decision on synthetic numbers."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmig.errors import ConfigError
from vmig.migration.policy import (
    STALL_DECISIONS,
    SWITCHOVER_COMMANDS,
    Decision,
    MemoryMigrationStats,
    StallDetector,
    StallStrategy,
    Switchover,
    TimeoutStrategy,
    decide,
    decide_with_reason,
    next_throttle,
    switchover_cause,
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


# --- stall detection and the switch-over's cause -----------------------------------------


def test_a_flat_bytes_left_stalls_after_the_timeout_and_is_reported_once_per_timeout():
    detector = StallDetector(timeout_s=10.0, margin=0.1)
    assert not detector.observe(0.0, 100 * MiB)  # the first observation is the best so far
    assert not detector.observe(5.0, 100 * MiB)
    assert not detector.observe(9.9, 95 * MiB)  # 5% down: not enough
    assert detector.observe(10.0, 100 * MiB)
    assert detector.stalls == 1 and detector.stalled_for(10.0) == 10.0
    assert not detector.observe(15.0, 100 * MiB)  # reported: the next needs another 10 s
    assert detector.observe(20.0, 99 * MiB)
    assert detector.stalls == 2 and detector.stalled_for(20.0) == 20.0
    assert detector.best_bytes == 100 * MiB


def test_falling_by_the_margin_is_progress_and_restarts_the_timeout():
    detector = StallDetector(timeout_s=10.0, margin=0.1)
    detector.observe(0.0, 100 * MiB)
    assert not detector.observe(9.0, 89 * MiB)  # below 90 MiB: progress
    assert detector.best_bytes == 89 * MiB and detector.progress_at == 9.0
    assert not detector.observe(18.0, 200 * MiB)  # worse, but within 10 s of progress
    assert detector.observe(19.0, 81 * MiB)  # 81 > 89 * 0.9 = 80.1: no progress for 10 s
    assert detector.best_bytes == 89 * MiB


def test_a_steady_slow_fall_is_never_a_stall():
    """4% per pass with a 10% margin: progress every third pass, never 10 s without."""
    detector = StallDetector(timeout_s=10.0, margin=0.1)
    left = 1024.0 * MiB
    for second in range(200):
        assert not detector.observe(float(second), int(left)), second
        left *= 0.96


def test_reaching_zero_is_progress_whatever_the_margin():
    detector = StallDetector(timeout_s=1.0, margin=1.0)
    detector.observe(0.0, MiB)
    assert detector.observe(1.0, 1)  # margin 1: only 0 is progress
    assert not detector.observe(5.0, 0)
    assert not detector.observe(5.5, 0)
    assert detector.observe(6.0, 0) is False  # 0 stays progress


def test_restart_counts_as_progress():
    detector = StallDetector(timeout_s=10.0, margin=0.1)
    detector.observe(0.0, 100 * MiB)
    detector.restart(8.0, 120 * MiB)  # auto-converge stepped the throttle up
    assert not detector.observe(17.0, 120 * MiB)
    assert detector.observe(18.0, 120 * MiB)


def test_stall_detector_refuses_bad_settings():
    for timeout, margin in ((0.0, 0.1), (-1.0, 0.1), (1.0, -0.1), (1.0, 1.5)):
        with pytest.raises(ConfigError):
            StallDetector(timeout, margin)


@settings(max_examples=300, deadline=None)
@given(timeout=st.floats(0.5, 100.0), margin=st.floats(0.0, 1.0),
       samples=st.lists(st.tuples(st.floats(0.0, 50.0), st.integers(0, 1 << 30)),
                        min_size=1, max_size=40))
def test_a_stall_is_found_exactly_when_no_progress_came_within_the_timeout(
        timeout: float, margin: float, samples: list[tuple[float, int]]) -> None:
    """Against a direct reading of the rule: a stall is an observation with no progress
    (0, or below the best by the margin) at least `timeout` after the last progress or
    the last stall."""
    detector = StallDetector(timeout, margin)
    now = 0.0
    best: int | None = None
    window = 0.0
    for step, left in samples:
        now += step
        progress = best is None or left == 0 or left < best * (1 - margin)
        expected = not progress and now - window >= timeout
        if progress:
            best, window = left, now
        elif expected:
            window = now
        assert detector.observe(now, left) is expected
        assert detector.best_bytes == best


@settings(max_examples=300, deadline=None)
@given(remaining=st.integers(0, 1 << 30), bandwidth=st.floats(1.0, 1e10),
       downtime=st.integers(0, 1000), overhead=st.floats(0.0, 2000.0),
       elapsed=st.floats(0.0, 200.0), iterations=st.integers(1, 20),
       strategy=st.sampled_from([TimeoutStrategy.IGNORE, TimeoutStrategy.POSTCOPY]),
       postcopy_after=st.one_of(st.none(), st.integers(1, 20)))
def test_switchover_cause_names_the_rule_decide_applied(
        remaining: int, bandwidth: float, downtime: int, overhead: float, elapsed: float,
        iterations: int, strategy: TimeoutStrategy, postcopy_after: int | None) -> None:
    stats = MemoryMigrationStats(started_at=0.0, iteration=iterations, remaining_bytes=remaining,
                                 bandwidth_bytes_per_s=bandwidth,
                                 switchover_overhead_ms=overhead)
    decision, why = decide_with_reason(stats, downtime, 100.0, strategy, elapsed, 10,
                                       postcopy_after)
    if decision not in (Decision.CONVERGE, Decision.POSTCOPY):
        return
    cause = switchover_cause(decision, stats, downtime, 100.0, elapsed, postcopy_after)
    if "timeout strategy" in why:
        assert cause is Switchover.TIMEOUT, why
    elif decision is Decision.POSTCOPY:
        assert cause is Switchover.POSTCOPY_AFTER_ITERATIONS, why
    else:
        assert cause is Switchover.CONVERGED, why


def test_every_stall_strategy_and_command_has_a_decision():
    assert set(STALL_DECISIONS) == set(StallStrategy)
    assert STALL_DECISIONS[StallStrategy.CANCEL] is Decision.ABORT
    assert SWITCHOVER_COMMANDS == {Switchover.START_POSTCOPY: Decision.POSTCOPY,
                                   Switchover.FORCE_COMPLETE: Decision.CONVERGE}
