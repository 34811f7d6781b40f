"""Restoring a vCPU: the order of the writes, the MSRs chosen, refused MSRs named, and
the TSC offset arithmetic of the kernel's vcpu.rst, against a vCPU that records calls."""

from __future__ import annotations

import pytest
from state_samples import CLOCK, V1_DOCUMENT, sample_vcpu

from vmig.errors import KvmError
from vmig.kvm import bindings as b
from vmig.kvm.msrs import is_pmu_msr, msr_name, msrs_to_save, restore_order
from vmig.vmm.state import MachineState
from vmig.vmm.vcpu_state import StateSupport, load_vcpu_state, restore_time

SUPPORT = StateSupport(sregs2=True, xsave_size=4096, msrs=(0x10,), tsc_offset=True)
# KVM_GET_MSR_INDEX_LIST on this machine (41 MSRs), PMU capabilities among them
INDEX_LIST = [0x174, 0x175, 0x176, 0xC0000081, 0xC0000083, 0xC0000102, 0xC0000084, 0xC0000082,
              0x10, 0x277, 0xC0010117, 0x48, 0x1D9, 0x1DB, 0x1DC, 0x1DD, 0x1DE, 0x12, 0x11,
              0x4B564D01, 0x4B564D00, 0x4B564D02, 0x4B564D03, 0x4B564D04, 0x4B564D06,
              0x4B564D07, 0x3B, 0x6E0, 0x10A, 0x345, 0x1A0, 0x17A, 0x17B, 0x34, 0xCE, 0x140,
              0xC001011F, 0x1FC, 0x8B, 0xC0010015, 0x4B564D05]


class RecordingVcpu:
    """Records each set_* call; its MSRs start at `fresh`, and it refuses `refuse`."""

    vcpu_id = 0

    def __init__(self, fresh: dict[int, int] | None = None, refuse: int | None = None) -> None:
        self.calls: list[tuple[str, object]] = []
        self.fresh = fresh or {}
        self.refuse = refuse
        self.tsc_offset: int | None = None

    def __getattr__(self, name: str):
        if not name.startswith("set_"):
            raise AttributeError(name)
        return lambda value, *rest: self.calls.append((name, value))

    def get_msrs(self, indices):
        return {index: self.fresh[index] for index in indices if index in self.fresh}

    def set_msrs(self, msrs: dict[int, int]) -> int:
        self.calls.append(("set_msrs", dict(msrs)))
        order = list(msrs)
        return order.index(self.refuse) if self.refuse in msrs else len(order)

    def set_tsc_offset(self, offset: int) -> None:
        self.tsc_offset = offset


def test_restore_order_is_firecrackers_with_events_last():
    vcpu = RecordingVcpu()
    load_vcpu_state(vcpu, sample_vcpu(0), SUPPORT)
    assert [name for name, _ in vcpu.calls] == [
        "set_cpuid2", "set_mp_state", "set_regs", "set_sregs2", "set_xsave", "set_xcrs",
        "set_debugregs", "set_msrs", "set_vcpu_events"]


def test_the_xsave_area_is_restored_not_an_fpu_area():
    vcpu = RecordingVcpu()
    state = sample_vcpu(0)
    load_vcpu_state(vcpu, state, SUPPORT)
    calls = dict(vcpu.calls)
    assert calls["set_xsave"] == state.xsave_bytes()
    assert "set_fpu" not in calls
    assert list(calls["set_debugregs"].db) == [0, 0, 0xDEAD0000, 0]


def test_sregs2_falls_back_to_sregs_where_kvm_lacks_it():
    vcpu = RecordingVcpu()
    load_vcpu_state(vcpu, sample_vcpu(0), StateSupport(False, 0, (), False))
    sregs = dict(vcpu.calls)["set_sregs"]
    assert isinstance(sregs, b.kvm_sregs) and sregs.efer == 0x500 and sregs.cr0 == 0x80000011


