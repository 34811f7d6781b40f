"""Version-1 documents written by HEAD for a protocol-2 destination (vmig up to db2c624):
CONFIG and STATE read back by HEAD's own version-1 readers, and the very same JSON taken
by db2c624's readers (its code, from the repository's history, in a subprocess);
what version 1 cannot express is refused naming the field."""

from __future__ import annotations

import dataclasses
import json
import struct

import pytest
from state_samples import CLOCK, sample_vcpu

from vmig.config import VmConfig
from vmig.errors import ConfigError, SnapshotError
from vmig.kvm.msrs import V1_MSRS
from vmig.migration.documents import (
    COMPLETE_VERSION,
    CONFIG_VERSION,
    DOCUMENT_VERSION,
    CompleteDocument,
    ConfigDocument,
    document_version_for,
)
from vmig.vmm.state import STATE_VERSION, MachineState, VcpuState, fpu_from_xsave

CONFIG = VmConfig.build(memory="128M", cpus=2, workload="dirty", working_set="16M",
                        dirty_rate=20_000, order="sequential", seed=7)
V1_VM_FIELDS = {"memory_bytes", "cpus", "workload", "working_set_bytes", "dirty_rate",
                "order", "seed", "memory_file", "serial_log"}
MSRS = {0x10: 123456789, 0x6E0: 0, 0x4B564D01: 0x3001, 0x174: 8, 0xC0000082: 0xFFFF8000}
# db2c624's readers, run on the JSON on stdin; they print what they understood.
OLD_CONFIG_READER = """
import json, sys, vmig
from vmig.config import VmConfig
document = json.loads(sys.stdin.read())
config = VmConfig.from_dict(document["vm"])
print(json.dumps({"module": vmig.__file__, "vm": config.to_dict(), "keys": sorted(document)}))
"""
OLD_STATE_READER = """
import json, sys, vmig
from vmig.kvm import bindings as b
from vmig.vmm.state import MachineState
state = MachineState.from_json(sys.stdin.read())
vcpus = [{"sregs": bytes(v.kvm_sregs()).hex(), "fpu": bytes(v.kvm_fpu()).hex(),
          "regs": bytes(v.kvm_regs()).hex(), "events": bytes(v.kvm_vcpu_events()).hex(),
          "msrs": [[hex(i), value] for i, value in v.msrs.items()]} for v in state.vcpus]
print(json.dumps({"module": vmig.__file__, "version": state.version,
                  "config": state.config.to_dict(), "tsc_khz": state.tsc_khz,
                  "devices": state.devices, "vcpus": vcpus}))
"""


def _vcpu(vcpu_id: int) -> VcpuState:
    """A version-2 vCPU whose XSAVE header says x87 and SSE are in use, with an injected
    interrupt and MSRs inside and outside version 1's set."""
    vcpu = sample_vcpu(vcpu_id)
    xsave = bytearray(vcpu.xsave_bytes() or b"")
    struct.pack_into("<HHBxHQQI", xsave, 0, 0x27F, 0x3800, 0x81, 0x123, 0x401000, 0x9000,
                     0x1F00)
    xsave[32 + 16 * 2] = 0x42  # ST2's first byte
    struct.pack_into("<Q", xsave, 512, 3)  # XSTATE_BV: x87 and SSE
    assert vcpu.events is not None and vcpu.debugregs is not None
    vcpu.debugregs["dr7"] = 0x400  # no breakpoint armed (the sample arms one)
    vcpu.events["interrupt"].update(injected=1, nr=0x20 + vcpu_id)
    return dataclasses.replace(vcpu, xsave=bytes(xsave).hex(), msrs=dict(MSRS))


def _state() -> MachineState:
    return MachineState(CONFIG, 2_600_000, [_vcpu(0), _vcpu(1)], clock=CLOCK,
                        devices={"serial": {"regs": {"lcr": 3}, "partial_line": ""},
                                 "a20": {"value": 2}},
                        guest={"kind": "vmig", "layout": "vmig/guest/layout.py",
                               "booted_cpus": [0, 1]})


