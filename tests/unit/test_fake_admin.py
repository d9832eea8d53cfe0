"""The Admin API reports the fake API serves, computed from billing lines: buckets, grouping, filters, pages,
prices (batch at half) and the rate-limit listing. Pure: billing lines are written here with known times."""

from __future__ import annotations

import pytest

from runtime.fake_api import admin
from runtime.fake_api.admin import UsageBook
from runtime.fake_api.protocol import ApiError
from runtime.pricing import price
from runtime.settings import ClassLimits, Settings, default_models
from runtime.usage import Usage

MODELS = default_models()
DAY = 86_400
T0 = 1_790_000_000 - 1_790_000_000 % DAY  # a UTC midnight


def q(**params) -> admin.GetAll:
    """A query string as the handler sees it: every name maps to a list of values."""
    norm = {k: v if isinstance(v, list) else [v] for k, v in params.items()}
    return lambda name: list(norm.get(name, []))


def line(ts, model="claude-haiku-5-5", key="apikey_aaa", inp=100, out=10, w5=0, w1=0, read=0, batch=False,
         platform="anthropic") -> dict:
    return {"ts": ts, "model": model, "api_key_id": key, "input_tokens": inp, "output_tokens": out,
            "cache_write_5m": w5, "cache_write_1h": w1, "cache_read_input_tokens": read, "batch": batch,
            "platform": platform}


@pytest.fixture
def book() -> UsageBook:
    b = UsageBook(MODELS)
    b.add(line(T0 + 10))
    b.add(line(T0 + 70, key="apikey_bbb", inp=50, out=5, w5=2000, read=300))
    b.add(line(T0 + 3700, model="claude-sonnet-5-5", out=40, w1=1000))
    b.add(line(T0 + DAY + 5, batch=True, inp=1000, out=100))
    b.add(line(T0 + 20, platform="bedrock", inp=10**6))   # not Anthropic usage: never in the reports
    return b


def test_daily_totals_and_every_result_field(book):
    rep = admin.usage_report(book, q(starting_at=admin.iso(T0), ending_at=admin.iso(T0 + 2 * DAY)), now=T0 + 3 * DAY)
    assert [b["starting_at"] for b in rep["data"]] == [admin.iso(T0), admin.iso(T0 + DAY)]
    assert rep["has_more"] is False and rep["next_page"] is None
    (day0,), (day1,) = rep["data"][0]["results"], rep["data"][1]["results"]
    assert day0["uncached_input_tokens"] == 250 and day0["output_tokens"] == 55
    assert day0["cache_creation"] == {"ephemeral_5m_input_tokens": 2000, "ephemeral_1h_input_tokens": 1000}
    assert day0["cache_read_input_tokens"] == 300
    assert day0["server_tool_use"] == {"web_search_requests": 0}
    for g in admin.USAGE_GROUPS:
        assert day0[g] is None  # not grouped: null, as the API answers
    assert day1["uncached_input_tokens"] == 1000


def test_group_by_and_filters(book):
    rep = admin.usage_report(book, q(starting_at=admin.iso(T0), ending_at=admin.iso(T0 + DAY),
                                     **{"group_by[]": ["api_key_id", "model"]}), now=T0 + DAY)
    rows = {(r["api_key_id"], r["model"]): r for r in rep["data"][0]["results"]}
    assert set(rows) == {("apikey_aaa", "claude-haiku-5-5"), ("apikey_bbb", "claude-haiku-5-5"),
                         ("apikey_aaa", "claude-sonnet-5-5")}
    assert rows["apikey_bbb", "claude-haiku-5-5"]["cache_read_input_tokens"] == 300
    assert rows["apikey_aaa", "claude-haiku-5-5"]["service_tier"] is None
    tiers = admin.usage_report(book, q(starting_at=admin.iso(T0 + DAY), group_by="service_tier"), now=T0 + 2 * DAY)
    assert [r["service_tier"] for r in tiers["data"][0]["results"]] == ["batch"]
    only = admin.usage_report(book, q(starting_at=admin.iso(T0), ending_at=admin.iso(T0 + DAY),
                                      **{"api_key_ids[]": "apikey_bbb"}), now=T0 + DAY)
    assert only["data"][0]["results"][0]["uncached_input_tokens"] == 50


def test_minute_buckets_pages_and_empty_buckets(book):
    first = admin.usage_report(book, q(starting_at=admin.iso(T0 + 30), ending_at=admin.iso(T0 + 180),
                                       bucket_width="1m", limit="2"), now=T0 + DAY)
    # snapped to the minute: [T0, T0+60) and [T0+60, T0+120); one more bucket remains
    assert [b["starting_at"] for b in first["data"]] == [admin.iso(T0), admin.iso(T0 + 60)]
    assert [r["uncached_input_tokens"] for b in first["data"] for r in b["results"]] == [100, 50]
    assert first["has_more"] and first["next_page"].startswith("page_")
    second = admin.usage_report(book, q(starting_at=admin.iso(T0 + 30), ending_at=admin.iso(T0 + 180),
                                        bucket_width="1m", limit="2", page=first["next_page"]), now=T0 + DAY)
    assert [b["starting_at"] for b in second["data"]] == [admin.iso(T0 + 120)]
    assert second["data"][0]["results"] == [] and second["has_more"] is False
    hourly = admin.usage_report(book, q(starting_at=admin.iso(T0), bucket_width="1h", limit="2"), now=T0 + 7200)
    assert [sum(r["output_tokens"] for r in b["results"]) for b in hourly["data"]] == [15, 40]
    # without ending_at the report runs to now: today so far is one bucket
    today = admin.usage_report(book, q(starting_at=admin.iso(T0)), now=T0 + 60)
    assert len(today["data"]) == 1 and not today["has_more"]


