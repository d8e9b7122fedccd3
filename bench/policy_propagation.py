"""Benchmark: policy change -> enforcement on live sessions, over three gateway instances.

Three ``devicegate serve gateway --workers 1`` instances with ``POLICY_SOURCE=database``,
one PostgreSQL (a scratch database), one Mosquitto. Each round: a committed change
(``provisioning.policies.apply_policy``: its transaction and NOTIFY) allows ``fleets/bench/#``;
one MQTT 5 and one MQTT 3.1.1 device per instance subscribe to it; then a measured change
forbids it. Every one of the six sessions must end (the v5 ones with DISCONNECT 0x87).
Per change: latency from just before the commit to the *last* session's end (what
issue 23 bounds: p99 <= 1 s), and the commit alone. ``--held N`` more idle sessions per
instance (subscribed to their own topics only, so never ended) are re-judged by every change.

CPU per change for each gateway process: its CPU time (``/proc``) over the measured
change's window (commit to last enforcement plus the event flush, ``--settle``), divided by
the changes; the widening change and the reconnections between rounds are outside it.
Also printed: each instance's last re-judgement log line (sessions re-judged, longest
slice the loop was held), and an in-process figure for 10,000 sessions re-judged by the
pure session code alone (``Session.rejudge``), in slices as the gateway runs them.

Usage: .venv/bin/python bench/policy_propagation.py [--changes 100] [--held 300]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_spec = importlib.util.spec_from_file_location("bench_gateway", ROOT / "bench" / "mqtt_gateway.py")
assert _spec is not None and _spec.loader is not None
bg: Any = importlib.util.module_from_spec(_spec)
sys.modules["bench_gateway"] = bg
_spec.loader.exec_module(bg)

from gateway.audit import EventContext  # noqa: E402
from gateway.connection import Session as SansIoSession  # noqa: E402
from gateway.identity import DeviceIdentity  # noqa: E402
from gateway.mqtt import Connect, Subscribe, encode  # noqa: E402
from gateway.mqtt.packets import Subscription  # noqa: E402
from gateway.policy_live import state_from_document  # noqa: E402
from gateway.server import REJUDGE_SLICE  # noqa: E402
from provisioning import policies  # noqa: E402
from provisioning.pki.directory import init_pki  # noqa: E402
from schemas.events import Reason  # noqa: E402
from schemas.policy import (  # noqa: E402
    Action,
    Effect,
    FleetPolicy,
    Policy,
    PolicyDocument,
    Statement,
)

FLEET = bg.FLEET
FILTER = f"fleets/{FLEET}/#"
_REJUDGED = re.compile(
    r"policy version (\d+): (\d+) session\(s\) re-judged, (\d+) ended, in ([\d.]+) ms "
    r"\(longest slice ([\d.]+) ms\)"
)


def document(*, wide: bool) -> dict[str, Any]:
    """Own topics, client ids ``{device_id}`` and ``{device_id}-*``, the fleet's topics;
    narrow: those denied by a Deny statement."""
    statements = [
        Statement(
            id="connect", effect=Effect.ALLOW, actions=(Action.CONNECT,),
            resources=("{device_id}", "{device_id}-*"),
        ),
        Statement(
            id="own", effect=Effect.ALLOW,
            actions=(Action.PUBLISH, Action.SUBSCRIBE, Action.RECEIVE),
            resources=("devices/{device_id}/#", "fleets/{fleet}/#"),
        ),
    ]  # fmt: skip
    if not wide:
        statements.append(
            Statement(
                id="deny-fleet", effect=Effect.DENY, actions=(Action.SUBSCRIBE, Action.RECEIVE),
                resources=("fleets/{fleet}/#",),
            )
        )  # fmt: skip
    return Policy(statements=tuple(statements)).model_dump(mode="json")


async def apply(conn: asyncpg.Connection, *, wide: bool) -> int:
    result = await policies.apply_policies(
        conn, {"bench": document(wide=wide)}, attach=[("bench", "fleet", FLEET)], actor="bench",
        instance="bench",
    )  # fmt: skip
    return int(result.version)


def connect_v5(client_id: str) -> bytes:
    return encode(Connect(protocol_level=5, client_id=client_id), version=5)


def subscribe(version: int, *filters: str) -> bytes:
    subscriptions = tuple(Subscription(topic_filter=f, qos=1) for f in filters)
    return encode(Subscribe(packet_id=1, subscriptions=subscriptions), version=version)


class Watch(asyncio.Protocol):
    """One session: CONNACK, SUBACK, then the time its connection ends (and whether the
    gateway sent a DISCONNECT first)."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.ended = loop.create_future()
        self.got = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.got.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(time.monotonic())
        self.got.set()

    async def packets(self, count: int) -> None:
        """Wait until ``count`` whole packets have arrived (CONNACK, SUBACK)."""
        async with asyncio.timeout(10):
            while _whole(self.buf) < count:
                if self.ended.done():
                    raise ConnectionError("closed")
                self.got.clear()
                await self.got.wait()


