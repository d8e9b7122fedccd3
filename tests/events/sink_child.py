"""A gateway worker stand-in for the kill -9 test: records events in a loop and prints each
event id on stdout once `SpoolSink.record` has returned for it.

Usage: python -m tests.events.sink_child DATABASE_URL SPOOL_DIR CHAIN_ID
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from gateway.events.sink import SpoolSink
from schemas.events import AuthEvent
from tests.events.conftest import make_event


async def main(url: str, spool_dir: str, chain_id: str) -> None:
    async with SpoolSink(database_url=url, spool_dir=Path(spool_dir), chain_id=chain_id) as sink:
        print("ready", flush=True)
        index = 0
        while True:
            batch = [make_event(index + n) for n in range(20)]
            index += len(batch)

            async def one(event: AuthEvent) -> None:
                await sink.record(event)
                sys.stdout.write(f"{event.id}\n")

            await asyncio.gather(*(one(event) for event in batch))
            sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
