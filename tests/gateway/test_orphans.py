"""Orphaned slots: events a killed gateway left unshipped in a slot no start takes.

A worker SIGKILLed while PostgreSQL is away leaves fsynced events in its slot's spool. A
cold start claims w0..w(N-1); spools on other slots (an instance that ran on w2..w3 after
a take-over) are found, claimed and shipped by the new supervisor (`gateway.orphans`):
the events reach PostgreSQL, the chains verify, and nothing is stored twice.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.events.spool import Spool, unshipped_chain
from gateway.instances import claim_orphans, claim_slots, find_orphans, running
from gateway.mqtt.packets import Disconnect
from gateway.orphans import ship_orphan
from schemas.events import GENESIS_HASH
from schemas.settings import Settings
from tests.conftest import Pki
from tests.faults.conftest import ThreadedProxy
from tests.gateway.clients import RawClient
from tests.gateway.conftest import Device, DeviceFactory, Harness
from tests.gateway.served import ServeGateway, verified_chains
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]

# Records ``count`` events into the spool with PostgreSQL unreachable (a closed port), then
# dies by SIGKILL: what a worker killed while the database is away leaves behind.
_LEAVE = """
import asyncio, os, signal, sys
from pathlib import Path
from gateway.events.sink import SpoolSink
from schemas.events import AuthEvent

