"""Request and response bodies of the VMM API (pydantic); they also make the OpenAPI document.

Only shape and simple ranges are checked here; sizes and cross-field rules are
checked by `VmConfig.build`, so the API and the CLI reject the same things with
the same words.
"""

from __future__ import annotations

import os
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from vmig.config import (
    BOOT_CMDLINE_HELP,
    BOOT_IMAGE_HELP,
    DEFAULT_DIRTY_RATE,
    OWN_GUEST_FIELDS,
    VmConfig,
)
from vmig.guest import layout
from vmig.migration.figures import INFO_FIGURES, SUMMARY_FIGURES, Figure, Group
from vmig.migration.params import (
    CHANGEABLE_PARAMETERS,
    RECEIVE_PARAMETERS,
    SEND_PARAMETERS,
    Param,
    ReceiveParams,
    SendParams,
)
from vmig.transport.address import parse_url
from vmig.units import parse_size


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


def _check_migration_url(value: str) -> str:
    """Field check for migration URLs: 'tcp:HOST:PORT' or 'unix:PATH'."""
    parse_url(value)  # ConfigError is a ValueError: pydantic reports it under the field
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
    boot_image: str | None = Field(None, description="Absolute path. " + BOOT_IMAGE_HELP,
                                   examples=["/srv/images/boot.img"])
    boot_cmdline: str | None = Field(None, description=BOOT_CMDLINE_HELP,
                                     examples=["console=ttyS0"])

    _paths = field_validator("memory_file", "serial_log", "boot_image")(_check_optional_path)

    def to_config(self) -> VmConfig:
        """Parse sizes and validate everything; raise ConfigError naming the bad field.

        Fields left out stay "not given", so a boot image refuses an explicit workload.
        """
        own = {name: getattr(self, name) for name in OWN_GUEST_FIELDS
               if name in self.model_fields_set}
        return VmConfig.build(memory=self.memory, cpus=self.cpus, memory_file=self.memory_file,
                              serial_log=self.serial_log, boot_image=self.boot_image,
                              boot_cmdline=self.boot_cmdline, **own)


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
            {"state": "receiving", "receiver_url": "tcp:0.0.0.0:6000"},
            {"state": "empty",
             "last_error": "the source closed the connection before COMPLETE"},
        ]},
    )

    state: str = Field(description="`empty` (no VM), `receiving` (no VM yet: an incoming "
                       "migration is awaited or under way), `running`, `paused`, `shutdown`, "
                       "`failed` or `migrated` (handed over to a migration destination; "
                       "resources released).", examples=["running"])
    memory_bytes: int | None = Field(None, description="Guest RAM in bytes.")
    cpus: int | None = Field(None, description="Number of vCPUs.")
    guest: str | None = Field(None, description="`vmig` (vmig's own guest) or `image` (booted "
                              "from `boot_image`; the own-guest fields are then null).")
    workload: str | None = Field(None, description="`idle` or `dirty`.")
    order: str | None = Field(None, description="`sequential` or `random`.")
    working_set_bytes: int | None = Field(None, description="Size of the stamped working set.")
    working_set_gpa: int | None = Field(None, description="Guest-physical start of the working "
                                        "set.")
    dirty_rate: int | None = Field(None, description="Pages per second the `dirty` workload "
                                   "rewrites.")
    memory_file: str | None = Field(None, description="File backing guest RAM, if any.")
    serial_log: str | None = Field(None, description="File the serial output goes to, if any.")
    error: str | None = Field(None, description="Why the VM failed (state `failed`), e.g. a "
                              "triple fault.")
    halted: str | None = Field(None, description="Set when the guest halted for good (HLT with "
                               "interrupts disabled; nothing can wake it): where and why.")
    boot_image: str | None = Field(None, description="Image guest: the file it was booted from "
                                   "(read once, at boot).")
    boot_format: str | None = Field(None, description="Image guest: `raw` or `multiboot`.")
    boot_sha256: str | None = Field(None, description="Image guest: sha256 of the image file.")
    boot_cmdline: str | None = Field(None, description="Image guest: its command line.")
    unknown_ports: dict[str, dict[str, int]] | None = Field(
        None, description="Accesses to I/O ports without a device (they read all ones and drop "
        "writes), by port: reads and writes.", examples=[{"0x80": {"reads": 0, "writes": 3}}])
    heartbeat: int | None = Field(None, description="Guest heartbeats summed over vCPUs; grows "
                                  "while the guest runs.")
    pages_written: int | None = Field(None, description="Working-set pages written by the guest, "
                                      "summed over vCPUs.")
    vcpus: list[VcpuInfo] | None = Field(None, description="Per-vCPU thread state.")
    throttle_percent: int | None = Field(None, description="Share of the time the vCPUs are "
                                         "kept from running (a migration's auto-converge).")
    busy: str | None = Field(None, description="A long operation that holds the VM (e.g. "
                             "`migrating`); pause, resume, snapshot and shutdown are refused "
                             "meanwhile.")
    receiver_url: str | None = Field(None, description="State `receiving`: where the VMM "
                                     "listens for the incoming migration.")
    last_error: str | None = Field(None, description="State `empty` or `receiving`: why the "
                                   "last incoming migration ended without a VM.")


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


