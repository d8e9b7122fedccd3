"""A bounded reconnect storm (bench/storm.py's, issue 24): the served gateway holding 200
devices (each its own certificate) is restarted (SIGTERM drain, start again); every device
reconnects with jittered exponential backoff, first with full handshakes, then offering its
ticket. Every device gets back in, every reconnect has its ``connect`` event in PostgreSQL,
and the gateway refuses nobody for anything but a documented limit.

Then the HAProxy phase, bounded: two instances behind a real HAProxy, one restarted under
its devices while sessions held on the other measure round trips: none of those is cut,
no message is lost."""

from __future__ import annotations

import argparse
import shutil

import pytest

from bench.reconnect import Fleet
from bench.storm import check, gateway_server, mosquitto_server, setup, storm
from bench.storm_haproxy import check_haproxy, run_only, unavailable
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


HAPROXY_MISSING = unavailable(100, 10)


@pytest.mark.skipif(HAPROXY_MISSING is not None, reason=HAPROXY_MISSING or "")
def test_a_restart_behind_haproxy_cuts_nothing_on_the_other_instance() -> None:
    args = argparse.Namespace(
        devices=100, sources=4, keep=False, procs=2, workers=2, uncut=10, rtt_interval=0.2,
        baseline=2.0, base=1.0, cap=8.0, timeout=120.0,
    )  # fmt: skip
    hp = run_only(args)
    assert check([hp.phase]) == []
    assert check_haproxy(hp, 10) == []  # none cut, none lost, round trips during the storm
    # leastconn put devices on both; A's came back (through HAProxy, mostly to B).
    assert hp.on_a > 0 and hp.on_b > 0
    assert hp.phase.report.connects >= hp.on_a
    assert sum(hp.landed.values()) >= hp.phase.report.connects
    assert hp.uncut.received == hp.uncut.sent > 0
