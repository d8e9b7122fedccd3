"""Benchmark: IDevID manifest import (``devicegate fleet import-manifest``), 100,000 rows.

Against a scratch database (created and dropped here), a CSV of N rows (half serials, half
SPKI hashes, with model/site/line attributes) is imported:

- ``in-process``: `manufacturers.import_manifest` over one connection, parsing included
  (what the command runs), timed with this process's CPU and the PostgreSQL backend's
  (from /proc, PostgreSQL on this host);
- ``command``: the real ``devicegate fleet import-manifest`` as a subprocess (interpreter
  start-up included), its CPU from the children's rusage;
- ``again``: the same file once more, every row an update (ON CONFLICT DO UPDATE).

Usage: .venv/bin/python bench/manifest_import.py [--rows 100000]
       (PostgreSQL from DEVICEGATE_BENCH_ADMIN_URL, default postgres@127.0.0.1/postgres)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from provisioning.enrollment import manufacturers
from provisioning.enrollment.manifest import parse
from schemas.migrate import migrate

ADMIN_URL = os.environ.get(
    "DEVICEGATE_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
TICKS = os.sysconf("SC_CLK_TCK")


def backend_cpu(pid: int) -> float:
    """User + system CPU seconds of a PostgreSQL backend (same host)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def write_manifest(path: Path, rows: int) -> None:
    with path.open("w") as out:
        out.write("serial,spki_sha256,model,site,line\n")
        for i in range(rows):
            if i % 2:
                out.write(f",{secrets.token_hex(32)},model-{i % 7},site-{i % 3},line-{i % 11}\n")
            else:
                out.write(f"{secrets.token_hex(16)},,model-{i % 7},site-{i % 3},\n")


def report(label: str, rows: int, wall: float, cpu: dict[str, float]) -> None:
    parts = ", ".join(
        f"{name} CPU {1e6 * seconds / rows:.1f} us/row" for name, seconds in cpu.items()
    )
    print(f"{label:11s} {rows:,} rows in {wall:.2f} s = {rows / wall:,.0f} rows/s; {parts}")


async def in_process(url: str, path: Path, fleet: str, rows: int, label: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        pid = conn.get_server_pid()
        before_pg, before_cpu, started = backend_cpu(pid), time.process_time(), time.perf_counter()
        with path.open(newline="") as handle:
            await manufacturers.import_manifest(
                conn, fleet=fleet, entries=parse(handle), source=path.name, actor="bench",
                instance="bench",
            )  # fmt: skip
        wall = time.perf_counter() - started
        cpu = {
            "importer": time.process_time() - before_cpu,
            "PostgreSQL": backend_cpu(pid) - before_pg,
        }
        report(label, rows, wall, cpu)
    finally:
        await conn.close()


def command(url: str, path: Path, fleet: str, rows: int) -> None:
    env = {**os.environ, "DEVICEGATE_DATABASE_URL": url}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "provisioning.commands.cli", "fleet", "import-manifest",
         "--fleet", fleet, str(path)],
        check=True, env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    report("command", rows, wall, {"devicegate (PostgreSQL not counted)": cpu})


async def main(args: argparse.Namespace) -> None:
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    name = f"dg_bench_manifest_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        conn = await asyncpg.connect(url)
        await migrate(conn)
        await conn.close()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "manifest.csv"
            write_manifest(path, args.rows)
            await in_process(url, path, "bench-a", args.rows, "in-process")
            await in_process(url, path, "bench-a", args.rows, "again")
            await asyncio.to_thread(command, url, path, "bench-b", args.rows)
        print(f"load average after: {os.getloadavg()[0]:.1f}")
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    asyncio.run(main(parser.parse_args()))
