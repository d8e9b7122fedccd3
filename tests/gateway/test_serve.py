"""The real entry point as a child process: ``python -m gateway.serve``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Pki
from tests.gateway.conftest import DeviceFactory, Harness
from tests.helpers import free_port, wait_for_port


@pytest.fixture
def served(
    pki: Pki, database_url: str, mosquitto_port: int, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int, str, Path]]:
    port = free_port()
    policy = tmp_path / "policy.toml"
    policy.write_text('[fleets.bench]\nclient_ids = ["{device_id}-*"]\n')
    instance = f"serve-{os.getpid()}-{port}"
    env = {
        **os.environ,
        "DEVICEGATE_DATABASE_URL": database_url,
        "DEVICEGATE_PKI_DIR": str(pki.directory),
        "DEVICEGATE_GATEWAY_LISTEN": f"127.0.0.1:{port}",
        "DEVICEGATE_UPSTREAM_URL": f"mqtt://127.0.0.1:{mosquitto_port}",
        "DEVICEGATE_POLICY_FILE": str(policy),
        "DEVICEGATE_SPOOL_DIR": str(tmp_path / "spool"),
        "DEVICEGATE_INSTANCE_ID": instance,
        "DEVICEGATE_METRICS_LISTEN": "127.0.0.1:0",  # any free port: tests run side by side
    }
    log = tmp_path / "gateway.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "gateway.serve"], env=env, stderr=stderr)
    try:
        try:
            wait_for_port(port, timeout=15)
        except TimeoutError:
            raise AssertionError(log.read_text()) from None
        yield process, port, instance, policy
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_round_trip_and_clean_shutdown(
    served: tuple[subprocess.Popen[bytes], int, str, Path],
    harness: Harness,
    make_device: DeviceFactory,
) -> None:
    process, port, instance, policy = served
    device = make_device("served", fleet="bench")
    tls = ["-h", "127.0.0.1", "-p", str(port), "--cafile", str(device.chain),
           "--cert", str(device.cert), "--key", str(device.key)]  # fmt: skip
    topic = f"devices/{device.device_id}/t"
    try:
        subprocess.run(
            ["mosquitto_pub", *tls, "-i", f"{device.device_id}-pub", "-t", topic, "-r",
             "-q", "1", "-m", "hello"],
            check=True, timeout=10,
        )  # fmt: skip
        got = subprocess.run(
            ["mosquitto_sub", *tls, "-i", f"{device.device_id}-sub", "-t", topic, "-C", "1",
             "-W", "5"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        assert got.stdout.strip() == "hello", got.stderr
        # SIGHUP reloads the policy: without the bench fleet, "<device>-pub" is refused.
        policy.write_text("")
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        refused = None
        while time.monotonic() < deadline:
            refused = subprocess.run(
                ["mosquitto_pub", *tls, "-i", f"{device.device_id}-pub", "-t", topic, "-m", "x"],
                capture_output=True, text=True, timeout=10,
            )  # fmt: skip
            if refused.returncode != 0:
                break
            time.sleep(0.05)
        assert refused is not None and "identifier rejected" in refused.stderr.lower()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    # The spool sink ships the events to PostgreSQL (before exiting, or on the next start).
    deadline = time.monotonic() + 10
    rows = []
    while time.monotonic() < deadline:
        rows = harness.query(
            "SELECT type, outcome, reason, client_id FROM auth_events"
            " WHERE instance = $1 AND device_id = $2 ORDER BY seq",
            instance,
            device.device_id,
        )
        if rows and rows[-1]["reason"] == "client_id_mismatch":
            break
        time.sleep(0.05)
    # (A publish racing the SIGHUP may add an allowed connect/session_end pair.)
    assert [(r["type"], r["reason"]) for r in rows[:4]] == [
        ("connect", "ok"),
        ("session_end", "client_disconnected"),
        ("connect", "ok"),
        ("session_end", "client_disconnected"),
    ]
    assert (rows[-1]["type"], rows[-1]["reason"]) == ("connect", "client_id_mismatch")
