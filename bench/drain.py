"""Benchmark: how long a SIGTERM drain takes, SIGTERM -> the supervisor exited, with N
held sessions (`bench/reconnect.py` devices, each its own certificate), beside Mosquitto's.

``--tree DIR`` runs the gateway from another checkout of the source (``git archive REV |
tar -x -C DIR``; the built C extensions are copied in), for an A/B of two revisions in
one run. Each round: the devices connect, the gateway gets SIGTERM, the devices are
dropped (so no reconnect storm competes with the drain). With ``DEVICEGATE_LOG_LEVEL``
info the workers log where their stop's time went ("worker wN stopped in ...").

Usage: .venv/bin/python bench/drain.py [--devices 2000] [--rounds 3] [--tree DIR ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reconnect import Fleet
from storm import Server, _raise_fd_limit, gateway_server, mosquitto_server, setup

ROOT = Path(__file__).resolve().parent.parent


def tree_server(base: Server, tree: Path, name: str) -> Server:
    """``base`` (a `storm.gateway_server`) run as ``python -m gateway.serve`` from ``tree``."""
    for built in [*ROOT.glob("gateway/*.so"), *ROOT.glob("gateway/events/*.so")]:
        target = tree / built.relative_to(ROOT)
        if not target.exists():
            shutil.copy2(built, target)
    listen = base.command[base.command.index("--listen") + 1]
    upstream = base.command[base.command.index("--upstream") + 1]
    workers = base.command[base.command.index("--workers") + 1]
    env = {
        **base.env,
        "PYTHONPATH": str(tree),
        "DEVICEGATE_GATEWAY_LISTEN": listen,
        "DEVICEGATE_UPSTREAM_URL": upstream,
        "DEVICEGATE_LOG_LEVEL": "info",
        "DEVICEGATE_SPOOL_DIR": base.env["DEVICEGATE_SPOOL_DIR"] + f"-{name}",
        "DEVICEGATE_INSTANCE_ID": f"storm-{name}",  # its own chains
    }
    command = [sys.executable, "-m", "gateway.serve", "--workers", workers]
    log = base.log.with_name(f"{name}.log")
    server = Server(name, base.port, command, env, log, base.workers)
    server.cwd = tree  # type: ignore[attr-defined]
    return server


def rounds(server: Server, fleet: Fleet, count: int, timeout: float) -> list[float]:
    took = []
    for _ in range(count):
        server.start()
        fleet.connect(server.port, resume=False, base=1.0, cap=30.0)
        fleet.wait_held(fleet.size, timeout)
        time.sleep(1.0)  # the connect events shipped; the drain alone is measured
        took.append(server.stop())
        fleet.ask("drop")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tree", type=Path, action="append", default=[], help="A/B: a source tree")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    _raise_fd_limit()
    results: dict[str, list[float]] = {}
    with setup(args.devices, 8) as s:
        upstream = mosquitto_server(s.work, None, "upstream")
        upstream.start()
        fleet = Fleet(s.members, procs=2)
        try:
            base = gateway_server(s.work, s.pki, s.url, upstream.port, args.workers)
            base.env["DEVICEGATE_LOG_LEVEL"] = "info"
            servers = [("this tree", base)]
            for i, tree in enumerate(args.tree):
                servers.append((str(tree), tree_server(base, tree.resolve(), f"tree{i}")))
            mosquitto = mosquitto_server(s.work, s.pki, "mosquitto-mtls")
            servers.append(("Mosquitto", mosquitto))
            for _ in range(args.rounds):  # interleaved: the machine's load hits all alike
                for name, server in servers:
                    # ``python -m`` puts its cwd first on sys.path (before PYTHONPATH), and
                    # the supervisor's workers inherit it: run the other tree from inside it.
                    cwd = getattr(server, "cwd", None)
                    if cwd is not None:
                        os.chdir(cwd)
                    results.setdefault(name, []).extend(rounds(server, fleet, 1, args.timeout))
                    os.chdir(ROOT)
        finally:
            fleet.close()
            if upstream.process is not None and upstream.process.poll() is None:
                upstream.stop()
        print(f"\nSIGTERM -> exited, {args.devices:,} held sessions, {args.workers} workers")
        print("| server | median | rounds |\n|---|---|---|")
        for name, took in results.items():
            rounds_text = ", ".join(f"{t:.2f}" for t in took)
            print(f"| {name} | {statistics.median(took):.2f} s | {rounds_text} |")
        for log in sorted(s.work.glob("*.log")):
            for line in log.read_text(errors="replace").splitlines():
                if any(k in line for k in ("draining", "stopped in", "all workers stopped")):
                    print(f"{log.stem}: {line[-150:]}")


if __name__ == "__main__":
    main()
