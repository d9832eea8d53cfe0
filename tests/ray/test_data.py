"""Ray Data through the runtime: every row answered, paced by the cluster's limiter (no 429 from the API)."""

import sys
import time

import pytest
import ray
from ray import cloudpickle

from runtime.data import OUTPUT_COLUMNS, build_processor
from tests.runtime_fixtures import fake_stats, fast_settings, start_local, uniform_limits

# a third more rows than a minute's worth of requests: the last ~20 can only go at RPM/60 a second, far slower than
# the rows run unpaced (~10 a second here), so the elapsed time shows the limiter paced them
RPM = 60
ROWS = 80

# the workers cannot import this test module by name: ship its functions by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    settings = fast_settings(tmp_path_factory.mktemp("data"), limits=uniform_limits(RPM, 10**8, 10**7),
                             cache={"enabled": False})
    rt = start_local(settings)
    yield rt
    rt.shutdown()
    ray.shutdown()


def _question(row: dict) -> dict:
    return {"model": "claude-haiku-5-5", "max_tokens": 32,
            "messages": [{"role": "user", "content": f"Give one fact about the number {row['id']}."}]}


def test_rows_that_cannot_be_sent_come_back_as_rows_with_their_error_type(rt):
    def maybe_bad(row: dict) -> dict:
        req = _question(row)
        if row["id"] % 3 == 0:
            req["temperature"] = 0.5  # removed from the API: refused before anything is sent
        return req

    before = fake_stats(rt)["requests"]
    rows = build_processor(maybe_bad, user_id="data")(ray.data.range(9)).take_all()
    assert sorted(r["id"] for r in rows) == list(range(9))
    for r in rows:
        assert set(OUTPUT_COLUMNS) <= set(r)
        if r["id"] % 3 == 0:
            assert r["error_type"] == "InvalidRequest" and r["response_text"] is None
        else:
            assert r["error_type"] is None and r["response_text"] and r["output_tokens"] > 0
    assert fake_stats(rt)["requests"] - before == 6


def test_more_rows_than_a_minutes_requests_all_answered_with_no_429(rt):
    proc = build_processor(_question, postprocess=lambda row: {**row, "answered": row["error_type"] is None},
                           user_id="data", tenant="rows", concurrency=1, max_in_flight=16)
    t0 = time.monotonic()
    rows = proc(ray.data.range(ROWS)).take_all()
    elapsed = time.monotonic() - t0
    assert len(rows) == ROWS and all(r["answered"] for r in rows)
    assert sorted(r["id"] for r in rows) == list(range(ROWS))
    assert len({r["request_id"] for r in rows}) == ROWS
    assert all(r["model"] == "claude-haiku-5-5" and r["cost_usd"] > 0 and r["input_tokens"] > 0 for r in rows)
    stats = fake_stats(rt)
    assert stats["by_status"].get("429", 0) == 0
    # the bucket holds at most a minute's worth: the limiter, not the API, paced the rest (RPM/60 per second)
    assert elapsed >= 0.8 * (ROWS - RPM) / (RPM / 60)
    ledger = {r["request_id"]: r for r in rt.ledger_records() if r["user_id"] == "data" and r["tenant"] == "rows"}
    assert {r["request_id"] for r in rows} == set(ledger)
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(sum(x["cost_usd"] for x in ledger.values()))