def _whole(buf: bytearray) -> int:
    count, pos = 0, 0
    while pos + 1 < len(buf):
        length, shift, i = 0, 0, pos + 1
        while i < len(buf):
            length |= (buf[i] & 0x7F) << shift
            shift += 7
            i += 1
            if buf[i - 1] < 0x80:
                break
        else:
            return count
        if i + length > len(buf):
            return count
        count += 1
        pos = i + length
    return count


async def open_session(env: Any, device: Any, port: int, version: int, *filters: str) -> Watch:
    loop = asyncio.get_running_loop()
    _, watch = await loop.create_connection(
        Watch, "127.0.0.1", port, ssl=bg.client_context(env, device), server_hostname="localhost"
    )
    assert watch.transport is not None
    hello = bg.connect_frame(device.device_id) if version == 4 else connect_v5(device.device_id)
    watch.transport.write(hello + subscribe(version, *filters))
    await watch.packets(2)
    return watch


def granted(watch: Watch, version: int) -> bool:
    """Whether the SUBACK (the second packet) granted every filter."""
    buf = bytes(watch.buf)
    first = 2 + buf[1]  # CONNACK: short remaining length
    suback = buf[first:]
    codes = suback[4 + (1 if version == 5 else 0) :]  # header, id, (v5: empty properties)
    return all(code < 0x80 for code in codes)


async def rounds(
    env: Any, url: str, ports: list[int], devices: list[tuple[Any, int]], changes: int,
    cpu: Any, settle: float,
) -> tuple[list[float], list[float], list[float]]:  # fmt: skip
    latencies, commits, cpu_used = [], [], []
    conn = await asyncpg.connect(url)
    try:
        for _ in range(changes):
            await apply(conn, wide=True)
            sessions: list[Watch] = []
            for index, (device, version) in enumerate(devices):
                port = ports[index % len(ports)]
                deadline = time.monotonic() + 5
                while True:
                    watch = await open_session(
                        env, device, port, version, f"devices/{device.device_id}/#", FILTER
                    )
                    if granted(watch, version):
                        break
                    assert watch.transport is not None
                    watch.transport.close()
                    if time.monotonic() > deadline:
                        raise RuntimeError("the widening change never arrived")
                    await asyncio.sleep(0.05)
                sessions.append(watch)
            await asyncio.sleep(0.05)
            before = cpu()
            started = time.monotonic()
            await apply(conn, wide=False)
            committed = time.monotonic()
            ends = await asyncio.wait_for(asyncio.gather(*(s.ended for s in sessions)), 10)
            latencies.append(max(ends) - started)
            commits.append(committed - started)
            await asyncio.sleep(settle)
            cpu_used.append([after - b for after, b in zip(cpu(), before, strict=True)])
    finally:
        await conn.close()
    return latencies, commits, cpu_used


