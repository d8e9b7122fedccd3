"""The policy part of the device page: attributes, groups, and an explain form.

The form is a GET (it changes nothing): ``?explain=publish&topic=...`` on the device page
shows the decision, the deciding statement and the policy version, computed by
`provisioning.policy_engine.explain_device`, the function the CLI and the API use.
"""

from __future__ import annotations

from typing import Any, Final

from provisioning import policies, policy_engine
from provisioning.console.html import Html, escape, join, segment, tag
from schemas.errors import DevicegateError

MAX_TOPIC: Final = 1024


def _attributes(values: dict[str, str], groups: list[str], version: int) -> Html:
    items = [(key, value) for key, value in sorted(values.items())]
    facts = join(tag("dt", key, class_="mono") + tag("dd", value, class_="mono")
                 for key, value in items)  # fmt: skip
    shown = Html(f'<dl class="facts" id="attributes">{facts}</dl>') if items else tag(
        "p", "No attributes.", id="attributes")  # fmt: skip
    group_list = (
        tag("ul", join(tag("li", g, class_="mono") for g in groups), id="groups")
        if groups
        else tag("p", "In no group.", id="groups")
    )
    return Html(
        shown + tag("h3", "Groups") + group_list
        + tag("p", f"Policy version {version}.", id="policy-version")
    )  # fmt: skip


def _attribute_form(device_id: str, csrf_token: str) -> Html:
    """Set one attribute (an empty value removes it): a POST with the session's CSRF token,
    recorded as an ``attributes_set`` event like the CLI's and the API's."""
    return Html(
        f'<form class="filters" method="post" action="/console/devices/{segment(device_id)}'
        '/attributes" aria-label="Set an attribute">'
        f'<input type="hidden" name="csrf" value="{escape(csrf_token)}">'
        '<div><label for="a-key">Key</label>'
        '<input id="a-key" name="key" required maxlength="63" class="mono"></div>'
        '<div><label for="a-value">Value (empty: remove)</label>'
        '<input id="a-value" name="value" maxlength="256" class="mono"></div>'
        '<div><button type="submit">Set</button></div></form>'
    )


def _form(device_id: str, action: str, topic: str) -> Html:
    options = join(
        tag("option", name, value=name, selected=name == action) for name in policy_engine.ACTIONS
    )
    return Html(
        f'<form class="filters" method="get" action="/console/devices/{segment(device_id)}" '
        'aria-label="Explain a decision">'
        f'<div><label for="x-action">Action</label><select id="x-action" name="explain">'
        f"{options}</select></div>"
        f'<div><label for="x-topic">Topic or filter</label>'
        f'<input id="x-topic" name="topic" value="{escape(topic)}" maxlength="{MAX_TOPIC}">'
        "</div>"
        '<div><button type="submit">Explain</button></div></form>'
    )


def _verdict(explained: policy_engine.Explained) -> Html:
    word = "allowed" if explained.allowed else "denied"
    items = [
        ("decision", tag("span", word.upper(), class_=f"decision {word}")),
        ("statement", tag("span", explained.statement, class_="mono")),
        ("policy version", str(explained.version)),
        ("policies", ", ".join(explained.policies) or "none"),
        ("why", explained.why),
        *(("note", note) for note in explained.notes),
    ]
    facts = join(tag("dt", name) + tag("dd", value) for name, value in items)
    return Html(f'<dl class="facts" id="explained">{facts}</dl>')


async def section(
    conn: Any, device_id: str, query: Any, *, trust_domain: str, csrf_token: str | None = None
) -> Html:
    """The policy section of a registered device's page (with ``csrf_token``, the form
    that sets an attribute)."""
    values = await policies.get_attributes(conn, device_id)
    groups = await policies.groups_of(conn, device_id)
    version = await policies.current_version(conn)
    action = query.get("explain") or "publish"
    topic = (query.get("topic") or "")[:MAX_TOPIC]
    result = Html("")
    if query.get("explain") is not None and topic:
        try:
            explained = await policy_engine.explain_device(
                conn, device_id, action=action, topic=topic, trust_domain=trust_domain
            )
        except DevicegateError as exc:
            result = tag("p", str(exc), class_="notice", role="alert")
        else:
            result = _verdict(explained)
    return Html(
        tag("h2", "Policy", id="h-policy")
        + tag("h3", "Attributes")
        + _attributes(values, groups, version)
        + (_attribute_form(device_id, csrf_token) if csrf_token else Html(""))
        + tag("h3", "Explain a decision")
        + _form(device_id, action if action in policy_engine.ACTIONS else "publish", topic)
        + result
    )


async def set_attribute(
    conn: Any, device_id: str, key: str, value: str, *, actor: str, instance: str
) -> None:
    """The attribute form's change: set ``key`` to ``value``, or remove it when empty.

    Raises:
        PolicyInvalid, NotFound: shown to the operator in one line.
    """
    key = key.strip()
    if not key:
        raise policies.PolicyInvalid("give the attribute's key")
    if value:
        await policies.set_attributes(conn, device_id, {key: value}, actor=actor, instance=instance)
    else:
        await policies.set_attributes(
            conn, device_id, {}, unset=[key], actor=actor, instance=instance
        )
