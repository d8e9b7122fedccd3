"""Benchmark: how long ``devicegate`` takes to answer, start to exit.

Median and spread of N wall times (default 10) of the installed entry point for:

- ``devicegate --help``: the root group prints its command table without importing a
  command module (`provisioning.commands.root`);
- ``devicegate enroll --help``: the device-side module only (no asyncpg, CA or gateway code);
- ``python -c pass``: the interpreter's own floor on this machine, for comparison.

Each run is a fresh process, as an operator or a device's init script sees it. Use
``python -X importtime -m provisioning.commands.cli enroll --help`` to see where the rest
goes.

Usage: .venv/bin/python bench/cli_startup.py [--runs 10]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEVICEGATE = str(Path(sys.executable).with_name("devicegate"))

CASES = {
    "devicegate --help": [DEVICEGATE, "--help"],
    "devicegate enroll --help": [DEVICEGATE, "enroll", "--help"],
    "python -c pass": [sys.executable, "-c", "pass"],
}


def wall_times(command: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, check=True, timeout=60)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    print(f"{'command':28} {'median':>8} {'min':>8} {'max':>8}  ({args.runs} runs)")
    for name, command in CASES.items():
        times = wall_times(command, args.runs)
        print(f"{name:28} {statistics.median(times):7.3f}s {min(times):7.3f}s {max(times):7.3f}s")


if __name__ == "__main__":
    main()
