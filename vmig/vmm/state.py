"""The VM's saved state: plain, versioned data, separate from the live objects.

A `MachineState` is everything needed to continue a paused VM in a fresh VMM
process, except guest memory: the configuration (which includes the guest's
parameters), the kvmclock, every vCPU's CPUID, MP state, registers, segment and
control registers, XSAVE area, XCRs, debug registers, MSRs, pending events and TSC
offset, and the devices' registers (format version 2; docs/architecture.md describes
it, and version 1 still loads). It serialises to a JSON document; KVM structs
appear as nested objects whose field names are those of linux/kvm.h, so the
document can be read by a person.

`to_json(version=1)` writes the version-1 document a protocol-2 destination (vmig up
to db2c624) restores: per vCPU regs, sregs (from sregs2, as KVM_GET_SREGS would give
them), the legacy FPU area (from the XSAVE area's FXSAVE region, as KVM_GET_FPU would),
the 11 MSRs version 1 carried and the events. What version 1 cannot carry and a guest
would miss is refused by name (`v1_problem`); the rest (CPUID, the other MSRs, TSC
offset, kvmclock) is left behind, as version 1 always did.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from vmig.config import VmConfig
from vmig.errors import SnapshotError
from vmig.kvm import bindings as b
from vmig.kvm.msrs import V1_MSRS

STATE_FORMAT = "vmig-vm-state"
STATE_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: regs, sregs, FPU, 11 MSRs and events
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


def _struct_or_none(struct_type: type[ctypes.Structure], data: dict[str, Any] | None
                    ) -> Any:
    return None if data is None else dict_to_struct(struct_type, data)


@dataclass
class VcpuState:
    """One vCPU's architectural state, as read with KVM_GET_* while it was paused.

    Version 2 fills every field but `fpu` (XSAVE holds the FPU and SSE state) and has
    either `sregs2` or `sregs`; a version-1 document has only vcpu_id, regs, sregs,
    fpu, msrs and events. MSRs are kept in the order they were read; `load` writes
    them in `msrs.restore_order`.
    """

    vcpu_id: int
    regs: dict[str, Any]
    sregs: dict[str, Any] | None
    fpu: dict[str, Any] | None
    msrs: dict[int, int]
    events: dict[str, Any] | None = None
    cpuid: list[dict[str, int]] | None = None
    mp_state: dict[str, Any] | None = None
    sregs2: dict[str, Any] | None = None
    xsave: str | None = None  # hex of the KVM_GET_XSAVE(2) buffer
    xcrs: dict[str, Any] | None = None
    debugregs: dict[str, Any] | None = None
    tsc_offset: int | None = None  # KVM_VCPU_TSC_OFFSET: guest TSC - host TSC

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in VCPU_FIELDS}
        data["msrs"] = [[f"{index:#x}", value] for index, value in self.msrs.items()]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VcpuState:
        unknown = set(data) - set(VCPU_FIELDS)
        if unknown:
            raise SnapshotError(f"vCPU state has unknown fields {sorted(unknown)}")
        msrs = data["msrs"]
        pairs = msrs.items() if isinstance(msrs, dict) else msrs  # version 1 used a dict
        values = {name: data.get(name) for name in VCPU_FIELDS}
        values.update(vcpu_id=int(data["vcpu_id"]), regs=data["regs"],
                      msrs={int(index, 16): int(value) for index, value in pairs})
        return cls(**values)

    def kvm_regs(self) -> b.kvm_regs:
        return dict_to_struct(b.kvm_regs, self.regs)

    def kvm_sregs(self) -> b.kvm_sregs | None:
        return _struct_or_none(b.kvm_sregs, self.sregs)

    def kvm_sregs2(self) -> b.kvm_sregs2 | None:
        return _struct_or_none(b.kvm_sregs2, self.sregs2)

    def kvm_fpu(self) -> b.kvm_fpu | None:
        return _struct_or_none(b.kvm_fpu, self.fpu)

    def kvm_vcpu_events(self) -> b.kvm_vcpu_events | None:
        return _struct_or_none(b.kvm_vcpu_events, self.events)

    def kvm_mp_state(self) -> b.kvm_mp_state | None:
        return _struct_or_none(b.kvm_mp_state, self.mp_state)

    def kvm_xcrs(self) -> b.kvm_xcrs | None:
        return _struct_or_none(b.kvm_xcrs, self.xcrs)

    def kvm_debugregs(self) -> b.kvm_debugregs | None:
        return _struct_or_none(b.kvm_debugregs, self.debugregs)

    def xsave_bytes(self) -> bytes | None:
        return None if self.xsave is None else bytes.fromhex(self.xsave)

    def to_v1_dict(self) -> dict[str, Any]:
        """This vCPU as state version 1 wrote it (see the module's docstring); a part
        version 1 cannot carry is a SnapshotError naming it."""
        problem = v1_problem(self)
        if problem is not None:
            raise SnapshotError(f"VM state version 1 cannot carry vCPU {self.vcpu_id}'s "
                                f"{problem}")
        sregs = self.sregs
        if sregs is None:
            assert self.sregs2 is not None  # check(): version 2 has one of them
            sregs = sregs_from_sregs2(self.sregs2, self.events)
        fpu = self.fpu
        if fpu is None:
            xsave = self.xsave_bytes()
            assert xsave is not None
            fpu = fpu_from_xsave(xsave)
        return {"vcpu_id": self.vcpu_id, "regs": self.regs, "sregs": sregs, "fpu": fpu,
                "msrs": {f"{index:#x}": self.msrs[index] for index in V1_MSRS
                         if index in self.msrs},
                "events": self.events}

    def check(self, version: int) -> None:
        """Build every struct once, so a bad document fails now, not halfway through a
        restore; version 2 must have all of its parts."""
        if version >= 2:
            missing = [name for name in V2_REQUIRED if getattr(self, name) is None]
            if self.sregs is None and self.sregs2 is None:
                missing.append("sregs or sregs2")
            if missing:
                raise SnapshotError(f"vCPU {self.vcpu_id} state lacks {', '.join(missing)}")
        elif self.sregs is None or self.fpu is None:
            raise SnapshotError(f"vCPU {self.vcpu_id} state lacks sregs or fpu")
        self.kvm_regs(), self.kvm_sregs(), self.kvm_sregs2(), self.kvm_fpu()
        self.kvm_vcpu_events(), self.kvm_mp_state(), self.kvm_xcrs(), self.kvm_debugregs()
        try:
            self.xsave_bytes()
        except ValueError:
            raise SnapshotError(f"vCPU {self.vcpu_id} xsave is not hex") from None


VCPU_FIELDS = tuple(f.name for f in dataclasses.fields(VcpuState))
V2_REQUIRED = ("cpuid", "mp_state", "xsave", "xcrs", "debugregs", "events")


@dataclass
class MachineState:
    """Everything but memory that a paused VM needs to continue elsewhere."""

    config: VmConfig
    tsc_khz: int
    vcpus: list[VcpuState]
    devices: dict[str, Any] = field(default_factory=dict)
    guest: dict[str, Any] = field(default_factory=dict)
    #: KVM_GET_CLOCK at save time (clock, flags, realtime, host_tsc); None in version 1.
    clock: dict[str, int] | None = None
    version: int = STATE_VERSION

    def to_json(self, version: int | None = None) -> str:
        """The document in `version` (default: the state's own). Version 1 is what a
        protocol-2 destination reads (see the module's docstring): ConfigError or
        SnapshotError, naming the field, for a VM it cannot express."""
        version = self.version if version is None else version
        if version == 1:
            return self._to_v1_json()
        if version != STATE_VERSION:
            raise SnapshotError(f"cannot write VM state version {version}: this vmig writes "
                                f"1 and {STATE_VERSION}")
        document = {
            "format": STATE_FORMAT,
            "version": version,
            "config": self.config.to_dict(),
            "tsc_khz": self.tsc_khz,
            "vcpus": [vcpu.to_dict() for vcpu in self.vcpus],
            "devices": self.devices,
            "guest": self.guest,
            "clock": self.clock,
        }
        return json.dumps(document, indent=1, sort_keys=True)

    def _to_v1_json(self) -> str:
        document = {
            "format": STATE_FORMAT,
            "version": 1,
            "config": self.config.to_v1_dict(),
            "tsc_khz": self.tsc_khz,
            "vcpus": [vcpu.to_v1_dict() for vcpu in self.vcpus],
            "devices": {"serial": self.devices.get("serial", {"regs": {}})},
            "guest": {name: self.guest[name] for name in ("layout", "booted_cpus")
                      if name in self.guest},
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
        if version not in READABLE_VERSIONS:
            raise SnapshotError(
                f"VM state document version {version} is not supported (this vmig reads "
                f"versions {', '.join(map(str, READABLE_VERSIONS))})"
            )
        try:
            vcpus = [VcpuState.from_dict(item) for item in document["vcpus"]]
            state = cls(
                config=VmConfig.from_dict(document["config"]),
                tsc_khz=int(document["tsc_khz"]),
                vcpus=vcpus,
                devices=dict(document.get("devices", {})),
                guest=dict(document.get("guest", {})),
                clock=_clock(document.get("clock")),
                version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"VM state document is incomplete or malformed: {exc!r}") from None
        if len(state.vcpus) != state.config.cpus:
            raise SnapshotError(f"VM state has {len(state.vcpus)} vCPUs but its configuration "
                                f"says {state.config.cpus}")
        if version >= 2 and state.clock is None:
            raise SnapshotError("VM state document version 2 lacks the clock")
        for vcpu in state.vcpus:
            vcpu.check(version)
        return state


# --- version 1 from version 2 ---------------------------------------------------------------

#: FXSAVE's legacy region (the first 512 bytes of an XSAVE area): FCW, FSW, abridged
#: FTW, a reserved byte, FOP, FIP, FDP, MXCSR, MXCSR_MASK; then ST0-7 at 32 and
#: XMM0-15 at 160, 16 bytes each (Intel SDM vol. 1, 10.5.1).
_FXSAVE_HEADER = struct.Struct("<HHBxHQQII")
_FXSAVE_ST, _FXSAVE_XMM = 32, 160
_XSTATE_BV = struct.Struct("<Q")  # at 512: which components are not in their init state
_XSAVE_HEADER_OFFSET = 512
_XFEATURE_X87, _XFEATURE_SSE = 1, 2
_FCW_INIT = 0x37F  # FNINIT's control word: the x87 component's init state
#: XCR0 bits for the x87 and SSE components: what FXSAVE's region holds. A guest that
#: enabled more (AVX, AVX-512, PKRU...) has state that version 1 would lose.
_V1_XCR0 = 0x3
_DR7_ENABLE_BITS = 0xFF  # L0-L3 and G0-G3: a breakpoint is armed
_MP_STATE_RUNNABLE = 0


def sregs_from_sregs2(sregs2: dict[str, Any], events: dict[str, Any] | None
                      ) -> dict[str, Any]:
    """kvm_sregs from kvm_sregs2, as KVM_GET_SREGS gives them: no flags or PDPTRs
    (KVM_SET_SREGS reloads those from CR3), and the interrupt bitmap holding the
    injected external interrupt of `events`, if any (the kernel's __get_sregs)."""
    sregs = {name: value for name, value in sregs2.items() if name not in ("flags", "pdptrs")}
    words = [0] * len(b.kvm_sregs().interrupt_bitmap)
    interrupt = (events or {}).get("interrupt") or {}
    if interrupt.get("injected") and not interrupt.get("soft"):
        nr = int(interrupt["nr"])
        words[nr // 64] |= 1 << (nr % 64)
    sregs["interrupt_bitmap"] = words
    return sregs


def fpu_from_xsave(xsave: bytes) -> dict[str, Any]:
    """kvm_fpu from an XSAVE area (standard format), as KVM_GET_FPU reads the same state:
    the FXSAVE region, with a component the XSAVE header says is in its init state read
    as that state (x87: FCW 0x37F, the rest 0; SSE: XMM registers 0)."""
    if len(xsave) < _XSAVE_HEADER_OFFSET + _XSTATE_BV.size:
        raise SnapshotError(f"XSAVE area is {len(xsave)} bytes, too short for its header")
    fcw, fsw, ftw, fop, fip, fdp, mxcsr, _ = _FXSAVE_HEADER.unpack_from(xsave)
    (in_use,) = _XSTATE_BV.unpack_from(xsave, _XSAVE_HEADER_OFFSET)
    fpu = b.kvm_fpu(mxcsr=mxcsr)
    if in_use & _XFEATURE_X87:
        fpu.fcw, fpu.fsw, fpu.ftwx, fpu.last_opcode = fcw, fsw, ftw, fop
        fpu.last_ip, fpu.last_dp = fip, fdp
        ctypes.memmove(fpu.fpr, xsave[_FXSAVE_ST:_FXSAVE_ST + 128], 128)
    else:
        fpu.fcw = _FCW_INIT
    if in_use & _XFEATURE_SSE:
        ctypes.memmove(fpu.xmm, xsave[_FXSAVE_XMM:_FXSAVE_XMM + 256], 256)
    return struct_to_dict(fpu)


def v1_problem(vcpu: VcpuState) -> str | None:
    """What of `vcpu`'s state version 1 cannot carry although the guest depends on it,
    in a few words naming the field; None when version 1 can carry it.

    Version 1 restores regs, sregs, the FPU area, V1_MSRS and events into a vCPU with
    the host's CPUID: XCR0 stays at its reset value (x87 only; SSE needs no XCR0 bit),
    debug registers at theirs, and the vCPU runnable.
    """
    if vcpu.xcrs is not None:
        xcrs = vcpu.xcrs["xcrs"][:int(vcpu.xcrs["nr_xcrs"])]
        xcr0 = next((int(x["value"]) for x in xcrs if int(x["xcr"]) == 0), 1)
        if xcr0 & ~_V1_XCR0:
            return (f"xcrs: XCR0 is {xcr0:#x}, enabling XSAVE state beyond x87 and SSE "
                    "(AVX or later), which version 1 has no room for")
    if vcpu.debugregs is not None and int(vcpu.debugregs["dr7"]) & _DR7_ENABLE_BITS:
        return (f"debugregs: DR7 is {int(vcpu.debugregs['dr7']):#x}, arming hardware "
                "breakpoints, which version 1 does not save")
    if vcpu.mp_state is not None and int(vcpu.mp_state["mp_state"]) != _MP_STATE_RUNNABLE:
        return (f"mp_state: {int(vcpu.mp_state['mp_state'])} (not runnable); version 1 "
                "restores every vCPU runnable")
    return None


def _clock(data: dict[str, Any] | None) -> dict[str, int] | None:
    if data is None:
        return None
    return {name: int(data[name]) for name in CLOCK_FIELDS}


CLOCK_FIELDS = ("clock", "flags", "realtime", "host_tsc")
