"""HTML output: escaping by default, and page templates read from ``templates/``.

Invariants:
- Every value reaches the page through `escape`, unless it is `Html`: markup built here from
  escaped parts. So an event field can only ever render as text.
- Templates are `string.Template` files; `render` escapes each substituted value that is not
  `Html`, so forgetting to escape is not possible by construction.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from string import Template
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web

from provisioning.console.sessions import current_session

BANNER = web.RequestKey("console_banner", str)
"""Request key of the markup shown above every page's content (the broken-chain banner, set
by the session gate from `integrity.ChainWatch`)."""


class Html(str):
    """Markup that is already safe: built from escaped parts or constant text.

    ``Html + x`` and ``x + Html`` escape ``x`` unless it is `Html` too, and stay `Html`.
    """

    __slots__ = ()

    def __add__(self, other: str) -> Html:
        return Html(str.__add__(self, escape(other)))

    def __radd__(self, other: str) -> Html:
        return Html(str.__add__(escape(other), self))


def escape(value: Any) -> Html:
    """``value`` as HTML text (``None`` as an empty string); `Html` passes unchanged."""
    if isinstance(value, Html):
        return value
    if value is None:
        return Html("")
    if isinstance(value, datetime):
        return Html(html.escape(when(value)))
    return Html(html.escape(str(value), quote=True))


def join(parts: Iterable[Any], separator: str = "") -> Html:
    """Escaped parts joined (the separator is taken as markup)."""
    return Html(separator.join(escape(part) for part in parts))


def tag(name: str, content: Any = "", /, **attributes: Any) -> Html:
    """``<name attr="...">content</name>``; ``class_`` becomes ``class``; ``None`` and ``False``
    attributes are left out, ``True`` ones written bare."""
    attrs = ""
    for key, value in attributes.items():
        if value is None or value is False:
            continue
        key = key.rstrip("_").replace("_", "-")
        attrs += f" {key}" if value is True else f' {key}="{escape(value)}"'
    return Html(f"<{name}{attrs}>{escape(content)}</{name}>")


def when(value: datetime | None) -> str:
    """A time as ``YYYY-MM-DD HH:MM:SS.mmmZ`` in UTC."""
    if value is None:
        return ""
    moment = value.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def url(path: str, **query: Any) -> str:
    """A console URL; query values that are ``None`` or empty are left out."""
    params = {key: str(value) for key, value in query.items() if value not in (None, "")}
    return path + ("?" + urlencode(params) if params else "")


def segment(value: str) -> str:
    """One URL path segment (device ids may hold any character)."""
    return quote(value, safe="")


@cache
def _template(name: str) -> Template:
    text = (resources.files("provisioning.console") / "templates" / name).read_text("utf-8")
    return Template(text)


def render(name: str, **values: Any) -> Html:
    """Template ``name`` with every value escaped unless it is `Html`."""
    return Html(_template(name).substitute({key: escape(v) for key, v in values.items()}))


def page(
    request: web.Request,
    *,
    title: str,
    body: Html,
    status: int = 200,
    nav: bool = True,
    refresh: int | None = None,
) -> web.Response:
    """A whole page in the layout (navigation and logout only when logged in)."""
    session = current_session(request)
    navigation = Html("")
    if nav and session is not None:
        navigation = render("nav.html", actor=session.actor, csrf=session.csrf_token)
    text = render(
        "layout.html",
        title=title,
        navigation=navigation,
        banner=request.get(BANNER, "") if nav else "",
        body=body,
        refresh=Html(f'<meta http-equiv="refresh" content="{int(refresh)}">') if refresh else "",
    )
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")
