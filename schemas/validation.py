"""Pydantic's validation errors as sentences an operator can act on.

Pydantic's own ``str(ValidationError)`` is a multi-line dump ending in a documentation
link, and a pattern in it (``^[a-z0-9][a-z0-9-]{0,62}$``) is eaten by terminal markup.
Every place a user sees a validation error (settings, the policy file, CLI options, HTTP
request bodies) says it with `sentence` instead: what is wrong, in words.
"""

from __future__ import annotations

from typing import Final

from pydantic_core import ErrorDetails

__all__ = ["FLEET_PATTERN", "FLEET_RULE", "PATTERN_WORDS", "location", "sentence"]

FLEET_PATTERN: Final = r"^[a-z0-9][a-z0-9-]{0,62}$"
FLEET_RULE: Final = (
    "lower-case letters, digits and '-', starting with a letter or digit, at most 63 characters"
)

PATTERN_WORDS: Final[dict[str, str]] = {FLEET_PATTERN: FLEET_RULE}
"""Each pattern a model uses, said in words (a regular expression is no explanation)."""

_TYPES: Final = {
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "dict_type": "must be a table of keys and values",
    "extra_forbidden": "is not a known key",
    "float_parsing": "must be a number",
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "list_type": "must be a list",
    "missing": "is required",
    "model_type": "must be a table of keys and values",
    "string_type": "must be text",
    "tuple_type": "must be a list",
}


def location(error: ErrorDetails) -> str:
    """``fleets.lab.publish[0]``: where in the document the error is."""
    out = ""
    for part in error["loc"]:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def sentence(error: ErrorDetails) -> str:
    """What is wrong with the value, in words, without a link or a regular expression."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern", ""))
        return f"must be {PATTERN_WORDS.get(pattern, 'in the documented form')}"
    if kind in _TYPES:
        return _TYPES[kind]
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        words = {
            "greater_than_equal": "at least",
            "greater_than": "more than",
            "less_than_equal": "at most",
            "less_than": "less than",
        }[kind]
        bound = next(iter(ctx.values()), "?")
        return f"must be {words} {bound}"
    if kind in ("string_too_short", "string_too_long"):
        if kind == "string_too_short":
            return f"must be at least {ctx.get('min_length')} characters long"
        return f"must be at most {ctx.get('max_length')} characters long"
    if kind in ("literal_error", "enum"):
        return f"must be one of {ctx.get('expected')}"
    # A validator's own message is already a sentence ("must start with postgresql://").
    return str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
