"""Bootstrap token and admin key secrets: generation, hashing, and what a token's state is.

Invariants:
- A secret is shown once, at creation; only ``sha256(secret)`` is stored. Lookups go through
  the hash (an index lookup), so no secret is ever compared byte by byte.
- Token secrets carry 256 bits from `secrets` behind a prefix that makes them greppable in
  leaked logs (``dgt_`` for tokens, ``dgk_`` for admin keys).
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime
from typing import Literal

from schemas.events import Reason

TOKEN_PREFIX = "dgt_"
ADMIN_KEY_PREFIX = "dgk_"

TokenState = Literal["active", "expired", "exhausted", "revoked"]


def new_secret(prefix: str) -> str:
    """A fresh secret: ``prefix`` + 43 URL-safe characters (256 random bits)."""
    return prefix + secrets.token_urlsafe(32)


def secret_hash(secret: str) -> bytes:
    """The stored form of a secret."""
    return hashlib.sha256(secret.encode()).digest()


def token_state(
    *, revoked_at: datetime | None, uses_left: int, expires_at: datetime, now: datetime
) -> TokenState:
    """The state a token is in; revocation wins over expiry, expiry over exhaustion."""
    if revoked_at is not None:
        return "revoked"
    if expires_at <= now:
        return "expired"
    if uses_left <= 0:
        return "exhausted"
    return "active"


REFUSAL_REASON: dict[TokenState, Reason] = {
    "revoked": Reason.TOKEN_REVOKED,
    "expired": Reason.TOKEN_EXPIRED,
    "exhausted": Reason.TOKEN_EXHAUSTED,
}
"""Why a token in a given state cannot be used."""


_BASE32 = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648 base32, lowercase


def new_device_id(fleet: str) -> str:
    """``<fleet>-<12 base32 characters>``: 60 random bits, lowercase, DNS- and topic-safe."""
    # 12 five-bit digits of one 60-bit draw (as the first 12 characters of base32 of random
    # bytes, without `base64.b32encode`, which is slow pure Python).
    bits = secrets.randbits(60)
    return f"{fleet}-" + "".join(_BASE32[(bits >> shift) & 31] for shift in range(55, -5, -5))
