"""The topic policy documents: named policies of Allow and Deny statements, and the
per-fleet template file of earlier releases, which still loads and converts.

Two file formats, told apart by their top-level keys (docs/policy.md):

* `PolicyFile` (``policies`` and ``attach``): named `Policy` documents, each a list of
  `Statement` (id, effect, actions, resources, conditions, groups), attached to fleets
  (``"*"``: every fleet without a fleet attachment of its own), groups or devices. This is
  what the database stores and ``policy apply`` seeds.
* `PolicyDocument` (``default`` and ``fleets``, the per-fleet `FleetPolicy` templates):
  the format of earlier releases; `PolicyDocument.to_policy_file` converts it to
  statements that decide exactly as before.

Variables in resources: ``{device_id}``, ``{fleet}``, ``{group}``, ``{attr.<key>}``,
``{cert.serial}``, ``{cert.spiffe_id}`` (the old format: only the first two). Any other
name is refused with its location: a typo such as ``{devce_id}`` would otherwise stay in
the filter literally and deny every publish. Whether a resource is a valid topic filter is
checked where filters are understood (`gateway.policy`); this module checks the shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from schemas.validation import PATTERN_WORDS, location, sentence

__all__ = [
    "ANY_FLEET",
    "NAME_PATTERN",
    "PLACEHOLDERS",
    "TOPIC_ACTIONS",
    "VARIABLES",
    "Action",
    "Attachment",
    "Conditions",
    "Effect",
    "FleetPolicy",
    "Policy",
    "PolicyCase",
    "PolicyCases",
    "PolicyDocument",
    "PolicyFile",
    "Problem",
    "Statement",
    "parse_document",
    "problems_of",
    "variables_of",
]

NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
PATTERN_WORDS[NAME_PATTERN] = (
    "letters, digits, '_', '.' and '-', starting with a letter or digit, at most 64 characters"
)
ANY_FLEET: Final = "*"
"""The fleet attachment target of every fleet that has no fleet attachment of its own."""

PLACEHOLDERS: Final = ("device_id", "fleet")
"""The variables of the old per-fleet format."""
VARIABLES: Final = ("device_id", "fleet", "group", "attr.<key>", "cert.serial", "cert.spiffe_id")
"""The variables of a `Statement` resource."""
_PLACEHOLDER: Final = re.compile(r"\{([^{}/]*)\}")
_VARIABLE: Final = re.compile(r"\{([^{}]*)\}")
_ATTR_KEY: Final = re.compile(r"attr\.[A-Za-z0-9_-]{1,64}")
_VARIABLE_WORDS: Final = ", ".join(f"{{{name}}}" for name in VARIABLES)
_ALLOWED: Final = " and ".join(f"{{{name}}}" for name in PLACEHOLDERS)


def _known_placeholders(template: str) -> str:
    for name in _PLACEHOLDER.findall(template):
        if name not in PLACEHOLDERS:
            raise ValueError(f"unknown placeholder {{{name}}}; the placeholders are {_ALLOWED}")
    return template


Template = Annotated[str, AfterValidator(_known_placeholders)]


class FleetPolicy(BaseModel):
    """What the devices of one fleet may do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    publish: tuple[Template, ...] = Field(
        ("devices/{device_id}/#",), description="Topic filters a device may publish to."
    )
    subscribe: tuple[Template, ...] = Field(
        ("devices/{device_id}/#", "fleets/{fleet}/#"),
        description="Topic filters that contain every filter a device may subscribe to.",
    )
    client_ids: tuple[Template, ...] = Field(
        ("{device_id}",),
        description=(
            "Allowed MQTT client ids: exact templates, a template ending in '*' as a prefix "
            "('{device_id}-*'), or '*' for any (test benches only)."
        ),
    )
    drop_denied_publish_v3: bool = Field(
        False,
        description=(
            "On MQTT 3.1.1, drop a denied PUBLISH silently instead of closing the connection."
        ),
    )


