"""Scale-out: three gateway instances (two workers each) behind a real HAProxy (PROXY v2,
round robin), one Mosquitto, one PostgreSQL. The instances share nothing but the database.

Devices spread over all three; events carry the devices' own addresses; a revocation
cuts a device wherever it is connected within a second; a second connection of a device
through another instance takes over the first within a second (both recorded, the old
session's event naming the new instance); killing an instance leaves the others serving
and its devices reconnect through HAProxy; every instance's per-worker chains verify.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from gateway.mqtt import Disconnect, Pingreq, Pingresp
from provisioning import admin
from provisioning.audit.verify import verify_chains
from tests.conftest import Pki
from tests.gateway.clients import RawClient
from tests.gateway.conftest import Device, DeviceFactory, Harness
from tests.gateway.live import provision
from tests.scaleout.cluster import HAPROXY, Cluster, cluster, open_client

T = TypeVar("T")

pytestmark = pytest.mark.skipif(not Path(HAPROXY).exists(), reason="haproxy not installed")

CUT_WITHIN = 1.0  # seconds: revocation and takeover


def _source(i: int) -> str:
    return f"127.0.0.{10 + i}"  # distinct from HAProxy's 127.0.0.1


@pytest.fixture(scope="module")
def three(
    pki: Pki, database_url: str, mosquitto_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("scaleout")
    tag = f"so{int(time.time()) % 100000}"
    with cluster(
        pki=pki, database_url=database_url, upstream=mosquitto_port, work=work, tag=tag
    ) as c:
        yield c


def _detail(row: Any) -> dict[str, Any]:
    detail = row["detail"]
    return detail if isinstance(detail, dict) else dict(json.loads(detail))


def _wait(fetch: Callable[[], T], ok: Callable[[T], bool], timeout: float = 10.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if ok(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def _events(harness: Harness, device_ids: list[str]) -> list[Any]:
    return harness.query(
        "SELECT * FROM auth_events WHERE device_id = ANY($1::text[]) ORDER BY time, seq",
        device_ids,
    )


def _connect_event(harness: Harness, device: Device, peer: str) -> Any:
    rows = _wait(
        lambda: [
            r
            for r in _events(harness, [device.device_id])
            if r["type"] == "connect" and r["peer_address"] == peer
        ],
        bool,
    )
    assert rows, f"no connect event for {device.device_id} from {peer}"
    return rows[0]


def _ends(harness: Harness, device: Device, peer: str) -> list[Any]:
    return [
        r
        for r in _events(harness, [device.device_id])
        if r["type"] == "session_end" and r["peer_address"] == peer
    ]


def _alive(client: RawClient) -> bool:
    try:
        client.send(Pingreq())
        return client.recv(timeout=3) == Pingresp()
    except (OSError, TimeoutError):
        return False


def _cut_within(client: RawClient, code: int) -> float:
    """Seconds until ``client`` gets DISCONNECT ``code`` and is closed."""
    start = time.monotonic()
    assert client.recv(timeout=3) == Disconnect(reason_code=code)
    assert client.closed(timeout=2)
    return time.monotonic() - start


def test_devices_spread_over_all_instances_with_their_own_addresses(
    three: Cluster, harness: Harness, make_device: DeviceFactory
) -> None:
    devices = [make_device(f"spread{i}", fleet="bench") for i in range(6)]
    clients: list[tuple[RawClient, str]] = []
    try:
        for i, device in enumerate(devices):
            clients.append(open_client(three.port, device, source=_source(i)))
        for client, _ in clients:
            assert _alive(client)
        rows = [
            _connect_event(harness, device, peer)
            for device, (_, peer) in zip(devices, clients, strict=True)
        ]
    finally:
        for client, _ in clients:
            client.send(Disconnect())
            client.close()
    names = {i.name for i in three.instances}
    assert {row["instance"] for row in rows} == names  # round robin: two devices each
    assert all(str(row["chain_id"]).startswith(f"{row['instance']}/w") for row in rows)
    # The devices' own addresses (PROXY v2), not HAProxy's: six distinct sources.
    assert {str(row["peer_address"]).rpartition(":")[0] for row in rows} == {
        _source(i) for i in range(6)
    }
    assert all(str(_detail(row)["proxy"]).startswith("127.0.0.1:") for row in rows)


def test_revocation_cuts_a_device_on_any_instance_within_a_second(
    three: Cluster, harness: Harness, make_device: DeviceFactory
) -> None:
    devices = [make_device(f"revoke{i}", fleet="bench") for i in range(3)]
    clients = [open_client(three.port, d, source=_source(20 + i)) for i, d in enumerate(devices)]
    try:
        instances = {
            _connect_event(harness, device, peer)["instance"]
            for device, (_, peer) in zip(devices, clients, strict=True)
        }
        assert len(instances) == 3  # one on each instance
        for device, (client, _) in zip(devices, clients, strict=True):
            start = time.monotonic()
            provision(harness, admin.revoke_device, device.device_id)
            _cut_within(client, 0x98)
            assert time.monotonic() - start < CUT_WITHIN
    finally:
        for client, _ in clients:
            client.close()
    rows = _wait(
        lambda: _events(harness, [d.device_id for d in devices]),
        lambda rows: sum(r["type"] == "session_revoked" for r in rows) >= 3,
    )
    revoked = [r for r in rows if r["type"] == "session_revoked"]
    assert {r["instance"] for r in revoked} == instances
    assert {r["reason"] for r in revoked} == {"device_revoked"}


def test_a_second_connection_through_another_instance_takes_over(
    three: Cluster, harness: Harness, make_device: DeviceFactory
) -> None:
    device = make_device("takeover", fleet="bench")
    first, first_peer = open_client(three.port, device, source=_source(30))
    first_row = _connect_event(harness, device, first_peer)
    try:
        # Round robin: the next connection lands on the next instance.
        start = time.monotonic()
        second, second_peer = open_client(three.port, device, source=_source(31))
        try:
            try:
                took = _cut_within(first, 0x8E)
            except AssertionError:
                time.sleep(1)
                rows = _events(harness, [device.device_id])
                seen = [(r["type"], r["reason"], r["instance"], r["peer_address"]) for r in rows]
                raise AssertionError(seen) from None
            assert time.monotonic() - start < CUT_WITHIN + 0.5, took
            assert _alive(second)  # the new session is the live one
            second_row = _connect_event(harness, device, second_peer)
        finally:
            second.send(Disconnect())
            second.close()
    finally:
        first.close()
    assert second_row["instance"] != first_row["instance"]
    ended = _wait(lambda: _ends(harness, device, first_peer), bool)
    assert [(r["reason"], r["instance"]) for r in ended] == [
        ("session_taken_over", first_row["instance"])
    ]
    taker = _detail(ended[0])["taken_over_by"]
    assert taker["instance"] == second_row["instance"]
    chain_name = str(second_row["chain_id"]).partition("#")[0]  # <instance>/w<N>#<random>
    assert chain_name == f"{taker['instance']}/{taker['worker']}"


def test_a_second_connection_on_another_worker_of_the_same_instance_takes_over(
    three: Cluster, harness: Harness, make_device: DeviceFactory
) -> None:
    """Straight to one instance (an untrusted source sends no PROXY header): SO_REUSEPORT
    spreads connections over its two workers; a pair that lands on both is taken over
    through PostgreSQL, exactly like a pair on two instances."""
    instance = three.instances[1]
    device = make_device("workers", fleet="bench")
    chains: set[tuple[str, str]] = set()
    for attempt in range(16):
        first, first_peer = open_client(instance.port, device, source=_source(70))
        second, second_peer = open_client(instance.port, device, source=_source(71))
        try:
            assert _cut_within(first, 0x8E) < CUT_WITHIN
            assert _alive(second)
        finally:
            with_disconnect(second)
            first.close()
        old = _connect_event(harness, device, first_peer)["chain_id"].partition("#")[0]
        new = _connect_event(harness, device, second_peer)["chain_id"].partition("#")[0]
        ended = _wait(lambda: _ends(harness, device, first_peer), bool)  # noqa: B023
        assert [r["reason"] for r in ended] == ["session_taken_over"], attempt
        taker = _detail(ended[0])["taken_over_by"]
        assert f"{taker['instance']}/{taker['worker']}" == new
        chains.add((old, new))
        if old != new:
            break
    assert any(old != new for old, new in chains), chains


def test_a_killed_instance_leaves_the_others_serving(
    three: Cluster, harness: Harness, make_device: DeviceFactory
) -> None:
    devices = [make_device(f"kill{i}", fleet="bench") for i in range(6)]
    clients = [open_client(three.port, d, source=_source(40 + i)) for i, d in enumerate(devices)]
    try:
        where = [
            _connect_event(harness, device, peer)["instance"]
            for device, (_, peer) in zip(devices, clients, strict=True)
        ]
        victim = three.by_name(where[0])
        assert set(three.server_status().values()) == {"UP"}
        victim.kill()
        killed = time.monotonic()
        three.stopped.append(victim)
        survivors = {i.name for i in three.instances} - {victim.name}
        for i, (client, _) in enumerate(clients):
            if where[i] == victim.name:
                assert client.closed(timeout=3)  # HAProxy passes the close on
                client.close()
                # ... and the device reconnects through HAProxy to a live instance.
                deadline = time.monotonic() + 5
                while True:
                    try:
                        clients[i] = open_client(three.port, devices[i], source=_source(50 + i))
                        break
                    except (OSError, ConnectionError, AssertionError):
                        assert time.monotonic() < deadline, "no reconnection"
                        time.sleep(0.2)
                row = _connect_event(harness, devices[i], clients[i][1])
                assert row["instance"] in survivors
            else:
                assert _alive(client)  # untouched
        for client, _ in clients:
            assert _alive(client)
        # HAProxy's checks (every 200 ms, fall 2) took the dead instance out.
        status = _wait(three.server_status, lambda s: s[victim.name].startswith("DOWN"), 3)
        assert status[victim.name].startswith("DOWN"), status
        assert time.monotonic() - killed < 3
        assert all(status[name] == "UP" for name in survivors), status
        for i in range(4):  # new devices are spread over the survivors only
            device = make_device(f"after{i}", fleet="bench")
            client, peer = open_client(three.port, device, source=_source(60 + i))
            clients.append((client, peer))
            assert _connect_event(harness, device, peer)["instance"] in survivors
    finally:
        for client, _ in clients:
            with_disconnect(client)


def with_disconnect(client: RawClient) -> None:
    with contextlib.suppress(OSError):
        client.send(Disconnect())
    client.close()


def test_every_instance_chain_verifies(three: Cluster, database_url: str) -> None:
    async def verify() -> dict[str, tuple[int, int]]:
        conn = await asyncpg.connect(database_url)
        try:
            chains = [
                row["chain_id"]
                for row in await conn.fetch(
                    "SELECT DISTINCT chain_id FROM auth_events WHERE instance = ANY($1::text[])",
                    [i.name for i in three.instances],
                )
            ]
            found = {}
            for chain in chains:
                report = await verify_chains(conn, chain_id=chain)
                found[chain] = (report.events, report.findings_total)
            return found
        finally:
            await conn.close()

    found = asyncio.run(verify())
    # Every instance (the killed one too: what it shipped) and both workers of the others.
    assert {chain.rpartition("/")[0] for chain in found} == {i.name for i in three.instances}
    assert len(found) >= 5, found
    assert all(findings == 0 for _, findings in found.values()), found
