"""The event table shared by the events page and the device timeline."""

from __future__ import annotations

import json

from provisioning.audit.format import certificate_line
from provisioning.console.html import Html, join, segment, tag, when
from schemas.events import AuthEvent

COLUMNS = ("time (UTC)", "type", "outcome", "reason", "device", "client id", "peer",
           "certificate", "instance", "chain:seq", "detail")  # fmt: skip


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
        tag("td", when(event.time), class_="mono"),
        tag("td", str(event.type)),
        tag("td", outcome_label(str(event.outcome))),
        tag("td", str(event.reason)),
        tag("td", device),
        tag("td", event.client_id),
        tag("td", event.peer_address, class_="mono"),
        tag("td", certificate_cell(event), class_="certificate"),
        tag("td", event.instance),
        tag("td", f"{event.chain_id}:{event.seq}", class_="mono"),
        tag("td", detail, class_="detail"),
    ]
    return tag("tr", join(cells), data_id=str(event.id))


def table(events: list[AuthEvent], *, table_id: str = "events") -> Html:
    head = join(tag("th", name, scope="col") for name in COLUMNS)
    body = join(row(event) for event in events)
    return Html(
        f'<div class="scroll"><table id="{table_id}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )
