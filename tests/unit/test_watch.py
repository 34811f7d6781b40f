"""send-migration's progress bar (vmig.watch), drawn from migration-info figures."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from vmig.units import MiB
from vmig.watch import (
    progress_bar,
    progress_detail,
    progress_position,
    send_and_watch,
    show_progress,
    summary_table,
)

PAGE = 4096


def info(**figures: Any) -> dict[str, Any]:
    """vm.migration-info of a 256 MiB guest whose memory holds 64 MiB of data."""
    base = {"phase": "precopy", "memory_bytes": 256 * MiB, "data_bytes": 64 * MiB,
            "bytes_transferred": 0, "zero_pages": 0, "bytes_remaining": 64 * MiB,
            "iterations": 0, "bandwidth_bytes_per_s": None, "throughput_bytes_per_s": None,
            "dirty_rate_bytes_per_s": None, "expected_downtime_ms": None}
    return {**base, **figures}


def drawn(*infos: dict[str, Any]) -> str:
    """The bar's last line after `infos`, as a terminal would show it."""
    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=False, color_system=None)
    with progress_bar(console) as progress:
        task = progress.add_task("connecting", total=None, detail="")
        for figures in infos:
            show_progress(progress, task, figures)
    return out.getvalue().strip().splitlines()[-1]


def test_never_written_memory_counts_for_nothing() -> None:
    # connecting: nothing sent yet, the memory that holds data is all to do
    assert progress_position(info(phase="connecting", bytes_remaining=None)) == (0, 64 * MiB)
    assert progress_position(info()) == (0, 64 * MiB)
    line = drawn(info())
    assert "  0%" in line and "75%" not in line
    # a quarter of the data sent: 25%, not 81% of 256 MiB
    assert "25%" in drawn(info(bytes_transferred=16 * MiB, bytes_remaining=48 * MiB,
                               iterations=0, bandwidth_bytes_per_s=100e6))


def test_zero_pages_found_count_as_done() -> None:
    # the first pass skips zero pages: 16 MiB sent + 16 MiB found zero = half of 64 MiB
    figures = info(bytes_transferred=16 * MiB, zero_pages=16 * MiB // PAGE,
                   bytes_remaining=32 * MiB)
    assert progress_position(figures) == (32 * MiB, 64 * MiB)


def test_dirty_pages_grow_the_total() -> None:
    second_pass = info(iterations=1, bytes_transferred=64 * MiB, bytes_remaining=16 * MiB)
    assert progress_position(second_pass) == (64 * MiB, 80 * MiB)
    assert "80%" in drawn(info(), second_pass)


def test_the_bar_never_runs_backwards_when_the_vmm_says_how_far_it_is() -> None:
    # the guest dirtied more than the pass sent: the byte ratio falls from 80% to 64% ...
    near_the_end = info(iterations=1, bytes_transferred=64 * MiB, bytes_remaining=16 * MiB,
                        progress_percent=80.0)
    next_pass = info(iterations=2, bytes_transferred=64 * MiB, bytes_remaining=36 * MiB,
                     progress_percent=80.0)
    assert progress_position(next_pass) == (64 * MiB, 100 * MiB)
    line = drawn(near_the_end, next_pass)
    assert "80%" in line and "64%" not in line  # ... the VMM's progress_percent does not


def test_the_line_shows_rate_left_eta_and_dirty_rate() -> None:
    figures = info(iterations=2, bytes_transferred=80 * MiB, bytes_remaining=20 * MiB,
                   bandwidth_bytes_per_s=10e6, dirty_rate_bytes_per_s=4e6,
                   expected_downtime_ms=2000.0)
    assert progress_detail(figures) == ("iteration 2 · 80 MiB sent · 20 MiB left · 10 MB/s · "
                                        "ETA 2.1 s · dirtied 4 MB/s · downtime ~2,000.0 ms")
    slow = info(bytes_remaining=64 * MiB, bandwidth_bytes_per_s=1e6)
    assert "ETA 1m07s" in progress_detail(slow)
    line = drawn(figures)
    assert "20 MiB left" in line and "ETA 2.1 s" in line and "dirtied 4 MB/s" in line


def test_a_completed_migration_is_full() -> None:
    assert "100%" in drawn(info(phase="completed", bytes_transferred=70 * MiB,
                                bytes_remaining=0, iterations=3))
    # a local migration hands the memory fd over and copies nothing: still done
    assert "100%" in drawn(info(phase="completed", bytes_transferred=0, bytes_remaining=0))


def test_the_summary_title_stays_on_one_line() -> None:
    out = io.StringIO()
    title = "migration to tcp:127.0.0.1:35621"
    Console(file=out, width=100, color_system=None).print(
        summary_table({"status": "completed", "connections": 1}, title=title))
    assert out.getvalue().splitlines()[0].strip() == title


# --- Ctrl-C --------------------------------------------------------------------------------


class FakeVmm:
    """What the clients of one VMM saw: which client cancelled, and how often."""

    def __init__(self, running: dict[str, Any] | None) -> None:
        self.running = running
        self.cancelled_by: list[int] = []
        self.clients = 0


class FakeClient:
    """An ApiClient stand-in whose first request of `interrupt` raises KeyboardInterrupt
    (a Ctrl-C that cut it short); `fresh()` clients are never interrupted."""

    def __init__(self, vmm: FakeVmm, interrupt: str = "") -> None:
        vmm.clients += 1
        self.number, self.vmm, self.interrupt = vmm.clients, vmm, interrupt
        self.closed = False

    def _maybe_interrupted(self, what: str) -> None:
        if self.interrupt == what:
            self.interrupt = ""
            raise KeyboardInterrupt

    def fresh(self) -> FakeClient:
        return FakeClient(self.vmm)

    def send_migration(self, **params: Any) -> dict[str, Any]:
        self._maybe_interrupted("send")
        return {"id": "m1"}

    def migration_info(self) -> dict[str, Any]:
        return self.vmm.running or {"active": False}

    def wait_for_migration(self, migration_id: str, **kwargs: Any) -> dict[str, Any]:
        self._maybe_interrupted("wait")
        status = "cancelled" if self.vmm.cancelled_by else "completed"
        return {"id": migration_id, "status": status}

    def cancel_migration(self) -> dict[str, Any]:
        self.vmm.cancelled_by.append(self.number)
        return {}

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed = True


RUNNING = {"active": True, "role": "send", "migration_id": "m1"}


def test_ctrl_c_while_following_cancels_through_a_fresh_client() -> None:
    vmm = FakeVmm(RUNNING)
    summary = send_and_watch(FakeClient(vmm, interrupt="wait"), {})
    assert summary["status"] == "cancelled"
    assert vmm.cancelled_by == [2]  # not through the client the Ctrl-C cut short


def test_ctrl_c_while_the_send_starts_cancels_the_send_that_started() -> None:
    vmm = FakeVmm(RUNNING)
    summary = send_and_watch(FakeClient(vmm, interrupt="send"), {})
    assert vmm.cancelled_by == [2] and summary == {"id": "m1", "status": "cancelled"}


def test_ctrl_c_before_any_send_started_is_a_plain_interrupt() -> None:
    vmm = FakeVmm(None)
    with pytest.raises(KeyboardInterrupt):
        send_and_watch(FakeClient(vmm, interrupt="send"), {})
    assert vmm.cancelled_by == []
