"""What the console keeps in memory per process: open live streams, verification runs, and
the rollup filler's task.

Sessions and the overview's hourly rollup are not here: they live in PostgreSQL
(`provisioning.console.sessions`, `provisioning.console.rollup`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime

from aiohttp import web

from provisioning.audit.verify import VerifyReport, verify_chains
from provisioning.db import connect

log = logging.getLogger("devicegate.console")

MAX_LIVE_STREAMS = 32
"""Each live stream holds a PostgreSQL connection (LISTEN): bounded per process."""


class LiveStreams:
    """The open live streams, so shutdown can end them and their number stays bounded."""

    def __init__(self, limit: int = MAX_LIVE_STREAMS) -> None:
        self.limit = limit
        self._stops: set[asyncio.Event] = set()

    def open(self) -> asyncio.Event | None:
        """A stop event for a new stream, or ``None`` when the limit is reached."""
        if len(self._stops) >= self.limit:
            return None
        stop = asyncio.Event()
        self._stops.add(stop)
        return stop

    def closed(self, stop: asyncio.Event) -> None:
        self._stops.discard(stop)

    def close_all(self) -> None:
        for stop in list(self._stops):
            stop.set()


@dataclass(slots=True)
class ChainRun:
    """One verification run: its window, when it ran, and its report once done."""

    since: datetime | None
    started_at: datetime
    started_by: str
    task: asyncio.Task[VerifyReport]
    seconds: float | None = None
    error: str | None = None
    report: VerifyReport | None = field(default=None)


def verify_blocking(database_url: str, since: datetime | None) -> VerifyReport:
    """The whole verification on a connection and an event loop of its own, in a thread:
    hashing every row is CPU work that must not stall the service's event loop."""

    async def run() -> VerifyReport:
        conn = await connect(database_url)
        try:
            return await verify_chains(conn, since=since, max_findings=1000)
        finally:
            await conn.close()

    return asyncio.run(run())


class ChainRuns:
    """At most one verification at a time per process; the last one is kept for the page."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.last: ChainRun | None = None

    @property
    def running(self) -> bool:
        return self.last is not None and not self.last.task.done()

    def start(self, *, since: datetime | None, now: datetime, actor: str) -> ChainRun:
        """Start a run unless one is under way (then that one is returned)."""
        if self.last is not None and self.running:
            return self.last
        began = time.monotonic()
        task = asyncio.create_task(
            asyncio.to_thread(verify_blocking, self.database_url, since), name="console-verify"
        )
        run = ChainRun(since=since, started_at=now, started_by=actor, task=task)

        def done(finished: asyncio.Task[VerifyReport]) -> None:
            run.seconds = time.monotonic() - began
            if finished.cancelled():
                run.error = "cancelled"
            elif (exc := finished.exception()) is not None:
                log.warning("console: chain verification failed: %s", exc)
                run.error = str(exc) or type(exc).__name__
            else:
                run.report = finished.result()

        task.add_done_callback(done)
        self.last = run
        return run

    async def settle(self, seconds: float) -> None:
        """Wait up to ``seconds`` for the current run (small logs finish within it)."""
        if self.last is not None and not self.last.task.done():
            await asyncio.wait([self.last.task], timeout=seconds)
            await asyncio.sleep(0)  # let the done callback run


LIVE = web.AppKey("console_live", LiveStreams)
CHAINS = web.AppKey("console_chains", ChainRuns)
FILLER = web.AppKey("console_filler", list[asyncio.Task[None]])
"""The task filling the overview's rollup (`rollup.run`, cancelled at shutdown)."""
