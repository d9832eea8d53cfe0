"""Hostile input through rt.submit: ten thousand malformed requests and arguments are refused as InvalidRequest
before anything is sent (the API's own counters prove it), and no actor crashes."""

from __future__ import annotations

import pytest
import ray
from hypothesis import HealthCheck, given, settings as hsettings

from runtime.errors import InvalidRequest
from tests.runtime_fixtures import fake_stats, fast_settings, start_local, user_msg
from tests.unit.test_request_fuzz import hostile

pytestmark = pytest.mark.ray

@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    rt = start_local(fast_settings(tmp_path_factory.mktemp("hostile"), cache={"enabled": False}))
    yield rt
    rt.shutdown()
    ray.shutdown()


def test_ten_thousand_hostile_submissions_are_refused_before_any_call(rt):
    before = fake_stats(rt)["requests"]
    seen = {"n": 0}

    @hsettings(max_examples=10_000, deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(hostile())
    def check(case):
        request, kwargs = case
        seen["n"] += 1
        with pytest.raises(InvalidRequest):
            rt.submit(request, **kwargs)

    check()
    assert seen["n"] >= 10_000
    # the API's own counters prove nothing was sent, and every actor still answers
    assert fake_stats(rt)["requests"] == before
    ray.get([c.ready.remote() for c in rt.callers] + [rt.ledger.ping.remote(), rt.limiter.ping.remote()],
            timeout=60)
    assert ray.get(rt.submit(user_msg("still fine?", 16))).message.content
