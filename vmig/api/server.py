"""Serve the API (uvicorn) on a UNIX socket that only this user may open (mode 0600).

We bind the socket ourselves, not uvicorn, for three reasons: the mode is set
at bind time under a umask (there is no moment where the socket is open to
others), a socket another VMM still answers on is refused instead of
silently stolen, and the file is removed on the way out, but only if it is
still ours.

Stopping: SIGTERM, SIGINT (uvicorn's own handlers) or `vmm.shutdown` (the Vmm's
`exit_requested` event, polled on uvicorn's tick) make the server finish the
requests in flight and return; then the VM is shut down and the socket file
removed, and `serve()` returns normally.

Logging: uvicorn gets no configuration of its own; its records go to the root
logger's handler, in the VMM's one format (`vmig.logs`, set up by `vmig vmm`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType

import uvicorn

from vmig.api.app import create_app
from vmig.api.controller import Vmm
from vmig.errors import ApiSocketError
from vmig.transport import address

log = logging.getLogger(__name__)

DEFAULT_LOG_LEVEL = "warning"
BACKLOG = 64
GRACEFUL_SHUTDOWN_S = 10  # requests still running when we are told to stop get this long


def bind_unix_socket(path: str) -> socket.socket:
    """A listening AF_UNIX socket at `path`, mode 0600 (transport's one helper).

    A stale socket file (nobody accepts) is replaced; a live one, or a path that
    is not a socket, raises ApiSocketError with a one-line reason.
    """
    return address.bind_unix_socket(path, what="API socket", backlog=BACKLOG,
                                    error=ApiSocketError)


class _UvicornServer(uvicorn.Server):
    """uvicorn's server, plus a ready callback and the Vmm's exit request."""

    def __init__(self, config: uvicorn.Config, vmm: Vmm,
                 on_ready: Callable[[], None] | None) -> None:
        super().__init__(config)
        self._vmm = vmm
        self._on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        # Everything loaded so far lives as long as the process: out of the collector's
        # sight, so that a migration's many short-lived objects (a memoryview per
        # scattered page) trigger only cheap collections (5% of its CPU otherwise).
        gc.freeze()
        if self._vmm.exit_requested.is_set():  # a signal came before uvicorn's handlers
            self.should_exit = True
        if self.started and not self.should_exit and self._on_ready is not None:
            self._on_ready()

    async def on_tick(self, counter: int) -> bool:
        if self._vmm.exit_requested.is_set():
            self.should_exit = True
        elif self.should_exit:  # SIGTERM/SIGINT through uvicorn's own handlers
            self._vmm.request_exit()  # a running send is interrupted, not waited for
        return await super().on_tick(counter)


@contextlib.contextmanager
def _exit_signals_handled(vmm: Vmm) -> Iterator[None]:
    """Make SIGTERM/SIGINT ask `vmm` to exit while we serve and wind down, never kill us.

    uvicorn installs its own handlers while it runs; before it does (and after
    it returns, when it re-raises the signal that stopped it) these are in
    place, so a signal is never lost and the VM is still shut down and the
    socket removed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; uvicorn then sets none either
        return

    def request_exit(signum: int, frame: FrameType | None) -> None:
        vmm.request_exit()

    previous = {sig: signal.signal(sig, request_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class ApiServer:
    """A bound API socket. `serve()` runs the API on it; `close()` removes the socket file."""

    def __init__(self, path: str, sock: socket.socket) -> None:
        self.path = path
        self._sock = sock
        info = os.stat(path)
        self._identity = (info.st_dev, info.st_ino)  # to remove only our own file later

    @classmethod
    def bind(cls, path: str) -> ApiServer:
        """Bind `path` (see `bind_unix_socket`)."""
        sock = bind_unix_socket(path)
        try:
            return cls(path, sock)
        except BaseException:
            sock.close()
            raise

    def serve(self, vmm: Vmm, *, log_level: str = DEFAULT_LOG_LEVEL,
              on_ready: Callable[[], None] | None = None) -> None:
        """Serve `vmm` until SIGTERM/SIGINT or vmm.shutdown; then close the VMM and the socket.

        `on_ready` is called once the server accepts requests. Returns normally
        when asked to stop; the VM is shut down and the socket removed on every
        way out.
        """
        with _exit_signals_handled(vmm):
            try:
                config = uvicorn.Config(
                    # no logging set-up of uvicorn's own: its loggers propagate to the root
                    # logger, so they share vmig's handler and format (vmig.logs)
                    create_app(vmm), log_level=log_level, log_config=None, lifespan="off",
                    access_log=log_level in ("debug", "info"), server_header=False,
                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                )
                _UvicornServer(config, vmm, on_ready).run(sockets=[self._sock])
            finally:
                vmm.close()
                self.close()

    def close(self) -> None:
        """Close the socket and unlink its file if it is still the one we bound; idempotent."""
        self._sock.close()
        with contextlib.suppress(OSError):
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self._identity:
                os.unlink(self.path)

    def __enter__(self) -> ApiServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
