"""The listener's TLS policy, probed the way an attacker or an old client would."""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from provisioning.agent.device import gateway_ssl_context, key_pem, mqtt_tls_parameters
from provisioning.http.server import server_ssl_context
from provisioning.pki.ca import to_pem
from tests.conftest import Pki
from tests.provisioning.conftest import Server, some_csr


def handshake(server: Server, context: ssl.SSLContext) -> str:
    """The negotiated version, after a request that makes a TLS 1.3 client cert error show."""
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert tls.recv(100).startswith(b"HTTP/1.1 200")
        return str(tls.version())


def test_modern_tls_only(server: Server, pki: Pki) -> None:
    context = ssl.create_default_context(cafile=str(pki.chain))
    assert handshake(server, context) == "TLSv1.3"

    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    assert handshake(server, context) == "TLSv1.2"

    cbc = ssl.create_default_context(cafile=str(pki.chain))
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA")
    with pytest.raises(ssl.SSLError):
        handshake(server, cbc)

    assert server_ssl_context(pki.directory).minimum_version == ssl.TLSVersion.TLSv1_2


def test_foreign_client_certificate_grants_nothing(
    server: Server, pki: Pki, tmp_path: Path
) -> None:
    """The listener lets any client certificate through the handshake (manufacturer
    certificates must reach the service to be judged and recorded: docs/manufacturer-
    certificates.md); every route that uses it verifies it, so a foreign one is refused
    with its reason, by renewal and by IDevID enrollment alike."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intruder")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "c.pem").write_text(to_pem(cert))
    (tmp_path / "k.pem").write_bytes(key_pem(key))
    context = ssl.create_default_context(cafile=str(pki.chain))
    context.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    body = json.dumps({"csr": some_csr()}).encode()
    for path, reason in (("/v1/renew", "unknown_issuer"), ("/v1/enroll", "idevid_untrusted")):
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            answer = b""
            while chunk := tls.recv(4096):
                answer += chunk
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401"), answer
        assert json.loads(payload)["reason"] == reason


def test_device_tls_helpers(pki: Pki, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "device.key").write_bytes(key_pem(key))
    (tmp_path / "device.crt").write_text(
        pki.server_cert.read_text().split("-----END")[0] + "-----END CERTIFICATE-----\n"
    )
    (tmp_path / "chain.pem").write_text(pki.chain.read_text())
    with pytest.raises(ssl.SSLError):  # key and certificate do not belong together
        gateway_ssl_context(tmp_path)
    params = mqtt_tls_parameters(tmp_path)
    assert params.ca_certs == str(tmp_path / "chain.pem")
    assert params.certfile == str(tmp_path / "device.crt")


@pytest.mark.parametrize("path", ["/healthz", "/no/such/page", "/v1/crl", "/console/login"])
def test_every_response_sends_hsts_and_nosniff(server: Server, pki: Pki, path: str) -> None:
    context = ssl.create_default_context(cafile=str(pki.chain))
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head and (chunk := tls.recv(4096)):
            head += chunk
    headers = head.split(b"\r\n\r\n")[0].decode().lower() + "\r\n"
    assert "strict-transport-security: max-age=31536000\r\n" in headers
    assert "x-content-type-options: nosniff\r\n" in headers
    if path.startswith("/console/"):
        assert "content-security-policy: default-src 'none'" in headers  # its own stay


def test_a_padded_client_chain_is_refused_at_the_handshake(
    server: Server, pki: Pki, tmp_path: Path
) -> None:
    """As at the gateway: a Certificate message over 16 KiB (here 99 KB, under OpenSSL's
    default 100 KiB) ends the handshake before OpenSSL parses any of it; a device's
    ordinary chain still gets through."""
    pytest.importorskip("gateway._tlsext")
    from tests.gateway.conftest import issue

    cert, key, _ = issue(pki.ca, tmp_path, "dev-padded", "plant")
    padded = tmp_path / "padded.pem"
    padded.write_bytes(cert.read_bytes() + pki.chain.read_bytes() * 90)
    context = ssl.create_default_context(cafile=str(pki.chain))
    context.load_cert_chain(str(padded), str(key))
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        handshake(server, context)
    ordinary = ssl.create_default_context(cafile=str(pki.chain))  # sends leaf + both CAs
    ordinary.load_cert_chain(str(cert), str(key))
    assert handshake(server, ordinary) == "TLSv1.3"
