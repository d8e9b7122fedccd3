"""Mutual TLS with the device key inside a PKCS#11 token (SoftHSM2 for a secure element).

A token is made in a temporary directory, an EC P-256 key pair is generated INSIDE it
(pkcs11-tool --keypairgen: sensitive, never extractable), a test manufacturer CA certifies
its public key as an IDevID certificate, and the device side (tests/provisioning/
pkcs11_client.py, one process per scenario) handshakes with it against ``openssl s_server``
and against a Python ssl server, both requiring a client certificate.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from provisioning.agent.pkcs11_key import (
    Pkcs11Failure,
    Pkcs11KeyError,
    parse_pkcs11_uri,
    pkcs11_client_context,
    read_pin,
)
from provisioning.pki.directory import init_pki
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
MODULE = Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
PIN = "1234"
URI = "pkcs11:token=dev;object=idevid;type=private"
TIMEOUT = 30.0

pytestmark = pytest.mark.skipif(
    not MODULE.exists() or shutil.which("softhsm2-util") is None or not shutil.which("pkcs11-tool"),
    reason="SoftHSM2 and OpenSC's pkcs11-tool are needed",
)


@dataclass(frozen=True)
class Token:
    directory: Path
    env: dict[str, str]
    pin_file: Path
    idevid: Path  # the IDevID certificate of the key "idevid"
    idevid_der: bytes
    mfr: Path  # the manufacturer CA that issued it
    pki: Path  # devicegate's PKI: the servers' certificate and chain.pem


def _tool(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        ["pkcs11-tool", "--module", str(MODULE), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    return done.stdout


def _certify(
    public_der: bytes, mfr_key: ec.EllipticCurvePrivateKey, mfr: x509.Certificate
) -> x509.Certificate:
    public_key = serialization.load_der_public_key(public_der)
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Manufacturer"),
                    x509.NameAttribute(NameOID.SERIAL_NUMBER, "HW-0001"),
                ]
            )
        )
        .issuer_name(mfr.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(mfr_key, hashes.SHA256())
    )


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Token:
    return make_token(tmp_path_factory)


def make_token(tmp_path_factory: pytest.TempPathFactory) -> Token:
    """A SoftHSM2 token "dev" holding the key "idevid" (made inside it) and its IDevID."""
    directory = tmp_path_factory.mktemp("softhsm")
    (directory / "tokens").mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\n"
        "log.level = ERROR\n"
    )
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "dev", "--pin", PIN,
         "--so-pin", "5678"],
        env=env, capture_output=True, timeout=TIMEOUT, check=True,
    )  # fmt: skip
    login = ("--login", "--pin", PIN)
    _tool(
        env,
        *login,
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--label",
        "idevid",
        "--id",
        "01",
    )
    _tool(
        env, *login, "--keypairgen", "--key-type", "EC:prime256v1", "--label", "other", "--id", "02"
    )
    public = directory / "idevid.pub.der"
    _tool(env, "--read-object", "--type", "pubkey", "--id", "01", "--output-file", str(public))

    mfr_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Manufacturer Root")])
    now = datetime.now(UTC)
    mfr = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(mfr_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(mfr_key, hashes.SHA256())
    )
    (directory / "mfr.pem").write_bytes(mfr.public_bytes(serialization.Encoding.PEM))
    idevid = _certify(public.read_bytes(), mfr_key, mfr)
    (directory / "idevid.pem").write_bytes(idevid.public_bytes(serialization.Encoding.PEM))

    pin_file = directory / "pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    init_pki(directory / "pki", passphrase=None)
    return Token(
        directory=directory,
        env=env,
        pin_file=pin_file,
        idevid=directory / "idevid.pem",
        idevid_der=idevid.public_bytes(serialization.Encoding.DER),
        mfr=directory / "mfr.pem",
        pki=directory / "pki",
    )


def _client(
    token: Token, *args: str, uri: str = URI, pin_file: Path | None = None
) -> tuple[int, dict[str, object]]:
    """Run the device client in its own process: (exit code, its JSON line)."""
    command = [
        sys.executable, "-m", "tests.provisioning.pkcs11_client",
        "--cert", str(token.idevid), "--uri", uri, "--ca", str(token.pki / "chain.pem"),
        "--pin-file", str(pin_file or token.pin_file), *args,
    ]  # fmt: skip
    if "--module" not in args:
        command += ["--module", str(MODULE)]
    done = subprocess.run(
        command, cwd=ROOT, env=token.env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode in (0, 1), f"client crashed ({done.returncode}): {done.stderr}"
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr
    return done.returncode, json.loads(lines[-1])


def _listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port (/proc/net/tcp, state 0A)."""
    wanted = f"0100007F:{port:04X}"
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(line.split()[1] == wanted and line.split()[3] == "0A" for line in lines)


# --- the handshakes ---------------------------------------------------------------------


