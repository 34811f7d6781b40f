"""The VMM's HTTP API: routes named after Cloud Hypervisor's, every error one line of JSON.

Routes (all under /api/v1)::

    GET  vmm.ping          who is there (version, pid)
    GET  vmm.resources     fds, threads and TCP listeners of the VMM process
    GET  vmm.events        the VMM's events from now on, as server-sent events (vmig.api.events)
    PUT  vmm.shutdown      reply 204, then stop serving; the VM is shut down with the VMM
    GET  vm.info           state and counters; state "empty" when there is no VM
    PUT  vm.create         build and boot a VM               -> VmInfo
    PUT  vm.restore        start a VM from a snapshot        -> VmInfo
    PUT  vm.pause | vm.resume | vm.shutdown | vm.snapshot   -> 204
    PUT  vm.check-guest    the guest verifies its working set -> CheckResult
    PUT  vm.receive-migration  listen for an incoming migration (empty VMM) -> receiver_url
    PUT  vm.send-migration     start live-migrating the VM -> 202 MigrationStarted (id, info)
    PUT  vm.cancel-migration   cancel the running migration, on either side -> MigrationInfo
    PUT  vm.recover-migration  re-dial a post-copy migration in postcopy-paused (source)
    PUT  vm.migration-set-parameters  change the running send's parameters -> MigrationInfo
    PUT  vm.migration-start-postcopy  switch the send to post-copy now (source) -> MigrationInfo
    PUT  vm.migration-force-complete  pause and switch the send over now (source) -> MigrationInfo
    GET  vm.migration-info     progress of the running (or last) migration -> MigrationInfo

and, outside /api/v1, ``GET /metrics``: Prometheus' text format (vmig.api.prometheus).

Handlers are plain functions: FastAPI runs them in its thread pool, since VM
operations block (a snapshot, a check-guest; vm.info and vm.migration-info are
answered from other threads meanwhile). A send only starts the migration, which runs
on the VMM's own thread: no request waits for it, and a client that goes away changes
nothing. Errors map to
statuses by family (`status_for`): the client's or the host's fault is 400, a
wrong lifecycle state 409, anything else 500 (a failed migration, for one).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client.exposition import choose_encoder
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from vmig import __version__
from vmig.api import prometheus
from vmig.api.controller import Vmm
from vmig.api.events import EventStream
from vmig.api.models import (
    CheckGuestRequest,
    CheckResult,
    ErrorBody,
    MigrationInfo,
    MigrationSetParametersRequest,
    MigrationStarted,
    PingResponse,
    ReceiveMigrationRequest,
    ReceiveMigrationResponse,
    RecoverMigrationRequest,
    ResourcesResponse,
    RestoreRequest,
    SendMigrationRequest,
    SnapshotRequest,
    VmCreateRequest,
    VmInfo,
)
from vmig.api.resources import process_resources
from vmig.errors import (
    ConfigError,
    GuestMemoryError,
    KvmUnavailableError,
    MigrationError,
    SnapshotError,
    StateError,
    VmigError,
    one_line,
)

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
METRICS_PATH = "/metrics"
#: An event stream says something this often, so that a client gone away is noticed (the
#: write fails) and proxies keep the connection open.
KEEPALIVE_S = 15.0
NO_MIGRATION = "no migration has run in this VMM"
TITLE = "vmig VMM API"
DESCRIPTION = (
    "Control one vmig micro-VM over HTTP on a UNIX socket. Routes are named after Cloud "
    "Hypervisor's (`/api/v1/vm.pause`, ...). Every error answers with `{\"error\": \"...\"}`, "
    "one line naming the cause: 400 for bad input or a host that cannot run the VM, 409 for "
    "a request the VM's state does not allow, 500 for a failure inside the VMM."
)

# Error family -> HTTP status; the first match wins, anything else VmigError is 500.
STATUS_BY_ERROR: tuple[tuple[type[VmigError], int], ...] = (
    (StateError, 409),
    (ConfigError, 400),
    (SnapshotError, 400),
    (KvmUnavailableError, 400),  # the host has no usable /dev/kvm: say so, it is not our bug
    (GuestMemoryError, 400),  # e.g. more memory than the host can give
)

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Bad request, or the host cannot do it."},
    409: {"model": ErrorBody, "description": "The VM's state does not allow this."},
    500: {"model": ErrorBody, "description": "The VMM failed."},
}


def status_for(exc: VmigError) -> int:
    """HTTP status for a VmigError, by family."""
    for family, status in STATUS_BY_ERROR:
        if isinstance(exc, family):
            return status
    return 500


def error_response(status: int, message: object) -> JSONResponse:
    return JSONResponse({"error": one_line(message, "unknown error")}, status_code=status)


def validation_message(errors: Sequence[Any]) -> str:
    """pydantic errors -> 'field: rule; field: rule' (one line, no 'body' prefixes)."""
    parts = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ())]
        where = loc[0] if loc else "body"
        field = ".".join(loc[1:]) if where in ("body", "query", "path", "header") else ".".join(loc)
        kind = error.get("type", "")
        if kind == "json_invalid":
            detail = (error.get("ctx") or {}).get("error", "")
            parts.append(f"body: invalid JSON ({detail})" if detail else "body: invalid JSON")
            continue
        if kind == "extra_forbidden":
            rule = "unknown field"
        else:
            rule = str(error.get("msg", "invalid")).removeprefix("Value error, ")
            rule = rule[:1].lower() + rule[1:]
        parts.append(f"{field or where}: {rule}")
    return one_line("; ".join(parts) or "invalid request")


class _GuardedRoute(APIRoute):
    """Turns an unexpected exception into a logged 500 with a one-line body.

    Expected failures (VmigError, validation, HTTP errors) pass through to the
    app's exception handlers. The traceback goes to the server's log only.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (VmigError, HTTPException, RequestValidationError):
                raise
            except Exception as exc:
                log.exception("internal error in %s %s", request.method, request.url.path)
                return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

        return guarded


