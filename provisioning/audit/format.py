"""The record formats of the auth event log shared by ``devicegate audit`` and the console.

``json``: one object per line with the field names of the API (DESIGN.md, "Auth events"),
in `FIELDS` order. ``csv``: a header of `FIELDS`, then one row per event, ``detail`` as
compact JSON with sorted keys and ``None`` as an empty cell.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from schemas.events import AuthEvent

FIELDS = (
    "id", "time", "type", "outcome", "reason", "device_id", "fleet", "cert_serial",
    "cert_fingerprint", "client_id", "peer_address", "instance", "tls_version", "tls_cipher",
    "detail", "chain_id", "seq", "prev_hash", "hash",
)  # fmt: skip
"""Field order of the json and csv formats."""


def record(event: AuthEvent) -> dict[str, Any]:
    """The event as a JSON-ready dict in `FIELDS` order."""
    dumped = event.model_dump(mode="json")
    return {name: dumped[name] for name in FIELDS}


def json_line(event: AuthEvent) -> str:
    """One line of the json format, newline included."""
    return json.dumps(record(event), ensure_ascii=False) + "\n"


def csv_cells(event: AuthEvent) -> list[Any]:
    """The cells of one csv row."""
    values = record(event)
    values["detail"] = json.dumps(
        values["detail"], sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return ["" if values[name] is None else values[name] for name in FIELDS]


def _csv_text(rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def csv_header() -> str:
    """The csv header line, newline included."""
    return _csv_text([list(FIELDS)])


def csv_line(event: AuthEvent) -> str:
    """One csv row, newline included (quoted as `csv.writer` quotes)."""
    return _csv_text([csv_cells(event)])
