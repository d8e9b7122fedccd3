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

``--signer pkcs11`` puts the CA keys in a SoftHSM2 token (`provisioning.pki.pkcs11`; the
token's work is in the server process's CPU, SoftHSM2 being a library); ``--signer both``
runs a server of each, alternating, and prints the PKCS#11 / file ratio of enrollments/s.

Usage: ``.venv/bin/python bench/enroll.py [--seconds 5] [--repeat 3] [--concurrency 32]
[--signer file|pkcs11|both] [--py-spy .venv/bin/py-spy]`` (the last samples the server during
both HTTP measurements into ``profile-healthz.txt`` and ``profile-enroll.txt``, py-spy's raw
collapsed stacks). It creates a scratch database per signer (``DEVICEGATE_TEST_ADMIN_URL``,
default the local ``postgres`` database), a PKI (and a SoftHSM2 token) in a temporary
directory, and removes them afterwards.
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
from provisioning.pki.pkcs11 import TokenRef
from schemas.api import TokenCreateRequest
from schemas.migrate import migrate
from schemas.settings import Settings

ADMIN_URL = os.environ.get(
    "DEVICEGATE_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
PASSPHRASE = "bench-passphrase"
SOFTHSM_MODULES = (
    Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/lib/softhsm/libsofthsm2.so"),
)


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


def _softhsm_token(directory: Path) -> TokenRef:
    """A SoftHSM2 token in ``directory`` (SOFTHSM2_CONF is set for this process and the
    servers it starts), with its PIN in a 0600 file."""
    module = next((path for path in SOFTHSM_MODULES if path.exists()), None)
    if module is None:
        raise SystemExit("SoftHSM2 is not installed (scripts/ensure-services.sh installs it)")
    (directory / "tokens").mkdir(parents=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\n"
        "log.level = ERROR\n"
    )
    os.environ["SOFTHSM2_CONF"] = str(conf)
    pin = secrets.token_hex(8)
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin", pin,
         "--so-pin", secrets.token_hex(8)],
        check=True,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    pin_file = directory / "pin"
    pin_file.touch(0o600)
    pin_file.write_text(pin + "\n")
    return TokenRef(module, "bench", pin_file)


