"""`python -m vmig.api.openapi`: print the API's OpenAPI document (JSON, sorted, stable).

`docs/openapi.json` is this output; a test keeps the two in sync, so regenerate
it after changing a route or a model::

    python -m vmig.api.openapi > docs/openapi.json
"""

from __future__ import annotations

import json
from typing import Any

from vmig.api.app import create_app
from vmig.api.controller import Vmm


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of the API app (no VM, no socket, no I/O)."""
    return create_app(Vmm()).openapi()


def render() -> str:
    """The document as committed: 2-space indent, sorted keys, trailing newline."""
    return json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    print(render(), end="")


if __name__ == "__main__":
    main()
