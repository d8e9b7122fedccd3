"""Telemetry wired into the gateway: counters, spans, trace ids in events, and /metrics.

One scripted sequence of connections (an admitted session with messages and denials, a
client id mismatch, an unknown device, a TLS client without a certificate) runs twice:

* against a `Gateway` in this process, with the production sink (`SpoolSink` wrapped in
  `ObservingSink`) and in-memory readers: exact counter values, the connection spans, and
  the trace id of each refusal in its auth event in PostgreSQL;
* against ``python -m gateway.serve`` in a child process: ``/metrics`` of the running
  worker shows the same values, and its JSON log has one line per decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
import uvloop

from gateway.config import BridgeConfig
from gateway.events.sink import SpoolSink
from gateway.mqtt import Disconnect, Puback, Publish, Suback, Subscribe, Subscription
from gateway.revocation import PostgresDirectory
from gateway.server import Gateway
from gateway.telemetry import GatewayMetrics, ObservingSink
from gateway.tls import server_context
from gateway.upstream import UpstreamTarget
from provisioning.pki.ca import fingerprint
from tests.conftest import Pki
from tests.gateway.clients import RawClient
from tests.gateway.conftest import TRUST_DOMAIN, Device, issue
from tests.helpers import free_port, wait_for_port
from tests.telemetry.conftest import Harness

T = TypeVar("T")
MESSAGES = 40


# --- devices and the scripted sequence ---------------------------------------------------


async def _register(database_url: str, device: Device, cert: Any) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO fleets (name) VALUES ($1) ON CONFLICT DO NOTHING", "plant")
        await conn.execute(
            "INSERT INTO devices (device_id, fleet, status) VALUES ($1, $2, 'active')",
            device.device_id,
            device.fleet,
        )
        await conn.execute(
            "INSERT INTO certificates (serial, device_id, fingerprint_sha256, not_before,"
            " not_after, status, key_type, pem) VALUES ($1, $2, $3, $4, $5, 'active',"
            " 'ec-p256', $6)",
            device.serial,
            device.device_id,
            device.fingerprint,
            cert.not_valid_before_utc,
            cert.not_valid_after_utc,
            device.cert.read_text(),
        )
    finally:
        await conn.close()


def make_device(pki: Pki, directory: Path, database_url: str, *, register: bool = True) -> Device:
    device_id = f"tw-{secrets.token_hex(4)}"
    cert_path, key_path, cert = issue(pki.ca, directory, device_id, "plant")
    device = Device(
        device_id, "plant", cert_path, key_path, pki.chain, format(cert.serial_number, "x"),
        fingerprint(cert),
    )  # fmt: skip
    if register:
        asyncio.run(_register(database_url, device, cert))
    return device


@dataclass
class Script:
    """The devices of one run of the scripted sequence."""

    admitted: Device
    mismatched: Device
    unknown: Device


def run_script(port: int, script: Script, chain: Path) -> None:
    """Connect, exchange and get refused, exactly as the expected counts below assume."""
    device = script.admitted
    mine = f"devices/{device.device_id}"
    with RawClient(port, device, chain, version=5) as client:
        assert client.connect(device.device_id).reason_code == 0
        client.send(
            Subscribe(packet_id=1, subscriptions=(Subscription(topic_filter=f"{mine}/#", qos=0),))
        )
        suback = client.recv()
        assert isinstance(suback, Suback) and suback.reason_codes == (0,)
        for i in range(MESSAGES):
            client.send(Publish(topic=f"{mine}/t", payload=b"m%d" % i, qos=0))
        for _ in range(MESSAGES):
            assert isinstance(client.recv(), Publish)
        # A denied publish (PUBACK 0x87) and a denied subscription (SUBACK 0x87).
        client.send(Publish(topic="devices/someone-else/t", payload=b"x", qos=1, packet_id=2))
        puback = client.recv()
        assert isinstance(puback, Puback) and puback.reason_code == 0x87
        client.send(
            Subscribe(packet_id=3, subscriptions=(Subscription(topic_filter="$SYS/#", qos=0),))
        )
        suback = client.recv()
        assert isinstance(suback, Suback) and suback.reason_codes == (0x87,)
        client.send(Disconnect())
        assert client.closed()
    other = script.mismatched
    with RawClient(port, other, chain, version=5) as client:
        assert client.connect("not-my-client-id").reason_code == 0x85
        assert client.closed()
    with RawClient(port, script.unknown, chain, version=4) as client:
        assert client.connect(script.unknown.device_id).reason_code == 0x05
        assert client.closed()
    # No client certificate (TLS 1.2: the refusal comes with the handshake).
    with (
        contextlib.suppress(ssl.SSLError, ConnectionError),
        RawClient(port, None, chain, tls_version=ssl.TLSVersion.TLSv1_2) as client,
    ):
        client.recv()


EXPECTED_HANDSHAKES = {
    ("allowed", "ok"): 1,
    ("denied", "client_id_mismatch"): 1,
    ("denied", "device_unknown"): 1,
    ("denied", "no_client_certificate"): 1,
}
EXPECTED_DENIALS = {
    ("connect", "client_id_mismatch"): 1,
    ("publish", "topic_not_authorized"): 1,
    ("subscribe", "topic_not_authorized"): 1,
}
# CONNECT, SUBSCRIBE, the messages, the denied PUBLISH and SUBSCRIBE, DISCONNECT; out: the
# CONNACK, the broker's SUBACK and the messages (local refusals are the gateway's own).
PACKETS_IN = 1 + 1 + MESSAGES + 1 + 1 + 1
PACKETS_OUT = 1 + 1 + MESSAGES


def _wait(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


async def _rows(database_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def events_of(database_url: str, instance: str) -> list[asyncpg.Record]:
    return asyncio.run(
        _rows(
            database_url,
            "SELECT type, outcome, reason, device_id, detail FROM auth_events"
            " WHERE instance = $1 ORDER BY chain_id, seq",
            instance,
        )
    )


# --- in process: exact counters and spans ------------------------------------------------


async def _pool(url: str) -> asyncpg.Pool:
    return await asyncpg.create_pool(url, min_size=1, max_size=4)


class WiredGateway:
    """A Gateway wired as `gateway.serve` wires it, on its own uvloop thread."""

    def __init__(
        self, pki: Pki, database_url: str, mosquitto_port: int, spool: Path, harness: Harness
    ) -> None:
        self.instance = f"wired-{secrets.token_hex(3)}"
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.metrics = GatewayMetrics(
            meter=harness.telemetry.meter, tracer=harness.telemetry.tracer
        )
        self.pool: asyncpg.Pool = self.call(_pool(database_url))
        self.spool = SpoolSink(
            database_url=database_url, spool_dir=spool, chain_id=f"{self.instance}/w0",
            metrics=self.metrics,
        )  # fmt: skip
        self.call(self.spool.start())
        self.metrics.watch_sink(lambda: self.spool.stats)
        config = BridgeConfig(
            instance=self.instance,
            trust_domain=TRUST_DOMAIN,
            ssl_context=server_context(pki.chain, pki.server_cert, pki.server_key),
            upstream=UpstreamTarget("127.0.0.1", mosquitto_port),
            handshake_timeout=3.0,
            connect_timeout=3.0,
            max_packet_size=64 * 1024,
        )
        self.gateway = Gateway(
            config=config,
            sink=ObservingSink(self.spool, self.metrics),
            directory=PostgresDirectory(self.pool),
            host="127.0.0.1",
            port=0,
            metrics=self.metrics,
        )
        self.call(self.gateway.start())
        self.port = self.gateway.port

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 15) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.call(self.gateway.close())
        self.call(self.spool.close())
        self.call(self.pool.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def wired(
    pki: Pki, database_url: str, mosquitto_port: int, tmp_path: Path, harness: Harness
) -> Iterator[WiredGateway]:
    gateway = WiredGateway(pki, database_url, mosquitto_port, tmp_path / "spool", harness)
    yield gateway
    gateway.close()


def _pairs(points: dict[tuple[tuple[str, Any], ...], Any]) -> dict[tuple[Any, ...], Any]:
    return {tuple(value for _, value in key): count for key, count in points.items()}


def test_counters_spans_and_trace_ids(
    wired: WiredGateway,
    harness: Harness,
    pki: Pki,
    database_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="devicegate.gateway.audit")
    script = Script(
        admitted=make_device(pki, tmp_path, database_url),
        mismatched=make_device(pki, tmp_path, database_url),
        unknown=make_device(pki, tmp_path, database_url, register=False),
    )
    run_script(wired.port, script, pki.chain)

    def handshakes() -> dict[tuple[Any, ...], Any]:
        return _pairs(harness.points("devicegate.handshakes"))

    _wait(lambda: handshakes() == EXPECTED_HANDSHAKES)
    assert _pairs(harness.points("devicegate.authz.denials")) == EXPECTED_DENIALS
    _wait(lambda: _pairs(harness.points("devicegate.sessions.ended")) != {})
    assert _pairs(harness.points("devicegate.sessions.ended")) == {("client_disconnected",): 1}
    assert harness.points("devicegate.sessions.active") == {(): 0}
    assert _pairs(harness.points("devicegate.messages")) == {
        ("in",): PACKETS_IN,
        ("out",): PACKETS_OUT,
    }
    _, bytes_in = next(iter(_pairs(harness.points("devicegate.bytes")).items()))

    # Every event reaches PostgreSQL with the trace id of its connection.
    rows: list[asyncpg.Record] = []

    def shipped() -> bool:
        nonlocal rows
        rows = events_of(database_url, wired.instance)
        # connect ok, 2 denials, session_end, 2 refused CONNECTs, the refused handshake
        return len(rows) >= 7

    _wait(shipped)
    by_reason = {(row["type"], row["reason"]): row for row in rows}
    session_end = by_reason[("session_end", "client_disconnected")]
    end_detail = json.loads(session_end["detail"])
    assert _pairs(harness.points("devicegate.bytes")) == {
        ("in",): end_detail["bytes_in"],
        ("out",): end_detail["bytes_out"],
    }
    assert (end_detail["packets_in"], end_detail["packets_out"]) == (PACKETS_IN, PACKETS_OUT)
    assert bytes_in == end_detail["bytes_in"]

    spans = harness.spans.get_finished_spans()
    roots = [s for s in spans if s.name == "devicegate.connection"]
    assert len(roots) == 4
    by_trace = {f"{s.context.trace_id:032x}": s for s in roots if s.context is not None}
    assert len(by_trace) == 4
    for row in rows:
        trace_id = json.loads(row["detail"])["trace_id"]
        root = by_trace[trace_id]
        assert root.attributes is not None
        if row["type"] in ("tls_handshake", "connect"):
            assert root.attributes["devicegate.reason"] == row["reason"]
            assert root.attributes["devicegate.outcome"] == row["outcome"]

    def root_of(reason: str) -> Any:
        (found,) = [s for s in roots if (s.attributes or {}).get("devicegate.reason") == reason]
        return found

    def children(root: Any) -> set[str]:
        return {
            s.name
            for s in spans
            if s.parent is not None and s.parent.span_id == root.context.span_id
        }

    admitted = root_of("ok")
    assert admitted.attributes["devicegate.device_id"] == script.admitted.device_id
    assert admitted.attributes["devicegate.fleet"] == "plant"
    assert admitted.attributes["devicegate.peer"].startswith("127.0.0.1:")
    assert children(admitted) == {"handshake", "authorize", "upstream_dial"}
    assert [(e.name, dict(e.attributes or {})) for e in admitted.events] == [
        ("session_end", {"cause": "client_disconnected"})
    ]
    mismatch = root_of("client_id_mismatch")
    assert mismatch.attributes["devicegate.outcome"] == "denied"
    assert mismatch.attributes["devicegate.device_id"] == script.mismatched.device_id
    assert children(mismatch) == {"handshake"}
    unknown = root_of("device_unknown")
    assert children(unknown) == {"handshake", "authorize"}
    no_cert = root_of("no_client_certificate")
    assert "devicegate.device_id" not in no_cert.attributes
    (handshake,) = [
        s for s in spans if s.name == "handshake" and s.parent.span_id == no_cert.context.span_id
    ]
    assert handshake.attributes["devicegate.reason"] == "no_client_certificate"
    # The refusals' trace ids are in their events in PostgreSQL.
    for reason, root in (("no_client_certificate", no_cert), ("client_id_mismatch", mismatch)):
        (row,) = [r for r in rows if r["reason"] == reason]
        assert json.loads(row["detail"])["trace_id"] == f"{root.context.trace_id:032x}"

    # The dial was timed, the spool's commits and batches observed, the queue drained.
    dial = harness.points("devicegate.upstream.dial.duration")
    assert {key: count for key, (count, _) in dial.items()} == {(("outcome", "ok"),): 1}
    flushes, _ = harness.points("devicegate.events.flush.duration")[()]
    assert flushes >= 1
    _wait(lambda: harness.points("devicegate.events.queue.depth") == {(): 0})
    batches = harness.points("devicegate.events.batch.size")[()]
    assert batches[1] == len(rows)  # every event shipped, counted once in some batch

    # One log line per decision, with the event's fields and its trace id: denials at
    # INFO, allowed decisions (admission, normal session end) at DEBUG.
    lines = [r for r in caplog.records if r.name == "devicegate.gateway.audit"]
    assert len(lines) == len(rows)
    for record in lines:
        denied = record.__dict__["outcome"] == "denied"
        assert record.levelno == (logging.INFO if denied else logging.DEBUG)
    logged = {(r.__dict__["type"], r.__dict__["reason"]): r.__dict__ for r in lines}
    line = logged[("connect", "client_id_mismatch")]
    assert line["device_id"] == script.mismatched.device_id
    assert line["trace_id"] == f"{mismatch.context.trace_id:032x}"


def test_accept_time_refusals_count_once_each(
    wired: WiredGateway, harness: Harness, pki: Pki
) -> None:
    """Connections beyond max_connections: counted per refusal, not per throttled event."""
    wired.gateway.max_connections = 0
    refused = 5
    for _ in range(refused):
        with contextlib.suppress(OSError, ssl.SSLError):
            RawClient(wired.port, None, pki.chain, timeout=2).close()
    _wait(
        lambda: (
            _pairs(harness.points("devicegate.handshakes"))
            == {("denied", "too_many_connections"): refused}
        )
    )
    wired.call(wired.gateway.close())  # flushes the throttled refusal events
    time.sleep(0.2)
    assert _pairs(harness.points("devicegate.handshakes")) == {
        ("denied", "too_many_connections"): refused
    }
    assert not [s for s in harness.spans.get_finished_spans() if s.name == "devicegate.connection"]


# --- a child process: scrape /metrics ----------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match is not None, line
        labels = frozenset(_LABEL.findall(match.group(3) or ""))
        samples[(match.group(1), labels)] = float(match.group(4))
    return samples


def family(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, *keys: str
) -> dict[tuple[str, ...], float]:
    found = {}
    for (sample, labels), value in samples.items():
        if sample == name:
            given = dict(labels)
            assert given.pop("worker") == "0"
            found[tuple(given[key] for key in keys)] = value
            assert set(given) == set(keys)
    return found


@pytest.fixture
def served(
    pki: Pki, database_url: str, mosquitto_port: int, tmp_path: Path
) -> Iterator[tuple[int, int, str, Path]]:
    port, metrics_port = free_port(), free_port()
    instance = f"scrape-{secrets.token_hex(3)}"
    env = {
        **os.environ,
        "DEVICEGATE_DATABASE_URL": database_url,
        "DEVICEGATE_PKI_DIR": str(pki.directory),
        "DEVICEGATE_GATEWAY_LISTEN": f"127.0.0.1:{port}",
        "DEVICEGATE_UPSTREAM_URL": f"mqtt://127.0.0.1:{mosquitto_port}",
        "DEVICEGATE_SPOOL_DIR": str(tmp_path / "spool"),
        "DEVICEGATE_INSTANCE_ID": instance,
        "DEVICEGATE_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        "DEVICEGATE_LOG_FORMAT": "json",
    }
    log = tmp_path / "gateway.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "gateway.serve"], env=env, stderr=stderr)
    try:
        try:
            wait_for_port(port, timeout=15)
            wait_for_port(metrics_port, timeout=5)
        except TimeoutError:
            raise AssertionError(log.read_text()) from None
        yield port, metrics_port, instance, log
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_metrics_endpoint_of_a_running_gateway(
    served: tuple[int, int, str, Path], pki: Pki, database_url: str, tmp_path: Path
) -> None:
    port, metrics_port, instance, log = served
    before = scrape(metrics_port)
    assert family(before, "devicegate_handshakes_total", "outcome", "reason") == {}
    assert family(before, "devicegate_sessions_active") == {(): 0}
    script = Script(
        admitted=make_device(pki, tmp_path, database_url),
        mismatched=make_device(pki, tmp_path, database_url),
        unknown=make_device(pki, tmp_path, database_url, register=False),
    )
    run_script(port, script, pki.chain)

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}

    def settled() -> bool:
        nonlocal samples
        samples = scrape(metrics_port)
        handshakes = family(samples, "devicegate_handshakes_total", "outcome", "reason")
        queue = family(samples, "devicegate_events_queue_depth")
        return handshakes == EXPECTED_HANDSHAKES and queue == {(): 0}

    _wait(settled)
    assert family(samples, "devicegate_authz_denials_total", "action", "reason") == (
        EXPECTED_DENIALS
    )
    assert family(samples, "devicegate_sessions_ended_total", "cause") == {
        ("client_disconnected",): 1
    }
    assert family(samples, "devicegate_sessions_active") == {(): 0}
    assert family(samples, "devicegate_messages_total", "direction") == {
        ("in",): PACKETS_IN,
        ("out",): PACKETS_OUT,
    }
    rows = events_of(database_url, instance)
    (end,) = [json.loads(r["detail"]) for r in rows if r["type"] == "session_end"]
    assert family(samples, "devicegate_bytes_total", "direction") == {
        ("in",): end["bytes_in"],
        ("out",): end["bytes_out"],
    }
    dial = family(samples, "devicegate_upstream_dial_duration_seconds_count", "outcome")
    assert dial == {("ok",): 1}
    assert family(samples, "devicegate_events_batch_size_sum") == {(): len(rows)}
    (age,) = family(samples, "devicegate_revocation_state_age_seconds").values()
    assert 0 <= age < 30
    assert family(samples, "devicegate_events_spool_bytes")
    assert family(samples, "devicegate_events_lost_total") == {(): 0}  # nothing was lost
    assert family(samples, "devicegate_events_flush_duration_seconds_count")[()] >= 1

    # One JSON log line per denial (INFO; allowed decisions are DEBUG, below the default
    # level), carrying the event's trace id.
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    audit = [line for line in lines if line["logger"] == "devicegate.gateway.audit"]
    denied = [r for r in rows if r["outcome"] == "denied"]
    assert len(audit) == len(denied) < len(rows)
    assert all(line["worker"] == 0 for line in lines)
    trace_ids = {json.loads(r["detail"])["trace_id"] for r in denied}
    assert {line["trace_id"] for line in audit} == trace_ids
    (refusal,) = [line for line in audit if line["reason"] == "client_id_mismatch"]
    assert refusal["level"] == "info" and refusal["outcome"] == "denied"
    assert refusal["device_id"] == script.mismatched.device_id
