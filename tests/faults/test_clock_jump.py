"""Issue 11 item 4: the wall clock steps under a running gateway.

An NTP step, or a VM resumed in the device room, moves ``CLOCK_REALTIME`` and nothing
else. The gateway processes run under libfaketime with an offset the test rewrites at
run time (``FAKETIME_TIMESTAMP_FILE``, no cache) and ``DONT_FAKE_MONOTONIC``; the test
process, PostgreSQL and Mosquitto keep the real clock.

What must hold across a step back (-10 min) and forward (+10 min, i.e. +20 min at once):

- live sessions keep working (PINGREQ/PINGRESP through the broker), a connection caught
  between TCP and TLS, or between TLS and CONNECT, is admitted after the step: timeouts,
  the revocation staleness bound and the limiters run on the monotonic clock (keepalive
  is the broker's: the gateway relays PINGREQ and keeps no keepalive timer of its own);
- every admitted attempt has exactly one ``connect`` event, event ids stay unique and, per
  chain, in ``seq`` order (uuid7 must not go back with the clock), and ``audit verify``
  passes although event times go back and forth;
- a revocation after the step cuts the session within a second;
- validity is wall-clock validity: once the clock is past a certificate's notAfter, new
  connections with it are refused (``certificate_expired``) and its live session ends
  (the gateway re-arms every session's notAfter timer when it sees the clock step).

The event times in PostgreSQL prove that the gateway really saw the stepped clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import ssl
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from gateway.mqtt import NEED_DATA, Connack, Connect, Disconnect, Pingreq, Pingresp, decode, encode
from provisioning.pki.directory import load_ca
from tests.conftest import PASSPHRASE, Pki
from tests.faults.conftest import (
    DEVICEGATE,
    Attempt,
    Client,
    GatewayProcess,
    assert_sink_alive,
    connect_events,
    gateway_process,
    landed,
    query,
    register_device,
    run_bounded,
    verify,
    wait_until,
)
from tests.gateway.clients import client_context
from tests.gateway.conftest import Device

STEP = 600  # seconds: well inside the certificates' validity, far past every timeout
ROOT = Path(__file__).resolve().parents[2]


def _faketime_library() -> str | None:
    for pattern in (
        "/usr/lib/*/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
        "/usr/local/lib/faketime/libfaketime.so.1",
    ):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


LIBFAKETIME = _faketime_library()
pytestmark = pytest.mark.skipif(
    LIBFAKETIME is None,
    reason="libfaketime is not installed (Debian package faketime; scripts/ensure-services.sh)",
)


# libfaketime 0.9.10 (Debian 12) breaks clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME),
# which Python 3.11's time.sleep uses, when the monotonic clock is not faked: EINVAL
# (wolfcw/libfaketime#426, fixed upstream later). This shim, preloaded before it, sends
# sleeps on any clock but CLOCK_REALTIME straight to the kernel; realtime ones stay faked.
_SLEEP_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef int (*sleep_fn)(clockid_t, int, const struct timespec *, struct timespec *);

int clock_nanosleep(clockid_t clock, int flags, const struct timespec *req,
                    struct timespec *rem) {
    static sleep_fn next;
    if (clock != CLOCK_REALTIME)
        return syscall(SYS_clock_nanosleep, clock, flags, req, rem) == 0 ? 0 : errno;
    if (next == NULL)
        next = (sleep_fn)dlsym(RTLD_NEXT, "clock_nanosleep");
    return next(clock, flags, req, rem);
}
"""
_UNFAKED_MONOTONIC = {"DONT_FAKE_MONOTONIC": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def _sleeps(preload: str) -> bool:
    """Whether Python's time.sleep works under ``preload`` with an unfaked monotonic clock."""
    probe = subprocess.run(
        [sys.executable, "-c", "import time; time.sleep(0.001)"],
        env={**os.environ, "LD_PRELOAD": preload, "FAKETIME": "-600", **_UNFAKED_MONOTONIC},
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    return probe.returncode == 0


@pytest.fixture(scope="session")
def faketime_preload(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``LD_PRELOAD`` for a process on a faked realtime clock (and the real monotonic one)."""
    assert LIBFAKETIME is not None
    if _sleeps(LIBFAKETIME):
        return LIBFAKETIME
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("this libfaketime breaks time.sleep (libfaketime#426) and no C compiler")
    directory = tmp_path_factory.mktemp("faketime")
    (directory / "shim.c").write_text(_SLEEP_SHIM)
    shim = directory / "sleepshim.so"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-o", str(shim), str(directory / "shim.c"), "-ldl"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    preload = f"{shim}:{LIBFAKETIME}"
    assert _sleeps(preload), "time.sleep still fails under libfaketime with the shim"
    return preload


class SteppedClock:
    """A realtime offset shared by every process started with `env`, changeable at once."""

    def __init__(self, path: Path, preload: str) -> None:
        self.path = path
        self.preload = preload
        self.offset = 0
        self.step_to(0)

    def env(self) -> dict[str, str]:
        return {
            "LD_PRELOAD": self.preload,
            "FAKETIME_TIMESTAMP_FILE": str(self.path),
            "FAKETIME_NO_CACHE": "1",  # every clock read sees the current offset
            **_UNFAKED_MONOTONIC,  # an NTP step moves CLOCK_REALTIME only
        }

    def step_to(self, offset: int) -> None:
        """Set the offset from the real clock, in seconds (atomically: no reader sees an
        empty file)."""
        scratch = self.path.with_suffix(".new")
        scratch.write_text(f"{offset:+d}\n")
        os.replace(scratch, self.path)
        self.offset = offset


def _pki_from_the_past(directory: Path, preload: str) -> Pki:
    """A PKI made an hour ago, so that a gateway stepped back 10 min still trusts it (the
    session PKI's CA certificates are backdated only 5 min)."""
    script = (
        "import sys; from pathlib import Path; from provisioning.pki.directory import init_pki; "
        "init_pki(Path(sys.argv[1]), passphrase=sys.argv[2].encode(), force=True)"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(directory), PASSPHRASE.decode()],
        env={**os.environ, "LD_PRELOAD": preload, "FAKETIME": "-3600", **_UNFAKED_MONOTONIC},
        cwd=ROOT, check=True, timeout=60, capture_output=True,
    )  # fmt: skip
    return Pki(directory, PASSPHRASE, load_ca(directory, PASSPHRASE))


async def _register(
    url: str, pki: Pki, directory: Path, name: str, *, not_after: datetime
) -> Device:
    """A device of `FLEET` whose certificate is valid from an hour ago to ``not_after``."""
    conn = await asyncpg.connect(url)
    try:
        return await register_device(
            conn, pki, directory, f"{name}-{os.urandom(3).hex()}",
            not_before=datetime.now(UTC) - timedelta(hours=1), not_after=not_after,
        )  # fmt: skip
    finally:
        await conn.close()


class LiveSession:
    """A device session held open: pings on demand, notes how and when it ended."""

    def __init__(self, device: Device, client_id: str, version: int) -> None:
        self.device = device
        self.client_id = client_id
        self.version = version
        self.disconnect: int | None = None  # reason code of a DISCONNECT received
        self.closed_at: float | None = None  # monotonic
        self._pongs: asyncio.Queue[None] = asyncio.Queue()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()

    async def dial(self, port: int, *, tls: bool = True) -> None:
        """TCP (and, unless ``tls`` is false, the TLS handshake); no CONNECT yet."""
        context = client_context(self.device, self.device.chain) if tls else None
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="localhost" if tls else None
            ),
            10,
        )

    async def start_tls(self) -> None:
        assert self._writer is not None
        context = client_context(self.device, self.device.chain)
        await asyncio.wait_for(self._writer.start_tls(context, server_hostname="localhost"), 10)

    async def connect(self, *, keepalive: int = 30) -> int:
        """Send CONNECT; the CONNACK reason code (-1: closed without one)."""
        assert self._reader is not None and self._writer is not None
        connect = Connect(protocol_level=self.version, client_id=self.client_id,
                          keepalive=keepalive)  # fmt: skip
        self._writer.write(encode(connect, version=self.version))
        buf = b""
        async with asyncio.timeout(10):
            while True:
                data = await self._reader.read(65536)
                if not data:
                    return -1
                buf += data
                result = decode(buf, version=self.version)
                if result is not NEED_DATA:
                    packet, used = result
                    break
        assert isinstance(packet, Connack), packet
        if packet.reason_code == 0:
            self._task = asyncio.create_task(self._read(buf[used:]), name=self.client_id)
        return packet.reason_code

    async def _read(self, buf: bytes) -> None:
        assert self._reader is not None
        try:
            while True:
                while buf:
                    result = decode(buf, version=self.version)
                    if result is NEED_DATA:
                        break
                    packet, used = result
                    buf = buf[used:]
                    if isinstance(packet, Pingresp):
                        self._pongs.put_nowait(None)
                    elif isinstance(packet, Disconnect):
                        self.disconnect = packet.reason_code
                data = await self._reader.read(65536)
                if not data:
                    return
                buf += data
        except (ConnectionError, ssl.SSLError):
            return
        finally:
            self.closed_at = time.monotonic()
            self._closed.set()

    async def ping(self, timeout: float = 3.0) -> bool:
        """A PINGREQ answered (the broker answers it through the gateway)."""
        if self._writer is None or self._closed.is_set():
            return False
        self._writer.write(encode(Pingreq(), version=self.version))
        try:
            await asyncio.wait_for(self._pongs.get(), timeout)
        except TimeoutError:
            return False
        return True

    async def ended(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), timeout)
        return self._closed.is_set()

    async def close(self) -> None:
        if self._writer is None:
            return
        if not self._closed.is_set():
            with contextlib.suppress(OSError):
                self._writer.write(encode(Disconnect(), version=self.version))
                await self._writer.drain()
        self._writer.transport.abort()
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._task, 2)


