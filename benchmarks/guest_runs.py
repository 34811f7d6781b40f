"""One migration of the dirtying guest, by vmig or by QEMU, measured the same way.

Used by convergence_qemu.py. Both programs get: a fresh source in this network
namespace and a fresh destination in the other one (over the tbf link), the guest
started with the same parameters and RAM backed by a file on /dev/shm, the guest's
status page sampled on both sides (guest_status.py), and every process stopped and
file removed on every way out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import guest_status
from compare_qemu import (
    MAX_BANDWIDTH,
    SHM,
    QemuProcess,
    QmpError,
    _incoming_port,
    cpu_seconds,
    touch_and_free,
)
from guest_status import rate
from qemu_guest import QemuGuest, host_tsc_khz, qemu_command

from vmig.api.client import ApiClient
from vmig.api.process import VmmProcess
from vmig.config import VmConfig
from vmig.errors import ApiError

READY_TIMEOUT_S = 120.0
BOOT_TIMEOUT_S = 120.0  # QEMU's firmware is emulated here: seconds before the guest runs
SETTLE_S = 2.0  # the guest runs this long before and after each migration
POLL_S = 0.1  # QEMU's query-migrate, vmig's migration-info (throttle)
FINISH_TIMEOUT_S = 120.0  # after the source is done: the destination's end (post-copy)
THROTTLE = {"cpu-throttle-initial": 20, "cpu-throttle-increment": 10}  # vmig's steps


@dataclass(frozen=True)
class Setup:
    """One run: the settings, the link, the rate, the mode and the program."""

    args: argparse.Namespace
    ns: Any  # tests/netns.py Namespace: the destination's side of the link
    qemu: str | None
    rate_percent: int
    dirty_pages_per_s: int
    mode: str
    program: str
    workdir: Path
    serial: int

    @property
    def timeout_s(self) -> float:
        return self.args.precopy_timeout if self.mode == "precopy" else self.args.timeout


def guest_config(setup: Setup, memory_file: Path | None = None) -> VmConfig:
    """The guest both programs run: one vCPU (Multiboot boots one) rewriting its working
    set in order at the run's dirty rate."""
    args = setup.args
    return VmConfig.build(memory=args.memory, workload="dirty", working_set=args.working_set,
                          dirty_rate=setup.dirty_pages_per_s, order="sequential",
                          memory_file=None if memory_file is None else str(memory_file))


# --- measuring, the same for both ---------------------------------------------------------------


