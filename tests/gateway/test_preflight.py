"""The gateway says what is missing around it: a broker that is down, a database nobody
migrated. One plain line in its log, and ``GET /readyz`` on the metrics port lists it until
it is fixed (the real ``devicegate serve gateway``, a real Mosquitto started late)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Pki
from tests.gateway.served import serve_gateway
from tests.helpers import free_port, mosquitto


def readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_until(check: Callable[[], bool], *, within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {within} s")


def test_a_broker_that_is_down_is_named_and_readiness_follows_it(
    pki: Pki, database_url: str, tmp_path: Path
) -> None:
    broker_port, metrics_port = free_port(), free_port()
    with serve_gateway(
        pki=pki,
        database_url=database_url,
        upstream_port=broker_port,
        directory=tmp_path,
        workers=1,
        env={"DEVICEGATE_METRICS_LISTEN": f"127.0.0.1:{metrics_port}"},
    ) as served:
        line = f"upstream broker 127.0.0.1:{broker_port} is not reachable"
        wait_until(lambda: line in served.log.read_text(), within=20)
        status, body = readyz(metrics_port)
        assert status == 503 and f"127.0.0.1:{broker_port} not reachable" in body, body
        assert "Traceback" not in served.log.read_text()
        with mosquitto(tmp_path, port=broker_port):
            wait_until(lambda: readyz(metrics_port)[0] == 200, within=15)
            assert readyz(metrics_port)[1] == "ready\n"
            assert "is reachable again" in served.log.read_text()


def test_a_database_nobody_migrated_is_named(
    pki: Pki, empty_database: tuple[str, str], tmp_path: Path
) -> None:
    _, url = empty_database
    metrics_port = free_port()
    with (
        mosquitto(tmp_path) as broker_port,
        serve_gateway(
            pki=pki,
            database_url=url,
            upstream_port=broker_port,
            directory=tmp_path,
            workers=1,
            env={"DEVICEGATE_METRICS_LISTEN": f"127.0.0.1:{metrics_port}"},
        ) as served,
    ):
        line = "the database is not migrated"
        wait_until(lambda: line in served.log.read_text(), within=20)
        assert "run `devicegate db migrate`" in served.log.read_text()
        status, body = readyz(metrics_port)
        assert status == 503 and line in body, body
