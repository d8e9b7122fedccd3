"""The denial budget end to end (issue 20, part 2): two devices try to amplify their
denials into the audit log, through mTLS, the gateway with its default settings and the
production event sink (spool, group commit, COPY) into a real PostgreSQL, while a third
device goes on publishing and receiving through a real MQTT client (paho).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from opentelemetry.metrics import NoOpMeter
from opentelemetry.trace import NoOpTracer

from gateway.config import config_from_settings
from gateway.events.sink import SpoolSink
from gateway.mqtt import Disconnect, Publish, Subscribe, Subscription, encode
from gateway.revocation import PostgresDirectory
from gateway.server import Gateway
from gateway.telemetry import GatewayMetrics, ObservingSink, audit_log
from schemas.settings import Settings
from tests.conftest import Pki
from tests.gateway.clients import RawClient, client_context
from tests.gateway.conftest import TEST_POLICY, Device, DeviceFactory, Harness

DEFAULTS = Settings()
MAX_ROWS = 50
MAX_GROWTH = 1024 * 1024


class Budgeted:
    """A gateway built from `Settings` (defaults but for paths and the broker) whose events
    go through the production sink."""

    def __init__(
        self, harness: Harness, pki: Pki, mosquitto_port: int, spool: Path, **settings: Any
    ) -> None:
        self.harness = harness
        self.chain_id = f"budget-{time.monotonic_ns()}/w0"
        self.settings = Settings(
            pki_dir=pki.directory,
            upstream_url=f"mqtt://127.0.0.1:{mosquitto_port}",
            instance_id="budget-gw",
            **settings,
        )
        metrics = GatewayMetrics(meter=NoOpMeter("test"), tracer=NoOpTracer())
        self.spool = SpoolSink(
            database_url=harness.database_url,
            spool_dir=spool,
            chain_id=self.chain_id,
            max_bytes=16 * 1024 * 1024,
        )
        harness.call(self.spool.start())
        self.gateway = Gateway(
            config=config_from_settings(self.settings),
            sink=ObservingSink(self.spool, metrics),
            directory=PostgresDirectory(harness.pool),
            host="127.0.0.1",
            port=0,
            policy=TEST_POLICY,
            metrics=metrics,
        )
        harness.call(self.gateway.start())
        self.port = self.gateway.port

    def rows(self) -> list[Any]:
        return self.harness.query(
            "SELECT * FROM auth_events WHERE chain_id = $1 ORDER BY seq",
            self.chain_id,
        )

    def wait_rows(self, done: Any, timeout: float = 20.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.rows()
            if done(rows) or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)

    def close(self) -> None:
        self.harness.call(self.gateway.close())
        self.harness.call(self.spool.close())


@pytest.fixture
def budgeted(harness: Harness, pki: Pki, mosquitto_port: int, tmp_path: Path) -> Iterator[Budgeted]:
    gateway = Budgeted(harness, pki, mosquitto_port, tmp_path / "spool")
    yield gateway
    gateway.close()


class Bystander:
    """A device publishing QoS 1 to its own topic and receiving each message back (paho)."""

    def __init__(self, device: Device, port: int) -> None:
        self.topic = f"devices/{device.device_id}/echo"
        self.received: list[bytes] = []
        self.sent = 0
        self.errors: list[str] = []
        self.disconnects: list[Any] = []
        self._got = threading.Condition()
        self._stop = threading.Event()
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=device.device_id, protocol=paho.MQTTv5
        )
        client.tls_set_context(client_context(device, device.chain))
        subscribed = threading.Event()
        client.on_subscribe = lambda c, u, mid, codes, props: subscribed.set()
        client.on_message = self._message
        client.on_disconnect = lambda c, u, flags, rc, props: self.disconnects.append(rc)
        client.connect("127.0.0.1", port, keepalive=30)
        client.loop_start()
        client.subscribe(self.topic, qos=1)
        assert subscribed.wait(5), "no SUBACK"
        self.client = client
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _message(self, client: Any, userdata: Any, message: Any) -> None:
        with self._got:
            self.received.append(message.payload)
            self._got.notify_all()

    def round_trip(self) -> bool:
        payload = f"m{self.sent}".encode()
        self.sent += 1
        info = self.client.publish(self.topic, payload, qos=1)
        with self._got:
            arrived = self._got.wait_for(lambda: payload in self.received, timeout=5)
        info.wait_for_publish(5)
        return bool(arrived and info.is_published())

    def _run(self) -> None:
        for _ in range(10_000):  # bounded; stopped long before
            if self._stop.is_set():
                return
            if not self.round_trip():
                self.errors.append(f"round trip {self.sent} failed")
                return
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)


class LogCount(logging.Handler):
    """Counts the audit log lines at INFO and above (denials)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record)


