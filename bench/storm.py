"""Benchmark: a reconnect storm. N devices hold sessions; the server restarts; all come back.

One run, on this machine, same devices and load generator (`bench/reconnect.py`: one
``epoll`` process per half of the devices, each device its own certificate, jittered
exponential backoff, a device's last TLS session offered when resumption is on):

1. ``devicegate serve gateway --workers 2`` (real PostgreSQL sink, upstream Mosquitto)
   holds N sessions. It gets SIGTERM (drain), exits, and starts again on the same port.
   Phase **gateway full**: devices reconnect without offering their ticket (every
   handshake is full). Phase **gateway resumed**: the same, offering the ticket of their
   last connection (the key file is shared by the old and new processes).
2. The devices move to Mosquitto's own mTLS listener (same PKI); Mosquitto is restarted
   (SIGTERM, start) under them; they offer their sessions (Mosquitto's session cache is
   in its memory, so after a restart it can resume none: it says so).

3. With HAProxy installed (``--haproxy``, on by default; ``--only haproxy`` runs it alone):
   two instances A and B behind HAProxy, A restarted under its devices while ``--uncut``
   sessions held on B measure MQTT round trips (``bench/storm_haproxy.py``, ``_uncut.py``).

Printed per phase: time from SIGTERM until all N are back, connect time (attempt start to
CONNACK) p50/p99, the time from the cut to being back p99, resumed reconnects, failed
attempts by reason (client's view) and the gateway's refusals by reason (its auth
events), CPU per reconnect of the server processes (from the new process listening until
all are back) and of the load generator, and the check that every reconnect has its
``connect`` event in PostgreSQL (none lost).

With ``--restart takeover`` (or ``both``) the gateway phases are a take-over restart
instead (or as well): ``serve gateway --take-over`` starts beside the running gateway and
SIGTERMs it once its workers are ready (`takeover_storm`); "SIGTERM -> all back" then
counts from that SIGTERM (read from the new supervisor's log), "launched -> all back"
from starting the new instance.

Usage: .venv/bin/python bench/storm.py [--quick] [--devices N] [--restart cold|takeover|both]
       (PostgreSQL from DEVICEGATE_BENCH_ADMIN_URL, default postgres@127.0.0.1/postgres)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mqtt_gateway import (
    ADMIN_URL,
    PASSPHRASE,
    cpu_seconds,
    drop_database,
    free_port,
    wait_for_port,
)
from reconnect import Fleet, Member, Report, percentile

if TYPE_CHECKING:
    from storm_haproxy import HAProxyPhase

from provisioning.pki.ca import DeviceIdentity, SignOptions, fingerprint
from provisioning.pki.directory import init_pki, load_ca
from schemas.migrate import migrate

FLEET = "storm"
TRUST_DOMAIN = "devicegate.local"
DOCUMENTED_LIMITS = {
    # The gateway's own limits (docs/configuration: SIGTERM drain, handshake and CONNECT
    # timeouts, connections per worker, the failed-handshake throttle).
    "server_shutting_down", "handshake_timeout", "connect_timeout", "too_many_connections",
    "rate_limited",
}  # fmt: skip
CLIENT_SIDE_OK = {
    # Nothing listens (the restart's gap) or the server went while connecting: no refusal.
    "ECONNREFUSED", "ECONNRESET", "EPIPE", "closed before CONNACK", "timeout", "hangup",
    "tls:UNEXPECTED_EOF_WHILE_READING",
}  # fmt: skip


# --- setup ------------------------------------------------------------------------------


def make_members(
    pki: Path, out: Path, count: int, sources: int, prefix: str = "storm"
) -> list[tuple[Member, str]]:
    """``count`` devices, each its own P-256 key and certificate: (member, registry row)."""
    ca = load_ca(pki, PASSPHRASE)
    now = datetime.now(UTC)
    options = SignOptions(not_before=now - timedelta(minutes=5), not_after=now + timedelta(days=1))
    rows = []
    for i in range(count):
        device_id = f"{prefix}-{i:05d}-{secrets.token_hex(2)}"
        key = ec.generate_private_key(ec.SECP256R1())
        cert = ca.issue_device_certificate(
            key.public_key(), DeviceIdentity(device_id, FLEET, TRUST_DOMAIN), options
        )
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        cert_path, key_path = out / f"{device_id}.crt", out / f"{device_id}.key"
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        source = f"127.0.0.{2 + i % sources}"
        member = Member(str(cert_path), str(key_path), device_id, source)
        row = (
            device_id,
            format(cert.serial_number, "x"),
            fingerprint(cert),
            cert.not_valid_before_utc,
            cert.not_valid_after_utc,
            cert_pem.decode(),
        )
        rows.append((member, row))
    return rows  # type: ignore[return-value]


async def create_database(name: str, rows: list[tuple[object, ...]]) -> str:
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = ADMIN_URL.rpartition("/")[0] + "/" + name
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        await conn.execute("INSERT INTO fleets (name) VALUES ($1)", FLEET)
        await register(conn, rows)
    finally:
        await conn.close()
    return url


async def register(conn: asyncpg.Connection, rows: list[tuple[object, ...]]) -> None:
    """Register devices (``make_members``' rows) as active, each with its certificate."""
    await conn.executemany(
        "INSERT INTO devices (device_id, fleet, status) VALUES ($1, $2, 'active')",
        [(row[0], FLEET) for row in rows],
    )
    await conn.executemany(
        "INSERT INTO certificates (serial, device_id, fingerprint_sha256, not_before,"
        " not_after, status, key_type, pem) VALUES ($2, $1, $3, $4, $5, 'active',"
        " 'ec-p256', $6)",
        rows,
    )


def _raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def children(pid: int) -> tuple[int, ...]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    with contextlib.suppress(OSError):
        return tuple(int(p) for p in path.read_text().split())
    return ()


class Server:
    """A server process restarted on the same port: the gateway or Mosquitto."""

    def __init__(
        self,
        name: str,
        port: int,
        command: list[str],
        env: dict[str, str],
        log: Path,
        workers: int = 0,
    ) -> None:
        self.name, self.port, self.command, self.env = name, port, command, env
        self.log, self.workers = log, workers
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=log, preexec_fn=_raise_fd_limit
            )
        wait_for_port(self.port, timeout=60)
        deadline = time.monotonic() + 30
        while len(children(self.process.pid)) < self.workers and time.monotonic() < deadline:
            time.sleep(0.02)

    def pids(self) -> tuple[int, ...]:
        assert self.process is not None
        return (self.process.pid, *children(self.process.pid))

    def stop(self, timeout: float = 90) -> float:
        """SIGTERM, wait for the exit: seconds it took."""
        assert self.process is not None
        begun = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return time.monotonic() - begun


