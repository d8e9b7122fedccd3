"""Verifying the hash chains of the auth event log (``devicegate audit verify``, the console).

`ChainVerifier` is the sans-IO core: rows of one chain in, `Finding` values out. It
recomputes every hash with `schemas.events.chain_hash`, the function the writers used.
`verify_chains` streams ``auth_events`` through it with a server-side cursor in one
repeatable-read snapshot, so memory stays flat over millions of rows.

What is reported, per chain (rows in ``seq`` order):

- ``altered``: a row's stored hash is not the hash of its content (an UPDATE).
- ``reordered``: a row is intact except its ``seq``: its hash verifies at another seq
  within `REORDER_WINDOW` (a swap of seq values).
- ``gap``: seqs missing between two rows, or before the first row when no recorded prune
  point explains the start (a DELETE).
- ``duplicate``: two rows share a seq (a forked writer).
- ``broken_link``: an intact row whose ``prev_hash`` is not the previous row's hash (or
  not `GENESIS_HASH` at seq 1). Not reported next to a row already reported: one edit, one
  finding.
- ``truncated``: ``event_chains`` (the head the in-transaction writers keep) is ahead of
  the last row, or disagrees with it: events were deleted from the end.

Known limit: an attacker who rewrites a row and recomputes every later hash of its chain is
caught only through ``event_chains`` heads or an external copy of the head hashes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

from schemas.events import GENESIS_HASH, AuthEvent, chain_hash

Connection = Any  # asyncpg.Connection (asyncpg ships no stubs)

FindingKind = Literal["altered", "reordered", "gap", "duplicate", "broken_link", "truncated"]
REORDER_WINDOW = 64
"""How far (in seq) a moved row is looked for before it is called altered instead."""

_COLUMNS = (
    "id, time, instance, type, outcome, reason, device_id, fleet, cert_serial, "
    "cert_fingerprint, client_id, peer_address, tls_version, tls_cipher, detail, "
    "chain_id, seq, prev_hash, hash"
)


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem in one chain.

    Attributes:
        kind: what is wrong (see the module docstring).
        chain_id: the chain.
        seq: the stored seq of the row concerned; for a gap, the first missing seq.
        event_id: the row concerned (for a gap: the row after it), if any.
        message: one human sentence with the evidence.
        last_seq: for a gap, the last missing seq; for ``reordered``, the seq the row
            belongs at.
        previous_id: for a gap or a broken link, the row before.
    """

    kind: FindingKind
    chain_id: str
    seq: int
    event_id: str | None
    message: str
    last_seq: int | None = None
    previous_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class VerifyReport:
    """What a verification run saw and found."""

    chains: int = 0
    events: int = 0
    findings: list[Finding] = field(default_factory=list)
    findings_total: int = 0
    since: datetime | None = None

    @property
    def ok(self) -> bool:
        return self.findings_total == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "chains": self.chains,
            "events": self.events,
            "findings_total": self.findings_total,
            "since": self.since.isoformat() if self.since else None,
            "findings": [finding.to_dict() for finding in self.findings],
        }


def row_event(row: Mapping[str, Any]) -> AuthEvent:
    """An `AuthEvent` from an ``auth_events`` row, without validation (for hashing)."""
    values = dict(row)
    detail = values.get("detail")
    if isinstance(detail, str):
        values["detail"] = json.loads(detail)
    return AuthEvent.model_construct(**values)


@dataclass(slots=True)
class _Previous:
    seq: int
    hash: str
    id: str
    flagged: bool


