"""The policy store's costs: loading a snapshot, a change reaching a listener, and what the
default-attributes trigger adds to creating device rows.

``.venv/bin/python bench/policy_store.py [--devices 10000] [--changes 50]``

On a scratch database (created and dropped): N devices with 3 attributes each, one group
each (N/100 groups), 20 policies of 10 statements attached to fleets and groups. Prints:

* ``load_policy_snapshot``: wall time per load, this process's CPU per load, and the
  PostgreSQL backend's CPU per load (``/proc/<pg_backend_pid>/stat``; local server only).
* change -> NOTIFY: from just before COMMIT of an attribute change (`set_attributes`, one
  transaction with its auth event) to the listener's callback on another connection.
* device rows: 1000 rows per INSERT statement (as the merged enrollment statement inserts
  them) with the default-attributes trigger disabled, enabled without defaults, and
  enabled with 3 token defaults (which also bumps the version at commit), in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import statistics
import sys
import time
import uuid
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provisioning import policies
from schemas.migrate import migrate
from schemas.policy_store import POLICY_CHANNEL, load_policy_snapshot

ADMIN_URL = os.environ.get(
    "DEVICEGATE_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
TICKS = os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def backend_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def populate(conn: asyncpg.Connection, devices: int) -> None:
    ids = [f"d{i:06d}" for i in range(devices)]
    fleets = [f"fleet-{i % 10}" for i in range(devices)]
    await conn.executemany(
        "INSERT INTO fleets (name) VALUES ($1) ON CONFLICT DO NOTHING",
        [(f"fleet-{i}",) for i in range(10)],
    )
    await conn.execute(
        "INSERT INTO devices (device_id, fleet) SELECT * FROM unnest($1::text[], $2::text[])",
        ids,
        fleets,
    )
    keys = ["site", "line", "model"]
    await conn.execute(
        """INSERT INTO device_attributes (device_id, key, value)
           SELECT d, k, k || '-' || (abs(hashtext(d)) % 7) FROM unnest($1::text[]) AS d,
                  unnest($2::text[]) AS k""",
        ids,
        keys,
    )
    groups = max(1, devices // 100)
    await conn.executemany(
        "INSERT INTO device_groups (name) VALUES ($1)", [(f"g{i}",) for i in range(groups)]
    )
    await conn.execute(
        """INSERT INTO group_members (group_name, device_id)
           SELECT 'g' || (row_number() OVER () % $2), d FROM unnest($1::text[]) AS d""",
        ids,
        groups,
    )
    documents = {}
    for p in range(20):
        statements = [
            {"id": f"s{s}", "effect": "Allow" if s % 4 else "Deny",
             "actions": ["publish", "subscribe"],
             "resources": [f"plant/{{attr.site}}/{p}/{s}/{{device_id}}/#"]}
            for s in range(10)
        ]  # fmt: skip
        documents[f"p{p}"] = policies.canonical_document({"statements": statements})
    attach = [(f"p{p}", "fleet", f"fleet-{p % 10}") for p in range(10)]
    attach += [(f"p{p}", "group", f"g{p % groups}") for p in range(10, 20)]
    await policies.apply_policies(conn, documents, actor="bench", instance="bench", attach=attach)


async def bench_loads(conn: asyncpg.Connection, rounds: int) -> dict[str, float]:
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    await load_policy_snapshot(conn)  # warm
    cpu0, pg0, t0 = own_cpu(), backend_cpu(pid), time.perf_counter()
    for _ in range(rounds):
        snapshot = await load_policy_snapshot(conn)
    wall = (time.perf_counter() - t0) / rounds
    return {
        "wall_ms": wall * 1000,
        "client_cpu_ms": (own_cpu() - cpu0) / rounds * 1000,
        "postgres_cpu_ms": (backend_cpu(pid) - pg0) / rounds * 1000,
        "devices": len(snapshot.attributes),
    }


async def bench_notify(url: str, conn: asyncpg.Connection, changes: int) -> list[float]:
    listener = await asyncpg.connect(url)
    arrived: dict[int, float] = {}
    got = asyncio.Event()

    def heard(*args: object) -> None:
        arrived[int(str(args[-1]))] = time.perf_counter()
        got.set()

    await listener.add_listener(POLICY_CHANNEL, heard)
    latencies = []
    try:
        for i in range(changes):
            got.clear()
            start = time.perf_counter()
            _, version = await policies.set_attributes(
                conn, "d000001", {"site": f"s{i}"}, actor="bench", instance="bench"
            )
            assert version is not None
            await asyncio.wait_for(got.wait(), timeout=5)
            while version not in arrived:
                got.clear()
                await asyncio.wait_for(got.wait(), timeout=5)
            latencies.append((arrived[version] - start) * 1000)
    finally:
        await listener.close()
    return latencies


async def bench_inserts(conn: asyncpg.Connection, rounds: int) -> dict[str, tuple[float, float]]:
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    token = uuid.uuid4()
    await conn.execute(
        """INSERT INTO bootstrap_tokens (id, token_hash, fleet, uses_allowed, uses_left,
               expires_at, default_attributes)
           VALUES ($1, $2, 'fleet-0', 1, 1, now() + interval '1 day', $3::jsonb)""",
        token,
        secrets.token_bytes(32),
        json.dumps({"site": "a", "line": "b", "model": "c"}),
    )
    out: dict[str, tuple[float, float]] = {}
    cases = [("trigger disabled", False, None), ("trigger, no defaults", True, None),
             ("trigger, 3 token defaults", True, token)]  # fmt: skip
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in cases}
    for r in range(rounds):
        for name, enabled, token_id in cases:
            state = "ENABLE" if enabled else "DISABLE"
            await conn.execute(f"ALTER TABLE devices {state} TRIGGER devices_default_attributes")
            ids = [f"x{r}-{secrets.token_hex(6)}" for _ in range(1000)]
            pg0, t0 = backend_cpu(pid), time.perf_counter()
            await conn.execute(
                """INSERT INTO devices (device_id, fleet, token_id)
                   SELECT d, 'fleet-0', $2 FROM unnest($1::text[]) AS d""",
                ids,
                token_id,
            )
            samples[name].append(
                ((time.perf_counter() - t0) * 1000, (backend_cpu(pid) - pg0) * 1000)
            )
    await conn.execute("ALTER TABLE devices ENABLE TRIGGER devices_default_attributes")
    for name, values in samples.items():
        out[name] = (
            statistics.median(v[0] for v in values),
            statistics.median(v[1] for v in values),
        )
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--loads", type=int, default=10)
    args = parser.parse_args()
    name = f"dg_bench_policy_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rpartition("/")[0] + f"/{name}"
    try:
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn)
            await populate(conn, args.devices)
            loads = await bench_loads(conn, args.loads)
            latencies = sorted(await bench_notify(url, conn, args.changes))
            inserts = await bench_inserts(conn, 5)
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    load_avg = os.getloadavg()[0]
    print(f"policy store, {args.devices} devices x 3 attributes, 20 policies x 10 statements "
          f"(load average {load_avg:.1f})")  # fmt: skip
    print(f"load_policy_snapshot ({loads['devices']} devices): {loads['wall_ms']:.1f} ms wall, "
          f"{loads['client_cpu_ms']:.1f} ms client CPU, "
          f"{loads['postgres_cpu_ms']:.1f} ms PostgreSQL CPU per load")  # fmt: skip
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(f"change -> NOTIFY heard ({len(latencies)} attribute changes): "
          f"p50 {statistics.median(latencies):.2f} ms, p99 {p99:.2f} ms")  # fmt: skip
    base_wall, base_cpu = inserts["trigger disabled"]
    for case, (wall, cpu) in inserts.items():
        print(f"1000 device rows, {case}: {wall:.1f} ms wall ({wall / base_wall:.2f}x), "
              f"PostgreSQL CPU {cpu:.1f} ms ({cpu / max(base_cpu, 1e-9):.2f}x; "
              f"{cpu:.1f} us per row)")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
