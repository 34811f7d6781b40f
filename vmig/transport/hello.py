"""The sending side of every connection's handshake, and who a connection is.

`Identity` is what a hello says (role, migration id, version, index, resume count);
`sender_handshake` says it and proves the token if the receiver asks, for the channels
of `vmig.transport.channel` and `vmig.transport.fault_channel` alike.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from vmig.errors import MigrationError, TransportError
from vmig.proto import (
    PROTOCOL_VERSION,
    AuthenticationError,
    AuthMethod,
    Challenged,
    ConnectionRole,
    Established,
    Refused,
    RemoteProtocolError,
    SenderHandshake,
)
from vmig.proto.wire import NONCE_SIZE
from vmig.transport.pump import pull
from vmig.transport.stream import Stream


class VersionRefused(MigrationError):
    """The destination does not speak this side's protocol version (it said which it
    does); the caller may try again with an older one."""


@dataclass(frozen=True)
class Identity:
    """Which connection of which migration a channel is: what its hello says."""

    role: ConnectionRole
    migration_id: bytes
    version: int = PROTOCOL_VERSION
    index: int = 0
    resume: int = 0

    def next_resume(self) -> Identity:
        """The identity of the connection that resumes this one."""
        return Identity(self.role, self.migration_id, self.version, self.index,
                        self.resume + 1)

    @property
    def name(self) -> str:
        if self.role is ConnectionRole.MEMORY:
            return f"MEMORY {self.index}"
        return self.role.name


def sender_handshake(stream: Stream, identity: Identity,
                     token: bytes | None) -> tuple[AuthMethod, bytes]:
    """The sending side of a connection's handshake: hello, then the token proof if the
    receiver asks (both nonces fresh). Returns the method and any bytes read beyond it.

    VersionRefused when the receiver does not speak `identity.version`; MigrationError
    for other refusals and failed proofs; TransportError when the connection fails."""
    handshake = SenderHandshake(identity.role, identity.migration_id, token=token,
                                nonce=os.urandom(NONCE_SIZE), version=identity.version,
                                index=identity.index, resume=identity.resume)
    name = identity.name
    try:
        stream.send_all([handshake.hello()])
        while True:
            event = pull(handshake, stream.recv_some)
            if isinstance(event, Challenged):
                stream.send_all([handshake.authenticate()])
            elif isinstance(event, Refused):
                if "speaks protocol version" in event.reason:
                    raise VersionRefused(f"the destination refused protocol version "
                                         f"{identity.version}: {event.reason}")
                raise MigrationError(f"destination refused the {name} connection: "
                                     f"{event.reason}")
            elif isinstance(event, Established):
                return event.method, handshake.unused_data()
    except AuthenticationError as exc:
        raise MigrationError(f"{stream.peer}: {exc}") from None
    except RemoteProtocolError as exc:
        raise MigrationError(f"handshake with {stream.peer} failed: {exc}"
                             f"{handshake_hint(stream)}") from None
    except TransportError as exc:
        raise TransportError(f"handshake on the {name} connection failed: {exc}"
                             f"{handshake_hint(stream)}") from None


def handshake_hint(stream: Stream) -> str:
    """What a handshake that broke off most likely means, given how this side connected."""
    if stream.encrypted:  # our TLS handshake passed; the destination then ended the session
        return (" (the destination does not accept this side's certificate: is "
                "client-cert.pem signed by the CA the destination trusts?)")
    if stream.sock.family in (socket.AF_INET, socket.AF_INET6):
        return " (does the destination expect TLS? then pass --tls-dir)"
    return ""
