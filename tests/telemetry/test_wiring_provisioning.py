"""Telemetry wired into the provisioning service: spans and metrics through the real listener.

The app is the production one (`build_app` with ``telemetry=``) on the real TLS listener in
a thread of its own; spans go to an in-memory exporter of the test's `Harness`.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import aiohttp
import asyncpg
import pytest
import uvloop
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from opentelemetry.sdk.trace import ReadableSpan

from provisioning import admin
from provisioning.agent.device import KeyType, csr_pem, generate_key
from provisioning.http.server import build_app, open_service, server_ssl_context
from provisioning.telemetry import ProvisioningMetrics
from schemas.api import TokenCreateRequest
from schemas.settings import Settings
from tests.conftest import Pki
from tests.helpers import free_port
from tests.telemetry.conftest import Harness

INSTANCE = "test-telemetry-provisioning"


class Listener:
    """The production app with telemetry on the real HTTPS listener, on its own loop."""

    def __init__(self, settings: Settings, harness: Harness) -> None:
        self.port = free_port()
        self.metrics = ProvisioningMetrics(meter=harness.telemetry.meter)
        self.loop = uvloop.new_event_loop()
        started = threading.Event()
        self.stop: asyncio.Event | None = None

        async def main() -> None:
            service = await open_service(settings, pool_size=4)
            app = build_app(service, telemetry=harness.telemetry, metrics=self.metrics)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(
                runner, "127.0.0.1", self.port, ssl_context=server_ssl_context(settings.pki_dir)
            )
            await site.start()
            self.stop = asyncio.Event()
            started.set()
            await self.stop.wait()
            await runner.cleanup()
            await service.close()

        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(main(),), daemon=True
        )
        self.thread.start()
        assert started.wait(15), "provisioning app did not start"
        self.url = f"https://127.0.0.1:{self.port}"

    def close(self) -> None:
        assert self.stop is not None
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(15)


@pytest.fixture
def listener(database_url: str, pki: Pki, harness: Harness) -> Iterator[Listener]:
    settings = Settings(
        database_url=database_url,
        pki_dir=pki.directory,
        ca_passphrase=pki.passphrase.decode(),
        instance_id=INSTANCE,
    )
    served = Listener(settings, harness)
    yield served
    served.close()


async def _token(database_url: str, fleet: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        created = await admin.create_token(
            conn, TokenCreateRequest(fleet=fleet, uses=5, ttl="1h"), actor="cli", instance=INSTANCE
        )
    finally:
        await conn.close()
    return created.token


def _attribute_text(spans: tuple[ReadableSpan, ...]) -> str:
    parts: list[str] = []
    for span in spans:
        parts.append(span.name)
        parts.extend(f"{k}={v!r}" for k, v in (span.attributes or {}).items())
        for event in span.events:
            parts.append(event.name)
            parts.extend(f"{k}={v!r}" for k, v in (event.attributes or {}).items())
    return " ".join(parts)


def _children(spans: tuple[ReadableSpan, ...], root: ReadableSpan) -> set[str]:
    assert root.context is not None
    return {
        span.name
        for span in spans
        if span.parent is not None and span.parent.span_id == root.context.span_id
    }


async def test_enrollment_span_tree_attributes_and_metrics(
    listener: Listener, harness: Harness, database_url: str, pki: Pki
) -> None:
    fleet = "telemetry-wiring"
    token = await _token(database_url, fleet)
    csr = csr_pem(generate_key(KeyType.P256))
    context = ssl.create_default_context(cafile=str(pki.chain))
    connector = aiohttp.TCPConnector(ssl=context, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.post(f"{listener.url}/v1/enroll", json={"token": token, "csr": csr}) as ok:
            assert ok.status == 201, await ok.text()
            device_id = (await ok.json())["device_id"]
        bad = "dgt_" + "x" * 40  # looks like a token, is none
        async with http.post(
            f"{listener.url}/v1/enroll?token={bad}", json={"token": bad, "csr": csr}
        ) as refused:
            assert refused.status == 401
        # EST with the token as the Basic password: the same phases under its own route.
        request = x509.load_pem_x509_csr(csr.encode())
        est_csr = base64.b64encode(request.public_bytes(Encoding.DER))
        basic = base64.b64encode(f"factory:{token}".encode()).decode()
        async with http.post(
            f"{listener.url}/.well-known/est/simpleenroll",
            data=est_csr,
            headers={"Content-Type": "application/pkcs10", "Authorization": f"Basic {basic}"},
        ) as est:
            assert est.status == 200, await est.text()

    spans = harness.spans.get_finished_spans()
    requests = sorted(
        (s for s in spans if s.name == "POST /v1/enroll"), key=lambda s: s.start_time or 0
    )
    assert len(requests) == 2
    allowed, denied = requests
    assert allowed.parent is None
    assert _children(spans, allowed) == {"token_check", "csr_validation", "signing", "storing"}
    attributes: dict[str, Any] = dict(allowed.attributes or {})
    assert {k: v for k, v in attributes.items() if k.startswith("devicegate.")} == {
        "devicegate.fleet": fleet,
        "devicegate.device_id": device_id,
        "devicegate.outcome": "allowed",
        "devicegate.reason": "ok",
    }
    assert attributes["http.route"] == "/v1/enroll"
    assert attributes["http.response.status_code"] == 201
    # Refused at the token check: no signing, no storing; the reason on the request span.
    assert _children(spans, denied) == {"token_check", "csr_validation"}
    assert denied.attributes is not None
    assert denied.attributes["devicegate.outcome"] == "denied"
    assert denied.attributes["devicegate.reason"] == "token_invalid"
    (est_span,) = [s for s in spans if s.name == "POST /.well-known/est/simpleenroll"]
    assert _children(spans, est_span) == {"token_check", "csr_validation", "signing", "storing"}
    assert est_span.attributes is not None
    assert est_span.attributes["devicegate.fleet"] == fleet

    text = _attribute_text(spans)
    assert token not in text and bad not in text
    assert token.partition("_")[2] not in text
    assert "BEGIN" not in text  # no CSR or key either

    assert harness.points("devicegate.enrollments") == {
        (("operation", "enroll"), ("outcome", "allowed"), ("reason", "ok")): 2,
        (("operation", "enroll"), ("outcome", "denied"), ("reason", "token_invalid")): 1,
    }
