"""Figure: the audit bytes one abusive device can cost per minute under the denial budget.

Drives the real sans-IO `gateway.connection.Session` (default `DenialLimits`) with the
largest denials a device can make it record — topics and filters far past the 256-byte
clip, ten distinct ones per SUBSCRIBE, random so that PostgreSQL cannot compress them — and
keeps the events it records: the session's ``connect``, its individual denials, the
summaries, and its ``session_end`` (``too_many_denials``). Each shape is then COPYed
``--copies`` times (the gateway sink's own row encoder, chained) into a scratch, migrated
database, and its bytes per row are read from the partitions' size with indexes and TOAST
(``pg_total_relation_size``). The worst case per session and window is then

    connect + DENIAL_EVENTS_PER_WINDOW x the largest individual denial
            + 2 summaries (publish, subscribe) + session_end

Usage: .venv/bin/python bench/denial_bytes.py [--copies 2000]
       (PostgreSQL from DEVICEGATE_BENCH_ADMIN_URL, default postgres@127.0.0.1/postgres)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import uuid
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.actions import Action, Admit, DialUpstream, Record
from gateway.audit import EventContext
from gateway.connection import Session
from gateway.denials import DenialBudget, DenialLimits
from gateway.events.codec import COLUMNS, encode_event
from gateway.identity import DeviceIdentity
from gateway.mqtt import Connack, Connect, Publish, Subscribe, Subscription, encode
from gateway.policy import compile_for
from schemas.events import AuthEvent, EventType, Reason
from schemas.migrate import migrate
from schemas.policy import FleetPolicy

ADMIN_URL = os.environ.get(
    "DEVICEGATE_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
DEVICE = DeviceIdentity(
    device_id="line-1-k3x9q2m7a1b4",
    fleet="line-a",
    serial=secrets.token_hex(20),
    fingerprint=secrets.token_hex(32),
)


def _long(n: int = 1000) -> str:
    """A topic no compressor shrinks, far longer than the clip."""
    return "x/" + secrets.token_urlsafe(n)


def _events(actions: list[Action]) -> list[AuthEvent]:
    return [a.event for a in actions if isinstance(a, Record)]


def shapes(limits: DenialLimits) -> dict[str, AuthEvent]:
    """The largest event of each kind a device can make the session record."""
    context = EventContext(
        instance="gw-1/w0",
        peer_address="203.0.113.77:51234",
        tls_version="TLSv1.3",
        tls_cipher="TLS_AES_256_GCM_SHA384",
        identity=DEVICE,
        trace_id=secrets.token_hex(16),
    )
    session = Session(
        identity=DEVICE,
        policy=compile_for(FleetPolicy(), DEVICE),
        context=context,
        max_packet_size=256 * 1024,
        denials=DenialBudget(limits),
    )
    v5 = 5
    session.receive_device(
        encode(Connect(protocol_level=v5, client_id=DEVICE.device_id), version=v5)
    )
    assert isinstance(session.device_checked(Reason.OK)[0], DialUpstream)
    (admit,) = session.receive_upstream(encode(Connack(reason_code=0), version=v5))
    assert isinstance(admit, Admit)
    session.admitted()
    found = {"connect": admit.event}
    filters = tuple(Subscription(topic_filter=_long()) for _ in range(10))
    (subscribe,) = _events(
        session.receive_device(encode(Subscribe(packet_id=1, subscriptions=filters), version=v5))
    )
    found["subscribe (10 long filters)"] = subscribe
    publish = Publish(topic=_long(), payload=b"", qos=1, packet_id=2)
    (one,) = _events(session.receive_device(encode(publish, version=v5)))
    found["publish (long topic)"] = one
    for _ in range(limits.events_per_window - 2):  # use up the window's individual events
        session.receive_device(encode(Publish(topic=_long(), payload=b""), version=v5))
    held = b"".join(encode(Publish(topic=_long(), payload=b""), version=v5) for _ in range(10))
    held += encode(Subscribe(packet_id=3, subscriptions=filters), version=v5)
    assert _events(session.receive_device(held)) == []  # all held
    over = limits.per_window  # one SUBSCRIBE that crosses the budget
    crossing = tuple(Subscription(topic_filter="#") for _ in range(over))
    ending = _events(
        session.receive_device(encode(Subscribe(packet_id=4, subscriptions=crossing), version=v5))
    )
    summaries = [e for e in ending if e.detail.get("summary")]
    found["publish summary (10 long topics)"] = next(
        e for e in summaries if e.type is EventType.PUBLISH
    )
    found["subscribe summary (10 long filters)"] = next(
        e for e in summaries if e.type is EventType.SUBSCRIBE
    )
    found["session_end (too_many_denials)"] = ending[-1]
    return found


async def bytes_per_row(conn: asyncpg.Connection, event: AuthEvent, copies: int) -> float:
    size = (
        "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0) FROM pg_inherits"
        " WHERE inhparent = 'auth_events'::regclass"
    )
    await conn.execute("TRUNCATE auth_events")
    await conn.execute("VACUUM auth_events")
    before = await conn.fetchval(size)
    chain = f"bench/{secrets.token_hex(3)}"
    prev = bytes(32)
    rows = []
    for seq in range(1, copies + 1):
        copy = event.model_copy(update={"id": uuid.uuid4()})
        _, prev, row = encode_event(copy, chain_id=chain, seq=seq, prev_digest=prev)
        rows.append(row)
    for start in range(0, len(rows), 500):
        await conn.copy_records_to_table(
            "auth_events", records=rows[start : start + 500], columns=COLUMNS
        )
    return (await conn.fetchval(size) - before) / copies


async def main(args: argparse.Namespace) -> None:
    limits = DenialLimits()
    found = shapes(limits)
    name = f"dg_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    conn = await asyncpg.connect(f"{ADMIN_URL.rpartition('/')[0]}/{name}")
    try:
        await migrate(conn)
        sizes = {label: await bytes_per_row(conn, e, args.copies) for label, e in found.items()}
    finally:
        await conn.close()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()
    print(f"default limits: {limits}; {args.copies} copies of each row")
    print("| event | bytes per row (heap + TOAST + indexes) |")
    print("|---|---|")
    for label, value in sizes.items():
        print(f"| {label} | {value:,.0f} |")
    individual = max(sizes["subscribe (10 long filters)"], sizes["publish (long topic)"])
    window = (
        sizes["connect"]
        + limits.events_per_window * individual
        + sizes["publish summary (10 long topics)"]
        + sizes["subscribe summary (10 long filters)"]
        + sizes["session_end (too_many_denials)"]
    )
    rows = 1 + limits.events_per_window + 2 + 1
    print(
        f"worst case per session and {limits.window:g} s window: {rows} rows, "
        f"{window / 1024:,.1f} KiB"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=2000)
    asyncio.run(main(parser.parse_args()))
