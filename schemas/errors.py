"""The base of devicegate's typed errors: each carries the reason code it is recorded under."""

from __future__ import annotations

from schemas.events import Reason


class DevicegateError(Exception):
    """An error with a stable reason code; ``str(error)`` is the human explanation."""

    reason: Reason = Reason.PROTOCOL_ERROR

    def __init__(self, message: str, *, reason: Reason | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
