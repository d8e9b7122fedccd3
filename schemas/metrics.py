"""The metric contract both planes share: every instrument's name, kind, unit and buckets.

Invariants:

* The names in `METRICS` are a contract: dashboards and alert rules
  (``deploy/observability``) use their Prometheus form (`schemas.prometheus.prometheus_names`),
  and a test checks every query against it. Rename one only together with those files.
* Instruments are created only through `instrument` (or `counter`, `histogram`), so both
  planes agree on kind, unit, description and histogram buckets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

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

__all__ = ["METRICS", "MetricKind", "MetricSpec", "counter", "histogram", "instrument"]

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
EVENTS_MISSING = MetricSpec(
    "devicegate.events.missing", "observable_counter", "{event}",
    "Auth events this worker had shipped that PostgreSQL lacked at start (a database "
    "restored from an older backup: 'database behind spool'; recorded in an events_missing "
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
    EVENTS_MISSING, EVENTS_BATCH_SIZE, EVENTS_FLUSH_DURATION, REVOCATION_STATE_AGE, ENROLLMENTS,
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
