"""Bootstrap tokens and enrollment over the real HTTPS listener."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import uuid

import aiohttp
import asyncpg
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from provisioning.pki.ca import fingerprint
from schemas.events import GENESIS_HASH, AuthEvent, chain_hash
from tests.conftest import Pki
from tests.provisioning.conftest import (
    Server,
    both_signers,
    last_event,
    make_token,
    new_fleet,
    some_csr,
    uses_left,
)


async def post_enroll(
    http: aiohttp.ClientSession, server: Server, token: str, hardware_id: str | None = None
) -> tuple[int, dict]:
    body = {"token": token, "csr": some_csr()}
    if hardware_id is not None:
        body["hardware_id"] = hardware_id
    async with http.post(f"{server.url}/v1/enroll", json=body) as response:
        return response.status, await response.json(content_type=None)


@both_signers
async def test_enroll_issues_identity_and_records_everything(
    http: aiohttp.ClientSession, server: Server, db: asyncpg.Connection, pki: Pki
) -> None:
    fleet = new_fleet("line")
    token, token_id = await make_token(db, fleet=fleet, uses=2)

    status, bundle = await post_enroll(http, server, token, hardware_id=f"hw-{fleet}")

    assert status == 201, bundle
    device_id = bundle["device_id"]
    assert device_id.startswith(f"{fleet}-") and len(device_id) == len(fleet) + 13
    cert = x509.load_pem_x509_certificate(bundle["certificate"].encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://devicegate.local/fleet/{fleet}/device/{device_id}"
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert.verify_directly_issued_by(pki.ca.issuing)
    assert bundle["chain"] == pki.chain.read_text()
    assert bundle["serial"] == format(cert.serial_number, "x")

    device = await db.fetchrow("SELECT * FROM devices WHERE device_id = $1", device_id)
    assert (device["fleet"], device["hardware_id"], device["status"]) == (
        fleet,
        f"hw-{fleet}",
        "active",
    )
    assert str(device["token_id"]) == token_id
    row = await db.fetchrow("SELECT * FROM certificates WHERE serial = $1", bundle["serial"])
    assert row["status"] == "active" and row["fingerprint_sha256"] == fingerprint(cert)
    assert row["key_type"] == "ec-p256"
    assert await uses_left(db, token_id) == 1

    event = await last_event(db, device_id=device_id, type="enroll")
    assert (event["outcome"], event["reason"], event["chain_id"]) == (
        "allowed",
        "ok",
        "provisioning",
    )
    assert event["cert_serial"] == bundle["serial"]
    assert event["peer_address"] == "127.0.0.1"
    assert event["tls_version"] in ("TLSv1.2", "TLSv1.3")


async def test_provisioning_chain_verifies(db: asyncpg.Connection) -> None:
    rows = await db.fetch("SELECT * FROM auth_events WHERE chain_id = 'provisioning' ORDER BY seq")
    assert rows
    previous = GENESIS_HASH
    for expected_seq, row in enumerate(rows, start=1):
        values = dict(row)
        if isinstance(values["detail"], str):
            values["detail"] = json.loads(values["detail"])
        event = AuthEvent(**values)
        assert event.seq == expected_seq
        assert event.prev_hash == previous
        assert chain_hash(previous, event) == event.hash
        previous = event.hash
    head = await db.fetchrow("SELECT * FROM event_chains WHERE chain_id = 'provisioning'")
    assert (head["seq"], head["hash"]) == (len(rows), previous)


async def test_token_secret_is_only_stored_as_hash(
    db: asyncpg.Connection, database_url: str
) -> None:
    token, token_id = await make_token(db)
    assert token.startswith("dgt_") and len(token) >= 4 + 43
    dump = await db.fetch("SELECT * FROM bootstrap_tokens")
    text = repr([dict(row) for row in dump])
    assert token not in text and token[4:] not in text
    stored = await db.fetchval(
        "SELECT token_hash FROM bootstrap_tokens WHERE id = $1", uuid.UUID(token_id)
    )
    assert stored == hashlib.sha256(token.encode()).digest()
    dumped = subprocess.run(
        ["pg_dump", "--data-only", "--table=bootstrap_tokens", database_url],
        capture_output=True,
        check=True,
        timeout=30,
        text=True,
    ).stdout
    assert token_id in dumped  # the dump does hold the row...
    assert token not in dumped and token[4:] not in dumped  # ...but not the secret


async def test_refused_tokens(
    http: aiohttp.ClientSession, server: Server, db: asyncpg.Connection
) -> None:
    expired, expired_id = await make_token(db)
    await db.execute(
        "UPDATE bootstrap_tokens SET expires_at = now() - interval '1 second' WHERE id = $1",
        uuid.UUID(expired_id),
    )
    revoked, revoked_id = await make_token(db, uses=3)
    await db.execute(
        "UPDATE bootstrap_tokens SET revoked_at = now() WHERE id = $1", uuid.UUID(revoked_id)
    )
    once, once_id = await make_token(db, uses=1)
    assert (await post_enroll(http, server, once))[0] == 201

    cases = [
        (expired, "token_expired", expired_id, 1),
        (revoked, "token_revoked", revoked_id, 3),
        (once, "token_exhausted", once_id, 0),
        ("dgt_" + "A" * 43, "token_invalid", None, None),
        ("not-a-token", "token_invalid", None, None),
    ]
    for token, reason, token_id, left in cases:
        status, problem = await post_enroll(http, server, token)
        assert (status, problem["reason"]) == (401, reason), problem
        assert problem["status"] == 401 and problem["title"]
        if token_id is not None:
            assert await uses_left(db, token_id) == left
        event = await last_event(db, type="enroll", outcome="denied", reason=reason)
        assert event is not None and event["peer_address"] == "127.0.0.1"


async def test_token_expires_by_ttl(
    http: aiohttp.ClientSession, server: Server, db: asyncpg.Connection
) -> None:
    token, _ = await make_token(db, ttl="1s")
    await asyncio.sleep(1.1)
    status, problem = await post_enroll(http, server, token)
    assert (status, problem["reason"]) == (401, "token_expired")


@both_signers
@pytest.mark.parametrize("hardware_ids", [True, False], ids=["hardware-id", "no-hardware-id"])
async def test_concurrent_enrollments_spend_exactly_the_uses(
    hardware_ids: bool, server: Server, db: asyncpg.Connection, client_context
) -> None:
    # Both write paths: with a hardware id (a savepoint per item) and without (one statement).
    fleet = new_fleet("conc")
    token, token_id = await make_token(db, fleet=fleet, uses=10)

    async def one(index: int) -> tuple[int, str | None]:
        # A new connection per device, as on a factory line.
        connector = aiohttp.TCPConnector(ssl=client_context, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            hardware_id = f"{fleet}-{index}" if hardware_ids else None
            status, body = await post_enroll(session, server, token, hardware_id=hardware_id)
            return status, body.get("reason")

    results = await asyncio.gather(*(one(i) for i in range(40)))

    assert sorted(results, key=str).count((201, None)) == 10
    assert results.count((401, "token_exhausted")) == 30
    assert await uses_left(db, token_id) == 0
    assert await db.fetchval("SELECT count(*) FROM devices WHERE fleet = $1", fleet) == 10
    assert (
        await db.fetchval(
            "SELECT count(*) FROM certificates c JOIN devices d USING (device_id) "
            "WHERE d.fleet = $1",
            fleet,
        )
        == 10
    )
    assert (
        await db.fetchval(
            "SELECT count(*) FROM auth_events "
            "WHERE type = 'enroll' AND fleet = $1 AND outcome = 'allowed'",
            fleet,
        )
        == 10
    )
    assert (
        await db.fetchval(
            "SELECT count(*) FROM auth_events WHERE type = 'enroll' AND reason = 'token_exhausted' "
            "AND detail->>'token_id' = $1",
            token_id,
        )
        == 30
    )


@both_signers
async def test_hardware_id_taken_and_reenroll(
    http: aiohttp.ClientSession, server: Server, db: asyncpg.Connection
) -> None:
    fleet = new_fleet("re")
    hardware_id = f"hw-{fleet}"
    first, _ = await make_token(db, fleet=fleet, uses=2)
    status, original = await post_enroll(http, server, first, hardware_id=hardware_id)
    assert status == 201

    status, problem = await post_enroll(http, server, first, hardware_id=hardware_id)
    assert (status, problem["reason"]) == (409, "hardware_id_taken")

    other_fleet, _ = await make_token(db, allow_reenroll=True)
    status, problem = await post_enroll(http, server, other_fleet, hardware_id=hardware_id)
    assert (status, problem["reason"]) == (409, "hardware_id_taken")

    reenroll, reenroll_id = await make_token(db, fleet=fleet, allow_reenroll=True)
    status, again = await post_enroll(http, server, reenroll, hardware_id=hardware_id)
    assert status == 201, again
    assert again["device_id"] == original["device_id"]
    assert await uses_left(db, reenroll_id) == 0
    rows = await db.fetch(
        "SELECT serial, status, revocation_reason FROM certificates WHERE device_id = $1",
        original["device_id"],
    )
    states = {row["serial"]: (row["status"], row["revocation_reason"]) for row in rows}
    assert states == {
        original["serial"]: ("revoked", "reenrolled"),
        again["serial"]: ("active", None),
    }
    assert (
        await db.fetchval("SELECT count(*) FROM devices WHERE hardware_id = $1", hardware_id) == 1
    )
