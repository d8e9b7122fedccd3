"""``GET /console/events/live``: new events as server-sent events, fed by LISTEN.

`provisioning.audit.follow.follow` does the work (LISTEN before the first read, events
announced on `EVENTS_CHANNEL` read once, deduplicated by id) on a connection of the
stream's own, closed with the stream. Each message is ``event: auth`` with the event as
``data`` in the field names of ``--format json``, plus ``certificate``: the text of the
table's certificate column (`tables.certificate_cell`, so the page has one formatter for
it); a comment every `KEEPALIVE` seconds
finds closed browsers. Streams per process are bounded (`state.MAX_LIVE_STREAMS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime

from aiohttp import web

from provisioning.audit.follow import follow
from provisioning.audit.format import record
from provisioning.console import filters
from provisioning.console.state import LIVE
from provisioning.console.tables import certificate_cell
from provisioning.db import connect
from provisioning.http.common import SERVICE
from schemas.events import AuthEvent

KEEPALIVE = 15.0
INITIAL = 20
"""Events sent first (the page already shows them; the browser skips ids it has), which
also covers any event stored between the page load and the stream's LISTEN."""
QUEUE_MAX = 2000


def message(event: AuthEvent) -> bytes:
    shown = {**record(event), "certificate": certificate_cell(event)}
    data = json.dumps(shown, ensure_ascii=False, separators=(",", ":"))
    return f"event: auth\ndata: {data}\n\n".encode()


async def stream(request: web.Request) -> web.StreamResponse:
    selected = filters.parse(request.query, now=datetime.now(UTC))
    streams = request.app[LIVE]
    stop = streams.open()
    if stop is None:
        raise web.HTTPServiceUnavailable(text="too many live streams; try again later")
    queue: asyncio.Queue[AuthEvent | None] = asyncio.Queue(maxsize=QUEUE_MAX)

    def show(event: AuthEvent) -> None:
        with contextlib.suppress(asyncio.QueueFull):  # a browser far behind misses events
            queue.put_nowait(event)

    def end(_: object = None) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(None)

    conn = None
    tasks: list[asyncio.Task[object]] = []
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
    )
    try:
        conn = await connect(request.app[SERVICE].settings.database_url)
        await response.prepare(request)
        await response.write(b"retry: 3000\n\n")
        tasks = [
            asyncio.create_task(
                follow(conn, filters=selected, initial_limit=INITIAL, show=show),
                name="console-live-follow",
            ),
            asyncio.create_task(stop.wait(), name="console-live-stop"),
        ]
        for task in tasks:
            task.add_done_callback(end)
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), KEEPALIVE)
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            if item is None:
                break
            await response.write(message(item))
        return response
    except ConnectionError:  # the browser went away
        return response
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if conn is not None:
            await conn.close()
        streams.closed(stop)
