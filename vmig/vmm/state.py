"""The VM's saved state: plain, versioned data, separate from the live objects.

A `MachineState` is everything needed to continue a paused VM in a fresh VMM
process, except guest memory: the configuration (which includes the guest's
parameters), every vCPU's registers, segment and control registers, FPU,
MSRs (TSC included) and pending events, and the devices' registers. It
serialises to a JSON document; KVM structs appear as nested objects whose field
names are those of linux/kvm.h, so the document can be read by a person.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass, field
from typing import Any

from vmig.config import VmConfig
from vmig.errors import KvmError, SnapshotError
from vmig.kvm import Vcpu
from vmig.kvm import bindings as b

STATE_FORMAT = "vmig-vm-state"
STATE_VERSION = 1
MAX_STATE_BYTES = 16 << 20  # refuse absurd documents instead of parsing them


def struct_to_dict(value: ctypes.Structure) -> dict[str, Any]:
    """A ctypes Structure as nested dicts and lists of ints (field names from the C header)."""
    out: dict[str, Any] = {}
    for name, _ in value._fields_:
        out[name] = _to_plain(getattr(value, name))
    return out


def _to_plain(value: Any) -> Any:
    if isinstance(value, ctypes.Structure | ctypes.Union):
        return struct_to_dict(value)
    if isinstance(value, ctypes.Array):
        return [_to_plain(item) for item in value]
    if isinstance(value, bytes):
        return value.hex()
    return int(value)


def dict_to_struct(struct_type: type[ctypes.Structure], data: dict[str, Any]) -> ctypes.Structure:
    """Inverse of `struct_to_dict`; a missing or unknown field is a SnapshotError."""
    value = struct_type()
    _fill(value, data, struct_type.__name__)
    return value


def _fill(target: ctypes.Structure, data: dict[str, Any], where: str) -> None:
    names = [name for name, _ in target._fields_]
    if set(names) != set(data):
        raise SnapshotError(f"state field {where} has fields {sorted(data)}, expected {names}")
    for name, _ in target._fields_:
        current = getattr(target, name)
        item = data[name]
        if isinstance(current, ctypes.Structure | ctypes.Union):
            _fill(current, item, f"{where}.{name}")
        elif isinstance(current, ctypes.Array):
            _fill_array(current, item, f"{where}.{name}")
        else:
            setattr(target, name, int(item))


def _fill_array(target: ctypes.Array, items: list[Any], where: str) -> None:
    if len(items) != len(target):
        raise SnapshotError(f"state field {where} has {len(items)} items, expected {len(target)}")
    for i, item in enumerate(items):
        if isinstance(target[i], ctypes.Array):
            _fill_array(target[i], item, f"{where}[{i}]")
        elif isinstance(target[i], ctypes.Structure):
            _fill(target[i], item, f"{where}[{i}]")
        else:
            target[i] = int(item)


@dataclass
class VcpuState:
    """One vCPU's architectural state, as read with KVM_GET_* while it was paused."""

    vcpu_id: int
    regs: dict[str, Any]
    sregs: dict[str, Any]
    fpu: dict[str, Any]
    msrs: dict[int, int]
    events: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "vcpu_id": self.vcpu_id,
            "regs": self.regs,
            "sregs": self.sregs,
            "fpu": self.fpu,
            "msrs": {f"{index:#x}": value for index, value in self.msrs.items()},
            "events": self.events,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VcpuState:
        return cls(
            vcpu_id=int(data["vcpu_id"]),
            regs=data["regs"],
            sregs=data["sregs"],
            fpu=data["fpu"],
            msrs={int(index, 16): int(value) for index, value in data["msrs"].items()},
            events=data.get("events"),
        )

    def kvm_regs(self) -> b.kvm_regs:
        return dict_to_struct(b.kvm_regs, self.regs)

    def kvm_sregs(self) -> b.kvm_sregs:
        return dict_to_struct(b.kvm_sregs, self.sregs)

    def kvm_fpu(self) -> b.kvm_fpu:
        return dict_to_struct(b.kvm_fpu, self.fpu)

    def kvm_vcpu_events(self) -> b.kvm_vcpu_events | None:
        return None if self.events is None else dict_to_struct(b.kvm_vcpu_events, self.events)


@dataclass
class MachineState:
    """Everything but memory that a paused VM needs to continue elsewhere."""

    config: VmConfig
    tsc_khz: int
    vcpus: list[VcpuState]
    devices: dict[str, Any] = field(default_factory=dict)
    guest: dict[str, Any] = field(default_factory=dict)
    version: int = STATE_VERSION

    def to_json(self) -> str:
        document = {
            "format": STATE_FORMAT,
            "version": self.version,
            "config": self.config.to_dict(),
            "tsc_khz": self.tsc_khz,
            "vcpus": [vcpu.to_dict() for vcpu in self.vcpus],
            "devices": self.devices,
            "guest": self.guest,
        }
        return json.dumps(document, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> MachineState:
        """Parse and check a state document; any problem is one SnapshotError line."""
        if len(text) > MAX_STATE_BYTES:
            raise SnapshotError(f"VM state document is {len(text)} bytes, over the "
                                f"{MAX_STATE_BYTES}-byte limit")
        try:
            document = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SnapshotError(f"VM state document is not valid JSON: {exc}") from None
        if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
            raise SnapshotError("not a vmig VM state document (format field missing or wrong)")
        version = document.get("version")
        if version != STATE_VERSION:
            raise SnapshotError(
                f"VM state document version {version} is not supported (this vmig reads "
                f"version {STATE_VERSION})"
            )
        try:
            vcpus = [VcpuState.from_dict(item) for item in document["vcpus"]]
            state = cls(
                config=VmConfig.from_dict(document["config"]),
                tsc_khz=int(document["tsc_khz"]),
                vcpus=vcpus,
                devices=dict(document.get("devices", {})),
                guest=dict(document.get("guest", {})),
                version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"VM state document is incomplete or malformed: {exc!r}") from None
        if len(state.vcpus) != state.config.cpus:
            raise SnapshotError(f"VM state has {len(state.vcpus)} vCPUs but its configuration "
                                f"says {state.config.cpus}")
        for vcpu in state.vcpus:  # fail now, not halfway through a restore
            vcpu.kvm_regs(), vcpu.kvm_sregs(), vcpu.kvm_fpu(), vcpu.kvm_vcpu_events()
        return state


def read_vcpu_state(vcpu: Vcpu, msr_indices: list[int]) -> VcpuState:
    try:
        events: dict[str, Any] | None = struct_to_dict(vcpu.get_vcpu_events())
    except KvmError:
        events = None
    return VcpuState(
        vcpu_id=vcpu.vcpu_id,
        regs=struct_to_dict(vcpu.get_regs()),
        sregs=struct_to_dict(vcpu.get_sregs()),
        fpu=struct_to_dict(vcpu.get_fpu()),
        msrs=vcpu.get_msrs(msr_indices),
        events=events,
    )


def load_vcpu_state(vcpu: Vcpu, state: VcpuState, known_msrs: set[int]) -> None:
    vcpu.set_sregs(state.kvm_sregs())
    vcpu.set_regs(state.kvm_regs())
    vcpu.set_fpu(state.kvm_fpu())
    events = state.kvm_vcpu_events()
    if events is not None:
        vcpu.set_vcpu_events(events)
    msrs = {index: value for index, value in state.msrs.items() if index in known_msrs}
    vcpu.set_msrs(msrs)
