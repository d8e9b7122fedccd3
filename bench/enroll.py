"""Enrollment throughput of ``devicegate serve provisioning``, beside two ceilings.

Measured in one run, each for a bounded time, at concurrency 32 with a new TLS connection
per request (as devices on a factory line connect):

- ``trivial``: ``GET /healthz`` on the same TLS listener: the cost of TLS + HTTP alone;
- ``enroll``:  ``POST /v1/enroll`` with a multi-use token: CSR check, signing, one
  transaction (token use, device, certificate, chained event);
- ``sign``:    certificates per second that ``cryptography`` alone signs in one process;
- ``service``: the same enrollments called in-process (no HTTP, no TLS), which shows how much
  of the enrollment cost is the service itself (CSR check, signing, database) and how much
  the connection.

The CPU each request costs is printed for the server process, for its PostgreSQL backends
and for the load generator (which shares the machine's CPUs): rates move with whatever else
runs on the machine, the CPU per request much less.

Usage: ``.venv/bin/python bench/enroll.py [--seconds 5] [--repeat 3] [--concurrency 32] [--py-spy
.venv/bin/py-spy]`` (the last samples the server during both HTTP measurements into
``profile-healthz.txt`` and ``profile-enroll.txt``, py-spy's raw collapsed stacks). It creates a
scratch database (``DEVICEGATE_TEST_ADMIN_URL``, default the local ``postgres``
database) and a PKI in a temporary directory, and removes both afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import aiohttp
import asyncpg
import uvloop

from provisioning import admin
from provisioning.agent.device import csr_pem, generate_key
from provisioning.enrollment.service import Peer
from provisioning.http.server import open_service
from provisioning.pki.ca import DeviceIdentity, SignOptions
from provisioning.pki.csr import parse_csr_pem
from provisioning.pki.directory import init_pki, load_ca
from schemas.api import TokenCreateRequest
from schemas.migrate import migrate
from schemas.settings import Settings

ADMIN_URL = os.environ.get(
    "DEVICEGATE_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
PASSPHRASE = "bench-passphrase"


async def _load(
    seconds: float,
    concurrency: int,
    request: Callable[[aiohttp.ClientSession], Awaitable[int]],
    context: ssl.SSLContext,
) -> tuple[float, int, int]:
    """(requests/s, ok, failed) of ``concurrency`` workers for ``seconds``."""
    deadline = time.perf_counter() + seconds
    ok = failed = 0
    # force_close: a new TCP + TLS connection for every request.
    connector = aiohttp.TCPConnector(ssl=context, force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal ok, failed
            while time.perf_counter() < deadline:
                try:
                    status = await request(session)
                except (aiohttp.ClientError, OSError):
                    status = 0
                if status in (200, 201):
                    ok += 1
                else:
                    failed += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return ok / elapsed, ok, failed


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _backend_pids(database_url: str) -> list[int]:
    """PostgreSQL backends connected to the bench database (the server's pool)."""

    async def query() -> list[int]:
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()"
            )
        finally:
            await conn.close()
        return [row["pid"] for row in rows]

    return uvloop.run(query())


def _cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):  # a backend gone, or not readable
            total += _cpu_seconds(pid)
    return total


@dataclass(frozen=True, slots=True)
class Measured:
    rate: float
    ok: int
    failed: int
    server_ms: float  # server process CPU per successful request
    postgres_ms: float  # CPU of the server's PostgreSQL backends per request
    client_ms: float  # the load generator's own CPU per request


def _median(runs: list[Measured]) -> Measured:
    """Each column's own median over the runs (the ok/failed counts are summed)."""
    return Measured(
        statistics.median(m.rate for m in runs),
        sum(m.ok for m in runs),
        sum(m.failed for m in runs),
        statistics.median(m.server_ms for m in runs),
        statistics.median(m.postgres_ms for m in runs),
        statistics.median(m.client_ms for m in runs),
    )


