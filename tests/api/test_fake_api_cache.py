"""Prompt caching in the fake API: writes then reads, TTL breakdown, expiry, scope, and what ITPM charges."""

from __future__ import annotations

from runtime.buckets import ManualClock
from runtime.fake_api.tokenizer import count_text
from runtime.settings import ClassLimits
from tests.fake_api_fixtures import HAIKU, SONNET, client, start_server, user

# 4,500 v2 tokens: above Haiku 5.5's minimum cacheable prefix (4,096), which the fake applies per model
LONG = "Shared instructions for every request in this tenant. " * 300


def _system(ttl=None):
    cc = {"type": "ephemeral"} if ttl is None else {"type": "ephemeral", "ttl": ttl}
    return [{"type": "text", "text": LONG, "cache_control": cc}]


def test_write_then_read_then_expire(tmp_path):
    clock = ManualClock()
    with start_server(tmp_path, clock=clock) as s:
        c = client(s)
        total = c.messages.count_tokens(model=HAIKU, system=_system(), messages=user("q1")).input_tokens
        first = c.messages.create(model=HAIKU, max_tokens=20, system=_system(), messages=user("q1")).usage
        assert first.cache_creation_input_tokens > 1000 and first.cache_read_input_tokens == 0
        assert first.cache_creation.ephemeral_5m_input_tokens == first.cache_creation_input_tokens
        assert first.input_tokens + first.cache_creation_input_tokens == total
        clock.advance(200)
        second = c.messages.create(model=HAIKU, max_tokens=20, system=_system(), messages=user("q2")).usage
        assert second.cache_read_input_tokens == first.cache_creation_input_tokens
        assert second.cache_creation_input_tokens == 0
        # the read refreshed the 5 minute TTL: 200 s + 200 s is past the first write's expiry but still fresh
        clock.advance(200)
        third = c.messages.create(model=HAIKU, max_tokens=20, system=_system(), messages=user("q3")).usage
        assert third.cache_read_input_tokens > 0
        clock.advance(301)
        fourth = c.messages.create(model=HAIKU, max_tokens=20, system=_system(), messages=user("q4")).usage
        assert fourth.cache_read_input_tokens == 0 and fourth.cache_creation_input_tokens > 0


def test_one_hour_ttl_breakdown(tmp_path):
    clock = ManualClock()
    with start_server(tmp_path, clock=clock) as s:
        c = client(s)
        u = c.messages.create(model=HAIKU, max_tokens=20, system=_system("1h"), messages=user("q")).usage
        assert u.cache_creation.ephemeral_1h_input_tokens == u.cache_creation_input_tokens > 0
        assert u.cache_creation.ephemeral_5m_input_tokens == 0
        clock.advance(3000)
        assert c.messages.create(model=HAIKU, max_tokens=20, system=_system("1h"),
                                 messages=user("q")).usage.cache_read_input_tokens > 0


def test_scope_is_per_key_and_model(tmp_path):
    with start_server(tmp_path) as s:
        a, b = client(s, api_key="key-a"), client(s, api_key="key-b")
        a.messages.create(model=HAIKU, max_tokens=5, system=_system(), messages=user("q"))
        assert a.messages.create(model=HAIKU, max_tokens=5, system=_system(),
                                 messages=user("q")).usage.cache_read_input_tokens > 0
        assert b.messages.create(model=HAIKU, max_tokens=5, system=_system(),
                                 messages=user("q")).usage.cache_read_input_tokens == 0
        assert a.messages.create(model=SONNET, max_tokens=5, system=_system(),
                                 messages=user("q")).usage.cache_read_input_tokens == 0