async def main() -> None:
    spool, chain, url, count = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    sink = SpoolSink(database_url=url, spool_dir=spool, chain_id=chain, random_id=True,
                     connect_timeout=0.5, retry_max=0.2)
    await sink.start()
    for i in range(count):
        await sink.record(AuthEvent(instance=chain.rpartition("/")[0], type="connect",
                                    outcome="allowed", reason="ok", device_id=f"dev-{i}",
                                    client_id=f"dev-{i}"))
    assert sink.stats.events_shipped == 0
    print(sink.chain_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


def _leave_unshipped(spool: Path, chain: str, count: int) -> str:
    """Leave ``count`` unshipped events of ``chain`` in ``spool``; the full chain id."""
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    done = subprocess.run(
        [sys.executable, "-c", _LEAVE, str(spool), chain, nowhere, str(count)],
        cwd=ROOT,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done
    return done.stdout.decode().strip()


def _leave_clean(spool: Path, chain: str) -> None:
    """A spool as a clean shutdown leaves it: one empty segment naming the head."""
    clean = Spool(spool, segment_bytes=4096)
    clean.open()
    clean.start_segment(chain, 0, GENESIS_HASH)
    clean.close()


def test_orphans_are_the_unshipped_spools_outside_live_claims(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    for slot in (0, 3, 5, 7):
        _leave_unshipped(spool_dir / f"w{slot}", f"gw/w{slot}", 3)
    _leave_clean(spool_dir / "w4", "gw/w4#0")
    (spool_dir / "w6").mkdir()  # a slot directory without a segment
    (spool_dir / "other").mkdir()
    (spool_dir / "w9.bak").mkdir()
    # w7's spool is open in a live process (a worker of a dead supervisor, still draining).
    busy = os.open(spool_dir / "w7" / "lock", os.O_RDWR)
    fcntl.flock(busy, fcntl.LOCK_EX)
    own, _ = claim_slots(spool_dir, 2, "127.0.0.1:1")  # w0..w1
    other, live = claim_slots(spool_dir, 2, "127.0.0.1:1")  # another live supervisor: w2..w3
    try:
        assert (own.base, other.base) == (0, 2) and len(live) == 1
        orphans = find_orphans(spool_dir)
        assert [o.slot for o in orphans] == [5]
        assert orphans[0].spool == spool_dir / "w5"
        assert orphans[0].chain_id.startswith("gw/w5#")

        claimed = claim_orphans(spool_dir, "127.0.0.1:1")
        assert [(o.slot, c.slots) for o, c in claimed] == [(5, range(5, 6))]
        # Held: a live claim of one slot, so nobody else finds it, or chooses it.
        assert find_orphans(spool_dir) == [] and claim_orphans(spool_dir, "x") == []
        assert sorted(r.base for r in running(spool_dir)) == [0, 2, 5]
        third, _ = claim_slots(spool_dir, 2, "127.0.0.1:1")
        assert third.base == 6  # w4 is free, w5 is claimed
        third.release()

        other.release()  # its supervisor stopped, w3's events left: an orphan now
        assert [o.slot for o in find_orphans(spool_dir)] == [3]
        claimed[0][1].release()
        os.close(busy)
        assert [o.slot for o in find_orphans(spool_dir)] == [3, 5, 7]
    finally:
        own.release()
        other.release()


async def test_an_orphan_that_cannot_be_shipped_stays_on_disk(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    spool_dir = tmp_path / "spool"
    chain = _leave_unshipped(spool_dir / "w4", "gw-away/w4", 5)
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    settings = Settings(
        database_url=nowhere, spool_dir=spool_dir, instance_id="gw-away", pki_dir=pki.directory
    )
    caplog.set_level("INFO", logger="devicegate.gateway.orphans")
    assert not await ship_orphan(settings, 4, within=0.5)
    errors = [r.getMessage() for r in caplog.records if r.name == "devicegate.gateway.orphans"]
    assert errors == [
        f"orphaned spool {spool_dir / 'w4'}: 5 of 5 events of chain {chain} not shipped "
        "within 0.5 s (PostgreSQL unreachable?); they stay on disk for the next start"
    ]
    assert [(o.slot, o.chain_id) for o in find_orphans(spool_dir)] == [(4, chain)]


def _connect_code(port: int, device: Device, client_id: str) -> int:
    with RawClient(port, device, device.chain) as client:
        code = client.connect(client_id).reason_code
        if code == 0:
            client.send(Disconnect())
        return code


def test_a_cold_start_ships_the_spools_a_killed_gateway_left_on_other_slots(
    database_url: str, tmp_path: Path, serve: ServeGateway
) -> None:
    instance = f"orphans-{os.getpid()}-{free_port()}"
    spool_dir = tmp_path / "spool"
    # The killed instance ran on w2..w3 (after a take-over), and an older one on w5.
    left = {
        _leave_unshipped(spool_dir / "w2", f"{instance}/w2", 30): 30,
        _leave_unshipped(spool_dir / "w3", f"{instance}/w3", 7): 7,
        _leave_unshipped(spool_dir / "w5", f"{instance}/w5", 12): 12,
    }
    assert [o.slot for o in find_orphans(spool_dir)] == [2, 3, 5]
    env = {"DEVICEGATE_INSTANCE_ID": instance}
    with serve(env=env, name="cold") as served:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            log = served.log.read_text()
            shipped = [line for line in log.splitlines() if "orphaned spool" in line]
            if len(shipped) == 3 and not any(
                (spool_dir / f"supervisor.{slot}.pid").exists() for slot in (2, 3, 5)
            ):
                break
            time.sleep(0.1)
        assert len(shipped) == 3, log
        for slot, count in ((2, 30), (3, 7), (5, 12)):
            assert any(
                f"orphaned spool {spool_dir / f'w{slot}'} shipped: {count} events" in line
                for line in shipped
            ), shipped
        assert not any((spool_dir / f"supervisor.{slot}.pid").exists() for slot in (2, 3, 5))
        assert (spool_dir / "supervisor.0.pid").exists()  # its own block, still held
        assert find_orphans(spool_dir) == []
        assert asyncio.run(verified_chains(database_url, instance)) == left
        served.stop()
    assert "Traceback" not in log and "ChainTaken" not in log, log

    # The next cold start finds nothing to ship: nothing is stored twice.
    with serve(env=env, name="again", like=served) as again:
        time.sleep(1.0)
        again.stop()
    assert "orphaned spool" not in again.log.read_text()
    assert asyncio.run(verified_chains(database_url, instance)) == left


def test_a_gateway_killed_on_w2_w3_while_postgresql_is_away_is_shipped_by_a_cold_start(
    database_url: str,
    tmp_path: Path,
    harness: Harness,
    make_device: DeviceFactory,
    serve: ServeGateway,
) -> None:
    """The documented case end to end: a take-over put the gateway on w2..w3, PostgreSQL
    went away (a cut proxy), devices were admitted (their events only in the spool), the
    gateway was SIGKILLed; a cold start on w0..w1 ships what w2..w3 hold."""
    device = make_device("orphan", fleet="bench")
    instance = f"killed-{os.getpid()}-{free_port()}"
    env = {"DEVICEGATE_INSTANCE_ID": instance}
    proxy = ThreadedProxy(database_url)
    try:
        with (
            serve(env=env, name="a") as first,
            serve(
                env={**env, "DEVICEGATE_DATABASE_URL": proxy.url},
                name="b",
                like=first,
                take_over=True,
            ) as second,
        ):
            assert first.process.wait(60) == 0, first.log.read_text()
            before = [f"{device.device_id}-before-{i}" for i in range(5)]
            assert [_connect_code(second.port, device, c) for c in before] == [0] * 5
            proxy.cut()  # PostgreSQL is away for the w2..w3 workers from now on
            # Admitted, or refused (server unavailable) once a worker sees its revocation
            # state is not current: either way recorded (an admission before its CONNACK,
            # a refusal just after: the pause lets those reach the disk too).
            during = [f"{device.device_id}-during-{i}" for i in range(10)]
            codes = [_connect_code(second.port, device, client_id) for client_id in during]
            assert set(codes) <= {0, 3}, codes
            time.sleep(0.5)
            for pid in second.workers():
                os.kill(pid, signal.SIGKILL)
            second.process.kill()
            second.process.wait()
    finally:
        proxy.close()
    # The killed workers (reparented: not ours to wait for) hold their spools' locks until
    # their last thread is gone; a spool still open is no orphan.
    spool_dir = tmp_path / "spool"
    left = {slot for slot in range(4) if unshipped_chain(spool_dir / f"w{slot}")}
    assert left and left <= {2, 3}, left  # w0..w1 drained at the take-over
    deadline = time.monotonic() + 10
    orphans = find_orphans(spool_dir)
    while {o.slot for o in orphans} != left:
        assert time.monotonic() < deadline, (left, orphans)
        time.sleep(0.05)
        orphans = find_orphans(spool_dir)
    with serve(env=env, name="cold", like=first) as cold:
        claims = [spool_dir / f"supervisor.{o.slot}.pid" for o in orphans]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
            cold.log.read_text().count("orphaned spool") < len(orphans)
            or any(claim.exists() for claim in claims)
        ):
            time.sleep(0.1)
        log = cold.log.read_text()
        assert not any(claim.exists() for claim in claims), log
        assert find_orphans(spool_dir) == [], log  # claims released: nothing left to ship
        cold.stop()
    assert log.count("orphaned spool") == len(orphans), log
    connects = {
        row["client_id"]: (row["chain_id"].partition("#")[0], row["outcome"])
        for row in harness.query(
            "SELECT client_id, chain_id, outcome FROM auth_events WHERE instance = $1"
            " AND type = 'connect'",
            instance,
        )
    }
    # Every connection the killed gateway answered has its event, from w2 or w3.
    answered = [(c, 0) for c in before] + list(zip(during, codes, strict=True))
    for client_id, code in answered:
        chain, outcome = connects[client_id]
        assert chain in {f"{instance}/w2", f"{instance}/w3"}, (client_id, chain)
        assert outcome == ("allowed" if code == 0 else "denied"), (client_id, code, outcome)
    chains = asyncio.run(verified_chains(database_url, instance))
    assert {chain.partition("#")[0] for chain in chains} <= {
        f"{instance}/w{slot}" for slot in range(4)
    }, chains
