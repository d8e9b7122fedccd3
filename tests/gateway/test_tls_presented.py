"""Refusals name the certificate that was presented: which one, and why it was refused.

Real TLS against the gateway with certificates from the project's CA code (and a foreign
one); the events are read back from PostgreSQL and through ``devicegate audit``.
"""

from __future__ import annotations

import json
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from gateway import _tlsext
from gateway.mqtt import Connack
from gateway.tls import CAPTURES_PRESENTED, TlsFailure, TlsPump, server_context
from provisioning.agent.device import key_pem
from provisioning.commands.cli import app
from provisioning.pki.ca import to_pem
from provisioning.pki.directory import init_pki, load_ca
from schemas.certificates import MAX_NAME
from tests.conftest import Pki
from tests.gateway.clients import RawClient, client_context
from tests.gateway.conftest import Device, DeviceFactory, Harness, hand_made
from tests.gateway.test_tls import _handshake_refused
from tests.gateway.test_tls_pump import MemoryClient, run

TLS12, TLS13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
NAMES = {TLS12: "TLSv1.2", TLS13: "TLSv1.3"}


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _assert_names(row: Any, cert: x509.Certificate, tls_version: str) -> dict[str, Any]:
    """The event names ``cert`` in its columns and in ``detail.presented``; the detail."""
    detail = json.loads(row["detail"])
    serial = format(cert.serial_number, "x")
    fingerprint = cert.fingerprint(hashes.SHA256()).hex()
    assert row["outcome"] == "denied"
    assert (row["cert_serial"], row["cert_fingerprint"]) == (serial, fingerprint)
    assert row["tls_version"] == tls_version
    assert row["tls_cipher"]
    assert detail["presented"] == {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": serial,
        "fingerprint": fingerprint,
        "not_before": _stamp(cert.not_valid_before_utc),
        "not_after": _stamp(cert.not_valid_after_utc),
    }
    return detail


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _refused_event(harness: Harness, context: ssl.SSLContext) -> Any:
    mark = harness.mark()
    _handshake_refused(harness, context)
    (row,) = harness.wait_events(after=mark, type="tls_handshake")
    return row


def _client(cert: Path, key: Path, chain: Path, tls_version: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(chain))
    context.load_cert_chain(str(cert), str(key))
    context.minimum_version = context.maximum_version = tls_version
    return context


def _write(directory: Path, name: str, cert: x509.Certificate, key: Any) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_text(to_pem(cert))
    key_path.write_bytes(key_pem(key))
    return cert_path, key_path


