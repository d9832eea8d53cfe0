"""Automatic prompt caching end to end: 300 requests sharing a ~5,000-token system prompt, sent with no
cache_control, at 60,000 ITPM against the embedded API (which makes an entry readable only once its writer's
response begins, so concurrent first calls would each pay the write without single-flight)."""

import time
from collections import Counter

import pytest
import ray

import runtime
from runtime.fake_api.tokenizer import count_text
from runtime.result import Result
from tests.runtime_fixtures import fake_stats, fast_settings, read_billing, uniform_limits

N = 300
ITPM = 60_000
MODEL = "claude-sonnet-5-5"
# ~5,000 tokens on the fake API's tokenizer (checked below)
SYSTEM = "\n".join(f"Policy {i}: answer support questions politely, cite section {i} of the handbook, never "
                   f"promise refunds beyond thirty days, and escalate billing disputes." for i in range(119))


def _settings(tmp, **over):
    # RPM and OTPM generous, ITPM the account's 60k: uncached, 300 x 5,000 tokens would need ~25 minutes
    return fast_settings(tmp, cache={"enabled": False}, limits=uniform_limits(4_000, ITPM, 400_000),
                         fake_api={"enabled": True, "latency_ms": 50.0}, **over)


@pytest.fixture(scope="module")
def ray_up():
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="claude_runtime_tests",
             log_to_driver=False)
    yield
    ray.shutdown()


def _requests(tag: str, n: int) -> list[dict]:
    return [{"model": MODEL, "max_tokens": 16, "system": SYSTEM,
             "messages": [{"role": "user", "content": f"{tag} customer {i}: where is order {7_000 + i}?"}]}
            for i in range(n)]


def _lines(rt, prefix: str) -> list[dict]:
    return [b for b in read_billing(rt.settings) if (b.get("runtime_request_id") or "").startswith(prefix + "-")]


def test_the_system_prompt_is_about_5000_tokens():
    assert 4_800 <= count_text(SYSTEM, "v2") <= 5_200


def test_300_requests_share_one_write_and_read_the_rest_at_60k_itpm(ray_up, tmp_path):
    rt = runtime.start(_settings(tmp_path))
    try:
        t0 = time.perf_counter()
        results = list(rt.map(_requests("auto", N), request_id="auto", user_id="u", progress=False,
                              max_in_flight=N))
        wall = time.perf_counter() - t0
        failed = Counter(type(r).__name__ for r in results if not isinstance(r, Result))
        assert not failed, failed
        assert fake_stats(rt)["by_status"].get("429", 0) == 0

        lines = _lines(rt, "auto")
        assert len(lines) == N
        reads = sum(1 for b in lines if b["cache_read_input_tokens"] >= 4_800)
        writes = sum(1 for b in lines if b["cache_creation_input_tokens"] > 0)
        assert reads >= 0.9 * N and writes <= 3, (reads, writes)
        # uncached, the same traffic needs its whole input at 60k a minute: the run took a small part of that
        uncached_minutes = sum(b["input_tokens"] + b["cache_creation_input_tokens"] + b["cache_read_input_tokens"]
                               for b in lines) / ITPM
        assert uncached_minutes > 20 and wall < 0.1 * uncached_minutes * 60, (wall, uncached_minutes)

        # the ledger prices every read and write exactly as the API billed them
        rows = {r["message_id"]: r for r in rt.ledger_records() if r["request_id"].startswith("auto-")
                and r["message_id"]}
        assert set(rows) == {b["id"] for b in lines}
        for b in lines:
            r = rows[b["id"]]
            assert r["cost_usd"] == pytest.approx(b["cost_usd"], abs=1e-12)
            assert (r["cache_read_tokens"], r["cache_write_5m_tokens"] + r["cache_write_1h_tokens"]) == (
                b["cache_read_input_tokens"], b["cache_creation_input_tokens"])

        pc = rt.prompt_cache_savings()
        assert (pc["reads"], pc["writes"], pc["calls"]) == (reads, writes, N)
        assert pc["saved_usd"] == pytest.approx(pc["as_input_usd"] - pc["read_usd"] - pc["write_usd"])
        assert pc["saved_usd"] > 0.8 * pc["as_input_usd"]   # reads at 0.1x: most of the prefix's price saved
        tracker = rt.stats()["prompt_cache"]["tracker"]
        assert tracker["lead"] == writes and tracker["wrote"] == writes
    finally:
        rt.shutdown()


def test_prompt_caching_off_sends_requests_as_given(ray_up, tmp_path):
    rt = runtime.start(_settings(tmp_path, prompt_caching="off"))
    try:
        n = 6  # 6 x 5,000 tokens fit one minute of ITPM
        results = list(rt.map(_requests("off", n), request_id="off", progress=False))
        assert all(isinstance(r, Result) for r in results)
        # one more, turned on for itself: the per-request override works in both directions
        on = ray.get(rt.submit(_requests("on", 1)[0], request_id="on-0", prompt_cache=True))
        lines = _lines(rt, "off")
        assert len(lines) == n
        assert all(b["cache_creation_input_tokens"] == 0 and b["cache_read_input_tokens"] == 0 for b in lines)
        assert all(b["input_tokens"] >= 4_800 for b in lines)
        assert _lines(rt, "on")[0]["cache_creation_input_tokens"] >= 4_800 and on.cost_usd > 0
        pc = rt.prompt_cache_savings()
        assert (pc["reads"], pc["writes"]) == (0, 1)
        assert rt.stats()["prompt_cache"]["tracker"]["lead"] == 1
    finally:
        rt.shutdown()