class ChainVerifier:
    """Checks the rows of one chain, fed in ``seq`` order.

    Args:
        chain_id: the chain.
        prune_points: (first_seq, prev_hash) where recorded prunes let this chain start.
        anchored: whether the first row fed must be the chain's start (False when rows
            before a ``--since`` time are left out: the first row is then taken as is).
    """

    def __init__(
        self,
        chain_id: str,
        *,
        prune_points: frozenset[tuple[int, str]] = frozenset(),
        anchored: bool = True,
    ) -> None:
        self.chain_id = chain_id
        self.prune_points = prune_points
        self.anchored = anchored
        self.previous: _Previous | None = None
        self.events = 0

    def feed(self, row: Mapping[str, Any]) -> list[Finding]:
        """Check one row; returns what is wrong with it (usually nothing)."""
        self.events += 1
        event = row_event(row)
        seq: int = row["seq"]
        event_id = str(row["id"])
        stored_hash: str = row["hash"]
        prev_hash: str = row["prev_hash"]
        findings: list[Finding] = []
        previous = self.previous

        linked = False  # whether this row's prev_hash should equal `expected_prev`
        expected_prev = GENESIS_HASH
        if previous is None:
            if seq == 1:
                linked = True
            elif self.anchored and (seq, prev_hash) not in self.prune_points:
                starts = [first for first, _ in self.prune_points if first < seq]
                first_missing = max(starts, default=1)
                findings.append(
                    Finding(
                        "gap", self.chain_id, first_missing, event_id,
                        f"chain starts at seq {seq}: seqs {first_missing}..{seq - 1} are "
                        "missing and no recorded prune explains it",
                        last_seq=seq - 1,
                    )
                )  # fmt: skip
        elif seq == previous.seq:
            findings.append(
                Finding(
                    "duplicate", self.chain_id, seq, event_id,
                    f"seq {seq} appears twice (events {previous.id} and {event_id})",
                    previous_id=previous.id,
                )
            )  # fmt: skip
        elif seq > previous.seq + 1:
            findings.append(
                Finding(
                    "gap", self.chain_id, previous.seq + 1, event_id,
                    f"seqs {previous.seq + 1}..{seq - 1} are missing between event "
                    f"{previous.id} (seq {previous.seq}) and event {event_id} (seq {seq})",
                    last_seq=seq - 1, previous_id=previous.id,
                )
            )  # fmt: skip
        else:
            linked = not previous.flagged
            expected_prev = previous.hash

        flagged = False
        if chain_hash(prev_hash, event) != stored_hash:
            flagged = True
            moved_to = self._original_seq(event, prev_hash, stored_hash, seq)
            if moved_to is not None:
                findings.append(
                    Finding(
                        "reordered", self.chain_id, seq, event_id,
                        f"event {event_id} is stored at seq {seq} but its hash verifies at "
                        f"seq {moved_to}",
                        last_seq=moved_to,
                    )
                )  # fmt: skip
            else:
                findings.append(
                    Finding(
                        "altered", self.chain_id, seq, event_id,
                        f"event {event_id} (seq {seq}) does not match its stored hash: "
                        "its content was changed",
                    )
                )  # fmt: skip
        elif linked and prev_hash != expected_prev:
            flagged = True
            findings.append(
                Finding(
                    "broken_link", self.chain_id, seq, event_id,
                    f"event {event_id} (seq {seq}) has prev_hash {prev_hash[:16]}..., "
                    f"but the previous hash is {expected_prev[:16]}...",
                    previous_id=previous.id if previous else None,
                )
            )  # fmt: skip
        self.previous = _Previous(seq, stored_hash, event_id, flagged or bool(findings))
        return findings

    def finish(self, head: tuple[int, str] | None) -> list[Finding]:
        """Compare the last row with the chain head kept in ``event_chains``, if any."""
        previous = self.previous
        if head is None or previous is None:
            return []
        head_seq, head_hash = head
        if head_seq > previous.seq:
            return [
                Finding(
                    "truncated", self.chain_id, previous.seq + 1, None,
                    f"the chain head is seq {head_seq} but the last stored event is seq "
                    f"{previous.seq}: seqs {previous.seq + 1}..{head_seq} were removed",
                    last_seq=head_seq, previous_id=previous.id,
                )
            ]  # fmt: skip
        if head_seq == previous.seq and head_hash != previous.hash:
            return [
                Finding(
                    "truncated", self.chain_id, head_seq, previous.id,
                    f"the chain head hash at seq {head_seq} differs from the stored event's",
                )
            ]  # fmt: skip
        return []

    @staticmethod
    def _original_seq(event: AuthEvent, prev_hash: str, stored_hash: str, seq: int) -> int | None:
        for distance in range(1, REORDER_WINDOW + 1):
            for candidate in (seq - distance, seq + distance):
                if candidate < 1:
                    continue
                moved = event.model_copy(update={"seq": candidate})
                if chain_hash(prev_hash, moved) == stored_hash:
                    return candidate
        return None


