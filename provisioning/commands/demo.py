"""``devicegate demo`` and ``devicegate simulate``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console

from provisioning.commands.common import console, fail


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
    app.command("simulate")(simulate)


def _run_interruptible(coroutine_factory: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run on asyncio; Ctrl-C and SIGTERM cancel the coroutine so its cleanup runs.

    Plain asyncio rather than uvloop: aiomqtt drives paho's sockets with loop readers, and
    the demo and the simulator are clients, where uvloop buys nothing.
    """
    try:
        status = asyncio.run(coroutine_factory())
    except KeyboardInterrupt:
        console.print("interrupted: everything the command started is stopped")
        return 130
    except asyncio.CancelledError:  # SIGTERM (the coroutine cancelled itself)
        console.print("terminated: everything the command started is stopped")
        return 143
    return status


def demo(
    devices: Annotated[
        int, typer.Option(min=3, max=5000, help="Devices on the factory line (3 or more).")
    ] = 50,
    database: Annotated[
        Literal["auto", "local", "throwaway"],
        typer.Option(
            help="Scratch database: auto (local PostgreSQL at 127.0.0.1:5432 if reachable, "
            "else a throwaway cluster), local, or throwaway."
        ),
    ] = "auto",
) -> None:
    """Run the whole product end to end on this machine, on scratch state.

    Starts a scratch PKI, database, Mosquitto, the provisioning service and the gateway;
    enrolls a factory line of devices over HTTPS, sends their telemetry over mutual TLS to
    a dashboard, runs the attacks a security team worries about, and shows the audit.
    Everything it started is stopped and removed at the end (also on Ctrl-C).
    """
    from provisioning.demo.run import run_demo
    from provisioning.demo.stack import DatabaseChoice

    choice = DatabaseChoice(database)
    # Piped output (CI logs, tests) gets room for the tables instead of the 80-column default.
    output = console if console.is_terminal else Console(width=120)
    status = _run_interruptible(lambda: run_demo(devices=devices, database=choice, console=output))
    raise typer.Exit(status)


def simulate(
    provisioning_url: Annotated[
        str, typer.Option(help="Provisioning service, e.g. https://host:8443.")
    ],
    gateway: Annotated[str, typer.Option(help="Gateway HOST:PORT.")],
    ca_cert: Annotated[Path, typer.Option(help="chain.pem: trust for both services.")],
    token: Annotated[
        str | None,
        typer.Option(
            help="Bootstrap token (needed to enroll new identities).", envvar="DEVICEGATE_TOKEN"
        ),
    ] = None,
    devices: Annotated[int, typer.Option(min=1, help="Simulated devices.")] = 10,
    rate: Annotated[
        float, typer.Option(min=0.01, help="New devices (enroll + connect) started per second.")
    ] = 10.0,
    messages_per_second: Annotated[
        float, typer.Option(min=0.0, help="Messages each device publishes per second.")
    ] = 1.0,
    duration: Annotated[str, typer.Option(help="Total run time, e.g. 30s, 10m.")] = "30s",
    identities: Annotated[
        Path | None,
        typer.Option(help="Keep identities here and reuse those already enrolled."),
    ] = None,
    renew: Annotated[
        bool, typer.Option(help="Renew each certificate half-way, then reconnect with it.")
    ] = False,
    qos: Annotated[int, typer.Option(min=0, max=1, help="QoS of the telemetry (0 or 1).")] = 1,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Load and soak a deployment with simulated devices, bounded by --duration.

    Enrolls (or reuses) identities, connects them over mutual TLS, publishes telemetry,
    optionally renews and reconnects; shows live progress and a final report
    (enrollments/s, connects/s, messages/s, latency percentiles, errors by reason).
    Exit status 1 when any error happened.
    """
    from provisioning.demo.simulate import SimulationConfig, SimulationError, run_simulation
    from schemas.durations import parse_duration

    try:
        seconds = parse_duration(duration).total_seconds()
    except ValueError as exc:
        fail(f"--duration: {exc}", code=2)
    host, sep, port = gateway.rpartition(":")
    if not sep or not port.isdigit():
        fail("--gateway: HOST:PORT", code=2)
    config = SimulationConfig(
        provisioning_url=provisioning_url, gateway_host=host.strip("[]"),
        gateway_port=int(port), ca_cert=ca_cert, token=token, devices=devices, rate=rate,
        messages_per_second=messages_per_second, duration=seconds, identities=identities,
        renew=renew, qos=qos, json_output=json_output,
    )  # fmt: skip
    try:
        status = _run_interruptible(lambda: run_simulation(config, console=console))
    except SimulationError as exc:
        fail(str(exc), code=2)
    raise typer.Exit(status)