def _database_size(harness: Harness) -> int:
    return int(harness.query("SELECT pg_database_size(current_database()) AS n")[0]["n"])


def _events_size(harness: Harness) -> int:
    """Bytes of every auth_events partition, with its indexes and TOAST."""
    return int(
        harness.query(
            "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0) AS n FROM pg_inherits"
            " WHERE inhparent = 'auth_events'::regclass"
        )[0]["n"]
    )


def _one_subscribe_60000_denied(device: Device, port: int, outcome: dict[str, Any]) -> None:
    filters = tuple(Subscription(topic_filter=chr(97 + i % 26)) for i in range(60_000))
    data = encode(Subscribe(packet_id=1, subscriptions=filters), version=5)
    outcome["bytes"] = len(data)
    with RawClient(port, device, device.chain, version=5, timeout=30) as client:
        assert client.connect(device.device_id).reason_code == 0
        client.send_bytes(data)
        outcome["reply"] = client.recv(timeout=30)
        outcome["closed"] = client.closed(timeout=10)


def _publishes_20000_denied(device: Device, port: int, outcome: dict[str, Any]) -> None:
    packet = encode(Publish(topic="x", payload=b""), version=5)  # 6 bytes, QoS 0, denied
    outcome["packet_bytes"] = len(packet)
    with RawClient(port, device, device.chain, version=5, timeout=30) as client:
        assert client.connect(device.device_id).reason_code == 0
        try:
            client.send_bytes(packet * 20_000)
        except OSError as exc:  # closed by the gateway while we were still sending
            outcome["send_error"] = repr(exc)
        outcome["reply"] = client.recv(timeout=30)
        outcome["closed"] = client.closed(timeout=10)