_KINDS: dict[str, Any] = {"int": int, "float": float, "bool": bool, "str": str, "path": str,
                          "size": str}


def _param_field(param: Param, change: bool = False) -> tuple[Any, Any]:
    """A pydantic field for one migration parameter (vmig.migration.params is the source);
    `change`: for vm.migration-set-parameters (optional: absent is unchanged; a size may
    be a byte count too)."""
    kind: Any = Literal[param.choices] if param.kind == "choice" else _KINDS[param.kind]
    if change and param.kind == "size":
        kind = str | int
    if param.default is None or change:
        kind = kind | None
    limits: dict[str, Any] = {}
    if param.minimum is not None:
        limits["gt" if param.minimum_open else "ge"] = param.minimum
    if param.maximum is not None:
        limits["le"] = param.maximum
    return kind, Field(None if change else param.default, description=param.help, **limits)


def _check_size(value: str | None) -> str | None:
    if value is not None:
        parse_size(value)  # ConfigError is a ValueError: pydantic reports it under the field
    return value


def _validators(table: tuple[Param, ...]) -> dict[str, Any]:
    """Field checks by kind: paths absolute, sizes parseable."""
    paths = [p.name for p in table if p.kind == "path"]
    sizes = [p.name for p in table if p.kind == "size"]
    checks: dict[str, Any] = {}
    if paths:
        checks["_paths"] = field_validator(*paths)(_check_optional_path)
    if sizes:
        checks["_sizes"] = field_validator(*sizes)(_check_size)
    return checks


class _ReceiveBase(_Model):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"receiver_url": "tcp:0.0.0.0:6000"},
        {"receiver_url": "tcp:0.0.0.0:6000", "tls_dir": "/etc/vmig/tls"},
        {"receiver_url": "unix:/run/vmig/mig.sock"},
    ]})

    receiver_url: str = Field(description="`tcp:HOST:PORT` (port 0: any free port; the reply "
                              "names the one chosen; IPv6 hosts in brackets) or `unix:PATH` "
                              "(created with mode 0600; a sender's connections, several or "
                              "one, are each a new connection to it).",
                              examples=["tcp:0.0.0.0:6000"])

    _url = field_validator("receiver_url")(_check_migration_url)

    def to_params(self) -> ReceiveParams:
        """The engine's parameters; `ReceiveParams.resolve()` checks the rest."""
        return ReceiveParams(**self.model_dump())


ReceiveMigrationRequest = create_model(
    "ReceiveMigrationRequest", __base__=_ReceiveBase,
    __doc__="Where and how `vm.receive-migration` listens for one incoming migration. Over "
            "`tcp:` every connection is authenticated: with mutual TLS (`tls_dir`), or with a "
            "token the sender must prove it knows (given, or made and returned).",
    __validators__=_validators(RECEIVE_PARAMETERS),
    **{p.name: _param_field(p) for p in RECEIVE_PARAMETERS})


