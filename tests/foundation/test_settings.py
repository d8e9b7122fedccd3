from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from schemas.durations import format_duration, parse_duration
from schemas.settings import ENV_PREFIX, ConfigError, load_settings, unknown_variables


def test_defaults_match_the_design_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DEVICEGATE_DATABASE_URL", "DEVICEGATE_PKI_DIR", "DEVICEGATE_GATEWAY_LISTEN"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.database_url == "postgresql://postgres@127.0.0.1:5432/devicegate"
    assert settings.pki_dir == Path("./pki")
    assert settings.gateway_listen == "0.0.0.0:8883"
    assert settings.upstream_url == "mqtt://127.0.0.1:1883"
    assert settings.provisioning_listen == "0.0.0.0:8443"
    assert settings.metrics_listen == "127.0.0.1:9464"
    assert settings.policy_file is None
    assert settings.cert_validity == timedelta(days=30)
    assert settings.revocation_stale_after == timedelta(seconds=30)


def test_environment_then_file_then_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "devicegate.toml"
    config.write_text('max_packet_size = 2048\nupstream_url = "mqtts://broker:8883"\n')
    assert load_settings(config).max_packet_size == 2048
    monkeypatch.setenv("DEVICEGATE_MAX_PACKET_SIZE", "4096")
    settings = load_settings(config)
    assert settings.max_packet_size == 4096
    assert settings.upstream_url == "mqtts://broker:8883"
    assert load_settings(config, max_packet_size=8192).max_packet_size == 8192


@pytest.mark.parametrize(
    ("variable", "value", "complaint"),
    [
        ("DEVICEGATE_MAX_PACKET_SIZE", "lots", "must be a whole number"),
        ("DEVICEGATE_GATEWAY_LISTEN", "8883", "HOST:PORT"),
        ("DEVICEGATE_UPSTREAM_URL", "http://broker", "mqtt://"),
        ("DEVICEGATE_DATABASE_URL", "mysql://x", "postgresql://"),
        ("DEVICEGATE_CERT_VALIDITY", "a fortnight", "not a duration"),
        ("DEVICEGATE_PROXY_PROTOCOL_FROM", "10.0.0.0/33", "not a valid IPv4 network"),
        ("DEVICEGATE_PUBLIC_URL", "prov.example.com:8443", "https://HOST"),
        ("DEVICEGATE_PUBLIC_URL", "ldap://prov.example.com", "https://HOST"),
        ("DEVICEGATE_PUBLIC_URL", "https://prov.example.com:84430", "bad port"),
        ("DEVICEGATE_PUBLIC_URL", "https://prov.example.com/?x=1", "without query"),
    ],
)
def test_a_bad_variable_is_named_in_the_error(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, complaint: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert variable in str(raised.value)
    assert complaint in str(raised.value)


@pytest.mark.parametrize(
    ("value", "crl_url"),
    [
        ("https://prov.example.com:8443", "https://prov.example.com:8443/v1/crl"),
        ("https://prov.example.com/", "https://prov.example.com/v1/crl"),
        ("https://[2001:db8::7]:8443/pki/", "https://[2001:db8::7]:8443/pki/v1/crl"),
        ("http://crl.example.com", "http://crl.example.com/v1/crl"),  # a plain-HTTP mirror
    ],
)
def test_public_url_names_the_crl(value: str, crl_url: str) -> None:
    assert load_settings(public_url=value).crl_url == crl_url


def test_public_url_is_unset_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEVICEGATE_PUBLIC_URL", raising=False)
    assert load_settings().public_url is None
    assert load_settings().crl_url is None


def test_a_bad_flag_is_named_as_a_flag() -> None:
    with pytest.raises(ConfigError, match="--upstream-url"):
        load_settings(upstream_url="ftp://x")


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_passphrase_from_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = tmp_path / "passphrase"
    secret.write_text("correct horse battery\n")
    monkeypatch.delenv("DEVICEGATE_CA_PASSPHRASE", raising=False)
    monkeypatch.setenv("DEVICEGATE_CA_PASSPHRASE_FILE", str(secret))
    assert load_settings().ca_passphrase_bytes() == b"correct horse battery"


def test_passphrase_is_not_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVICEGATE_CA_PASSPHRASE", "hunter2-hunter2")
    assert "hunter2" not in repr(load_settings())


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("10m", 600),
        ("8h", 28800),
        ("7d", 604800),
        ("1h30m", 5400),
        ("45", 45),
        ("250ms", 0.25),
        ("2w", 1209600),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "h", "10 minutes", "5x", "1h-3m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_duration_formatting_round_trips() -> None:
    for text in ("30s", "10m", "8h", "3d", "2w", "90s"):
        assert format_duration(parse_duration(text)) == text


def test_an_unknown_variable_is_warned_about_once_with_the_nearest_name() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env |= {"DEVICEGATE_DATABSE_URL": "postgresql://x@127.0.0.1/y", "DEVICEGATE_TOKEN": "t"}
    env |= {"DEVICEGATE_TEST_ADMIN_URL": "postgresql://x", "DEVICEGATE_LOG_LEVEL": "info"}
    args = ["policy", "explain", "--device", "d1", "--fleet", "f", "--publish", "devices/d1/x"]
    done = subprocess.run(
        [sys.executable, "-m", "provisioning.commands.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "DEVICEGATE_DATABSE_URL is not a devicegate setting and is ignored; "
        "did you mean DEVICEGATE_DATABASE_URL?"
    ]


def test_known_and_far_off_names() -> None:
    assert (
        unknown_variables({"DEVICEGATE_PKI_DIR": "x", "DEVICEGATE_TOKEN": "t", "HOME": "/"}) == []
    )
    assert unknown_variables({"DEVICEGATE_ZZZ": "1", "DEVICEGATE_WORKER": "2"}) == [
        ("DEVICEGATE_WORKER", "DEVICEGATE_WORKERS"),
        ("DEVICEGATE_ZZZ", None),
    ]


def test_every_devicegate_variable_the_tree_reads_is_known() -> None:
    """A variable read anywhere (code, tests, deploy files) must not be warned about."""
    root = Path(__file__).resolve().parents[2]
    named: set[str] = set()
    for folder in ("gateway", "provisioning", "schemas", "tests", "bench", "deploy", "fuzz"):
        for path in (root / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".yaml", ".yml", ".env", ".service", ""):
                named |= set(
                    re.findall(
                        r"\bDEVICEGATE_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace")
                    )
                )
    typos = {
        "DEVICEGATE_UPSTREAM_URI",
        "DEVICEGATE_DATABSE_URL",
        "DEVICEGATE_ZZZ",
        "DEVICEGATE_WORKER",
    }
    assert [name for name, _ in unknown_variables(dict.fromkeys(named - typos, ""))] == []
