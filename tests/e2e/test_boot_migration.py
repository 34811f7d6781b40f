"""Image guests migrate live like vmig's own: a boot sector the suite assembles
(tests/guests/counter_boot.S) keeps sweeping memory during the copy, over 4 connections
with pre-copy and over 8 with post-copy, and its memory at the destination then holds
the guest's own invariant; a Multiboot kernel keeps running (and printing) there.

The guest's memory is read from files: the source runs with --memory-file, and the
destination's memory is read from a snapshot of it (paused, so it is stable).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from asm import build_multiboot, build_raw
from helpers import Background, Spawn, migration_info_or_none, receive, wait_for

# counter_boot.S's layout (see its header comment).
SWEEP_PAGES = 2048
REGION = 0x200000
CHECK = 0xA5A5A5A5
STATUS = 0x1000
PAGE = 4096
MEMORY = "64M"
BATCH = 8


def sweep_state(memory: bytes | memoryview) -> tuple[int, int]:
    """(pass, page) from counter_boot's status words, after checking that the pages hold
    its invariant: pages before `page` carry `pass`, pages after it `pass - 1` (zero in
    the first pass), the page itself either, and every check word matches.

    A snapshot pauses the vCPU between any two instructions, so two moments are torn:
    the page being written may hold its new generation beside its old check word, and a
    pass just begun has its new number in STATUS while the page index still names the
    last page (read as page -1 of that pass: no page written in it yet)."""
    passes, page = struct.unpack_from("<II", memory, STATUS)
    words = np.frombuffer(memory, dtype="<u4", count=SWEEP_PAGES * PAGE // 4,
                          offset=REGION).reshape(SWEEP_PAGES, PAGE // 4)
    gens, checks = words[:, 0].astype(np.int64), words[:, 1]
    index = np.arange(SWEEP_PAGES, dtype=np.uint32)
    assert passes >= 1 and page < SWEEP_PAGES, (passes, page)
    if page == SWEEP_PAGES - 1 and passes > 1 and (gens == passes - 1).all():
        page = -1  # the new pass is stored, its first page index not yet
    written = gens != 0

    def check_of(generation: np.ndarray) -> np.ndarray:
        return np.where(generation != 0, generation.astype(np.uint32) ^ np.uint32(CHECK)
                        ^ index, 0).astype(np.uint32)

    bad_check = written & (checks != check_of(gens))
    if page >= 0 and bad_check[page]:  # the page being written: its old check word
        bad_check[page] = checks[page] != check_of(gens - 1)[page]
    assert not bad_check.any(), f"pages with a bad check word: {np.flatnonzero(bad_check)[:8]}"
    assert not (~written & (checks != 0)).any(), "a never-written page has a check word"
    before, after = gens[:max(page, 0)], gens[page + 1:]
    stale = np.flatnonzero(before != passes)
    assert stale.size == 0, f"pass {passes} at page {page}, but page {stale[0]} has " \
                            f"{gens[stale[0]]}"
    behind = np.flatnonzero(after != passes - 1)
    assert behind.size == 0, f"pass {passes} at page {page}, but page " \
                             f"{page + 1 + behind[0]} has {gens[page + 1 + behind[0]]}"
    assert page < 0 or gens[page] in (passes, passes - 1)
    return int(passes), int(page)


def _sweep_image(passes: int, page: int, written_to: int) -> bytearray:
    """counter_boot's memory in pass `passes`: pages below `written_to` of this pass."""
    memory = bytearray(REGION + SWEEP_PAGES * PAGE)
    struct.pack_into("<II", memory, STATUS, passes, page)
    for number in range(SWEEP_PAGES):
        generation = passes if number < written_to else passes - 1
        if generation:
            struct.pack_into("<II", memory, REGION + number * PAGE, generation,
                             generation ^ CHECK ^ number)
    return memory


