"""Watch a live migration from the client side: a progress bar, then a readable summary.

`vm.send-migration` blocks until the migration is over, so `send_with_progress`
runs it in a thread and draws the bar from `vm.migration-info`, polled on a
second API connection. Used by `vmig remote send-migration` and `vmig demo`;
it talks to VMMs only through `ApiClient`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vmig.api.client import ApiClient
from vmig.errors import ApiError
from vmig.units import format_size

POLL_S = 0.1  # progress refresh: often enough to see iterations, cheap for the VMM


def format_rate(bytes_per_s: float | None) -> str:
    """Decimal units, as network rates and the QEMU baselines are given: '2.41 GB/s'."""
    if not bytes_per_s:
        return "-"
    if bytes_per_s >= 1e9:
        return f"{bytes_per_s / 1e9:.2f} GB/s"
    return f"{bytes_per_s / 1e6:.0f} MB/s"


def format_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:,.1f} ms"


class _Send(threading.Thread):
    """`client.send_migration(**params)` on a thread; keeps the reply or the exception."""

    def __init__(self, client: ApiClient, params: dict[str, Any]) -> None:
        super().__init__(name="send-migration", daemon=True)
        self.client = client
        self.params = params
        self.summary: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.summary = self.client.send_migration(**self.params)
        except BaseException as exc:  # handed to the caller's thread
            self.error = exc


def progress_detail(info: dict[str, Any]) -> str:
    """One line of what the sender reports: iteration, bytes, throughput, expected downtime."""
    parts = [f"iteration {info.get('iteration', 0)}",
             f"{format_size(info.get('bytes_transferred', 0))} sent",
             format_rate(info.get("throughput_bytes_per_s"))]
    expected = info.get("expected_downtime_ms")
    if expected is not None:
        parts.append(f"downtime ~{format_ms(expected)}")
    return " · ".join(parts)


def send_with_progress(client: ApiClient, params: dict[str, Any], *, console: Console,
                       on_poll: Callable[[dict[str, Any] | None], None] | None = None
                       ) -> dict[str, Any]:
    """Send the migration `params` describe while drawing its progress; return the summary.

    `client` carries the blocking send; a second client on the same socket
    polls vm.migration-info. `on_poll(info)` is called on every poll (info is
    None until this migration shows up). Raises what the send raised (ApiError
    with the VMM's one-line reason).
    """
    send = _Send(client, params)
    columns = (TextColumn("[bold]{task.description:<10}"), BarColumn(),
               TextColumn("{task.percentage:>3.0f}%"), TextColumn("{task.fields[detail]}"),
               TimeElapsedColumn())
    with ApiClient(client.socket_path, client.timeout) as watcher, \
            Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("connecting", total=None, detail="")
        send.start()
        while send.is_alive():
            info = _active_info(watcher)
            if on_poll is not None:
                on_poll(info)
            if info is not None:
                memory = info.get("memory_bytes") or None
                done = None if memory is None else memory - info.get("bytes_remaining", 0)
                progress.update(task, description=info.get("phase", "?"), total=memory,
                                completed=done, detail=progress_detail(info))
            send.join(POLL_S)
        if send.summary is not None:
            progress.update(task, description="completed", total=1, completed=1,
                            detail=progress_detail({
                                "iteration": send.summary.get("iterations", 0),
                                "bytes_transferred": send.summary.get("bytes_sent", 0),
                                "throughput_bytes_per_s":
                                    send.summary.get("throughput_bytes_per_s")}))
        else:
            progress.update(task, description="failed")
    if send.error is not None:
        raise send.error
    assert send.summary is not None
    return send.summary


def _active_info(watcher: ApiClient) -> dict[str, Any] | None:
    """The running migration's progress; None before it starts (or if the poll fails)."""
    try:
        info = watcher.migration_info()
    except ApiError:  # 404 before the first migration; a slow answer is no reason to stop
        return None
    return info if info.get("active") else None


def summary_table(summary: dict[str, Any], title: str = "migration") -> Table:
    """The send's summary as a two-column table."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("status", str(summary.get("status")))
    table.add_row("connections", str(summary.get("connections")))
    table.add_row("iterations", str(summary.get("iterations")))
    table.add_row("memory sent", format_size(summary.get("bytes_sent", 0)))
    table.add_row("total time", format_ms(summary.get("duration_ms")))
    table.add_row("throughput", format_rate(summary.get("throughput_bytes_per_s")))
    table.add_row("downtime", format_ms(summary.get("downtime_ms")))
    table.add_row("memory verified", "yes" if summary.get("memory_verified") else "no")
    if summary.get("local"):
        table.add_row("local (memory fd)", "yes")
    for warning in summary.get("warnings") or ():
        table.add_row("warning", warning)
    return table
