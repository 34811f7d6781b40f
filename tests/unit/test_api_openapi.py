"""docs/openapi.json is what the app produces, and it documents every route."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vmig.api.openapi import openapi_document, render

DOC = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"

ROUTES = {
    ("get", "/api/v1/vmm.ping"),
    ("get", "/api/v1/vmm.resources"),
    ("put", "/api/v1/vmm.shutdown"),
    ("get", "/api/v1/vm.info"),
    ("put", "/api/v1/vm.create"),
    ("put", "/api/v1/vm.pause"),
    ("put", "/api/v1/vm.resume"),
    ("put", "/api/v1/vm.shutdown"),
    ("put", "/api/v1/vm.snapshot"),
    ("put", "/api/v1/vm.restore"),
    ("put", "/api/v1/vm.check-guest"),
    ("put", "/api/v1/vm.receive-migration"),
    ("put", "/api/v1/vm.send-migration"),
    ("put", "/api/v1/vm.cancel-migration"),
    ("put", "/api/v1/vm.recover-migration"),
    ("put", "/api/v1/vm.migration-set-parameters"),
    ("put", "/api/v1/vm.migration-start-postcopy"),
    ("put", "/api/v1/vm.migration-force-complete"),
    ("get", "/api/v1/vm.migration-info"),
    ("get", "/api/v1/vmm.events"),
    ("get", "/metrics"),
}


def test_committed_document_is_current() -> None:
    assert DOC.read_text() == render(), (
        "docs/openapi.json is stale: run `python -m vmig.api.openapi > docs/openapi.json`")


def test_module_prints_the_document() -> None:
    result = subprocess.run([sys.executable, "-m", "vmig.api.openapi"], capture_output=True,
                            text=True, check=True, timeout=60)
    assert result.stdout == render()


def test_every_route_is_documented() -> None:
    paths = openapi_document()["paths"]
    documented = {(method, path) for path, item in paths.items() for method in item}
    assert documented == ROUTES


def test_errors_are_documented_as_error_bodies_not_422() -> None:
    document = json.loads(render())
    for path, item in document["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            # /metrics answers only Prometheus' text, or a 500
            for status in ("500",) if path == "/metrics" else ("400", "409", "500"):
                schema = responses[status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path)
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    assert schemas["ErrorBody"]["required"] == ["error"]


def test_request_fields_have_descriptions() -> None:
    schemas = openapi_document()["components"]["schemas"]
    for name in ("VmCreateRequest", "SnapshotRequest", "RestoreRequest", "VmInfo",
                 "CheckResult", "PingResponse", "ReceiveMigrationRequest",
                 "ReceiveMigrationResponse", "SendMigrationRequest", "MigrationStarted",
                 "MigrationInfo"):
        for field, spec in schemas[name]["properties"].items():
            assert spec.get("description"), f"{name}.{field} has no description"


def test_migration_requests_show_defaults_and_bounds() -> None:
    schemas = openapi_document()["components"]["schemas"]
    send = schemas["SendMigrationRequest"]["properties"]
    assert (send["connections"]["default"], send["connections"]["minimum"],
            send["connections"]["maximum"]) == (1, 1, 128)
    assert send["downtime_ms"]["default"] == 300 and send["downtime_ms"]["minimum"] == 0
    assert send["timeout_s"]["default"] == 3600 and send["timeout_s"]["exclusiveMinimum"] == 0
    assert send["timeout_strategy"]["enum"] == ["cancel", "ignore", "postcopy"]
    assert send["local"]["default"] is False and send["verify_memory"]["default"] is False
    assert schemas["SendMigrationRequest"]["required"] == ["destination_url"]
    receive = schemas["ReceiveMigrationRequest"]["properties"]
    assert (receive["max_connections"]["default"], receive["max_connections"]["minimum"],
            receive["max_connections"]["maximum"]) == (128, 1, 128)
    info = openapi_document()["paths"]["/api/v1/vm.migration-info"]["get"]["responses"]
    assert info["404"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"}
