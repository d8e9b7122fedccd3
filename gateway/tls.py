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
  certificate required and verified against ``chain.pem``, no session tickets unless
  `gateway.tickets.TicketKeys` turns them on (shared keys, bounded lifetime), no
  renegotiation, no compression.
  Every certificate in ``chain.pem`` is a trust anchor (``VERIFY_X509_PARTIAL_CHAIN``): a
  device chain ends at the issuing CA the operator configured, so OpenSSL does not verify
  the root's signature on that CA again in every handshake (~0.2 ms of ~1.1 ms).
  A device's Certificate message may hold at most 16 KiB (with the accelerator; OpenSSL's
  default is 100 KiB): OpenSSL parses every certificate sent before verifying any, so a
  padded chain would cost ~38 ms of CPU per handshake (refused: ``tls_protocol_error``,
  ``EXCESSIVE_MESSAGE_SIZE``).
* A refused certificate is named: with the TLS accelerator (``gateway/_tlsext.c``) built,
  `server_context` installs an OpenSSL verify callback that keeps the refused leaf, and
  `TlsFailure.presented` carries its DER (with ``verify_depth``, the depth of the
  certificate that failed). Without it (`CAPTURES_PRESENTED` false, the gateway warns at
  start) refusals carry the verify code only. OpenSSL's verdict is never changed.
* ``version`` and ``cipher`` are known before the handshake completes: ``ssl`` reports
  them only after, so a refused handshake's come from OpenSSL through the accelerator
  (without it: the TLS 1.3 cipher and its protocol, which ``ssl`` does report early).
"""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path
from types import ModuleType
from typing import Final

from schemas.errors import DevicegateError
from schemas.events import Reason

_tlsext: ModuleType | None
try:
    from gateway import _tlsext
except ImportError:  # built without a C compiler or OpenSSL's headers
    _tlsext = None

__all__ = [
    "CAPTURES_PRESENTED",
    "Refused",
    "TlsFailure",
    "TlsPump",
    "capture_refusals",
    "classify",
    "refused_certificate",
    "server_context",
    "upstream_context",
]

CAPTURES_PRESENTED: Final = _tlsext is not None
"""Whether refusals name the presented certificate (the gateway warns at start when not)."""

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


# What the verify callback kept of a refused connection: (leaf DER, or None when it was
# too big to keep; X509_V_ERR code; depth of the certificate that failed).
Refused = tuple[bytes | None, int, int]


class TlsFailure(DevicegateError):
    """The TLS connection failed; ``reason`` says why, ``detail`` what OpenSSL said.

    ``presented`` is the peer's leaf certificate (DER) when one is known: the refused one
    (TLS accelerator built) or the verified one that names no device of ours.
    """

    def __init__(
        self,
        reason: Reason,
        detail: str,
        *,
        verify_code: int | None = None,
        verify_depth: int | None = None,
        presented: bytes | None = None,
    ) -> None:
        super().__init__(detail, reason=reason)
        self.detail = detail
        self.verify_code = verify_code
        self.verify_depth = verify_depth
        self.presented = presented


def classify(exc: ssl.SSLError, refused: Refused | None = None) -> TlsFailure:
    """Map an ``ssl`` exception to the reason it is recorded under.

    ``refused``: what the verify callback kept for this connection (`TlsPump` takes it).
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        reason = _VERIFY_REASONS.get(code, Reason.CERTIFICATE_INVALID)
        der, depth = (refused[0], refused[2]) if refused is not None else (None, None)
        return TlsFailure(
            reason,
            f"{exc.verify_message} ({code})",
            verify_code=code,
            verify_depth=depth,
            presented=der,
        )
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
    capture_refusals(context)
    if _tlsext is not None:
        _tlsext.limit_client_chain(context)  # 16 KiB, not OpenSSL's 100 KiB (see the C)
    return context


