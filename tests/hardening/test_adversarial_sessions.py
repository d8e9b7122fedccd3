"""Adversarial sessions against a live gateway (issue 11, items 1-5), end to end.

Each refusal is asserted by its reason code in ``auth_events`` (not only by a closed socket)
and bounded in time. Misbehaving peers bind other loopback sources (127.0.0.x) so the
per-address limits and the recorded peer addresses are visible as such.
"""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import ssl
import time
from collections.abc import Iterator

import pytest

from gateway.denials import SAMPLE_SIZE
from gateway.mqtt import (
    Connect,
    Disconnect,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Subscription,
    encode,
)
from gateway.revocation import PostgresDirectory
from gateway.server import Gateway
from provisioning.pki.directory import init_pki, load_ca
from tests.gateway.clients import RawClient, client_context
from tests.gateway.conftest import TEST_POLICY, Device, DeviceFactory, Harness
from tests.gateway.live import wait_for
from tests.scaleout.cluster import open_client

TIMEOUT = 1.0  # handshake and connect timeouts of the gateways under test


@contextlib.contextmanager
def gateway_with(harness: Harness, **options: object) -> Iterator[Gateway]:
    """A gateway of the test's own (fresh limits), 1 s timeouts, the harness's sink."""
    gateway = Gateway(
        config=harness.config(handshake_timeout=TIMEOUT, connect_timeout=TIMEOUT),
        sink=harness.sink,
        directory=PostgresDirectory(harness.pool),
        host="127.0.0.1",
        port=0,
        policy=TEST_POLICY,
        **options,  # type: ignore[arg-type]
    )
    harness.call(gateway.start())
    try:
        yield gateway
    finally:
        harness.call(gateway.close())


def _from(address: str, port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(address, 0))


def _local(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def _publish_ok(client: RawClient, device: Device, packet_id: int) -> None:
    topic = f"devices/{device.device_id}/telemetry"
    client.send(Publish(topic=topic, payload=b"tick", qos=1, packet_id=packet_id))
    reply = client.recv()
    assert isinstance(reply, Puback) and reply.packet_id == packet_id, reply


def _closed_by_peer(sock: socket.socket | ssl.SSLSocket, deadline: float) -> bool:
    """Whether the gateway closes ``sock`` before ``deadline`` (monotonic)."""
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            if sock.recv(4096) == b"":
                return True
        except (ConnectionError, ssl.SSLError):
            return True
        except TimeoutError:
            return False
    return False


# --- 1. slowloris ------------------------------------------------------------------------

MUTE, QUIET = 200, 100


@pytest.fixture
def enough_fds() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 4096) if hard != resource.RLIM_INFINITY else 4096
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if min(wanted, soft if soft != resource.RLIM_INFINITY else wanted) < 2 * (MUTE + QUIET) + 200:
        pytest.skip("not enough file descriptors for the slowloris test")
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_slowloris_is_cut_at_the_timeouts(
    harness: Harness, make_device: DeviceFactory, enough_fds: None
) -> None:
    """200 connections that never finish the TLS handshake and 100 that never send CONNECT
    are all closed at the 1 s timeouts, each recorded (one event per connection: timeouts
    are not throttled refusals), while a real device connects and publishes meanwhile."""
    silent, steady = make_device("silent"), make_device("steady")
    with gateway_with(harness) as gateway:
        mark = harness.mark()
        mute: list[socket.socket] = []
        quiet: list[ssl.SSLSocket] = []
        context = client_context(silent, silent.chain)
        try:
            started = time.monotonic()
            for i in range(MUTE):  # half a ClientHello at most: never a handshake
                sock = _from("127.0.0.2", gateway.port)
                if i % 2:
                    sock.sendall(b"\x16\x03\x01\x02\x00\x01")
                mute.append(sock)
            for _ in range(QUIET):  # a complete handshake, then silence
                quiet.append(
                    context.wrap_socket(
                        _from("127.0.0.3", gateway.port), server_hostname="localhost"
                    )
                )
            opened = time.monotonic()
            # A real device is served while the 300 idle connections are held.
            with RawClient(gateway.port, steady, steady.chain, version=5) as client:
                assert client.connect(steady.device_id).reason_code == 0
                for packet_id in range(1, 21):
                    _publish_ok(client, steady, packet_id)
                # Everything idle is gone at the timeouts (plus scheduling slack).
                deadline = opened + TIMEOUT + 3
                assert all(_closed_by_peer(s, deadline) for s in mute)
                assert all(_closed_by_peer(s, deadline) for s in quiet)
                elapsed = time.monotonic() - started
                wait_for(lambda: len(gateway.connections) == 1, timeout=3)
                _publish_ok(client, steady, 21)  # and the device is still served
        finally:
            for s in [*mute, *quiet]:
                s.close()
    assert elapsed < TIMEOUT + 6
    handshakes = harness.wait_events(MUTE, timeout=10, after=mark, reason="handshake_timeout")
    assert len(handshakes) == MUTE
    assert {str(r["peer_address"]).partition(":")[0] for r in handshakes} == {"127.0.0.2"}
    assert {(r["type"], r["outcome"]) for r in handshakes} == {("tls_handshake", "denied")}
    assert len({r["peer_address"] for r in handshakes}) == MUTE  # one per connection
    connects = harness.wait_events(QUIET, timeout=10, after=mark, reason="connect_timeout")
    assert len(connects) == QUIET
    assert {(r["type"], r["device_id"]) for r in connects} == {("connect", silent.device_id)}
    (ok,) = harness.events(mark, device_id=steady.device_id, type="connect")
    assert ok["reason"] == "ok"


