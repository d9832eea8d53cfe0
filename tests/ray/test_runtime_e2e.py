"""The whole request path on a real local Ray, against the embedded API, through the real SDK."""

import time

import pytest
import ray

import runtime
from runtime.errors import InvalidRequest, OverloadedAfterFallback, UpstreamError
from runtime.pricing import price
from runtime.result import Result
from runtime.usage import Usage
from tests.runtime_fixtures import fake_post, fake_stats, fast_settings, start_local, user_msg


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    settings = fast_settings(tmp_path_factory.mktemp("e2e"))
    rt = start_local(settings)
    yield rt
    rt.shutdown()
    ray.shutdown()


@pytest.fixture(autouse=True)
def _calm_api(rt):
    fake_post(rt, "/_fake/config", {"p529": 0.0, "p500": 0.0, "latency_ms": 0.0, "p529_by_class": {}})
    yield


def test_submit_returns_a_priced_message_and_a_ledger_row(rt):
    res = ray.get(rt.submit(user_msg("Classify the sentiment: 'I love it'", 32), user_id="u1", tenant="acme",
                            cache=False))
    assert isinstance(res, Result)
    assert res.model == rt.settings.router.haiku_model and res.cache == "bypass" and res.attempts == 1
    assert res.message.content[0].text and res.message.role == "assistant"
    expected = price(Usage.from_api(res.message.usage), res.model, rt.settings).total_usd
    assert res.cost_usd == pytest.approx(expected) and res.cost_usd > 0
    rows = [r for r in rt.ledger_records() if r["request_id"] == res.request_id]
    assert len(rows) == 1 and rows[0]["message_id"] == res.message.id


def test_bad_input_fails_before_any_call(rt):
    before = fake_stats(rt)["requests"]
    with pytest.raises(InvalidRequest) as exc:
        ray.get(rt.submit(user_msg("hi", temperature=0.3)))
    assert exc.value.field == "temperature"
    with pytest.raises(InvalidRequest):
        rt.submit({"model": "auto", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]})
    assert fake_stats(rt)["requests"] == before


def test_exact_then_semantic_hit_but_never_across_tenants(rt):
    q = "Explain how photosynthesis turns light into chemical energy."
    first = ray.get(rt.submit(user_msg(q, 200), tenant="acme"))
    assert first.cache == "miss" and first.attempts == 1
    again = ray.get(rt.submit(user_msg(q, 200), tenant="acme"))
    assert again.cache == "exact" and again.cost_usd == 0 and again.attempts == 0
    assert again.saved_usd == pytest.approx(first.cost_usd)
    assert again.message.content[0].text == first.message.content[0].text
    near = ray.get(rt.submit(user_msg(q.lower().rstrip("."), 200), tenant="acme"))
    assert near.cache == "semantic" and near.message.content[0].text == first.message.content[0].text
    other = ray.get(rt.submit(user_msg(q, 200), tenant="globex"))
    assert other.cache == "miss" and other.attempts == 1


def test_wrong_answer_feedback_evicts_the_cached_answer(rt):
    q = "Explain how a refrigerator keeps food cold."
    first = ray.get(rt.submit(user_msg(q, 200), tenant="feedback"))
    assert first.cache == "miss"
    before = rt.stats()["cache"]["hits_semantic"]
    near = ray.get(rt.submit(user_msg(q.lower().rstrip("."), 200), tenant="feedback"))
    assert near.cache == "semantic"
    # the caller records a hit fire-and-forget: wait until the cache has counted it
    for _ in range(500):
        if rt.stats()["cache"]["hits_semantic"] > before:
            break
        time.sleep(0.01)
    out = rt.cache_feedback(near.request_id, wrong=True)
    assert out["found"] and out["evicted"]
    again = ray.get(rt.submit(user_msg(q.lower().rstrip("."), 200), tenant="feedback"))
    assert again.cache == "miss" and again.attempts == 1
    assert rt.cache_feedback("no-such-request") == {"request_id": "no-such-request", "found": False,
                                                     "evicted": None, "tightened": 0}


def test_real_time_prompts_bypass_the_cache(rt):
    q = "What is the latest price of copper today?"
    a = ray.get(rt.submit(user_msg(q, 64), tenant="acme"))
    b = ray.get(rt.submit(user_msg(q, 64), tenant="acme"))
    assert a.cache == b.cache == "bypass" and a.attempts == b.attempts == 1


def test_529_storm_falls_back_to_the_next_model(rt):
    fake_post(rt, "/_fake/config", {"p529_by_class": {"opus": 1.0}})
    res = ray.get(rt.submit(user_msg("Summarize: the sky is blue.", 64, model=rt.settings.router.opus_model),
                            cache=False))
    assert res.model == rt.settings.router.sonnet_model
    statuses = [h["status"] for h in res.history]
    assert statuses[-1] == 200 and 529 in statuses
    assert all(h["model"] == rt.settings.router.opus_model for h in res.history[:-1])


