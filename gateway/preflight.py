"""What a gateway worker checks around itself: the database schema and the upstream broker.

A gateway that starts beside a database nobody migrated, or in front of a broker that is
down, must say so in one plain line and keep saying what is missing where an operator
looks (``GET /readyz`` on the metrics port), instead of starting without a word.

Invariants:

* Nothing here refuses a device or stops the worker: the sink keeps its events on disk until
  the database takes them, and a session whose broker is down is refused by the bridge
  (``upstream_unavailable``). These checks only tell.
* The broker is probed with a bare TCP connection only while it is not known to be up (at
  start, and again after a probe failed), so a healthy broker sees no probe traffic.
* `Readiness.problems` is pure and cheap: ``/readyz`` reads state, it starts no I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg

from schemas.migrate import pending

__all__ = ["BrokerWatch", "Readiness", "schema_problem"]

log = logging.getLogger("devicegate.gateway")

PROBE_INTERVAL = 5.0
"""Seconds between probes of a broker that is down."""


async def schema_problem(database_url: str, *, within: float = 5.0) -> str | None:
    """One line on what is wrong with the database's schema, or None when it is current."""
    try:
        async with asyncio.timeout(within):
            connection = await asyncpg.connect(database_url)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        return (
            f"cannot reach the database ({type(exc).__name__}: {exc}); events wait in the "
            "spool and devices are refused until the revocation state is current"
        )
    try:
        missing = await pending(connection)
    finally:
        await connection.close()
    if missing:
        return (
            f"the database is not migrated ({len(missing)} pending: {', '.join(missing)}): "
            "run `devicegate db migrate`"
        )
    return None


@dataclass
class BrokerWatch:
    """Whether the upstream broker accepts TCP connections, probed until it does."""

    host: str
    port: int
    interval: float = PROBE_INTERVAL
    reachable: bool = False
    error: str = "not probed yet"
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    async def start(self) -> None:
        """Probe once now (logged either way), then keep probing in the background while
        the broker is down."""
        if await self._probe():  # nothing missing, nothing to say
            log.debug("upstream broker %s:%d is reachable", self.host, self.port)
            return
        log.warning(
            "upstream broker %s:%d is not reachable (%s): devices are refused with "
            "upstream_unavailable until it is; retrying every %.0f s",
            self.host, self.port, self.error, self.interval,
        )  # fmt: skip
        self._task = asyncio.create_task(self._until_up(), name="broker-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _until_up(self) -> None:
        while True:  # a probe, not a wait on an event: nothing tells us the broker is back
            await asyncio.sleep(self.interval)
            if await self._probe():
                break
        log.info("upstream broker %s:%d is reachable again", self.host, self.port)

    async def _probe(self) -> bool:
        try:
            async with asyncio.timeout(min(self.interval, 3.0)):
                _, writer = await asyncio.open_connection(self.host, self.port)
        except (OSError, TimeoutError) as exc:
            self.reachable = False
            self.error = getattr(exc, "strerror", None) or type(exc).__name__
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        self.reachable = True
        self.error = ""
        return True


@dataclass
class Readiness:
    """What ``GET /readyz`` of a worker answers: the list of what is missing (empty: ready)."""

    broker: BrokerWatch
    revocation_stale: Callable[[], bool]
    schema: str | None = None
    policy_loaded: Callable[[], bool] | None = None  # None: the policy is a file's

    def problems(self) -> list[str]:
        found = []
        if not self.broker.reachable:
            found.append(
                f"upstream broker {self.broker.host}:{self.broker.port} not reachable: "
                f"{self.broker.error}"
            )
        if self.schema is not None:
            found.append(self.schema)
        if self.revocation_stale():
            found.append("revocation state is not current (devices are refused)")
        if self.policy_loaded is not None and not self.policy_loaded():
            found.append("the database's policy is not loaded yet (devices are refused)")
        return found