def test_openssl_s_server_verifies_the_token_key(token: Token) -> None:
    port = free_port()
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-naccept", "1", "-www",
         "-cert", str(token.pki / "server.crt"), "-key", str(token.pki / "server.key"),
         "-Verify", "1", "-verify_return_error", "-CAfile", str(token.mfr)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT
        while not _listening(port):  # not by connecting: s_server takes one connection
            assert server.poll() is None and time.monotonic() < deadline, "s_server did not start"
            time.sleep(0.02)
        code, result = _client(token, "--port", str(port), "--send", "GET / HTTP/1.0\r\n\r\n")
        out, _ = server.communicate(timeout=TIMEOUT)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert code == 0, result
    page = str(result["reply"])
    # What s_server itself reports about the session it accepted (its -www page) ...
    assert "Verify return code: 0 (ok)" in page
    presented = page[page.index("-----BEGIN CERTIFICATE-----") :]
    presented = presented[: presented.index("-----END CERTIFICATE-----") + 25]
    assert x509.load_pem_x509_certificate(presented.encode()) == x509.load_der_x509_certificate(
        token.idevid_der
    )
    # ... and its log: the chain verified at both depths, nothing refused.
    assert "depth=0" in out and "verify error" not in out
    assert out.count("verify return:1") == 2


def test_python_server_requiring_a_client_certificate(token: Token) -> None:
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(token.pki / "server.crt", token.pki / "server.key")
    server_context.verify_mode = ssl.CERT_REQUIRED
    server_context.load_verify_locations(token.mfr)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    port = listener.getsockname()[1]
    seen: dict[str, object] = {}

    def serve() -> None:
        try:
            raw, _ = listener.accept()
            with server_context.wrap_socket(raw, server_side=True) as tls:
                tls.settimeout(TIMEOUT)
                der = tls.getpeercert(binary_form=True)
                seen["fingerprint"] = hashlib.sha256(der or b"").hexdigest()
                seen["version"] = tls.version()
                seen["request"] = tls.recv(100)
                tls.sendall(b"hello " + seen["fingerprint"].encode())  # type: ignore[union-attr]
        except Exception as error:  # reported by the assertions below
            seen["error"] = repr(error)
        finally:
            listener.close()

    thread = threading.Thread(target=serve, name="pkcs11-test-server", daemon=True)
    thread.start()
    code, result = _client(token, "--port", str(port))
    thread.join(TIMEOUT)
    assert code == 0, result
    assert "error" not in seen, seen
    expected = hashlib.sha256(token.idevid_der).hexdigest()
    assert seen["fingerprint"] == expected
    assert seen["request"] == b"ping\n"
    assert result["reply"] == f"hello {expected}"
    assert result["version"] == seen["version"] == "TLSv1.3"