def test_document_versions_follow_the_protocol_version() -> None:
    assert document_version_for(2) == 1
    assert document_version_for(3) == DOCUMENT_VERSION
    assert DOCUMENT_VERSION == CONFIG_VERSION == COMPLETE_VERSION == STATE_VERSION
    with pytest.raises(ValueError, match="protocol version 1"):
        document_version_for(1)


def test_a_version_1_config_reads_back_at_head() -> None:
    document = ConfigDocument(vm=CONFIG, tsc_khz=2_600_000, data_extents=((0, 1 << 20),),
                              cpuid=({"function": 1, "index": 0, "flags": 0, "eax": 1,
                                      "ebx": 0, "ecx": 0, "edx": 0},))
    payload = json.loads(document.to_json(version=1))
    assert sorted(payload) == ["data_extents", "tsc_khz", "vm"]  # no version, no cpuid
    assert set(payload["vm"]) == V1_VM_FIELDS
    again = ConfigDocument.from_json(document.to_json(version=1))
    assert again.version == 1 and again.cpuid is None
    assert again.vm == CONFIG and again.data_extents == ((0, 1 << 20),)
    assert json.loads(document.to_json())["version"] == CONFIG_VERSION


def test_a_version_1_complete_has_no_version() -> None:
    assert json.loads(CompleteDocument(run=False).to_json(version=1)) == {"run": False}
    assert CompleteDocument.from_json(CompleteDocument().to_json(version=1)).run is True


@pytest.mark.parametrize(("change", "field"), [
    ({"boot_image": "/srv/boot.img", "cpus": 1}, "boot_image"),
    ({"boot_cmdline": "console=ttyS0"}, "boot_cmdline"),
])
def test_a_guest_version_1_cannot_express_is_refused_by_name(change, field) -> None:
    vm = dataclasses.replace(CONFIG, **change)
    with pytest.raises(ConfigError, match=f"^{field} cannot be expressed in configuration "
                                          "version 1"):
        ConfigDocument(vm=vm, tsc_khz=1).to_json(version=1)
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(_state(), config=vm).to_json(version=1)


def test_a_version_1_state_reads_back_at_head() -> None:
    state = _state()
    text = state.to_json(version=1)
    document = json.loads(text)
    assert document["version"] == 1 and "clock" not in document
    assert document["devices"] == {"serial": state.devices["serial"]}
    assert document["guest"] == {"layout": "vmig/guest/layout.py", "booted_cpus": [0, 1]}
    assert set(document["config"]) == V1_VM_FIELDS
    assert all(sorted(vcpu) == ["events", "fpu", "msrs", "regs", "sregs", "vcpu_id"]
               for vcpu in document["vcpus"])
    v1 = MachineState.from_json(text)
    assert v1.version == 1 and v1.config == CONFIG and v1.clock is None
    for old, new in zip(state.vcpus, v1.vcpus, strict=True):
        assert new.regs == old.regs and new.events == old.events
        assert set(new.msrs) == {0x174, 0xC0000082, 0x10}  # version 1's only
        assert all(new.msrs[index] == MSRS[index] for index in new.msrs)
        sregs, sregs2 = new.kvm_sregs(), old.kvm_sregs2()
        assert sregs is not None and sregs2 is not None
        assert (sregs.cr0, sregs.efer, sregs.cs.selector) == (0x80000011, 0x500, 8)
        nr = 0x20 + old.vcpu_id
        assert list(sregs.interrupt_bitmap) == [1 << nr, 0, 0, 0]
        fpu = new.kvm_fpu()
        assert fpu is not None
        assert (fpu.fcw, fpu.fsw, fpu.ftwx, fpu.last_opcode) == (0x27F, 0x3800, 0x81, 0x123)
        assert (fpu.last_ip, fpu.last_dp, fpu.mxcsr) == (0x401000, 0x9000, 0x1F00)
        assert fpu.fpr[2][0] == 0x42 and fpu.xmm[3][5] == 7


