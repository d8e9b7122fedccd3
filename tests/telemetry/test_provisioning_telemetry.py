"""Provisioning request spans (parent/child, attributes, never a token) and metrics."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from provisioning.http.problems import problem_response
from provisioning.telemetry import (
    PHASES,
    ProvisioningMetrics,
    annotate,
    metrics_handler,
    phase,
    request_span,
    telemetry_middleware,
)
from schemas.events import Reason
from tests.telemetry.conftest import Harness

TOKEN = "dgt_ThisIsTheBootstrapTokenDoNotLeak"


def _all_attribute_text(harness: Harness) -> str:
    parts = []
    for span in harness.spans.get_finished_spans():
        parts.append(span.name)
        parts.extend(f"{k}={v!r}" for k, v in (span.attributes or {}).items())
        for event in span.events:
            parts.extend(f"{k}={v!r}" for k, v in (event.attributes or {}).items())
    return " ".join(parts)


def test_span_tree_with_attributes_and_no_token(harness: Harness) -> None:
    tracer = harness.telemetry.tracer
    with request_span(tracer, method="POST", route="/v1/enroll") as root:
        for name in PHASES:
            with phase(name, tracer=tracer):
                annotate(token=TOKEN, key="-----BEGIN PRIVATE KEY-----")  # dropped
        annotate(fleet="f1", device_id="d1", outcome="allowed", reason="ok", token=TOKEN)

    spans = {span.name: span for span in harness.spans.get_finished_spans()}
    assert set(spans) == {"POST /v1/enroll", *PHASES}
    request = spans["POST /v1/enroll"]
    assert request.parent is None
    assert request.context is not None
    assert request.context.span_id == root.get_span_context().span_id
    for name in PHASES:
        parent = spans[name].parent
        assert parent is not None
        assert parent.span_id == request.context.span_id
        assert not spans[name].attributes
    assert dict(request.attributes or {}) == {
        "http.request.method": "POST",
        "http.route": "/v1/enroll",
        "devicegate.fleet": "f1",
        "devicegate.device_id": "d1",
        "devicegate.outcome": "allowed",
        "devicegate.reason": "ok",
    }
    assert TOKEN not in _all_attribute_text(harness)
    assert "BEGIN" not in _all_attribute_text(harness)


async def _enroll(request: web.Request) -> web.Response:
    body = await request.json()
    with phase("token_check"):
        if body["token"] != "dgt_good":
            return problem_response(Reason.TOKEN_INVALID, "unknown token")
    with phase("csr_validation"), phase("signing"), phase("storing"):
        pass
    annotate(fleet="f1", device_id="d9")
    return web.json_response({"device_id": "d9"}, status=201)


async def test_middleware_spans_metrics_and_metrics_route(harness: Harness) -> None:
    metrics = ProvisioningMetrics(meter=harness.telemetry.meter)
    app = web.Application(middlewares=[telemetry_middleware(harness.telemetry, metrics)])
    app.add_routes(
        [
            web.post("/v1/enroll", _enroll),
            web.get("/metrics", metrics_handler(harness.telemetry)),
        ]
    )
    async with TestClient(TestServer(app)) as client:
        refused = await client.post(
            "/v1/enroll?token=" + TOKEN, json={"token": TOKEN}, headers={"Authorization": TOKEN}
        )
        assert refused.status == 401
        ok = await client.post("/v1/enroll", json={"token": "dgt_good"})
        assert ok.status == 201
        assert (await client.get("/nowhere")).status == 404
        page = await client.get("/metrics")
        text = await page.text()
        assert page.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"

    assert harness.points("devicegate.enrollments") == {
        (("operation", "enroll"), ("outcome", "allowed"), ("reason", "ok")): 1,
        (("operation", "enroll"), ("outcome", "denied"), ("reason", "token_invalid")): 1,
    }
    durations = harness.points("devicegate.enrollment.duration")
    assert {key: count for key, (count, _) in durations.items()} == {
        (("operation", "enroll"), ("outcome", "allowed")): 1,
        (("operation", "enroll"), ("outcome", "denied")): 1,
    }
    assert (
        'devicegate_enrollments_total{operation="enroll",outcome="denied",reason="token_invalid"} 1'
        in text
    )
    requests = [s for s in harness.spans.get_finished_spans() if s.name == "POST /v1/enroll"]
    assert len(requests) == 2
    denied, allowed = sorted(requests, key=lambda s: s.start_time or 0)
    assert denied.attributes is not None and allowed.attributes is not None
    assert denied.attributes["devicegate.reason"] == "token_invalid"
    assert denied.attributes["http.response.status_code"] == 401
    assert allowed.attributes["devicegate.device_id"] == "d9"
    assert allowed.attributes["devicegate.outcome"] == "allowed"
    children = [s for s in harness.spans.get_finished_spans() if s.parent is not None]
    assert {s.name for s in children if s.context.trace_id == allowed.context.trace_id} == set(
        PHASES
    )
    assert TOKEN not in _all_attribute_text(harness)


async def test_expiring_certificates_gauge(harness: Harness) -> None:
    metrics = ProvisioningMetrics(meter=harness.telemetry.meter)
    assert harness.points("devicegate.certificates.expiring") == {}

    class Pool:
        async def fetch(self, query: str) -> list[dict[str, object]]:
            assert "interval '7 days'" in query
            return [{"fleet": "f1", "expiring": 3}, {"fleet": "f2", "expiring": 1}]

    await metrics.refresh_expiring(Pool())
    assert harness.points("devicegate.certificates.expiring") == {
        (("fleet", "f1"),): 3,
        (("fleet", "f2"),): 1,
    }
