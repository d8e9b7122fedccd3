"""The record commands and the device side through the real ``devicegate`` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from provisioning.commands.cli import app
from tests.conftest import Pki
from tests.helpers import free_port, wait_for_port
from tests.provisioning.conftest import Server


def cli(env: dict[str, str], *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == code, (args, result.output, result.exception)
    return result.output


def lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_record_commands(env: dict[str, str], server: Server, pki: Pki, tmp_path: Path) -> None:
    fleet = f"cli-{os.getpid()}"
    created = json.loads(
        cli(
            env,
            "token",
            "create",
            "--fleet",
            fleet,
            "--uses",
            "2",
            "--ttl",
            "1h",
            "--note",
            "cli batch",
            "--json",
        )
    )
    assert created["token"].startswith("dgt_") and created["uses_left"] == 2
    plain = cli(env, "token", "create", "--fleet", fleet)
    assert plain.splitlines()[0].startswith("dgt_")
    listed = lines(cli(env, "token", "list", "--fleet", fleet, "--json"))
    assert {t["id"] for t in listed} >= {created["id"]}
    assert all("token" not in t for t in listed)
    assert created["token"] not in cli(env, "token", "list", "--fleet", fleet)

    out = tmp_path / "dev"
    enrolled = json.loads(
        cli(
            env,
            "enroll",
            "--url",
            server.url,
            "--token",
            created["token"],
            "--out",
            str(out),
            "--ca-cert",
            str(pki.chain),
            "--hardware-id",
            f"hw-{fleet}",
            "--key-type",
            "ed25519",
            "--json",
        )
    )
    device_id = enrolled["device_id"]
    assert sorted(p.name for p in out.iterdir()) == ["chain.pem", "device.crt", "device.key"]
    assert out.joinpath("device.key").stat().st_mode & 0o777 == 0o600
    renewed = json.loads(cli(env, "renew", "--dir", str(out), "--url", server.url, "--json"))
    assert renewed["device_id"] == device_id and renewed["serial"] != enrolled["serial"]

    assert [
        d["device_id"] for d in lines(cli(env, "device", "list", "--fleet", fleet, "--json"))
    ] == [device_id]
    shown = json.loads(cli(env, "device", "show", device_id, "--json"))
    assert [(c["serial"], c["status"], c["key_type"]) for c in shown["certificates"]] == [
        (renewed["serial"], "active", "ed25519"),
        (enrolled["serial"], "superseded", "ed25519"),
    ]
    assert device_id in cli(env, "device", "show", device_id)
    assert lines(cli(env, "device", "disable", device_id, "--json"))[0]["status"] == "disabled"
    assert lines(cli(env, "device", "enable", device_id, "--json"))[0]["status"] == "active"
    certs = lines(cli(env, "cert", "list", "--device", device_id, "--status", "active", "--json"))
    assert [c["serial"] for c in certs] == [renewed["serial"]]
    assert lines(cli(env, "cert", "revoke", renewed["serial"], "--json"))[0]["status"] == "revoked"
    revoked_device = lines(cli(env, "device", "revoke", device_id, "--yes", "--json"))[0]
    assert revoked_device["status"] == "revoked"
    assert "revoked" in cli(env, "device", "enable", device_id, code=1)
    assert "no device" in cli(env, "device", "show", "nope", code=1)

    revoked = lines(cli(env, "token", "revoke", created["id"], "--json"))[0]
    assert revoked["state"] == "revoked"
    assert "is not a token id" in cli(env, "token", "revoke", "zzz", code=2)
    refused = cli(
        env,
        "enroll",
        "--url",
        server.url,
        "--token",
        created["token"],
        "--out",
        str(tmp_path / "x"),
        "--ca-cert",
        str(pki.chain),
        code=1,
    )
    assert "token_revoked" in refused


def test_admin_key_commands(env: dict[str, str], server: Server, pki: Pki) -> None:
    name = f"ops-{os.getpid()}"
    created = json.loads(cli(env, "admin-key", "create", "--name", name, "--json"))
    assert created["key"].startswith("dgk_")
    assert "exists" in cli(env, "admin-key", "create", "--name", name, code=1)
    keys = lines(cli(env, "admin-key", "list", "--json"))
    mine = [k for k in keys if k["name"] == name]
    assert mine and mine[0]["revoked_at"] is None and created["key"] not in json.dumps(keys)

    def status() -> int:
        return int(
            subprocess.run(
                [
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--cacert",
                    str(pki.chain),
                    "-H",
                    f"Authorization: Bearer {created['key']}",
                    f"{server.url}/v1/devices?limit=1",
                ],
                capture_output=True,
                check=True,
                timeout=20,
            ).stdout
        )

    assert status() == 200
    assert lines(cli(env, "admin-key", "revoke", name, "--json"))[0]["revoked_at"]
    assert status() == 401


def test_serve_provisioning_subprocess(env: dict[str, str], pki: Pki, tmp_path: Path) -> None:
    """The real ``devicegate serve provisioning``: ready, enroll and renew with the real
    ``devicegate`` device commands, then a graceful SIGTERM."""
    port = free_port()
    full_env = {**os.environ, **env}
    devicegate = str(Path(sys.executable).with_name("devicegate"))
    server = subprocess.Popen(
        [devicegate, "serve", "provisioning", "--listen", f"127.0.0.1:{port}"],
        env=full_env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(port, timeout=15)
        url = f"https://127.0.0.1:{port}"
        ready = subprocess.run(
            ["curl", "-sS", "--cacert", str(pki.chain), f"{url}/readyz"],
            capture_output=True,
            check=True,
            timeout=20,
        ).stdout
        assert json.loads(ready)["status"] == "ready"
        token = json.loads(
            subprocess.run(
                [devicegate, "token", "create", "--fleet", f"sub-{port}", "--json"],
                env=full_env,
                capture_output=True,
                check=True,
                timeout=30,
                text=True,
            ).stdout
        )["token"]
        out = tmp_path / "dev"
        subprocess.run(
            [
                devicegate,
                "enroll",
                "--url",
                url,
                "--token",
                token,
                "--out",
                str(out),
                "--ca-cert",
                str(pki.chain),
            ],
            env=full_env,
            check=True,
            capture_output=True,
            timeout=30,
        )
        renewed = subprocess.run(
            [devicegate, "renew", "--dir", str(out), "--url", url, "--json"],
            env=full_env,
            check=True,
            capture_output=True,
            timeout=30,
            text=True,
        )
        assert json.loads(renewed.stdout)["fleet"] == f"sub-{port}"
        verify = subprocess.run(
            ["openssl", "verify", "-CAfile", str(pki.chain), str(out / "device.crt")],
            capture_output=True,
            timeout=20,
            text=True,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
        server.send_signal(signal.SIGTERM)
        assert server.wait(15) == 0
        assert "shutting down" in (server.stderr.read() if server.stderr else "")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
