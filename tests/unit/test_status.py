"""What `claude-runtime status` shows, from the actors' reports (runtime/status.py)."""

from datetime import datetime, timezone

from runtime.settings import BudgetSettings
from runtime.status import bucket_levels, global_budgets, period_starts, render, view

LIMITER = {"classes": {"sonnet": {"rpm": {"limit": 50, "capacity": 49.5, "level": 12.375},
                                  "itpm": {"limit": 30000, "capacity": 29700.0, "level": -5.0},
                                  "paused_for_s": 0.0}},
           "in_flight": {"sonnet": {"leases": 3, "input_tokens": 300, "max_output_tokens": 96}}}


def test_bucket_levels_are_fractions_never_negative():
    assert bucket_levels(LIMITER) == {"sonnet/rpm": 0.25, "sonnet/itpm": 0.0}
    assert bucket_levels(None) == {}


def test_global_budgets_from_settled_spend():
    b = global_budgets(BudgetSettings(daily_usd=10.0, monthly_usd=100.0), spent_today=8.5, spent_month=20.0)
    assert b["daily"]["state"] == "downgrade" and b["monthly"]["state"] == "normal"
    assert global_budgets(BudgetSettings(daily_usd=10.0), 12.0, 12.0)["daily"]["state"] == "stop"
    assert global_budgets(BudgetSettings(), 5.0, 5.0) == {}


def test_periods_are_utc_day_and_month():
    ts = datetime(2026, 11, 28, 17, 30, tzinfo=timezone.utc).timestamp()
    day, month = period_starts(ts)
    assert day == datetime(2026, 11, 28, tzinfo=timezone.utc).timestamp()
    assert month == datetime(2026, 11, 1, tzinfo=timezone.utc).timestamp()


def test_the_view_and_its_rendering():
    members = [{"name": "caller-0", "in_flight": 4, "draining": False, "node": "n1" * 20, "served": 10},
               {"name": "caller-1", "in_flight": 1, "draining": True, "node": "n2" * 20, "served": 3}]
    leases = {"caller-0": {"capacity": {"default/sonnet": {"requests_left": 7, "input_left": 900,
                                                           "output_left": 300, "expires_in_s": 1.2,
                                                           "inflight": 2}, "stats": {}}}}
    st = view(limiter=LIMITER, budgets={"daily": {"limit_usd": 10.0, "settled_usd": 2.5, "reserved_usd": 0.1,
                                                  "state": "normal"}},
              cache={"entries": 42, "hit_rate": 0.25, "saved_usd": 0.5, "location": "s3://b/c"},
              members=members, pool={"target": 2, "floor": 1, "ceiling": 4}, leases=leases)
    assert st["callers"]["active"] == 1 and st["callers"]["draining"] == 1 and st["callers"]["in_flight"] == 5
    text = render(st)
    for shown in ("caller-0", "draining", "sonnet", "daily", "25.0%", "42 entries", "s3://b/c",
                  "default/sonnet", "pool 1..4"):
        assert shown in text, shown


def test_in_process_callers_are_listed_from_fresh_reports_and_counted_apart():
    from runtime.status import outside_members, pool_summary

    reports = {"inproc-a": (100.0, {"in_flight": 3, "served": 9, "node": "n1"}),
               "inproc-b": (90.0, {"in_flight": 5, "served": 1, "node": "n2"})}
    rows = outside_members(reports, now=101.0, max_age_s=6.0)   # b stopped reporting: its driver is gone
    assert [r["name"] for r in rows] == ["inproc-a"] and rows[0]["in_process"] and rows[0]["in_flight"] == 3
    pooled = [{"name": "caller-0", "in_flight": 2, "draining": False},
              {"name": "caller-1", "in_flight": 1, "draining": True}]
    got = pool_summary(pooled + rows)
    assert (got["active"], got["draining"], got["in_process"], got["in_flight"]) == (1, 1, 1, 6)
