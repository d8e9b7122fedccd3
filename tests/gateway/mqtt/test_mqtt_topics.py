"""Topic names, filters, matching and containment (MQTT 3.1.1 and 5.0 section 4.7)."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.mqtt.topics import (
    InvalidTopic,
    filter_contains,
    matches,
    parse_shared,
    validate_topic_filter,
    validate_topic_name,
)

from .strategies import topic_filters, topic_names

# --- validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "sport/tennis/player1",
        "/finance",  # 4.7.3: distinct from "finance"
        "finance",
        "/",  # 4.7.3: valid, two empty levels
        "Accounts payable",  # spaces allowed
        "ACCOUNTS",
        "$SYS/broker/uptime",
        "a//b",
        "é/\U0001f600",
        "x" * 65535,
        "é" * 32767,  # 65534 bytes
    ],
)
def test_valid_topic_names(name: str) -> None:
    validate_topic_name(name)
    validate_topic_filter(name)  # every name is also a filter


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a/+",
        "+",
        "#",
        "a/#",
        "sport+",
        "a#",
        "a\x00b",
        "x" * 65536,
        "é" * 32768,  # 65536 bytes
        "a\ud800",  # lone surrogate
    ],
)
def test_invalid_topic_names(name: str) -> None:
    with pytest.raises(InvalidTopic):
        validate_topic_name(name)


@pytest.mark.parametrize(
    "topic_filter",
    [
        # 4.7.1.2 and 4.7.1.3
        "sport/tennis/player1/#",
        "sport/#",
        "#",
        "sport/tennis/#",
        "+",
        "+/tennis/#",
        "sport/+/player1",
        "+/+",
        "/+",
        "$SYS/#",
        "$SYS/monitor/+",
        "$share/group/a/#",
        "a//+/",
    ],
)
def test_valid_topic_filters(topic_filter: str) -> None:
    validate_topic_filter(topic_filter)


@pytest.mark.parametrize(
    "topic_filter",
    [
        "",
        "sport/tennis#",  # 4.7.1.2
        "sport/tennis/#/ranking",  # 4.7.1.2
        "sport+",  # 4.7.1.3
        "##",
        "#/",
        "++",
        "a/+b",
        "+a/b",
        "a\x00",
        "#" + "/a" * 40000,
        "a\udfff/#",
    ],
)
def test_invalid_topic_filters(topic_filter: str) -> None:
    with pytest.raises(InvalidTopic):
        validate_topic_filter(topic_filter)


def test_invalid_topic_is_a_value_error() -> None:
    assert issubclass(InvalidTopic, ValueError)


# --- matching -------------------------------------------------------------------

SPEC_MATCHES = [
    # 4.7.1.2 multi-level wildcard
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("#", "sport/tennis", True),
    ("#", "/", True),
    # 4.7.1.3 single-level wildcard
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+/+", "/", True),
    ("/+", "/", True),
    ("+", "/", False),
    ("+", "finance", True),
    ("sport/+/player1", "sport/tennis/player1", True),
    ("sport/+/player1", "sport//player1", True),
    ("+/tennis/#", "sport/tennis", True),
    ("+/tennis/#", "sport/tennis/x/y", True),
    ("+/tennis/#", "sport/golf", False),
    # 4.7.2 topics beginning with $
    ("#", "$SYS/monitor/Clients", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("#", "$SYS", False),
    ("+", "$SYS", False),
    ("+/#", "$SYS/x", False),
    ("$SYS", "$SYS", True),
    ("a/#", "a/$SYS", True),  # only the first character of the topic counts
    ("+/+", "a/$x", True),
    # 4.7.3 topic semantics
    ("ACCOUNTS", "Accounts", False),
    ("finance", "/finance", False),
    ("/finance", "/finance", True),
    ("Accounts payable", "Accounts payable", True),
    # plain equality and levels
    ("a/b", "a/b", True),
    ("a/b", "a/b/", False),
    ("a/b/#", "a/b/", True),
    ("a/+/c", "a/b/c/d", False),
    ("a/+/+", "a/b", False),
    ("a//#", "a/", True),  # the parent level "a/"
    ("a//#", "a//", True),
    ("$share/g/a", "a", False),  # not parsed here: a literal filter
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), SPEC_MATCHES)
def test_matches_spec_examples(topic_filter: str, topic: str, expected: bool) -> None:
    validate_topic_filter(topic_filter)
    validate_topic_name(topic)
    assert matches(topic_filter, topic) is expected


def reference_matches(topic_filter: str, topic: str) -> bool:
    """An independent matcher: the filter as a regular expression."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    levels = topic_filter.split("/")
    pattern = ""
    for i, level in enumerate(levels):
        sep = "/" if i else ""
        if level == "#":
            # "a/#" matches "a" and "a/...": the separator is optional.
            pattern += f"(?:{sep}.*)?" if i else ".*"
        elif level == "+":
            pattern += sep + "[^/]*"
        else:
            pattern += sep + re.escape(level)
    return re.fullmatch(pattern, topic, re.DOTALL) is not None


