"""The OpenTelemetry SDK of each process, its ``/metrics`` endpoint, and trace ids in events.

Invariants:

* Metrics are created from the contract in `schemas.metrics`; ``/metrics`` renders them
  with `schemas.prometheus` (no ``prometheus_client``).
* OTLP export happens only when asked for: ``otlp=True``, or ``otlp=None`` and an
  ``OTEL_EXPORTER_OTLP_*ENDPOINT`` variable is set. ``OTEL_SDK_DISABLED=true`` turns the SDK
  into no-ops (``/metrics`` then answers an empty page, so probes still pass).
* Logs are configured by `schemas.logs.configure_logging` and never carry secrets.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import (
    SERVICE_INSTANCE_ID,
    SERVICE_NAME,
    OTELResourceDetector,
    Resource,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import Tracer

from schemas.prometheus import CONTENT_TYPE, PrometheusReader

__all__ = ["Telemetry", "serve_metrics", "setup_telemetry", "trace_detail"]

log = logging.getLogger("devicegate.telemetry")

# --- SDK setup ---------------------------------------------------------------------------

_TRUE = ("1", "true", "yes", "on")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _otlp_configured() -> bool:
    return any(
        os.environ.get(name)
        for name in (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        )
    )


def _exporter_off(signal: str) -> bool:
    """``OTEL_METRICS_EXPORTER=none`` / ``OTEL_TRACES_EXPORTER=none``."""
    return os.environ.get(f"OTEL_{signal}_EXPORTER", "").strip().lower() == "none"


class Telemetry:
    """The SDK providers of one process (or gateway worker) and their exporters.

    Attributes:
        meter: the meter to create `METRICS` instruments on.
        tracer: the tracer for request and connection spans.
        meter_provider: the SDK meter provider.
        tracer_provider: the SDK tracer provider (tests add span processors to it).
        disabled: ``OTEL_SDK_DISABLED`` was true: meter and tracer are no-ops.
        otlp: whether an OTLP exporter was set up (for metrics, traces or both).
    """

    def __init__(
        self,
        *,
        meter_provider: MeterProvider,
        tracer_provider: TracerProvider,
        prometheus: PrometheusReader | None,
        disabled: bool,
        otlp: bool = False,
    ) -> None:
        self.meter_provider = meter_provider
        self.tracer_provider = tracer_provider
        self.meter: Meter = meter_provider.get_meter("devicegate")
        self.tracer: Tracer = tracer_provider.get_tracer("devicegate")
        self.disabled = disabled
        self.otlp = otlp
        self._prometheus = prometheus
        self._closed = False

    @property
    def prometheus_enabled(self) -> bool:
        return self._prometheus is not None

    def prometheus_text(self) -> str:
        """The current metrics in Prometheus text format ("" when off or disabled)."""
        if self._prometheus is None or self.disabled or self._closed:
            return ""
        return self._prometheus.render()

    def shutdown(self) -> None:
        """Flush and stop the exporters (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.tracer_provider.shutdown()
        finally:
            self.meter_provider.shutdown()


def setup_telemetry(
    *,
    service_name: str,
    instance_id: str,
    prometheus: bool,
    otlp: bool | None = None,
    worker: int | None = None,
    readers: Sequence[MetricReader] = (),
    record_spans: bool | None = None,
) -> Telemetry:
    """Build the meter and tracer providers of this process.

    Args:
        service_name: ``service.name`` (``OTEL_SERVICE_NAME`` overrides it).
        instance_id: ``service.instance.id`` (``Settings.instance_id``; the gateway appends
            ``/w<N>``). ``OTEL_RESOURCE_ATTRIBUTES`` may override either.
        prometheus: expose metrics for `Telemetry.prometheus_text` (``/metrics``).
        otlp: ``True`` always export over OTLP/HTTP, ``False`` never, ``None`` only when
            ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or a per-signal endpoint) is set.
            ``OTEL_METRICS_EXPORTER=none`` / ``OTEL_TRACES_EXPORTER=none`` turn one signal off.
        worker: gateway worker index: a ``worker`` label on every Prometheus sample and the
            ``devicegate.worker`` resource attribute.
        readers: extra metric readers (tests pass an ``InMemoryMetricReader``).
        record_spans: ``None`` (default): record spans only when they are exported over
            OTLP or ``OTEL_TRACES_SAMPLER`` is set. Otherwise spans are sampled out: trace
            ids still exist (logs and auth events carry them) but a span costs a fraction.
    """
    disabled = _env_true("OTEL_SDK_DISABLED")
    attributes: dict[str, str | int] = {
        SERVICE_NAME: service_name,
        SERVICE_INSTANCE_ID: instance_id,
    }
    if worker is not None:
        attributes["devicegate.worker"] = worker
    # Ours are the defaults; the standard variables win over them.
    resource = Resource.create(attributes).merge(OTELResourceDetector().detect())
    want_otlp = (_otlp_configured() if otlp is None else otlp) and not disabled
    exporting = False

    metric_readers: list[MetricReader] = list(readers)
    prom: PrometheusReader | None = None
    if prometheus:
        prom = PrometheusReader(
            const_labels={"worker": str(worker)} if worker is not None else None
        )
        metric_readers.append(prom)
    traces_exported = want_otlp and not _exporter_off("TRACES")
    if record_spans is None:
        record_spans = traces_exported or bool(os.environ.get("OTEL_TRACES_SAMPLER"))
    # With no sampler given the SDK reads OTEL_TRACES_SAMPLER (default: parent-based on).
    sampler = None if record_spans else ALWAYS_OFF
    tracer_provider = TracerProvider(resource=resource, sampler=sampler)
    if want_otlp:
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:  # pragma: no cover - it is a dependency
            log.warning(
                "OTLP export requested but opentelemetry-exporter-otlp-proto-http is not installed"
            )
        else:
            if not _exporter_off("METRICS"):
                metric_readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
                exporting = True
            if not _exporter_off("TRACES"):
                tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
                exporting = True
    meter_provider = MeterProvider(
        resource=resource, metric_readers=metric_readers, shutdown_on_exit=False
    )
    return Telemetry(
        meter_provider=meter_provider,
        tracer_provider=tracer_provider,
        prometheus=prom,
        disabled=disabled,
        otlp=exporting,
    )


# --- /metrics over plain asyncio ---------------------------------------------------------

_REQUEST_LIMIT = 8192
_REQUEST_TIMEOUT = 5.0


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


async def _handle(
    telemetry: Telemetry,
    readiness: Callable[[], list[str]] | None,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    try:
        async with asyncio.timeout(_REQUEST_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, _, rest = request_line.partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        if path == "/readyz" and readiness is not None and method == "GET":
            problems = readiness()
            body = "".join(f"{line}\n" for line in problems).encode() or b"ready\n"
            reply = _response("503 Service Unavailable" if problems else "200 OK", body)
        elif path != "/metrics":
            reply = _response("404 Not Found", b"not found\n")
        elif method not in ("GET", "HEAD"):
            reply = _response("405 Method Not Allowed", b"method not allowed\n")
        else:
            body = telemetry.prometheus_text().encode()
            reply = _response("200 OK", body, CONTENT_TYPE)
            if method == "HEAD":
                reply = reply[: len(reply) - len(body)]
        writer.write(reply)
        await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
            ConnectionError):  # fmt: skip
        pass
    except Exception:
        log.exception("metrics request failed")
        writer.write(_response("500 Internal Server Error", b"error\n"))
    finally:
        writer.close()


async def serve_metrics(
    telemetry: Telemetry,
    host: str,
    port: int,
    *,
    readiness: Callable[[], list[str]] | None = None,
) -> asyncio.Server:
    """Serve ``GET /metrics`` on ``host:port`` (404 for any other path) until closed.

    A deliberately tiny HTTP/1.1 server (one request per connection) so a gateway worker
    needs no web framework. Port 0 picks a free port (see ``server.sockets``). With
    ``readiness``, ``GET /readyz`` answers 200 ``ready``, or 503 with what it returns (what
    is missing, one line each).
    """

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _handle(telemetry, readiness, reader, writer)

    return await asyncio.start_server(handler, host, port, limit=_REQUEST_LIMIT)


# --- trace context -----------------------------------------------------------------------


def trace_detail(
    detail: Mapping[str, Any] | None = None, span: trace.Span | None = None
) -> dict[str, Any]:
    """A copy of ``detail`` with ``trace_id`` (32 hex digits) of ``span`` or the current span.

    Unchanged (but copied) when there is no valid span: e.g. the SDK is disabled.
    """
    result = dict(detail or {})
    context = (span or trace.get_current_span()).get_span_context()
    if context.is_valid:
        result["trace_id"] = trace.format_trace_id(context.trace_id)
    return result
