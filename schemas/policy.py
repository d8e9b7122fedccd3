"""The topic policy document: per-fleet templates of what a device may touch.

Templates may use ``{device_id}`` and ``{fleet}`` and no other placeholder: a typo such as
``{devce_id}`` would otherwise stay in the filter literally and deny every publish.
Anything not allowed is denied. docs/policy.md describes the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Final

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from schemas.validation import location, sentence

__all__ = [
    "PLACEHOLDERS",
    "FleetPolicy",
    "PolicyDocument",
    "Problem",
    "problems_of",
]

PLACEHOLDERS: Final = ("device_id", "fleet")
_PLACEHOLDER: Final = re.compile(r"\{([^{}/]*)\}")
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


def problems_of(error: ValidationError) -> list[Problem]:
    """A `PolicyDocument` validation error as `Problem` sentences naming the allowed names."""
    out = []
    for detail in error.errors():
        path = tuple(detail["loc"])
        where = location(detail)
        if detail["type"] == "extra_forbidden":
            key = str(path[-1])
            parent = ".".join(str(p) for p in path[:-1])
            keys = _keys(PolicyDocument if len(path) == 1 else FleetPolicy)
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
