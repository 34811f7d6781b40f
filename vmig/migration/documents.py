"""CONFIG and COMPLETE as typed, versioned documents (as `MachineState` is for STATE).

The sender builds a `ConfigDocument` / `CompleteDocument` and sends `to_json()`; the
receiver turns the payload back with `from_json()`, which checks every field and raises
`DocumentError` naming it (the peer broke the rules). Version 1 is what senders sent
before these documents existed: the same fields, untyped, without a ``version`` key; it
still parses (without CPUID, which version 1 did not carry), and `to_json(version=1)`
still writes it, for a peer that speaks protocol version 2 (`document_version_for`).

Pure: plain data in, plain data out; no sockets, clocks or KVM.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vmig.config import VmConfig
from vmig.cpu_compat import CPUID_ENTRY_FIELDS
from vmig.errors import ConfigError, VmigError
from vmig.proto.wire import range_table_problem
from vmig.ranges import RangeTable

__all__ = ["COMPLETE_VERSION", "CONFIG_VERSION", "DOCUMENT_VERSION", "MAX_CONFIG_EXTENTS",
           "CompleteDocument", "ConfigDocument", "DocumentError", "MemoryDigest",
           "document_version_for"]

CONFIG_VERSION = 2
COMPLETE_VERSION = 2
#: The version this vmig writes CONFIG, STATE (vmig.vmm.state.STATE_VERSION) and COMPLETE
#: in, one number for the three.
DOCUMENT_VERSION = 2
#: Protocol version -> the version of the documents it carries. Protocol 2's receivers
#: (vmig up to db2c624) read documents version 1 only: no ``version``, no ``cpuid``, the
#: configuration without boot images, state version 1.
DOCUMENT_VERSIONS = {2: 1, 3: DOCUMENT_VERSION}
#: Most data extents CONFIG lists (the sender coarsens its table to fit).
MAX_CONFIG_EXTENTS = 4096


class DocumentError(VmigError):
    """A CONFIG or COMPLETE payload that does not follow docs/protocol.md."""


def document_version_for(protocol_version: int) -> int:
    """The version of CONFIG, STATE and COMPLETE to send to a peer speaking
    `protocol_version` (2 -> 1, 3 -> DOCUMENT_VERSION); ValueError for another one."""
    try:
        return DOCUMENT_VERSIONS[protocol_version]
    except KeyError:
        raise ValueError(f"no documents for protocol version {protocol_version} (this vmig "
                         f"speaks {', '.join(map(str, sorted(DOCUMENT_VERSIONS)))})") from None


def _check_writable(version: int, newest: int, what: str) -> None:
    if version not in range(1, newest + 1):
        raise ValueError(f"cannot write {what} version {version}: this vmig writes 1 to "
                         f"{newest}")


def _object(data: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(data) if data else {}
    except ValueError as exc:
        raise DocumentError(f"bad {what}: not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise DocumentError(f"bad {what}: not a JSON object")
    return document


def _version(document: Mapping[str, Any], what: str, newest: int) -> int:
    version = document.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= newest:
        raise DocumentError(f"bad {what}: version {version!r}; this side reads 1 to {newest}")
    return version


def _uint(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise DocumentError(f"bad CONFIG: {name} must be a non-negative integer, "
                            f"got {value!r}")
    return value


@dataclass(frozen=True)
class ConfigDocument:
    """CONFIG: what the destination must build before any memory moves."""

    vm: VmConfig
    #: The source vCPUs' TSC frequency; the destination refuses another one (policy).
    tsc_khz: int
    #: Where the source's memory holds data, [gpa, length] in order: a hint for
    #: allocating ahead (at most MAX_CONFIG_EXTENTS).
    data_extents: tuple[tuple[int, int], ...] = ()
    #: The CPUID the guest's vCPUs were given (vCPU 0's; all are the same), as the saved
    #: state writes it; None from a version-1 sender, which did not say.
    cpuid: tuple[Mapping[str, int], ...] | None = None
    version: int = CONFIG_VERSION

    def to_json(self, version: int = CONFIG_VERSION) -> bytes:
        """The payload in `version`. Version 1 (for a protocol-2 peer) has no ``version``
        and no ``cpuid``, and its ``vm`` only the fields version 1 knew: a guest it cannot
        express (a boot image) is a ConfigError naming the field."""
        _check_writable(version, CONFIG_VERSION, "CONFIG")
        extents = [[gpa, length] for gpa, length in self.data_extents]
        if version == 1:
            return json.dumps({"vm": self.vm.to_v1_dict(), "tsc_khz": self.tsc_khz,
                               "data_extents": extents}).encode()
        document: dict[str, Any] = {
            "version": version,
            "vm": self.vm.to_dict(),
            "tsc_khz": self.tsc_khz,
            "data_extents": extents,
        }
        if self.cpuid is not None:
            document["cpuid"] = [dict(entry) for entry in self.cpuid]
        return json.dumps(document).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ConfigDocument:
        """Parse and check a CONFIG payload; DocumentError names what is wrong."""
        document = _object(data, "CONFIG")
        version = _version(document, "CONFIG", CONFIG_VERSION)
        try:
            vm = VmConfig.from_dict(document["vm"])
        except KeyError:
            raise DocumentError("bad CONFIG: no vm") from None
        except (ConfigError, ValueError, TypeError, AttributeError) as exc:
            raise DocumentError(f"bad CONFIG: vm: {exc}") from None
        tsc_khz = _uint(document.get("tsc_khz", 0), "tsc_khz")
        extents = _extents(document.get("data_extents", []), vm.memory_bytes)
        cpuid = None
        if version >= 2:
            cpuid = _cpuid(document.get("cpuid"))
        return cls(vm=vm, tsc_khz=tsc_khz, data_extents=extents, cpuid=cpuid,
                   version=version)


def _extents(raw: Any, memory_bytes: int) -> tuple[tuple[int, int], ...]:
    """``data_extents``, checked as strictly as a range table."""
    if not isinstance(raw, list) or len(raw) > MAX_CONFIG_EXTENTS:
        raise DocumentError("bad CONFIG: data_extents is not a list of at most "
                            f"{MAX_CONFIG_EXTENTS} [gpa, length] pairs")
    try:
        table = RangeTable([(int(gpa), int(length)) for gpa, length in raw])
    except (TypeError, ValueError) as exc:
        raise DocumentError(f"bad CONFIG: data_extents: {exc}") from None
    problem = range_table_problem(table, payload_limit=None)
    if problem is None and len(table):
        gpas, lengths = table.as_arrays()
        if int((gpas + lengths).max()) > memory_bytes:
            problem = "a range ends past guest memory"
    if problem is not None:
        raise DocumentError(f"bad CONFIG: data_extents: {problem}")
    return tuple(table)


def _cpuid(raw: Any) -> tuple[Mapping[str, int], ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise DocumentError("bad CONFIG: cpuid is not a list of entries")
    entries = []
    for number, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise DocumentError(f"bad CONFIG: cpuid entry {number} is not an object")
        entries.append({name: _uint(entry.get(name, 0), f"cpuid[{number}].{name}")
                        for name in CPUID_ENTRY_FIELDS})
    return tuple(entries)


@dataclass(frozen=True)
class MemoryDigest:
    """A digest of all guest memory, to be compared before the destination resumes."""

    algorithm: str
    hex: str


@dataclass(frozen=True)
class CompleteDocument:
    """COMPLETE: run the VM (or keep it paused), after checking the memory digest if any."""

    #: The VM ran at the source when it paused for the switch-over: run it here too.
    run: bool = True
    memory_digest: MemoryDigest | None = None
    version: int = COMPLETE_VERSION

    def to_json(self, version: int = COMPLETE_VERSION) -> bytes:
        """The payload in `version` (version 1: the same without ``version``)."""
        _check_writable(version, COMPLETE_VERSION, "COMPLETE")
        document: dict[str, Any] = {"run": self.run}
        if version >= 2:
            document["version"] = version
        if self.memory_digest is not None:
            document["memory_digest"] = {"algorithm": self.memory_digest.algorithm,
                                         "hex": self.memory_digest.hex}
        return json.dumps(document).encode()

    @classmethod
    def from_json(cls, data: bytes) -> CompleteDocument:
        """Parse and check a COMPLETE payload (empty means version 1's "run")."""
        document = _object(data, "COMPLETE")
        version = _version(document, "COMPLETE", COMPLETE_VERSION)
        run = document.get("run", True)
        if not isinstance(run, bool):
            raise DocumentError(f"bad COMPLETE: run must be true or false, got {run!r}")
        digest = None
        if "memory_digest" in document:
            raw = document["memory_digest"]
            if not isinstance(raw, dict) or not isinstance(raw.get("algorithm"), str) \
                    or not isinstance(raw.get("hex"), str):
                raise DocumentError("bad COMPLETE: memory_digest must be an object with "
                                    "the strings algorithm and hex")
            digest = MemoryDigest(raw["algorithm"], raw["hex"])
        return cls(run=run, memory_digest=digest, version=version)

