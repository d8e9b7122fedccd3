"""The switches: metrics_listen off / any port, --metrics-listen, --log-format and
--log-level, and a metrics port that cannot be bound."""

from __future__ import annotations

import logging
import socket

import pytest
from typer.testing import CliRunner

from gateway.serve import _serve_metrics
from provisioning.commands.cli import app
from provisioning.commands.common import Context
from schemas.logs import configure_logging
from schemas.settings import ConfigError, Settings, load_settings
from schemas.telemetry import setup_telemetry


@pytest.mark.parametrize("value", ["off", "OFF", "", " off "])
def test_metrics_listen_off(value: str) -> None:
    settings = Settings(metrics_listen=value)
    assert settings.metrics_listen == "off"
    assert settings.metrics_host_port is None


def test_metrics_listen_address(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().metrics_host_port == ("127.0.0.1", 9464)
    assert Settings(metrics_listen="[::1]:0").metrics_host_port == ("::1", 0)
    with pytest.raises(ConfigError, match="--metrics-listen"):
        load_settings(metrics_listen="nowhere")
    monkeypatch.setenv("DEVICEGATE_METRICS_LISTEN", "nowhere")
    with pytest.raises(ConfigError, match="DEVICEGATE_METRICS_LISTEN"):
        load_settings()


def test_global_flags_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Settings] = []

    def capture(self: Context, **flags: object) -> Settings:
        settings = load_settings(self.config, **{**self.overrides, **flags})
        seen.append(settings)
        raise SystemExit(0)

    monkeypatch.setattr(Context, "settings", capture)
    result = CliRunner().invoke(
        app,
        [
            *("--metrics-listen", "off", "--log-format", "text", "--log-level", "debug"),
            *("serve", "provisioning"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (seen[0].metrics_listen, seen[0].log_format, seen[0].log_level) == (
        "off",
        "text",
        "debug",
    )
    bad = CliRunner().invoke(app, ["--log-format", "xml", "serve", "provisioning"])
    assert bad.exit_code == 2


def test_log_level(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().log_level == "info"
    monkeypatch.setenv("DEVICEGATE_LOG_LEVEL", "verbose")
    with pytest.raises(ConfigError, match="DEVICEGATE_LOG_LEVEL"):
        load_settings()
    monkeypatch.setenv("DEVICEGATE_LOG_LEVEL", "debug")
    settings = load_settings()
    root = logging.getLogger()
    before = root.level
    try:
        configure_logging(settings.log_format, settings.log_level.upper())
        assert logging.getLogger("devicegate.gateway.audit").isEnabledFor(logging.DEBUG)
    finally:
        configure_logging("text", before)


async def test_a_taken_metrics_port_is_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    telemetry = setup_telemetry(service_name="t", instance_id="t", prometheus=True, otlp=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # Worker 1 listens on port + 1: here the port that is taken.
        assert await _serve_metrics(telemetry, ("127.0.0.1", port - 1), 1) is None
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert f"cannot listen on 127.0.0.1:{port}" in error.getMessage()
    assert await _serve_metrics(telemetry, None, 0) is None
    server = await _serve_metrics(telemetry, ("127.0.0.1", 0), 3)  # 0: any free port
    assert server is not None
    server.close()
    await server.wait_closed()
    telemetry.shutdown()
