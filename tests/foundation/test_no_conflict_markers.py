"""No merge conflict markers in the tracked tree (a Markdown file is not linted, and one
slipped into docs/security-model.md once)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(rb"^(<{7} |>{7} |={7}$)", re.MULTILINE)


def tracked_text_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    return [ROOT / name.decode() for name in names if name and not name.endswith(b".png")]


def test_no_conflict_markers() -> None:
    files = tracked_text_files()
    assert files, "git ls-files found nothing: not a checkout?"
    marked = [
        str(path.relative_to(ROOT))
        for path in files
        if path.is_file() and MARKER.search(path.read_bytes())
    ]
    assert marked == []


def test_the_check_sees_a_marker(tmp_path: Path) -> None:
    planted = b"text\n<<<<<<< HEAD\nours\n=======\ntheirs\n>>>>>>> branch\n"
    assert MARKER.search(planted)
    assert not MARKER.search(b"A heading\n======\n")  # a Markdown underline is not one
