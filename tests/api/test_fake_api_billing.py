"""The fake API's billing log and stats: one line per billed response, matching what the client was told."""

from __future__ import annotations

import anthropic
import httpx2
import pytest

from runtime.fake_api import read_billing
from runtime.fake_api.protocol import key_id
from runtime.pricing import price
from runtime.settings import Settings
from runtime.usage import Usage
from tests.fake_api_fixtures import HAIKU, KEY, SONNET, async_client, client, start_server, user

FIELDS = {"id", "request_id", "ts", "model", "model_class", "user_id", "input_tokens", "output_tokens",
          "cache_creation_input_tokens", "cache_read_input_tokens", "cache_write_5m", "cache_write_1h", "batch",
          "service_tier", "platform", "platform_model", "api_key_id", "client_request_id", "runtime_request_id",
          "runtime_attempt", "cost_usd"}


async def test_billing_lines_match_responses(tmp_path):
    path = tmp_path / "billing.jsonl"
    with start_server(tmp_path, billing_path=path) as s:
        c = client(s)
        seen = []
        raw = c.messages.with_raw_response.create(
            model=HAIKU, max_tokens=30, messages=user("one"), metadata={"user_id": "u-1"},
            extra_headers={"x-claude-runtime-request-id": "rt-123", "Idempotency-Key": "idem-9",
                           "x-claude-runtime-attempt": "3"})
        seen.append((raw.parse(), raw.headers["request-id"]))
        with c.messages.stream(model=SONNET, max_tokens=30, messages=user("two"),
                               extra_headers={"x-claude-runtime-attempt": "not-a-number"}) as st:
            final = st.get_final_message()
            seen.append((final, st.response.headers["request-id"]))
        async with async_client(s) as ac:
            araw = await ac.messages.with_raw_response.create(model=HAIKU, max_tokens=30, messages=user("three"))
            seen.append((await araw.parse(), araw.headers["request-id"]))
        # errors are not billed
        with pytest.raises(anthropic.BadRequestError):
            c.messages.create(model=HAIKU, max_tokens=0, messages=user("x"))
        s.configure(p529=1.0)
        with pytest.raises(anthropic.OverloadedError):
            c.messages.create(model=HAIKU, max_tokens=5, messages=user("x"))
        lines = read_billing(path)
        assert len(lines) == 3 == s.stats()["billed"]
        for (msg, rid), line in zip(seen, lines):
            assert FIELDS <= set(line)
            assert line["id"] == msg.id and line["request_id"] == rid
            assert line["model"] == msg.model and line["batch"] is False
            assert line["input_tokens"] == msg.usage.input_tokens
            assert line["output_tokens"] == msg.usage.output_tokens
            assert line["cache_read_input_tokens"] == msg.usage.cache_read_input_tokens
        assert lines[0]["user_id"] == "u-1" and lines[1]["user_id"] is None
        assert lines[0]["runtime_request_id"] == "rt-123" and lines[0]["client_request_id"] == "idem-9"
        assert lines[1]["model_class"] == "sonnet"
        assert lines[0]["runtime_attempt"] == 3 and lines[1]["runtime_attempt"] is None
        assert lines[2]["runtime_attempt"] is None and lines[2]["runtime_request_id"] is None
        assert {ln["api_key_id"] for ln in lines} == {key_id(KEY)} and key_id(KEY).startswith("apikey_")
        assert all(ln["platform"] == "anthropic" and ln["platform_model"] is None for ln in lines)
        assert all(ln["service_tier"] == "standard" and ln["cost_usd"] > 0 for ln in lines)
        # priced as the ledger prices it
        s_ = Settings()
        for ln in lines:
            u = Usage(input_tokens=ln["input_tokens"], output_tokens=ln["output_tokens"])
            assert ln["cost_usd"] == pytest.approx(price(u, ln["model"], s_).total_usd, rel=1e-9)
        assert KEY not in path.read_text()


def test_billing_survives_restart_by_appending(tmp_path):
    path = tmp_path / "b.jsonl"
    for _ in range(2):
        with start_server(tmp_path, billing_path=path) as s:
            client(s).messages.create(model=HAIKU, max_tokens=5, messages=user("x"))
    lines = read_billing(path)
    assert len(lines) == 2 and lines[0]["id"] != lines[1]["id"]


def test_stats_shape_and_reset(tmp_path):
    with start_server(tmp_path) as s:
        c = client(s)
        m = c.messages.create(model=SONNET, max_tokens=20, messages=user("x"))
        with pytest.raises(anthropic.NotFoundError):
            c.messages.create(model="claude-none", max_tokens=5, messages=user("x"))
        over_http = httpx2.get(f"{s.url}/_fake/stats").json()
        assert over_http == s.stats()
        assert over_http["requests"] == 2 and over_http["by_status"] == {"200": 1, "404": 1}
        sonnet = over_http["by_class"]["sonnet"]
        assert sonnet["requests"] == 1 and sonnet["by_status"] == {"200": 1}
        assert sonnet["input_tokens"] == m.usage.input_tokens and sonnet["output_tokens"] == m.usage.output_tokens
        assert over_http["billed"] == 1
        assert httpx2.post(f"{s.url}/_fake/reset").json() == {"ok": True}
        assert s.stats()["requests"] == 0 and s.stats()["by_class"] == {}
