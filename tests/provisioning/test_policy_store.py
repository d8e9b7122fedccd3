"""Policies in PostgreSQL (issue 23): versions, events with actor and diff, NOTIFY, the
snapshot loader, the input budget, and the CLI (apply/export round trip, history, attach,
device attrs, groups). Real PostgreSQL; the CLI through its real entry point."""

from __future__ import annotations

import asyncio
import json
import secrets
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from typer.testing import CliRunner

from provisioning import policies
from provisioning.commands.cli import app
from schemas.policy_store import POLICY_CHANNEL, load_policy_snapshot
from tests.provisioning.conftest import INSTANCE, new_fleet

pytestmark = pytest.mark.usefixtures("forget_policies")

ACTOR = "tests-admin"


def cli(env: dict[str, str], *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == code, (args, result.output, result.exception)
    return result.output


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


async def add_device(conn: asyncpg.Connection, fleet: str | None = None) -> str:
    device_id = unique("dev")
    fleet = fleet or new_fleet("pd")
    await conn.execute("INSERT INTO fleets (name) VALUES ($1) ON CONFLICT DO NOTHING", fleet)
    await conn.execute("INSERT INTO devices (device_id, fleet) VALUES ($1, $2)", device_id, fleet)
    return device_id


async def policy_events(conn: asyncpg.Connection, since_seq: int) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        """SELECT outcome, reason, device_id, detail FROM auth_events
           WHERE type = 'policy' AND chain_id = 'provisioning' AND seq > $1 ORDER BY seq""",
        since_seq,
    )
    return [{**dict(row), "detail": json.loads(row["detail"])} for row in rows]


async def head_seq(conn: asyncpg.Connection) -> int:
    value = await conn.fetchval("SELECT seq FROM event_chains WHERE chain_id = 'provisioning'")
    return int(value or 0)


def statement(
    sid: str, *resources: str, effect: str = "Allow", actions: tuple[str, ...] = ("publish",)
) -> dict[str, Any]:
    return {"id": sid, "effect": effect, "actions": list(actions), "resources": list(resources)}


DOC = {"statements": [statement("up", "devices/{device_id}/#", "plant/{fleet}/up")]}


@pytest.fixture
async def listener(database_url: str) -> AsyncIterator[asyncio.Queue[int]]:
    """A second connection LISTENing on POLICY_CHANNEL; yields the versions it hears."""
    conn = await asyncpg.connect(database_url)
    heard: asyncio.Queue[int] = asyncio.Queue()
    await conn.add_listener(POLICY_CHANNEL, lambda *args: heard.put_nowait(int(args[-1])))
    yield heard
    await conn.close()


async def next_version(heard: asyncio.Queue[int], at_least: int) -> int:
    """The first version heard that is at least ``at_least`` (other tests' changes share
    the channel: they may come first, never with a version at or above ours)."""
    while True:
        version = await asyncio.wait_for(heard.get(), timeout=5)
        if version >= at_least:
            return version


async def test_every_kind_of_change_is_one_event_one_version_and_one_notify(
    db: asyncpg.Connection, listener: asyncio.Queue[int]
) -> None:
    device_id = await add_device(db)
    name, group = unique("pol"), unique("grp")
    document = policies.canonical_document(DOC)
    seq = await head_seq(db)
    changes: list[tuple[str, int | None]] = []

    result = await policies.apply_policies(db, {name: document}, actor=ACTOR, instance=INSTANCE)
    assert result.changed == (name,)
    changes.append(("policy_apply", result.version))
    changes.append(
        ("policy_attach", await policies.attach(db, name, "device", device_id, actor=ACTOR,
                                                instance=INSTANCE))
    )  # fmt: skip
    _, version = await policies.set_attributes(
        db, device_id, {"site": "berlin", "room": "a 1"}, actor=ACTOR, instance=INSTANCE
    )
    changes.append(("attributes_set", version))
    changes.append(
        ("group_create", await policies.create_group(db, group, actor=ACTOR, instance=INSTANCE))
    )
    _, version = await policies.change_members(
        db, group, [device_id], add=True, actor=ACTOR, instance=INSTANCE
    )
    changes.append(("group_add", version))

    versions = [v for _, v in changes]
    assert all(v is not None for v in versions)
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    for version in versions:
        assert version is not None
        assert await next_version(listener, version) == version

    events = await policy_events(db, seq)
    assert [(e["detail"]["action"], e["detail"]["policy_version"]) for e in events] == changes
    for event in events:
        assert event["outcome"] == "allowed" and event["reason"] == "admin_action"
        assert event["detail"]["actor"] == ACTOR
        action = event["detail"]["action"]
        assert action in ("group_create", "policy_apply") or event["detail"]["diff"]
    (applied,) = events[0]["detail"]["policies"]
    assert applied["name"] == name and applied["created"]
    assert '+      "id": "up",' in applied["diff"]
    assert events[2]["detail"]["diff"]["set"] == {"room": "a 1", "site": "berlin"}
    assert events[2]["device_id"] == device_id

    snapshot = await load_policy_snapshot(db)
    assert snapshot.version >= versions[-1]
    assert snapshot.documents[name] == document
    assert (name, "device", device_id) in snapshot.attachments
    assert snapshot.groups_of(device_id) == frozenset({group})
    assert dict(snapshot.attributes_of(device_id)) == {"room": "a 1", "site": "berlin"}


