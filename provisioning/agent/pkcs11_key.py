"""A device key that lives in a PKCS#11 token: secure element, TPM, or SoftHSM2 in tests.

The key is named by a ``pkcs11:`` URI (RFC 7512), for example
``pkcs11:token=dev;object=idevid;type=private?pin-source=file:/etc/devicegate/pin``.
Python's ssl takes private keys from files only, so `pkcs11_client_context` loads the
certificate chain and hands the SSL_CTX a key of OpenSSL's pkcs11 engine
(``gateway._tlsext.use_engine_key``); every handshake signature is made inside the token,
and the key never leaves it (docs/secure-element.md).

Path attributes understood: ``token``, ``manufacturer``, ``serial``, ``model`` (which
token), ``object``, ``id`` (which key; at least one of them), ``type`` (``private`` if
given). Query attributes: ``pin-source`` (``file:/path`` or a path: the PIN is the file's
first line) and ``module-path`` (the PKCS#11 module). ``pin-value`` is refused: a PIN in a
URI ends up in process listings, shell histories and logs. Vendor attributes (``x-...``)
are ignored; anything else is an error rather than a silently different key.

Errors are `Pkcs11KeyError` with a one-line message and a `Pkcs11Failure` kind; nothing
else escapes (the C layer raises OSError, PermissionError, LookupError or ValueError).
"""

from __future__ import annotations

import os
import ssl
import stat
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

from provisioning.agent.device import present_own_chain
from schemas.errors import DevicegateError
from schemas.events import Reason

MAX_URI = 2048
"""Longest key URI accepted (a device's configuration, not peer input; bounded anyway)."""
MAX_PIN = 256
"""Longest PIN read from a pin file (PKCS#11 tokens allow far less)."""

_TOKEN_ATTRIBUTES = ("token", "manufacturer", "serial", "model")
_PATH_ATTRIBUTES = (*_TOKEN_ATTRIBUTES, "object", "id", "type")
_QUERY_ATTRIBUTES = ("pin-source", "module-path", "pin-value", "module-name")
# RFC 7512's pchar for attribute values, minus the separators: what stays unescaped.
_SAFE = "-._~!$'()*+,=:@/"


class Pkcs11Failure(StrEnum):
    """What went wrong, for a caller that reacts differently (retry, alert, give up)."""

    URI = "uri"
    PIN_FILE = "pin_file"
    MODULE = "module"
    ENGINE = "engine"
    TOKEN = "token"
    PIN = "pin"
    KEY = "key"
    MISMATCH = "mismatch"
    CERTIFICATE = "certificate"


_REASONS = {
    Pkcs11Failure.URI: Reason.REQUEST_INVALID,
    Pkcs11Failure.PIN_FILE: Reason.REQUEST_INVALID,
    Pkcs11Failure.MODULE: Reason.SERVICE_UNAVAILABLE,
    Pkcs11Failure.ENGINE: Reason.SERVICE_UNAVAILABLE,
    Pkcs11Failure.TOKEN: Reason.SERVICE_UNAVAILABLE,
    Pkcs11Failure.PIN: Reason.UNAUTHORIZED,
    Pkcs11Failure.KEY: Reason.NOT_FOUND,
    Pkcs11Failure.MISMATCH: Reason.CERTIFICATE_INVALID,
    Pkcs11Failure.CERTIFICATE: Reason.CERTIFICATE_INVALID,
}


class Pkcs11KeyError(DevicegateError):
    """The token's key cannot be used; ``failure`` says why, ``str()`` explains in a line."""

    def __init__(self, message: str, failure: Pkcs11Failure) -> None:
        super().__init__(message, reason=_REASONS[failure])
        self.failure = failure


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed ``pkcs11:`` URI (values decoded; ``id`` as bytes)."""

    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    object: str | None = None
    id: bytes | None = None
    pin_source: str | None = None
    module_path: str | None = None

    def engine_uri(self) -> str:
        """The URI for OpenSSL's pkcs11 engine: the key's path attributes only (it refuses
        query attributes it does not know, and the PIN goes to it separately)."""
        parts = [
            f"{name}={quote(value, safe=_SAFE)}"
            for name, value in (
                ("token", self.token),
                ("manufacturer", self.manufacturer),
                ("serial", self.serial),
                ("model", self.model),
                ("object", self.object),
            )
            if value is not None
        ]
        if self.id is not None:
            parts.append("id=" + "".join(f"%{byte:02x}" for byte in self.id))
        parts.append("type=private")
        return "pkcs11:" + ";".join(parts)

    def __str__(self) -> str:
        """The key's name, for messages (no PIN source: it says where a secret is)."""
        return self.engine_uri()


