"""The policy admin API, enrollment with default attributes, and explain over the CLI, the
API and the console agreeing with the gateway's own pure evaluator."""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import aiohttp
import asyncpg
import pytest
from typer.testing import CliRunner

from gateway.policy import Action, PolicySet, Subject
from provisioning import policies
from provisioning.commands.cli import app
from schemas.policy import PolicyFile
from schemas.policy_store import POLICY_CHANNEL
from tests.provisioning.conftest import INSTANCE, Server, last_event, make_token, new_fleet
from tests.provisioning.test_admin_api import call
from tests.provisioning.test_policy_store import (
    add_device,
    head_seq,
    policy_events,
    statement,
    unique,
)

pytestmark = pytest.mark.usefixtures("forget_policies")

PATHS = [
    ("GET", "/v1/policies"),
    ("GET", "/v1/policies/p"),
    ("PUT", "/v1/policies/p"),
    ("DELETE", "/v1/policies/p"),
    ("PUT", "/v1/policies/p/attachments/fleet/f"),
    ("DELETE", "/v1/policies/p/attachments/fleet/f"),
    ("GET", "/v1/policy/history"),
    ("GET", "/v1/policy/version"),
    ("GET", "/v1/policy/attachments"),
    ("POST", "/v1/policy/explain"),
    ("GET", "/v1/devices/d/attributes"),
    ("PUT", "/v1/devices/d/attributes"),
    ("GET", "/v1/groups"),
    ("PUT", "/v1/groups/g"),
    ("DELETE", "/v1/groups/g"),
    ("POST", "/v1/groups/g/members"),
]


async def test_policy_endpoints_are_closed_without_an_admin_key(
    http: aiohttp.ClientSession, server: Server, db: asyncpg.Connection
) -> None:
    version = await policies.current_version(db)
    for method, path in PATHS:
        for headers in (None, {"Authorization": "Bearer dgk_" + "x" * 43}):
            status, problem = await call(
                http, server, method, path, headers=headers, json={"document": {}}
            )
            assert status == 401, (method, path)
            assert problem["reason"] == "unauthorized"
    assert await policies.current_version(db) == version


async def test_openapi_names_every_policy_path(http: aiohttp.ClientSession, server: Server) -> None:
    _, document = await call(http, server, "GET", "/openapi.json")
    for method, path in PATHS:
        template = (
            path.replace("/p/attachments/fleet/f", "/{name}/attachments/{kind}/{target}")
            .replace("/policies/p", "/policies/{name}")
            .replace("/devices/d/", "/devices/{device_id}/")
            .replace("/groups/g", "/groups/{name}")
        )
        operation = document["paths"][template][method.lower()]
        assert operation["security"] == [{"adminKey": []}], (method, path)


