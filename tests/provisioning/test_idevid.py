"""Enrollment by manufacturer certificate (IDevID) against the real service, with curl and
openssl as the device; manufacturer trust and manifests through the real ``devicegate``."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AttributeOID, ExtensionOID, NameOID

from gateway import _tlsext
from provisioning.enrollment.idevid import EXPORTER_LABEL, device_id_for
from provisioning.pki.ca import fingerprint
from schemas.settings import Settings
from tests.conftest import Pki
from tests.helpers import free_port, provisioning_server
from tests.provisioning.conftest import Server, new_fleet, some_csr
from tests.provisioning.manufacturer import Idevid, Manufacturer
from tests.provisioning.test_cli import cli
from tests.provisioning.test_est import curl, openssl_csr, pkcs7_certs
from tests.provisioning.test_pkcs11_tls_key import MODULE, Token, make_token

EST = "/.well-known/est"


async def acli(env: dict[str, str], *args: str, code: int = 0) -> str:
    """`cli` off the event loop (the command runs its own)."""
    return await asyncio.to_thread(cli, env, *args, code=code)


async def trust(
    env: dict[str, str], fleet: str, mfr: Manufacturer, *flags: str, code: int = 0
) -> str:
    args = ["fleet", "trust-manufacturer", "--fleet", fleet, "--ca", str(mfr.root_path)]
    if mfr.intermediate_path is not None:
        args += ["--intermediate", str(mfr.intermediate_path)]
    return await acli(env, *args, *flags, code=code)


def est_enroll(
    server: Server, pki: Pki, idevid: Idevid | None, csr: Path
) -> tuple[int, dict[str, str], bytes]:
    credentials = ["--cert", str(idevid.cert), "--key", str(idevid.key)] if idevid else []
    return curl(
        server, pki, f"{EST}/simpleenroll", *credentials,
        "--data-binary", f"@{csr}", "-H", "Content-Type: application/pkcs10",
    )  # fmt: skip


async def aest(
    server: Server, pki: Pki, idevid: Idevid | None, csr: Path
) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(est_enroll, server, pki, idevid, csr)


def bound_csr(directory: Path, name: str, challenge: str) -> Path:
    """A base64 DER CSR whose challengePassword is ``challenge`` (as a device would put the
    tls-exporter value there)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge.encode())
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.b64"
    path.write_bytes(base64.encodebytes(csr.public_bytes(serialization.Encoding.DER)))
    return path


async def events(db: asyncpg.Connection, **where: str) -> list[asyncpg.Record]:
    clauses = " AND ".join(f"{key} = ${i}" for i, key in enumerate(where, start=1))
    return await db.fetch(
        f"SELECT * FROM auth_events WHERE {clauses} ORDER BY time, seq", *where.values()
    )


