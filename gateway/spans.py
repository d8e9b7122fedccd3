"""The span of one connection: its root, the handshake and phases, its decision.

Invariants:

* Spans per connection, never per packet: a root ``devicegate.connection`` from accept
  (past the limits) to close, a ``handshake`` child and a few phases (``authorize``,
  ``upstream_dial``). A sampled-out connection keeps its trace id (for logs and events)
  and gets no children.
* The trace id goes into every auth event's detail before the event is chained
  (`ConnectionTrace.stamp`, `with_trace_id`), so logs, spans and the audit log meet.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Tracer

from schemas.events import AuthEvent, EventType, Outcome, Reason
from schemas.telemetry import trace_detail

__all__ = [
    "ATTR_DEVICE",
    "ATTR_FLEET",
    "ATTR_OUTCOME",
    "ATTR_PEER",
    "ATTR_REASON",
    "ConnectionTrace",
    "connection_span",
    "with_trace_id",
]

ATTR_PEER = "devicegate.peer"
ATTR_DEVICE = "devicegate.device_id"
ATTR_FLEET = "devicegate.fleet"
ATTR_OUTCOME = "devicegate.outcome"
ATTR_REASON = "devicegate.reason"


class ConnectionTrace:
    """The span of one connection attempt, for callback-style code (an asyncio.Protocol).

    The root span ``devicegate.connection`` starts at once, with a ``handshake`` child that
    ends in `handshake_done` (or `end`). `phase` opens further children (``authorize``,
    ``upstream_dial``). `decided` sets outcome and reason; `end` adds a ``session_end``
    event if the session was admitted, and ends everything (idempotent).
    """

    __slots__ = (
        "_admitted",
        "_ctx",
        "_decided",
        "_ended",
        "_handshake",
        "_tracer",
        "recording",
        "span",
    )

    def __init__(self, tracer: Tracer, *, peer: str | None) -> None:
        self._tracer = tracer
        attributes = {ATTR_PEER: peer} if peer is not None else None
        self.span: Span = tracer.start_span(
            "devicegate.connection", kind=SpanKind.SERVER, attributes=attributes
        )
        # A sampled-out connection keeps its trace id (for logs and events) but gets no
        # children: they would cost as much as the root and record nothing.
        self.recording = self.span.is_recording()
        self._ctx = trace.set_span_in_context(self.span) if self.recording else None
        self._handshake: Span | None = (
            tracer.start_span("handshake", context=self._ctx) if self.recording else None
        )
        self._admitted = False
        self._decided = False
        self._ended = False

    @property
    def trace_id(self) -> str | None:
        """32 hex digits, or ``None`` when tracing is disabled."""
        context = self.span.get_span_context()
        return trace.format_trace_id(context.trace_id) if context.is_valid else None

    def handshake_done(
        self,
        *,
        device_id: str | None = None,
        fleet: str | None = None,
        failure: Reason | None = None,
    ) -> None:
        """The TLS handshake finished (``failure``: it or the certificate was refused)."""
        if device_id is not None:
            self.span.set_attribute(ATTR_DEVICE, device_id)
        if fleet is not None:
            self.span.set_attribute(ATTR_FLEET, fleet)
        handshake, self._handshake = self._handshake, None
        if handshake is not None:
            if failure is not None:
                handshake.set_attribute(ATTR_REASON, failure.value)
            handshake.end()
        if failure is not None:
            self.decided(Outcome.DENIED, failure)

    @contextmanager
    def phase(self, name: str) -> Iterator[Span]:
        """A child span, current inside the block: ``with trace.phase("authorize"): ...``."""
        if not self.recording:
            yield self.span
            return
        span = self._tracer.start_span(name, context=self._ctx)
        with trace.use_span(span, end_on_exit=True):
            yield span

    def decided(self, outcome: Outcome, reason: Reason) -> None:
        """The admission decision (allowed + ok marks the session admitted)."""
        self.span.set_attribute(ATTR_OUTCOME, outcome.value)
        self.span.set_attribute(ATTR_REASON, reason.value)
        self._admitted = outcome is Outcome.ALLOWED
        self._decided = True

    def stamp(self, event: AuthEvent) -> AuthEvent:
        """``event`` with this connection's ``trace_id`` in its detail (before it is chained).

        Also takes the decision from admission events (``tls_handshake``, ``connect``).
        """
        if event.type is EventType.CONNECT or event.type is EventType.TLS_HANDSHAKE:
            self.decided(event.outcome, event.reason)
        context = self.span.get_span_context()
        if not context.is_valid:
            return event
        return event.model_copy(update={"detail": with_trace_id(event.detail, self.span)})

    def end(self, cause: Reason | None = None) -> None:
        """The connection is closed; ``cause`` is why (a session-end reason)."""
        if self._ended:
            return
        self._ended = True
        if self._handshake is not None:
            self._handshake.end()
            self._handshake = None
        if cause is not None:
            if self._admitted:
                self.span.add_event("session_end", {"cause": cause.value})
            elif not self._decided:
                self.decided(Outcome.DENIED, cause)
        self.span.end()


@contextmanager
def connection_span(tracer: Tracer, *, peer: str | None) -> Iterator[ConnectionTrace]:
    """`ConnectionTrace` as a context manager (ends on exit, recording an exception)."""
    conn = ConnectionTrace(tracer, peer=peer)
    try:
        yield conn
    except BaseException as exc:
        conn.span.record_exception(exc)
        conn.end(Reason.INTERNAL_ERROR)
        raise
    finally:
        conn.end()


def with_trace_id(detail: Mapping[str, Any] | None, span: Span | None = None) -> dict[str, Any]:
    """A new detail dict with ``trace_id`` of ``span`` (or the current span), if any."""
    return trace_detail(detail, span)
