"""A bounded reconnect storm (bench/storm.py's, issue 24): the served gateway holding 200
devices (each its own certificate) is restarted (SIGTERM drain, start again); every device
reconnects with jittered exponential backoff, first with full handshakes, then offering its
ticket. Every device gets back in, every reconnect has its ``connect`` event in PostgreSQL,
and the gateway refuses nobody for anything but a documented limit."""

from __future__ import annotations

import shutil

import pytest

from bench.reconnect import Fleet
from bench.storm import check, gateway_server, mosquitto_server, setup, storm
from gateway.tickets import RESUMPTION

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None, reason="no mosquitto")


def _storm(devices: int) -> None:
    with setup(devices, sources=4) as s:
        upstream = mosquitto_server(s.work, None, "upstream")
        upstream.start()
        gateway = gateway_server(s.work, s.pki, s.url, upstream.port, workers=2)
        gateway.start()
        fleet = Fleet(s.members)
        try:
            fleet.connect(gateway.port, resume=False, base=1.0, cap=8.0)
            fleet.wait_held(devices, 120)
            phases = [
                storm(
                    fleet,
                    gateway,
                    name,
                    resume=resume,
                    timeout=180,
                    url=s.url,
                    instance="storm-gateway",
                )
                for name, resume in (("full", False), ("resumed", True))
            ]
        finally:
            fleet.close()
            gateway.stop()
            upstream.stop()
    assert check(phases) == []
    full, resumed = phases
    assert full.report.resumed == 0 and full.events >= full.report.connects >= devices
    assert resumed.events >= resumed.report.connects >= devices
    if RESUMPTION:  # the ticket key file outlives the processes: the new one resumes
        assert resumed.report.resumed == resumed.report.connects


def test_a_storm_of_200_devices() -> None:
    _storm(200)


@pytest.mark.slow
def test_a_storm_of_2000_devices() -> None:
    _storm(2000)
