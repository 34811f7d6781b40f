"""The VMM on real KVM, in this process: boot, pause, resume, self-check, state, dirty log,
failure."""

import threading
import time

import numpy as np
import pytest
from helpers import counter_growth

from vmig.api.controller import Vmm
from vmig.api.events import Event, EventBus
from vmig.config import VmConfig
from vmig.errors import GuestMemoryError, KvmUnavailableError, StateError
from vmig.guest import layout
from vmig.kvm import Kvm
from vmig.memory import GuestMemory
from vmig.units import PAGE_SIZE
from vmig.vmm.machine import Machine, VmState, install_kick_handler

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module", autouse=True)
def _kick_handler():
    install_kick_handler()


def _wait_growth(machine: Machine, key: str) -> tuple[int, int]:
    return counter_growth(machine.guest_counters, key)


@pytest.fixture
def dirty_vm():
    config = VmConfig.build(memory="256M", cpus=2, workload="dirty", working_set="32M",
                            dirty_rate=20_000)
    with Machine.boot(config) as machine:
        yield machine


def test_boot_two_vcpus_heartbeat_grows_and_check_passes(dirty_vm):
    assert dirty_vm.state is VmState.RUNNING
    assert dirty_vm.booted_cpus == {0, 1}
    before, after = _wait_growth(dirty_vm, "heartbeat")
    assert after > before
    before, after = _wait_growth(dirty_vm, "pages_written")
    assert after > before
    result = dirty_vm.check_guest()
    assert result == {"ok": True, "pages_checked": 8192, "bad_pages": 0, "first_bad_page": None}


def test_pause_freezes_and_resume_continues(dirty_vm):
    dirty_vm.pause()
    assert dirty_vm.state is VmState.PAUSED
    frozen = dirty_vm.guest_counters()
    time.sleep(0.3)
    assert dirty_vm.guest_counters() == frozen
    dirty_vm.resume()
    before, after = _wait_growth(dirty_vm, "heartbeat")
    assert after > before >= frozen["heartbeat"]


def test_wrong_state_requests_are_refused(dirty_vm):
    with pytest.raises(StateError, match="cannot resume: VM is running"):
        dirty_vm.resume()
    with pytest.raises(StateError, match="cannot snapshot: VM is running"):
        dirty_vm.snapshot("/nonexistent")
    dirty_vm.pause()
    with pytest.raises(StateError, match="cannot pause: VM is paused"):
        dirty_vm.pause()
    with pytest.raises(StateError, match="check the guest"):
        dirty_vm.check_guest()


@pytest.fixture
def idle_vm():
    """Idle after stamping its pages once: nothing rewrites a page we corrupt."""
    config = VmConfig.build(memory="64M", cpus=2, workload="idle", working_set="16M")
    with Machine.boot(config) as machine:
        yield machine


def test_overwritten_page_fails_the_self_check(idle_vm):
    victim = 1234
    idle_vm.memory.write(idle_vm.config.working_set_gpa + victim * PAGE_SIZE, b"\xff" * 16)
    result = idle_vm.check_guest()
    assert not result["ok"]
    assert result["bad_pages"] == 1
    assert result["first_bad_page"] == victim


def test_zeroed_page_fails_the_self_check(idle_vm):
    victim = 4000
    idle_vm.memory.write(idle_vm.config.working_set_gpa + victim * PAGE_SIZE, bytes(PAGE_SIZE))
    assert idle_vm.check_guest()["bad_pages"] == 1


def test_pause_works_while_guest_runs_flat_out():
    config = VmConfig.build(memory="64M", cpus=2, workload="dirty", working_set="16M",
                            dirty_rate=0)
    with Machine.boot(config) as machine:
        for _ in range(5):
            machine.pause()
            machine.resume()
        assert machine.check_guest()["ok"]


def test_idle_guest_beats_and_checks():
    config = VmConfig.build(memory="64M", cpus=1, workload="idle", working_set="8M")
    with Machine.boot(config) as machine:
        before, after = _wait_growth(machine, "heartbeat")
        assert after > before
        result = machine.check_guest()
        assert result["ok"] and result["pages_checked"] == 2048


