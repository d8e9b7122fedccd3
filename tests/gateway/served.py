"""The real ``devicegate serve gateway --workers N`` as a child process, for the suites that
need the supervisor, its workers and their signals rather than an in-thread `Gateway`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from provisioning.audit.verify import verify_chains
from tests.conftest import Pki
from tests.helpers import free_port, wait_for_port

DEVICEGATE = str(Path(sys.executable).with_name("devicegate"))


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    port: int
    instance: str
    log: Path

    def stop(self, within: float = 60) -> None:
        """SIGTERM (the drain), and a clean exit (0) within ``within`` seconds."""
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(within) == 0, self.log.read_text()

    def workers(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()]


@contextlib.contextmanager
def serve_gateway(
    *,
    pki: Pki,
    database_url: str,
    upstream_port: int,
    directory: Path,
    workers: int = 2,
    name: str = "served",
    env: dict[str, str] | None = None,
    like: Served | None = None,
    take_over: bool = False,
) -> Iterator[Served]:
    """Run the gateway on a free loopback port until exit (then SIGKILL what is left).

    Fleet ``bench`` allows client ids ``{device_id}`` and ``{device_id}-*``; every other
    fleet has the default policy. Events go to ``database_url`` under a fresh instance id.
    ``like``: that gateway's port and instance id (with the same ``directory``: its
    restart). ``take_over``: start with ``--take-over`` beside ``like``, and return once
    every new worker runs (the old one is told to stop when they are ready).
    """
    port = like.port if like is not None else free_port()
    instance = like.instance if like is not None else f"{name}-{os.getpid()}-{port}"
    policy = directory / "policy.toml"
    policy.write_text('[fleets.bench]\nclient_ids = ["{device_id}", "{device_id}-*"]\n')
    env = {
        "DEVICEGATE_POLICY_FILE": str(policy),
        **os.environ,
        "DEVICEGATE_DATABASE_URL": database_url,
        "DEVICEGATE_PKI_DIR": str(pki.directory),
        "DEVICEGATE_SPOOL_DIR": str(directory / "spool"),
        "DEVICEGATE_INSTANCE_ID": instance,
        "DEVICEGATE_METRICS_LISTEN": "127.0.0.1:0",  # any free port: tests run side by side
        "DEVICEGATE_DRAIN_TIMEOUT": "5s",
        "DEVICEGATE_LOG_FORMAT": "text",
        **(env or {}),
    }
    log = directory / ("gateway.log" if like is None else f"{name}.log")
    command = [
        DEVICEGATE, "serve", "gateway", "--workers", str(workers),
        "--listen", f"127.0.0.1:{port}", "--upstream", f"mqtt://127.0.0.1:{upstream_port}",
    ]  # fmt: skip
    if take_over:
        command.append("--take-over")
    with log.open("wb") as stderr:
        process = subprocess.Popen(command, env=env, stderr=stderr)
    served = Served(process, port, instance, log)
    try:
        try:
            if not take_over:
                wait_for_port(port, timeout=20)
            deadline = time.monotonic() + 20
            # One worker runs in the serve process itself: there are no children to wait for.
            while workers > 1 and len(served.workers()) < workers and time.monotonic() < deadline:
                time.sleep(0.05)
            if len(served.workers()) < workers and workers > 1:
                raise TimeoutError
        except (TimeoutError, FileNotFoundError):
            raise AssertionError(log.read_text()) from None
        yield served
    finally:
        if process.poll() is None:
            for pid in served.workers():
                os.kill(pid, signal.SIGKILL)
            process.kill()
            process.wait()


ServeGateway = Callable[..., contextlib.AbstractContextManager[Served]]
"""`serve_gateway` with the PKI, database, upstream and directory of the test bound."""


async def verified_chains(url: str, instance: str) -> dict[str, int]:
    """Every chain of ``instance`` verifies and holds seqs 1..n, each once: n per chain id."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT chain_id, count(*) AS n, count(DISTINCT seq) AS seqs, min(seq) AS lo,"
            " max(seq) AS hi FROM auth_events WHERE instance = $1 GROUP BY chain_id",
            instance,
        )
        counts = {}
        for row in rows:
            report = await verify_chains(conn, chain_id=row["chain_id"])
            assert report.ok, report.findings
            assert report.events == row["n"] == row["seqs"]
            assert (row["lo"], row["hi"]) == (1, row["n"])
            counts[row["chain_id"]] = row["n"]
        return counts
    finally:
        await conn.close()
