"""A whole devicegate on this machine, on scratch state: PKI, database, broker, both services.

`scratch_stack` is an async context manager. Everything it starts is registered on an
`contextlib.AsyncExitStack` the moment it exists, so a failure half-way, Ctrl-C or
SIGTERM (the caller turns it into a cancellation) tears down exactly what was started,
in reverse order: gateway (which flushes its event spool), provisioning, broker, the
scratch database, the throwaway PostgreSQL cluster, the temporary directory.

Children run in their own session (process group), so a terminal's Ctrl-C reaches only
the demo, which then stops them in order instead of all of them racing each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import aiohttp
import asyncpg

from provisioning.pki.directory import CHAIN, init_pki
from schemas.errors import DevicegateError
from schemas.migrate import migrate
from schemas.settings import CRL_PATH

LOCAL_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
READY_TIMEOUT = 30.0
"""Seconds a service gets to become ready before the demo gives up."""
STOP_TIMEOUT = 10.0

NO_MOSQUITTO = (
    "the demo needs an upstream MQTT broker and mosquitto is not installed: "
    "apt-get install mosquitto (an embedded broker is not available yet)"
)

DEMO_POLICY = """\
# The demo's topic policy. Every fleet keeps the default (publish and subscribe
# devices/{device_id}/#, subscribe fleets/{fleet}/#); the "dashboard" fleet may only
# read the telemetry of every device, and publish nothing.
[fleets.dashboard]
publish = []
subscribe = ["devices/+/telemetry"]
"""


class StackError(DevicegateError):
    """A part of the scratch stack could not be started."""


class MissingDependency(StackError):
    """A program the demo needs is not installed (exit status 2)."""


class DatabaseChoice(StrEnum):
    AUTO = "auto"
    LOCAL = "local"
    THROWAWAY = "throwaway"


Say = Callable[[str], None]


@dataclass
class Stack:
    """What a running scratch stack offers to its users."""

    work: Path
    pki_dir: Path
    passphrase: str
    database_url: str
    database_label: str
    broker_port: int
    provisioning_port: int
    gateway_port: int
    policy_file: Path
    logs: dict[str, Path] = field(default_factory=dict)

    @property
    def chain(self) -> Path:
        return self.pki_dir / CHAIN

    @property
    def provisioning_url(self) -> str:
        return f"https://127.0.0.1:{self.provisioning_port}"

    def env(self) -> dict[str, str]:
        """The ``DEVICEGATE_*`` variables that point a ``devicegate`` command at this stack."""
        return {
            "DEVICEGATE_DATABASE_URL": self.database_url,
            "DEVICEGATE_PKI_DIR": str(self.pki_dir),
            "DEVICEGATE_CA_PASSPHRASE": self.passphrase,
            "DEVICEGATE_POLICY_FILE": str(self.policy_file),
            "DEVICEGATE_UPSTREAM_URL": f"mqtt://127.0.0.1:{self.broker_port}",
            "DEVICEGATE_GATEWAY_LISTEN": f"127.0.0.1:{self.gateway_port}",
            "DEVICEGATE_PROVISIONING_LISTEN": f"127.0.0.1:{self.provisioning_port}",
            "DEVICEGATE_PUBLIC_URL": self.provisioning_url,
            "DEVICEGATE_SPOOL_DIR": str(self.work / "spool"),
            "DEVICEGATE_LOG_FORMAT": "text",
            # One gateway worker: one event chain and one log to read.
            "DEVICEGATE_WORKERS": "1",
        }


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_for_port(port: int, *, within: float, alive: Callable[[], bool]) -> bool:
    """Whether something accepts on ``127.0.0.1:port`` within ``within`` seconds, while
    ``alive()`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline and alive():
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(f"    {line}" for line in text[-lines:])


# --- child processes ---------------------------------------------------------------------


async def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, a bounded wait, then SIGKILL: the process id is ours, never a name."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.to_thread(process.wait, STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        await asyncio.to_thread(process.wait)


def _spawn(
    stack: contextlib.AsyncExitStack, argv: list[str], *, log: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    stack.push_async_callback(_stop, process)
    return process


# --- PostgreSQL ----------------------------------------------------------------------------


async def _local_reachable(admin_url: str) -> bool:
    try:
        conn = await asyncpg.connect(admin_url, timeout=3)
    except (OSError, TimeoutError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


async def _scratch_database(stack: contextlib.AsyncExitStack, admin_url: str, prefix: str) -> str:
    """Create a uniquely named database and register its drop; its URL."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()

    async def drop() -> None:
        conn = await asyncpg.connect(admin_url, timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    stack.push_async_callback(drop)
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{name}"


def _postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL ``bin`` directory that has initdb and pg_ctl."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: (
            int(Path(path).parent.parent.name) if Path(path).parent.parent.name.isdigit() else 0
        ),
    )
    for initdb in reversed(candidates):
        directory = Path(initdb).parent
        if (directory / "pg_ctl").exists():
            return directory
    return None


def _cluster_user() -> str | None:
    """PostgreSQL refuses to run as root: the account to run it as (None: ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise StackError("running as root and neither a postgres nor a nobody account exists")


async def _run(argv: list[str], *, user: str | None, log: Path) -> None:
    def call() -> int:
        with log.open("ab") as output:
            return subprocess.call(
                argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                user=user, start_new_session=True,
            )  # fmt: skip

    if await asyncio.to_thread(call) != 0:
        raise StackError(f"{Path(argv[0]).name} failed:\n{_tail(log)}")


async def _throwaway_cluster(stack: contextlib.AsyncExitStack, work: Path) -> str:
    """initdb + pg_ctl in a temporary directory on a free port; the admin URL."""
    bindir = _postgres_bin()
    if bindir is None:
        raise MissingDependency(
            "no PostgreSQL reachable at 127.0.0.1:5432 and no /usr/lib/postgresql/*/bin/initdb: "
            "install PostgreSQL (apt-get install postgresql) or start it"
        )
    user = _cluster_user()
    # Its own temporary directory: the demo's is 0700 root, which the cluster user cannot enter.
    home = Path(tempfile.mkdtemp(prefix="devicegate-pg-"))
    stack.callback(shutil.rmtree, home, ignore_errors=True)
    data, sockets, log = home / "data", home / "sockets", work / "postgresql.log"
    sockets.mkdir()
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in (home, sockets):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    await _run(
        [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
         "--no-sync"],
        user=user, log=log,
    )  # fmt: skip
    port = free_port()
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
    await _run(
        [str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(home / "server.log"),
         "-w", "-t", "30", "start"],
        user=user, log=log,
    )  # fmt: skip

    async def stop() -> None:
        await _run(
            [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
            user=user, log=log,
        )  # fmt: skip

    stack.push_async_callback(stop)
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


async def _database(
    stack: contextlib.AsyncExitStack, work: Path, choice: DatabaseChoice, admin_url: str
) -> tuple[str, str]:
    """A migrated scratch database: (url, how it was obtained)."""
    if choice is not DatabaseChoice.THROWAWAY and await _local_reachable(admin_url):
        url = await _scratch_database(stack, admin_url, "devicegate_demo")
        host = admin_url.split("@")[-1].rpartition("/")[0]
        label = f"local PostgreSQL at {host}, scratch database {url.rpartition('/')[2]}"
    elif choice is DatabaseChoice.LOCAL:
        raise StackError(f"no PostgreSQL reachable at {admin_url}")
    else:
        cluster = await _throwaway_cluster(stack, work)
        url = await _scratch_database(stack, cluster, "devicegate_demo")
        port = cluster.split(":")[-1].split("/")[0]
        label = f"throwaway PostgreSQL cluster (Debian initdb) on 127.0.0.1:{port}"
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return url, label


# --- broker and services ------------------------------------------------------------------


def mosquitto_binary() -> str | None:
    # /usr/sbin is not on every user's PATH, and Debian installs mosquitto there.
    fallbacks = ("/usr/sbin/mosquitto", "/usr/bin/mosquitto")
    return shutil.which("mosquitto") or next(
        (path for path in fallbacks if os.access(path, os.X_OK)), None
    )


async def _broker(stack: contextlib.AsyncExitStack, work: Path, env: dict[str, str]) -> int:
    binary = mosquitto_binary()
    if binary is None:
        raise MissingDependency(NO_MOSQUITTO)
    port = free_port()
    config = work / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "log_dest stderr\nlog_type error\nlog_type warning\n"
    )
    log = work / "mosquitto.log"
    process = _spawn(stack, [binary, "-c", str(config)], log=log, env=env)
    if not await wait_for_port(port, within=10, alive=lambda: process.poll() is None):
        raise StackError(f"mosquitto did not start:\n{_tail(log)}")
    return port


async def _https_ready(url: str, chain: Path, *, within: float, alive: Callable[[], bool]) -> bool:
    context = ssl.create_default_context(cafile=str(chain))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while loop.time() < deadline and alive():
            try:
                async with session.get(url + "/readyz", ssl=context) as response:
                    if response.status == 200:
                        return True
            except (aiohttp.ClientError, TimeoutError, ssl.SSLError):
                pass
            await asyncio.sleep(0.1)
    return False


def gateway_argv() -> list[str]:
    """``devicegate serve gateway`` (one worker, from ``DEVICEGATE_WORKERS`` in `Stack.env`)."""
    return [sys.executable, "-m", "provisioning.commands.cli", "serve", "gateway"]


def _metrics() -> dict[str, str]:
    # Each service its own metrics port: the default one may be taken by a real deployment.
    return {"DEVICEGATE_METRICS_LISTEN": f"127.0.0.1:{free_port()}"}


async def _services(stack: contextlib.AsyncExitStack, state: Stack, say: Say) -> None:
    env = {**os.environ, **state.env()}
    log = state.work / "provisioning.log"
    state.logs["provisioning"] = log
    provisioning = _spawn(
        stack,
        [sys.executable, "-m", "provisioning.commands.cli", "serve", "provisioning"],
        log=log,
        env={**env, "DEVICEGATE_INSTANCE_ID": "demo-provisioning", **_metrics()},
    )
    gateway_log = state.work / "gateway.log"
    state.logs["gateway"] = gateway_log
    gateway = _spawn(
        stack,
        gateway_argv(),
        log=gateway_log,
        env={**env, "DEVICEGATE_INSTANCE_ID": "demo-gateway", **_metrics()},
    )
    if not await _https_ready(
        state.provisioning_url, state.chain, within=READY_TIMEOUT,
        alive=lambda: provisioning.poll() is None,
    ):  # fmt: skip
        raise StackError(f"the provisioning service did not become ready:\n{_tail(log)}")
    say(f"provisioning service  {state.provisioning_url}  (devicegate serve provisioning)")
    if not await wait_for_port(
        state.gateway_port, within=READY_TIMEOUT, alive=lambda: gateway.poll() is None
    ):
        raise StackError(f"the gateway did not start:\n{_tail(gateway_log)}")
    say(f"gateway (mTLS MQTT)   127.0.0.1:{state.gateway_port}  (devicegate serve gateway)")


@contextlib.asynccontextmanager
async def scratch_stack(
    *,
    say: Say,
    database: DatabaseChoice = DatabaseChoice.AUTO,
    admin_url: str = LOCAL_ADMIN_URL,
) -> AsyncIterator[Stack]:
    """Start the whole product on scratch state; tear everything down on exit.

    Args:
        say: Prints one progress line.
        database: Where the scratch database lives: the local server when reachable
            (``auto``), only there (``local``), or a throwaway cluster (``throwaway``).
        admin_url: The local server's maintenance database URL.

    Raises:
        MissingDependency: mosquitto or PostgreSQL is not installed.
        StackError: a part did not start (its log tail is in the message).
    """
    async with contextlib.AsyncExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="devicegate-demo-"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        if mosquitto_binary() is None:  # checked first: nothing is worth starting without it
            raise MissingDependency(NO_MOSQUITTO)
        passphrase = secrets.token_urlsafe(18)
        pki_dir = work / "pki"
        provisioning_port = free_port()  # before the PKI: certificates name its CRL URL
        public_url = f"https://127.0.0.1:{provisioning_port}"
        await asyncio.to_thread(
            init_pki, pki_dir, passphrase=passphrase.encode(), crl_url=public_url + CRL_PATH
        )
        say(f"scratch PKI           {pki_dir}  (root CA, issuing CA, server certificate)")
        database_url, label = await _database(stack, work, database, admin_url)
        say(f"database              {label}")
        broker_port = await _broker(stack, work, dict(os.environ))
        say(f"upstream broker       mosquitto on 127.0.0.1:{broker_port}")
        policy = work / "policy.toml"
        policy.write_text(DEMO_POLICY)
        state = Stack(
            work=work,
            pki_dir=pki_dir,
            passphrase=passphrase,
            database_url=database_url,
            database_label=label,
            broker_port=broker_port,
            provisioning_port=provisioning_port,
            gateway_port=free_port(),
            policy_file=policy,
        )
        (work / "spool").mkdir()
        await _services(stack, state, say)
        yield state