def gateway_server(
    work: Path,
    pki: Path,
    url: str,
    upstream: int,
    workers: int,
    name: str = "gateway",
    extra: dict[str, str] | None = None,
) -> Server:
    port = free_port()
    policy = work / "policy.toml"
    policy.write_text(f'[fleets.{FLEET}]\nclient_ids = ["{{device_id}}"]\n')
    env = {
        **os.environ,
        "DEVICEGATE_DATABASE_URL": url,
        "DEVICEGATE_PKI_DIR": str(pki),
        "DEVICEGATE_SPOOL_DIR": str(work / f"spool-{name}"),
        "DEVICEGATE_INSTANCE_ID": f"storm-{name}",
        "DEVICEGATE_POLICY_FILE": str(policy),
        "DEVICEGATE_MAX_CONNECTIONS": "100000",
        "DEVICEGATE_DRAIN_TIMEOUT": "10s",
        "DEVICEGATE_LOG_FORMAT": "text",
        "DEVICEGATE_LOG_LEVEL": "warning",
        "DEVICEGATE_METRICS_LISTEN": "127.0.0.1:0",
        **(extra or {}),
    }
    command = [
        str(Path(sys.executable).with_name("devicegate")), "serve", "gateway",
        "--workers", str(workers), "--listen", f"127.0.0.1:{port}",
        "--upstream", f"mqtt://127.0.0.1:{upstream}",
    ]  # fmt: skip
    return Server(name, port, command, env, work / f"{name}.log", workers if workers > 1 else 0)


