"""The ledger equals the API's own bill: rows and token sums, with faults injected and the ledger killed mid-run."""

from collections import Counter

import pytest
import ray

from tests.runtime_fixtures import fake_post, fast_settings, read_billing, start_local, user_msg

N = 1000


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    settings = fast_settings(tmp_path_factory.mktemp("ledger_exact"), cache={"enabled": False},
                             retry={"backoff_base_s": 0.01, "backoff_max_s": 0.05, "attempts_per_model": 6,
                                    "breaker_failures": 1000})
    rt = start_local(settings)
    yield rt
    rt.shutdown()
    ray.shutdown()


def _requests(tag: str, n: int):
    models = [None, "claude-haiku-5-5", "claude-sonnet-5-5"]
    out = []
    for i in range(n):
        m = models[i % 3]
        kw = {"model": m} if m else {}
        out.append(user_msg(f"{tag} question {i}: explain item {i % 37} briefly", 16 + (i % 5) * 20, **kw))
    return out


def _billed_rows(rt):
    return [r for r in rt.ledger_records() if r["status"] == "ok" and r["message_id"]]


def _compare(rt):
    billing = read_billing(rt.settings)
    rows = _billed_rows(rt)
    assert len({r["message_id"] for r in rows}) == len(rows), "a billed response is in the ledger twice"
    assert {b["id"] for b in billing} == {r["message_id"] for r in rows}
    for key_b, key_l in [("input_tokens", "input_tokens"), ("output_tokens", "output_tokens"),
                         ("cache_read_input_tokens", "cache_read_tokens")]:
        assert sum(b[key_b] for b in billing) == sum(r[key_l] for r in rows), key_b
    assert sum(b["cache_creation_input_tokens"] for b in billing) == sum(
        r["cache_write_5m_tokens"] + r["cache_write_1h_tokens"] for r in rows)
    by_model_bill = Counter(b["model"] for b in billing)
    by_model_ledger = Counter(r["model"] for r in rows)
    assert by_model_bill == by_model_ledger
    return billing, rows


def test_ledger_matches_billing_log_with_faults(rt):
    fake_post(rt, "/_fake/config", {"p529": 0.05, "p500": 0.02})
    results = list(rt.map(_requests("faults", N), user_id="u", progress=False, max_in_flight=128))
    fake_post(rt, "/_fake/config", {"p529": 0.0, "p500": 0.0})
    ok = [r for r in results if not isinstance(r, BaseException)]
    assert len(ok) == N, Counter(type(r).__name__ for r in results if isinstance(r, BaseException))
    assert sum(r.attempts for r in ok) > N  # faults really happened and were retried
    billing, rows = _compare(rt)
    assert len(billing) == N


def test_ledger_survives_being_killed_mid_run(rt):
    before = len(_billed_rows(rt))
    results = []
    # kill the ledger once a quarter of the answers are in: the rest are in flight or not yet sent
    for i, res in enumerate(rt.map(_requests("kill", 400), user_id="k", progress=False, max_in_flight=64)):
        results.append(res)
        if i == 100:
            old_pid = ray.get(rt.ledger.stats.remote())["pid"]
            ray.kill(rt.ledger, no_restart=False)
    assert ray.get(rt.ledger.stats.remote())["pid"] != old_pid, "the ledger was not restarted"
    assert all(not isinstance(r, BaseException) for r in results)
    _, rows = _compare(rt)
    assert len(rows) == before + 400
