"""``devicegate demo`` end to end, as a user runs it: a child process, its output, its exit."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import ADMIN_URL

DEVICEGATE = str(Path(sys.executable).with_name("devicegate"))
EXPECTED = {
    "no_client_certificate": ("no_client_certificate",),
    "rogue CA": ("unknown_issuer",),
    "expired": ("certificate_expired",),
    "spoofed client id": ("client_id_mismatch",),
    "topic escape": ("topic_not_authorized",),
    "revoked": ("certificate_revoked", "device_revoked"),
    "untrusted IDevID": ("idevid_untrusted",),
    "blocked IDevID": ("idevid_blocked",),
}


async def _demo_databases() -> set[str]:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        rows = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE 'devicegate_demo_%'"
        )
    finally:
        await conn.close()
    return {row["datname"] for row in rows}


def _leftovers(output: str) -> list[str]:
    """Temporary directories the demo named that still exist."""
    return [path for path in re.findall(r"/tmp/devicegate-demo-\w+", output) if Path(path).exists()]


@pytest.fixture
def quiet_width() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "160"}


async def test_demo_runs_end_to_end(quiet_width: dict[str, str]) -> None:
    before = await _demo_databases()
    started = time.monotonic()
    result = subprocess.run(
        [DEVICEGATE, "demo", "--devices", "5"],
        capture_output=True, text=True, timeout=120, env=quiet_width,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert time.monotonic() - started < 120
    recorded_line = next(
        line for line in result.stdout.splitlines() if line.startswith("denial reasons recorded:")
    )
    recorded = set(recorded_line.partition(":")[2].replace(",", " ").split())
    for attack, reasons in EXPECTED.items():
        assert recorded & set(reasons), f"{attack}: none of {reasons} in {recorded}"
    assert "dashboard received 15/15 readings from 5/5 devices" in result.stdout
    assert re.search(r"3 with the token, e\.g\. \S+, and 2 by IDevID", result.stdout)
    assert re.search(r"audit verify: verified \d+ events in \d+ chains: OK", result.stdout)
    assert "NOT REFUSED" not in result.stdout
    assert "demo passed" in result.stdout
    # It says which database it used, and leaves nothing behind.
    assert re.search(r"database\s+(local PostgreSQL|throwaway PostgreSQL)", result.stdout)
    assert _leftovers(output) == []
    assert await _demo_databases() == before


async def test_demo_cleans_up_on_sigint(quiet_width: dict[str, str]) -> None:
    before = await _demo_databases()
    # Unbuffered, so the "gateway" line arrives when it is printed: piped output is
    # block-buffered, and a quiet machine then finishes the demo before the SIGINT lands.
    process = subprocess.Popen(
        [DEVICEGATE, "demo", "--devices", "50"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**quiet_width, "PYTHONUNBUFFERED": "1"},
        # A shell without job control starts background jobs (CI runners) with SIGINT
        # ignored, and Python then never raises KeyboardInterrupt: give the demo the
        # Ctrl-C a terminal user has.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert process.stdout is not None
    # Interrupt once the stack is up (the gateway line is printed after it is ready).
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith("gateway"):
            break
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=60)
    output = "".join(seen) + rest
    assert process.returncode == 130, output
    assert _leftovers(output) == []
    assert await _demo_databases() == before


def test_demo_refuses_too_few_devices() -> None:
    result = subprocess.run(
        [DEVICEGATE, "demo", "--devices", "2"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2


async def test_demo_without_mosquitto_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    from provisioning.demo import stack as demo_stack
    from provisioning.demo.run import run_demo

    monkeypatch.setattr(demo_stack, "mosquitto_binary", lambda: None)
    output = io.StringIO()
    status = await run_demo(devices=3, console=Console(file=output, width=400))
    assert status == 2
    assert "mosquitto is not installed" in output.getvalue()
    assert "apt-get install mosquitto" in output.getvalue()