@pytest.mark.parametrize("params,needle", [
    ({}, "starting_at: Field required"),
    ({"starting_at": "yesterday"}, "starting_at"),
    ({"starting_at": admin.iso(T0), "bucket_width": "1w"}, "bucket_width"),
    ({"starting_at": admin.iso(T0), "bucket_width": "1h", "limit": "169"}, "between 1 and 168"),
    ({"starting_at": admin.iso(T0), "group_by[]": "user_id"}, "group_by"),
    ({"starting_at": admin.iso(T0), "page": "garbage"}, "page"),
])
def test_bad_report_parameters_are_400(book, params, needle):
    with pytest.raises(ApiError) as ei:
        admin.usage_report(book, q(**params), now=T0 + DAY)
    assert ei.value.status == 400 and needle in ei.value.message


def _usd(amount: str) -> float:
    return float(amount) / 100


def test_cost_report_prices_like_the_ledger_with_batch_at_half(book):
    s = Settings()
    want_day0 = sum(price(Usage(input_tokens=i, output_tokens=o, cache_write_5m_tokens=w5,
                                cache_write_1h_tokens=w1, cache_read_tokens=r), m, s).total_usd
                    for m, i, o, w5, w1, r in [("claude-haiku-5-5", 100, 10, 0, 0, 0),
                                               ("claude-haiku-5-5", 50, 5, 2000, 0, 300),
                                               ("claude-sonnet-5-5", 100, 40, 0, 1000, 0)])
    want_day1 = price(Usage(input_tokens=1000, output_tokens=100), "claude-haiku-5-5", s, batch=True).total_usd
    rep = admin.cost_report(book, q(starting_at=admin.iso(T0), ending_at=admin.iso(T0 + 2 * DAY)), now=T0 + 3 * DAY)
    (d0,), (d1,) = rep["data"][0]["results"], rep["data"][1]["results"]
    assert d0["currency"] == "USD" and d0["description"] is None and d0["model"] is None
    assert _usd(d0["amount"]) == pytest.approx(want_day0, rel=1e-9)
    assert _usd(d1["amount"]) == pytest.approx(want_day1, rel=1e-9)
    full = price(Usage(input_tokens=1000, output_tokens=100), "claude-haiku-5-5", s).total_usd
    assert want_day1 == pytest.approx(full / 2)
    detail = admin.cost_report(book, q(starting_at=admin.iso(T0 + DAY), **{"group_by[]": "description"}),
                               now=T0 + 2 * DAY)
    rows = detail["data"][0]["results"]
    assert {r["token_type"] for r in rows} == {"uncached_input_tokens", "output_tokens"}
    assert all(r["service_tier"] == "batch" and r["cost_type"] == "tokens" and r["model"] == "claude-haiku-5-5"
               and r["description"].endswith(", Batch") for r in rows)
    assert sum(_usd(r["amount"]) for r in rows) == pytest.approx(want_day1)
    with pytest.raises(ApiError):
        admin.cost_report(book, q(starting_at=admin.iso(T0), bucket_width="1h"), now=T0 + DAY)


def test_the_book_reloads_from_a_billing_file(tmp_path, book):
    import orjson
    path = tmp_path / "billing.jsonl"
    lines = [line(T0 + 10), line(T0 + 70, key="apikey_bbb", inp=50, out=5, w5=2000, read=300),
             line(T0 + 3700, model="claude-sonnet-5-5", out=40, w1=1000), line(T0 + DAY + 5, batch=True, inp=1000,
                                                                                 out=100)]
    path.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines) + b'{"torn": ')
    again = UsageBook(MODELS)
    again.load(path)
    params = q(starting_at=admin.iso(T0), ending_at=admin.iso(T0 + 2 * DAY))
    assert admin.usage_report(again, params, now=T0 + 3 * DAY) == admin.usage_report(book, params, now=T0 + 3 * DAY)


def test_rate_limits_list_the_configured_limits_per_model_class():
    limits = {"haiku": ClassLimits(rpm=300, itpm=60_000, otpm=9_000)}
    rep = admin.rate_limits(MODELS, limits, q())
    by_cls = {e["group"]["id"]: e for e in rep["data"]}
    haiku = by_cls["rlg_fake_haiku"]
    assert haiku["type"] == "rate_limit" and haiku["group"]["type"] == "model_group"
    assert "claude-haiku-5-5" in haiku["models"] and "claude-sonnet-5-5" not in haiku["models"]
    assert {v["type"]: v["value"] for v in haiku["limits"]} == {
        "requests_per_minute": 300, "input_tokens_per_minute_cache_aware": 60_000, "output_tokens_per_minute": 9_000}
    # a class without configured limits is unlimited, reported as the headers report it
    assert by_cls["rlg_fake_sonnet"]["limits"][0]["value"] == 1_000_000_000
    one = admin.rate_limits(MODELS, limits, q(model="claude-sonnet-5-5"))
    assert [e["group"]["id"] for e in one["data"]] == ["rlg_fake_sonnet"]
    with pytest.raises(ApiError) as ei:
        admin.rate_limits(MODELS, limits, q(model="claude-imaginary"))
    assert ei.value.status == 404
    assert admin.rate_limits(MODELS, limits, q(group_type="batch"))["data"] == []
    page1 = admin.rate_limits(MODELS, limits, q(limit="2"))
    page2 = admin.rate_limits(MODELS, limits, q(limit="2", page=page1["next_page"]))
    assert [e["id"] for e in page1["data"] + page2["data"]] == [e["id"] for e in rep["data"]]