def test_overload_everywhere_is_a_typed_error_after_the_whole_chain(rt):
    fake_post(rt, "/_fake/config", {"p529": 1.0})
    with pytest.raises(OverloadedAfterFallback) as exc:
        ray.get(rt.submit(user_msg("Summarize: grass is green.", 64, model=rt.settings.router.sonnet_model),
                          cache=False))
    models = {a["model"] for a in exc.value.attempts}
    assert models == {rt.settings.router.sonnet_model, rt.settings.router.haiku_model}
    assert exc.value.request_id


def test_a_4xx_from_the_api_is_surfaced_and_never_retried(rt):
    before = fake_stats(rt)["by_status"].get("413", 0)
    huge = "lorem " * 260_000  # over the model's input limit: the API answers 413
    with pytest.raises(UpstreamError) as exc:
        ray.get(rt.submit(user_msg(huge, 16, model=rt.settings.router.sonnet_model), cache=False))
    assert exc.value.status == 413 and len(exc.value.attempts) == 1
    assert fake_stats(rt)["by_status"].get("413", 0) == before + 1


def test_map_keeps_order_and_returns_errors_as_values(rt):
    reqs = [user_msg(f"Translate to French: item {i}", 32) for i in range(6)]
    reqs.insert(3, user_msg("bad", 32, top_k=3))
    out = list(rt.map(reqs, tenant="acme", progress=False, max_in_flight=3))
    assert len(out) == 7 and isinstance(out[3], InvalidRequest)
    oks = [o for i, o in enumerate(out) if i != 3]
    assert all(isinstance(o, Result) for o in oks)
    assert [o.message.content[0].text for o in oks] == [
        ray.get(rt.submit(r, tenant="acme")).message.content[0].text for i, r in enumerate(reqs) if i != 3]


def test_submit_from_a_task_through_connect(rt):
    @ray.remote(num_cpus=0)
    def work(text):
        handle = runtime.connect()
        return ray.get(handle.submit(user_msg(text, 32), user_id="task-user")).model

    assert ray.get(work.remote("Extract the year: born in 1990")) == rt.settings.router.haiku_model


def test_a_killed_caller_still_yields_one_result(rt):
    fake_post(rt, "/_fake/config", {"latency_ms": 1500})
    ref = rt.submit(user_msg("Define entropy in one line.", 32), cache=False, request_id="req-kill-1")
    deadline = time.monotonic() + 60
    while fake_stats(rt)["in_flight"]["total"] < 1:  # the call is on the wire before the kill
        assert time.monotonic() < deadline, "the call never reached the API"
        time.sleep(0.01)
    for caller in rt.callers:
        ray.kill(caller, no_restart=False)
    fake_post(rt, "/_fake/config", {"latency_ms": 0})
    res = ray.get(ref, timeout=120)
    assert isinstance(res, Result) and res.request_id == "req-kill-1"
    rows = [r for r in rt.ledger_records() if r["request_id"] == "req-kill-1"]
    ok_rows = [r for r in rows if r["status"] == "ok"]
    assert any(r["message_id"] == res.message.id for r in ok_rows)
    # the killed call (which the API still answered and billed) is booked, and the re-run numbered after it
    assert [(r["attempt"], r["status"]) for r in rows if r["status"] == "unreconciled"] == [(1, "unreconciled")]
    assert res.attempts == 2


