"""`vmig demo`: live-migrate a guest that keeps dirtying its memory between two real VMMs.

It starts two `vmig vmm` processes on sockets in a temporary directory: an empty
destination and a source running a dirtying guest. It watches the guest work,
has the destination listen on a free loopback TCP port, live-migrates over
several connections with memory verification while showing progress, and then
checks that the guest goes on at the destination: its heartbeat continues from
where the source left it, and its self-check finds every page it wrote. Both
VMMs are stopped and the temporary directory removed on every way out.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from vmig.api.client import ApiClient
from vmig.api.process import VmmProcess
from vmig.errors import ApiError
from vmig.units import PAGE_SIZE, format_rate, format_size
from vmig.watch import format_ms, send_and_watch, summary_table

READY_TIMEOUT_S = 60.0
SAMPLE_S = 0.25
CONTINUE_S = 0.5  # how long the destination's heartbeat is watched after the switch-over
RECEIVER_URL = "tcp:127.0.0.1:0"  # port 0: the destination picks a free port and names it


@dataclass
class DemoReport:
    """What the demo saw; `ok` when the guest made it across and goes on."""

    write_rate: float = 0.0
    receiving_seen: bool = False
    authenticated: bool = False  # the destination asked for a token and the source proved it
    summary: dict[str, Any] = field(default_factory=dict)
    heartbeat_before: int | None = None  # the source's last reading before the switch-over
    before_state: str = ""  # the source's state at that reading (paused = the final value)
    heartbeat_after: int | None = None  # the destination's first reading after it
    heartbeat_later: int | None = None  # ... and CONTINUE_S later
    source_state: str = ""
    destination_state: str = ""
    check: dict[str, Any] = field(default_factory=dict)

    @property
    def heartbeat_continued(self) -> bool:
        return (self.heartbeat_before is not None and self.heartbeat_after is not None
                and self.heartbeat_later is not None
                and self.heartbeat_after >= self.heartbeat_before
                and self.heartbeat_later > self.heartbeat_after)

    @property
    def ok(self) -> bool:
        return (self.summary.get("status") == "completed" and self.authenticated
                and bool(self.summary.get("memory_verified"))
                and self.heartbeat_continued and self.source_state == "migrated"
                and self.destination_state == "running" and bool(self.check.get("ok")))

    def to_dict(self) -> dict[str, Any]:
        """Everything the demo saw, and its verdict (`vmig demo --json`)."""
        return {"ok": self.ok, "heartbeat_continued": self.heartbeat_continued,
                **asdict(self)}


class _SourceWatch:
    """Remembers the source guest's last heartbeat while it still runs here."""

    def __init__(self, socket_path: str, report: DemoReport) -> None:
        self.client = ApiClient(socket_path)
        self.report = report

    def poll(self, _info: dict[str, Any] | None = None) -> None:
        try:
            info = self.client.info()
        except ApiError:
            return
        if info.get("state") in ("running", "paused") and info.get("heartbeat") is not None:
            self.report.heartbeat_before = info["heartbeat"]
            self.report.before_state = info["state"]


def run_demo(*, memory: str = "256M", cpus: int = 2, working_set: str = "64M",
             dirty_rate: int = 20_000, connections: int = 4, downtime_ms: int = 300,
             seconds: float = 2.0, console: Console | None = None) -> DemoReport:
    """Run the demo; return what it saw (`ok` if the guest made it across). API errors
    raise VmigError."""
    console = console or Console()
    report = DemoReport()
    with tempfile.TemporaryDirectory(prefix="vmig-demo-") as tmp:
        def path(name: str) -> str:
            return os.path.join(tmp, name)

        console.print("[bold]Starting[/] the destination VMM (empty) and the source VMM "
                      f"({memory}, {cpus} vCPUs, dirtying {working_set} at "
                      f"{dirty_rate:,} pages/s)")
        started = time.monotonic()
        destination = VmmProcess.start(path("dst.sock"), ["--serial-log", path("dst.serial")],
                                       stderr_path=path("dst.stderr"),
                                       ready_timeout=READY_TIMEOUT_S)
        source: VmmProcess | None = None
        try:
            source = VmmProcess.start(
                path("src.sock"),
                ["--memory", memory, "--cpus", str(cpus), "--workload", "dirty",
                 "--working-set", working_set, "--dirty-rate", str(dirty_rate),
                 "--serial-log", path("src.serial")],
                stderr_path=path("src.stderr"), ready_timeout=READY_TIMEOUT_S)
            console.print(f"both VMMs answer after {time.monotonic() - started:.1f} s "
                          f"(source pid {source.proc.pid}, destination pid "
                          f"{destination.proc.pid})")
            _watch_guest(source, seconds, report, console)
            _migrate(source, destination, report, console, connections=connections,
                     downtime_ms=downtime_ms)
            _after(source, destination, report, console)
        finally:
            if source is not None:
                source.stop()
            destination.stop()
    console.print(_verdict(report))
    return report


