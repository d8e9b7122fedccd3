"""Per-address rate limit on failed bootstrap-token attempts (enrollment, EST simpleenroll).

Token secrets carry 256 bits, so guessing one is hopeless; what a guesser can do is load the
database and flood the audit log. This limits both.

Invariants:

* A token bucket per client address: ``failures`` failed attempts in a burst, refilled at
  ``failures`` per ``per`` seconds. A failure is a `TokenRejected` other than
  ``token_exhausted`` (a token that ran out while a factory line enrolled concurrently is
  an expected race, not a guess; its uses already bound it). Successes cost nothing, so a
  factory line with a good token is never limited.
* While the bucket is empty, a guarded request is refused before its body is read: 429,
  reason ``rate_limited``, ``Retry-After`` in whole seconds.
* Concurrency cannot outrun the count by more than one burst: at most ``max_in_flight``
  guarded requests per address run at once, and each failure is charged when it is
  decided, even below zero. A burst admitted while the bucket held a token is paid back
  before the next attempt, so over any interval ``t`` an address gets at most
  ``failures + max_in_flight + t * failures / per`` token checks that fail.
* Every refusal is accounted for in the audit log, summarised: at most one ``rate_limited``
  event per address per ``summary_interval`` seconds, whose ``detail.refused`` counts the
  refusals since the previous one. A sweeper records what is still pending every
  ``summary_interval`` and at shutdown, so no refusal goes uncounted.
* Bounded memory: at most ``max_addresses`` entries (least recently seen evicted; counts
  still pending on an evicted entry go to one global counter, reported by the sweeper
  without an address). Idle entries (bucket full, nothing pending) are dropped by the
  sweeper. IPv6 clients are keyed by their /64, which is what one host usually controls.
* The key is the TCP peer: behind a load balancer every client shares its address. The
  provisioning listener does not read PROXY headers or X-Forwarded-For.
* The clock is injectable (tests); nothing here does I/O except `setup`'s middleware and
  sweeper, which record events through the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from provisioning.enrollment.service import Peer
from provisioning.errors import TokenRejected
from provisioning.http.common import SERVICE, Handler
from provisioning.http.problems import problem_response
from schemas.errors import DevicegateError
from schemas.events import EventType, Reason

__all__ = [
    "GUARDED",
    "LIMITER",
    "RateLimited",
    "TokenFailureLimiter",
    "address_key",
    "setup",
]

log = logging.getLogger("devicegate.provisioning")

GUARDED: Final = frozenset({("POST", "/v1/enroll"), ("POST", "/.well-known/est/simpleenroll")})
"""The (method, path) pairs authenticated by a bootstrap token."""

NOT_COUNTED: Final = frozenset({Reason.TOKEN_EXHAUSTED})


class RateLimited(DevicegateError):
    """Too many failed token attempts from this address."""

    reason = Reason.RATE_LIMITED


@functools.lru_cache(maxsize=4096)  # parsing an address costs more than the bucket update
def address_key(address: str | None) -> str:
    """The bucket an address belongs to: itself for IPv4, its /64 for IPv6."""
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


class _Entry:
    __slots__ = ("first_refused", "in_flight", "refused", "summarised_at", "tokens", "updated")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.updated = now
        self.in_flight = 0
        self.refused = 0  # refusals not yet recorded
        self.first_refused = 0.0
        self.summarised_at = -math.inf


@dataclass(frozen=True, slots=True)
class Summary:
    """Refusals to record: ``address`` None for entries evicted before they were recorded."""

    address: str | None
    refused: int
    seconds: float


class TokenFailureLimiter:
    """The per-address buckets (see the module invariants). Not thread-safe: one event loop.

    Args:
        failures: Failed attempts allowed in a burst (and per ``per`` seconds).
        per: Seconds in which ``failures`` attempts are earned back.
        summary_interval: At most one recorded ``rate_limited`` event per address this often.
        max_addresses: Size bound of the table.
        max_in_flight: Guarded requests one address may have running at once.
        clock: Monotonic seconds.
    """

    def __init__(
        self,
        *,
        failures: int = 30,
        per: float = 60.0,
        summary_interval: float = 5.0,
        max_addresses: int = 10_000,
        max_in_flight: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min(failures, per, summary_interval, max_addresses, max_in_flight) <= 0:
            raise ValueError("every limit must be positive")
        self.failures = failures
        self.per = per
        self.summary_interval = summary_interval
        self.max_addresses = max_addresses
        self.max_in_flight = max_in_flight
        self.clock = clock
        self._rate = failures / per
        self._table: OrderedDict[str, _Entry] = OrderedDict()
        self._evicted_refused = 0

    def __len__(self) -> int:
        return len(self._table)

    def _refill(self, entry: _Entry, now: float) -> None:
        entry.tokens = min(self.failures, entry.tokens + (now - entry.updated) * self._rate)
        entry.updated = now

    def _entry(self, key: str, now: float) -> _Entry:
        entry = self._table.get(key)
        if entry is None:
            entry = self._table[key] = _Entry(float(self.failures), now)
            while len(self._table) > self.max_addresses:
                _, evicted = self._table.popitem(last=False)
                self._evicted_refused += evicted.refused
        else:
            self._table.move_to_end(key)
            self._refill(entry, now)
        return entry

    def acquire(self, address: str | None) -> int | None:
        """Admit a token attempt from ``address`` (None; call `release` when it is decided),
        or refuse it: the seconds to wait."""
        entry = self._entry(address_key(address), self.clock())
        if entry.in_flight >= self.max_in_flight:
            return 1
        if entry.tokens < 1:
            return max(1, math.ceil((1 - entry.tokens) / self._rate))
        entry.in_flight += 1
        return None

    def release(self, address: str | None, *, failed: bool) -> None:
        """The attempt `acquire` admitted is decided; ``failed``: its token was refused.

        A failure is charged even below zero (attempts admitted together while the bucket
        held a token), which lengthens the wait instead of letting a burst through free."""
        key = address_key(address)
        entry = self._table.get(key)
        if entry is not None:
            entry.in_flight = max(0, entry.in_flight - 1)
        if failed:
            entry = self._entry(key, self.clock())
            entry.tokens = max(-float(self.max_in_flight), entry.tokens - 1)

    def refused(self, address: str | None) -> Summary | None:
        """Count a refusal; return a summary to record now, at most once per interval."""
        key = address_key(address)
        now = self.clock()
        entry = self._entry(key, now)
        if not entry.refused:
            entry.first_refused = now
        entry.refused += 1
        if now - entry.summarised_at < self.summary_interval:
            return None
        return self._take(key, entry, now)

    def _take(self, key: str, entry: _Entry, now: float) -> Summary:
        summary = Summary(key, entry.refused, round(now - entry.first_refused, 3))
        entry.refused = 0
        entry.summarised_at = now
        return summary

    def sweep(self, *, final: bool = False) -> list[Summary]:
        """Summaries that are due (all of them if ``final``); drop idle entries."""
        now = self.clock()
        due: list[Summary] = []
        for key in list(self._table):
            entry = self._table[key]
            if entry.refused and (final or now - entry.summarised_at >= self.summary_interval):
                due.append(self._take(key, entry, now))
            self._refill(entry, now)
            idle = entry.tokens >= self.failures and not entry.refused and not entry.in_flight
            if idle and now - entry.summarised_at >= self.summary_interval:
                del self._table[key]
        if self._evicted_refused:
            due.append(Summary(None, self._evicted_refused, 0.0))
            self._evicted_refused = 0
        return due


LIMITER = web.AppKey("token_failure_limiter", TokenFailureLimiter)


async def _record(app: web.Application, summary: Summary, path: str | None = None) -> None:
    detail: dict[str, object] = {"refused": summary.refused, "seconds": summary.seconds}
    if path is not None:
        detail["path"] = path
    if summary.address is None:
        detail["evicted"] = True
    limiter = app[LIMITER]
    message = (
        f"{summary.refused} token attempt(s) refused: more than {limiter.failures} failed "
        f"in {limiter.per:g} s"
    )
    await app[SERVICE].record_denied(
        EventType.ENROLL, RateLimited(message), Peer(address=summary.address), detail=detail
    )


@web.middleware
async def token_rate_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse guarded requests from an address over its budget; count failed tokens."""
    if (request.method, request.path) not in GUARDED:
        return await handler(request)
    limiter = request.app[LIMITER]
    address = request.remote
    wait = limiter.acquire(address)
    if wait is not None:
        summary = limiter.refused(address)
        if summary is not None:
            await _record(request.app, summary, request.path)
        response = problem_response(
            Reason.RATE_LIMITED, f"too many failed token attempts; retry in {wait} s"
        )
        response.headers["Retry-After"] = str(wait)
        return response
    failed = False
    try:
        return await handler(request)
    except TokenRejected as exc:
        failed = exc.reason not in NOT_COUNTED
        raise
    finally:
        limiter.release(address, failed=failed)


async def _sweeper(app: web.Application) -> AsyncIterator[None]:
    limiter = app[LIMITER]

    async def flush(*, final: bool) -> None:
        for summary in limiter.sweep(final=final):
            try:
                await _record(app, summary)
            except Exception:  # the sweeper must outlive a failed write; it is logged
                log.exception("could not record a rate_limited summary")

    async def loop() -> None:
        while True:
            await asyncio.sleep(app[LIMITER].summary_interval)
            await flush(final=False)

    task = asyncio.create_task(loop(), name="token-rate-limit-sweeper")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await flush(final=True)


def setup(app: web.Application, limiter: TokenFailureLimiter | None = None) -> None:
    """Install the limiter, its middleware (innermost) and its sweeper on ``app``.

    ``app[LIMITER]`` may be replaced until the app starts (tests use a tighter one).
    """
    app[LIMITER] = limiter or TokenFailureLimiter()
    app.middlewares.append(token_rate_limit)
    app.cleanup_ctx.append(_sweeper)