def test_a_400_from_the_api_is_surfaced_after_one_try(rt):
    before = fake_stats(rt)["by_status"].get("400", 0)
    # a cache_control of a type the API does not know passes our checks; the API refuses it
    bad = {"model": "auto", "max_tokens": 32, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Use the tool", "cache_control": {"type": "forever"}}]}]}
    with pytest.raises(UpstreamError) as exc:
        ray.get(rt.submit(bad, cache=False))
    assert exc.value.status == 400 and exc.value.error_type == "invalid_request_error"
    assert len(exc.value.attempts) == 1
    assert fake_stats(rt)["by_status"].get("400", 0) == before + 1
    rows = [r for r in rt.ledger_records() if r["request_id"] == exc.value.request_id]
    assert [r["status"] for r in rows] == ["error"]  # counted for error rates, not billed


def test_twenty_concurrent_identical_requests_make_one_api_call(rt):
    before = fake_stats(rt)["requests"]
    q = user_msg("Describe the water cycle for a ten year old.", 300)
    refs = [rt.submit(q, tenant="single-flight") for _ in range(20)]
    out = ray.get(refs)
    assert fake_stats(rt)["requests"] == before + 1
    assert sorted(r.cache for r in out).count("miss") == 1
    assert {r.message.content[0].text for r in out} == {out[0].message.content[0].text}
    assert sum(r.cost_usd for r in out) == pytest.approx(max(r.cost_usd for r in out))
    hits = [r for r in rt.ledger_records() if r["request_id"] in {x.request_id for x in out} and r["cache"] != "miss"]
    assert len(hits) == 19 and all(h["cost_usd"] in (None, 0) and h["saved_usd"] > 0 for h in hits)


def test_cost_report_cli_reads_the_ledger(rt, tmp_path):
    import subprocess
    import sys

    png = tmp_path / "report.png"
    proc = subprocess.run([sys.executable, "-m", "runtime.cli", "report", "--since", "1d", "--ledger",
                           str(rt.settings.ledger_path), "--png", str(png)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.stat().st_size > 1000
    assert "claude-haiku-5-5" in proc.stdout


def test_a_fallback_answer_is_not_cached_under_the_routed_model(rt):
    opus = rt.settings.router.opus_model
    q = user_msg("Summarize: fallback answers stay out of the cache.", 64, model=opus)
    fake_post(rt, "/_fake/config", {"p529_by_class": {"opus": 1.0}})
    first = ray.get(rt.submit(q, tenant="fallback-cache"))
    assert first.model != opus
    fake_post(rt, "/_fake/config", {"p529_by_class": {}})
    time.sleep(rt.settings.retry.breaker_cooldown_s + 0.1)  # opus's circuit may have opened: let it half-open
    again = ray.get(rt.submit(q, tenant="fallback-cache"))
    assert again.cache == "miss" and again.model == opus


def test_stream_yields_events_whose_text_is_the_answer_and_its_row_equals_the_bill(rt):
    from tests.runtime_fixtures import read_billing

    q = user_msg("Stream an explanation of ocean tides for a curious child.", 300)
    events = list(rt.stream(q, tenant="streaming", user_id="s1"))
    assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta"
                   and e["delta"]["type"] == "text_delta")
    mid = events[0]["message"]["id"]
    assert text
    (row,) = [r for r in rt.ledger_records() if r["message_id"] == mid]
    (line,) = [b for b in read_billing(rt.settings) if b["id"] == mid]
    assert (row["input_tokens"], row["output_tokens"]) == (line["input_tokens"], line["output_tokens"])
    assert row["cost_usd"] == pytest.approx(line["cost_usd"])
    # the complete streamed answer went to the cache: the same question streams back from it, for $0
    again = list(rt.stream(q, tenant="streaming", user_id="s1"))
    assert "".join(e["delta"]["text"] for e in again if e["type"] == "content_block_delta") == text
    hits = [r for r in rt.ledger_records() if r["request_id"] != row["request_id"] and r["cache"] == "exact"
            and r["user_id"] == "s1"]
    assert hits and all(h["cost_usd"] is None for h in hits)


async def test_awaiting_submit_and_async_streaming(rt):
    res = await rt.submit(user_msg("Name a prime number.", 16), cache=False)
    assert res.message.content[0].text
    kinds = [e["type"] async for e in rt.astream(user_msg("Name an even number.", 16), cache=False)]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"


def _counted(n: int, seen: list[int], bad_every: int = 0):
    """A generator of ``n`` requests that records how far it was consumed (``n`` may be 10M: it is never
    materialised)."""
    for i in range(n):
        seen[0] = i + 1
        req = user_msg(f"Lazy input question number {i}.", 16)
        if bad_every and i % bad_every == bad_every - 1:
            req["temperature"] = 1.0  # refused locally: comes back as a value
        yield req


def test_map_consumes_its_input_lazily(rt):
    seen = [0]
    it = rt.map(_counted(10_000_000, seen), max_in_flight=4, progress=False, cache=False)
    first = [next(it) for _ in range(3)]
    assert all(isinstance(r, Result) for r in first)
    assert seen[0] <= 3 + 4
    it.close()


async def test_amap_is_lazy_yields_as_completed_and_errors_as_values(rt):
    seen = [0]
    got = []
    async for i, value in rt.amap(_counted(10_000_000, seen, bad_every=5), max_in_flight=8, with_index=True,
                                  cache=False, request_id="amap-lazy"):
        got.append((i, value))
        assert seen[0] <= len(got) + 8  # never more than the window ahead of what was yielded
        if len(got) == 30:
            break
    for i, value in got:
        if i % 5 == 4:
            assert isinstance(value, InvalidRequest) and value.field == "temperature"
        else:
            assert isinstance(value, Result) and value.request_id == f"amap-lazy-{i}"


async def test_amap_ordered_keeps_input_order_from_an_async_source(rt):
    async def source():
        for i in range(12):
            yield user_msg(f"Ordered async question {i}.", 16)

    out = [r async for r in rt.amap(source(), ordered=True, max_in_flight=4, cache=False, request_id="amap-ord")]
    assert [r.request_id for r in out] == [f"amap-ord-{i}" for i in range(12)]


def test_call_and_acall_through_the_caller_actors_return_results_and_raise_typed_errors(rt):
    import asyncio

    assert rt._local is None  # this runtime has no in-process caller: call goes through the actors
    res = rt.call(user_msg("Name a planet.", 16), cache=False)
    assert isinstance(res, Result) and res.attempts == 1
    bad = {"model": "auto", "max_tokens": 32, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Use the tool", "cache_control": {"type": "forever"}}]}]}
    with pytest.raises(UpstreamError) as exc:
        rt.call(bad, cache=False)
    assert exc.value.status == 400
    got = asyncio.run(rt.acall(user_msg("Name a moon.", 16), cache=False))
    assert isinstance(got, Result) and got.request_id != res.request_id
