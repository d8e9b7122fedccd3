from __future__ import annotations

import os
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from provisioning.pki.ca import (
    DeviceIdentity,
    KeyNotAllowed,
    SignOptions,
    crl_url_of,
    derived_public_url,
    fingerprint,
    serial_hex,
    to_pem,
)
from provisioning.pki.directory import CAError, CAKeyType, init_pki, load_ca, load_private_key
from schemas.ticket_keys import TICKET_KEYS_FILE, read_ticket_keys
from tests.conftest import Pki

IDENTITY = DeviceIdentity("line-a-000001", "line-a", "devicegate.local")


def _options() -> SignOptions:
    return SignOptions.starting_now(validity=timedelta(days=30), backdate=timedelta(minutes=5))


def _openssl_verify(chain: Path, certificate: x509.Certificate, tmp_path: Path) -> str:
    leaf = tmp_path / "leaf.pem"
    leaf.write_text(to_pem(certificate))
    result = subprocess.run(
        ["openssl", "verify", "-purpose", "sslclient", "-CAfile", str(chain), str(leaf)],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout + result.stderr


@pytest.mark.parametrize(
    "key",
    [
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP384R1()),
        ed25519.Ed25519PrivateKey.generate(),
        rsa.generate_private_key(65537, 2048),
    ],
    ids=["ec-p256", "ec-p384", "ed25519", "rsa-2048"],
)
def test_device_certificate_verifies_and_carries_the_identity(
    pki: Pki, tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    before = datetime.now(UTC)
    certificate = pki.ca.issue_device_certificate(key.public_key(), IDENTITY, _options())
    assert _openssl_verify(pki.chain, certificate, tmp_path).strip().endswith(": OK")

    common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [attribute.value for attribute in common_names] == ["line-a-000001"]
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://devicegate.local/fleet/line-a/device/line-a-000001"
    ]
    eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    # notBefore is backdated by about five minutes; validity is thirty days.
    backdate = before - certificate.not_valid_before_utc
    assert timedelta(minutes=4) < backdate <= timedelta(minutes=5, seconds=1)
    validity = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert abs(validity - timedelta(days=30, minutes=5)) < timedelta(seconds=2)


