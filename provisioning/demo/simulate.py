"""``devicegate simulate``: load and soak a deployment with simulated devices.

Each simulated device is a task that runs what a real one does, through the same code
(`provisioning.agent.device`): enroll with a bootstrap token (or reuse an identity enrolled
earlier under ``--identities``), connect over mutual TLS, publish telemetry at its rate,
optionally renew half-way and reconnect with the new certificate. Devices start at
``--rate`` per second; everything stops at ``--duration``. Failures are counted by reason
and the device retries after a pause, as a real device would, until the time is up.

Latencies: enrollment and renewal are the HTTPS request; connect is TCP + TLS + CONNECT
to CONNACK through the gateway and the broker; publish (QoS 1 only) is PUBLISH to PUBACK,
i.e. the gateway's policy check and the broker's acknowledgement.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import shutil
import ssl
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
from rich.console import Console
from rich.live import Live
from rich.table import Table

from provisioning.agent import device
from provisioning.demo.failures import mqtt_failure, tls_failure
from schemas.errors import DevicegateError

RETRY_PAUSE = 1.0
"""Seconds a device waits after a failure before trying again."""
SHUTDOWN_GRACE = 5.0
"""Seconds past the duration that devices get to disconnect cleanly."""
SHORTFALL = 0.5
"""An achieved rate below this fraction of the one asked for is warned about."""
LIKELY_CAUSES = (
    "likely the simulator's CPU (one process on one core: run fewer devices, or several "
    "simulators) or the gateway's limits (its rate_limited and too_many_connections "
    "refusals in the audit log)"
)


class SimulationError(DevicegateError):
    """The simulation cannot start as configured (message says why)."""


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    """What ``devicegate simulate`` was asked to do (see its ``--help``)."""

    provisioning_url: str
    gateway_host: str
    gateway_port: int
    ca_cert: Path
    token: str | None
    devices: int
    rate: float
    messages_per_second: float
    duration: float
    identities: Path | None = None
    renew: bool = False
    qos: int = 1
    json_output: bool = False


@dataclass
class Stats:
    """Counters and latency samples (seconds) of one run."""

    reused: int = 0
    enrollments: int = 0
    renewals: int = 0
    connects: int = 0
    messages: int = 0
    connected: int = 0
    enroll_latency: list[float] = field(default_factory=list)
    renew_latency: list[float] = field(default_factory=list)
    connect_latency: list[float] = field(default_factory=list)
    publish_latency: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    first_connect: float | None = None
    last_connect: float | None = None
    first_enroll: float | None = None
    last_enroll: float | None = None
    publishing_s: float = 0.0
    """Seconds devices spent in their publish loops, summed: the messages asked for are
    this times ``--messages-per-second``."""
    started: list[float] = field(default_factory=list)
    """When each device first got online (the start rate asked for is ``--rate``)."""


def percentile(samples: list[float], fraction: float) -> float:
    """The nearest-rank percentile of ``samples`` (0 when empty)."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def error_reason(exc: BaseException) -> str:
    """A short, stable label for a failure, for the errors-by-reason table."""
    if isinstance(exc, device.EnrollmentError):
        if exc.reason is not None:
            return f"enroll:{exc.reason.value}"
        return f"enroll:http_{exc.status}" if exc.status else "enroll:unreachable"
    if isinstance(exc, aiomqtt.MqttError):
        return mqtt_failure(exc)
    if isinstance(exc, ssl.SSLError):
        return tls_failure(exc)
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError):
        return f"network:{type(exc).__name__}"
    return type(exc).__name__


def _has_identity(directory: Path) -> bool:
    return (directory / device.CERT_FILE).exists() and (directory / device.KEY_FILE).exists()