async def test_policies_attributes_groups_and_explain_through_the_api(
    http: aiohttp.ClientSession, server: Server, admin_headers: dict[str, str],
    db: asyncpg.Connection,
) -> None:  # fmt: skip
    fleet = new_fleet("api")
    device_id = await add_device(db, fleet)
    name, group = unique("pol"), unique("grp")
    document = {"statements": [statement("plant", "plant/{fleet}/{device_id}/#")]}
    seq = await head_seq(db)
    status, applied = await call(
        http, server, "PUT", f"/v1/policies/{name}", admin_headers,
        json={"document": document, "attach": [f"fleet:{fleet}"]},
    )  # fmt: skip
    assert status == 201 and applied["changed"] and applied["attached"] == [f"fleet:{fleet}"]
    status, same = await call(
        http, server, "PUT", f"/v1/policies/{name}", admin_headers, json={"document": document}
    )
    assert status == 200 and not same["changed"] and same["version"] >= applied["version"]
    status, info = await call(http, server, "GET", f"/v1/policies/{name}", admin_headers)
    assert status == 200 and info["attachments"] == [f"fleet:{fleet}"]
    assert info["document"] == policies.canonical_document(document)

    status, attributes = await call(
        http, server, "PUT", f"/v1/devices/{device_id}/attributes", admin_headers,
        json={"attributes": {"site": "s1", "line": "l2"}},
    )  # fmt: skip
    assert status == 200 and attributes["attributes"] == {"line": "l2", "site": "s1"}
    status, _ = await call(
        http, server, "PUT", f"/v1/devices/{device_id}/attributes", admin_headers,
        json={"attributes": {"site": "s1"}},
    )  # fmt: skip
    assert await policies.get_attributes(db, device_id) == {"site": "s1"}
    status, _ = await call(
        http, server, "PUT", f"/v1/groups/{group}", admin_headers, json={"description": "g"}
    )
    assert status == 201
    status, _ = await call(
        http, server, "POST", f"/v1/groups/{group}/members", admin_headers,
        json={"add": [device_id]},
    )  # fmt: skip
    assert status == 200
    status, shown = await call(http, server, "GET", f"/v1/groups/{group}", admin_headers)
    assert shown["devices"] == [device_id] and shown["members"] == 1

    events = await policy_events(db, seq)
    assert [e["detail"]["action"] for e in events] == [
        "policy_apply", "attributes_set", "attributes_set", "group_create", "group_add",
    ]  # fmt: skip
    assert all(e["detail"]["actor"] == "tests" for e in events)

    status, explained = await call(
        http, server, "POST", "/v1/policy/explain", admin_headers,
        json={"device_id": device_id, "action": "publish", "topic": f"plant/{fleet}/{device_id}/t"},
    )  # fmt: skip
    assert status == 200 and explained["decision"] == "allowed"
    assert explained["statement"] == f"{name}/plant"
    assert explained["policies"] == [name]
    assert explained["policy_version"] == await policies.current_version(db)
    status, problem = await call(
        http, server, "POST", "/v1/policy/explain", admin_headers,
        json={"device_id": "no-such-dev", "action": "publish", "topic": "a"},
    )  # fmt: skip
    assert status == 404 and problem["detail"] == "unknown device 'no-such-dev'"


async def test_api_refusals_are_problems_and_one_denied_event_each(
    http: aiohttp.ClientSession, server: Server, admin_headers: dict[str, str],
    db: asyncpg.Connection,
) -> None:  # fmt: skip
    device_id = await add_device(db)
    name = unique("pol")
    huge = {"statements": [statement("s", *(f"d/{'x' * 300}/{i}" for i in range(250)))]}
    many = {"statements": [statement(f"s{i}", f"d/{i}") for i in range(257)]}
    cases: list[tuple[str, str, Any, int, str]] = [
        ("PUT", f"/v1/policies/{name}", {"document": {"statments": []}}, 400, "unknown key"),
        ("PUT", f"/v1/policies/{name}", {"document": huge}, 413, "larger than"),
        ("PUT", f"/v1/policies/{name}", {"document": many}, 400, "at most 256 are accepted"),
        ("PUT", f"/v1/policies/{name}",
         {"document": {"statements": [statement("s", "d/#/x")]}}, 400, "resources[0]"),
        ("PUT", f"/v1/devices/{device_id}/attributes", {"attributes": {"k": "v" * 300}}, 400,
         "at most 256 are accepted"),
        ("PUT", f"/v1/devices/{device_id}/attributes",
         {"attributes": {f"k{i}": "v" for i in range(65)}}, 400, "at most 64"),
        ("PUT", f"/v1/policies/{name}/attachments/group/nope", None, 404, "unknown"),
    ]  # fmt: skip
    for method, path, body, want, words in cases:
        seq = await head_seq(db)
        status, problem = await call(http, server, method, path, admin_headers, json=body)
        assert status == want, (path, problem)
        assert words in problem["detail"], problem
        (event,) = await policy_events(db, seq)
        assert event["outcome"] == "denied" and event["detail"]["actor"] == "tests"
    assert await policies.get_attributes(db, device_id) == {}


