"""A cancel in every phase of `SendLifecycle` and `ReceiveLifecycle`: idempotent while and
after cancelling, refused with the reason once completed or failed (tests/e2e/
test_cancel_cases.py drives the same through real VMMs)."""

from __future__ import annotations

import pytest

from vmig.errors import MigrationCancelled, StateError
from vmig.migration.lifecycle import ReceiveLifecycle, SendLifecycle
from vmig.migration.metrics import MigrationMetrics
from vmig.migration.policy import SendPhase


def sending(*phases: SendPhase) -> SendLifecycle:
    lifecycle = SendLifecycle(MigrationMetrics("send"))
    for phase in phases:
        lifecycle.enter(phase)
    return lifecycle


@pytest.mark.parametrize("phases", [(), (SendPhase.PRECOPY,),
                                    (SendPhase.PRECOPY, SendPhase.SWITCHOVER)],
                         ids=["connecting", "precopy", "switchover"])
def test_a_cancel_is_taken_until_complete_is_sent(phases: tuple[SendPhase, ...]) -> None:
    lifecycle = sending(*phases)
    interrupted = []
    lifecycle.on_cancel(lambda: interrupted.append(True))
    assert lifecycle.cancel("first") is False
    assert lifecycle.stopped.is_set() and interrupted
    with pytest.raises(MigrationCancelled, match="first"):
        lifecycle.check_cancelled()


def test_a_second_cancel_while_cancelling_keeps_the_first_reason() -> None:
    lifecycle = sending(SendPhase.PRECOPY)
    lifecycle.cancel("first")
    lifecycle.cancel("second")
    assert lifecycle.cancel_reason == "first"


def test_a_cancel_once_cancelled_changes_nothing_and_is_not_refused() -> None:
    lifecycle = sending(SendPhase.PRECOPY)
    lifecycle.cancel("first")
    lifecycle.end(SendPhase.CANCELLED)  # the run has ended it; the sender is winding down
    assert lifecycle.cancel("again") is False
    assert lifecycle.cancel_reason == "first" and lifecycle.phase is SendPhase.CANCELLED


def test_a_cancel_after_a_failure_is_refused() -> None:
    lifecycle = sending(SendPhase.PRECOPY)
    lifecycle.end(SendPhase.FAILED)
    with pytest.raises(StateError) as refused:
        lifecycle.cancel("late")
    assert str(refused.value) == "cannot cancel: the migration already failed; nothing was changed"
    assert lifecycle.cancel_reason is None and not lifecycle.stopped.is_set()


def test_a_cancel_after_completion_is_refused() -> None:
    lifecycle = sending(SendPhase.PRECOPY, SendPhase.SWITCHOVER)
    lifecycle.commit(SendPhase.COMPLETING)
    with pytest.raises(StateError, match="point of no return"):
        lifecycle.cancel("late")
    lifecycle.enter(SendPhase.COMPLETED)
    with pytest.raises(StateError) as refused:
        lifecycle.cancel("late")
    assert str(refused.value) == ("cannot cancel: the migration already completed; nothing "
                                  "was changed")
    assert lifecycle.cancel_reason is None


def test_the_destination_refuses_a_cancel_once_completed() -> None:
    lifecycle = ReceiveLifecycle(MigrationMetrics("receive"))
    assert lifecycle.cancel("first") == (True, False)
    assert lifecycle.cancel("second") == (False, False)  # while cancelling: the same
    done = ReceiveLifecycle(MigrationMetrics("receive"))
    done.commit_complete()
    with pytest.raises(StateError, match="point of no return"):
        done.cancel("late")
    done.completed = True
    with pytest.raises(StateError, match="already completed; nothing was changed"):
        done.cancel("late")
