"""``devicegate policy apply|export|history|attach|detach|delete`` and ``policy explain
--device``: the policies in the database (`provisioning.policies`).

Registered into the ``policy`` group by `provisioning.commands.policy`. Every change is one
transaction with one ``policy`` auth event whose actor is ``cli:<login>``; a refused
change (an invalid file, a limit, an unknown target) changes nothing and is recorded as one
denied event. Mistakes are one line each (the root prints typed errors).
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer

from provisioning.commands.common import console, context, errors, fail, print_json_lines
from provisioning.commands.records import with_connection
from schemas.errors import DevicegateError
from schemas.settings import Settings

T = TypeVar("T")

NameOption = Annotated[
    str, typer.Option("--name", help="Policy name (default: 'default').", show_default=False)
]
JsonOption = Annotated[bool, typer.Option("--json", help="One JSON object per line.")]


def cli_actor() -> str:
    """``cli:<login>``: who ran the command, as far as this machine knows."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name (a container without passwd entry)
        return "cli"


def _recorded(
    settings: Settings,
    action: str,
    operation: Callable[[Any], Awaitable[T]],
    *,
    device_id: str | None = None,
) -> T:
    """Run ``operation``; a typed refusal is recorded as one denied event, then printed."""
    from provisioning import policies

    async def run(conn: Any) -> T:
        try:
            return await operation(conn)
        except DevicegateError as exc:
            await policies.record_refusal(
                conn, exc, actor=cli_actor(), instance=settings.instance_id, action=action,
                device_id=device_id,
            )  # fmt: skip
            raise

    return with_connection(settings, run)


def _problems(exc: DevicegateError) -> None:
    for problem in getattr(exc, "problems", (str(exc),)):
        errors.print(f"error: {problem}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _say(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def register_into(group: typer.Typer) -> None:
    """Add the database commands to the ``policy`` group."""
    group.command("apply")(apply_)
    group.command("export")(export_)
    group.command("history")(history_)
    group.command("attach")(attach_)
    group.command("detach")(detach_)
    group.command("delete")(delete_)


def apply_(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(metavar="FILE", help="Policy file (TOML or JSON).")],
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="Apply only this policy of FILE (a file of one policy: store it as NAME).",
        ),
    ] = None,
    attach: Annotated[
        list[str] | None,
        typer.Option(
            "--attach",
            metavar="KIND:TARGET",
            help="Attach the policy to fleet:F (fleet:* for every fleet), group:G or device:D.",
        ),
    ] = None,
) -> None:
    """Validate FILE and store its policies and attachments (a new version only if
    something changed; the per-fleet format of earlier releases is converted)."""
    from provisioning import policies, policy_engine

    settings = context(ctx).settings()
    actor = cli_actor()

    async def operation(conn: Any) -> policies.ApplyResult:
        extra = [policies.parse_target(text) for text in attach or ()]
        content = policy_engine.load_document_file(path)
        documents, attachments = content.documents, list(content.attach)
        if name is not None:
            policies.check_name(name)
            if name in documents:
                documents = {name: documents[name]}
                attachments = [a for a in attachments if a[0] == name]
            elif len(documents) == 1:
                (only,) = documents
                documents = {name: documents[only]}
                attachments = [(name, kind, target) for _, kind, target in attachments]
            else:
                defined = ", ".join(sorted(documents)) or "none"
                raise policies.PolicyInvalid(
                    f"{path} defines no policy {name!r} (it defines {defined})"
                )
        if extra:
            if len(documents) != 1:
                raise policies.PolicyInvalid(
                    f"{path} defines {len(documents)} policies: name the one to attach with --name"
                )
            (target_name,) = documents
            attachments += [(target_name, kind, target) for kind, target in extra]
        return await policies.apply_policies(
            conn, documents, actor=actor, instance=settings.instance_id, attach=attachments
        )

    try:
        result = _recorded(settings, "policy_apply", operation)
    except policies.PolicyInvalid as exc:
        _problems(exc)
    for changed in result.changed:
        _say(f"policy {changed!r}: stored as version {result.version}")
    for unchanged in result.unchanged:
        _say(f"policy {unchanged!r}: unchanged")
    for policy, kind, target in result.attached:
        _say(f"policy {policy!r}: attached to {kind}:{target} (version {result.version})")
    if not result.any_change:
        _say(f"nothing changed: no new version (version {result.version} in force)")


