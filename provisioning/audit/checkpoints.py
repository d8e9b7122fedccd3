"""Checking the signed checkpoints (`schemas.checkpoints`) for ``devicegate audit verify``.

`CheckpointSet` gathers the checkpoints of the database and, with ``--checkpoints DIR``, of
the external files; checks each chain of checkpoints (numbered without gaps, linked by
``prev``, signed by a trusted audit signer, its columns as signed, its newest the one
``audit_chains`` names); and hands the verifier, per event chain, the (seq -> hash) the
events must still match and the newest signed head they must reach.

Trust: a signer certificate counts only when the issuing CA in ``chain.pem`` (itself
issued by the root there) signed it directly, it names `AUDIT_SIGNER_NAME`, allows
digitalSignature, is no CA, and was valid when the checkpoint was made. Certificates are
looked up in ``audit_signers`` and ``<pki_dir>/audit.crt``; the table is only a place to
find them, never a reason to trust them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from schemas.checkpoints import AUDIT_CERT, AUDIT_SIGNER_NAME, Checkpoint, CheckpointError
from schemas.events import GENESIS_HASH

__all__ = ["CheckpointSet", "Problem", "TrustStore", "read_directory"]

Connection = Any


@dataclass(frozen=True, slots=True)
class Problem:
    """A checkpoint finding before it becomes a `provisioning.audit.verify.Finding`."""

    kind: str  # "checkpoint" or "truncated"
    chain_id: str
    seq: int
    message: str
    last_seq: int | None = None


class TrustStore:
    """Audit signer certificates, trusted only through ``chain.pem``."""

    def __init__(self, chain_pem: Path | None) -> None:
        self.issuers: list[x509.Certificate] = []
        self.error: str | None = None
        self._signers: dict[str, x509.Certificate | str] = {}
        if chain_pem is None:
            self.error = "no chain.pem given"
            return
        try:
            certificates = x509.load_pem_x509_certificates(chain_pem.read_bytes())
        except (OSError, ValueError) as exc:
            self.error = f"cannot read {chain_pem}: {exc}"
            return
        roots = [c for c in certificates if c.issuer == c.subject]
        for cert in certificates:
            if cert.issuer == cert.subject:
                continue
            for root in roots:
                try:
                    cert.verify_directly_issued_by(root)
                except Exception:  # noqa: S112 - any failure: not this root
                    continue
                self.issuers.append(cert)
        if not self.issuers:
            self.error = f"{chain_pem} holds no issuing CA under its root"

    def add(self, pem: str) -> None:
        """Consider a signer certificate (from the table or the PKI directory)."""
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
        except ValueError:
            return
        fp = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
        self._signers[fp] = self._check(cert)

    def _check(self, cert: x509.Certificate) -> x509.Certificate | str:
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not names or names[0].value != AUDIT_SIGNER_NAME:
            return f"signer {cert.subject.rfc4514_string()} is not an audit signer"
        try:
            usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
            basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            return "signer certificate lacks keyUsage or basicConstraints"
        if not usage.digital_signature or basic.ca:
            return "signer certificate may not sign checkpoints"
        for issuer in self.issuers:
            try:
                cert.verify_directly_issued_by(issuer)
            except Exception:  # noqa: S112 - not this issuer
                continue
            return cert
        return "signer certificate was not issued by the CA in chain.pem"

    def public_key(self, fingerprint: str, when: datetime) -> tuple[Any, str | None]:
        """(key, None) for a trusted signer valid at ``when``; (None, why) otherwise."""
        if self.error is not None:
            return None, f"cannot check signatures: {self.error}"
        found = self._signers.get(fingerprint)
        if found is None:
            return None, f"signer {fingerprint[:16]}... is unknown (certificate not found)"
        if isinstance(found, str):
            return None, found
        if not found.not_valid_before_utc <= when <= found.not_valid_after_utc:
            return None, f"signer certificate was not valid at {when.isoformat()}"
        return found.public_key(), None


def read_directory(directory: Path) -> tuple[list[Checkpoint], list[str]]:
    """Every checkpoint line of ``*.jsonl`` under ``directory``; and the unreadable lines."""
    found: list[Checkpoint] = []
    bad: list[str] = []
    for path in sorted(directory.rglob("*.jsonl")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                found.append(Checkpoint.parse(line))
            except CheckpointError as exc:
                bad.append(f"{path}:{number}: {exc}")
    return found, bad


@dataclass(slots=True)
class _Chain:
    stored: dict[int, Checkpoint] = field(default_factory=dict)
    external: dict[int, Checkpoint] = field(default_factory=dict)


@dataclass(slots=True)
class Expectation:
    """What the events of one chain must show, by the checkpoints."""

    hashes: dict[int, tuple[str, int]]  # seq -> (hash, checkpoint n)
    newest: tuple[int, str, int] | None  # (seq, hash, n) of the newest signed head


class CheckpointSet:
    """The checkpoints of the database and the external copies, checked."""

    def __init__(self, trust: TrustStore | None) -> None:
        self.trust = trust
        self.chains: dict[str, _Chain] = {}
        self.problems: list[Problem] = []

    async def load(self, conn: Connection) -> None:
        if not await conn.fetchval("SELECT to_regclass('audit_checkpoints') IS NOT NULL"):
            return
        for row in await conn.fetch("SELECT certificate FROM audit_signers"):
            if self.trust is not None:
                self.trust.add(row["certificate"])
        rows = await conn.fetch(
            "SELECT chain_id, n, seq, hash, body, digest, signature FROM audit_checkpoints"
        )
        for row in rows:
            try:
                cp = Checkpoint.parse(
                    f'{{"checkpoint":{row["body"]},"signature":"{row["signature"]}"}}'
                )
            except CheckpointError as exc:
                self.problems.append(Problem("checkpoint", row["chain_id"], row["seq"], str(exc)))
                continue
            if (cp.chain_id, cp.n, cp.seq, cp.hash, cp.digest) != (
                row["chain_id"], row["n"], row["seq"], row["hash"], row["digest"]
            ):  # fmt: skip
                self.problems.append(
                    Problem(
                        "checkpoint", row["chain_id"], row["seq"],
                        f"checkpoint {row['n']} of chain {row['chain_id']}: its columns are "
                        "not what was signed (edited)",
                    )
                )  # fmt: skip
            self.chains.setdefault(cp.chain_id, _Chain()).stored[cp.n] = cp

    def add_external(self, checkpoints: list[Checkpoint]) -> None:
        for cp in checkpoints:
            self.chains.setdefault(cp.chain_id, _Chain()).external[cp.n] = cp

    def check(self, genesis: dict[str, tuple[int, str, int, str | None]]) -> dict[str, Expectation]:
        """Check every chain of checkpoints; returns what each event chain must show.

        Args:
            genesis: chain -> (base_seq, base_hash, checkpoint_n, checkpoint_hash) from
                ``audit_chains``.
        """
        expected: dict[str, Expectation] = {}
        for chain_id, chain in sorted(self.chains.items()):
            merged: dict[int, Checkpoint] = dict(chain.stored)
            for n, cp in chain.external.items():
                stored = chain.stored.get(n)
                if stored is None:
                    self._problem(chain_id, cp.seq, f"checkpoint {n} (seq {cp.seq}) is in the "
                                  "external copies but not in the database (deleted)")  # fmt: skip
                elif stored.digest != cp.digest:
                    self._problem(chain_id, cp.seq, f"checkpoint {n} differs from its "
                                  "external copy (edited)")  # fmt: skip
                merged[n] = cp  # the external copy is the one that was signed
            expected[chain_id] = self._walk(chain_id, merged, genesis.get(chain_id))
        for chain_id, (_, _, newest_n, _) in genesis.items():
            if newest_n and chain_id not in self.chains:
                self._problem(chain_id, 0, f"audit_chains names checkpoint {newest_n} but the "
                              "chain has no checkpoints (deleted)")  # fmt: skip
        return expected

    def _walk(
        self,
        chain_id: str,
        checkpoints: dict[int, Checkpoint],
        genesis: tuple[int, str, int, str | None] | None,
    ) -> Expectation:
        hashes: dict[int, tuple[str, int]] = {}
        prev = GENESIS_HASH
        last_seq = -1
        newest: tuple[int, str, int] | None = None
        top = max(checkpoints)
        for n in range(1, top + 1):
            cp = checkpoints.get(n)
            if cp is None:
                self._problem(chain_id, 0, f"checkpoint {n} is missing (deleted)")
                prev = ""
                continue
            when = datetime.fromisoformat(str(cp.body["time"]))
            key, why = self.trust.public_key(cp.signer, when) if self.trust else (None, None)
            if self.trust is not None and (key is None or not cp.signature_valid(key)):
                why = why or "the signature does not verify (forged or edited)"
                self._problem(chain_id, cp.seq, f"checkpoint {n}: {why}")
                prev = cp.digest
                continue
            if prev and cp.body["prev"] != prev:
                self._problem(chain_id, cp.seq, f"checkpoint {n} does not follow checkpoint "
                              f"{n - 1} (the checkpoint chain was cut or rewritten)")  # fmt: skip
            if cp.seq < last_seq:
                self._problem(chain_id, cp.seq, f"checkpoint {n} goes back to seq {cp.seq}")
            if genesis is not None and (cp.body.get("base_seq"), cp.body.get("base_hash")) != (
                genesis[0], genesis[1]
            ):  # fmt: skip
                base = cp.body.get("base_seq")
                self._problem(chain_id, cp.seq, f"the chain's genesis is not the one "
                              f"checkpoint {n} signed (base seq {base})")  # fmt: skip
            prev, last_seq = cp.digest, cp.seq
            hashes[cp.seq] = (cp.hash, n)
            newest = (cp.seq, cp.hash, n)
        if genesis is not None and genesis[2] != top:
            self._problem(chain_id, 0, f"audit_chains names checkpoint {genesis[2]} as the "
                          f"newest, but the newest is {top} (deleted or rolled back)")  # fmt: skip
        return Expectation(hashes, newest)

    def _problem(self, chain_id: str, seq: int, message: str) -> None:
        self.problems.append(Problem("checkpoint", chain_id, seq, message))


def trust_store(pki_dir: Path | None) -> TrustStore:
    """The trust store of ``<pki_dir>/chain.pem``, knowing ``<pki_dir>/audit.crt`` too."""
    if pki_dir is None:
        return TrustStore(None)
    store = TrustStore(pki_dir / "chain.pem")
    if store.error is None and (pki_dir / AUDIT_CERT).exists():
        store.add((pki_dir / AUDIT_CERT).read_text())
    return store
