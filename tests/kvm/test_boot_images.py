"""Boot images on real VMM processes: a boot sector the suite assembles (tests/asm.py),
booted by `vmig vmm --boot-image` and by `vm.create boot_image`; what the machine shows
such a guest (DL, port 0x92, unknown ports) and what the VMM reports about it."""

from __future__ import annotations

from pathlib import Path

from asm import build_raw
from helpers import Spawn, wait_for

SERIAL_HELLO = "counter boot: dl=0x80 port92=0x02"


def _serial(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_a_raw_boot_sector_boots_from_the_command_line(spawn_vmm: Spawn, tmp_path: Path
                                                      ) -> None:
    image = build_raw("counter_boot.S", tmp_path)
    serial = tmp_path / "serial.log"
    vmm = spawn_vmm("--boot-image", str(image), "--memory", "64M", "--serial-log", str(serial))
    wait_for(lambda: SERIAL_HELLO in _serial(serial), "the boot sector's hello on COM1")
    info = vmm.client.info()
    assert info["state"] == "running" and info["guest"] == "image"
    assert info["boot_format"] == "raw" and info["boot_image"] == str(image)
    assert info["workload"] is None and info["heartbeat"] is None


def test_vm_create_boots_a_raw_image(spawn_vmm: Spawn, tmp_path: Path) -> None:
    image = build_raw("counter_boot.S", tmp_path)
    serial = tmp_path / "serial.log"
    vmm = spawn_vmm()
    info = vmm.client.create(memory="64M", boot_image=str(image), serial_log=str(serial))
    assert info["boot_format"] == "raw" and len(info["boot_sha256"]) == 64
    wait_for(lambda: SERIAL_HELLO in _serial(serial), "the boot sector's hello on COM1")