def test_the_accelerator_is_built_and_installed(pki: Pki) -> None:
    """Without it refusals would carry no certificate; `pip install -v -e .` says why."""
    assert CAPTURES_PRESENTED
    assert _tlsext.captures(server_context(pki.chain, pki.server_cert, pki.server_key))
    assert not _tlsext.captures(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    with pytest.raises(TypeError):
        _tlsext.capture_refusals(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _tlsext.take_refused(object())


# --- the pump, over memory -------------------------------------------------------------


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_pump_keeps_the_refused_leaf_per_connection(
    pki: Pki, make_device: DeviceFactory, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    """Two refusals interleaved on one context: each connection gets its own leaf, once."""
    context = server_context(pki.chain, pki.server_cert, pki.server_key)
    now = datetime.now(UTC)
    expired = make_device(not_before=now - timedelta(days=9), not_after=now - timedelta(days=1))
    init_pki(tmp_path / "rogue", passphrase=b"rogue", force=True)
    forged = make_device(ca=load_ca(tmp_path / "rogue", b"rogue"), register=False)
    pumps = [TlsPump(context), TlsPump(context)]
    clients = [MemoryClient(_client(d.cert, d.key, pki.chain, version)) for d in (expired, forged)]
    # Both ClientHellos first, so both connections are open when the first one fails.
    for pump, client in zip(pumps, clients, strict=True):
        assert pump.feed(client.step()) == []
        client.incoming.write(pump.take_outgoing())
    failures = []
    for pump, client in zip(pumps, clients, strict=True):
        with pytest.raises(TlsFailure) as caught:
            run(pump, client)
        failures.append(caught.value)
        assert pump.version() == NAMES[version]  # the handshake did not complete
    assert failures[0].verify_code == 10
    assert failures[1].verify_code in (2, 20, 21)
    for failure, device in zip(failures, (expired, forged), strict=True):
        assert failure.presented == _load(device.cert).public_bytes(serialization.Encoding.DER)
        assert failure.verify_depth == 0


def test_pump_without_capture_still_classifies(pki: Pki, make_device: DeviceFactory) -> None:
    """A context without the callback (the accelerator not built): code, no certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(pki.chain))
    context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    now = datetime.now(UTC)
    expired = make_device(not_before=now - timedelta(days=9), not_after=now - timedelta(days=1))
    pump = TlsPump(context)
    with pytest.raises(TlsFailure) as caught:
        run(pump, MemoryClient(_client(expired.cert, expired.key, pki.chain, TLS13)))
    assert caught.value.verify_code == 10 and caught.value.presented is None


def test_successful_handshake_keeps_nothing(pki: Pki, make_device: DeviceFactory) -> None:
    device = make_device()
    pump = TlsPump(server_context(pki.chain, pki.server_cert, pki.server_key))
    run(pump, MemoryClient(_client(device.cert, device.key, pki.chain, TLS13)), b"x")
    assert pump.handshake_complete
    assert _tlsext.take_refused(pump._ssl._sslobj) is None  # type: ignore[attr-defined]


# --- the gateway, over sockets -----------------------------------------------------------


@pytest.mark.parametrize("tls_version", [TLS12, TLS13])
def test_expired_names_the_certificate(
    harness: Harness, make_device: DeviceFactory, pki: Pki, tls_version: ssl.TLSVersion
) -> None:
    now = datetime.now(UTC)
    device = make_device(not_before=now - timedelta(days=9), not_after=now - timedelta(days=1))
    row = _refused_event(harness, client_context(device, device.chain, tls_version=tls_version))
    assert row["reason"] == "certificate_expired"
    detail = _assert_names(row, _load(device.cert), NAMES[tls_version])
    assert (detail["verify_code"], detail["verify_depth"]) == (10, 0)
    assert detail["presented"]["issuer"] == pki.ca.issuing.subject.rfc4514_string()


@pytest.mark.parametrize("tls_version", [TLS12, TLS13])
def test_foreign_ca_names_the_certificate(
    harness: Harness, make_device: DeviceFactory, tmp_path: Path, tls_version: ssl.TLSVersion
) -> None:
    init_pki(tmp_path / "rogue", passphrase=b"rogue", force=True)
    rogue = load_ca(tmp_path / "rogue", b"rogue")
    forged = make_device(ca=rogue, register=False)
    row = _refused_event(harness, client_context(forged, forged.chain, tls_version=tls_version))
    assert row["reason"] == "unknown_issuer"
    detail = _assert_names(row, _load(forged.cert), NAMES[tls_version])
    assert detail["verify_code"] in (2, 20, 21)
    assert detail["presented"]["issuer"] == rogue.issuing.subject.rfc4514_string()
    assert row["device_id"] is None  # a certificate is not an identity until it verifies


def test_server_certificate_as_client_is_wrong_purpose(harness: Harness, pki: Pki) -> None:
    row = _refused_event(harness, _client(pki.server_cert, pki.server_key, pki.chain, TLS13))
    assert row["reason"] == "certificate_invalid"
    detail = _assert_names(row, _load(pki.server_cert), "TLSv1.3")
    assert detail["verify_code"] == 26  # X509_V_ERR_INVALID_PURPOSE
    assert "purpose" in detail["error"]


def test_certificate_without_client_auth_is_wrong_purpose(
    harness: Harness, pki: Pki, tmp_path: Path
) -> None:
    """Issued by our CA, naming a device correctly, but for email protection only."""
    cert_path, key_path, cert = hand_made(
        pki,
        tmp_path,
        "dev-eku",
        "spiffe://devicegate.local/fleet/p/device/dev-eku",
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]),
    )
    row = _refused_event(harness, _client(cert_path, key_path, pki.chain, TLS12))
    assert row["reason"] == "certificate_invalid"
    assert _assert_names(row, cert, "TLSv1.2")["verify_code"] == 26


def test_device_chosen_names_are_escaped_and_bounded(
    harness: Harness, pki: Pki, tmp_path: Path
) -> None:
    """A self-signed certificate whose names carry terminal escapes and bidi overrides."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "evil\x1b[2J\u202e"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "O" * 5000),
        ]
    )
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = _write(tmp_path, "evil", cert, key)
    row = _refused_event(harness, _client(cert_path, key_path, pki.chain, TLS13))
    assert row["reason"] == "unknown_issuer"
    presented = json.loads(row["detail"])["presented"]
    for text in (presented["subject"], presented["issuer"]):
        assert len(text) == MAX_NAME and text.endswith("...")
        assert text.startswith("O=OOO")  # RFC 4514 lists the last attribute first
        assert not any(ord(c) < 0x20 or c == "\u202e" for c in text)
    assert row["cert_fingerprint"] == presented["fingerprint"]


@pytest.mark.parametrize("cert_status", ["revoked", "superseded"])
def test_registry_refusals_name_the_certificate(
    harness: Harness, make_device: DeviceFactory, cert_status: str
) -> None:
    """Revoked, or superseded (the device renewed and connects with its older one)."""
    old = make_device("renewed", cert_status=cert_status)
    make_device(device_id=old.device_id)  # the device's current certificate
    mark = harness.mark()
    with RawClient(harness.port, old, old.chain, version=5) as client:
        assert client.connect(old.device_id) == Connack(reason_code=0x87)
        assert client.closed()
    (row,) = harness.wait_events(after=mark, type="connect")
    assert row["reason"] == f"certificate_{cert_status}"
    assert row["device_id"] == old.device_id
    _assert_names(row, _load(old.cert), "TLSv1.3")


# --- devicegate audit ----------------------------------------------------------------------


def test_audit_cli_shows_the_presented_certificate(
    harness: Harness, make_device: DeviceFactory
) -> None:
    now = datetime.now(UTC)
    device: Device = make_device(
        not_before=now - timedelta(days=9), not_after=now - timedelta(days=1)
    )
    row = _refused_event(harness, client_context(device, device.chain, tls_version=TLS13))
    cert = _load(device.cert)
    env = {"DEVICEGATE_DATABASE_URL": harness.database_url, "COLUMNS": "250"}
    args = ["audit", "--since", "10m", "--reason", "certificate_expired", "--limit", "1000"]
    result = CliRunner().invoke(app, [*args, "--format", "json"], env=env)
    assert result.exit_code == 0, result.output
    (event,) = [
        e
        for e in map(json.loads, result.output.splitlines())
        if e["cert_fingerprint"] == row["cert_fingerprint"]
    ]
    assert event["type"] == "tls_handshake" and event["tls_version"] == "TLSv1.3"
    assert event["cert_serial"] == format(cert.serial_number, "x")
    subject = cert.subject.rfc4514_string()
    assert event["detail"]["presented"]["subject"] == subject
    assert subject.endswith(f"CN={device.device_id}")
    assert event["detail"]["presented"]["not_after"] == _stamp(cert.not_valid_after_utc)
    assert event["detail"]["verify_code"] == 10

    table = CliRunner().invoke(app, args, env=env)
    assert table.exit_code == 0, table.output
    (line,) = [line for line in table.output.splitlines() if f"CN={device.device_id}" in line]
    assert line.startswith(f"    presented {subject} serial {event['cert_serial']} sha256 ")
    assert "(TLSv1.3): certificate has expired (10)" in line
