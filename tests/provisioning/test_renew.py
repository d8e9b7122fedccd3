"""Renewal over mutual TLS: supersession, NOTIFY, the grace window, refusals."""

from __future__ import annotations

import asyncio
import json
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning.agent import device
from provisioning.agent.device import generate_key, key_pem
from provisioning.pki.ca import DeviceIdentity, SignOptions, fingerprint, serial_hex, to_pem
from schemas.notify import REVOCATION_CHANNEL
from tests.conftest import Pki
from tests.provisioning.conftest import (
    Server,
    both_signers,
    device_context,
    last_event,
    make_token,
    new_fleet,
    some_csr,
)


async def enrolled(db: asyncpg.Connection, server: Server, pki: Pki, directory: Path) -> str:
    """Enroll a device with the device-side code; returns its id."""
    token, _ = await make_token(db, fleet=new_fleet("rn"))
    bundle = await device.enroll(url=server.url, token=token, out_dir=directory, ca_cert=pki.chain)
    return bundle.device_id


async def post_renew(
    pki: Pki, server: Server, cert: Path | None, key: Path | None
) -> tuple[int, dict]:
    if cert is None or key is None:
        context = ssl.create_default_context(cafile=str(pki.chain))
    else:
        context = device_context(pki, cert, key)
    connector = aiohttp.TCPConnector(ssl=context, force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(f"{server.url}/v1/renew", json={"csr": some_csr()}) as response,
    ):
        return response.status, await response.json(content_type=None)


@both_signers
async def test_renew_supersedes_and_notifies(
    server: Server, pki: Pki, db: asyncpg.Connection, database_url: str, tmp_path: Path
) -> None:
    device_id = await enrolled(db, server, pki, tmp_path)
    old = x509.load_pem_x509_certificate((tmp_path / "device.crt").read_bytes())
    old_key = (tmp_path / "device.key").read_bytes()

    listener = await asyncpg.connect(database_url)
    notices: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener(REVOCATION_CHANNEL, lambda *args: notices.put_nowait(args[3]))
    try:
        bundle = await device.renew(url=server.url, directory=tmp_path)
        notice = json.loads(await asyncio.wait_for(notices.get(), 5))
    finally:
        await listener.close()

    assert bundle.device_id == device_id
    assert notice == {
        "kind": "certificate",
        "device_id": device_id,
        "serial": serial_hex(old.serial_number),
        "status": "superseded",
    }
    assert (tmp_path / "device.key").read_bytes() != old_key
    assert not (tmp_path / "device.key.next").exists()
    assert (tmp_path / "device.key").stat().st_mode & 0o777 == 0o600
    new = x509.load_pem_x509_certificate((tmp_path / "device.crt").read_bytes())
    new_key = serialization.load_pem_private_key((tmp_path / "device.key").read_bytes(), None)
    assert isinstance(new_key, ec.EllipticCurvePrivateKey)  # the files on disk belong together
    assert new_key.public_key() == new.public_key()
    rows = await db.fetch("SELECT serial, status FROM certificates WHERE device_id = $1", device_id)
    assert {r["serial"]: r["status"] for r in rows} == {
        serial_hex(old.serial_number): "superseded",
        bundle.serial: "active",
    }
    event = await last_event(db, type="renew", device_id=device_id)
    assert (event["outcome"], event["reason"], event["cert_serial"]) == (
        "allowed",
        "ok",
        bundle.serial,
    )

    # The superseded certificate cannot renew again.
    old_cert, old_key_file = tmp_path / "old.crt", tmp_path / "old.key"
    old_cert.write_text(to_pem(old))
    old_key_file.write_bytes(old_key)
    status, problem = await post_renew(pki, server, old_cert, old_key_file)
    assert (status, problem["reason"]) == (403, "certificate_superseded")
    # ... and its refusal names the certificate that was presented.
    refused = await last_event(db, type="renew", reason="certificate_superseded")
    assert (refused["device_id"], refused["tls_version"]) == (device_id, "TLSv1.3")
    assert refused["cert_serial"] == serial_hex(old.serial_number)
    assert refused["cert_fingerprint"] == fingerprint(old)
    assert json.loads(refused["detail"])["presented"] == {
        "subject": old.subject.rfc4514_string(),
        "issuer": pki.ca.issuing.subject.rfc4514_string(),
        "serial": serial_hex(old.serial_number),
        "fingerprint": fingerprint(old),
        "not_before": old.not_valid_before_utc.isoformat().replace("+00:00", "Z"),
        "not_after": old.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
    }