@pytest.mark.parametrize(
    "key",
    [
        rsa.generate_private_key(65537, 1024),
        dsa.generate_private_key(2048),
        ec.generate_private_key(ec.SECP192R1()),
        ec.generate_private_key(ec.SECP256K1()),
    ],
    ids=["rsa-1024", "dsa", "p-192", "secp256k1"],
)
def test_weak_or_foreign_keys_are_not_certified(pki: Pki, key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(KeyNotAllowed):
        pki.ca.issue_device_certificate(key.public_key(), IDENTITY, _options())  # type: ignore[arg-type]


def test_serials_are_unique_and_fingerprints_are_sha256(pki: Pki) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    first = pki.ca.issue_device_certificate(key.public_key(), IDENTITY, _options())
    second = pki.ca.issue_device_certificate(key.public_key(), IDENTITY, _options())
    assert first.serial_number != second.serial_number
    assert serial_hex(first.serial_number) == format(first.serial_number, "x")
    assert len(fingerprint(first)) == 64


def test_pki_files_names_and_modes(pki: Pki) -> None:
    assert stat.S_IMODE(pki.directory.stat().st_mode) == 0o700
    for name in ("root-ca.key", "issuing-ca.key", "server.key", "audit.key", "ticket-keys"):
        assert stat.S_IMODE((pki.directory / name).stat().st_mode) == 0o600, name
    for name in ("root-ca.crt", "issuing-ca.crt", "chain.pem", "server.crt"):
        assert (pki.directory / name).is_file()
    chain = x509.load_pem_x509_certificates((pki.directory / "chain.pem").read_bytes())
    assert [c.subject.rfc4514_string() for c in chain] == [
        "CN=devicegate Issuing CA,O=devicegate",
        "CN=devicegate Root CA,O=devicegate",
    ]


def test_ca_keys_are_encrypted_and_the_server_key_is_not(pki: Pki) -> None:
    for name in ("root-ca.key", "issuing-ca.key"):
        data = (pki.directory / name).read_bytes()
        assert data.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        with pytest.raises(TypeError):
            serialization.load_pem_private_key(data, None)
    server_key = serialization.load_pem_private_key(
        (pki.directory / "server.key").read_bytes(), None
    )
    assert isinstance(server_key, ec.EllipticCurvePrivateKey)


def test_wrong_passphrase_names_the_key_file(pki: Pki) -> None:
    with pytest.raises(CAError) as raised:
        load_ca(pki.directory, b"not the passphrase")
    message = str(raised.value)
    assert str(pki.directory / "issuing-ca.key") in message
    assert "wrong CA passphrase" in message
    assert "\n" not in message
    with pytest.raises(CAError, match="is encrypted"):
        load_private_key(pki.directory / "root-ca.key", None)


def test_server_certificate_covers_the_listener_names(pki: Pki, tmp_path: Path) -> None:
    server = x509.load_pem_x509_certificates(pki.server_cert.read_bytes())[0]
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-purpose",
            "sslserver",
            "-CAfile",
            str(pki.chain),
            str(pki.server_cert),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.stdout.strip().endswith(": OK"), result.stdout + result.stderr


def test_p384_ca(tmp_path: Path) -> None:
    summary = init_pki(tmp_path / "pki", passphrase=b"passphrase", key_type=CAKeyType.P384)
    public = summary.issuing.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
    ca = load_ca(tmp_path / "pki", b"passphrase")
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = ca.issue_device_certificate(key.public_key(), IDENTITY, _options())
    assert _openssl_verify(tmp_path / "pki" / "chain.pem", leaf, tmp_path).strip().endswith(": OK")


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    first = init_pki(directory, passphrase=b"passphrase")
    with pytest.raises(CAError, match="--force"):
        init_pki(directory, passphrase=b"passphrase")
    assert load_ca(directory, b"passphrase").root == first.root
    replaced = init_pki(directory, passphrase=b"passphrase", force=True)
    assert replaced.root != first.root


def test_crl_lists_revoked_serials(pki: Pki, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    crl = pki.ca.build_crl([(0xABC, now), (0xDEF, now)])
    assert {entry.serial_number for entry in crl} == {0xABC, 0xDEF}
    path = tmp_path / "crl.pem"
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    text = subprocess.run(
        ["openssl", "crl", "-in", str(path), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Serial Number: 0ABC" in text and "Serial Number: 0DEF" in text
    assert crl.is_signature_valid(pki.ca.issuing.public_key())  # type: ignore[arg-type]


# --- the command line ------------------------------------------------------------------


def _devicegate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "provisioning.commands.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def test_help_lists_every_command_of_the_design() -> None:
    result = _devicegate("--help")
    assert result.returncode == 0
    for command in (
        "ca",
        "db",
        "admin-key",
        "token",
        "device",
        "cert",
        "serve",
        "enroll",
        "renew",
        "audit",
        "demo",
        "simulate",
    ):
        assert f" {command} " in result.stdout, command
    for group, commands in {
        "ca": ("init", "show"),
        "db": ("migrate",),
        "admin-key": ("create", "list", "revoke"),
        "token": ("create", "list", "revoke"),
        "device": ("list", "show", "disable", "enable", "revoke"),
        "cert": ("list", "revoke"),
        "serve": ("provisioning", "gateway"),
        "audit": ("summary", "verify", "prune"),
    }.items():
        result = _devicegate(group, "--help")
        assert result.returncode == 0, (group, result.stderr)
        for command in commands:
            assert f" {command} " in result.stdout, (group, command)


def test_ca_init_and_show_from_the_command_line(tmp_path: Path) -> None:
    env = {"DEVICEGATE_PKI_DIR": str(tmp_path / "pki"), "DEVICEGATE_CA_PASSPHRASE": "long enough"}
    refused = _devicegate(
        "ca",
        "init",
        env={"DEVICEGATE_PKI_DIR": str(tmp_path / "x"), "DEVICEGATE_CA_PASSPHRASE": ""},
    )
    assert refused.returncode == 2
    created = _devicegate("ca", "init", "--server-name", "gw.example", env=env)
    assert created.returncode == 0, created.stderr
    again = _devicegate("ca", "init", env=env)
    assert again.returncode == 1 and "--force" in again.stderr
    shown = _devicegate("ca", "show", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    # root, issuing, server, audit
    assert [line.count('"file"') for line in shown.stdout.splitlines()] == [1, 1, 1, 1]
    assert "gw.example" in shown.stdout
    wrong = _devicegate("db", "migrate", env={"DEVICEGATE_DATABASE_URL": "mysql://x"})
    assert wrong.returncode == 2
    assert "DEVICEGATE_DATABASE_URL" in wrong.stderr


def test_ca_init_without_passphrase_needs_explicit_consent(tmp_path: Path) -> None:
    env = {"DEVICEGATE_PKI_DIR": str(tmp_path / "pki")}
    os.environ.pop("DEVICEGATE_CA_PASSPHRASE", None)
    refused = _devicegate("ca", "init", env=env)
    assert refused.returncode == 2 and "passphrase" in refused.stderr
    assert not (tmp_path / "pki").exists()
    allowed = _devicegate("ca", "init", "--insecure-no-passphrase", env=env)
    assert allowed.returncode == 0, allowed.stderr
    assert (tmp_path / "pki" / "issuing-ca.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY")


def _server_crl_url(directory: Path) -> str | None:
    return crl_url_of(x509.load_pem_x509_certificates((directory / "server.crt").read_bytes())[0])


def test_ca_init_names_the_crl_of_public_url(tmp_path: Path) -> None:
    env = {
        "DEVICEGATE_PKI_DIR": str(tmp_path / "pki"),
        "DEVICEGATE_CA_PASSPHRASE": "long enough",
        "DEVICEGATE_PUBLIC_URL": "https://prov.example.com/",
    }
    created = _devicegate("ca", "init", "--server-name", "gw.example", env=env)
    assert created.returncode == 0, created.stderr
    assert "warning" not in created.stderr
    assert _server_crl_url(tmp_path / "pki") == "https://prov.example.com/v1/crl"
    assert "https://prov.example.com/v1/crl" in created.stdout


def test_ca_init_without_public_url_derives_it_and_warns(tmp_path: Path) -> None:
    env = {
        "DEVICEGATE_PKI_DIR": str(tmp_path / "pki"),
        "DEVICEGATE_CA_PASSPHRASE": "long enough",
        "DEVICEGATE_PROVISIONING_LISTEN": "0.0.0.0:9443",
    }
    os.environ.pop("DEVICEGATE_PUBLIC_URL", None)
    created = _devicegate("ca", "init", "--server-name", "gw.example", env=env)
    assert created.returncode == 0, created.stderr
    assert "DEVICEGATE_PUBLIC_URL is not set" in created.stderr
    assert "https://gw.example:9443/v1/crl" in created.stderr
    assert _server_crl_url(tmp_path / "pki") == "https://gw.example:9443/v1/crl"


def test_derived_public_url_brackets_ipv6() -> None:
    assert derived_public_url("2001:db8::1", "[::]:8443") == "https://[2001:db8::1]:8443"
    assert derived_public_url("127.0.0.1", "0.0.0.0:8443") == "https://127.0.0.1:8443"


def test_server_certificate_names_the_crl_when_asked(tmp_path: Path) -> None:
    with_url = init_pki(
        tmp_path / "a", passphrase=b"passphrase", crl_url="https://p.example/v1/crl"
    )
    assert crl_url_of(with_url.server) == "https://p.example/v1/crl"
    assert crl_url_of(init_pki(tmp_path / "b", passphrase=b"passphrase").server) is None


def test_a_new_pki_gets_new_ticket_keys(tmp_path: Path) -> None:
    """`ca init` writes one ticket key, and --force replaces it: a ticket issued under the
    old PKI must not resume under the new one."""
    first = init_pki(tmp_path, passphrase=b"passphrase")
    keys = read_ticket_keys(first.directory / TICKET_KEYS_FILE)
    again = init_pki(tmp_path, passphrase=b"passphrase", force=True)
    renewed = read_ticket_keys(again.directory / TICKET_KEYS_FILE)
    assert len(keys) == len(renewed) == 1 and keys != renewed
