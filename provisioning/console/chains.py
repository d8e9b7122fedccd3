"""``/console/chains``: the hash-chain verification (`audit.verify.verify_chains`) per chain.

Verifying rehashes every event in the window, which takes seconds per million events, so a
run is started by a POST (CSRF-checked), runs off the event loop (`state.ChainRuns`), and
the page shows the last run's report; the page waits a moment for a run under way, then
refreshes itself while it is not done. Reports are per provisioning process.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta

from aiohttp import web

from provisioning.audit.verify import Finding
from provisioning.console import csrf, queries, sessions
from provisioning.console.html import Html, join, page, render, tag, url, when
from provisioning.console.state import CHAINS, ChainRun
from provisioning.http.common import SERVICE

WINDOWS: dict[str, tuple[str, timedelta | None]] = {
    "day": ("events of the last day", timedelta(days=1)),
    "week": ("events of the last week", timedelta(days=7)),
    "all": ("every event", None),
}
SETTLE = 2.0
"""How long the page waits for a run under way before it shows 'running'."""
FINDINGS_PER_CHAIN = 20


def _finding_rows(findings: list[Finding]) -> Html:
    head = join(tag("th", n, scope="col") for n in ("problem", "seq", "event", "what"))
    rows = join(
        tag("tr", join([
            tag("td", tag("strong", f.kind.upper().replace("_", " "))),
            tag("td", f.seq if f.last_seq is None or f.kind != "gap" else f"{f.seq}..{f.last_seq}",
                class_="num"),
            tag("td", f.event_id or "", class_="mono"),
            tag("td", f.message),
        ]))
        for f in findings[:FINDINGS_PER_CHAIN]
    )  # fmt: skip
    more = (
        tag("p", f"{len(findings) - FINDINGS_PER_CHAIN} more not shown; "
            "run devicegate audit verify --json for all.")
        if len(findings) > FINDINGS_PER_CHAIN else Html("")
    )  # fmt: skip
    return Html(
        f'<div class="scroll"><table class="findings"><thead><tr>{head}</tr></thead>'
        f"<tbody>{rows}</tbody></table></div>{more}"
    )


def _report(run: ChainRun, heads: list[queries.ChainHead]) -> Html:
    window = "every event" if run.since is None else f"events since {when(run.since)}"
    if run.error is not None:
        return tag("p", f"The verification of {window} failed: {run.error}", class_="error",
                   role="alert")  # fmt: skip
    if run.report is None:
        return tag("p", f"Verifying {window}, started {when(run.started_at)} by "
                   f"{run.started_by}... this page refreshes itself.", role="status")  # fmt: skip
    report = run.report
    by_chain: dict[str, list[Finding]] = defaultdict(list)
    for finding in report.findings:
        by_chain[finding.chain_id].append(finding)
    verdict = "OK: no gap, edit, reordering or broken link" if report.ok else (
        f"{report.findings_total} problem(s) found")  # fmt: skip
    summary = tag(
        "p", f"{verdict}. {report.events} events in {report.chains} chains verified ({window}), "
        f"started {when(run.started_at)} by {run.started_by}, took {run.seconds or 0:.1f} s.",
        class_="ok" if report.ok else "error", id="verify-summary",
    )  # fmt: skip
    head = join(tag("th", n, scope="col") for n in (
        "chain", "instance", "last seq", "last event", "result"))  # fmt: skip
    names = sorted({h.chain_id for h in heads} | set(by_chain))
    known = {h.chain_id: h for h in heads}
    rows = []
    for name in names:
        found = by_chain.get(name, [])
        h = known.get(name)
        result = tag("span", f"BROKEN: {len(found)} problem(s)" if found else "OK",
                     class_="status revoked" if found else "status active")  # fmt: skip
        rows.append(tag("tr", join([
            tag("th", name, scope="row", class_="mono"), tag("td", h.instance if h else ""),
            tag("td", h.seq if h else "", class_="num"), tag("td", when(h.time) if h else ""),
            tag("td", result),
        ]), data_chain=name))  # fmt: skip
    details = join(
        tag("section", tag("h3", f"Chain {name}") + _finding_rows(by_chain[name]),
            class_="chain-findings")
        for name in names if by_chain.get(name)
    )  # fmt: skip
    return Html(
        summary
        + Html(
            f'<div class="scroll"><table id="chains"><thead><tr>{head}</tr>'
            f"</thead><tbody>{join(rows)}</tbody></table></div>"
        )
        + details
    )


async def show(request: web.Request) -> web.Response:
    runs = request.app[CHAINS]
    session = sessions.require(request)
    await runs.settle(SETTLE)
    async with request.app[SERVICE].pool.acquire() as conn:
        heads = await queries.chain_heads(conn)
    run = runs.last
    content = _report(run, heads) if run else tag(
        "p", "No verification has run in this process yet.")  # fmt: skip
    options = join(tag("option", label, value=key, selected=key == "day")
                   for key, (label, _) in WINDOWS.items())  # fmt: skip
    body = render("chains.html", content=content, csrf=session.csrf_token, windows=options,
                  disabled=Html(" disabled") if runs.running else "")  # fmt: skip
    return page(request, title="Chain integrity", body=body,
                refresh=3 if runs.running else None)  # fmt: skip


async def verify(request: web.Request) -> web.Response:
    """``POST /console/chains/verify``: start a run over the chosen window."""
    session = sessions.require(request)
    form = await request.post()
    csrf.check(request, form, session.csrf_token)
    window = form.get("window", "day")
    if not isinstance(window, str) or window not in WINDOWS:
        raise web.HTTPBadRequest(text="window must be day, week or all")
    span = WINDOWS[window][1]
    now = datetime.now(UTC)
    request.app[CHAINS].start(since=now - span if span else None, now=now, actor=session.actor)
    raise web.HTTPSeeOther(url("/console/chains"))