async def test_enrollment_sets_token_and_fleet_default_attributes(
    http: aiohttp.ClientSession, server: Server, admin_headers: dict[str, str],
    db: asyncpg.Connection, database_url: str,
) -> None:  # fmt: skip
    from tests.provisioning.conftest import some_csr

    fleet = new_fleet("en")
    await policies.set_fleet_defaults(
        db, fleet, {"site": "plant-1", "line": "a"}, actor="tests", instance=INSTANCE
    )
    status, token = await call(
        http, server, "POST", "/v1/tokens", admin_headers,
        json={"fleet": fleet, "uses": 3, "attributes": {"line": "b", "model": "m-7"}},
    )  # fmt: skip
    assert status == 201 and token["attributes"] == {"line": "b", "model": "m-7"}
    listen = await asyncpg.connect(database_url)
    heard: asyncio.Queue[int] = asyncio.Queue()
    await listen.add_listener(POLICY_CHANNEL, lambda *a: heard.put_nowait(int(a[-1])))
    try:
        before = await policies.current_version(db)
        bundles = await asyncio.gather(
            *(call(http, server, "POST", "/v1/enroll",
                   json={"token": token["token"], "csr": some_csr()}) for _ in range(2))
        )  # fmt: skip
        status, hw = await call(
            http, server, "POST", "/v1/enroll",
            json={"token": token["token"], "csr": some_csr(), "hardware_id": unique("hw")},
        )  # fmt: skip
        assert [s for s, _ in bundles] == [201, 201] and status == 201
        for _, bundle in [*bundles, (status, hw)]:
            assert await policies.get_attributes(db, bundle["device_id"]) == {
                "site": "plant-1", "line": "b", "model": "m-7",
            }  # fmt: skip
        after = await policies.current_version(db)
        assert after > before
        version = await asyncio.wait_for(heard.get(), timeout=5)
        while version < after:
            version = await asyncio.wait_for(heard.get(), timeout=5)
        assert version == after
    finally:
        await listen.close()
    event = await last_event(db, type="token", fleet=fleet)
    assert json.loads(event["detail"])["attributes"] == {"line": "b", "model": "m-7"}
    status, problem = await call(
        http, server, "POST", "/v1/tokens", admin_headers,
        json={"fleet": fleet, "attributes": {"Bad Key": "x"}},
    )  # fmt: skip
    assert status == 400 and "attribute key" in problem["detail"]


TOPICS = [
    "devices/{d}/t", "devices/{d}/a/b", "devices/other/t", "plant/{f}/berlin/{d}/x",
    "plant/{f}/paris/{d}/x", "plant/{f}/x", "fleets/{f}/cmd", "$SYS/x", "devices/{d}/secret/k",
    "lines/l-7/{d}", "devices/{d}/#", "plant/+/{d}/x",
]  # fmt: skip
FILTERS = [
    "devices/{d}/#", "devices/{d}/+", "devices/+/x", "fleets/{f}/#", "#", "$share/g/devices/{d}/#",
    "plant/{f}/berlin/{d}/#", "fleets/{f}/+/x", "lines/l-7/#", "devices/{d}/secret/#",
]  # fmt: skip


