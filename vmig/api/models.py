"""Request and response bodies of the VMM API (pydantic); they also make the OpenAPI document.

Only shape and simple ranges are checked here; sizes and cross-field rules are
checked by `VmConfig.build`, so the API and the CLI reject the same things with
the same words.
"""

from __future__ import annotations

import os
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vmig.config import DEFAULT_DIRTY_RATE, VmConfig
from vmig.guest import layout


def url_to_path(url: str) -> str:
    """'file:///dir' or '/dir' -> '/dir'; raise ValueError for other schemes or relative paths."""
    if "://" in url:
        parts = urlsplit(url)
        if parts.scheme != "file":
            raise ValueError(f"unsupported URL scheme {parts.scheme!r}: use file:///DIR or a path")
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file URL names host {parts.netloc!r}: use file:///DIR")
        if parts.query or parts.fragment:
            raise ValueError("file URL must not have a query or a fragment")
        path = unquote(parts.path)
    else:
        path = url
    if not path:
        raise ValueError("must not be empty")
    if not os.path.isabs(path):
        raise ValueError(f"{path!r} is not absolute: the VMM resolves no relative paths")
    return path


def _check_url(value: str) -> str:
    """Field check for snapshot URLs: must resolve to an absolute local path."""
    url_to_path(value)
    return value


def _check_optional_path(value: str | None) -> str | None:
    """Host paths sent to the VMM must be absolute: its working directory is not the client's."""
    if value is not None and not os.path.isabs(value):
        raise ValueError(f"{value!r} is not absolute: the VMM resolves no relative paths")
    return value


class _Model(BaseModel):
    """Common settings: unknown fields are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class VmCreateRequest(_Model):
    """What `vm.create` builds and boots."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [
            {"memory": "256M", "cpus": 2, "workload": "dirty", "working_set": "64M",
             "dirty_rate": 10000, "order": "random"},
        ]},
    )

    memory: str = Field("256M", description="Guest RAM: bytes, or a number with a K, M, G or T "
                        "suffix; a multiple of 2 MiB.", examples=["256M", "1G"])
    cpus: int = Field(1, ge=1, le=layout.MAX_CPUS, description="Number of vCPUs.", examples=[2])
    workload: Literal["idle", "dirty"] = Field(
        "idle", description="What the guest does after stamping its working set: `idle` halts "
        "between heartbeats, `dirty` keeps rewriting working-set pages.")
    working_set: str | None = Field(
        None, description="Size of the working set the guest stamps and checks; default: "
        "64 MiB or as much as fits.", examples=["64M"])
    dirty_rate: int = Field(DEFAULT_DIRTY_RATE, ge=0, description="Pages per second the `dirty` "
                            "workload rewrites over all vCPUs; 0 means as fast as it can.")
    order: Literal["sequential", "random"] = Field(
        "random", description="Order in which the `dirty` workload walks its pages.")
    memory_file: str | None = Field(
        None, description="Absolute path of a file to back guest RAM (shared mapping); default: "
        "an anonymous memfd.", examples=["/dev/shm/vm0.ram"])
    serial_log: str | None = Field(
        None, description="Absolute path of a file the guest's serial output is appended to.",
        examples=["/tmp/vm0.serial"])

    _paths = field_validator("memory_file", "serial_log")(_check_optional_path)

    def to_config(self) -> VmConfig:
        """Parse sizes and validate everything; raise ConfigError naming the bad field."""
        return VmConfig.build(memory=self.memory, cpus=self.cpus, workload=self.workload,
                              working_set=self.working_set, dirty_rate=self.dirty_rate,
                              order=self.order, memory_file=self.memory_file,
                              serial_log=self.serial_log)


class VcpuInfo(BaseModel):
    """One vCPU thread as `vm.info` reports it."""

    model_config = ConfigDict(extra="allow")

    id: int = Field(description="vCPU index.")
    state: str = Field(description="`running`, `paused` or `stopped`.")
    exits: int = Field(0, description="KVM_RUN exits handled so far.")


