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
from provisioning.console.html import Html, join, page, render, tag, url
from provisioning.console.queries import database_now
from provisioning.errors import RequestInvalid
from provisioning.http.common import SERVICE
from schemas.events import EventType, Outcome, Reason

PAGE_SIZES = (50, 100, 200, 500)
EXPORT_DEFAULT = 10_000
EXPORT_MAX = 100_000


def _int(request: web.Request, name: str, default: int, maximum: int) -> int:
    text = request.query.get(name, "").strip() or str(default)
    if not text.isdigit() or not 1 <= int(text) <= maximum:
        raise RequestInvalid(f"{name} must be an integer between 1 and {maximum}")
    return int(text)


def _options(values: list[str], selected: str | None, any_label: str = "any") -> Html:
    options = [tag("option", any_label, value="")]
    options += [tag("option", v, value=v, selected=v == selected) for v in values]
    return join(options)


def filter_form(request: web.Request, size: int) -> Html:
    q = request.query
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
    )


async def show(request: web.Request) -> web.Response:
    size = _int(request, "limit", 100, max(PAGE_SIZES))
    cursor = request.query.get("cursor") or None
    async with request.app[SERVICE].pool.acquire() as conn:
        selected = filters.parse(request.query, now=await database_now(conn))
        events, next_cursor = await query_events(conn, filters=selected, limit=size, cursor=cursor)
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
        live_src=url("/console/events/live", **kept),
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