def test_amplification_is_bounded_and_only_the_abusers_are_cut(
    harness: Harness, budgeted: Budgeted, make_device: DeviceFactory
) -> None:
    subscriber, publisher, bystander_device = (
        make_device("amp-sub"),
        make_device("amp-pub"),
        make_device("amp-ok"),
    )
    bystander = Bystander(bystander_device, budgeted.port)
    assert bystander.round_trip()
    admitted = budgeted.wait_rows(lambda rows: len(rows) >= 1)
    assert [r["type"] for r in admitted] == ["connect"]
    size_before, events_before = _database_size(harness), _events_size(harness)
    lines = LogCount()
    level = audit_log.level
    audit_log.setLevel(logging.INFO)
    audit_log.addHandler(lines)
    try:
        bystander.thread.start()
        outcomes: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
        attackers = [
            threading.Thread(
                target=_one_subscribe_60000_denied, args=(subscriber, budgeted.port, outcomes[0])
            ),
            threading.Thread(
                target=_publishes_20000_denied, args=(publisher, budgeted.port, outcomes[1])
            ),
        ]
        for thread in attackers:
            thread.start()
        for thread in attackers:
            thread.join(60)
        rows = budgeted.wait_rows(
            lambda rows: sum(r["reason"] == "too_many_denials" for r in rows) == 2
        )
        time.sleep(0.5)  # anything late (there should be nothing) would show up now
        bystander.stop()
        assert bystander.round_trip()  # still there, after the attack
    finally:
        audit_log.removeHandler(lines)
        audit_log.setLevel(level)
    rows = budgeted.rows()
    size_after, events_after = _database_size(harness), _events_size(harness)

    # Both abusers got DISCONNECT 0x97 (quota exceeded) and were closed.
    for outcome in outcomes:
        assert outcome["reply"] == Disconnect(reason_code=0x97), outcome
        assert outcome["closed"] is True
    assert 230_000 < outcomes[0]["bytes"] < 250_000 and outcomes[1]["packet_bytes"] == 6

    # At most 50 rows in all, with exact counts.
    assert len(rows) <= MAX_ROWS, [(r["type"], r["reason"]) for r in rows]
    by_device: dict[str, list[Any]] = {}
    for row in rows:
        by_device.setdefault(row["device_id"], []).append(row)

    sub_rows = by_device[subscriber.device_id]
    assert [(r["type"], r["reason"]) for r in sub_rows] == [
        ("connect", "ok"),
        ("subscribe", "topic_not_authorized"),
        ("session_end", "too_many_denials"),
    ]
    subscribe_detail = json.loads(sub_rows[1]["detail"])
    assert subscribe_detail["count"] == 60_000
    assert subscribe_detail["filters"] == [chr(97 + i) for i in range(10)]
    end = json.loads(sub_rows[2]["detail"])
    assert end["denied"] == 60_000 and sub_rows[2]["outcome"] == "denied"

    pub_rows = by_device[publisher.device_id]
    denials = [r for r in pub_rows if r["type"] == "publish"]
    assert all((r["outcome"], r["reason"]) == ("denied", "topic_not_authorized") for r in denials)
    counts = [json.loads(r["detail"])["count"] for r in denials]
    # The first DENIAL_EVENTS_PER_WINDOW one by one, then one summary up to the cut.
    budget = DEFAULTS.denials_per_window
    assert counts == [1] * DEFAULTS.denial_events_per_window + [
        budget + 1 - DEFAULTS.denial_events_per_window
    ]
    assert json.loads(denials[-1]["detail"])["topics"] == ["x"]
    (pub_end,) = [r for r in pub_rows if r["type"] == "session_end"]
    assert pub_end["reason"] == "too_many_denials"
    assert json.loads(pub_end["detail"])["denied"] == sum(counts) == budget + 1

    # The bystander's session was never touched: admitted once, never ended.
    ok_rows = by_device[bystander_device.device_id]
    assert [(r["type"], r["reason"]) for r in ok_rows] == [("connect", "ok")]
    assert bystander.errors == [] and bystander.disconnects == []
    assert bystander.sent > 1 and bystander.client.is_connected()

    # The database grew by less than 1 MB; the log lines follow the rows.
    assert size_after - size_before < MAX_GROWTH, (size_before, size_after)
    assert events_after - events_before < MAX_GROWTH, (events_before, events_after)
    denial_lines = [r for r in lines.lines if r.getMessage().split()[1] == "denied"]
    assert len(denial_lines) == len([r for r in rows if r["outcome"] == "denied"])
    assert len(lines.lines) <= MAX_ROWS
    bystander.client.disconnect()
    bystander.client.loop_stop()


@pytest.fixture
def short_window(
    harness: Harness, pki: Pki, mosquitto_port: int, tmp_path: Path
) -> Iterator[Budgeted]:
    gateway = Budgeted(harness, pki, mosquitto_port, tmp_path / "spool", denial_window="1s")
    yield gateway
    gateway.close()


def test_held_denials_are_summarised_when_the_window_ends(
    short_window: Budgeted, make_device: DeviceFactory
) -> None:
    device = make_device("window")
    mine = f"devices/{device.device_id}/t"
    with RawClient(short_window.port, device, device.chain, version=5) as client:
        assert client.connect(device.device_id).reason_code == 0
        client.send_bytes(encode(Publish(topic="x", payload=b""), version=5) * 15)
        # No session end: the summary comes from the window's timer, about 1 s later.
        rows = short_window.wait_rows(lambda rows: any("summary" in r["detail"] for r in rows))
        client.send(Publish(topic=mine, payload=b"still here", qos=1, packet_id=1))
        reply = client.recv()
        assert reply is not None and getattr(reply, "packet_id", None) == 1
        client.send(Disconnect())
    counts = [json.loads(r["detail"])["count"] for r in rows if r["type"] == "publish"]
    assert counts == [1] * 10 + [5]
    rows = short_window.wait_rows(lambda rows: rows[-1]["type"] == "session_end")
    end = rows[-1]
    assert (end["type"], end["reason"]) == ("session_end", "client_disconnected")
    assert json.loads(end["detail"])["denied"] == 15
    assert len([r for r in rows if r["type"] == "publish"]) == 11  # nothing held at the end