async def test_a_changed_document_diffs_against_the_last_and_the_same_one_makes_nothing(
    db: asyncpg.Connection,
) -> None:
    name = unique("pol")
    first = policies.canonical_document(DOC)
    apply = policies.apply_policies
    v1 = (await apply(db, {name: first}, actor=ACTOR, instance=INSTANCE)).version
    seq = await head_seq(db)
    again = await apply(db, {name: first}, actor=ACTOR, instance=INSTANCE)
    assert not again.any_change and again.unchanged == (name,) and again.version >= v1
    assert await policy_events(db, seq) == []
    assert len(await policies.history(db, name)) == 1

    second = policies.canonical_document({"statements": [statement("up", "devices/{device_id}/#")]})
    v2 = (await apply(db, {name: second}, actor=ACTOR, instance=INSTANCE)).version
    assert v2 > v1
    (event,) = await policy_events(db, seq)
    (changed,) = event["detail"]["policies"]
    assert '-        "plant/{fleet}/up"' in changed["diff"] and not changed["created"]
    assert [r.version for r in await policies.history(db, name)] == [v2, v1]


async def test_unchanged_attributes_and_members_make_no_version(db: asyncpg.Connection) -> None:
    device_id = await add_device(db)
    group = unique("grp")
    await policies.set_attributes(db, device_id, {"model": "x-1"}, actor=ACTOR, instance=INSTANCE)
    await policies.create_group(db, group, actor=ACTOR, instance=INSTANCE)
    await policies.change_members(db, group, [device_id], add=True, actor=ACTOR, instance=INSTANCE)
    before = await policies.current_version(db)
    seq = await head_seq(db)
    assert (
        await policies.set_attributes(
            db, device_id, {"model": "x-1"}, actor=ACTOR, instance=INSTANCE
        )
    )[1] is None
    assert (
        await policies.change_members(
            db, group, [device_id], add=True, actor=ACTOR, instance=INSTANCE
        )
    )[1] is None
    assert await policies.current_version(db) == before
    assert await policy_events(db, seq) == []


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("huge_document", "at most 65536 are accepted"),
        ("too_many_statements", "at most 256 are accepted"),
        ("huge_value", "at most 256 are accepted"),
        ("too_many_attributes", "a device has at most 64"),
        ("bad_key", "attribute key 'Site'"),
        ("bad_model", "attribute model: the value must be"),
    ],
)
async def test_the_input_budget_refuses_with_one_clear_error_and_one_event(
    case: str, expected: str, db: asyncpg.Connection
) -> None:
    device_id = await add_device(db)
    name = unique("pol")
    before = await policies.current_version(db)
    seq = await head_seq(db)

    async def attempt() -> None:
        if case == "huge_document":
            templates = [f"devices/{{device_id}}/{'x' * 300}/{i}" for i in range(250)]
            document = policies.canonical_document({"statements": [statement("s", *templates)]})
            await policies.apply_policies(db, {name: document}, actor=ACTOR, instance=INSTANCE)
        elif case == "too_many_statements":
            many = [statement(f"s{i}", f"d/{{device_id}}/{i}") for i in range(300)]
            policies.canonical_document({"statements": many})
        else:
            values = {
                "huge_value": {"site": "s", "note": "x" * 257},
                "too_many_attributes": {f"k{i}": "v" for i in range(65)},
                "bad_key": {"Site": "x"},
                "bad_model": {"model": "a/b"},
            }[case]
            await policies.set_attributes(db, device_id, values, actor=ACTOR, instance=INSTANCE)

    with pytest.raises(policies.PolicyInvalid) as caught:
        try:
            await attempt()
        except policies.PolicyInvalid as exc:
            await policies.record_refusal(
                db, exc, actor=ACTOR, instance=INSTANCE, action=case, device_id=device_id
            )
            raise
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)
    assert await policies.current_version(db) == before
    (event,) = await policy_events(db, seq)
    assert event["outcome"] == "denied" and event["reason"] == "request_invalid"
    assert event["detail"]["actor"] == ACTOR and expected in event["detail"]["error"]
    assert await policies.get_attributes(db, device_id) == {}


