"""Budgets under concurrency, through the whole path: never past the budget, downgrade at 80 %."""

import pytest
import ray

from runtime.errors import BudgetExceeded
from runtime.result import Result
from tests.runtime_fixtures import fast_settings, start_local, user_msg


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    settings = fast_settings(tmp_path_factory.mktemp("budget"), budgets={"daily_usd": 1.0},
                             cache={"enabled": False})
    # every answer is long, so each Sonnet call costs ~$0.04 and 64 of them would be ~$2.5
    rt = start_local(settings, fake_api_overrides={"output_tokens": 4000})
    yield rt
    rt.shutdown()
    ray.shutdown()


def test_64_concurrent_critical_requests_never_pass_the_budget(rt):
    refs = [rt.submit(user_msg(f"Write a long essay on topic {i}", 4096, model="claude-sonnet-5-5"),
                      priority="critical", user_id=f"u{i % 4}") for i in range(64)]
    out = []
    for ref in refs:
        try:
            out.append(ray.get(ref))
        except BudgetExceeded as exc:
            out.append(exc)
    ok = [o for o in out if isinstance(o, Result)]
    refused = [o for o in out if isinstance(o, BudgetExceeded)]
    assert ok and refused and len(ok) + len(refused) == 64
    spent = sum(rt.spend(by="model").values())
    assert spent <= 1.0 + 1e-9
    assert spent == pytest.approx(sum(r.cost_usd for r in ok))
    assert all(r.model == "claude-sonnet-5-5" for r in ok)  # critical traffic is not downgraded


def test_non_critical_traffic_goes_to_haiku_past_80_percent(rt):
    # the first test left spend above 80 % of the $1 budget
    res = ray.get(rt.submit(user_msg("Write a long essay on rivers", 512, model="claude-sonnet-5-5")))
    assert res.model == "claude-haiku-5-5" and "downgrade" in res.route_reason
