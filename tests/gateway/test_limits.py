"""The per-address failure bucket, the handshake slots of an over-budget address, trusted
networks and the refusal-event throttle, on a hand-stepped clock."""

from __future__ import annotations

from ipaddress import ip_network

import pytest

from gateway.limits import (
    Burst,
    EventThrottle,
    FailureLimiter,
    HandshakeSlots,
    Slot,
    TrustedNetworks,
    address_key,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        ("192.0.2.7:4242", "192.0.2.7"),
        ("[2001:db8:1:2:3:4:5:6]:8883", "2001:db8:1:2::/64"),
        ("[2001:db8:1:2:ffff::1]:1", "2001:db8:1:2::/64"),  # same /64, same bucket
        ("[::ffff:192.0.2.7]:1", "192.0.2.7"),
        ("[::1]:5", "::/64"),
        ("192.0.2.7", "192.0.2.7"),
        (None, None),
        ("", None),
    ],
)
def test_address_key(peer: str | None, key: str | None) -> None:
    assert address_key(peer) == key


def test_bucket_is_over_budget_after_the_burst_and_refills_at_the_rate() -> None:
    clock = Clock()
    limiter = FailureLimiter(per_minute=3, clock=clock)
    for _ in range(3):
        assert limiter.allowed("a")
        limiter.failed("a")
    assert not limiter.allowed("a")
    assert limiter.allowed("b")  # per address
    clock.now += 19.9  # 3/min: one token every 20 s
    assert not limiter.allowed("a")
    clock.now += 0.2
    assert limiter.allowed("a")
    limiter.failed("a")
    assert not limiter.allowed("a")
    clock.now += 60
    assert limiter.allowed("a")
    assert len(limiter) == 0  # a full bucket is forgotten


def test_bucket_table_is_bounded() -> None:
    clock = Clock()
    limiter = FailureLimiter(per_minute=1, max_keys=100, clock=clock)
    for i in range(1000):
        limiter.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter) == 100
    assert not limiter.allowed("10.0.3.231")  # the most recent ones are kept


def test_unknown_address_is_never_limited() -> None:
    limiter = FailureLimiter(per_minute=1)
    limiter.failed(None)
    assert limiter.allowed(None)


def test_slots_run_k_at_a_time_and_hand_over_in_order() -> None:
    slots: HandshakeSlots[str] = HandshakeSlots(in_flight=2, queue=3)
    assert [slots.enter("a", c) for c in ("a1", "a2", "a3", "a4", "a5")] == [
        Slot.GO, Slot.GO, Slot.WAIT, Slot.WAIT, Slot.WAIT,
    ]  # fmt: skip
    assert slots.enter("a", "a6") is Slot.FULL  # only beyond the queue: refused
    assert slots.enter("b", "b1") is Slot.GO  # per address
    assert slots.leave("a4") is None  # gave up while waiting: out of the queue
    assert slots.leave("a1") == "a3"  # first in, first served
    assert slots.leave("a1") is None  # leaving twice is nothing
    assert slots.leave("a2") == "a5"
    assert slots.enter("a", "a7") is Slot.WAIT
    for done in ("a3", "a5", "a7", "b1", "never-entered"):
        slots.leave(done)
    assert len(slots) == 0 and slots.waiting("a") == 0
    assert slots.enter("a", "a8") is Slot.GO  # every slot was given back


def test_a_slot_holder_entering_again_leaves_first() -> None:
    # PROXY v2: screened at accept under the proxy's key, then under the device's.
    slots: HandshakeSlots[str] = HandshakeSlots(in_flight=1, queue=0)
    assert slots.enter("proxy", "c") is Slot.GO
    assert slots.enter("device", "c") is Slot.GO
    assert slots.enter("proxy", "d") is Slot.GO
    assert slots.enter("device", "e") is Slot.FULL


def test_trusted_networks() -> None:
    trusted = TrustedNetworks([ip_network("10.1.0.0/16"), ip_network("2001:db8::/32")])
    assert "10.1.2.3:5" in trusted and "[::ffff:10.1.2.3]:5" in trusted
    assert "[2001:db8::7]:1" in trusted
    assert "10.2.0.1:5" not in trusted and None not in trusted and "junk" not in trusted
    assert "10.1.2.3:5" not in TrustedNetworks() and not TrustedNetworks()


def test_throttle_reports_first_then_counts_then_summarises() -> None:
    clock = Clock()
    throttle = EventThrottle(interval=10, clock=clock)
    assert throttle.hit("k", "1.2.3.4:1") == [Burst("k", 1, "1.2.3.4:1")]
    for port in range(2, 7):
        assert throttle.hit("k", f"1.2.3.4:{port}") == []
    assert throttle.hit("other", None) == [Burst("other", 1, None)]
    assert throttle.due() == []
    clock.now += 10
    assert throttle.due() == [Burst("k", 5, "1.2.3.4:6")]  # "other" had nothing pending
    assert len(throttle) == 0
    assert throttle.hit("k", None) == [Burst("k", 1, None)]


def test_throttle_carries_counts_into_the_next_window() -> None:
    clock = Clock()
    throttle = EventThrottle(interval=10, clock=clock)
    throttle.hit("k", None)
    throttle.hit("k", None)
    clock.now += 11  # window closed, but nobody called due(): the next hit reports both
    assert throttle.hit("k", None) == [Burst("k", 2, None)]


def test_throttle_is_bounded_and_loses_no_count() -> None:
    clock = Clock()
    throttle = EventThrottle(interval=10, max_keys=10, clock=clock)
    reported = 0
    for i in range(100):
        for _ in range(3):
            reported += sum(b.count for b in throttle.hit(f"k{i}", None))
    assert len(throttle) == 10
    reported += sum(b.count for b in throttle.flush())
    assert reported == 300
