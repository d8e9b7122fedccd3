"""Figure: nanoseconds per policy decision, the statement evaluator beside the old one.

One process, one run, so the ratios hold on a shared machine: the per-fleet evaluator of
earlier releases (tests/gateway/policy_v1.py ``authorize``, what the gateway called per
PUBLISH) on the built-in default policy; the compiled evaluator (`CompiledPolicy.decide`)
on the same policy; and on a 50-statement policy set (Allow and Deny, wildcards,
``{attr.site}``, a group statement, QoS conditions). Each figure is the best of
``--repeat`` runs over a cycle of 64 topics, half of them allowed, as wall and CPU
nanoseconds per decision; compiling a device's policy (a cache miss) is timed too.

The gateway also caches each decision per session and topic (`gateway.connection`), so
a decision is computed once per session and distinct topic; these figures are that cost.

Usage: .venv/bin/python bench/policy_decision.py [--decisions 200000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.policy import Action, CompiledPolicy, PolicySet, Subject
from schemas.policy import (
    Attachment,
    Conditions,
    Effect,
    Policy,
    PolicyDocument,
    PolicyFile,
    Statement,
)
from tests.gateway import policy_v1


@dataclass(frozen=True)
class Who:
    device_id: str
    fleet: str


def fifty_statements() -> PolicyFile:
    allow, deny = Effect.ALLOW, Effect.DENY
    pub, sub, rcv = Action.PUBLISH, Action.SUBSCRIBE, Action.RECEIVE
    statements = []
    for i in range(10):
        statements += [
            Statement(
                id=f"own-{i}",
                effect=allow,
                actions=(pub,),
                resources=(f"devices/{{device_id}}/a{i}/#",),
            ),
            Statement(
                id=f"fleet-{i}",
                effect=allow,
                actions=(sub, rcv),
                resources=(f"fleets/{{fleet}}/a{i}/+",),
            ),
            Statement(
                id=f"admin-{i}",
                effect=deny,
                actions=(pub,),
                resources=(f"devices/{{device_id}}/a{i}/admin/#",),
            ),
            Statement(
                id=f"site-{i}",
                effect=allow,
                actions=(pub,),
                resources=(f"sites/{{attr.site}}/line{i}/{{device_id}}",),
            ),
        ]
    for i in range(5):
        statements += [
            Statement(
                id=f"telemetry-{i}",
                effect=allow,
                actions=(pub,),
                resources=(f"telemetry/{{fleet}}/{i}/#",),
                conditions=Conditions(max_qos=1),
            ),
            Statement(
                id=f"group-{i}",
                effect=allow,
                actions=(pub, sub),
                resources=(f"groups/{{group}}/{i}/#",),
                groups=("g1",),
            ),
        ]
    assert len(statements) == 50
    return PolicyFile(
        policies={"fifty": Policy(statements=tuple(statements))},
        attach=(Attachment(policy="fifty", fleet="*"),),
    )


def default_topics() -> list[str]:
    allowed = [f"devices/d1/t{i}" for i in range(32)]
    denied = [f"devices/d2/t{i}" for i in range(16)] + [f"other/{i}/x" for i in range(16)]
    return allowed + denied


def fifty_topics() -> list[str]:
    allowed = [f"devices/d1/a{i % 10}/t{i}" for i in range(16)]
    allowed += [f"sites/s1/line{i % 10}/d1" for i in range(8)]
    allowed += [f"telemetry/plant/{i % 5}/x" for i in range(4)]
    allowed += [f"groups/g1/{i % 5}/x" for i in range(4)]
    denied = [f"devices/d1/a{i % 10}/admin/x" for i in range(16)]
    denied += [f"devices/d2/a{i % 10}/x" for i in range(8)] + [f"zz/{i}" for i in range(8)]
    return allowed + denied


Case = tuple[str, Callable[[Any], object], list[Any], int]


def measure(cases: list[Case], repeat: int) -> dict[str, tuple[float, float]]:
    """Best (wall ns, CPU ns) per decision of each case over ``repeat`` rounds; the cases
    take turns within each round, so a change in the machine's load hits them alike."""
    best: dict[str, tuple[float, float]] = {}
    for _ in range(repeat):
        for label, decide, items, n in cases:
            cycle = (items * (n // len(items) + 1))[:n]
            wall0, cpu0 = time.perf_counter_ns(), time.process_time_ns()
            for item in cycle:
                decide(item)
            wall = (time.perf_counter_ns() - wall0) / n
            cpu = (time.process_time_ns() - cpu0) / n
            old = best.get(label, (float("inf"), float("inf")))
            best[label] = (min(old[0], wall), min(old[1], cpu))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    n, repeat = args.decisions, args.repeat

    legacy = PolicyDocument()
    who = Who("d1", "plant")
    old = legacy.for_fleet("plant")
    subject = Subject("d1", "plant", frozenset({"g1"}), {"site": "s1"})
    default_set = PolicySet.from_document(legacy)
    default_compiled = default_set.for_subject(subject)
    fifty_set = PolicySet(fifty_statements())
    fifty: CompiledPolicy = fifty_set.for_subject(subject)

    topics, topics50 = default_topics(), fifty_topics()
    assert sum(default_compiled.decide(Action.PUBLISH, t).allowed for t in topics) == 32
    assert sum(fifty.decide(Action.PUBLISH, t).allowed for t in topics50) == 32

    pub, old_pub = Action.PUBLISH, policy_v1.Action.PUBLISH
    sub, old_sub = Action.SUBSCRIBE, policy_v1.Action.SUBSCRIBE
    filters50 = [f"fleets/plant/a{i}/+" for i in range(10)]
    filters50 += [f"fleets/x/a{i}/#" for i in range(10)]
    filters = ["devices/d1/#", "fleets/plant/+", "devices/+/x", "#"] * 5
    m = n // 4
    v1_pub = "v1 authorize, default policy (PUBLISH)"
    v1_sub = "v1 authorize, default policy (SUBSCRIBE)"
    cases: list[Case] = [
        (v1_pub, lambda t: policy_v1.authorize(who, old_pub, t, old), topics, n),
        ("decide, default policy (PUBLISH)", lambda t: default_compiled.decide(pub, t), topics, n),
        ("decide, 50 statements (PUBLISH)", lambda t: fifty.decide(pub, t), topics50, n),
        (
            "decide, 50 statements (PUBLISH qos 1 retain)",
            lambda t: fifty.decide(pub, t, qos=1, retain=True),
            topics50,
            n,
        ),
        (v1_sub, lambda f: policy_v1.authorize(who, old_sub, f, old), filters, m),
        (
            "decide, default policy (SUBSCRIBE)",
            lambda f: default_compiled.decide(sub, f),
            filters,
            m,
        ),
        ("decide, 50 statements (SUBSCRIBE)", lambda f: fifty.decide(sub, f), filters50, m),
    ]
    rows = measure(cases, repeat)
    subjects = [Subject(f"d{i}", "plant", frozenset({"g1"}), {"site": "s1"}) for i in range(2000)]
    extra = measure(
        [
            ("compile per device, default policy", default_set.compile, subjects, 2000),
            ("compile per device, 50 statements", fifty_set.compile, subjects, 2000),
            ("for_subject, cached (50 statements)", fifty_set.for_subject, [subject], m),
        ],
        1,
    )
    print(f"policy decisions: best of {repeat} rounds of {n} (SUBSCRIBE {m}), one process")
    print(f"{'figure':48} {'ns/decision':>12} {'CPU ns':>8} {'CPU vs v1':>9}")
    for label, (wall, cpu) in rows.items():
        ref = rows[v1_pub if "PUBLISH" in label else v1_sub][1]
        print(f"{label:48} {wall:12.0f} {cpu:8.0f} {cpu / ref:8.2f}x")
    for label, (wall, cpu) in extra.items():
        print(f"{label:48} {wall:12.0f} {cpu:8.0f}")


if __name__ == "__main__":
    main()
