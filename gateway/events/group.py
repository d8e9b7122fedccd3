"""One group commit of the event sink: the frames gathered for one write + fdatasync, and
the future every `SpoolSink.record` of the group awaits (see `gateway.events.sink`)."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.events.codec import Row

__all__ = ["DROPPED", "OPEN", "SEALED", "Group", "Refused", "SharedFuture"]

OPEN, SEALED, DROPPED = range(3)  # a group's state (see `Group`)


class Refused(Exception):
    """The I/O thread did not write a group: one before it, which it was chained on, failed."""


class SharedFuture(asyncio.Future[None]):
    """The flush future every `SpoolSink.record` of one group commit awaits.

    It cannot be cancelled: a cancelled caller must not cancel its neighbours' wait. (The
    caller's task still sees CancelledError, once the flush is done.) Cheaper than one
    ``asyncio.shield`` per call.
    """

    def cancel(self, msg: Any = None) -> bool:
        return False


class Group:
    """Frames gathered for one write + fdatasync, and the future their `record` calls await.

    Queued to the I/O thread as soon as its first frame is gathered. Frames join it while it
    is ``OPEN``; the I/O thread seals it when its write begins (``SEALED``), after which
    new frames start the next group. The event loop may drop an open group (``DROPPED``)
    when the sink fails; the thread then skips it. ``state`` changes under the sink's seal
    lock. ``epoch``: a group is written only if no earlier group of its epoch failed.
    """

    __slots__ = ("epoch", "frames", "future", "rows", "size", "state", "written")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.frames: list[bytes] = []
        self.rows: list[Row] = []
        self.size = 0
        self.future = SharedFuture()
        self.state = OPEN
        self.written = False  # set by the I/O thread once the spool holds it

    def add(self, framed: bytes, row: Row) -> None:
        self.frames.append(framed)
        self.rows.append(row)
        self.size += len(framed)
