"""Benchmark: ``audit verify`` throughput, beside raw SHA-256 over the same bytes.

One run against a scratch database (created and dropped here): N chained events (default
1,000,000, in 4 gateway chains) are COPYed in, each chain gets a signed checkpoint of its
head (the audit key of a throw-away PKI), then:

- ``verify``: `verify_chains` over the whole table (server-side cursor, every hash
  recomputed, every row compared with the signed checkpoints), events/s;
- ``sha256``: ``sha256(prev || canonical bytes)`` of every event, the same bytes the verifier
  hashes, already in memory: the floor of any verifier written in Python on hashlib.

Usage: .venv/bin/python bench/audit_verify.py [--events 1000000] [--chains 4]
       (PostgreSQL from DEVICEGATE_BENCH_ADMIN_URL, default postgres@127.0.0.1/postgres)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from gateway.events.codec import COLUMNS, encode_event
from provisioning.audit.checkpoints import trust_store
from provisioning.audit.verify import verify_chains
from provisioning.pki.directory import init_pki
from schemas.checkpoints import AuditSigner, write_checkpoint
from schemas.events import uuid7
from schemas.migrate import migrate

ADMIN_URL = os.environ.get(
    "DEVICEGATE_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
_BATCH = 50_000


async def main(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from events import make_events

    name = f"dg_bench_verify_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        conn = await asyncpg.connect(url)
        await migrate(conn)
        pki = Path(tempfile.mkdtemp(prefix="dg-bench-pki-"))
        init_pki(pki, passphrase=None, force=True)
        signer = AuditSigner.load(pki)
        template = make_events(5000)
        hashed: list[bytes] = []  # prev || canonical, what the verifier hashes
        per_chain = args.events // args.chains
        for c in range(args.chains):
            chain = f"bench-gw/w{c}#{secrets.token_hex(8)}"
            await conn.execute(
                "INSERT INTO audit_chains (chain_id, writer, instance, reason) "
                "VALUES ($1, 'gateway', 'bench-gw', 'genesis')",
                chain,
            )
            prev = bytes(32)
            rows = []
            for seq in range(1, per_chain + 1):
                event = template[seq % len(template)].model_copy(update={"id": uuid7()})
                payload, digest, row = encode_event(
                    event, chain_id=chain, seq=seq, prev_digest=prev
                )
                hashed.append(payload[:32] + payload[64:])
                prev = digest
                rows.append(row)
                if len(rows) == _BATCH:
                    await conn.copy_records_to_table("auth_events", records=rows, columns=COLUMNS)
                    rows = []
            if rows:
                await conn.copy_records_to_table("auth_events", records=rows, columns=COLUMNS)
            await write_checkpoint(
                conn, signer, chain_id=chain, head=(per_chain, prev.hex()), file=None
            )
        await conn.execute("VACUUM ANALYZE auth_events")
        total = per_chain * args.chains
        size = sum(len(b) for b in hashed)

        started = time.perf_counter()
        for data in hashed:
            hashlib.sha256(data).digest()
        sha = time.perf_counter() - started

        started = time.perf_counter()
        report = await verify_chains(conn, trust=trust_store(pki))
        took = time.perf_counter() - started
        assert report.ok and report.events == total, report.findings[:3]
        await conn.close()
        print(f"events: {total:,} in {args.chains} chains, {size / total:.0f} bytes hashed each")
        print(f"verify   {total / took:>12,.0f} events/s  ({took:.1f} s, {report.checkpoints} "
              "signed checkpoints checked)")  # fmt: skip
        print(f"sha256   {total / sha:>12,.0f} events/s  ({sha:.2f} s, same bytes, in memory)")
        print(f"verify / sha256: {sha / took:.3f}")
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--chains", type=int, default=4)
    asyncio.run(main(parser.parse_args()))
