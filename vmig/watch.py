"""Watch a live migration from the client side: a progress bar, then a readable summary.

`vm.send-migration` answers as soon as the migration has started; `send_and_watch`
then follows it through `vm.migration-info` (`ApiClient.wait_for_migration`) and draws
the bar from each poll. The bar counts the bytes still to send: the memory that holds
data at first, then the pages dirtied meanwhile, so it grows while pre-copy chases a
busy guest; its percentage is the VMM's `progress_percent`, which never goes backwards.
Ctrl-C cancels the migration through the API (`vm.cancel-migration`) and follows it on
until it has wound down. Used by `vmig remote send-migration` and `vmig
demo`; it talks to VMMs only through `ApiClient`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from vmig.api.client import ApiClient
from vmig.errors import ApiError
from vmig.units import PAGE_SIZE, format_rate, format_size

POLL_S = 0.1  # progress refresh: often enough to see iterations, cheap for the VMM


def format_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:,.1f} ms"


def progress_position(info: dict[str, Any]) -> tuple[int, int | None]:
    """(done, total) bytes for the bar, from vm.migration-info or a summary.

    Done is the guest memory dealt with so far: pages sent plus zero pages found (the
    first pass skips those). Total is that plus what is still to send: the memory that
    holds data before the first pass, then each pass's dirty pages, so the total grows
    while pre-copy chases a busy guest. Never-written memory counts for nothing: a
    256 MiB guest holding 64 MiB starts at 0% and is half done at 32 MiB. None while
    nothing is known yet.
    """
    done = (info.get("bytes_transferred") or 0) + (info.get("zero_pages") or 0) * PAGE_SIZE
    remaining = info.get("bytes_remaining")
    if remaining is None:
        remaining = info.get("data_bytes")  # before pre-copy: the first pass is all to do
    if remaining is None:
        return done, None
    return done, done + remaining


def format_eta(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s"


def progress_detail(info: dict[str, Any]) -> str:
    """One line: iteration, sent, left, rate, ETA, dirty rate, expected downtime."""
    parts = [f"iteration {info.get('iterations') or 0}",
             f"{format_size(info.get('bytes_transferred') or 0)} sent"]
    done, total = progress_position(info)
    remaining = None if total is None else total - done
    rate = info.get("bandwidth_bytes_per_s") or info.get("throughput_bytes_per_s")
    if remaining is not None:
        parts.append(f"{format_size(remaining)} left")
    parts.append(format_rate(rate))
    if remaining and rate:
        parts.append(f"ETA {format_eta(remaining / rate)}")
    if info.get("dirty_rate_bytes_per_s"):
        parts.append(f"dirtied {format_rate(info['dirty_rate_bytes_per_s'])}")
    expected = info.get("expected_downtime_ms")
    if expected is not None and info.get("phase") == "precopy":
        parts.append(f"downtime ~{format_ms(expected)}")
    return " · ".join(parts)


def send_and_watch(client: ApiClient, params: dict[str, Any], *,
                   console: Console | None = None,
                   on_poll: Callable[[dict[str, Any] | None], None] | None = None
                   ) -> dict[str, Any]:
    """Start the migration `params` describe and follow it; return the summary (status
    "completed" or "cancelled").

    With a `console` a progress bar is drawn from vm.migration-info; `on_poll(info)` is
    called on every poll. Ctrl-C cancels the migration through the API and follows it
    until it has wound down. Raises ApiError with the VMM's reason if it failed.
    """
    try:
        started = client.send_migration(wait=False, **params)
    except KeyboardInterrupt:  # Ctrl-C while the VMM started it: it may run already
        started = _cancel_the_send_that_started(client)
    if "id" not in started:  # a VMM older than the 202 answer: this is the summary
        return started
    return watch_migration(client, started["id"], console=console, on_poll=on_poll)


def watch_migration(client: ApiClient, migration_id: str, *, console: Console | None = None,
                    on_poll: Callable[[dict[str, Any] | None], None] | None = None
                    ) -> dict[str, Any]:
    """Follow the running migration `migration_id` as `send_and_watch` does."""
    if console is None:
        return _follow(client, migration_id, on_poll or (lambda info: None))
    with progress_bar(console) as progress:
        task = progress.add_task("connecting", total=None, detail="")

        def poll(info: dict[str, Any] | None) -> None:
            if on_poll is not None:
                on_poll(info)
            if info is not None:
                show_progress(progress, task, info)

        try:
            summary = _follow(client, migration_id, poll)
        except ApiError:
            progress.update(task, description="failed")
            raise
        show_progress(progress, task, summary)
        progress.update(task, description=summary.get("status", "?"))
        return summary


def _cancel_the_send_that_started(client: ApiClient) -> dict[str, Any]:
    """After a Ctrl-C that cut the send's request short: cancel the send this VMM runs, if
    it started, and return its id to follow; re-raise the Ctrl-C if none runs."""
    with client.fresh() as fresh:
        try:
            info = fresh.migration_info()
        except ApiError:
            info = {}
        if not (info.get("active") and info.get("role") == "send" and info.get("migration_id")):
            raise KeyboardInterrupt
        _cancel(fresh)
    return {"id": info["migration_id"]}


def _cancel(client: ApiClient) -> None:
    """Cancel the running migration; too late to (or already over), its outcome says
    how it ended."""
    with contextlib.suppress(ApiError):
        client.cancel_migration()


def _follow(client: ApiClient, migration_id: str,
            on_info: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """`client.wait_for_migration`; the first Ctrl-C cancels the migration (a second one
    stops following it). After a Ctrl-C the rest goes through a fresh client: the one
    interrupted may be left mid-request."""
    cancelled = False
    with contextlib.ExitStack() as owned:
        while True:
            try:
                return client.wait_for_migration(migration_id, on_info=on_info,
                                                 poll_s=POLL_S)
            except KeyboardInterrupt:
                if cancelled:
                    raise
                cancelled = True
                client = owned.enter_context(client.fresh())
                _cancel(client)


def progress_bar(console: Console) -> Progress:
    """The bar `send_and_watch` draws: phase, bar, percent, `progress_detail`, time."""
    return Progress(TextColumn("[bold]{task.description:<11}"), BarColumn(),
                    TextColumn("{task.percentage:>3.0f}%"), TextColumn("{task.fields[detail]}"),
                    TimeElapsedColumn(), console=console, transient=False)


def show_progress(progress: Progress, task: TaskID, info: dict[str, Any]) -> None:
    """Move the bar to what `info` (vm.migration-info, or the summary at the end) says."""
    done, total = progress_position(info)
    if info.get("phase") == "completed":
        total = done = max(done, 1)
    percent = info.get("progress_percent")
    if percent is not None:  # the VMM's: it never goes backwards (KubeVirt #10722)
        total, done = 100, percent
    progress.update(task, description=info.get("phase", "?"), total=total or None,
                    completed=done, detail=progress_detail(info))


def summary_table(summary: dict[str, Any], title: str = "migration") -> Table:
    """The send's summary as a two-column table."""
    table = Table(title=title, show_header=False, title_justify="left", min_width=len(title))
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("status", str(summary.get("status")))
    if summary.get("error"):
        table.add_row("reason", str(summary["error"]))
    table.add_row("connections", str(summary.get("connections")))
    if summary.get("connections_lost"):
        table.add_row("connections lost", str(summary["connections_lost"]))
    table.add_row("iterations", str(summary.get("iterations")))
    table.add_row("memory sent", format_size(summary.get("bytes_transferred") or 0))
    table.add_row("total time", format_ms(summary.get("elapsed_ms")))
    table.add_row("throughput", format_rate(summary.get("throughput_bytes_per_s")))
    if summary.get("paused"):
        table.add_row("downtime", "none: the VM was paused throughout, and stays paused")
    else:
        table.add_row("downtime", format_ms(summary.get("downtime_ms")))
    table.add_row("memory verified", "yes" if summary.get("memory_verified") else "no")
    if summary.get("local"):
        table.add_row("local (memory fd)", "yes")
    for warning in summary.get("warnings") or ():
        table.add_row("warning", warning)
    return table
