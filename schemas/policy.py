"""The topic policy document: per-fleet templates of what a device may touch.

Templates may use ``{device_id}`` and ``{fleet}``. Anything not allowed is denied.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class FleetPolicy(BaseModel):
    """What the devices of one fleet may do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    publish: tuple[str, ...] = Field(
        ("devices/{device_id}/#",), description="Topic filters a device may publish to."
    )
    subscribe: tuple[str, ...] = Field(
        ("devices/{device_id}/#", "fleets/{fleet}/#"),
        description="Topic filters that contain every filter a device may subscribe to.",
    )
    client_ids: tuple[str, ...] = Field(
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
