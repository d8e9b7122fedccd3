"""Issue 5: ``kill -9`` of a gateway worker in the middle of a connect storm.

Every connection that got CONNACK 0 has its ``connect`` event in ``auth_events`` (the
CONNACK waits for the spool's fsync; the restarted worker replays its spool), no event is
stored twice, and the killed worker's chain continues without a fork: the restarted
worker (same index, same spool) resumes the chain from its spool tail, so
`verify_chains` finds nothing and no ``<chain>#<uuid>`` chain appears.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import random
import signal
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from tests.conftest import Pki
from tests.faults.conftest import (
    Attempt,
    Client,
    GatewayProcess,
    connect_events,
    gateway_process,
    landed,
    query,
    register_devices,
    verify,
    wait_until,
)

TASKS = 8
DEVICES = 4


async def _storm(
    served: GatewayProcess, clients: list[Client], attempts: list[Attempt], stop: asyncio.Event
) -> None:
    counter = itertools.count()

    async def loop(n: int) -> None:
        rng = random.Random(n)
        while not stop.is_set():
            client = clients[rng.randrange(len(clients))]
            # Some sessions stay up a moment, so the kill also meets live sessions.
            hold = rng.choice((0.0, 0.0, 0.02, 0.2))
            attempt = await client.attempt(
                served.port, f"k{next(counter)}", version=rng.choice((4, 5)), hold=hold
            )
            attempts.append(attempt)
            if not attempt.ok:
                await asyncio.sleep(0.05)  # the worker is gone: do not spin

    async with asyncio.TaskGroup() as group:
        for n in range(TASKS):
            group.create_task(loop(n), name=f"storm-{n}")


def test_worker_killed_mid_storm(
    pki: Pki, fault_db: str, mosquitto_port: int, tmp_path: Path
) -> None:
    devices = asyncio.run(register_devices(fault_db, pki, tmp_path, DEVICES))
    clients = [Client(device) for device in devices]
    with gateway_process(
        pki=pki, database_url=fault_db, upstream=mosquitto_port, work=tmp_path / "gw"
    ) as served:
        attempts: list[Attempt] = []

        async def scenario() -> None:
            stop = asyncio.Event()
            storm = asyncio.create_task(_storm(served, clients, attempts, stop))
            try:
                # Both workers are admitting sessions before the kill.
                async def both_busy() -> bool:
                    rows = await connect_events(fault_db, served.instance)
                    return len({r["chain_id"] for r in rows if r["type"] == "connect"}) == 2

                assert await wait_until(both_busy, 15), served.log_text()
                await asyncio.sleep(0.5)
                index, pid = sorted(served.workers().items())[0]
                os.kill(pid, signal.SIGKILL)
                killed_at = datetime.now(UTC)
                ok_before = sum(a.ok for a in attempts)

                # The supervisor restarts it (backoff 0.5 s) and the storm goes on.
                async def restarted() -> bool:
                    workers = served.workers()
                    return len(workers) == 2 and workers.get(index) not in (None, pid)

                assert await wait_until(restarted, 15, step=0.05), served.log_text()

                # ... until the restarted worker has admitted sessions on the same chain.
                async def chain_continued() -> bool:
                    rows = await query(
                        fault_db,
                        "SELECT count(*) AS n FROM auth_events WHERE chain_id = $1"
                        " AND type = 'connect' AND time > $2",
                        served.chain(index),
                        killed_at,
                    )
                    return bool(rows[0]["n"] >= 5)

                assert await wait_until(chain_continued, 20), served.log_text()
                assert sum(a.ok for a in attempts) > ok_before
            finally:
                stop.set()
                await asyncio.wait_for(storm, 30)

        asyncio.run(scenario())

        admitted = [a for a in attempts if a.ok]
        failed = [a for a in attempts if not a.ok]
        assert len(admitted) >= 50, Counter(a.outcome for a in attempts)
        assert failed, "the kill interrupted no connection: the storm was not a storm"

        wanted = {a.client_id for a in admitted}
        check = functools.partial(landed, fault_db, served.instance, wanted)
        rows = asyncio.run(wait_until(check, 20)) or asyncio.run(
            connect_events(fault_db, served.instance)
        )

    connects = [r for r in rows if r["type"] == "connect"]
    per_client = Counter(r["client_id"] for r in connects)
    missing = [a.client_id for a in admitted if per_client[a.client_id] == 0]
    assert not missing, f"{len(missing)} admitted sessions without a connect event: {missing[:5]}"
    # One connect event per admitted attempt, at most one per interrupted attempt.
    assert all(per_client[a.client_id] == 1 for a in admitted), [
        (a.client_id, per_client[a.client_id]) for a in admitted if per_client[a.client_id] != 1
    ]
    assert all(per_client[a.client_id] <= 1 for a in failed)
    assert {
        r["outcome"] for r in connects if r["client_id"] in {a.client_id for a in admitted}
    } == {"allowed"}
    attempted = {a.client_id for a in attempts}
    assert set(per_client) <= attempted, set(per_client) - attempted

    # No event stored twice (the replay after the restart is idempotent).
    duplicates = asyncio.run(
        query(
            fault_db,
            "SELECT id, count(*) AS n FROM auth_events GROUP BY id HAVING count(*) > 1",
        )
    )
    assert duplicates == []
    # The killed worker's chain continued: same chain id, no fork, nothing missing.
    chains = {r["chain_id"] for r in rows}
    assert chains == {served.chain(0), served.chain(1)}, chains

    report = asyncio.run(verify(fault_db))
    assert report.ok, report.to_dict()
    assert report.chains == 2
