"""Abuse limits that hold state across connections: failed handshakes per address, the
handshakes an over-budget address may have in flight, the CONNECTs of each authenticated
device (`ConnectLimiter`), and throttled refusal events.

Why no refusal at accept for a failing address: nothing is known about a connection at
accept, and a factory line or site behind one NAT address is the normal case. Refusing
an address whose failures are over budget refused its good devices with it (600 bad
handshakes got 250 good devices behind the same address reset). So the budget decides
what an address costs us, never whether its next connection is served:

* Within budget (`FailureLimiter`): each failed handshake is one event.
* Over budget: the address's failed handshakes are counted in summary events (one per
  reason and address per window, `EventThrottle`, exact ``count``), and its new
  connections go through `HandshakeSlots`: at most ``in_flight`` of them in their TLS
  handshake at once, the others waiting in a FIFO (accepted, not read, no TLS work)
  bounded at ``queue``; only beyond that queue is a connection refused at accept
  (``rate_limited``, summarised too). The attacker's share of the event loop is K
  handshakes among everyone's, its events are bounded per window, its memory by K + queue;
  a good device behind the same address waits its turn (a few handshake times), and gets
  in. Successful handshakes are never charged.
* Trusted networks (`TrustedNetworks`, setting ``TRUSTED_NETWORKS``) never wait and are
  never refused at accept; their failures are still charged and summarised beyond budget.

The price: a slot holder that never finishes its handshake keeps its slot until the
handshake timeout, so an over-budget address that holds its K slots with silent
connections delays its own queue by up to that timeout per K connections (never other
addresses); the handshake timeout of a waiting connection starts when it gets its slot.

Invariants:

* Sans-IO and synchronous: callers pass nothing but keys; time comes from an injectable
  monotonic ``clock``, so tests step it by hand.
* Bounded memory: every table is an LRU capped at ``max_keys`` entries; an entry that has
  nothing left to say (a full bucket, a closed window with no suppressed refusals) is
  dropped as soon as it is seen, and at most one is kept per address key. `HandshakeSlots`
  holds only live connections (each leaves when its handshake ends or it closes).
* Addresses are keyed by host (the port is ignored); an IPv6 host by its /64, the unit one
  subscriber (or attacker) usually holds, so walking through a /64 does not escape the
  limit. IPv4-mapped IPv6 addresses count as their IPv4 address.
* `FailureLimiter` is a token bucket per address: ``per_minute`` tokens of burst, refilled
  at ``per_minute / 60`` per second; each failed handshake takes one; an address with less
  than one token is over budget until the bucket refills.
  Each worker process has its own limiter; the workers of one instance share the budget
  by charging one another's failures too (`gateway.failure_channel`).
* `EventThrottle` lets at most one event per key through per ``interval`` seconds and
  counts the rest; `EventThrottle.due` hands the counts of closed windows back, so every
  refusal or over-budget failure is accounted for in some event (``count`` in its detail)
  without one event per refusal.
* `ConnectLimiter` is a token bucket per device id: ``burst`` tokens, refilled at
  ``per_minute / 60`` per second; every CONNECT of an authenticated device takes one,
  admitted or refused, and one made with less than one token left is refused
  (``connect_rate_exceeded``). Unlike the failure budget it does refuse: the identity is
  known by then, so nobody else is refused with it, and it is what bounds the work and the
  audit rows a valid (or copied) certificate can cause by reconnecting, successful
  handshakes included. A refused CONNECT takes a token too (the bucket never goes below
  zero), so a device retrying faster than the refill never gets in until it slows down.
  Each worker process has its own limiter (see docs/security-model.md for the multiplier).
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from ipaddress import IPv4Network, IPv6Network
from typing import Final, Generic, TypeVar

__all__ = [
    "Burst",
    "ConnectLimiter",
    "ConnectLimits",
    "EventThrottle",
    "FailureLimiter",
    "HandshakeSlots",
    "Slot",
    "TrustedNetworks",
    "address_key",
]

DEFAULT_MAX_KEYS: Final = 65_536
T = TypeVar("T", bound=Hashable)
S = TypeVar("S")


def _host(peer_address: str) -> str:
    host = peer_address
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.rpartition(":")[0]
    return host


def address_key(peer_address: str | None) -> str | None:
    """The rate-limit key of ``host:port`` / ``[v6]:port`` (None if there is no host)."""
    if not peer_address:
        return None
    return _host_key(_host(peer_address))


class TrustedNetworks:
    """Networks whose connections never wait for a handshake slot nor are refused at accept."""

    def __init__(self, networks: Iterable[IPv4Network | IPv6Network] = ()) -> None:
        self.networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, peer_address: object) -> bool:
        if not self.networks or not isinstance(peer_address, str):
            return False
        try:
            ip = ipaddress.ip_address(_host(peer_address))
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)


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
        """Whether ``key`` is within its budget (its next failure is an event of its own)."""
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


class Slot(Enum):
    """What `HandshakeSlots.enter` decided for one connection."""

    GO = "go"  # a slot: start the handshake now
    WAIT = "wait"  # queued: do no TLS work until `HandshakeSlots.leave` hands it a slot
    FULL = "full"  # the queue is full: refuse at accept


class HandshakeSlots(Generic[T]):
    """At most ``in_flight`` handshakes per address key at once, and a FIFO of ``queue``
    more; for the connections of over-budget addresses only (see the module notes)."""

    def __init__(self, *, in_flight: int, queue: int) -> None:
        if in_flight < 1 or queue < 0:
            raise ValueError("in_flight must be at least 1, queue at least 0")
        self.in_flight = in_flight
        self.queue = queue
        self._key_of: dict[T, str] = {}
        self._running: dict[str, int] = {}
        self._waiting: dict[str, dict[T, None]] = {}  # insertion-ordered: the FIFO

    def __len__(self) -> int:
        return len(self._key_of)

    def waiting(self, key: str) -> int:
        return len(self._waiting.get(key, ()))

    def enter(self, key: str, item: T) -> Slot:
        """Ask a slot for ``item`` under ``key`` (an item already in leaves first)."""
        self.leave(item)
        if self._running.get(key, 0) < self.in_flight:
            self._running[key] = self._running.get(key, 0) + 1
            self._key_of[item] = key
            return Slot.GO
        waiting = self._waiting.setdefault(key, {})
        if len(waiting) >= self.queue:
            if not waiting:
                del self._waiting[key]
            return Slot.FULL
        waiting[item] = None
        self._key_of[item] = key
        return Slot.WAIT

    def leave(self, item: T) -> T | None:
        """``item``'s handshake ended (or it closed); the waiting item now given its slot.

        Leaving twice, or without having entered, does nothing.
        """
        key = self._key_of.pop(item, None)
        if key is None:
            return None
        waiting = self._waiting.get(key)
        if waiting is not None and item in waiting:
            del waiting[item]
            if not waiting:
                del self._waiting[key]
            return None
        if waiting:
            successor = next(iter(waiting))
            del waiting[successor]
            if not waiting:
                del self._waiting[key]
            return successor  # takes over the slot: the running count stays
        running = self._running[key] - 1
        if running:
            self._running[key] = running
        else:
            del self._running[key]
        return None


@dataclass(frozen=True, slots=True)
class Burst(Generic[S]):
    """Refusals to record as one event: ``count`` of them under ``key``.

    ``sample`` stands for the last of them: the peer address for the accept-time refusals
    (the event's ``peer_address``), the refused CONNECT's own event for the device budget.
    """

    key: str
    count: int
    sample: S


@dataclass(slots=True)
class _Window(Generic[S]):
    ends: float
    suppressed: int
    sample: S


class EventThrottle(Generic[S]):
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
        self._windows: OrderedDict[str, _Window[S]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._windows)

    def hit(self, key: str, sample: S) -> list[Burst[S]]:
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

    def due(self) -> list[Burst[S]]:
        """The suppressed counts of every window that has closed (their keys are dropped)."""
        now = self._clock()
        bursts: list[Burst[S]] = []
        windows = self._windows
        while windows:  # windows are in opening order, so they close in this order too
            key, window = next(iter(windows.items()))
            if window.ends > now:
                break
            del windows[key]
            if window.suppressed:
                bursts.append(Burst(key, window.suppressed, window.sample))
        return bursts

    def flush(self) -> list[Burst[S]]:
        """Every suppressed count, window closed or not (at shutdown)."""
        bursts = [
            Burst(k, w.suppressed, w.sample) for k, w in self._windows.items() if w.suppressed
        ]
        self._windows.clear()
        return bursts


@dataclass(frozen=True, slots=True)
class ConnectLimits:
    """The per-device connect budget (``DEVICE_CONNECT_BURST``,
    ``DEVICE_CONNECTS_PER_MINUTE``): ``burst`` CONNECTs at once, earned back at
    ``per_minute`` a minute."""

    per_minute: int = 20
    burst: int = 20

    def __post_init__(self) -> None:
        if self.per_minute < 1 or self.burst < 1:
            raise ValueError("connect limits must be positive")


class ConnectLimiter:
    """Token bucket per device id, taken by every CONNECT of an authenticated device
    (see the module notes)."""

    def __init__(
        self,
        limits: ConnectLimits,
        *,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.capacity = float(limits.burst)
        self.rate = limits.per_minute / 60.0
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at
        # The refusal's detail, the same for every refusal: built once.
        self.detail: dict[str, object] = {
            "scope": "device",
            "connect_burst": limits.burst,
            "connects_per_minute": limits.per_minute,
        }

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> bool:
        """One CONNECT of device ``key``: True if within its budget, False to refuse it.

        Either way a token is taken (down to zero, never below).
        """
        now = self._clock()
        entry = self._buckets.pop(key, None)
        if entry is None:
            tokens = self.capacity
        else:
            tokens = min(self.capacity, entry[0] + (now - entry[1]) * self.rate)
        self._buckets[key] = (max(0.0, tokens - 1.0), now)  # most recently used: last
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return tokens >= 1.0

    def tokens(self, key: str) -> float:
        """The tokens ``key`` has now (for tests and diagnostics); a full bucket is dropped."""
        entry = self._buckets.get(key)
        if entry is None:
            return self.capacity
        tokens = min(self.capacity, entry[0] + (self._clock() - entry[1]) * self.rate)
        if tokens >= self.capacity:
            del self._buckets[key]  # a full bucket is the same as none
        return tokens
