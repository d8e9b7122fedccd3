"""TLS resumption through the real ``devicegate serve gateway`` (issue 24).

test_resumption.py proves the mechanism in-process (two `Gateway` objects sharing a key
file). These run the command itself, so they show what only the served gateway can: the
two SO_REUSEPORT workers each load the key file and resume each other's tickets (the
connect event's chain id ``<instance>/w<N>#...`` says which worker served), a second
instance resumes the first one's tickets, ``devicegate ticket-keys rotate`` reaches the
running workers, a revoked device's ticket is refused in a worker process as a full
handshake is, and OpenSSL's own client reports "Reused".
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.mqtt import Connack, Connect, encode
from gateway.tickets import RESUMPTION
from provisioning.commands.cli import app
from schemas.notify import REVOCATION_CHANNEL, RevocationNotice
from schemas.ticket_keys import read_ticket_keys, rotate_ticket_keys
from tests.conftest import Pki
from tests.gateway.conftest import Device, DeviceFactory, Harness
from tests.gateway.served import Served, serve_gateway
from tests.gateway.test_resumption import Attempt

pytestmark = pytest.mark.skipif(not RESUMPTION, reason="gateway._tlsext is not built")

ATTEMPTS = 40
"""Connections tried at most until both workers were hit (the kernel spreads them)."""


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    path = tmp_path / "ticket-keys"
    rotate_ticket_keys(path, keep=0)
    return path


def _serve(
    pki: Pki, database_url: str, mosquitto_port: int, directory: Path, keys: Path, name: str
) -> contextlib.AbstractContextManager[Served]:
    directory.mkdir(exist_ok=True)
    return serve_gateway(
        pki=pki,
        database_url=database_url,
        upstream_port=mosquitto_port,
        directory=directory,
        name=name,
        env={"DEVICEGATE_TLS_TICKET_KEYS": str(keys)},
    )


@pytest.fixture
def served(
    pki: Pki, database_url: str, mosquitto_port: int, tmp_path: Path, keys: Path
) -> Iterator[Served]:
    with _serve(pki, database_url, mosquitto_port, tmp_path / "a", keys, "resume-a") as served:
        yield served


def _connects(
    harness: Harness, instance: str, device: Device, count: int, wait: float = 10
) -> list[dict[str, str]]:
    """The device's first ``count`` connect events at ``instance`` (waited for)."""
    deadline = time.monotonic() + wait
    while True:
        rows = harness.query(
            "SELECT chain_id, reason, detail FROM auth_events WHERE instance = $1"
            " AND device_id = $2 AND type = 'connect' ORDER BY time, seq",
            instance,
            device.device_id,
        )
        if len(rows) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(rows) >= count or not wait, rows
    return [
        {
            "worker": row["chain_id"].partition("#")[0].rpartition("/")[2],
            "reason": row["reason"],
            "resumed": str(json.loads(row["detail"] or "{}").get("resumed", False)).lower(),
        }
        for row in rows[:count]
    ]


def test_a_ticket_from_one_worker_resumes_on_the_other(
    harness: Harness, served: Served, make_device: DeviceFactory
) -> None:
    device = make_device()
    full = Attempt(served.port, device)
    assert full.connack == Connack(reason_code=0) and not full.reused
    (first,) = _connects(harness, served.instance, device, 1)
    assert first == {"worker": first["worker"], "reason": "ok", "resumed": "false"}
    # Resume with the first ticket until a connection lands on the other worker.
    workers = {first["worker"]}
    for n in range(2, ATTEMPTS + 2):
        again = Attempt(served.port, device, full.session)
        assert again.reused and again.connack == Connack(reason_code=0)
        event = _connects(harness, served.instance, device, n)[-1]
        assert event["reason"] == "ok" and event["resumed"] == "true"
        workers.add(event["worker"])
        if len(workers) == 2:
            break
    assert workers == {"w0", "w1"}, f"one worker served {ATTEMPTS} connections"


def test_a_ticket_from_one_instance_resumes_on_another(
    harness: Harness,
    served: Served,
    make_device: DeviceFactory,
    pki: Pki,
    database_url: str,
    mosquitto_port: int,
    tmp_path: Path,
    keys: Path,
) -> None:
    device = make_device()
    full = Attempt(served.port, device)
    assert full.connack == Connack(reason_code=0) and not full.reused
    with _serve(pki, database_url, mosquitto_port, tmp_path / "b", keys, "resume-b") as other:
        resumed = Attempt(other.port, device, full.session)
        assert resumed.reused and resumed.connack == Connack(reason_code=0)
        assert _connects(harness, other.instance, device, 1)[0]["resumed"] == "true"


