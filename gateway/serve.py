"""``devicegate serve gateway``: run the gateway in this process until SIGTERM.

One process for now (``--workers`` comes later). SIGTERM/SIGINT stop accepting and end
every session (``server_shutting_down``), flushing the event spool; SIGHUP reloads the
policy file. Also runnable as ``python -m gateway.serve`` (settings from the environment).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import asyncpg
import uvloop

from gateway.events import SpoolSink
from gateway.revocation import PostgresDirectory
from gateway.server import Gateway, config_from_settings
from schemas.settings import Settings, load_settings

__all__ = ["main", "serve"]

log = logging.getLogger("devicegate.gateway")


async def serve(settings: Settings, *, ready: Callable[[Gateway], None] | None = None) -> None:
    """Run the gateway until SIGTERM or SIGINT.

    Args:
        settings: The configuration.
        ready: Called once the listener is up (tests use it to learn the port).
    """
    loop = asyncio.get_running_loop()
    host, port = settings.listen_host_port
    config = config_from_settings(settings)
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
    try:
        async with SpoolSink(
            database_url=settings.database_url,
            spool_dir=settings.spool_dir / "w0",
            chain_id=f"{settings.instance_id}/w0",
            max_bytes=settings.spool_max_bytes,
        ) as sink:
            gateway = Gateway(
                config=config,
                sink=sink,
                directory=PostgresDirectory(pool),
                host=host,
                port=port,
                policy_file=settings.policy_file,
                max_connections=settings.max_connections,
            )
            stop = asyncio.Event()
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            loop.add_signal_handler(signal.SIGINT, stop.set)
            loop.add_signal_handler(signal.SIGHUP, gateway.reload_policy)
            async with gateway:
                if ready is not None:
                    ready(gateway)
                await stop.wait()
                log.info("shutting down")
    finally:
        await pool.close()


def main(settings: Settings) -> None:
    """Run the gateway on uvloop (the ``serve gateway`` command's entry point)."""
    uvloop.run(serve(settings))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    main(load_settings())
