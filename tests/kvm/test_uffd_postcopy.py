"""Post-copy's premise on this host's KVM, with the project's own VMM: a vCPU that touches
a missing page of a userfaultfd-registered memslot blocks, and UFFDIO_COPY wakes it.

A dirty guest is booted, paused and saved; its memory is copied out and the VM shut
down. A fresh GuestMemory gets every page except the working set, whose range is
registered in MISSING mode, and the saved state is restored on it. A handler thread
serves each fault by copying the page from the saved image. The guest's own self-check
reads every working-set page, so it faults in the rest, and must find them all intact.

Python code that reads guest memory holds the GIL (`guest_counters` reads the status
page, `check_guest` writes the config page): those pages lie below the working set,
so they are copied in and never fault.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Iterator

import pytest

from vmig.config import VmConfig
from vmig.memory import GuestMemory
from vmig.uffd import Userfaultfd
from vmig.units import PAGE_SIZE
from vmig.vmm.machine import Machine, VmState, install_kick_handler
from vmig.vmm.state import MachineState

pytestmark = pytest.mark.kvm

WAIT_S = 10.0
STALL_S = 0.3  # how long the heartbeat must stand still to call the vCPUs blocked


@pytest.fixture(scope="module", autouse=True)
def _kick_handler() -> None:
    install_kick_handler()


class PageServer:
    """Serves faults in the registered range by copying pages from `image` (GPA 0 at
    `image_addr`), on its own thread, once `start_serving()` is called."""

    def __init__(self, uffd: Userfaultfd, host_base: int, image_addr: int) -> None:
        self.uffd, self.host_base, self.image_addr = uffd, host_base, image_addr
        self.faults = 0
        self.copied = 0
        self.error: BaseException | None = None
        self._serving = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="uffd-pages", daemon=True)
        self._thread.start()

    def start_serving(self) -> None:
        self._serving.set()

    def _run(self) -> None:
        try:
            self._serving.wait()
            while not self._stop.is_set():
                if not self.uffd.wait(0.05):
                    continue
                for addr in self.uffd.read_faults():
                    gpa = addr - self.host_base
                    self.copied += self.uffd.copy(addr, self.image_addr + gpa, PAGE_SIZE)
                    self.faults += 1
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        self._serving.set()
        self._thread.join(WAIT_S)
        assert not self._thread.is_alive(), "the page server did not stop"


@pytest.fixture(scope="module")
def saved_guest() -> Iterator[tuple[MachineState, ctypes.Array[ctypes.c_char]]]:
    """A dirty guest's saved state and an image of its memory; the VM itself is gone."""
    config = VmConfig.build(memory="64M", cpus=2, workload="dirty", working_set="16M",
                            dirty_rate=20_000)
    with Machine.boot(config) as machine:
        time.sleep(0.3)
        machine.pause()
        state = machine.save_state()
        image = (ctypes.c_char * machine.memory.size)()
        ctypes.memmove(image, machine.memory.host_addr, machine.memory.size)
    yield state, image


def _heartbeat(machine: Machine) -> int:
    return machine.guest_counters()["heartbeat"]


def _stalled(machine: Machine) -> bool:
    before = _heartbeat(machine)
    time.sleep(STALL_S)
    return _heartbeat(machine) == before


class _Pauser:
    """`machine.pause()` on a thread of its own, since it waits for the vCPUs to park."""

    def __init__(self, machine: Machine) -> None:
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(machine,), name="pauser")
        self._thread.start()

    def _run(self, machine: Machine) -> None:
        try:
            machine.pause()
        except BaseException as exc:
            self.error = exc

    def join(self) -> None:
        self._thread.join(WAIT_S + 5)
        assert not self._thread.is_alive(), "pause() did not return"
        assert self.error is None, self.error


def _wait_for(predicate, timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_vcpus_block_on_missing_pages_and_copy_wakes_them(saved_guest) -> None:
    state, image = saved_guest
    config = state.config
    size, ws_gpa, ws_bytes = config.memory_bytes, config.working_set_gpa, config.working_set_bytes
    ws_end = ws_gpa + ws_bytes
    image_addr = ctypes.addressof(image)

    memory = GuestMemory.create(size)
    # Everything but the working set: page tables, config and status pages, code, the
    # generation table (all below ws_gpa), and the untouched rest above it.
    ctypes.memmove(memory.host_addr, image_addr, ws_gpa)
    ctypes.memmove(memory.host_addr + ws_end, image_addr + ws_end, size - ws_end)
    uffd = Userfaultfd()
    server: PageServer | None = None
    machine: Machine | None = None
    try:
        uffd.register(memory.host_addr + ws_gpa, ws_bytes)
        server = PageServer(uffd, memory.host_addr, image_addr)
        machine = Machine.restore(state, memory, resume=True)

        # Nobody serves yet: every vCPU soon sits in a fault and the heartbeat stands still.
        assert uffd.wait(WAIT_S), "no userfault arrived from the vCPUs"
        assert _wait_for(lambda: _stalled(machine)), "the heartbeat never stood still"
        assert machine.state is VmState.RUNNING

        # A pause asked for meanwhile completes once the pages come (on PVM a kicked vCPU
        # does not leave a userfault before that; see benchmarks/uffd_probe.py).
        pauser = _Pauser(machine)
        time.sleep(0.1)
        server.start_serving()
        pauser.join()
        assert machine.state is VmState.PAUSED
        frozen = _heartbeat(machine)
        machine.resume()
        assert _wait_for(lambda: _heartbeat(machine) > frozen), "the guest did not go on"
        assert _wait_for(lambda: server.faults > 0)

        result = machine.check_guest()  # reads every working-set page: faults in the rest
        assert result == {"ok": True, "pages_checked": config.working_set_pages,
                          "bad_pages": 0, "first_bad_page": None}
        server.stop()  # the last copy wakes the vCPU before the server counts it
        assert server.error is None, server.error
        assert server.copied == ws_bytes  # every working-set page came through a fault, once
        assert server.faults >= config.working_set_pages
        uffd.unregister(memory.host_addr + ws_gpa, ws_bytes)
        assert machine.state is VmState.RUNNING
    finally:
        if server is not None:
            server.stop()
        uffd.close()  # wakes a vCPU still in a fault, so that the machine can stop
        if machine is not None:
            machine.shutdown()
        memory.close()
    assert server.error is None, server.error