def test_rotating_twice_stops_the_old_ticket(
    harness: Harness, served: Served, make_device: DeviceFactory, pki: Pki, keys: Path
) -> None:
    device = make_device()
    ticket = Attempt(served.port, device).session
    runner = CliRunner()
    env = {"DEVICEGATE_PKI_DIR": str(pki.directory), "DEVICEGATE_TLS_TICKET_KEYS": str(keys)}

    def rotate() -> None:
        before = read_ticket_keys(keys)[0]
        result = runner.invoke(app, ["ticket-keys", "rotate", "--keep", "1"], env=env)
        assert result.exit_code == 0, result.output
        assert read_ticket_keys(keys)[1] == before

    rotate()  # the ticket's key only decrypts now: both workers still resume it
    time.sleep(1.5)  # both workers' refresh ticks (once a second)
    for _ in range(6):
        assert Attempt(served.port, device, ticket).reused
    rotate()  # ... and now it is gone from the file
    time.sleep(1.5)
    for _ in range(6):  # whichever worker answers: a full handshake, and the device is in
        again = Attempt(served.port, device, ticket)
        assert not again.reused and again.connack == Connack(reason_code=0)
    events = _connects(harness, served.instance, device, 13)
    assert [e["resumed"] for e in events] == ["false"] + ["true"] * 6 + ["false"] * 6
    assert {e["reason"] for e in events} == {"ok"}


@pytest.mark.parametrize(
    ("table", "status", "reason"),
    [
        ("certificates", "revoked", "certificate_revoked"),
        ("devices", "disabled", "device_disabled"),
        ("certificates", "superseded", "certificate_superseded"),
    ],
)
def test_a_resumed_session_is_refused_like_a_full_handshake(
    harness: Harness,
    served: Served,
    make_device: DeviceFactory,
    table: str,
    status: str,
    reason: str,
) -> None:
    """In a worker process that cached the device as active, after the change reached it.

    The change is written as provisioning writes it: the row and the NOTIFY in one
    transaction (a bare UPDATE never reaches a worker's cache: `RevocationCache`).
    """
    device = make_device()
    ticket = Attempt(served.port, device).session
    key, value = ("serial", device.serial) if table == "certificates" else ("device_id", None)
    extra = ", revoked_at = now()" if status == "revoked" else ""
    notice = RevocationNotice(
        kind="certificate" if table == "certificates" else "device",
        device_id=device.device_id,
        serial=device.serial if table == "certificates" else None,
        status=status,
    )
    harness.execute(
        f"WITH changed AS (UPDATE {table} SET status = $1{extra} WHERE {key} = $2 RETURNING 1)"
        " SELECT pg_notify($3, $4) FROM changed",
        status,
        value or device.device_id,
        REVOCATION_CHANNEL,
        notice.model_dump_json(),
    )
    time.sleep(0.5)  # "within a second" (DESIGN.md)
    # Both workers (the kernel picks one per connection): full and resumed, refused alike.
    for _ in range(4):
        full, resumed = Attempt(served.port, device), Attempt(served.port, device, ticket)
        assert resumed.reused and not full.reused
        assert resumed.connack == full.connack == Connack(reason_code=0x05)
    time.sleep(0.5)  # let the events ship (the spool's group commit and COPY)
    events = _connects(harness, served.instance, device, 9)[1:]
    assert [(e["reason"], e["resumed"]) for e in events] == [
        (reason, "false"),
        (reason, "true"),
    ] * 4


def _s_client(port: int, device: Device, session: str, tmp_path: Path) -> str:
    """``openssl s_client`` with a device certificate, sending CONNECT; its output."""
    flag = "-sess_out" if not (tmp_path / session).exists() else "-sess_in"
    command = [
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3",
        "-cert", str(device.cert), "-key", str(device.key), "-CAfile", str(device.chain),
        "-servername", "localhost", flag, str(tmp_path / session), "-ign_eof",
    ]  # fmt: skip
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as process:
        assert process.stdin is not None
        connect = Connect(protocol_level=4, client_id=device.device_id)
        process.stdin.write(encode(connect, version=4))
        process.stdin.flush()
        time.sleep(1.0)  # the CONNACK and the ticket arrive
        process.stdin.close()
        time.sleep(0.2)
        process.terminate()
        assert process.stdout is not None
        out = process.stdout.read()
        process.wait(10)
    return out.decode(errors="replace")


def test_openssl_s_client_reuses_the_session(
    harness: Harness, served: Served, make_device: DeviceFactory, tmp_path: Path
) -> None:
    device = make_device()
    first = _s_client(served.port, device, "session.pem", tmp_path)
    assert "New, TLSv1.3" in first and (tmp_path / "session.pem").exists(), first
    second = _s_client(served.port, device, "session.pem", tmp_path)
    assert "Reused, TLSv1.3" in second, second
    events = _connects(harness, served.instance, device, 2)
    assert [(e["reason"], e["resumed"]) for e in events] == [("ok", "false"), ("ok", "true")]