async def _open(device: Device, port: int, tag: str, version: int) -> LiveSession:
    session = LiveSession(device, f"{device.device_id}-{tag}", version)
    await session.dial(port)
    assert await session.connect() == 0
    return session


async def _attempts(clients: list[Client], port: int, phase: str, n: int) -> list[Attempt]:
    """``n`` connect-and-disconnect attempts, round robin over devices and versions."""
    tries = [
        clients[i % len(clients)].attempt(port, f"{phase}{i}", version=(4, 5)[i % 2])
        for i in range(n)
    ]
    return list(await asyncio.gather(*tries))


async def _anonymous(port: int, chain: Path) -> str:
    """A TLS connection without a client certificate (a failed handshake): what it saw."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(None, chain), server_hostname="localhost"
            )
            writer.write(encode(Connect(protocol_level=4, client_id="anonymous"), version=4))
            return "answered" if await reader.read(65536) else "closed"
    except (OSError, ssl.SSLError, TimeoutError) as exc:
        return f"error:{type(exc).__name__}"
    finally:
        if writer is not None:
            writer.transport.abort()


async def _event_times(url: str, instance: str, client_ids: set[str]) -> list[datetime]:
    rows = await query(
        url,
        "SELECT time FROM auth_events WHERE instance = $1 AND type = 'connect'"
        " AND client_id = ANY($2::text[])",
        instance,
        sorted(client_ids),
    )
    return [r["time"] for r in rows]


async def _revoke(url: str, pki: Pki, clock: SteppedClock, serial: str) -> float:
    """``devicegate cert revoke`` under the stepped clock; the monotonic time at which the
    revocation was first seen committed (polled every 10 ms alongside the command)."""
    env = {**os.environ, **clock.env(), "DEVICEGATE_DATABASE_URL": url,
           "DEVICEGATE_PKI_DIR": str(pki.directory)}  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        DEVICEGATE, "cert", "revoke", serial, "--json", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    conn = await asyncpg.connect(url)
    try:
        async with asyncio.timeout(30):
            while True:
                status = await conn.fetchval(
                    "SELECT status FROM certificates WHERE serial = $1", serial
                )
                if status == "revoked":
                    seen = time.monotonic()
                    break
                await asyncio.sleep(0.01)
            out, err = await process.communicate()
    finally:
        await conn.close()
    assert process.returncode == 0, (out, err)
    return seen


def _gateway(
    pki: Pki, url: str, upstream: int, work: Path, clock: SteppedClock, workers: int
) -> contextlib.AbstractContextManager[GatewayProcess]:
    return gateway_process(
        pki=pki, database_url=url, upstream=upstream, work=work, workers=workers,
        env=clock.env(),
    )  # fmt: skip


def test_clock_steps_back_and_forward_under_live_sessions(
    fault_db: str, mosquitto_port: int, tmp_path: Path, faketime_preload: str
) -> None:
    pki = _pki_from_the_past(tmp_path / "pki", faketime_preload)
    clock = SteppedClock(tmp_path / "clock", faketime_preload)
    now = datetime.now(UTC)
    devices = [
        asyncio.run(
            _register(fault_db, pki, tmp_path, f"clk{n}", not_after=now + timedelta(days=1))
        )
        for n in range(4)
    ]
    # Valid now and after the step back; expired once the clock is 10 min ahead.
    short = asyncio.run(
        _register(fault_db, pki, tmp_path, "short", not_after=now + timedelta(minutes=5))
    )
    clients = [Client(device) for device in devices]
    attempts: dict[str, list[Attempt]] = {}

    with _gateway(pki, fault_db, mosquitto_port, tmp_path / "gw", clock, 2) as served:
        pids = served.workers()

        async def scenario() -> dict[str, object]:
            facts: dict[str, object] = {}
            live = [
                await _open(devices[0], served.port, "live0", 5),
                await _open(devices[1], served.port, "live1", 4),
                await _open(devices[2], served.port, "live2", 5),
            ]
            # Caught mid-way when the clock steps: one with TCP only, one with TLS only.
            tcp_only = LiveSession(devices[3], f"{devices[3].device_id}-tcponly", 5)
            await tcp_only.dial(served.port, tls=False)
            tls_only = LiveSession(devices[3], f"{devices[3].device_id}-tlsonly", 4)
            await tls_only.dial(served.port)
            try:
                attempts["pre"] = await _attempts(clients, served.port, "pre", 4)
                # A failed handshake puts 127.0.0.1 in the failure limiter before the step: a
                # wall-clock token bucket would be emptied by the step back and refuse us.
                facts["anonymous"] = await _anonymous(served.port, pki.chain)

                clock.step_to(-STEP)
                assert [await s.ping() for s in live] == [True] * 3, served.log_text()
                attempts["back"] = await _attempts(clients, served.port, "back", 6)
                attempts["short_back"] = [await Client(short).attempt(served.port, "sb")]

                clock.step_to(+STEP)  # +20 min at once
                assert [await s.ping() for s in live] == [True] * 3, served.log_text()
                attempts["fwd"] = await _attempts(clients, served.port, "fwd", 6)
                await tcp_only.start_tls()
                facts["tcp_only"] = await tcp_only.connect()
                facts["tls_only"] = await tls_only.connect()
                attempts["short_fwd"] = [
                    await Client(short).attempt(served.port, f"sf{i}") for i in range(3)
                ]

                # A revocation after the step cuts within a second (v5: DISCONNECT 0x98).
                seen = await _revoke(fault_db, pki, clock, devices[0].serial)
                assert await live[0].ended(5)
                assert live[0].closed_at is not None
                facts["cut_after"] = live[0].closed_at - seen
                facts["cut_code"] = live[0].disconnect

                clock.step_to(0)  # and back again
                assert [await s.ping() for s in live[1:]] == [True] * 2, served.log_text()
                attempts["home"] = await _attempts(clients[1:], served.port, "home", 4)
                assert [await s.ping() for s in live[1:]] == [True] * 2, served.log_text()
            finally:
                for session in (*live, tcp_only, tls_only):
                    await session.close()
            return facts

        facts = run_bounded(scenario(), 60)
        admitted = [a for phase in ("pre", "back", "fwd", "home") for a in attempts[phase]]
        assert all(a.ok for a in admitted), Counter(a.outcome for a in admitted)
        assert attempts["short_back"][0].ok, attempts["short_back"]
        assert not any(a.ok for a in attempts["short_fwd"]), attempts["short_fwd"]
        assert facts["tcp_only"] == 0 and facts["tls_only"] == 0, facts
        assert facts["cut_code"] == 0x98, facts
        assert isinstance(facts["cut_after"], float) and facts["cut_after"] <= 1.0, facts

        midway = {f"{devices[3].device_id}-{tag}" for tag in ("tcponly", "tlsonly")}
        wanted = {a.client_id for a in admitted} | midway
        rows = run_bounded(wait_until(lambda: landed(fault_db, served.instance, wanted), 20), 30)
        assert rows, "connect events did not land"
        assert served.workers() == pids, "a worker was restarted"
        assert_sink_alive(served.log_text(tail=10**7))
        assert "Traceback" not in served.log_text(tail=10**7), served.log_text()

    # The gateway really ran on the stepped clock: its event times jumped with it.
    def times(phase: str) -> list[datetime]:
        ids = {a.client_id for a in attempts[phase]}
        return asyncio.run(_event_times(fault_db, served.instance, ids))

    pre, back, fwd, home = (times(p) for p in ("pre", "back", "fwd", "home"))
    assert max(back) < min(pre) - timedelta(seconds=STEP - 60), (pre, back)
    assert min(fwd) > max(back) + timedelta(seconds=2 * STEP - 60), (back, fwd)
    assert max(home) < min(fwd) - timedelta(seconds=STEP - 60), (fwd, home)

    # Exactly one allowed connect per admitted attempt; refusals recorded with their reason.
    connects = [r for r in rows if r["type"] == "connect"]
    per_client = Counter(r["client_id"] for r in connects)
    assert all(per_client[client_id] == 1 for client_id in wanted), per_client
    assert {r["outcome"] for r in connects if r["client_id"] in wanted} == {"allowed"}
    assert not [r for r in rows if r["reason"] in ("revocation_state_stale", "rate_limited")]
    everything = asyncio.run(query(fault_db, "SELECT * FROM auth_events ORDER BY chain_id, seq"))
    assert facts["anonymous"] != "answered", facts
    refused = Counter(r["reason"] for r in everything if r["type"] == "tls_handshake")
    assert refused == {"no_client_certificate": 1, "certificate_expired": 3}, refused
    revoked = [r for r in everything if r["type"] == "session_revoked"]
    assert [(r["client_id"], r["reason"]) for r in revoked] == [
        (f"{devices[0].device_id}-live0", "certificate_revoked")
    ]
    provisioning_revoke = [r for r in everything if r["type"] == "revoke"]
    assert len(provisioning_revoke) == 1, provisioning_revoke

    # Ids unique, and per chain in seq order although time went back (uuid7 monotonic).
    assert len({r["id"] for r in everything}) == len(everything)
    for chain in {r["chain_id"] for r in everything}:
        ids = [r["id"] for r in everything if r["chain_id"] == chain]
        assert ids == sorted(ids), f"chain {chain}: event ids out of seq order"
    report = asyncio.run(verify(fault_db))
    assert report.ok, report.to_dict()
    assert report.events == len(everything)


def test_step_past_not_after_ends_the_live_session(
    fault_db: str, mosquitto_port: int, tmp_path: Path, faketime_preload: str
) -> None:
    pki = _pki_from_the_past(tmp_path / "pki", faketime_preload)
    clock = SteppedClock(tmp_path / "clock", faketime_preload)
    short = asyncio.run(
        _register(fault_db, pki, tmp_path, "short",
                  not_after=datetime.now(UTC) + timedelta(minutes=5))
    )  # fmt: skip
    with _gateway(pki, fault_db, mosquitto_port, tmp_path / "gw", clock, 1) as served:

        async def scenario() -> tuple[bool, int | None]:
            session = await _open(short, served.port, "live", 5)
            try:
                assert await session.ping()
                clock.step_to(+STEP)  # now past its notAfter
                ended = await session.ended(3)
            finally:
                await session.close()
            return ended, session.disconnect

        ended, code = run_bounded(scenario(), 30)

        async def session_ends() -> list[asyncpg.Record]:
            rows = await connect_events(fault_db, served.instance)
            return [r for r in rows if r["type"] == "session_end"]

        rows = run_bounded(wait_until(session_ends, 5), 10)
    assert ended, "the session outlived its certificate by the wall clock"
    assert code is not None, "no DISCONNECT (v5) before the close"
    assert [r["reason"] for r in rows] == ["certificate_expired"]


def test_uuid7_stays_ordered_when_the_clock_steps_back(
    tmp_path: Path, faketime_preload: str
) -> None:
    """Within one process, ids minted after a step back still sort after the earlier ones,
    and stay unique and version 7."""
    clock = SteppedClock(tmp_path / "clock", faketime_preload)
    script = (
        "import os, sys, time; from schemas.events import uuid7\n"
        "def step(offset):\n"
        "    open(sys.argv[1] + '.new', 'w').write(offset)\n"
        "    os.replace(sys.argv[1] + '.new', sys.argv[1])\n"
        "skew = lambda: time.time() - time.monotonic()\n"
        "ids = [uuid7() for _ in range(2000)]\n"
        "before = skew(); step('-600'); after = skew()\n"
        "ids += [uuid7() for _ in range(2000)]\n"
        "step('+0'); ids += [uuid7() for _ in range(2000)]\n"
        "print(before - after); print('\\n'.join(str(u) for u in ids))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(clock.path)], env={**os.environ, **clock.env()},
        cwd=ROOT, check=True, timeout=60, capture_output=True, text=True,
    )  # fmt: skip
    stepped, *lines = done.stdout.split()
    assert abs(float(stepped) - STEP) < 5, f"the clock did not step in that process: {stepped}"
    ids = [uuid.UUID(line) for line in lines]
    assert len(ids) == 6000 and len(set(ids)) == 6000
    assert ids == sorted(ids), "uuid7 went back with the clock"
    assert {u.version for u in ids} == {7}
