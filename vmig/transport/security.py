"""How a migration's connections are secured: mutual TLS, a shared token, or a UNIX socket.

Over `tcp:` a receiver always authenticates its peers: with mutual TLS
(`tls_dir`, Cloud Hypervisor's layout) or with a token both sides prove they know
(`vmig.proto.handshake`), or both. A `unix:` migration relies on the socket
file's mode (0600). There is no unauthenticated mode over `tcp:`.

TLS directory layout (the same files work for QEMU's `tls-creds-x509`)::

    receiver: ca-cert.pem  server-cert.pem  server-key.pem
    sender:   ca-cert.pem  client-cert.pem  client-key.pem

Each side checks the other's certificate against its own `ca-cert.pem`; the
sender also checks that the receiver's certificate names the host of the URL
it dialled. Only TLS 1.3 is spoken. Every file problem is found, and named,
before anything listens or connects.
"""

from __future__ import annotations

import os
import secrets
import ssl
import stat
from dataclasses import dataclass, field
from enum import Enum

from vmig.errors import ConfigError
from vmig.proto.handshake import MAX_TOKEN_BYTES, MIN_TOKEN_BYTES

__all__ = [
    "TOKEN_HEX_CHARS",
    "Security",
    "TlsFiles",
    "TlsSide",
    "generate_token",
    "load_tls",
    "read_token_file",
    "token_bytes",
]

#: A generated token: 128 random bits as 32 hex characters.
TOKEN_HEX_CHARS = 32


class TlsSide(Enum):
    """Which end of the connection a TLS directory is for, and the files it holds."""

    SERVER = "server"  #: the receiver (it accepts)
    CLIENT = "client"  #: the sender (it dials)

    @property
    def files(self) -> tuple[str, str, str]:
        """(CA certificate, own certificate, own private key) file names."""
        return ("ca-cert.pem", f"{self.value}-cert.pem", f"{self.value}-key.pem")


@dataclass(frozen=True)
class TlsFiles:
    """A checked TLS directory and the context built from it."""

    directory: str
    side: TlsSide
    context: ssl.SSLContext = field(repr=False, compare=False)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Security:
    """What secures one migration's connections. `describe()` says it in words."""

    tls: TlsFiles | None = None
    token: bytes | None = field(default=None, repr=False)

    def describe(self) -> str:
        parts = []
        if self.tls is not None:
            parts.append("mutual TLS 1.3")
        if self.token is not None:
            parts.append("token")
        return " + ".join(parts) or "UNIX socket permissions"

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.tls.warnings if self.tls is not None else ()


def load_tls(directory: str, side: TlsSide) -> TlsFiles:
    """Check the three files of `side` in `directory` and build a TLS 1.3 context.

    Raises ConfigError naming the first file that is missing or unusable. A private
    key that others may read is usable but gives a warning.
    """
    if not os.path.isabs(directory):
        raise ConfigError(f"tls_dir: {directory!r} is not absolute: the VMM resolves no "
                          "relative paths")
    if not os.path.isdir(directory):
        raise ConfigError(f"tls_dir: {directory} is not a directory")
    ca, cert, key = (os.path.join(directory, name) for name in side.files)
    for path in (ca, cert, key):
        _check_readable(path)
    warnings = []
    mode = stat.S_IMODE(os.stat(key).st_mode)
    if mode & 0o077:
        warnings.append(f"tls_dir: the private key {key} may be read by others (mode "
                        f"{mode:04o}); chmod 600 it")
    purpose = ssl.PROTOCOL_TLS_SERVER if side is TlsSide.SERVER else ssl.PROTOCOL_TLS_CLIENT
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED  # mutual: the receiver checks the sender too
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"tls_dir: {ca} is not a usable CA certificate ({_reason(exc)})") \
            from None
    try:
        ssl._ssl._test_decode_cert(cert)  # type: ignore[attr-defined]  # which file is bad?
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"tls_dir: {cert} is not a usable certificate ({_reason(exc)})") \
            from None
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"tls_dir: {key} is not a usable private key for {cert} "
                          f"({_reason(exc)})") from None
    return TlsFiles(directory, side, context, tuple(warnings))


def _check_readable(path: str) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"tls_dir: {path} is missing") from None
    except OSError as exc:
        raise ConfigError(f"tls_dir: cannot use {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"tls_dir: {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"tls_dir: {path} is not readable")


def _reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None)
        if reason:
            return str(reason).lower().replace("_", " ")
        return str(exc.args[0]) if exc.args else type(exc).__name__
    return str(exc)


def generate_token() -> str:
    """A fresh random token: 128 bits, as hex."""
    return secrets.token_hex(TOKEN_HEX_CHARS // 2)


def token_bytes(text: str, field_name: str = "token") -> bytes:
    """The key a token string stands for; ConfigError if it is too short or too long."""
    data = text.strip().encode("utf-8")
    if len(data) < MIN_TOKEN_BYTES:
        raise ConfigError(f"{field_name}: must be at least {MIN_TOKEN_BYTES} characters "
                          "(a short token can be guessed); use the generated one, or e.g. "
                          "`openssl rand -hex 16`")
    if len(data) > MAX_TOKEN_BYTES:
        raise ConfigError(f"{field_name}: must be at most {MAX_TOKEN_BYTES} bytes")
    return data


def read_token_file(path: str) -> tuple[str, list[str]]:
    """The token in `path` (its first line) and any warning about the file's mode."""
    if not os.path.isabs(path):
        raise ConfigError(f"token_file: {path!r} is not absolute: the VMM resolves no "
                          "relative paths")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.readline().strip()
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        raise ConfigError(f"token_file: {path} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"token_file: cannot read {path}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    if not text:
        raise ConfigError(f"token_file: {path} is empty")
    warnings = []
    if mode & 0o077:
        warnings.append(f"token_file: {path} may be read by others (mode {mode:04o}); "
                        "chmod 600 it")
    return text, warnings
