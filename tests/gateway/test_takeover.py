"""The session bus: its own notices mark claims seen, others' reach the gateway, and the
order of delivery decides which of two racing sessions survives (without a database);
batched announcements and a replaced sending connection (against the real PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import asyncpg

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


class Listening:
    """A real LISTEN on the sessions channel, handing each notice to the buses."""

    def __init__(self) -> None:
        self.buses: list[SessionBus] = []

    def also_listen(self, channel: str, callback: object) -> None:
        assert channel == SESSIONS_CHANNEL

    def deliver(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        for bus in self.buses:
            bus._on_notice(payload)


@contextlib.asynccontextmanager
async def listening_bus(
    database_url: str, *, wait: float, coalesce: float
) -> AsyncIterator[tuple[SessionBus, asyncpg.Connection]]:
    """A started bus that hears its own notices through a real LISTEN; and that connection."""
    listening = Listening()
    listener = await asyncpg.connect(database_url)
    await listener.add_listener(SESSIONS_CHANNEL, listening.deliver)
    bus = SessionBus(
        database_url=database_url, instance="gw-a", worker="w0", wait=wait, coalesce=coalesce
    )
    bus.listen_on(listening)
    listening.buses.append(bus)
    await bus.start()
    try:
        yield bus, listener
    finally:
        await bus.close()
        await listener.close()


async def sent(bus: SessionBus, announced: int, round_trips: int) -> tuple[int, int]:
    """The bus's counters once they reach the expected values (bounded at 2 s): the notice can
    come back on the listening connection before the sending ``execute`` returns and counts it."""
    for _ in range(200):
        if (bus.announced, bus.round_trips) == (announced, round_trips):
            break
        await asyncio.sleep(0.01)
    return bus.announced, bus.round_trips


def test_claims_close_together_share_one_round_trip(database_url: str) -> None:
    """On a busy bus, announcements within ``coalesce`` of the first go out in one pg_notify
    transaction, and every one of them still comes back (is seen) before its CONNECT would
    be sent. On a quiet bus a lone announcement does not wait for company."""

    async def run() -> None:
        # A long window, so "waited for company" (>= 2 s) is far from "sent at once" (one
        # round trip, slow on a loaded machine) and the check cannot flake either way.
        async with listening_bus(database_url, wait=5.0, coalesce=2.0) as (bus, _):
            began = time.monotonic()
            assert await bus.announce(Claim("lone", "lone"))  # quiet: sent at once
            assert time.monotonic() - began < 1.0, "a lone claim waited for company"
            assert await sent(bus, 1, 1) == (1, 1)
            claims = [Claim(f"d{i}", f"d{i}") for i in range(3)]
            waiting = []
            for claim in claims:  # busy now; 30 ms apart: all inside the first one's window
                waiting.append(asyncio.create_task(bus.announce(claim)))
                await asyncio.sleep(0.03)
            assert await asyncio.gather(*waiting) == [True, True, True]
            assert all(claim.seen for claim in claims)
            assert await sent(bus, 4, 2) == (4, 2)

    asyncio.run(run())


def test_a_lost_sending_connection_is_replaced(database_url: str) -> None:
    """The bus's own connection killed by the server: a later announcement reconnects and
    comes back (one sent on the dead connection is lost, its wait bounded by ``wait``)."""

    async def run() -> None:
        async with listening_bus(database_url, wait=1.0, coalesce=0.0) as (bus, listener):
            assert await bus.announce(Claim("d1", "d1"))
            assert bus._conn is not None
            pid = bus._conn.get_server_pid()
            await listener.execute("SELECT pg_terminate_backend($1)", pid)
            for _ in range(50):  # the first send after the kill may fail (and be retried)
                if await bus.announce(Claim("d2", "d2")):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("no announcement came back after the connection died")
            assert bus._conn is not None and bus._conn.get_server_pid() != pid

    asyncio.run(run())
