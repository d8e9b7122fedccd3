"""``devicegate policy check|explain``: the topic policy, judged by the gateway's own code.

This is the one command module besides `serve` that imports ``gateway``, and only
``gateway.policy``, the pure decision functions: an explanation computed by a copy of the
rules could disagree with the gateway that enforces them (tests/foundation/
test_import_boundaries.py states the exemption).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from provisioning.commands.common import console, context, errors, fail
from schemas.validation import FLEET_PATTERN, FLEET_RULE

group = typer.Typer(
    help="Topic policies: check, apply, export, attach, explain.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    from provisioning.commands import policy_db

    policy_db.register_into(group)
    app.add_typer(group, name="policy")


@group.command("check")
def check(
    path: Annotated[Path, typer.Argument(metavar="FILE", help="Policy file (TOML or JSON).")],
) -> None:
    """Validate a policy file: exit 0, or one line per problem and exit 1."""
    from gateway.policy import PolicyError, load_policy

    try:
        document = load_policy(path)
    except PolicyError as exc:
        for problem in exc.problems:
            errors.print(problem, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    fleets = ", ".join(sorted(document.fleets)) or "none"
    console.print(
        f"{path}: valid (fleets: {fleets}; others use default)", markup=False, soft_wrap=True
    )


class _Device:
    """The subject a policy decision is about (``gateway.policy.Subject``)."""

    def __init__(self, device_id: str, fleet: str) -> None:
        self.device_id = device_id
        self.fleet = fleet


@group.command("explain")
def explain_(
    ctx: typer.Context,
    device: Annotated[str, typer.Option("--device", help="Device id.")],
    fleet: Annotated[
        str | None,
        typer.Option("--fleet", help="The device's fleet (with --policy FILE: no database)."),
    ] = None,
    publish: Annotated[
        str | None, typer.Option("--publish", metavar="TOPIC", help="A PUBLISH topic.")
    ] = None,
    subscribe: Annotated[
        str | None,
        typer.Option("--subscribe", metavar="FILTER", help="A SUBSCRIBE filter ($share too)."),
    ] = None,
    receive: Annotated[
        str | None,
        typer.Option("--receive", metavar="TOPIC", help="A delivery the device would receive."),
    ] = None,
    qos: Annotated[int, typer.Option("--qos", min=0, max=2, help="QoS of the request.")] = 0,
    retain: Annotated[bool, typer.Option("--retain", help="A retained PUBLISH.")] = False,
    policy: Annotated[
        Path | None,
        typer.Option(help="Policy file (default: DEVICEGATE_POLICY_FILE, else the built-in)."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Say whether the gateway allows a request, which statement decides, at which version.

    Without --fleet or --policy, the device, its groups and attributes and the policies
    attached to them are read from the database. Exit status: 0 allowed, 1 denied (or an
    unknown device), 2 bad usage or an invalid policy file.
    """
    from gateway.policy import Action, PolicyError, explain, load_policy

    asked_for = [(a, t) for a, t in (("publish", publish), ("subscribe", subscribe),
                                     ("receive", receive)) if t is not None]  # fmt: skip
    if len(asked_for) != 1:
        fail("give exactly one of --publish TOPIC, --subscribe FILTER, --receive TOPIC", code=2)
    if fleet is None and policy is None:
        from provisioning.commands.policy_db import explain_device

        explain_device(ctx, device, *asked_for[0], qos=qos, retain=retain, json_output=json_output)
    if fleet is None:
        fail("--policy FILE needs --fleet (or leave both out to read the database)", code=2)
    if receive is not None:
        fail("--receive is judged over the database only (leave out --fleet and --policy)", code=2)
    if not re.fullmatch(FLEET_PATTERN, fleet):
        fail(f"--fleet: must be {FLEET_RULE} (got {fleet!r})", code=2)
    path = policy if policy is not None else context(ctx).settings().policy_file
    try:
        document = load_policy(path)
    except PolicyError as exc:
        fail(str(exc), code=2)
    action = Action.PUBLISH if publish is not None else Action.SUBSCRIBE
    asked = publish if publish is not None else subscribe
    assert asked is not None
    section = f"fleets.{fleet}" if fleet in document.fleets else "default"
    source = "the built-in default policy" if path is None else str(path)
    verdict = explain(_Device(device, fleet), action, asked, document.for_fleet(fleet))
    word = "allowed" if verdict.decision.allowed else "denied"
    lines = [
        f"{word}: device {device!r} (fleet {fleet!r}) {action.value} {asked!r}",
        f"policy: {source}, section [{section}]",
        f"why: {verdict.why}",
    ]
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(0 if verdict.decision.allowed else 1)
