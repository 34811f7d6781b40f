"""When to stop pre-copying: progress stats and a pure convergence predicate.

`MemoryMigrationStats` tracks what the pre-copy loop measured (CH's
MemoryMigrationContext); `decide()` turns it into CONTINUE / CONVERGE / ABORT
(CH's is_precopy_converged). No clock is read here: callers pass ``now`` and
durations from whatever clock they use, so tests run on synthetic numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from vmig.errors import ConfigError

__all__ = [
    "CANCELLABLE",
    "DEFAULT_SMOOTHING",
    "SEND_TRANSITIONS",
    "STALL_DECISIONS",
    "SWITCHOVER_COMMANDS",
    "Decision",
    "MemoryMigrationStats",
    "SendPhase",
    "StallDetector",
    "StallStrategy",
    "Switchover",
    "TimeoutStrategy",
    "decide",
    "decide_with_reason",
    "next_send_phase",
    "next_throttle",
    "switchover_cause",
]

#: Weight of the newest sample in the bandwidth and dirty-rate averages. 0.5
#: follows a changing link within two or three iterations yet damps one slow or
#: fast chunk (iterations shrink quickly, so single samples are noisy).
DEFAULT_SMOOTHING = 0.5


class TimeoutStrategy(Enum):
    """What to do when pre-copy has not converged within the timeout."""

    #: Give up: abandon the migration, the source VM keeps running.
    CANCEL = "cancel"
    #: Switch over anyway and accept a downtime above the budget.
    IGNORE = "ignore"
    #: Switch to post-copy (the migration must allow it).
    POSTCOPY = "postcopy"


class SendPhase(Enum):
    """The sender's phases (one explicit phase instead of flags)."""

    CONNECTING = "connecting"  #: connections, handshake, START, CONFIG
    PRECOPY = "precopy"  #: copying memory while the guest runs
    SWITCHOVER = "switchover"  #: guest paused by the migration (if it ran): last pages, STATE
    POSTCOPY = "postcopy"  #: the destination runs the guest; its last pages follow
    COMPLETING = "completing"  #: COMPLETE sent: the point of no return
    COMPLETED = "completed"  #: the destination acknowledged COMPLETE
    CANCELLED = "cancelled"  #: cancelled on either side before the point of no return
    FAILED = "failed"  #: failed; the source runs again (or stays paused if in doubt)


#: phase -> the phases it may move to. Cancel and failure are transitions too.
SEND_TRANSITIONS: dict[SendPhase, frozenset[SendPhase]] = {
    SendPhase.CONNECTING: frozenset({SendPhase.PRECOPY, SendPhase.SWITCHOVER,
                                     SendPhase.CANCELLED, SendPhase.FAILED}),
    SendPhase.PRECOPY: frozenset({SendPhase.SWITCHOVER, SendPhase.CANCELLED,
                                  SendPhase.FAILED}),
    SendPhase.SWITCHOVER: frozenset({SendPhase.COMPLETING, SendPhase.POSTCOPY,
                                     SendPhase.CANCELLED, SendPhase.FAILED}),
    # post-copy and its COMPLETE may be cancelled only while paused (a lost connection
    # not back in time): the explicit rollback to the source's copy (lifecycle.py)
    SendPhase.POSTCOPY: frozenset({SendPhase.COMPLETING, SendPhase.CANCELLED,
                                   SendPhase.FAILED}),
    SendPhase.COMPLETING: frozenset({SendPhase.COMPLETED, SendPhase.CANCELLED,
                                     SendPhase.FAILED}),
    SendPhase.COMPLETED: frozenset(),
    SendPhase.CANCELLED: frozenset(),
    SendPhase.FAILED: frozenset(),
}

#: Phases a cancel may interrupt: before COMPLETE is sent, the source can run again.
CANCELLABLE = frozenset({SendPhase.CONNECTING, SendPhase.PRECOPY, SendPhase.SWITCHOVER})