def hold(env: Any, devices: list[Any], ports: list[int], per_instance: int) -> Any:
    """Idle sessions (``{device_id}-h<n>`` client ids), each subscribed to its own topic."""

    async def main() -> list[Watch]:
        held = []
        gate = asyncio.Semaphore(32)

        async def one(device: Any, port: int, n: int) -> None:
            async with gate:
                loop = asyncio.get_running_loop()
                _, watch = await loop.create_connection(
                    Watch, "127.0.0.1", port, ssl=bg.client_context(env, device),
                    server_hostname="localhost",
                )  # fmt: skip
                assert watch.transport is not None
                client_id = f"{device.device_id}-h{n}"
                watch.transport.write(
                    bg.connect_frame(client_id) + subscribe(4, f"devices/{device.device_id}/#")
                )
                await watch.packets(2)
                held.append(watch)

        await asyncio.gather(
            *(
                one(devices[n % len(devices)], port, i * per_instance + n)
                for i, port in enumerate(ports)
                for n in range(per_instance)
            )
        )
        return held

    return main


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def in_process_rejudge(sessions: int) -> list[tuple[str, float, float, float]]:
    """Re-judge ``sessions`` sans-IO sessions (each subscribed to its own topics and its
    fleet's) as `Gateway._rejudge` does, in slices of `REJUDGE_SLICE` seconds, for two
    changes: one to another fleet's policy (nothing to recompile: `PolicyState.carry_over`),
    then one that revokes the fleet filter (every device recompiled, every session ended).
    Per change: its name, total seconds, longest slice, seconds per session."""
    other = PolicyDocument(fleets={"other": FleetPolicy()})
    wide = PolicyDocument(
        fleets={
            FLEET: FleetPolicy(subscribe=("devices/{device_id}/#", "fleets/{fleet}/#")),
            "other": FleetPolicy(),
        }
    )
    unrelated = wide.model_copy(
        update={"fleets": {**wide.fleets, "other": FleetPolicy(publish=("x/#",))}}
    )
    narrow = PolicyDocument(
        fleets={FLEET: FleetPolicy(subscribe=("devices/{device_id}/#",)), **other.fleets}
    )
    state = state_from_document(wide, version=1)
    made = []
    for n in range(sessions):
        identity = DeviceIdentity(
            device_id=f"dev-{n}", fleet=FLEET, serial=f"{n:x}", fingerprint="00"
        )
        session = SansIoSession(
            identity=identity,
            policy=state.for_identity(identity, trust_domain="bench"),
            context=EventContext(instance="bench"),
            max_packet_size=65536,
        )
        session.receive_device(
            encode(Connect(protocol_level=4, client_id=identity.device_id), version=4)
        )
        session.device_checked(Reason.OK)
        session.receive_upstream(b"\x20\x02\x00\x00")
        session.admitted()
        session.receive_device(subscribe(4, f"devices/dev-{n}/#", FILTER))
        made.append(session)
    results = []
    for name, document, version, ends in (
        ("another fleet's policy changed", unrelated, 2, False),
        ("the fleet filter revoked", narrow, 3, True),
    ):
        new = state_from_document(document, version=version)
        new.carry_over(state)
        state = new
        started = slice_started = time.perf_counter()
        longest = 0.0
        for session in made:  # as `Gateway._rejudge` slices them
            now = time.perf_counter()
            if now - slice_started >= REJUDGE_SLICE:
                longest = max(longest, now - slice_started)
                slice_started = now
            policy = state.for_identity(session.identity, trust_domain="bench")
            actions = session.rejudge(policy) if policy is not session.policy else []
            assert bool(actions) is ends
        total = time.perf_counter() - started
        longest = max(longest, time.perf_counter() - slice_started)
        results.append((name, total, longest, total / sessions))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=100, help="measured changes")
    parser.add_argument("--held", type=int, default=300, help="idle sessions per instance")
    parser.add_argument("--settle", type=float, default=0.3, help="CPU window after the last end")
    parser.add_argument("--rejudge", type=int, default=10_000, help="in-process sessions")
    args = parser.parse_args()
    bg._raise_fd_limit()
    in_process = in_process_rejudge(args.rejudge)
    work = Path(tempfile.mkdtemp(prefix="devicegate-policy-prop-"))
    pki = work / "pki"
    init_pki(pki, passphrase=bg.PASSPHRASE, force=True)
    (work / "devices").mkdir()
    made = bg.make_devices(pki, work / "devices", 6)
    env = bg.Env(str(pki / "chain.pem"), tuple(d for d, _ in made))
    devices = [(d, 5 if i % 2 == 0 else 4) for i, (d, _) in enumerate(made)]
    db_name = f"dg_bench_{secrets.token_hex(4)}"
    url = asyncio.run(bg.create_database(db_name, made))
    upstream = bg.free_port()
    extra = {"DEVICEGATE_POLICY_SOURCE": "database"}
    try:
        with bg.mosquitto(work, upstream, None), contextlib.ExitStack() as stack:
            asyncio.run(_seed(url))
            targets = [
                stack.enter_context(
                    bg.gateway(work, pki, url, upstream, 1, name=f"gw{i}", extra_env=extra)
                )[0]
                for i in range(3)
            ]
            ports = [t.port for t in targets]

            def cpu() -> list[float]:
                return [bg.cpu_seconds(t.pids) for t in targets]

            async def run() -> tuple[list[float], list[float], list[float]]:
                held = await hold(env, [d for d, _ in devices], ports, args.held)()
                try:
                    return await rounds(env, url, ports, devices, args.changes, cpu, args.settle)
                finally:
                    for watch in held:
                        if watch.transport is not None:
                            watch.transport.close()

            latencies, commits, cpu_used = asyncio.run(run())
            logs = [(work / f"gw{i}.log").read_text() for i in range(3)]
    finally:
        asyncio.run(bg.drop_database(db_name))
        shutil.rmtree(work, ignore_errors=True)
    ms = [1e3 * s for s in latencies]
    print(
        f"{args.changes} changes, 3 instances (--workers 1), 6 sessions ended per change"
        f" (1 v5 + 1 v3.1.1 per instance), {args.held} idle sessions per instance re-judged"
    )
    print(
        f"commit -> last session ended: p50 {statistics.median(ms):.0f} ms, p99"
        f" {pct(ms, 0.99):.0f} ms, max {max(ms):.0f} ms (target p99 <= 1000 ms);"
        f" the commit alone p50 {1e3 * statistics.median(commits):.0f} ms"
    )
    for i in range(3):
        per_change = statistics.mean(row[i] for row in cpu_used)
        lines = _REJUDGED.findall(logs[i])
        last = lines[-1] if lines else None
        where = (
            f"last pass: {last[1]} sessions re-judged, {last[2]} ended, {last[3]} ms,"
            f" longest slice {last[4]} ms"
            if last
            else "no re-judgement logged"
        )
        print(f"gw{i}: CPU {1e3 * per_change:.1f} ms per change ({where})")
    for name, total, longest, each in in_process:
        print(
            f"in-process, {args.rejudge:,} sessions, {name}: {1e3 * total:.0f} ms of work"
            f" ({1e6 * each:.1f} us per session), longest slice {1e3 * longest:.1f} ms"
            f" (budget {1e3 * REJUDGE_SLICE:.0f} ms)"
        )


async def _seed(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await apply(conn, wide=True)
    finally:
        await conn.close()


if __name__ == "__main__":
    main()
