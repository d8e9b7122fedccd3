"""The cuttable TCP proxy now lives in `tests.helpers` (the gateway suite uses it too)."""

from __future__ import annotations

from tests.helpers import Proxy

__all__ = ["Proxy"]
