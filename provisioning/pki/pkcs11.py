"""CA keys in a PKCS#11 token (an HSM, or SoftHSM2): `Pkcs11Signer` and ``ca-keys.toml``.

``devicegate ca init --pkcs11-module ... --pkcs11-token ... --pkcs11-pin-file ...``
generates the root and issuing keys inside the token (`generate_ca_key`) and records where
they are in ``<pki_dir>/ca-keys.toml`` (`CaKeysRecord`); `provisioning.pki.directory.load_ca`
reads that record and signs through the token instead of ``issuing-ca.key``.

Invariants:
- A CA private key is generated in the token (CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE, not
  CKA_EXTRACTABLE) and never leaves it: digests go in, signatures come out. Hashing is done
  here (`signature_hash` of the CA key: SHA-256, SHA-384 for P-384); the token runs the
  plain CKM_ECDSA over the digest and returns r || s, encoded here as a DER ECDSA-Sig-Value.
- One logged-in session per process and token, opened on first use. Every call into a
  module holds that module's lock (one session is never used by two threads at once, and a
  re-initialisation never races a signature). A process forked after the session opened
  initialises the module again and opens its own (pid check): PKCS#11 handles do not
  survive fork.
- Any failure (module missing, token absent, wrong PIN, C_Sign failing, key missing or not
  the certificate's) raises `SignerUnavailable` with one line that names the module and the
  token; the session is dropped, so a token that comes back is used without a restart.
  After a failure the token is not tried again for `REOPEN_INTERVAL` (requests meanwhile
  are refused at once): an outage costs one attempt per second per process, whatever the
  request rate. A wrong PIN is not tried again until the PIN file changes (HSMs lock a user
  after a few wrong PINs).
- The PIN is read from its file (owner-only, mode 0600) each time a session opens; it is
  never logged nor kept in memory beyond the login.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pkcs11
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.types import PublicKey, SignMixin
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from provisioning.pki.signer import (
    SignerUnavailable,
    sign_certificate_raw,
    sign_crl_raw,
    signature_hash,
)

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Library

__all__ = [
    "REOPEN_INTERVAL",
    "CaKeysRecord",
    "KeyRef",
    "Pkcs11Signer",
    "TokenKey",
    "TokenRef",
    "generate_ca_key",
    "key_attributes",
    "read_pin",
]

REOPEN_INTERVAL = 1.0
"""Seconds after a failure before the token is tried again."""

_CURVE_OIDS = {"secp256r1": "1.2.840.10045.3.1.7", "secp384r1": "1.3.132.0.34"}

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TokenRef:
    """Which token of which PKCS#11 module, and the file holding its user PIN."""

    module: Path
    token: str
    pin_file: Path

    def __str__(self) -> str:
        return f"PKCS#11 token {self.token!r} ({self.module})"


@dataclass(frozen=True, slots=True)
class KeyRef:
    """One key pair in a token: CKA_LABEL and CKA_ID (several CAs may share a token)."""

    label: str
    key_id: bytes


