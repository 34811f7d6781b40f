"""What convergence_qemu.py measured: medians per setup, a markdown table, two charts.

Pure functions of the runs (and of the JSON file they are saved in), so that
``--replot`` redraws from an earlier file and the unit tests can check them.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compare_qemu import save_chart
from guest_status import write_rates

from vmig.units import format_size

MODES = ("precopy", "auto-converge", "postcopy")
PROGRAMS = ("vmig", "qemu")
NAMES = {"vmig": "vmig", "qemu": "QEMU 7.2"}
COLORS = {"vmig": "tab:blue", "qemu": "tab:orange"}
DID_NOT_CONVERGE = "did not converge"

DEFINITIONS = {
    "outcome": "completed, completed via post-copy, did not converge (cancelled at the "
               "timeout; the guest runs on at the source), or failed",
    "total_ms": "vmig: the sender's elapsed_ms (to the destination's acknowledgement of "
                "COMPLETE; post-copy: all pages in). QEMU: source MIGRATION setup event to "
                "the destination's RESUME (pre-copy) or MIGRATION completed (post-copy) "
                "event; QEMU's own total-time is qemu_total_ms. Not converged: until the "
                "cancel",
    "downtime_ms": "vmig: the sender's downtime_ms (pause to the destination running). "
                   "QEMU: source STOP to destination RESUME events (qemu_downtime_ms: its "
                   "own figure)",
    "bytes_sent": "vmig: bytes_transferred (guest memory bytes); QEMU: ram.transferred",
    "guest": "pages the guest wrote per second (and heartbeats), from its status page "
             "read through the RAM files every 100 ms on whichever side runs it: in the "
             "2 s before the migration, during it, after it, and during it at the "
             "destination (post-copy)",
    "speed_*": "the guest's write rate in that window over its rate before the migration",
}


def outcome(run: dict[str, Any]) -> str:
    """One word or phrase for how a run ended."""
    if run.get("error") and run.get("status") is None:
        return "failed"
    status = run.get("status")
    if status == "completed":
        return "completed via post-copy" if run.get("via_postcopy") else "completed"
    if status == "cancelled":
        return DID_NOT_CONVERGE
    return "failed"


def median(values: list[float | None]) -> float | None:
    """Median of the values that are there (None when none is)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def speed(run: dict[str, Any], window: str) -> float | None:
    """The guest's write rate in `window` over its rate before the migration (the
    post-copy window only of a run that completed through post-copy)."""
    if window == "postcopy" and not run.get("via_postcopy"):
        return None
    rates = run.get("guest", {}).get("pages_written", {})
    before, value = rates.get("before"), rates.get(window)
    return value / before if value is not None and before else None


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per (rate, mode, program), sorted by rate, mode and program; total time
    and downtime of the runs that completed only."""
    keys = sorted({(r["rate_percent"], r["mode"], r["program"]) for r in runs},
                  key=lambda k: (k[0], MODES.index(k[1]), PROGRAMS.index(k[2])))
    rows = []
    for rate_percent, mode, program in keys:
        mine = [r for r in runs if (r["rate_percent"], r["mode"], r["program"])
                == (rate_percent, mode, program)]
        done = [r for r in mine if r.get("status") == "completed"]

        def of(get: Callable[[dict[str, Any]], float | None],
               group: list[dict[str, Any]]) -> float | None:
            return median([get(r) for r in group])

        outcomes = [outcome(r) for r in mine]
        rows.append({
            "rate_percent": rate_percent, "mode": mode, "program": program, "runs": len(mine),
            "dirty_pages_per_s": mine[0]["dirty_pages_per_s"],
            "outcomes": {o: outcomes.count(o) for o in dict.fromkeys(outcomes)},
            "total_ms": of(lambda r: r.get("total_ms"), done),
            "downtime_ms": of(lambda r: r.get("downtime_ms"), done),
            "bytes_sent": of(lambda r: r.get("bytes_sent"), mine),
            "throttle_percent_max": of(lambda r: r.get("throttle_percent_max"), mine),
            "pages_written_per_s_before": of(
                lambda r: r.get("guest", {}).get("pages_written", {}).get("before"), mine),
            **{f"speed_{window}": of(lambda r, w=window: speed(r, w), mine)
               for window in ("during", "postcopy", "after")},
            "checks_ok": all(r.get("check_ok") is not False for r in mine),
            "errors": [r["error"] for r in mine if r.get("error") and r.get("status") is None],
        })
    return rows


def _cell(value: float | None, fmt: str, scale: float = 1.0, suffix: str = "") -> str:
    return "-" if value is None else f"{value * scale:{fmt}}{suffix}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| dirty rate | mode | program | outcome | total s | downtime ms | sent "
             "| throttle | guest before, pages/s | speed during | ... in post-copy "
             "| speed after |",
             "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for row in rows:
        outcomes = ", ".join(f"{o}{f' ({n})' if row['runs'] > 1 else ''}"
                             for o, n in row["outcomes"].items())
        if not row["checks_ok"]:
            outcomes += " (CHECK FAILED)"
        sent = "-" if row["bytes_sent"] is None else format_size(int(row["bytes_sent"]))
        lines.append(
            f"| {row['rate_percent']}% ({row['dirty_pages_per_s']:,} pages/s) | {row['mode']} "
            f"| {NAMES[row['program']]} | {outcomes} | {_cell(row['total_ms'], '.1f', 1e-3)} "
            f"| {_cell(row['downtime_ms'], '.0f')} | {sent} "
            f"| {_cell(row['throttle_percent_max'], '.0f', suffix='%')} "
            f"| {_cell(row['pages_written_per_s_before'], ',.0f')} "
            f"| {_cell(row['speed_during'], '.0f', 100, '%')} "
            f"| {_cell(row['speed_postcopy'], '.0f', 100, '%')} "
            f"| {_cell(row['speed_after'], '.0f', 100, '%')} |")
    return "\n".join(lines)


def progress_line(run: dict[str, Any]) -> str:
    """One line per run for the log."""
    if run.get("error") and run.get("status") is None:
        return f"FAILED: {run['error']}"
    sent = "-" if run.get("bytes_sent") is None else format_size(int(run["bytes_sent"]))
    during = speed(run, "during")
    return (f"{outcome(run)}: total {_cell(run.get('total_ms'), '.1f', 1e-3)} s, downtime "
            f"{_cell(run.get('downtime_ms'), '.0f')} ms, sent {sent}, throttle "
            f"{run.get('throttle_percent_max', 0)}%, guest at "
            f"{_cell(during, '.0f', 100, '%')} during, check {run.get('check_ok')}")


def show(result: dict[str, Any], images: Path, label: str) -> list[Path]:
    """Print the table and draw both charts; return the charts' paths."""
    settings = result["settings"]
    link = format_size(settings["link_bytes"])
    print(f"\n{settings['memory']} guest, one vCPU rewriting "
          f"{settings['working_set']} in order; link {link}/s (tbf); "
          f"pre-copy timeout {settings['precopy_timeout']:g} s, others "
          f"{settings['timeout']:g} s; post-copy after {settings['postcopy_after']} passes; "
          f"medians of {settings['repeat']}\n")
    print(markdown_table(result["rows"]))
    written = [bars_chart(result, images / f"{label}.png"),
               timeline_chart(result, images / f"{label}-timeline.png")]
    for path in written:
        print(f"chart: {path}")
    return written


