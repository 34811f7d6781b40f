"""Switch-over on command and the stall parameters, without a VM: the lifecycle's refusals
and the parameters' checks (tests/e2e/test_switchover.py drives real VMMs)."""

from __future__ import annotations

import pytest

from vmig.errors import ConfigError, StateError
from vmig.migration.lifecycle import SendLifecycle
from vmig.migration.metrics import MigrationMetrics
from vmig.migration.params import (
    DEFAULT_STALL_MARGIN,
    DEFAULT_STALL_TIMEOUT_S,
    SEND_PARAMETERS,
    SendParams,
    parameter,
)
from vmig.migration.policy import SendPhase, StallStrategy, Switchover

START, FORCE = Switchover.START_POSTCOPY, Switchover.FORCE_COMPLETE
URL = "unix:/tmp/x.sock"


def lifecycle_in(*phases: SendPhase) -> SendLifecycle:
    lifecycle = SendLifecycle(MigrationMetrics("send"))
    for phase in phases:
        lifecycle.enter(phase)
    return lifecycle


def refusal(lifecycle: SendLifecycle, command: Switchover) -> str:
    with pytest.raises(StateError) as info:
        lifecycle.command_switchover(command)
    return str(info.value)


def test_a_command_in_precopy_is_recorded_and_asking_again_is_the_same():
    lifecycle = lifecycle_in(SendPhase.PRECOPY)
    lifecycle.command_switchover(START)
    lifecycle.command_switchover(START)
    assert lifecycle.switchover_command is START
    assert "start-postcopy was asked for already" in refusal(lifecycle, FORCE)


def test_force_complete_may_be_asked_while_connecting_start_postcopy_not():
    lifecycle = lifecycle_in()
    assert "still connecting" in refusal(lifecycle, START)
    lifecycle.command_switchover(FORCE)
    assert lifecycle.switchover_command is FORCE


@pytest.mark.parametrize(("phases", "said"), [
    ((SendPhase.PRECOPY, SendPhase.SWITCHOVER), "already switching over"),
    ((SendPhase.PRECOPY, SendPhase.SWITCHOVER, SendPhase.POSTCOPY), "already in post-copy"),
    ((SendPhase.PRECOPY, SendPhase.SWITCHOVER, SendPhase.COMPLETING), "already completing"),
    ((SendPhase.PRECOPY, SendPhase.SWITCHOVER, SendPhase.COMPLETING, SendPhase.COMPLETED),
     "already completed"),
])
def test_commands_past_precopy_are_refused_with_the_phase(phases, said):
    lifecycle = lifecycle_in(*phases)
    for command in (START, FORCE):
        assert said in refusal(lifecycle, command)
    assert lifecycle.switchover_command is None


def test_commands_during_a_cancel_are_refused():
    lifecycle = lifecycle_in(SendPhase.PRECOPY)
    lifecycle.cancel("test")
    assert "being cancelled" in refusal(lifecycle, FORCE)


def test_stall_defaults_are_on_and_cancel():
    params = SendParams(URL)
    assert params.stall_timeout_s == DEFAULT_STALL_TIMEOUT_S == 150
    assert params.stall_margin == DEFAULT_STALL_MARGIN == 0.1
    assert params.stall_strategy is StallStrategy.CANCEL
    assert parameter(SEND_PARAMETERS, "stall_strategy").choices == (
        "postcopy", "force-complete", "cancel", "none")
    assert SendParams(URL, stall_strategy="none").stall_strategy is StallStrategy.NONE


def test_stall_parameters_are_checked():
    with pytest.raises(ConfigError, match="stall_strategy: postcopy needs postcopy"):
        SendParams(URL, stall_strategy="postcopy").validate()
    SendParams(URL, stall_strategy="postcopy", stall_timeout_s=0).validate()  # off: unused
    SendParams("tcp:h:1", token="t", stall_strategy="postcopy", postcopy=True).validate()
    with pytest.raises(ConfigError, match="stall_strategy: must be"):
        SendParams(URL, stall_strategy="later")
    for field, value in (("stall_margin", 1.5), ("stall_margin", -0.1),
                         ("stall_timeout_s", -1.0)):
        with pytest.raises(ConfigError, match=field):
            SendParams(URL, **{field: value}).validate()