def mosquitto_server(work: Path, tls: Path | None, name: str) -> Server:
    port = free_port()
    lines = [
        f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false",
        "log_dest none", "max_queued_messages 0", "max_connections -1", "set_tcp_nodelay true",
    ]  # fmt: skip
    if os.geteuid() == 0:
        lines.append("user root")
    if tls is not None:
        lines += [
            f"cafile {tls / 'chain.pem'}", f"certfile {tls / 'server.crt'}",
            f"keyfile {tls / 'server.key'}", "require_certificate true",
            "use_identity_as_username true",
        ]  # fmt: skip
    config = work / f"{name}.conf"
    config.write_text("\n".join(lines) + "\n")
    return Server(
        name, port, ["mosquitto", "-c", str(config)], dict(os.environ), work / f"{name}.log"
    )


# --- the storm --------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    devices: int
    all_back: float  # seconds from SIGTERM until the last device was back
    drain: float  # seconds the old process took to exit after SIGTERM
    report: Report
    server_cpu: float
    startup_cpu: float  # the server's own start-up CPU (measured idle), subtracted below
    gap: float  # seconds from the old process's exit until the new one listened
    refusals: Counter[str]  # the gateway's denied events by reason (empty for Mosquitto)
    events: int | None  # allowed connect events recorded for the phase (None: Mosquitto)
    launched: float | None = None  # seconds from launching the new process until all back


async def _events(url: str, instance: str, since: datetime) -> tuple[int, Counter[str]]:
    conn = await asyncpg.connect(url)
    try:
        allowed = await conn.fetchval(
            "SELECT count(*) FROM auth_events WHERE instance = $1 AND time >= $2"
            " AND type = 'connect' AND outcome = 'allowed'",
            instance,
            since,
        )
        rows = await conn.fetch(
            "SELECT reason, count(*) AS n FROM auth_events WHERE instance = $1 AND time >= $2"
            " AND outcome = 'denied' GROUP BY reason",
            instance,
            since,
        )
    finally:
        await conn.close()
    return int(allowed), Counter({row["reason"]: int(row["n"]) for row in rows})


def storm(
    fleet: Fleet,
    server: Server,
    name: str,
    *,
    resume: bool,
    timeout: float,
    url: str | None = None,
    instance: str | None = None,
    startup_cpu: float = 0.0,
    between: Callable[[], None] | None = None,
) -> Phase:
    """Restart ``server`` under the fleet, wait until every device is back."""
    fleet.send("target", server.port, resume)
    fleet.send("reset")
    since = datetime.now(UTC)
    begun = time.time()
    drain = server.stop()
    if between is not None:
        between()
    stopped = time.monotonic()
    server.start()
    gap = time.monotonic() - stopped
    cpu = cpu_seconds(server.pids())
    fleet.wait_held(fleet.size, timeout)
    server_cpu = cpu_seconds(server.pids()) - cpu
    report = fleet.report()
    events: int | None = None
    refusals: Counter[str] = Counter()
    if url is not None and instance is not None:
        deadline = time.monotonic() + 30  # shipping: group commit, then COPY in batches
        while True:
            events, refusals = asyncio.run(_events(url, instance, since))
            if events >= report.connects or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    all_back = report.last_back - begun
    return Phase(
        name, fleet.size, all_back, drain, report, server_cpu, startup_cpu, gap, refusals, events,
        launched=report.last_back - (begun + drain),
    )  # fmt: skip


# --- the take-over restart (serve gateway --take-over) -----------------------------------


