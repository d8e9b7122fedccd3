"""A session's denial budget: how many of its refused PUBLISHes and SUBSCRIBE filters are
recorded one by one, which are summed up, and when the session has had enough.

Invariants:

* Sans-IO and synchronous: time comes from an injectable monotonic ``clock``, so tests
  step it by hand; the session asks, the bridge arms one timer (`DenialBudget.due_in`).
* Windows are fixed: one opens at the first denial after the last one closed and lasts
  ``window`` seconds. In a window, the first ``events_per_window`` denial *events* are
  recorded one by one (a SUBSCRIBE with many denied filters is one event: its count and a
  bounded sample); the rest are held, per (type, reason), as a count and a sample, and
  recorded as one summary event each when the window closes (`due`) or the session ends
  (`flush`). Every denial is in exactly one event's ``count``: none is lost, none counted
  twice.
* More than ``per_window`` denials (filters count one each) in one window exceed the
  budget (`exceeded`): the session is closed for it. A device that gets a few denials
  (a stale subscription, a retried publish) stays far below.
* Bounded memory and bytes: a sample holds at most `SAMPLE_SIZE` distinct targets, each
  at most `TARGET_BYTES` bytes of UTF-8 (`clip`), whatever the device sends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

from schemas.events import EventType, Reason

__all__ = [
    "SAMPLE_SIZE",
    "TARGET_BYTES",
    "DenialBudget",
    "DenialLimits",
    "Summary",
    "Verdict",
    "clip",
    "sample",
]

SAMPLE_SIZE: Final = 10
"""Distinct topics or filters kept as the sample of one event."""
TARGET_BYTES: Final = 256
"""A topic or filter in an event is cut to this many bytes of UTF-8 (then ``…``)."""
_ELLIPSIS: Final = "…"


def clip(target: str) -> str:
    """``target`` as recorded: whole if short, else its first `TARGET_BYTES` bytes + ``…``."""
    if len(target) <= TARGET_BYTES // 4:  # no code point is longer than 4 bytes
        return target
    raw = target.encode("utf-8", "surrogatepass")
    if len(raw) <= TARGET_BYTES:
        return target
    return raw[:TARGET_BYTES].decode("utf-8", "ignore") + _ELLIPSIS  # never half a character


def sample(targets: Iterable[str], into: list[str] | None = None) -> list[str]:
    """Up to `SAMPLE_SIZE` distinct clipped targets, in order of first appearance."""
    kept = into if into is not None else []
    for target in targets:
        if len(kept) >= SAMPLE_SIZE:
            break
        clipped = clip(target)
        if clipped not in kept:
            kept.append(clipped)
    return kept


@dataclass(frozen=True, slots=True)
class DenialLimits:
    """The budget's settings (``DENIALS_PER_WINDOW``, ``DENIAL_EVENTS_PER_WINDOW``,
    ``DENIAL_WINDOW``)."""

    per_window: int = 100
    """Denials a session may get in one window; one more closes it (``too_many_denials``)."""
    events_per_window: int = 10
    """Denial events recorded one by one per window; later denials are summed up."""
    window: float = 60.0
    """Seconds."""

    def __post_init__(self) -> None:
        if self.per_window < 1 or self.events_per_window < 1 or self.window <= 0:
            raise ValueError("denial limits must be positive")


@dataclass(frozen=True, slots=True)
class Summary:
    """Denials held back in one window: ``count`` of them, with a sample of their targets."""

    type: EventType
    reason: Reason
    count: int
    sample: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do about one denial event (see `DenialBudget.deny`)."""

    record: bool
    """Record it on its own now (False: it is held for a summary)."""
    due: list[Summary]
    """Summaries of an earlier window, to record before it."""


@dataclass(slots=True)
class _Held:
    count: int = 0
    sample: list[str] = field(default_factory=list)


class DenialBudget:
    """One session's denial windows (see the module notes)."""

    def __init__(
        self, limits: DenialLimits | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits if limits is not None else DenialLimits()
        self._clock = clock
        self._ends: float | None = None  # the open window's end; None: no window open
        self._denials = 0
        self._events = 0
        self._held: dict[tuple[EventType, Reason], _Held] = {}

    @property
    def exceeded(self) -> bool:
        """More than ``per_window`` denials in the open window."""
        return self._denials > self.limits.per_window

    def deny(self, type_: EventType, reason: Reason, count: int, targets: Iterable[str]) -> Verdict:
        """Account one denial event standing for ``count`` denials of ``targets``.

        ``targets`` is read only if the event is held (for the sample), and then only as
        far as the sample needs.
        """
        now = self._clock()
        due = self._close_window() if self._ends is not None and now >= self._ends else []
        if self._ends is None:
            self._ends = now + self.limits.window
        self._denials += count
        if self._events < self.limits.events_per_window:
            self._events += 1
            return Verdict(True, due)
        held = self._held.get((type_, reason))
        if held is None:
            held = self._held[(type_, reason)] = _Held()
        held.count += count
        if len(held.sample) < SAMPLE_SIZE:
            sample(targets, held.sample)
        return Verdict(False, due)

    def due_in(self) -> float | None:
        """Seconds until the open window closes (None: no window open)."""
        if self._ends is None:
            return None
        return max(0.0, self._ends - self._clock())

    def due(self) -> list[Summary]:
        """The summaries of the open window if it has closed by now (it is then over)."""
        if self._ends is None or self._clock() < self._ends:
            return []
        return self._close_window()

    def flush(self) -> list[Summary]:
        """Every held denial, window closed or not (the session is ending)."""
        return self._close_window()

    def _close_window(self) -> list[Summary]:
        summaries = [
            Summary(type_, reason, held.count, tuple(held.sample))
            for (type_, reason), held in self._held.items()
        ]
        self._held = {}
        self._ends = None
        self._denials = self._events = 0
        return summaries
