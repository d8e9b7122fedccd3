"""The operator's guard rails of the ``devicegate`` command: global options after the
subcommand, no silent overwrite of a device identity, a confirmation before a final
revocation, and lists that say when they were cut or found nothing (on stderr)."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from provisioning.commands import COMMANDS
from provisioning.commands.cli import app
from provisioning.commands.root import hoist_global_options
from tests.conftest import Pki
from tests.provisioning.conftest import Server, new_fleet

DEVICEGATE = str(Path(sys.executable).with_name("devicegate"))


@pytest.fixture
def env(env: dict[str, str]) -> dict[str, str]:
    """The suite's command environment in a narrow window: ids must still come out whole."""
    return {**env, "COLUMNS": "80"}


def run(env: dict[str, str], *args: str, code: int = 0) -> tuple[str, str]:
    """(stdout, stderr) of the real command run in a subprocess, stdin not a terminal."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("DEVICEGATE_")}
    result = subprocess.run(
        [DEVICEGATE, *args], env={**inherited, **env}, capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == code, (args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout, result.stderr


@pytest.fixture
def fleet(env: dict[str, str], server: Server, pki: Pki, tmp_path: Path) -> tuple[str, list[str]]:
    """A fleet of two enrolled devices: (fleet, [device ids])."""
    name = new_fleet("op")
    runner = CliRunner()
    created = runner.invoke(
        app, ["token", "create", "--fleet", name, "--uses", "2", "--json"], env=env
    )
    token = json.loads(created.stdout)["token"]
    ids = []
    for n in range(2):
        enrolled = runner.invoke(
            app,
            ["enroll", "--url", server.url, "--token", token, "--out", str(tmp_path / f"d{n}"),
             "--ca-cert", str(pki.chain), "--json"],
            env=env,
        )  # fmt: skip
        assert enrolled.exit_code == 0, enrolled.output
        ids.append(json.loads(enrolled.stdout)["device_id"])
    return name, ids


def test_hoist_global_options() -> None:
    options = {"--database-url": True, "--debug": False}
    assert hoist_global_options(["token", "list", "--database-url", "U", "--json"], options) == [
        "--database-url", "U", "token", "list", "--json"]  # fmt: skip
    assert hoist_global_options(["--debug", "audit", "--database-url=U"], options) == [
        "--debug", "--database-url=U", "audit"]  # fmt: skip
    # After "--" nothing is an option.
    assert hoist_global_options(["a", "--", "--debug"], options) == ["a", "--", "--debug"]


def test_the_help_table_matches_the_commands() -> None:
    """``devicegate --help`` prints `COMMANDS` without importing a module: it must say what
    each command's own help says."""
    group = app.registered_groups  # none: all commands load lazily
    assert group == []
    from typer.main import get_command

    root = get_command(app)
    for name, (_, short) in COMMANDS.items():
        assert root.commands[name].get_short_help_str(limit=500) == short, name  # type: ignore[attr-defined]


def test_global_options_after_the_subcommand(
    env: dict[str, str], fleet: tuple[str, list[str]]
) -> None:
    name, ids = fleet
    url = env["DEVICEGATE_DATABASE_URL"]
    elsewhere = {**env, "DEVICEGATE_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nothing"}
    out, _ = run(elsewhere, "device", "list", "--fleet", name, "--database-url", url, "--json")
    assert sorted(json.loads(line)["device_id"] for line in out.splitlines()) == sorted(ids)


def test_lists_say_when_cut_or_empty(env: dict[str, str], fleet: tuple[str, list[str]]) -> None:
    name, ids = fleet
    out, err = run(env, "device", "list", "--fleet", name, "--limit", "1")
    assert err.strip() == (
        "showing the newest 1 devices; more match: raise --limit or narrow with --fleet or --status"
    )
    rows = out.splitlines()
    assert rows[0].split()[:3] == ["device_id", "fleet", "status"] and len(rows) == 2
    assert rows[1].split()[0] in ids  # whole, though the window is 80 columns
    out, err = run(env, "device", "list", "--fleet", name)
    assert err == "" and {row.split()[0] for row in out.splitlines()[1:]} == set(ids)
    out, err = run(env, "device", "list", "--fleet", "no-such-fleet", "--json")
    assert (out, err.strip()) == ("", "no devices match")

    # Two enrollments in this fleet alone: --limit 1 cuts.
    out, err = run(env, "audit", "--type", "enroll", "--limit", "1", "--format", "json")
    assert len(out.splitlines()) == 1 and json.loads(out)["type"] == "enroll"
    assert err.startswith("showing the newest 1 events; more match: raise --limit")
    out, err = run(env, "audit", "--device", "nobody-at-all")
    assert (out, err.strip()) == ("", "no events match")


def test_enroll_does_not_overwrite_an_identity(env: dict[str, str], tmp_path: Path) -> None:
    directory = tmp_path / "device"
    directory.mkdir()
    (directory / "device.key").write_text("the key of an enrolled device\n")
    args = ["enroll", "--url", "https://127.0.0.1:9", "--token", "dgt_x", "--out", str(directory)]
    _, err = run(env, *args, code=1)
    assert err.strip() == (
        f"error: {directory} already holds a device identity (device.key): use "
        f"`devicegate renew --dir {directory}` to renew it, or pass --force to replace it"
    )
    assert (directory / "device.key").read_text() == "the key of an enrolled device\n"
    _, err = run(env, *args, "--force", code=1)  # goes on, and fails at the (closed) port
    assert "already holds" not in err and len(err.strip().splitlines()) == 1


def _status(env: dict[str, str], device_id: str) -> str:
    out, _ = run(env, "device", "show", device_id, "--json")
    return str(json.loads(out)["status"])


def test_revoke_asks_first(env: dict[str, str], fleet: tuple[str, list[str]]) -> None:
    _, (first, second) = fleet
    _, err = run(env, "device", "revoke", first, code=2)
    assert err.strip() == "error: not confirmed: no terminal to ask on; pass --yes to go ahead"
    assert _status(env, first) == "active"

    # On a terminal it asks; "n" changes nothing.
    leader, follower = pty.openpty()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("DEVICEGATE_")}
    try:
        os.write(leader, b"n\n")
        asked = subprocess.run(
            [DEVICEGATE, "device", "revoke", first], env={**inherited, **env}, stdin=follower,
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(leader)
        os.close(follower)
    assert asked.returncode == 1, asked.stderr
    assert f"revoke device {first} and all its certificates?" in asked.stderr
    assert "aborted: nothing changed" in asked.stderr
    assert _status(env, first) == "active"

    out, _ = run(env, "device", "revoke", second, "--yes", "--json")
    assert json.loads(out)["status"] == "revoked"
