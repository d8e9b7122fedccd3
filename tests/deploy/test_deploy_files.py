"""The deployment files: accepted by their own tools, true to the settings contract, and
keeping the CA key and passphrase away from every gateway.

External tools (haproxy, systemd-analyze, docker compose) are used when installed and
skipped with a reason otherwise; the structural checks need PyYAML and skip without it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from provisioning.pki.directory import CHAIN, ISSUING_KEY, ROOT_KEY, SERVER_CERT, SERVER_KEY
from schemas.checkpoints import AUDIT_CERT, AUDIT_KEY
from schemas.policy import PolicyDocument
from schemas.settings import ENV_PREFIX, Settings, load_settings
from tests.helpers import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
HAPROXY_CFG = DEPLOY / "haproxy" / "haproxy.cfg"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"

GATEWAY_PKI_FILES = {CHAIN, SERVER_CERT, SERVER_KEY, AUDIT_KEY, AUDIT_CERT}
CA_SECRETS = ("devicegate-ca", "devicegate-ca-passphrase")
PASSPHRASE_VARS = (ENV_PREFIX + "CA_PASSPHRASE", ENV_PREFIX + "CA_PASSPHRASE_FILE")
SETTING_NAMES = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
VARIABLE = re.compile(r"\b" + ENV_PREFIX + r"[A-Z0-9_]+\b")


@pytest.fixture(scope="module")
def yaml() -> Any:
    return pytest.importorskip("yaml", reason="PyYAML is not installed in this environment")


def _files_naming_settings() -> list[Path]:
    files = [path for path in DEPLOY.rglob("*") if path.is_file()]
    files += [ROOT / "Dockerfile", ROOT / "docs" / "deployment.md", ROOT / "docs" / "capacity.md"]
    return sorted(path for path in files if path.exists())


def _unknown_variables(text: str) -> set[str]:
    return set(VARIABLE.findall(text)) - SETTING_NAMES


# --- settings contract --------------------------------------------------------------------


def test_the_typo_check_catches_a_typo() -> None:
    assert _unknown_variables("DEVICEGATE_UPSTREAM_URI=mqtt://x:1") == {"DEVICEGATE_UPSTREAM_URI"}
    assert _unknown_variables("DEVICEGATE_UPSTREAM_URL=mqtt://x:1 DEVICEGATE_*") == set()


@pytest.mark.parametrize("path", _files_naming_settings(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_devicegate_variable_is_a_setting(path: Path) -> None:
    unknown = _unknown_variables(path.read_text(errors="replace"))
    assert not unknown, f"{path.relative_to(ROOT)} names settings that do not exist: {unknown}"


def _check_values(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], where: str) -> None:
    """The values must load too: a bad duration or CIDR list fails here, not at 3 a.m."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith(ENV_PREFIX):
            monkeypatch.setenv(name, str(value))
    try:
        load_settings()
    except Exception as exc:
        pytest.fail(f"{where}: {exc}")


def _env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines())
    return {
        key.strip(): value.strip()
        for key, value in (p for p in pairs if len(p) == 2)
        if not key.lstrip().startswith("#")
    }


