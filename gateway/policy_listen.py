"""`PolicyFollower`: the gateway worker's policy, kept current by LISTEN/NOTIFY.

Every committed policy change (policy, attachment, device attribute, group) bumps the
global policy version and sends ``pg_notify(POLICY_CHANNEL, '<version>')`` in the same
transaction (the policy store's contract). The follower holds one listening connection,
like `gateway.revocation_listen.RevocationCache`, and on each notice loads the whole
snapshot again and hands the new `PolicyState` to the attached gateways, which re-judge
their live sessions (`gateway.server.Gateway.policy_changed`).

Invariants:

* Coalesced: notices are hints, the snapshot is the state. A notice that arrives while a
  load runs triggers exactly one more load after it (however many arrive), and none when
  the load already saw its version (the payload names it); an unreadable payload always
  triggers one.
* After every (re)connection the snapshot is loaded *after* ``LISTEN`` is in place, so
  nothing committed while the connection was down is missed. A heartbeat query on the
  listening connection every ``heartbeat`` seconds notices a dead connection that TCP
  would not report; then it reconnects with exponential backoff (jittered).
* A snapshot that fails to load or compile is logged and retried (the connection is
  dropped and made again): the worker keeps the version it has. Versions only go forward:
  an older snapshot (a lagging replica) never replaces a newer one.
* Until the first snapshot is loaded, the state is `gateway.policy_live.UNLOADED` and every
  CONNECT is refused (``policy_not_loaded``); `wait_current` waits for it at start. Once
  loaded, an outage changes nothing: the last version stays in force (new connections are
  refused anyway when the revocation state goes stale), and is brought up to date by the
  load that follows the reconnection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Final, Protocol

import asyncpg

from gateway.database import close_quietly
from gateway.policy_live import UNLOADED, PolicyState, state_from_snapshot
from schemas.policy_store import POLICY_CHANNEL, load_policy_snapshot

__all__ = [
    "POLICY_CHANNEL",
    "PolicyFollower",
    "PolicyListener",
    "StateLoader",
    "load_database_state",
]

log = logging.getLogger("devicegate.gateway.policy")

APPLICATION_NAME: Final = "devicegate-policy-listen"
"""How the listening connection shows in ``pg_stat_activity``."""

StateLoader = Callable[[asyncpg.Connection], Awaitable[PolicyState]]
"""Loads the whole policy (one snapshot) on the given connection and compiles it."""


class PolicyListener(Protocol):
    """What the follower tells (the `gateway.server.Gateway`)."""

    def policy_changed(self, state: PolicyState) -> None: ...


class PolicyFollower:
    """The policy from PostgreSQL, kept current by LISTEN/NOTIFY (see the module invariants).

    Args:
        database_url: PostgreSQL; one dedicated connection listens and loads.
        load: Loads and compiles the snapshot (`StateLoader`).
        heartbeat: Seconds between liveness queries on the listening connection.
        retry_min: First reconnection delay; doubles up to ``retry_max`` (with jitter).
        retry_max: Longest reconnection delay.
        timeout: Limit for connecting, each heartbeat and each load.
    """

    def __init__(
        self,
        *,
        database_url: str,
        load: StateLoader,
        heartbeat: float = 5.0,
        retry_min: float = 0.1,
        retry_max: float = 5.0,
        timeout: float = 10.0,
    ) -> None:
        self.database_url = database_url
        self._load = load
        self.heartbeat = heartbeat
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.timeout = timeout
        self.state: PolicyState = UNLOADED
        self._listeners: list[PolicyListener] = []
        self._wanted = -1  # the highest version a notice named
        self._due = False  # a load is due (a notice newer than the state, or unreadable)
        self._wake = asyncio.Event()
        self._loaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.notifications = 0
        self.loads = 0
        self.load_seconds = 0.0  # the last load's duration (snapshot + compile)

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start following in the background (returns at once; see `wait_current`)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._follow_forever(), name="policy-listen"
            )

    async def wait_current(self, within: float) -> bool:
        """Wait until a first snapshot is loaded; False after ``within`` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._loaded.wait()
        return self._loaded.is_set()

    async def close(self) -> None:
        task, self._task = self._task, None
        await close_quietly(task, None, grace=self.timeout)

    async def __aenter__(self) -> PolicyFollower:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def attach(self, listener: PolicyListener) -> None:
        """Hand every new state to ``listener`` (the current one at once, if loaded)."""
        self._listeners.append(listener)
        if self.state.loaded:
            listener.policy_changed(self.state)

    def detach(self, listener: PolicyListener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    @property
    def loaded(self) -> bool:
        return self.state.loaded

    # --- notices -----------------------------------------------------------------------

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.notifications += 1
        try:
            version = int(payload)
        except ValueError:
            log.warning("unreadable policy notice %r: reloading", payload[:100])
            self._due = True
        else:
            if version > max(self._wanted, self.state.version):
                self._wanted = version
                self._due = True
        if self._due:
            self._wake.set()

    # --- the listening connection ------------------------------------------------------

    async def _follow_forever(self) -> None:
        delay = self.retry_min
        while True:
            connection: asyncpg.Connection | None = None
            try:
                connection = await asyncpg.connect(
                    self.database_url,
                    timeout=self.timeout,
                    server_settings={"application_name": APPLICATION_NAME},
                )
                await self._follow(connection)
                delay = self.retry_min
            except Exception as exc:  # never give up: reconnect, whatever failed
                log.warning(
                    "policy listener: %s: %s (retrying in %.1f s; in force: %s)",
                    type(exc).__name__,
                    exc,
                    delay,
                    f"version {self.state.version}" if self.state.loaded else "nothing",
                )
            finally:
                if connection is not None:
                    connection.terminate()
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
            delay = min(delay * 2, self.retry_max)

    async def _follow(self, connection: asyncpg.Connection) -> None:
        """LISTEN, load, then wait for notices and heartbeat until the connection fails."""
        lost = False

        def terminated(_connection: object) -> None:
            nonlocal lost
            lost = True
            self._wake.set()

        connection.add_termination_listener(terminated)
        await connection.add_listener(POLICY_CHANNEL, self._on_notify)
        while not lost:
            self._due = False  # a notice from here on means one more load
            await self._reload(connection)
            while not (lost or self._due):
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.heartbeat):
                        await self._wake.wait()
                if lost or self._due:
                    break
                async with asyncio.timeout(self.timeout):
                    await connection.fetchval("SELECT 1")

    async def _reload(self, connection: asyncpg.Connection) -> None:
        started = time.perf_counter()
        async with asyncio.timeout(self.timeout):
            state = await self._load(connection)
        self.loads += 1
        self.load_seconds = time.perf_counter() - started
        if self.state.loaded and state.version <= self.state.version:
            return  # nothing new (a resync, or a notice already seen by the last load)
        previous, self.state = self.state, state
        # The first load is the start's (quiet, as the revocation state's); changes are news.
        log.log(
            logging.INFO if previous.loaded else logging.DEBUG,
            "policy version %d loaded in %.1f ms (was %s)",
            state.version,
            self.load_seconds * 1e3,
            previous.version if previous.loaded else "none",
        )
        self._loaded.set()
        for listener in list(self._listeners):
            try:
                listener.policy_changed(state)
            except Exception:  # one broken listener must not stop the others
                log.exception("policy listener failed")


async def load_database_state(connection: asyncpg.Connection) -> PolicyState:
    """The production `StateLoader`: the policy store's snapshot, compiled."""
    return state_from_snapshot(await load_policy_snapshot(connection))
