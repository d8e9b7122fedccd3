"""Telemetry both planes share: metric names, the OTel SDK setup, /metrics, JSON logs.

Invariants:

* The metric names in `METRICS` are a contract: dashboards and alert rules
  (``deploy/observability``) use their Prometheus form (`prometheus_names`), and a test
  checks every query against it. Rename one only together with those files.
* Instruments are created only through `instrument` (or the named helpers below), so both
  planes agree on kind, unit, description and histogram buckets.
* Prometheus exposition needs no ``prometheus_client``: `PrometheusReader` is a pull
  `MetricReader` (collect on scrape) and `render_prometheus` writes text format 0.0.4.
* OTLP export happens only when asked for: ``otlp=True``, or ``otlp=None`` and an
  ``OTEL_EXPORTER_OTLP_*ENDPOINT`` variable is set. ``OTEL_SDK_DISABLED=true`` turns the SDK
  into no-ops (``/metrics`` then answers an empty page, so probes still pass).
* Logs never carry secrets: `JsonFormatter` replaces the value of any sensitive key
  (`is_sensitive_key`) with ``"[redacted]"`` and scrubs bearer credentials and devicegate
  tokens (``dgt_``/``dgk_``) from message text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

from opentelemetry import trace
from opentelemetry.metrics import (
    CallbackOptions,
    Counter,
    Histogram,
    Meter,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    Observation,
    UpDownCounter,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Metric,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
    Sum,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
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

__all__ = [
    "METRICS",
    "REDACTED",
    "JsonFormatter",
    "MetricKind",
    "MetricSpec",
    "PrometheusReader",
    "Telemetry",
    "configure_logging",
    "instrument",
    "is_sensitive_key",
    "prometheus_names",
    "redact",
    "render_prometheus",
    "serve_metrics",
    "setup_telemetry",
    "trace_detail",
]

log = logging.getLogger("devicegate.telemetry")

# --- the metric contract -----------------------------------------------------------------

MetricKind = Literal[
    "counter",
    "up_down_counter",
    "histogram",
    "observable_counter",
    "observable_up_down_counter",
    "observable_gauge",
]

SECONDS_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
"""Latency buckets (seconds): sub-millisecond fsyncs up to a 10 s dial timeout."""
BATCH_BUCKETS: Final = (
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
)  # fmt: skip
"""Events per shipped batch (the sink's batch_size tops out at 5000)."""


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One instrument of the contract.

    Attributes:
        name: OTel name, under ``devicegate.``.
        kind: instrument kind.
        unit: UCUM unit (``s``, ``By``, ``1``, ``{event}``...).
        description: one line, also the Prometheus HELP text.
        attributes: attribute keys its points carry (documentation and tests).
        buckets: explicit histogram bucket boundaries, histograms only.
    """

    name: str
    kind: MetricKind
    unit: str
    description: str
    attributes: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None


HANDSHAKES = MetricSpec(
    "devicegate.handshakes", "counter", "{connection}",
    "Device connection attempts by admission outcome (TLS handshake and MQTT CONNECT).",
    ("outcome", "reason"),
)  # fmt: skip
SESSIONS_ACTIVE = MetricSpec(
    "devicegate.sessions.active", "observable_up_down_counter", "{session}",
    "Admitted MQTT sessions currently open.",
)  # fmt: skip
SESSIONS_ENDED = MetricSpec(
    "devicegate.sessions.ended", "counter", "{session}",
    "Admitted sessions that ended, by cause (a reason code).", ("cause",),
)  # fmt: skip
MESSAGES = MetricSpec(
    "devicegate.messages", "observable_counter", "{packet}",
    "MQTT packets of admitted sessions; direction in = from devices, out = to devices.",
    ("direction",),
)  # fmt: skip
BYTES = MetricSpec(
    "devicegate.bytes", "observable_counter", "By",
    "MQTT bytes of admitted sessions; direction in = from devices, out = to devices.",
    ("direction",),
)  # fmt: skip
AUTHZ_DENIALS = MetricSpec(
    "devicegate.authz.denials", "counter", "{decision}",
    "Policy denials (publish, subscribe, connect: client id or will topic).",
    ("action", "reason"),
)  # fmt: skip
UPSTREAM_DIAL_DURATION = MetricSpec(
    "devicegate.upstream.dial.duration", "histogram", "s",
    "Time to open the upstream broker connection.", ("outcome",), SECONDS_BUCKETS,
)  # fmt: skip
EVENTS_QUEUE_DEPTH = MetricSpec(
    "devicegate.events.queue.depth", "observable_gauge", "{event}",
    "Auth events recorded but not yet committed in PostgreSQL.",
)  # fmt: skip
EVENTS_SPOOL_BYTES = MetricSpec(
    "devicegate.events.spool.bytes", "observable_gauge", "By",
    "Bytes of event spool segments on local disk.",
)  # fmt: skip
EVENTS_LOST = MetricSpec(
    "devicegate.events.lost", "observable_counter", "{event}",
    "Auth events refused for lack of spool space (each later summarised in an events_lost "
    "event).",
)  # fmt: skip
EVENTS_BATCH_SIZE = MetricSpec(
    "devicegate.events.batch.size", "histogram", "{event}",
    "Events per batch shipped to PostgreSQL.", (), BATCH_BUCKETS,
)  # fmt: skip
EVENTS_FLUSH_DURATION = MetricSpec(
    "devicegate.events.flush.duration", "histogram", "s",
    "Time of one spool group commit (write + fdatasync).", (), SECONDS_BUCKETS,
)  # fmt: skip
REVOCATION_STATE_AGE = MetricSpec(
    "devicegate.revocation.state.age", "observable_gauge", "s",
    "Age of the revocation state; new connections are refused beyond the bound (30 s).",
)  # fmt: skip
ENROLLMENTS = MetricSpec(
    "devicegate.enrollments", "counter", "{request}",
    "Enrollment and renewal requests by operation, outcome and reason.",
    ("operation", "outcome", "reason"),
)  # fmt: skip
ENROLLMENT_DURATION = MetricSpec(
    "devicegate.enrollment.duration", "histogram", "s",
    "Time to answer an enrollment or renewal request.", ("operation", "outcome"),
    SECONDS_BUCKETS,
)  # fmt: skip
CERTIFICATES_EXPIRING = MetricSpec(
    "devicegate.certificates.expiring", "observable_gauge", "{certificate}",
    "Active device certificates expiring within 7 days, by fleet.", ("fleet",),
)  # fmt: skip

METRICS: Final = (
    HANDSHAKES, SESSIONS_ACTIVE, SESSIONS_ENDED, MESSAGES, BYTES, AUTHZ_DENIALS,
    UPSTREAM_DIAL_DURATION, EVENTS_QUEUE_DEPTH, EVENTS_SPOOL_BYTES, EVENTS_LOST,
    EVENTS_BATCH_SIZE, EVENTS_FLUSH_DURATION, REVOCATION_STATE_AGE, ENROLLMENTS,
    ENROLLMENT_DURATION, CERTIFICATES_EXPIRING,
)  # fmt: skip
"""Every instrument devicegate exports."""

Callback = Callable[[CallbackOptions], Iterable[Observation]]
AnyInstrument = (
    Counter | UpDownCounter | Histogram | ObservableCounter | ObservableUpDownCounter
    | ObservableGauge
)  # fmt: skip


def instrument(
    meter: Meter, spec: MetricSpec, callbacks: Sequence[Callback] | None = None
) -> AnyInstrument:
    """Create the instrument ``spec`` describes on ``meter``.

    Args:
        meter: the meter of the plane.
        spec: one of `METRICS`.
        callbacks: for observable kinds, the callbacks that yield its observations. Given
            for a (up-down) counter, they make it the observable counterpart: same name and
            Prometheus type, but counted by the caller in plain ints and read on collection.
    """
    name, unit, doc = spec.name, spec.unit, spec.description
    kind = spec.kind
    if callbacks is not None and kind in ("counter", "up_down_counter"):
        kind = "observable_counter" if kind == "counter" else "observable_up_down_counter"
    if kind == "counter":
        return meter.create_counter(name, unit, doc)
    if kind == "up_down_counter":
        return meter.create_up_down_counter(name, unit, doc)
    if kind == "histogram":
        return meter.create_histogram(
            name, unit, doc, explicit_bucket_boundaries_advisory=spec.buckets
        )
    given = list(callbacks or ())
    if kind == "observable_counter":
        return meter.create_observable_counter(name, given, unit, doc)
    if kind == "observable_up_down_counter":
        return meter.create_observable_up_down_counter(name, given, unit, doc)
    return meter.create_observable_gauge(name, given, unit, doc)


def counter(meter: Meter, spec: MetricSpec) -> Counter:
    """A synchronous counter of the contract (``spec.kind == "counter"``)."""
    made = instrument(meter, spec)
    assert isinstance(made, Counter)
    return made


def histogram(meter: Meter, spec: MetricSpec) -> Histogram:
    """A histogram of the contract, with its buckets."""
    made = instrument(meter, spec)
    assert isinstance(made, Histogram)
    return made


# --- Prometheus names and text format 0.0.4 ----------------------------------------------

_INVALID_NAME = re.compile(r"[^a-zA-Z0-9_:]")
_INVALID_LABEL = re.compile(r"[^a-zA-Z0-9_]")
_UNIT_SUFFIX: Final = {"s": "seconds", "ms": "milliseconds", "By": "bytes"}


def _base_name(name: str, unit: str) -> str:
    """``devicegate.upstream.dial.duration``, ``s`` -> ``..._upstream_dial_duration_seconds``."""
    base = _INVALID_NAME.sub("_", name)
    if base[:1].isdigit():
        base = "_" + base
    suffix = _UNIT_SUFFIX.get(unit)
    if suffix and not base.endswith("_" + suffix):
        base = f"{base}_{suffix}"
    return base


def prometheus_names(spec: MetricSpec) -> tuple[str, ...]:
    """The sample names ``spec`` appears under on ``/metrics`` (what PromQL may use)."""
    base = _base_name(spec.name, spec.unit)
    if spec.kind in ("counter", "observable_counter"):
        return (f"{base}_total",)
    if spec.kind == "histogram":
        return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
    return (base,)


def _label_value(value: object) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, tuple)):
        text = json.dumps(list(value))
    else:
        text = str(value)
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _labels(pairs: Iterable[tuple[str, object]]) -> str:
    parts = [f'{_INVALID_LABEL.sub("_", key)}="{_label_value(value)}"' for key, value in pairs]
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def render_prometheus(
    data: MetricsData | None, const_labels: Mapping[str, str] | None = None
) -> str:
    """Prometheus text format 0.0.4 for collected OTel metrics.

    Monotonic sums become ``counter`` families named ``<name>_total``; other sums and gauges
    become ``gauge``; explicit-bucket histograms become ``histogram`` with cumulative
    ``_bucket{le=...}``, ``_sum`` and ``_count``. Dots (and anything else Prometheus does not
    allow) become underscores, and the unit is appended (``_seconds``, ``_bytes``).
    ``const_labels`` (e.g. ``worker``) come first on every sample. Only cumulative data is
    rendered (the reader asks for cumulative temporality).
    """
    const = list((const_labels or {}).items())
    families: dict[str, list[str]] = {}
    for resource_metrics in data.resource_metrics if data is not None else ():
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                lines = _family(metric, const)
                if lines is None:
                    continue
                name, body = lines
                if name in families:
                    families[name].extend(body[2:])  # same family from another scope
                else:
                    families[name] = body
    return "".join(line + "\n" for body in families.values() for line in body)


def _family(metric: Metric, const: list[tuple[str, str]]) -> tuple[str, list[str]] | None:
    base = _base_name(metric.name, metric.unit or "")
    data = metric.data
    if isinstance(data, Sum) and data.is_monotonic:
        name, kind = f"{base}_total", "counter"
    elif isinstance(data, (Sum, Gauge)):
        name, kind = base, "gauge"
    elif isinstance(data, HistogramData):
        name, kind = base, "histogram"
    else:  # exponential histograms are not used here
        return None
    lines = [f"# HELP {name} {_help(metric.description or '')}", f"# TYPE {name} {kind}"]

    def order(point: Any) -> list[tuple[str, str]]:
        return sorted((k, str(v)) for k, v in (point.attributes or {}).items())

    if isinstance(data, HistogramData):
        for hpoint in sorted(data.data_points, key=order):
            pairs = const + sorted((hpoint.attributes or {}).items())
            running = 0
            bounds = [*hpoint.explicit_bounds, math.inf]
            for bound, count in zip(bounds, hpoint.bucket_counts, strict=True):
                running += count
                labels = _labels([*pairs, ("le", _number(float(bound)))])
                lines.append(f"{base}_bucket{labels} {running}")
            lines.append(f"{base}_sum{_labels(pairs)} {_number(hpoint.sum)}")
            lines.append(f"{base}_count{_labels(pairs)} {hpoint.count}")
    else:
        for npoint in sorted(data.data_points, key=order):
            pairs = const + sorted((npoint.attributes or {}).items())
            lines.append(f"{name}{_labels(pairs)} {_number(npoint.value)}")
    return name, lines


class PrometheusReader(MetricReader):
    """A pull reader: each `render` collects (running observable callbacks) and renders.

    Args:
        const_labels: labels added to every sample (the gateway adds ``worker``).
    """

    def __init__(self, *, const_labels: Mapping[str, str] | None = None) -> None:
        super().__init__()  # cumulative temporality for every kind: the SDK default
        self._const = dict(const_labels or {})
        self._lock = threading.Lock()
        self._latest: MetricsData | None = None

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        self._latest = metrics_data

    def render(self) -> str:
        """Collect now and return the text exposition."""
        with self._lock:
            self._latest = None
            self.collect()
            return render_prometheus(self._latest, self._const)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._latest = None


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

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
_REQUEST_LIMIT = 8192
_REQUEST_TIMEOUT = 5.0


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


async def _handle(
    telemetry: Telemetry, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        async with asyncio.timeout(_REQUEST_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, _, rest = request_line.partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        if path != "/metrics":
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


async def serve_metrics(telemetry: Telemetry, host: str, port: int) -> asyncio.Server:
    """Serve ``GET /metrics`` on ``host:port`` (404 for any other path) until closed.

    A deliberately tiny HTTP/1.1 server (one request per connection) so a gateway worker
    needs no web framework. Port 0 picks a free port (see ``server.sockets``).
    """

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _handle(telemetry, reader, writer)

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


# --- logs --------------------------------------------------------------------------------

REDACTED: Final = "[redacted]"
_SENSITIVE: Final = frozenset(
    {"token", "password", "passphrase", "key", "secret", "authorization", "cookie",
     "credentials", "private_key", "api_key", "bearer", "csr_key"}
)  # fmt: skip
_SENSITIVE_SUFFIXES: Final = tuple(f"_{word}" for word in _SENSITIVE)
_NAME_SPLIT = re.compile(r"[-.\s]")
_SECRET_TEXT = [
    (re.compile(r"\b(dg[tk]_)[A-Za-z0-9_\-]+"), r"\1" + REDACTED),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]+"), r"\1 " + REDACTED),
    (re.compile(r"(://[^:/@\s]+):[^@\s]*@"), r"\1:***@"),
]


def is_sensitive_key(name: str) -> bool:
    """Whether a field named ``name`` may hold a secret (``token``, ``ca_passphrase``,
    ``Authorization``, ``admin_key``...). ``token_id`` and ``key_type`` are not secrets."""
    key = _NAME_SPLIT.sub("_", name.lower())
    return key in _SENSITIVE or key.endswith(_SENSITIVE_SUFFIXES)


def _scrub(text: str) -> str:
    for pattern, replacement in _SECRET_TEXT:
        text = pattern.sub(replacement, text)
    return text


def redact(value: Any, _depth: int = 0) -> Any:
    """``value`` with sensitive keys' values replaced, recursively; strings scrubbed."""
    if _depth > 8:
        return REDACTED
    if isinstance(value, Mapping):
        return {
            str(k): REDACTED if is_sensitive_key(str(k)) else redact(v, _depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple, set, frozenset)):
        return [redact(v, _depth + 1) for v in value]
    if isinstance(value, str):
        return _scrub(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return _scrub(str(value))


_RESERVED: Final = frozenset(
    logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None).__dict__
) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, trace_id/span_id when a span
    is active, exception text, and every ``extra`` field, with secrets redacted."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": _scrub(record.getMessage()),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            entry["trace_id"] = trace.format_trace_id(context.trace_id)
            entry["span_id"] = trace.format_span_id(context.span_id)
        for name, value in record.__dict__.items():
            if name in _RESERVED or name.startswith("_") or name in entry:
                continue
            entry[name] = REDACTED if is_sensitive_key(name) else redact(value)
        if record.exc_info:
            entry["exception"] = _scrub(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, ensure_ascii=False, default=str, separators=(",", ":"))


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _scrub(super().format(record))


_HANDLER_MARK = "_devicegate_handler"


class _Fields(logging.Filter):
    """Adds fixed fields (e.g. ``worker``) to every record the handler writes."""

    def __init__(self, fields: Mapping[str, object]) -> None:
        super().__init__()
        self.fields = dict(fields)

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in self.fields.items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


def configure_logging(
    fmt: Literal["json", "text"],
    level: int | str = logging.INFO,
    *,
    fields: Mapping[str, object] | None = None,
) -> None:
    """Send the root logger's records to stderr in ``fmt`` (``Settings.log_format``).

    ``fields`` are added to every line (a gateway worker adds ``worker``): JSON keys, or
    ``name[key=value]`` after the logger name in text.

    Idempotent: a handler installed by an earlier call is replaced, others are left alone.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        tag = ",".join(f"{key}={value}" for key, value in (fields or {}).items())
        name = f"%(name)s[{tag}]" if tag else "%(name)s"
        handler.setFormatter(_TextFormatter(f"%(asctime)s %(levelname)s {name} %(message)s"))
    if fields:
        handler.addFilter(_Fields(fields))
    root.addHandler(handler)
    root.setLevel(level)
