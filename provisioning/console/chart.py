"""The overview chart: admissions per time bucket as stacked SVG bars, drawn on the server.

The SVG is inline markup (no script, no library), with a ``<title>`` per bar for pointer
users; the same numbers are rendered as a table beside it for screen readers and anyone who
cannot tell the colours apart. Series: allowed, then each top denial reason, then the rest.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta

from provisioning.console.html import Html, escape, tag, when
from provisioning.console.queries import ActivityRow

WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 720, 200, 64, 28, 10
MIN_BAR = 1.5
"""A non-zero count is never thinner than this (user units): one denial stays visible."""
SERIES_MAX = 5
OTHER = "other denials"


@dataclass(frozen=True, slots=True)
class Series:
    name: str
    css: str
    counts: tuple[int, ...]


def buckets(start: datetime, end: datetime, stride: timedelta) -> list[datetime]:
    out, moment = [], start
    while moment < end:
        out.append(moment)
        moment += stride
    return out


def series(rows: list[ActivityRow], slots: list[datetime]) -> list[Series]:
    """Allowed, the `SERIES_MAX` commonest denial reasons, and the other denials."""
    index = {moment: i for i, moment in enumerate(slots)}
    admissions = [row for row in rows if row.connection and row.bucket in index]
    denied = Counter[str]()
    for row in admissions:
        if row.outcome == "denied":
            denied[row.reason] += row.count
    top = [reason for reason, _ in denied.most_common(SERIES_MAX)]
    names = ["allowed", *top] + ([OTHER] if len(denied) > len(top) else [])
    counts = {name: [0] * len(slots) for name in names}
    for row in admissions:
        name = row.reason if row.reason in top else OTHER
        if row.outcome == "allowed":
            name = "allowed"
        counts[name][index[row.bucket]] += row.count
    return [
        Series(name, "allowed" if name == "allowed" else f"denied-{i}", tuple(counts[name]))
        for i, name in enumerate(names)
    ]


def ticks(value: int) -> list[int]:
    """Axis ticks from 0 to at least ``value`` in 1, 2 or 5 times a power of ten, about four
    steps: 4 reads 0..4, 2,000 reads 0, 500, .., 2,000."""
    raw = max(value, 1) / 4
    magnitude = 1
    while magnitude * 10 <= raw:
        magnitude *= 10
    step = next(f * magnitude for f in (1, 2, 5, 10) if f * magnitude >= raw)
    top = -(-max(value, 1) // step) * step
    return list(range(0, top + 1, step))


def tick_label(value: int) -> str:
    """Short enough for the axis at phone width: 2,000; 20k; 1.5M."""
    if value < 10_000:
        return f"{value:,}"
    if value < 1_000_000:
        return f"{value / 1000:g}k"
    return f"{value / 1_000_000:g}M"


def svg(
    slots: list[datetime], stride: timedelta, data: list[Series], *, label: str, name: str
) -> Html:
    """Stacked bars, one per bucket, on an axis of its own with labelled ticks and grid
    lines; a title per bar. ``name`` is the chart's id and CSS class."""
    totals = [sum(s.counts[i] for s in data) for i in range(len(slots))]
    marks = ticks(max(totals, default=0))
    top = marks[-1]
    plot_w, plot_h = WIDTH - LEFT - 4, HEIGHT - BOTTOM - TOP
    base = TOP + plot_h
    step = plot_w / max(len(slots), 1)
    parts: list[str] = []
    for mark in marks:
        level = base - plot_h * mark / top
        parts.append(
            f'<line class="{"axis" if mark == 0 else "grid"}" x1="{LEFT}" y1="{level:.1f}" '
            f'x2="{WIDTH - 4}" y2="{level:.1f}"/>'
            f'<text class="tick" x="{LEFT - 6}" y="{level + 4:.1f}" text-anchor="end">'
            f"{tick_label(mark)}</text>"
        )
    for i, moment in enumerate(slots):
        x = LEFT + i * step + step * 0.1
        y: float = base
        title = f"{when(moment)} to {when(moment + stride)}: " + ", ".join(
            f"{s.name} {s.counts[i]}" for s in data if s.counts[i]
        )
        rects = []
        for s in data:
            if s.counts[i] <= 0:
                continue
            height = max(plot_h * s.counts[i] / top, MIN_BAR)
            y -= height
            rects.append(
                f'<rect class="{s.css}" x="{x:.1f}" y="{y:.1f}" width="{step * 0.8:.1f}" '
                f'height="{height:.1f}"/>'
            )
        if rects:
            parts.append(f"<g><title>{escape(title)}</title>{''.join(rects)}</g>")
    if slots:
        parts.append(
            f'<text class="tick" x="{LEFT}" y="{HEIGHT - 8}">{escape(when(slots[0])[:16])}</text>'
        )
        parts.append(
            f'<text class="tick" x="{WIDTH - 4}" y="{HEIGHT - 8}" text-anchor="end">'
            f"{escape(when(slots[-1] + stride)[:16])}</text>"
        )
    return Html(
        f'<svg class="chart {escape(name)}" id="chart-{escape(name)}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(label)}" '
        f'data-top="{top}">{"".join(parts)}</svg>'
    )


def legend(data: list[Series]) -> Html:
    items = "".join(
        tag(
            "li",
            Html(f'<span class="swatch {s.css}" aria-hidden="true"></span>')
            + escape(f"{s.name} ({sum(s.counts)})"),
        )
        for s in data
    )
    return Html(f'<ul class="legend">{items}</ul>')


def table(slots: list[datetime], stride: timedelta, data: list[Series]) -> Html:
    """The chart's numbers, one row per non-empty bucket."""
    head = tag(
        "tr",
        Html(tag("th", "bucket start (UTC)", scope="col"))
        + Html("".join(tag("th", s.name, scope="col") for s in data)),
    )
    body = []
    for i, moment in enumerate(slots):
        if not any(s.counts[i] for s in data):
            continue
        cells = "".join(tag("td", s.counts[i], class_="num") for s in data)
        body.append(tag("tr", Html(tag("th", when(moment)[:16], scope="row") + cells)))
    return Html(
        f"<table><thead>{head}</thead><tbody>{''.join(body) or '<tr><td>no events</td></tr>'}"
        "</tbody></table>"
    )