def test_short_prefixes_are_not_cached(tmp_path):
    with start_server(tmp_path) as s:
        c = client(s)
        sys_ = [{"type": "text", "text": "short", "cache_control": {"type": "ephemeral"}}]
        for _ in range(2):
            u = c.messages.create(model=HAIKU, max_tokens=5, system=sys_, messages=user("q")).usage
            assert u.cache_creation_input_tokens == 0 and u.cache_read_input_tokens == 0
    with start_server(tmp_path / "low", cache_min_tokens=1) as s:
        c = client(s)
        c.messages.create(model=HAIKU, max_tokens=5, system=sys_, messages=user("q"))
        assert c.messages.create(model=HAIKU, max_tokens=5, system=sys_,
                                 messages=user("q")).usage.cache_read_input_tokens == count_text("short")


def test_breakpoint_moving_along_a_conversation_reads_the_previous_prefix(tmp_path):
    with start_server(tmp_path) as s:
        c = client(s)

        def turn(text):
            return {"role": "user", "content": [{"type": "text", "text": text,
                                                 "cache_control": {"type": "ephemeral"}}]}

        msgs1 = [turn(LONG)]
        u1 = c.messages.create(model=HAIKU, max_tokens=5, messages=msgs1).usage
        msgs2 = [{"role": "user", "content": [{"type": "text", "text": LONG}]},
                 {"role": "assistant", "content": "ok"}, turn("and now a follow-up question")]
        u2 = c.messages.create(model=HAIKU, max_tokens=5, messages=msgs2).usage
        assert u2.cache_read_input_tokens == u1.cache_creation_input_tokens
        assert u2.cache_creation_input_tokens > 0  # the longer prefix is written for the next turn


def test_top_level_cache_control_caches_the_whole_prompt(tmp_path):
    with start_server(tmp_path) as s:
        c = client(s)
        msgs = user(LONG)
        u1 = c.messages.create(model=HAIKU, max_tokens=5, messages=msgs, cache_control={"type": "ephemeral"}).usage
        u2 = c.messages.create(model=HAIKU, max_tokens=5, messages=msgs, cache_control={"type": "ephemeral"}).usage
        assert u1.cache_creation_input_tokens > 1000 and u1.input_tokens == 0
        assert u2.cache_read_input_tokens == u1.cache_creation_input_tokens


def test_cache_reads_do_not_count_toward_itpm(tmp_path):
    clock = ManualClock()
    lim = {c: ClassLimits(rpm=100, itpm=10_000, otpm=100_000) for c in ("haiku", "sonnet", "opus", "fable")}
    with start_server(tmp_path, limits=lim, clock=clock) as s:
        c = client(s)
        raw = c.messages.with_raw_response.create(model=HAIKU, max_tokens=5, system=_system(), messages=user("q"))
        u = raw.parse().usage
        left = int(raw.headers["anthropic-ratelimit-input-tokens-remaining"])
        assert left == 10_000 - u.input_tokens - u.cache_creation_input_tokens
        raw2 = c.messages.with_raw_response.create(model=HAIKU, max_tokens=5, system=_system(), messages=user("q"))
        u2 = raw2.parse().usage
        assert u2.cache_read_input_tokens > 1000
        assert int(raw2.headers["anthropic-ratelimit-input-tokens-remaining"]) == left - u2.input_tokens


def test_the_minimum_cacheable_prefix_is_per_model(tmp_path):
    # 2,000 tokens: enough for Sonnet 5.5 (1,024), not for Haiku 5.5 (4,096)
    sys_ = [{"type": "text", "text": "word " * 2_000, "cache_control": {"type": "ephemeral"}}]
    with start_server(tmp_path) as s:
        c = client(s)
        assert c.messages.create(model=SONNET, max_tokens=5, system=sys_,
                                 messages=user("q")).usage.cache_creation_input_tokens == 2_000
        assert c.messages.create(model=HAIKU, max_tokens=5, system=sys_,
                                 messages=user("q")).usage.cache_creation_input_tokens == 0