def capture_refusals(context: ssl.SSLContext) -> bool:
    """Make ``context``'s refused handshakes keep the presented leaf (`refused_certificate`).

    Returns whether it could (False without the TLS accelerator). Call it once the
    context is configured; setting ``verify_mode`` afterwards keeps it.
    """
    if _tlsext is None:
        return False
    _tlsext.capture_refusals(context)
    return True


def refused_certificate(ssl_object: ssl.SSLObject) -> Refused | None:
    """What the verify callback kept of this connection's refusal, once (then None).

    Take it right after the handshake raised: OpenSSL frees it with the connection.
    """
    if _tlsext is None:
        return None
    refused: Refused | None = _tlsext.take_refused(ssl_object._sslobj)  # type: ignore[attr-defined]
    return refused


def upstream_context(cafile: Path | None = None) -> ssl.SSLContext:
    """The client context for an ``mqtts://`` upstream (system trust unless ``cafile``)."""
    context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class TlsPump:
    """One server-side TLS connection over memory buffers."""

    __slots__ = ("_in", "_out", "_release", "_ssl", "eof", "handshake_complete")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._in, self._out, server_side=True)
        self.handshake_complete = False
        self.eof = False
        self._release = False  # the handshake just completed: free its buffers once flushed

    def feed(self, data: bytes) -> list[bytes]:
        """Take ciphertext from the peer; return the plaintext it completes.

        Raises:
            TlsFailure: the handshake or a record failed (alert pending in outgoing).
        """
        inbox = self._in
        inbox.write(data)
        chunks: list[bytes] = []
        try:
            if not self.handshake_complete:
                self._ssl.do_handshake()
                self.handshake_complete = True
                self._release = _tlsext is not None
            read = self._ssl.read
            # Read only while ciphertext waits: OpenSSL reads one record at a time (no
            # read-ahead) and each read returns all of a record's plaintext (_READ_SIZE),
            # so an empty BIO means nothing is left. A read that finds nothing would
            # allocate OpenSSL's 16.7 KiB record buffer, free it again and raise
            # SSLWantReadError: an exception and a malloc/free pair per input.
            while inbox.pending:
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
            raise classify(exc, refused_certificate(self._ssl)) from None
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
        """Every ciphertext byte produced since the last call (maybe empty).

        The first call after the handshake completed also frees what the handshake left
        behind (the memory BIOs keep their largest buffer, ~1.5-3 KiB each): an idle
        session holds no TLS buffer but OpenSSL's connection state.
        """
        out = self._out.read() if self._out.pending else b""
        if self._release:
            self._release = False
            assert _tlsext is not None
            _tlsext.release_buffers(self._ssl._sslobj)  # type: ignore[attr-defined]
        return out

    def peer_certificate(self) -> bytes | None:
        """The verified peer certificate (DER), once the handshake is complete."""
        return self._ssl.getpeercert(binary_form=True)

    def resumed(self) -> bool:
        """Whether the handshake resumed a session from a ticket (no certificate sent)."""
        return self._ssl.session_reused

    def version(self) -> str | None:
        """The TLS version, also of a handshake refused before it completed."""
        version = self._ssl.version()
        return version if version is not None else self._negotiated()[0]

    def cipher(self) -> str | None:
        """The cipher, also of a handshake refused before it completed."""
        cipher = self._ssl.cipher()
        if cipher is None and not self.handshake_complete:
            return self._negotiated()[1]
        return cipher[0] if cipher else None

    def _negotiated(self) -> tuple[str | None, str | None]:
        """(version, cipher) chosen so far: ssl reports them only once the handshake is done."""
        if _tlsext is not None:
            negotiated: tuple[str | None, str | None]
            negotiated = _tlsext.negotiated(self._ssl._sslobj)  # type: ignore[attr-defined]
            return negotiated
        cipher = self._ssl.cipher()  # TLS 1.3 only; our 1.2 and 1.3 suites are disjoint
        return (cipher[1], cipher[0]) if cipher else (None, None)
