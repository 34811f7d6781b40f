"""The VMM's control plane: an HTTP API on a UNIX socket (FastAPI + uvicorn) and its client.

`models` (request/response bodies), `controller` (`Vmm`, the only module that
touches the VMM), `app` (routes and error mapping), `server` (the socket and
uvicorn), `client` (`ApiClient`, httpx; no VMM imports), `process` (start and
stop a `vmig vmm` subprocess), `openapi` (prints the OpenAPI document).
Import the submodule you need: importing this package loads nothing.
"""
