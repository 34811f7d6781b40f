"""What a user asks of a migration: one table of parameters, and the checked result.

`SEND_PARAMETERS` and `RECEIVE_PARAMETERS` are the one source of every option's
name, default, limits and help: the API's request models, the CLI's options and
their help, and the checks below are all made from them, so the three cannot
disagree. `SendParams` / `ReceiveParams` are the checked values (CH's
VmSendMigrationData / VmReceiveMigrationData); `.resolve()` turns them into what
the engine needs (a parsed address, the connection security, sizes in bytes).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from dataclasses import dataclass, field
from typing import Any

from vmig.cpu_compat import TSC_TOLERANCE_PPM
from vmig.errors import ConfigError, StateError
from vmig.migration.policy import (
    THROTTLE_INITIAL_PERCENT,
    THROTTLE_MAX_PERCENT,
    THROTTLE_STEP_PERCENT,
    StallStrategy,
    TimeoutStrategy,
)
from vmig.proto import MAX_CONNECTIONS
from vmig.transport.address import Address, parse_url
from vmig.transport.liveness import DEAD_PEER_TIMEOUT_S
from vmig.transport.security import (
    Security,
    TlsSide,
    generate_token,
    load_tls,
    read_token_file,
    token_bytes,
)
from vmig.units import PAGE_SIZE, MiB, format_size, parse_size

log = logging.getLogger(__name__)

DEFAULT_DOWNTIME_MS = 300
DEFAULT_TIMEOUT_S = 3600
MAX_DOWNTIME_MS = 600_000  # a budget of 10 minutes is no longer "live"; refuse obvious typos
MAX_TIMEOUT_S = 86_400.0  # one day of pre-copy
# Chunk = the unit of work on the shared queue and of acknowledgement. Each chunk
# costs a request, a range table and an acknowledgement (a few hundred microseconds
# of Python on both sides), so big chunks keep that overhead small: 16 MiB moved
# 1 GiB about 20% faster than 4 MiB over 2-4 connections here. Small iterations are
# cut finer (see MIN_CHUNK_BYTES) so that they still spread over every connection.
DEFAULT_CHUNK_BYTES = 16 * MiB
MIN_CHUNK_BYTES = 1 * MiB
MAX_ITERATIONS = 1000  # a safety net far beyond what a converging migration needs
#: Pre-copy iterations before post-copy takes over (each sends what the last one left).
DEFAULT_POSTCOPY_AFTER = 5
# zstd level 1: the fastest; higher levels shrink memory pages little more for much more CPU.
DEFAULT_ZSTD_LEVEL = 1
#: How long a lost connection is re-dialled (docs/protocol.md, "Resume"): long enough for a
#: switch or a link to come back, short enough that a source paused at the switch-over
#: does not wait for long on a destination that is really gone.
DEFAULT_RECONNECT_TIMEOUT_S = 30
MAX_RECONNECT_TIMEOUT_S = 3600
#: A peer silent this long is lost: TCP keepalive and TCP_USER_TIMEOUT on every connection,
#: and MAIN's heartbeat. Longer than the stalls a busy link or host shows (6-7 s were seen).
DEFAULT_DEAD_PEER_TIMEOUT_S = DEAD_PEER_TIMEOUT_S
MAX_DEAD_PEER_TIMEOUT_S = 600
#: Stall detection (KubeVirt VEP 248): KubeVirt's progress timeout, 150 s. A fleet wants a
#: stalled pre-copy caught long before the hour of timeout_s, yet a slow link's passes still
#: show their progress well within it.
DEFAULT_STALL_TIMEOUT_S = 150.0
#: Progress is the bytes left falling 10% below the best so far: more than the jitter of a
#: pre-copy that keeps re-sending the same working set, less than what a pass of a
#: converging one gains.
DEFAULT_STALL_MARGIN = 0.1


@dataclass(frozen=True)
class Param:
    """One migration parameter: its API field, CLI flag, default, limits and help."""

    name: str
    kind: str  # "int", "float", "bool", "str", "path", "size" or "choice"
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    #: The minimum itself is not allowed (e.g. timeout_s > 0).
    minimum_open: bool = False
    choices: tuple[str, ...] = ()
    metavar: str = ""
    #: Kept out of logs and echoes (a secret).
    secret: bool = False
    #: May change while the migration runs (vm.migration-set-parameters).
    changeable: bool = False

    @property
    def flag(self) -> str:
        """The CLI option: ``--downtime-ms`` for ``downtime_ms``."""
        return "--" + self.name.replace("_", "-")

    def range_text(self) -> str:
        """'between 1 and 128', '>= 0', '> 0' or ''."""
        low, high = self.minimum, self.maximum
        if low is not None and high is not None and not self.minimum_open:
            return f"between {_num(low)} and {_num(high)}"
        parts = []
        if low is not None:
            parts.append(f"{'>' if self.minimum_open else '>='} {_num(low)}")
        if high is not None:
            parts.append(f"<= {_num(high)}")
        return " and ".join(parts)

    def check(self, value: Any) -> None:
        """ConfigError naming the field when `value` is outside the limits."""
        if value is None or self.kind not in ("int", "float"):
            return
        low, high = self.minimum, self.maximum
        too_low = low is not None and (value <= low if self.minimum_open else value < low)
        if too_low or (high is not None and value > high):
            raise ConfigError(f"{self.name}: must be {self.range_text()}, got {value}")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


_TLS_HELP = ("Directory with ca-cert.pem, {side}-cert.pem and {side}-key.pem: mutual TLS 1.3 "
             "on every connection, each side checking the other's certificate against its "
             "own ca-cert.pem.")

#: Parameters of `vm.send-migration` (besides `destination_url`), in CLI order.
SEND_PARAMETERS: tuple[Param, ...] = (
    Param("connections", "int", 1, "Connections to copy memory over, the main one "
          "included: each one dialled anew to the destination (tcp: or unix:); 1 with "
          "local.", 1, MAX_CONNECTIONS,
          metavar="N"),
    Param("local", "bool", False, "Same host: hand guest memory over as a file descriptor "
          "instead of copying it; needs a unix: destination."),
    Param("downtime_ms", "int", DEFAULT_DOWNTIME_MS, "Pause budget: pre-copy goes on until "
          "the pages left are expected to move within this many milliseconds.", 0,
          MAX_DOWNTIME_MS, metavar="MS", changeable=True),
    Param("timeout_s", "float", DEFAULT_TIMEOUT_S, "Longest pre-copy, in seconds, before "
          "timeout_strategy applies.", 0, MAX_TIMEOUT_S, minimum_open=True, metavar="S",
          changeable=True),
    Param("timeout_strategy", "choice", TimeoutStrategy.CANCEL.value, "At the timeout: cancel "
          "gives up (the VM keeps running here), ignore switches over anyway, accepting a "
          "longer pause.", choices=tuple(s.value for s in TimeoutStrategy)),
    Param("verify_memory", "bool", False, "Compare a BLAKE3 digest of all guest memory on "
          "both sides before the destination resumes the VM (done anyway when a data "
          "connection was lost)."),
    Param("max_bandwidth", "size", None, "Cap on the bytes per second all connections send "
          "together, e.g. 50M (K, M, G suffixes; 0 or absent: no cap). It holds for the "
          "post-copy push too.", metavar="RATE", changeable=True),
    Param("auto_converge", "bool", False, "When the guest dirties memory faster than it can "
          "be sent for two iterations in a row, throttle its vCPUs: auto_converge_initial "
          "percent, then auto_converge_step more each time, up to auto_converge_max. The "
          "destination runs it unthrottled; turned off mid-flight, the throttle is lifted.",
          changeable=True),
    Param("auto_converge_initial", "int", THROTTLE_INITIAL_PERCENT, "With auto_converge: the "
          "first throttle step, in percent of the vCPUs' time.", 1, THROTTLE_MAX_PERCENT,
          metavar="PERCENT", changeable=True),
    Param("auto_converge_step", "int", THROTTLE_STEP_PERCENT, "With auto_converge: how many "
          "percent each later step adds.", 1, THROTTLE_MAX_PERCENT, metavar="PERCENT",
          changeable=True),
    Param("auto_converge_max", "int", THROTTLE_MAX_PERCENT, "With auto_converge: the most "
          "the throttle reaches, in percent (lowered below the throttle mid-flight, the "
          "throttle comes down to it).", 1, THROTTLE_MAX_PERCENT, metavar="PERCENT",
          changeable=True),
    Param("postcopy", "bool", False, "Allow post-copy: when pre-copy has not converged after "
          "postcopy_after_iterations (or at the timeout, with timeout_strategy postcopy), the "
          "destination runs the guest at once and takes its last pages on demand and in the "
          "background, over all connections."),
    Param("postcopy_after_iterations", "int", DEFAULT_POSTCOPY_AFTER, "With postcopy: "
          "pre-copy iterations before switching to post-copy.", 1, MAX_ITERATIONS,
          metavar="N"),
    Param("stall_timeout_s", "float", DEFAULT_STALL_TIMEOUT_S, "Stall detection: when "
          "the bytes left after a pre-copy pass have not fallen stall_margin below the "
          "best so far for this many seconds, stall_strategy applies (checked after each "
          "pass; a step of auto_converge's throttle counts as progress; 0: off). 150 s, "
          "KubeVirt's progress timeout: a stalled pre-copy is caught long before timeout_s, "
          "and a slow one still shows progress within it.", 0,
          MAX_TIMEOUT_S, metavar="S"),
    Param("stall_margin", "float", DEFAULT_STALL_MARGIN, "Stall detection: the share by "
          "which the bytes left must fall below the best so far to count as progress "
          "(0.1: by 10%, more than the jitter of a pre-copy re-sending the same pages).",
          0, 1, metavar="FRACTION"),
    Param("stall_strategy", "choice", StallStrategy.CANCEL.value, "What a stall does: "
          "cancel (the VM keeps running here, and the link and CPU are free for a retry; "
          "a safe default that needs no other choice), force-complete (pause and switch "
          "over now, however long the pause), postcopy (needs postcopy, refused "
          "otherwise), none (only report it: a `stalled` event and `stall` in "
          "migration-info).", choices=tuple(s.value for s in StallStrategy)),
    Param("reconnect_timeout_s", "int", DEFAULT_RECONNECT_TIMEOUT_S, "A connection lost "
          "before the end (MAIN, MEMORY or FAULT, in any phase) is re-dialled with backoff "
          "for up to this many seconds, and the migration goes on where it was; 0: a lost "
          "MAIN fails the migration (post-copy then waits in postcopy-paused for "
          "recover-migration).", 0, MAX_RECONNECT_TIMEOUT_S, metavar="S"),
    Param("dead_peer_timeout_s", "int", DEFAULT_DEAD_PEER_TIMEOUT_S, "A peer silent this "
          "many seconds is lost (TCP keepalive and TCP_USER_TIMEOUT on every connection, a "
          "heartbeat on MAIN); a shorter stall is ridden out.", 1, MAX_DEAD_PEER_TIMEOUT_S,
          metavar="S"),
    Param("compress", "str", None, "Compress each chunk with zstd on the sender's connection "
          "threads, for slow links: zstd, or zstd:LEVEL (1-19, default 1). A chunk that does "
          "not shrink goes as it is.", metavar="zstd[:LEVEL]"),
    Param("tls_dir", "path", None, _TLS_HELP.format(side="client") + " The destination's "
          "certificate must name the host of the URL.", metavar="DIR"),
    Param("token", "str", None, "The destination's token (tcp: without TLS): both sides "
          "prove they know it; it is never sent.", metavar="TOKEN", secret=True),
    Param("token_file", "path", None, "Absolute path of a file whose first line is the "
          "token (instead of token).", metavar="PATH"),
)

#: Parameters of `vm.receive-migration` (besides `receiver_url`), in CLI order.
RECEIVE_PARAMETERS: tuple[Param, ...] = (
    Param("max_connections", "int", MAX_CONNECTIONS, "Most connections one migration may "
          "open here, the main one included; a sender asking for more is refused.", 1,
          MAX_CONNECTIONS, metavar="N"),
    Param("prealloc", "size", None, "Guest RAM to create and fault in before listening, "
          "e.g. 1G: a VM of exactly that size is then received without page faults (like a "
          "QEMU destination with preallocated memory); a VM of another size ignores it.",
          metavar="SIZE"),
    Param("allow_tsc_change", "bool", False, "Accept a guest whose TSC ran at another "
          f"frequency at the source (more than {TSC_TOLERANCE_PPM} ppm apart): KVM here "
          "cannot scale it, so "
          "the guest's clocks would run fast or slow. Refused at CONFIG otherwise."),
    Param("tls_dir", "path", None, _TLS_HELP.format(side="server"), metavar="DIR"),
    Param("token", "str", None, "The secret a sender must prove it knows (tcp: without "
          "TLS). Default over tcp: without tls_dir: a random 128-bit token, returned in the "
          "answer.", metavar="TOKEN", secret=True),
    Param("token_file", "path", None, "Absolute path of a file whose first line is the "
          "token (instead of token).", metavar="PATH"),
)


def parameter(table: tuple[Param, ...], name: str) -> Param:
    return next(p for p in table if p.name == name)


#: The send parameters a running migration may change (vm.migration-set-parameters).
CHANGEABLE_PARAMETERS: tuple[Param, ...] = tuple(p for p in SEND_PARAMETERS if p.changeable)


def check_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """The changes asked of a running send, checked; returns them.

    ConfigError (400) names an unknown field or a value out of its limits; StateError
    (409) names a send parameter that cannot change while a migration runs.
    """
    if not changes:
        raise ConfigError("no parameter to change: give at least one of "
                          + ", ".join(p.name for p in CHANGEABLE_PARAMETERS))
    known = {p.name: p for p in SEND_PARAMETERS}
    for name in changes:
        if name not in known:
            raise ConfigError(f"{name}: unknown field")
    for name in changes:
        if not known[name].changeable:
            raise StateError(f"{name} cannot change while a migration runs")
    for name, value in changes.items():
        param = known[name]
        if value is None and param.default is not None:
            raise ConfigError(f"{name}: must have a value")
        param.check(value)
        if param.kind == "size" and value is not None:
            try:
                parse_size(value, name)
            except ConfigError as exc:
                raise ConfigError(f"{name}: {exc}") from None
    return dict(changes)


def changeable_values(params: SendParams) -> dict[str, Any]:
    """What a running send's changeable parameters are now (migration-info's `parameters`)."""
    return {p.name: getattr(params, p.name) for p in CHANGEABLE_PARAMETERS}


def _security(address: Address, tls_dir: str | None, token: str | None,
              token_file: str | None, side: TlsSide) -> tuple[Security, str | None, list[str]]:
    """The connection security the fields ask for, the token text, and warnings."""
    if token is not None and token_file is not None:
        raise ConfigError("token: give token or token_file, not both")
    warnings: list[str] = []
    if token_file is not None:
        token, warnings = read_token_file(token_file)
    key = None if token is None else token_bytes(token)
    if address.kind == "unix":
        if tls_dir is not None:
            raise ConfigError("tls_dir: not used with a unix: URL (the socket file's mode "
                              "protects it)")
        if key is not None:
            raise ConfigError("token: not used with a unix: URL (the socket file's mode "
                              "protects it)")
        return Security(), None, warnings
    tls = None if tls_dir is None else load_tls(tls_dir, side)
    if tls is not None:
        warnings.extend(tls.warnings)
    return Security(tls=tls, token=key), token, warnings


@dataclass(frozen=True)
class SendParams:
    """Parameters of `vm.send-migration`, as given."""

    destination_url: str
    connections: int = 1
    local: bool = False
    downtime_ms: int = DEFAULT_DOWNTIME_MS
    timeout_s: float = DEFAULT_TIMEOUT_S
    timeout_strategy: TimeoutStrategy = TimeoutStrategy.CANCEL
    verify_memory: bool = False
    max_bandwidth: str | None = None
    auto_converge: bool = False
    auto_converge_initial: int = THROTTLE_INITIAL_PERCENT
    auto_converge_step: int = THROTTLE_STEP_PERCENT
    auto_converge_max: int = THROTTLE_MAX_PERCENT
    postcopy: bool = False
    postcopy_after_iterations: int = DEFAULT_POSTCOPY_AFTER
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S
    stall_margin: float = DEFAULT_STALL_MARGIN
    stall_strategy: StallStrategy = StallStrategy.CANCEL
    reconnect_timeout_s: int = DEFAULT_RECONNECT_TIMEOUT_S
    dead_peer_timeout_s: int = DEFAULT_DEAD_PEER_TIMEOUT_S
    compress: str | None = None
    tls_dir: str | None = None
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    @property
    def max_bandwidth_bytes(self) -> int | None:
        """The cap in bytes per second, or None for none (validate() checks the text)."""
        if self.max_bandwidth is None:
            return None
        return parse_size(self.max_bandwidth, "max_bandwidth") or None

    @property
    def compress_level(self) -> int | None:
        """The zstd level asked for, or None without compression (validate() checks it)."""
        if self.compress is None:
            return None
        _, _, level = self.compress.partition(":")
        return int(level) if level else DEFAULT_ZSTD_LEVEL

    def __post_init__(self) -> None:
        self._as_choice("timeout_strategy", TimeoutStrategy)
        self._as_choice("stall_strategy", StallStrategy)

    def _as_choice(self, name: str, kind: type[enum.Enum]) -> None:
        """Field `name` as a member of `kind` (ConfigError naming the field for an unknown
        value)."""
        value = getattr(self, name)
        if isinstance(value, kind):
            return
        try:
            member = kind(value)
        except ValueError:
            choices = " or ".join(repr(c.value) for c in kind)
            raise ConfigError(f"{name}: must be {choices}, got {value!r}") from None
        object.__setattr__(self, name, member)

    def validate(self) -> Address:
        """Check every rule that needs no file; return the parsed destination. ConfigError
        names the field."""
        try:
            address = parse_url(self.destination_url)
        except ConfigError as exc:
            raise ConfigError(f"destination_url: {exc}") from None
        for param in SEND_PARAMETERS:
            param.check(getattr(self, param.name))
        if self.connections > 1 and self.local:
            raise ConfigError("connections: must be 1 when local is true "
                              "(memory is shared, not copied)")
        if self.local and address.kind != "unix":
            raise ConfigError("local: needs a unix: destination_url (memory fds are passed "
                              "over a UNIX socket)")
        if self.max_bandwidth is not None:
            try:
                parse_size(self.max_bandwidth, "max_bandwidth")
            except ConfigError as exc:
                raise ConfigError(f"max_bandwidth: {exc}") from None
        if self.compress is not None:
            name, sep, level = self.compress.partition(":")
            if name != "zstd" or (sep and not (level.isdigit() and 1 <= int(level) <= 19)):
                raise ConfigError(f"compress: expected zstd or zstd:LEVEL with a level from 1 "
                                  f"to 19, got {self.compress!r}")
            if self.local:
                raise ConfigError("compress: not with local (memory is shared, not copied)")
        if self.timeout_strategy is TimeoutStrategy.POSTCOPY and not self.postcopy:
            raise ConfigError("timeout_strategy: postcopy needs postcopy to be allowed")
        if self.stall_strategy is StallStrategy.POSTCOPY and not self.postcopy \
                and self.stall_timeout_s > 0:
            raise ConfigError("stall_strategy: postcopy needs postcopy to be allowed")
        if self.postcopy and self.local:
            raise ConfigError("postcopy: not with local (memory is shared, not copied)")
        if self.chunk_bytes < PAGE_SIZE or self.chunk_bytes % PAGE_SIZE:
            raise ConfigError(f"chunk_bytes: must be a positive multiple of {PAGE_SIZE}, "
                              f"got {self.chunk_bytes}")
        if address.kind == "tcp" and self.tls_dir is None and self.token is None \
                and self.token_file is None:
            raise ConfigError("token: a tcp: destination needs the token its "
                              "receive-migration printed (token or token_file), or tls_dir")
        return address

    def resolve(self) -> ResolvedSend:
        """Validate, read the TLS and token files; ConfigError names the field or file."""
        address = self.validate()
        security, _, warnings = _security(address, self.tls_dir, self.token, self.token_file,
                                          TlsSide.CLIENT)
        return ResolvedSend(self, address, security, tuple(warnings))


@dataclass(frozen=True)
class ResolvedSend:
    """A send's parameters with its address parsed and its credentials loaded."""

    params: SendParams
    address: Address
    security: Security
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReceiveParams:
    """Parameters of `vm.receive-migration`, as given."""

    receiver_url: str
    max_connections: int = MAX_CONNECTIONS
    prealloc: str | None = None
    allow_tsc_change: bool = False
    tls_dir: str | None = None
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None

    def resolve(self) -> ResolvedReceive:
        """Validate, read the TLS and token files, make a token if one is needed."""
        try:
            address = parse_url(self.receiver_url)
        except ConfigError as exc:
            raise ConfigError(f"receiver_url: {exc}") from None
        for param in RECEIVE_PARAMETERS:
            param.check(getattr(self, param.name))
        prealloc = None
        if self.prealloc is not None:
            prealloc = parse_size(self.prealloc, "prealloc size")
            if prealloc <= 0 or prealloc % PAGE_SIZE:
                raise ConfigError(f"prealloc: must be a positive multiple of 4 KiB, got "
                                  f"{self.prealloc}")
        security, token, warnings = _security(address, self.tls_dir, self.token,
                                              self.token_file, TlsSide.SERVER)
        generated = None
        if address.kind == "tcp" and security.tls is None and security.token is None:
            generated = token = generate_token()
            security = dataclasses.replace(security, token=token_bytes(token))
        return ResolvedReceive(self, address, security, prealloc, generated, tuple(warnings))


@dataclass(frozen=True)
class ResolvedReceive:
    """A receive's parameters with its address parsed and its credentials ready."""

    params: ReceiveParams
    address: Address
    security: Security
    prealloc_bytes: int | None
    #: The token made because none was given (returned to the caller once).
    generated_token: str | None = field(default=None, repr=False)
    warnings: tuple[str, ...] = ()

    def describe(self) -> str:
        size = "" if self.prealloc_bytes is None else f", {format_size(self.prealloc_bytes)} " \
            "preallocated"
        return f"{self.address} ({self.security.describe()}{size})"