async def load_prune_points(conn: Connection) -> dict[str, frozenset[tuple[int, str]]]:
    """Recorded prune points by chain (empty when the table does not exist yet)."""
    if not await conn.fetchval("SELECT to_regclass('audit_prune_points') IS NOT NULL"):
        return {}
    points: dict[str, set[tuple[int, str]]] = {}
    for row in await conn.fetch("SELECT chain_id, first_seq, prev_hash FROM audit_prune_points"):
        points.setdefault(row["chain_id"], set()).add((row["first_seq"], row["prev_hash"]))
    return {chain: frozenset(values) for chain, values in points.items()}


async def verify_chains(
    conn: Connection,
    *,
    since: datetime | None = None,
    chain_id: str | None = None,
    max_findings: int = 10_000,
    prefetch: int = 5_000,
) -> VerifyReport:
    """Walk every chain (``ORDER BY chain_id, seq``) and report what does not verify.

    Args:
        conn: an asyncpg connection (not inside a transaction).
        since: only events at or after this time; each chain's first row is then trusted.
        chain_id: only this chain.
        max_findings: findings kept in the report (all are counted).
        prefetch: rows fetched per round trip of the server-side cursor.
    """
    report = VerifyReport(since=since)
    conditions: list[str] = []
    args: list[Any] = []
    if since is not None:
        args.append(since)
        conditions.append(f"time >= ${len(args)}")
    if chain_id is not None:
        args.append(chain_id)
        conditions.append(f"chain_id = ${len(args)}")
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    query = f"SELECT {_COLUMNS} FROM auth_events {where} ORDER BY chain_id, seq, id"  # noqa: S608

    def keep(findings: list[Finding]) -> None:
        report.findings_total += len(findings)
        room = max_findings - len(report.findings)
        report.findings.extend(findings[:room])

    async with conn.transaction(isolation="repeatable_read", readonly=True):
        points = await load_prune_points(conn)
        heads = {
            row["chain_id"]: (row["seq"], row["hash"])
            for row in await conn.fetch("SELECT chain_id, seq, hash FROM event_chains")
        }
        verifier: ChainVerifier | None = None
        seen: set[str] = set()
        async for row in conn.cursor(query, *args, prefetch=prefetch):
            if verifier is None or row["chain_id"] != verifier.chain_id:
                if verifier is not None:
                    keep(verifier.finish(heads.get(verifier.chain_id)))
                    seen.add(verifier.chain_id)
                name = row["chain_id"]
                verifier = ChainVerifier(
                    name, prune_points=points.get(name, frozenset()), anchored=since is None
                )
                report.chains += 1
            report.events += 1
            keep(verifier.feed(row))
        if verifier is not None:
            keep(verifier.finish(heads.get(verifier.chain_id)))
            seen.add(verifier.chain_id)
        for name, (head_seq, head_hash) in sorted(heads.items()):
            wanted = chain_id is None or name == chain_id
            explained = head_seq == 0 or (head_seq + 1, head_hash) in points.get(name, ())
            if wanted and since is None and name not in seen and not explained:
                keep(
                    [
                        Finding(
                            "truncated", name, 1, None,
                            f"chain head is seq {head_seq} but the chain has no events",
                            last_seq=head_seq,
                        )
                    ]
                )  # fmt: skip
    return report