def test_sweep_state_takes_the_moments_a_pause_can_tear_and_nothing_else() -> None:
    assert sweep_state(_sweep_image(3, 100, 101)) == (3, 100)
    torn = _sweep_image(3, 100, 100)  # page 100's new generation, its old check word
    struct.pack_into("<I", torn, REGION + 100 * PAGE, 3)
    assert sweep_state(torn) == (3, 100)
    first = _sweep_image(1, 5, 5)
    struct.pack_into("<I", first, REGION + 5 * PAGE, 1)  # first pass: the old check is 0
    assert sweep_state(first) == (1, 5)
    # the new pass stored, the page index still the last page's
    assert sweep_state(_sweep_image(4, SWEEP_PAGES - 1, 0)) == (4, -1)
    for broken in (torn, _sweep_image(3, 100, 101)):
        struct.pack_into("<I", broken, REGION + 99 * PAGE + 4, 0xDEAD)  # a page not being written
        with pytest.raises(AssertionError, match="bad check word"):
            sweep_state(broken)
    garbled = _sweep_image(3, 100, 101)
    struct.pack_into("<I", garbled, REGION + 100 * PAGE + 4, 0xBEEF)  # neither old nor new
    with pytest.raises(AssertionError, match="bad check word"):
        sweep_state(garbled)
    lost = _sweep_image(3, 100, 101)
    struct.pack_into("<II", lost, REGION + 50 * PAGE, 2, 2 ^ CHECK ^ 50)  # an old page
    with pytest.raises(AssertionError, match="page 50 has 2"):
        sweep_state(lost)
    wrong_pass = _sweep_image(4, SWEEP_PAGES - 1, 0)
    struct.pack_into("<II", wrong_pass, REGION, 2, 2 ^ CHECK)  # one page a pass behind
    with pytest.raises(AssertionError):
        sweep_state(wrong_pass)


def _destination_memory(vmm_client: object, tmp_path: Path, name: str) -> bytes:
    client = vmm_client
    client.pause()  # type: ignore[attr-defined]
    directory = tmp_path / name
    client.snapshot(str(directory))  # type: ignore[attr-defined]
    client.resume()  # type: ignore[attr-defined]
    return (directory / "memory.bin").read_bytes()


def _source_state(path: Path) -> tuple[int, int]:
    with open(path, "rb") as file:
        file.seek(STATUS)
        return struct.unpack("<II", file.read(8))


@pytest.mark.parametrize(("connections", "postcopy"), [(4, False), (8, True)],
                         ids=["precopy-4", "postcopy-8"])
def test_a_boot_sector_migrates_live_and_keeps_its_invariant(
        spawn_vmm: Spawn, tmp_path: Path, connections: int, postcopy: bool) -> None:
    # Slow passes (8 pages a nap): a page the migration lost is caught before the guest,
    # running on at the destination, comes round to rewrite it.
    image = build_raw("counter_boot.S", tmp_path, {"BATCH": BATCH})
    source_memory = tmp_path / "source.ram"
    source = spawn_vmm("--boot-image", str(image), "--memory", MEMORY,
                       "--memory-file", str(source_memory))
    destination = spawn_vmm()
    # Let it finish a pass, so every page has been written.
    wait_for(lambda: _source_state(source_memory)[0] >= 2, "the guest to sweep its pages")
    at_start = _source_state(source_memory)
    url, auth = receive(destination)
    extra = {"postcopy": True, "postcopy_after_iterations": 1, "downtime_ms": 0} \
        if postcopy else {}
    summary = source.client.send_migration(destination_url=url, **auth,
                                           connections=connections, verify_memory=True,
                                           **extra)
    assert summary["status"] == "completed", summary
    assert summary["connections"] == connections
    # (a digest needs the whole memory at the switch-over: post-copy has none to check)
    assert summary["memory_verified"] is not postcopy
    if postcopy:
        assert summary["postcopy"]["pages"] > 0 and summary["postcopy"]["pages_left"] == 0
    else:
        assert summary["iterations"] >= 2  # the guest dirtied pages while they were copied
    info = destination.client.info()
    assert info["state"] == "running" and info["guest"] == "image"
    assert info["boot_format"] == "raw" and info["boot_sha256"] is not None

    first = sweep_state(_destination_memory(destination.client, tmp_path, "snap1"))
    assert first > at_start  # it ran on during the migration...
    second = wait_for(lambda: (s := sweep_state(_destination_memory(
        destination.client, tmp_path, "snap2"))) > first and s, "the guest to go on", 10)
    assert second > first  # ...and it runs on at the destination


