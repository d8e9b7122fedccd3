"""The event table shared by the events page and the device timeline."""

from __future__ import annotations

import json

from provisioning.audit.format import certificate_line
from provisioning.console.html import Html, join, segment, tag, when
from schemas.events import AuthEvent

COLUMNS = ("time (UTC)", "type", "outcome", "reason", "device", "actor", "client id", "peer",
           "certificate", "instance", "chain:seq", "detail")  # fmt: skip
"""Also each cell's ``data-label``: the phone layout shows rows as cards, labelled in CSS."""


def actor(event: AuthEvent) -> str:
    """Who did an admin action: ``detail.actor`` (`provisioning.admin` writes the admin key's
    name, or ``cli``); empty for the gateways' own decisions."""
    value = event.detail.get("actor") if event.detail else None
    return value if isinstance(value, str) else ""


def outcome_label(outcome: str) -> Html:
    """The outcome as a word (never colour alone): ALLOWED / DENIED."""
    return tag("span", outcome.upper(), class_=f"outcome {outcome}")


def certificate_cell(event: AuthEvent) -> str:
    """A refused certificate in full (`certificate_line`), else the serial and TLS version."""
    line = certificate_line(event)
    if line is not None:
        return line
    parts = [f"serial {event.cert_serial}"] if event.cert_serial else []
    if event.tls_version:
        parts.append(event.tls_version)
    return " ".join(parts)


def row(event: AuthEvent) -> Html:
    device = (
        tag("a", event.device_id, href=f"/console/devices/{segment(event.device_id)}")
        if event.device_id
        else Html("")
    )
    detail = json.dumps(event.detail, sort_keys=True, ensure_ascii=False) if event.detail else ""
    cells = [
        (when(event.time), "mono"),
        (str(event.type), "type"),
        (outcome_label(str(event.outcome)), None),
        (str(event.reason), "reason"),
        (device, None),
        (actor(event), "actor"),
        (event.client_id, None),
        (event.peer_address, "mono"),
        (certificate_cell(event), "certificate"),
        (event.instance, None),
        (f"{event.chain_id}:{event.seq}", "mono"),
        (detail, "detail"),
    ]
    return tag(
        "tr",
        join(
            tag("td", value, class_=css, data_label=label)
            for label, (value, css) in zip(COLUMNS, cells, strict=True)
        ),
        data_id=str(event.id),
    )


def table(events: list[AuthEvent], *, table_id: str = "events") -> Html:
    head = join(tag("th", name, scope="col") for name in COLUMNS)
    body = join(row(event) for event in events)
    return Html(
        f'<div class="scroll"><table id="{table_id}" class="events"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )
