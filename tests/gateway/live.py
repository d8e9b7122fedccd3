"""Helpers of the live-session tests: a gateway on the revocation cache, provisioning's own
operator actions (so the NOTIFY contract is exercised exactly as sent), timing."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from gateway.revocation_listen import RevocationCache
from gateway.server import Gateway
from provisioning import admin, store
from schemas.notify import RevocationNotice
from tests.gateway.conftest import Device, Harness

T = TypeVar("T")
ACTOR = {"actor": "test", "instance": "test-provisioning"}


@dataclass
class Live:
    """A gateway whose directory is a `RevocationCache`."""

    gateway: Gateway
    cache: RevocationCache

    @property
    def port(self) -> int:
        return self.gateway.port


@contextlib.contextmanager
def live_gateway(
    harness: Harness, *, database_url: str | None = None, **cache_options: Any
) -> Iterator[Live]:
    cache = RevocationCache(database_url=database_url or harness.database_url, **cache_options)
    harness.call(cache.start())
    try:
        assert harness.call(cache.wait_current(10))
        gateway = harness.start_gateway(directory=cache)
        try:
            yield Live(gateway, cache)
        finally:
            harness.call(gateway.close())
    finally:
        harness.call(cache.close())


def provision(harness: Harness, action: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run a `provisioning.admin` action (its own transaction, event and NOTIFY)."""

    async def run() -> T:
        async with harness.pool.acquire() as conn:
            return await action(conn, *args, **ACTOR)

    return harness.call(run())


def supersede(harness: Harness, old: Device, new: Device) -> None:
    """What renewal commits (`enrollment.service` renew): supersede + NOTIFY, one transaction.

    ``new`` is already registered (``make_device(device_id=old.device_id)``).
    """

    async def run() -> None:
        async with harness.pool.acquire() as conn, conn.transaction():
            assert await store.supersede_certificate(conn, old.serial)
            await store.notify_revocation(
                conn,
                RevocationNotice(
                    kind="certificate",
                    device_id=old.device_id,
                    serial=old.serial,
                    status="superseded",
                ),
            )

    harness.call(run())


def revoke_certificate(harness: Harness, device: Device) -> None:
    provision(harness, admin.revoke_certificate, device.serial)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(step)
