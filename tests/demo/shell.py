"""Run a documented shell script the way an operator pastes it, and stop what it left."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


def run_bash(script: str, cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, str]:
    """(exit status, stdout+stderr) of ``bash -euo pipefail script`` in ``cwd``.

    The script runs in a process group of its own, killed afterwards, also on a timeout:
    the services it started in the background go with it.
    """
    process = subprocess.Popen(
        ["bash", "-euo", "pipefail", script],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        if process.poll() is None:
            process.wait()
    return process.returncode, output
