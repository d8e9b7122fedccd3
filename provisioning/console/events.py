"""``GET /console/events``: the event log with the CLI's filters, cursor pages, export.

Export (``/console/events/export.csv|json``) writes exactly what ``devicegate audit
--format csv|json --limit N`` prints for the same filters: the newest ``limit`` matching
events, oldest first, through the same formatting code (`provisioning.audit.format`).
"""

from __future__ import annotations

from aiohttp import web

from provisioning.audit.format import csv_header, csv_line, json_line
from provisioning.audit.query import MAX_LIMIT, query_events
from provisioning.console import filters, tables
from provisioning.console.filters import FilterInvalid
from provisioning.console.html import Html, join, page, render, tag, url
from provisioning.console.queries import database_now
from provisioning.errors import RequestInvalid
from provisioning.http.common import SERVICE
from schemas.events import EventType, Outcome, Reason

PAGE_SIZES = (50, 100, 200, 500)
EXPORT_DEFAULT = 10_000
EXPORT_MAX = 100_000


FIELDS = (*filters.NAMES, "limit")


def _int(request: web.Request, name: str, default: int, maximum: int) -> int:
    text = request.query.get(name, "").strip() or str(default)
    if not text.isdigit() or not 1 <= int(text) <= maximum:
        raise FilterInvalid(name, f"{name} must be an integer between 1 and {maximum}")
    return int(text)


def _options(values: list[str], selected: str | None, any_label: str = "any") -> Html:
    """The choices; a value the user typed that is not one of them stays selected, so a bad
    link shows what it asked for beside the error."""
    options = [tag("option", any_label, value="")]
    if selected and selected not in values:
        options.append(tag("option", selected, value=selected, selected=True))
    options += [tag("option", v, value=v, selected=v == selected) for v in values]
    return join(options)


def _errors(error: FilterInvalid | None) -> dict[str, Html]:
    """Per field: ``<name>_invalid`` (aria attributes) and ``<name>_error`` (the message)."""
    out: dict[str, Html] = {}
    for name in FIELDS:
        bad = error is not None and error.field == name
        # since and until name their error id in the template (beside the time hint)
        described = "" if name in ("since", "until") else f' aria-describedby="e-{name}"'
        out[f"{name}_invalid"] = Html(f' aria-invalid="true"{described}' if bad else "")
        out[f"{name}_error"] = (
            tag("p", str(error), class_="field-error", id=f"e-{name}") if bad else Html("")
        )
    return out


def filter_form(request: web.Request, size: int, error: FilterInvalid | None = None) -> Html:
    q = request.query
    active = filters.echo(q)
    return render(
        "filters.html",
        device=q.get("device", ""),
        peer=q.get("peer", ""),
        since=q.get("since", ""),
        until=q.get("until", ""),
        types=_options([t.value for t in EventType], q.get("type")),
        outcomes=_options([o.value for o in Outcome], q.get("outcome")),
        reasons=_options(sorted(r.value for r in Reason), q.get("reason")),
        sizes=join(tag("option", n, value=n, selected=n == size) for n in PAGE_SIZES),
        active=", ".join(f"{k} {v}" for k, v in active.items()) or "none",
        form_error=tag("p", f"These filters were not applied: {error}", class_="error",
                       role="alert", id="filter-error") if error else "",
        **_errors(error),
    )  # fmt: skip


def _invalid(request: web.Request, error: FilterInvalid) -> web.Response:
    """The events page with the form as the user filled it and the error beside the field."""
    size = request.query.get("limit", "").strip()
    body = render(
        "events.html", form=filter_form(request, int(size) if size.isdigit() else 100, error),
        export="", live="", count="No events shown: the filters are not valid.",
        table="", pager="",
    )  # fmt: skip
    return page(request, title="Events", body=body, status=400)


async def show(request: web.Request) -> web.Response:
    try:
        return await _show(request)
    except FilterInvalid as exc:
        return _invalid(request, exc)


async def _show(request: web.Request) -> web.Response:
    size = _int(request, "limit", 100, max(PAGE_SIZES))
    cursor = request.query.get("cursor") or None
    async with request.app[SERVICE].pool.acquire() as conn:
        selected = filters.parse(request.query, now=await database_now(conn))
        try:
            events, next_cursor = await query_events(
                conn, filters=selected, limit=size, cursor=cursor
            )
        except RequestInvalid as exc:  # the only request input left: the cursor
            raise FilterInvalid("cursor", f"{exc}: start again from the newest events") from None
    kept = filters.echo(request.query)
    pager = []
    if cursor:
        pager.append(tag("a", "Newest events", href=url("/console/events", **kept, limit=size)))
    if next_cursor:
        pager.append(
            tag(
                "a",
                "Older events",
                rel="next",
                href=url("/console/events", **kept, limit=size, cursor=next_cursor),
            )
        )
    body = render(
        "events.html",
        form=filter_form(request, size),
        export=render(
            "export.html",
            hidden=join(tag("input", type="hidden", name=k, value=v) for k, v in kept.items()),
            limit=EXPORT_DEFAULT, max=EXPORT_MAX,
        ),
        live=render("live.html", live_src=url("/console/events/live", **kept)),
        count=f"{len(events)} event{'s' if len(events) != 1 else ''} on this page, newest first",
        table=tables.table(events),
        pager=Html(f'<nav class="pager" aria-label="Pages">{join(pager, " ")}</nav>'),
    )  # fmt: skip
    return page(request, title="Events", body=body)


async def export(request: web.Request) -> web.StreamResponse:
    """The newest ``limit`` matching events, oldest first, as csv or json lines."""
    fmt = request.match_info["format"]
    limit = _int(request, "limit", EXPORT_DEFAULT, EXPORT_MAX)
    pages: list[str] = []
    async with request.app[SERVICE].pool.acquire() as conn:
        selected = filters.parse(request.query, now=await database_now(conn))
        cursor: str | None = None
        left = limit
        while left > 0:
            events, cursor = await query_events(
                conn, filters=selected, limit=min(left, MAX_LIMIT), cursor=cursor
            )
            line = csv_line if fmt == "csv" else json_line
            pages.append("".join(line(event) for event in reversed(events)))
            left -= len(events)
            if cursor is None:
                break
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8" if fmt == "csv"
            else "application/x-ndjson; charset=utf-8",
            "Content-Disposition": f'attachment; filename="devicegate-events.{fmt}"',
        }
    )  # fmt: skip
    await response.prepare(request)
    if fmt == "csv":
        await response.write(csv_header().encode())
    for chunk in reversed(pages):
        await response.write(chunk.encode())
    await response.write_eof()
    return response