class Simulator:
    """Runs the device tasks of one simulation and keeps its `Stats`."""

    def __init__(self, config: SimulationConfig, identities: Path) -> None:
        self.config = config
        self.identities = identities
        self.stats = Stats()
        self.started = time.monotonic()
        self.deadline = self.started + config.duration
        # Hardware ids are unique per run: the registry refuses a second device with one.
        self.run_id = secrets.token_hex(3)
        self._online: set[str] = set()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def _fail(self, exc: BaseException) -> None:
        self.stats.errors[error_reason(exc)] += 1

    async def _identity(self, index: int) -> Path | None:
        directory = self.identities / f"sim-{index:05d}"
        if _has_identity(directory):
            self.stats.reused += 1
            return directory
        assert self.config.token is not None  # checked before the run
        while self.remaining() > 0:
            begun = time.monotonic()
            try:
                await device.enroll(
                    url=self.config.provisioning_url, token=self.config.token,
                    out_dir=directory, hardware_id=f"sim-{self.run_id}-{index:05d}",
                    ca_cert=self.config.ca_cert,
                )  # fmt: skip
            except device.EnrollmentError as exc:
                self._fail(exc)
                if exc.reason is not None:  # refused: retrying will not help
                    return None
                await asyncio.sleep(min(RETRY_PAUSE, max(self.remaining(), 0)))
                continue
            done = time.monotonic()
            self.stats.enrollments += 1
            self.stats.enroll_latency.append(done - begun)
            self.stats.first_enroll = self.stats.first_enroll or begun
            self.stats.last_enroll = done
            return directory
        return None

    async def _renew(self, directory: Path) -> None:
        begun = time.monotonic()
        try:
            await device.renew(url=self.config.provisioning_url, directory=directory,
                               ca_cert=self.config.ca_cert)  # fmt: skip
        except device.EnrollmentError as exc:
            self._fail(exc)
            return
        self.stats.renewals += 1
        self.stats.renew_latency.append(time.monotonic() - begun)

    async def _session(self, directory: Path, device_id: str, until: float) -> None:
        """One connection: connect, publish at the device's rate until ``until``."""
        config = self.config
        client = aiomqtt.Client(
            hostname=config.gateway_host, port=config.gateway_port, identifier=device_id,
            protocol=aiomqtt.ProtocolVersion.V5, tls_context=device.gateway_ssl_context(directory),
            keepalive=30, timeout=10,
        )  # fmt: skip
        begun = time.monotonic()
        async with client:
            connected = time.monotonic()
            self.stats.connects += 1
            self.stats.connect_latency.append(connected - begun)
            self.stats.first_connect = self.stats.first_connect or begun
            self.stats.last_connect = connected
            self.stats.connected += 1
            if device_id not in self._online:
                self._online.add(device_id)
                self.stats.started.append(connected)
            try:
                await self._publish(client, device_id, until)
            finally:
                self.stats.connected -= 1

    async def _publish(self, client: aiomqtt.Client, device_id: str, until: float) -> None:
        rate = self.config.messages_per_second
        interval = 1 / rate if rate > 0 else math.inf
        topic = f"devices/{device_id}/telemetry"
        sequence = 0
        next_at = began_loop = time.monotonic()
        try:
            while True:
                pause = min(next_at - time.monotonic(), until - time.monotonic())
                if pause > 0:
                    await asyncio.sleep(pause)
                if time.monotonic() >= until:
                    return
                payload = json.dumps({"from": device_id, "seq": sequence, "ts": time.time()})
                begun = time.monotonic()
                await client.publish(topic, payload.encode(), qos=self.config.qos)
                if self.config.qos:
                    self.stats.publish_latency.append(time.monotonic() - begun)
                self.stats.messages += 1
                sequence += 1
                next_at += interval
        finally:
            self.stats.publishing_s += min(time.monotonic(), until) - began_loop

    async def run_device(self, index: int) -> None:
        """One simulated device, from enrollment to the end of the run."""
        await asyncio.sleep(min(index / self.config.rate, max(self.remaining(), 0)))
        if self.remaining() <= 0:
            return
        directory = await self._identity(index)
        if directory is None:
            return
        device_id = _device_id(directory)
        renew_at = time.monotonic() + self.remaining() / 2 if self.config.renew else math.inf
        while self.remaining() > 0:
            until = min(self.deadline, renew_at)
            try:
                await self._session(directory, device_id, until)
            except (aiomqtt.MqttError, ssl.SSLError, OSError, TimeoutError) as exc:
                self._fail(exc)
                await asyncio.sleep(min(RETRY_PAUSE, max(self.remaining(), 0)))
                continue
            if time.monotonic() >= renew_at and self.remaining() > 0:
                renew_at = math.inf
                await self._renew(directory)


