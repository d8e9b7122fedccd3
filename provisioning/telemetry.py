"""The provisioning service's metrics and request spans.

Invariants:

* One span per HTTP request (`telemetry_middleware`), current while the handler runs, so
  `phase` opens its children (``token_check``, ``csr_validation``, ``signing``,
  ``storing``) from anywhere below without passing anything around.
* Span attributes are set only through `annotate`, which accepts the four known keys
  (fleet, device_id, outcome, reason) and drops anything named like a secret: a bootstrap
  token, an admin key or a private key never reaches a span.
* Enrollment metrics come from the middleware (route -> operation, status and problem
  reason -> outcome and reason), so handlers and the service need no metric calls.
* ``certificates.expiring`` is refreshed by a background query (`refresh_expiring`, every
  minute); the observable gauge only reads the cached counts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.trace import Span, SpanKind, Tracer

from schemas.logs import is_sensitive_key
from schemas.metrics import (
    CERTIFICATES_EXPIRING,
    ENROLLMENT_DURATION,
    ENROLLMENTS,
    counter,
    histogram,
    instrument,
)
from schemas.prometheus import CONTENT_TYPE
from schemas.telemetry import Telemetry

if TYPE_CHECKING:
    from aiohttp.typedefs import Middleware

__all__ = [
    "EXPIRING_QUERY",
    "OPERATIONS",
    "PHASES",
    "ProvisioningMetrics",
    "annotate",
    "metrics_handler",
    "phase",
    "request_span",
    "telemetry_middleware",
]

log = logging.getLogger("devicegate.provisioning")

PHASES: Final = ("token_check", "csr_validation", "signing", "storing")
"""Child spans of an enrollment or renewal request."""

OPERATIONS: Final = {
    "/v1/enroll": "enroll",
    "/.well-known/est/simpleenroll": "enroll",
    "/v1/renew": "renew",
    "/.well-known/est/simplereenroll": "renew",
}
"""Request paths counted in ``devicegate.enrollments``, and their operation."""

EXPIRING_QUERY: Final = """
SELECT d.fleet, count(*) AS expiring
FROM certificates c JOIN devices d ON d.device_id = c.device_id
WHERE c.status = 'active' AND c.not_after < now() + interval '7 days'
GROUP BY d.fleet
"""
"""Active certificates expiring within 7 days, per fleet (uses certificates_not_after_idx)."""

_ALLOWED_ATTRIBUTES: Final = {
    "fleet": "devicegate.fleet",
    "device_id": "devicegate.device_id",
    "outcome": "devicegate.outcome",
    "reason": "devicegate.reason",
}
_PROBLEM = "application/problem+json"


class ProvisioningMetrics:
    """The provisioning service's instruments.

    Args:
        meter: ``Telemetry.meter``.
    """

    def __init__(self, *, meter: Meter) -> None:
        self.enrollments = counter(meter, ENROLLMENTS)
        self.duration = histogram(meter, ENROLLMENT_DURATION)
        self._lock = threading.Lock()
        self._expiring: dict[str, int] | None = None
        instrument(meter, CERTIFICATES_EXPIRING, [self._observe_expiring])

    def enrollment(self, *, operation: str, outcome: str, reason: str, seconds: float) -> None:
        """One enrollment or renewal request answered."""
        self.enrollments.add(1, {"operation": operation, "outcome": outcome, "reason": reason})
        self.duration.record(seconds, {"operation": operation, "outcome": outcome})

    def set_expiring(self, counts: Mapping[str, int]) -> None:
        """Cached counts of certificates expiring within 7 days, per fleet."""
        with self._lock:
            self._expiring = dict(counts)

    async def refresh_expiring(self, pool: Any) -> None:
        """Run `EXPIRING_QUERY` on ``pool`` (an asyncpg pool or connection) and cache it."""
        rows = await pool.fetch(EXPIRING_QUERY)
        self.set_expiring({row["fleet"]: int(row["expiring"]) for row in rows})

    async def run_expiring_refresher(self, pool: Any, *, interval: float = 60.0) -> None:
        """Refresh every ``interval`` seconds until cancelled; failures are logged."""
        while True:
            try:
                await self.refresh_expiring(pool)
            except Exception as exc:  # a metric must not take the service down
                log.warning("counting expiring certificates failed: %s", exc)
            await asyncio.sleep(interval)

    def _observe_expiring(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            counts = self._expiring
        if counts is None:
            return
        if not counts:
            yield Observation(0, {"fleet": ""})
        for fleet, count in sorted(counts.items()):
            yield Observation(count, {"fleet": fleet})


# --- spans -------------------------------------------------------------------------------


def annotate(span: Span | None = None, **attributes: str | None) -> None:
    """Set fleet, device_id, outcome, reason on the request span (current by default).

    Any other key is dropped (with a debug log), so a token or key cannot be attached.
    """
    target = span if span is not None else trace.get_current_span()
    if not target.is_recording():  # sampled out: every attribute would be dropped anyway
        return
    for key, value in attributes.items():
        name = _ALLOWED_ATTRIBUTES.get(key)
        if name is None or is_sensitive_key(key):
            log.debug("span attribute %r not allowed; dropped", key)
            continue
        if value is not None:
            target.set_attribute(name, str(value))


@contextmanager
def request_span(tracer: Tracer, *, method: str, route: str) -> Iterator[Span]:
    """The server span of one request, current inside the block.

    Only the method and the route template are recorded: never the query string or the
    headers (they may carry a token).
    """
    with tracer.start_as_current_span(
        f"{method} {route}",
        kind=SpanKind.SERVER,
        attributes={"http.request.method": method, "http.route": route},
    ) as span:
        yield span


@contextmanager
def phase(name: str, *, tracer: Tracer | None = None) -> Iterator[Span]:
    """A child of the current span: ``with phase("signing"): ...`` (see `PHASES`).

    Uses ``tracer``, else the one `telemetry_middleware` registered (`use_tracer`), else the
    global one. Without ``tracer``, inside a span that is not recorded (sampled out: spans
    are not exported) no child is opened and the current span is yielded: a child of a
    sampled-out parent is not recorded either, and creating it costs a request real CPU.
    """
    current = trace.get_current_span()
    if tracer is None and not current.is_recording() and current.get_span_context().is_valid:
        # The request span was sampled out (spans not exported): its children would be too,
        # so opening them buys nothing; logs keep the request's trace id.
        yield current
        return
    chosen = tracer or _PHASE_TRACER.get(trace.get_tracer("devicegate.provisioning"))
    with chosen.start_as_current_span(name) as span:
        yield span


class _PhaseTracer:
    """Where `phase` finds its tracer: the one the middleware registered, else global."""

    def __init__(self) -> None:
        self.tracer: Tracer | None = None

    def get(self, fallback: Tracer) -> Tracer:
        return self.tracer if self.tracer is not None else fallback


_PHASE_TRACER = _PhaseTracer()


def use_tracer(tracer: Tracer) -> None:
    """Make `phase` open its spans with ``tracer`` (the middleware calls this)."""
    _PHASE_TRACER.tracer = tracer


# --- aiohttp -----------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _problem_reason(response: web.StreamResponse) -> str | None:
    if not isinstance(response, web.Response) or response.content_type != _PROBLEM:
        return None
    body: Any = response.body
    if not isinstance(body, bytes):  # a str body is a StringPayload
        decode = getattr(body, "decode", None)  # aiohttp >= 3.12
        body = decode() if decode is not None else getattr(body, "_value", None)
    if not isinstance(body, (bytes, str)):
        return None
    try:
        reason = json.loads(body).get("reason")
    except (ValueError, AttributeError):
        return None
    return reason if isinstance(reason, str) else None


def telemetry_middleware(
    telemetry: Telemetry, metrics: ProvisioningMetrics | None = None
) -> Middleware:
    """An aiohttp middleware: one span per request, enrollment metrics for `OPERATIONS`.

    Put it first (outermost), before ``problems_middleware``, so it sees the final status
    and the problem reason.
    """
    tracer = telemetry.tracer
    use_tracer(tracer)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        operation = OPERATIONS.get(request.path)
        with request_span(tracer, method=request.method, route=_route(request)) as span:
            try:
                response = await handler(request)
            except web.HTTPException as exc:  # raised responses (redirects, bare 404s)
                span.set_attribute("http.response.status_code", exc.status)
                _finish(span, metrics, operation, exc.status, None, started)
                raise
            span.set_attribute("http.response.status_code", response.status)
            _finish(span, metrics, operation, response.status, response, started)
            return response

    return middleware


def _finish(
    span: Span,
    metrics: ProvisioningMetrics | None,
    operation: str | None,
    status: int,
    response: web.StreamResponse | None,
    started: float,
) -> None:
    outcome = "allowed" if status < 400 else "denied"
    reason = "ok" if status < 400 else None
    if reason is None and response is not None:
        reason = _problem_reason(response)
    reason = reason or ("internal_error" if status >= 500 else "request_invalid")
    annotate(span, outcome=outcome, reason=reason)
    if status >= 500:
        span.set_status(trace.StatusCode.ERROR)
    if metrics is not None and operation is not None:
        metrics.enrollment(
            operation=operation,
            outcome=outcome,
            reason=reason,
            seconds=time.perf_counter() - started,
        )


def metrics_handler(telemetry: Telemetry) -> Handler:
    """An aiohttp handler serving `Telemetry.prometheus_text` (for ``web.get("/metrics", ...)``).

    Prefer `schemas.telemetry.serve_metrics` on ``Settings.metrics_listen``: the HTTPS
    listener faces devices, and metrics belong on the loopback/cluster-internal port.
    """

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=telemetry.prometheus_text().encode(),
            headers={"Content-Type": CONTENT_TYPE},
        )

    return handler