def measure(setup: Setup, source: guest_status.StatusFile,
            destination: guest_status.StatusFile, pids: Callable[[], tuple[int, int]],
            migrate: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Wait for the guest's workload, warm RAM, sample; `migrate()` runs the migration
    and returns its figures; add CPU seconds and the guest's rates around it."""
    guest_status.wait_running(source, BOOT_TIMEOUT_S)
    touch_and_free(2 * setup.args.memory_bytes)
    with guest_status.Sampler(source, destination) as sampler:
        time.sleep(SETTLE_S)
        began = sampler.elapsed()
        cpu_before = [_cpu_seconds(pid) for pid in pids()]
        figures = migrate()
        ended = sampler.elapsed()
        cpu_after = [_cpu_seconds(pid) for pid in pids()]
        time.sleep(SETTLE_S)
    samples = sampler.samples
    live = [s for s in samples if s["side"] == "destination"]
    figures["cpu_s"] = {side: None if None in (before, after) else round(after - before, 3)
                        for side, before, after
                        in zip(("source", "destination"), cpu_before, cpu_after, strict=True)}
    figures["guest"] = {key: {"before": rate(samples, 0, began, key),
                              "during": rate(samples, began, ended, key),
                              "postcopy": rate(live, began, ended, key),
                              "after": rate(samples, ended, ended + SETTLE_S + 1, key)}
                        for key in guest_status.KEYS}
    figures["runs_at_the_end"] = samples[-1]["side"] if samples else None
    figures["window_s"] = [round(began, 3), round(ended, 3)]
    figures["samples"] = samples
    return figures


def _cpu_seconds(pid: int) -> float | None:
    """cpu_seconds, or None for a process that is gone (a QEMU destination whose
    incoming migration was cancelled exits)."""
    try:
        return cpu_seconds(pid)
    except OSError:
        return None


def _clean_up(files: list[guest_status.StatusFile], processes: tuple[Any, ...],
              paths: list[Path]) -> None:
    """Close the status files, stop the processes (VmmProcess or QemuProcess), remove
    the RAM files."""
    for file in files:
        file.close()
    for process in processes:
        if process is not None:
            process.stop()
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def one_run(setup: Setup) -> dict[str, Any]:
    """One migration; a failure is recorded in the run and the benchmark goes on."""
    run: dict[str, Any] = {"rate_percent": setup.rate_percent,
                           "dirty_pages_per_s": setup.dirty_pages_per_s, "mode": setup.mode,
                           "program": setup.program, "serial": setup.serial,
                           "started": time.strftime("%H:%M:%S"),
                           "load_average_1min": os.getloadavg()[0]}
    setup.workdir.mkdir(parents=True)
    try:
        run.update((run_vmig if setup.program == "vmig" else run_qemu)(setup))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        run["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(setup.workdir, ignore_errors=True)
    return run


# --- vmig ---------------------------------------------------------------------------------------


def _vmig_parameters(setup: Setup) -> dict[str, Any]:
    parameters: dict[str, Any] = {"connections": 1, "downtime_ms": setup.args.downtime_ms,
                                  "timeout_s": setup.timeout_s}
    if setup.mode == "auto-converge":
        parameters["auto_converge"] = True
    elif setup.mode == "postcopy":
        parameters |= {"postcopy": True,
                       "postcopy_after_iterations": setup.args.postcopy_after}
    return parameters


class _ThrottleWatch(guest_status.Periodic):
    """Polls the source's migration-info for the throttle auto-converge reached."""

    def __init__(self, socket_path: str) -> None:
        super().__init__()
        self.highest = 0
        self._client = ApiClient(socket_path)

    def sample(self) -> None:
        with contextlib.suppress(ApiError, OSError):
            info = self._client.migration_info()
            self.highest = max(self.highest, info.get("throttle_percent") or 0)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._client.close()


def run_vmig(setup: Setup) -> dict[str, Any]:
    workdir = setup.workdir
    ram = SHM / f"vmig-convq-{setup.serial}-{workdir.stat().st_ino}.ram"
    config = guest_config(setup, ram)
    guest = ["--memory", str(config.memory_bytes), "--cpus", str(config.cpus),
             "--workload", config.workload.value, "--working-set", str(config.working_set_bytes),
             "--dirty-rate", str(config.dirty_rate), "--order", config.order.value,
             "--memory-file", str(ram)]  # the seed: VmConfig's default on both
    source = destination = None
    files: list[guest_status.StatusFile] = []
    try:
        destination = VmmProcess.start(str(workdir / "dst.sock"),
                                       stderr_path=str(workdir / "dst.err"),
                                       ready_timeout=READY_TIMEOUT_S, prefix=setup.ns.exec_prefix)
        source = VmmProcess.start(str(workdir / "src.sock"), guest,
                                  stderr_path=str(workdir / "src.err"),
                                  ready_timeout=READY_TIMEOUT_S)
        reply = destination.client.receive_migration(f"tcp:{setup.ns.ns_addr}:0")
        dst_pid = destination.proc.pid
        files = [guest_status.StatusFile(lambda: ram, config.cpus),
                 guest_status.StatusFile(lambda: guest_status.memfd_of(dst_pid), config.cpus)]
        vmms = (source, destination)

        def migrate() -> dict[str, Any]:
            with _ThrottleWatch(vmms[0].socket_path) as watch:
                try:
                    summary = vmms[0].client.send_migration(
                        destination_url=reply["receiver_url"], token=reply["token"],
                        **_vmig_parameters(setup))
                except ApiError as exc:  # a failed migration: migration-info has its figures
                    summary = vmms[0].client.migration_info() | {"api_error": str(exc)}
            return {"summary": summary, "throttle_percent_max": watch.highest}

        figures = measure(setup, *files, lambda: (vmms[0].proc.pid, vmms[1].proc.pid),
                          migrate)
        summary = figures.pop("summary")
        completed = summary["status"] == "completed"
        incoming = None
        with contextlib.suppress(ApiError):
            incoming = destination.client.migration_info()
        check = (destination if completed else source).client.check_guest(120)
    finally:
        _clean_up(files, (source, destination), [ram])
    postcopy = (incoming or {}).get("postcopy") or summary.get("postcopy") or None
    return {"status": summary["status"], "error": summary.get("error"),
            "via_postcopy": bool(postcopy), "total_ms": summary["elapsed_ms"],
            "downtime_ms": summary["downtime_ms"], "bytes_sent": summary["bytes_transferred"],
            "iterations": summary.get("iterations"), "postcopy": postcopy,
            "check_ok": bool(check["ok"]), **figures}


# --- QEMU ---------------------------------------------------------------------------------------


def _qemu_drive(setup: Setup, source: QemuProcess, uri: str) -> dict[str, Any]:
    """Start the migration and see it through: post-copy after the passes asked for,
    cancel at the timeout; return the source's last query-migrate and what was done."""
    began = time.monotonic()
    source.execute("migrate", {"uri": uri})
    info: dict[str, Any] = {}
    ram: dict[str, Any] = {}  # the last figures while active: a cancelled one has none
    throttle = 0
    postcopy_at = cancelled_at = None
    while True:
        info = source.execute("query-migrate")
        status = info.get("status")
        ram = info.get("ram", ram)
        throttle = max(throttle, info.get("cpu-throttle-percentage", 0))
        if status in ("completed", "failed", "cancelled"):
            break
        now = time.monotonic() - began
        passes = info.get("ram", {}).get("dirty-sync-count", 0) - 1  # the first sync is pass 1
        if (setup.mode == "postcopy" and postcopy_at is None and status == "active"
                and passes >= setup.args.postcopy_after):
            source.execute("migrate-start-postcopy")
            postcopy_at = now
        if now > setup.timeout_s and cancelled_at is None and status == "active":
            source.execute("migrate_cancel")
            cancelled_at = now
        if now > setup.timeout_s + FINISH_TIMEOUT_S:  # post-copy (no cancel) or a stuck cancel
            raise QmpError(f"QEMU's migration still {status} after {now:.0f} s")
        time.sleep(POLL_S)
    return {"info": info | {"ram": ram}, "throttle_percent_max": throttle,
            "postcopy_started_s": postcopy_at, "cancelled_at_s": cancelled_at}


def run_qemu(setup: Setup) -> dict[str, Any]:
    args, workdir = setup.args, setup.workdir
    assert setup.qemu is not None
    rams = [SHM / f"qemu-convq-{setup.serial}-{workdir.stat().st_ino}-{side}.ram"
            for side in ("src", "dst")]
    config, khz = guest_config(setup), host_tsc_khz()

    def machine(side: str, ram: Path) -> list[str]:
        return qemu_command(config, ram, serial_log=workdir / f"{side}.serial", tsc_khz=khz,
                            kernel=args.kernel, binary=setup.qemu or "")
    capabilities = [{"capability": "events", "state": True}]
    if setup.mode == "auto-converge":
        capabilities.append({"capability": "auto-converge", "state": True})
    elif setup.mode == "postcopy":
        capabilities.append({"capability": "postcopy-ram", "state": True})
    parameters = {"downtime-limit": args.downtime_ms, "max-bandwidth": MAX_BANDWIDTH,
                  **THROTTLE}
    source = destination = None
    files: list[guest_status.StatusFile] = []
    try:
        destination = QemuProcess(setup.qemu, "dst", workdir, rams[1], args.memory_bytes,
                                  incoming=True, prefix=setup.ns.exec_prefix,
                                  machine=machine("dst", rams[1]))
        source = QemuProcess(setup.qemu, "src", workdir, rams[0], args.memory_bytes,
                             machine=machine("src", rams[0]))
        for qemu in (destination, source):
            qemu.execute("migrate-set-capabilities", {"capabilities": capabilities})
            qemu.execute("migrate-set-parameters", parameters)
        destination.execute("migrate-incoming", {"uri": f"tcp:{setup.ns.ns_addr}:0"})
        uri = f"tcp:{setup.ns.ns_addr}:{_incoming_port(destination)}"
        files = [guest_status.StatusFile(lambda path=path: path, config.cpus) for path in rams]
        qemus = (source, destination)

        def migrate() -> dict[str, Any]:
            driven = _qemu_drive(setup, qemus[0], uri)
            if driven["info"].get("status") == "completed":
                assert qemus[1].qmp is not None  # the guest runs there once it resumed
                qemus[1].qmp.wait_event("MIGRATION", ("completed",), FINISH_TIMEOUT_S)
                qemus[1].qmp.wait_event("RESUME", timeout=FINISH_TIMEOUT_S)
            return driven

        figures = measure(setup, *files, lambda: (qemus[0].pid, qemus[1].pid), migrate)
        driven = {k: figures.pop(k) for k in ("info", "postcopy_started_s", "cancelled_at_s")}
        assert source.qmp is not None and destination.qmp is not None
        stamps = {"setup": source.qmp.event_time("MIGRATION", status="setup"),
                  "stop": source.qmp.event_time("STOP"),
                  # asked for, post-copy may still not happen: QEMU completes a pre-copy
                  # that fits the downtime limit instead
                  "postcopy": source.qmp.event_time("MIGRATION", status="postcopy-active"),
                  "resume": _event_time_or_none(destination, "RESUME"),
                  "received": _event_time_or_none(destination, "MIGRATION",
                                                  status="completed")}
        completed = driven["info"].get("status") == "completed"
        with QemuGuest(rams[1] if completed else rams[0], config) as guest:
            check = bool(guest.check()["ok"])
    finally:
        _clean_up(files, (source, destination), rams)
    return _qemu_figures(driven, stamps, figures, check)


def _event_time_or_none(qemu: QemuProcess, name: str, **data: Any) -> float | None:
    return None if qemu.qmp is None else qemu.qmp.event_time(name, **data)


def _qemu_figures(driven: dict[str, Any], stamps: dict[str, float | None],
                  figures: dict[str, Any], check: bool | None) -> dict[str, Any]:
    """A QEMU run in the figures vmig's summary gives (event times where QEMU has them)."""
    info = driven["info"]
    status = info.get("status")
    ram = info.get("ram", {})

    def span_ms(start: float | None, end: float | None) -> float | None:
        return None if start is None or end is None else round((end - start) * 1000, 1)

    postcopy = stamps["postcopy"] is not None
    # the guest whole at the destination: all pages in (post-copy) or resumed (pre-copy)
    end = stamps["received"] if postcopy else stamps["resume"]
    total = span_ms(stamps["setup"], end) if status == "completed" else None
    downtime = span_ms(stamps["stop"], stamps["resume"]) if status == "completed" else None
    return {"status": status, "error": info.get("error-desc"),
            "via_postcopy": postcopy and status == "completed",
            "postcopy_asked_s": driven["postcopy_started_s"],
            "total_ms": next((t for t in (total, info.get("total-time"),
                              driven["cancelled_at_s"] and driven["cancelled_at_s"] * 1000)
                              if t is not None), None),
            "downtime_ms": downtime if downtime is not None else info.get("downtime"),
            "bytes_sent": ram.get("transferred"), "iterations": ram.get("dirty-sync-count"),
            "postcopy": ({"started_after_s": round(stamps["postcopy"] - stamps["setup"], 3)
                          if stamps["setup"] is not None else None,
                          "requests": ram.get("postcopy-requests"),
                          "bytes": ram.get("postcopy-bytes")} if postcopy else None),
            "qemu_total_ms": info.get("total-time"), "qemu_downtime_ms": info.get("downtime"),
            "cancelled_at_s": driven["cancelled_at_s"], "qemu_ram": ram,
            "check_ok": check, **figures}