def test_explain_over_cli_and_api_agrees_with_the_pure_evaluator(
    env: dict[str, str], database_url: str, server: Server, admin_key: str, client_context: Any
) -> None:
    """Statements with Deny, groups, attributes and conditions, attached to the fleet, a
    group and the device: the database path (CLI and API) decides as `PolicySet` over the
    same document, groups and attributes, on every request of a generated table."""
    fleet = new_fleet("ex")
    base, extra = unique("pol"), unique("pol")
    group = unique("line")
    documents = {
        base: {"statements": [
            statement("own", "devices/{device_id}/#", actions=("publish", "subscribe")),
            statement("fleet-in", "fleets/{fleet}/#", actions=("subscribe", "receive")),
            statement("secret", "devices/{device_id}/secret/#", effect="Deny",
                      actions=("publish", "subscribe")),
            statement("site", "plant/{fleet}/{attr.site}/{device_id}/#",
                      actions=("publish", "subscribe")),
        ]},
        extra: {"statements": [
            {**statement("line", "lines/{group}/#", actions=("publish", "subscribe")),
             "groups": [group]},
            {**statement("low-qos", "devices/{device_id}/t"),
             "conditions": {"max_qos": 0}, "effect": "Deny"},
        ]},
    }  # fmt: skip
    canonical = {name: policies.canonical_document(doc) for name, doc in documents.items()}

    async def setup() -> str:
        conn = await asyncpg.connect(database_url)
        try:
            device_id = await add_device(conn, fleet)
            await policies.create_group(conn, group, actor="t", instance=INSTANCE)
            await policies.change_members(
                conn, group, [device_id], add=True, actor="t", instance=INSTANCE
            )
            await policies.set_attributes(
                conn, device_id, {"site": "berlin"}, actor="t", instance=INSTANCE
            )
            await policies.apply_policies(
                conn, canonical, actor="t", instance=INSTANCE,
                attach=[(base, "fleet", fleet), (extra, "group", group)],
            )  # fmt: skip
            return device_id
        finally:
            await conn.close()

    device_id = asyncio.run(setup())
    reference = PolicySet.from_document(
        PolicyFile.model_validate(
            {"policies": canonical,
             "attach": [{"policy": base, "fleet": fleet}, {"policy": extra, "group": group}]}
        )
    )  # fmt: skip
    subject = Subject(
        device_id=device_id, fleet=fleet, groups=frozenset({group}),
        attributes={"site": "berlin"},
    )  # fmt: skip
    compiled = reference.for_subject(subject)

    async def api(action: str, topic: str, qos: int) -> dict[str, Any]:
        connector = aiohttp.TCPConnector(ssl=client_context, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            status, body = await call(
                session, server, "POST", "/v1/policy/explain",
                {"Authorization": f"Bearer {admin_key}"},
                json={"device_id": device_id, "action": action, "topic": topic, "qos": qos},
            )  # fmt: skip
        assert status == 200, body
        return body

    cases = [("publish", t, q) for t in TOPICS for q in (0, 1)] + [
        ("subscribe", f, 1) for f in FILTERS
    ] + [("receive", t, 0) for t in TOPICS[:8]]  # fmt: skip
    outcomes = set()
    for action, pattern, qos in cases:
        topic = pattern.replace("{d}", device_id).replace("{f}", fleet).replace("l-7", group)
        expected = compiled.decide(Action(action), topic, qos=qos)
        outcomes.add((expected.allowed, expected.statement))
        body = await_(api(action, topic, qos))
        assert (body["decision"] == "allowed") == expected.allowed, (action, topic, qos, body)
        assert body["statement"] == expected.statement, (action, topic, qos, body)
        result = CliRunner().invoke(
            app,
            ["policy", "explain", "--device", device_id, f"--{action}", topic, "--qos", str(qos),
             "--json"],
            env=env,
        )  # fmt: skip
        assert result.exit_code == (0 if expected.allowed else 1), result.output
        printed = json.loads(result.output)
        assert printed["decision"] == body["decision"]
        assert printed["statement"] == body["statement"]
        assert printed["policy_version"] == body["policy_version"]
        assert sorted(printed["policies"]) == sorted([base, extra])
    # allowed and denied, by each kind of statement and by default
    statements = {s for _, s in outcomes}
    assert {f"{base}/own", f"{base}/secret", f"{base}/site", f"{extra}/line",
            f"{extra}/low-qos", "default-deny"} <= statements, statements  # fmt: skip

    unknown = CliRunner().invoke(
        app, ["policy", "explain", "--device", "no-such-dev", "--publish", "a"], env=env
    )
    assert unknown.exit_code == 1 and "unknown device 'no-such-dev'" in unknown.output


def await_(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


@pytest.mark.parametrize("action", ["publish", "subscribe"])
async def test_console_device_page_shows_attributes_groups_and_explains(
    action: str, db: asyncpg.Connection, server: Server, admin_key: str, client_context: Any
) -> None:
    from tests.console.conftest import log_in  # the console's own login steps

    fleet = new_fleet("cs")
    device_id = await add_device(db, fleet)
    group = unique("grp")
    await policies.set_attributes(db, device_id, {"site": "s-9"}, actor="t", instance=INSTANCE)
    await policies.create_group(db, group, actor="t", instance=INSTANCE)
    await policies.change_members(db, group, [device_id], add=True, actor="t", instance=INSTANCE)
    name = unique("pol")
    await policies.apply_policies(
        db,
        {name: policies.canonical_document({"statements": [
            statement("own", "devices/{device_id}/#"),
            statement("fleet", "fleets/{fleet}/#", actions=("subscribe",)),
        ]})},
        actor="t", instance=INSTANCE, attach=[(name, "device", device_id)],
    )  # fmt: skip
    topic = f"devices/{device_id}/x" if action == "publish" else f"fleets/{fleet}/#"
    connector = aiohttp.TCPConnector(ssl=client_context)
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(
        base_url=server.url, connector=connector, cookie_jar=jar
    ) as session:
        await log_in(session, admin_key)
        async with session.get(
            f"/console/devices/{device_id}", params={"explain": action, "topic": topic}
        ) as response:
            assert response.status == 200
            html = await response.text()
        version = await policies.current_version(db)
        async with session.get(
            f"/console/devices/{device_id}", params={"explain": action, "topic": "$SYS/x"}
        ) as response:
            denied = await response.text()
    assert "s-9" in html and group in html
    explained = html[html.index('id="explained"') :]
    explained = explained[: explained.index("</dl>")]
    assert "ALLOWED" in explained and f"<dd>{version}</dd>" in explained
    assert (f"{name}/own" if action == "publish" else f"{name}/fleet") in explained
    refused = denied[denied.index('id="explained"') :]
    assert "DENIED" in refused[: refused.index("</dl>")]
    assert "default-deny" in refused[: refused.index("</dl>")]


async def test_secrets_in_names_are_not_needed_and_tokens_untouched(
    db: asyncpg.Connection,
) -> None:
    """make_token without attributes keeps working: the defaults column is optional."""
    secret, token_id = await make_token(db, fleet=new_fleet("nt"))
    assert secret.startswith("dgt_")
    value = await db.fetchval(
        "SELECT default_attributes FROM bootstrap_tokens WHERE id::text = $1", token_id
    )
    assert json.loads(value) == {} and secrets.compare_digest("a", "a")


async def test_console_sets_and_removes_an_attribute(
    db: asyncpg.Connection, server: Server, admin_key: str, client_context: Any
) -> None:
    """The device page's attribute form: set, remove, a bad key in one line, and a POST
    without the session's CSRF token changes nothing."""
    from tests.console.conftest import log_in

    device_id = await add_device(db, new_fleet("ca"))
    form = f"/console/devices/{device_id}/attributes"

    async def stored() -> dict[str, str]:
        rows = await db.fetch(
            "SELECT key, value FROM device_attributes WHERE device_id = $1", device_id
        )
        return {row["key"]: row["value"] for row in rows}

    connector = aiohttp.TCPConnector(ssl=client_context)
    async with aiohttp.ClientSession(
        base_url=server.url, connector=connector, cookie_jar=aiohttp.CookieJar(unsafe=True)
    ) as session:
        csrf = await log_in(session, admin_key)
        async with session.get(f"/console/devices/{device_id}") as response:
            assert 'aria-label="Set an attribute"' in await response.text()
        before = await policies.current_version(db)
        data = {"csrf": csrf, "key": "site", "value": "lyon"}
        async with session.post(form, data=data, allow_redirects=False) as response:
            assert response.status == 303
        assert await stored() == {"site": "lyon"}
        assert await policies.current_version(db) > before
        event = await db.fetchrow(
            "SELECT * FROM auth_events WHERE type = 'policy' AND device_id = $1"
            " AND detail->>'action' = 'attributes_set' ORDER BY seq DESC LIMIT 1",
            device_id,
        )
        assert event is not None and event["outcome"] == "allowed"
        assert json.loads(event["detail"])["actor"] == "tests"  # the admin key's name

        data = {"csrf": csrf, "key": "Bad Key", "value": "x"}
        async with session.post(form, data=data, allow_redirects=False) as response:
            assert response.status == 400
            assert "attribute key" in await response.text()
        data = {"csrf": "forged", "key": "site", "value": "paris"}
        async with session.post(form, data=data, allow_redirects=False) as response:
            assert response.status == 403
        assert await stored() == {"site": "lyon"}

        data = {"csrf": csrf, "key": "site", "value": ""}
        async with session.post(form, data=data, allow_redirects=False) as response:
            assert response.status == 303
        assert await stored() == {}
