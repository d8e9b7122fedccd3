"""JSON (or text) logs for both planes, never carrying secrets.

`JsonFormatter` replaces the value of any sensitive key (`is_sensitive_key`) with
``"[redacted]"`` and scrubs bearer credentials, passwords in URLs and devicegate tokens
(``dgt_``/``dgk_``) from message text; the text format scrubs the same. A line logged
inside a span carries its ``trace_id`` and ``span_id``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, Literal

from opentelemetry import trace

__all__ = ["REDACTED", "JsonFormatter", "configure_logging", "is_sensitive_key", "redact"]

REDACTED: Final = "[redacted]"
_SENSITIVE: Final = frozenset(
    {"token", "password", "passphrase", "key", "secret", "authorization", "cookie",
     "credentials", "private_key", "api_key", "bearer", "csr_key"}
)  # fmt: skip
_SENSITIVE_SUFFIXES: Final = tuple(f"_{word}" for word in _SENSITIVE)
_NAME_SPLIT = re.compile(r"[-.\s]")
_SECRET_TEXT = [
    (re.compile(r"\b(dg[tk]_)[A-Za-z0-9_\-]+"), r"\1" + REDACTED),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]+"), r"\1 " + REDACTED),
    (re.compile(r"(://[^:/@\s]+):[^@\s]*@"), r"\1:***@"),
]


def is_sensitive_key(name: str) -> bool:
    """Whether a field named ``name`` may hold a secret (``token``, ``ca_passphrase``,
    ``Authorization``, ``admin_key``...). ``token_id`` and ``key_type`` are not secrets."""
    key = _NAME_SPLIT.sub("_", name.lower())
    return key in _SENSITIVE or key.endswith(_SENSITIVE_SUFFIXES)


def _scrub(text: str) -> str:
    for pattern, replacement in _SECRET_TEXT:
        text = pattern.sub(replacement, text)
    return text


def redact(value: Any, _depth: int = 0) -> Any:
    """``value`` with sensitive keys' values replaced, recursively; strings scrubbed."""
    if _depth > 8:
        return REDACTED
    if isinstance(value, Mapping):
        return {
            str(k): REDACTED if is_sensitive_key(str(k)) else redact(v, _depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple, set, frozenset)):
        return [redact(v, _depth + 1) for v in value]
    if isinstance(value, str):
        return _scrub(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return _scrub(str(value))


_RESERVED: Final = frozenset(
    logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None).__dict__
) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, trace_id/span_id when a span
    is active, exception text, and every ``extra`` field, with secrets redacted."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": _scrub(record.getMessage()),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            entry["trace_id"] = trace.format_trace_id(context.trace_id)
            entry["span_id"] = trace.format_span_id(context.span_id)
        for name, value in record.__dict__.items():
            if name in _RESERVED or name.startswith("_") or name in entry:
                continue
            entry[name] = REDACTED if is_sensitive_key(name) else redact(value)
        if record.exc_info:
            entry["exception"] = _scrub(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, ensure_ascii=False, default=str, separators=(",", ":"))


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _scrub(super().format(record))


_HANDLER_MARK = "_devicegate_handler"


class _Fields(logging.Filter):
    """Adds fixed fields (e.g. ``worker``) to every record the handler writes."""

    def __init__(self, fields: Mapping[str, object]) -> None:
        super().__init__()
        self.fields = dict(fields)

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in self.fields.items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


def configure_logging(
    fmt: Literal["json", "text"],
    level: int | str = logging.INFO,
    *,
    fields: Mapping[str, object] | None = None,
) -> None:
    """Send the root logger's records to stderr in ``fmt`` (``Settings.log_format``).

    ``fields`` are added to every line (a gateway worker adds ``worker``): JSON keys, or
    ``name[key=value]`` after the logger name in text.

    Idempotent: a handler installed by an earlier call is replaced, others are left alone.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        tag = ",".join(f"{key}={value}" for key, value in (fields or {}).items())
        name = f"%(name)s[{tag}]" if tag else "%(name)s"
        handler.setFormatter(_TextFormatter(f"%(asctime)s %(levelname)s {name} %(message)s"))
    if fields:
        handler.addFilter(_Fields(fields))
    root.addHandler(handler)
    root.setLevel(level)