@settings(max_examples=200, deadline=None)
@given(topic_filter=topic_filters(), topic=topic_names)
def test_matches_agrees_with_a_regex_reference(topic_filter: str, topic: str) -> None:
    assert matches(topic_filter, topic) == reference_matches(topic_filter, topic)


@settings(max_examples=100, deadline=None)
@given(topic=topic_names)
def test_a_name_matches_itself_and_hash_matches_all_but_dollar(topic: str) -> None:
    assert matches(topic, topic)
    assert matches("#", topic) is (not topic.startswith("$"))


# --- containment ------------------------------------------------------------------

CONTAINS = [
    ("devices/d1/#", "devices/d1/+", True),
    ("devices/d1/#", "devices/d1/#", True),
    ("devices/d1/#", "devices/d1", True),
    ("devices/d1/#", "devices/d1/a/+/b/#", True),
    ("devices/d1/#", "devices/+/x", False),
    ("devices/d1/#", "devices/#", False),
    ("devices/d1/#", "devices/d2/x", False),
    ("devices/d1/#", "devices", False),
    ("devices/d1/#", "#", False),
    ("devices/d1/+", "devices/d1/#", False),  # '#' also matches devices/d1 and deeper
    ("devices/d1/+", "devices/d1/x", True),
    ("devices/d1/+", "devices/d1/+", True),
    ("devices/d1/+", "devices/d1/x/y", False),
    ("devices/+/x", "devices/d1/x", True),
    ("devices/+/x", "devices/+/x", True),
    ("devices/+/x", "devices/d1/+", False),
    ("a/b", "a/b", True),
    ("a/b", "a/+", False),
    ("a/+/#", "a/#", False),  # a/# matches "a"
    ("a/+/#", "a/b/#", True),
    ("a/+/#", "a/b", True),
    ("a/#", "a/+/#", True),
    # '#' contains everything but the $ topics
    ("#", "a", True),
    ("#", "+", True),
    ("#", "+/#", True),
    ("#", "/", True),
    ("#", "$SYS/x", False),
    ("#", "$SYS/#", False),
    ("#", "$share/g/x", False),
    ("+/#", "#", True),  # no topic has zero levels, so these are equal
    ("#", "+/#", True),
    ("+/+/#", "#", False),
    ("/+/#", "/#", True),  # "/#" would match "" as its parent, but "" is no topic
    ("+/+/#", "/#", True),
    ("/#", "/+/#", True),
    ("+", "$SYS", False),
    ("+/x", "$SYS/x", False),
    ("+/x", "+/x", True),
    ("+/x", "a/x", True),
    ("$SYS/#", "$SYS/x", True),
    ("$SYS/#", "$SYS/+/y", True),
    ("$SYS/#", "$SYS", True),
    ("$SYS/+", "$SYS/x", True),
    ("$SYS/#", "#", False),
    ("$SYS/#", "+/x", False),
    ("fleets/f1/#", "$share/g/fleets/f1/x", False),  # parse_shared first
]


