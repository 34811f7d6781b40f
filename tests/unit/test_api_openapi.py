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
    ("put", "/api/v1/vmm.shutdown"),
    ("get", "/api/v1/vm.info"),
    ("put", "/api/v1/vm.create"),
    ("put", "/api/v1/vm.pause"),
    ("put", "/api/v1/vm.resume"),
    ("put", "/api/v1/vm.shutdown"),
    ("put", "/api/v1/vm.snapshot"),
    ("put", "/api/v1/vm.restore"),
    ("put", "/api/v1/vm.check-guest"),
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
            for status in ("400", "409", "500"):
                schema = responses[status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path)
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    assert schemas["ErrorBody"]["required"] == ["error"]


def test_request_fields_have_descriptions() -> None:
    schemas = openapi_document()["components"]["schemas"]
    for name in ("VmCreateRequest", "SnapshotRequest", "RestoreRequest", "VmInfo",
                 "CheckResult", "PingResponse"):
        for field, spec in schemas[name]["properties"].items():
            assert spec.get("description"), f"{name}.{field} has no description"