class ReceiveMigrationResponse(BaseModel):
    """Where the VMM now listens, and what a sender needs to reach it."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"receiver_url": "tcp:192.0.2.8:6000", "token": "3f0c9d6e2a7b41c58e1f09ad6b2c7e45",
         "security": "token", "listening_on": ["192.0.2.8", "10.0.0.5"], "warnings": []},
    ]})

    receiver_url: str = Field(description="The URL a sender dials: a `tcp:` URL has its real "
                              "port, and a wildcard address is replaced by one of this "
                              "host's.", examples=["tcp:192.0.2.8:6000"])
    token: str | None = Field(None, description="The token made for this migration because "
                              "none was given; pass it to `send-migration`. Shown once.")
    security: str = Field("", description="What authenticates the connections: `token`, "
                          "`mutual TLS 1.3`, both, or `UNIX socket permissions`.")
    listening_on: list[str] = Field(default_factory=list, description="The addresses this "
                                    "host listens on, for a wildcard `tcp:` URL.")
    warnings: list[str] = Field(default_factory=list, description="Things to fix (e.g. a "
                                "private key others may read).")


class _SendBase(_Model):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"destination_url": "tcp:192.0.2.7:6000", "connections": 4, "verify_memory": True,
         "token": "3f0c9d6e2a7b41c58e1f09ad6b2c7e45"},
        {"destination_url": "tcp:dst.example:6000", "connections": 8,
         "tls_dir": "/etc/vmig/tls"},
        {"destination_url": "unix:/run/vmig/mig.sock", "local": True},
        {"destination_url": "unix:/run/vmig/proxy.sock", "connections": 4},
    ]})

    destination_url: str = Field(description="The receiver's URL: `tcp:HOST:PORT` or "
                                 "`unix:PATH` (each connection dialled anew to PATH, so a "
                                 "proxy may carry each one over TCP, as KubeVirt's does).",
                                 examples=["tcp:192.0.2.7:6000"])

    _url = field_validator("destination_url")(_check_migration_url)

    def to_params(self) -> SendParams:
        """The engine's parameters; `SendParams.validate()` checks the cross-field rules."""
        return SendParams(**self.model_dump())


SendMigrationRequest = create_model(
    "SendMigrationRequest", __base__=_SendBase,
    __doc__="How `vm.send-migration` migrates the VM (Cloud Hypervisor's "
            "VmSendMigrationData).",
    __validators__=_validators(SEND_PARAMETERS),
    **{p.name: _param_field(p) for p in SEND_PARAMETERS})


class _ChangesBase(BaseModel):
    # Other fields are let through to `check_changes`: a send parameter that cannot
    # change mid-flight is a 409 that says so, an unknown field a 400.
    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [
        {"downtime_ms": 500}, {"max_bandwidth": "50M"},
        {"auto_converge": True, "auto_converge_initial": 30, "auto_converge_step": 20},
    ]})

    def to_changes(self) -> dict[str, Any]:
        """The fields given (null included: max_bandwidth null lifts the cap)."""
        return {**self.model_dump(exclude_unset=True), **(self.model_extra or {})}


MigrationSetParametersRequest = create_model(
    "MigrationSetParametersRequest", __base__=_ChangesBase,
    __doc__="`vm.migration-set-parameters`: new values for the running send (any of these "
            "fields; the others keep theirs). They apply from the next chunk or iteration. "
            "Any other send parameter cannot change mid-flight (409).",
    __validators__=_validators(CHANGEABLE_PARAMETERS),
    **{p.name: _param_field(p, change=True) for p in CHANGEABLE_PARAMETERS})


class RecoverMigrationRequest(BaseModel):
    """`vm.recover-migration`: re-dial a post-copy migration in postcopy-paused now."""

    model_config = ConfigDict(extra="forbid")
    destination_url: str | None = Field(None, description="Another address of the same "
                                        "destination to re-dial (default: the one it used).")


def _figure_field(figure: Figure) -> tuple[Any, Any]:
    """A pydantic field for one figure of vmig.migration.figures (the one source)."""
    kind: Any = {dict: dict[str, Any]}.get(figure.kind, figure.kind)
    if isinstance(figure.kind, Group):
        kind = _figures_model(figure.kind)
    if figure.many:
        kind = list[kind]
    if figure.nullable:
        kind = kind | None
    description = figure.help
    if figure.libvirt:
        description += " libvirt: " + ", ".join(f"`VIR_DOMAIN_JOB_{name}`"
                                                for name in figure.libvirt) + "."
    extra: dict[str, Any] = {"examples": list(figure.examples)} if figure.examples else {}
    if figure.many:
        return kind, Field(default_factory=list, description=description, **extra)
    return kind, Field(figure.default, description=description, **extra)


def _figure_fields(figures: tuple[Figure, ...]) -> dict[str, Any]:
    return {figure.name: _figure_field(figure) for figure in figures}


_GROUP_MODELS: dict[str, type[BaseModel]] = {}


def _figures_model(group: Group) -> type[BaseModel]:
    """The model of a nested object of figures (made once per group)."""
    if group.name not in _GROUP_MODELS:
        _GROUP_MODELS[group.name] = create_model(group.name, __doc__=group.doc,
                                                 **_figure_fields(group.figures))
    return _GROUP_MODELS[group.name]