def _uri_error(message: str) -> Pkcs11KeyError:
    return Pkcs11KeyError(f"key URI: {message}", Pkcs11Failure.URI)


def parse_pkcs11_uri(uri: str) -> Pkcs11Uri:
    """Parse an RFC 7512 URI naming a private key; `Pkcs11KeyError` (URI) if it does not."""
    if len(uri) > MAX_URI:
        raise _uri_error(f"longer than {MAX_URI} characters")
    if not uri.startswith("pkcs11:"):
        raise _uri_error("does not start with 'pkcs11:'")
    path, _, query = uri[len("pkcs11:") :].partition("?")
    values: dict[str, str] = {}
    for section, separator, known in (
        (path, ";", _PATH_ATTRIBUTES),
        (query, "&", _QUERY_ATTRIBUTES),
    ):
        for item in section.split(separator) if section else ():
            name, equals, raw = item.partition("=")
            if not equals or not name:
                raise _uri_error(f"{item!r} is not name=value")
            if name.startswith("x-"):
                continue
            if name not in known:
                raise _uri_error(f"unknown attribute {name!r}")
            if name in values:
                raise _uri_error(f"{name!r} given twice")
            values[name] = raw
    if "pin-value" in values:
        raise _uri_error("pin-value is refused (a PIN in a URI leaks); use pin-source=file:...")
    if "module-name" in values:
        raise _uri_error("module-name is not supported; give module-path")
    if values.get("type", "private") != "private":
        raise _uri_error(f"type={values['type']}: the TLS key must be type=private")
    text: dict[str, str] = {}
    for name in (*_TOKEN_ATTRIBUTES, "object", "pin-source", "module-path"):
        if name in values:
            try:
                text[name] = unquote_to_bytes(values[name]).decode("utf-8")
            except UnicodeDecodeError as error:
                raise _uri_error(f"{name}: not UTF-8") from error
    key_id = unquote_to_bytes(values["id"]) if "id" in values else None
    if key_id == b"":
        raise _uri_error("id is empty")
    if "object" not in text and key_id is None:
        raise _uri_error("name the key with object= or id=")
    return Pkcs11Uri(
        token=text.get("token"),
        manufacturer=text.get("manufacturer"),
        serial=text.get("serial"),
        model=text.get("model"),
        object=text.get("object"),
        id=key_id,
        pin_source=text.get("pin-source"),
        module_path=text.get("module-path"),
    )


def _pin_path(source: str) -> Path:
    """A pin-source as a file path: ``file:///p``, ``file:/p`` or a plain path."""
    if source.startswith("file://"):
        rest = source[len("file://") :]
        if not rest.startswith("/"):
            raise Pkcs11KeyError(
                f"pin-source {source!r}: only local files (file:///path)", Pkcs11Failure.PIN_FILE
            )
        return Path(rest)
    if source.startswith("file:"):
        return Path(source[len("file:") :])
    if source.startswith("|"):
        raise Pkcs11KeyError("pin-source: commands are not supported", Pkcs11Failure.PIN_FILE)
    return Path(source)