@dataclass
class Target:
    """One signer's PKI, database and running server."""

    signer: str
    pki_dir: Path
    database_url: str
    port: int
    token: str = ""
    server: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.pki_dir / "chain.pem"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start(target: Target) -> None:
    target.token = uvloop.run(_prepare(target.database_url))
    env = {
        **os.environ,
        "DEVICEGATE_DATABASE_URL": target.database_url,
        "DEVICEGATE_PKI_DIR": str(target.pki_dir),
        "DEVICEGATE_CA_PASSPHRASE": PASSPHRASE,
        "DEVICEGATE_INSTANCE_ID": "bench",
    }
    devicegate = str(Path(sys.executable).with_name("devicegate"))
    target.server = subprocess.Popen(
        [devicegate, "serve", "provisioning", "--listen", f"127.0.0.1:{target.port}"],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    _wait_ready(target.url, target.context)


def _requests(
    target: Target, csrs: list[str]
) -> tuple[
    Callable[[aiohttp.ClientSession], Awaitable[int]],
    Callable[[aiohttp.ClientSession], Awaitable[int]],
]:
    async def healthz(session: aiohttp.ClientSession) -> int:
        async with session.get(f"{target.url}/healthz") as response:
            await response.read()
            return response.status

    counter = iter(range(10**9))

    async def enroll(session: aiohttp.ClientSession) -> int:
        body = {"token": target.token, "csr": csrs[next(counter) % len(csrs)]}
        async with session.post(f"{target.url}/v1/enroll", json=body) as response:
            await response.read()
            return response.status

    return healthz, enroll


@dataclass(frozen=True, slots=True)
class Result:
    trivial: Measured
    enrolled: Measured
    pairs: list[tuple[Measured, Measured]]
    in_process: float
    signing: float


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs of both")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--port", type=int, default=0, help="Listener port (0: a free one).")
    parser.add_argument(
        "--signer",
        choices=("file", "pkcs11", "both"),
        default="file",
        help="CA key in its file, in a SoftHSM2 token, or a server of each (alternating)",
    )
    parser.add_argument(
        "--py-spy",
        default=None,
        metavar="BINARY",
        help="py-spy binary: sample the server during both HTTP measurements and write "
        "raw stacks to profile-healthz.txt and profile-enroll.txt (in the current directory)",
    )
    args = parser.parse_args()
    signers = ("file", "pkcs11") if args.signer == "both" else (args.signer,)

    base, _, _ = ADMIN_URL.rpartition("/")
    targets: list[Target] = []
    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for index, signer in enumerate(signers):
                pki_dir = Path(tmp) / f"pki-{signer}"
                if signer == "file":
                    init_pki(pki_dir, passphrase=PASSPHRASE.encode())
                else:
                    init_pki(pki_dir, passphrase=None, token=_softhsm_token(Path(tmp) / "hsm"))
                name = f"dg_bench_{secrets.token_hex(4)}"
                port = args.port + index if args.port else _free_port()
                target = Target(signer, pki_dir, f"{base}/{name}", port)
                targets.append(target)
                uvloop.run(_admin(f'CREATE DATABASE "{name}"'))
                _start(target)
            csrs = [csr_pem(generate_key()) for _ in range(16)]
            requests = {target.signer: _requests(target, csrs) for target in targets}

            # Warm up both routes: the first enrollments open the pool's connections and
            # import what signing needs, which is no part of the steady state.
            for target in targets:
                healthz, enroll = requests[target.signer]
                uvloop.run(_load(1.0, args.concurrency, healthz, target.context))
                uvloop.run(_load(1.0, args.concurrency, enroll, target.context))
            # The measurements alternate ``--repeat`` times (trivial, enroll, for each
            # signer) and each figure is the median of its runs: one 5 s run moves by a
            # fifth on this VM whatever the code does.
            pairs: dict[str, list[tuple[Measured, Measured]]] = {s: [] for s in signers}
            for run in range(args.repeat):
                for target in targets:
                    assert target.server is not None
                    healthz, enroll = requests[target.signer]
                    spy = args.py_spy if run == 0 else None
                    measure = (
                        target.server.pid,
                        target.database_url,
                        args.seconds,
                        args.concurrency,
                    )
                    with _profiled(spy, target.server.pid, Path("profile-healthz.txt")):
                        trivial = _measure(*measure, healthz, target.context)
                    with _profiled(spy, target.server.pid, Path("profile-enroll.txt")):
                        enrolled = _measure(*measure, enroll, target.context)
                    pairs[target.signer].append((trivial, enrolled))
            for target in targets:
                settings = Settings(
                    database_url=target.database_url,
                    pki_dir=target.pki_dir,
                    ca_passphrase=PASSPHRASE,
                    instance_id="bench",
                )
                runs = pairs[target.signer]
                results[target.signer] = Result(
                    _median([t for t, _ in runs]),
                    _median([e for _, e in runs]),
                    runs,
                    uvloop.run(
                        _service_rate(settings, target.token, csrs, args.seconds, args.concurrency)
                    ),
                    _sign_rate(target.pki_dir, args.seconds),
                )
        finally:
            for target in targets:
                if target.server is not None:
                    target.server.terminate()
                    target.server.wait(15)
                name = target.database_url.rpartition("/")[2]
                uvloop.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    print(
        f"concurrency {args.concurrency}, new TLS connection per request, "
        f"{args.seconds:g} s per measurement, {os.cpu_count()} CPUs (client shares them)"
    )
    for signer, result in results.items():
        print(f"\n-- CA key: {'its file (FileSigner)' if signer == 'file' else 'SoftHSM2 token'}")
        rows = [
            ("GET /healthz (trivial ceiling)", result.trivial),
            ("POST /v1/enroll", result.enrolled),
        ]
        print(
            f"{'measurement':<34}{'per second':>11}{'ok':>7}{'failed':>7}"
            f"{'server CPU ms/req':>19}{'PostgreSQL':>11}{'client':>8}"
        )
        for label, m in rows:
            print(
                f"{label:<34}{m.rate:>11.1f}{m.ok:>7}{m.failed:>7}{m.server_ms:>19.2f}"
                f"{m.postgres_ms:>11.2f}{m.client_ms:>8.2f}"
            )
        print(f"{'enroll in-process (no HTTP/TLS)':<34}{result.in_process:>11.1f}")
        print(f"{'device certificates signed, 1 proc':<34}{result.signing:>11.1f}")
        ratios = " ".join(f"{e.rate / t.rate:.2f}" for t, e in result.pairs)
        print(f"(medians of {args.repeat} alternating runs; enroll / trivial per run: {ratios})")
        print(
            f"enroll / trivial = {result.enrolled.rate / result.trivial.rate:.2f}  (target >= 0.70)"
        )
    if len(results) == 2:
        file, token = results["file"], results["pkcs11"]
        per_run = " ".join(
            f"{h[1].rate / f[1].rate:.2f}" for f, h in zip(file.pairs, token.pairs, strict=True)
        )
        print(
            f"\nSoftHSM2 / file: enrollments/s {token.enrolled.rate:.1f} / "
            f"{file.enrolled.rate:.1f} = {token.enrolled.rate / file.enrolled.rate:.2f}  "
            f"(target >= 0.80; per run: {per_run})"
        )
        print(
            f"server CPU per enrollment {token.enrolled.server_ms:.2f} / "
            f"{file.enrolled.server_ms:.2f} ms, PostgreSQL {token.enrolled.postgres_ms:.2f} / "
            f"{file.enrolled.postgres_ms:.2f} ms, client {token.enrolled.client_ms:.2f} / "
            f"{file.enrolled.client_ms:.2f} ms; in-process enrollments/s "
            f"{token.in_process:.1f} / {file.in_process:.1f}; device certificates signed/s "
            f"{token.signing:.1f} / {file.signing:.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