def _install_error_handlers(app: FastAPI) -> None:
    async def on_vmig_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, VmigError)
        status = status_for(exc)
        if isinstance(exc, MigrationError):  # the peer or the network failed, not this VMM
            log.warning("%s %s failed: %s", request.method, request.url.path, exc)
        elif status >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc, exc_info=exc)
        return error_response(status, exc)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(400, validation_message(exc.errors()))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code < 400:
            return Response(status_code=exc.status_code, headers=exc.headers)
        message = one_line(exc.detail, "unknown error")
        if exc.status_code in (404, 405):  # say which request, so a typo is easy to spot
            message = f"{message}: {request.method} {request.url.path}"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    app.add_exception_handler(VmigError, on_vmig_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"


async def _server_sent_events(stream: EventStream) -> AsyncIterator[str]:
    """`stream`'s events as server-sent events, until the bus ends it or the client goes
    (starlette then cancels this generator); either way the stream is unsubscribed."""
    try:
        yield ": vmig events\n\n"  # at once: the client knows it is subscribed
        while True:
            try:
                event = await asyncio.wait_for(stream.get(), KEEPALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if event is None:
                return
            if stream.dropped:
                yield f": {stream.dropped} events dropped: this client fell behind\n\n"
                stream.dropped = 0
            yield event.to_sse()
    finally:
        stream.close()


def _metrics_route(vmm: Vmm) -> APIRouter:
    router = APIRouter(route_class=_GuardedRoute, responses={500: _ERRORS[500]})
    registry = prometheus.registry(vmm)

    @router.get(METRICS_PATH, tags=["vmm"], response_class=Response,
                responses={200: {"content": {"text/plain": {}},
                                 "description": "Prometheus' text format"}},
                summary="The VMM's figures for Prometheus: the VM, its guest, the running or "
                        "last migration, per connection")
    def metrics(request: Request) -> Response:
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(registry), media_type=content_type)

    return router


def _routes(vmm: Vmm) -> APIRouter:
    router = APIRouter(prefix=API_PREFIX, route_class=_GuardedRoute, responses=_ERRORS)

    @router.get("/vmm.events", tags=["vmm"], response_class=Response,  # errors stay JSON
                responses={200: {"content": {"text/event-stream": {}},
                                 "description": "One server-sent event per VMM event"}},
                summary="The VMM's events from now on (VM lifecycle, migration steps), as "
                        "server-sent events; each `data:` is one JSON event")
    async def vmm_events() -> EventStreamResponse:
        stream = vmm.events.stream(asyncio.get_running_loop())  # subscribed before answering
        return EventStreamResponse(_server_sent_events(stream),
                                   headers={"Cache-Control": "no-cache"})

    @router.get("/vmm.ping", tags=["vmm"], summary="Who is serving this socket")
    def vmm_ping() -> PingResponse:
        return PingResponse(version=__version__, pid=os.getpid())

    @router.get("/vmm.resources", tags=["vmm"], response_model=ResourcesResponse,
                summary="File descriptors, threads and TCP listeners this VMM process holds")
    def vmm_resources() -> dict[str, Any]:
        return process_resources()

    @router.put("/vmm.shutdown", tags=["vmm"], status_code=204, response_class=Response,
                summary="Stop the VMM process (after replying); its VM is shut down")
    def vmm_shutdown() -> Response:
        return Response(status_code=204, background=BackgroundTask(vmm.request_exit))

    @router.get("/vm.info", tags=["vm"], response_model=VmInfo,
                response_model_exclude_unset=True, summary="The VM's state and counters")
    def vm_info() -> dict[str, Any]:
        return vmm.info()

    @router.put("/vm.create", tags=["vm"], response_model=VmInfo,
                summary="Build and boot a VM (there must be none, or a shut-down one)")
    def vm_create(body: VmCreateRequest) -> dict[str, Any]:
        return vmm.create(body.to_config())

    @router.put("/vm.pause", tags=["vm"], status_code=204, response_class=Response,
                summary="Pause a running VM")
    def vm_pause() -> None:
        vmm.pause()

    @router.put("/vm.resume", tags=["vm"], status_code=204, response_class=Response,
                summary="Resume a paused VM")
    def vm_resume() -> None:
        vmm.resume()

    @router.put("/vm.shutdown", tags=["vm"], status_code=204, response_class=Response,
                summary="Stop the VM and free its resources (idempotent)")
    def vm_shutdown() -> None:
        vmm.shutdown()

    @router.put("/vm.snapshot", tags=["vm"], status_code=204, response_class=Response,
                summary="Write a paused VM's state and memory to a directory")
    def vm_snapshot(body: SnapshotRequest) -> None:
        vmm.snapshot(body.directory)

    @router.put("/vm.restore", tags=["vm"], response_model=VmInfo,
                summary="Start a VM from a snapshot directory")
    def vm_restore(body: RestoreRequest) -> dict[str, Any]:
        return vmm.restore(body.directory, resume=body.resume, serial_log=body.serial_log,
                           memory_file=body.memory_file)

    @router.put("/vm.check-guest", tags=["vm"], response_model=CheckResult,
                summary="Have the guest verify every working-set page; the VM must be running")
    def vm_check_guest(body: CheckGuestRequest | None = None) -> dict[str, Any]:
        timeout = (body or CheckGuestRequest()).timeout
        return vmm.check_guest(timeout)

    @router.put("/vm.receive-migration", tags=["migration"],
                response_model=ReceiveMigrationResponse,
                summary="Listen for one incoming migration; the VMM must be empty. Returns "
                        "once listening; vm.info then shows `receiving`")
    def vm_receive_migration(body: ReceiveMigrationRequest) -> dict[str, Any]:
        return vmm.receive_migration(body.to_params())

    @router.put("/vm.send-migration", tags=["migration"], status_code=202,
                response_model=MigrationStarted,
                summary="Start live-migrating the VM to a receiving VMM; answers 202 once it "
                        "has started. Its progress and outcome: vm.migration-info, vm.events, "
                        "/metrics (a failure leaves the VM running here)")
    def vm_send_migration(body: SendMigrationRequest) -> dict[str, Any]:
        return vmm.send_migration(body.to_params())

    @router.put("/vm.cancel-migration", tags=["migration"], response_model=MigrationInfo,
                summary="Cancel the running migration, on either side (409 when none runs, or "
                        "once COMPLETE was sent); answers its figures once it has ended")
    def vm_cancel_migration() -> dict[str, Any]:
        return vmm.cancel_migration()

    @router.put("/vm.recover-migration", tags=["migration"], response_model=MigrationInfo,
                summary="At the source, a post-copy migration in postcopy-paused whose "
                        "re-dial window ran out: re-dial now, at another address of the "
                        "destination if given (409 otherwise)")
    def vm_recover_migration(body: RecoverMigrationRequest | None = None) -> dict[str, Any]:
        return vmm.recover_migration(body.destination_url if body is not None else None)

    @router.put("/vm.migration-set-parameters", tags=["migration"],
                response_model=MigrationInfo,
                summary="At the source, change parameters of the running migration "
                        "(downtime_ms, max_bandwidth, timeout_s, auto-converge): they apply "
                        "from the next chunk or iteration. 400: a value out of range or an "
                        "unknown field; 409: a parameter that cannot change mid-flight, or "
                        "no send running here")
    def vm_migration_set_parameters(body: MigrationSetParametersRequest) -> dict[str, Any]:
        return vmm.migration_set_parameters(body.to_changes())

    @router.put("/vm.migration-start-postcopy", tags=["migration"],
                response_model=MigrationInfo,
                summary="At the source, a migration that allows post-copy: switch to it at the "
                        "end of the current pre-copy pass (libvirt's "
                        "virDomainMigrateStartPostCopy); 409 with the reason where it cannot")
    def vm_migration_start_postcopy() -> dict[str, Any]:
        return vmm.migration_start_postcopy()

    @router.put("/vm.migration-force-complete", tags=["migration"],
                response_model=MigrationInfo,
                summary="At the source: pause the guest and switch over at the end of the "
                        "current pre-copy pass, whatever the expected downtime (Nova's "
                        "force_complete); 409 with the reason where it cannot")
    def vm_migration_force_complete() -> dict[str, Any]:
        return vmm.migration_force_complete()

    @router.get("/vm.migration-info", tags=["migration"], response_model=MigrationInfo,
                responses={404: {"model": ErrorBody,
                                 "description": "No migration has run in this VMM."}},
                summary="Progress of the running migration, or the last one's outcome")
    def vm_migration_info() -> Any:
        info = vmm.migration_info()
        if info is None:
            return error_response(404, NO_MIGRATION)
        return info

    return router


def create_app(vmm: Vmm) -> FastAPI:
    """The API application serving `vmm` (no I/O happens until a server runs it)."""
    app = FastAPI(title=TITLE, version=__version__, description=DESCRIPTION,
                  openapi_url=f"{API_PREFIX}/openapi.json", docs_url=None, redoc_url=None,
                  generate_unique_id_function=lambda route: route.name)
    app.include_router(_routes(vmm))
    app.include_router(_metrics_route(vmm))
    _install_error_handlers(app)

    def openapi() -> dict[str, Any]:
        """FastAPI's document without its 422 entries: validation errors here are 400."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            for path_item in schema.get("paths", {}).values():
                for operation in path_item.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
