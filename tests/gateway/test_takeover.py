"""The session bus without a database: its own notices mark claims seen, others' reach the
gateway, and the order of delivery decides which of two racing sessions survives."""

from __future__ import annotations

import asyncio

from gateway.takeover import Claim, SessionBus
from schemas.notify import SESSIONS_CHANNEL, SessionNotice


class Heard:
    def __init__(self) -> None:
        self.notices: list[SessionNotice] = []

    def taken_over(self, notice: SessionNotice) -> int:
        self.notices.append(notice)
        return 1


class Channels:
    def __init__(self) -> None:
        self.callbacks: dict[str, object] = {}

    def also_listen(self, channel: str, callback: object) -> None:
        self.callbacks[channel] = callback


def _notice(claim: Claim, instance: str = "gw-b", worker: str = "w0") -> str:
    return SessionNotice(
        device_id=claim.device_id,
        client_id=claim.client_id,
        instance=instance,
        worker=worker,
        session_id=claim.session_id,
    ).model_dump_json()


def test_own_notice_marks_the_claim_seen_and_others_reach_the_listener() -> None:
    async def run() -> None:
        bus = SessionBus(database_url="postgresql://unused", instance="gw-a", worker="w1")
        channels = Channels()
        bus.listen_on(channels)
        assert SESSIONS_CHANNEL in channels.callbacks
        heard = Heard()
        bus.attach(heard)
        bus._task = asyncio.get_running_loop().create_task(asyncio.sleep(3600))  # "started"
        mine = Claim("d1", "d1")
        waiting = asyncio.create_task(bus.announce(mine))
        await asyncio.sleep(0)
        assert bus._queue and not mine.seen
        theirs = Claim("d1", "d1")
        bus._on_notice(_notice(mine, "gw-a", "w1"))  # ours came back
        assert mine.seen and await waiting
        bus._on_notice(_notice(theirs))  # a newer session elsewhere
        bus._on_notice("not json")  # ignored, not fatal
        assert [n.session_id for n in heard.notices] == [theirs.session_id]
        assert bus.taken_over == 1
        bus._task.cancel()

    asyncio.run(run())


def test_an_announcement_that_never_comes_back_counts_as_seen() -> None:
    async def run() -> None:
        bus = SessionBus(
            database_url="postgresql://unused", instance="gw-a", worker="w0", wait=0.05
        )
        bus._task = asyncio.get_running_loop().create_task(asyncio.sleep(3600))
        claim = Claim("d1", None)
        assert not await bus.announce(claim)
        assert claim.seen
        # After a failed send (PostgreSQL away) nobody waits for the echo.
        bus._healthy = False
        hurried = Claim("d3", "c")
        start = asyncio.get_running_loop().time()
        assert not await bus.announce(hurried)
        assert hurried.seen and asyncio.get_running_loop().time() - start < 0.04
        bus._task.cancel()
        # Not started at all: nothing is sent, the claim is seen at once.
        idle = SessionBus(database_url="postgresql://unused", instance="gw-a", worker="w0")
        other = Claim("d2", "c")
        assert not await idle.announce(other) and other.seen

    asyncio.run(run())