def next_send_phase(current: SendPhase, wanted: SendPhase) -> SendPhase:
    """`wanted` if SEND_TRANSITIONS allows it from `current`; ValueError otherwise."""
    if wanted not in SEND_TRANSITIONS[current]:
        raise ValueError(f"a sender cannot go from {current.value} to {wanted.value}")
    return wanted


#: Auto-converge (QEMU's defaults): the first step, each step after it, the most. They are
#: the defaults of the send parameters auto_converge_initial/_step/_max, which the sender
#: passes in (and may change mid-flight).
THROTTLE_INITIAL_PERCENT = 20
THROTTLE_STEP_PERCENT = 10
THROTTLE_MAX_PERCENT = 99
#: Iterations in a row in which the guest dirtied more than this share of what was sent
#: (QEMU's test: more than half) before the throttle steps up.
THROTTLE_AFTER_ITERATIONS = 2
THROTTLE_DIRTY_SHARE = 0.5


def next_throttle(current: int, streak: int, dirty_rate: float, bandwidth: float, *,
                  initial: int = THROTTLE_INITIAL_PERCENT, step: int = THROTTLE_STEP_PERCENT,
                  maximum: int = THROTTLE_MAX_PERCENT) -> tuple[int, int]:
    """Auto-converge after an iteration: the new throttle percent and streak.

    The streak counts iterations in a row in which the guest dirtied memory faster than
    half the measured send rate (as QEMU: pre-copy then cannot catch up, and a small
    working set caps the dirty rate it can show); once it reaches
    THROTTLE_AFTER_ITERATIONS the throttle steps up (to `initial`, then by `step`, never
    above `maximum`) and the streak starts again. A slower guest resets it; the throttle
    stays where it is. A throttle above `maximum` (lowered mid-flight) comes down to it.
    """
    if current > maximum:
        return maximum, streak
    if bandwidth <= 0 or dirty_rate <= THROTTLE_DIRTY_SHARE * bandwidth:
        return current, 0
    streak += 1
    if streak < THROTTLE_AFTER_ITERATIONS:
        return current, streak
    if current == 0:
        return min(initial, maximum), 0
    return min(current + step, maximum), 0


class Decision(Enum):
    """The pre-copy loop's next step."""

    #: Send another iteration of dirty pages with the VM running.
    CONTINUE = "continue"
    #: Pause the VM, send the last dirty pages and the state, complete.
    CONVERGE = "converge"
    #: Stop and abandon the migration.
    ABORT = "abort"
    #: Pause, send the state, and let the destination run while the rest follows.
    POSTCOPY = "postcopy"


