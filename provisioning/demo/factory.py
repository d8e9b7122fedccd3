"""The factory line: bootstrap tokens, and devices that each make a key and enroll over HTTPS.

Every simulated device goes through the same code a real one runs (`provisioning.agent.device`):
its private key is generated here, on "the device", and never leaves its directory; only
the CSR and the bootstrap token travel to the provisioning API. Devices with a manufacturer
certificate (IDevID, `provisioning.demo.manufacturer`) enroll without a token, over mutual
TLS, once the fleet trusts their manufacturer (`devicegate fleet trust-manufacturer`, run as
the operator would).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import asyncpg

from provisioning import admin
from provisioning.agent import device
from provisioning.demo.manufacturer import Manufacturer
from provisioning.demo.stack import Stack, StackError
from schemas.api import TokenCreateRequest

FLEET = "line-1"

ENROLL_CONCURRENCY = 16
"""Devices enrolling at the same time: a factory line has a few stations, not thousands."""


@dataclass(frozen=True, slots=True)
class Enrolled:
    """A device that left the factory line with its identity."""

    device_id: str
    fleet: str
    serial: str
    directory: Path


async def create_token(
    database_url: str, *, fleet: str, uses: int, note: str, actor: str = "demo"
) -> str:
    """A bootstrap token for ``fleet`` (what ``devicegate token create`` does); its secret."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        created = await admin.create_token(
            conn,
            TokenCreateRequest(fleet=fleet, uses=uses, ttl=timedelta(hours=1), note=note),
            actor=actor,
            instance="demo",
        )
    finally:
        await conn.close()
    return created.token


async def enroll_one(
    *, url: str, token: str, chain: Path, directory: Path, hardware_id: str
) -> Enrolled:
    """One device: make a key, send CSR + token, write device.key/device.crt/chain.pem."""
    bundle = await device.enroll(
        url=url, token=token, out_dir=directory, hardware_id=hardware_id, ca_cert=chain
    )
    return Enrolled(bundle.device_id, bundle.fleet, bundle.serial, directory)


async def factory_line(
    *,
    url: str,
    token: str,
    chain: Path,
    out_dir: Path,
    count: int,
    station: str,
    on_enrolled: Callable[[Enrolled], None] | None = None,
    concurrency: int = ENROLL_CONCURRENCY,
) -> list[Enrolled]:
    """Enroll ``count`` devices through the real HTTPS API, a few at a time.

    Args:
        url: The provisioning service.
        token: A bootstrap token with at least ``count`` uses.
        chain: The CA chain the devices trust.
        out_dir: Parent of the device directories.
        count: How many devices.
        station: Prefix of the devices' hardware ids (and directory names).
        on_enrolled: Called after each enrollment (progress bars).
        concurrency: Enrollments in flight at once.

    Raises:
        provisioning.agent.device.EnrollmentError: a device was refused.
    """
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int) -> Enrolled:
        name = f"{station}-{index:04d}"
        async with gate:
            enrolled = await enroll_one(
                url=url, token=token, chain=chain, directory=out_dir / name, hardware_id=name
            )
        if on_enrolled is not None:
            on_enrolled(enrolled)
        return enrolled

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(one(index), name=f"enroll-{index}") for index in range(count)]
    return [task.result() for task in tasks]


async def devicegate(stack: Stack, *args: str) -> str:
    """Run a ``devicegate`` command against the stack, as an operator would; its output.

    Raises:
        StackError: it failed (its output says why).
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "provisioning.commands.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **stack.env(), "DEVICEGATE_INSTANCE_ID": "demo-operator"},
    )  # fmt: skip
    output, _ = await process.communicate()
    if process.returncode != 0:
        raise StackError(f"devicegate {' '.join(args[:2])}: {output.decode().strip()}")
    return output.decode()


async def idevid_line(
    *,
    stack: Stack,
    maker: Manufacturer,
    count: int,
    on_enrolled: Callable[[Enrolled], None] | None = None,
    concurrency: int = ENROLL_CONCURRENCY,
) -> list[Enrolled]:
    """``count`` devices that each hold an IDevID of ``maker`` enroll without a token.

    Raises:
        provisioning.agent.device.EnrollmentError: a device was refused.
    """
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int) -> Enrolled:
        idevid = maker.idevid()
        directory = stack.work / "devices" / f"idevid-{index:04d}"
        async with gate:
            bundle = await device.enroll_idevid(
                url=stack.provisioning_url, idevid_cert=idevid.cert, idevid_key=idevid.key,
                out_dir=directory, ca_cert=stack.chain,
            )  # fmt: skip
        enrolled = Enrolled(bundle.device_id, bundle.fleet, bundle.serial, directory)
        if on_enrolled is not None:
            on_enrolled(enrolled)
        return enrolled

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(one(index), name=f"idevid-{index}") for index in range(count)]
    return [task.result() for task in tasks]
