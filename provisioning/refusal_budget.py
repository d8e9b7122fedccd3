"""How many refusals per client address reach the audit log in full; the rest are counted.

Every unauthenticated provisioning route (and the console login) records a denied event per
refusal. Left alone, one client on one connection writes hundreds of rows a second. This is
the one mechanism that bounds that, for every such route, by a table (`budgets`).

Invariants:

* Policy is data: `budgets` maps a route (``"POST /v1/renew"``) to a `Budget`. A route not
  in the table is not budgeted (its refusals are always recorded in full).
* Per (route, address key) a token bucket of ``events`` full events, refilled at ``events``
  per ``per`` seconds. A refusal that finds a token is recorded in full, as before.
* A refusal that finds none is counted, never dropped: per (route, address key, reason) a
  count, the first and last wall-clock time, the event type, the device ids named (at most
  `MAX_DEVICES`, the rest in one count) and a sample peer address. `sweep` hands every
  pending count back as a `RefusalSummary` (one summary event each); the caller sweeps
  every ``interval`` seconds and once more at shutdown (``final``), so no count is lost.
* So per route and address key, in any window of ``t`` seconds, at most
  ``events + t * events / per`` full events plus ``(t / interval + 1) * R`` summary events,
  ``R`` the number of distinct reasons that address provoked on the route.
* Bounded memory: at most ``max_keys`` (route, address) entries, least recently used
  evicted; counts pending on an evicted entry are kept until the next `sweep` (they become
  summaries like any other). Idle entries (bucket full, nothing pending) are dropped by
  `sweep`. IPv6 clients are keyed by their /64 (`address_key`).
* A summary the caller could not write (the database is away) is handed back with `keep`
  and comes out of the next `sweep` again, merged with what was counted since: the same
  (route, address key, reason) stays one summary, so memory stays bounded by the keys
  (beyond ``max_keys`` kept keys, the rest merge per route and reason under the address
  ``*``). Counts are added, never dropped. A refusal let through in full whose event could
  not be written is kept the same way (`unwritten`), as a summary of one.
* Sans-IO: no I/O, no event loop; the monotonic ``clock`` and the ``wall`` clock are
  injectable (tests step them by hand).
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Final

from schemas.events import EventType, Reason
from schemas.settings import Settings

__all__ = [
    "BUDGETED_ROUTES",
    "MAX_DEVICES",
    "Budget",
    "RefusalBudget",
    "RefusalSummary",
    "address_key",
    "budgets",
]

BUDGETED_ROUTES: Final = (
    "POST /v1/enroll",
    "POST /v1/renew",
    "POST /.well-known/est/simpleenroll",
    "POST /.well-known/est/simplereenroll",
    "POST /console/login",
)
"""The routes a client reaches before it is authenticated (token, certificate, admin key)."""

MAX_DEVICES: Final = 16
"""Device ids named in one summary; refusals naming others are counted in ``other_devices``."""


@functools.lru_cache(maxsize=4096)  # parsing an address costs more than the bucket update
def address_key(address: str | None) -> str:
    """The budget an address belongs to: itself for IPv4, its /64 for IPv6."""
    if not address:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(frozen=True, slots=True)
class Budget:
    """Full events per address: ``events`` at once, earned back over ``per`` seconds."""

    events: int
    per: float = 60.0


def budgets(settings: Settings) -> dict[str, Budget]:
    """The policy table: route -> budget (the same, from the settings, for every route)."""
    return {route: Budget(settings.refusal_events_per_minute) for route in BUDGETED_ROUTES}


@dataclass(frozen=True, slots=True)
class RefusalSummary:
    """Refusals counted instead of recorded: ``count`` of ``reason`` on ``route`` from
    ``address`` (a key: an IPv4 address or an IPv6 /64) between ``first`` and ``last``."""

    route: str
    address: str
    sample: str | None
    type: EventType
    reason: Reason
    count: int
    first: datetime
    last: datetime
    devices: dict[str, int]
    other_devices: int
    anonymous: int

    @property
    def device_id(self) -> str | None:
        """The device every counted refusal named, if they all named the same one."""
        if len(self.devices) == 1 and not self.other_devices and not self.anonymous:
            return next(iter(self.devices))
        return None


class _Pending:
    __slots__ = ("anonymous", "count", "devices", "first", "last", "other", "sample", "type")

    def __init__(self, type: EventType, now: float) -> None:
        self.type = type
        self.count = 0
        self.first = now
        self.last = now
        self.devices: dict[str, int] = {}
        self.other = 0
        self.anonymous = 0
        self.sample: str | None = None

    def add(self, device_id: str | None, sample: str | None, now: float) -> None:
        self.count += 1
        self.last = now
        self.sample = sample
        if device_id is None:
            self.anonymous += 1
        elif device_id in self.devices or len(self.devices) < MAX_DEVICES:
            self.devices[device_id] = self.devices.get(device_id, 0) + 1
        else:
            self.other += 1


class _Entry:
    __slots__ = ("pending", "tokens", "updated")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.updated = now
        self.pending: dict[Reason, _Pending] = {}


def _at(wall: float) -> datetime:
    return datetime.fromtimestamp(wall, UTC)


class RefusalBudget:
    """The per-(route, address) buckets and counts (see the module invariants).

    Not thread-safe: one event loop.

    Args:
        table: Route -> budget (`budgets`).
        max_keys: Size bound of the table of (route, address) entries.
        clock: Monotonic seconds (buckets).
        wall: Wall-clock seconds since the epoch (``first``/``last`` of summaries).
    """

    def __init__(
        self,
        table: Mapping[str, Budget],
        *,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if max_keys <= 0 or any(b.events <= 0 or b.per <= 0 for b in table.values()):
            raise ValueError("every limit must be positive")
        self.table = dict(table)
        self.max_keys = max_keys
        self.clock = clock
        self.wall = wall
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._evicted: list[tuple[tuple[str, str], _Entry]] = []
        self._kept: dict[tuple[str, str, Reason], RefusalSummary] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def charge(
        self,
        route: str | None,
        address: str | None,
        *,
        type: EventType,
        reason: Reason,
        device_id: str | None = None,
    ) -> bool:
        """One refusal: True to record it in full now, False when it was counted instead."""
        budget = self.table.get(route) if route is not None else None
        if budget is None:
            return True
        assert route is not None
        key = (route, address_key(address))
        now = self.clock()
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(float(budget.events), now)
            while len(self._entries) > self.max_keys:
                old = self._entries.popitem(last=False)
                if old[1].pending:
                    self._evicted.append(old)
        else:
            self._entries.move_to_end(key)
            self._refill(entry, budget, now)
        if entry.tokens >= 1:
            entry.tokens -= 1
            return True
        pending = entry.pending.get(reason)
        wall = self.wall()
        if pending is None:
            pending = entry.pending[reason] = _Pending(type, wall)
        pending.add(device_id, address, wall)
        return False

    @staticmethod
    def _refill(entry: _Entry, budget: Budget, now: float) -> None:
        rate = budget.events / budget.per
        entry.tokens = min(float(budget.events), entry.tokens + (now - entry.updated) * rate)
        entry.updated = now

    def kept_refusals(self) -> int:
        """How many refusals are in summaries kept for the next `sweep`."""
        return sum(summary.count for summary in self._kept.values())

    def unwritten(
        self,
        route: str | None,
        address: str | None,
        *,
        type: EventType,
        reason: Reason,
        device_id: str | None = None,
    ) -> bool:
        """A refusal `charge` let through in full whose event could not be written: kept as
        a summary of one for the next `sweep` (False: the route is not budgeted)."""
        if route is None or route not in self.table:
            return False
        pending = _Pending(type, self.wall())
        pending.add(device_id, address, pending.first)
        self.keep(_summaries((route, address_key(address)), [(reason, pending)]))
        return True

    def keep(self, summaries: Iterable[RefusalSummary]) -> None:
        """Summaries that could not be written: the next `sweep` returns them again."""
        for summary in summaries:
            key = (summary.route, summary.address, summary.reason)
            if key not in self._kept and len(self._kept) >= self.max_keys:
                key = (summary.route, "*", summary.reason)
                summary = replace(summary, address="*")
            old = self._kept.get(key)
            self._kept[key] = summary if old is None else merge(old, summary)

    def sweep(self) -> list[RefusalSummary]:
        """Every count pending and every one kept (they are reset); idle entries are
        dropped."""
        now = self.clock()
        due: list[RefusalSummary] = []
        for key, entry in self._evicted:
            due.extend(_summaries(key, entry.pending.items()))
        self._evicted.clear()
        for key in list(self._entries):
            entry = self._entries[key]
            if entry.pending:
                due.extend(_summaries(key, entry.pending.items()))
                entry.pending.clear()
            budget = self.table[key[0]]
            self._refill(entry, budget, now)
            if entry.tokens >= budget.events:
                del self._entries[key]  # a full bucket with nothing pending is the same as none
        if self._kept:
            self.keep(due)  # merged into the kept ones: one summary per key
            due = list(self._kept.values())
            self._kept = {}
        return due


def merge(a: RefusalSummary, b: RefusalSummary) -> RefusalSummary:
    """Two summaries of one (route, reason) as one: counts added, times widened, device
    counts summed (at most `MAX_DEVICES` named, the rest counted in ``other_devices``)."""
    devices = dict(a.devices)
    other = a.other_devices + b.other_devices
    for device, n in b.devices.items():
        if device in devices or len(devices) < MAX_DEVICES:
            devices[device] = devices.get(device, 0) + n
        else:
            other += n
    return replace(
        a,
        sample=b.sample or a.sample,
        count=a.count + b.count,
        first=min(a.first, b.first),
        last=max(a.last, b.last),
        devices=devices,
        other_devices=other,
        anonymous=a.anonymous + b.anonymous,
    )


def _summaries(
    key: tuple[str, str], pending: Iterable[tuple[Reason, _Pending]]
) -> list[RefusalSummary]:
    route, address = key
    return [
        RefusalSummary(
            route=route, address=address, sample=p.sample, type=p.type, reason=reason,
            count=p.count, first=_at(p.first), last=_at(p.last), devices=dict(p.devices),
            other_devices=p.other, anonymous=p.anonymous,
        )
        for reason, p in pending
    ]  # fmt: skip
