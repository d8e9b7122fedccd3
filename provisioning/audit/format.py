"""The record formats of the auth event log shared by ``devicegate audit`` and the console.

``json``: one object per line with the field names of the API (DESIGN.md, "Auth events"),
in `FIELDS` order. ``csv``: a header of `FIELDS`, then one row per event, ``detail`` as
compact JSON with sorted keys and ``None`` as an empty cell; text a spreadsheet would run
as a formula is prefixed with ``'`` (`provisioning.audit.csv_safety`). `certificate_line`: the
one line a person reads about the certificate of a refusal (the audit table, the console).
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from provisioning.audit.csv_safety import neutralise
from schemas.certificates import MAX_NAME, printable
from schemas.events import AuthEvent, Outcome

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


def certificate_line(event: AuthEvent) -> str | None:
    """Which certificate a refusal was about, and why, in one line (None: none recorded).

    ``presented CN=dev-1 serial 1f3a sha256 9c41e0a2.. issued by CN=devicegate Issuing CA
    valid 2026-11-01T00:00:00Z..2026-11-30T00:00:00Z (TLSv1.3): certificate has expired
    (10)``. Names were escaped and bounded when recorded; they are again here, since what a
    terminal prints must not come from the database unchecked.
    """
    detail = event.detail
    presented = detail.get("presented")
    if event.outcome is not Outcome.DENIED or not isinstance(presented, dict):
        return None
    parts = ["presented"]
    if presented.get("subject") is not None:
        parts.append(printable(str(presented["subject"]), MAX_NAME))
    if presented.get("serial") is not None:
        parts.append(f"serial {printable(str(presented['serial']), MAX_NAME)}")
    if presented.get("fingerprint") is not None:
        parts.append(f"sha256 {printable(str(presented['fingerprint'])[:16], 16)}..")
    if presented.get("unparsed") is not None:
        parts.append(f"unparsed ({printable(str(presented['unparsed']), MAX_NAME)})")
    if presented.get("issuer") is not None:
        parts.append(f"issued by {printable(str(presented['issuer']), MAX_NAME)}")
    if presented.get("not_before") is not None or presented.get("not_after") is not None:
        start, end = presented.get("not_before") or "?", presented.get("not_after") or "?"
        parts.append(f"valid {printable(str(start), 40)}..{printable(str(end), 40)}")
    if event.tls_version is not None:
        parts.append(f"({printable(event.tls_version, 40)})")
    line = " ".join(parts)
    error = detail.get("error") or detail.get("message")
    return f"{line}: {printable(str(error), MAX_NAME)}" if error is not None else line


def json_line(event: AuthEvent) -> str:
    """One line of the json format, newline included."""
    return json.dumps(record(event), ensure_ascii=False) + "\n"


def csv_cells(event: AuthEvent) -> list[Any]:
    """The cells of one csv row."""
    values = record(event)
    values["detail"] = json.dumps(
        values["detail"], sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return ["" if values[name] is None else neutralise(values[name]) for name in FIELDS]


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