class PolicyDocument(BaseModel):
    """The whole policy file: a default and per-fleet overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: FleetPolicy = Field(default_factory=FleetPolicy)
    fleets: dict[str, FleetPolicy] = Field(default_factory=dict)

    def for_fleet(self, fleet: str) -> FleetPolicy:
        return self.fleets.get(fleet, self.default)

    def to_policy_file(self) -> PolicyFile:
        """The same policy as statements: ``default`` attached to every fleet (``"*"``),
        each ``fleets.<name>`` to its fleet, which then does not get ``default``."""
        policies = {"default": _converted(self.default)}
        attach = [Attachment(policy="default", fleet=ANY_FLEET)]
        for fleet, fleet_policy in self.fleets.items():
            policies[f"fleets.{fleet}"] = _converted(fleet_policy)
            attach.append(Attachment(policy=f"fleets.{fleet}", fleet=fleet))
        return PolicyFile(policies=policies, attach=tuple(attach))


class Effect(StrEnum):
    ALLOW = "Allow"
    DENY = "Deny"


class Action(StrEnum):
    """What a statement is about. ``retain`` is a PUBLISH with the retain flag set, judged
    in addition to ``publish``; ``receive`` is a message the broker delivers."""

    CONNECT = "connect"
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    RECEIVE = "receive"
    RETAIN = "retain"


TOPIC_ACTIONS: Final = frozenset({Action.PUBLISH, Action.SUBSCRIBE, Action.RECEIVE, Action.RETAIN})


def variables_of(resource: str) -> list[str]:
    """The variable names a resource uses, in order (``["device_id", "attr.site"]``)."""
    return _VARIABLE.findall(resource)


def _known_variables(resource: str) -> str:
    for name in variables_of(resource):
        if name in VARIABLES or _ATTR_KEY.fullmatch(name):
            continue
        raise ValueError(f"unknown variable {{{name}}}; the variables are {_VARIABLE_WORDS}")
    return resource


Resource = Annotated[str, Field(min_length=1), AfterValidator(_known_variables)]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Qos = Literal[0, 1, 2]


class Conditions(BaseModel):
    """When a statement applies, besides its resources (all given conditions must hold)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    qos: tuple[Qos, ...] | None = Field(
        None, description="The QoS values the statement applies to (PUBLISH, SUBSCRIBE, RECEIVE)."
    )
    max_qos: Qos | None = Field(None, description="The statement applies up to this QoS.")
    retain: bool | None = Field(
        None, description="The statement applies only when the retain flag is this value."
    )

    def hold(self, qos: int, retain: bool) -> bool:
        """Whether a request with ``qos`` and ``retain`` meets every condition."""
        if self.qos is not None and qos not in self.qos:
            return False
        if self.max_qos is not None and qos > self.max_qos:
            return False
        return self.retain is None or self.retain is retain

    @property
    def empty(self) -> bool:
        return self.qos is None and self.max_qos is None and self.retain is None


class Statement(BaseModel):
    """One rule: ``effect`` for ``actions`` on ``resources`` when ``conditions`` hold.

    Resources are topic filter templates, or for ``connect`` client id patterns (an exact
    id, a prefix ending in ``*``, or ``*``). With ``groups`` the statement applies only to
    devices in one of them, and ``{group}`` stands for each such group.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Name = Field(description="Unique within its policy; decisions and events name it.")
    effect: Effect
    actions: tuple[Action, ...] = Field(min_length=1)
    resources: tuple[Resource, ...] = Field(min_length=1)
    conditions: Conditions = Field(default_factory=Conditions)
    groups: tuple[Name, ...] = Field(
        (), description="Only devices in one of these groups (none: every device)."
    )

    @field_validator("actions")
    @classmethod
    def _connect_alone(cls, actions: tuple[Action, ...]) -> tuple[Action, ...]:
        if Action.CONNECT in actions and len(set(actions)) > 1:
            raise ValueError(
                "connect resources are client id patterns, not topic filters: "
                "give connect a statement of its own"
            )
        return actions


class Policy(BaseModel):
    """A named policy document: statements, in order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    statements: tuple[Statement, ...] = ()
    drop_denied_publish_v3: bool = Field(
        False,
        description=(
            "On MQTT 3.1.1, drop a denied PUBLISH silently instead of closing the connection "
            "(for the devices this policy applies to)."
        ),
    )

    @field_validator("statements")
    @classmethod
    def _unique_ids(cls, statements: tuple[Statement, ...]) -> tuple[Statement, ...]:
        seen: set[str] = set()
        for statement in statements:
            if statement.id in seen:
                raise ValueError(f"statement id {statement.id!r} is used twice")
            seen.add(statement.id)
        return statements


class Attachment(BaseModel):
    """A policy applied to a fleet (``"*"``: fleets without one of their own), a group of
    devices, or one device. Exactly one of ``fleet``, ``group``, ``device``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Name
    fleet: str | None = None
    group: Name | None = None
    device: str | None = None

    @model_validator(mode="after")
    def _one_target(self) -> Attachment:
        given = [v for v in (self.fleet, self.group, self.device) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of fleet, group and device")
        if not given[0]:
            raise ValueError("the target is empty")
        return self

    @property
    def kind(self) -> Literal["fleet", "group", "device"]:
        if self.fleet is not None:
            return "fleet"
        return "group" if self.group is not None else "device"

    @property
    def target(self) -> str:
        target = self.fleet if self.fleet is not None else self.group or self.device
        assert target is not None
        return target


class PolicyFile(BaseModel):
    """Named policies and where they apply: the file ``policy apply`` seeds from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policies: dict[Name, Policy] = Field(default_factory=dict)
    attach: tuple[Attachment, ...] = ()

    @model_validator(mode="after")
    def _attached_policies_exist(self) -> PolicyFile:
        for attachment in self.attach:
            if attachment.policy not in self.policies:
                known = ", ".join(sorted(self.policies)) or "none"
                raise ValueError(
                    f"attach names the policy {attachment.policy!r}, which is not defined "
                    f"(the policies are {known})"
                )
        return self


