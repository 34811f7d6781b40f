"""Who broke the migration protocol: us (`LocalProtocolError`) or the peer (`Remote...`).

Both derive from `vmig.errors.ProtocolError`, so callers that do not care about
the side catch that one. Each carries `message` (one line naming the side and
what went wrong) and `status`, the wire status to answer with (always ERROR:
the protocol has one failure status; the message says why).
"""

from __future__ import annotations

from vmig.errors import ProtocolError

__all__ = ["AuthenticationError", "LocalProtocolError", "ProtocolError", "RemoteProtocolError"]

# The wire value of Status.ERROR (vmig.proto.wire imports this module, so the
# enum cannot be used here; the connection tests check the two agree).
_STATUS_ERROR = 2


class _SideProtocolError(ProtocolError):
    """Common body of the two concrete protocol errors; not raised itself."""

    status: int = _STATUS_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class LocalProtocolError(_SideProtocolError):
    """We tried something the protocol forbids (send out of order, bad argument).

    A bug in the caller, or a value it should have checked; the connection's
    state is left as it was unless the method says otherwise.
    """


class RemoteProtocolError(_SideProtocolError):
    """The peer broke the protocol (bad bytes, wrong order, unsupported version).

    The connection that raised it is aborted; the message is fit to send back
    in an Error response.
    """


class AuthenticationError(RemoteProtocolError):
    """The peer could not be authenticated: it does not know the token, or does not ask
    for one where it must (or asks for one this side was not given).

    The message says which, and is fit to send back in an Error response.
    """
