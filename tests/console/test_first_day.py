"""Issue 21, an operator's first day, against the real console and database: an unknown
device is a 404 with a way back, a bad filter keeps the form with the error beside the
field, admin actions show their actor, a row edited in the database raises a red banner on
every page, denials have a chart on their own scale, and the overview says how fresh it is."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg

from provisioning import admin
from provisioning.audit.counting import DECISIONS
from provisioning.console import chart
from provisioning.console.queries import ActivityRow
from tests.console.conftest import INSTANCE, ConsoleServer, edited_event

Client = tuple[aiohttp.ClientSession, str]


async def _get(client: aiohttp.ClientSession, path: str) -> tuple[int, str]:
    async with client.get(path) as response:
        return response.status, await response.text()


async def test_an_unknown_device_is_a_404_with_a_way_back(admin_client: Client) -> None:
    client, _ = admin_client
    status, page = await _get(client, "/console/devices/never-enrolled")
    assert status == 404
    assert "No such device" in page and "never-enrolled" in page
    assert 'href="/console/"' in page and 'href="/console/events"' in page
    assert 'class="menu"' in page  # the navigation is there too
    status, page = await _get(client, "/console/devices/dev-00003")
    assert status == 200 and "Certificates" in page


async def test_a_bad_filter_keeps_the_form_and_says_which_field(admin_client: Client) -> None:
    client, _ = admin_client
    status, page = await _get(client, "/console/events?device=dev-00001&since=2h&reason=nope")
    assert status == 400
    assert 'id="e-reason"' in page and "unknown reason &#x27;nope&#x27;" in page
    assert re.search(r'<select id="f-reason" name="reason" aria-invalid="true"', page)
    assert '<option value="nope" selected>nope</option>' in page  # the input is kept
    assert 'name="device" value="dev-00001"' in page and 'name="since" value="2h"' in page
    assert 'id="filter-error"' in page and "<tbody>" not in page
    status, page = await _get(client, "/console/events?since=yesterday-ish")
    assert status == 400 and 'id="e-since"' in page and 'value="yesterday-ish"' in page
    assert re.search(r'id="f-since"[^>]*aria-invalid="true"', page)
    status, page = await _get(client, "/console/events?limit=0")
    assert status == 400 and 'id="e-limit"' in page
    status, page = await _get(client, "/console/events?cursor=garbage&outcome=denied")
    assert status == 400 and "invalid cursor" in page and 'id="filter-error"' in page
    assert '<option value="denied" selected>' in page


async def test_the_actor_of_an_admin_action_has_its_own_column(
    admin_client: Client, console_server: ConsoleServer
) -> None:
    client, _ = admin_client
    conn = await asyncpg.connect(console_server.database_url)
    try:
        async with conn.transaction():
            await admin.disable_device(conn, "dev-00011", actor="night-shift", instance=INSTANCE)
        async with conn.transaction():
            await admin.enable_device(conn, "dev-00011", actor="night-shift", instance=INSTANCE)
    finally:
        await conn.close()
    _, page = await _get(client, "/console/events?device=dev-00011&type=device_disable")
    assert '<th scope="col">actor</th>' in page
    assert '<td class="actor" data-label="actor">night-shift</td>' in page
    _, page = await _get(client, "/console/devices/dev-00011")
    assert '<td class="actor" data-label="actor">night-shift</td>' in page
    _, page = await _get(client, "/console/events?device=dev-00012&type=connect&limit=50")
    assert '<td class="actor" data-label="actor"></td>' in page  # a gateway decision: none


BANNER = 'id="chain-banner"'
PATHS = ("/console/", "/console/events?limit=50", "/console/devices/dev-00003", "/console/chains")


async def _banner_on(client: aiohttp.ClientSession, shown: bool) -> str:
    """The events page, polled until the banner is (or is not) there: a check runs at most
    every `integrity.FRESH` seconds."""
    for _ in range(60):
        _, page = await _get(client, "/console/events?limit=50")
        if (BANNER in page) == shown:
            return page
        await asyncio.sleep(0.5)
    raise AssertionError(f"the banner was {'not ' if shown else ''}shown within 30 s")


async def _clean_verification(client: aiohttp.ClientSession, token: str) -> None:
    """A clean chain-page run, so an earlier run's findings leave the banner."""
    async with client.post("/console/chains/verify", data={"csrf": token, "window": "day"}):
        pass
    for _ in range(50):
        _, page = await _get(client, "/console/chains")
        if 'id="verify-summary"' in page:
            assert "OK: no gap" in page
            return
        await asyncio.sleep(0.2)
    raise AssertionError("verification did not finish")


