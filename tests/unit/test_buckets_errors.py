import pickle

import pytest
from hypothesis import given, strategies as st

from runtime import errors
from runtime.buckets import ManualClock, TokenBucket


def test_refill_is_continuous():
    c = ManualClock()
    b = TokenBucket(60, 60, clock=c)
    assert b.try_take(60) and not b.try_take(1)
    assert b.wait_time(1) == pytest.approx(1.0)
    c.advance(0.5)
    assert b.level == pytest.approx(0.5)
    c.advance(0.5)
    assert b.try_take(1)
    c.advance(3600)
    assert b.level == 60  # never above capacity


def test_floor_give_take_clamp_capacity():
    c = ManualClock()
    b = TokenBucket(100, 60, clock=c)
    assert not b.try_take(95, floor=10) and b.try_take(90, floor=10)
    b.give(50)
    assert b.level == pytest.approx(60)
    b.take(100)
    assert b.level == pytest.approx(-40)
    assert b.wait_time(10) == pytest.approx(50 / (100 / 60))
    assert b.wait_time(200) == float("inf")
    b.give(1000)
    b.clamp(30)
    assert b.level == 30
    b.set_capacity(200)
    assert b.capacity == 200 and b.level == pytest.approx(130)


@given(st.lists(st.tuples(st.floats(0, 5), st.floats(0, 50)), max_size=60))
def test_taken_in_any_run_never_exceeds_capacity_plus_refill(steps):
    c = ManualClock()
    b = TokenBucket(100, 10, clock=c)
    taken, elapsed = 0.0, 0.0
    for dt, amount in steps:
        c.advance(dt)
        elapsed += dt
        if b.try_take(amount):
            taken += amount
    assert taken <= 100 + elapsed * 10 + 1e-6


def test_errors_pickle_with_fields_and_redact_keys():
    # a key-shaped string built at run time, so no key-like literal sits in the source
    e = errors.BudgetExceeded("over budget with key " + "sk-ant-" + "api03-" + "a" * 26, request_id="r1",
                              budget="daily", limit_usd=1.0, spent_usd=1.2)
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is errors.BudgetExceeded and e2.request_id == "r1" and e2.budget == "daily"
    assert "sk-ant" not in str(e2) and "[REDACTED]" in str(e2)
    u = pickle.loads(pickle.dumps(errors.UnknownModel("m-x", known=["a"])))
    assert u.model == "m-x" and isinstance(u, errors.ConfigurationError)
    assert "Bearer abc" not in errors.redact("Authorization: Bearer abcdefghijk123")
