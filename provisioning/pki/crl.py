"""The CRL: rebuilt when the set of revoked certificates changed, otherwise served from cache.

Each request reads the revoked serials (one indexed query), so a revocation made by any
process (CLI, another replica) shows in the very next CRL; signing happens only on change
or when half the validity of the cached CRL has passed.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from provisioning import store
from provisioning.pki.ca import CertificateAuthority

CRL_VALIDITY = timedelta(hours=1)


class CrlCache:
    """The current CRL of one issuing CA."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self._ca = ca
        self._key: bytes | None = None
        self._crl: x509.CertificateRevocationList | None = None
        self._lock = asyncio.Lock()

    async def current(self, conn: Any) -> x509.CertificateRevocationList:
        revoked = await store.revoked_serials(conn)
        key = hashlib.sha256(repr(revoked).encode()).digest()
        async with self._lock:
            now = datetime.now(UTC)
            crl = self._crl
            if crl is None or key != self._key or crl.last_update_utc + CRL_VALIDITY / 2 < now:
                crl = self._ca.build_crl(
                    ((int(serial, 16), at) for serial, at in revoked),
                    next_update=CRL_VALIDITY,
                    now=now,
                )
                self._crl, self._key = crl, key
            return crl


def encode(crl: x509.CertificateRevocationList, *, pem: bool) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM if pem else serialization.Encoding.DER)
