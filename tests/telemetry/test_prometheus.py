"""Prometheus text format 0.0.4 without prometheus_client, and the tiny /metrics server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import pytest
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider

from schemas.metrics import HANDSHAKES, METRICS, counter, instrument
from schemas.prometheus import PrometheusReader, prometheus_names
from schemas.telemetry import serve_metrics, setup_telemetry


def _provider(**labels: str) -> tuple[MeterProvider, PrometheusReader]:
    reader = PrometheusReader(const_labels=labels or None)
    return MeterProvider(metric_readers=[reader], shutdown_on_exit=False), reader


def test_counter_renders_as_total_with_sorted_labels() -> None:
    provider, reader = _provider()
    counter = provider.get_meter("test").create_counter(
        "devicegate.handshakes", "{connection}", "Connection attempts."
    )
    counter.add(2, {"outcome": "denied", "reason": "certificate_expired"})
    counter.add(1, {"reason": "ok", "outcome": "allowed"})
    assert reader.render() == (
        "# HELP devicegate_handshakes_total Connection attempts.\n"
        "# TYPE devicegate_handshakes_total counter\n"
        'devicegate_handshakes_total{outcome="allowed",reason="ok"} 1\n'
        'devicegate_handshakes_total{outcome="denied",reason="certificate_expired"} 2\n'
    )


def test_histogram_renders_cumulative_buckets_sum_and_count() -> None:
    provider, reader = _provider(worker="3")
    histogram = provider.get_meter("test").create_histogram(
        "devicegate.upstream.dial.duration", "s", "Dial time.",
        explicit_bucket_boundaries_advisory=[0.1, 1.0],
    )  # fmt: skip
    for value in (0.25, 0.5, 2.0, 0.0625):
        histogram.record(value)
    name = "devicegate_upstream_dial_duration_seconds"
    assert reader.render() == (
        f"# HELP {name} Dial time.\n"
        f"# TYPE {name} histogram\n"
        f'{name}_bucket{{worker="3",le="0.1"}} 1\n'
        f'{name}_bucket{{worker="3",le="1.0"}} 3\n'
        f'{name}_bucket{{worker="3",le="+Inf"}} 4\n'
        f'{name}_sum{{worker="3"}} 2.8125\n'
        f'{name}_count{{worker="3"}} 4\n'
    )


def test_gauges_escape_label_values_and_help() -> None:
    provider, reader = _provider()
    meter = provider.get_meter("test")

    def observe(options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(7, {"fleet": 'a"b\\c\nd', "ok": True})

    meter.create_observable_gauge("devicegate.events.spool.bytes", [observe], "By", "Spool\nsize")
    updown = meter.create_up_down_counter("devicegate.sessions.active", "{session}", "Open.")
    updown.add(3)
    updown.add(-1)
    assert reader.render() == (
        "# HELP devicegate_sessions_active Open.\n"
        "# TYPE devicegate_sessions_active gauge\n"
        "devicegate_sessions_active 2\n"
        "# HELP devicegate_events_spool_bytes Spool\\nsize\n"
        "# TYPE devicegate_events_spool_bytes gauge\n"
        'devicegate_events_spool_bytes{fleet="a\\"b\\\\c\\nd",ok="true"} 7\n'
    )


def test_prometheus_names_of_the_contract() -> None:
    names = {spec.name: prometheus_names(spec) for spec in METRICS}
    assert names["devicegate.handshakes"] == ("devicegate_handshakes_total",)
    assert names["devicegate.bytes"] == ("devicegate_bytes_total",)
    assert names["devicegate.revocation.state.age"] == ("devicegate_revocation_state_age_seconds",)
    assert names["devicegate.events.batch.size"] == (
        "devicegate_events_batch_size_bucket",
        "devicegate_events_batch_size_sum",
        "devicegate_events_batch_size_count",
    )
    assert all(spec.name.startswith("devicegate.") for spec in METRICS)
    assert names["devicegate.events.lost"] == ("devicegate_events_lost_total",)
    assert names["devicegate.events.missing"] == ("devicegate_events_missing_total",)
    assert len(names) == len(METRICS) == 17


def test_every_contract_instrument_renders_under_its_prometheus_name() -> None:
    telemetry = setup_telemetry(service_name="test", instance_id="i", prometheus=True, otlp=False)
    try:
        for spec in METRICS:
            observable = spec.kind.startswith("observable")
            callbacks = [lambda options: [Observation(1, {"x": "y"})]] if observable else None
            made = instrument(telemetry.meter, spec, callbacks)
            if spec.kind in ("counter", "up_down_counter"):
                made.add(1)  # type: ignore[union-attr]
            elif spec.kind == "histogram":
                made.record(1)  # type: ignore[union-attr]
        text = telemetry.prometheus_text()
    finally:
        telemetry.shutdown()
    samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[0] != "#"}
    for spec in METRICS:
        assert set(prometheus_names(spec)) <= samples, spec.name


def test_sdk_disabled_gives_an_empty_page(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    telemetry = setup_telemetry(service_name="test", instance_id="i", prometheus=True)
    counter(telemetry.meter, HANDSHAKES).add(1)
    assert telemetry.prometheus_text() == ""
    telemetry.shutdown()


def test_otlp_only_when_an_endpoint_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    telemetry = setup_telemetry(service_name="test", instance_id="i", prometheus=False)
    assert not telemetry.otlp
    telemetry.shutdown()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")
    telemetry = setup_telemetry(service_name="test", instance_id="i", prometheus=False)
    assert telemetry.otlp
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not setup_telemetry(service_name="test", instance_id="i", prometheus=False).otlp
    telemetry.meter_provider.shutdown(timeout_millis=100)
    telemetry.tracer_provider.shutdown()


def test_resource_honours_the_standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "renamed")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod")
    telemetry = setup_telemetry(
        service_name="devicegate-gateway", instance_id="gw-1/w0", prometheus=False, otlp=False
    )
    attributes = telemetry.tracer_provider.resource.attributes
    assert attributes["service.name"] == "renamed"
    assert attributes["service.instance.id"] == "gw-1/w0"
    assert attributes["deployment.environment"] == "prod"
    telemetry.shutdown()


async def _get(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


async def test_metrics_server_answers_over_a_real_socket() -> None:
    telemetry = setup_telemetry(
        service_name="test", instance_id="i", prometheus=True, otlp=False, worker=0
    )
    counter(telemetry.meter, HANDSHAKES).add(1, {"outcome": "allowed", "reason": "ok"})
    server = await serve_metrics(telemetry, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        ok = await _get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        missing = await _get(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        post = await _get(port, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        server.close()
        await server.wait_closed()
        telemetry.shutdown()
    head, _, body = ok.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert b'devicegate_handshakes_total{worker="0",outcome="allowed",reason="ok"} 1\n' in body
    assert missing.startswith(b"HTTP/1.1 404 Not Found")
    assert post.startswith(b"HTTP/1.1 405")
