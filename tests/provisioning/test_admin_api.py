"""The admin API: bearer keys, tokens, devices, certificates, revocation + CRL, events."""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

import aiohttp
import asyncpg
import pytest
from cryptography import x509

from provisioning import admin as admin_ops
from schemas.notify import REVOCATION_CHANNEL
from tests.conftest import Pki
from tests.provisioning.conftest import (
    INSTANCE,
    Server,
    both_signers,
    last_event,
    make_token,
    new_fleet,
    some_csr,
)


async def call(
    http: aiohttp.ClientSession,
    server: Server,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> tuple[int, Any]:
    async with http.request(method, f"{server.url}{path}", headers=headers, **kwargs) as response:
        return response.status, await response.json(content_type=None)


async def enroll(
    http: aiohttp.ClientSession, server: Server, db: asyncpg.Connection, fleet: str
) -> dict:
    token, _ = await make_token(db, fleet=fleet)
    status, bundle = await call(
        http, server, "POST", "/v1/enroll", json={"token": token, "csr": some_csr()}
    )
    assert status == 201
    return bundle


@pytest.mark.parametrize(
    "path", ["/v1/tokens", "/v1/devices", "/v1/certificates", "/v1/events", "/v1/devices/x"]
)
async def test_admin_endpoints_refuse_missing_and_wrong_keys(
    path: str, http: aiohttp.ClientSession, server: Server, db: asyncpg.Connection
) -> None:
    revoked = await admin_ops.create_admin_key(db, f"gone-{path}", actor="cli", instance=INSTANCE)
    await admin_ops.revoke_admin_key(db, revoked.name, actor="cli", instance=INSTANCE)
    for headers in (
        None,
        {"Authorization": "Bearer dgk_" + "x" * 43},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": f"Bearer {revoked.key}"},
    ):
        async with http.get(f"{server.url}{path}", headers=headers) as response:
            assert response.status == 401
            assert response.content_type == "application/problem+json"
            problem = await response.json(content_type=None)
        assert problem["reason"] == "unauthorized" and problem["status"] == 401


async def test_tokens_api(
    http: aiohttp.ClientSession, server: Server, admin_headers: dict, db: asyncpg.Connection
) -> None:
    fleet = new_fleet("api")
    status, created = await call(
        http,
        server,
        "POST",
        "/v1/tokens",
        admin_headers,
        json={"fleet": fleet, "uses": 5, "ttl": "2h", "note": "batch 7"},
    )
    assert status == 201 and created["token"].startswith("dgt_")
    assert (created["uses_left"], created["state"], created["note"]) == (5, "active", "batch 7")
    status, listed = await call(http, server, "GET", f"/v1/tokens?fleet={fleet}", admin_headers)
    assert status == 200 and [t["id"] for t in listed] == [created["id"]]
    assert "token" not in listed[0] and created["token"] not in json.dumps(listed)
    status, revoked = await call(
        http, server, "POST", f"/v1/tokens/{created['id']}/revoke", admin_headers
    )
    assert status == 200 and revoked["state"] == "revoked"
    status, shown = await call(http, server, "GET", f"/v1/tokens/{created['id']}", admin_headers)
    assert shown["state"] == "revoked"
    event = await last_event(db, type="token", fleet=fleet)
    assert json.loads(event["detail"]) == {
        "action": "revoke",
        "actor": "tests",
        "token_id": created["id"],
    }
    status, problem = await call(
        http, server, "POST", "/v1/tokens", admin_headers, json={"fleet": "Bad Fleet!"}
    )
    assert (status, problem["reason"]) == (400, "request_invalid")
    status, problem = await call(
        http, server, "GET", "/v1/tokens/00000000-0000-0000-0000-000000000000", admin_headers
    )
    assert (status, problem["reason"]) == (404, "not_found")


@both_signers
async def test_device_lifecycle_revocation_and_crl(
    http: aiohttp.ClientSession,
    server: Server,
    admin_headers: dict,
    db: asyncpg.Connection,
    database_url: str,
    pki: Pki,
) -> None:
    fleet = new_fleet("life")
    bundle = await enroll(http, server, db, fleet)
    device_id, serial = bundle["device_id"], bundle["serial"]

    status, devices = await call(http, server, "GET", f"/v1/devices?fleet={fleet}", admin_headers)
    assert status == 200 and [d["device_id"] for d in devices] == [device_id]
    status, detail = await call(http, server, "GET", f"/v1/devices/{device_id}", admin_headers)
    assert [c["serial"] for c in detail["certificates"]] == [serial]

    listener = await asyncpg.connect(database_url)
    notices: asyncio.Queue[dict] = asyncio.Queue()
    await listener.add_listener(
        REVOCATION_CHANNEL, lambda *args: notices.put_nowait(json.loads(args[3]))
    )
    try:
        for action, expected in (("disable", "disabled"), ("enable", "active")):
            status, body = await call(
                http, server, "POST", f"/v1/devices/{device_id}/{action}", admin_headers
            )
            assert (status, body["status"]) == (200, expected)
            assert await asyncio.wait_for(notices.get(), 5) == {
                "kind": "device",
                "device_id": device_id,
                "serial": None,
                "status": expected,
            }
            event = await last_event(db, device_id=device_id, type=f"device_{action}")
            assert (event["reason"], json.loads(event["detail"])["actor"]) == (
                "admin_action",
                "tests",
            )
        status, body = await call(
            http, server, "POST", f"/v1/devices/{device_id}/revoke", admin_headers
        )
        assert (status, body["status"]) == (200, "revoked")
        received = [await asyncio.wait_for(notices.get(), 5) for _ in range(2)]
    finally:
        await listener.close()
    assert received == [
        {"kind": "device", "device_id": device_id, "serial": None, "status": "revoked"},
        {"kind": "certificate", "device_id": device_id, "serial": serial, "status": "revoked"},
    ]
    assert (
        await db.fetchval("SELECT status FROM certificates WHERE serial = $1", serial) == "revoked"
    )
    event = await last_event(db, device_id=device_id, type="revoke")
    assert json.loads(event["detail"])["revoked_serials"] == [serial]

    status, problem = await call(
        http, server, "POST", f"/v1/devices/{device_id}/enable", admin_headers
    )
    assert (status, problem["reason"]) == (409, "conflict")

    # The CRL shows the revoked serial at once, as openssl reads it.
    crl_der = subprocess.run(
        ["curl", "-sS", "--cacert", str(pki.chain), f"{server.url}/v1/crl"],
        check=True,
        capture_output=True,
        timeout=20,
    ).stdout
    text = subprocess.run(
        ["openssl", "crl", "-inform", "DER", "-text", "-noout"],
        input=crl_der,
        check=True,
        capture_output=True,
        timeout=20,
    ).stdout.decode()
    assert f"Serial Number: {serial.upper().zfill(len(serial) + len(serial) % 2)}" in text
    crl = x509.load_der_x509_crl(crl_der)
    assert crl.is_signature_valid(pki.ca.issuing.public_key())
    assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None

    async with http.get(f"{server.url}/v1/crl?format=pem") as response:
        assert response.content_type == "application/x-pem-file"
        pem = await response.read()
    async with http.get(
        f"{server.url}/v1/crl", headers={"Accept": "application/x-pem-file"}
    ) as response:
        assert (await response.read()).startswith(b"-----BEGIN X509 CRL-----")
    assert x509.load_pem_x509_crl(pem).get_revoked_certificate_by_serial_number(int(serial, 16))


@both_signers
async def test_certificate_revoke_and_lists(
    http: aiohttp.ClientSession,
    server: Server,
    admin_headers: dict,
    db: asyncpg.Connection,
) -> None:
    bundle = await enroll(http, server, db, new_fleet("cert"))
    serial = bundle["serial"]
    status, body = await call(
        http, server, "POST", f"/v1/certificates/{serial}/revoke", admin_headers
    )
    assert (status, body["status"]) == (200, "revoked") and body["revoked_at"]
    status, again = await call(
        http, server, "POST", f"/v1/certificates/{serial}/revoke", admin_headers
    )
    assert (status, again["revoked_at"]) == (200, body["revoked_at"])  # idempotent
    assert (
        await db.fetchval(
            "SELECT count(*) FROM auth_events WHERE type = 'revoke' AND cert_serial = $1", serial
        )
        == 1
    )
    status, listed = await call(
        http, server, "GET", f"/v1/certificates?device={bundle['device_id']}", admin_headers
    )
    assert [(c["serial"], c["status"]) for c in listed] == [(serial, "revoked")]
    status, problem = await call(
        http, server, "POST", "/v1/certificates/abc123/revoke", admin_headers
    )
    assert (status, problem["reason"]) == (404, "not_found")
    assert (await call(http, server, "GET", "/v1/certificates?status=bogus", admin_headers))[
        0
    ] == 400


async def test_events_pagination_and_filters(
    http: aiohttp.ClientSession,
    server: Server,
    admin_headers: dict,
    db: asyncpg.Connection,
) -> None:
    fleet = new_fleet("ev")
    token, _ = await make_token(db, fleet=fleet, uses=5)
    device_ids = []
    for _ in range(5):
        status, bundle = await call(
            http, server, "POST", "/v1/enroll", json={"token": token, "csr": some_csr()}
        )
        device_ids.append(bundle["device_id"])
    await call(http, server, "POST", "/v1/enroll", json={"token": token, "csr": some_csr()})

    seen: list[str] = []
    cursor = None
    while True:
        query = "type=enroll&outcome=allowed&since=10m&limit=2" + (
            f"&cursor={cursor}" if cursor else ""
        )
        status, page = await call(http, server, "GET", f"/v1/events?{query}", admin_headers)
        assert status == 200
        seen += [e["device_id"] for e in page["events"] if e["fleet"] == fleet]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(device_ids))

    status, page = await call(
        http, server, "GET", f"/v1/events?device={device_ids[0]}", admin_headers
    )
    assert [e["type"] for e in page["events"]] == ["enroll"]
    assert page["events"][0]["hash"] and page["events"][0]["chain_id"] == "provisioning"
    status, page = await call(
        http,
        server,
        "GET",
        "/v1/events?reason=token_exhausted&peer=127.0.0.1&limit=1000",
        admin_headers,
    )
    assert any(e["fleet"] == fleet for e in page["events"])
    assert all(e["reason"] == "token_exhausted" for e in page["events"])
    status, page = await call(
        http, server, "GET", "/v1/events?until=2000-01-01T00:00:00Z", admin_headers
    )
    assert page == {"events": [], "next_cursor": None}
    for bad in ("cursor=nope", "type=bogus", "limit=0", "since=yesterday"):
        status, problem = await call(http, server, "GET", f"/v1/events?{bad}", admin_headers)
        assert (status, problem["reason"]) == (400, "request_invalid"), bad


async def test_openapi_health_and_unknown_routes(
    http: aiohttp.ClientSession, server: Server
) -> None:
    status, document = await call(http, server, "GET", "/openapi.json")
    assert status == 200 and document["openapi"] == "3.1.0"
    assert {
        "/v1/enroll",
        "/v1/renew",
        "/v1/crl",
        "/v1/events",
        "/.well-known/est/simpleenroll",
    } <= set(document["paths"])
    schemas = document["components"]["schemas"]
    for name in ("CertificateBundle", "EnrollRequest", "Problem", "EventPage", "AuthEvent"):
        assert name in schemas
    refs = {m for m in json.dumps(document).split('"') if m.startswith("#/components/schemas/")}
    assert {ref.rsplit("/", 1)[1] for ref in refs} <= set(schemas)
    assert (await call(http, server, "GET", "/healthz"))[0] == 200
    status, ready = await call(http, server, "GET", "/readyz")
    assert (status, ready["checks"]) == (200, {"ca": True, "database": True, "schema": True})
    status, problem = await call(http, server, "GET", "/nope")
    assert (status, problem["reason"]) == (404, "not_found")
    status, problem = await call(http, server, "GET", "/v1/enroll")
    assert (status, problem["reason"]) == (405, "method_not_allowed")
