"""The denial budget, alone and inside the sans-IO session: exact counts, bounded events.

The clock is a list the test steps by hand; no test waits.
"""

from __future__ import annotations

import random

import pytest

from gateway.actions import Action, Close, Record
from gateway.audit import EventContext
from gateway.config import config_from_settings
from gateway.connection import Session, State
from gateway.denials import (
    SAMPLE_SIZE,
    TARGET_BYTES,
    DenialBudget,
    DenialLimits,
    clip,
    sample,
)
from gateway.mqtt import Disconnect, Puback, Publish, Suback, Subscribe, Subscription, encode
from gateway.policy import compile_for
from schemas.events import AuthEvent, EventType, Outcome, Reason, canonical_bytes
from schemas.policy import FleetPolicy
from schemas.settings import ConfigError, Settings, load_settings
from tests.conftest import Pki
from tests.gateway.test_connection import ID, MINE, OTHER, admit, device_bytes, upstream_bytes

LIMITS = DenialLimits(per_window=100, events_per_window=10, window=60.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def new_session(clock: Clock, limits: DenialLimits = LIMITS) -> Session:
    return Session(
        identity=ID,
        policy=compile_for(FleetPolicy(), ID),
        context=EventContext(instance="t", peer_address="1.2.3.4:5", identity=ID),
        max_packet_size=512 * 1024,
        denials=DenialBudget(limits, clock=clock),
    )


def events(actions: list[Action]) -> list[AuthEvent]:
    return [a.event for a in actions if isinstance(a, Record)]


def denials(recorded: list[AuthEvent]) -> list[AuthEvent]:
    """The publish and subscribe denial events (individual and summaries)."""
    kinds = (EventType.PUBLISH, EventType.SUBSCRIBE)
    return [e for e in recorded if e.type in kinds and e.outcome is Outcome.DENIED]


def counted(recorded: list[AuthEvent]) -> int:
    return sum(e.detail["count"] for e in denials(recorded))


def denied_publishes(n: int, *, qos: int = 0, topic: str = OTHER, first_id: int = 1) -> bytes:
    return b"".join(
        encode(
            Publish(topic=topic, payload=b"x", qos=qos, packet_id=first_id + i if qos else None),
            version=5,
        )
        for i in range(n)
    )


def subscribe(filters: list[str], packet_id: int = 1, version: int = 5) -> bytes:
    subs = tuple(Subscription(topic_filter=f) for f in filters)
    return encode(Subscribe(packet_id=packet_id, subscriptions=subs), version=version)


# --- the budget alone --------------------------------------------------------------------


def test_clip_keeps_short_targets_and_cuts_long_ones_on_a_character_boundary() -> None:
    assert clip("devices/d2/t") == "devices/d2/t"
    exact = "a" * TARGET_BYTES
    assert clip(exact) == exact
    cut = clip("é" * TARGET_BYTES)  # two bytes each: 128 fit
    assert cut == "é" * (TARGET_BYTES // 2) + "…"
    odd = clip("a" + "€" * TARGET_BYTES)  # three bytes each, after one: 85 fit in 256
    assert odd == "a" + "€" * 85 + "…"
    assert len(clip("x" * 65_535).encode()) <= TARGET_BYTES + len("…".encode())


def test_sample_is_distinct_bounded_and_in_order() -> None:
    assert sample(["b", "a", "b", "c"]) == ["b", "a", "c"]
    many = [f"t/{i % 50}" for i in range(10_000)]
    assert sample(many) == [f"t/{i}" for i in range(SAMPLE_SIZE)]


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        DenialLimits(per_window=0)
    with pytest.raises(ValueError, match="positive"):
        DenialLimits(window=0)


def test_budget_records_the_first_events_then_holds_and_summarises_at_window_end() -> None:
    clock = Clock()
    budget = DenialBudget(DenialLimits(per_window=100, events_per_window=2, window=10), clock=clock)
    assert budget.due_in() is None
    verdicts = [
        budget.deny(EventType.PUBLISH, Reason.TOPIC_NOT_AUTHORIZED, 1, ["a"]) for _ in "xyz"
    ]
    assert [v.record for v in verdicts] == [True, True, False]
    budget.deny(EventType.SUBSCRIBE, Reason.TOPIC_NOT_AUTHORIZED, 7, ["#", "$SYS/#"])
    assert budget.due_in() == 10
    clock.now += 9.5
    assert budget.due() == [] and budget.due_in() == 0.5
    clock.now += 0.5
    (pub, sub) = budget.due()
    assert (pub.type, pub.count, pub.sample) == (EventType.PUBLISH, 1, ("a",))
    assert (sub.type, sub.count, sub.sample) == (EventType.SUBSCRIBE, 7, ("#", "$SYS/#"))
    assert budget.due_in() is None and budget.due() == [] and budget.flush() == []


def test_budget_exceeded_is_per_window() -> None:
    clock = Clock()
    budget = DenialBudget(DenialLimits(per_window=5, events_per_window=1, window=10), clock=clock)
    budget.deny(EventType.SUBSCRIBE, Reason.TOPIC_NOT_AUTHORIZED, 5, ["#"])
    assert not budget.exceeded
    clock.now += 10  # a new window: the count starts again
    verdict = budget.deny(EventType.PUBLISH, Reason.TOPIC_NOT_AUTHORIZED, 1, ["t"])
    assert verdict.record and verdict.due == [] and not budget.exceeded  # nothing was held
    budget.deny(EventType.PUBLISH, Reason.TOPIC_NOT_AUTHORIZED, 5, ["t"])
    assert budget.exceeded


def test_a_late_denial_brings_the_previous_windows_summary_first() -> None:
    clock = Clock()
    budget = DenialBudget(DenialLimits(per_window=100, events_per_window=1, window=10), clock=clock)
    for _ in range(4):
        budget.deny(EventType.PUBLISH, Reason.TOPIC_NOT_AUTHORIZED, 1, ["t"])
    clock.now += 30  # the timer never ran (the bridge was busy): the next denial rolls over
    verdict = budget.deny(EventType.PUBLISH, Reason.TOPIC_NOT_AUTHORIZED, 1, ["u"])
    assert verdict.record
    assert [(s.count, s.sample) for s in verdict.due] == [(3, ("t",))]


# --- inside the session ------------------------------------------------------------------


def test_a_few_denials_are_each_their_own_event_and_the_session_goes_on() -> None:
    clock = Clock()
    session = new_session(clock)
    admit(session, 5)
    actions = session.receive_device(denied_publishes(10, qos=1))
    recorded = events(actions)
    assert len(recorded) == 10
    assert recorded[0].detail == {
        "count": 1,
        "topic": OTHER,
        "qos": 1,
        "policy_version": 0,
        "statement": "default-deny",
    }
    assert device_bytes(actions, 5) == [Puback(packet_id=i, reason_code=0x87) for i in range(1, 11)]
    assert session.state is State.ACTIVE


def test_beyond_the_event_budget_denials_are_one_summary_at_window_end() -> None:
    clock = Clock()
    session = new_session(clock)
    admit(session, 5)
    other = "devices/d3/t"
    data = denied_publishes(12) + subscribe(["#", "$SYS/#"]) + denied_publishes(3, topic=other)
    actions = session.receive_device(data + encode(Publish(topic=MINE, payload=b"ok"), version=5))
    assert len(events(actions)) == 10  # the first ten publishes; the rest held
    assert upstream_bytes(actions) == encode(Publish(topic=MINE, payload=b"ok"), version=5)
    assert device_bytes(actions, 5) == [Suback(packet_id=1, reason_codes=(0x87, 0x87))]
    assert session.denials.due_in() == 60
    assert session.denials_due() == []  # the window is still open
    clock.now += 60
    summaries = events(session.denials_due())
    assert [(e.type, e.reason, e.outcome) for e in summaries] == [
        (EventType.PUBLISH, Reason.TOPIC_NOT_AUTHORIZED, Outcome.DENIED),
        (EventType.SUBSCRIBE, Reason.TOPIC_NOT_AUTHORIZED, Outcome.DENIED),
    ]
    assert summaries[0].detail == {
        "summary": True,
        "count": 5,
        "topics": [OTHER, other],
        "window_seconds": 60.0,
    }
    assert summaries[1].detail["count"] == 2 and summaries[1].detail["filters"] == ["#", "$SYS/#"]
    assert session.state is State.ACTIVE and session.denials_due() == []
    assert counted(events(actions) + summaries) == session.denied == 17


@pytest.mark.parametrize(
    "end",
    ["connection_lost", "disconnect", "taken_over", "revoked", "protocol_error"],
)
def test_held_denials_are_summarised_before_any_session_end(end: str) -> None:
    clock = Clock()
    session = new_session(clock)
    admit(session, 5)
    recorded = events(session.receive_device(denied_publishes(25)))
    if end == "connection_lost":
        ending = session.close(Reason.CONNECTION_LOST)
    elif end == "disconnect":
        ending = events(session.receive_device(encode(Disconnect(), version=5)))
    elif end == "taken_over":
        ending = events(session.cut(Reason.SESSION_TAKEN_OVER, detail={"taken_over_by": "x"}))
    elif end == "revoked":
        ending = events(session.cut(Reason.DEVICE_REVOKED, revoked=True))
    else:
        ending = events(session.receive_device(b"\x00\x00"))
    *summaries, last = ending
    assert [e.detail["count"] for e in summaries] == [15]
    assert last.type in (EventType.SESSION_END, EventType.SESSION_REVOKED)
    assert counted(recorded + ending) == last.detail["denied"] == 25
    assert session.close(Reason.CONNECTION_LOST) == []  # nothing twice


def test_past_the_budget_the_session_is_closed_with_quota_exceeded_v5() -> None:
    clock = Clock()
    session = new_session(clock)
    admit(session, 5)
    data = denied_publishes(2_000, qos=1) + encode(Publish(topic=MINE, payload=b"x"), version=5)
    actions = session.receive_device(data)
    recorded = events(actions)
    # Ten on their own, one summary, the end: whatever the device sent after the 101st.
    assert len(recorded) == 12
    *_, summary, end = recorded
    assert summary.detail["count"] == 91 and summary.detail["summary"] is True
    assert (end.type, end.reason, end.outcome) == (
        EventType.SESSION_END,
        Reason.TOO_MANY_DENIALS,
        Outcome.DENIED,
    )
    assert end.detail["denied"] == counted(recorded) == 101
    assert end.detail["error"] == "more than 100 denials in 60 s"
    replies = device_bytes(actions, 5)
    assert replies[:-1] == [Puback(packet_id=i, reason_code=0x87) for i in range(1, 101)]
    assert replies[-1] == Disconnect(reason_code=0x97)  # quota exceeded; no PUBACK for #101
    assert isinstance(actions[-1], Close) and actions[-1].reason is Reason.TOO_MANY_DENIALS
    assert upstream_bytes(actions) == b""
    assert session.state is State.CLOSED


@pytest.mark.parametrize(("version", "n"), [(4, 1_000), (5, 60_000)])
def test_one_subscribe_with_many_denied_filters_is_one_bounded_event(version: int, n: int) -> None:
    clock = Clock()
    session = new_session(clock)
    admit(session, version)
    filters = [f"x/{i}/" + "y" * 300 if i % 1000 == 0 else chr(97 + i % 26) for i in range(n)]
    data = subscribe(filters, version=version)
    assert len(data) < 256 * 1024
    actions = session.receive_device(data)
    first, end = events(actions)
    assert first.type is EventType.SUBSCRIBE and first.detail["count"] == n
    assert len(first.detail["filters"]) == SAMPLE_SIZE
    assert all(len(f.encode()) <= TARGET_BYTES + 3 for f in first.detail["filters"])
    assert len(canonical_bytes(first)) < 4096
    assert end.reason is Reason.TOO_MANY_DENIALS and end.detail["denied"] == n
    # v5: DISCONNECT 0x97 and no SUBACK; 3.1.1 has no DISCONNECT from the server: closed.
    expected = [Disconnect(reason_code=0x97)] if version == 5 else []
    assert device_bytes(actions, version) == expected
    assert isinstance(actions[-1], Close) and actions[-1].reason is Reason.TOO_MANY_DENIALS


def test_partially_denied_subscribe_still_forwards_the_allowed_filters() -> None:
    session = new_session(Clock())
    admit(session, 5)
    actions = session.receive_device(subscribe(["#", "devices/d1/#", "$SYS/#"], packet_id=4))
    (event,) = events(actions)
    assert event.detail == {
        "count": 2,
        "filters": ["#", "$SYS/#"],
        "policy_version": 0,
        "statement": "default-deny",
    }
    assert upstream_bytes(actions) == subscribe(["devices/d1/#"], packet_id=4)


def test_a_device_just_under_the_budget_is_never_cut() -> None:
    clock = Clock()
    session = new_session(clock)
    admit(session, 5)
    for _ in range(10):  # ten windows of exactly 100 denials each
        actions = session.receive_device(denied_publishes(100))
        assert session.state is State.ACTIVE and not any(isinstance(a, Close) for a in actions)
        clock.now += 60
        assert [e.detail["count"] for e in events(session.denials_due())] == [90]
    assert session.denied == 1000


@pytest.mark.parametrize("seed", range(5))
def test_no_count_is_ever_lost(seed: int) -> None:
    """Random traffic, clock steps and timer calls: every denial in exactly one event."""
    rng = random.Random(seed)
    clock = Clock()
    limits = DenialLimits(per_window=60, events_per_window=3, window=5)
    session = new_session(clock, limits)
    admit(session, 5)
    recorded: list[AuthEvent] = []
    for _ in range(200):
        roll = rng.random()
        if roll < 0.4:
            data = denied_publishes(rng.randint(1, 5), topic=f"devices/x{rng.randint(0, 30)}/t")
        elif roll < 0.6:
            data = subscribe([f"f/{rng.randint(0, 40)}" for _ in range(rng.randint(1, 8))])
        elif roll < 0.7:
            data = encode(Publish(topic=MINE, payload=b"ok"), version=5)
        elif roll < 0.85:
            clock.now += rng.uniform(0, 4)
            recorded += events(session.denials_due())
            continue
        else:
            recorded += events(session.denials_due())
            continue
        recorded += events(session.receive_device(data))
        if session.state is State.CLOSED:
            break
    recorded += session.close(Reason.CONNECTION_LOST)
    end = recorded[-1]
    assert end.type is EventType.SESSION_END
    assert counted(recorded) == session.denied == end.detail["denied"]
    for event in denials(recorded):
        key = (
            "topic"
            if "topic" in event.detail
            else "topics"
            if "topics" in event.detail
            else "filters"
        )
        assert event.detail[key]  # every event names what was denied


def test_limits_come_from_the_settings(monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
    assert DenialLimits() == config_from_settings(Settings(pki_dir=pki.directory)).denials
    monkeypatch.setenv("DEVICEGATE_DENIALS_PER_WINDOW", "5")
    monkeypatch.setenv("DEVICEGATE_DENIAL_WINDOW", "2m")
    config = config_from_settings(load_settings(pki_dir=pki.directory))
    assert config.denials == DenialLimits(per_window=5, events_per_window=10, window=120.0)
    monkeypatch.setenv("DEVICEGATE_DENIAL_WINDOW", "0s")
    with pytest.raises(ConfigError, match="DEVICEGATE_DENIAL_WINDOW: must be longer than zero"):
        load_settings()