def takeover_server(old: Server) -> Server:
    """A server that takes over from ``old`` (same port, state directory and instance)."""
    env = {**old.env, "DEVICEGATE_LOG_FORMAT": "json", "DEVICEGATE_LOG_LEVEL": "info"}
    log = old.log.with_name(f"{old.name}-next.log")
    return Server(old.name, old.port, [*old.command, "--take-over"], env, log, old.workers)


def _sigterm_sent(log: Path, after: float, within: float = 180.0) -> float:
    """The time.time() the take-over supervisor logged its SIGTERM to the old one."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if "stopping the old gateway" in line:
                stamp = datetime.fromisoformat(json.loads(line)["time"].replace("Z", "+00:00"))
                if stamp.timestamp() >= after:
                    return stamp.timestamp()
        time.sleep(0.05)
    raise TimeoutError(f"no take-over in {log}")


def takeover_storm(
    fleet: Fleet, old: Server, name: str, *, resume: bool, timeout: float, url: str, instance: str
) -> tuple[Phase, Server]:
    """Replace ``old`` by a take-over under the fleet; the phase and the new server."""
    fleet.send("target", old.port, resume)
    fleet.send("reset")
    since = datetime.now(UTC)
    new = takeover_server(old)
    launched = time.time()
    try:
        new.start()  # returns once its workers run (the port already listens: the old one's)
        sigterm = _sigterm_sent(new.log, launched)
    except BaseException:
        if new.process is not None and new.process.poll() is None:
            new.stop()
        raise
    cpu = cpu_seconds(new.pids())  # from the SIGTERM on: the devices come back meanwhile
    assert old.process is not None
    old.process.wait(timeout)
    exited = time.time()
    fleet.wait_held(fleet.size, timeout)
    server_cpu = cpu_seconds(new.pids()) - cpu
    report = fleet.report()
    deadline = time.monotonic() + 30
    while True:
        events, refusals = asyncio.run(_events(url, instance, since))
        if events >= report.connects or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    # The gap is negative: the new instance was launched (and listened) before the old exited.
    phase = Phase(
        name, fleet.size, report.last_back - sigterm, exited - sigterm, report, server_cpu, 0.0,
        launched - exited, refusals, events, launched=report.last_back - launched,
    )  # fmt: skip
    return phase, new


def startup_cpu(server: Server, settle: float = 5.0) -> float:
    """CPU the server's processes spend from listening until ``settle`` s later, idle."""
    cpu = cpu_seconds(server.pids())
    time.sleep(settle)
    return cpu_seconds(server.pids()) - cpu


