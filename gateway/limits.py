"""Abuse limits that hold state across connections: failed handshakes per address, and
throttled refusal events.

Invariants:

* Sans-IO and synchronous: callers pass nothing but keys; time comes from an injectable
  monotonic ``clock``, so tests step it by hand.
* Bounded memory: every table is an LRU capped at ``max_keys`` entries; an entry that has
  nothing left to say (a full bucket, a closed window with no suppressed refusals) is
  dropped as soon as it is seen, and at most one is kept per address key.
* Addresses are keyed by host (the port is ignored); an IPv6 host by its /64, the unit one
  subscriber (or attacker) usually holds, so walking through a /64 does not escape the
  limit. IPv4-mapped IPv6 addresses count as their IPv4 address.
* `FailureLimiter` is a token bucket per address: ``per_minute`` tokens of burst, refilled
  at ``per_minute / 60`` per second; each failed handshake takes one; an address with less
  than one token is refused at accept until the bucket refills. Refusals take no token
  (they cost no TLS work), so a refused address is let in again at the refill rate.
  Each worker process has its own limiter; the workers of one instance share the budget
  by charging one another's failures too (`gateway.failure_channel`).
* `EventThrottle` lets at most one event per key through per ``interval`` seconds and
  counts the rest; `EventThrottle.due` hands the counts of closed windows back, so every
  refusal is accounted for in some event (``count`` in its detail) without one event per
  refusal.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

__all__ = ["Burst", "EventThrottle", "FailureLimiter", "address_key"]

DEFAULT_MAX_KEYS: Final = 65_536


def address_key(peer_address: str | None) -> str | None:
    """The rate-limit key of ``host:port`` / ``[v6]:port`` (None if there is no host)."""
    if not peer_address:
        return None
    host = peer_address
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.rpartition(":")[0]
    return _host_key(host)


@lru_cache(maxsize=4096)  # every connection asks; parsing an address costs more than this
def _host_key(host: str) -> str | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host or None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class FailureLimiter:
    """Token bucket per address key, taken by failed handshakes (see the module notes)."""

    def __init__(
        self,
        *,
        per_minute: int,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return self.capacity
        tokens, at = entry
        tokens = min(self.capacity, tokens + (now - at) * self.rate)
        if tokens >= self.capacity:
            del self._buckets[key]  # a full bucket is the same as none
        return tokens

    def allowed(self, key: str | None) -> bool:
        """Whether a new connection from ``key`` may start a handshake now."""
        if key is None:
            return True
        return self._tokens(key, self._clock()) >= 1.0

    def failed(self, key: str | None, count: int = 1) -> None:
        """``count`` failed handshakes from ``key`` (here, or on a sibling worker)."""
        if key is None or count < 1:
            return
        now = self._clock()
        tokens = max(0.0, self._tokens(key, now) - count)
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)


@dataclass(frozen=True, slots=True)
class Burst:
    """Refusals to record as one event: ``count`` of them under ``key``.

    ``sample`` is the peer address of one of them (the event's ``peer_address``).
    """

    key: str
    count: int
    sample: str | None


@dataclass(slots=True)
class _Window:
    ends: float
    suppressed: int
    sample: str | None


class EventThrottle:
    """At most one event per key per ``interval`` seconds; the rest are counted."""

    def __init__(
        self,
        *,
        interval: float = 10.0,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def __len__(self) -> int:
        return len(self._windows)

    def hit(self, key: str, sample: str | None = None) -> list[Burst]:
        """One refusal under ``key``; the events to record now (often none).

        The first refusal of a window is reported at once (together with any refusals
        left over from an earlier window); the others wait for `due`. A key pushed out of
        the table to bound its size is reported at once too.
        """
        now = self._clock()
        window = self._windows.get(key)
        if window is not None and now < window.ends:
            window.suppressed += 1
            window.sample = sample
            return []
        carried = window.suppressed if window is not None else 0
        self._windows[key] = _Window(now + self.interval, 0, sample)
        self._windows.move_to_end(key)
        bursts = [Burst(key, carried + 1, sample)]
        while len(self._windows) > self.max_keys:
            old_key, old = self._windows.popitem(last=False)
            if old.suppressed:
                bursts.append(Burst(old_key, old.suppressed, old.sample))
        return bursts

    def due(self) -> list[Burst]:
        """The suppressed counts of every window that has closed (their keys are dropped)."""
        now = self._clock()
        bursts: list[Burst] = []
        windows = self._windows
        while windows:  # windows are in opening order, so they close in this order too
            key, window = next(iter(windows.items()))
            if window.ends > now:
                break
            del windows[key]
            if window.suppressed:
                bursts.append(Burst(key, window.suppressed, window.sample))
        return bursts

    def flush(self) -> list[Burst]:
        """Every suppressed count, window closed or not (at shutdown)."""
        bursts = [
            Burst(k, w.suppressed, w.sample) for k, w in self._windows.items() if w.suppressed
        ]
        self._windows.clear()
        return bursts
