"""The per-device connect budget on a hand-stepped clock: the token bucket itself, the
patterns it must never refuse (a storm's backoff, a flaky link), and the sans-IO session
refusing an over-budget CONNECT before any policy, directory, takeover or broker work."""

from __future__ import annotations

import random

import pytest

from gateway.actions import CheckDevice, Close, Record, ToDevice
from gateway.audit import EventContext
from gateway.connection import Session, State
from gateway.identity import DeviceIdentity
from gateway.limits import ConnectLimiter, ConnectLimits
from gateway.mqtt import Connack, Connect, decode, encode
from gateway.policy import compile_for
from schemas.events import EventType, Outcome, Reason
from schemas.policy import FleetPolicy
from schemas.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


DEFAULTS = ConnectLimits(
    per_minute=Settings.model_fields["device_connects_per_minute"].default,
    burst=Settings.model_fields["device_connect_burst"].default,
)


def test_the_defaults_are_the_documented_ones() -> None:
    assert ConnectLimits() == DEFAULTS == ConnectLimits(per_minute=20, burst=20)


def test_a_burst_then_the_refill_rate() -> None:
    clock = Clock()
    limiter = ConnectLimiter(ConnectLimits(per_minute=6, burst=3), clock=clock)
    assert [limiter.take("d") for _ in range(4)] == [True, True, True, False]
    clock.now += 9.9  # one token takes 10 s; the refused attempt took the 0.0 left
    assert not limiter.take("d")
    clock.now += 10.0
    assert limiter.take("d")
    assert not limiter.take("d")
    assert limiter.take("other")  # per device
    clock.now += 30.0
    assert limiter.tokens("d") == pytest.approx(3.0)  # full again (capped at the burst)
    assert len(limiter) == 1  # ... and dropped once seen full


def test_retrying_faster_than_the_refill_never_gets_in_until_it_slows_down() -> None:
    clock = Clock()
    limiter = ConnectLimiter(ConnectLimits(per_minute=6, burst=2), clock=clock)
    assert limiter.take("d") and limiter.take("d")
    for _ in range(60):  # every 5 s for 5 minutes, each refused attempt takes its half token
        clock.now += 5.0
        assert not limiter.take("d")
    clock.now += 10.0  # one quiet refill period
    assert limiter.take("d")


def test_keys_are_bounded_least_recently_used_first() -> None:
    clock = Clock()
    limiter = ConnectLimiter(ConnectLimits(per_minute=1, burst=1), max_keys=10, clock=clock)
    for i in range(25):
        assert limiter.take(f"d{i}")
    assert len(limiter) == 10
    assert not limiter.take("d24")  # kept: the most recent
    assert limiter.take("d0")  # forgotten (an evicted device starts with a full bucket)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        ConnectLimits(per_minute=0, burst=1)
    with pytest.raises(ValueError, match="positive"):
        ConnectLimits(per_minute=1, burst=0)


def test_a_storm_with_backoff_is_never_refused_by_the_defaults() -> None:
    """bench/storm.py's devices: up to 10 attempts in a minute, jittered exponential
    backoff (0.5 s doubling to 30 s). Worse than that: 2,000 devices, each restarted 3
    times in that minute."""
    clock = Clock()
    limiter = ConnectLimiter(DEFAULTS, clock=clock)
    rng = random.Random(7)
    start = clock.now
    attempts: list[tuple[float, str]] = []
    for device in range(2000):
        for restart in range(3):
            at, delay = start + restart * 20.0, 0.5
            for _ in range(10):
                attempts.append((at, f"d{device}"))
                at += delay * rng.uniform(0.5, 1.5)
                delay = min(30.0, delay * 2)
    for at, key in sorted(attempts):
        clock.now = at
        assert limiter.take(key), (at - start, key)


def test_a_flaky_link_reconnecting_every_3_seconds_is_never_refused() -> None:
    clock = Clock()
    limiter = ConnectLimiter(DEFAULTS, clock=clock)
    for _ in range(24 * 60 * 20):  # a day
        assert limiter.take("flaky")
        clock.now += 3.0


def test_a_loop_gets_the_burst_then_the_refill_rate() -> None:
    """What a looping (or cloned) certificate gets per worker: 20, then one every 3 s."""
    clock = Clock()
    limiter = ConnectLimiter(DEFAULTS, clock=clock)
    admitted = 0
    for _ in range(600):  # one attempt every 0.5 s for 5 minutes
        admitted += limiter.take("loop")
        clock.now += 0.5
    # The burst, plus the tokens earned in the 11 s it took to spend them; after that
    # each refused attempt takes the sixth of a token earned since the last: never one.
    assert admitted == 23


# --- the session -----------------------------------------------------------------------

ID = DeviceIdentity(device_id="d1", fleet="plant", serial="abc", fingerprint="00" * 32)


def _session(limiter: ConnectLimiter) -> Session:
    return Session(
        identity=ID,
        policy=compile_for(FleetPolicy(), ID),
        context=EventContext(instance="t", peer_address="1.2.3.4:5", identity=ID),
        max_packet_size=4096,
        connects=limiter,
    )


@pytest.mark.parametrize(("version", "code"), [(4, 3), (5, 0x9F)], ids=["v3.1.1", "v5"])
def test_an_over_budget_connect_is_refused_before_any_other_work(version: int, code: int) -> None:
    clock = Clock()
    limiter = ConnectLimiter(ConnectLimits(per_minute=1, burst=2), clock=clock)
    connect = encode(Connect(client_id="d1", protocol_level=version), version=version)
    for _ in range(2):
        assert _session(limiter).receive_device(connect) == [CheckDevice()]
    session = _session(limiter)
    actions = session.receive_device(connect)
    assert [type(a) for a in actions] == [Record, ToDevice, Close]  # no CheckDevice: no dial
    record, reply, close = actions
    assert isinstance(record, Record) and isinstance(reply, ToDevice)
    event = record.event
    assert (event.type, event.outcome, event.reason) == (
        EventType.CONNECT,
        Outcome.DENIED,
        Reason.CONNECT_RATE_EXCEEDED,
    )
    assert event.device_id == "d1" and event.client_id == "d1"
    assert event.detail == {"scope": "device", "connect_burst": 2, "connects_per_minute": 1}
    connack, _ = decode(bytes(reply.data), version=version)  # type: ignore[misc]
    assert isinstance(connack, Connack) and connack.reason_code == code
    assert close == Close(Reason.CONNECT_RATE_EXCEEDED)
    assert session.state is State.CLOSED


def test_a_policy_refusal_takes_a_token_too() -> None:
    """A device looping with a client id its policy refuses is budgeted like any other."""
    limiter = ConnectLimiter(ConnectLimits(per_minute=1, burst=1), clock=Clock())
    wrong = encode(Connect(client_id="someone-else", protocol_level=4), version=4)
    first = _session(limiter).receive_device(wrong)
    assert first[0].event.reason is Reason.CLIENT_ID_MISMATCH  # type: ignore[attr-defined]
    second = _session(limiter).receive_device(wrong)
    assert second[0].event.reason is Reason.CONNECT_RATE_EXCEEDED  # type: ignore[attr-defined]
