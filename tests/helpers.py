"""Small helpers the suites share: free ports, waiting for a port, child processes, and a
TCP proxy that a test can cut and restore (an outage on demand)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import uvloop
from aiohttp import web

from schemas.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, *, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


@contextlib.contextmanager
def mosquitto(directory: Path, *, extra_config: str = "", port: int | None = None) -> Iterator[int]:
    """A private Mosquitto on a free loopback port (or ``port``), stopped on exit."""
    port = port or free_port()
    config = directory / f"mosquitto-{port}.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"log_dest stderr\n{extra_config}"
    )
    process = subprocess.Popen(
        ["mosquitto", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port(port)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Proxy:
    """Relays 127.0.0.1:<port> to ``target``; `cut` and `restore` simulate an outage.

    Cutting closes every relayed connection and refuses new ones until `restore`, which is
    what a PostgreSQL restart or a network partition looks like to a client.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Close the listener and every relayed connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def restore(self) -> None:
        """Listen again on the same port."""
        await self.start()

    async def close(self) -> None:
        await self.cut()
        for task in list(self._tasks):
            task.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.transport.abort()
            self._writers.discard(writer)


@contextlib.contextmanager
def provisioning_server(
    settings: Settings,
    *,
    configure: Callable[[web.Application], None] | None = None,
    sock: socket.socket | None = None,
) -> Iterator[int]:
    """The production provisioning app (`build_app`) with its real TLS context, on its own
    uvloop thread so tests may block (curl, openssl, CliRunner) without stalling it.

    Args:
        settings: the service's settings.
        configure: called with the app before it starts (tests tighten a limiter there).
        sock: a bound loopback socket to serve on (when the port had to be known before,
            say for the PKI); default a free port.

    Yields:
        The loopback port it listens on.
    """
    from provisioning.http.server import build_app, open_service, server_ssl_context

    port = free_port() if sock is None else int(sock.getsockname()[1])
    loop = uvloop.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()

    async def main() -> None:
        service = await open_service(settings)
        app = build_app(service)
        if configure is not None:
            configure(app)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5)
        await runner.setup()
        ssl_context = server_ssl_context(settings.pki_dir)
        site: web.BaseSite = (
            web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context)
            if sock is None
            else web.SockSite(runner, sock, ssl_context=ssl_context)
        )
        await site.start()
        started.set()
        await stop.wait()
        await runner.cleanup()
        await service.close()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(15), "provisioning app did not start"
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(15)
