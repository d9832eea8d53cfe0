"""Alert episodes: costly requests (rate limited with a count), daily spend once per UTC day, error rate."""

from datetime import datetime, timezone

import pytest

from runtime.alerts import AlertMonitor
from runtime.buckets import ManualClock
from runtime.pricing import CostBreakdown
from runtime.records import Record
from runtime.settings import AlertSettings

pytestmark = pytest.mark.pure

T0 = datetime(2026, 11, 5, 12, 0, tzinfo=timezone.utc).timestamp()
_n = 0


def rec(clock, cost=0.0, status="ok", **kw):
    global _n
    _n += 1
    return Record(request_id=f"r{_n}", attempt=1, message_id=f"m{_n}" if status == "ok" else None,
                  ts=clock(), user_id="u", tenant=None, priority="normal", model="claude-sonnet-5-5",
                  cost=CostBreakdown(cost, 0, 0, 0, cost) if status == "ok" else None, status=status,
                  error_type=None if status == "ok" else "overloaded_error", **kw)


def monitor(**kw):
    clock = ManualClock(T0)
    return AlertMonitor(AlertSettings(**kw), clock), clock


def test_request_cost_fires_then_rate_limits_with_a_count():
    m, clock = monitor(request_usd=0.10, day_usd=1e9)
    assert m.observe(rec(clock, 0.10)) == []  # at the threshold is fine
    a = m.observe(rec(clock, 0.11))
    assert [x.kind for x in a] == ["request_cost"] and a[0].count == 1
    assert a[0].value == pytest.approx(0.11) and a[0].threshold == 0.10
    for _ in range(4):
        clock.advance(10)
        assert m.observe(rec(clock, 0.5)) == []
    clock.advance(25)  # 65 s after the first alert
    a = m.observe(rec(clock, 0.2))
    assert len(a) == 1 and a[0].count == 5 and "5 such requests" in a[0].message
    clock.advance(61)
    a = m.observe(rec(clock, 0.2))
    assert len(a) == 1 and a[0].count == 1


def test_daily_spend_fires_once_per_utc_day():
    m, clock = monitor(day_usd=1.0, request_usd=100)
    fired = []
    for _ in range(30):
        fired += m.observe(rec(clock, 0.1))
        clock.advance(60)
    assert [a.kind for a in fired] == ["daily_spend"]
    assert fired[0].value > 1.0
    assert m.day_spend("2026-11-05") == pytest.approx(3.0)
    clock.advance(86_400)  # the next UTC day: a new episode
    fired = []
    for _ in range(15):
        fired += m.observe(rec(clock, 0.1))
    assert [a.kind for a in fired] == ["daily_spend"]


def test_error_rate_episode_starts_once_and_ends_when_rate_falls():
    m, clock = monitor(error_rate=0.05, error_window_s=600, error_min_requests=20, day_usd=1e9)
    kinds = []
    for _ in range(19):
        kinds += [a.kind for a in m.observe(rec(clock, status="error"))]
    assert kinds == []  # under the minimum number of requests: no verdict yet
    a = m.observe(rec(clock, status="error"))
    assert [x.kind for x in a] == ["error_rate"] and a[0].value == 1.0 and a[0].count == 20
    for _ in range(50):
        assert m.observe(rec(clock, status="error")) == []  # same episode
    # the bad minutes leave the window; good traffic brings the rate back under
    clock.advance(601)
    for _ in range(30):
        assert m.observe(rec(clock)) == []
    assert m.error_rate() == (0.0, 30)
    # and a new burst of failures is a new episode
    fired = []
    for _ in range(10):
        fired += m.observe(rec(clock, status="error"))
    assert [x.kind for x in fired] == ["error_rate"]


def test_error_rate_at_the_threshold_does_not_fire():
    m, clock = monitor(error_rate=0.10, error_min_requests=20)
    fired = []
    for i in range(100):
        fired += m.observe(rec(clock, status="error" if i % 10 == 9 else "ok"))
    assert fired == []


def test_replay_rebuilds_state_without_raising():
    m, clock = monitor(day_usd=1.0, error_rate=0.05, error_min_requests=5, request_usd=100)
    for _ in range(20):
        assert m.observe(rec(clock, 0.5), replay=True) == []
        assert m.observe(rec(clock, status="error"), replay=True) == []
    # already past the day's limit and inside an error episode: nothing new to say
    assert m.observe(rec(clock, 0.5)) == []
    assert m.observe(rec(clock, status="error")) == []


def test_seed_day_and_mark_fired():
    m, clock = monitor(day_usd=1.0, request_usd=0.1)
    m.seed_day("2026-11-05", 0.95)
    m.mark_fired("request_cost", clock())
    a = m.observe(rec(clock, 0.2))
    assert [x.kind for x in a] == ["daily_spend"]  # the costly request was within a minute of the last alert