def _measure(
    pid: int,
    database_url: str,
    seconds: float,
    concurrency: int,
    request: Callable[[aiohttp.ClientSession], Awaitable[int]],
    context: ssl.SSLContext,
) -> Measured:
    """`_load` plus CPU milliseconds per successful request: server, its PostgreSQL
    backends (the pool is open and warm by now) and the load generator."""
    backends = _backend_pids(database_url)
    before, pg_before, client_before = _cpu_seconds(pid), _cpu_of(backends), time.process_time()
    rate, ok, failed = uvloop.run(_load(seconds, concurrency, request, context))
    per = 1000 / max(ok, 1)
    return Measured(
        rate,
        ok,
        failed,
        (_cpu_seconds(pid) - before) * per,
        (_cpu_of(backends) - pg_before) * per,
        (time.process_time() - client_before) * per,
    )


@contextlib.contextmanager
def _profiled(py_spy: str | None, pid: int, out: Path) -> Iterator[None]:
    """Sample the server with py-spy (raw collapsed stacks into ``out``) while the block runs."""
    if py_spy is None:
        yield
        return
    proc = subprocess.Popen(
        [py_spy, "record", "-p", str(pid), "-r", "250", "-f", "raw", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # let it attach before the load starts
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def _sign_rate(pki_dir: Path, seconds: float) -> float:
    ca = load_ca(pki_dir, PASSPHRASE.encode())
    key = generate_key().public_key()
    count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        options = SignOptions.starting_now(
            validity=timedelta(days=30),
            backdate=timedelta(minutes=5),
        )
        ca.issue_device_certificate(key, DeviceIdentity(f"d{count}", "bench", "x"), options)
        count += 1
    return count / (time.perf_counter() - start)


async def _service_rate(
    settings: Settings, token: str, csrs: list[str], seconds: float, concurrency: int
) -> float:
    service = await open_service(settings)
    accepted = [parse_csr_pem(csr) for csr in csrs]
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(index: int) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await service.enroll(
                token=token,
                csr=accepted[index % len(accepted)],
                hardware_id=None,
                peer=Peer(address="127.0.0.1"),
            )
            done += 1

    start = time.perf_counter()
    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        await service.close()
    return done / (time.perf_counter() - start)


async def _prepare(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        created = await admin.create_token(
            conn,
            TokenCreateRequest(fleet="bench", uses=1_000_000, ttl="1h"),
            actor="bench",
            instance="bench",
        )
    finally:
        await conn.close()
    return created.token


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _wait_ready(url: str, context: ssl.SSLContext, timeout: float = 20.0) -> None:
    async def poll() -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                try:
                    async with session.get(f"{url}/readyz", ssl=context) as response:
                        if response.status == 200:
                            return
                except (aiohttp.ClientError, OSError):
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError("provisioning did not become ready")

    uvloop.run(poll())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs of both")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--port", type=int, default=0, help="Listener port (0: a free one).")
    parser.add_argument(
        "--py-spy",
        default=None,
        metavar="BINARY",
        help="py-spy binary: sample the server during both HTTP measurements and write "
        "raw stacks to profile-healthz.txt and profile-enroll.txt (in the current directory)",
    )
    args = parser.parse_args()
    if not args.port:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            args.port = sock.getsockname()[1]

    name = f"dg_bench_{secrets.token_hex(4)}"
    base, _, _ = ADMIN_URL.rpartition("/")
    database_url = f"{base}/{name}"
    with tempfile.TemporaryDirectory() as tmp:
        pki_dir = Path(tmp) / "pki"
        init_pki(pki_dir, passphrase=PASSPHRASE.encode())
        uvloop.run(_admin(f'CREATE DATABASE "{name}"'))
        server: subprocess.Popen[bytes] | None = None
        try:
            token = uvloop.run(_prepare(database_url))
            env = {
                **os.environ,
                "DEVICEGATE_DATABASE_URL": database_url,
                "DEVICEGATE_PKI_DIR": str(pki_dir),
                "DEVICEGATE_CA_PASSPHRASE": PASSPHRASE,
                "DEVICEGATE_INSTANCE_ID": "bench",
            }
            devicegate = str(Path(sys.executable).with_name("devicegate"))
            server = subprocess.Popen(
                [devicegate, "serve", "provisioning", "--listen", f"127.0.0.1:{args.port}"],
                env=env,
                stderr=subprocess.DEVNULL,
            )
            url = f"https://127.0.0.1:{args.port}"
            context = ssl.create_default_context(cafile=str(pki_dir / "chain.pem"))
            _wait_ready(url, context)
            csrs = [csr_pem(generate_key()) for _ in range(16)]

            async def healthz(session: aiohttp.ClientSession) -> int:
                async with session.get(f"{url}/healthz") as response:
                    await response.read()
                    return response.status

            counter = iter(range(10**9))

            async def enroll(session: aiohttp.ClientSession) -> int:
                body = {"token": token, "csr": csrs[next(counter) % len(csrs)]}
                async with session.post(f"{url}/v1/enroll", json=body) as response:
                    await response.read()
                    return response.status

            # Warm up both routes: the first enrollments open the pool's connections and
            # import what signing needs, which is no part of the steady state.
            uvloop.run(_load(1.0, args.concurrency, healthz, context))
            uvloop.run(_load(1.0, args.concurrency, enroll, context))
            # The two alternate ``--repeat`` times and each figure is the median of its runs:
            # one 5 s run moves by a fifth on this VM whatever the code does.
            pairs: list[tuple[Measured, Measured]] = []
            for run in range(args.repeat):
                spy = args.py_spy if run == 0 else None
                with _profiled(spy, server.pid, Path("profile-healthz.txt")):
                    trivial = _measure(
                        server.pid, database_url, args.seconds, args.concurrency, healthz, context
                    )
                with _profiled(spy, server.pid, Path("profile-enroll.txt")):
                    enrolled = _measure(
                        server.pid, database_url, args.seconds, args.concurrency, enroll, context
                    )
                pairs.append((trivial, enrolled))
            trivial = _median([t for t, _ in pairs])
            enrolled = _median([e for _, e in pairs])
            signing = _sign_rate(pki_dir, args.seconds)
            settings = Settings(
                database_url=database_url,
                pki_dir=pki_dir,
                ca_passphrase=PASSPHRASE,
                instance_id="bench",
            )
            in_process = uvloop.run(
                _service_rate(settings, token, csrs, args.seconds, args.concurrency)
            )
        finally:
            if server is not None:
                server.terminate()
                server.wait(15)
            uvloop.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    print(
        f"concurrency {args.concurrency}, new TLS connection per request, "
        f"{args.seconds:g} s per measurement, {os.cpu_count()} CPUs (client shares them)"
    )
    rows = [("GET /healthz (trivial ceiling)", trivial), ("POST /v1/enroll", enrolled)]
    print(
        f"{'measurement':<34}{'per second':>11}{'ok':>7}{'failed':>7}"
        f"{'server CPU ms/req':>19}{'PostgreSQL':>11}{'client':>8}"
    )
    for label, m in rows:
        print(
            f"{label:<34}{m.rate:>11.1f}{m.ok:>7}{m.failed:>7}{m.server_ms:>19.2f}"
            f"{m.postgres_ms:>11.2f}{m.client_ms:>8.2f}"
        )
    print(f"{'enroll in-process (no HTTP/TLS)':<34}{in_process:>11.1f}")
    print(f"{'cryptography signing, 1 process':<34}{signing:>11.1f}")
    ratios = " ".join(f"{e.rate / t.rate:.2f}" for t, e in pairs)
    print(f"(medians of {args.repeat} alternating runs; enroll / trivial per run: {ratios})")
    print(f"enroll / trivial = {enrolled.rate / trivial.rate:.2f}  (target >= 0.70)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