def export_(
    ctx: typer.Context,
    name: Annotated[
        str | None, typer.Option("--name", help="Only this policy (default: all).")
    ] = None,
    fmt: Annotated[
        Literal["toml", "json"], typer.Option("--format", help="toml or json.")
    ] = "toml",
) -> None:
    """Print the stored policies and their attachments as a file `policy apply` takes back
    unchanged."""
    from provisioning import policies, policy_engine
    from provisioning.errors import NotFound
    from provisioning.tomlout import dumps

    settings = context(ctx).settings()

    async def read(conn: Any) -> dict[str, Any]:
        names = [name] if name is not None else await policies.policy_names(conn)
        documents = {}
        for each in names:
            document = await policies.current_document(conn, each)
            if document is None:
                raise NotFound(f"unknown policy {each!r}")
            documents[each] = document
        attachments = [a for a in await policies.attachments(conn, name) if a[0] in documents]
        return policy_engine.file_of(documents, attachments)

    exported = with_connection(settings, read)
    if fmt == "json":
        print(json.dumps(exported, indent=2, sort_keys=True, ensure_ascii=False))
    else:
        print(dumps(exported), end="")


def history_(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Option("--name", help="Only this policy.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many.")] = 100,
    json_output: JsonOption = False,
) -> None:
    """List policy revisions, newest first, with the version, time and actor of each."""
    from provisioning import policies
    from provisioning.commands.common import print_table

    settings = context(ctx).settings()
    revisions = with_connection(settings, lambda conn: policies.history(conn, name, limit=limit))
    records = [
        {
            "name": r.name,
            "version": r.version,
            "created_at": r.created_at.isoformat(),
            "actor": r.actor,
            "change": "deleted" if r.deleted else (r.sha256 or "")[:12],
        }
        for r in revisions
    ]
    if json_output:
        print_json_lines(records)
        return
    columns = ["version", "name", "created_at", "actor", "change"]
    print_table("policy history", columns, [[rec[c] for c in columns] for rec in records])


Target = Annotated[str, typer.Argument(metavar="KIND:TARGET", help="fleet:F, group:G or device:D.")]
PolicyName = Annotated[str, typer.Argument(metavar="NAME", help="Policy name.")]


def _attachment(ctx: typer.Context, name: str, target: str, *, attach: bool) -> None:
    from provisioning import policies

    settings = context(ctx).settings()
    action = policies.attach if attach else policies.detach

    async def operation(conn: Any) -> int | None:
        kind, value = policies.parse_target(target)
        return await action(
            conn, name, kind, value, actor=cli_actor(), instance=settings.instance_id
        )

    version = _recorded(settings, "policy_attach" if attach else "policy_detach", operation)
    verb = "attached to" if attach else "detached from"
    if version is None:
        state = "already" if attach else "was not"
        _say(f"policy {name!r} {state} {verb.split()[0]} {target}: nothing changed")
    else:
        _say(f"policy {name!r} {verb} {target} (version {version})")


def attach_(ctx: typer.Context, name: PolicyName, target: Target) -> None:
    """Attach policy NAME to a fleet, a group or a device."""
    _attachment(ctx, name, target, attach=True)


def detach_(ctx: typer.Context, name: PolicyName, target: Target) -> None:
    """Detach policy NAME from a fleet, a group or a device."""
    _attachment(ctx, name, target, attach=False)


def delete_(ctx: typer.Context, name: PolicyName) -> None:
    """Delete policy NAME and its attachments (its history stays)."""
    from provisioning import policies

    settings = context(ctx).settings()
    version = _recorded(
        settings,
        "policy_delete",
        lambda conn: policies.delete_policy(
            conn, name, actor=cli_actor(), instance=settings.instance_id
        ),
    )
    _say(f"policy {name!r} deleted (version {version})")


def explain_device(
    ctx: typer.Context,
    device: str,
    action: str,
    topic: str,
    *,
    qos: int,
    retain: bool,
    json_output: bool,
) -> None:
    """``policy explain --device ID`` over the database: decision, statement, version.

    Exit status: 0 allowed, 1 denied or an unknown device.
    """
    from provisioning import policy_engine

    settings = context(ctx).settings()
    explained = with_connection(
        settings,
        lambda conn: policy_engine.explain_device(
            conn, device, action=action, topic=topic, qos=qos, retain=retain,
            trust_domain=settings.trust_domain,
        ),
    )  # fmt: skip
    if json_output:
        print(json.dumps(explained.as_dict(), sort_keys=True))
    else:
        word = "allowed" if explained.allowed else "denied"
        groups = ", ".join(explained.groups) or "none"
        applied = ", ".join(explained.policies) or "none"
        lines = [
            f"{word}: device {device!r} (fleet {explained.fleet!r}) {action} {topic!r}",
            f"statement: {explained.statement} (policy version {explained.version})",
            f"why: {explained.why}",
            *(f"note: {note}" for note in explained.notes),
            f"policies: {applied}; groups: {groups} (database)",
        ]
        for line in lines:
            _say(line)
    raise typer.Exit(0 if explained.allowed else 1)


def fail_usage(message: str) -> None:
    fail(message, code=2)
