"""TLS session resumption that stays zero trust: ticket keys shared through a file.

Why tickets under our keys: OpenSSL's own ticket keys are random per process, so a ticket
issued by worker 0 would not resume on worker 1 nor on another instance behind the load
balancer. Python's ``ssl`` has no API for ticket keys, so the TLS accelerator
(``gateway/_tlsext.c``) installs OpenSSL's ticket key callback with the keys of
``schemas.ticket_keys``' file.

Invariants:

* A resumed connection is judged like a new one: the bridge takes the identity from the
  session's certificate, and the directory check (revocation, disable, supersede) runs
  after the CONNECT as for every connection; its events say ``resumed: true``.
* A ticket never outlives its certificate nor ``tls_ticket_lifetime``; a ticket whose
  certificate is outside its validity is ignored (a full handshake refuses it).
* Keys are re-read when the file changes (`TicketKeys.refresh`, once a second); a file
  that becomes unreadable keeps the keys in force and says so in the log.
* Without the accelerator, resumption is off (`RESUMPTION` false; the gateway warns).
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from types import ModuleType
from typing import Final

from schemas.ticket_keys import TicketKeyError, read_ticket_keys

_tlsext: ModuleType | None
try:
    from gateway import _tlsext
except ImportError:
    _tlsext = None

__all__ = ["RESUMPTION", "TicketKeyError", "TicketKeys"]

log = logging.getLogger(__name__)

RESUMPTION: Final = _tlsext is not None and hasattr(_tlsext, "set_ticket_keys")
"""Whether this build can resume sessions (the gateway warns at start when not)."""


class TicketKeys:
    """An ``ssl.SSLContext`` issuing and resuming tickets under the keys of one file."""

    __slots__ = ("_context", "_lifetime", "_stamp", "path")

    def __init__(self, context: ssl.SSLContext, path: Path, lifetime: float) -> None:
        """Turn tickets on for ``context`` (a `gateway.tls.server_context`).

        Raises:
            TicketKeyError: the file is missing or malformed.
            RuntimeError: this build has no TLS accelerator.
        """
        if not RESUMPTION:
            raise RuntimeError("TLS resumption needs gateway._tlsext (not built)")
        self._context = context
        self.path = path
        self._lifetime = max(1, int(lifetime))
        self._stamp: tuple[int, int, int] | None = None
        self._load(read_ticket_keys(path), self._file_stamp())
        context.options &= ~ssl.OP_NO_TICKET
        context.num_tickets = 1  # one per connection: a device reconnects with the newest

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def _load(self, keys: list[bytes], stamp: tuple[int, int, int] | None) -> None:
        assert _tlsext is not None
        _tlsext.set_ticket_keys(self._context, b"".join(keys), self._lifetime)
        self._stamp = stamp

    def refresh(self) -> bool:
        """Re-read the file if it changed since the last read; whether keys were loaded."""
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return False
        try:
            keys = read_ticket_keys(self.path)
        except TicketKeyError as exc:
            self._stamp = stamp  # said once per change, not every second
            log.warning("keeping the TLS ticket keys in force: %s", exc)
            return False
        self._load(keys, stamp)
        log.info("TLS ticket keys reloaded from %s (%d keys)", self.path, len(keys))
        return True
