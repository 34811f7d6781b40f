"""benchmarks/wakeup_probe.py, the scheduling floor beside the post-copy benchmark: it
must run in real time where it may, count the wake-ups after its mark apart, and stop on
SIGTERM with its figures."""

from __future__ import annotations

import array
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))

import wakeup_probe

PROBE = Path(wakeup_probe.__file__)


def test_the_figures_are_nearest_rank_lateness_in_ms() -> None:
    late = array.array("d", [i / 1e6 for i in range(1, 1001)])  # 1 .. 1000 µs
    figures = wakeup_probe.summary(late)
    assert figures == {"wakeups": 1000, "p50_ms": 0.5, "p99_ms": 0.99, "p999_ms": 0.999,
                       "max_ms": 1.0}
    assert wakeup_probe.summary(array.array("d"))["p99_ms"] is None


def _catches_sigusr1(pid: int) -> bool:
    """Whether the process has its SIGUSR1 handler in place (before, the signal kills)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGUSR1 - 1) & 1)
    return False


def test_the_probe_marks_on_sigusr1_and_reports_on_sigterm() -> None:
    probe = subprocess.Popen([sys.executable, str(PROBE), "--interval-us", "1000"],
                             stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not _catches_sigusr1(probe.pid):
            assert time.monotonic() < deadline and probe.poll() is None
            time.sleep(0.01)
        time.sleep(0.5)
        if os.geteuid() == 0:  # real time, as the fault threads it stands in for
            assert os.sched_getscheduler(probe.pid) == os.SCHED_FIFO
        probe.send_signal(signal.SIGUSR1)
        time.sleep(0.3)
        probe.terminate()
        out, _ = probe.communicate(timeout=10)
    finally:
        probe.kill()
    assert probe.returncode == 0
    figures = json.loads(out)
    assert figures["realtime"] is (os.geteuid() == 0)  # root may use SCHED_FIFO
    whole, marked = figures["all"], figures["marked"]
    # about 1,000 wake-ups a second: ~800 in all, ~300 after the mark
    assert 100 <= marked["wakeups"] < whole["wakeups"] <= 900
    assert whole["wakeups"] - marked["wakeups"] >= 200
    assert 0 <= marked["p50_ms"] <= marked["p99_ms"] <= marked["max_ms"]
