"""The TLS session ticket key file, shared by every gateway worker and instance.

Invariants:

* One key a line, 160 hex digits: a 16-byte name, a 32-byte AES-256-CBC key and a 32-byte
  HMAC-SHA256 key. The first line is the current key (it encrypts new tickets); the
  others only decrypt, so tickets issued before a rotation still resume (and are renewed
  under the current key). Lines starting with ``#`` are comments.
* The file is a secret like ``server.key``: whoever holds it can read every ticket's
  session (its master secret and the device certificate). It is written 0600, atomically
  (a temporary file renamed over it), so a worker never reads half a file.
* `rotate` puts a new key first and keeps the ``keep`` newest older ones: a key dropped
  from the file stops resuming its tickets (those devices do a full handshake).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Final

from schemas.errors import DevicegateError

__all__ = [
    "KEY_BYTES",
    "MAX_KEYS",
    "TICKET_KEYS_FILE",
    "TicketKeyError",
    "read_ticket_keys",
    "rotate_ticket_keys",
]

KEY_BYTES: Final = 80
MAX_KEYS: Final = 8
TICKET_KEYS_FILE: Final = "ticket-keys"
"""Its name in the PKI directory, where ``ca init`` writes it and the gateway looks by default."""
_HEADER: Final = (
    "# devicegate TLS session ticket keys: a secret, like server.key. First line encrypts,\n"
    "# every line decrypts. Rotate with `devicegate ticket-keys rotate`.\n"
)


class TicketKeyError(DevicegateError):
    """The ticket key file is missing or malformed (message says where)."""


def read_ticket_keys(path: Path) -> list[bytes]:
    """The keys in ``path``, current first.

    Raises:
        TicketKeyError: unreadable, empty, or a line that is not one key.
    """
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise TicketKeyError(f"cannot read ticket keys {path}: {exc}") from None
    keys: list[bytes] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = bytes.fromhex(line)
        except ValueError:
            key = b""
        if len(key) != KEY_BYTES:
            raise TicketKeyError(f"{path}:{number}: not a ticket key ({KEY_BYTES * 2} hex digits)")
        keys.append(key)
    if not keys:
        raise TicketKeyError(f"{path}: no ticket key (run `devicegate ticket-keys rotate`)")
    if len(keys) > MAX_KEYS:
        raise TicketKeyError(f"{path}: {len(keys)} keys, at most {MAX_KEYS}")
    return keys


def rotate_ticket_keys(path: Path, *, keep: int = 2) -> list[bytes]:
    """Put a new current key first in ``path`` (created if missing), keep ``keep`` older ones.

    Returns the keys written, current first.
    """
    if not 0 <= keep < MAX_KEYS:
        raise TicketKeyError(f"keep: 0 to {MAX_KEYS - 1} older keys")
    older = read_ticket_keys(path) if path.exists() else []
    keys = [secrets.token_bytes(KEY_BYTES), *older[:keep]]
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(_HEADER + "".join(f"{key.hex()}\n" for key in keys))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return keys
