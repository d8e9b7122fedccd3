"""Topic names, topic filters, matching and containment: the one topic matcher.

Everything in devicegate that compares a topic with a filter calls this
module (the codec to validate, the policy to authorize), so they cannot
disagree.

Rules (MQTT 3.1.1 and 5.0, section 4.7):

* Names and filters are non-empty, at most 65535 bytes of UTF-8, without
  U+0000 and without surrogates. Levels are separated by ``/`` and may be
  empty.
* In a filter ``#`` is only the last level and alone in it; ``+`` is alone in
  its level. A topic name has no wildcard at all.
* ``#`` also matches the parent level (``sport/#`` matches ``sport``); ``+``
  matches exactly one level, the empty level included.
* A topic whose first character is ``$`` is not matched by a filter whose
  first level is a wildcard (``#``, ``+/...``); ``$SYS/#`` matches it.
* ``$share/<group>/<filter>`` is an ordinary filter here (its first level is
  the literal ``$share``). Call ``parse_shared`` first to get the filter that
  the broker will actually match, and authorize that.

``matches`` and ``filter_contains`` trust their arguments to be valid (the
codec validated the topic, the policy validated its filters when it loaded);
they never raise, but on invalid input their answer means nothing.
"""

from __future__ import annotations

from typing import Final

from gateway.mqtt.errors import InvalidTopic

__all__ = [
    "InvalidTopic",
    "filter_contains",
    "filters_intersect",
    "matches",
    "parse_shared",
    "validate_topic_filter",
    "validate_topic_name",
]

MAX_TOPIC_BYTES: Final = 65535
_SHARE_PREFIX: Final = "$share/"


def _validate_common(s: str, what: str) -> None:
    if not s:
        raise InvalidTopic(f"{what} is empty")
    if "\x00" in s:
        raise InvalidTopic(f"{what} contains U+0000")
    if len(s) > MAX_TOPIC_BYTES // 4:  # short strings cannot be too long in UTF-8
        try:
            size = len(s.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidTopic(f"{what} is not valid Unicode (surrogate)") from None
        if size > MAX_TOPIC_BYTES:
            raise InvalidTopic(f"{what} is longer than {MAX_TOPIC_BYTES} bytes")
    elif not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidTopic(f"{what} is not valid Unicode (surrogate)") from None


def validate_topic_name(name: str) -> None:
    """Check a topic name (what a PUBLISH is sent to).

    Raises:
        InvalidTopic: The name is empty, too long, has U+0000, a surrogate
            or a wildcard character.
    """
    _validate_common(name, "topic name")
    if "+" in name or "#" in name:
        raise InvalidTopic(f"topic name {name!r} contains a wildcard")


def validate_topic_filter(topic_filter: str) -> None:
    """Check a topic filter (what a SUBSCRIBE asks for).

    Raises:
        InvalidTopic: The filter is empty, too long, has U+0000, a surrogate,
            a ``#`` that is not alone in the last level, or a ``+`` that is
            not alone in its level.
    """
    _validate_common(topic_filter, "topic filter")
    if "+" not in topic_filter and "#" not in topic_filter:
        return
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != last):
            raise InvalidTopic(f"'#' must be alone in the last level: {topic_filter!r}")
        if "+" in level and level != "+":
            raise InvalidTopic(f"'+' must be alone in its level: {topic_filter!r}")


def matches(topic_filter: str, topic: str) -> bool:
    """Whether a valid filter matches a valid topic name."""
    if "+" not in topic_filter and "#" not in topic_filter:
        return topic_filter == topic
    f_levels = topic_filter.split("/")
    if topic[:1] == "$" and f_levels[0] in ("+", "#"):
        return False
    t_levels = topic.split("/")
    n = len(t_levels)
    for i, level in enumerate(f_levels):
        if level == "#":
            return True  # covers the parent level too: i == n
        if i >= n or (level != "+" and level != t_levels[i]):
            return False
    return len(f_levels) == n


