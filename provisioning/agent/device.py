"""The device side: make a key, enroll, renew, and TLS settings for the gateway.

Files in the device directory: ``device.key`` (PKCS#8 PEM, 0600), ``device.crt`` and
``chain.pem`` (issuing + root). Renewal keeps them consistent across a crash: the new key is
first saved as ``device.key.next`` (before the request, so an issued certificate is never
orphaned), then the certificate and the key are renamed into place; `recover` finishes an
interrupted swap by matching public keys.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import AttributeOID, NameOID

from provisioning.agent.layout import CERT_FILE as CERT_FILE  # re-exported: the layout
from provisioning.agent.layout import CHAIN_FILE as CHAIN_FILE
from provisioning.agent.layout import KEY_FILE as KEY_FILE
from provisioning.agent.layout import NEXT_KEY_FILE as NEXT_KEY_FILE
from provisioning.agent.layout import KeyType as KeyType
from schemas.api import CertificateBundle, Problem
from schemas.errors import DevicegateError
from schemas.events import Reason

REQUEST_TIMEOUT = 30.0
"""Seconds for one enrollment or renewal request, connection included."""

DeviceKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


class EnrollmentError(DevicegateError):
    """The service refused, or could not be reached; ``reason`` is the service's code."""

    def __init__(self, message: str, *, reason: Reason | None = None, status: int = 0) -> None:
        super().__init__(message, reason=reason)
        self.status = status


def generate_key(key_type: KeyType = KeyType.P256) -> DeviceKey:
    """A new private key of ``key_type``."""
    if key_type is KeyType.P256:
        return ec.generate_private_key(ec.SECP256R1())
    if key_type is KeyType.P384:
        return ec.generate_private_key(ec.SECP384R1())
    if key_type is KeyType.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def build_csr(
    key: DeviceKey, *, common_name: str = "device", challenge_password: str | None = None
) -> x509.CertificateSigningRequest:
    """A CSR proving possession of ``key`` (the service ignores the subject); with
    ``challenge_password`` (an RFC 9266 channel binding, `enroll_idevid`) as an attribute."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    if challenge_password is not None:
        builder = builder.add_attribute(
            AttributeOID.CHALLENGE_PASSWORD, challenge_password.encode()
        )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)


def csr_pem(key: DeviceKey) -> str:
    return build_csr(key).public_bytes(serialization.Encoding.PEM).decode()


def key_pem(key: DeviceKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, *, secret: bool = False) -> None:
    """Write atomically (temporary file, fsync, rename); secrets are created 0600."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _make_dir(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def client_ssl_context(
    *, ca_cert: Path | None = None, directory: Path | None = None
) -> ssl.SSLContext:
    """TLS client settings for the provisioning service or the gateway.

    Args:
        ca_cert: trust anchors (``chain.pem``); the system store when ``None``.
        directory: a device directory whose certificate and key are presented (mutual TLS).
    """
    context = ssl.create_default_context(cafile=str(ca_cert) if ca_cert else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if directory is not None:
        recover(directory)
        context.load_cert_chain(directory / CERT_FILE, directory / KEY_FILE)
        present_own_chain(context)  # not chain.pem's CAs: the server has them
    return context


def gateway_ssl_context(directory: Path) -> ssl.SSLContext:
    """Mutual TLS to the gateway with the device's files (pass as aiomqtt ``tls_context``)."""
    return client_ssl_context(ca_cert=directory / CHAIN_FILE, directory=directory)


def mqtt_tls_parameters(directory: Path) -> Any:
    """The same as `gateway_ssl_context`, as ``aiomqtt.TLSParameters``."""
    import aiomqtt

    recover(directory)
    return aiomqtt.TLSParameters(
        ca_certs=str(directory / CHAIN_FILE),
        certfile=str(directory / CERT_FILE),
        keyfile=str(directory / KEY_FILE),
    )


def _public_der(key_or_cert: DeviceKey | x509.Certificate) -> bytes:
    public = key_or_cert.public_key()
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def recover(directory: Path) -> None:
    """Finish a renewal that was interrupted between writing the certificate and the key."""
    next_key = directory / NEXT_KEY_FILE
    if not next_key.exists():
        return
    try:
        certificate = x509.load_pem_x509_certificate((directory / CERT_FILE).read_bytes())
        key = serialization.load_pem_private_key(next_key.read_bytes(), None)
    except (OSError, ValueError):
        return
    if isinstance(key, DeviceKey) and _public_der(key) == _public_der(certificate):
        os.replace(next_key, directory / KEY_FILE)
        _fsync_dir(directory)
    else:  # the new certificate never arrived: the current pair is intact
        next_key.unlink()


async def _post(url: str, payload: dict[str, Any], context: ssl.SSLContext) -> CertificateBundle:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)) as session,
            session.post(url, json=payload, ssl=context) as response,
        ):
            body = await response.read()
            if response.status == 201:
                return CertificateBundle.model_validate_json(body)
            try:
                problem = Problem.model_validate_json(body)
            except ValueError:
                raise EnrollmentError(
                    f"{url}: HTTP {response.status}", status=response.status
                ) from None
            try:
                reason: Reason | None = Reason(problem.reason)
            except ValueError:
                reason = None
            raise EnrollmentError(
                f"{problem.title} ({problem.reason}): {problem.detail or ''}".rstrip(": "),
                reason=reason,
                status=response.status,
            )
    except (aiohttp.ClientError, TimeoutError, ssl.SSLError) as exc:
        raise EnrollmentError(f"cannot reach {url}: {exc}") from exc


