"""Counting the events refused for lack of spool space, for the one ``events_lost`` event
that records them once the spool has room again (see `gateway.events.sink`)."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime

from gateway.events.codec import COLUMNS, Row
from schemas.events import AuthEvent, EventType, Outcome, Reason

__all__ = ["LostEvents", "is_admission"]

_TIME = COLUMNS.index("time")
_INSTANCE = COLUMNS.index("instance")
_TYPE = COLUMNS.index("type")
_OUTCOME = COLUMNS.index("outcome")
_REASON = COLUMNS.index("reason")
_DETAIL = COLUMNS.index("detail")


def is_admission(type_: str, outcome: str) -> bool:
    """An allowed ``connect``: the one event the gateway can still refuse instead."""
    return type_ == EventType.CONNECT and outcome == Outcome.ALLOWED


class LostEvents:
    """Events refused for lack of space since the last ``events_lost`` event."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str, str]] = Counter()
        self.count = 0  # counts.total(), kept: `record` reads it on every call
        self.first: datetime | None = None
        self.last: datetime | None = None
        self.instance: str | None = None

    def add(self, row: Row) -> int:
        """Count a refused event (an ``events_lost`` event whose write failed: its counts);
        returns how many events are newly lost (0 for such a re-counted summary)."""
        self.instance = row[_INSTANCE]
        if row[_TYPE] == EventType.EVENTS_LOST:
            detail = json.loads(row[_DETAIL])
            for item in detail["lost"]:
                self.counts[(item["type"], item["outcome"], item["reason"])] += item["count"]
                self.count += item["count"]
            self._saw(datetime.fromisoformat(detail["first"]))
            self._saw(datetime.fromisoformat(detail["last"]))
            return 0
        self.counts[(str(row[_TYPE]), str(row[_OUTCOME]), str(row[_REASON]))] += 1
        self.count += 1
        self._saw(row[_TIME])
        return 1

    def _saw(self, moment: datetime) -> None:
        if self.first is None or moment < self.first:
            self.first = moment
        if self.last is None or moment > self.last:
            self.last = moment

    def event(self, chain_id: str) -> AuthEvent:
        """The ``events_lost`` event recording these counts."""
        assert self.first is not None and self.last is not None
        return AuthEvent(
            instance=self.instance or chain_id.rpartition("/")[0] or chain_id,
            type=EventType.EVENTS_LOST,
            outcome=Outcome.DENIED,
            reason=Reason.EVENT_LOG_UNAVAILABLE,
            detail={
                "count": self.count,
                "first": self.first.isoformat(),
                "last": self.last.isoformat(),
                "lost": [
                    {"type": t, "outcome": o, "reason": r, "count": n}
                    for (t, o, r), n in sorted(self.counts.items())
                ],
            },
        )