def filter_contains(outer: str, inner: str) -> bool:
    """Whether every topic that ``inner`` matches is also matched by ``outer``.

    Both must be valid filters. This is exact, not an approximation: it is
    false exactly when some valid topic name is matched by ``inner`` and not
    by ``outer``. So ``devices/d1/#`` contains ``devices/d1/+``,
    ``devices/d1/#`` and ``devices/d1`` but not ``devices/+/x``; ``#`` and
    ``+/#`` contain each other (no topic has zero levels), and so do ``/#``
    and ``/+/#`` (the empty string is no topic); no filter that starts with a
    wildcard contains one whose first level starts with ``$``.
    """
    o_levels = outer.split("/")
    i_levels = inner.split("/")
    if i_levels[0][:1] == "$" and o_levels[0] in ("+", "#"):
        return False
    n_outer = len(o_levels)
    n_inner = len(i_levels)
    for i in range(max(n_outer, n_inner)):
        if i >= n_outer:
            return False  # inner goes deeper than outer can
        o = o_levels[i]
        if o == "#":
            return True  # inner's topics all have at least i levels, the first i covered
        if i >= n_inner:
            return False  # inner stops at level i, outer needs one more level
        n = i_levels[i]
        if n == "#":
            # inner matches its parent (the first i levels) and everything below.
            # Without a '#' here, outer can only cover that as ".../+/#", and only
            # when that parent is no valid topic: zero levels, or the empty string.
            parent_is_empty = i == 0 or (i == 1 and not i_levels[0])
            return parent_is_empty and o == "+" and n_outer == i + 2 and o_levels[-1] == "#"
        if o == "+":
            continue
        if n == "+" or n != o:
            return False
    return True


def filters_intersect(a: str, b: str) -> bool:
    """Whether some valid topic name is matched by both valid filters ``a`` and ``b``.

    Exact, like `filter_contains`: ``devices/+/x`` and ``devices/d1/#`` intersect
    (``devices/d1/x``); ``#`` and ``$SYS/#`` do not (a filter starting with a wildcard never
    matches a ``$`` topic); ``/#`` and ``+`` do not (their one common topic would be the
    empty string).
    """
    a_levels = a.split("/")
    b_levels = b.split("/")
    a0, b0 = a_levels[0], b_levels[0]
    if (a0[:1] == "$" and b0 in ("+", "#")) or (b0[:1] == "$" and a0 in ("+", "#")):
        return False
    n_a = len(a_levels)
    n_b = len(b_levels)
    for i in range(max(n_a, n_b)):
        x = a_levels[i] if i < n_a else None
        y = b_levels[i] if i < n_b else None
        if x == "#" or y == "#":
            # The rest is free, or (the other filter ended here) the parent level: a topic
            # of i levels, invalid only when it is the empty string.
            ended = x is None or y is None
            return not (ended and i == 1 and (a0 == "" or b0 == ""))
        if x is None or y is None:
            return False
        if x != "+" and y != "+" and x != y:
            return False
    return True


def parse_shared(topic_filter: str) -> tuple[str | None, str]:
    """Split a shared subscription ``$share/<group>/<filter>``; validate the result.

    Returns:
        ``(group, filter)`` for a shared subscription, ``(None, topic_filter)``
        otherwise. The returned filter is valid.

    Raises:
        InvalidTopic: The filter (or, for a shared subscription, the group or
            the inner filter) is invalid.
    """
    if not topic_filter.startswith(_SHARE_PREFIX):
        validate_topic_filter(topic_filter)
        return None, topic_filter
    group, sep, inner = topic_filter[len(_SHARE_PREFIX) :].partition("/")
    if not sep:
        raise InvalidTopic(f"shared subscription without a filter: {topic_filter!r}")
    if not group or "+" in group or "#" in group:
        raise InvalidTopic(f"invalid share name in {topic_filter!r}")
    validate_topic_filter(topic_filter)  # the whole thing: length, U+0000, surrogates
    validate_topic_filter(inner)
    return group, inner