def print_phases(phases: list[Phase]) -> None:
    def ms(x: float) -> str:
        return f"{1e3 * x:.1f} ms"

    columns = [p.name for p in phases]
    rows: list[tuple[str, list[str]]] = [
        ("devices back / N", [f"{p.report.held:,} / {p.devices:,}" for p in phases]),
        ("SIGTERM -> exited (drain)", [f"{p.drain:.2f} s" for p in phases]),
        ("old exited -> new listening", [f"{p.gap:.2f} s" for p in phases]),
        ("SIGTERM -> all back", [f"{p.all_back:.2f} s" for p in phases]),
        ("new launched -> all back",
         [f"{p.launched:.2f} s" if p.launched is not None else "-" for p in phases]),
        ("reconnects (resumed)", [f"{p.report.connects:,} ({p.report.resumed:,})" for p in phases]),
        ("connect time p50", [ms(percentile(p.report.connect_times, 0.5)) for p in phases]),
        ("connect time p99", [ms(percentile(p.report.connect_times, 0.99)) for p in phases]),
        ("cut -> back p99", [f"{percentile(p.report.back_times, 0.99):.2f} s" for p in phases]),
        ("most attempts by one device", [str(p.report.attempts_max) for p in phases]),
        ("server CPU per reconnect",
         [ms(p.server_cpu / max(p.report.connects, 1)) for p in phases]),
        ("... less its idle start-up CPU",
         [ms(max(p.server_cpu - p.startup_cpu, 0) / max(p.report.connects, 1)) for p in phases]),
        ("load generator CPU per reconnect",
         [ms(p.report.cpu / max(p.report.connects, 1)) for p in phases]),
        ("failed attempts (client)",
         [", ".join(f"{k} {v}" for k, v in p.report.failures.most_common()) or "none"
          for p in phases]),
        ("refusals (gateway events)",
         [", ".join(f"{k} {v}" for k, v in p.refusals.most_common()) or "none"
          if p.events is not None else "-" for p in phases]),
        ("connect events / reconnects",
         [f"{p.events:,} / {p.report.connects:,}" if p.events is not None else "-"
          for p in phases]),
    ]  # fmt: skip
    print()
    print("| figure | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for label, values in rows:
        print(f"| {label} | " + " | ".join(values) + " |")
    print(flush=True)


def check(phases: list[Phase]) -> list[str]:
    """The acceptance checks: all back, no event lost, refusals only documented limits."""
    problems = []
    for p in phases:
        if p.report.held != p.devices:
            problems.append(f"{p.name}: {p.report.held} of {p.devices} back")
        # More events than reconnects is no loss: a device that gave up waiting (timeout)
        # after the gateway had admitted it is recorded, then reconnects and is again.
        if p.events is not None and p.events < p.report.connects:
            problems.append(f"{p.name}: {p.events} connect events for {p.report.connects}")
        undocumented = set(p.refusals) - DOCUMENTED_LIMITS
        if undocumented:
            problems.append(f"{p.name}: refused for {sorted(undocumented)}")
        unexpected = {k for k in p.report.failures if k not in CLIENT_SIDE_OK}
        if unexpected:
            problems.append(f"{p.name}: failed attempts {sorted(unexpected)}")
    return problems


@dataclass
class Setup:
    work: Path
    pki: Path
    url: str
    db_name: str
    members: list[Member]


@contextlib.contextmanager
def setup(devices: int, sources: int, keep: bool = False):  # type: ignore[no-untyped-def]
    work = Path(tempfile.mkdtemp(prefix="devicegate-storm-"))
    pki = work / "pki"
    init_pki(pki, passphrase=PASSPHRASE, force=True)  # writes pki/ticket-keys
    (work / "devices").mkdir()
    made = time.monotonic()
    pairs = make_members(pki, work / "devices", devices, sources)
    db_name = f"dg_storm_{secrets.token_hex(4)}"
    url = asyncio.run(create_database(db_name, [row for _, row in pairs]))  # type: ignore[misc]
    print(f"{devices:,} devices made and registered in {time.monotonic() - made:.1f}s", flush=True)
    try:
        yield Setup(work, pki, url, db_name, [m for m, _ in pairs])
    finally:
        asyncio.run(drop_database(db_name))
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace) -> tuple[list[Phase], HAProxyPhase | None]:
    phases: list[Phase] = []
    hp: HAProxyPhase | None = None
    with setup(args.devices, args.sources, args.keep) as s:
        upstream = mosquitto_server(s.work, None, "upstream")
        upstream.start()
        gateway = gateway_server(s.work, s.pki, s.url, upstream.port, args.workers)
        gateway.start()
        gateway_startup = startup_cpu(gateway)
        fleet = Fleet(s.members, procs=args.procs)
        try:
            fleet.connect(gateway.port, resume=False, base=args.base, cap=args.cap)
            took = fleet.wait_held(fleet.size, args.timeout)
            print(f"gateway: {fleet.size:,} sessions held after {took:.1f}s", flush=True)
            instance = "storm-gateway"
            if args.restart != "cold":
                for name, resume in (("take-over full", False), ("take-over resumed", True)):
                    phase, gateway = takeover_storm(
                        fleet, gateway, name, resume=resume, timeout=args.timeout,
                        url=s.url, instance=instance,
                    )  # fmt: skip
                    print(f"{name}: all back in {phase.all_back:.1f}s", flush=True)
                    phases.append(phase)
            for name, resume in (("gateway full", False), ("gateway resumed", True)):
                if args.restart == "takeover":
                    break
                phase = storm(
                    fleet,
                    gateway,
                    name,
                    resume=resume,
                    timeout=args.timeout,
                    url=s.url,
                    instance=instance,
                    startup_cpu=gateway_startup,
                )
                print(f"{name}: all back in {phase.all_back:.1f}s", flush=True)
                phases.append(phase)
            fleet.ask("drop")
            gateway.stop()
            mosquitto = mosquitto_server(s.work, s.pki, "mosquitto-mtls")
            mosquitto.start()
            mosquitto_startup = startup_cpu(mosquitto, 1.0)
            fleet.connect(mosquitto.port, resume=True, base=args.base, cap=args.cap)
            took = fleet.wait_held(fleet.size, args.timeout)
            print(f"mosquitto: {fleet.size:,} sessions held after {took:.1f}s", flush=True)
            phase = storm(
                fleet,
                mosquitto,
                "Mosquitto (resume offered)",
                resume=True,
                timeout=args.timeout,
                startup_cpu=mosquitto_startup,
            )
            phases.append(phase)
            fleet.ask("drop")
            mosquitto.stop()
            if args.haproxy:
                from storm_haproxy import haproxy_phase  # it imports this module

                hp = haproxy_phase(args, s, upstream, fleet)
        finally:
            fleet.close()
            for server in (gateway, upstream):
                if server.process is not None and server.process.poll() is None:
                    server.stop()
    return phases, hp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 devices")
    parser.add_argument("--devices", type=int, default=None, help="default 10,000")
    parser.add_argument("--workers", type=int, default=2, help="gateway workers")
    parser.add_argument("--procs", type=int, default=2, help="load generator processes")
    parser.add_argument(
        "--sources",
        type=int,
        default=8,
        help="loopback source addresses 127.0.0.2.. (ephemeral ports)",
    )
    parser.add_argument(
        "--base", type=float, default=1.0, help="backoff: first window, seconds (uniform jitter)"
    )
    parser.add_argument("--cap", type=float, default=30.0, help="backoff: largest window")
    parser.add_argument(
        "--haproxy",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the phase with two instances behind HAProxy (default: on if haproxy is installed)",
    )
    parser.add_argument("--only", choices=["haproxy"], help="run only this phase")
    parser.add_argument("--uncut", type=int, default=100, help="HAProxy phase: sessions on B")
    parser.add_argument(
        "--rtt-interval", type=float, default=0.5, help="HAProxy phase: s between round trips"
    )
    parser.add_argument(
        "--baseline", type=float, default=5.0, help="HAProxy phase: s of RTT before SIGTERM"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="per phase, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--restart",
        choices=("cold", "takeover", "both"),
        default="cold",
        help="gateway restart: SIGTERM then start (cold), serve gateway --take-over, or both",
    )
    args = parser.parse_args()
    args.devices = args.devices or (2_000 if args.quick else 10_000)
    _raise_fd_limit()
    if shutil.which("mosquitto") is None:
        sys.exit("mosquitto not installed")
    from storm_haproxy import check_haproxy, print_haproxy, run_only, unavailable

    skipped = unavailable(args.devices, args.uncut) if args.haproxy is not False else None
    args.haproxy = args.haproxy is not False and skipped is None
    if args.only == "haproxy":
        if skipped is not None:
            sys.exit(skipped)
        phases: list[Phase] = []
        hp: HAProxyPhase | None = run_only(args)
    else:
        phases, hp = run(args)
    if skipped is not None:
        print(skipped)
    if hp is not None:
        phases.append(hp.phase)
    print_phases(phases)
    problems = check(phases)
    if hp is not None:
        print_haproxy(hp)
        problems += check_haproxy(hp, args.uncut)
    for problem in problems:
        print(f"CHECK FAILED: {problem}")
    if not problems:
        print(
            "checks: every device back, every reconnect has its connect event, "
            "refusals only documented limits"
            + ("; no uncut session cut, no round trip lost" if hp is not None else "")
        )
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
