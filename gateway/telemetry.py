"""The gateway's metrics and its audit log lines, kept off the per-packet path.

Invariants:

* Nothing here is called per packet. Message and byte counts are the counters the sans-IO
  `gateway.connection.Session` already keeps (``packets_in``, ``bytes_in``, ``bytes_out``,
  ``downstream.packets``); `GatewayMetrics` reads them only when metrics are collected
  (observable counters): the sessions it tracks plus the totals folded in from ended ones.
* Per connection: `GatewayMetrics.observe_event` and `log_event` (once per recorded auth
  event, in `ObservingSink`; INFO for denials, DEBUG for what was allowed),
  `session_started` / `session_ended` (admission and close), `connection` (a
  `gateway.spans.ConnectionTrace`: a few spans), `time_dial` (one histogram record).
* Collection may run on another thread (the OTLP exporter's): the fold of an ending session
  and the snapshot of the live ones happen under one lock, so every session is counted
  either live or folded, never both, and the counters never go down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Final, Protocol

from opentelemetry.metrics import CallbackOptions, Histogram, Meter, Observation
from opentelemetry.trace import Tracer

from gateway.spans import ConnectionTrace
from schemas.events import AuthEvent, EventType, Outcome, Reason
from schemas.metrics import (
    AUTHZ_DENIALS,
    BYTES,
    EVENTS_BATCH_SIZE,
    EVENTS_FLUSH_DURATION,
    EVENTS_LOST,
    EVENTS_MISSING,
    EVENTS_QUEUE_DEPTH,
    EVENTS_SPOOL_BYTES,
    HANDSHAKES,
    MESSAGES,
    REVOCATION_STATE_AGE,
    SESSIONS_ACTIVE,
    SESSIONS_ENDED,
    UPSTREAM_DIAL_DURATION,
    histogram,
    instrument,
)

__all__ = ["GatewayMetrics", "ObservingSink", "SessionCounters", "log_event"]

_AUTHZ_CONNECT_REASONS = frozenset({Reason.CLIENT_ID_MISMATCH, Reason.TOPIC_NOT_AUTHORIZED})
# Accept-time refusals: counted one by one by `GatewayMetrics.refused` when they happen;
# their events are throttled summaries (``detail.count`` = how many), not attempts.
_COUNTED_AT_ACCEPT = frozenset({Reason.RATE_LIMITED, Reason.TOO_MANY_CONNECTIONS})

audit_log = logging.getLogger("devicegate.gateway.audit")
"""One line per auth event (the decision), with its fields and trace id: INFO when denied,
DEBUG when allowed (set this logger to DEBUG to see every admission and session end)."""


class _Downstream(Protocol):
    @property
    def packets(self) -> int: ...


class SessionCounters(Protocol):
    """What `GatewayMetrics` reads from a session (`gateway.connection.Session` has it)."""

    @property
    def packets_in(self) -> int: ...

    @property
    def bytes_in(self) -> int: ...

    @property
    def bytes_out(self) -> int: ...

    @property
    def downstream(self) -> _Downstream: ...


class _SinkStats(Protocol):
    @property
    def queue_depth(self) -> int: ...

    @property
    def spool_bytes(self) -> int: ...

    @property
    def events_lost_total(self) -> int: ...

    @property
    def events_missing_total(self) -> int: ...


_DIAL_OK: Final = {"outcome": "ok"}
_DIAL_ERROR: Final = {"outcome": "error"}


class _DialTimer:
    """`GatewayMetrics.time_dial`: a plain context manager (cheaper than a generator's)."""

    __slots__ = ("_histogram", "_started")

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._started = time.perf_counter()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        elapsed = time.perf_counter() - self._started
        self._histogram.record(elapsed, _DIAL_OK if exc_type is None else _DIAL_ERROR)


class GatewayMetrics:
    """The instruments of one gateway worker and the cheap calls that feed them.

    Args:
        meter: ``Telemetry.meter``.
        tracer: ``Telemetry.tracer``.
    """

    def __init__(self, *, meter: Meter, tracer: Tracer) -> None:
        self.tracer = tracer
        self._lock = threading.Lock()
        self._live: set[SessionCounters] = set()
        # Totals of ended sessions: packets in, packets out, bytes in, bytes out.
        self._folded = [0, 0, 0, 0]
        self._sink_stats: Callable[[], _SinkStats] | None = None
        self._revocation_age: Callable[[], float | None] | None = None

        # (outcome, reason), (cause,), (action, reason) -> count: a dict increment costs a
        # fraction of a microsecond, an SDK Counter.add with attributes tens of them.
        self.handshakes: dict[tuple[str, str], int] = {}
        self.sessions_ended: dict[str, int] = {}
        self.authz_denials: dict[tuple[str, str], int] = {}
        instrument(meter, HANDSHAKES, [self._observe_handshakes])
        instrument(meter, SESSIONS_ENDED, [self._observe_ended])
        instrument(meter, AUTHZ_DENIALS, [self._observe_denials])
        self.dial_duration = histogram(meter, UPSTREAM_DIAL_DURATION)
        self.batch_size = histogram(meter, EVENTS_BATCH_SIZE)
        self.flush_duration = histogram(meter, EVENTS_FLUSH_DURATION)
        instrument(meter, SESSIONS_ACTIVE, [self._observe_active])
        instrument(meter, MESSAGES, [self._observe_messages])
        instrument(meter, BYTES, [self._observe_bytes])
        instrument(meter, EVENTS_QUEUE_DEPTH, [self._observe_queue])
        instrument(meter, EVENTS_SPOOL_BYTES, [self._observe_spool])
        instrument(meter, EVENTS_LOST, [self._observe_lost])
        instrument(meter, EVENTS_MISSING, [self._observe_missing])
        instrument(meter, REVOCATION_STATE_AGE, [self._observe_revocation])

    # --- sources read at collection -----------------------------------------------------

    def watch_sink(self, stats: Callable[[], _SinkStats]) -> None:
        """Read queue depth, spool bytes and lost events from ``stats()`` (e.g.
        ``lambda: sink.stats``)."""
        self._sink_stats = stats

    def watch_revocation(self, age: Callable[[], float | None]) -> None:
        """Read the revocation state's age in seconds (``None``: unknown, not reported)."""
        self._revocation_age = age

    # --- per connection -----------------------------------------------------------------

    def observe_event(self, event: AuthEvent) -> None:
        """Count what one auth event says: handshakes (admission outcome) and authz denials.

        ``tls_handshake`` and ``connect`` events are the admission decisions: an allowed
        ``connect`` is the admission, a denied one (or a refused handshake) the refusal.
        """
        kind = event.type
        if (
            kind is EventType.TLS_HANDSHAKE
            and "count" in event.detail
            and (event.reason in _COUNTED_AT_ACCEPT)
        ):
            return  # a throttled summary of refusals already counted by `refused`
        if kind is EventType.TLS_HANDSHAKE or kind is EventType.CONNECT:
            key = (event.outcome.value, event.reason.value)
            # An over-budget address's failed handshakes, and a device's CONNECTs over its
            # connect budget, come as summaries (`count`).
            count = event.detail.get("count", 1)
            self.handshakes[key] = self.handshakes.get(key, 0) + (
                count if isinstance(count, int) else 1
            )
            if kind is EventType.CONNECT and event.reason in _AUTHZ_CONNECT_REASONS:
                key = ("connect", event.reason.value)
                self.authz_denials[key] = self.authz_denials.get(key, 0) + 1
        elif (kind is EventType.PUBLISH or kind is EventType.SUBSCRIBE) and (
            event.outcome is Outcome.DENIED
        ):
            # One event may stand for many denials (a SUBSCRIBE's filters, a window's
            # summary: `gateway.denials`); the counter counts denials.
            key = (kind.value, event.reason.value)
            count = event.detail.get("count", 1)
            self.authz_denials[key] = self.authz_denials.get(key, 0) + count

    def refused(self, reason: Reason) -> None:
        """A connection refused without an auth event (e.g. too_many_connections at accept)."""
        key = (Outcome.DENIED.value, reason.value)
        self.handshakes[key] = self.handshakes.get(key, 0) + 1

    def session_started(self, session: SessionCounters) -> None:
        """An admitted session: its packets and bytes count from now on (from its start)."""
        with self._lock:
            self._live.add(session)

    def session_ended(self, session: SessionCounters, cause: Reason) -> None:
        """The session is over (idempotent; ignored for a session never started)."""
        with self._lock:
            if session not in self._live:
                return
            self._live.discard(session)
            folded = self._folded
            folded[0] += session.packets_in
            folded[1] += session.downstream.packets
            folded[2] += session.bytes_in
            folded[3] += session.bytes_out
        self.sessions_ended[cause.value] = self.sessions_ended.get(cause.value, 0) + 1

    def time_dial(self) -> _DialTimer:
        """Time the upstream dial: ``with metrics.time_dial(): await dial(...)``."""
        return _DialTimer(self.dial_duration)

    def connection(self, *, peer: str | None) -> ConnectionTrace:
        """Start the span of one connection attempt (see `ConnectionTrace`)."""
        return ConnectionTrace(self.tracer, peer=peer)

    # --- event sink hooks (once per group commit / per batch) --------------------------

    def flushed(self, seconds: float) -> None:
        """One spool group commit (write + fdatasync) took ``seconds``."""
        self.flush_duration.record(seconds)

    def shipped(self, batch_size: int) -> None:
        """One batch of ``batch_size`` events was committed in PostgreSQL."""
        self.batch_size.record(batch_size)

    # --- observable callbacks ----------------------------------------------------------

    def totals(self) -> tuple[int, int, int, int]:
        """(packets in, packets out, bytes in, bytes out) of every admitted session so far."""
        with self._lock:
            live = list(self._live)
            p_in, p_out, b_in, b_out = self._folded
        for session in live:
            p_in += session.packets_in
            p_out += session.downstream.packets
            b_in += session.bytes_in
            b_out += session.bytes_out
        return p_in, p_out, b_in, b_out

    def _observe_handshakes(self, options: CallbackOptions) -> Iterable[Observation]:
        for (outcome, reason), count in dict(self.handshakes).items():
            yield Observation(count, {"outcome": outcome, "reason": reason})

    def _observe_ended(self, options: CallbackOptions) -> Iterable[Observation]:
        for cause, count in dict(self.sessions_ended).items():
            yield Observation(count, {"cause": cause})

    def _observe_denials(self, options: CallbackOptions) -> Iterable[Observation]:
        for (action, reason), count in dict(self.authz_denials).items():
            yield Observation(count, {"action": action, "reason": reason})

    def _observe_active(self, options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(len(self._live))

    def _observe_messages(self, options: CallbackOptions) -> Iterable[Observation]:
        p_in, p_out, _, _ = self.totals()
        yield Observation(p_in, {"direction": "in"})
        yield Observation(p_out, {"direction": "out"})

    def _observe_bytes(self, options: CallbackOptions) -> Iterable[Observation]:
        _, _, b_in, b_out = self.totals()
        yield Observation(b_in, {"direction": "in"})
        yield Observation(b_out, {"direction": "out"})

    def _observe_queue(self, options: CallbackOptions) -> Iterable[Observation]:
        if self._sink_stats is not None:
            yield Observation(self._sink_stats().queue_depth)

    def _observe_spool(self, options: CallbackOptions) -> Iterable[Observation]:
        if self._sink_stats is not None:
            yield Observation(self._sink_stats().spool_bytes)

    def _observe_lost(self, options: CallbackOptions) -> Iterable[Observation]:
        if self._sink_stats is not None:
            yield Observation(self._sink_stats().events_lost_total)

    def _observe_missing(self, options: CallbackOptions) -> Iterable[Observation]:
        if self._sink_stats is not None:
            yield Observation(self._sink_stats().events_missing_total)

    def _observe_revocation(self, options: CallbackOptions) -> Iterable[Observation]:
        if self._revocation_age is not None:
            age = self._revocation_age()
            if age is not None:
                yield Observation(age)


class ObservingSink:
    """An `gateway.audit.EventSink` that feeds `GatewayMetrics.observe_event`, then delegates.

    Denials are counted before they are stored (so they count even when the spool is full);
    an allowed ``connect`` only once durable, because admission depends on that. Each event
    is also logged once on ``devicegate.gateway.audit`` (`log_event`).
    """

    def __init__(self, inner: Any, metrics: GatewayMetrics) -> None:
        self.inner = inner
        self.metrics = metrics

    async def record(self, event: AuthEvent) -> None:
        if event.outcome is Outcome.ALLOWED and event.type is EventType.CONNECT:
            await self.inner.record(event)
            self.metrics.observe_event(event)
            log_event(event)
            return
        self.metrics.observe_event(event)
        log_event(event)
        await self.inner.record(event)


def log_event(event: AuthEvent) -> None:
    """One log line for one auth event: its identifying fields and trace id, never detail.

    The detail is left out (it is in the audit log) except ``trace_id`` and the ``count``
    of denials one event stands for: nothing that could be a secret. Denials are logged
    at INFO, allowed decisions (admissions, normal session ends) at DEBUG: two INFO lines
    per connection cost about a tenth of a gateway's CPU per handshake, and the audit log
    already holds every event durably.
    Nothing is done when the logger is above the line's level.
    """
    level = logging.INFO if event.outcome is Outcome.DENIED else logging.DEBUG
    if not audit_log.isEnabledFor(level):
        return
    extra = {
        "event_id": str(event.id),
        "type": event.type.value,
        "outcome": event.outcome.value,
        "reason": event.reason.value,
        "device_id": event.device_id,
        "fleet": event.fleet,
        "client_id": event.client_id,
        "cert_serial": event.cert_serial,
        "peer_address": event.peer_address,
        "trace_id": event.detail.get("trace_id"),
    }
    if "count" in event.detail:  # denials summed up in one event (`gateway.denials`)
        extra["count"] = event.detail["count"]
    audit_log.log(
        level, "%s %s %s", event.type.value, event.outcome.value, event.reason.value, extra=extra
    )
