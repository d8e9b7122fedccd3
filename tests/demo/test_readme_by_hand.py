"""The README's "Getting started by hand" block, pasted into bash as a new operator would.

The block between ``<!-- by-hand:begin -->`` and ``<!-- by-hand:end -->`` runs with
``bash -euo pipefail`` in a temporary directory. Only what must differ in a test is
changed: the database name and the ports (variables the block reads with defaults), the
venv (the one running this test, instead of ``make`` + ``.venv`` in a checkout), and the
broker (a private Mosquitto on a free port instead of the system one on 1883).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import sys
from pathlib import Path

from tests.conftest import _drop_database
from tests.demo.shell import run_bash
from tests.helpers import free_port, mosquitto

README = Path(__file__).resolve().parents[2] / "README.md"
MARKED = re.compile(r"<!-- by-hand:begin -->\n```sh\n(.*?)```\n<!-- by-hand:end -->", re.DOTALL)
MAKE_VENV = "make .venv/.installed"
ACTIVATE = ". .venv/bin/activate"
# Background services the script started are stopped when it ends, however it ends.
TRAP = "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"


def by_hand_block() -> str:
    (block,) = MARKED.findall(README.read_text())
    return str(block)


def _script() -> str:
    block = by_hand_block()
    lines = block.splitlines()
    assert lines[0].startswith(MAKE_VENV) and lines[1].startswith(ACTIVATE), lines[:2]
    # This test already runs in an installed venv: use it rather than building another.
    activate = f". {Path(sys.prefix) / 'bin' / 'activate'}"
    return TRAP + "\n".join([activate, *lines[2:]]) + "\n"


def test_readme_by_hand_block_runs_on_a_fresh_database(tmp_path: Path) -> None:
    database = f"dg_readme_{secrets.token_hex(4)}"
    (tmp_path / "by-hand.sh").write_text(_script())
    env = {key: value for key, value in os.environ.items() if not key.startswith("DEVICEGATE_")}
    env["PATH"] = f"{env.get('PATH', '')}:/usr/sbin"
    with mosquitto(tmp_path) as broker_port:
        env |= {
            "DB_NAME": database,
            "BROKER_PORT": str(broker_port),
            **{
                name: str(free_port())
                for name in (
                    "PROV_PORT", "GATEWAY_PORT", "PROV_METRICS_PORT", "GATEWAY_METRICS_PORT"
                )
            },
        }  # fmt: skip
        try:
            status, output = run_bash("by-hand.sh", tmp_path, env, timeout=90)
        finally:
            asyncio.run(_drop_database(database))
    assert status == 0, output
    enrolled = json.loads((tmp_path / "devicegate-try" / "device1.json").read_text())
    device_id = str(enrolled["device_id"])
    connects = [
        line for line in output.splitlines()
        if re.search(rf"\bconnect\s+allowed\b.*\b{re.escape(device_id)}\b", line)
    ]  # fmt: skip
    assert connects, output
    assert re.search(r"verified \d+ events in \d+ chains: OK", output), output
    # Distinct metrics ports: neither service complained that its port was taken.
    assert "metrics not served" not in output, output
    # Every state directory the block names is its own (a first-day operator is not root):
    # the signed audit checkpoints land there, not under /var/lib/devicegate.
    assert list((tmp_path / "devicegate-try" / "checkpoints").glob("*.jsonl")), output
