"""The gateway supervisors on one state directory: who runs, which worker slots they hold.

A supervisor (`gateway.workers`) claims a block of worker *slots* for its life: slot ``s``
is the spool ``spool_dir/w<s>``, the event chain ``<instance>/w<s>``, the checkpoint file
``<instance>_w<s>.jsonl`` and the metrics port ``P + s``. The claim is the file
``spool_dir/supervisor.<base>.pid`` ("<pid> <count> <listen address>"), held with an
exclusive ``flock`` by the supervisor (the descriptor is close-on-exec, so its workers
never hold it). So:

* a file whose lock is free is stale (its process died, even by SIGKILL) and is ignored;
  a held one names a live supervisor, and its pid cannot have been reused while held;
* a take-over (``serve gateway --take-over``) claims the lowest block disjoint from every
  live one (w0..w(N-1), then wN..w(2N-1), ...), so the old and the new workers never
  share a spool, a chain or a metrics port while they overlap; the one-writer rule of
  each chain (`gateway.events.registry`) holds by construction, not by waiting;
* choosing and claiming happen under ``spool_dir/supervisor.lock`` (blocking flock),
  so two supervisors starting at once cannot pick the same block.

Orphaned slots: a worker killed (SIGKILL, OOM, a host crash) while PostgreSQL was away
leaves fsynced, unshipped events in its slot's spool. A cold start claims w0..w(N-1), so a
spool on any other slot (an instance that ran on wN.. after a take-over) would wait for a
later instance to land on it. `claim_orphans` finds them (`find_orphans`): slot
directories ``spool_dir/w<k>`` outside every live supervisor's block (this one's
included), whose spool lock is free (no process has it open) and whose segments hold a
record (`gateway.events.spool.unshipped_chain`). It claims each such slot with its own
claim file ``supervisor.<k>.pid`` (count 1, held by the same supervisor), under the same
``supervisor.lock``, so a concurrent take-over chooses around it and no two processes
ever open one spool or write one chain; the supervisor ships it with a short-lived
ship-only process (`gateway.orphans`) and then releases the claim.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gateway.config import GatewayConfigError
from gateway.events.spool import unshipped_chain

__all__ = [
    "GatewayRunning",
    "Orphan",
    "Running",
    "SlotClaim",
    "claim_orphans",
    "claim_slots",
    "find_orphans",
    "running",
]

_LOCK = "supervisor.lock"
_PREFIX = "supervisor."
_SUFFIX = ".pid"
_SLOT_DIR = re.compile(r"w(\d+)")


class GatewayRunning(GatewayConfigError):
    """Another gateway supervisor already runs on this state directory."""


@dataclass(frozen=True)
class Running:
    """A live supervisor: its pid, its slots ``base .. base + count - 1``, its address."""

    pid: int
    base: int
    count: int
    listen: str

    @property
    def slots(self) -> range:
        return range(self.base, self.base + self.count)


@dataclass
class SlotClaim:
    """This supervisor's slots, held until `release` (or its exit)."""

    base: int
    count: int
    path: Path
    fd: int | None

    @property
    def slots(self) -> range:
        return range(self.base, self.base + self.count)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()  # while still locked: nobody reads a half-gone claim
            os.close(self.fd)
            self.fd = None


def _base_of(path: Path) -> int | None:
    middle = path.name[len(_PREFIX) : -len(_SUFFIX)]
    return int(middle) if middle.isdecimal() else None


@contextlib.contextmanager
def _choosing(spool_dir: Path) -> Iterator[None]:
    fd = os.open(spool_dir / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _running(spool_dir: Path) -> list[Running]:
    found = []
    for path in sorted(spool_dir.glob(f"{_PREFIX}*{_SUFFIX}")):
        base = _base_of(path)
        if base is None:
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # released meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held: a live supervisor
                pid, count, listen = os.read(fd, 512).decode().split(" ", 2)
                found.append(Running(int(pid), base, int(count), listen))
            # else: stale (its supervisor died); left for the next claim of that block
        except ValueError:
            continue  # not ours to judge: a held file we cannot parse is left alone
        finally:
            os.close(fd)
    return found


def running(spool_dir: Path) -> list[Running]:
    """The live supervisors on ``spool_dir`` (none if it does not exist)."""
    if not spool_dir.is_dir():
        return []
    with _choosing(spool_dir):
        return _running(spool_dir)


def claim_slots(spool_dir: Path, count: int, listen: str) -> tuple[SlotClaim, list[Running]]:
    """Claim the lowest block of ``count`` slots no live supervisor holds (for a gateway
    listening on ``listen``).

    Returns:
        The claim (held until released or this process exits) and the live supervisors
        found (the ones a take-over replaces).
    """
    spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _choosing(spool_dir):
        live = _running(spool_dir)
        taken = {slot for other in live for slot in other.slots}
        base = 0
        while any(slot in taken for slot in range(base, base + count)):
            base += 1
        path = spool_dir / f"{_PREFIX}{base}{_SUFFIX}"
        fd = _hold(path, count, listen)
        if fd is None:
            raise GatewayRunning(f"{path} is locked by a process that is not a supervisor")
    return SlotClaim(base, count, path, fd), live


def _hold(path: Path, count: int, listen: str) -> int | None:
    """Lock the claim file ``path`` and write this process into it; its descriptor (None:
    another process holds it). Called under `_choosing`."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {count} {listen}".encode())
    return fd


@dataclass(frozen=True)
class Orphan:
    """A slot no live supervisor holds whose spool may hold unshipped events."""

    slot: int
    spool: Path
    chain_id: str


def _spool_busy(spool: Path) -> bool:
    """Whether a process has the spool open (it holds ``lock``, e.g. a worker of a dead
    supervisor still draining): that process ships it, not us."""
    try:
        fd = os.open(spool / "lock", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (and with it the probe's lock)
    return False


def _orphans(spool_dir: Path, live: list[Running]) -> list[Orphan]:
    taken = {slot for other in live for slot in other.slots}
    found = []
    for path in spool_dir.iterdir():
        match = _SLOT_DIR.fullmatch(path.name)
        if match is None or not path.is_dir():
            continue
        slot = int(match[1])
        if slot in taken or _spool_busy(path):
            continue
        chain = unshipped_chain(path)
        if chain is not None:
            found.append(Orphan(slot, path, chain))
    return sorted(found, key=lambda orphan: orphan.slot)


def find_orphans(spool_dir: Path) -> list[Orphan]:
    """The orphaned slots on ``spool_dir`` (see the module doc), lowest first."""
    if not spool_dir.is_dir():
        return []
    with _choosing(spool_dir):
        return _orphans(spool_dir, _running(spool_dir))


def claim_orphans(spool_dir: Path, listen: str) -> list[tuple[Orphan, SlotClaim]]:
    """Find the orphaned slots and claim each for this process (one slot per claim).

    Call it holding this supervisor's own claim (`claim_slots`): its block is live, so it
    is never an orphan. A slot whose claim file is locked meanwhile is skipped.
    """
    if not spool_dir.is_dir():
        return []
    claimed = []
    with _choosing(spool_dir):
        for orphan in _orphans(spool_dir, _running(spool_dir)):
            path = spool_dir / f"{_PREFIX}{orphan.slot}{_SUFFIX}"
            fd = _hold(path, 1, listen)
            if fd is not None:
                claimed.append((orphan, SlotClaim(orphan.slot, 1, path, fd)))
    return claimed