def _watch_guest(source: VmmProcess, seconds: float, report: DemoReport,
                 console: Console) -> None:
    """Let the guest work for `seconds` and say how fast it writes."""
    first = source.client.info()
    began = time.monotonic()
    with console.status("the source guest is writing to its memory..."):
        time.sleep(seconds)
    now = source.client.info()
    elapsed = time.monotonic() - began
    written = now["pages_written"] - first["pages_written"]
    report.write_rate = written / elapsed if elapsed else 0.0
    console.print(f"source guest: heartbeat {now['heartbeat']:,}, "
                  f"{report.write_rate:,.0f} pages/s written "
                  f"({format_size(report.write_rate * PAGE_SIZE)}/s)")


def _migrate(source: VmmProcess, destination: VmmProcess, report: DemoReport,
             console: Console, *, connections: int, downtime_ms: int) -> None:
    reply = destination.client.receive_migration(RECEIVER_URL)
    url, token = reply["receiver_url"], reply["token"]
    state = destination.client.info()["state"]
    report.receiving_seen = state == "receiving"
    report.authenticated = bool(token)
    console.print(f"destination listens on {url} (state {state}); it made the token "
                  f"{token[:6]}... that the source must prove it knows (HMAC-SHA256 "
                  "challenge-response on every connection; the token itself never crosses the "
                  "wire)")
    console.print(f"[bold]Live-migrating[/] over {connections} connections, authenticated "
                  f"by token, memory verified, downtime budget {downtime_ms} ms")
    watch = _SourceWatch(source.socket_path, report)
    try:
        watch.poll()
        report.summary = send_and_watch(
            source.client, {"destination_url": url, "connections": connections,
                            "downtime_ms": downtime_ms, "verify_memory": True,
                            "token": token},
            console=console, on_poll=watch.poll)
    finally:
        watch.client.close()
    console.print(summary_table(report.summary))


def _after(source: VmmProcess, destination: VmmProcess, report: DemoReport,
           console: Console) -> None:
    """The destination runs the guest on from where it stopped; the source has let go."""
    after = destination.client.info()
    report.destination_state = after["state"]
    report.heartbeat_after = after.get("heartbeat")
    time.sleep(CONTINUE_S)
    report.heartbeat_later = destination.client.info().get("heartbeat")
    report.source_state = source.client.info()["state"]
    console.print(f"heartbeat: source {report.heartbeat_before} ({report.before_state}, just "
                  f"before the switch-over) -> destination {report.heartbeat_after} right "
                  f"after -> {report.heartbeat_later} {CONTINUE_S} s later")
    report.check = destination.client.check_guest()
    verdict = "[green]ok[/]" if report.check["ok"] else "[red]BAD[/]"
    console.print(f"check-guest: {verdict}: {report.check['pages_checked']:,} pages checked "
                  f"at the destination, {report.check['bad_pages']} bad")


def _verdict(report: DemoReport) -> Table:
    def mark(good: bool) -> str:
        return "[green]yes[/]" if good else "[red]no[/]"

    summary = report.summary
    table = Table(title="vmig demo", show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("result")
    table.add_row("destination showed `receiving`", mark(report.receiving_seen))
    table.add_row("connections authenticated by token", mark(report.authenticated))
    table.add_row("migration", f"{summary.get('status', 'did not finish')}, "
                  f"{summary.get('connections', '-')} connections, "
                  f"{summary.get('iterations', '-')} iterations")
    table.add_row("throughput", format_rate(summary.get("throughput_bytes_per_s")))
    table.add_row("downtime", format_ms(summary.get("downtime_ms")))
    table.add_row("memory verified (digests match)", mark(bool(summary.get("memory_verified"))))
    table.add_row("heartbeat went on at the destination", mark(report.heartbeat_continued))
    table.add_row("guest self-check at the destination", mark(bool(report.check.get("ok"))))
    table.add_row("source VM is `migrated`", mark(report.source_state == "migrated"))
    table.add_row("[bold]all good[/]", mark(report.ok))
    return table
