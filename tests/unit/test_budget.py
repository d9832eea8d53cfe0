"""Budget book: reservations can never overshoot, thresholds, critical cap, release, UTC rollover."""

import random
from datetime import datetime, timezone

import pytest

from runtime.budget import BudgetBook
from runtime.buckets import ManualClock
from runtime.settings import BudgetSettings

pytestmark = pytest.mark.pure

# 2026-11-05 23:00:00 UTC
T0 = datetime(2026, 11, 5, 23, 0, tzinfo=timezone.utc).timestamp()


def book(clock=None, **kw):
    return BudgetBook(BudgetSettings(**kw), clock or ManualClock(T0))


@pytest.mark.parametrize("seed", range(20))
def test_64_concurrent_random_reservations_never_exceed_the_limit(seed):
    rng = random.Random(seed)
    b = book(daily_usd=1.0, per_user_daily_usd=0.6)
    users = ["a", "b", "c"]
    in_flight: dict[str, float] = {}
    spent = {"total": 0.0, **{u: 0.0 for u in users}}
    owner: dict[str, str] = {}
    refused = 0
    for i in range(2_000):
        # keep 64 requests in flight; each step either reserves a new one or settles / releases one
        if len(in_flight) < 64 and (not in_flight or rng.random() < 0.6):
            rid, user = f"r{i}", rng.choice(users)
            amount = rng.uniform(0.0, 0.08)
            res = b.reserve(rid, user, None, "normal", amount)
            if res.granted:
                in_flight[rid] = amount
                owner[rid] = user
            else:
                refused += 1
                assert res.state == "stop" and res.budget in ("daily", f"user:{user}:daily")
        else:
            rid = rng.choice(sorted(in_flight))
            amount = in_flight.pop(rid)
            if rng.random() < 0.8:
                actual = amount * rng.uniform(0.0, 1.0)  # real cost never above the worst case
                b.settle(rid, actual)
                spent["total"] += actual
                spent[owner[rid]] += actual
            else:
                b.release(rid)
        outstanding = sum(in_flight.values())
        assert spent["total"] + outstanding <= 1.0 + 1e-9
        for u in users:
            mine = sum(a for r, a in in_flight.items() if owner[r] == u)
            assert spent[u] + mine <= 0.6 + 1e-9
        assert b.spent("daily") == pytest.approx(spent["total"])
    assert refused > 0  # the limit was really pressed against


def test_downgrade_at_80_percent_and_refuse_past_100():
    b = book(daily_usd=10.0)
    assert b.reserve("r1", "u", None, "normal", 7.0).state == "normal"
    b.settle("r1", 7.0)
    assert b.state("u", None) == "normal"
    r2 = b.reserve("r2", "u", None, "normal", 1.0)  # 7 + 1 = 80 %
    assert r2.granted and r2.state == "downgrade" and r2.budget == "daily"
    assert r2.spent_usd == pytest.approx(8.0) and r2.limit_usd == 10.0
    assert b.state("u", None) == "downgrade"
    r3 = b.reserve("r3", "u", None, "normal", 2.01)  # would be 10.01
    assert not r3.granted and r3.state == "stop" and r3.budget == "daily"
    r4 = b.reserve("r4", "u", None, "normal", 2.0)  # exactly 100 % is allowed
    assert r4.granted
    assert b.state("u", None) == "stop"
    assert not b.reserve("r5", "u", None, "normal", 0.001).granted


def test_release_frees_room():
    b = book(daily_usd=1.0)
    assert b.reserve("r1", None, None, "normal", 0.9).granted
    assert not b.reserve("r2", None, None, "normal", 0.2).granted
    assert b.release("r1") is True
    assert b.release("r1") is False
    assert b.reserve("r2", None, None, "normal", 0.2).granted
    assert b.outstanding == 1


def test_settle_books_actual_not_reserved():
    b = book(daily_usd=1.0)
    b.reserve("r1", None, None, "normal", 0.9)
    assert b.settle("r1", 0.1) is True
    assert b.spent("daily") == pytest.approx(0.1)
    assert b.reserved("daily") == 0.0
    assert b.reserve("r2", None, None, "normal", 0.9).granted


