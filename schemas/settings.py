"""The one configuration model: ``DEVICEGATE_*`` variables, an optional TOML file, then flags.

Precedence, highest first: command-line flags (passed as ``overrides``), environment
variables, the TOML file given by ``--config``, the defaults below.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from datetime import timedelta
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from schemas.durations import Duration
from schemas.validation import sentence

ENV_PREFIX = "DEVICEGATE_"
CRL_PATH = "/v1/crl"
"""Where provisioning serves the CRL, below ``public_url``."""
METRICS_OFF = ("off", "")
OTHER_VARIABLES = frozenset(
    ENV_PREFIX + name
    for name in (
        "TOKEN",  # the bootstrap token of `devicegate enroll` and `demo device`
        # Test suite, benchmarks and fuzzing knobs (tests/, bench/):
        "TEST_ADMIN_URL",
        "TEST_PG_RESTART",
        "BENCH_ADMIN_URL",
        "FUZZ_SECONDS",
        "OPENAPI_EXAMPLES",
        "CONSOLE_TEST_EVENTS",
        "UPDATE_SCREENSHOTS",
        "CHROMIUM",
    )
)
"""``DEVICEGATE_*`` variables that are read, but not as settings: never called unknown."""

log = logging.getLogger(__name__)
_warned: set[str] = set()
"""``metrics_listen`` values that turn the ``/metrics`` endpoint off."""


DEFAULT_STATE_DIR = Path("/var/lib/devicegate")
"""Where the gateway keeps its state when systemd gives it none (``$STATE_DIRECTORY``)."""


def state_directory() -> Path:
    """``$STATE_DIRECTORY`` (its first entry) under systemd, else `DEFAULT_STATE_DIR`: never
    the working directory, which a restart or a second instance may not share."""
    given = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(given) if given else DEFAULT_STATE_DIR


class ConfigError(Exception):
    """A configuration value is wrong; the message names the variable and the problem."""


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return value


class Settings(BaseSettings):
    """devicegate's configuration. Every field is ``DEVICEGATE_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, frozen=True
    )

    database_url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/devicegate",
        description="PostgreSQL connection URL.",
    )
    pki_dir: Path = Field(Path("./pki"), description="Directory holding the CA and server files.")
    ca_passphrase: SecretStr | None = Field(None, description="Passphrase of the CA keys.")
    ca_passphrase_file: Path | None = Field(
        None, description="File whose first line is the CA passphrase."
    )
    pkcs11_pin_file: Path | None = Field(
        None,
        description="File whose first line is the user PIN of the PKCS#11 token holding the "
        "CA keys (owner-only, mode 0600). Unset: the file `ca init --pkcs11-pin-file` "
        "recorded in `<pki_dir>/ca-keys.toml` (docs/hsm.md).",
    )
    trust_domain: str = Field(
        "devicegate.local", description="SPIFFE trust domain of device identities."
    )
    cert_validity: Duration = Field(
        timedelta(days=30), description="Validity of device certificates."
    )
    cert_backdate: Duration = Field(
        timedelta(minutes=5),
        description="How far notBefore is set in the past (devices without a real-time clock).",
    )
    renew_grace: Duration = Field(
        timedelta(days=7), description="How long after expiry a certificate may still renew."
    )

    gateway_listen: str = Field("0.0.0.0:8883", description="Gateway mTLS listener.")
    upstream_url: str = Field(
        "mqtt://127.0.0.1:1883", description="Upstream broker (mqtt:// or mqtts://)."
    )
    policy_file: Path | None = Field(None, description="Topic policy file (TOML or JSON).")
    policy_source: Literal["file", "database"] | None = Field(
        None,
        description="Where the gateway takes its policy from: `database` (versioned policies, "
        "followed live by LISTEN/NOTIFY) or `file` (POLICY_FILE, or the default policy; "
        "reloaded on SIGHUP). Unset: `file` when POLICY_FILE is set, else `database`.",
    )
    instance_id: str = Field(
        default_factory=lambda: os.uname().nodename,
        description="Name of this gateway instance in events and metrics.",
    )
    workers: int = Field(0, ge=0, description="Gateway worker processes; 0 means one per CPU.")
    drain_timeout: Duration = Field(
        timedelta(seconds=30),
        description="On SIGTERM, how long sessions get to finish the packets in flight.",
    )
    takeover_within: Duration = Field(
        timedelta(seconds=120),
        description="`serve gateway --take-over`: how long the new workers get to be ready "
        "before the take-over is abandoned (the new instance exits 1, the running one serves "
        "on).",
    )
    handshake_timeout: Duration = Field(timedelta(seconds=10), description="TLS handshake limit.")
    tls_resumption: bool = Field(
        True,
        description="Let devices resume TLS sessions with tickets (needs TLS_TICKET_KEYS; "
        "a resumed session is judged like a new one). False: every connection does a full "
        "handshake.",
    )
    tls_ticket_keys: Path | None = Field(
        None,
        description="Session ticket key file shared by every worker and instance (a secret, "
        "like server.key; `devicegate ticket-keys rotate` makes and rotates it). Unset: "
        "`<pki_dir>/ticket-keys`; missing: resumption off, with a warning.",
    )
    tls_ticket_lifetime: Duration = Field(
        timedelta(hours=1),
        description="Longest life of a session ticket (never past its certificate's notAfter).",
    )
    connect_timeout: Duration = Field(
        timedelta(seconds=10), description="Time allowed between handshake and CONNECT."
    )
    max_packet_size: int = Field(
        256 * 1024, ge=64, le=268_435_455, description="Largest MQTT packet accepted, bytes."
    )
    max_connections: int = Field(10_000, ge=1, description="Connections per worker.")
    failed_handshakes_per_minute: int = Field(
        30,
        ge=1,
        description=(
            "Failed handshakes recorded one by one per peer address per minute, for the whole"
            " gateway instance (all its workers). Beyond it the address is over budget: its"
            " failures are counted in summary events and its new connections are handshaken"
            " THROTTLED_HANDSHAKES_IN_FLIGHT at a time (never refused while its queue has"
            " room), so good devices behind the same NAT address still connect."
        ),
    )
    throttled_handshakes_in_flight: int = Field(
        4,
        ge=1,
        description="Handshakes an over-budget address may have in flight at once, per "
        "worker; its other connections wait their turn, unread.",
    )
    throttled_handshake_queue: int = Field(
        1000,
        ge=0,
        description="Connections of an over-budget address that may wait for a handshake "
        "slot, per worker; beyond it they are refused at accept (rate_limited).",
    )
    trusted_networks: Annotated[list[IPv4Network | IPv6Network], NoDecode] = Field(
        default_factory=list,
        description="Networks (CIDRs, comma-separated) never throttled nor refused for "
        "failed handshakes; their failures are still recorded, and summarised beyond the "
        "budget.",
    )
    device_connects_per_minute: int = Field(
        20,
        ge=0,
        description=(
            "CONNECTs each authenticated device may make per minute, per worker, admitted or"
            " refused (token bucket per device id, refilled at this rate; 0: no limit). Beyond"
            " DEVICE_CONNECT_BURST at once the CONNECT is refused before the broker and before"
            " any takeover (connect_rate_exceeded: CONNACK 0x9F on MQTT 5, 3 on 3.1.1), its"
            " refusals summarised in one event per device per 10 s. Bounds what a looping or"
            " cloned certificate costs; a device backing off from a reconnect storm makes far"
            " fewer."
        ),
    )
    device_connect_burst: int = Field(
        20,
        ge=1,
        description="CONNECTs a device may make at once before DEVICE_CONNECTS_PER_MINUTE "
        "applies (the token bucket's size).",
    )
    denials_per_window: int = Field(
        100,
        ge=1,
        description="Denied PUBLISHes and SUBSCRIBE filters a session may have per "
        "DENIAL_WINDOW; one more closes it (too_many_denials, DISCONNECT 0x97 on MQTT 5).",
    )
    denial_events_per_window: int = Field(
        10,
        ge=1,
        description="Denial events a session records one by one per DENIAL_WINDOW; later "
        "denials are summed up in one event per type when the window ends.",
    )
    denial_window: Duration = Field(
        timedelta(seconds=60),
        description="The window of DENIALS_PER_WINDOW and DENIAL_EVENTS_PER_WINDOW.",
    )
    revocation_stale_after: Duration = Field(
        timedelta(seconds=30),
        description="Refuse new connections when revocation state is older than this.",
    )
    proxy_protocol_from: Annotated[list[IPv4Network | IPv6Network], NoDecode] = Field(
        default_factory=list,
        description="Addresses allowed to send a PROXY v2 header (empty: PROXY protocol off).",
    )
    spool_dir: Path = Field(
        default_factory=lambda: state_directory() / "spool",
        description="Local event spool directory (worker slot s uses its w<s>; each "
        "supervisor holds its slots by supervisor.<first slot>.pid there); its chain id is "
        "made with it.",
    )
    checkpoint_dir: Path = Field(
        default_factory=lambda: state_directory() / "checkpoints",
        description="Where each writer appends its signed audit checkpoints (copy them off "
        "the host: `audit verify --checkpoints DIR`).",
    )
    checkpoint_interval: Duration = Field(
        timedelta(seconds=10),
        description="How often each chain writer signs a checkpoint of its chain (and once "
        "at shutdown); events after the newest one are what a database administrator could "
        "still delete unseen.",
    )
    spool_max_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, description="Spool size at which new connections are refused."
    )

    provisioning_listen: str = Field("0.0.0.0:8443", description="Provisioning HTTPS listener.")
    public_url: str | None = Field(
        None,
        description="Base URL at which devices and relying parties reach provisioning "
        "(`https://HOST[:PORT][/PATH]`); certificates name `<public_url>/v1/crl` as their "
        "CRL distribution point. Unset: `ca init` uses `https://<first --server-name>:<port "
        "of provisioning_listen>` and warns; `serve provisioning` reuses `server.crt`'s.",
    )
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Largest HTTP request body.")
    refusal_events_per_minute: int = Field(
        10,
        ge=1,
        description="Refusals recorded as one event each, per client address and route, on "
        "the routes reached before authentication (enroll, renew, EST, console login): a "
        "burst of this many, earned back over a minute. Beyond it refusals are counted in "
        "summary events.",
    )
    refusal_summary_interval: Duration = Field(
        timedelta(seconds=10),
        description="How often refusals counted beyond the budget are written as summary "
        "events (one per route, address and reason; the rest at shutdown).",
    )

    metrics_listen: str = Field(
        "127.0.0.1:9464",
        description="Prometheus /metrics listener (gateway worker i: port + i); off: none.",
    )
    log_format: Literal["json", "text"] = Field("json", description="Log line format.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info",
        description="Lowest level logged; debug adds the gateway's line per admission and "
        "session end (denials are logged at info).",
    )

    @field_validator("refusal_summary_interval")
    @classmethod
    def _check_positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be longer than zero")
        return value

    @field_validator("gateway_listen", "provisioning_listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        return _host_port(value)

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = urlsplit(value.strip())
        try:
            url.port  # noqa: B018 (raises ValueError on a bad port)
        except ValueError:
            raise ValueError("must be https://HOST[:PORT][/PATH] (bad port)") from None
        if url.scheme not in ("https", "http") or not url.hostname:
            raise ValueError("must be https://HOST[:PORT][/PATH]")
        if url.query or url.fragment or not url.geturl().isascii():
            raise ValueError("must be an ASCII URL without query or fragment")
        return url.geturl().rstrip("/")

    @field_validator("metrics_listen")
    @classmethod
    def _check_metrics_listen(cls, value: str) -> str:
        if value.strip().lower() in METRICS_OFF:
            return "off"
        return _host_port(value)

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must start with postgresql://")
        return value

    @field_validator("upstream_url")
    @classmethod
    def _check_upstream(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        if scheme not in ("mqtt", "mqtts") or not sep:
            raise ValueError("must be mqtt://HOST:PORT or mqtts://HOST:PORT")
        _host_port(rest.rstrip("/"))
        return value

    @field_validator("denial_window")
    @classmethod
    def _check_denial_window(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be longer than zero")
        return value

    @field_validator("proxy_protocol_from", "trusted_networks", mode="before")
    @classmethod
    def _split_networks(cls, value: Any) -> Any:
        if isinstance(value, str):
            # Comma-separated in the environment: "10.0.0.0/8, 192.0.2.7".
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file, if any, comes from model_config["toml_file"] (see load_settings).
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)

    def ca_passphrase_bytes(self) -> bytes | None:
        """The CA passphrase from the variable or the file, or ``None`` when neither is set."""
        if self.ca_passphrase is not None:
            return self.ca_passphrase.get_secret_value().encode()
        if self.ca_passphrase_file is not None:
            try:
                text = self.ca_passphrase_file.read_text()
            except OSError as exc:
                raise ConfigError(
                    f"{ENV_PREFIX}CA_PASSPHRASE_FILE: cannot read {self.ca_passphrase_file}: "
                    f"{exc.strerror}; write the passphrase (8 characters or more) on its "
                    f"first line, mode 0600, or set {ENV_PREFIX}CA_PASSPHRASE instead"
                ) from exc
            return text.splitlines()[0].encode() if text else b""
        return None

    @property
    def metrics_host_port(self) -> tuple[str, int] | None:
        """Where ``/metrics`` is served, or ``None`` when ``metrics_listen`` is off."""
        if self.metrics_listen == "off":
            return None
        host, _, port = self.metrics_listen.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def crl_url(self) -> str | None:
        """The CRL distribution point named in new certificates, when ``public_url`` is set."""
        return None if self.public_url is None else f"{self.public_url}{CRL_PATH}"

    @property
    def effective_policy_source(self) -> Literal["file", "database"]:
        """`policy_source`, or its default: the file when one is named, else the database."""
        if self.policy_source is not None:
            return self.policy_source
        return "file" if self.policy_file is not None else "database"

    @property
    def listen_host_port(self) -> tuple[str, int]:
        host, _, port = self.gateway_listen.rpartition(":")
        return host.strip("[]"), int(port)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings, turning any invalid value into a `ConfigError` naming its variable.

    Args:
        config_file: optional TOML file with the same keys as the fields (lower case).
        **overrides: values from command-line flags; ``None`` means "flag not given".
    """
    model: type[Settings] = Settings
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"--config: {config_file} does not exist")
        config = SettingsConfigDict(**{**Settings.model_config, "toml_file": config_file})
        model = type("Settings", (Settings,), {"model_config": config})
    given = {key: value for key, value in overrides.items() if value is not None}
    for name, suggestion in unknown_variables(os.environ):
        if name not in _warned:  # once per process, however often settings are loaded
            _warned.add(name)
            hint = f"; did you mean {suggestion}?" if suggestion else ""
            log.warning("%s is not a devicegate setting and is ignored%s", name, hint)
    try:
        return model(**given)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, given)) from None
    except SettingsError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """Each ``DEVICEGATE_*`` variable that is no setting, with the nearest setting's name.

    A misspelt variable (``DEVICEGATE_DATABSE_URL``) is otherwise silently ignored and the
    default used in its place.
    """
    known = [ENV_PREFIX + name.upper() for name in Settings.model_fields]
    out = []
    for name in sorted(environ):
        upper = name.upper()  # pydantic-settings reads the environment case-insensitively
        if not upper.startswith(ENV_PREFIX) or upper in known or upper in OTHER_VARIABLES:
            continue
        near = difflib.get_close_matches(upper, [*known, *OTHER_VARIABLES], n=1, cutoff=0.75)
        out.append((name, near[0] if near else None))
    return out


def _describe(exc: ValidationError, given: dict[str, Any]) -> str:
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        origin = f"--{field.replace('_', '-')}" if field in given else ENV_PREFIX + field.upper()
        message = sentence(error)
        if error["type"] == "extra_forbidden":
            near = difflib.get_close_matches(field, list(Settings.model_fields), n=1)
            message = "unknown setting" + (f"; did you mean {near[0]}?" if near else "")
        lines.append(f"{origin}: {message} (got {error.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)
