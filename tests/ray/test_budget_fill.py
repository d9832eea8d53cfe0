"""Issue 16 end to end: under 200 concurrent requests a small budget fills up instead of refusing early, judged by
the local API's billing log (not our counters); critical traffic still passes the requests waiting for room."""

import random
import sqlite3
import time

import pytest
import ray

from runtime.errors import BudgetExceeded, ClaudeRuntimeError
from runtime.intents import Begin
from runtime.records import Record
from runtime.result import Result
from tests.runtime_fixtures import fake_post, fast_settings, read_billing, start_local, user_msg

pytestmark = pytest.mark.ray

SONNET = "claude-sonnet-5-5"
_WORDS = ("the river runs past old mills and quiet farms while boats carry grain toward the harbour where "
          "traders wait for news of rain from the hills beyond the valley").split()


def prompt(i: int, words: int = 650) -> str:
    """About 1,000 tokens of prose, different for every request (no two share an answer)."""
    rng = random.Random(i)
    return f"Request {i}. Summarise this passage in a few sentences: " + " ".join(
        rng.choice(_WORDS) for _ in range(words))


def wait_until(pred, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def outcomes(refs):
    out = []
    for ref in refs:
        try:
            out.append(ray.get(ref, timeout=300))
        except ray.exceptions.RayTaskError as exc:
            out.append(exc.cause if exc.cause is not None else exc)
        except ClaudeRuntimeError as exc:
            out.append(exc)
    return out


@pytest.fixture
def start_rt(tmp_path):
    made = []

    def start(budgets, latency_ms=0.0):
        rt = start_local(fast_settings(tmp_path, budgets=budgets, cache={"enabled": False}))
        made.append(rt)
        fake_post(rt, "/_fake/config", {"latency_ms": latency_ms})
        return rt

    yield start
    for rt in made:
        rt.shutdown()
    ray.shutdown()


def test_200_concurrent_requests_fill_a_small_budget_to_90_percent_without_overshoot(start_rt):
    limit = 0.10
    rt = start_rt({"daily_usd": limit, "per_user_daily_usd": 1.0}, latency_ms=300)  # per-user caps not binding
    refs = [rt.submit(user_msg(prompt(i), 200, model=SONNET), user_id=f"u{i}") for i in range(200)]
    out = outcomes(refs)
    ok = [o for o in out if isinstance(o, Result)]
    refused = [o for o in out if isinstance(o, BudgetExceeded)]
    assert len(ok) + len(refused) == 200, [o for o in out if not isinstance(o, (Result, BudgetExceeded))]
    bill = read_billing(rt.settings)
    billed = sum(b["cost_usd"] for b in bill)
    assert len(bill) == len(ok)
    assert billed <= limit + 1e-9            # 0 overshoot, by the API's own bill
    assert billed >= 0.90 * limit            # the budget filled up
    # only what could not fit was refused: its own figures say so, and so does the final bill
    for e in refused:
        assert (e.reason, e.budget, e.limit_usd) == ("cannot_fit", "daily", limit)
        assert e.settled_usd + e.amount_usd > limit and billed + e.amount_usd > limit
    assert sum(rt.spend().values()) == pytest.approx(billed)
    snap = rt.budgets()
    daily = snap["budgets"]["daily"]
    assert daily["settled_usd"] == pytest.approx(billed) and daily["reserved_usd"] == 0 and daily["queued"] == 0
    assert snap["ratios"] and snap["ratio_all"]["overruns"] == 0  # every reservation was an upper bound
    stats = rt.stats()
    assert stats["budgets"]["budgets"]["daily"]["settled_usd"] == pytest.approx(billed)
    assert stats["ledger"]["budget_queue"]["waited"] > 100  # most requests waited for room instead of failing


def test_critical_requests_are_admitted_before_normal_ones_waiting_for_room(start_rt):
    rt = start_rt({"daily_usd": 0.10})
    # 95 % of the budget held by one reservation: no ~$0.008 worst case fits until it goes
    hold = Begin(request_id="holder", owner="test|life|exec", attempt=None, model=SONNET, user_id=None,
                 tenant=None, priority="normal", reserve_usd=0.095)
    assert ray.get(rt.ledger.begin.remote(hold)).reservation.granted
    normal = [rt.submit(user_msg(prompt(i), 200, model=SONNET), user_id=f"n{i}") for i in range(20)]
    wait_until(lambda: rt.budgets()["queued"]["normal"] == 20)
    critical = [rt.submit(user_msg(prompt(100 + i), 200, model=SONNET), user_id=f"c{i}", priority="critical")
                for i in range(3)]
    wait_until(lambda: rt.budgets()["queued"]["critical"] == 3)
    assert rt.budgets()["queued"]["normal"] == 20
    ray.get(rt.ledger.release.remote("holder", hold.owner))
    ray.get(rt.ledger.commit.remote(Record(request_id="holder", attempt=1, message_id=None, ts=time.time(),
                                           user_id=None, tenant=None, priority="normal", model=SONNET,
                                           status="error", error_type="test", void_attempts=(1,))))
    crit_out, normal_out = outcomes(critical), outcomes(normal)
    assert all(isinstance(o, Result) and o.model == SONNET for o in crit_out)  # first, and not downgraded
    assert any(isinstance(o, Result) for o in normal_out)
    # when each reservation was granted: its intent is written at that moment
    with sqlite3.connect(f"file:{rt.settings.ledger_path}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT request_id, priority, MIN(ts) FROM intents WHERE request_id != 'holder' "
                          "GROUP BY request_id").fetchall()
    crit_ts = [ts for _, prio, ts in rows if prio == "critical"]
    normal_ts = [ts for _, prio, ts in rows if prio == "normal"]
    assert len(crit_ts) == 3 and normal_ts
    assert max(crit_ts) <= min(normal_ts)