@dataclass
class MemoryMigrationStats:
    """Pre-copy progress, updated by the loop after every iteration.

    Times are float seconds from the caller's clock (`started_at` on the same
    clock as the ``now`` given to `decide`); rates are exponentially smoothed
    with weight `smoothing` for the newest sample.
    """

    started_at: float = 0.0
    #: Iterations sent so far (the first full copy is iteration 1).
    iteration: int = 0
    bytes_sent_total: int = 0
    last_iteration_bytes: int = 0
    last_iteration_seconds: float = 0.0
    #: Dirty bytes right now: what the next iteration (or the downtime) must send.
    remaining_bytes: int = 0
    #: Measured send rate; 0.0 until an iteration took measurable time.
    bandwidth_bytes_per_s: float = 0.0
    #: How fast the guest dirties memory while an iteration is sent.
    dirty_rate_bytes_per_s: float = 0.0
    #: What the pause costs besides the last pages: STATE and COMPLETE round trips, the
    #: memory digests when they are verified. Set by the sender from what it measured.
    switchover_overhead_ms: float = 0.0
    smoothing: float = DEFAULT_SMOOTHING
    _bytes_avg: float = field(default=0.0, repr=False)
    _seconds_avg: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.smoothing <= 1.0:
            raise ConfigError(f"smoothing must be in (0, 1], not {self.smoothing}")

    @property
    def page_transfer_ms(self) -> float:
        """Time to send `remaining_bytes` at the measured bandwidth, in ms.

        0.0 when nothing is dirty; infinity while no bandwidth has been measured.
        """
        if self.remaining_bytes <= 0:
            return 0.0
        if self.bandwidth_bytes_per_s <= 0.0:
            return math.inf
        return self.remaining_bytes / self.bandwidth_bytes_per_s * 1000.0

    @property
    def expected_downtime_ms(self) -> float:
        """The pause a switch-over now would take: the last pages plus the fixed costs."""
        return self.page_transfer_ms + self.switchover_overhead_ms

    def elapsed(self, now: float) -> float:
        """Seconds since `started_at` on the caller's clock."""
        return now - self.started_at

    def record_iteration(self, nbytes: int, seconds: float) -> None:
        """Count an iteration that sent `nbytes` in `seconds`; update the bandwidth.

        An iteration that sent nothing or took no measurable time counts but
        leaves the bandwidth as it was.
        """
        if nbytes < 0 or seconds < 0:
            raise ValueError(f"bad iteration sample: {nbytes} bytes in {seconds} s")
        self.iteration += 1
        self.bytes_sent_total += nbytes
        self.last_iteration_bytes = nbytes
        self.last_iteration_seconds = seconds
        if nbytes > 0 and seconds > 0:
            # Smooth bytes and seconds apart, then divide: each iteration weighs as much
            # as the time it took. A tiny iteration (a few pages, one round trip) is bound
            # by latency, not bandwidth; as a rate of its own it would halve the estimate.
            self._bytes_avg = self._smooth(self._bytes_avg, float(nbytes))
            self._seconds_avg = self._smooth(self._seconds_avg, seconds)
            self.bandwidth_bytes_per_s = self._bytes_avg / self._seconds_avg

    def record_dirty(self, remaining_bytes: int, seconds_since_last: float) -> None:
        """Set the bytes dirtied since the last collection, `seconds_since_last` ago.

        Updates `remaining_bytes` and the smoothed dirty rate (not when the
        interval is zero).
        """
        if remaining_bytes < 0 or seconds_since_last < 0:
            raise ValueError(f"bad dirty sample: {remaining_bytes} bytes in {seconds_since_last} s")
        self.remaining_bytes = remaining_bytes
        if seconds_since_last > 0:
            self.dirty_rate_bytes_per_s = self._smooth(
                self.dirty_rate_bytes_per_s, remaining_bytes / seconds_since_last
            )

    def _smooth(self, average: float, sample: float) -> float:
        if average <= 0.0:
            return sample  # the first sample is the average
        return self.smoothing * sample + (1.0 - self.smoothing) * average


