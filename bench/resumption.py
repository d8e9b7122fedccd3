"""Benchmark: CPU per reconnect, full handshake vs resumed TLS session, gateway and Mosquitto.

One run, same devices and load generator (`bench/reconnect.py`, each device its own
certificate): ``devicegate serve gateway --workers 2`` (PostgreSQL sink, upstream
Mosquitto) and Mosquitto's own mTLS listener (same PKI; it resumes sessions from its own
cache). Each round, every device closes its session and connects again (TLS with its
certificate, CONNECT, CONNACK 0) within ``--spread`` seconds, either offering no session
(full handshake) or its last one (resumed); rounds alternate full/resumed. The server's
CPU (``/proc/<pid>/stat`` of its processes: the gateway's supervisor and workers) and the
load generator's are divided by the reconnects of the round.

Target (issue 24): the gateway's resumed reconnects at least 3x cheaper in its CPU than
its full handshakes.

Usage: .venv/bin/python bench/resumption.py [--devices N] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mqtt_gateway import cpu_seconds
from reconnect import Fleet
from storm import (
    Server,
    _raise_fd_limit,
    gateway_server,
    mosquitto_server,
    setup,
)


@dataclass
class Round:
    reconnects: int
    resumed: int
    seconds: float
    server_cpu: float
    client_cpu: float
    failures: int


def one_round(fleet: Fleet, server: Server, *, resume: bool, spread: float) -> Round:
    fleet.ask("drop")
    time.sleep(0.5)  # the server ends the sessions it was told about
    fleet.send("reset")
    cpu = cpu_seconds(server.pids())
    begun = time.monotonic()
    fleet.connect(server.port, resume=resume, base=spread, cap=30.0)
    fleet.wait_held(fleet.size, 120)
    seconds = time.monotonic() - begun
    time.sleep(0.3)  # the last events written (group commit) belong to this round
    server_cpu = cpu_seconds(server.pids()) - cpu
    report = fleet.report()
    return Round(
        report.connects,
        report.resumed,
        seconds,
        server_cpu,
        report.cpu,
        sum(report.failures.values()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="of each kind, alternating")
    parser.add_argument("--spread", type=float, default=1.0, help="reconnects start within")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    _raise_fd_limit()
    results: dict[tuple[str, bool], list[Round]] = {}
    with setup(args.devices, 8) as s:
        upstream = mosquitto_server(s.work, None, "upstream")
        upstream.start()
        gateway = gateway_server(s.work, s.pki, s.url, upstream.port, args.workers)
        gateway.start()
        mosquitto = mosquitto_server(s.work, s.pki, "mosquitto-mtls")
        mosquitto.start()
        fleet = Fleet(s.members)
        try:
            for name, server in (("gateway", gateway), ("Mosquitto", mosquitto)):
                fleet.connect(server.port, resume=False, base=args.spread, cap=30.0)
                fleet.wait_held(fleet.size, 120)  # every device has a session to offer
                for _ in range(args.rounds):
                    for resume in (False, True):
                        r = one_round(fleet, server, resume=resume, spread=args.spread)
                        results.setdefault((name, resume), []).append(r)
                        print(
                            f"{name} {'resumed' if resume else 'full'}: {r.reconnects} "
                            f"({r.resumed} resumed, {r.failures} failed attempts) in "
                            f"{r.seconds:.2f}s, server CPU {r.server_cpu:.2f}s, "
                            f"load generator CPU {r.client_cpu:.2f}s",
                            flush=True,
                        )
                fleet.ask("drop")
        finally:
            fleet.close()
            for server in (gateway, mosquitto, upstream):
                server.stop()

    def med(rounds: list[Round], f: str) -> float:
        return statistics.median(getattr(r, f) / max(r.reconnects, 1) for r in rounds)

    print()
    print("| server, reconnect | reconnects/s | resumed | server CPU/reconnect "
          "| load generator CPU/reconnect |")  # fmt: skip
    print("|---|---|---|---|---|")
    for (name, resume), rounds in results.items():
        rate = statistics.median(r.reconnects / r.seconds for r in rounds)
        resumed = sum(r.resumed for r in rounds) / max(sum(r.reconnects for r in rounds), 1)
        server_ms, client_ms = 1e3 * med(rounds, "server_cpu"), 1e3 * med(rounds, "client_cpu")
        kind = "resumed" if resume else "full"
        print(
            f"| {name}, {kind} | {rate:,.0f} | {resumed:.0%} | {server_ms:.2f} ms "
            f"| {client_ms:.2f} ms |"
        )
    for name in ("gateway", "Mosquitto"):
        full = med(results[(name, False)], "server_cpu")
        resumed = med(results[(name, True)], "server_cpu")
        print(f"{name}: full / resumed server CPU per reconnect = {full / resumed:.2f}x")
    gateway_ratio = med(results[("gateway", False)], "server_cpu") / med(
        results[("gateway", True)], "server_cpu"
    )
    print(f"target: gateway resumed >= 3x cheaper than its full handshakes: "
          f"{'met' if gateway_ratio >= 3 else 'NOT met'} ({gateway_ratio:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