def test_version_1_state_restores_fpu_regs_sregs_and_msrs():
    state = MachineState.from_json(V1_DOCUMENT.read_bytes())
    vcpu = RecordingVcpu()
    load_vcpu_state(vcpu, state.vcpus[0], SUPPORT)
    assert [name for name, _ in vcpu.calls] == [
        "set_regs", "set_sregs", "set_fpu", "set_msrs", "set_vcpu_events"]
    assert dict(vcpu.calls)["set_fpu"].xmm[3][5] == 7


def test_msrs_are_written_tsc_first_and_only_where_they_differ():
    vcpu = RecordingVcpu(fresh={0x6E0: 0, 0x10: 5, 0x4B564D01: 0})
    state = sample_vcpu(0)
    state.msrs = {0x6E0: 77, 0x4B564D06: 0, 0x10: 123, 0x4B564D01: 0x3001}
    vcpu.fresh[0x4B564D06] = 0
    load_vcpu_state(vcpu, state, SUPPORT)
    assert list(dict(vcpu.calls)["set_msrs"].items()) == [(0x10, 123), (0x6E0, 77),
                                                          (0x4B564D01, 0x3001)]


def test_a_refused_msr_is_an_error_that_names_it():
    vcpu = RecordingVcpu(refuse=0x1A0)
    state = sample_vcpu(0)
    state.msrs = {0x10: 1, 0x1A0: 0x801, 0x12345678: 9}
    with pytest.raises(KvmError, match=r"0x1a0 \(IA32_MISC_ENABLE\) = 0x801"):
        load_vcpu_state(vcpu, state, SUPPORT)
    with pytest.raises(KvmError, match=r"MSR 0x12345678 = 0x9"):
        load_vcpu_state(RecordingVcpu(refuse=0x12345678), state, SUPPORT)


def test_pmu_msrs_are_not_saved():
    saved = msrs_to_save([*INDEX_LIST, 0xC1, 0x186, 0x38F, 0x309, 0xC0010004, 0xC0010201])
    assert 0x345 not in saved and 0xC1 not in saved and 0x38F not in saved
    assert not any(is_pmu_msr(index) for index in saved)
    assert len(saved) == len(INDEX_LIST) - 1  # IA32_PERF_CAPABILITIES is this list's PMU MSR
    assert saved[:3] == [0x174, 0x175, 0x176]  # KVM's order is kept


def test_restore_order_puts_tsc_before_tsc_deadline():
    assert restore_order([0x6E0, 0x174, 0x10]) == [0x10, 0x6E0, 0x174]
    assert msr_name(0x4B564D01) == "0x4b564d01 (KVM_SYSTEM_TIME_NEW)"


class FakeVm:
    def __init__(self, now: b.kvm_clock_data) -> None:
        self.now = now
        self.set: b.kvm_clock_data | None = None

    def set_clock(self, data: b.kvm_clock_data) -> None:
        self.set = data

    def get_clock(self) -> b.kvm_clock_data:
        return self.now


def test_time_is_restored_as_vcpu_rst_says():
    # 2 s of kvmclock passed; the destination's host TSC is 1e9 ticks ahead of the source's
    khz = 2_600_000
    now = b.kvm_clock_data(clock=CLOCK["clock"] + 2_000_000_000, flags=14,
                           host_tsc=CLOCK["host_tsc"] + 1_000_000_000)
    vm = FakeVm(now)
    vcpus = [RecordingVcpu(), RecordingVcpu()]
    states = [sample_vcpu(0), sample_vcpu(1)]
    states[1].tsc_offset = 1000
    restore_time(vm, vcpus, states, CLOCK, khz)
    assert vm.set.clock == CLOCK["clock"] and vm.set.realtime == CLOCK["realtime"]
    assert vm.set.flags == b.KVM_CLOCK_REALTIME
    # ofs_dst = ofs_src - (guest_src - guest_dst) * freq + (tsc_src - tsc_dst)
    assert vcpus[0].tsc_offset == (1 << 64) - 5000 + 2 * khz * 1000 - 1_000_000_000
    assert vcpus[1].tsc_offset == 1000 + 2 * khz * 1000 - 1_000_000_000


def test_version_1_state_leaves_the_clock_alone():
    vm = FakeVm(b.kvm_clock_data())
    restore_time(vm, [RecordingVcpu()], [sample_vcpu(0)], None, 1000)
    assert vm.set is None
