import random

import pytest
from hypothesis import given, strategies as st

from runtime.buckets import ManualClock
from runtime.fallback import Action, CircuitBreaker, FallbackPolicy, fallback_chain
from runtime.router import route
from runtime.settings import RetrySettings, Settings

S = Settings()


def params(text, max_tokens=256):
    return {"max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]}


def test_router_by_complexity():
    assert route("auto", params("Classify this: 'great product'", 16), S).model_class == "haiku"
    assert route("auto", params("hi", 100), S).model_class == "haiku"
    assert route("auto", params("Write a short story about a lighthouse keeper and a storm.", 1500),
                 S).model_class == "sonnet"
    assert route("auto", params("Analyze the architecture and propose a design step by step."),
                 S).model_class == "opus"
    assert route("auto", params("x " * 5000), S).model_class == "opus"
    assert route("auto", params("hi", 8000), S).model_class == "opus"


def test_explicit_model_is_honoured():
    r = route("claude-opus-4-7", params("hi", 10), S)
    assert r.model == "claude-opus-4-7" and r.model_class == "opus" and r.reason == "requested"


def test_router_is_configurable():
    s = Settings(router={"simple_keywords": ("zzz",), "simple_max_chars": 10})
    assert route("auto", params("please classify this text for me", 1000), s).model_class == "sonnet"


def test_chain_goes_down_classes():
    assert fallback_chain("claude-opus-5-5", S) == ["claude-opus-5-5", "claude-sonnet-5-5", "claude-haiku-5-5"]
    assert fallback_chain("claude-sonnet-4-6", S) == ["claude-sonnet-4-6", "claude-haiku-5-5"]
    assert fallback_chain("claude-haiku-5-5", S) == ["claude-haiku-5-5"]


POLICY = FallbackPolicy(RetrySettings(attempts_per_model=3), rng=random.Random(0))


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 413, 422])
def test_client_errors_surface_at_once(status):
    assert POLICY.decide(status, 1, has_next=True).action is Action.SURFACE


def test_429_goes_to_next_model_or_waits_retry_after():
    assert POLICY.decide(429, 1, has_next=True).action is Action.NEXT_MODEL
    d = POLICY.decide(429, 1, has_next=False, retry_after_s=7)
    assert d.action is Action.RETRY_SAME and d.delay_s == 7


@pytest.mark.parametrize("status", [529, 500, 503, 0, 408])
def test_overload_retries_same_then_next(status):
    assert POLICY.decide(status, 1, True).action is Action.RETRY_SAME
    assert POLICY.decide(status, 2, True).action is Action.RETRY_SAME
    assert POLICY.decide(status, 3, True).action is Action.NEXT_MODEL
    assert POLICY.decide(status, 3, False).action is Action.SURFACE


@given(st.integers(min_value=1, max_value=30))
def test_backoff_is_bounded_and_grows(n):
    p = FallbackPolicy(RetrySettings(backoff_base_s=0.5, backoff_max_s=8), rng=random.Random(n))
    d = p.backoff(n)
    cap = min(8, 0.5 * 2 ** (n - 1))
    assert cap / 2 <= d <= cap


def test_circuit_breaker_opens_and_half_opens():
    clock = ManualClock()
    b = CircuitBreaker(failures=3, cooldown_s=10, clock=clock)
    for _ in range(3):
        assert b.allow("m")
        b.record("m", 529)
    assert not b.allow("m") and b.is_open("m")
    clock.advance(10)
    assert b.allow("m")          # one probe
    b.record("m", 529)           # fails: open again at once
    assert not b.allow("m")
    clock.advance(10)
    assert b.allow("m")
    b.record("m", 200)           # success closes it
    assert b.allow("m") and not b.is_open("m")
    b.record("m", 400)           # a client error is not an overload
    assert b.allow("m")