class VmInfo(BaseModel):
    """The VM's state, configuration and the guest's counters.

    With no VM only `state` is set, to `empty`. Fields the VMM adds later are
    passed through, so older clients keep working.
    """

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={"examples": [
            {"state": "running", "memory_bytes": 268435456, "cpus": 2, "workload": "dirty",
             "order": "random", "working_set_bytes": 67108864, "working_set_gpa": 2097152,
             "dirty_rate": 10000, "memory_file": None, "serial_log": None, "error": None,
             "heartbeat": 25842, "pages_written": 26927,
             "vcpus": [{"id": 0, "state": "running", "exits": 191},
                       {"id": 1, "state": "running", "exits": 1}]},
            {"state": "empty"},
        ]},
    )

    state: str = Field(description="`empty` (no VM), `running`, `paused`, `shutdown` or "
                       "`failed`.", examples=["running"])
    memory_bytes: int | None = Field(None, description="Guest RAM in bytes.")
    cpus: int | None = Field(None, description="Number of vCPUs.")
    workload: str | None = Field(None, description="`idle` or `dirty`.")
    order: str | None = Field(None, description="`sequential` or `random`.")
    working_set_bytes: int | None = Field(None, description="Size of the stamped working set.")
    working_set_gpa: int | None = Field(None, description="Guest-physical start of the working "
                                        "set.")
    dirty_rate: int | None = Field(None, description="Pages per second the `dirty` workload "
                                   "rewrites.")
    memory_file: str | None = Field(None, description="File backing guest RAM, if any.")
    serial_log: str | None = Field(None, description="File the serial output goes to, if any.")
    error: str | None = Field(None, description="Why the VM failed (state `failed`).")
    heartbeat: int | None = Field(None, description="Guest heartbeats summed over vCPUs; grows "
                                  "while the guest runs.")
    pages_written: int | None = Field(None, description="Working-set pages written by the guest, "
                                      "summed over vCPUs.")
    vcpus: list[VcpuInfo] | None = Field(None, description="Per-vCPU thread state.")


class CheckGuestRequest(_Model):
    """How long `vm.check-guest` waits for the guest to verify its pages."""

    timeout: float = Field(60.0, gt=0, le=3600, description="Seconds to wait for the guest.")


class CheckResult(BaseModel):
    """The guest's verdict on its own working set."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"ok": True, "pages_checked": 16384, "bad_pages": 0, "first_bad_page": None},
    ]})

    ok: bool = Field(description="Every working-set page was checked and holds what the guest "
                     "last wrote.")
    pages_checked: int = Field(description="Pages the guest verified.")
    bad_pages: int = Field(description="Pages whose content is not what the guest wrote.")
    first_bad_page: int | None = Field(description="Working-set index of the first bad page.")


class SnapshotRequest(_Model):
    """Where `vm.snapshot` writes `state.json` and `memory.bin` (the VM must be paused)."""

    destination_url: str = Field(description="`file:///DIR` or an absolute path; the directory "
                                 "is created if needed.", examples=["file:///var/tmp/snap0"])

    _url = field_validator("destination_url")(_check_url)

    @property
    def directory(self) -> str:
        return url_to_path(self.destination_url)


class RestoreRequest(_Model):
    """Which snapshot `vm.restore` starts a VM from."""

    source_url: str = Field(description="`file:///DIR` or an absolute path of a snapshot "
                            "directory.", examples=["file:///var/tmp/snap0"])
    resume: bool = Field(True, description="Run the VM once restored; false leaves it paused.")
    memory_file: str | None = Field(None, description="Absolute path of a file to back the "
                                    "restored RAM; default: an anonymous memfd.")
    serial_log: str | None = Field(None, description="Absolute path of a file for the serial "
                                   "output.")

    _url = field_validator("source_url")(_check_url)
    _paths = field_validator("memory_file", "serial_log")(_check_optional_path)

    @property
    def directory(self) -> str:
        return url_to_path(self.source_url)


class ErrorBody(BaseModel):
    """Every error response: one line that names the cause."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"error": "cannot pause: VM is paused, it must be running"},
    ]})

    error: str = Field(description="What went wrong, in one line.")


class PingResponse(BaseModel):
    """Who answers on the socket."""

    version: str = Field(description="vmig version of the VMM.", examples=["0.1.0"])
    pid: int = Field(description="Process id of the VMM.", examples=[4242])


def vm_info(data: dict[str, Any]) -> VmInfo:
    """Wrap a `Machine.info()`-style dict; unknown keys pass through."""
    return VmInfo.model_validate(data)
