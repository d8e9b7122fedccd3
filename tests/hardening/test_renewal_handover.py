"""A renewal hands a live session over: `session_superseded`, allowed (issue 21).

A device connected through the gateway (with its live revocation listener) renews over
the real provisioning API (``POST /v1/renew``, mutual TLS with its current certificate).
Renewal supersedes the old certificate; the gateway cuts the session on it (DISCONNECT
0x98 on MQTT 5) and records that as ``session_superseded``, outcome ``allowed``, reason
``certificate_superseded``: not a denial. The device then connects with its new
certificate; the old one is refused (``connect`` denied). A real revocation of the new
certificate still ends its session as ``session_revoked``, denied.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from gateway.mqtt import Disconnect
from provisioning import admin
from provisioning.agent import device as agent
from tests.conftest import Pki
from tests.gateway.clients import RawClient
from tests.gateway.conftest import Device, DeviceFactory, Harness
from tests.gateway.live import Live, live_gateway, provision
from tests.provisioning.conftest import Server

CUT_WITHIN = 5.0


@pytest.fixture(scope="module")
def live(harness: Harness) -> Iterator[Live]:
    with live_gateway(harness) as running:
        yield running


def _agent_directory(device: Device, pki: Pki, directory: Path) -> Path:
    """The device's files where the agent keeps them (device.crt, device.key, chain.pem)."""
    directory.mkdir(mode=0o700)
    shutil.copy(device.cert, directory / agent.CERT_FILE)
    shutil.copy(device.key, directory / agent.KEY_FILE)
    shutil.copy(pki.chain, directory / agent.CHAIN_FILE)
    return directory


def _renewed(device: Device, directory: Path) -> Device:
    cert = x509.load_pem_x509_certificate((directory / agent.CERT_FILE).read_bytes())
    return Device(
        device_id=device.device_id, fleet=device.fleet, cert=directory / agent.CERT_FILE,
        key=directory / agent.KEY_FILE, chain=directory / agent.CHAIN_FILE,
        serial=format(cert.serial_number, "x"), fingerprint="",
    )  # fmt: skip


def _cut(client: RawClient) -> None:
    assert client.recv(timeout=CUT_WITHIN) == Disconnect(reason_code=0x98)
    assert client.closed(timeout=CUT_WITHIN)


def test_a_renewal_hands_the_live_session_over_allowed(
    harness: Harness,
    live: Live,
    make_device: DeviceFactory,
    server: Server,
    pki: Pki,
    tmp_path: Path,
) -> None:
    old = make_device("handover")
    directory = _agent_directory(old, pki, tmp_path / "agent")
    mark = harness.mark()
    with RawClient(live.port, old, old.chain, version=5) as client:
        assert client.connect(old.device_id).reason_code == 0
        started = time.monotonic()
        asyncio.run(agent.renew(url=server.url, directory=directory, ca_cert=pki.chain))
        _cut(client)
        assert time.monotonic() - started < CUT_WITHIN + 5
    new = _renewed(old, directory)
    assert new.serial != old.serial
    with RawClient(live.port, new, new.chain, version=5) as client:
        assert client.connect(new.device_id).reason_code == 0
        harness.wait_events(
            after=mark, device_id=old.device_id, type="connect", reason="ok", count=2
        )
        provision(harness, admin.revoke_certificate, new.serial)  # a real revocation
        _cut(client)
    with RawClient(live.port, old, old.chain, version=5) as client:
        assert client.connect(old.device_id).reason_code == 0x87
    harness.wait_events(after=mark, device_id=old.device_id, type="session_revoked")
    rows = harness.wait_events(
        after=mark, device_id=old.device_id, reason="certificate_superseded", type="connect"
    )
    rows = [
        r for r in harness.events(mark, device_id=old.device_id)
        if r["type"] != "renew" and r["reason"] != "connection_lost"
    ]  # fmt: skip
    assert [(r["type"], r["outcome"], r["reason"], r["cert_serial"]) for r in rows] == [
        ("connect", "allowed", "ok", old.serial),
        ("session_superseded", "allowed", "certificate_superseded", old.serial),
        ("connect", "allowed", "ok", new.serial),
        ("session_revoked", "denied", "certificate_revoked", new.serial),
        ("connect", "denied", "certificate_superseded", old.serial),
    ]
