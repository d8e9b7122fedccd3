"""The console's pages over HTTP: numbers against the database, pagination, export against
the CLI, live events, device actions, and the chain verification."""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import datetime

import aiohttp
import asyncpg
import pytest
from typer.testing import CliRunner

from provisioning import admin
from provisioning.commands.cli import app as cli_app
from tests.console.conftest import INSTANCE, ConsoleServer

Client = tuple[aiohttp.ClientSession, str]


def _number(page: str, name: str) -> int:
    found = re.search(rf'id="count-{name}">(\d+)<', page)
    assert found, name
    return int(found.group(1))


def _window(page: str) -> tuple[datetime, datetime]:
    found = re.search(r'data-start="([^"]+)" data-end="([^"]+)"', page)
    assert found
    return datetime.fromisoformat(found.group(1)), datetime.fromisoformat(found.group(2))


@pytest.mark.parametrize("window", ["hour", "day"])
async def test_overview_counts_match_the_database(
    admin_client: Client, console_server: ConsoleServer, window: str
) -> None:
    client, _ = admin_client
    async with client.get(f"/console/?range={window}") as response:
        page = await response.text()
    start, end = _window(page)
    conn = await asyncpg.connect(console_server.database_url)
    try:
        allowed, denied = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE outcome = 'allowed'), "
            "count(*) FILTER (WHERE outcome = 'denied') FROM auth_events "
            "WHERE type IN ('tls_handshake', 'connect') AND time >= $1 AND time < $2",
            start, end,
        )  # fmt: skip
        expiring = await conn.fetchval(
            "SELECT count(*) FROM certificates WHERE status = 'active' "
            "AND not_after >= now() AND not_after < now() + interval '7 days'"
        )
    finally:
        await conn.close()
    assert (_number(page, "allowed"), _number(page, "denied")) == (allowed, denied)
    assert allowed > 0 and denied > 0
    assert f"{expiring} in all" in page
    assert "bulk-gw-0" in page and "last seen" in page.lower()
    assert '<svg class="chart allowed"' in page and '<svg class="chart denials"' in page


async def test_event_pages_follow_the_cursor_without_overlap(admin_client: Client) -> None:
    client, _ = admin_client
    seen: list[str] = []
    path = "/console/events?outcome=denied&limit=50"
    for _ in range(3):
        async with client.get(path) as response:
            page = await response.text()
        ids = re.findall(r'<tr data-id="([0-9a-f-]+)"', page)
        assert len(ids) == 50 and "DENIED" in page and ">ALLOWED<" not in page
        seen += ids
        older = re.search(r'<a rel="next" href="([^"]+)"', page)
        assert older
        path = older.group(1).replace("&amp;", "&")
    assert len(set(seen)) == 150