def read_pin(path: Path) -> str:
    """The PIN: the file's first line without its line break. The file must be a regular
    file that neither group nor others can read (as a key file: 0600 or 0400)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as error:
        raise Pkcs11KeyError(
            f"pin file {path}: {error.strerror or error}", Pkcs11Failure.PIN_FILE
        ) from error
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise Pkcs11KeyError(f"pin file {path}: not a regular file", Pkcs11Failure.PIN_FILE)
        if info.st_mode & 0o077:
            raise Pkcs11KeyError(
                f"pin file {path}: mode {stat.S_IMODE(info.st_mode):04o}, "
                "must not be accessible to group or others (chmod 600)",
                Pkcs11Failure.PIN_FILE,
            )
        data = file.read(MAX_PIN + 2)
    line = data.split(b"\n", 1)[0].removesuffix(b"\r")
    if not line:
        raise Pkcs11KeyError(f"pin file {path}: empty", Pkcs11Failure.PIN_FILE)
    if len(line) > MAX_PIN or b"\0" in line:
        raise Pkcs11KeyError(f"pin file {path}: not a PIN", Pkcs11Failure.PIN_FILE)
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise Pkcs11KeyError(f"pin file {path}: not UTF-8", Pkcs11Failure.PIN_FILE) from error


def use_pkcs11_key(
    context: ssl.SSLContext,
    cert_path: Path,
    key_uri: str,
    module_path: Path | None = None,
    pin_file: Path | None = None,
    *,
    engine_path: Path | None = None,
) -> None:
    """Present ``cert_path`` (PEM, leaf first, then any intermediates) with the token's key.

    Args:
        context: the client context; its certificate and key are replaced.
        cert_path: the certificate of the key (for example the IDevID certificate).
        key_uri: the ``pkcs11:`` URI of the private key.
        module_path: the PKCS#11 module; else the URI's ``module-path``.
        pin_file: a file holding the PIN; else the URI's ``pin-source``; else no login.
        engine_path: OpenSSL's pkcs11 engine (``pkcs11.so``); else OpenSSL's engines dir.

    Raises:
        Pkcs11KeyError: the URI, the PIN file, the module, the token, the PIN, the key or
            the certificate; the context must then be discarded.
    """
    uri = parse_pkcs11_uri(key_uri)
    module = os.fspath(module_path) if module_path is not None else uri.module_path
    if module is None:
        raise _uri_error("no PKCS#11 module: give module-path= or the module path")
    if pin_file is not None:
        pin: str | None = read_pin(Path(pin_file))
    elif uri.pin_source is not None:
        pin = read_pin(_pin_path(uri.pin_source))
    else:
        pin = None
    try:
        # The agent's one use of the gateway package: the OpenSSL glue lives in one C
        # module (tests/foundation/test_import_boundaries.py allows exactly this import).
        from gateway import _tlsext
    except ImportError as error:
        raise Pkcs11KeyError(
            f"PKCS#11 keys need the C extension gateway._tlsext ({error})", Pkcs11Failure.ENGINE
        ) from error
    try:
        _tlsext.use_engine_key(
            context,
            os.fspath(cert_path),
            uri.engine_uri(),
            module,
            pin,
            engine_path=os.fspath(engine_path) if engine_path is not None else None,
        )
    except FileNotFoundError as error:
        raise Pkcs11KeyError(str(error), Pkcs11Failure.MODULE) from error
    except PermissionError as error:
        message = str(error) if pin is not None else f"{error}: no PIN was given (pin-source)"
        raise Pkcs11KeyError(message, Pkcs11Failure.PIN) from error
    except OSError as error:
        failure = Pkcs11Failure.MODULE if "module" in str(error) else Pkcs11Failure.ENGINE
        raise Pkcs11KeyError(str(error), failure) from error
    except LookupError as error:
        message = str(error)
        if pin is None:
            message += " (no PIN was given, and tokens show private keys only after login)"
        raise _not_found(_tlsext.pkcs11_token_labels, uri, module, message) from error
    except ValueError as error:
        failure = (
            Pkcs11Failure.MISMATCH if "does not match" in str(error) else Pkcs11Failure.CERTIFICATE
        )
        raise Pkcs11KeyError(str(error), failure) from error


def _not_found(
    token_labels: Callable[[str], list[str]], uri: Pkcs11Uri, module: str, message: str
) -> Pkcs11KeyError:
    """Which was missing: the token (the labels present say) or the key on it."""
    if uri.token is not None:
        try:
            labels = token_labels(module)
        except OSError:
            labels = []
        if uri.token not in labels:
            present = ", ".join(repr(label) for label in labels) or "none"
            return Pkcs11KeyError(
                f"no token labelled {uri.token!r} in {module} (tokens present: {present})",
                Pkcs11Failure.TOKEN,
            )
    return Pkcs11KeyError(message, Pkcs11Failure.KEY)


def pkcs11_client_context(
    cert_path: Path,
    key_uri: str,
    module_path: Path | None = None,
    pin_file: Path | None = None,
    *,
    ca_cert: Path | None = None,
    engine_path: Path | None = None,
) -> ssl.SSLContext:
    """A TLS client context presenting ``cert_path`` with the key ``key_uri`` of a token.

    The same settings as the agent's other client contexts (TLS 1.2 or later, the server
    verified against ``ca_cert``, or the system store when ``None``); see `use_pkcs11_key`
    for the other arguments.
    """
    context = ssl.create_default_context(cafile=os.fspath(ca_cert) if ca_cert else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    use_pkcs11_key(context, cert_path, key_uri, module_path, pin_file, engine_path=engine_path)
    present_own_chain(context)
    return context
