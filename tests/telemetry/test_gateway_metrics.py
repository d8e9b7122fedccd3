"""GatewayMetrics over a scripted sequence, and the connection span tree."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from gateway.connection import Session
from gateway.spans import connection_span
from gateway.telemetry import GatewayMetrics, ObservingSink, SessionCounters
from schemas.events import AuthEvent, EventType, Outcome, Reason
from tests.telemetry.conftest import Harness


def _typecheck(session: Session) -> SessionCounters:
    return session  # mypy: the real Session is what GatewayMetrics reads


@dataclass
class _Downstream:
    packets: int = 0


@dataclass(eq=False)
class FakeSession:
    packets_in: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    downstream: _Downstream = field(default_factory=_Downstream)


class MemorySink:
    def __init__(self) -> None:
        self.events: list[AuthEvent] = []
        self.fail = False

    async def record(self, event: AuthEvent) -> None:
        if self.fail:
            raise OSError("spool full")
        self.events.append(event)


@dataclass
class Stats:
    queue_depth: int
    spool_bytes: int
    events_lost_total: int = 0
    events_missing_total: int = 0


def _event(type_: EventType, reason: Reason, outcome: Outcome | None = None) -> AuthEvent:
    if outcome is None:
        outcome = Outcome.ALLOWED if reason is Reason.OK else Outcome.DENIED
    return AuthEvent(instance="gw/w0", type=type_, outcome=outcome, reason=reason)


@pytest.fixture
def metrics(harness: Harness) -> GatewayMetrics:
    return GatewayMetrics(meter=harness.telemetry.meter, tracer=harness.telemetry.tracer)


async def test_scripted_sequence(harness: Harness, metrics: GatewayMetrics) -> None:
    inner = MemorySink()
    sink = ObservingSink(inner, metrics)
    n = 1000

    # 1. A device connects and is admitted.
    await sink.record(_event(EventType.CONNECT, Reason.OK))
    s1 = FakeSession(packets_in=1, bytes_in=30)  # its CONNECT
    metrics.session_started(s1)
    # 2. Two devices are refused, at TLS and at CONNECT.
    await sink.record(_event(EventType.TLS_HANDSHAKE, Reason.CERTIFICATE_EXPIRED))
    await sink.record(_event(EventType.CONNECT, Reason.CLIENT_ID_MISMATCH))
    metrics.refused(Reason.TOO_MANY_CONNECTIONS)  # refused at accept, no event
    # 3. N messages each way, counted only by the session itself (the hot path).
    for _ in range(n):
        s1.packets_in += 1
        s1.bytes_in += 20
        s1.downstream.packets += 1
        s1.bytes_out += 10
    await sink.record(_event(EventType.PUBLISH, Reason.TOPIC_NOT_AUTHORIZED))

    handshakes = harness.points("devicegate.handshakes")
    assert handshakes == {
        (("outcome", "allowed"), ("reason", "ok")): 1,
        (("outcome", "denied"), ("reason", "certificate_expired")): 1,
        (("outcome", "denied"), ("reason", "client_id_mismatch")): 1,
        (("outcome", "denied"), ("reason", "too_many_connections")): 1,
    }
    assert harness.points("devicegate.authz.denials") == {
        (("action", "connect"), ("reason", "client_id_mismatch")): 1,
        (("action", "publish"), ("reason", "topic_not_authorized")): 1,
    }
    assert harness.points("devicegate.messages") == {
        (("direction", "in"),): n + 1,
        (("direction", "out"),): n,
    }
    assert harness.points("devicegate.bytes") == {
        (("direction", "in"),): 30 + 20 * n,
        (("direction", "out"),): 10 * n,
    }
    assert harness.points("devicegate.sessions.active") == {(): 1}

    # 4. The session ends (twice: idempotent); its counts are folded, never lost or doubled.
    metrics.session_ended(s1, Reason.CLIENT_DISCONNECTED)
    metrics.session_ended(s1, Reason.CONNECTION_LOST)
    s2 = FakeSession(packets_in=5, bytes_in=50)
    metrics.session_started(s2)
    metrics.session_ended(FakeSession(), Reason.CONNECTION_LOST)  # never started: ignored
    assert harness.points("devicegate.messages")[(("direction", "in"),)] == n + 1 + 5
    assert harness.points("devicegate.bytes")[(("direction", "in"),)] == 30 + 20 * n + 50
    assert harness.points("devicegate.sessions.active") == {(): 1}
    assert harness.points("devicegate.sessions.ended") == {(("cause", "client_disconnected"),): 1}
    assert len(inner.events) == 4


async def test_allowed_connect_counts_only_once_durable(
    harness: Harness, metrics: GatewayMetrics
) -> None:
    inner = MemorySink()
    inner.fail = True
    sink = ObservingSink(inner, metrics)
    with pytest.raises(OSError):
        await sink.record(_event(EventType.CONNECT, Reason.OK))
    with pytest.raises(OSError):
        await sink.record(_event(EventType.CONNECT, Reason.EVENT_LOG_UNAVAILABLE))
    assert harness.points("devicegate.handshakes") == {
        (("outcome", "denied"), ("reason", "event_log_unavailable")): 1
    }


async def test_dial_sink_and_revocation_instruments(
    harness: Harness, metrics: GatewayMetrics
) -> None:
    with metrics.time_dial():
        pass
    with pytest.raises(TimeoutError), metrics.time_dial():
        raise TimeoutError
    dial = harness.points("devicegate.upstream.dial.duration")
    assert {key: count for key, (count, _) in dial.items()} == {
        (("outcome", "ok"),): 1,
        (("outcome", "error"),): 1,
    }
    metrics.flushed(0.002)
    metrics.flushed(0.004)
    metrics.shipped(100)
    assert harness.points("devicegate.events.flush.duration") == {(): (2, pytest.approx(0.006))}
    assert harness.points("devicegate.events.batch.size") == {(): (1, 100)}
    assert harness.points("devicegate.events.queue.depth") == {}  # no sink watched yet
    metrics.watch_sink(lambda: Stats(queue_depth=12, spool_bytes=4096, events_lost_total=3))
    metrics.watch_revocation(lambda: 3.5)
    assert harness.points("devicegate.events.queue.depth") == {(): 12}
    assert harness.points("devicegate.events.spool.bytes") == {(): 4096}
    assert harness.points("devicegate.events.lost") == {(): 3}
    assert harness.points("devicegate.revocation.state.age") == {(): 3.5}
    text = harness.telemetry.prometheus_text()
    assert "devicegate_events_flush_duration_seconds_count 2\n" in text
    assert "devicegate_revocation_state_age_seconds 3.5\n" in text
    assert "devicegate_events_lost_total 3\n" in text


def test_connection_span_tree_and_trace_id_in_detail(
    harness: Harness, metrics: GatewayMetrics
) -> None:
    conn = metrics.connection(peer="192.0.2.7:50000")
    conn.handshake_done(device_id="d1", fleet="f1")
    with conn.phase("authorize"):
        pass
    with conn.phase("upstream_dial"):
        pass
    stamped = conn.stamp(_event(EventType.CONNECT, Reason.OK))
    conn.end(Reason.CLIENT_DISCONNECTED)
    conn.end(Reason.CLIENT_DISCONNECTED)  # idempotent

    spans = {span.name: span for span in harness.spans.get_finished_spans()}
    assert set(spans) == {"devicegate.connection", "handshake", "authorize", "upstream_dial"}
    root = spans["devicegate.connection"]
    assert root.parent is None and root.context is not None
    for child in ("handshake", "authorize", "upstream_dial"):
        parent, context = spans[child].parent, spans[child].context
        assert parent is not None and context is not None
        assert parent.span_id == root.context.span_id
        assert context.trace_id == root.context.trace_id
    assert dict(root.attributes or {}) == {
        "devicegate.peer": "192.0.2.7:50000",
        "devicegate.device_id": "d1",
        "devicegate.fleet": "f1",
        "devicegate.outcome": "allowed",
        "devicegate.reason": "ok",
    }
    assert [(e.name, dict(e.attributes or {})) for e in root.events] == [
        ("session_end", {"cause": "client_disconnected"})
    ]
    assert stamped.detail == {"trace_id": f"{root.context.trace_id:032x}"}
    assert conn.trace_id == stamped.detail["trace_id"]


def test_refused_handshake_span(harness: Harness) -> None:
    with connection_span(harness.telemetry.tracer, peer="198.51.100.1:1") as conn:
        conn.handshake_done(failure=Reason.UNKNOWN_ISSUER)
    (root,) = [s for s in harness.spans.get_finished_spans() if s.name == "devicegate.connection"]
    assert root.attributes is not None
    assert root.attributes["devicegate.outcome"] == "denied"
    assert root.attributes["devicegate.reason"] == "unknown_issuer"
    assert not root.events


def test_sampled_out_connection_keeps_its_trace_id_and_records_no_span() -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from schemas.telemetry import setup_telemetry

    telemetry = setup_telemetry(service_name="x", instance_id="i", prometheus=False, otlp=False)
    spans = InMemorySpanExporter()
    telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    metrics = GatewayMetrics(meter=telemetry.meter, tracer=telemetry.tracer)
    conn = metrics.connection(peer="x")
    conn.handshake_done(device_id="d1")
    with conn.phase("authorize"):
        pass
    stamped = conn.stamp(_event(EventType.CONNECT, Reason.OK))
    conn.end(Reason.CLIENT_DISCONNECTED)
    assert conn.trace_id is not None and len(conn.trace_id) == 32
    assert stamped.detail == {"trace_id": conn.trace_id}
    assert spans.get_finished_spans() == ()
    telemetry.shutdown()


async def test_denials_count_what_one_event_stands_for(
    harness: Harness, metrics: GatewayMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    """A SUBSCRIBE's event and a denial-budget summary count every denial they carry."""
    sink = ObservingSink(MemorySink(), metrics)
    denied = Outcome.DENIED
    events = [
        _event(EventType.PUBLISH, Reason.TOPIC_NOT_AUTHORIZED),  # before the budget: no count
        _event(EventType.PUBLISH, Reason.TOPIC_NOT_AUTHORIZED).model_copy(
            update={"detail": {"count": 1, "topic": "x"}}
        ),
        _event(EventType.SUBSCRIBE, Reason.TOPIC_NOT_AUTHORIZED, denied).model_copy(
            update={"detail": {"count": 60_000, "filters": ["a"]}}
        ),
        _event(EventType.PUBLISH, Reason.TOPIC_NOT_AUTHORIZED).model_copy(
            update={"detail": {"summary": True, "count": 91, "topics": ["x"]}}
        ),
    ]
    with caplog.at_level("INFO", logger="devicegate.gateway.audit"):
        for event in events:
            await sink.record(event)
    assert harness.points("devicegate.authz.denials") == {
        (("action", "publish"), ("reason", "topic_not_authorized")): 1 + 1 + 91,
        (("action", "subscribe"), ("reason", "topic_not_authorized")): 60_000,
    }
    assert [getattr(r, "count", None) for r in caplog.records] == [None, 1, 60_000, 91]