async def _insert_backdated(
    db: asyncpg.Connection, pki: Pki, device_id: str, fleet: str, directory: Path, age: timedelta
) -> tuple[Path, Path, str]:
    """A certificate for ``device_id`` whose notAfter lies ``age`` in the past, made with the CA
    code and recorded as the device's active certificate."""
    key = generate_key()
    now = datetime.now(UTC)
    options = SignOptions(not_before=now - age - timedelta(days=30), not_after=now - age)
    cert = pki.ca.issue_device_certificate(
        key.public_key(), DeviceIdentity(device_id, fleet, "devicegate.local"), options
    )
    await db.execute(
        """INSERT INTO certificates (serial, device_id, fingerprint_sha256, not_before, not_after,
               key_type, pem) VALUES ($1, $2, $3, $4, $5, 'ec-p256', $6)""",
        serial_hex(cert.serial_number),
        device_id,
        fingerprint(cert),
        cert.not_valid_before_utc,
        cert.not_valid_after_utc,
        to_pem(cert),
    )
    cert_file, key_file = directory / f"{age.days}.crt", directory / f"{age.days}.key"
    cert_file.write_text(to_pem(cert))
    key_file.write_bytes(key_pem(key))
    return cert_file, key_file, serial_hex(cert.serial_number)


@pytest.mark.parametrize(
    ("age", "status", "reason"),
    [
        (timedelta(days=6), 201, None),
        (timedelta(days=8), 403, "renewal_window_closed"),
    ],
)
@both_signers
async def test_grace_window(
    age: timedelta,
    status: int,
    reason: str | None,
    server: Server,
    pki: Pki,
    db: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    device_id = await enrolled(db, server, pki, tmp_path)
    fleet = await db.fetchval("SELECT fleet FROM devices WHERE device_id = $1", device_id)
    cert, key, serial = await _insert_backdated(db, pki, device_id, fleet, tmp_path, age)
    got, body = await post_renew(pki, server, cert, key)
    assert got == status, body
    if reason is None:
        assert body["device_id"] == device_id
        assert await db.fetchval("SELECT status FROM certificates WHERE serial = $1", serial) == (
            "superseded"
        )
    else:
        assert body["reason"] == reason
        assert await db.fetchval("SELECT status FROM certificates WHERE serial = $1", serial) == (
            "active"
        )
        event = await last_event(db, type="renew", device_id=device_id, reason=reason)
        assert event["outcome"] == "denied" and event["cert_serial"] == serial


@both_signers
async def test_revoked_and_disabled_never_renew(
    server: Server, pki: Pki, db: asyncpg.Connection, tmp_path: Path, admin_headers: dict
) -> None:
    device_id = await enrolled(db, server, pki, tmp_path)
    cert, key = tmp_path / "device.crt", tmp_path / "device.key"
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=str(pki.chain)))
    ) as admin:
        async with admin.post(
            f"{server.url}/v1/devices/{device_id}/disable", headers=admin_headers
        ) as response:
            assert response.status == 200
        status, problem = await post_renew(pki, server, cert, key)
        assert (status, problem["reason"]) == (403, "device_disabled")
        async with admin.post(
            f"{server.url}/v1/devices/{device_id}/enable", headers=admin_headers
        ) as response:
            assert response.status == 200
        serial = await db.fetchval(
            "SELECT serial FROM certificates WHERE device_id = $1", device_id
        )
        async with admin.post(
            f"{server.url}/v1/certificates/{serial}/revoke", headers=admin_headers
        ) as response:
            assert response.status == 200
    status, problem = await post_renew(pki, server, cert, key)
    assert (status, problem["reason"]) == (403, "certificate_revoked")
    assert (
        await db.fetchval("SELECT count(*) FROM certificates WHERE device_id = $1", device_id) == 1
    )


async def test_renew_without_client_certificate(server: Server, pki: Pki) -> None:
    status, problem = await post_renew(pki, server, None, None)
    assert (status, problem["reason"]) == (401, "no_client_certificate")


async def test_device_side_refusal_keeps_files(
    server: Server, pki: Pki, db: asyncpg.Connection, tmp_path: Path
) -> None:
    device_id = await enrolled(db, server, pki, tmp_path)
    await db.execute(
        "UPDATE certificates SET status = 'revoked', revoked_at = now() WHERE device_id = $1",
        device_id,
    )
    before = {name: (tmp_path / name).read_bytes() for name in ("device.key", "device.crt")}
    with pytest.raises(device.EnrollmentError) as caught:
        await device.renew(url=server.url, directory=tmp_path)
    assert caught.value.status == 403 and caught.value.reason == "certificate_revoked"
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert not (tmp_path / "device.key.next").exists()