def _subtitle(settings: dict[str, Any]) -> str:
    return (f"{settings['memory']} guest rewriting {settings['working_set']} in order, "
            f"{format_size(settings['link_bytes'])}/s tbf link, downtime limit "
            f"{settings['downtime_ms']} ms")


def bars_chart(result: dict[str, Any], path: Path) -> Path:
    """Per mode (columns): total time, downtime, bytes sent and the guest's speed during
    the migration (rows) against the dirty rate, vmig's bar next to QEMU's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = result["rows"]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    rates = sorted({r["rate_percent"] for r in rows})
    metrics = (("total_ms", 1e-3, "total time, s"), ("downtime_ms", 1.0, "downtime, ms"),
               ("bytes_sent", 1 / 2**20, "sent, MiB"),
               ("speed_during", 100.0, "guest speed during, % of before"))
    fig, axes = plt.subplots(len(metrics), len(modes), figsize=(4.6 * len(modes), 11),
                             squeeze=False, sharex=True)
    for column, mode in enumerate(modes):
        for line, (metric, scale, label) in enumerate(metrics):
            axis = axes[line][column]
            for offset, program in ((-0.2, "vmig"), (0.2, "qemu")):
                for index, rate_percent in enumerate(rates):
                    row = next((r for r in rows if (r["rate_percent"], r["mode"],
                                                    r["program"]) == (rate_percent, mode,
                                                                      program)), None)
                    if row is None:
                        continue
                    value = row[metric]
                    if value is None:  # not converged (time, downtime) or no samples
                        axis.text(index + offset, 0, "x", ha="center", va="bottom",
                                  color=COLORS[program], fontsize=9)
                        continue
                    axis.bar(index + offset, value * scale, width=0.4, color=COLORS[program])
            axis.set_xticks(range(len(rates)), [f"{r}%" for r in rates])
            axis.grid(True, axis="y", alpha=0.3)
            if column == 0:
                axis.set_ylabel(label, fontsize=9)
            if line == 0:
                axis.set_title(mode, fontsize=10)
            if line == len(metrics) - 1:
                axis.set_xlabel("dirty rate, % of the link")
    axes[0][0].legend(handles=[Patch(color=COLORS[p], label=NAMES[p]) for p in PROGRAMS],
                      fontsize=8)
    fig.suptitle(f"vmig vs QEMU: {_subtitle(result['settings'])}; x: did not converge "
                 "(no total time or downtime)", fontsize=10)
    return save_chart(fig, path)


def timeline_chart(result: dict[str, Any], path: Path) -> Path:
    """The guest's write rate over time, one panel per rate (rows) and mode (columns),
    vmig and QEMU in each (first repetition); dotted: the migration's end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if r.get("samples")]
    modes = [m for m in MODES if any(r["mode"] == m for r in runs)] or list(MODES)
    rates = sorted({r["rate_percent"] for r in runs}) or [0]
    fig, axes = plt.subplots(len(rates), len(modes), figsize=(4.6 * len(modes),
                                                              2.6 * len(rates) + 1),
                             squeeze=False, sharey=True)
    for line, rate_percent in enumerate(rates):
        for column, mode in enumerate(modes):
            axis = axes[line][column]
            for program in PROGRAMS:
                run = next((r for r in runs if (r["rate_percent"], r["mode"], r["program"])
                            == (rate_percent, mode, program)), None)
                if run is None:
                    continue
                began, ended = run["window_s"]
                xs, ys = write_rates(run["samples"], began)
                axis.plot(xs, ys, color=COLORS[program], linewidth=1,
                          label=f"{NAMES[program]}: {outcome(run)}")
                axis.axvline(ended - began, color=COLORS[program], linestyle=":", linewidth=1)
            axis.axvline(0, color="black", linewidth=0.8)
            axis.set_ylim(bottom=0)
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize=7)
            axis.set_title(f"{mode}, dirty rate {rate_percent}% of the link", fontsize=9)
            if column == 0:
                axis.set_ylabel("thousand pages/s", fontsize=9)
            if line == len(rates) - 1:
                axis.set_xlabel("s since the migration began")
    fig.suptitle(f"the guest's writes over time: {_subtitle(result['settings'])}",
                 fontsize=10)
    return save_chart(fig, path)
