"""The one root of vmig's exceptions, and a family per layer.

Every error a user can cause or meet is a `VmigError`; its `str()` is one line
that names the cause, so the CLI and the API can show it as it is.
"""

from __future__ import annotations

import errno as _errno
import os


class VmigError(Exception):
    """Root of every error vmig raises on purpose."""


class ConfigError(VmigError, ValueError):
    """User input that cannot be used (bad size, too many vCPUs, ...)."""


class KvmError(VmigError):
    """A KVM ioctl failed; carries the ioctl's name and the errno."""

    def __init__(self, ioctl_name: str, errno: int, detail: str = "") -> None:
        self.ioctl_name = ioctl_name
        self.errno = errno
        name = _errno.errorcode.get(errno, str(errno))
        msg = f"{ioctl_name} failed: {name} ({os.strerror(errno)})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class KvmUnavailableError(VmigError):
    """/dev/kvm is missing or cannot be used."""


class GuestMemoryError(VmigError):
    """Guest memory cannot be created, or an access falls outside it."""


class GuestError(VmigError):
    """The guest did something the VMM cannot handle (triple fault, bad exit)."""


class StateError(VmigError):
    """A request that the VM's current lifecycle state does not allow."""


class SnapshotError(VmigError):
    """A snapshot cannot be written or read back."""


class ProtocolError(VmigError):
    """The migration wire protocol was broken (see vmig.proto)."""


class TransportError(VmigError):
    """A migration connection failed (connect, send, receive, peer closed)."""


class MigrationError(VmigError):
    """A migration failed or was refused; the message names the cause."""


class MigrationCancelled(MigrationError):
    """A migration was cancelled (by an operator on either side, or by its timeout)."""


class ApiError(VmigError):
    """An API request failed: `status` is the HTTP status, or None when no answer came."""

    def __init__(self, status: int | None, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)


class VmmUnreachableError(ApiError):
    """Nothing answers at the API socket (missing, refused, or timed out)."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)


class ApiSocketError(VmigError):
    """The API socket cannot be served: the path is in use, not a socket, or not bindable."""


def one_line(text: object, empty: str = "") -> str:
    """`text` with its whitespace collapsed, so that it is always exactly one line."""
    return " ".join(str(text).split()) or empty


def describe(exc: BaseException) -> str:
    """One line for a failure: a VmigError's own message, anything else with its type."""
    return str(exc) if isinstance(exc, VmigError) else f"{type(exc).__name__}: {exc}"