def test_settle_without_reservation_still_books_spend():
    # after an actor restart reservations are gone, but the money was spent
    b = book(daily_usd=1.0, per_user_daily_usd=0.5)
    assert b.settle("lost", 0.4, user_id="u1") is False
    assert b.spent("daily") == pytest.approx(0.4)
    assert b.spent("user:u1:daily") == pytest.approx(0.4)
    assert not b.reserve("r", "u1", None, "normal", 0.2).granted


def test_critical_may_go_to_the_hard_cap_and_no_further():
    b = book(daily_usd=1.0, critical_hard_cap=1.5)
    b.settle("x", 1.0)
    assert not b.reserve("n", None, None, "normal", 0.01).granted
    assert not b.reserve("bulk", None, None, "bulk", 0.01).granted
    c1 = b.reserve("c1", None, None, "critical", 0.4)
    assert c1.granted and c1.state == "downgrade"
    assert not b.reserve("c2", None, None, "critical", 0.11).granted
    assert b.reserve("c3", None, None, "critical", 0.1).granted


def test_no_extra_for_critical_without_hard_cap():
    b = book(daily_usd=1.0)
    b.settle("x", 0.95)
    assert not b.reserve("c", None, None, "critical", 0.1).granted


def test_utc_day_rollover_resets_daily_but_not_monthly():
    clock = ManualClock(T0)  # 23:00 UTC
    b = book(clock, daily_usd=1.0, monthly_usd=1.5)
    b.settle("a", 1.0)
    assert not b.reserve("r1", None, None, "normal", 0.1).granted
    clock.advance(3600 - 1)  # 23:59:59
    assert not b.reserve("r1", None, None, "normal", 0.1).granted
    clock.advance(1)  # midnight UTC: a new day
    r = b.reserve("r1", None, None, "normal", 0.4)
    assert r.granted
    assert b.spent("daily") == 0.0
    # the month still holds yesterday's dollar
    assert not b.reserve("r2", None, None, "normal", 0.2).granted
    b.settle("r1", 0.4)
    assert b.state(None, None) == "downgrade"  # monthly at 1.4 / 1.5


def test_utc_month_rollover():
    clock = ManualClock(datetime(2026, 11, 30, 23, 59, tzinfo=timezone.utc).timestamp())
    b = book(clock, monthly_usd=1.0)
    b.settle("a", 1.0)
    assert b.state(None, None) == "stop"
    clock.advance(120)
    assert b.state(None, None) == "normal"


def test_replayed_spend_counts_only_in_its_own_day():
    clock = ManualClock(T0)
    b = book(clock, daily_usd=1.0, monthly_usd=10.0)
    b.add_spend(None, None, 0.9, T0 - 86_400)  # yesterday
    b.add_spend(None, None, 0.5, T0 - 60)
    assert b.spent("daily") == pytest.approx(0.5)
    assert b.spent("monthly") == pytest.approx(1.4)


def test_per_user_and_per_tenant_budgets_are_separate():
    b = book(per_user_daily_usd=1.0, per_tenant_monthly_usd=1.5)
    assert b.reserve("r1", "alice", "t1", "normal", 1.0).granted
    assert not b.reserve("r2", "alice", "t2", "normal", 0.1).granted  # alice is out
    r3 = b.reserve("r3", "bob", "t1", "normal", 0.6)  # bob fine, but tenant t1 would be at 1.6
    assert not r3.granted and r3.budget == "tenant:t1:monthly"
    assert b.reserve("r4", "bob", "t2", "normal", 0.6).granted
    assert b.state("carol", None) == "normal"
    assert b.state("alice", None) == "stop"


def test_re_reserve_replaces_and_a_refused_one_keeps_the_old():
    b = book(daily_usd=1.0)
    assert b.reserve("r", None, None, "normal", 0.3).granted
    assert b.reserve("r", None, None, "normal", 0.6).granted  # replaces, does not add
    assert b.reserved("daily") == pytest.approx(0.6)
    assert not b.reserve("r", None, None, "normal", 1.2).granted
    assert b.reserved("daily") == pytest.approx(0.6)


def test_no_budgets_means_always_normal():
    b = book()
    r = b.reserve("r", "u", "t", "bulk", 1e6)
    assert r.granted and r.state == "normal" and r.budget is None
    with pytest.raises(ValueError):
        b.reserve("neg", "u", "t", "bulk", -1)