def test_state_restored_into_a_fresh_vm_continues_exactly(dirty_vm):
    dirty_vm.pause()
    state = dirty_vm.save_state()
    saved = dirty_vm.guest_counters()
    memory = GuestMemory.create(dirty_vm.memory.size)
    memory.view(0, memory.size)[:] = dirty_vm.memory.view(0, memory.size)
    with Machine.restore(state, memory, resume=False) as clone:
        assert clone.guest_counters() == saved
        regs = clone.vcpus[0].get_regs()
        assert regs.rip == state.vcpus[0].regs["rip"]
        clone.resume()
        before, after = _wait_growth(clone, "heartbeat")
        assert after > before >= saved["heartbeat"]
        assert clone.check_guest()["ok"]


def test_dirty_log_reports_guest_and_vmm_writes(dirty_vm):
    dirty_vm.start_dirty_log()
    time.sleep(0.2)
    dirty_vm.memory.write_u64(0x7000, 1)  # a VMM write KVM cannot see
    words = dirty_vm.collect_dirty()
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")
    ws_first = dirty_vm.config.working_set_gpa // PAGE_SIZE
    assert bits[0x7000 // PAGE_SIZE] == 1
    assert bits[ws_first:ws_first + dirty_vm.config.working_set_pages].sum() > 100
    assert bits[layout.STATUS_GPA // PAGE_SIZE] == 1  # heartbeat page
    dirty_vm.stop_dirty_log()


def test_guest_memory_bounds_are_checked(dirty_vm):
    with pytest.raises(GuestMemoryError, match="outside guest memory"):
        dirty_vm.memory.read(dirty_vm.memory.size - 4, 8)


def test_memory_larger_than_host_is_refused():
    with pytest.raises(GuestMemoryError, match="more than the host can give"):
        GuestMemory.create(1 << 46)


def test_missing_kvm_device_is_a_clear_error(tmp_path):
    with pytest.raises(KvmUnavailableError, match="does not exist"):
        Kvm(str(tmp_path / "kvm"))
    (tmp_path / "notkvm").write_text("")
    with pytest.raises(KvmUnavailableError, match="not a KVM device"):
        Kvm(str(tmp_path / "notkvm"))


def test_shutdown_joins_vcpu_threads():
    config = VmConfig.build(memory="64M", cpus=2, workload="dirty", working_set="8M")
    before = set(threading.enumerate())
    machine = Machine.boot(config)
    vcpu_threads = set(threading.enumerate()) - before
    assert len(vcpu_threads) == 2
    machine.shutdown()
    machine.shutdown()  # idempotent
    assert machine.state is VmState.SHUTDOWN
    assert not any(thread.is_alive() for thread in vcpu_threads)


class _BrokenDevice:
    """A device whose I/O fails, as a VMM bug would: the vCPU thread that hits it fails."""

    def io_read(self, offset: int, size: int) -> int:
        raise RuntimeError("device broke")

    def io_write(self, offset: int, size: int, value: int) -> None:
        raise RuntimeError("device broke")


def test_a_vcpu_failure_marks_the_vm_failed_and_is_reported_once():
    """The VMM hears of a failed VM (its `vm.failed` event) once, with the reason, on
    the failing vCPU's thread; the VM then says FAILED and why."""
    bus = EventBus()
    heard: list[Event] = []
    bus.add_listener(heard.append)
    vmm = Vmm(events=bus)
    vmm.create(VmConfig.build(memory="64M", cpus=2, working_set="4M"))
    machine = vmm.machine
    try:
        machine.bus._devices.insert(0, (layout.STATUS_PORT, 4, _BrokenDevice()))
        with pytest.raises(StateError):  # the guest reports its check on the status port
            machine.check_guest(timeout=10)
        assert machine.state is VmState.FAILED and "device broke" in machine.error
        machine._vcpu_failed(1, "a second vCPU failing too")  # as a parked vCPU might
        failed = [e.properties for e in heard if (e.source, e.event) == ("vm", "failed")]
        assert len(failed) == 1 and "device broke" in failed[0]["error"]
    finally:
        machine.close()
