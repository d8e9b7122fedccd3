"""TLS that the gateway drives itself: an ``ssl.MemoryBIO`` pump with classified failures.

Why not ``start_server(ssl=...)``: it hides failed handshakes and sends no alert
(cpython#98078), so the gateway could neither record why a device was refused nor tell
the device. Here the socket stays plain TCP and this pump runs the handshake.

Invariants:

* Sans-IO: ``feed`` takes ciphertext and returns plaintext chunks; ``encrypt`` takes
  plaintext; ``take_outgoing`` returns every ciphertext byte OpenSSL produced since the last
  call (handshake flights, alerts, records). The caller writes it once per event, so one
  ``data_received`` costs at most one ``transport.write``.
* Every failure, during the handshake or at the first read after it (TLS 1.3 clients
  finish before the server has judged their certificate), raises `TlsFailure` with a
  `Reason`; the alert OpenSSL produced is left in the outgoing BIO for the caller to flush
  before closing.
* The server context: TLS 1.2+ (1.3 preferred), ECDHE + AEAD suites only on 1.2, a client
  certificate required and verified against ``chain.pem``, no session tickets (every
  connection presents and proves its certificate), no renegotiation, no compression.
  Every certificate in ``chain.pem`` is a trust anchor (``VERIFY_X509_PARTIAL_CHAIN``): a
  device chain ends at the issuing CA the operator configured, so OpenSSL does not verify
  the root's signature on that CA again in every handshake (~0.2 ms of ~1.1 ms).
"""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path
from typing import Final

from schemas.errors import DevicegateError
from schemas.events import Reason

__all__ = [
    "TlsFailure",
    "TlsPump",
    "classify",
    "server_context",
    "upstream_context",
]

TLS12_CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20"
# One TLS record holds at most 16 KiB of plaintext, and SSL_read returns at most a record;
# a bigger size only makes every read allocate (and mmap) a bigger buffer.
_READ_SIZE: Final = 16 * 1024 + 256

# OpenSSL X509_V_ERR_* codes.
_VERIFY_REASONS: Final = {
    2: Reason.UNKNOWN_ISSUER,  # unable to get issuer certificate
    9: Reason.CERTIFICATE_NOT_YET_VALID,
    10: Reason.CERTIFICATE_EXPIRED,
    18: Reason.UNKNOWN_ISSUER,  # self-signed leaf
    19: Reason.UNKNOWN_ISSUER,  # self-signed certificate in chain
    20: Reason.UNKNOWN_ISSUER,  # unable to get local issuer certificate
    21: Reason.UNKNOWN_ISSUER,  # unable to verify the first certificate
    23: Reason.CERTIFICATE_REVOKED,
}


class TlsFailure(DevicegateError):
    """The TLS connection failed; ``reason`` says why, ``detail`` what OpenSSL said."""

    def __init__(self, reason: Reason, detail: str, *, verify_code: int | None = None) -> None:
        super().__init__(detail, reason=reason)
        self.detail = detail
        self.verify_code = verify_code


def classify(exc: ssl.SSLError) -> TlsFailure:
    """Map an ``ssl`` exception to the reason it is recorded under."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        reason = _VERIFY_REASONS.get(code, Reason.CERTIFICATE_INVALID)
        return TlsFailure(reason, f"{exc.verify_message} ({code})", verify_code=code)
    library_reason = getattr(exc, "reason", None) or ""
    if library_reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_REQUIRED"):
        return TlsFailure(Reason.NO_CLIENT_CERTIFICATE, library_reason)
    return TlsFailure(Reason.TLS_PROTOCOL_ERROR, library_reason or str(exc))


def server_context(chain: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """The mutual-TLS server context (see the module invariants).

    Args:
        chain: PEM file of the CAs that issue device certificates (root + issuing).
        cert: The server certificate (with its chain).
        key: The server private key.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    context.num_tickets = 0
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.load_verify_locations(cafile=str(chain))
    context.load_cert_chain(str(cert), str(key))
    return context


def upstream_context(cafile: Path | None = None) -> ssl.SSLContext:
    """The client context for an ``mqtts://`` upstream (system trust unless ``cafile``)."""
    context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class TlsPump:
    """One server-side TLS connection over memory buffers."""

    __slots__ = ("_in", "_out", "_ssl", "eof", "handshake_complete")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._in, self._out, server_side=True)
        self.handshake_complete = False
        self.eof = False

    def feed(self, data: bytes) -> list[bytes]:
        """Take ciphertext from the peer; return the plaintext it completes.

        Raises:
            TlsFailure: the handshake or a record failed (alert pending in outgoing).
        """
        self._in.write(data)
        chunks: list[bytes] = []
        try:
            if not self.handshake_complete:
                self._ssl.do_handshake()
                self.handshake_complete = True
            read = self._ssl.read
            while True:
                chunk = read(_READ_SIZE)
                if not chunk:
                    self.eof = True
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self.eof = True
        except ssl.SSLError as exc:
            raise classify(exc) from None
        return chunks

    def encrypt(self, data: bytes | memoryview) -> None:
        """Queue plaintext for the peer (collect it with ``take_outgoing``)."""
        view = memoryview(data)
        write = self._ssl.write
        while view:
            written = write(view)
            view = view[written:]

    def close_notify(self) -> None:
        """Queue a close_notify alert (best effort)."""
        with contextlib.suppress(ssl.SSLError):
            self._ssl.unwrap()

    def take_outgoing(self) -> bytes:
        """Every ciphertext byte produced since the last call (maybe empty)."""
        return self._out.read() if self._out.pending else b""

    def peer_certificate(self) -> bytes | None:
        """The verified peer certificate (DER), once the handshake is complete."""
        return self._ssl.getpeercert(binary_form=True)

    def version(self) -> str | None:
        return self._ssl.version()

    def cipher(self) -> str | None:
        cipher = self._ssl.cipher()
        return cipher[0] if cipher else None
