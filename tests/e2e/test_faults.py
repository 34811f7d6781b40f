"""A seeded set of faults injected into live migrations between real VMMs (tests/faults.py
says what is checked after each), then two network outages (every connection reset, the
network down for a second), in pre-copy and in post-copy, which must end completed.
benchmarks/faults.py runs more of them."""

from __future__ import annotations

import pytest
from faults import FAULT_GUEST, PROCESS_KINDS, Fault, Harness, plan
from helpers import Spawn, kill

SEED = 20261130
RUNS = 8
OUTAGES = (Fault("outage", 2, delay_s=0.05, phase="precopy", network_s=1.0),
           Fault("outage", 2, delay_s=0.01, phase="postcopy", network_s=1.0, postcopy=True))


@pytest.mark.timeout(600)
def test_seeded_faults_leave_one_running_vm_and_nothing_behind(spawn_vmm: Spawn) -> None:
    harness = Harness(lambda args: spawn_vmm(*args), kill, FAULT_GUEST)
    lines = []
    for fault in (*plan(SEED, RUNS, kinds=PROCESS_KINDS), *OUTAGES):
        result = harness.run(fault)
        lines.append(result.line())
        assert result.checks == ["one running VM", "self-check", "no leaks",
                                 "clean migration afterwards"] or (
            result.vm_at == "lost" and "clean migration afterwards" in result.checks), lines
    print("\n".join(lines))
