"""Boot images on real VMM processes: a boot sector the suite assembles (tests/asm.py),
booted by `vmig vmm --boot-image` and by `vm.create boot_image`; what the machine shows
such a guest (DL, port 0x92, unknown ports) and what the VMM reports about it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from asm import build_multiboot, build_raw
from helpers import Spawn, expect_api_error, wait_for

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


def _events(path: Path, name: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [e for e in events if e["source"] == "vm" and e["event"] == name]


def test_unknown_ports_are_counted_and_warned_about_once(spawn_vmm: Spawn, tmp_path: Path
                                                        ) -> None:
    image = build_raw("counter_boot.S", tmp_path)
    log = tmp_path / "vmm.log"
    vmm = spawn_vmm("--boot-image", str(image), "--memory", "64M", "--log-level", "warning",
                    "--log-file", str(log))
    ports = wait_for(lambda: vmm.client.info()["unknown_ports"], "an unknown port access")
    # The guest writes port 0x80 three times and reads it once; the others are devices.
    assert ports == {"0x80": {"reads": 1, "writes": 3}}
    warnings = [line for line in log.read_text().splitlines() if "port 0x80" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0]


@pytest.mark.parametrize("flat", [False, True], ids=["elf32", "address-fields"])
def test_a_multiboot_kernel_gets_its_command_line_and_memory_map(spawn_vmm: Spawn,
                                                                 tmp_path: Path,
                                                                 flat: bool) -> None:
    defines = {"ADDRESS_FIELDS": 1} if flat else None
    kernel = build_multiboot("multiboot_report.S", tmp_path, defines, flat=flat)
    if flat:  # no ELF header: only the address fields say where it goes
        assert not kernel.read_bytes().startswith(b"\x7fELF")
    serial = tmp_path / "serial.log"
    vmm = spawn_vmm()
    info = vmm.client.create(memory="64M", boot_image=str(kernel), serial_log=str(serial),
                             boot_cmdline="root=/dev/vda quiet x=1")
    assert info["boot_format"] == "multiboot"
    wait_for(lambda: "ready" in _serial(serial), "the kernel's report on COM1")
    lines = _serial(serial).splitlines()
    # The magic, and which information fields are valid: memory, cmdline, mmap, loader name.
    assert lines[0] == "multiboot: eax=0x2badb002 flags=0x00000245"
    assert lines[1] == "mem_lower=0x00000280 mem_upper=0x0000fc00"  # 640 KiB, 63 MiB
    assert lines[2] == "cmdline=root=/dev/vda quiet x=1"
    assert lines[3:6] == [
        "mmap base=0x00000000 length=0x000a0000 type=0x00000001",
        "mmap base=0x000a0000 length=0x00060000 type=0x00000002",
        "mmap base=0x00100000 length=0x03f00000 type=0x00000001",
    ]
    wait_for(lambda: "tick 0x00000002" in _serial(serial), "the kernel to keep running")


def test_a_triple_fault_is_reported_and_the_vmm_keeps_serving(spawn_vmm: Spawn,
                                                              tmp_path: Path) -> None:
    image = build_raw("triple_fault.S", tmp_path)
    events = tmp_path / "events.jsonl"
    serial = tmp_path / "serial.log"
    vmm = spawn_vmm("--event-monitor", str(events))
    vmm.client.create(memory="64M", boot_image=str(image), serial_log=str(serial))
    info = wait_for(lambda: (i := vmm.client.info())["state"] == "failed" and i,
                    "the VM to fail")
    assert "triple fault" in info["error"] and "\n" not in info["error"]
    assert "about to triple-fault" in _serial(serial)
    failed = wait_for(lambda: _events(events, "failed"), "the vm.failed event")
    assert failed[0]["properties"]["error"] == info["error"]
    # The VMM still serves: it answers, and a new VM replaces the failed one.
    assert vmm.client.ping()["pid"] == vmm.proc.pid
    vmm.client.shutdown()
    again = build_raw("counter_boot.S", tmp_path)
    assert vmm.client.create(memory="64M", boot_image=str(again))["state"] == "running"


def test_a_halt_for_good_is_reported_and_stays_halted(spawn_vmm: Spawn, tmp_path: Path
                                                      ) -> None:
    image = build_raw("halt_forever.S", tmp_path)
    events = tmp_path / "events.jsonl"
    serial = tmp_path / "serial.log"
    vmm = spawn_vmm("--event-monitor", str(events))
    vmm.client.create(memory="64M", boot_image=str(image), serial_log=str(serial))
    info = wait_for(lambda: (i := vmm.client.info())["halted"] and i, "the guest to halt")
    assert "halted for good" in info["halted"] and "interrupts disabled" in info["halted"]
    assert info["state"] == "running"  # the VM itself is fine: it can be paused, saved, moved
    halted = wait_for(lambda: _events(events, "halted"), "the vm.halted event")
    assert halted[0]["properties"]["reason"] == info["halted"]
    exits = info["vcpus"][0]["exits"]
    time.sleep(0.2)  # a halted vCPU is not re-entered over and over
    assert vmm.client.info()["vcpus"][0]["exits"] <= exits + 1
    # A kick (pause, resume) re-enters HLT, never what follows it.
    vmm.client.pause()
    vmm.client.resume()
    time.sleep(0.2)
    assert "halting for good" in _serial(serial) and "woke" not in _serial(serial)
    assert len(_events(events, "halted")) == 1


def test_an_image_guest_has_no_self_check(spawn_vmm: Spawn, tmp_path: Path) -> None:
    image = build_raw("counter_boot.S", tmp_path)
    vmm = spawn_vmm("--boot-image", str(image), "--memory", "64M")
    message = expect_api_error(409, vmm.client.check_guest)
    assert "no self-check" in message


def test_own_guest_fields_and_more_cpus_are_refused_for_an_image(spawn_vmm: Spawn,
                                                                 tmp_path: Path) -> None:
    image = build_raw("counter_boot.S", tmp_path)
    vmm = spawn_vmm()
    message = expect_api_error(400, vmm.client.create, boot_image=str(image), workload="dirty")
    assert "workload does not apply to a boot image" in message
    message = expect_api_error(400, vmm.client.create, boot_image=str(image), cpus=2)
    assert "a boot image runs on 1 vCPU" in message
    message = expect_api_error(400, vmm.client.create, boot_image=str(tmp_path / "missing"))
    assert "cannot read" in message
    assert vmm.client.info()["state"] == "empty"
