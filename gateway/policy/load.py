"""Reading a policy file: TOML, or JSON for a ``.json`` file, in either format
(`schemas.policy.parse_document`), every problem said with its file and line."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Final

from pydantic import BaseModel, ValidationError

from gateway.mqtt.errors import InvalidTopic
from gateway.mqtt.topics import validate_topic_filter
from gateway.policy.engine import PolicyError
from schemas.policy import (
    Action,
    FleetPolicy,
    PolicyDocument,
    PolicyFile,
    Problem,
    parse_document,
    problems_of,
    variables_of,
)

__all__ = ["decode_policy", "load_policy"]

_WORD: Final = r"(?<![\w-]){}(?![\w-])"
_TOML_AT: Final = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def _legacy_problems(document: PolicyDocument) -> list[Problem]:
    problems = []
    fleets: list[tuple[tuple[str, ...], FleetPolicy]] = [(("default",), document.default)]
    fleets += [(("fleets", name), policy) for name, policy in document.fleets.items()]
    for where, fleet_policy in fleets:
        for key in ("publish", "subscribe"):
            for index, template in enumerate(getattr(fleet_policy, key)):
                expanded = template.replace("{device_id}", "device").replace("{fleet}", "fleet")
                try:
                    validate_topic_filter(expanded)
                except InvalidTopic as exc:
                    path = (*where, key, index)
                    name = ".".join(where) + f".{key}[{index}]"
                    problems.append(Problem(path, f"{name}: {exc}", template))
    return problems


def _statement_problems(document: PolicyFile) -> list[Problem]:
    problems = []
    for name, policy in document.policies.items():
        for i, statement in enumerate(policy.statements):
            if Action.CONNECT in statement.actions:
                continue
            for j, template in enumerate(statement.resources):
                sample = template
                for variable in variables_of(template):
                    sample = sample.replace(f"{{{variable}}}", "x")
                try:
                    validate_topic_filter(sample)
                except InvalidTopic as exc:
                    path = ("policies", name, "statements", i, "resources", j)
                    where = f"policies.{name}.statements[{i}].resources[{j}]"
                    problems.append(Problem(path, f"{where}: {exc}", template))
    return problems


def _line(text: str, problem: Problem) -> int | None:
    """The line of ``problem`` in the file: each key of its path in turn, then its token."""
    pos, found = 0, False
    for part in problem.path:
        if isinstance(part, str):
            match = re.compile(_WORD.format(re.escape(part))).search(text, pos)
            if match is not None:
                pos, found = match.start(), True
    if problem.token:
        at = text.find(problem.token, pos)
        if at < 0:
            at = text.find(problem.token)
        if at >= 0:
            pos, found = at, True
    return text.count("\n", 0, pos) + 1 if found else None


def _decode(path: Path, text: str) -> object:
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return tomllib.loads(text)
    except json.JSONDecodeError as exc:
        raise PolicyError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        at = _TOML_AT.search(message)
        if at is None:
            raise PolicyError(f"{path}: not valid TOML: {message}") from None
        where = f"{path}:{at.group(1)}"
        raise PolicyError(f"{where}: not valid TOML: {message[: at.start()]}") from None


def decode_policy(
    data: object, *, name: str = "policy", text: str = ""
) -> PolicyFile | PolicyDocument:
    """Validate decoded data as a policy document in either format.

    Args:
        data: The decoded TOML or JSON.
        name: What to call it in messages (the file's path).
        text: The file's text, to name each problem's line.

    Raises:
        PolicyError: unknown keys or variables, invalid filters; ``problems`` holds one
            ``NAME[:LINE]: sentence`` per problem.
    """
    new_format = isinstance(data, dict) and ("policies" in data or "attach" in data)
    root: type[BaseModel] = PolicyFile if new_format else PolicyDocument
    document: PolicyFile | PolicyDocument | None = None
    try:
        document = parse_document(data)
    except ValidationError as exc:
        problems = problems_of(exc, root)
    else:
        if isinstance(document, PolicyDocument):
            problems = _legacy_problems(document)
        else:
            problems = _statement_problems(document)
    if problems:
        lines = []
        for problem in problems:
            line = _line(text, problem) if text else None
            lines.append(f"{name}{'' if line is None else f':{line}'}: {problem.message}")
        raise PolicyError("\n".join(lines), problems=tuple(lines))
    assert document is not None
    return document


def load_policy(path: Path | None) -> PolicyFile | PolicyDocument:
    """Read a policy file (TOML, or JSON for a ``.json`` file); ``None``: the built-in
    default (`PolicyDocument()`).

    Raises:
        PolicyError: unreadable file, bad syntax, unknown keys or variables, invalid
            filters; ``problems`` holds one ``FILE[:LINE]: sentence`` per problem.
    """
    if path is None:
        return PolicyDocument()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise PolicyError(f"{path}: cannot read the policy file: {why}") from None
    return decode_policy(_decode(path, text), name=str(path), text=text)