async def test_json_export_equals_the_cli(
    admin_client: Client, console_server: ConsoleServer
) -> None:
    client, _ = admin_client
    async with client.get(
        "/console/events/export.json?outcome=denied&type=publish&limit=120"
    ) as response:
        assert response.headers["Content-Disposition"].startswith("attachment")
        exported = await response.text()
    result = await asyncio.to_thread(
        CliRunner().invoke, cli_app,
        ["--database-url", console_server.database_url, "audit", "--format", "json",
         "--outcome", "denied", "--type", "publish", "--limit", "120"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert exported == result.stdout
    assert len(exported.splitlines()) == 120
    assert json.loads(exported.splitlines()[0])["outcome"] == "denied"


async def test_live_stream_delivers_a_new_event_within_a_second(
    admin_client: Client, console_server: ConsoleServer
) -> None:
    client, _ = admin_client
    conn = await asyncpg.connect(console_server.database_url)
    try:
        async with client.get(
            "/console/events/live?device=dev-00006",
            timeout=aiohttp.ClientTimeout(total=10),
        ) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            await response.content.readuntil(b"retry: 3000\n\n")
            await asyncio.sleep(0.2)  # the stream's LISTEN is in place
            began = time.monotonic()
            async with conn.transaction():
                await admin.disable_device(conn, "dev-00006", actor="sse", instance=INSTANCE)
            while True:
                line = await asyncio.wait_for(response.content.readline(), 1.0)
                if line.startswith(b"data: ") and b'"device_disable"' in line:
                    break
            assert time.monotonic() - began < 1.0
            event = json.loads(line[len(b"data: ") :])
            assert event["device_id"] == "dev-00006" and event["detail"]["actor"] == "sse"
    finally:
        async with conn.transaction():
            await admin.enable_device(conn, "dev-00006", actor="sse", instance=INSTANCE)
        await conn.close()


async def test_disable_and_enable_through_the_confirmation_form(
    admin_client: Client, console_server: ConsoleServer
) -> None:
    client, token = admin_client
    async with client.get("/console/devices/dev-00008/disable") as response:
        page = await response.text()
    assert 'action="/console/devices/dev-00008/disable"' in page and token in page
    for action, status in (("disable", "disabled"), ("enable", "active")):
        async with client.post(
            f"/console/devices/dev-00008/{action}", data={"csrf": token}, allow_redirects=False
        ) as response:
            assert response.status == 303
            assert response.headers["Location"] == f"/console/devices/dev-00008?done={action}"
        async with client.get(response.headers["Location"]) as response:
            assert status.upper() in await response.text()
    conn = await asyncpg.connect(console_server.database_url)
    try:
        actors = await conn.fetch(
            "SELECT type, detail->>'actor' AS actor FROM auth_events WHERE device_id = "
            "'dev-00008' AND type IN ('device_disable', 'device_enable') ORDER BY time"
        )
    finally:
        await conn.close()
    assert [(r["type"], r["actor"]) for r in actors] == [
        ("device_disable", "security-team"),
        ("device_enable", "security-team"),
    ]


async def test_an_action_on_an_unknown_device_is_a_404(admin_client: Client) -> None:
    client, _ = admin_client
    async with client.get("/console/devices/never-enrolled/revoke") as response:
        assert response.status == 404


async def test_chain_verification_reports_each_chain_and_an_edit(
    admin_client: Client, console_server: ConsoleServer
) -> None:
    client, token = admin_client

    async def verify() -> str:
        async with client.post(
            "/console/chains/verify", data={"csrf": token, "window": "day"}
        ) as response:  # follows the 303 to the page, which waits for the run
            page = await response.text()
        for _ in range(50):
            if 'id="verify-summary"' in page:
                return page
            await asyncio.sleep(0.2)
            async with client.get("/console/chains") as response:
                page = await response.text()
        raise AssertionError("verification did not finish")

    page = await verify()
    assert "OK: no gap, edit" in page
    for chain in ("bulk-gw-0/w0", "bulk-gw-3/w1", "provisioning"):
        assert f'data-chain="{chain}"' in page
    conn = await asyncpg.connect(console_server.database_url)
    try:
        victim = await conn.fetchrow(
            "SELECT id, client_id FROM auth_events WHERE chain_id = 'bulk-gw-2/w1' "
            "AND time > now() - interval '1 hour' ORDER BY seq DESC LIMIT 1 OFFSET 3"
        )
        await conn.execute(
            "UPDATE auth_events SET client_id = 'tampered' WHERE id = $1", victim["id"]
        )
        try:
            page = await verify()
        finally:
            await conn.execute(
                "UPDATE auth_events SET client_id = $2 WHERE id = $1",
                victim["id"], victim["client_id"],
            )  # fmt: skip
    finally:
        await conn.close()
    assert "problem(s) found" in page
    row = re.search(r'<tr data-chain="bulk-gw-2/w1">(.*?)</tr>', page, re.S)
    assert row and "BROKEN" in row.group(1)
    assert "ALTERED" in page and str(victim["id"]) in page
    other = re.search(r'<tr data-chain="bulk-gw-0/w0">(.*?)</tr>', page, re.S)
    assert other and ">OK<" in other.group(1)