@pytest.mark.parametrize(("outer", "inner", "expected"), CONTAINS)
def test_filter_contains_cases(outer: str, inner: str, expected: bool) -> None:
    validate_topic_filter(outer)
    validate_topic_filter(inner)
    assert filter_contains(outer, inner) is expected


def _brute_force_universe() -> tuple[list[str], list[str]]:
    """Small filters and every topic deep enough to tell them apart."""
    filter_levels = ["a", "$x", "", "+"]
    filters = ["#"]
    for depth in (1, 2, 3):
        for levels in itertools.product(filter_levels, repeat=depth):
            base = "/".join(levels)
            filters += [base, base + "/#"]
    filters = [f for f in filters if f]  # "" is not a filter
    topic_levels = ["a", "$x", "", "z"]
    topics = [
        "/".join(levels)
        for depth in range(1, 6)
        for levels in itertools.product(topic_levels, repeat=depth)
    ]
    topics = [t for t in topics if t]
    return filters, topics


def test_filter_contains_is_exact_on_a_small_universe() -> None:
    """filter_contains(o, i) iff every topic that i matches, o matches (brute force).

    The topics go one level deeper than the deepest filter and include a
    level ("z") that no filter names, so a missing topic always shows up.
    """
    filters, topics = _brute_force_universe()
    matched = {}
    for f in filters:
        validate_topic_filter(f)
        bits = 0
        for i, t in enumerate(topics):
            if matches(f, t):
                bits |= 1 << i
        matched[f] = bits
    wrong = [
        (outer, inner)
        for outer in filters
        for inner in filters
        if filter_contains(outer, inner) != (matched[inner] & ~matched[outer] == 0)
    ]
    assert wrong == []


@settings(max_examples=200, deadline=None)
@given(outer=topic_filters(), inner=topic_filters(), topic=topic_names)
def test_containment_implies_matching(outer: str, inner: str, topic: str) -> None:
    if filter_contains(outer, inner) and matches(inner, topic):
        assert matches(outer, topic)


@settings(max_examples=100, deadline=None)
@given(f=topic_filters())
def test_containment_is_reflexive(f: str) -> None:
    assert filter_contains(f, f)


# --- shared subscriptions ------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "expected"),
    [
        ("$share/g/devices/d1/#", ("g", "devices/d1/#")),
        ("$share/consumer1/sport/tennis/+", ("consumer1", "sport/tennis/+")),  # v5 4.8.2
        ("$share/g/#", ("g", "#")),
        ("$share/g//", ("g", "/")),
        ("$share/g/$share/h/x", ("g", "$share/h/x")),
        ("devices/d1/#", (None, "devices/d1/#")),
        ("$share", (None, "$share")),
        ("$sharex/g/a", (None, "$sharex/g/a")),
        ("$SHARE/g/a", (None, "$SHARE/g/a")),
        ("a/$share/g/b", (None, "a/$share/g/b")),
    ],
)
def test_parse_shared(topic_filter: str, expected: tuple[str | None, str]) -> None:
    assert parse_shared(topic_filter) == expected


@pytest.mark.parametrize(
    "topic_filter",
    [
        "$share/",
        "$share/g",
        "$share/g/",
        "$share//a",
        "$share/+/a",
        "$share/#/a",
        "$share/g+/a",
        "$share/g/a/#/b",
        "$share/g/a\x00",
        "a/#/b",
        "",
    ],
)
def test_parse_shared_invalid(topic_filter: str) -> None:
    with pytest.raises(InvalidTopic):
        parse_shared(topic_filter)


@settings(max_examples=100, deadline=None)
@given(
    group=st.text(
        st.characters(exclude_characters="\x00/+#", exclude_categories=["Cs"]),
        min_size=1,
        max_size=5,
    ),
    inner=topic_filters(),
)
def test_parse_shared_round_trip(group: str, inner: str) -> None:
    assert parse_shared(f"$share/{group}/{inner}") == (group, inner)
