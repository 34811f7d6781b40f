"""vmig's own guest booted by QEMU as a Multiboot kernel, watched and checked through
QEMU's RAM file (benchmarks/qemu_guest.py), as the QEMU benchmarks do."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import counter_growth

from vmig.config import VmConfig
from vmig.units import PAGE_SIZE

# After tests/ on the path: benchmarks/faults.py must not shadow tests/faults.py.
sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))
from qemu_guest import QEMU, QemuGuest, qemu_command

pytestmark = pytest.mark.kvm

CONFIG = VmConfig.build(memory="64M", workload="dirty", working_set="16M", dirty_rate=20_000,
                        order="random", seed=7)
CORRUPTED = (5, 1000, 2047, 3000, 3500, 4000, 4090, 4095)  # working-set pages


def _start_qemu(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    assert shutil.which(QEMU), f"{QEMU} is missing: ./dev test installs qemu-system-x86"
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


def _wait_serial(path: Path, text: str, proc: subprocess.Popen[bytes],
                 timeout: float = 30.0) -> str:
    """The serial log once a whole line holding `text` is in it (its newline written)."""
    deadline = time.monotonic() + timeout
    while True:
        found = path.read_text(errors="replace") if path.exists() else ""
        start = found.find(text)
        if start >= 0 and "\n" in found[start:]:
            return found
        assert proc.poll() is None, f"QEMU exited ({proc.returncode}); serial: {found!r}"
        assert time.monotonic() < deadline, f"no {text!r} on the serial line: {found!r}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def qemu_guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[QemuGuest, Path]]:
    workdir = tmp_path_factory.mktemp("qemu-guest")
    ram, serial = workdir / "ram", workdir / "serial.log"
    ram.write_bytes(b"")  # new and all zero: an old status page would look booted
    proc = _start_qemu(qemu_command(CONFIG, ram, serial_log=serial), workdir / "qemu.log")
    try:
        with QemuGuest(ram, CONFIG) as guest:
            guest.wait_booted()
            yield guest, serial
    finally:
        _stop(proc)


def test_the_guest_runs_under_qemu_with_its_command_line(qemu_guest):
    guest, serial = qemu_guest
    before, after = counter_growth(guest.counters, "heartbeat")
    assert after > before
    before, after = counter_growth(guest.counters, "pages_written")
    assert after > before >= CONFIG.working_set_pages  # the fill pass wrote every page
    text = serial.read_text(errors="replace")
    assert "workload dirty, order random, rate 20000 pages/s, working set 4096 pages, " \
           "booted by Multiboot" in text
    assert "working_set=16M seed=7 tsc_khz=" in text


def test_the_self_check_through_the_ram_file_passes_then_sees_corruption(qemu_guest):
    guest, _ = qemu_guest
    assert guest.check() == {"ok": True, "pages_checked": 4096, "bad_pages": 0,
                             "first_bad_page": None}
    for index in CORRUPTED:  # the stamp's page index word: never a valid stamp again
        gpa = CONFIG.working_set_gpa + index * PAGE_SIZE
        guest.write_u64(gpa, guest.read_u64(gpa) ^ (1 << 40))
    result = guest.check()
    # The guest may restamp a corrupted page before its check reaches it (it writes
    # 20,000 pages/s at random), but not all eight within milliseconds.
    assert result["ok"] is False
    assert 1 <= result["bad_pages"] <= len(CORRUPTED)
    assert result["first_bad_page"] in CORRUPTED
    assert result["pages_checked"] == 4096


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_idle_guest_naps_on_its_timer_instead_of_spinning(tmp_path):
    config = VmConfig.build(memory="64M", workload="idle", working_set="4M")
    ram = tmp_path / "ram"
    ram.write_bytes(b"")
    proc = _start_qemu(qemu_command(config, ram), tmp_path / "qemu.log")
    try:
        with QemuGuest(ram, config) as guest:
            guest.wait_booted()
            beats, cpu, started = guest.counters()["heartbeat"], _cpu_seconds(proc.pid), \
                time.monotonic()
            time.sleep(1.0)
            beats = guest.counters()["heartbeat"] - beats
            share = (_cpu_seconds(proc.pid) - cpu) / (time.monotonic() - started)
            assert guest.check()["ok"]
    finally:
        _stop(proc)
    # 20 ms naps: about 50 beats a second, and a spinning vCPU would use a whole CPU
    # (the timer's measured 1%).
    assert 10 <= beats <= 100
    assert share < 0.3


def test_an_unknown_command_line_key_stops_the_guest(tmp_path):
    ram, serial = tmp_path / "ram", tmp_path / "serial.log"
    ram.write_bytes(b"")
    argv = qemu_command(CONFIG, ram, serial_log=serial)
    argv[argv.index("-append") + 1] += " dirty_rat=5"
    proc = _start_qemu(argv, tmp_path / "qemu.log")
    try:
        text = _wait_serial(serial, "panic", proc)
    finally:
        _stop(proc)
    assert "cpu 0 panic: unknown key in command line: dirty_rat=5" in text