def _whole_lines(serial: Path) -> str:
    """The serial log up to its last newline: a tick still being written is left out."""
    text = serial.read_text()
    return text[:text.rfind("\n") + 1]


def test_a_multiboot_kernel_migrates_and_runs_on(spawn_vmm: Spawn, tmp_path: Path) -> None:
    kernel = build_multiboot("multiboot_report.S", tmp_path)
    source_serial, destination_serial = tmp_path / "source.serial", tmp_path / "dest.serial"
    source = spawn_vmm("--boot-image", str(kernel), "--boot-cmdline", "mode=migrate",
                       "--memory", MEMORY, "--serial-log", str(source_serial))
    destination = spawn_vmm("--serial-log", str(destination_serial))
    wait_for(lambda: "tick" in source_serial.read_text(), "the kernel to run")
    assert "cmdline=mode=migrate" in source_serial.read_text()
    url, auth = receive(destination)
    summary = source.client.send_migration(destination_url=url, **auth, connections=2)
    assert summary["status"] == "completed", summary
    info = destination.client.info()
    assert info["boot_format"] == "multiboot" and info["boot_cmdline"] == "mode=migrate"
    # The destination's serial log goes on counting where the source's stopped (a tick the
    # source had half written is finished at the destination, so its number is not read).
    last = int(_whole_lines(source_serial).split("tick ")[-1].split()[0], 16)
    later = wait_for(lambda: [int(word.split()[0], 16) for word in
                              _whole_lines(destination_serial).split("tick ")[1:]
                              if word.strip()], "ticks at the destination")
    assert last <= later[0] <= last + 2 and later == list(range(later[0], later[0] + len(later)))


def test_a_boot_sector_migrates_locally_is_cancelled_and_restores_without_its_file(
        spawn_vmm: Spawn, tmp_path: Path) -> None:
    image = build_raw("counter_boot.S", tmp_path, {"BATCH": BATCH})
    source_memory = tmp_path / "source.ram"
    source = spawn_vmm("--boot-image", str(image), "--memory", MEMORY,
                       "--memory-file", str(source_memory))
    wait_for(lambda: _source_state(source_memory)[0] >= 2, "the guest to sweep its pages")
    # A cancelled migration leaves the guest running at the source.
    doomed = spawn_vmm()
    url, auth = receive(doomed)
    send = Background(lambda: source.client.send_migration(  # 8 MiB at 4 MB/s: 2 s
        destination_url=url, **auth, connections=2, max_bandwidth="4M"))
    send.start()
    wait_for(lambda: (i := migration_info_or_none(source.client)) and i["phase"] == "precopy",
             "pre-copy")
    assert source.client.cancel_migration()["status"] == "cancelled"
    assert send.outcome()["status"] == "cancelled"
    before = _source_state(source_memory)
    wait_for(lambda: _source_state(source_memory) > before, "the guest to run on")
    # A snapshot restores without the image file: the guest is in its memory.
    source.client.pause()
    source.client.snapshot(str(tmp_path / "snap"))
    paused = sweep_state((tmp_path / "snap" / "memory.bin").read_bytes())
    source.client.resume()
    image.unlink()
    restored = spawn_vmm("--restore", str(tmp_path / "snap"))
    info = restored.client.info()
    assert info["guest"] == "image" and info["boot_image"] == str(image)
    first = sweep_state(_destination_memory(restored.client, tmp_path, "snap-r1"))
    assert first >= paused
    # A local migration (memory by fd) of the restored guest.
    local = spawn_vmm()
    url, auth = receive(local, f"unix:{tmp_path}/local.sock")
    summary = restored.client.send_migration(destination_url=url, **auth, local=True,
                                             verify_memory=True)
    assert summary["status"] == "completed" and summary["memory_verified"] is True
    moved = sweep_state(_destination_memory(local.client, tmp_path, "snap-l1"))
    assert moved > first