def decide_with_reason(
    stats: MemoryMigrationStats,
    downtime_ms: float,
    timeout_s: float,
    strategy: TimeoutStrategy,
    now: float,
    max_iterations: int | None = None,
    postcopy_after: int | None = None,
) -> tuple[Decision, str]:
    """`decide`, plus one line saying which exit condition fired (for logs and progress)."""
    if downtime_ms < 0 or timeout_s <= 0:
        raise ConfigError(
            f"downtime must be >= 0 ms and timeout > 0 s (got {downtime_ms} ms, {timeout_s} s)"
        )
    if max_iterations is not None and max_iterations < 1:
        raise ConfigError(f"max_iterations must be at least 1, not {max_iterations}")
    if stats.iteration == 0:
        return Decision.CONTINUE, "nothing sent yet: the first iteration copies all memory"
    if stats.remaining_bytes == 0:
        return Decision.CONVERGE, "no dirty memory left"
    expected = stats.expected_downtime_ms
    if expected <= downtime_ms:
        return Decision.CONVERGE, (
            f"expected downtime {expected:.1f} ms is within the {downtime_ms:g} ms budget"
        )
    overhead = stats.switchover_overhead_ms
    if overhead >= downtime_ms and stats.page_transfer_ms <= downtime_ms:
        # The fixed costs alone break the budget: waiting longer cannot meet it.
        return Decision.CONVERGE, (
            f"the switch-over's fixed cost (~{overhead:.0f} ms) alone exceeds the "
            f"{downtime_ms:g} ms budget, and the pages left fit in it "
            f"({stats.page_transfer_ms:.1f} ms)"
        )
    elapsed = stats.elapsed(now)
    if postcopy_after is not None and stats.iteration >= postcopy_after and elapsed < timeout_s:
        return Decision.POSTCOPY, (
            f"pre-copy did not converge in {stats.iteration} iterations (expected downtime "
            f"{expected:.1f} ms over the {downtime_ms:g} ms budget): switching to post-copy")
    if elapsed >= timeout_s:
        why = f"pre-copy ran {elapsed:.1f} s, reaching the {timeout_s:g} s timeout"
    elif max_iterations is not None and stats.iteration >= max_iterations:
        why = f"pre-copy ran {stats.iteration} iterations, the limit"
    else:
        return Decision.CONTINUE, (
            f"expected downtime {expected:.1f} ms exceeds the {downtime_ms:g} ms budget"
        )
    if strategy is TimeoutStrategy.CANCEL:
        return Decision.ABORT, f"{why}; timeout strategy cancel"
    if strategy is TimeoutStrategy.POSTCOPY:
        return Decision.POSTCOPY, f"{why}; timeout strategy postcopy"
    return Decision.CONVERGE, f"{why}; timeout strategy ignore (downtime ~{expected:.0f} ms)"


def decide(
    stats: MemoryMigrationStats,
    downtime_ms: float,
    timeout_s: float,
    strategy: TimeoutStrategy,
    now: float,
    max_iterations: int | None = None,
    postcopy_after: int | None = None,
) -> Decision:
    """Whether pre-copy goes on, switches over, or gives up. Checked in this order:

    0. no iteration sent yet -> CONTINUE (the first one copies all of memory);
    1. nothing dirty (``remaining_bytes == 0``) -> CONVERGE;
    2. ``expected_downtime_ms <= downtime_ms`` -> CONVERGE (the last pages at the
       measured bandwidth plus the switch-over's fixed costs);
    2b. the fixed costs alone exceed the budget and the last pages fit in it ->
       CONVERGE (waiting cannot meet the budget; the summary reports the overrun);
    2c. with `postcopy_after`, ``iteration >= postcopy_after`` -> POSTCOPY;
    3. ``now - started_at >= timeout_s``, or ``iteration >= max_iterations`` when
       given -> ABORT for TimeoutStrategy.CANCEL, CONVERGE for IGNORE, POSTCOPY for
       POSTCOPY;
    4. otherwise -> CONTINUE.

    `now` is on the clock `stats.started_at` came from. Raises ConfigError for
    a negative downtime budget, a non-positive timeout or max_iterations < 1.
    """
    return decide_with_reason(stats, downtime_ms, timeout_s, strategy, now, max_iterations,
                              postcopy_after)[0]


# --- switch-over on command, and stall detection ---------------------------------------


class Switchover(Enum):
    """Why pre-copy ended and the switch-over began (the summary's `switchover`)."""

    #: The pages left fit the downtime budget (or nothing was left).
    CONVERGED = "converged"
    #: post-copy after `postcopy_after_iterations` passes.
    POSTCOPY_AFTER_ITERATIONS = "postcopy-after-iterations"
    #: The timeout (or the iteration limit), with timeout_strategy ignore or postcopy.
    TIMEOUT = "timeout"
    #: A stall, with stall_strategy force-complete or postcopy.
    STALL = "stall"
    #: vm.migration-start-postcopy.
    START_POSTCOPY = "start-postcopy"
    #: vm.migration-force-complete.
    FORCE_COMPLETE = "force-complete"


#: The switch-overs an operator can ask for, and the decision each one is.
SWITCHOVER_COMMANDS = {Switchover.START_POSTCOPY: Decision.POSTCOPY,
                       Switchover.FORCE_COMPLETE: Decision.CONVERGE}


