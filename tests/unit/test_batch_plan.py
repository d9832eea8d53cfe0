"""Batch jobs' pure parts: splitting to the API's limits, finding a batch whose driver died before recording it,
outcomes that survive a round trip through the job's files."""

import json

import pytest

from runtime.batch import MAX_BATCH_REQUESTS, entry_size, orphan_batch, outcome_line, outcome_value, plan_chunks
from runtime.errors import BudgetExceeded, InvalidRequest, RequestLost, UpstreamError
from runtime.result import Result


def test_chunks_respect_the_request_count_limit():
    assert plan_chunks([10] * 250, max_requests=100, max_bytes=10**9) == [(0, 100), (100, 200), (200, 250)]
    assert plan_chunks([10] * 100_001, max_bytes=10**12) == [(0, MAX_BATCH_REQUESTS), (MAX_BATCH_REQUESTS, 100_001)]
    assert plan_chunks([], 10, 1000) == []


def test_chunks_respect_the_byte_limit_and_keep_order():
    sizes = [400, 400, 400, 100, 100, 900]
    chunks = plan_chunks(sizes, max_requests=100, max_bytes=1000)
    assert chunks[0][0] == 0 and chunks[-1][1] == len(sizes)
    assert all(a == prev_b for (_, prev_b), (a, _) in zip(chunks, chunks[1:]))  # consecutive, nothing lost
    for a, b in chunks:
        assert sum(sizes[a:b]) + 64 <= 1000


def test_an_entry_no_batch_can_carry_is_refused():
    with pytest.raises(InvalidRequest):
        plan_chunks([10, 5000, 10], max_requests=10, max_bytes=1000)


def test_entry_size_is_its_json_bytes():
    entry = {"custom_id": "a-1", "params": {"model": "m", "max_tokens": 5, "messages": [{"role": "user",
                                                                                           "content": "héllo"}]}}
    assert entry_size(entry) == len(json.dumps(entry, separators=(",", ":")).encode()) + 1


def test_an_orphan_is_adopted_only_when_unambiguous():
    listed = [{"id": "b1", "created_at": 1000.0, "total": 100}, {"id": "b2", "created_at": 1001.0, "total": 50},
              {"id": "b3", "created_at": 10.0, "total": 100}]
    assert orphan_batch(listed, known=set(), n_requests=50, since_ts=999.0) == "b2"
    assert orphan_batch(listed, known={"b1"}, n_requests=100, since_ts=999.0) is None  # b3 is far too old
    assert orphan_batch(listed, known=set(), n_requests=100, since_ts=999.0) == "b1"
    two = listed + [{"id": "b4", "created_at": 1002.0, "total": 100}]
    assert orphan_batch(two, known=set(), n_requests=100, since_ts=999.0) is None  # which one is ours?
    assert orphan_batch(listed, known=set(), n_requests=7, since_ts=999.0) is None


def test_outcomes_round_trip_as_results_and_typed_errors():
    import anthropic

    msg = anthropic.types.Message.model_validate({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-5-5",
        "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 1}})
    res = Result(message=msg, model="claude-haiku-5-5", cache="bypass", cost_usd=0.5, attempts=1, latency_s=2.0,
                 request_id="bj-x-1", history=[{"model": "claude-haiku-5-5", "status": 200, "batch": True}])
    back = outcome_value(json.loads(json.dumps(outcome_line(1, res))))
    assert back == res
    for err in (BudgetExceeded("over", request_id="bj-x-2", budget="daily", limit_usd=1.0),
                UpstreamError("batch errored", request_id="bj-x-3", status=None, error_type="invalid_request_error"),
                RequestLost("gone", request_id="bj-x-4")):
        again = outcome_value(json.loads(json.dumps(outcome_line(2, err))))
        assert type(again) is type(err) and again.request_id == err.request_id and again.fields == err.fields
