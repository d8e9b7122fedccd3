"""Certificates name the CRL that provisioning serves, and that URL answers with it.

The server certificate (made by `ca init`) and every device certificate carry a CRL
distribution point, ``<public_url>/v1/crl``: a relying party, or a TLS scanner, finds
the revocation list from the certificate alone.
"""

from __future__ import annotations

import logging
import socket
import ssl

import aiohttp
import asyncpg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning.http.server import device_crl_url
from provisioning.pki.ca import crl_url_of
from schemas.settings import Settings
from tests.conftest import Pki
from tests.provisioning.conftest import Published, make_token, some_csr


def presented_certificate(port: int, chain: str) -> x509.Certificate:
    """The leaf certificate the listener presents in its handshake."""
    context = ssl.create_default_context(cafile=chain)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def test_server_and_device_certificates_name_the_served_crl(
    published: Published, db: asyncpg.Connection
) -> None:
    chain = str(published.pki.chain)
    server = presented_certificate(published.server.port, chain)
    assert crl_url_of(server) == published.crl_url

    context = ssl.create_default_context(cafile=chain)
    connector = aiohttp.TCPConnector(ssl=context, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        token, _ = await make_token(db)
        body = {"token": token, "csr": some_csr()}
        async with http.post(f"{published.server.url}/v1/enroll", json=body) as response:
            assert response.status == 201, await response.text()
            bundle = await response.json()
        device = x509.load_pem_x509_certificate(bundle["certificate"].encode())
        assert crl_url_of(device) == published.crl_url

        # The URL the certificates name serves the issuing CA's CRL, DER, as RFC 5280 asks.
        async with http.get(published.crl_url) as response:
            assert response.status == 200
            assert response.content_type == "application/pkix-crl"
            crl = x509.load_der_x509_crl(await response.read())
    issuing = published.pki.ca.issuing
    assert crl.issuer == issuing.subject
    issuing_key = issuing.public_key()
    assert isinstance(issuing_key, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(issuing_key)


def test_device_crl_follows_server_certificate_when_public_url_is_unset(
    published: Published,
) -> None:
    unset = published.settings.model_copy(update={"public_url": None})
    assert device_crl_url(unset) == published.crl_url


def test_public_url_wins_over_the_server_certificate(published: Published) -> None:
    moved = published.settings.model_copy(update={"public_url": "https://prov.example.com"})
    assert device_crl_url(moved) == "https://prov.example.com/v1/crl"


def test_no_crl_anywhere_is_a_warning(
    settings: Settings, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    # The session PKI is made without one, as a PKI from before there were any.
    assert settings.public_url is None
    with caplog.at_level(logging.WARNING, logger="devicegate.provisioning"):
        assert device_crl_url(settings) is None
    assert "DEVICEGATE_PUBLIC_URL" in caplog.text
