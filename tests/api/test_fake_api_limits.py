"""RPM / ITPM / OTPM buckets of the fake API: 429s with retry-after, refill, OTPM correction, and the
anthropic-ratelimit-* headers on every response."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import anthropic
import pytest

from runtime.buckets import ManualClock
from runtime.settings import ClassLimits
from tests.fake_api_fixtures import HAIKU, SONNET, client, start_server, user

KINDS = ("requests", "input-tokens", "output-tokens", "tokens")


def _limits(rpm=1000, itpm=1_000_000, otpm=1_000_000):
    lim = ClassLimits(rpm=rpm, itpm=itpm, otpm=otpm)
    return {c: lim for c in ("haiku", "sonnet", "opus", "fable")}


def test_headers_on_a_200(tmp_path):
    # a frozen clock: no refill between the take and the header, so remaining is exact
    with start_server(tmp_path, limits=_limits(rpm=50, itpm=30_000, otpm=8_000), clock=ManualClock()) as s:
        raw = client(s).messages.with_raw_response.create(model=SONNET, max_tokens=100, messages=user("hi"))
        m = raw.parse()
        h = raw.headers
        assert h["request-id"].startswith("req_")
        for k in KINDS:
            for part in ("limit", "remaining", "reset"):
                assert f"anthropic-ratelimit-{k}-{part}" in h
        assert h["anthropic-ratelimit-requests-limit"] == "50"
        assert h["anthropic-ratelimit-requests-remaining"] == "49"
        assert h["anthropic-ratelimit-input-tokens-remaining"] == str(30_000 - m.usage.input_tokens)
        # OTPM was charged at max_tokens, then corrected to the actual output
        assert h["anthropic-ratelimit-output-tokens-remaining"] == str(8_000 - m.usage.output_tokens)
        reset = datetime.strptime(h["anthropic-ratelimit-requests-reset"], "%Y-%m-%dT%H:%M:%SZ")
        # RFC 3339 UTC; a bucket one request short of full is full again within 60/50 s
        assert reset.replace(tzinfo=timezone.utc) >= datetime.now(timezone.utc).replace(microsecond=0)
        assert "retry-after" not in h


def test_unlimited_reports_large_limits(tmp_path):
    with start_server(tmp_path, limits=None) as s:
        h = client(s).messages.with_raw_response.create(model=HAIKU, max_tokens=5, messages=user("x")).headers
        assert int(h["anthropic-ratelimit-requests-limit"]) >= 10**9
        assert int(h["anthropic-ratelimit-tokens-remaining"]) >= 10**9


def test_rpm_429_with_retry_after_then_success_after_refill(tmp_path):
    clock = ManualClock()
    with start_server(tmp_path, limits=_limits(rpm=2), clock=clock) as s:
        c = client(s)
        for _ in range(2):
            c.messages.create(model=HAIKU, max_tokens=5, messages=user("x"))
        with pytest.raises(anthropic.RateLimitError) as ei:
            c.messages.create(model=HAIKU, max_tokens=5, messages=user("x"))
        h = ei.value.response.headers
        assert ei.value.body["error"]["type"] == "rate_limit_error"
        assert h["retry-after"] == "30" and h["retry-after-ms"] == "30000"  # 2/min refills one every 30 s
        assert h["anthropic-ratelimit-requests-remaining"] == "0"
        assert ei.value.response.headers["request-id"] == ei.value.body["request_id"]
        clock.advance(29.0)
        with pytest.raises(anthropic.RateLimitError):
            c.messages.create(model=HAIKU, max_tokens=5, messages=user("x"))
        clock.advance(1.0)
        assert c.messages.create(model=HAIKU, max_tokens=5, messages=user("x")).id
        # a refused request takes nothing, so the one that passed left the bucket empty again
        st = s.stats()
        assert st["by_status"] == {"200": 3, "429": 2} and st["billed"] == 3


def test_refill_in_real_time_honouring_retry_after_ms(tmp_path):
    # 2 per 2 s: one request comes back every second
    with start_server(tmp_path, limits=_limits(rpm=2), limit_period_s=2.0) as s:
        c = client(s)
        c.messages.create(model=HAIKU, max_tokens=5, messages=user("x"))
        c.messages.create(model=HAIKU, max_tokens=5, messages=user("x"))
        with pytest.raises(anthropic.RateLimitError) as ei:
            c.messages.create(model=HAIKU, max_tokens=5, messages=user("x"))
        wait_ms = int(ei.value.response.headers["retry-after-ms"])
        assert 0 < wait_ms <= 1000
        assert ei.value.response.headers["retry-after"] == "1"  # integer seconds, rounded up
        time.sleep(wait_ms / 1000 + 0.05)
        assert c.messages.create(model=HAIKU, max_tokens=5, messages=user("x")).id


def test_sdk_retries_a_429_by_itself_when_allowed(tmp_path):
    clock = ManualClock()  # frozen, so the third request is refused whatever the machine's speed
    with start_server(tmp_path, limits=_limits(rpm=2), limit_period_s=0.6, clock=clock) as s:
        c = client(s, max_retries=5)
        c.messages.create(model=HAIKU, max_tokens=5, messages=user("x"))
        c.messages.create(model=HAIKU, max_tokens=5, messages=user("x"))
        # time moves on while the SDK sleeps the 300 ms it was told to
        threading.Timer(0.1, clock.advance, args=(1.0,)).start()
        assert c.messages.create(model=HAIKU, max_tokens=5, messages=user("x")).id
        st = s.stats()
        assert st["by_status"]["200"] == 3 and st["by_status"]["429"] >= 1


def test_otpm_charged_at_max_tokens_on_admission(tmp_path):
    clock = ManualClock()
    with start_server(tmp_path, limits=_limits(otpm=1_000), clock=clock, output_tokens=10) as s:
        c = client(s)
        # max_tokens above what is left is refused even though the real output would fit
        with pytest.raises(anthropic.RateLimitError):
            c.messages.create(model=HAIKU, max_tokens=1_001, messages=user("x"))
        m = c.messages.create(model=HAIKU, max_tokens=900, messages=user("x"))
        assert m.usage.output_tokens == 10
        # corrected to 10 at the end: 990 left, so another 900 fits
        raw = c.messages.with_raw_response.create(model=HAIKU, max_tokens=900, messages=user("x"))
        assert raw.headers["anthropic-ratelimit-output-tokens-remaining"] == "980"


def test_itpm_counts_input_and_429s_when_exhausted(tmp_path):
    clock = ManualClock()
    with start_server(tmp_path, limits=_limits(itpm=100), clock=clock) as s:
        c = client(s)
        prompt = user("word " * 60)  # 63 tokens with the message overhead
        c.messages.create(model=HAIKU, max_tokens=5, messages=prompt)
        with pytest.raises(anthropic.RateLimitError) as ei:
            c.messages.create(model=HAIKU, max_tokens=5, messages=prompt)
        assert ei.value.response.headers["anthropic-ratelimit-input-tokens-remaining"] == "37"
        # other classes have their own buckets
        assert c.messages.create(model=SONNET, max_tokens=5, messages=prompt).id


def test_limits_changed_at_run_time(tmp_path):
    with start_server(tmp_path, limits=None) as s:
        c = client(s)
        s.configure(limits={"haiku": {"rpm": 1, "itpm": 10_000, "otpm": 10_000}})
        c.messages.create(model=HAIKU, max_tokens=5, messages=user("x"))
        with pytest.raises(anthropic.RateLimitError):
            c.messages.create(model=HAIKU, max_tokens=5, messages=user("x"))
        assert c.messages.create(model=SONNET, max_tokens=5, messages=user("x")).id  # no limits for sonnet now
        s.reset()  # buckets refilled, stats cleared
        assert s.stats()["requests"] == 0
        assert c.messages.create(model=HAIKU, max_tokens=5, messages=user("x")).id