async def test_est_enrollment_by_idevid_and_reenrollment(
    env: dict[str, str], server: Server, pki: Pki, settings: Settings, db: asyncpg.Connection,
    tmp_path: Path,
) -> None:  # fmt: skip
    fleet = new_fleet("idv")
    mfr = Manufacturer(tmp_path / "mfr")
    await trust(env, fleet, mfr)
    idevid = mfr.idevid()
    device_id = device_id_for(fleet, idevid.spki)

    key, csr = openssl_csr(tmp_path, "op1")
    status, headers, body = await aest(server, pki, idevid, csr)
    assert status == 200, body
    assert headers["content-type"].startswith("application/pkcs7-mime")
    (first,) = pkcs7_certs(body)
    # devicegate's identity, not the manufacturer's: CN = device id, the SPIFFE SAN, our CA.
    assert first.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id
    san = first.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{settings.trust_domain}/fleet/{fleet}/device/{device_id}"
    ]
    first.verify_directly_issued_by(pki.ca.issuing)
    operational = serialization.load_pem_private_key(key.read_bytes(), None)
    assert first.public_key() == operational.public_key()  # the CSR's key, not the IDevID's

    row = await db.fetchrow("SELECT * FROM device_idevids WHERE device_id = $1", device_id)
    assert (row["fleet"], row["serial"], row["spki_sha256"]) == (fleet, idevid.serial, idevid.spki)
    (allowed,) = await events(db, device_id=device_id, type="enroll")
    detail = json.loads(allowed["detail"])
    assert allowed["outcome"] == "allowed" and detail["via"] == "est"
    assert detail["idevid"]["serial"] == idevid.serial
    assert detail["idevid"]["issuer"] == mfr.signer.subject.rfc4514_string()
    assert detail["idevid"]["fingerprint"] == fingerprint(idevid.certificate)
    assert detail["channel_binding"] is False and detail["superseded"] == []

    # The same hardware again: the same device, the earlier certificate superseded.
    _, csr2 = openssl_csr(tmp_path, "op2")
    status, _, body = await aest(server, pki, idevid, csr2)
    assert status == 200, body
    (second,) = pkcs7_certs(body)
    assert second.subject == first.subject and second.serial_number != first.serial_number
    statuses = dict(
        await db.fetch("SELECT serial, status FROM certificates WHERE device_id = $1", device_id)
    )
    assert statuses == {
        format(first.serial_number, "x"): "superseded",
        format(second.serial_number, "x"): "active",
    }
    assert await db.fetchval("SELECT count(*) FROM devices WHERE device_id = $1", device_id) == 1
    last = (await events(db, device_id=device_id, type="enroll"))[-1]
    assert json.loads(last["detail"])["superseded"] == [format(first.serial_number, "x")]

    # A revoked device stays revoked: its IDevID cannot bring it back.
    await acli(env, "device", "revoke", device_id, "--yes")
    _, csr3 = openssl_csr(tmp_path, "op3")
    status, _, body = await aest(server, pki, idevid, csr3)
    assert (status, json.loads(body)["reason"]) == (403, "device_revoked")
    assert (
        await db.fetchval("SELECT count(*) FROM certificates WHERE device_id = $1", device_id) == 2
    )


async def test_refusals_are_recorded_and_issue_nothing(
    env: dict[str, str], server: Server, pki: Pki, db: asyncpg.Connection, tmp_path: Path
) -> None:
    fleet = new_fleet("idr")
    mfr = Manufacturer(tmp_path / "mfr")
    revoked = mfr.idevid()
    await trust(env, fleet, mfr, "--crl", str(mfr.crl(revoked)))
    listed_fleet = new_fleet("idl")
    strict = Manufacturer(tmp_path / "strict", name="strict", intermediate_ca=False)
    await trust(env, listed_fleet, strict, "--require-allowlist")
    listed, unlisted = strict.idevid(), strict.idevid()
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"serial,model,site\n{listed.serial},m1,lyon\n")
    await acli(env, "fleet", "import-manifest", "--fleet", listed_fleet, str(manifest))
    blocked = mfr.idevid()
    await acli(env, "idevid", "block", "--fleet", fleet, "--fingerprint", blocked.spki)

    cases = {
        "idevid_untrusted": Manufacturer(tmp_path / "other", name="other").idevid(),
        "idevid_blocked": blocked,
        "idevid_not_allowlisted": unlisted,
        "idevid_expired": mfr.idevid(not_after=datetime.now(UTC) - timedelta(days=1)),
        "channel_binding_mismatch": mfr.idevid(),
    }
    no_signature = mfr.idevid(digital_signature=False)
    wrong_binding = base64.b64encode(secrets.token_bytes(32)).decode()
    tried = [*cases.items(), ("idevid_blocked", revoked), ("idevid_untrusted", no_signature)]
    for reason, idevid in tried:
        if reason == "channel_binding_mismatch":
            csr = bound_csr(tmp_path, reason, wrong_binding)
        else:
            _, csr = openssl_csr(tmp_path, reason)
        status, headers, body = await aest(server, pki, idevid, csr)
        problem = json.loads(body)
        assert problem["reason"] == reason, (reason, problem)
        assert status in (401, 403)
        assert headers["content-type"] == "application/problem+json"
        (denied,) = await db.fetch(
            "SELECT * FROM auth_events WHERE type = 'enroll' AND cert_serial = $1", idevid.serial
        )
        assert (denied["outcome"], denied["reason"]) == ("denied", reason)
        assert json.loads(denied["detail"])["idevid"]["serial"] == idevid.serial
        assert denied["device_id"] is None or not await db.fetchval(
            "SELECT count(*) FROM certificates WHERE device_id = $1", denied["device_id"]
        )
        assert not await db.fetchval(
            "SELECT count(*) FROM device_idevids WHERE spki_sha256 = $1", idevid.spki
        )

    # The listed one enrolls; its manifest attributes are in the event and on the device,
    # where policies read them ({attr.site}).
    _, csr = openssl_csr(tmp_path, "listed")
    status, _, body = await aest(server, pki, listed, csr)
    assert status == 200, body
    listed_id = device_id_for(listed_fleet, listed.spki)
    (allowed,) = await events(db, device_id=listed_id)
    assert json.loads(allowed["detail"])["attributes"] == {"model": "m1", "site": "lyon"}
    stored = await db.fetch(
        "SELECT key, value FROM device_attributes WHERE device_id = $1 ORDER BY key", listed_id
    )
    assert [tuple(row) for row in stored] == [("model", "m1"), ("site", "lyon")]

    # Neither a token nor a certificate: the token refusal as before.
    _, csr = openssl_csr(tmp_path, "nothing")
    status, _, body = await aest(server, pki, None, csr)
    assert (status, json.loads(body)["reason"]) == (401, "token_invalid")