def test_db2c624_reads_heads_version_1_documents(old_release) -> None:
    state = _state()
    config = ConfigDocument(vm=CONFIG, tsc_khz=2_600_000, data_extents=((0, 1 << 20),))
    read = json.loads(old_release.python(OLD_CONFIG_READER, config.to_json(version=1).decode()))
    assert read["module"].startswith(str(old_release.path))
    assert read["vm"] == CONFIG.to_v1_dict()
    head = MachineState.from_json(state.to_json(version=1))
    old = json.loads(old_release.python(OLD_STATE_READER, state.to_json(version=1)))
    assert old["module"].startswith(str(old_release.path)) and old["version"] == 1
    assert old["config"] == CONFIG.to_v1_dict() and old["tsc_khz"] == state.tsc_khz
    assert old["devices"] == {"serial": state.devices["serial"]}
    for theirs, ours in zip(old["vcpus"], head.vcpus, strict=True):
        assert theirs["sregs"] == bytes(ours.kvm_sregs()).hex()
        assert theirs["fpu"] == bytes(ours.kvm_fpu()).hex()
        assert theirs["regs"] == bytes(ours.kvm_regs()).hex()
        assert theirs["events"] == bytes(ours.kvm_vcpu_events()).hex()
        assert theirs["msrs"] == [[hex(i), value] for i, value in ours.msrs.items()]


def test_db2c624_refuses_heads_version_2_state(old_release) -> None:
    """Why STATE must be downgraded: the old reader knows version 1 only."""
    code = OLD_STATE_READER.replace("state = MachineState", "try:\n    state = MachineState")
    code = code.replace("read())\n", "read())\nexcept Exception as exc:\n    print(exc)\n"
                        "    raise SystemExit(0)\n", 1)
    answer = old_release.python(code, _state().to_json())
    assert "version 2 is not supported" in answer


def test_components_in_their_init_state_read_as_that_state() -> None:
    xsave = bytearray(4096)
    struct.pack_into("<HH", xsave, 0, 0x27F, 0x1234)  # stale: XSTATE_BV says init
    xsave[160] = 9
    fpu = fpu_from_xsave(bytes(xsave))
    assert (fpu["fcw"], fpu["fsw"], fpu["xmm"][0][0]) == (0x37F, 0, 0)
    with pytest.raises(SnapshotError, match="too short"):
        fpu_from_xsave(bytes(100))


def _xcr0(vcpu: VcpuState, value: int) -> None:
    assert vcpu.xcrs is not None
    vcpu.xcrs["xcrs"][0].update(xcr=0, value=value)


@pytest.mark.parametrize(("spoil", "words"), [
    (lambda v: _xcr0(v, 0x7), "vCPU 1's xcrs: XCR0 is 0x7"),
    (lambda v: v.debugregs.update(dr7=0x403), "vCPU 1's debugregs: DR7 is 0x403"),
    (lambda v: v.mp_state.update(mp_state=3), "vCPU 1's mp_state: 3"),
])
def test_vcpu_state_version_1_cannot_carry_is_refused_by_name(spoil, words) -> None:
    state = _state()
    _xcr0(state.vcpus[0], 0x3)  # x87 and SSE: FXSAVE's region holds them
    state.to_json(version=1)
    spoil(state.vcpus[1])
    with pytest.raises(SnapshotError, match="VM state version 1 cannot carry") as raised:
        state.to_json(version=1)
    assert words in str(raised.value)


def test_only_version_1_msrs_go() -> None:
    vcpu = _vcpu(0)
    vcpu.msrs = {index: index for index in (*V1_MSRS, 0x1A0, 0x4B564D00)}
    assert list(vcpu.to_v1_dict()["msrs"]) == [f"{index:#x}" for index in V1_MSRS]