# --- 2. handshake flood with a rogue CA ---------------------------------------------------

FAILURES = 3
WINDOW = 1.0
FLOOD = 20


@pytest.fixture(scope="module")
def rogue_ca(tmp_path_factory: pytest.TempPathFactory) -> object:
    directory = tmp_path_factory.mktemp("rogue")
    init_pki(directory, passphrase=b"rogue", force=True)
    return load_ca(directory, b"rogue")


def _rogue_handshake(address: str, port: int, context: ssl.SSLContext) -> str:
    """One TLS attempt with the rogue certificate; the local address used."""
    with _from(address, port) as raw:
        local = _local(raw)
        with (
            contextlib.suppress(ssl.SSLError, ConnectionError),
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.settimeout(5)
            assert tls.recv(1) == b""
    return local


def test_rogue_ca_flood_is_summarised_per_address(
    harness: Harness, make_device: DeviceFactory, rogue_ca: object
) -> None:
    genuine = make_device("genuine")
    forged = make_device("forged", ca=rogue_ca, register=False)  # type: ignore[arg-type]
    context = client_context(forged, forged.chain)
    with gateway_with(
        harness, failed_handshakes_per_minute=FAILURES, refusal_event_interval=WINDOW
    ) as gateway:
        mark = harness.mark()
        started = time.monotonic()
        attempts = [_rogue_handshake("127.0.0.7", gateway.port, context) for _ in range(FLOOD)]
        flood_time = time.monotonic() - started
        # The neighbour address is untouched by the flood.
        client, local = open_client(gateway.port, genuine, source="127.0.0.8")
        with client:
            _publish_ok(client, genuine, 1)
    assert flood_time < 10
    failed = harness.events(mark, reason="unknown_issuer")
    single = [r for r in failed if "count" not in json.loads(r["detail"])]
    assert [r["peer_address"] for r in single] == attempts[:FAILURES]
    # Beyond the budget the address is not refused at accept (a good device may share it):
    # its failures are counted in summaries, one at once then one per window, exactly.
    deadline = time.monotonic() + WINDOW + 5
    while True:
        summaries = [json.loads(r["detail"]) for r in harness.events(mark, reason="unknown_issuer")]
        counted = sum(d.get("count", 0) for d in summaries)
        if counted >= FLOOD - FAILURES or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert counted == FLOOD - FAILURES
    assert {d["address"] for d in summaries if "count" in d} == {"127.0.0.7"}
    assert len(summaries) - FAILURES <= 1 + int(flood_time / WINDOW) + 2  # throttled
    (ok,) = harness.events(mark, device_id=genuine.device_id, type="connect")
    assert (ok["reason"], ok["peer_address"]) == ("ok", local)


# --- 3. client id hijack ----------------------------------------------------------------


@pytest.mark.parametrize(("version", "code"), [(4, 0x02), (5, 0x85)])
def test_client_id_hijack_attempts(
    harness: Harness, make_device: DeviceFactory, version: int, code: int
) -> None:
    a, b = make_device("alice"), make_device("bob")
    a_id, b_id = a.device_id, b.device_id
    attempts = [
        b_id,
        f"{b_id}-x",
        f"{a_id}/../{b_id}",
        f"{a_id}-{b_id}",  # the default policy allows the device id only
        b_id[:-1],
        b_id.upper(),
        f"{a_id} ",
    ]
    mark = harness.mark()
    with RawClient(harness.port, b, b.chain, version=version) as victim:
        assert victim.connect(b_id).reason_code == 0
        for client_id in attempts:
            with RawClient(harness.port, a, a.chain, version=version) as client:
                assert client.connect(client_id).reason_code == code, client_id
                assert client.closed()
        if version == 4:  # an empty id without clean session would be a broker-chosen id
            with RawClient(harness.port, a, a.chain, version=version) as client:
                assert client.connect("", clean_start=False).reason_code == code
                assert client.closed()
        # The victim's session was never touched.
        _publish_ok(victim, b, 1)
        assert not harness.events(mark, device_id=b_id, type="session_end")
    rows = harness.wait_events(len(attempts) + (version == 4), after=mark, device_id=a_id)
    assert [(r["type"], r["outcome"], r["reason"]) for r in rows] == [
        ("connect", "denied", "client_id_mismatch")
    ] * (len(attempts) + (version == 4))
    assert [r["client_id"] for r in rows[: len(attempts)]] == attempts


def test_prefix_template_cannot_claim_another_devices_id(
    harness: Harness, make_device: DeviceFactory
) -> None:
    a = make_device("pump", fleet="bench")  # policy: client ids "{device_id}-*"
    b = make_device(device_id=f"{a.device_id}-2")  # another device, its id extends a's
    mark = harness.mark()
    with RawClient(harness.port, b, b.chain, version=5) as victim:
        assert victim.connect(b.device_id).reason_code == 0
        with RawClient(harness.port, a, a.chain, version=5) as client:
            # Refused (0x85, client_id_mismatch) or admitted in a namespace of a's own:
            # either way b's session must not move.
            if client.connect(b.device_id).reason_code == 0x85:
                (row,) = harness.wait_events(after=mark, device_id=a.device_id)
                assert row["reason"] == "client_id_mismatch"
            time.sleep(0.2)
            _publish_ok(victim, b, 1)  # today: the broker took b's session over
            assert not harness.events(mark, device_id=b.device_id, type="session_end")


def test_prefix_template_cannot_resume_another_devices_session(
    harness: Harness, make_device: DeviceFactory, mosquitto_port: int
) -> None:
    a = make_device("valve", fleet="bench")
    b = make_device(device_id=f"{a.device_id}-2")
    topic = f"devices/{b.device_id}/cmd"
    with RawClient(harness.port, b, b.chain, version=4) as victim:  # a persistent session
        assert victim.connect(b.device_id, clean_start=False).reason_code == 0
        victim.send(
            Subscribe(packet_id=1, subscriptions=(Subscription(topic_filter=topic, qos=1),))
        )
        assert isinstance(victim.recv(), Suback)
        victim.send(Disconnect())
        assert victim.closed()
    # The back end queues a command for b while it is offline (straight at the broker).
    with socket.create_connection(("127.0.0.1", mosquitto_port), timeout=5) as backend:
        backend.sendall(
            encode(Connect(protocol_level=4, client_id=f"backend-{a.device_id}"), version=4)
        )
        assert backend.recv(4)[:1] == b"\x20"  # CONNACK
        backend.sendall(
            encode(Publish(topic=topic, payload=b"for b", qos=1, packet_id=1), version=4)
        )
        assert backend.recv(4)[:1] == b"\x40"  # PUBACK: queued for b's session
    mark = harness.mark()
    with RawClient(harness.port, a, a.chain, version=4) as client:
        connack = client.connect(b.device_id, clean_start=False)
        if connack.reason_code == 0x02:  # refused: fine, if recorded as such
            (row,) = harness.wait_events(after=mark, device_id=a.device_id, type="connect")
            assert row["reason"] == "client_id_mismatch"
        else:  # admitted: then to a fresh session of a's own, with nothing of b's in it
            assert connack.reason_code == 0
            assert not connack.session_present  # today: True, b's broker session
            with pytest.raises(TimeoutError):
                client.recv(timeout=1)  # today: b's queued PUBLISH


# --- 4. subscription filters that try to escape ---------------------------------------


@pytest.mark.parametrize(("version", "code"), [(4, 0x80), (5, 0x87)])
def test_escaping_subscription_filters(
    harness: Harness, make_device: DeviceFactory, version: int, code: int
) -> None:
    a, b = make_device("subber"), make_device("target")
    mine = f"devices/{a.device_id}/#"
    escapes = [
        "devices/#",
        "devices/+/#",
        "+/+/#",
        "#",
        "+/#",
        "$share/g/devices/#",
        "$share/g/#",
        f"$share/g/devices/{b.device_id}/#",
        "$SYS/#",
        f"+/{b.device_id}/#",
        f"devices/{b.device_id}/#",
        "devices/+/telemetry",
    ]
    filters = [escapes[0], mine, *escapes[1:]]
    mark = harness.mark()
    with RawClient(harness.port, a, a.chain, version=version) as client:
        assert client.connect(a.device_id).reason_code == 0
        subscriptions = tuple(Subscription(topic_filter=f, qos=1) for f in filters)
        client.send(Subscribe(packet_id=9, subscriptions=subscriptions))
        suback = client.recv()
        assert isinstance(suback, Suback) and suback.packet_id == 9
        granted = dict(zip(filters, suback.reason_codes, strict=True))
        assert granted.pop(mine) == 1
        assert granted == dict.fromkeys(escapes, code)
        # The allowed filter is live; nothing of b's reaches a.
        with RawClient(harness.port, b, b.chain, version=version) as other:
            assert other.connect(b.device_id).reason_code == 0
            _publish_ok(other, b, 1)
        client.send(Publish(topic=f"devices/{a.device_id}/x", payload=b"me", qos=1, packet_id=10))
        got = [client.recv(), client.recv()]
        assert {type(p) for p in got} == {Puback, Publish}
        (message,) = [p for p in got if isinstance(p, Publish)]
        assert message.payload == b"me"
        with pytest.raises(TimeoutError):
            client.recv(timeout=0.3)
    # One event per SUBSCRIBE: every denied filter counted, the first ten named.
    (row,) = harness.wait_events(after=mark, type="subscribe")
    detail = json.loads(row["detail"])
    assert (detail["count"], detail["filters"]) == (len(escapes), escapes[:SAMPLE_SIZE])
    rows = [row]
    assert {(r["outcome"], r["reason"], r["device_id"]) for r in rows} == {
        ("denied", "topic_not_authorized", a.device_id)
    }


# --- 5. one certificate from two places ----------------------------------------------------


def test_same_certificate_from_two_addresses_never_two_sessions(
    harness: Harness, make_device: DeviceFactory
) -> None:
    device = make_device("cloned")
    mark = harness.mark()
    first, first_at = open_client(harness.port, device, source="127.0.0.21")
    try:
        _publish_ok(first, device, 1)
        second, second_at = open_client(harness.port, device, source="127.0.0.22")
        with second:
            assert first.recv() == Disconnect(reason_code=0x8E)
            assert first.closed()
            _publish_ok(second, device, 2)
            live = [c for c in harness.gateway.sessions.of_device(device.device_id) if not c.closed]
            assert len(live) == 1
            # And back again: the newest always wins, one live session at any time.
            third, third_at = open_client(harness.port, device, source="127.0.0.21")
            with third:
                assert second.recv() == Disconnect(reason_code=0x8E)
                assert second.closed()
                _publish_ok(third, device, 3)
                wait_for(
                    lambda: (
                        sum(
                            not c.closed
                            for c in harness.gateway.sessions.of_device(device.device_id)
                        )
                        == 1
                    )
                )
    finally:
        first.close()
    rows = harness.wait_events(6, after=mark, device_id=device.device_id)
    connects = [(r["reason"], r["peer_address"]) for r in rows if r["type"] == "connect"]
    assert connects == [("ok", first_at), ("ok", second_at), ("ok", third_at)]
    ends = [
        (r["reason"], r["peer_address"], json.loads(r["detail"]))
        for r in rows
        if r["type"] == "session_end"
    ]
    assert [(reason, peer) for reason, peer, _ in ends[:2]] == [
        ("session_taken_over", first_at),
        ("session_taken_over", second_at),
    ]
    assert all("taken_over_by" in detail for _, _, detail in ends[:2])