async def test_unknown_targets_are_refused_by_name(db: asyncpg.Connection) -> None:
    name = unique("pol")
    await policies.apply_policies(
        db, {name: policies.canonical_document(DOC)}, actor=ACTOR, instance=INSTANCE
    )
    with pytest.raises(policies.NotFound, match="unknown group 'nope-grp'"):
        await policies.attach(db, name, "group", "nope-grp", actor=ACTOR, instance=INSTANCE)
    with pytest.raises(policies.NotFound, match="unknown device 'nope-dev'"):
        await policies.attach(db, name, "device", "nope-dev", actor=ACTOR, instance=INSTANCE)
    with pytest.raises(policies.NotFound, match="unknown policy 'nope-pol'"):
        await policies.attach(db, "nope-pol", "fleet", "f1", actor=ACTOR, instance=INSTANCE)
    with pytest.raises(policies.PolicyInvalid, match="expected fleet:NAME"):
        policies.parse_target("fleet")
    with pytest.raises(policies.NotFound, match="unknown device 'nope-dev'"):
        await policies.set_attributes(db, "nope-dev", {"a": "b"}, actor=ACTOR, instance=INSTANCE)


async def test_a_rolled_back_change_notifies_nothing_and_keeps_the_version(
    db: asyncpg.Connection, listener: asyncio.Queue[int]
) -> None:
    device_id = await add_device(db)
    before = await policies.current_version(db)
    tx = db.transaction()
    await tx.start()
    await db.execute(
        "INSERT INTO device_attributes (device_id, key, value) VALUES ($1, 'k', 'v')", device_id
    )
    await db.execute("SET CONSTRAINTS ALL IMMEDIATE")  # run the deferred bump now
    assert await policies.current_version(db) == before + 1
    await tx.rollback()
    assert await policies.current_version(db) == before
    await asyncio.sleep(0.2)
    while not listener.empty():
        assert listener.get_nowait() <= before


async def test_a_direct_sql_change_still_bumps_and_notifies_once(
    db: asyncpg.Connection, listener: asyncio.Queue[int]
) -> None:
    """The deferred triggers count a transaction once, whoever writes and however much."""
    devices = [await add_device(db) for _ in range(3)]
    before = await policies.current_version(db)
    async with db.transaction():
        for device_id in devices:
            await db.execute(
                "INSERT INTO device_attributes (device_id, key, value) VALUES ($1, 'k', 'v')",
                device_id,
            )
    assert await policies.current_version(db) == before + 1
    assert await next_version(listener, before + 1) == before + 1


# --- the CLI ---------------------------------------------------------------------------


def run(database_url: str, coroutine_factory: Any) -> Any:
    async def go() -> Any:
        conn = await asyncpg.connect(database_url)
        try:
            return await coroutine_factory(conn)
        finally:
            await conn.close()

    return asyncio.run(go())


