"""Per-address rate limit on failed bootstrap-token and manufacturer-certificate (IDevID)
attempts (enrollment, EST simpleenroll),
and the sweeper that writes the refusals counted beyond their audit budget.

Token secrets carry 256 bits, so guessing one is hopeless; what a guesser can do is load the
database and flood the audit log. The limit here bounds the token checks; the audit rows
are bounded by the refusal budget every unauthenticated route shares
(`provisioning.refusal_budget`), which the 429 refusals go through like any other.

Invariants:

* A token bucket per client address: ``failures`` failed attempts in a burst, refilled at
  ``failures`` per ``per`` seconds. A failure is an `IdevidRejected`, or a `TokenRejected`
  other than ``token_exhausted`` (a token that ran out while a factory line enrolled concurrently is
  an expected race, not a guess; its uses already bound it). Successes cost nothing, so a
  factory line with a good token is never limited.
* While the bucket is empty, a guarded request is refused before its body is read: 429,
  reason ``rate_limited``, ``Retry-After`` in whole seconds, recorded through
  `ProvisioningService.record_denied` (in full within the route's refusal budget, counted
  in a summary event beyond it).
* Concurrency cannot outrun the count by more than one burst: at most ``max_in_flight``
  guarded requests per address run at once, and each failure is charged when it is
  decided, even below zero. A burst admitted while the bucket held a token is paid back
  before the next attempt, so over any interval ``t`` an address gets at most
  ``failures + max_in_flight + t * failures / per`` token checks that fail.
* The sweeper writes the refusal summaries every ``refusal_summary_interval`` and once
  more at shutdown, after the last request, so no counted refusal goes unrecorded.
* Bounded memory: at most ``max_addresses`` entries (least recently seen evicted); idle
  entries (bucket full, nothing in flight) are dropped by `expire`. IPv6 clients are keyed
  by their /64, which is what one host usually controls.
* The key is the TCP peer: behind a load balancer every client shares its address. The
  provisioning listener does not read PROXY headers or X-Forwarded-For.
* The clock is injectable (tests); nothing here does I/O except `setup`'s middleware and
  sweeper, which record events through the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Final

from aiohttp import web

from provisioning.errors import IdevidRejected, TokenRejected
from provisioning.http.common import SERVICE, Handler, peer
from provisioning.http.problems import problem_response
from provisioning.refusal_budget import address_key
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


class _Entry:
    __slots__ = ("in_flight", "tokens", "updated")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.updated = now
        self.in_flight = 0


class TokenFailureLimiter:
    """The per-address buckets (see the module invariants). Not thread-safe: one event loop.

    Args:
        failures: Failed attempts allowed in a burst (and per ``per`` seconds).
        per: Seconds in which ``failures`` attempts are earned back.
        max_addresses: Size bound of the table.
        max_in_flight: Guarded requests one address may have running at once.
        clock: Monotonic seconds.
    """

    def __init__(
        self,
        *,
        failures: int = 30,
        per: float = 60.0,
        max_addresses: int = 10_000,
        max_in_flight: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min(failures, per, max_addresses, max_in_flight) <= 0:
            raise ValueError("every limit must be positive")
        self.failures = failures
        self.per = per
        self.max_addresses = max_addresses
        self.max_in_flight = max_in_flight
        self.clock = clock
        self._rate = failures / per
        self._table: OrderedDict[str, _Entry] = OrderedDict()

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
                self._table.popitem(last=False)
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

    def expire(self) -> None:
        """Drop idle entries (bucket full, nothing in flight)."""
        now = self.clock()
        for key in list(self._table):
            entry = self._table[key]
            self._refill(entry, now)
            if entry.tokens >= self.failures and not entry.in_flight:
                del self._table[key]


LIMITER = web.AppKey("token_failure_limiter", TokenFailureLimiter)


@web.middleware
async def token_rate_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse guarded requests from an address over its budget; count failed tokens."""
    if (request.method, request.path) not in GUARDED:
        return await handler(request)
    limiter = request.app[LIMITER]
    address = request.remote
    wait = limiter.acquire(address)
    if wait is not None:
        message = (
            f"too many failed token attempts (more than {limiter.failures} in "
            f"{limiter.per:g} s); retry in {wait} s"
        )
        await request.app[SERVICE].record_denied(
            EventType.ENROLL, RateLimited(message), peer(request),
            detail={"path": request.path, "retry_after": wait},
        )  # fmt: skip
        response = problem_response(Reason.RATE_LIMITED, message)
        response.headers["Retry-After"] = str(wait)
        return response
    failed = False
    try:
        return await handler(request)
    except TokenRejected as exc:
        failed = exc.reason not in NOT_COUNTED
        raise
    except IdevidRejected:  # a refused manufacturer certificate counts as a failed attempt
        failed = True
        raise
    finally:
        limiter.release(address, failed=failed)


async def _sweeper(app: web.Application) -> AsyncIterator[None]:
    """Writes the refusal summaries every ``refusal_summary_interval`` and at shutdown."""
    service = app[SERVICE]

    async def flush() -> None:
        try:
            await service.record_refusal_summaries()
        except Exception:  # the sweeper must outlive a failed write; the counts are kept
            log.exception("could not record refusal summaries; kept for the next sweep")

    async def loop() -> None:
        interval = service.settings.refusal_summary_interval.total_seconds()
        while True:
            await asyncio.sleep(interval)
            await flush()
            app[LIMITER].expire()

    task = asyncio.create_task(loop(), name="refusal-summary-sweeper")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await flush()
        if lost := service.refusals.kept_refusals():
            log.error("stopping with %d refusals counted but not recorded (database away)", lost)


def setup(app: web.Application, limiter: TokenFailureLimiter | None = None) -> None:
    """Install the limiter, its middleware (innermost) and the refusal sweeper on ``app``.

    ``app[LIMITER]`` may be replaced until the app starts (tests use a tighter one).
    """
    app[LIMITER] = limiter or TokenFailureLimiter()
    app.middlewares.append(token_rate_limit)
    app.cleanup_ctx.append(_sweeper)