def test_contexts_freed_while_the_engine_key_is_in_use(token: Token) -> None:
    """Three contexts share the token's key; two are freed before the handshake."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(token.pki / "server.crt", token.pki / "server.key")
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(token.mfr)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)

    def serve() -> None:
        try:
            raw, _ = listener.accept()
            with server.wrap_socket(raw, server_side=True) as tls:
                tls.settimeout(TIMEOUT)
                tls.recv(100)
                tls.sendall(b"ok")
        except (OSError, ssl.SSLError):
            pass
        finally:
            listener.close()

    thread = threading.Thread(target=serve, name="pkcs11-test-server", daemon=True)
    thread.start()
    code, result = _client(token, "--port", str(listener.getsockname()[1]), "--contexts", "3")
    thread.join(TIMEOUT)
    assert (code, result["reply"]) == (0, "ok"), result


# --- clean refusals ---------------------------------------------------------------------


def test_wrong_pin(token: Token, tmp_path: Path) -> None:
    wrong = tmp_path / "pin"
    wrong.write_text("9999\n")
    wrong.chmod(0o600)
    code, result = _client(token, pin_file=wrong)
    assert code == 1
    assert result["failure"] == Pkcs11Failure.PIN
    assert "CKR_PIN_INCORRECT" in str(result["error"])
    assert "9999" not in str(result["error"])


def test_missing_module(token: Token, tmp_path: Path) -> None:
    code, result = _client(token, "--module", str(tmp_path / "libnothere.so"))
    assert code == 1
    assert result["failure"] == Pkcs11Failure.MODULE
    assert "no such file" in str(result["error"])


def test_not_a_module(token: Token) -> None:
    code, result = _client(token, "--module", str(token.pin_file))
    assert (code, result["failure"]) == (1, Pkcs11Failure.MODULE)


def test_unknown_object(token: Token) -> None:
    code, result = _client(token, uri="pkcs11:token=dev;object=nosuchkey")
    assert code == 1
    assert result["failure"] == Pkcs11Failure.KEY
    assert "nosuchkey" in str(result["error"])


def test_unknown_token(token: Token) -> None:
    code, result = _client(token, uri="pkcs11:token=elsewhere;object=idevid")
    assert code == 1
    assert result["failure"] == Pkcs11Failure.TOKEN
    assert "tokens present: 'dev'" in str(result["error"])


def test_key_not_matching_the_certificate(token: Token) -> None:
    code, result = _client(token, uri="pkcs11:token=dev;object=other")
    assert code == 1
    assert result["failure"] == Pkcs11Failure.MISMATCH
    assert "does not match" in str(result["error"])


def test_no_pin_given(token: Token) -> None:
    """No PIN: the private key is not visible, and the message says why (no prompt)."""
    command = [
        sys.executable, "-m", "tests.provisioning.pkcs11_client", "--cert", str(token.idevid),
        "--uri", URI, "--ca", str(token.pki / "chain.pem"), "--module", str(MODULE),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, env=token.env, stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["failure"] == Pkcs11Failure.KEY
    assert "no PIN was given" in result["error"]


def test_key_by_id_with_module_and_pin_in_the_uri(token: Token) -> None:
    uri = f"pkcs11:token=dev;id=%01?module-path={MODULE}&pin-source=file:{token.pin_file}"
    command = [
        sys.executable, "-m", "tests.provisioning.pkcs11_client", "--cert", str(token.idevid),
        "--uri", uri, "--ca", str(token.pki / "chain.pem"),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, env=token.env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout) == {"ok": True}


# --- the key stays in the token ---------------------------------------------------------


def test_the_key_never_leaves_the_token(token: Token) -> None:
    listing = _tool(token.env, "--login", "--pin", PIN, "--list-objects", "--type", "privkey")
    block = listing[listing.index("label:      idevid") :]
    access = next(line for line in block.splitlines() if "Access:" in line)
    for flag in ("sensitive", "always sensitive", "never extractable", "local"):
        assert flag in access, listing
    # And what OpenSSL holds through the engine (what the agent's SSL_CTX holds) is a
    # handle: its private scalar is zero, the public point is the certificate's.
    held = subprocess.run(
        ["openssl", "pkey", "-engine", "pkcs11", "-inform", "engine", "-text", "-noout",
         "-in", f"{URI};pin-value={PIN}"],
        env=token.env, capture_output=True, text=True, timeout=TIMEOUT, check=True,
    ).stdout  # fmt: skip
    private = held[held.index("priv:") + 5 : held.index("pub:")]
    assert set(private.replace(":", " ").split()) == {"00"}, held
    public = held[held.index("pub:") + 4 : held.index("ASN1 OID")]
    point = bytes.fromhex("".join(public.replace(":", " ").split()))
    certified = x509.load_der_x509_certificate(token.idevid_der).public_key()
    assert isinstance(certified, ec.EllipticCurvePublicKey)
    assert point == certified.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


# --- the URI and the PIN file (pure, in this process) -----------------------------------


def test_uri_parsing() -> None:
    uri = parse_pkcs11_uri(
        "pkcs11:token=My%20Token;manufacturer=ACME;object=idevid;id=%01%ab;type=private;"
        "x-vendor=1?pin-source=file:/etc/pin&module-path=/usr/lib/p11.so"
    )
    assert uri.token == "My Token" and uri.manufacturer == "ACME"
    assert uri.object == "idevid" and uri.id == b"\x01\xab"
    assert uri.pin_source == "file:/etc/pin" and uri.module_path == "/usr/lib/p11.so"
    assert uri.engine_uri() == (
        "pkcs11:token=My%20Token;manufacturer=ACME;object=idevid;id=%01%ab;type=private"
    )
    assert "pin" not in str(uri)


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("file:/key.pem", "does not start with"),
        ("pkcs11:object=a;object=b", "given twice"),
        ("pkcs11:object=a;colour=red", "unknown attribute"),
        ("pkcs11:object=a?pin-value=1234", "pin-value is refused"),
        ("pkcs11:object=a;type=cert", "type=private"),
        ("pkcs11:token=dev", "object= or id="),
        ("pkcs11:object", "not name=value"),
        ("pkcs11:id=", "id is empty"),
        ("pkcs11:object=%ff", "not UTF-8"),
        ("pkcs11:object=" + "a" * 3000, "longer than"),
    ],
)
def test_bad_uris_are_refused_in_one_line(uri: str, says: str) -> None:
    with pytest.raises(Pkcs11KeyError) as caught:
        parse_pkcs11_uri(uri)
    assert caught.value.failure == Pkcs11Failure.URI
    assert says in str(caught.value) and "\n" not in str(caught.value)
    assert "1234" not in str(caught.value)


def test_pin_file_must_be_private(tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text("1234\r\n")
    pin.chmod(0o600)
    assert read_pin(pin) == "1234"
    pin.chmod(0o644)
    with pytest.raises(Pkcs11KeyError, match="chmod 600") as caught:
        read_pin(pin)
    assert caught.value.failure == Pkcs11Failure.PIN_FILE
    with pytest.raises(Pkcs11KeyError, match="No such file"):
        read_pin(tmp_path / "absent")


def test_bad_certificate_file(token: Token, tmp_path: Path) -> None:
    """In this process, but refused before the token is touched."""
    bogus = tmp_path / "cert.pem"
    bogus.write_text("not a certificate\n")
    with pytest.raises(Pkcs11KeyError) as caught:
        pkcs11_client_context(bogus, URI, MODULE, token.pin_file)
    assert caught.value.failure == Pkcs11Failure.CERTIFICATE
