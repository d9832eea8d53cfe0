"""The Admin API endpoints of the fake API through the SDK: admin-key auth, usage and cost reports that agree
with the billing log (batch at half price, other platforms left out), and the configured rate limits."""

from __future__ import annotations

import time
from collections import defaultdict

import anthropic
import pytest

from runtime.fake_api import read_billing
from runtime.fake_api.admin import iso
from runtime.settings import ClassLimits
from tests.fake_api_fixtures import ADMIN_KEY, HAIKU, KEY, SONNET, client, start_server, user, wait_until

USAGE = "/v1/organizations/usage_report/messages"
COST = "/v1/organizations/cost_report"


def _admin(srv, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.url, api_key=kw.pop("api_key", ADMIN_KEY), max_retries=0, **kw)


def _get(c: anthropic.Anthropic, path: str, **params) -> dict:
    return c.get(path, cast_to=object, options={"params": params})


def test_admin_routes_need_an_admin_key_and_admin_keys_cannot_send_messages(tmp_path):
    with start_server(tmp_path) as s:
        since = iso(time.time() - 60)
        with pytest.raises(anthropic.AuthenticationError):
            _get(_admin(s, api_key=KEY), USAGE, starting_at=since)
        with pytest.raises(anthropic.AuthenticationError):
            _admin(s, api_key=KEY).organization.rate_limits.list()
        with pytest.raises(anthropic.AuthenticationError):
            client(s, api_key=ADMIN_KEY).messages.create(model=HAIKU, max_tokens=5, messages=user("x"))
        assert _get(_admin(s), USAGE, starting_at=since)["data"][0]["results"] == []
    # with a configured admin key, only that key is accepted
    with start_server(tmp_path, admin_api_key=ADMIN_KEY + "x") as s:
        with pytest.raises(anthropic.AuthenticationError):
            _get(_admin(s), COST, starting_at=iso(time.time()))
        assert _get(_admin(s, api_key=ADMIN_KEY + "x"), COST, starting_at=iso(time.time()))["data"]


def test_usage_and_cost_reports_agree_with_the_billing_log(tmp_path):
    other_key = "sk-test-" + "other"
    with start_server(tmp_path, batch_seconds=0.2) as s:
        c1, c2 = client(s), client(s, api_key=other_key)
        for i in range(3):
            c1.messages.create(model=HAIKU, max_tokens=40, messages=user(f"first key {i}"))
        c2.messages.create(model=SONNET, max_tokens=40, messages=user("second key"))
        b = c1.messages.batches.create(requests=[
            {"custom_id": "b1", "params": {"model": HAIKU, "max_tokens": 40, "messages": user("first key 0")}}])
        wait_until(lambda: c1.messages.batches.retrieve(b.id).processing_status == "ended", what="batch end")
        pytest.importorskip("botocore")
        from tests.fake_api_fixtures import bedrock
        bedrock(s).messages.create(model="anthropic.claude-haiku-5-5-v1:0", max_tokens=40, messages=user("aws"))

        lines = read_billing(tmp_path / "billing.jsonl")
        assert len(lines) == 6 and sum(ln["platform"] == "bedrock" for ln in lines) == 1
        anth = [ln for ln in lines if ln["platform"] == "anthropic"]
        want: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
        for ln in anth:
            k = (ln["api_key_id"], ln["model"], ln["service_tier"])
            want[k][0] += ln["input_tokens"]
            want[k][1] += ln["output_tokens"]

        adm = _admin(s)
        since = iso(time.time() - 86_400)  # two daily buckets at most, whenever the test runs
        # the SDK writes a list parameter in brackets: group_by[]=api_key_id&group_by[]=model&...
        rep = _get(adm, USAGE, starting_at=since, bucket_width="1d", group_by=["api_key_id", "model", "service_tier"])
        got: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
        for bucket in rep["data"]:
            for r in bucket["results"]:
                k = (r["api_key_id"], r["model"], r["service_tier"])
                got[k][0] += r["uncached_input_tokens"]
                got[k][1] += r["output_tokens"]
                assert r["workspace_id"] is None and r["context_window"] is None
        assert dict(got) == dict(want)
        assert {k[0] for k in got} == {ln["api_key_id"] for ln in anth} and len({k[0] for k in got}) == 2
        assert any(k[2] == "batch" for k in got)
        assert rep["has_more"] is False

        # minute buckets, one per page: the pages together hold every token
        pages, page, total_out = 0, None, 0
        while True:
            params = dict(starting_at=iso(time.time() - 300), bucket_width="1m", limit=1)
            if page:
                params["page"] = page
            rep = _get(adm, USAGE, **params)
            pages += 1
            total_out += sum(r["output_tokens"] for bk in rep["data"] for r in bk["results"])
            if not rep["has_more"]:
                break
            page = rep["next_page"]
        assert pages >= 5 and total_out == sum(ln["output_tokens"] for ln in anth)

        cost = _get(adm, COST, starting_at=since)
        rows = [r for bk in cost["data"] for r in bk["results"]]
        assert rows and all(r["currency"] == "USD" for r in rows)
        usd = sum(float(r["amount"]) / 100 for r in rows)
        assert usd == pytest.approx(sum(ln["cost_usd"] for ln in anth), rel=1e-9)
        detail = _get(adm, COST, starting_at=since, group_by=["description"])
        batch_usd = sum(float(r["amount"]) / 100 for bk in detail["data"] for r in bk["results"]
                        if r["service_tier"] == "batch")
        # the batch request repeats "first key 0": the same usage at half the price
        same = next(ln for ln in anth if not ln["batch"] and ln["input_tokens"] == next(
            x for x in anth if x["batch"])["input_tokens"])
        assert batch_usd == pytest.approx(same["cost_usd"] / 2, rel=1e-9)


def test_rate_limits_endpoint_lists_the_configured_limits_through_the_sdk(tmp_path):
    limits = {"haiku": ClassLimits(rpm=300, itpm=60_000, otpm=9_000),
              "sonnet": ClassLimits(rpm=100, itpm=30_000, otpm=8_000)}
    with start_server(tmp_path, limits=limits) as s:
        entries = list(_admin(s).organization.rate_limits.list())
        by_models = {e.group.id: e for e in entries}
        haiku = by_models["rlg_fake_haiku"]
        assert haiku.group.type == "model_group" and HAIKU in haiku.models
        assert {v.type: v.value for v in haiku.limits} == {
            "requests_per_minute": 300, "input_tokens_per_minute_cache_aware": 60_000,
            "output_tokens_per_minute": 9_000}
        only = list(_admin(s).organization.rate_limits.list(model=SONNET))
        assert [e.group.id for e in only] == ["rlg_fake_sonnet"]
        with pytest.raises(anthropic.NotFoundError):
            list(_admin(s).organization.rate_limits.list(model="claude-imaginary-9"))
        # what the endpoint reports is what the buckets enforce, also after a change at run time
        s.configure(limits={"haiku": {"rpm": 7, "itpm": 1000, "otpm": 1000}})
        haiku = next(e for e in _admin(s).organization.rate_limits.list() if e.group.id == "rlg_fake_haiku")
        assert haiku.limits[0].value == 7