def _device_id(directory: Path) -> str:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    certificate = x509.load_pem_x509_certificate((directory / device.CERT_FILE).read_bytes())
    return str(certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


# --- reporting --------------------------------------------------------------------------


def _rate(count: int, first: float | None, last: float | None) -> float:
    if not count or first is None or last is None:
        return 0.0
    return count / max(last - first, 1e-3)


def report(stats: Stats, elapsed: float, config: SimulationConfig) -> dict[str, Any]:
    """The final report as plain data (``--json`` prints exactly this)."""

    def latency(samples: list[float]) -> dict[str, float]:
        return {
            "count": len(samples),
            **{
                name: round(percentile(samples, fraction) * 1000, 2)
                for name, fraction in (("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99))
            },
            "max_ms": round(max(samples, default=0.0) * 1000, 2),
        }

    return {
        "devices": config.devices,
        "duration_s": round(elapsed, 2),
        "reused_identities": stats.reused,
        "enrollments": stats.enrollments,
        "enrollments_per_s": round(
            _rate(stats.enrollments, stats.first_enroll, stats.last_enroll), 1
        ),
        "renewals": stats.renewals,
        "connects": stats.connects,
        "connects_per_s": round(_rate(stats.connects, stats.first_connect, stats.last_connect), 1),
        "messages": stats.messages,
        "messages_per_s": round(stats.messages / max(elapsed, 1e-3), 1),
        "qos": config.qos,
        "latency": {
            "enroll": latency(stats.enroll_latency),
            "renew": latency(stats.renew_latency),
            "connect": latency(stats.connect_latency),
            "publish": latency(stats.publish_latency),
        },
        "errors": dict(stats.errors.most_common()),
        "errors_total": sum(stats.errors.values()),
        "warnings": shortfalls(stats, config),
    }


def shortfalls(stats: Stats, config: SimulationConfig) -> list[str]:
    """A sentence per rate achieved far below (`SHORTFALL`) the one asked for: how far,
    and the likely cause."""
    rates: list[tuple[str, float, float]] = []  # (what, achieved, asked)
    if config.messages_per_second > 0 and stats.publishing_s >= 1:
        achieved = stats.messages / stats.publishing_s
        rates.append(("messages per second per device", achieved, config.messages_per_second))
    if len(stats.started) >= 3 and (spread := max(stats.started) - min(stats.started)) > 0:
        # Device i is due at i / rate: n devices online take (n - 1) / rate seconds.
        rates.append(("devices online per second", (len(stats.started) - 1) / spread, config.rate))
    return [
        f"{what}: {achieved:.1f} achieved of {asked:g} asked for ({achieved / asked:.0%}); "
        + LIKELY_CAUSES
        for what, achieved, asked in rates
        if achieved < SHORTFALL * asked
    ]


def _live(simulator: Simulator) -> Table:
    stats = simulator.stats
    elapsed = time.monotonic() - simulator.started
    table = Table(title="devicegate simulate", header_style="bold")
    for column in ("elapsed", "enrolled", "reused", "online", "connects", "messages", "msg/s",
                   "renewals", "errors"):  # fmt: skip
        table.add_column(column, justify="right")
    table.add_row(
        f"{elapsed:.0f}/{simulator.config.duration:.0f}s", str(stats.enrollments),
        str(stats.reused), str(stats.connected), str(stats.connects), str(stats.messages),
        f"{stats.messages / max(elapsed, 1e-3):.0f}", str(stats.renewals),
        str(sum(stats.errors.values())),
    )  # fmt: skip
    return table


SUMMARY_KEYS = (
    "devices", "duration_s", "reused_identities", "enrollments", "enrollments_per_s",
    "renewals", "connects", "connects_per_s", "messages", "messages_per_s",
)  # fmt: skip


def print_report(data: dict[str, Any], console: Console) -> None:
    """The final report as tables."""
    summary = Table(title="simulation report", header_style="bold")
    summary.add_column("measure")
    summary.add_column("value", justify="right")
    for key in SUMMARY_KEYS:
        summary.add_row(key, str(data[key]))
    console.print(summary)
    latencies = Table(title="latency (ms)", header_style="bold")
    for column in ("operation", "count", "p50", "p90", "p99", "max"):
        latencies.add_column(column, justify="right" if column != "operation" else "left")
    for name, values in data["latency"].items():
        latencies.add_row(
            name, str(values["count"]), str(values["p50_ms"]), str(values["p90_ms"]),
            str(values["p99_ms"]), str(values["max_ms"]),
        )  # fmt: skip
    console.print(latencies)
    errors = Table(title="errors by reason", header_style="bold")
    errors.add_column("reason")
    errors.add_column("count", justify="right")
    for reason, count in data["errors"].items():
        errors.add_row(reason, str(count))
    if not data["errors"]:
        errors.add_row("-", "0")
    console.print(errors)
    for warning in data["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)


def _check(config: SimulationConfig, identities: Path) -> None:
    if not config.ca_cert.is_file():
        raise SimulationError(f"--ca-cert: {config.ca_cert} does not exist")
    missing = sum(
        1 for index in range(config.devices) if not _has_identity(identities / f"sim-{index:05d}")
    )
    if missing and not config.token:
        raise SimulationError(
            f"--token is needed: {missing} of {config.devices} identities must be enrolled"
        )


async def run_simulation(config: SimulationConfig, *, console: Console) -> int:
    """Run the simulation; 0 when nothing failed, 1 otherwise.

    Raises:
        SimulationError: the configuration cannot work (no token for new identities, ...).
    """
    scratch = config.identities is None
    identities = config.identities or Path(tempfile.mkdtemp(prefix="devicegate-sim-"))
    try:
        identities.mkdir(parents=True, exist_ok=True, mode=0o700)
        _check(config, identities)
        simulator = Simulator(config, identities)
        progress = Console(stderr=True)
        with Live(_live(simulator), console=progress, refresh_per_second=4,
                  transient=not progress.is_terminal) as live:  # fmt: skip

            async def refresh() -> None:
                while True:
                    live.update(_live(simulator))
                    await asyncio.sleep(0.25)

            refresher = asyncio.create_task(refresh(), name="simulate-progress")
            try:
                # In-flight requests and disconnects finish after the deadline, within a bound.
                async with asyncio.timeout(
                    config.duration + device.REQUEST_TIMEOUT + SHUTDOWN_GRACE
                ):
                    async with asyncio.TaskGroup() as group:
                        for index in range(config.devices):
                            group.create_task(simulator.run_device(index), name=f"sim-{index}")
            except TimeoutError:
                simulator.stats.errors["shutdown_timeout"] += 1
            finally:
                refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refresher
                live.update(_live(simulator))
        data = report(simulator.stats, time.monotonic() - simulator.started, config)
    finally:
        if scratch:
            shutil.rmtree(identities, ignore_errors=True)
    if config.json_output:
        sys.stdout.write(json.dumps(data) + "\n")
    else:
        print_report(data, console)
    return 1 if data["errors_total"] else 0