async def test_an_edited_row_raises_a_banner_on_every_page(
    admin_client: Client, console_server: ConsoleServer
) -> None:
    client, token = admin_client
    await _clean_verification(client, token)
    await _banner_on(client, False)
    async with edited_event(console_server.database_url, "bulk-gw-1/w0"):
        page = await _banner_on(client, True)
        banner = re.search(rf"<div[^>]*{BANNER}[^>]*>(.*?)</div>", page, re.S)
        assert banner and "bulk-gw-1/w0" in banner.group(1)
        assert 'class="banner broken" role="alert"' in page
        for path in PATHS:
            _, other = await _get(client, path)
            assert BANNER in other, path
    await _banner_on(client, False)


def _legend(page: str, chart_id: str) -> dict[str, int]:
    figure = re.search(rf'id="chart-{chart_id}".*?</svg>\s*<ul class="legend">(.*?)</ul>', page,
                       re.S)  # fmt: skip
    assert figure, chart_id
    return {name: int(n) for name, n in re.findall(r"</span>([^<(]+) \((\d+)\)</li>", figure[1])}


async def test_denials_have_a_chart_of_their_own_counted_in_decisions(
    admin_client: Client, console_server: ConsoleServer
) -> None:
    client, _ = admin_client
    _, page = await _get(client, "/console/?range=day")
    found = re.search(r'data-start="([^"]+)" data-end="([^"]+)"', page)
    assert found
    start, end = (datetime.fromisoformat(t) for t in found.groups())
    conn = await asyncpg.connect(console_server.database_url)
    try:
        by_reason = dict(
            await conn.fetch(
                f"SELECT reason, sum({DECISIONS})::bigint FROM auth_events "
                "WHERE outcome = 'denied' AND type IN ('tls_handshake', 'connect') "
                "AND time >= $1 AND time < $2 GROUP BY reason",
                start, end,
            )
        )  # fmt: skip
    finally:
        await conn.close()
    denials = _legend(page, "denials")
    assert sum(denials.values()) == sum(by_reason.values()) > 0
    for reason, n in denials.items():
        if reason != chart.OTHER:
            assert by_reason[reason] == n, reason
    assert "allowed" not in denials and set(_legend(page, "allowed")) == {"allowed"}
    svg = re.search(r'<svg class="chart denials".*?</svg>', page, re.S)
    assert svg
    ticks = re.findall(
        r'<text class="tick" x="\d+" y="[\d.]+" text-anchor="end">([\d,k]+)<', svg[0]
    )
    assert len(ticks) >= 3 and ticks[0] == "0"


def test_four_denials_are_visible_beside_two_thousand_allowed() -> None:
    start = datetime(2026, 12, 1, tzinfo=UTC)
    stride = timedelta(hours=1)
    slots = chart.buckets(start, start + 24 * stride, stride)
    rows = [ActivityRow(start + 5 * stride, True, "allowed", "ok", 2000),
            ActivityRow(start + 5 * stride, True, "denied", "certificate_expired", 3),
            ActivityRow(start + 5 * stride, True, "denied", "unknown_issuer", 1)]  # fmt: skip
    data = chart.series(rows, slots)
    allowed = chart.svg(slots, stride, data[:1], label="allowed", name="allowed")
    denied = chart.svg(slots, stride, data[1:], label="denied", name="denials")
    assert re.findall(r">[\d,]+<", allowed) == [">0<", ">500<", ">1,000<", ">1,500<", ">2,000<"]
    assert re.findall(r">(\d)<", denied) == ["0", "1", "2", "3", "4"]
    plot = chart.HEIGHT - chart.BOTTOM - chart.TOP
    heights = [float(h) for h in re.findall(r'height="([\d.]+)"', denied)]
    assert heights == [plot * 3 / 4, plot * 1 / 4]  # 3 of 4 and 1 of 4 of the plot's height


async def test_the_overview_says_how_fresh_its_counts_are(
    admin_client: Client, console_server: ConsoleServer
) -> None:
    client, _ = admin_client
    conn = await asyncpg.connect(console_server.database_url)
    try:
        for _ in range(50):  # the service's filler runs at start
            filled = await conn.fetchval("SELECT filled_upto FROM auth_event_rollup")
            if filled is not None:
                break
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
    assert filled is not None
    _, page = await _get(client, "/console/?range=day")
    note = re.search(r'<p class="freshness stale" id="freshness" data-rolled-upto="([^"]+)">'
                     r"([^<]+)</p>", page)  # fmt: skip
    assert note, "no freshness note on the day view"
    assert datetime.fromisoformat(note[1]) == filled
    assert f"Counts up to {filled.astimezone(UTC):%H:%M} UTC come from the hourly rollup" in note[2]
    assert "within about 10 minutes" in note[2]
    _, page = await _get(client, "/console/?range=hour")
    assert re.search(r'id="freshness">Counted from the events at \d\d:\d\d:\d\d UTC', page)
