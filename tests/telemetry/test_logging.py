"""JSON log lines: one object per line, trace ids inside a span, secrets never written."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from schemas.logs import REDACTED, JsonFormatter, configure_logging, is_sensitive_key
from tests.telemetry.conftest import Harness


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("devicegate.test-telemetry")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log, stream
    log.removeHandler(handler)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_object_per_line_with_extra_fields(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = logger
    log.info("device %s refused", "d1", extra={"reason": "certificate_expired", "seq": 7})
    log.warning("multi\nline")
    first, second = _lines(stream)
    assert first["level"] == "info"
    assert first["logger"] == "devicegate.test-telemetry"
    assert first["message"] == "device d1 refused"
    assert first["reason"] == "certificate_expired" and first["seq"] == 7
    assert str(first["time"]).endswith("Z")
    assert "trace_id" not in first
    assert second["message"] == "multi\nline"


def test_trace_and_span_ids_inside_a_span(
    logger: tuple[logging.Logger, io.StringIO], harness: Harness
) -> None:
    log, stream = logger
    with harness.telemetry.tracer.start_as_current_span("work") as span:
        log.info("inside")
    (line,) = _lines(stream)
    context = span.get_span_context()
    assert line["trace_id"] == f"{context.trace_id:032x}"
    assert line["span_id"] == f"{context.span_id:016x}"


def test_secrets_are_redacted(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = logger
    log.info(
        "enrolling with dgt_s3cr3tT0ken and Authorization: Bearer dgk_adminK3y at "
        "postgresql://app:hunter2@db/devicegate",
        extra={
            "token": "dgt_s3cr3tT0ken",
            "ca_passphrase": "p4ss",
            "Authorization": "Bearer abc",
            "detail": {"token_id": "t-1", "key_type": "ec-p256", "private_key": "-----BEGIN"},
            "admin_key": "dgk_x",
            "secret": "s",
        },
    )
    text = stream.getvalue()
    for secret in ("s3cr3tT0ken", "adminK3y", "hunter2", "p4ss", "Bearer abc", "BEGIN", "dgk_x"):
        assert secret not in text
    (line,) = _lines(stream)
    assert line["token"] == line["ca_passphrase"] == line["Authorization"] == REDACTED
    assert line["admin_key"] == line["secret"] == REDACTED
    assert line["detail"] == {"token_id": "t-1", "key_type": "ec-p256", "private_key": REDACTED}
    assert "dgt_[redacted]" in str(line["message"])


def test_exceptions_are_one_line_too(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = logger
    try:
        raise ValueError("password=x is not the field name")
    except ValueError:
        log.exception("failed")
    (line,) = _lines(stream)
    assert "ValueError" in str(line["exception"])


def test_sensitive_key_names() -> None:
    for name in ("token", "Password", "ca_passphrase", "key", "admin_key", "x-api-key", "secret"):
        assert is_sensitive_key(name), name
    for name in ("token_id", "key_type", "reason", "device_id", "keepalive", "monkey"):
        assert not is_sensitive_key(name), name


def test_configure_logging_is_idempotent(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    try:
        configure_logging("text", logging.INFO)
        configure_logging("json", logging.INFO)
        ours = [h for h in root.handlers if h not in before]
        assert len(ours) == 1
        logging.getLogger("devicegate.x").info("hello", extra={"password": "pw"})
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert line["message"] == "hello" and line["password"] == REDACTED
    finally:
        for handler in list(root.handlers):
            if handler not in before:
                root.removeHandler(handler)
        root.setLevel(level)
