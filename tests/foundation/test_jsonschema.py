from __future__ import annotations

from schemas.jsonschema import MODELS, OUTPUT_DIR, render


def test_committed_json_schemas_are_current() -> None:
    rendered = render()
    assert len(rendered) == len(MODELS)
    committed = {path.name: path.read_text() for path in OUTPUT_DIR.glob("*.schema.json")}
    stale = sorted(name for name in rendered if committed.get(name) != rendered[name])
    extra = sorted(set(committed) - set(rendered))
    assert not stale and not extra, (
        f"stale: {stale}, extra: {extra}; run `make schemas` (python -m schemas.jsonschema)"
    )
