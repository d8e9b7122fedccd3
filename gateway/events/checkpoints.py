"""When a gateway worker signs a checkpoint of its chain (see `schemas.checkpoints`).

Off the hot path: the ship loop asks `CheckpointClock.due` after each committed batch and
while idle, and signs the head it has *committed* (never one still in flight), at most
every ``interval`` seconds and once more at shutdown; nothing is signed while the head has
not moved. A failed write (database away) is tried again after ``retry`` seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from schemas.checkpoints import AuditSigner

__all__ = ["CheckpointClock", "CheckpointPolicy"]


@dataclass(frozen=True, slots=True)
class CheckpointPolicy:
    """What a sink needs to sign checkpoints.

    Attributes:
        signer: the audit key and certificate.
        file: this worker's append-only file (None: the database and the log only).
        interval: seconds between two checkpoints while the head moves.
    """

    signer: AuditSigner
    file: Path | None
    interval: float = 10.0
    retry: float = 2.0


class CheckpointClock:
    """The committed head and the head last signed; says when the next one is due."""

    def __init__(self, policy: CheckpointPolicy) -> None:
        self.policy = policy
        self.committed: tuple[int, str] | None = None
        self.signed: tuple[int, str] | None = None
        self._next = time.monotonic() + policy.interval

    def shipped(self, seq: int, hash_: str) -> None:
        self.committed = (seq, hash_)

    def due(self) -> float | None:
        """Seconds until the next checkpoint (<= 0: now); None: nothing new to sign."""
        if self.committed is None or self.committed == self.signed:
            return None
        return self._next - time.monotonic()

    def done(self, head: tuple[int, str]) -> None:
        self.signed = head
        self._next = time.monotonic() + self.policy.interval

    def failed(self) -> None:
        self._next = time.monotonic() + min(self.policy.retry, self.policy.interval)
