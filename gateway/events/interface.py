"""What the rest of the gateway sees of the event sink: the interface it records through,
the error that refuses a session, and the snapshot metrics read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from schemas.errors import DevicegateError
from schemas.events import AuthEvent, Reason

__all__ = ["EventLogUnavailable", "EventSink", "SinkObserver", "SinkStats"]


class EventLogUnavailable(DevicegateError):
    """The event cannot be made durable (spool full, disk failure, sink closed).

    The gateway answers by refusing the connection: no session is admitted unaudited.
    """

    reason = Reason.EVENT_LOG_UNAVAILABLE


class SinkObserver(Protocol):
    """What `SpoolSink` reports to metrics (`gateway.telemetry.GatewayMetrics` has it)."""

    def flushed(self, seconds: float) -> None: ...

    def shipped(self, batch_size: int) -> None: ...


class EventSink(Protocol):
    """Where auth events go."""

    async def record(self, event: AuthEvent) -> None:
        """Store ``event``; return once it is durable on local disk."""
        ...


@dataclass(frozen=True, slots=True)
class SinkStats:
    """A snapshot of the sink for metrics.

    Attributes:
        chain_id: the chain this sink appends to.
        head_seq: seq of the last event appended.
        queue_depth: events recorded but not yet committed in PostgreSQL.
        spool_bytes: bytes of segment files on disk.
        spool_segments: number of segment files.
        events_recorded: events accepted by `SpoolSink.record` since start.
        events_shipped: events committed in PostgreSQL since start (replays included).
        fsyncs: group-commit flushes since start.
        batches: committed shipping batches since start.
        ship_failures: failed shipping attempts since start.
        last_batch_size: events in the last committed batch.
        last_flush_latency: seconds of the last write + fdatasync.
        last_ship_latency: seconds of the last committed batch.
        database_connected: whether the shipping connection is up.
        full: whether an admission like the last event would be refused (spool at its
            soft limit ``max_bytes - reserve_bytes``, or its disk out of space).
        events_lost: non-admission events refused for lack of space and not yet recorded
            in an ``events_lost`` event.
        events_lost_total: events refused for lack of space since the sink started
            (admissions excluded: their refusal is recorded instead).
        events_missing_total: seqs shipped before but absent from the database at start
            (database behind spool; recorded in an ``events_missing`` event).
    """

    chain_id: str
    head_seq: int
    queue_depth: int
    spool_bytes: int
    spool_segments: int
    events_recorded: int
    events_shipped: int
    fsyncs: int
    batches: int
    ship_failures: int
    last_batch_size: int
    last_flush_latency: float
    last_ship_latency: float
    database_connected: bool
    full: bool
    events_lost: int = 0
    events_lost_total: int = 0
    events_missing_total: int = 0
