"""``devicegate policy check|explain|test``: the topic policy, judged by the gateway's own code.

This is the one command module besides `serve` that imports ``gateway``, and only
``gateway.policy``, the pure decision functions: an explanation computed by a copy of the
rules could disagree with the gateway that enforces them (tests/foundation/
test_import_boundaries.py states the exemption).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from provisioning.commands.common import console, context, errors, fail
from schemas.validation import FLEET_PATTERN, FLEET_RULE, location, sentence

if TYPE_CHECKING:
    from gateway.policy import Explanation, PolicySet
    from schemas.policy import PolicyCase

group = typer.Typer(
    help="Topic policies: check, test, apply, export, attach, explain.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    from provisioning.commands import policy_db

    policy_db.register_into(group)
    app.add_typer(group, name="policy")


def _say(line: str) -> None:
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def _policy_set(path: Path | None) -> PolicySet:
    """The file as the gateway would load it; exit 2 with one line per problem."""
    from gateway.policy import PolicyError, PolicySet, load_policy

    try:
        return PolicySet.from_document(load_policy(path))
    except PolicyError as exc:
        for problem in exc.problems:
            errors.print(problem, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@group.command("check")
def check(
    path: Annotated[Path, typer.Argument(metavar="FILE", help="Policy file (TOML or JSON).")],
) -> None:
    """Validate a policy file: exit 0, or one line per problem and exit 1."""
    from gateway.policy import PolicyError, PolicySet, load_policy
    from schemas.policy import PolicyDocument

    try:
        document = load_policy(path)
        PolicySet.from_document(document)
    except PolicyError as exc:
        for problem in exc.problems:
            errors.print(problem, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    if isinstance(document, PolicyDocument):
        fleets = ", ".join(sorted(document.fleets)) or "none"
        _say(f"{path}: valid (fleets: {fleets}; others use default)")
        return
    names = ", ".join(document.policies) or "none"
    _say(f"{path}: valid (policies: {names}; {len(document.attach)} attachments)")


def _pairs(values: list[str], option: str) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            fail(f"{option}: give KEY=VALUE (got {value!r})", code=2)
        out[key] = val
    return out


def explanation_lines(explained: Explanation, device: str, fleet: str, asked: str) -> list[str]:
    """What ``policy explain`` prints for one decision (shared with the database path)."""
    word = "allowed" if explained.allowed else "denied"
    action = explained.action.value
    lines = [
        f"{word}: device {device!r} (fleet {fleet!r}) {action} {asked!r}",
        f"statement: {explained.statement} (policy version {explained.version})",
        f"why: {explained.why}",
    ]
    lines += [f"note: {note}" for note in explained.notes]
    return lines


@group.command("explain")
def explain_(
    ctx: typer.Context,
    device: Annotated[str, typer.Option("--device", help="Device id.")],
    fleet: Annotated[
        str | None,
        typer.Option("--fleet", help="The device's fleet (with a file: no database)."),
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
        typer.Option("--receive", metavar="TOPIC", help="A topic the broker delivers."),
    ] = None,
    connect: Annotated[
        str | None,
        typer.Option("--connect", metavar="CLIENT_ID", help="A CONNECT client id."),
    ] = None,
    qos: Annotated[int, typer.Option("--qos", min=0, max=2, help="The QoS.")] = 0,
    retain: Annotated[bool, typer.Option("--retain", help="The retain flag is set.")] = False,
    group_: Annotated[
        list[str] | None, typer.Option("--group", metavar="GROUP", help="A group of the device.")
    ] = None,
    attr: Annotated[
        list[str] | None,
        typer.Option("--attr", metavar="KEY=VALUE", help="An attribute of the device."),
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option(help="Policy file (default: DEVICEGATE_POLICY_FILE, else the built-in)."),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON (database path).")
    ] = False,
) -> None:
    """Say whether the gateway allows a request, which statement decides, at which version.

    Without --fleet and --policy, the device, its fleet, groups, attributes and certificate
    and the policies attached to them are read from the database (the snapshot gateways
    load). Exit status: 0 allowed, 1 denied (or an unknown device), 2 bad usage or an
    invalid policy file.
    """
    from gateway.policy import Action, Subject, explain

    asked_for = {
        Action.PUBLISH: publish,
        Action.SUBSCRIBE: subscribe,
        Action.RECEIVE: receive,
        Action.CONNECT: connect,
    }
    given = [(a, v) for a, v in asked_for.items() if v is not None]
    if len(given) != 1:
        fail("give exactly one of --publish, --subscribe, --receive and --connect", code=2)
    action, asked = given[0]
    if fleet is None and policy is None and not group_ and not attr:
        from provisioning.commands.policy_db import explain_device

        explain_device(
            ctx, device, action.value, asked, qos=qos, retain=retain, json_output=json_output
        )
    if fleet is None:
        fail("--fleet is needed with --policy, --group or --attr (or give none: database)", 2)
    if not re.fullmatch(FLEET_PATTERN, fleet):
        fail(f"--fleet: must be {FLEET_RULE} (got {fleet!r})", code=2)
    path = policy if policy is not None else context(ctx).settings().policy_file
    policy_set = _policy_set(path)
    subject = Subject(
        device_id=device,
        fleet=fleet,
        groups=frozenset(group_ or ()),
        attributes=_pairs(attr or [], "--attr"),
    )
    explained = explain(policy_set.for_subject(subject), action, asked, qos, retain)
    source = "the built-in default policy" if path is None else str(path)
    for line in [*explanation_lines(explained, device, fleet, asked), f"policy: {source}"]:
        _say(line)
    raise typer.Exit(0 if explained.allowed else 1)


def _load_cases(path: Path) -> tuple[PolicyCase, ...]:
    """The cases of a YAML table; exit 2 with one line per malformed case."""
    import yaml
    from pydantic import ValidationError

    from schemas.policy import PolicyCases

    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        fail(f"{path}: cannot read the cases: {why}", code=2)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or "syntax error"
        fail(f"{where}: not valid YAML: {problem}", code=2)
    if isinstance(data, list):
        data = {"cases": data}
    try:
        return PolicyCases.model_validate(data).cases
    except ValidationError as exc:
        for detail in exc.errors():
            errors.print(
                f"{path}: {location(detail)}: {sentence(detail)}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        raise typer.Exit(2) from None


def _statement_matches(expected: str, got: str | None) -> bool:
    return got is not None and (got == expected or got.endswith(f"/{expected}"))


@group.command("test")
def test(
    path: Annotated[Path, typer.Argument(metavar="FILE", help="Policy file (TOML or JSON).")],
    cases_path: Annotated[
        Path, typer.Argument(metavar="CASES.yaml", help="The table of cases (YAML).")
    ],
) -> None:
    """Run a table of cases against a policy file: a line per failed case and a summary.

    Each case names device, fleet (groups, attributes, serial, spiffe_id optional), action
    (connect, publish, subscribe, receive, retain), topic, qos, retain, expect (allow or
    deny) and optionally the deciding statement. Exit 0 all pass, 1 a case fails, 2 an
    invalid policy file or a malformed case.
    """
    from gateway.policy import Subject

    policy_set = _policy_set(path)
    cases = _load_cases(cases_path)
    failed = 0
    for index, case in enumerate(cases):
        subject = Subject(
            device_id=case.device,
            fleet=case.fleet,
            groups=frozenset(case.groups),
            attributes=case.attributes,
            cert_serial=case.serial,
            spiffe_id=case.spiffe_id,
        )
        compiled = policy_set.for_subject(subject)
        decision = compiled.decide(case.action, case.topic, qos=case.qos, retain=case.retain)
        got = "allow" if decision.allowed else "deny"
        problems = []
        if got != case.expect:
            problems.append(f"expected {case.expect}, got {got}")
        if case.statement is not None and not _statement_matches(
            case.statement, decision.statement
        ):
            problems.append(f"expected statement {case.statement!r}")
        if problems:
            failed += 1
            label = f"cases[{index}]" + (f" ({case.name})" if case.name else "")
            request = f"device {case.device!r} {case.action.value} {case.topic!r}"
            if case.qos or case.retain:
                request += f" qos {case.qos}" + (" retain" if case.retain else "")
            why = "; ".join(problems)
            _say(f"FAIL {label}: {request}: {why} (decided by {decision.statement})")
    passed = len(cases) - failed
    version = policy_set.version
    _say(f"{len(cases)} cases: {passed} passed, {failed} failed (policy version {version})")
    raise typer.Exit(1 if failed else 0)
