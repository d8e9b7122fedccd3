"""``devicegate demo``: the whole product, end to end, on this machine, in well under a minute.

Steps: a scratch stack (`stack`), a factory line enrolling N devices over HTTPS
(`factory`), their telemetry through the mutual-TLS gateway to a dashboard
(`traffic`), the attacks a security team worries about (`attacks`), and the
audit of it all (`report`). Exit status: 0 when every step went as it should,
1 when something did not, 2 when mosquitto or PostgreSQL is missing, 130/143 when
interrupted; every process and file it made is gone in each case.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiomqtt
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from provisioning.demo import attacks
from provisioning.demo.attacks import Attack
from provisioning.demo.factory import (
    FLEET,
    Enrolled,
    create_token,
    devicegate,
    factory_line,
    idevid_line,
)
from provisioning.demo.manufacturer import Manufacturer
from provisioning.demo.report import audit
from provisioning.demo.stack import DatabaseChoice, MissingDependency, Stack, scratch_stack
from provisioning.demo.traffic import DASHBOARD_FILTER, Dashboard, publish_telemetry, run_dashboard
from schemas.errors import DevicegateError

MESSAGES_PER_DEVICE = 3
DELIVERY_WAIT = 15.0


@dataclass
class Outcome:
    """How the demo went, step by step (all must hold for exit status 0)."""

    enrolled: int = 0
    delivered: bool = False
    attacks_refused: bool = False
    audit_ok: bool = False

    @property
    def ok(self) -> bool:
        return self.delivered and self.attacks_refused and self.audit_ok


@contextlib.contextmanager
def _progress(console: Console, description: str, total: int) -> Iterator[Progress]:
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console,
    )  # fmt: skip
    progress.add_task(description, total=total)
    with progress:
        yield progress


def _step(console: Console, title: str) -> None:
    console.print()
    console.rule(f"[bold]{title}")


async def _enroll(
    stack: Stack, devices: int, maker: Manufacturer, console: Console
) -> tuple[list[Enrolled], Enrolled]:
    _step(console, f"factory line: {devices} devices enroll through the HTTPS API")
    with_idevid = devices // 2
    with_token = devices - with_idevid
    token = await create_token(stack.database_url, fleet=FLEET, uses=with_token, note="demo line")
    console.print(
        f"bootstrap token for fleet [bold]{FLEET}[/bold], {with_token} uses (stored hashed, "
        "shown once). Each device makes its own P-256 key; only the CSR leaves it."
    )
    await devicegate(
        stack, "fleet", "trust-manufacturer", "--fleet", FLEET, "--ca", str(maker.root_path),
        "--intermediate", str(maker.intermediate_path),
    )  # fmt: skip
    console.print(
        f"fleet [bold]{FLEET}[/bold] trusts the manufacturer CA the demo made: {with_idevid} "
        "devices with its IDevID (device certificate) enroll without a token, over mutual TLS, "
        "their CSR bound to the connection (RFC 9266 tls-exporter)."
    )
    started = time.monotonic()
    with _progress(console, "enrolling", devices) as progress:
        step = lambda _: progress.advance(progress.task_ids[0])  # noqa: E731
        fleet = await factory_line(
            url=stack.provisioning_url, token=token, chain=stack.chain,
            out_dir=stack.work / "devices", count=with_token, station="station-a",
            on_enrolled=step,
        )  # fmt: skip
        fleet += await idevid_line(stack=stack, maker=maker, count=with_idevid, on_enrolled=step)
    elapsed = time.monotonic() - started
    console.print(
        f"{devices} devices enrolled in {elapsed:.1f}s ({devices / elapsed:.0f}/s): "
        f"{with_token} with the token, e.g. {fleet[0].device_id}, and {with_idevid} by IDevID, "
        f"e.g. {fleet[-1].device_id} (its id derived from the IDevID's key)",
        soft_wrap=True,
    )
    dashboard_token = await create_token(
        stack.database_url, fleet="dashboard", uses=1, note="demo dashboard"
    )
    (dashboard,) = await factory_line(
        url=stack.provisioning_url, token=dashboard_token, chain=stack.chain,
        out_dir=stack.work / "devices", count=1, station="dashboard",
    )  # fmt: skip
    return fleet, dashboard


async def _telemetry(
    stack: Stack, fleet: list[Enrolled], dashboard: Enrolled, seen: Dashboard, console: Console
) -> bool:
    _step(console, "telemetry over mutual TLS, through the gateway, to a dashboard")
    console.print(
        f"dashboard {dashboard.device_id} (fleet [bold]dashboard[/bold]) subscribes "
        f"{DASHBOARD_FILTER}: the demo's policy file grants exactly that, and no publish; "
        "every other fleet keeps the default policy (its own devices/<id>/# only)."
    )
    expected = len(fleet) * MESSAGES_PER_DEVICE
    with _progress(console, "publishing", expected) as progress:
        await publish_telemetry(
            stack.gateway_port, fleet, messages=MESSAGES_PER_DEVICE,
            on_published=lambda: progress.advance(progress.task_ids[0]),
        )  # fmt: skip
    delivered = await seen.wait_for(expected, within=DELIVERY_WAIT)
    delivered = delivered and len(seen.received) == len(fleet)
    style = "green" if delivered else "red"
    console.print(
        f"[{style}]dashboard received {seen.total}/{expected} readings from "
        f"{len(seen.received)}/{len(fleet)} devices[/{style}]",
        soft_wrap=True,
    )
    return delivered


async def _attacks(
    stack: Stack, fleet: list[Enrolled], seen: Dashboard, maker: Manufacturer, console: Console
) -> list[Attack]:
    _step(console, "attacks")
    victim, attacker, revoked = fleet[0], fleet[1], fleet[2]
    port_attacks = [
        attacks.no_client_certificate(stack, victim),
        attacks.rogue_ca(stack, victim),
        attacks.expired_certificate(stack, victim),
        attacks.spoofed_client_id(stack, attacker, victim),
        attacks.topic_escape(stack, attacker, victim, dashboard_foreign=lambda: len(seen.foreign)),
        attacks.revoked_while_connected(stack, revoked),
        attacks.untrusted_idevid(stack),
        attacks.blocked_idevid(stack, maker),
    ]
    results = [await attack for attack in port_attacks]
    table = Table(header_style="bold", show_lines=True)
    table.add_column("attack", no_wrap=True)
    table.add_column("what was tried", overflow="fold")
    table.add_column("what the attacker saw", overflow="fold")
    table.add_column("recorded as", overflow="fold")
    for result in results:
        verdict = "[green]refused[/green]" if result.refused else "[red]NOT REFUSED[/red]"
        seen_text = "\n".join([f"{verdict}: {result.observed}", *result.notes])
        table.add_row(result.name, result.tried, seen_text, " or ".join(result.reasons))
    console.print(table)
    return results


async def run_demo(
    *, devices: int, database: DatabaseChoice = DatabaseChoice.AUTO, console: Console
) -> int:
    """Run the demo; the exit status (see the module docstring)."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    # SIGTERM cancels like Ctrl-C does, so the same cleanup runs.
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await _run(devices=devices, database=database, console=console)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def _run(*, devices: int, database: DatabaseChoice, console: Console) -> int:
    started = time.monotonic()
    since = datetime.now(UTC) - timedelta(seconds=1)
    outcome = Outcome()
    _step(console, "devicegate demo: a scratch stack on this machine")
    try:
        async with scratch_stack(say=console.print, database=database) as stack:
            maker = Manufacturer(stack.work / "manufacturer", name="acme", intermediate_ca=True)
            fleet, dashboard = await _enroll(stack, devices, maker, console)
            outcome.enrolled = len(fleet)
            seen = Dashboard()
            ready = asyncio.Event()
            listener = asyncio.create_task(
                run_dashboard(stack.gateway_port, dashboard, seen, ready), name="dashboard"
            )
            try:
                await asyncio.wait_for(ready.wait(), 15)
                outcome.delivered = await _telemetry(stack, fleet, dashboard, seen, console)
                results = await _attacks(stack, fleet, seen, maker, console)
            finally:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await listener
            outcome.attacks_refused = all(result.refused for result in results)
            _step(console, "audit: every decision above, from PostgreSQL")
            expected = [result.reasons for result in results]
            found = await audit(stack.database_url, since, expected, console)
            outcome.audit_ok = found.ok
            console.print(
                "denial reasons recorded: " + ", ".join(sorted(found.recorded)), soft_wrap=True
            )
            for group in found.missing:
                console.print(f"[red]not recorded: {' or '.join(group)}[/red]")
            _step(console, "cleaning up")
    except MissingDependency as exc:
        console.print(f"[red]devicegate demo cannot run:[/red] {exc}")
        return 2
    except (DevicegateError, aiomqtt.MqttError, OSError) as exc:
        # Everything started is already stopped: the stack's exit ran on the way out.
        console.print(f"[bold red]demo failed:[/bold red] {exc}")
        return 1
    elapsed = time.monotonic() - started
    console.print(f"stopped every process, dropped the scratch database, removed {stack.work}")
    if outcome.ok:
        console.print(f"[bold green]demo passed[/bold green] in {elapsed:.1f}s")
        return 0
    console.print(f"[bold red]demo failed[/bold red] in {elapsed:.1f}s: {outcome}")
    return 1
