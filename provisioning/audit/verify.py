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
- ``truncated``: ``event_chains`` (the head every writer moves with its events) or a
  signed checkpoint is ahead of the last row, or disagrees with it: events were deleted
  from the end.
- ``altered`` also when a row's hash is not the one a signed checkpoint names for its seq
  (the chain was rewritten and its hashes recomputed).
- ``checkpoint``: the signed checkpoints themselves were deleted, edited, forged or cut
  (see `provisioning.audit.checkpoints`).

Not findings, but named in the report (``notices``): chain boundaries (a chain whose
genesis follows another chain's head, or begins after history another database holds) and
``restored`` ranges: seqs a gateway found missing at start although it had shipped them
(its ``events_missing`` event names the range: a database restored from an older backup,
or rows deleted while the writer was down). They are explained, not silently passed.

What a person with full write access to the database can still hide (docs/security-model.md):
the events after the newest checkpoint of each chain (at most ``checkpoint_interval`` of
them while the writer runs; none after its shutdown checkpoint); with ``--checkpoints``,
whose copies live outside the database, deleting checkpoints too no longer helps.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from provisioning.audit.checkpoints import CheckpointSet, Expectation, TrustStore
from schemas.checkpoints import Checkpoint
from schemas.events import GENESIS_HASH, AuthEvent, EventType, chain_hash

Connection = Any  # asyncpg.Connection (asyncpg ships no stubs)

FindingKind = Literal[
    "altered", "reordered", "gap", "duplicate", "broken_link", "truncated", "checkpoint"
]
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


@dataclass(frozen=True, slots=True)
class Notice:
    """An explained boundary: not tampering, but worth reading (``boundary``, ``restored``)."""

    kind: Literal["boundary", "restored"]
    chain_id: str
    message: str

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
    notices: list[Notice] = field(default_factory=list)
    checkpoints: int = 0

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
            "checkpoints": self.checkpoints,
            "findings": [finding.to_dict() for finding in self.findings],
            "notices": [notice.to_dict() for notice in self.notices],
        }


def row_event(row: Mapping[str, Any]) -> AuthEvent:
    """An `AuthEvent` from an ``auth_events`` row, without validation (for hashing)."""
    values = dict(row)
    detail = values.get("detail")
    if isinstance(detail, str):
        values["detail"] = json.loads(detail)
    return AuthEvent.model_construct(**values)