@pytest.mark.parametrize("name", ["devicegate.env.example", "gateway.env.example"])
def test_systemd_example_env_files_load(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    _check_values(monkeypatch, _env_file(SYSTEMD / name), name)


# --- HAProxy ------------------------------------------------------------------------------


def _haproxy_sections() -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = ""
    for raw in HAPROXY_CFG.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line:
            continue
        if not line[0].isspace():
            current = line.strip()
            sections[current] = []
        else:
            sections[current].append(line.strip())
    return sections


def test_haproxy_config_is_valid() -> None:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy); structure still checked")
    result = subprocess.run(
        [haproxy, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_haproxy_sends_proxy_v2_to_gateways_only() -> None:
    sections = _haproxy_sections()
    gateways = sections["backend be_gateways"]
    servers = [line for line in gateways if line.startswith("server ")]
    assert len(servers) >= 2
    assert all("send-proxy-v2" in line and " check" in line for line in servers)
    assert "balance leastconn" in gateways
    # Provisioning cannot read a PROXY header yet: plain passthrough.
    provisioning = " ".join(sections["backend be_provisioning"])
    assert "send-proxy" not in provisioning
    assert "bind :8883" in sections["frontend fe_mqtt"]
    assert "bind :8443" in sections["frontend fe_provisioning"]
    # TLS must end in devicegate (client certificates, audited failures), never here.
    binds = [line for lines in sections.values() for line in lines if line.startswith("bind")]
    assert not any(" ssl" in line or " crt " in line for line in binds)


def test_haproxy_timeouts_fit_long_lived_sessions_and_stats_stay_local() -> None:
    sections = _haproxy_sections()
    defaults = sections["defaults"]
    assert {"mode tcp", "timeout client 1h", "timeout server 1h", "timeout tunnel 1h"} <= set(
        defaults
    )
    assert [line for line in sections["frontend stats"] if line.startswith("bind")] == [
        "bind 127.0.0.1:8404"
    ]


PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def _complete(data: bytes) -> bool:
    """A PROXY v2 header, plus the 8 bytes the test's device sends after a PROXY command."""
    if len(data) < 16:
        return False
    end = 16 + int.from_bytes(data[14:16], "big")
    return len(data) >= end + (8 if data[12] == 0x21 else 0)


class _StubGateway:
    """A loopback listener that records the first bytes of each connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(1)
                data = b""
                with contextlib.suppress(OSError):
                    while not _complete(data) and (chunk := conn.recv(256)):
                        data += chunk
                self.received.append(data)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(2)
        self.sock.close()


def test_haproxy_runs_and_speaks_proxy_v2(tmp_path: Path) -> None:
    """Start the real config on loopback: `haproxy -c` misses start-up failures (a maxconn
    the descriptor limit cannot honour) and says nothing about what reaches a gateway."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    stubs = [_StubGateway(), _StubGateway()]
    mqtt, enroll, stats = free_port(), free_port(), free_port()
    config = HAPROXY_CFG.read_text()
    for old, new in {
        "gateway-1:8883": f"127.0.0.1:{stubs[0].port}",
        "gateway-2:8883": f"127.0.0.1:{stubs[1].port}",
        "provisioning:8443": f"127.0.0.1:{free_port()}",
        "bind :8883": f"bind 127.0.0.1:{mqtt}",
        "bind :8443": f"bind 127.0.0.1:{enroll}",
        "bind 127.0.0.1:8404": f"bind 127.0.0.1:{stats}",
        "inter 10s": "inter 100ms",
    }.items():
        assert old in config
        config = config.replace(old, new)
    (tmp_path / "haproxy.cfg").write_text(config)
    process = subprocess.Popen(
        [haproxy, "-db", "-f", str(tmp_path / "haproxy.cfg")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        try:
            wait_for_port(stats, timeout=5)
        except TimeoutError:
            process.kill()
            pytest.fail(f"haproxy did not start: {process.communicate()[0].decode()}")
        time.sleep(0.4)  # a few check rounds
        with socket.create_connection(("127.0.0.1", mqtt)) as device:
            device.sendall(b"\x16\x03\x01hello")
            device_port = device.getsockname()[1]
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and not any(
                d[12:13] == b"\x21" for s in stubs for d in s.received
            ):
                time.sleep(0.02)
    finally:
        process.terminate()
        process.wait(5)
        for stub in stubs:
            stub.close()
    received = [data for stub in stubs for data in stub.received]
    assert received and all(data.startswith(PROXY_V2_SIGNATURE) for data in received)
    # Health checks carry the LOCAL command (0x20), nothing after the header.
    checks = [data for data in received if data[12] == 0x20]
    assert checks and all(data[16:] == b"" for data in checks)
    # The device's connection: PROXY (0x21) over TCP/IPv4 (0x11) with its own address.
    (proxied,) = [data for data in received if data[12] == 0x21]
    assert proxied[13] == 0x11
    assert socket.inet_ntoa(proxied[16:20]) == "127.0.0.1"
    assert int.from_bytes(proxied[24:26], "big") == device_port
    assert proxied[28:] == b"\x16\x03\x01hello"


# --- systemd --------------------------------------------------------------------------------

HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "CapabilityBoundingSet": "",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "SystemCallFilter": "@system-service",
    "MemoryDenyWriteExecute": "yes",
}
UNITS = sorted(SYSTEMD.glob("*.service"))


def _unit(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in order; systemd allows repeated keys, configparser does not."""
    entries, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def _values(path: Path, key: str) -> list[str]:
    return [value for section, k, value in _unit(path) if section == "Service" and k == key]


def test_the_three_units_exist() -> None:
    names = {path.name for path in UNITS}
    assert {"devicegate-provisioning.service", "devicegate-gateway.service"} <= names


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_units_are_hardened(unit: Path) -> None:
    for key, expected in HARDENING.items():
        assert expected in _values(unit, key), f"{unit.name}: {key}={expected} missing"
    assert _values(unit, "User") == ["devicegate"] or _values(unit, "DynamicUser") == ["yes"]
    assert "/etc/devicegate/devicegate.env" in _values(unit, "EnvironmentFile")


@pytest.mark.parametrize("name", ["devicegate-provisioning.service", "devicegate-gateway.service"])
def test_services_restart_and_drain(name: str) -> None:
    unit = SYSTEMD / name
    assert _values(unit, "Restart") == ["on-failure"]
    assert _values(unit, "KillSignal") == ["SIGTERM"]
    assert _values(unit, "TimeoutStopSec")


def test_only_provisioning_gets_the_ca_passphrase() -> None:
    provisioning = SYSTEMD / "devicegate-provisioning.service"
    credentials = _values(provisioning, "LoadCredentialEncrypted") + _values(
        provisioning, "LoadCredential"
    )
    assert any(value.startswith("ca-passphrase:") for value in credentials)
    assert "DEVICEGATE_CA_PASSPHRASE_FILE=%d/ca-passphrase" in _values(provisioning, "Environment")
    gateway = SYSTEMD / "devicegate-gateway.service"
    text = gateway.read_text()
    assert "LoadCredential" not in text
    unset = " ".join(_values(gateway, "UnsetEnvironment")).split()
    assert set(PASSPHRASE_VARS) <= set(unset)
    assert any(v.startswith("DEVICEGATE_SPOOL_DIR=") for v in _values(gateway, "Environment"))
    assert _values(gateway, "StateDirectory") == ["devicegate"]
    assert "DEVICEGATE_CHECKPOINT_DIR=%S/devicegate/checkpoints" in _values(gateway, "Environment")


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verify(unit: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=20
    )
    # The install path does not exist on a build machine; anything else is a real finding.
    findings = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and "/opt/devicegate/venv/bin/devicegate is not executable" not in line
    ]
    assert not findings, "\n".join(findings)


_MDWE_PROBE = """
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(77)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit(78)
except OSError:
    pass
import asyncio, ssl
import aiohttp, aiomqtt, asyncpg, pydantic, pydantic_settings, rich, typer, uvloop
import opentelemetry.sdk.trace
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
ec.generate_private_key(ec.SECP256R1()).sign(b"x", ec.ECDSA(hashes.SHA256()))
ssl.create_default_context()
async def main():
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    server.close()
uvloop.run(main())
"""


def test_dependencies_run_under_memory_deny_write_execute() -> None:
    """The units set MemoryDenyWriteExecute=yes; prove the dependency set tolerates it."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_MDWE is Linux-only")
    result = subprocess.run(
        [sys.executable, "-c", _MDWE_PROBE], capture_output=True, text=True, timeout=30
    )
    if result.returncode == 77:
        pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3)")
    assert result.returncode != 78, "PR_SET_MDWE did not refuse a W+X mapping"
    assert result.returncode == 0, (
        "a dependency needs W+X memory: drop MemoryDenyWriteExecute= from the units\n"
        + result.stderr
    )


# --- Docker ---------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_non_root_and_lean() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert stages == ["python:3.11-slim", "python:3.11-slim"]
    final = text[text.rindex("\nFROM ") :]
    assert re.search(r"^USER\s+(?!root\b|0\b)\S+", final, re.MULTILINE)
    assert 'ENTRYPOINT ["devicegate"]' in final
    assert "pip install --no-cache-dir ." in text
    # The build stage fails when pip skipped an optional C accelerator (event encoder, TLS).
    assert "import gateway.events._codec, gateway._tlsext" in text[: text.rindex("\nFROM ")]
    # No package manager and no compiler in the image that ships.
    instructions = "\n".join(line for line in final.splitlines() if not line.startswith("#"))
    assert not re.search(r"\b(apt-get|apt|gcc|build-essential|python3-dev)\b", instructions)


def test_dockerignore_keeps_secrets_and_state_out_of_the_context() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "pki", "**/*.key"} <= ignored


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=20)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_config_is_accepted() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    result = subprocess.run(
        [*cli, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def compose(yaml: Any) -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


def test_compose_has_the_whole_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {
        "postgres",
        "mosquitto",
        "migrate",
        "provisioning",
        "gateway-1",
        "gateway-2",
        "haproxy",
    } <= set(services)
    assert services["postgres"]["image"] == "postgres:15"
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    assert (COMPOSE.parent / "mosquitto.conf").is_file()
    assert {"8883:8883", "8443:8443"} <= set(services["haproxy"]["ports"])
    assert services["migrate"]["command"] == ["db", "migrate"]
    for name, service in services.items():
        if service.get("restart") != "no":
            assert "healthcheck" in service, f"{name} has no healthcheck"
    ids = {services[g]["environment"]["DEVICEGATE_INSTANCE_ID"] for g in ("gateway-1", "gateway-2")}
    assert len(ids) == 2


def test_compose_gateways_hold_no_ca_secret(compose: dict[str, Any]) -> None:
    services = compose["services"]
    haproxy_ip = services["haproxy"]["networks"]["devicegate"]["ipv4_address"]
    for name in ("gateway-1", "gateway-2"):
        gateway = services[name]
        assert not gateway.get("secrets"), f"{name} gets a secret"
        assert not set(gateway["environment"]) & set(PASSPHRASE_VARS)
        pki = [v for v in gateway["volumes"] if v.endswith(":/var/lib/devicegate/pki:ro")]
        assert pki == ["pki-gateway:/var/lib/devicegate/pki:ro"], gateway["volumes"]
        assert not any(v.startswith("pki:") for v in gateway["volumes"])
        assert any(v.startswith(f"spool-{name}:") for v in gateway["volumes"])
        checkpoints = gateway["environment"]["DEVICEGATE_CHECKPOINT_DIR"]
        assert checkpoints.startswith(gateway["environment"]["DEVICEGATE_SPOOL_DIR"] + "/")
        assert gateway["environment"]["DEVICEGATE_PROXY_PROTOCOL_FROM"] == f"{haproxy_ip}/32"
    # Only ca-init sees the root key, as if it had gone offline.
    for name, service in services.items():
        volumes = service.get("volumes", [])
        assert any(v.startswith("root-offline:") for v in volumes) == (name == "ca-init"), name
    # ca-init copies exactly the gateway-side files (TLS, audit signer) into their volume.
    script = " ".join(services["ca-init"]["command"])
    assert "for f in chain.pem server.crt server.key audit.key audit.crt" in script


def test_compose_settings_load(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        if any(key.startswith(ENV_PREFIX) for key in env):
            _check_values(monkeypatch, env, f"compose service {name}")


# --- Kubernetes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests(yaml: Any) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def _find(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def _workloads(manifests: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for m in manifests:
        if m["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield f"{m['kind']}/{m['metadata']['name']}", m["spec"]["template"]["spec"]


def test_kubernetes_has_the_expected_objects(manifests: list[dict[str, Any]]) -> None:
    kinds = {m["kind"] for m in manifests}
    assert {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "StatefulSet",
        "Service",
        "Job",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "Secret",
        "Cluster",
    } <= kinds
    lb = _find(manifests, "Service", "devicegate-gateway")["spec"]
    assert lb["type"] == "LoadBalancer" and lb["externalTrafficPolicy"] == "Local"
    assert [p["port"] for p in lb["ports"]] == [8883]
    assert _find(manifests, "Service", "devicegate-provisioning")["spec"]["type"] == "ClusterIP"
    gateway = _find(manifests, "StatefulSet", "devicegate-gateway")["spec"]
    assert [t["metadata"]["name"] for t in gateway["volumeClaimTemplates"]] == ["spool"]
    hpa = _find(manifests, "HorizontalPodAutoscaler", "devicegate-gateway")["spec"]
    assert hpa["scaleTargetRef"]["kind"] == "StatefulSet"
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"


def test_kustomization_lists_every_plain_manifest(yaml: Any) -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    # Examples and the CloudNativePG cluster (needs the operator's CRDs) stay out on purpose.
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secrets.example.yaml"}
    assert listed == on_disk


def test_kubernetes_pods_are_locked_down(manifests: list[dict[str, Any]]) -> None:
    for where, pod in _workloads(manifests):
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod.get("automountServiceAccountToken") is False, where
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert "requests" in container["resources"], where
            if not where.startswith("Job/"):
                assert "readinessProbe" in container and "livenessProbe" in container, where


def _secret_references(pod: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(secret names, file names mounted from secrets) anywhere in a pod spec."""
    names: set[str] = set()
    files: set[str] = set()
    for volume in pod.get("volumes", []):
        sources = [volume, *volume.get("projected", {}).get("sources", [])]
        for source in sources:
            if "secret" in source:
                names.add(source["secret"].get("secretName") or source["secret"].get("name"))
                files |= {item["key"] for item in source["secret"].get("items", [])}
    for container in pod["containers"] + pod.get("initContainers", []):
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
        for env_from in container.get("envFrom", []):
            if "secretRef" in env_from:
                names.add(env_from["secretRef"]["name"])
    return names, files


def test_gateway_pods_never_see_a_ca_key_or_the_passphrase(
    manifests: list[dict[str, Any]],
) -> None:
    pod = _find(manifests, "StatefulSet", "devicegate-gateway")["spec"]["template"]["spec"]
    names, files = _secret_references(pod)
    assert not names & set(CA_SECRETS), names
    assert files == GATEWAY_PKI_FILES
    for container in pod["containers"]:
        assert not {e["name"] for e in container.get("env", [])} & set(PASSPHRASE_VARS)
    # The gateways' secret holds those files (TLS, audit signer) and nothing else.
    tls = _find(manifests, "Secret", "devicegate-gateway-tls")
    assert set(tls["stringData"]) == GATEWAY_PKI_FILES


def test_provisioning_has_the_issuing_key_but_not_the_root_key(
    manifests: list[dict[str, Any]],
) -> None:
    pod = _find(manifests, "Deployment", "devicegate-provisioning")["spec"]["template"]["spec"]
    names, files = _secret_references(pod)
    assert set(CA_SECRETS) <= names
    assert ISSUING_KEY in files and ROOT_KEY not in files
    assert ROOT_KEY not in _find(manifests, "Secret", "devicegate-ca")["stringData"]


def test_kubernetes_settings_load(
    manifests: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = _find(manifests, "ConfigMap", "devicegate-settings")["data"]
    for where, pod in _workloads(manifests):
        for container in pod["containers"]:
            env = dict(shared)
            env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
            _check_values(monkeypatch, env, where)


def test_kubernetes_policy_is_a_valid_policy_document(manifests: list[dict[str, Any]]) -> None:
    policy = _find(manifests, "ConfigMap", "devicegate-policy")["data"]["policy.toml"]
    PolicyDocument.model_validate(tomllib.loads(policy))
