"""CSR policy: a corpus of bad requests is refused with exact reasons, spending no token use."""

from __future__ import annotations

import aiohttp
import asyncpg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from cryptography.x509.oid import NameOID

from provisioning.agent.device import KeyType, csr_pem, generate_key
from provisioning.errors import CsrInvalid
from provisioning.pki.ca import KeyNotAllowed
from provisioning.pki.csr import parse_csr_base64_der, parse_csr_pem
from tests.conftest import Pki
from tests.provisioning.conftest import Server, last_event, make_token, some_csr, uses_left

_SHA256 = hashes.SHA256()


def _csr(key: object, algorithm: hashes.HashAlgorithm | None = _SHA256) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")])  # ignored anyway
    )
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()  # type: ignore[arg-type]


def _bad_signature() -> str:
    csr = x509.load_pem_x509_csr(some_csr().encode())
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the ECDSA signature value
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


CORPUS = {
    "bad_signature": (_bad_signature, "csr_invalid"),
    "rsa_1024": (
        lambda: _csr(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
        "key_not_allowed",
    ),
    "dsa": (lambda: _csr(dsa.generate_private_key(key_size=2048)), "key_not_allowed"),
    "p192": (lambda: _csr(ec.generate_private_key(ec.SECP192R1())), "key_not_allowed"),
    "secp256k1": (lambda: _csr(ec.generate_private_key(ec.SECP256K1())), "key_not_allowed"),
    "garbage": (
        lambda: (
            "-----BEGIN CERTIFICATE REQUEST-----\nnot base64!\n-----END CERTIFICATE REQUEST-----\n"
        ),
        "csr_invalid",
    ),
    "certificate_not_csr": (lambda: CHAIN_MARKER, "csr_invalid"),
    "whitespace": (lambda: "   \n", "csr_invalid"),
}

CHAIN_MARKER = "chain.pem"  # replaced by the PKI's chain: a certificate where a CSR belongs


@pytest.mark.parametrize("name", list(CORPUS))
async def test_bad_csrs_are_refused_without_spending_a_use(
    name: str, http: aiohttp.ClientSession, server: Server, db: asyncpg.Connection, pki: Pki
) -> None:
    make_csr, reason = CORPUS[name]
    csr = make_csr()
    if csr == CHAIN_MARKER:
        csr = pki.chain.read_text()
    token, token_id = await make_token(db, uses=1)
    async with http.post(f"{server.url}/v1/enroll", json={"token": token, "csr": csr}) as response:
        problem = await response.json(content_type=None)
        assert response.content_type == "application/problem+json"
    assert (response.status, problem["reason"]) == (400, reason), problem
    assert await uses_left(db, token_id) == 1
    event = await last_event(db, type="enroll", reason=reason)
    assert event["outcome"] == "denied" and event["peer_address"] == "127.0.0.1"
    assert (
        await db.fetchval("SELECT count(*) FROM devices WHERE token_id::text = $1", token_id) == 0
    )


async def test_empty_csr_and_bad_json(
    http: aiohttp.ClientSession, server: Server, db: asyncpg.Connection
) -> None:
    token, token_id = await make_token(db)
    for body in ({"token": token, "csr": ""}, {"token": token}, {"csr": some_csr(), "x": 1}):
        async with http.post(f"{server.url}/v1/enroll", json=body) as response:
            problem = await response.json(content_type=None)
        assert (response.status, problem["reason"]) == (400, "request_invalid"), problem
    async with http.post(f"{server.url}/v1/enroll", data=b"{not json") as response:
        assert (response.status, (await response.json(content_type=None))["reason"]) == (
            400,
            "request_invalid",
        )
    assert await uses_left(db, token_id) == 1


async def test_oversized_body_is_refused_before_parsing(
    http: aiohttp.ClientSession, server: Server, db: asyncpg.Connection
) -> None:
    token, token_id = await make_token(db)
    body = b'{"token": "' + token.encode() + b'", "csr": "' + b"A" * (1024 * 1024) + b'"}'
    async with http.post(
        f"{server.url}/v1/enroll", data=body, headers={"Content-Type": "application/json"}
    ) as response:
        problem = await response.json(content_type=None)
    assert (response.status, problem["reason"]) == (413, "body_too_large")
    assert await uses_left(db, token_id) == 1
    event = await last_event(db, type="enroll", reason="body_too_large")
    assert event["outcome"] == "denied"


@pytest.mark.parametrize("key_type", list(KeyType))
def test_allowed_key_types(key_type: KeyType) -> None:
    accepted = parse_csr_pem(csr_pem(generate_key(key_type)))
    assert (
        accepted.key_type
        == {
            KeyType.P256: "ec-p256",
            KeyType.P384: "ec-p384",
            KeyType.ED25519: "ed25519",
            KeyType.RSA2048: "rsa-2048",
        }[key_type]
    )


def test_est_body_parsing() -> None:
    import base64

    der = x509.load_pem_x509_csr(some_csr().encode()).public_bytes(serialization.Encoding.DER)
    wrapped = base64.encodebytes(der)  # with line breaks, as openssl | base64 writes it
    assert parse_csr_base64_der(wrapped).key_type == "ec-p256"
    for bad in (b"", b"%%%", base64.b64encode(b"garbage")):
        with pytest.raises(CsrInvalid):
            parse_csr_base64_der(bad)
    with pytest.raises(KeyNotAllowed):
        parse_csr_pem(_csr(ec.generate_private_key(ec.SECP256K1())))
