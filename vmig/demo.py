"""`vmig demo`: a real VMM subprocess with a dirtying guest, watched and driven over its API.

It starts `vmig vmm` on a socket in a temporary directory, shows the guest's
heartbeat and pages-written counters growing, has the guest check its pages,
pauses (the counters must freeze) and resumes (they must move again), stops
the VMM, and prints a summary. The subprocess is stopped and the temporary
directory removed on every way out.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from vmig.api.process import VmmProcess
from vmig.units import PAGE_SIZE, format_size

SAMPLE_S = 0.25
FREEZE_S = 0.5  # how long the counters are watched while paused, and after resuming


@dataclass
class DemoReport:
    """What the demo saw; `ok` when every step behaved."""

    start_s: float = 0.0
    pages_written: int = 0
    write_rate: float = 0.0
    check: dict[str, Any] = field(default_factory=dict)
    froze_when_paused: bool = False
    moved_after_resume: bool = False
    exit_status: int | None = None
    socket_removed: bool = False

    @property
    def ok(self) -> bool:
        return (bool(self.check.get("ok")) and self.pages_written > 0
                and self.froze_when_paused and self.moved_after_resume
                and self.exit_status == 0 and self.socket_removed)


def run_demo(*, memory: str = "256M", cpus: int = 2, seconds: float = 5.0,
             console: Console | None = None) -> bool:
    """Run the demo; return True if every step behaved. API errors propagate as VmigError."""
    console = console or Console()
    report = DemoReport()
    with tempfile.TemporaryDirectory(prefix="vmig-demo-") as tmp:
        socket_path = os.path.join(tmp, "api.sock")
        args = ["--memory", memory, "--cpus", str(cpus), "--workload", "dirty",
                "--serial-log", os.path.join(tmp, "serial.log")]
        console.print(f"[bold]Starting[/] vmig vmm: {memory}, {cpus} vCPUs, dirty workload")
        started = time.monotonic()
        vmm = VmmProcess.start(socket_path, args, stderr_path=os.path.join(tmp, "vmm.stderr"),
                               ready_timeout=60.0)
        try:
            report.start_s = time.monotonic() - started
            pid = vmm.client.ping()["pid"]
            console.print(f"VMM pid {pid} answered on {socket_path} after "
                          f"{report.start_s:.2f} s")
            _watch(vmm, seconds, report, console)
            _check(vmm, report, console)
            _pause_resume(vmm, report, console)
        finally:
            report.exit_status = vmm.stop()
            report.socket_removed = not os.path.lexists(socket_path)
    console.print(_summary(report))
    return report.ok


def _watch(vmm: VmmProcess, seconds: float, report: DemoReport, console: Console) -> None:
    """Show the guest's counters for `seconds`, refreshed a few times a second."""
    first = vmm.client.info()
    start = time.monotonic()
    table = _counter_table(first, first, 0.0)
    with Live(table, console=console, refresh_per_second=8, transient=False) as live:
        info = first
        while (elapsed := time.monotonic() - start) < seconds:
            time.sleep(SAMPLE_S)
            info = vmm.client.info()
            live.update(_counter_table(first, info, time.monotonic() - start))
    console.print()
    elapsed = time.monotonic() - start
    report.pages_written = info["pages_written"] - first["pages_written"]
    report.write_rate = report.pages_written / elapsed if elapsed else 0.0


def _counter_table(first: dict[str, Any], now: dict[str, Any], elapsed: float) -> Table:
    table = Table(title=f"guest after {elapsed:4.1f} s", title_justify="left")
    for column in ("state", "heartbeat", "pages written", "pages/s", "since start"):
        table.add_column(column, justify="right")
    written = now["pages_written"] - first["pages_written"]
    rate = written / elapsed if elapsed else 0.0
    table.add_row(now["state"], f"{now['heartbeat']:,}", f"{now['pages_written']:,}",
                  f"{rate:,.0f}", format_size(written * PAGE_SIZE))
    return table


def _check(vmm: VmmProcess, report: DemoReport, console: Console) -> None:
    report.check = vmm.client.check_guest()
    verdict = "[green]ok[/]" if report.check["ok"] else "[red]BAD[/]"
    console.print(f"check-guest: {verdict}: {report.check['pages_checked']:,} pages checked, "
                  f"{report.check['bad_pages']} bad")


def _pause_resume(vmm: VmmProcess, report: DemoReport, console: Console) -> None:
    """Paused, the counters must not move; resumed, they must."""
    vmm.client.pause()
    before = vmm.client.info()
    time.sleep(FREEZE_S)
    after = vmm.client.info()
    report.froze_when_paused = (after["state"] == "paused"
                                and after["heartbeat"] == before["heartbeat"]
                                and after["pages_written"] == before["pages_written"])
    console.print(f"paused: heartbeat {before['heartbeat']:,} -> {after['heartbeat']:,} "
                  f"over {FREEZE_S} s")
    vmm.client.resume()
    time.sleep(FREEZE_S)
    resumed = vmm.client.info()
    report.moved_after_resume = (resumed["state"] == "running"
                                 and resumed["heartbeat"] > after["heartbeat"])
    console.print(f"resumed: heartbeat {after['heartbeat']:,} -> {resumed['heartbeat']:,} "
                  f"over {FREEZE_S} s")


def _summary(report: DemoReport) -> Table:
    def mark(good: bool) -> str:
        return "[green]yes[/]" if good else "[red]no[/]"

    table = Table(title="vmig demo", show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("result")
    table.add_row("VMM up and answering", f"{report.start_s:.2f} s")
    table.add_row("pages written while watched",
                  f"{report.pages_written:,} ({report.write_rate:,.0f}/s, "
                  f"{format_size(report.write_rate * PAGE_SIZE)}/s)")
    table.add_row("guest check ok", mark(bool(report.check.get("ok"))))
    table.add_row("counters froze while paused", mark(report.froze_when_paused))
    table.add_row("counters moved after resume", mark(report.moved_after_resume))
    table.add_row("VMM exit status", str(report.exit_status))
    table.add_row("API socket removed", mark(report.socket_removed))
    table.add_row("[bold]all good[/]", mark(report.ok))
    return table