def _save(directory: Path, bundle: CertificateBundle) -> None:
    _write(directory / CHAIN_FILE, bundle.chain.encode())
    _write(directory / CERT_FILE, bundle.certificate.encode())


async def enroll(
    *,
    url: str,
    token: str,
    out_dir: Path,
    hardware_id: str | None = None,
    ca_cert: Path | None = None,
    key_type: KeyType = KeyType.P256,
) -> CertificateBundle:
    """Make a key here, enroll it with a bootstrap token, write the device files.

    Args:
        url: base URL of the provisioning service (``https://host:8443``).

    Raises:
        EnrollmentError: refused (``reason`` set) or unreachable.
    """
    _make_dir(out_dir)
    key = generate_key(key_type)
    payload: dict[str, Any] = {"token": token, "csr": csr_pem(key)}
    if hardware_id is not None:
        payload["hardware_id"] = hardware_id
    context = client_ssl_context(ca_cert=ca_cert)
    bundle = await _post(url.rstrip("/") + "/v1/enroll", payload, context)
    _write(out_dir / KEY_FILE, key_pem(key), secret=True)
    _save(out_dir, bundle)
    _fsync_dir(out_dir)
    return bundle


async def renew(
    *,
    url: str,
    directory: Path,
    ca_cert: Path | None = None,
    key_type: KeyType | None = None,
) -> CertificateBundle:
    """Renew with the current certificate (mutual TLS) for a new key; replace the files.

    Args:
        ca_cert: trust anchors for the service; the directory's ``chain.pem`` by default.
        key_type: type of the new key; that of the current key by default.

    Raises:
        EnrollmentError: refused (``reason`` set) or unreachable.
    """
    recover(directory)
    current = serialization.load_pem_private_key((directory / KEY_FILE).read_bytes(), None)
    if key_type is None:
        key_type = _key_type_of(current)
    # The context loads the current pair, so it is made before the next key exists.
    context = client_ssl_context(ca_cert=ca_cert or directory / CHAIN_FILE, directory=directory)
    key = generate_key(key_type)
    _write(directory / NEXT_KEY_FILE, key_pem(key), secret=True)
    try:
        bundle = await _post(url.rstrip("/") + "/v1/renew", {"csr": csr_pem(key)}, context)
    except EnrollmentError as exc:
        if exc.status:  # refused: nothing was issued for the new key
            (directory / NEXT_KEY_FILE).unlink(missing_ok=True)
        raise
    _save(directory, bundle)
    os.replace(directory / NEXT_KEY_FILE, directory / KEY_FILE)
    _fsync_dir(directory)
    return bundle


# --- enrollment by manufacturer certificate (IDevID) ------------------------------------

EXPORTER_LABEL = "EXPORTER-Channel-Binding"  # RFC 9266; as provisioning.enrollment.idevid


