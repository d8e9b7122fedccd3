"""The commands in docs/quickstart.md are the commands this test runs, in the same order.

The "By hand" section's shell blocks are concatenated into one script and run with bash
(``-euo pipefail``) in a temporary directory; only the port numbers and the database name
are replaced, so that the run collides with nothing else on the machine.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import asyncpg
from typer.testing import CliRunner

from provisioning.commands.cli import app
from tests.conftest import ADMIN_URL
from tests.demo.shell import run_bash
from tests.helpers import free_port

DOCS = Path(__file__).resolve().parents[2] / "docs"
QUICKSTART = DOCS / "quickstart.md"
BLOCK = re.compile(r"```sh\n(.*?)```", re.DOTALL)


def _section(text: str, heading: str) -> str:
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def _blocks(heading: str) -> list[str]:
    return BLOCK.findall(_section(QUICKSTART.read_text(), heading))


def test_one_command_is_the_demo_the_demo_test_runs() -> None:
    assert [block.strip() for block in _blocks("One command")] == ["devicegate demo"]


def test_every_command_of_the_manual_quickstart_exists() -> None:
    script = "\n".join(_blocks("By hand"))
    commands = re.findall(r"(?:^|\$\(|&& )devicegate ((?:[a-z-]+ ?){1,2})", script, re.M)
    assert len(commands) >= 10
    runner = CliRunner()
    for words in commands:
        args = [word for word in words.split() if not word.startswith("-")]
        result = runner.invoke(app, [*args, "--help"])
        assert result.exit_code == 0, (words, result.output)


async def _drop(name: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def test_manual_quickstart_runs_as_written(tmp_path: Path) -> None:
    database = f"dg_docs_{secrets.token_hex(4)}"
    script = "\n".join(_blocks("By hand"))
    for port in ("1883", "8443", "8883", "9464", "9465"):
        script = script.replace(port, str(free_port()))
    script = script.replace("devicegate_try", database)
    (tmp_path / "quickstart.sh").write_text(script)
    env = {key: value for key, value in os.environ.items() if not key.startswith("DEVICEGATE_")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}:/usr/sbin"
    try:
        status, output = run_bash("quickstart.sh", tmp_path, env, timeout=120)
    finally:
        asyncio.run(_drop(database))
    assert status == 0, output
    assert (tmp_path / "devicegate-try" / "device1" / "device.crt").exists()
    assert "refused, as it should be" in output
    assert re.search(r"verified \d+ events in \d+ chains: OK", output), output
    assert "client_id_mismatch" in output or "connect" in output
    assert "metrics not served" not in output, output  # each service its own metrics port


AUDIT_GUIDE = DOCS / "audit-guide.md"


async def test_audit_guide_sql_runs(db: asyncpg.Connection) -> None:
    queries = re.findall(r"```sql\n(.*?)```", AUDIT_GUIDE.read_text(), re.DOTALL)
    assert len(queries) >= 8
    for query in queries:
        await db.fetch(query)  # valid against the migrated schema


def test_audit_guide_commands_run(database_url: str, tmp_path: Path) -> None:
    (block,) = [b for b in BLOCK.findall(AUDIT_GUIDE.read_text()) if "devicegate audit" in b]
    commands = [
        line for line in block.splitlines()
        if line.startswith("devicegate ") and "--follow" not in line
    ]  # fmt: skip
    assert len(commands) >= 9
    env = {**os.environ, "DEVICEGATE_DATABASE_URL": database_url}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    for command in commands:
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", command],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, (command, result.stderr)