async def test_channel_binding_with_the_agent(
    env: dict[str, str], server: Server, pki: Pki, db: asyncpg.Connection, tmp_path: Path
) -> None:
    fleet = new_fleet("idc")
    mfr = Manufacturer(tmp_path / "mfr")
    await trust(env, fleet, mfr, "--require-channel-binding")
    idevid = mfr.idevid()
    common = [
        "enroll", "--url", server.url, "--idevid-cert", str(idevid.cert),
        "--idevid-key", str(idevid.key), "--ca-cert", str(pki.chain),
    ]  # fmt: skip
    out = tmp_path / "dev"
    enrolled = json.loads(await acli(env, *common, "--out", str(out), "--json"))
    assert enrolled["device_id"] == device_id_for(fleet, idevid.spki)
    assert (out / "device.key").stat().st_mode & 0o777 == 0o600
    (allowed,) = await events(db, device_id=enrolled["device_id"], type="enroll")
    assert json.loads(allowed["detail"])["channel_binding"] is True

    # Without the binding (curl cannot make one), the fleet refuses.
    _, csr = openssl_csr(tmp_path, "unbound")
    status, _, body = await aest(server, pki, idevid, csr)
    assert (status, json.loads(body)["reason"]) == (403, "channel_binding_mismatch")
    output = await acli(env, *common, "--out", str(tmp_path / "x"), "--no-channel-binding", code=1)
    assert "channel_binding_mismatch" in output
    # A binding of another connection (replayed CSR) is refused too.
    context = ssl.create_default_context(cafile=str(pki.chain))
    context.load_cert_chain(idevid.cert, idevid.key)
    with (
        socket.create_connection(("127.0.0.1", server.port)) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        other = _tlsext.export_keying_material(tls, EXPORTER_LABEL, 32, None)
    replayed = bound_csr(tmp_path, "replayed", base64.b64encode(other).decode())
    status, _, body = await aest(server, pki, idevid, replayed)
    assert (status, json.loads(body)["reason"]) == (403, "channel_binding_mismatch")
    assert (
        await db.fetchval(
            "SELECT count(*) FROM certificates WHERE device_id = $1", enrolled["device_id"]
        )
        == 1
    )


def test_export_keying_material_matches_openssl(pki: Pki) -> None:
    """The tls-exporter value the service and the agent compute is OpenSSL's own."""
    port = free_port()
    server = subprocess.Popen(
        [
            "openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-tls1_3", "-naccept", "1",
            "-cert", str(pki.directory / "server.crt"), "-key", str(pki.directory / "server.key"),
            "-keymatexport", EXPORTER_LABEL, "-keymatexportlen", "32",
        ],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        context = ssl.create_default_context(cafile=str(pki.chain))
        context.check_hostname = False
        for _ in range(100):
            try:
                raw = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except ConnectionRefusedError:
                time.sleep(0.05)
        with context.wrap_socket(raw) as tls:
            ours = _tlsext.export_keying_material(tls, EXPORTER_LABEL, 32, None)
            assert ours == _tlsext.export_keying_material(tls, EXPORTER_LABEL, 32, b"")  # 1.3
            assert ours == _tlsext.export_keying_material(tls._sslobj, EXPORTER_LABEL, 32, None)  # type: ignore[attr-defined]
        output, _ = server.communicate(timeout=10)
    finally:
        server.kill()
    assert f"Keying material: {ours.hex().upper()}" in output.decode()
    with pytest.raises(TypeError):
        _tlsext.export_keying_material(object(), EXPORTER_LABEL, 32, None)
    with pytest.raises(ValueError):
        _tlsext.export_keying_material(tls, EXPORTER_LABEL, 0, None)


async def test_twenty_concurrent_enrollments_make_one_device(
    env: dict[str, str], server: Server, pki: Pki, db: asyncpg.Connection, tmp_path: Path
) -> None:
    fleet = new_fleet("idx")
    mfr = Manufacturer(tmp_path / "mfr")
    await trust(env, fleet, mfr)
    idevid = mfr.idevid()
    context = ssl.create_default_context(cafile=str(pki.chain))
    context.load_cert_chain(idevid.cert, idevid.key)
    connector = aiohttp.TCPConnector(ssl=context, force_close=True, limit=20)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> dict[str, str]:
            async with session.post(f"{server.url}/v1/enroll", json={"csr": some_csr()}) as r:
                assert r.status == 201, await r.text()
                return await r.json()  # type: ignore[no-any-return]

        bundles = await asyncio.gather(*(one() for _ in range(20)))
    device_id = device_id_for(fleet, idevid.spki)
    assert {b["device_id"] for b in bundles} == {device_id}
    assert await db.fetchval("SELECT count(*) FROM devices WHERE fleet = $1", fleet) == 1
    statuses = [
        r["status"]
        for r in await db.fetch("SELECT status FROM certificates WHERE device_id = $1", device_id)
    ]
    assert sorted(statuses) == ["active"] + ["superseded"] * 19


def manifest_rows(count: int) -> list[str]:
    rows = ["serial,spki_sha256,model,site,line"]
    for i in range(count):
        if i % 2:
            rows.append(f",{secrets.token_hex(32)},m{i % 3},s{i % 5},")
        else:
            rows.append(f"{i + 1:x},,m{i % 3},,l{i % 7}")
    return rows


async def test_manifest_import_and_malformed_rows(
    env: dict[str, str], db: asyncpg.Connection, tmp_path: Path
) -> None:
    fleet = new_fleet("idm")
    rows = manifest_rows(2000)
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(rows) + "\n")
    out = json.loads(
        await acli(env, "fleet", "import-manifest", "--fleet", fleet, str(manifest), "--json")
    )
    assert out == {"fleet": fleet, "inserted": 2000, "updated": 0}
    counted = dict(
        await db.fetch(
            "SELECT kind, count(*) FROM idevid_manifest WHERE fleet = $1 GROUP BY kind", fleet
        )
    )
    assert counted == {"serial": 1000, "spki": 1000}
    attributes = await db.fetchval(
        "SELECT attributes FROM idevid_manifest "
        "WHERE fleet = $1 AND kind = 'serial' AND value = 'b'",
        fleet,
    )
    assert json.loads(attributes) == {"model": "m1", "line": "l3"}  # row 10: serial 0xb
    again = json.loads(
        await acli(env, "fleet", "import-manifest", "--fleet", fleet, str(manifest), "--json")
    )
    assert again == {"fleet": fleet, "inserted": 0, "updated": 2000}
    (first, second) = [json.loads(e["detail"]) for e in await events(db, fleet=fleet, type="admin")]
    assert first["action"] == "import_manifest" and first["entries"] == 2000
    assert (second["inserted"], second["updated"]) == (0, 2000)
    assert first["sha256"] == second["sha256"]

    bad = {
        5: "zz-not-hex,,m,,",
        7: "12,,m",
        9: "",  # replaced by a copy of line 3: listed twice
    }
    for line, text in bad.items():
        broken = list(rows[:12])
        broken[line - 1] = text
        if line == 9:
            broken[line - 1] = broken[2]
        path = tmp_path / f"bad{line}.csv"
        path.write_text("\n".join(broken) + "\n")
        output = await acli(
            env, "fleet", "import-manifest", "--fleet", new_fleet("b"), str(path), code=1
        )
        assert f"line {line}:" in output and "nothing imported" in output, output
        assert len(output.strip().splitlines()) == 1
    header = tmp_path / "header.csv"
    header.write_text("serial,colour\n1,red\n")
    output = await acli(env, "fleet", "import-manifest", "--fleet", fleet, str(header), code=1)
    assert "line 1: unknown column 'colour'" in output
    assert await db.fetchval("SELECT count(*) FROM idevid_manifest WHERE fleet = $1", fleet) == 2000


async def test_trust_changes_each_make_an_event(
    env: dict[str, str], db: asyncpg.Connection, tmp_path: Path
) -> None:
    fleet = new_fleet("idt")
    mfr = Manufacturer(tmp_path / "mfr")
    await trust(env, fleet, mfr)
    await trust(env, fleet, mfr, "--require-allowlist", "--crl", str(mfr.crl()))
    listed = [
        json.loads(x)
        for x in (
            await acli(env, "fleet", "manufacturers", "--fleet", fleet, "--json")
        ).splitlines()
    ]
    assert len(listed) == 1 and listed[0]["require_allowlist"] and listed[0]["crl"]
    assert listed[0]["intermediates"] == 1
    await acli(env, "idevid", "block", "--fleet", fleet, "--serial", "0A:BC", "--note", "stolen")
    await acli(env, "idevid", "block", "--fleet", fleet, "--serial", "abc")  # already: no event
    blocks = await acli(env, "idevid", "list", "--fleet", fleet, "--json")
    assert [json.loads(x)["value"] for x in blocks.splitlines()] == ["abc"]
    await acli(env, "idevid", "unblock", "--fleet", fleet, "--serial", "abc")
    await acli(env, "fleet", "distrust-manufacturer", "--fleet", fleet, "--ca", str(mfr.root_path))
    output = await acli(
        env,
        "fleet",
        "distrust-manufacturer",
        "--fleet",
        fleet,
        "--ca-fingerprint",
        listed[0]["ca_fingerprint"],
        code=1,
    )
    assert "trusts no CA" in output
    actions = [
        (e["reason"], json.loads(e["detail"])["action"], json.loads(e["detail"])["actor"])
        for e in await events(db, fleet=fleet, type="admin")
    ]
    assert actions == [
        ("admin_action", action, "cli")
        for action in (
            "trust_manufacturer", "trust_manufacturer", "block_idevid", "unblock_idevid",
            "distrust_manufacturer",
        )
    ]  # fmt: skip
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    output = await acli(
        env, "fleet", "trust-manufacturer", "--fleet", fleet, "--ca", str(junk), code=1
    )
    assert "not a PEM or DER X.509 certificate" in output


async def test_a_ca_shared_by_two_fleets_needs_allowlists_in_both(
    env: dict[str, str], server: Server, pki: Pki, db: asyncpg.Connection, tmp_path: Path
) -> None:
    a, b = new_fleet("ida"), new_fleet("idb")
    mfr = Manufacturer(tmp_path / "mfr")
    await trust(env, a, mfr)
    assert "already trusted by fleet(s) " + a in await trust(env, b, mfr, code=1)
    assert "already trusted" in await trust(env, b, mfr, "--require-allowlist", code=1)
    await trust(env, a, mfr, "--require-allowlist")
    await trust(env, b, mfr, "--require-allowlist")
    assert "already trusted" in await trust(env, a, mfr, code=1)  # and a cannot drop it now
    mine = mfr.idevid()
    manifest = tmp_path / "b.csv"
    manifest.write_text(f"spki_sha256\n{mine.spki}\n")
    await acli(env, "fleet", "import-manifest", "--fleet", b, str(manifest))
    _, csr = openssl_csr(tmp_path, "shared")
    status, _, body = await aest(server, pki, mine, csr)
    assert status == 200, body
    assert (
        await db.fetchval(
            "SELECT fleet FROM devices WHERE device_id = $1", device_id_for(b, mine.spki)
        )
        == b
    )
    # Listed by both: whose it is is not settled, so it is refused.
    await acli(env, "fleet", "import-manifest", "--fleet", a, str(manifest))
    status, _, body = await aest(server, pki, mine, csr)
    assert (status, json.loads(body)["reason"]) == (403, "idevid_not_allowlisted")
    assert "more than one fleet" in json.loads(body)["detail"]


async def test_junk_idevids_are_rate_limited_and_budgeted(
    database_url: str, pki: Pki, tmp_path: Path, db: asyncpg.Connection
) -> None:
    """An unauthenticated peer presenting junk IDevIDs: refused each time, 429 after a few
    failures (the token failure limiter counts them), and the audit log holds at most the
    route's budget of full events; the rest are exact counts in summary events."""
    instance = f"junk-{os.getpid()}-{secrets.token_hex(2)}"
    settings = Settings(
        database_url=database_url, pki_dir=pki.directory, ca_passphrase=pki.passphrase.decode(),
        instance_id=instance, refusal_events_per_minute=5,
    )  # fmt: skip
    junk = Manufacturer(tmp_path / "junk", name="junk", intermediate_ca=False).idevid()
    context = ssl.create_default_context(cafile=str(pki.chain))
    context.load_cert_chain(junk.cert, junk.key)
    sent = 40
    statuses: list[int] = []
    with provisioning_server(settings) as port:
        connector = aiohttp.TCPConnector(ssl=context, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(sent):
                async with session.post(
                    f"https://127.0.0.1:{port}/v1/enroll", json={"csr": some_csr()}
                ) as response:
                    statuses.append(response.status)
    assert set(statuses) <= {401, 429} and statuses[0] == 401 and 429 in statuses
    rows = await db.fetch("SELECT reason, detail FROM auth_events WHERE instance = $1", instance)
    full = [r for r in rows if "summary" not in json.loads(r["detail"])]
    summaries = [json.loads(r["detail"]) for r in rows if "summary" in json.loads(r["detail"])]
    assert len(full) <= 5
    assert len(full) + sum(s["count"] for s in summaries) == sent
    assert {r["reason"] for r in rows} <= {"idevid_untrusted", "rate_limited"}


async def test_enrollment_with_the_idevid_key_in_a_token(
    env: dict[str, str], server: Server, pki: Pki, db: asyncpg.Connection, tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:  # fmt: skip
    """The real ``devicegate enroll`` (its own process: PKCS#11 state is per process) with
    the IDevID key generated inside a SoftHSM2 token: the handshake signs in the token, the
    CSR is bound to the connection, and the device id is the hardware's."""
    if not MODULE.exists() or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 is needed")
    token: Token = make_token(tmp_path_factory)
    fleet = new_fleet("ihsm")
    await acli(env, "fleet", "trust-manufacturer", "--fleet", fleet, "--ca", str(token.mfr),
               "--require-channel-binding")  # fmt: skip
    uri = f"pkcs11:token=dev;object=idevid;type=private?module-path={MODULE}&pin-source=file:{token.pin_file}"  # noqa: E501
    command = [
        str(Path(sys.executable).with_name("devicegate")), "enroll", "--url", server.url,
        "--idevid-cert", str(token.idevid), "--idevid-key", uri, "--ca-cert", str(pki.chain),
        "--out", str(tmp_path / "dev"), "--json",
    ]  # fmt: skip
    done = await asyncio.to_thread(
        subprocess.run, command, env={**token.env, **env}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    enrolled = json.loads(done.stdout)
    idevid = x509.load_der_x509_certificate(token.idevid_der)
    spki = hashes.Hash(hashes.SHA256())
    spki.update(
        idevid.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    assert enrolled["device_id"] == device_id_for(fleet, spki.finalize().hex())
    (allowed,) = await events(db, device_id=enrolled["device_id"], type="enroll")
    detail = json.loads(allowed["detail"])
    assert detail["channel_binding"] is True
    assert detail["idevid"]["fingerprint"] == fingerprint(idevid)

    # A wrong PIN: one line naming the failure, nothing enrolled.
    bad_pin = tmp_path / "bad-pin"
    bad_pin.write_text("0000\n")
    bad_pin.chmod(0o600)
    command[command.index(uri)] = uri.replace(str(token.pin_file), str(bad_pin))
    command[command.index("--out") + 1] = str(tmp_path / "dev2")
    done = await asyncio.to_thread(
        subprocess.run, command, env={**token.env, **env}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "PIN" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "dev2" / "device.crt").exists()
