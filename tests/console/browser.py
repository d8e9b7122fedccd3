"""Headless Chromium through Playwright, with Debian's browser (no Playwright download).

Skips with a clear message when the ``playwright`` package or ``/usr/bin/chromium`` is
missing. Install: ``apt-get install -y chromium`` and ``pip install playwright`` (never
``playwright install``: the browser comes from Debian).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("DEVICEGATE_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


def skip_reason() -> str | None:
    """Why browser tests cannot run here, or ``None``."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "browser tests need the playwright package (pip install playwright)"
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        return f"browser tests need Chromium at {CHROMIUM} (apt-get install -y chromium)"
    return None


def update_screenshots() -> bool:
    """Screenshots are written only when asked, so a test run leaves the tree clean."""
    return os.environ.get("DEVICEGATE_UPDATE_SCREENSHOTS") == "1"


requires_browser = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")