def _converted(fleet_policy: FleetPolicy) -> Policy:
    statements = []
    if fleet_policy.publish:
        statements.append(
            Statement(
                id="publish",
                effect=Effect.ALLOW,
                actions=(Action.PUBLISH, Action.RETAIN),
                resources=fleet_policy.publish,
            )
        )
    if fleet_policy.subscribe:
        statements.append(
            Statement(
                id="subscribe",
                effect=Effect.ALLOW,
                actions=(Action.SUBSCRIBE, Action.RECEIVE),
                resources=fleet_policy.subscribe,
            )
        )
    if fleet_policy.client_ids:
        statements.append(
            Statement(
                id="client-ids",
                effect=Effect.ALLOW,
                actions=(Action.CONNECT,),
                resources=fleet_policy.client_ids,
            )
        )
    return Policy(
        statements=tuple(statements),
        drop_denied_publish_v3=fleet_policy.drop_denied_publish_v3,
    )


class PolicyCase(BaseModel):
    """One row of a ``devicegate policy test`` table: a request and the expected verdict."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    device: str = Field(min_length=1)
    fleet: str = Field(min_length=1)
    groups: tuple[str, ...] = ()
    attributes: dict[str, str] = Field(default_factory=dict)
    serial: str = ""
    spiffe_id: str | None = None
    action: Action
    topic: str = Field(description="The topic, filter or (connect) client id.")
    qos: Qos = 0
    retain: bool = False
    expect: Literal["allow", "deny"]
    statement: str | None = Field(
        None, description="The deciding statement: '<policy>/<id>', '<id>' or 'default-deny'."
    )


class PolicyCases(BaseModel):
    """A ``devicegate policy test`` file: ``cases``, a list of `PolicyCase`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cases: tuple[PolicyCase, ...] = Field(min_length=1)


def parse_document(data: object) -> PolicyFile | PolicyDocument:
    """A decoded file as the format its top-level keys name (``policies``/``attach``: a
    `PolicyFile`; otherwise the per-fleet `PolicyDocument`).

    Raises:
        ValidationError: the document does not validate.
    """
    if isinstance(data, dict) and ("policies" in data or "attach" in data):
        return PolicyFile.model_validate(data)
    return PolicyDocument.model_validate(data)


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong in a policy document.

    Attributes:
        path: Where: ``("fleets", "lab", "publish", 0)``.
        message: What, as a sentence (``fleets.lab.publish[0]: unknown placeholder ...``).
        token: The key or value as written, to find its line in the file.
    """

    path: tuple[str | int, ...]
    message: str
    token: str | None = None


def _keys(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)


def _model_at(root: type[BaseModel], path: tuple[Any, ...]) -> type[BaseModel]:
    """The model whose keys are at ``path`` (for 'the keys are ...')."""
    model = root
    children: dict[tuple[type[BaseModel], str], type[BaseModel]] = {
        (PolicyDocument, "default"): FleetPolicy,
        (PolicyDocument, "fleets"): FleetPolicy,
        (PolicyFile, "policies"): Policy,
        (PolicyFile, "attach"): Attachment,
        (Policy, "statements"): Statement,
        (Statement, "conditions"): Conditions,
    }
    for part in path:
        if isinstance(part, str):
            model = children.get((model, part), model)
    return model


def problems_of(error: ValidationError, root: type[BaseModel] | None = None) -> list[Problem]:
    """A `PolicyDocument` (or ``root``) validation error as `Problem` sentences naming the
    allowed names."""
    root = root if root is not None else PolicyDocument
    out = []
    for detail in error.errors():
        path = tuple(detail["loc"])
        where = location(detail)
        if detail["type"] == "extra_forbidden":
            key = str(path[-1])
            parent = ".".join(str(p) for p in path[:-1])
            keys = _keys(_model_at(root, path[:-1]))
            scope = f"{parent}: " if parent else ""
            message = f"{scope}unknown key {key!r}; the keys are {keys}"
            out.append(Problem(path, message, key))
            continue
        given = detail.get("input")
        out.append(
            Problem(
                path,
                f"{where}: {sentence(detail)}",
                given if isinstance(given, str) else None,
            )
        )
    return out
