"""``/console/devices/{id}``: identity, certificates, timeline, and operator actions.

Actions go through `provisioning.admin` (the functions the API and the CLI use), so the
state change, its auth event (``detail.actor`` = the session's admin key name) and the
NOTIFY that gateways act on are one transaction. Each action has a confirmation page (GET)
whose form POSTs with the session's CSRF token; the result is a 303 back to the device.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from provisioning import admin, store
from provisioning.audit.query import EventFilter, query_events
from provisioning.console import csrf, device_policy, sessions, tables
from provisioning.console.html import Html, join, page, render, segment, tag, url, when
from provisioning.errors import NotFound
from provisioning.http.common import SERVICE
from schemas.api import CertificateInfo, DeviceInfo
from schemas.errors import DevicegateError

TIMELINE = 50
Action = Callable[..., Awaitable[DeviceInfo]]
ACTIONS: dict[str, tuple[Action, str, str]] = {
    "disable": (admin.disable_device, "Disable",
                "Gateways refuse and cut the device; its certificates stay valid."),
    "enable": (admin.enable_device, "Enable", "The device may connect again."),
    "revoke": (admin.revoke_device, "Revoke",
               "Revokes the device and every certificate it holds. This is final."),
}  # fmt: skip
ALLOWED_FROM = {"disable": {"active"}, "enable": {"disabled"}, "revoke": {"active", "disabled"}}


def _certificates(certificates: list[CertificateInfo]) -> Html:
    if not certificates:
        return tag("p", "No certificates.")
    head = join(tag("th", n, scope="col") for n in (
        "serial", "SHA-256 fingerprint", "key", "not before", "not after", "status"))  # fmt: skip
    rows = join(
        tag("tr", join([
            tag("td", c.serial, class_="mono"),
            tag("td", c.fingerprint_sha256, class_="mono fingerprint"),
            tag("td", c.key_type), tag("td", when(c.not_before)), tag("td", when(c.not_after)),
            tag("td", tag("span", c.status.upper(), class_=f"status {c.status}")
                + (Html(" ") + tag("span", f"at {when(c.revoked_at)}") if c.revoked_at else "")),
        ]), data_serial=c.serial)
        for c in certificates
    )  # fmt: skip
    return Html(
        f'<div class="scroll"><table id="certificates"><thead><tr>{head}</tr></thead>'
        f"<tbody>{rows}</tbody></table></div>"
    )


def _identity(device: DeviceInfo, trust_domain: str) -> Html:
    items = [
        ("device id", device.device_id), ("fleet", device.fleet),
        ("status", tag("span", device.status.upper(), class_=f"status {device.status}")),
        ("hardware id", device.hardware_id or "none"),
        ("SPIFFE id", f"spiffe://{trust_domain}/fleet/{device.fleet}/device/{device.device_id}"),
        ("enrolled", when(device.created_at)), ("last change", when(device.updated_at)),
    ]  # fmt: skip
    facts = join(tag("dt", name) + tag("dd", value) for name, value in items)
    return Html(f'<dl class="facts">{facts}</dl>')


def _buttons(device: DeviceInfo) -> Html:
    base = f"/console/devices/{segment(device.device_id)}"
    links = [
        tag("a", label, href=f"{base}/{name}", class_=f"button {name}")
        for name, (_, label, _) in ACTIONS.items()
        if device.status in ALLOWED_FROM[name]
    ]
    return join(links, " ") if links else tag("p", "No action applies to a revoked device.")


async def show(request: web.Request) -> web.Response:
    device_id = request.match_info["device_id"]
    cursor = request.query.get("cursor") or None
    service = request.app[SERVICE]
    session = sessions.current_session(request)
    async with service.pool.acquire() as conn:
        try:
            device: DeviceInfo | None = await store.get_device(conn, device_id)
        except NotFound:
            device = None
        certificates = await store.list_certificates(conn, device_id=device_id)
        policy = (
            await device_policy.section(
                conn,
                device_id,
                request.query,
                trust_domain=service.settings.trust_domain,
                csrf_token=session.csrf_token if session is not None else None,
            )
            if device is not None
            else Html("")
        )
        events, next_cursor = await query_events(
            conn, filters=EventFilter(device_id=device_id), limit=TIMELINE, cursor=cursor
        )
    if device is None and not events and not certificates:
        return _unknown(request, device_id)
    done = request.query.get("done")
    notice = (
        tag("p", f"Done: {ACTIONS[done][1].lower()}d.", class_="notice", role="status")
        if done in ACTIONS else
        tag("p", "Done: attribute saved.", class_="notice", role="status")
        if done == "attributes" else Html("")
    )  # fmt: skip
    base = f"/console/devices/{segment(device_id)}"
    pager = [tag("a", "Newest events", href=base)] if cursor else []
    if next_cursor:
        pager.append(tag("a", "Older events", rel="next", href=url(base, cursor=next_cursor)))
    body = render(
        "device.html",
        device_id=device_id,
        notice=notice,
        identity=_identity(device, service.settings.trust_domain) if device else tag(
            "p", "This id is not in the device registry: only its events are shown.",
            class_="notice"),
        actions=_buttons(device) if device else "",
        certificates=_certificates(certificates),
        policy=policy,
        events_link=url("/console/events", device=device_id),
        timeline=tables.table(events, table_id="timeline"),
        pager=join(pager, " "),
    )  # fmt: skip
    return page(request, title=f"Device {device_id}", body=body)


def _unknown(request: web.Request, device_id: str) -> web.Response:
    """404: neither registered nor named by any event (a typo, or a pruned log)."""
    body = Html(
        tag("h1", "No such device")
        + tag("p", Html("No device ") + tag("span", device_id, class_="mono")
              + " is in the registry, and no stored event names it.")
        + tag("ul", tag("li", tag("a", "Browse the events", href="/console/events"))
              + tag("li", tag("a", "Back to the overview", href="/console/")), class_="way-back")
    )  # fmt: skip
    return page(request, title="No such device", body=body, status=404)


async def confirm(request: web.Request) -> web.Response:
    """The confirmation step: what the action does, and the form that does it."""
    device_id, name = request.match_info["device_id"], request.match_info["action"]
    _, label, effect = ACTIONS[name]
    session = sessions.require(request)
    async with request.app[SERVICE].pool.acquire() as conn:
        device = await store.get_device(conn, device_id)
    body = render(
        "confirm.html", label=label, verb=label.lower(), device_id=device_id, fleet=device.fleet,
        status=device.status, effect=effect, csrf=session.csrf_token, action_class=name,
        action=f"/console/devices/{segment(device_id)}/{name}",
        back=f"/console/devices/{segment(device_id)}",
    )  # fmt: skip
    return page(request, title=f"{label} {device_id}?", body=body)


async def act(request: web.Request) -> web.Response:
    """``POST``: CSRF check, then the admin function, then 303 to the device page."""
    device_id, name = request.match_info["device_id"], request.match_info["action"]
    session = sessions.require(request)
    form = await request.post()
    csrf.check(request, form, session.csrf_token)
    action: Any = ACTIONS[name][0]
    service = request.app[SERVICE]
    async with service.pool.acquire() as conn:
        await action(conn, device_id, actor=session.actor, instance=service.settings.instance_id)
    raise web.HTTPSeeOther(url(f"/console/devices/{segment(device_id)}", done=name))


async def set_attribute(request: web.Request) -> web.Response:
    """``POST`` of the attribute form: CSRF check, the change (an event, a new policy
    version), then 303 to the device page; a refused value is one line on a 400 page."""
    device_id = request.match_info["device_id"]
    session = sessions.require(request)
    form = await request.post()
    csrf.check(request, form, session.csrf_token)
    service = request.app[SERVICE]
    try:
        async with service.pool.acquire() as conn:
            await device_policy.set_attribute(
                conn, device_id, str(form.get("key", "")), str(form.get("value", "")),
                actor=session.actor, instance=service.settings.instance_id,
            )  # fmt: skip
    except DevicegateError as exc:
        back = f"/console/devices/{segment(device_id)}"
        body = Html(
            tag("h1", "Attribute not saved")
            + tag("p", str(exc), class_="notice", role="alert")
            + tag("p", tag("a", "Back to the device", href=back))
        )
        return page(request, title="Attribute not saved", body=body, status=400)
    raise web.HTTPSeeOther(url(f"/console/devices/{segment(device_id)}", done="attributes"))
