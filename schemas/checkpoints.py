"""Signed checkpoints of the audit chains: what bounds a database administrator.

A checkpoint says "chain C stood at seq S with hash H at time T", links to the chain's
previous checkpoint, and is signed with the audit key: a key `devicegate ca init` (or
``ca audit-key``) issues beside ``server.key``, whose certificate chains to ``chain.pem``.
The database never holds the private half, so nobody with only database access can make a
checkpoint; `audit verify` trusts a signer by its chain to the root, not by the table.

Invariants:
- The signed bytes are `canonical` of the body (sorted, compact JSON); ``digest`` is their
  SHA-256 and the next checkpoint of the chain names it in ``prev`` (the first names
  `GENESIS_HASH`), so the checkpoints of a chain form a chain of their own, numbered
  ``n = 1, 2, ...`` without gaps.
- A checkpoint covers only committed events: the gateway signs the head it has shipped,
  provisioning the head of ``event_chains`` it reads under the checkpoint's row lock.
- `write_checkpoint` numbers checkpoints under ``FOR UPDATE`` of the chain's
  ``audit_chains`` row (several provisioning processes share one chain), commits, and only
  then appends the line to the writer's own file (fsynced) and logs it: the external copies
  never hold a checkpoint the database rolled back.
- Each checkpoint also signs the chain's genesis (``base_seq``, ``base_hash``), so editing
  the genesis row to hide the oldest events is found too.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from schemas.errors import DevicegateError
from schemas.events import GENESIS_HASH, utcnow

__all__ = [
    "AUDIT_CERT",
    "AUDIT_KEY",
    "AUDIT_SIGNER_NAME",
    "AuditSigner",
    "Checkpoint",
    "CheckpointError",
    "append_line",
    "canonical",
    "checkpoint_file",
    "verify_signature",
    "write_checkpoint",
]

log = logging.getLogger("devicegate.audit.checkpoint")

AUDIT_KEY = "audit.key"
AUDIT_CERT = "audit.crt"
AUDIT_SIGNER_NAME = "devicegate audit signer"
"""The common name of every audit signing certificate."""

SigningKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


class CheckpointError(DevicegateError):
    """The audit key cannot be used, or a checkpoint line cannot be read."""


def canonical(body: dict[str, Any]) -> bytes:
    """The exact bytes that are signed and hashed."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _fingerprint(certificate: x509.Certificate) -> str:
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def verify_signature(public_key: Any, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` over ``data`` verifies with an Ed25519 or EC public key."""
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, data)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        else:
            return False
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True, slots=True)
class AuditSigner:
    """The audit key and its certificate (``audit.key`` 0600, ``audit.crt``)."""

    key: SigningKey
    certificate: x509.Certificate

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.certificate)

    @property
    def certificate_pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()

    def sign(self, data: bytes) -> bytes:
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            return self.key.sign(data)
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))

    @classmethod
    def load(cls, pki_dir: Path) -> AuditSigner:
        """Read ``audit.key`` and ``audit.crt`` from the PKI directory.

        Raises:
            CheckpointError: missing, unreadable, or the key is not the certificate's.
        """
        try:
            key = serialization.load_pem_private_key((pki_dir / AUDIT_KEY).read_bytes(), None)
            cert_pem = (pki_dir / AUDIT_CERT).read_bytes()
            certificate = x509.load_pem_x509_certificate(cert_pem)
        except FileNotFoundError as exc:
            raise CheckpointError(
                f"no audit key: {exc.filename} is missing (`devicegate ca audit-key` issues one)"
            ) from None
        except (OSError, ValueError, TypeError) as exc:
            raise CheckpointError(f"audit key in {pki_dir} unreadable: {exc}") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise CheckpointError(f"{pki_dir / AUDIT_KEY}: not an Ed25519 or EC key")
        der = serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(
            serialization.Encoding.DER, der
        ) != certificate.public_key().public_bytes(serialization.Encoding.DER, der):
            raise CheckpointError(f"{pki_dir / AUDIT_KEY} does not belong to {AUDIT_CERT}")
        return cls(key, certificate)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One signed checkpoint, as stored and as written to the external files."""

    body: dict[str, Any]
    digest: str
    signature: str  # base64

    @property
    def chain_id(self) -> str:
        return str(self.body["chain_id"])

    @property
    def n(self) -> int:
        return int(self.body["n"])

    @property
    def seq(self) -> int:
        return int(self.body["seq"])

    @property
    def hash(self) -> str:
        return str(self.body["hash"])

    @property
    def signer(self) -> str:
        return str(self.body["signer"])

    def line(self) -> str:
        """The checkpoint as one JSON line (the external file's and the log's form)."""
        return json.dumps(
            {"checkpoint": self.body, "digest": self.digest, "signature": self.signature},
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """A checkpoint from `line` output; ``digest`` is recomputed, not trusted.

        Raises:
            CheckpointError: not a checkpoint line.
        """
        try:
            data = json.loads(text)
            body = data["checkpoint"]
            signature = str(data["signature"])
            for name in ("chain_id", "n", "seq", "hash", "time", "prev", "signer"):
                body[name]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"not a checkpoint line: {exc}") from None
        return cls(body, hashlib.sha256(canonical(body)).hexdigest(), signature)

    @classmethod
    def make(
        cls,
        signer: AuditSigner,
        *,
        chain_id: str,
        n: int,
        seq: int,
        hash: str,
        prev: str,
        base: tuple[int, str],
        time: datetime | None = None,
    ) -> Checkpoint:
        body = {
            "v": 1,
            "chain_id": chain_id,
            "n": n,
            "seq": seq,
            "hash": hash,
            "time": (time or utcnow()).isoformat(),
            "prev": prev,
            "base_seq": base[0],
            "base_hash": base[1],
            "signer": signer.fingerprint,
        }
        data = canonical(body)
        signature = base64.b64encode(signer.sign(data)).decode()
        return cls(body, hashlib.sha256(data).hexdigest(), signature)

    def signature_valid(self, public_key: Any) -> bool:
        try:
            signature = base64.b64decode(self.signature, validate=True)
        except ValueError:
            return False
        return verify_signature(public_key, signature, canonical(self.body))


def checkpoint_file(directory: Path, name: str) -> Path:
    """The append-only file of one writer (``<dir>/<name>.jsonl``)."""
    return directory / f"{name.replace('/', '_')}.jsonl"


def append_line(path: Path, line: str) -> None:
    """Append ``line`` and fsync (blocking: call it from a thread)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


_LOCK = (
    "SELECT base_seq, base_hash, checkpoint_n, checkpoint_hash FROM audit_chains "
    "WHERE chain_id = $1 FOR UPDATE"
)
_LAST = "SELECT seq, hash FROM audit_checkpoints WHERE chain_id = $1 AND n = $2"
_INSERT = """
WITH signer AS (
    INSERT INTO audit_signers (fingerprint, certificate) VALUES ($9, $10)
    ON CONFLICT DO NOTHING
), moved AS (
    UPDATE audit_chains SET checkpoint_n = $2, checkpoint_hash = $7 WHERE chain_id = $1
)
INSERT INTO audit_checkpoints (chain_id, n, seq, hash, time, body, digest, signer, signature)
VALUES ($1, $2, $3, $4, $5, $6, $7, $9, $8)
"""


async def write_checkpoint(
    conn: Any,
    signer: AuditSigner,
    *,
    chain_id: str,
    head: tuple[int, str] | None,
    file: Path | None,
    force: bool = False,
) -> Checkpoint | None:
    """Sign and store a checkpoint of ``chain_id`` at ``head``; None when the newest
    checkpoint already names that head (unless ``force``) or the chain is not registered.

    Args:
        conn: an asyncpg connection, not inside a transaction.
        head: (seq, hash) committed; ``None``: read ``event_chains`` under the row lock
            (provisioning, whose writers keep that head in their transactions).
        file: the writer's external append-only file (None: none).
    """
    async with conn.transaction():
        row = await conn.fetchrow(_LOCK, chain_id)
        if row is None:
            return None
        if head is None:
            current = await conn.fetchrow(
                "SELECT seq, hash FROM event_chains WHERE chain_id = $1", chain_id
            )
            if current is None:
                return None
            head = (current["seq"], current["hash"])
        n = row["checkpoint_n"]
        if n and not force:
            last = await conn.fetchrow(_LAST, chain_id, n)
            if last is not None and (last["seq"], last["hash"]) == head:
                return None
        checkpoint = Checkpoint.make(
            signer,
            chain_id=chain_id,
            n=n + 1,
            seq=head[0],
            hash=head[1],
            prev=row["checkpoint_hash"] or GENESIS_HASH,
            base=(row["base_seq"], row["base_hash"]),
        )
        await conn.execute(
            _INSERT, chain_id, checkpoint.n, checkpoint.seq, checkpoint.hash,
            datetime.fromisoformat(checkpoint.body["time"]), canonical(checkpoint.body).decode(),
            checkpoint.digest, checkpoint.signature, signer.fingerprint, signer.certificate_pem,
        )  # fmt: skip
    line = checkpoint.line()
    if file is not None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, append_line, file, line)
        except OSError as exc:
            log.error("audit checkpoint not written to %s: %s", file, exc)
    log.info("audit checkpoint %s", line, extra={"audit_checkpoint": checkpoint.body})
    return checkpoint