def idevid_ssl_context(
    cert: Path, key: Path | str, *, ca_cert: Path | None = None
) -> ssl.SSLContext:
    """Mutual TLS 1.3 to the provisioning service with the manufacturer certificate (IDevID).

    ``key`` is a PEM file, or the ``pkcs11:`` URI (RFC 7512) of a key that never leaves its
    token or secure element (`provisioning.agent.pkcs11_key`, docs/secure-element.md).
    """
    context = ssl.create_default_context(cafile=str(ca_cert) if ca_cert else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_3  # tls-exporter channel binding
    if isinstance(key, str) and key.startswith("pkcs11:"):
        from provisioning.agent.pkcs11_key import use_pkcs11_key

        use_pkcs11_key(context, cert, key)
    else:
        context.load_cert_chain(cert, key)
    present_own_chain(context)  # the manufacturer's chain only if the file holds it
    return context


def present_own_chain(context: ssl.SSLContext) -> bool:
    """Make ``context`` present only its certificate file's chain.

    OpenSSL otherwise completes a client's chain from its trust store: a device whose CA
    file is ``chain.pem`` sends the issuing CA and the root with its certificate, which the
    gateway (its trust anchors are that file) never needs. Those two certificates cost the
    device ~1 KB of upload per full handshake, and the gateway, on OpenSSL 3.0, ~0.43 ms of
    CPU to parse them and ~10 KB per held session to keep them
    (bench/tls_handshake_cpu.py). Returns whether it could (False: the accelerator
    ``gateway._tlsext`` is not built, and OpenSSL's default stays).
    """
    try:
        from gateway import _tlsext
    except ImportError:
        return False
    _tlsext.no_auto_chain(context)
    return True


def tls_exporter(ssl_socket: ssl.SSLSocket | ssl.SSLObject) -> bytes | None:
    """The RFC 9266 tls-exporter value of a TLS 1.3 connection (None: not TLS 1.3, or the
    accelerator ``gateway._tlsext`` is not built)."""
    if ssl_socket.version() != "TLSv1.3":
        return None
    try:
        from gateway import _tlsext
    except ImportError:
        return None
    return _tlsext.export_keying_material(ssl_socket, EXPORTER_LABEL, 32, None)


def _post_bound(
    url: str, key: DeviceKey, context: ssl.SSLContext, *, channel_binding: bool
) -> tuple[int, bytes]:
    """``POST /v1/enroll`` with a CSR made after the handshake, so that it can carry the
    connection's tls-exporter value (blocking; run in a thread)."""
    parts = urlsplit(url)
    if parts.scheme != "https" or parts.hostname is None:
        raise EnrollmentError(f"{url}: an https:// URL is required")
    conn = http.client.HTTPSConnection(
        parts.hostname, parts.port or 443, context=context, timeout=REQUEST_TIMEOUT
    )
    try:
        conn.connect()
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        binding = tls_exporter(sock) if channel_binding else None
        if channel_binding and binding is None:
            raise EnrollmentError(
                "no tls-exporter channel binding: TLS 1.3 and gateway._tlsext are needed"
            )
        challenge = base64.b64encode(binding).decode() if binding is not None else None
        csr = build_csr(key, challenge_password=challenge).public_bytes(serialization.Encoding.PEM)
        body = json.dumps({"csr": csr.decode()}).encode()
        conn.request(
            "POST",
            parts.path.rstrip("/") + "/v1/enroll",
            body=body,
            headers={"Content-Type": "application/json"},
        )
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


async def enroll_idevid(
    *,
    url: str,
    idevid_cert: Path,
    idevid_key: Path | str,
    out_dir: Path,
    ca_cert: Path | None = None,
    key_type: KeyType = KeyType.P256,
    channel_binding: bool = True,
) -> CertificateBundle:
    """Enroll with the manufacturer certificate over mutual TLS (no token): a new
    operational key here, its CSR bound to the TLS connection, the device files written.

    Raises:
        EnrollmentError: refused (``reason`` set) or unreachable.
    """
    _make_dir(out_dir)
    key = generate_key(key_type)
    context = idevid_ssl_context(idevid_cert, idevid_key, ca_cert=ca_cert)
    try:
        status, body = await asyncio.to_thread(
            _post_bound, url, key, context, channel_binding=channel_binding
        )
    except (OSError, http.client.HTTPException) as exc:
        raise EnrollmentError(f"cannot reach {url}: {exc}") from exc
    if status != 201:
        raise _refusal(url, status, body)
    bundle = CertificateBundle.model_validate_json(body)
    _write(out_dir / KEY_FILE, key_pem(key), secret=True)
    _save(out_dir, bundle)
    _fsync_dir(out_dir)
    return bundle


def _refusal(url: str, status: int, body: bytes) -> EnrollmentError:
    try:
        problem = Problem.model_validate_json(body)
    except ValueError:
        return EnrollmentError(f"{url}: HTTP {status}", status=status)
    try:
        reason: Reason | None = Reason(problem.reason)
    except ValueError:
        reason = None
    return EnrollmentError(
        f"{problem.title} ({problem.reason}): {problem.detail or ''}".rstrip(": "),
        reason=reason,
        status=status,
    )


def _key_type_of(key: Any) -> KeyType:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return KeyType.ED25519
    if isinstance(key, rsa.RSAPrivateKey):
        return KeyType.RSA2048
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return KeyType.P384
    return KeyType.P256
