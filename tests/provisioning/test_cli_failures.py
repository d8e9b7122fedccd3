"""Every start-up and command failure an operator meets on the first day is one line on
stderr that names what is wrong and what to do, never a traceback (unless ``--debug``).

Each case runs the real ``devicegate`` entry point in a subprocess against the real thing:
a fresh PostgreSQL database that was never migrated, a database that does not exist, a
port nobody listens on, a port held by a socket, a passphrase file that is not there.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.settings import Settings
from tests.conftest import ADMIN_URL, Pki
from tests.helpers import free_port, provisioning_server

DEVICEGATE = str(Path(sys.executable).with_name("devicegate"))


def devicegate(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("DEVICEGATE_")}
    return subprocess.run(
        [DEVICEGATE, *args],
        env={**inherited, "COLUMNS": "80", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_line(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The single ``error:`` line of a failed command (and nothing else on stderr)."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _url(name: str, password: str = "") -> str:
    base = ADMIN_URL.rpartition("/")[0]
    if password:
        base = base.replace("postgres@", f"postgres:{password}@", 1)
    return f"{base}/{name}"


def test_missing_passphrase_file(tmp_path: Path) -> None:
    missing = tmp_path / "ca-passphrase"
    env = {
        "DEVICEGATE_PKI_DIR": str(tmp_path / "pki"),
        "DEVICEGATE_CA_PASSPHRASE_FILE": str(missing),
    }
    result = devicegate("ca", "init", env=env)
    line = one_line(result, code=2)
    assert f"DEVICEGATE_CA_PASSPHRASE_FILE: cannot read {missing}" in line
    assert "first line" in line and "DEVICEGATE_CA_PASSPHRASE instead" in line


def test_unmigrated_database_says_migrate(empty_database: tuple[str, str]) -> None:
    _, url = empty_database
    env = {"DEVICEGATE_DATABASE_URL": url}
    line = one_line(devicegate("token", "create", "--fleet", "line-a", env=env))
    assert f"the database {url} is not migrated" in line
    assert 'relation "fleets" does not exist' in line
    assert line.endswith("run `devicegate db migrate`")
    # --debug (before or after the subcommand) shows where it came from.
    debug = devicegate("token", "create", "--fleet", "line-a", "--debug", env=env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert "UndefinedTableError" in debug.stderr


def test_database_that_does_not_exist() -> None:
    name = "dg_never_created_h21c"
    line = one_line(
        devicegate("device", "list", env={"DEVICEGATE_DATABASE_URL": _url(name, "s3cret")})
    )
    assert "s3cret" not in line
    assert f"cannot connect to PostgreSQL at {_url(name, '***')}" in line
    assert f'database "{name}" does not exist' in line
    assert f"create it (createdb {name}), then run `devicegate db migrate`" in line


def test_database_that_refuses_connections() -> None:
    url = f"postgresql://postgres:pw@127.0.0.1:{free_port()}/devicegate"
    line = one_line(devicegate("token", "list", "--database-url", url, env={}))
    assert "cannot connect to PostgreSQL at postgresql://postgres:***@127.0.0.1:" in line
    assert "is PostgreSQL running there?" in line and ":pw@" not in line


@pytest.fixture
def held_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    "command",
    [
        ["serve", "provisioning"],
        ["serve", "gateway", "--workers", "1"],
        ["serve", "gateway", "--workers", "2"],
    ],
    ids=["provisioning", "gateway-1", "gateway-2"],
)
def test_port_in_use(
    command: list[str], held_port: int, pki: Pki, database_url: str, tmp_path: Path
) -> None:
    env = {
        "DEVICEGATE_PKI_DIR": str(pki.directory),
        "DEVICEGATE_CA_PASSPHRASE": pki.passphrase.decode(),
        "DEVICEGATE_DATABASE_URL": database_url,
        "DEVICEGATE_PUBLIC_URL": "https://127.0.0.1:8443",  # no warning line of its own
        "DEVICEGATE_SPOOL_DIR": str(tmp_path / "spool"),
        "DEVICEGATE_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
    }
    # Global options after the subcommand, as an operator types them.
    args = [*command, "--listen", f"127.0.0.1:{held_port}", "--metrics-listen", "off"]
    line = one_line(devicegate(*args, env=env))
    if "2" in command:  # the supervisor's probe bind: it names the take-over too
        assert line == (
            f"error: cannot listen on 127.0.0.1:{held_port}: another process listens there "
            "(a running gateway? replace it without a gap with `devicegate serve gateway "
            "--take-over`, or choose another --listen)"
        )
        return
    assert line == (
        f"error: cannot listen on 127.0.0.1:{held_port}: the address is already in use by "
        "another process (stop it, or choose another address with --listen)"
    )


def test_readyz_is_not_ready_on_an_unmigrated_database(
    empty_database: tuple[str, str], settings: Settings, pki: Pki
) -> None:
    _, url = empty_database
    context = ssl.create_default_context(cafile=str(pki.chain))
    unmigrated = settings.model_copy(update={"database_url": url})
    with (
        provisioning_server(unmigrated) as port,
        pytest.raises(urllib.request.HTTPError) as refused,
    ):
        urllib.request.urlopen(f"https://127.0.0.1:{port}/readyz", context=context, timeout=10)
    assert refused.value.code == 503
    body = json.loads(refused.value.read())
    assert body["checks"] == {"ca": True, "database": True, "schema": False}