def switchover_cause(decision: Decision, stats: MemoryMigrationStats, downtime_ms: float,
                     timeout_s: float, now: float, postcopy_after: int | None = None
                     ) -> Switchover:
    """Which of `decide`'s rules gave `decision` (CONVERGE or POSTCOPY), in its order:
    the budget met (rules 1-2b), post-copy after its iterations (2c), else the timeout
    or the iteration limit (3)."""
    if decision is Decision.POSTCOPY:
        if postcopy_after is not None and stats.iteration >= postcopy_after \
                and stats.elapsed(now) < timeout_s:
            return Switchover.POSTCOPY_AFTER_ITERATIONS
        return Switchover.TIMEOUT
    fixed_cost_bound = (stats.switchover_overhead_ms >= downtime_ms
                        and stats.page_transfer_ms <= downtime_ms)
    if stats.remaining_bytes == 0 or stats.expected_downtime_ms <= downtime_ms \
            or fixed_cost_bound:
        return Switchover.CONVERGED
    return Switchover.TIMEOUT


class StallStrategy(Enum):
    """What a stalled pre-copy does (params.py says why cancel is the default)."""

    #: Switch to post-copy (the migration must allow it).
    POSTCOPY = "postcopy"
    #: Pause the guest and switch over now, whatever the downtime.
    FORCE_COMPLETE = "force-complete"
    #: Give up: the source VM keeps running.
    CANCEL = "cancel"
    #: Only report it (an event, and `stall` in migration-info); pre-copy goes on.
    NONE = "none"


#: The decision each stall strategy makes.
STALL_DECISIONS = {StallStrategy.POSTCOPY: Decision.POSTCOPY,
                   StallStrategy.FORCE_COMPLETE: Decision.CONVERGE,
                   StallStrategy.CANCEL: Decision.ABORT, StallStrategy.NONE: Decision.CONTINUE}


class StallDetector:
    """Pre-copy that stopped making progress (KubeVirt VEP 248's progress timeout).

    Fed the bytes left after each pass (`observe`): progress is bytes left below the
    best so far (`best_bytes`, where progress was last seen) by `margin`, i.e. under
    ``best_bytes * (1 - margin)``; reaching 0 is always progress. A stall is `timeout_s`
    without progress. Each stall is reported once: the next one needs another
    `timeout_s` without progress. `restart` counts as progress (auto-converge stepped
    the throttle up: it is still acting). No clock is read: callers pass ``now``.
    """

    def __init__(self, timeout_s: float, margin: float) -> None:
        if timeout_s <= 0 or not 0.0 <= margin <= 1.0:
            raise ConfigError(f"a stall needs a timeout > 0 s and a margin in [0, 1] (got "
                              f"{timeout_s} s, {margin})")
        self.timeout_s = timeout_s
        self.margin = margin
        #: Bytes left when progress was last seen; None before the first observation.
        self.best_bytes: int | None = None
        #: When progress was last seen.
        self.progress_at = 0.0
        #: Stalls reported so far.
        self.stalls = 0
        self._window_start = 0.0  # progress, or the last stall reported

    def observe(self, now: float, bytes_left: int) -> bool:
        """Record the bytes left at `now`; True when this observation finds a stall."""
        if self.best_bytes is None or bytes_left == 0 \
                or bytes_left < self.best_bytes * (1.0 - self.margin):
            self.restart(now, bytes_left)
            return False
        if now - self._window_start < self.timeout_s:
            return False
        self.stalls += 1
        self._window_start = now  # the next report needs another timeout without progress
        return True

    def restart(self, now: float, bytes_left: int) -> None:
        """Count `bytes_left` at `now` as progress: the timeout starts again from here."""
        self.best_bytes = bytes_left
        self.progress_at = self._window_start = now

    def stalled_for(self, now: float) -> float:
        """Seconds since progress was last seen."""
        return now - self.progress_at