def test_a_string_and_its_text_block_are_the_same_cached_prompt(tmp_path):
    with start_server(tmp_path) as s:
        c = client(s)
        turn1 = [{"role": "user", "content": [{"type": "text", "text": LONG, "cache_control": {"type": "ephemeral"}}]}]
        w = c.messages.create(model=HAIKU, max_tokens=5, messages=turn1).usage.cache_creation_input_tokens
        # the next turn sends the first one as a plain string and marks its own last block
        turn2 = [{"role": "user", "content": LONG}, {"role": "assistant", "content": "ok"},
                 {"role": "user", "content": [{"type": "text", "text": "more", "cache_control": {"type": "ephemeral"}}]}]
        assert c.messages.create(model=HAIKU, max_tokens=5, messages=turn2).usage.cache_read_input_tokens == w
        # and a string system prompt reads what its block form wrote
        marked = [{"role": "user", "content": [{"type": "text", "text": "q", "cache_control": {"type": "ephemeral"}}]}]
        w = c.messages.create(model=HAIKU, max_tokens=5, system=[{"type": "text", "text": LONG}],
                              messages=marked).usage.cache_creation_input_tokens
        assert w > 4_000
        assert c.messages.create(model=HAIKU, max_tokens=5, system=LONG,
                                 messages=marked).usage.cache_read_input_tokens == w


def test_concurrent_first_requests_each_write_until_a_response_begins(tmp_path):
    """The API makes an entry readable only once the writer's response has started: requests that arrive
    together with a new prefix all pay the write. The runtime's single-flight exists because of this."""
    import asyncio

    from tests.fake_api_fixtures import async_client

    with start_server(tmp_path, latency_ms=200) as s:
        async def go():
            c = async_client(s)
            return await asyncio.gather(*(c.messages.create(model=HAIKU, max_tokens=5, system=_system(),
                                                             messages=user(f"q{i}")) for i in range(5)))

        first = asyncio.run(go())
        assert all(m.usage.cache_creation_input_tokens > 4_000 for m in first)
        later = client(s).messages.create(model=HAIKU, max_tokens=5, system=_system(), messages=user("late"))
        assert later.usage.cache_read_input_tokens > 4_000


def test_cache_control_rules_are_enforced(tmp_path):
    import anthropic
    import pytest

    cc5, cc1 = {"type": "ephemeral"}, {"type": "ephemeral", "ttl": "1h"}
    with start_server(tmp_path) as s:
        c = client(s)

        def bad(**kw):
            with pytest.raises(anthropic.BadRequestError) as exc:
                c.messages.create(model=SONNET, max_tokens=5, **kw)
            return exc.value.message

        five = [{"type": "text", "text": f"part {i}", "cache_control": cc5} for i in range(5)]
        assert "maximum of 4 blocks with cache_control" in bad(system=five, messages=user("q"))
        # four is fine, and a top-level marker counts as one of them
        c.messages.create(model=SONNET, max_tokens=5, system=five[:4], messages=user("q"))
        assert "maximum of 4" in bad(system=five[:4], messages=user("q"), cache_control=cc5)
        # a 5 m marker may not come before a 1 h one (cache order: tools, system, messages)
        order = [{"type": "text", "text": "a", "cache_control": cc5}, {"type": "text", "text": "b", "cache_control": cc1}]
        assert "ttl='1h'" in bad(system=order, messages=user("q"))
        c.messages.create(model=SONNET, max_tokens=5, system=order[::-1], messages=user("q"))
        assert "ttl='1h'" in bad(tools=[{"name": "t", "input_schema": {"type": "object"}, "cache_control": cc5}],
                                 system=[order[1]], messages=user("q"))
        thinking = [{"role": "user", "content": "q"},
                    {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "s",
                                                       "cache_control": cc5}, {"type": "text", "text": "a"}]},
                    {"role": "user", "content": "q2"}]
        assert "thinking" in bad(messages=thinking)
        assert "empty text" in bad(messages=[{"role": "user", "content": [
            {"type": "text", "text": "", "cache_control": cc5}]}])
