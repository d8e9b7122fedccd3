"""TLS termination: every refused handshake is classified, alerted and recorded."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.mqtt import Connack
from provisioning.pki.directory import init_pki, load_ca
from tests.conftest import Pki
from tests.gateway.clients import RawClient, client_context
from tests.gateway.conftest import DeviceFactory, Harness, hand_made

TLS12, TLS13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3


def _handshake_refused(harness: Harness, context: ssl.SSLContext) -> str:
    """Connect, handshake and read; return the alert text the client got."""
    raw = socket.create_connection(("127.0.0.1", harness.port), timeout=5)
    try:
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            # TLS 1.3: the client's handshake completes before the server has judged its
            # certificate; the alert arrives at the first read.
            data = sock.recv(1024)
            assert data == b"", "the gateway must not answer a refused client"
    except ssl.SSLError as exc:
        return str(exc)
    except ConnectionResetError:
        return "reset"
    finally:
        raw.close()
    return "closed"


@pytest.mark.parametrize("flag", ["-tls1_2", "-tls1_3"])
def test_no_client_certificate_is_refused_and_recorded(
    harness: Harness, pki: Pki, flag: str
) -> None:
    mark = harness.mark()
    result = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{harness.port}",
            "-CAfile",
            str(pki.chain),
            "-servername",
            "localhost",
            "-ign_eof",
            flag,
        ],
        input=b"",
        capture_output=True,
        timeout=15,
    )
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert "certificate required" in output or "handshake failure" in output, output
    (row,) = harness.wait_events(after=mark, type="tls_handshake")
    assert row["outcome"] == "denied"
    assert row["reason"] == "no_client_certificate"
    assert row["peer_address"].startswith("127.0.0.1:")
    assert row["tls_version"] in ("TLSv1.2", "TLSv1.3", None)


@pytest.mark.parametrize("tls_version", [TLS12, TLS13])
def test_rogue_ca_is_unknown_issuer(
    harness: Harness, make_device: DeviceFactory, tmp_path: Path, tls_version: ssl.TLSVersion
) -> None:
    init_pki(tmp_path / "rogue", passphrase=b"rogue", force=True)
    rogue = load_ca(tmp_path / "rogue", b"rogue")
    genuine = make_device("victim")
    forged = make_device(device_id=genuine.device_id, ca=rogue, register=False)
    mark = harness.mark()
    context = client_context(forged, genuine.chain, tls_version=tls_version)
    alert = _handshake_refused(harness, context)
    assert "unknown ca" in alert.lower(), alert
    (row,) = harness.wait_events(after=mark, type="tls_handshake")
    assert row["reason"] == "unknown_issuer"
    assert json.loads(row["detail"])["verify_code"] in (20, 21, 2)


@pytest.mark.parametrize(
    ("not_before", "not_after", "reason", "alert"),
    [
        (-10, -1, "certificate_expired", "certificate expired"),
        (2, 10, "certificate_not_yet_valid", "bad certificate"),
    ],
)
@pytest.mark.parametrize("tls_version", [TLS12, TLS13])
def test_certificate_validity(
    harness: Harness,
    make_device: DeviceFactory,
    tls_version: ssl.TLSVersion,
    not_before: int,
    not_after: int,
    reason: str,
    alert: str,
) -> None:
    now = datetime.now(UTC)
    device = make_device(
        not_before=now + timedelta(days=not_before), not_after=now + timedelta(days=not_after)
    )
    mark = harness.mark()
    text = _handshake_refused(
        harness, client_context(device, device.chain, tls_version=tls_version)
    )
    assert alert in text.lower() or "certificate" in text.lower(), text
    (row,) = harness.wait_events(after=mark, type="tls_handshake")
    assert row["reason"] == reason
    assert row["outcome"] == "denied"


def test_plaintext_is_a_tls_protocol_error(harness: Harness) -> None:
    mark = harness.mark()
    with socket.create_connection(("127.0.0.1", harness.port), timeout=5) as sock:
        peer = f"127.0.0.1:{sock.getsockname()[1]}"
        sock.sendall(b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04abcd")
        # OpenSSL sends no alert for a record that is not TLS at all: just the close.
        assert sock.recv(1024)[:1] in (b"", b"\x15")
    (row,) = harness.wait_events(after=mark, type="tls_handshake", peer_address=peer)
    assert row["reason"] == "tls_protocol_error"


def test_handshake_timeout(harness: Harness) -> None:
    mark = harness.mark()
    with socket.create_connection(("127.0.0.1", harness.port), timeout=5) as sock:
        peer = f"127.0.0.1:{sock.getsockname()[1]}"
        assert sock.recv(1024) == b""  # closed after handshake_timeout (1.5 s here)
    (row,) = harness.wait_events(after=mark, type="tls_handshake", peer_address=peer)
    assert row["reason"] == "handshake_timeout"


def test_connect_timeout(harness: Harness, make_device: DeviceFactory) -> None:
    device = make_device()
    mark = harness.mark()
    with RawClient(harness.port, device, device.chain) as client:
        assert client.closed(timeout=5)
    (row,) = harness.wait_events(after=mark, type="connect")
    assert row["reason"] == "connect_timeout"
    assert row["device_id"] == device.device_id


@pytest.mark.parametrize(
    ("status", "cert_status", "register", "reason"),
    [
        ("active", "revoked", True, "certificate_revoked"),
        ("active", "superseded", True, "certificate_superseded"),
        ("disabled", "active", True, "device_disabled"),
        ("revoked", "active", True, "device_revoked"),
        ("active", "active", False, "device_unknown"),
    ],
)
@pytest.mark.parametrize(("version", "code"), [(4, 0x05), (5, 0x87)])
def test_registry_refusals(
    harness: Harness,
    make_device: DeviceFactory,
    status: str,
    cert_status: str,
    register: bool,
    reason: str,
    version: int,
    code: int,
) -> None:
    device = make_device(status=status, cert_status=cert_status, register=register)
    mark = harness.mark()
    with RawClient(harness.port, device, device.chain, version=version) as client:
        assert client.connect(device.device_id) == Connack(reason_code=code)
        assert client.closed()
    (row,) = harness.wait_events(after=mark, type="connect")
    assert (row["outcome"], row["reason"]) == ("denied", reason)
    assert row["cert_serial"] == device.serial
    assert row["cert_fingerprint"] == device.fingerprint


def test_identity_mismatch_is_certificate_invalid(
    pki: Pki, harness: Harness, tmp_path: Path
) -> None:
    """A certificate of our CA whose CN and SPIFFE id disagree is refused after the handshake."""
    spiffe_id = "spiffe://devicegate.local/fleet/plant/device/dev-b"
    cert_path, key_path, cert = hand_made(pki, tmp_path, "dev-a", spiffe_id)
    context = ssl.create_default_context(cafile=str(pki.chain))
    context.load_cert_chain(str(cert_path), str(key_path))
    mark = harness.mark()
    with (
        socket.create_connection(("127.0.0.1", harness.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        assert sock.recv(10) == b""  # closed right after the handshake
    (row,) = harness.wait_events(after=mark, type="tls_handshake")
    assert row["reason"] == "certificate_invalid"
    assert row["tls_version"] == "TLSv1.3"
    detail = json.loads(row["detail"])
    assert "does not match" in detail["error"]
    # Verified, but no device of ours: the certificate is named all the same.
    assert row["cert_serial"] == format(cert.serial_number, "x")
    assert detail["presented"]["subject"] == "CN=dev-a"


def test_a_padded_certificate_chain_is_refused_before_it_is_parsed(
    harness: Harness, make_device: DeviceFactory, tmp_path: Path
) -> None:
    """An attacker's 99 KB Certificate message (a real device's certificate and 180 CA
    copies, under OpenSSL's own 100 KiB limit) would cost ~38 ms of parsing and 0.9 MB per
    session; over the gateway's 16 KiB it is refused at its header, and recorded. The same
    device sending its ordinary chain (3 certificates) is admitted."""
    pytest.importorskip("gateway._tlsext")
    device = make_device("padded")
    padded = tmp_path / "padded.pem"
    padded.write_bytes(device.cert.read_bytes() + device.chain.read_bytes() * 90)
    context = ssl.create_default_context(cafile=str(device.chain))
    context.load_cert_chain(str(padded), str(device.key))
    mark = harness.mark()
    _handshake_refused(harness, context)  # asserts the gateway sent no answer
    (row,) = harness.wait_events(after=mark, type="tls_handshake")
    assert (row["outcome"], row["reason"]) == ("denied", "tls_protocol_error")
    assert "EXCESSIVE_MESSAGE_SIZE" in json.loads(row["detail"])["error"]
    assert row["device_id"] is None  # nothing of the chain was parsed, let alone trusted

    mark = harness.mark()
    with RawClient(harness.port, device, device.chain) as client:  # leaf + chain.pem's CAs
        assert client.connect(device.device_id).reason_code == 0
    rows = harness.wait_events(after=mark, type="connect", device_id=device.device_id)
    assert [(r["outcome"], r["reason"]) for r in rows] == [("allowed", "ok")]
