"""The IDevID manifest (allowlist) file: CSV rows of IDevID serials or public key hashes.

Format (docs/manufacturer-certificates.md): a header line, then one row per device. Columns:
``serial`` (the IDevID's serial number, hex, ``:`` and a ``0x`` prefix allowed) and/or
``spki_sha256`` (SHA-256 of its DER SubjectPublicKeyInfo, 64 hex digits, ``:`` allowed; the
header ``fingerprint`` is read as the same column); optional attributes ``model``, ``site``,
``line`` (kept with the row). Every row names at least one identity; a row with both gives
two entries. Pure: parse, or raise `ManifestError` naming the line.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

IDENTITY_COLUMNS = {"serial": "serial", "spki_sha256": "spki", "fingerprint": "spki"}
ATTRIBUTE_COLUMNS = ("model", "site", "line")
MAX_SERIAL_HEX = 40  # RFC 5280: at most 20 octets
MAX_ATTRIBUTE = 256
_HEX = re.compile(r"[0-9a-f]+")


class ManifestError(ValueError):
    """A manifest that cannot be imported; ``str()`` is one line naming the line number."""


@dataclass(frozen=True, slots=True)
class Entry:
    kind: str  # "serial" or "spki"
    value: str
    attributes: str  # JSON object text (COPY wants it ready)
    line: int


def normalise_hex(text: str, line: int, column: str) -> str:
    """Lowercase hex of a serial (no leading zeros) or a SHA-256 (64 digits).

    Raises:
        ManifestError: not that, naming ``line``.
    """
    compact = text.strip().lower().replace(":", "")
    if column == "serial" and compact.startswith("0x"):
        compact = compact[2:]
    if _HEX.fullmatch(compact) is None:
        raise ManifestError(f"line {line}: {column} {text.strip()!r} is not hexadecimal")
    if column == "serial":
        compact = compact.lstrip("0") or "0"
        if len(compact) > MAX_SERIAL_HEX:
            raise ManifestError(f"line {line}: serial longer than 20 octets")
    elif len(compact) != 64:
        raise ManifestError(f"line {line}: {column} must be 64 hex digits (SHA-256)")
    return compact


def parse(lines: Iterable[str]) -> Iterator[Entry]:
    """The entries of a manifest, in file order.

    Raises:
        ManifestError: a bad header, a malformed row, or an entry listed twice.
    """
    reader = csv.reader(lines)
    try:
        header = next(reader)
    except StopIteration:
        raise ManifestError("line 1: empty manifest (a header line is required)") from None
    except csv.Error as exc:
        raise ManifestError(f"line 1: {exc}") from None
    names = [name.strip().lower() for name in header]
    for name in names:
        if name not in IDENTITY_COLUMNS and name not in ATTRIBUTE_COLUMNS:
            raise ManifestError(
                f"line 1: unknown column {name!r} (known: serial, spki_sha256, "
                f"{', '.join(ATTRIBUTE_COLUMNS)})"
            )
    if len(set(names)) != len(names):
        raise ManifestError("line 1: a column is named twice")
    identity = [(i, IDENTITY_COLUMNS[n], n) for i, n in enumerate(names) if n in IDENTITY_COLUMNS]
    if not identity:
        raise ManifestError("line 1: the header names no serial or spki_sha256 column")
    attributes = [(i, n) for i, n in enumerate(names) if n in ATTRIBUTE_COLUMNS]
    seen: dict[tuple[str, str], int] = {}
    texts: dict[tuple[str, ...], str] = {}  # attributes repeat across rows: encode once
    try:
        for row in reader:
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if len(row) != len(names):
                raise ManifestError(f"line {line}: {len(row)} fields, the header has {len(names)}")
            values = tuple(row[index].strip() for index, _ in attributes)
            text = texts.get(values)
            if text is None:
                for value, (_, name) in zip(values, attributes, strict=True):
                    if len(value) > MAX_ATTRIBUTE or "\x00" in value:
                        raise ManifestError(f"line {line}: {name} is too long or holds U+0000")
                text = json.dumps(
                    {n: v for v, (_, n) in zip(values, attributes, strict=True) if v},
                    sort_keys=True,
                )
                if len(texts) < 4096:
                    texts[values] = text
            found = False
            for index, kind, column in identity:
                if not row[index].strip():
                    continue
                value = normalise_hex(row[index], line, column)
                if (kind, value) in seen:
                    raise ManifestError(
                        f"line {line}: {column} {value} is already on line {seen[kind, value]}"
                    )
                seen[kind, value] = line
                found = True
                yield Entry(kind, value, text, line)
            if not found:
                raise ManifestError(f"line {line}: no serial or spki_sha256")
    except csv.Error as exc:
        raise ManifestError(f"line {reader.line_num}: {exc}") from None
