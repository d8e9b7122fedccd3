"""The TLS pump without sockets: a client SSLObject and the pump talk through memory."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.tls import TlsFailure, TlsPump, server_context
from provisioning.pki.ca import CertificateAuthority
from schemas.events import Reason
from tests.conftest import Pki
from tests.gateway.conftest import issue


class MemoryClient:
    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.done = False

    def step(self) -> bytes:
        if not self.done:
            try:
                self.ssl.do_handshake()
                self.done = True
            except ssl.SSLWantReadError:
                pass
        return self.outgoing.read()


def run(pump: TlsPump, client: MemoryClient, data: bytes = b"") -> tuple[list[bytes], bytes]:
    """Exchange flights until quiet; return the plaintext the pump got and its last output."""
    plaintext: list[bytes] = []
    last = b""
    for _ in range(10):
        out = client.step()
        if client.done and data:
            client.ssl.write(data)
            data = b""
            out += client.outgoing.read()
        if out:
            plaintext += pump.feed(out)
        last = pump.take_outgoing()
        if not last and not out:
            break
        client.incoming.write(last)
    return plaintext, last


def client_context(
    pki: Pki, tmp_path: Path, version: ssl.TLSVersion, ca: CertificateAuthority | None = None,
    **validity: datetime,
) -> ssl.SSLContext:  # fmt: skip
    context = ssl.create_default_context(cafile=str(pki.chain))
    context.minimum_version = context.maximum_version = version
    if ca is not None:
        cert, key, _ = issue(ca, tmp_path, "dev-1", "plant", **validity)
        context.load_cert_chain(str(cert), str(key))
    return context


VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]


@pytest.mark.parametrize("version", VERSIONS)
def test_handshake_and_data(pki: Pki, tmp_path: Path, version: ssl.TLSVersion) -> None:
    pump = TlsPump(server_context(pki.chain, pki.server_cert, pki.server_key))
    client = MemoryClient(client_context(pki, tmp_path, version, pki.ca))
    plaintext, _ = run(pump, client, b"hello gateway")
    assert pump.handshake_complete and b"".join(plaintext) == b"hello gateway"
    assert pump.version() == ("TLSv1.3" if version is ssl.TLSVersion.TLSv1_3 else "TLSv1.2")
    assert pump.peer_certificate() is not None
    pump.encrypt(memoryview(b"x" * 100_000))
    client.incoming.write(pump.take_outgoing())
    received = b""
    while len(received) < 100_000:
        received += client.ssl.read(1 << 20)
    assert received == b"x" * 100_000


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("validity", "reason"),
    [
        ({}, Reason.NO_CLIENT_CERTIFICATE),
        ({"not_after": datetime.now(UTC) - timedelta(days=1)}, Reason.CERTIFICATE_EXPIRED),
        ({"not_before": datetime.now(UTC) + timedelta(days=1)}, Reason.CERTIFICATE_NOT_YET_VALID),
    ],
)
def test_failures_are_classified_and_alerted(
    pki: Pki, tmp_path: Path, version: ssl.TLSVersion, validity: dict[str, datetime],
    reason: Reason,
) -> None:  # fmt: skip
    pump = TlsPump(server_context(pki.chain, pki.server_cert, pki.server_key))
    ca = pki.ca if validity else None
    validity = dict(validity)  # the parameter is shared between runs
    if validity.get("not_after") and "not_before" not in validity:
        validity["not_before"] = datetime.now(UTC) - timedelta(days=10)
    if validity.get("not_before") and "not_after" not in validity:
        validity["not_after"] = datetime.now(UTC) + timedelta(days=10)
    client = MemoryClient(client_context(pki, tmp_path, version, ca, **validity))
    with pytest.raises(TlsFailure) as info:
        run(pump, client)
    assert info.value.reason is reason
    alert = pump.take_outgoing()
    assert alert[:1] == b"\x15" or version is ssl.TLSVersion.TLSv1_3  # 1.3 encrypts alerts
    assert alert, "OpenSSL's alert must be left for the caller to flush"


def test_plaintext_is_a_protocol_error(pki: Pki) -> None:
    pump = TlsPump(server_context(pki.chain, pki.server_cert, pki.server_key))
    with pytest.raises(TlsFailure) as info:
        pump.feed(b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04abcd")
    assert info.value.reason is Reason.TLS_PROTOCOL_ERROR


@pytest.mark.parametrize("version", VERSIONS)
def test_records_whole_split_and_batched_after_buffers_are_released(
    pki: Pki, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    """The pump reads only while ciphertext waits and frees the handshake's buffers once
    flushed (`_tlsext.release_buffers`): no plaintext is lost or reordered, whether records
    arrive whole, a byte at a time (a partial record stays buffered) or several per feed,
    and close_notify is still seen."""
    pump = TlsPump(server_context(pki.chain, pki.server_cert, pki.server_key))
    client = MemoryClient(client_context(pki, tmp_path, version, pki.ca))
    plaintext, _ = run(pump, client, b"first")
    assert b"".join(plaintext) == b"first"
    assert pump.feed(b"") == []  # nothing waiting: no read, no error
    messages = [bytes([65 + i]) * (1 + 5000 * i) for i in range(4)]  # up to 15 KB records
    received: list[bytes] = []
    for message in messages:  # one record at a time, byte by byte
        client.ssl.write(message)
        wire = client.outgoing.read()
        for i in range(len(wire)):
            received += pump.feed(wire[i : i + 1])
            pump.take_outgoing()
    assert b"".join(received) == b"".join(messages)
    for message in messages:  # every record in one feed
        client.ssl.write(message)
    batch = pump.feed(client.outgoing.read())
    assert batch == messages
    client.ssl.write(b"last")
    with pytest.raises(ssl.SSLWantReadError):  # close_notify sent; it waits for ours
        client.ssl.unwrap()
    assert pump.feed(client.outgoing.read()) == [b"last"]
    assert pump.eof


def test_release_buffers_takes_only_a_tls_connection() -> None:
    _tlsext = pytest.importorskip("gateway._tlsext")
    with pytest.raises(TypeError):
        _tlsext.release_buffers(object())


def device_flight(context: ssl.SSLContext, pki: Pki) -> tuple[int, bytes | None]:
    """(bytes of the device's second flight: Certificate .. Finished, the certificate the
    gateway verified) of one TLS 1.3 handshake through the pump."""
    pump = TlsPump(server_context(pki.chain, pki.server_cert, pki.server_key))
    client = MemoryClient(context)
    pump.feed(client.step())  # ClientHello
    client.incoming.write(pump.take_outgoing())
    flight = client.step()
    pump.feed(flight)
    assert pump.handshake_complete and client.done
    return len(flight), pump.peer_certificate()


def test_a_device_sends_its_certificate_not_the_trust_stores_chain(
    pki: Pki, tmp_path: Path
) -> None:
    """The agent's context presents what device.crt holds: OpenSSL would otherwise complete
    the chain from chain.pem (issuing CA and root), which the gateway already trusts."""
    pytest.importorskip("gateway._tlsext")
    from provisioning.agent import device

    cert, key, issued = issue(pki.ca, tmp_path, "dev-chain", "plant")
    directory = tmp_path / "device"
    directory.mkdir()
    (directory / device.CERT_FILE).write_bytes(cert.read_bytes())
    (directory / device.KEY_FILE).write_bytes(key.read_bytes())
    (directory / device.CHAIN_FILE).write_bytes(pki.chain.read_bytes())

    default = ssl.create_default_context(cafile=str(pki.chain))  # what a device did before
    default.load_cert_chain(str(cert), str(key))
    before, verified_before = device_flight(default, pki)
    after, verified_after = device_flight(device.gateway_ssl_context(directory), pki)

    leaf = issued.public_bytes(serialization.Encoding.DER)
    assert verified_before == verified_after == leaf  # the same identity, still verified
    ca_ders = [
        c.public_bytes(serialization.Encoding.DER)
        for c in x509.load_pem_x509_certificates(pki.chain.read_bytes())
    ]
    assert len(ca_ders) == 2  # root and issuing CA
    # Each CA certificate sent costs its DER plus a 2-byte extensions field and a 3-byte
    # length; ECDSA signatures vary by a few bytes between the two handshakes.
    saved = before - after
    assert abs(saved - sum(len(der) + 5 for der in ca_ders)) <= 4, (before, after)
    assert after < len(leaf) + 400  # the leaf, CertificateVerify, Finished, framing