@dataclass(frozen=True, slots=True)
class CaKeysRecord:
    """``ca-keys.toml``: the token and the labels/ids of the root and issuing keys."""

    token: TokenRef
    root: KeyRef
    issuing: KeyRef

    def render(self) -> bytes:
        def text(value: str) -> str:
            return json.dumps(value)  # a TOML basic string for any text

        return (
            "# Written by `devicegate ca init`: the CA keys are in this PKCS#11 token, not in\n"
            "# files. No secret here: the PIN is in pin_file (DEVICEGATE_PKCS11_PIN_FILE\n"
            "# overrides it). See docs/hsm.md.\n"
            'signer = "pkcs11"\n'
            f"module = {text(str(self.token.module))}\n"
            f"token = {text(self.token.token)}\n"
            f"pin_file = {text(str(self.token.pin_file))}\n"
            "\n[root]\n"
            f"label = {text(self.root.label)}\n"
            f"id = {text(self.root.key_id.hex())}\n"
            "\n[issuing]\n"
            f"label = {text(self.issuing.label)}\n"
            f"id = {text(self.issuing.key_id.hex())}\n"
        ).encode()

    @classmethod
    def read(cls, path: Path, *, pin_file: Path | None = None) -> CaKeysRecord:
        """Parse the record; ``pin_file`` (a setting) replaces the one recorded.

        Raises:
            SignerUnavailable: the file cannot be read or is not a valid record.
        """
        try:
            data: dict[str, Any] = tomllib.loads(path.read_text())
            if data.get("signer") != "pkcs11":
                raise ValueError(f"signer = {data.get('signer')!r}, expected 'pkcs11'")
            keys = {
                name: KeyRef(str(data[name]["label"]), bytes.fromhex(str(data[name]["id"])))
                for name in ("root", "issuing")
            }
            token = TokenRef(
                Path(str(data["module"])),
                str(data["token"]),
                pin_file or Path(str(data["pin_file"])),
            )
        except OSError as exc:
            raise SignerUnavailable(f"cannot read {path}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, ValueError, KeyError, TypeError) as exc:
            raise SignerUnavailable(f"{path} is not a valid CA key record: {exc}") from None
        return cls(token, keys["root"], keys["issuing"])


def read_pin(path: Path) -> str:
    """The first line of the PIN file, which only its owner may read.

    Raises:
        SignerUnavailable: missing, unreadable, empty, or readable by group or others.
    """
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise SignerUnavailable(
                f"PIN file {path} is readable by others (mode {mode & 0o777:o}); "
                f"run chmod 600 {path}"
            )
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise SignerUnavailable(f"cannot read the PIN file {path}: {exc.strerror}") from None
    if not lines or not lines[0]:
        raise SignerUnavailable(f"PIN file {path} is empty; write the user PIN on its first line")
    return lines[0]


class _Module:
    """One PKCS#11 module as this process uses it: loaded once, initialised again in a
    forked child or when a token may have appeared (SoftHSM2 lists tokens only at
    C_Initialize). ``generation`` counts initialisations: sessions of an older one are gone."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self._lib: Library | None = None
        self._pid = 0
        self.generation = 0

    def lib(self) -> Library:
        if self._lib is None:
            self._lib = pkcs11.lib(str(self.path))
            self._pid, self.generation = os.getpid(), self.generation + 1
        elif self._pid != os.getpid():
            self.reinitialize()
        return self._lib

    def reinitialize(self) -> None:
        if self._lib is not None:
            self._lib.reinitialize()
            self._pid, self.generation = os.getpid(), self.generation + 1


_modules: dict[Path, _Module] = {}
_modules_lock = threading.Lock()


def _module(path: Path) -> _Module:
    with _modules_lock:
        return _modules.setdefault(path, _Module(path))


class _Token:
    """The session of this process with one token."""

    def __init__(self, ref: TokenRef) -> None:
        self.ref = ref
        self.module = _module(ref.module)
        self._session: pkcs11.Session | None = None
        self._opened: tuple[int, int] = (0, 0)  # (pid, module generation) it belongs to
        self._keys: dict[KeyRef, SignMixin] = {}
        self._bad_pin: bytes | None = None  # digest of a PIN the token refused
        self._failed: tuple[float, str] | None = None  # (when, why) of the last failure

    def run(self, what: str, action: Callable[[pkcs11.Session], T]) -> T:
        """``action`` with the logged-in session, under the module's lock.

        Raises:
            SignerUnavailable: the token could not do it (the session is dropped).
        """
        with self.module.lock:
            try:
                return action(self._open())
            except SignerUnavailable as exc:
                self._drop(str(exc))
                raise
            except (pkcs11.PKCS11Error, OSError) as exc:
                message = f"{self.ref}: {what} failed: {_describe(exc)}"
                self._drop(message)
                raise SignerUnavailable(message) from None

    def private_key(self, session: pkcs11.Session, key: KeyRef) -> SignMixin:
        found = self._keys.get(key)
        if found is None:
            found = cast(
                SignMixin,
                session.get_key(
                    object_class=ObjectClass.PRIVATE_KEY, label=key.label, id=key.key_id
                ),
            )
            self._keys[key] = found
        return found

    def _open(self) -> pkcs11.Session:
        owner = (os.getpid(), self.module.generation)
        if self._session is not None and self._opened == owner:
            return self._session
        self._session, self._keys = None, {}  # another process's or initialisation's
        if self._failed is not None and time.monotonic() < self._failed[0] + REOPEN_INTERVAL:
            raise SignerUnavailable(self._failed[1])
        pin = read_pin(self.ref.pin_file)
        digest = hashlib.sha256(pin.encode()).digest()
        if self._bad_pin == digest:
            raise SignerUnavailable(
                f"{self.ref}: the PIN in {self.ref.pin_file} was refused; not trying it "
                "again (the token may lock): write the right PIN there"
            )
        lib = self.module.lib()
        try:
            session = self._login(lib, pin, digest)
        except SignerUnavailable:
            raise
        except pkcs11.PKCS11Error:
            # SoftHSM2 and others see tokens added, removed or put back only at
            # C_Initialize: initialise again (every session of this module is then
            # reopened on its next use, `generation`), and try once more.
            self.module.reinitialize()
            session = self._login(lib, pin, digest)
        self._bad_pin = self._failed = None
        self._session, self._opened = session, (os.getpid(), self.module.generation)
        return session

    def _login(self, lib: Library, pin: str, digest: bytes) -> pkcs11.Session:
        token = lib.get_token(token_label=self.ref.token)
        try:
            return token.open(rw=True, user_pin=pin)
        except (pkcs11.PinIncorrect, pkcs11.PinLenRange):
            self._bad_pin = digest
            raise SignerUnavailable(f"{self.ref}: wrong PIN (from {self.ref.pin_file})") from None

    def _drop(self, failure: str) -> None:
        if self._failed is None or time.monotonic() >= self._failed[0] + REOPEN_INTERVAL:
            self._failed = (time.monotonic(), failure)
        session, self._session, self._keys = self._session, None, {}
        if session is not None and self._opened == (os.getpid(), self.module.generation):
            with contextlib.suppress(pkcs11.PKCS11Error):  # gone with the token
                session.close()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {text}" if text and text != name else name


_tokens: dict[tuple[Path, str], _Token] = {}


def _token(ref: TokenRef) -> _Token:
    """The one `_Token` of this process for ``ref``'s module and label (a second session
    would log in twice: CKR_USER_ALREADY_LOGGED_IN); the PIN file last named is used."""
    with _modules_lock:
        token = _tokens.get((ref.module, ref.token))
    if token is None:
        candidate = _Token(ref)  # takes _modules_lock itself (`_module`)
        with _modules_lock:
            token = _tokens.setdefault((ref.module, ref.token), candidate)
    token.ref = ref
    return token


class TokenKey:
    """A private key in a token, with its public key: signs bytes, certificates and CRLs."""

    def __init__(self, ref: TokenRef, key: KeyRef, public_key: ec.EllipticCurvePublicKey) -> None:
        self.ref = ref
        self.key = key
        self.public_key = public_key
        hash_ = signature_hash(public_key)
        assert hash_ is not None  # EC keys always have one
        self.hash: hashes.SHA256 | hashes.SHA384 = hash_
        self._token = _token(ref)

    def sign_bytes(self, data: bytes) -> bytes:
        """A DER ECDSA signature over ``data`` (hashed here, signed in the token)."""
        digest = hashlib.new(self.hash.name, data).digest()

        def sign(session: pkcs11.Session) -> bytes:
            signature: bytes = self._token.private_key(session, self.key).sign(
                digest, mechanism=Mechanism.ECDSA
            )
            return signature

        raw = self._token.run(f"signing with key {self.key.label!r}", sign)
        half = len(raw) // 2
        return encode_dss_signature(
            int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        )

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return sign_certificate_raw(builder, self.hash, self.sign_bytes)

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder
    ) -> x509.CertificateRevocationList:
        return sign_crl_raw(builder, self.hash, self.sign_bytes)

    def check(self) -> None:
        """Open the session and find the key; its public key must be ours.

        Raises:
            SignerUnavailable: the token cannot be used, or holds another key there.
        """

        def public(session: pkcs11.Session) -> bytes:
            self._token.private_key(session, self.key)
            found = session.get_key(
                object_class=ObjectClass.PUBLIC_KEY, label=self.key.label, id=self.key.key_id
            )
            return encode_ec_public_key(cast(PublicKey, found))

        spki = self._token.run(f"finding key {self.key.label!r}", public)
        ours = self.public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if spki != ours:
            raise SignerUnavailable(
                f"{self.ref}: key {self.key.label!r} is not the key of its certificate"
            )


_REPORTED = {
    "token": Attribute.TOKEN,
    "private": Attribute.PRIVATE,
    "sensitive": Attribute.SENSITIVE,
    "always_sensitive": Attribute.ALWAYS_SENSITIVE,
    "extractable": Attribute.EXTRACTABLE,
    "never_extractable": Attribute.NEVER_EXTRACTABLE,
    "local": Attribute.LOCAL,
}


def key_attributes(ref: TokenRef, key: KeyRef) -> dict[str, bool]:
    """The protection attributes of a private key, as the token reports them
    (``sensitive``, ``extractable``, ``never_extractable``...).

    Raises:
        SignerUnavailable: the token cannot be used, or has no such key.
    """
    token = _token(ref)

    def read(session: pkcs11.Session) -> dict[str, bool]:
        found = session.get_key(
            object_class=ObjectClass.PRIVATE_KEY, label=key.label, id=key.key_id
        )
        return {name: bool(found[attribute]) for name, attribute in _REPORTED.items()}

    return token.run(f"reading key {key.label!r}", read)


def generate_ca_key(ref: TokenRef, key: KeyRef, curve: ec.EllipticCurve) -> TokenKey:
    """A new EC key pair stored in the token: the private half sensitive, not extractable.

    Raises:
        SignerUnavailable: the token cannot be used, or already holds a key of that label.
    """
    oid = _CURVE_OIDS.get(curve.name)
    if oid is None:
        raise SignerUnavailable(f"curve {curve.name} is not supported in a token (P-256, P-384)")
    token = _token(ref)

    def generate(session: pkcs11.Session) -> bytes:
        if any(True for _ in session.get_objects({Attribute.LABEL: key.label})):
            raise SignerUnavailable(f"{ref} already holds objects labelled {key.label!r}")
        parameters = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(oid)}, local=True
        )
        public, _ = parameters.generate_keypair(
            store=True,
            label=key.label,
            id=key.key_id,
            public_template={Attribute.VERIFY: True, Attribute.TOKEN: True},
            private_template={
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True,
                Attribute.DECRYPT: False,
                Attribute.DERIVE: False,
                Attribute.UNWRAP: False,
            },
        )
        return encode_ec_public_key(public)

    spki = token.run(f"generating key {key.label!r}", generate)
    public_key = serialization.load_der_public_key(spki)
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    return TokenKey(ref, key, public_key)


class Pkcs11Signer:
    """A `Signer` and `RawSigner` whose key is in a PKCS#11 token."""

    def __init__(self, key: TokenKey, certificate: x509.Certificate) -> None:
        self._key = key
        self._certificate = certificate

    @property
    def certificate(self) -> x509.Certificate:
        return self._certificate

    @property
    def key(self) -> TokenKey:
        return self._key

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return self._key.sign_certificate(builder)

    def sign_bytes(self, data: bytes) -> bytes:
        return self._key.sign_bytes(data)

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder
    ) -> x509.CertificateRevocationList:
        return self._key.sign_crl(builder)

    @classmethod
    def open(cls, record: CaKeysRecord, certificate: x509.Certificate) -> Pkcs11Signer:
        """The issuing key of ``record`` for ``certificate``; the token is opened lazily."""
        public_key = certificate.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise SignerUnavailable("a PKCS#11 issuing CA must have an EC key")
        return cls(TokenKey(record.token, record.issuing, public_key), certificate)
