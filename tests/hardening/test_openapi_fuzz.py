"""Schemathesis against the OpenAPI document, calling the real HTTPS listener (and PostgreSQL).

One test per operation of ``provisioning.http.openapi.document()`` (the served ``/openapi.json``
is checked to be that document), each with ``MAX_EXAMPLES`` generated requests, schema-valid
and schema-violating, sent with an admin key as bearer (so admin endpoints are reached; the
device endpoints ignore it). Checks: no 5xx, status codes and content types declared,
bodies that match their declared schema. Schemathesis' own pytest plugin (``from_fixture``)
does not run under pytest 9, so its strategies are driven by hypothesis directly here.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.request
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, seed, settings
from requests.adapters import HTTPAdapter

from provisioning.http.openapi import document
from tests.conftest import Pki
from tests.provisioning.conftest import Server

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

schemathesis.serializer.alias("application/pkcs10", "text/plain")  # EST bodies are base64 text

MAX_EXAMPLES = int(os.environ.get("DEVICEGATE_OPENAPI_EXAMPLES", "25"))  # raise for a deep run
SOURCE = "127.0.0.254"  # its own loopback address: its bad tokens spend no one else's budget
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
SCHEMA = schemathesis.openapi.from_dict(document())
OPERATIONS = {result.ok().label: result.ok() for result in SCHEMA.get_all_operations()}
CASES = [
    (label, mode)
    for label, operation in sorted(OPERATIONS.items())
    for mode in GenerationMode
    # Negative cases need an input to violate.
    if mode is GenerationMode.POSITIVE
    or operation.path_parameters
    or operation.query
    or operation.body
]


class _FromSource(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (SOURCE, 0)
        super().init_poolmanager(*args, **kwargs)


@pytest.fixture(scope="module")
def session() -> Any:
    with requests.Session() as http:
        http.mount("https://", _FromSource())
        yield http


def test_served_document_is_the_generated_one(server: Server, pki: Pki) -> None:
    context = ssl.create_default_context(cafile=str(pki.chain))
    with urllib.request.urlopen(f"{server.url}/openapi.json", context=context) as response:
        assert response.status == 200
        assert json.load(response) == json.loads(json.dumps(document()))


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{lb}-{m.value}" for lb, m in CASES])
def test_operation_contract(
    label: str, mode: GenerationMode, server: Server, pki: Pki, admin_key: str, session: Any
) -> None:
    operation = OPERATIONS[label]
    headers = {"Authorization": f"Bearer {admin_key}"}

    @seed(20261129)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        case.call_and_validate(
            base_url=server.url,
            session=session,
            headers=headers,
            checks=CHECKS,
            verify=str(pki.chain),
            timeout=10,
        )

    run()
