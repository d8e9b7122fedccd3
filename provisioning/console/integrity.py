"""The broken-chain banner on every console page.

A full verification (``/console/chains``) rehashes every event of its window, seconds per
million; the banner cannot pay that per page. So `ChainWatch` verifies only the events of the
last `WINDOW` (`audit.verify.verify_chains`, the chain page's code, off the event loop), at
most once per `FRESH` seconds and only while someone is looking: a page older than that
starts a new check and shows the last result meanwhile. An edited, deleted or reordered row
of the last hour shows within about `FRESH` seconds. The chain page's last run counts too:
a problem it found (in any window) stays on the banner until a clean run replaces it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from aiohttp import web

from provisioning.audit.verify import VerifyReport
from provisioning.console.html import Html, join, tag, when
from provisioning.console.state import ChainRuns, verify_blocking

log = logging.getLogger("devicegate.console")

WINDOW = timedelta(hours=1)
FRESH = 10.0
"""Seconds a check's result is shown before a page view starts the next one."""
FIRST_WAIT = 1.0
"""How long the first page after a start waits for the first check (small windows finish)."""


@dataclass(frozen=True, slots=True)
class Checked:
    """One check's outcome: the chains with problems, and how many problems."""

    at: datetime
    broken: tuple[str, ...]
    problems: int


def _checked(report: VerifyReport, at: datetime) -> Checked:
    chains = tuple(sorted({finding.chain_id for finding in report.findings}))
    return Checked(at, chains, report.findings_total)


class ChainWatch:
    """The last recent-window check, and at most one check under way."""

    def __init__(self, database_url: str, *, window: timedelta = WINDOW, fresh: float = FRESH):
        self.database_url = database_url
        self.window = window
        self.fresh = fresh
        self.last: Checked | None = None
        self._checked_at = -float("inf")
        self._task: asyncio.Task[VerifyReport] | None = None

    def _start(self) -> asyncio.Task[VerifyReport]:
        now = datetime.now(UTC)
        task = asyncio.create_task(
            asyncio.to_thread(verify_blocking, self.database_url, now - self.window),
            name="console-chain-watch",
        )

        def done(finished: asyncio.Task[VerifyReport]) -> None:
            self._checked_at = time.monotonic()
            if finished.cancelled():
                return
            if (exc := finished.exception()) is not None:  # the banner keeps the last result
                log.warning("console: the banner's chain check failed: %s", exc)
                return
            self.last = _checked(finished.result(), now)

        task.add_done_callback(done)
        return task

    async def poke(self) -> None:
        """Start a check when the last one is older than `FRESH` (and none runs); the very
        first one is waited for up to `FIRST_WAIT` seconds."""
        running = self._task is not None and not self._task.done()
        if not running and time.monotonic() - self._checked_at >= self.fresh:
            self._task = self._start()
            running = True
        if running and self.last is None and self._task is not None:
            await asyncio.wait([self._task], timeout=FIRST_WAIT)
            await asyncio.sleep(0)  # let the done callback run

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            await asyncio.wait([self._task])  # a thread cannot be cancelled; it ends soon

    def banner(self, runs: ChainRuns) -> Html:
        """The red banner, or nothing when the last checks found no problem."""
        parts: list[Html] = []
        if self.last is not None and self.last.broken:
            parts.append(tag("span",
                f"{self.last.problems} problem(s) in the events of the last "
                f"{_span(self.window)} of chain(s) {', '.join(self.last.broken)} "
                f"(checked {when(self.last.at)[:19]} UTC).",
            ))  # fmt: skip
        run = runs.last
        if run is not None and run.report is not None and not run.report.ok:
            parts.append(tag("span",
                f"The last full verification (started {when(run.started_at)[:19]} UTC by "
                f"{run.started_by}) found {run.report.findings_total} problem(s).",
            ))  # fmt: skip
        if not parts:
            return Html("")
        return tag(
            "div",
            tag("strong", "Audit log chain broken: ")
            + join(parts, " ")
            + " "
            + tag("a", "See chain integrity", href="/console/chains"),
            class_="banner broken",
            role="alert",
            id="chain-banner",
        )


def _span(window: timedelta) -> str:
    hours = window / timedelta(hours=1)
    return "hour" if hours == 1 else f"{hours:g} hours"


WATCH = web.AppKey("console_chain_watch", ChainWatch)