def test_cli_apply_export_round_trip_history_and_events(
    env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    name, other = unique("pol"), unique("pol")
    fleet = new_fleet("rt")
    source = tmp_path / "policy.toml"
    source.write_text(
        f'[policies.{name}]\ndescription = "line A"\n\n'
        f"[[policies.{name}.statements]]\n"
        'id = "telemetry"\neffect = "Allow"\nactions = ["publish", "retain"]\n'
        'resources = ["plant/{fleet}/{attr.site}/{device_id}"]\n'
        "conditions = { max_qos = 1 }\n\n"
        f"[[policies.{name}.statements]]\n"
        'id = "no-sys"\neffect = "Deny"\nactions = ["subscribe"]\nresources = ["$SYS/#"]\n\n'
        f"[policies.{other}]\nstatements = []\n\n"
        f'[[attach]]\npolicy = "{name}"\nfleet = "{fleet}"\n'
    )
    seq = run(database_url, head_seq)
    out = cli(env, "policy", "apply", str(source))
    assert f"policy {name!r}: stored as version" in out and f"attached to fleet:{fleet}" in out
    assert f"policy {other!r}: stored as version" in out
    (event,) = run(database_url, lambda conn: policy_events(conn, seq))
    assert event["detail"]["actor"].startswith("cli:")
    assert sorted(p["name"] for p in event["detail"]["policies"]) == sorted([name, other])
    assert event["detail"]["attached"] == [f"{name} -> fleet:{fleet}"]

    exported = cli(env, "policy", "export", "--name", name)
    parsed = tomllib.loads(exported)
    assert parsed["policies"][name]["statements"][0]["conditions"]["max_qos"] == 1
    assert parsed["attach"] == [{"policy": name, "fleet": fleet}]
    again = tmp_path / "exported.toml"
    again.write_text(exported)
    out = cli(env, "policy", "apply", str(again))
    assert f"policy {name!r}: unchanged" in out and "nothing changed: no new version" in out

    as_json = tmp_path / "exported.json"
    as_json.write_text(cli(env, "policy", "export", "--format", "json"))
    assert "nothing changed: no new version" in cli(env, "policy", "apply", str(as_json))
    assert len(run(database_url, lambda conn: policy_events(conn, seq))) == 1

    source.write_text(source.read_text().replace("max_qos = 1", "max_qos = 2"))
    out = cli(env, "policy", "apply", str(source), "--name", name)
    assert f"policy {name!r}: stored as version" in out and other not in out
    history = [
        json.loads(line)
        for line in cli(env, "policy", "history", "--name", name, "--json").splitlines()
    ]
    assert len(history) == 2 and history[0]["version"] > history[1]["version"]
    assert history[0]["actor"].startswith("cli:")

    assert f"policy {other!r} deleted" in cli(env, "policy", "delete", other)
    (latest, *_) = [
        json.loads(line) for line in cli(env, "policy", "history", "--json").splitlines()
    ]
    assert latest["name"] == other and latest["change"] == "deleted"
    gone = CliRunner().invoke(app, ["policy", "export", "--name", other], env=env)
    assert gone.exit_code == 1 and f"unknown policy {other!r}" in gone.output


def test_cli_applies_a_per_fleet_file_of_earlier_releases_as_statements(
    env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    fleet = new_fleet("old")
    legacy = tmp_path / "legacy.toml"
    legacy.write_text(f'[fleets.{fleet}]\npublish = ["plant/{{fleet}}/{{device_id}}"]\n')
    name = unique("legacy")
    out = cli(env, "policy", "apply", str(legacy), "--name", f"fleets.{fleet}")
    assert f"attached to fleet:{fleet}" in out
    exported = json.loads(cli(env, "policy", "export", "--name", f"fleets.{fleet}",
                              "--format", "json"))  # fmt: skip
    (publish,) = [s for s in exported["policies"][f"fleets.{fleet}"]["statements"]
                  if s["id"] == "publish"]  # fmt: skip
    assert publish["resources"] == ["plant/{fleet}/{device_id}"]
    result = CliRunner().invoke(app, ["policy", "apply", str(legacy), "--name", name], env=env)
    assert result.exit_code == 1 and "defines no policy" in result.output


def test_cli_refuses_an_invalid_file_with_its_location_and_records_it(
    env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[policies.p]\n\n[[policies.p.statements]]\nid = "a"\neffect = "Allow"\n'
        'actions = ["publish"]\nresources = ["devices/{device_id}/#"]\nconditons = {}\n'
    )
    seq = run(database_url, head_seq)
    result = CliRunner().invoke(app, ["policy", "apply", str(bad), "--name", unique("p")], env=env)
    assert result.exit_code == 1
    assert f"{bad}:8: policies.p.statements[0]: unknown key 'conditons'" in result.output
    (event,) = run(database_url, lambda conn: policy_events(conn, seq))
    assert event["outcome"] == "denied" and event["detail"]["action"] == "policy_apply"
    assert "conditons" in event["detail"]["error"]


def test_cli_device_attrs_groups_and_one_line_mistakes(
    env: dict[str, str], database_url: str
) -> None:
    device_id = run(database_url, add_device)
    group = unique("grp")
    assert "site=plant-1" in cli(env, "device", "attrs", "set", device_id, "site=plant-1", "x=y")
    assert json.loads(cli(env, "device", "attrs", "show", device_id, "--json")) == {
        "site": "plant-1",
        "x": "y",
    }
    assert "x=" not in cli(env, "device", "attrs", "unset", device_id, "x")
    assert "created" in cli(env, "group", "create", group, "--description", "line A")
    assert "1 device(s) added" in cli(env, "group", "add", group, device_id)
    listed = [json.loads(line) for line in cli(env, "group", "list", "--json").splitlines()]
    assert {"name": group, "members": 1} in [
        {"name": g["name"], "members": g["members"]} for g in listed
    ]
    assert cli(env, "group", "show", group).split() == [device_id]

    for args, message in [
        (("device", "attrs", "show", "no-such-dev"), "error: unknown device 'no-such-dev'"),
        (("group", "add", "no-such-grp", device_id), "error: unknown group 'no-such-grp'"),
        (("group", "add", group, "no-such-dev"), "error: unknown device 'no-such-dev'"),
        (("device", "attrs", "set", device_id, "novalue"), "expected KEY=VALUE"),
        (("policy", "attach", "nope", "fleet:x"), "error: unknown policy 'nope'"),
    ]:
        result = CliRunner().invoke(app, list(args), env=env)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output and result.output.count("\n") == 1, result.output

    assert "removed" in cli(env, "group", "remove", group, device_id)
    assert "deleted" in cli(env, "group", "delete", group)


async def test_enrollment_attributes_overlay_the_defaults_and_bump_at_commit(
    db: asyncpg.Connection, listener: asyncio.Queue[int]
) -> None:
    """`apply_enrollment_attributes`, for an enrollment path that knows more (an IDevID
    manifest): inside the enrollment's transaction, over the fleet's defaults, one version
    at commit."""
    fleet = new_fleet("idv")
    await policies.set_fleet_defaults(
        db, fleet, {"site": "s1", "line": "l1"}, actor=ACTOR, instance=INSTANCE
    )
    device_id = unique("dev")
    before = await policies.current_version(db)
    async with db.transaction():
        await db.execute("INSERT INTO devices (device_id, fleet) VALUES ($1, $2)", device_id, fleet)
        await policies.apply_enrollment_attributes(db, device_id, {"model": "m-1", "line": "l9"})
        assert await policies.current_version(db) == before  # not yet: at commit
    assert await policies.get_attributes(db, device_id) == {
        "site": "s1", "line": "l9", "model": "m-1",
    }  # fmt: skip
    assert await policies.current_version(db) == before + 1
    assert await next_version(listener, before + 1) == before + 1
    with pytest.raises(policies.PolicyInvalid, match="attribute model"):
        await policies.apply_enrollment_attributes(db, device_id, {"model": "a b"})


async def test_policy_changes_and_enrollments_at_once_neither_deadlock_nor_lose_a_version(
    database_url: str, db: asyncpg.Connection
) -> None:
    """Writers of every kind in parallel, each on its own connection: all succeed (the lock
    order device rows -> chain head -> version row holds everywhere), and the version grew
    by exactly the number of committed changes."""
    fleet = new_fleet("cc")
    await policies.set_fleet_defaults(db, fleet, {"site": "x"}, actor=ACTOR, instance=INSTANCE)
    devices = [await add_device(db, fleet) for _ in range(6)]
    group = unique("grp")
    await policies.create_group(db, group, actor=ACTOR, instance=INSTANCE)
    before = await policies.current_version(db)

    async def writer(index: int) -> int:
        conn = await asyncpg.connect(database_url)
        try:
            device_id = devices[index % len(devices)]
            if index % 3 == 0:
                _, version = await policies.set_attributes(
                    conn, device_id, {"k": str(index)}, actor=ACTOR, instance=INSTANCE
                )
            elif index % 3 == 1:
                _, version = await policies.change_members(
                    conn, group, [device_id], add=index % 2 == 0, actor=ACTOR,
                    instance=INSTANCE,
                )  # fmt: skip
            else:
                async with conn.transaction():  # an enrollment-like insert with defaults
                    await conn.execute(
                        "INSERT INTO devices (device_id, fleet) VALUES ($1, $2)",
                        unique("dev"), fleet,
                    )  # fmt: skip
                    await conn.execute("SELECT pg_sleep(0.01)")
                version = 1
            return 0 if version is None else 1
        finally:
            await conn.close()

    committed = await asyncio.gather(*(writer(i) for i in range(24)))
    assert await policies.current_version(db) == before + sum(committed)
