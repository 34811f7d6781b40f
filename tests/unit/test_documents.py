"""CONFIG and COMPLETE documents: round trips, version 1 payloads, and refusals that
name the field."""

from __future__ import annotations

import json

import pytest

from vmig.config import VmConfig
from vmig.migration.documents import (
    CONFIG_VERSION,
    CompleteDocument,
    ConfigDocument,
    DocumentError,
    MemoryDigest,
)

VM = VmConfig.build(memory="64M", workload="dirty", working_set="8M")
CPUID = ({"function": 1, "index": 0, "flags": 0, "eax": 0x806c1, "ebx": 0, "ecx": 0x80202001,
          "edx": 0x0789fbff},)


def test_config_round_trips_with_its_version_and_cpuid() -> None:
    document = ConfigDocument(vm=VM, tsc_khz=2_100_000, data_extents=((0, 8192),),
                              cpuid=CPUID)
    payload = json.loads(document.to_json())
    assert payload["version"] == CONFIG_VERSION
    assert ConfigDocument.from_json(document.to_json()) == document


def test_a_version_1_config_still_parses_without_cpuid() -> None:
    legacy = {"vm": VM.to_dict(), "tsc_khz": 2_100_000, "data_extents": [[0, 4096]],
              "cpuid": "ignored: version 1 had none"}
    document = ConfigDocument.from_json(json.dumps(legacy).encode())
    assert document.version == 1 and document.cpuid is None
    assert document.vm == VM and document.data_extents == ((0, 4096),)


@pytest.mark.parametrize(("payload", "words"), [
    (b"[]", "not a JSON object"),
    (b"{", "not JSON"),
    (json.dumps({"version": 9, "vm": VM.to_dict()}).encode(), "version 9"),
    (json.dumps({"version": 2}).encode(), "no vm"),
    (json.dumps({"vm": {"memory_bytes": "lots"}}).encode(), "vm:"),
    (json.dumps({"vm": VM.to_dict(), "tsc_khz": -1}).encode(), "tsc_khz"),
    (json.dumps({"vm": VM.to_dict(), "data_extents": [[1, 4096]]}).encode(), "aligned"),
    (json.dumps({"version": 2, "vm": VM.to_dict(), "cpuid": [{"function": -1}]}).encode(),
     "cpuid[0].function"),
    (json.dumps({"version": 2, "vm": VM.to_dict(), "cpuid": {}}).encode(), "cpuid"),
])
def test_a_bad_config_is_refused_naming_what_is_wrong(payload: bytes, words: str) -> None:
    with pytest.raises(DocumentError, match="bad CONFIG") as raised:
        ConfigDocument.from_json(payload)
    assert words in str(raised.value)


def test_complete_round_trips_and_an_empty_payload_means_run() -> None:
    document = CompleteDocument(run=False, memory_digest=MemoryDigest("blake3", "ab" * 32))
    assert CompleteDocument.from_json(document.to_json()) == document
    assert CompleteDocument.from_json(b"") == CompleteDocument(run=True, version=1)


@pytest.mark.parametrize(("payload", "words"), [
    (b"1", "not a JSON object"),
    (json.dumps({"run": "yes"}).encode(), "run must be"),
    (json.dumps({"memory_digest": "abc"}).encode(), "memory_digest"),
    (json.dumps({"memory_digest": {"algorithm": "blake3"}}).encode(), "memory_digest"),
    (json.dumps({"version": 0}).encode(), "version 0"),
])
def test_a_bad_complete_is_refused(payload: bytes, words: str) -> None:
    with pytest.raises(DocumentError, match="bad COMPLETE") as raised:
        CompleteDocument.from_json(payload)
    assert words in str(raised.value)
