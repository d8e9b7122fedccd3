"""``GET /console/``: admissions over time by reason, top denials, expiring certificates,
and when each writer instance was last heard from."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from aiohttp import web

from provisioning.console import chart, queries, rollup
from provisioning.console.html import Html, join, page, render, segment, tag, url, when
from provisioning.http.common import SERVICE

T = TypeVar("T")

# Day and week strides are whole hours, so they read the hourly rollup (`rollup`).
RANGES: dict[str, tuple[str, timedelta, timedelta]] = {
    "hour": ("last hour", timedelta(hours=1), timedelta(minutes=1)),
    "day": ("last day", timedelta(days=1), timedelta(hours=1)),
    "week": ("last week", timedelta(days=7), timedelta(hours=3)),
}
EXPIRY_WINDOW = timedelta(days=7)
EXPIRY_SHOWN = 10


async def _with_conn(request: web.Request, query: Callable[[Any], Awaitable[T]]) -> T:
    async with request.app[SERVICE].pool.acquire() as conn:
        return await query(conn)


def _ranked(items: list[tuple[str, int]], kind: str, link: Callable[[str], str]) -> Html:
    if not items:
        return tag("p", "None in this window.")
    rows = "".join(
        tag("tr", Html(tag("td", tag("a", value, href=link(value))) + tag("td", n, class_="num")))
        for value, n in items
    )
    head = Html(tag("th", kind, scope="col") + tag("th", "denials", scope="col", class_="num"))
    return Html(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")


def _range_links(current: str) -> Html:
    links = [
        tag("a", label, href=url("/console/", range=key), aria_current="page" if key == current
            else None)
        for key, (label, _, _) in RANGES.items()
    ]  # fmt: skip
    return Html(f'<nav class="ranges" aria-label="Time range">{join(links, " ")}</nav>')


def window(key: str, now: datetime) -> tuple[datetime, datetime, timedelta]:
    """(start, end, stride) of range ``key`` at ``now``: it ends with the current bucket."""
    _, span, stride = RANGES[key]
    end = queries.ORIGIN + ((now - queries.ORIGIN) // stride + 1) * stride
    return end - span, end, stride


async def show(request: web.Request) -> web.Response:
    key = request.query.get("range", "day")
    if key not in RANGES:
        raise web.HTTPBadRequest(text="range must be hour, day or week")
    label = RANGES[key][0]
    now = await _with_conn(request, queries.database_now)
    start, end, stride = window(key, now)
    counted, expiring, heads = await asyncio.gather(
        _with_conn(request, lambda c: rollup.activity(c, start=start, end=end, stride=stride)),
        _with_conn(request, lambda c: queries.expiring_certificates(
            c, within=EXPIRY_WINDOW, limit=EXPIRY_SHOWN)),
        _with_conn(request, queries.chain_heads),
    )  # fmt: skip
    rows = counted.rows
    slots = chart.buckets(start, end, stride)
    data = chart.series(rows, slots)
    allowed_data = [s for s in data if s.name == "allowed"]
    denied_data = [s for s in data if s.name != "allowed"]
    allowed = sum(r.count for r in rows if r.connection and r.outcome == "allowed")
    denied = sum(r.count for r in rows if r.connection and r.outcome == "denied")
    reasons = Counter[str]()
    for row in rows:
        if row.outcome == "denied":
            reasons[row.reason] += row.count
    since = start.isoformat()
    body = render(
        "overview.html",
        ranges=_range_links(key),
        start=start.isoformat(),
        end=end.isoformat(),
        window=f"{label}: {when(start)[:16]} to {when(end)[:16]} UTC",
        allowed=allowed,
        denied=denied,
        events=sum(r.count for r in rows),
        denials=sum(reasons.values()),
        freshness=_freshness(counted.rolled_upto, now),
        chart=chart.svg(slots, stride, allowed_data, name="allowed",
                        label=f"Allowed connections per time bucket, {label}"),
        legend=chart.legend(allowed_data),
        denial_chart=chart.svg(slots, stride, denied_data, name="denials",
                               label=f"Denied connections per time bucket by reason, {label}"),
        denial_legend=chart.legend(denied_data) if denied_data else tag(
            "p", "No connection was denied in this window."),
        chart_table=chart.table(slots, stride, data),
        reasons=_ranked(
            _top(reasons), "reason",
            lambda r: url("/console/events", reason=r, outcome="denied", since=since),
        ),
        devices=_ranked(
            counted.devices, "device",
            lambda d: url(f"/console/devices/{segment(d)}"),
        ),
        peers=_ranked(
            counted.peers, "peer host",
            lambda p: url("/console/events", peer=p, outcome="denied", since=since),
        ),
        expiring=_expiring(*expiring),
        instances=_instances(queries.instances(heads), now),
    )  # fmt: skip
    return page(request, title="Overview", body=body)


def _freshness(rolled_upto: datetime | None, now: datetime) -> Html:
    """How current the counts are: hours before ``rolled_upto`` come from the hourly rollup,
    which misses an event stored late with an older time until it is reconciled."""
    clock = when(now)[11:19]
    if rolled_upto is None:
        return tag("p", f"Counted from the events at {clock} UTC: reload for newer ones.",
                   class_="freshness", id="freshness")  # fmt: skip
    late = int(rollup.RECONCILE.total_seconds() // 60)
    return tag(
        "p", f"Counts up to {when(rolled_upto)[11:16]} UTC come from the hourly rollup, "
        f"the rest from the events at {clock} UTC. An event stored late with an older time "
        f"(a gateway replaying its spool) is counted within about {late} minutes.",
        class_="freshness stale", id="freshness", data_rolled_upto=rolled_upto.isoformat(),
    )  # fmt: skip


def _top(counter: Counter[str], n: int = 10) -> list[tuple[str, int]]:
    """The ``n`` largest, ties by name (stable across reloads)."""
    return sorted(counter.items(), key=lambda item: (-item[1], item[0]))[:n]


def _expiring(total: int, certificates: list[queries.ExpiringCertificate]) -> Html:
    if not certificates:
        return tag("p", "No active certificate expires in the next 7 days.")
    rows = "".join(
        tag("tr", Html(
            tag("td", tag("a", c.device_id, href=f"/console/devices/{segment(c.device_id)}"))
            + tag("td", c.fleet) + tag("td", c.serial, class_="mono")
            + tag("td", when(c.not_after))
        ))
        for c in certificates
    )  # fmt: skip
    head = join(tag("th", name, scope="col") for name in ("device", "fleet", "serial", "expires"))
    more = (
        tag("p", f"{total} in all; the first {len(certificates)} shown.")
        if total > len(certificates)
        else Html("")
    )
    return Html(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>{more}")


def _age(now: datetime, then: datetime) -> str:
    seconds = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _instances(seen: list[queries.InstanceSeen], now: datetime) -> Html:
    if not seen:
        return tag("p", "No events recorded yet.")
    rows = "".join(
        tag("tr", Html(
            tag("td", s.instance) + tag("td", when(s.last_seen)) + tag("td", _age(now, s.last_seen))
            + tag("td", ", ".join(s.chains), class_="mono")
        ))
        for s in seen
    )  # fmt: skip
    head = join(
        tag("th", name, scope="col") for name in ("instance", "last event", "age", "chains")
    )
    return Html(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
