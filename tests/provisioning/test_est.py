"""EST (RFC 7030) round trip with the tools a device integrator uses: curl and openssl."""

from __future__ import annotations

import subprocess
from pathlib import Path

import asyncpg
from cryptography import x509

from provisioning.pki.ca import fingerprint
from tests.conftest import Pki
from tests.provisioning.conftest import Server, both_signers, make_token, uses_left

EST = "/.well-known/est"


def sh(*args: str, input: bytes | None = None) -> bytes:
    return subprocess.run(args, check=True, capture_output=True, input=input, timeout=30).stdout


def curl(server: Server, pki: Pki, path: str, *extra: str) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one curl request."""
    out = sh("curl", "-sS", "--cacert", str(pki.chain), "-D", "-", *extra, f"{server.url}{path}")
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines[1:])
    }
    return int(lines[0].split()[1]), headers, body


def pkcs7_certs(body: bytes) -> list[x509.Certificate]:
    pem = sh(
        "openssl", "pkcs7", "-inform", "DER", "-print_certs", input=sh("base64", "-d", input=body)
    )
    return x509.load_pem_x509_certificates(pem)


def openssl_csr(directory: Path, name: str) -> tuple[Path, Path]:
    """(key, base64 DER CSR) made by openssl."""
    key = directory / f"{name}.key"
    sh(
        "openssl",
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        str(key),
    )
    der = sh("openssl", "req", "-new", "-key", str(key), "-subj", "/CN=ignored", "-outform", "DER")
    csr = directory / f"{name}.b64"
    csr.write_bytes(sh("base64", input=der))
    return key, csr


@both_signers
async def test_est_round_trip(
    server: Server, pki: Pki, db: asyncpg.Connection, tmp_path: Path
) -> None:
    status, headers, body = curl(server, pki, f"{EST}/cacerts")
    assert status == 200
    assert headers["content-type"] == "application/pkcs7-mime"
    assert headers["content-transfer-encoding"] == "base64"
    # A PKCS#7 certificate set is a DER SET OF: its order is the encoding's, not the chain's.
    assert {fingerprint(c) for c in pkcs7_certs(body)} == {
        fingerprint(c) for c in x509.load_pem_x509_certificates(pki.chain.read_bytes())
    }

    token, token_id = await make_token(db, uses=1)
    key, csr = openssl_csr(tmp_path, "first")
    status, headers, body = curl(
        server,
        pki,
        f"{EST}/simpleenroll",
        "--data-binary",
        f"@{csr}",
        "-H",
        "Content-Type: application/pkcs10",
        "--user",
        f"x:{token}",
    )
    assert status == 200, body
    assert headers["content-type"] == "application/pkcs7-mime; smime-type=certs-only"
    (issued,) = pkcs7_certs(body)
    issued.verify_directly_issued_by(pki.ca.issuing)
    serial = format(issued.serial_number, "x")
    assert await uses_left(db, token_id) == 0
    assert (
        await db.fetchval("SELECT status FROM certificates WHERE serial = $1", serial) == "active"
    )
    cert_file = tmp_path / "first.crt"
    cert_file.write_bytes(sh("base64", "-d", input=body))
    cert_pem = sh("openssl", "pkcs7", "-inform", "DER", "-print_certs", "-in", str(cert_file))
    cert_file.write_bytes(cert_pem)

    _, new_csr = openssl_csr(tmp_path, "second")
    status, headers, body = curl(
        server,
        pki,
        f"{EST}/simplereenroll",
        "--data-binary",
        f"@{new_csr}",
        "-H",
        "Content-Type: application/pkcs10",
        "--cert",
        str(cert_file),
        "--key",
        str(key),
    )
    assert status == 200, body
    (renewed,) = pkcs7_certs(body)
    assert renewed.subject == issued.subject
    rows = await db.fetch(
        "SELECT serial, status FROM certificates WHERE device_id = $1",
        issued.subject.rfc4514_string().split(",")[-1].removeprefix("CN="),
    )
    assert {r["serial"]: r["status"] for r in rows} == {
        serial: "superseded",
        format(renewed.serial_number, "x"): "active",
    }
    event = await db.fetchrow(
        "SELECT * FROM auth_events WHERE type = 'renew' AND cert_serial = $1",
        format(renewed.serial_number, "x"),
    )
    assert event["outcome"] == "allowed" and event["detail"].count('"est"') == 1


async def test_est_refusals(
    server: Server, pki: Pki, db: asyncpg.Connection, tmp_path: Path
) -> None:
    _, csr = openssl_csr(tmp_path, "refused")
    status, headers, body = curl(
        server,
        pki,
        f"{EST}/simpleenroll",
        "--data-binary",
        f"@{csr}",
        "-H",
        "Content-Type: application/pkcs10",
    )
    assert status == 401 and b'"reason":"token_invalid"' in body
    assert "Basic" in headers["www-authenticate"]
    token, token_id = await make_token(db)
    status, _, body = curl(
        server,
        pki,
        f"{EST}/simpleenroll",
        "--data-binary",
        f"@{csr}",
        "-H",
        "Content-Type: text/plain",
        "--user",
        f"x:{token}",
    )
    assert status == 415 and b'"reason":"unsupported_media_type"' in body
    status, _, body = curl(
        server,
        pki,
        f"{EST}/simpleenroll",
        "--data-binary",
        "bm90IGEgY3Ny",
        "-H",
        "Content-Type: application/pkcs10",
        "-H",
        f"Authorization: Bearer {token}",
    )
    assert status == 400 and b'"reason":"csr_invalid"' in body
    status, _, body = curl(
        server,
        pki,
        f"{EST}/simplereenroll",
        "--data-binary",
        f"@{csr}",
        "-H",
        "Content-Type: application/pkcs10",
    )
    assert status == 401 and b'"reason":"no_client_certificate"' in body
    assert await uses_left(db, token_id) == 1