class _SummaryBase(BaseModel):
    # Fields the VMM adds later are passed through, so older clients keep working.
    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [
        {"role": "send", "status": "completed", "phase": "completed",
         "migration_id": "5d0b8a2f9c4e4f6e8a1b3c7d2e9f0a11", "peer": "tcp:192.0.2.8:7000",
         "local": False, "progress_percent": 100.0, "elapsed_ms": 412.5,
         "expected_remaining_ms": 0.0, "setup_ms": 21.7, "downtime_ms": 12.2,
         "expected_downtime_ms": 9.8, "paused": False, "memory_bytes": 268435456,
         "data_bytes": 67108864, "data_total_bytes": 140509184,
         "data_processed_bytes": 140509184, "data_remaining_bytes": 0,
         "bytes_transferred": 140509184, "bytes_remaining": 0,
         "precopy_bytes": 138412032, "switchover_bytes": 2097152, "normal_pages": 34304,
         "zero_pages": 0, "wire_bytes": 140509184, "compressed_bytes": 0,
         "compressed_pages": 0, "pages_per_s": 83161, "iterations": 3,
         "throughput_bytes_per_s": 340628310, "bandwidth_bytes_per_s": 1350000000,
         "dirty_rate_bytes_per_s": 81920000, "dirty_rate_pages_per_s": 20000.0,
         "connections": 4, "connections_lost": 0,
         "per_connection": [{"index": 0, "role": "main", "bytes": 35127296, "chunks": 3,
                             "lost": None}],
         "memory_verified": True, "heartbeat_at_pause": 25842, "receiver_state": None,
         "warnings": [], "error": None},
    ]})


MigrationSummary = create_model(
    "MigrationSummary", __base__=_SummaryBase,
    __doc__="A migration's figures: `vm.migration-info`, and a finished send's summary.\n\n"
            "Both are views of the one metrics object of the migration; the fields come "
            "from vmig.migration.figures, which also maps them to libvirt's "
            "virDomainGetJobStats (docs/migration-info.md). Rates: throughput is bytes "
            "transferred over the whole elapsed time; bandwidth is the send rate the "
            "pre-copy policy measures per iteration. Figures a side cannot know are null.",
    **_figure_fields(SUMMARY_FIGURES))

MigrationInfo = create_model(
    "MigrationInfo", __base__=MigrationSummary,
    __doc__="Progress of the running migration, or the final figures of the last one.",
    **_figure_fields(INFO_FIGURES))


class MigrationStarted(MigrationInfo):
    """vm.send-migration's answer (202): the migration has started; follow it with
    vm.migration-info (until `active` is false; `outcome` then says how it ended),
    vm.events or /metrics."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [
        {"id": "5d0b8a2f9c4e4f6e8a1b3c7d2e9f0a11", "role": "send", "status": "setup",
         "phase": "connecting", "migration_id": "5d0b8a2f9c4e4f6e8a1b3c7d2e9f0a11",
         "peer": "tcp:192.0.2.8:7000", "local": False, "elapsed_ms": 0.4, "paused": False,
         "memory_bytes": 268435456, "bytes_transferred": 0, "iterations": 0,
         "connections": 0, "warnings": [], "error": None, "outcome": None, "active": True},
    ]})

    id: str = Field(description="The migration's id (hex; `migration_id`, the same on both "
                    "sides): the migration vm.migration-info, the events and /metrics "
                    "report on.")


class ErrorBody(BaseModel):
    """Every error response: one line that names the cause."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"error": "cannot pause: VM is paused, it must be running"},
    ]})

    error: str = Field(description="What went wrong, in one line.")


class ResourcesResponse(BaseModel):
    """What the VMM process holds: after a migration ends, nothing of it should be left."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"pid": 4242, "fds": {"total": 21, "tcp": 0, "unix": 3, "other": 18},
         "threads": {"total": 5, "vcpu": 2, "migrate": 0, "other": 3}, "tcp_listeners": 0},
    ]})

    pid: int = Field(description="Process id of the VMM.")
    fds: dict[str, int] = Field(description="Open file descriptors: `total`, and by kind: "
                                "`tcp` sockets (migration), `unix` sockets (the API), "
                                "`other` (guest memory, KVM, files).")
    threads: dict[str, int] = Field(description="Threads: `total`, `vcpu`, `migrate` (a "
                                    "migration's), `other`.")
    tcp_listeners: int = Field(description="Listening TCP sockets (a migration receiver's).")


class PingResponse(BaseModel):
    """Who answers on the socket."""

    version: str = Field(description="vmig version of the VMM.", examples=["0.1.0"])
    pid: int = Field(description="Process id of the VMM.", examples=[4242])
