"""Policy documents in the statement model, as the policy store keeps them (JSON)."""

from __future__ import annotations

from typing import Any

from schemas.policy import Action, Effect, Policy, Statement

DEVICE_TOPICS = "devices/{device_id}/#"
FLEET_TOPICS = "fleets/{fleet}/#"


def fleet_document(
    *, fleet_topics: bool, deny_fleet: bool = False, description: str = ""
) -> dict[str, Any]:
    """A device's own topics, client ids ``{device_id}`` and ``{device_id}-*``; with
    ``fleet_topics`` its fleet's topics too; ``deny_fleet`` adds a Deny statement
    (``deny-fleet``) for them, which wins over any Allow."""
    subscribe = (DEVICE_TOPICS, FLEET_TOPICS) if fleet_topics else (DEVICE_TOPICS,)
    statements = [
        Statement(
            id="connect",
            effect=Effect.ALLOW,
            actions=(Action.CONNECT,),
            resources=("{device_id}", "{device_id}-*"),
        ),
        Statement(
            id="publish",
            effect=Effect.ALLOW,
            actions=(Action.PUBLISH, Action.RETAIN),
            resources=(DEVICE_TOPICS,),
        ),
        Statement(
            id="subscribe",
            effect=Effect.ALLOW,
            actions=(Action.SUBSCRIBE, Action.RECEIVE),
            resources=subscribe,
        ),
    ]
    if deny_fleet:
        statements.append(
            Statement(
                id="deny-fleet",
                effect=Effect.DENY,
                actions=(Action.SUBSCRIBE, Action.RECEIVE),
                resources=(FLEET_TOPICS,),
            )
        )
    return Policy(description=description, statements=tuple(statements)).model_dump(mode="json")