_CHAINED = tuple(name for name in _COLUMNS.split(", ") if name not in ("prev_hash", "hash"))
_dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def row_hash(prev_hash: str, row: Mapping[str, Any]) -> str:
    """`schemas.events.chain_hash` of a row, without building an `AuthEvent` first (the
    verifier's hot path; a test holds it to the same bytes as `canonical_bytes`)."""
    values = {name: row[name] for name in _CHAINED}
    moment = values["time"].astimezone(UTC)
    values["time"] = (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:"
        f"{moment.minute:02d}:{moment.second:02d}.{moment.microsecond:06d}Z"
    )
    values["id"] = str(values["id"])
    detail = values["detail"]
    if isinstance(detail, str):
        values["detail"] = json.loads(detail)
    digest = hashlib.sha256(bytes.fromhex(prev_hash))
    digest.update(_dumps(values).encode())
    return digest.hexdigest()


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
        prune_points: (first_seq, prev_hash) where recorded prunes (or the chain's genesis)
            let this chain start.
        expect: what its signed checkpoints say the rows must show.
        anchored: whether the first row fed must be the chain's start (False when rows
            before a ``--since`` time are left out: the first row is then taken as is).
    """

    def __init__(
        self,
        chain_id: str,
        *,
        prune_points: frozenset[tuple[int, str]] = frozenset(),
        anchored: bool = True,
        expect: Expectation | None = None,
    ) -> None:
        self.chain_id = chain_id
        self.prune_points = prune_points
        self.anchored = anchored
        self.previous: _Previous | None = None
        self.events = 0
        self.expect = expect
        self.signed = expect.hashes if expect is not None else {}
        # Gaps wait for the chain's end: a later ``events_missing`` event may explain one.
        self.gaps: list[Finding] = []
        self.missing: set[tuple[int, int]] = set()
        self.notices: list[Notice] = []

    def feed(self, row: Mapping[str, Any]) -> list[Finding]:
        """Check one row; returns what is wrong with it (usually nothing)."""
        self.events += 1
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
        if row_hash(prev_hash, row) != stored_hash:
            flagged = True
            moved_to = self._original_seq(row_event(row), prev_hash, stored_hash, seq)
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
        signed = self.signed.get(seq) if self.signed else None
        if signed is not None and signed[0] != stored_hash and not flagged:
            flagged = True
            findings.append(
                Finding(
                    "altered", self.chain_id, seq, event_id,
                    f"event {event_id} (seq {seq}) has hash {stored_hash[:16]}..., but "
                    f"signed checkpoint {signed[1]} names {signed[0][:16]}...: the chain was "
                    "rewritten",
                )
            )  # fmt: skip
        if row["type"] == EventType.EVENTS_MISSING:
            self._missing(row)
        self.previous = _Previous(seq, stored_hash, event_id, flagged or bool(findings))
        gaps = [f for f in findings if f.kind == "gap"]
        if gaps:
            self.gaps.extend(gaps)
            return [f for f in findings if f.kind != "gap"]
        return findings

    def _missing(self, row: Mapping[str, Any]) -> None:
        detail = row["detail"]
        if isinstance(detail, str):
            detail = json.loads(detail)
        if isinstance(detail, dict) and detail.get("chain_id") == self.chain_id:
            first, last = detail.get("first_seq"), detail.get("last_seq")
            if isinstance(first, int) and isinstance(last, int):
                self.missing.add((first, last))

    def finish(self, head: tuple[int, str] | None) -> list[Finding]:
        """Compare the last row with the chain head kept in ``event_chains`` and the newest
        signed checkpoint; report the gaps no ``events_missing`` event explains."""
        findings: list[Finding] = []
        for gap in self.gaps:
            if (gap.seq, gap.last_seq) in self.missing:
                self.notices.append(
                    Notice(
                        "restored", self.chain_id,
                        f"seqs {gap.seq}..{gap.last_seq} are missing: the writer found them "
                        "shipped but absent at its start (database restored from an older "
                        "backup, or rows deleted while it was down)",
                    )
                )  # fmt: skip
            else:
                findings.append(gap)
        newest = self.expect.newest if self.expect is not None else None
        if newest is not None and self.anchored:
            last = self.previous.seq if self.previous is not None else 0
            if newest[0] > last:
                findings.append(
                    Finding(
                        "truncated", self.chain_id, last + 1, None,
                        f"signed checkpoint {newest[2]} names seq {newest[0]}, but the last "
                        f"stored event is seq {last}: seqs {last + 1}..{newest[0]} were removed",
                        last_seq=newest[0],
                        previous_id=self.previous.id if self.previous is not None else None,
                    )
                )  # fmt: skip
                return findings  # the event_chains head says the same or was moved back
        return findings + self._head(head)

    def _head(self, head: tuple[int, str] | None) -> list[Finding]:
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


async def load_genesis(conn: Connection) -> dict[str, Any]:
    """``audit_chains`` rows by chain (empty before migration 0006)."""
    if not await conn.fetchval("SELECT to_regclass('audit_chains') IS NOT NULL"):
        return {}
    rows = await conn.fetch(
        "SELECT chain_id, reason, base_seq, base_hash, previous_chain, previous_seq, "
        "checkpoint_n, checkpoint_hash FROM audit_chains"
    )
    return {row["chain_id"]: row for row in rows}


def _boundary(row: Mapping[str, Any]) -> Notice | None:
    if row["previous_chain"] is not None:
        return Notice(
            "boundary", row["chain_id"],
            f"chain {row['chain_id']} begins after chain {row['previous_chain']} at seq "
            f"{row['previous_seq']} ({row['reason']})",
        )  # fmt: skip
    if row["base_seq"]:
        return Notice(
            "boundary", row["chain_id"],
            f"chain {row['chain_id']} begins here at seq {row['base_seq'] + 1}: seqs "
            f"1..{row['base_seq']} are in another database ({row['reason']})",
        )  # fmt: skip
    return None


async def verify_chains(
    conn: Connection,
    *,
    since: datetime | None = None,
    chain_id: str | None = None,
    max_findings: int = 10_000,
    prefetch: int = 5_000,
    trust: TrustStore | None = None,
    external: list[Checkpoint] | None = None,
) -> VerifyReport:
    """Walk every chain (``ORDER BY chain_id, seq``) and report what does not verify.

    Args:
        conn: an asyncpg connection (not inside a transaction).
        since: only events at or after this time; each chain's first row is then trusted.
        chain_id: only this chain.
        max_findings: findings kept in the report (all are counted).
        prefetch: rows fetched per round trip of the server-side cursor.
        trust: the audit signers' trust anchor (``chain.pem``). None: the checkpoints'
            signatures are not checked (their chain and contents still are): for callers
            that verify the structure only; ``audit verify`` always passes one.
        external: checkpoints read from outside the database (``--checkpoints DIR``).
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

    def wanted(name: str) -> bool:
        return chain_id is None or name == chain_id

    async with conn.transaction(isolation="repeatable_read", readonly=True):
        points = await load_prune_points(conn)
        genesis = await load_genesis(conn)
        for name, row in sorted(genesis.items()):
            notice = _boundary(row)
            if wanted(name) and notice is not None:
                report.notices.append(notice)
            if row["base_seq"]:
                start = (row["base_seq"] + 1, row["base_hash"])
                points[name] = points.get(name, frozenset()) | {start}
        checkpoints = CheckpointSet(trust)
        await checkpoints.load(conn)
        if external is not None:
            checkpoints.add_external(external)
        expected = checkpoints.check(
            {
                name: (row["base_seq"], row["base_hash"], row["checkpoint_n"],
                       row["checkpoint_hash"])
                for name, row in genesis.items()
            }
        )  # fmt: skip
        report.checkpoints = sum(len(c.stored) for n, c in checkpoints.chains.items() if wanted(n))
        keep(
            [
                Finding("checkpoint", p.chain_id, p.seq, None, p.message, last_seq=p.last_seq)
                for p in checkpoints.problems
                if wanted(p.chain_id)
            ]
        )
        heads = {
            row["chain_id"]: (row["seq"], row["hash"])
            for row in await conn.fetch("SELECT chain_id, seq, hash FROM event_chains")
        }
        verifier: ChainVerifier | None = None
        seen: set[str] = set()

        def done(verifier: ChainVerifier) -> None:
            keep(verifier.finish(heads.get(verifier.chain_id)))
            report.notices.extend(verifier.notices)
            seen.add(verifier.chain_id)

        async for row in conn.cursor(query, *args, prefetch=prefetch):
            if verifier is None or row["chain_id"] != verifier.chain_id:
                if verifier is not None:
                    done(verifier)
                name = row["chain_id"]
                verifier = ChainVerifier(
                    name, prune_points=points.get(name, frozenset()), anchored=since is None,
                    expect=expected.get(name),
                )  # fmt: skip
                report.chains += 1
            report.events += 1
            keep(verifier.feed(row))
        if verifier is not None:
            done(verifier)
        if since is None:
            for name in sorted(set(heads) | set(expected)):
                if not wanted(name) or name in seen:
                    continue
                empty = ChainVerifier(name, expect=expected.get(name))
                findings = empty.finish(None)
                head_seq, head_hash = heads.get(name, (0, GENESIS_HASH))
                explained = head_seq == 0 or (head_seq + 1, head_hash) in points.get(name, ())
                if not findings and not explained:
                    findings = [
                        Finding(
                            "truncated", name, 1, None,
                            f"chain head is seq {head_seq} but the chain has no events",
                            last_seq=head_seq,
                        )
                    ]  # fmt: skip
                keep(findings)
    return report
