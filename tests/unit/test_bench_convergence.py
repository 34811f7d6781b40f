"""The pure helpers of benchmarks/convergence_qemu.py (the benchmark itself runs only when
invoked): reading the guest's status page, merging both sides' copies, rates, the
figures a QEMU run is reported in, medians and outcomes."""

from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path

import pytest

# After tests/ on the path: benchmarks/faults.py must not shadow tests/faults.py.
sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))

import convergence_qemu
import convergence_report
import guest_runs
import guest_status

from vmig.guest import layout


def status_block(*cpus: tuple[int, int, int]) -> bytes:
    """Status blocks for (state, heartbeat, pages_written) per vCPU."""
    block = bytearray(len(cpus) * layout.STATUS_STRIDE)
    for index, (state, heartbeat, pages) in enumerate(cpus):
        base = index * layout.STATUS_STRIDE
        for offset, value in ((layout.ST_STATE, state), (layout.ST_HEARTBEAT, heartbeat),
                              (layout.ST_PAGES_WRITTEN, pages)):
            struct.pack_into("<Q", block, base + offset, value)
    return bytes(block)


def test_status_file_sums_vcpus_and_reads_a_hole_as_nothing(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    ram.write_bytes(bytes(1 << 16))  # a page of zeros where the status page goes
    status = guest_status.StatusFile(lambda: ram, 2)
    assert status.read() == {"heartbeat": 0, "pages_written": 0, "running": 0}
    with open(ram, "r+b") as file:
        file.seek(layout.STATUS_GPA)
        file.write(status_block((layout.CPU_STATE_RUNNING, 5, 100),
                                (layout.CPU_STATE_FILLING, 7, 30)))
    assert status.read() == {"heartbeat": 12, "pages_written": 130, "running": 1}
    status.close()
    assert guest_status.StatusFile(lambda: None, 1).read() is None  # no file yet


def test_merge_takes_the_live_copy() -> None:
    source = {"heartbeat": 100, "pages_written": 900, "running": 1}
    stale = {"heartbeat": 60, "pages_written": 500, "running": 1}
    ahead = {"heartbeat": 130, "pages_written": 1200, "running": 1}
    assert guest_status.merge(1.0, source, stale)["side"] == "source"
    sample = guest_status.merge(2.0, source, ahead)
    assert sample == {"t": 2.0, "side": "destination", "heartbeat": 130, "pages_written": 1200}
    zeros = {"heartbeat": 0, "pages_written": 0, "running": 0}
    assert guest_status.merge(3.0, None, zeros) is None
    assert guest_status.merge(3.0, source, None)["pages_written"] == 900


def test_rate_and_write_rates() -> None:
    samples = [{"t": t, "pages_written": 1000 * t, "heartbeat": t} for t in (0.0, 1.0, 2.0, 4.0)]
    assert guest_status.rate(samples, 0, 2, "pages_written") == 1000
    assert guest_status.rate(samples, 3, 3.5, "pages_written") is None  # no two samples
    xs, ys = guest_status.write_rates(samples, since=1.0)
    assert xs == [0.0, 1.0, 3.0] and ys == [1.0, 1.0, 1.0]


def test_dirty_rate_and_rotated_order() -> None:
    assert convergence_qemu.dirty_pages_per_s(100, 4096 * 1000) == 1000
    assert convergence_qemu.dirty_pages_per_s(25, 4096 * 1000) == 250
    args = argparse.Namespace(mode_list=["precopy", "postcopy"], program_list=["vmig", "qemu"],
                              rate_list=[25, 50], repeat=1)
    order = convergence_qemu.run_order(args)
    assert len(order) == 8 and len(set(order)) == 8
    assert order[0] == (25, "precopy", "vmig") and order[4] == (50, "precopy", "qemu")


def qemu_run(postcopy: bool, status: str = "completed", cancelled: float | None = None,
             asked: bool = False) -> dict:
    driven = {"info": {"status": status, "total-time": 9999, "downtime": 55,
                       "ram": {"transferred": 123, "dirty-sync-count": 4}},
              "postcopy_started_s": 2.0 if postcopy or asked else None,
              "cancelled_at_s": cancelled}
    received = 15.0 if postcopy else 12.04
    stamps = {"setup": 10.0, "stop": 12.0, "postcopy": 11.99 if postcopy else None,
              "resume": 12.05, "received": received}
    return guest_runs._qemu_figures(driven, stamps, {"guest": {}}, None)


def test_qemu_figures_end_where_the_guest_is_whole() -> None:
    precopy = qemu_run(postcopy=False)
    assert precopy["total_ms"] == pytest.approx(2050) and precopy["downtime_ms"] == 50
    assert not precopy["via_postcopy"]
    postcopy = qemu_run(postcopy=True)  # the last page arrived after the resume
    assert postcopy["total_ms"] == pytest.approx(5000) and postcopy["via_postcopy"]
    assert postcopy["downtime_ms"] == pytest.approx(50)
    # post-copy asked for, but QEMU completed the pre-copy instead (it fitted the limit)
    converged = qemu_run(postcopy=False, asked=True)
    assert not converged["via_postcopy"] and converged["postcopy"] is None
    assert converged["total_ms"] == pytest.approx(2050)
    cancelled = qemu_run(postcopy=False, status="cancelled", cancelled=8.0)
    assert cancelled["downtime_ms"] == 55 and cancelled["total_ms"] == 9999
    assert convergence_report.outcome(cancelled) == convergence_report.DID_NOT_CONVERGE


def test_summarise_medians_per_setup() -> None:
    def run(program: str, status: str, total: float, before: float, during: float) -> dict:
        return {"rate_percent": 100, "dirty_pages_per_s": 25600, "mode": "precopy",
                "program": program, "status": status, "total_ms": total, "downtime_ms": 5,
                "bytes_sent": 10, "throttle_percent_max": 0, "check_ok": True,
                "guest": {"pages_written": {"before": before, "during": during,
                                            "postcopy": during}}}

    rows = convergence_report.summarise([
        run("qemu", "completed", 3000, 100, 50), run("vmig", "completed", 1000, 100, 90),
        run("vmig", "cancelled", 20000, 100, 100), run("vmig", "completed", 3000, 100, 80)])
    assert [row["program"] for row in rows] == ["vmig", "qemu"]
    vmig = rows[0]
    assert vmig["total_ms"] == 2000  # the cancelled run's time is not a total time
    assert vmig["outcomes"] == {"completed": 2, "did not converge": 1}
    assert vmig["speed_during"] == pytest.approx(0.9)
    assert rows[1]["speed_during"] == pytest.approx(0.5)
    assert vmig["speed_postcopy"] is None  # a pre-copy run has no post-copy window
    assert "did not converge (1)" in convergence_report.markdown_table(rows)
