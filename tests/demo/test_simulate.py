"""``devicegate simulate`` against a running scratch stack (the demo's own stack code)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from provisioning.demo.factory import create_token
from provisioning.demo.stack import Stack, scratch_stack

DEVICEGATE = str(Path(sys.executable).with_name("devicegate"))


@pytest.fixture(scope="module")
async def stack() -> AsyncIterator[Stack]:
    """One scratch stack for the module (each test uses its own fleet and token)."""
    async with scratch_stack(say=lambda line: None) as running:
        yield running


async def _simulate(stack: Stack, *args: str) -> tuple[int, dict[str, Any], str]:
    process = await asyncio.create_subprocess_exec(
        DEVICEGATE, "simulate",
        "--provisioning-url", stack.provisioning_url,
        "--gateway", f"127.0.0.1:{stack.gateway_port}",
        "--ca-cert", str(stack.chain),
        "--json", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode is not None
    report = json.loads(stdout.decode().strip().splitlines()[-1]) if stdout.strip() else {}
    return process.returncode, report, stderr.decode()


async def test_simulate_enrolls_publishes_renews_then_reuses(stack: Stack, tmp_path: Path) -> None:
    token = await create_token(stack.database_url, fleet="soak", uses=4, note="simulate test")
    identities = tmp_path / "identities"
    common = ["--devices", "4", "--rate", "20", "--messages-per-second", "5"]
    status, report, stderr = await _simulate(
        stack, *common, "--token", token, "--duration", "4s", "--renew",
        "--identities", str(identities), "--qos", "1",
    )  # fmt: skip
    assert status == 0, (report, stderr)
    assert report["enrollments"] == 4
    assert report["renewals"] == 4
    assert report["connects"] >= 8  # once before and once after renewing, each
    assert report["messages"] >= 4 * 5 * 2  # ~5/s for ~4 s, minus connect time
    assert report["latency"]["publish"]["count"] == report["messages"]
    assert report["latency"]["connect"]["p50_ms"] > 0
    assert report["errors"] == {}
    assert 3.5 < report["duration_s"] < 15

    # Again, without a token: the four identities (renewed certificates) are reused.
    status, report, stderr = await _simulate(
        stack, *common, "--duration", "2s", "--identities", str(identities), "--qos", "0",
    )  # fmt: skip
    assert status == 0, (report, stderr)
    assert (report["reused_identities"], report["enrollments"]) == (4, 0)
    assert report["messages"] > 0 and report["latency"]["publish"]["count"] == 0


async def test_simulate_counts_errors_by_reason(stack: Stack) -> None:
    # A token with one use for two devices: the second enrollment is refused.
    token = await create_token(stack.database_url, fleet="soak", uses=1, note="too few uses")
    status, report, _ = await _simulate(
        stack, "--devices", "2", "--rate", "50", "--messages-per-second", "2",
        "--duration", "2s", "--token", token,
    )  # fmt: skip
    assert status == 1
    assert report["enrollments"] == 1
    assert report["errors"] == {"enroll:token_exhausted": 1}


async def test_simulate_needs_a_token_for_new_identities(stack: Stack) -> None:
    status, report, stderr = await _simulate(stack, "--devices", "1", "--duration", "1s")
    assert status == 2 and report == {}
    assert "--token is needed" in stderr
